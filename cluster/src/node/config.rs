//! The node's settings ([`NodeConfig`]) and why a node could not start
//! ([`NodeError`]); the hand-over window and load interval are those of
//! rules 3 and 5 of the protocol in `node/mod.rs`.

use std::time::Duration;

use crate::ClusterSecret;
use crate::connection::ConnectionConfig;
use crate::membership::MembershipError;

/// Why a node could not start.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeError {
    /// The listener could not be bound.
    Listen(String),
    /// Gossip could not start.
    Membership(MembershipError),
    /// etcd could not be joined.
    #[cfg(feature = "etcd")]
    Etcd(crate::etcd::EtcdError),
    /// The silo already serves another node (a silo serves one node for
    /// its whole life).
    SiloInUse,
    /// A setting of the [`NodeConfig`] is out of range.
    InvalidConfig(String),
}

impl std::fmt::Display for NodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeError::Listen(why) => write!(f, "could not listen: {why}"),
            NodeError::Membership(err) => write!(f, "{err}"),
            #[cfg(feature = "etcd")]
            NodeError::Etcd(err) => write!(f, "{err}"),
            NodeError::SiloInUse => write!(f, "the silo already serves another cluster node"),
            NodeError::InvalidConfig(why) => write!(f, "invalid node configuration: {why}"),
        }
    }
}

impl std::error::Error for NodeError {}

/// How a node joins its cluster.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The cluster's name.
    pub cluster: String,
    /// The cluster's secret (connections and gossip).
    pub secret: ClusterSecret,
    /// Where to listen for other silos (port 0: any).
    pub listen: String,
    /// Where to gossip, and whom to join through.
    pub gossip_address: std::net::SocketAddr,
    /// Gossip addresses to join through.
    pub seeds: Vec<String>,
    /// How often to gossip (default 200 ms).
    pub gossip_interval: Duration,
    /// Phi above which a silent silo is suspected (default 8): about how
    /// many gossip intervals of silence that takes (membership rule 3).
    pub phi_threshold: f64,
    /// How long a suspected silo stays in the view before it is declared
    /// dead, unless heard from again (default 4 s). With the defaults a
    /// silo is declared dead after about 1.6 s + 4 s of silence, so a
    /// 3 s stall is not a death; lower both for faster failover, at the
    /// cost of more false deaths.
    pub death_grace: Duration,
    /// Which start of this silo (greater than any earlier one on the same
    /// address; default: the clock in milliseconds). A silo that comes
    /// back after a stall (rule 7) takes the clock in milliseconds, or one
    /// more than its incarnation if that is greater: a scheme of your own
    /// must stay above both, or a restart is hidden behind the newer
    /// incarnation until peers declare that one dead.
    pub incarnation: u64,
    /// Connection settings.
    pub connection: ConnectionConfig,
    /// The hand-over window after a view change (rule 3; default 5
    /// gossip intervals).
    pub handoff: Option<Duration>,
    /// How often load is published (rule 5; default 1 s).
    pub load_interval: Duration,
    /// The rebalancer and device-memory pressure (`crate::rebalance`,
    /// rule 12 of `node/mod.rs`),
    /// or `None` (the default): no grain moves unless asked, and a silo
    /// takes GPU grains while they fit.
    pub rebalance: Option<crate::rebalance::RebalanceConfig>,
}

impl NodeConfig {
    /// A node of `cluster` listening on `listen` and gossiping on
    /// `gossip_address`, joining through `seeds`, with the defaults.
    pub fn new(
        cluster: impl Into<String>,
        secret: ClusterSecret,
        listen: impl Into<String>,
        gossip_address: std::net::SocketAddr,
        seeds: Vec<String>,
    ) -> NodeConfig {
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |since| since.as_millis() as u64);
        NodeConfig {
            cluster: cluster.into(),
            secret,
            listen: listen.into(),
            gossip_address,
            seeds,
            gossip_interval: Duration::from_millis(200),
            phi_threshold: 8.0,
            death_grace: Duration::from_secs(4),
            incarnation,
            connection: ConnectionConfig::default(),
            handoff: None,
            load_interval: Duration::from_secs(1),
            rebalance: None,
        }
    }
}

/// The largest failure-detector threshold a node takes: far past any
/// useful one (8 by default; 12 is already lenient), and small enough that
/// the gossip interval times it is a duration.
pub const MAX_PHI: f64 = 1000.0;

impl NodeConfig {
    /// Refuses settings the failure detector cannot work with, and a zero
    /// hand-over window.
    pub(super) fn validate(&self) -> Result<(), NodeError> {
        if !(self.phi_threshold.is_finite() && self.phi_threshold > 0.0) {
            return Err(NodeError::InvalidConfig(format!(
                "phi_threshold must be a positive number, not {}",
                self.phi_threshold
            )));
        }
        if self.phi_threshold > MAX_PHI {
            return Err(NodeError::InvalidConfig(format!(
                "phi_threshold must be at most {MAX_PHI} (8 by default), not {}",
                self.phi_threshold
            )));
        }
        if self.gossip_interval.is_zero() {
            return Err(NodeError::InvalidConfig(
                "gossip_interval must be more than zero".into(),
            ));
        }
        if self.handoff.is_some_and(|handoff| handoff.is_zero()) {
            return Err(NodeError::InvalidConfig(
                "handoff must be more than zero (rule 3's hand-over window)".into(),
            ));
        }
        if let Some(rebalance) = &self.rebalance {
            rebalance.validate().map_err(NodeError::InvalidConfig)?;
        }
        Ok(())
    }
}
