//! A silo in a cluster: its grains reachable from every silo.
//!
//! # Protocol
//!
//! 1. **Home.** A grain's activation lives on its *home* silo. The home is
//!    recorded in the directory: the entry owned by the silo that
//!    rendezvous hashing picks for the grain from the membership view
//!    (`directory.rs`).
//! 2. **Calling.** A call goes to the home the caller has cached, else the
//!    one the directory's owner names, else the silo the placement
//!    strategy picks. A silo that receives a call for a grain it is not
//!    home to registers itself with the owner first: if it wins, it
//!    becomes the home and handles the call (its local silo activates the
//!    grain on demand); if not, it answers `Moved(home)` and the caller
//!    goes there, remembering it. So a grain is handled by at most one
//!    silo among those that agree on the view.
//! 3. **Ownership moves** when the view changes. Each silo then registers
//!    its homes with their new owners, and a silo that loses one stops
//!    taking calls for it and deactivates its activation (which writes its
//!    state; ETags refuse a stale write). A new owner answers `Retry` for a grain it has
//!    no entry for during `handoff` after a view change, so that homes are
//!    re-registered before anyone else can claim them. This holds as long
//!    as every silo learns of a view change within `handoff` (several
//!    gossip rounds by default).
//! 4. **Failure.** A silo that leaves the view loses its homes: the
//!    owners drop its entries, the next call places the grain elsewhere,
//!    and the grain starts from its persisted state there. Connections to
//!    it are closed, so calls in flight fail at once with
//!    `SiloUnavailable`; a call to a silo that no longer answers fails the
//!    same way, never hangs.
//! 5. **Load.** Every `load_interval` the node publishes its activation
//!    count and, if it has a GPU bridge, each device's free memory, queue
//!    depth and capabilities, for placement elsewhere. Published load may
//!    be stale, so a silo never becomes home to a grain whose declared
//!    device needs do not fit it now: it answers `NoRoom`, and the caller
//!    places the grain elsewhere. Memory is promised to a grain from that
//!    check until the call that activates it returns, so that first calls
//!    arriving together do not all count the same free bytes.
//! 6. **Giving a home up.** A call arriving here pins the grain's home
//!    from before it registers until the local silo has answered it
//!    (creating the home unconfirmed if there is none). When the grain's
//!    activation here ends (idle, deactivated, or its `on_activate`
//!    failed) and no call pins the home, the silo marks it leaving
//!    (calls get `Retry`), asks the owner to remove the entry if it still
//!    holds this silo's activation number, and forgets the home. The next
//!    call places the grain afresh, where it fits now; a caller told
//!    `Retry` asks the directory again, while one that still has the old
//!    home cached sends its call there, and that silo becomes home again
//!    if the grain fits (rule 5). An unconfirmed home whose entry may name
//!    this silo anyway (a registration whose answer was lost, or a full
//!    device answering `NoRoom` to a grain the entry sends here) removes
//!    any entry naming this silo when it goes. A node that has left or
//!    was killed serves nothing and connects to no one.
//!
//! Directory operations travel as ordinary requests to the reserved grain
//! type `$directory` on the same connections as grain calls.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use futures_util::future::BoxFuture;
use granary_actors::dispatch::{decode, encode};
use granary_actors::{GrainId, GrainKey, Handler, Message, Silo};
use granary_gpu::GpuBridge;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::connection::{self, CallFailure, Connection, ConnectionConfig, Inbound, InboundRequest};
use crate::directory::{self, ActivationAddress, LocationCache, Partition};
use crate::membership::{DeviceLoad, GossipConfig, Member, Membership, MembershipError, SiloLoad};
use crate::placement::{GpuNeeds, PlacementRequest, PlacementStrategy};
use crate::transport::Transport;
use crate::wire::RemoteError;
use crate::{ClusterSecret, SiloId};

/// The reserved grain type of directory requests.
const DIRECTORY: &str = "$directory";
/// Hops a call may take (moved, retried) before it gives up.
const MAX_HOPS: usize = 8;

#[derive(Debug, Clone, Serialize, Deserialize)]
enum DirectoryRequest {
    /// Registers a home; `existing` for a home re-registering after a view
    /// change (rule 3).
    Register {
        grain: GrainId,
        home: ActivationAddress,
        existing: bool,
    },
    Lookup(GrainId),
    /// Removes the grain's entry if it names `home` and, if given,
    /// `activation` (rule 6).
    Unregister {
        grain: GrainId,
        home: SiloId,
        activation: Option<u64>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum DirectoryReply {
    /// The home that stands.
    Home(ActivationAddress),
    /// No entry.
    Unknown,
    /// Within the hand-over window (rule 3).
    Retry,
}

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

/// Why a call through the cluster failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClusterCallError {
    /// The grain type or message is not registered by name on this silo.
    NotRegistered(String),
    /// The silo hosting the grain is unavailable (rule 4).
    SiloUnavailable {
        /// The silo.
        silo: SiloId,
        /// Why.
        reason: String,
    },
    /// No silo to place the grain on.
    Placement(crate::placement::PlacementError),
    /// The call failed where it ran, or on the way.
    Remote(RemoteError),
    /// No answer within the call timeout.
    Timeout(String),
    /// The message or its reply did not encode or decode.
    Payload(String),
}

impl std::fmt::Display for ClusterCallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterCallError::NotRegistered(what) => write!(f, "not registered by name: {what}"),
            ClusterCallError::SiloUnavailable { silo, reason } => {
                write!(f, "silo {silo} is unavailable: {reason}")
            }
            ClusterCallError::Placement(err) => write!(f, "{err}"),
            ClusterCallError::Remote(err) => write!(f, "{err}"),
            ClusterCallError::Timeout(why) => write!(f, "timed out: {why}"),
            ClusterCallError::Payload(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for ClusterCallError {}

fn from_failure(failure: CallFailure) -> ClusterCallError {
    match failure {
        CallFailure::SiloUnavailable { silo, reason } => {
            ClusterCallError::SiloUnavailable { silo, reason }
        }
        CallFailure::Remote(err) => ClusterCallError::Remote(err),
        CallFailure::Timeout { silo, after } => {
            ClusterCallError::Timeout(format!("no answer from {silo} within {after:?}"))
        }
        CallFailure::TooLarge { len, max } => {
            ClusterCallError::Payload(format!("a request of {len} bytes exceeds {max}"))
        }
    }
}

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
    /// address; default: the clock in milliseconds).
    pub incarnation: u64,
    /// Connection settings.
    pub connection: ConnectionConfig,
    /// The hand-over window after a view change (rule 3; default 5
    /// gossip intervals).
    pub handoff: Option<Duration>,
    /// How often load is published (rule 5; default 1 s).
    pub load_interval: Duration,
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
        }
    }
}

impl NodeConfig {
    /// Refuses settings the failure detector cannot work with.
    fn validate(&self) -> Result<(), NodeError> {
        if !(self.phi_threshold.is_finite() && self.phi_threshold > 0.0) {
            return Err(NodeError::InvalidConfig(format!(
                "phi_threshold must be a positive number, not {}",
                self.phi_threshold
            )));
        }
        if self.gossip_interval.is_zero() {
            return Err(NodeError::InvalidConfig(
                "gossip_interval must be more than zero".into(),
            ));
        }
        Ok(())
    }
}

struct Inner {
    id: SiloId,
    config: NodeConfig,
    silo: Silo,
    bridge: Option<Arc<GpuBridge>>,
    transport: Arc<dyn Transport>,
    /// Taken out when the node leaves or stops.
    membership: tokio::sync::Mutex<Option<Provider>>,
    /// Where directory entries live.
    directory: DirectoryBackend,
    /// The membership's view, as it changes.
    members: tokio::sync::watch::Receiver<Vec<Member>>,
    /// The view, as last seen by the view task.
    view: arc_swap::ArcSwap<Vec<Member>>,
    /// When the view last changed (rule 3).
    view_changed: Mutex<Instant>,
    handoff: Duration,
    /// Directory entries this silo owns.
    partition: Partition,
    /// Homes learned.
    cache: LocationCache,
    /// Grains this silo is home to (rules 2, 3 and 6).
    homes: DashMap<GrainId, Home>,
    /// Device memory promised to grains becoming home here whose
    /// activations have not reserved theirs yet (rule 5), in bytes.
    promised: Mutex<HashMap<usize, u64>>,
    /// Homes given up under rule 6.
    given_up: AtomicU64,
    /// Set when the node leaves or is killed: it serves nothing and
    /// connects to no one after that.
    stopped: std::sync::atomic::AtomicBool,
    /// Under etcd, whether the silo still holds its lease (etcd rule 6):
    /// once it does not, others may have activated its grains, so it
    /// serves nothing more.
    holds_lease: Option<Box<dyn Fn() -> bool + Send + Sync>>,
    /// The silo's claim for this node, held as long as the node lives.
    claim: Mutex<Option<Claim>>,
    /// Open connections, by peer: the one calls go out on. The map's lock
    /// is never held across an await; a peer's slot is, only while
    /// connecting to that peer.
    connections: Mutex<HashMap<SiloId, Arc<tokio::sync::Mutex<Option<Connection>>>>>,
    /// The connection calls go out on, by peer, for the common case: read
    /// without the slots' locks. Kept with the slots: set when a slot gets
    /// a connection, removed when the peer leaves the view.
    open: DashMap<SiloId, Connection>,
    /// Connections peers opened, kept open for their calls (when both
    /// sides connect at once, each uses its own for its calls).
    accepted: tokio::sync::Mutex<Vec<Connection>>,
    placement: Arc<dyn PlacementStrategy>,
    /// Device needs by grain type name.
    needs: HashMap<String, GpuNeeds>,
    next_activation: AtomicU64,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Where the view comes from.
enum Provider {
    /// Gossip (chitchat), the embedded default.
    Gossip(Box<Membership>),
    /// Leases and watches in etcd.
    #[cfg(feature = "etcd")]
    Etcd {
        membership: Box<crate::etcd::EtcdMembership>,
        /// The load last written, so an unchanged load is not written again.
        published: Option<SiloLoad>,
    },
}

impl Provider {
    fn members(&self) -> Vec<Member> {
        match self {
            Provider::Gossip(membership) => membership.members(),
            #[cfg(feature = "etcd")]
            Provider::Etcd { membership, .. } => membership.members(),
        }
    }

    fn watch(&self) -> tokio::sync::watch::Receiver<Vec<Member>> {
        match self {
            Provider::Gossip(membership) => membership.watch(),
            #[cfg(feature = "etcd")]
            Provider::Etcd { membership, .. } => membership.watch(),
        }
    }

    async fn publish_load(&mut self, load: &SiloLoad) {
        match self {
            Provider::Gossip(membership) => membership.publish_load(load).await,
            #[cfg(feature = "etcd")]
            Provider::Etcd {
                membership,
                published,
            } => {
                if published.as_ref() != Some(load) {
                    match membership.publish_load(load.clone()).await {
                        Ok(()) => *published = Some(load.clone()),
                        Err(err) => tracing::warn!(error = %err, "publishing load to etcd failed"),
                    }
                }
            }
        }
    }

    async fn leave(self) -> Result<(), MembershipError> {
        match self {
            Provider::Gossip(membership) => membership.leave().await,
            #[cfg(feature = "etcd")]
            Provider::Etcd { membership, .. } => membership
                .leave()
                .await
                .map_err(|err| MembershipError::Stop(err.to_string())),
        }
    }

    async fn stop(self) -> Result<(), MembershipError> {
        match self {
            Provider::Gossip(membership) => membership.stop().await,
            #[cfg(feature = "etcd")]
            Provider::Etcd { membership, .. } => {
                membership.stop();
                Ok(())
            }
        }
    }
}

/// Where directory entries live.
enum DirectoryBackend {
    /// Partitioned over the live silos (rules 1 to 3).
    Partitioned,
    /// In etcd: one entry per grain, first registration wins, entries go
    /// with their silo's lease; nothing moves when the view changes.
    #[cfg(feature = "etcd")]
    Etcd(Box<crate::etcd::EtcdDirectory>),
}

/// A grain this silo is home to, or is becoming home to.
#[derive(Debug, Clone)]
struct Home {
    /// The owner of its directory entry it registered with; `None` while
    /// no registration has been confirmed (rule 6).
    owner: Option<SiloId>,
    /// The activation number the entry holds (unregistering names it).
    activation: u64,
    /// Calls pinning the home: from before their registration until the
    /// local silo has answered them. While any is, the activation may be
    /// starting, so the home is kept (rule 6).
    in_flight: u32,
    /// The entry may name this silo although no registration was
    /// confirmed (a registration whose answer was lost, or an entry found
    /// when the device was full): removed when the home is (rule 6).
    maybe_registered: bool,
    /// Its activation ended and its entry is being removed: calls are
    /// answered `Retry` until it is gone (rule 6).
    leaving: bool,
    /// Tells this home from a later one for the same grain, so that a pin
    /// taken on a home that was since removed never counts against its
    /// successor.
    generation: u64,
}

/// A silo in a cluster. Cheap to clone.
#[derive(Clone)]
pub struct ClusterNode {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("id", &self.inner.id)
            .field("homes", &self.homes())
            .finish_non_exhaustive()
    }
}

/// Builds a [`ClusterNode`].
pub struct NodeBuilder {
    silo: Silo,
    config: NodeConfig,
    bridge: Option<Arc<GpuBridge>>,
    transport: Arc<dyn Transport>,
    placement: Arc<dyn PlacementStrategy>,
    needs: HashMap<String, GpuNeeds>,
}

impl ClusterNode {
    /// A builder for a node hosting `silo`'s grains, over TCP, placing new
    /// activations with GPU-aware placement, and grains that need no
    /// device (or fit none) by rendezvous hash. The node publishes the
    /// devices of the silo's GPU bridge, if the silo serves one
    /// ([`SiloBuilder::service`](granary_actors::SiloBuilder::service)):
    /// the bridge is handed over once, to the silo.
    pub fn builder(silo: Silo, config: NodeConfig) -> NodeBuilder {
        NodeBuilder {
            bridge: silo.service::<GpuBridge>(),
            silo,
            config,
            transport: Arc::new(crate::TcpTransport),
            placement: Arc::new(crate::placement::GpuAware::with_fallback(Box::new(
                crate::placement::HashPlacement,
            ))),
            needs: HashMap::new(),
        }
    }

    /// This silo's identity.
    pub fn id(&self) -> &SiloId {
        &self.inner.id
    }

    /// The local silo.
    pub fn silo(&self) -> &Silo {
        &self.inner.silo
    }

    /// The live members, as this silo sees them.
    pub fn members(&self) -> Vec<Member> {
        self.inner.members.borrow().clone()
    }

    /// Grains this silo is home to now.
    pub fn homes(&self) -> usize {
        self.inner
            .homes
            .iter()
            .filter(|home| home.owner.is_some() && !home.leaving)
            .count()
    }

    /// Homes this silo has given up since it started because their
    /// activations ended (rule 6).
    pub fn homes_given_up(&self) -> u64 {
        self.inner.given_up.load(Ordering::Relaxed)
    }

    /// Where this silo last found grain `grain_type`/`key` living.
    pub fn location(&self, grain_type: &str, key: GrainKey) -> Option<SiloId> {
        let grain = GrainId {
            type_name: grain_type.to_string(),
            key,
        };
        self.inner.cache.get(&grain).map(|home| home.silo)
    }

    /// A reference to grain `G` with `key`, callable from this silo
    /// wherever the grain lives.
    pub fn grain<G: granary_actors::Grain>(&self, key: impl Into<GrainKey>) -> ClusterRef<G> {
        ClusterRef {
            node: self.clone(),
            key: key.into(),
            _grain: std::marker::PhantomData,
        }
    }

    /// Calls grain `grain_type`/`key` with message `message` in its wire
    /// form, wherever it lives (rule 2).
    pub async fn call_named(
        &self,
        grain_type: &str,
        key: GrainKey,
        message: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, ClusterCallError> {
        if grain_type == DIRECTORY {
            return Err(ClusterCallError::NotRegistered(grain_type.to_string()));
        }
        let grain = GrainId {
            type_name: grain_type.to_string(),
            key,
        };
        let inner = &self.inner;
        // Moves and silos found gone count as hops; waits for a directory
        // that is settling (rule 3) are bounded by time instead.
        let mut hops = 0;
        let settle_by = deadline_after(inner.handoff.saturating_mul(4));
        let mut last = None;
        // Silos that had no room for the grain in this call (rule 5).
        let mut full: Vec<SiloId> = Vec::new();
        while hops < MAX_HOPS {
            let mut sent = false;
            let (target, cached) = match self.home_of(&grain, &full).await {
                Ok(found) => found,
                Err(err @ ClusterCallError::Remote(RemoteError::Retry))
                    if Instant::now() < settle_by =>
                {
                    last = Some(err);
                    tokio::time::sleep(inner.handoff / 8).await;
                    continue;
                }
                Err(err) => return Err(err),
            };
            let outcome = if target == inner.id {
                inner
                    .host(&grain, message, Bytes::copy_from_slice(payload), false)
                    .await
                    .map_err(ClusterCallError::Remote)
            } else {
                match self.connection(&target).await {
                    Ok(connection) => {
                        sent = true;
                        connection
                            .call(grain_type, &grain.key, message, payload)
                            .await
                            .map(|reply| reply.to_vec())
                            .map_err(from_failure)
                    }
                    Err(err) => Err(err),
                }
            };
            match outcome {
                Ok(reply) => {
                    if !cached {
                        inner.cache.insert(
                            grain.clone(),
                            ActivationAddress {
                                silo: target,
                                activation: 0,
                            },
                        );
                    }
                    return Ok(reply);
                }
                Err(ClusterCallError::Remote(RemoteError::NoRoom)) => {
                    // Its published load was stale: place elsewhere. Only
                    // this grain's location is forgotten: the silo is
                    // alive, and its other grains still live there.
                    hops += 1;
                    inner.cache.invalidate(
                        &grain,
                        &ActivationAddress {
                            silo: target.clone(),
                            activation: 0,
                        },
                    );
                    full.push(target);
                    last = Some(ClusterCallError::Remote(RemoteError::NoRoom));
                }
                Err(ClusterCallError::Remote(RemoteError::Moved(home))) => {
                    hops += 1;
                    inner.cache.insert(
                        grain.clone(),
                        ActivationAddress {
                            silo: home,
                            activation: 0,
                        },
                    );
                }
                Err(
                    err @ ClusterCallError::Remote(RemoteError::Retry | RemoteError::Overloaded),
                ) => {
                    if Instant::now() >= settle_by {
                        return Err(err);
                    }
                    if matches!(err, ClusterCallError::Remote(RemoteError::Retry)) {
                        // The home is in flux (settling, or given up by
                        // rule 6): ask the directory again next time.
                        inner.cache.invalidate(
                            &grain,
                            &ActivationAddress {
                                silo: target.clone(),
                                activation: 0,
                            },
                        );
                    }
                    last = Some(err);
                    tokio::time::sleep(inner.handoff / 8).await;
                }
                Err(err @ ClusterCallError::SiloUnavailable { .. }) => {
                    inner.cache.forget_silo(&target);
                    // In the view still: the call fails fast (rule 4); gone
                    // from it: the grain is placed elsewhere.
                    // A call that went out may have run: never send it
                    // again (at most once).
                    if sent || inner.is_live(&target) {
                        return Err(err);
                    }
                    hops += 1;
                    last = Some(err);
                }
                Err(other) => return Err(other),
            }
        }
        Err(last
            .unwrap_or_else(|| ClusterCallError::Timeout("the grain's home did not settle".into())))
    }

    /// The silo to send a call for `grain` to (rule 2), and whether it
    /// came from the location cache.
    async fn home_of(
        &self,
        grain: &GrainId,
        full: &[SiloId],
    ) -> Result<(SiloId, bool), ClusterCallError> {
        let inner = &self.inner;
        if let Some(home) = inner.cache.get(grain) {
            if inner.is_live(&home.silo) {
                return Ok((home.silo, true));
            }
        }
        match self
            .directory(DirectoryRequest::Lookup(grain.clone()))
            .await?
        {
            DirectoryReply::Home(home) if inner.is_live(&home.silo) => {
                return Ok((home.silo, false));
            }
            // In etcd an entry outlives no silo: one this view lacks is a
            // silo the view has not caught up with.
            DirectoryReply::Home(_)
                if !matches!(inner.directory, DirectoryBackend::Partitioned) =>
            {
                return Err(ClusterCallError::Remote(RemoteError::Retry));
            }
            DirectoryReply::Retry => return Err(ClusterCallError::Remote(RemoteError::Retry)),
            DirectoryReply::Home(_) | DirectoryReply::Unknown => {}
        }
        let view: Vec<Member> = inner
            .view()
            .iter()
            .filter(|member| !full.contains(&member.silo))
            .cloned()
            .collect();
        let request = PlacementRequest {
            grain,
            caller: &inner.id,
            needs: inner.needs.get(&grain.type_name),
        };
        inner
            .placement
            .place(&request, &view)
            .map(|silo| (silo, false))
            .map_err(ClusterCallError::Placement)
    }

    /// Sends a directory request to the grain's entry's owner.
    async fn directory(
        &self,
        request: DirectoryRequest,
    ) -> Result<DirectoryReply, ClusterCallError> {
        #[cfg(feature = "etcd")]
        if let DirectoryBackend::Etcd(etcd) = &self.inner.directory {
            let failed = |err: crate::etcd::EtcdError| {
                ClusterCallError::Remote(RemoteError::Other(err.to_string()))
            };
            return match request {
                DirectoryRequest::Register { grain, home, .. } => etcd
                    .register(&grain, home.activation)
                    .await
                    .map(DirectoryReply::Home)
                    .map_err(failed),
                DirectoryRequest::Lookup(grain) => match etcd.lookup(&grain).await {
                    Ok(Some(home)) => Ok(DirectoryReply::Home(home)),
                    Ok(None) => Ok(DirectoryReply::Unknown),
                    Err(err) => Err(failed(err)),
                },
                DirectoryRequest::Unregister {
                    grain, activation, ..
                } => etcd
                    .unregister(&grain, activation)
                    .await
                    .map(|_| DirectoryReply::Unknown)
                    .map_err(failed),
            };
        }
        let grain = match &request {
            DirectoryRequest::Register { grain, .. }
            | DirectoryRequest::Lookup(grain)
            | DirectoryRequest::Unregister { grain, .. } => grain,
        };
        let view = self.inner.view();
        let Some(owner) = directory::owner(grain, &view).cloned() else {
            return Err(ClusterCallError::Placement(
                crate::placement::PlacementError::NoSilos,
            ));
        };
        if owner == self.inner.id {
            return Ok(self.inner.answer_directory(request));
        }
        let payload = encode(&request).map_err(|err| ClusterCallError::Payload(err.to_string()))?;
        let connection = self.connection(&owner).await?;
        let reply = connection
            .call(DIRECTORY, &GrainKey::U64(0), "directory", &payload)
            .await
            .map_err(from_failure)?;
        decode(&reply).map_err(|err| ClusterCallError::Payload(err.to_string()))
    }

    /// The open connection to `peer`, opened if needed.
    async fn connection(&self, peer: &SiloId) -> Result<Connection, ClusterCallError> {
        let inner = &self.inner;
        if inner.stopped.load(Ordering::Acquire) {
            return Err(ClusterCallError::Remote(RemoteError::ShutDown));
        }
        if let Some(open) = inner.open.get(peer) {
            if !open.is_closed() {
                return Ok(open.clone());
            }
        }
        let slot = inner
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(peer.clone())
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(connection) = slot.as_ref() {
            if !connection.is_closed() {
                inner.open.insert(peer.clone(), connection.clone());
                return Ok(connection.clone());
            }
        }
        let unavailable = |reason: String| ClusterCallError::SiloUnavailable {
            silo: peer.clone(),
            reason,
        };
        let connecting = async {
            let io = inner
                .transport
                .connect(peer.address.clone())
                .await
                .map_err(|err| unavailable(err.to_string()))?;
            connection::connect(
                io,
                inner.id.clone(),
                &inner.config.cluster,
                &inner.config.secret,
                Arc::new(NodeInbound(Arc::downgrade(inner))),
                inner.config.connection,
            )
            .await
            .map_err(|err| unavailable(err.to_string()))
        };
        let connection =
            tokio::time::timeout(inner.config.connection.handshake_timeout, connecting)
                .await
                .map_err(|_| unavailable("connecting timed out".into()))??;
        if connection.peer() != peer {
            return Err(unavailable(format!(
                "{} answered in its place",
                connection.peer()
            )));
        }
        *slot = Some(connection.clone());
        inner.open.insert(peer.clone(), connection.clone());
        Ok(connection)
    }

    /// Leaves the cluster gracefully: gossip says so at once, then the
    /// node stops serving and its connections close.
    pub async fn leave(&self) -> Result<(), MembershipError> {
        // Serve nothing more, and let every activation here go (writing its
        // state) before the others may place its grains elsewhere.
        self.inner.stopped.store(true, Ordering::Release);
        self.deactivate_homes().await;
        let membership = self.inner.membership.lock().await.take();
        let left = match membership {
            Some(membership) => membership.leave().await,
            None => Ok(()),
        };
        self.stop_serving().await;
        left
    }

    /// Whether this node has stopped serving: it left, was killed, or
    /// (under etcd) lost its lease. A stopped node never serves again; a
    /// silo process rejoins as a new node (a new incarnation).
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::Acquire) || !self.inner.holds_lease()
    }

    /// Forgets every home and deactivates its activation here, waiting
    /// until each has ended (its queued messages run and `on_deactivate`
    /// wrote its state), for at most the connection's call timeout.
    async fn deactivate_homes(&self) {
        let homes: Vec<GrainId> = self
            .inner
            .homes
            .iter()
            .map(|home| home.key().clone())
            .collect();
        self.inner.homes.clear();
        let silo = &self.inner.silo;
        let give_up = deadline_after(self.inner.config.connection.call_timeout);
        futures_util::future::join_all(homes.into_iter().map(|grain| async move {
            // Queued only: the activation ends later.
            if let Err(err) = silo
                .deactivate_named(&grain.type_name, grain.key.clone())
                .await
            {
                tracing::debug!(error = %err, "an activation did not deactivate");
            }
            while silo.is_active_named(&grain.type_name, &grain.key) {
                if Instant::now() >= give_up {
                    tracing::warn!(%grain, "an activation outlived its node's leave");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }))
        .await;
    }

    /// Stops at once, as a crash looks to the others: gossip stops (the
    /// failure detector notices), connections close, nothing is handed
    /// over.
    pub async fn kill(&self) -> Result<(), MembershipError> {
        let membership = self.inner.membership.lock().await.take();
        self.stop_serving().await;
        match membership {
            Some(membership) => membership.stop().await,
            None => Ok(()),
        }
    }

    async fn stop_serving(&self) {
        self.inner.stopped.store(true, Ordering::Release);
        self.inner.stop_tasks();
        self.inner.open.clear();
        let slots: Vec<_> = self
            .inner
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, slot)| slot)
            .collect();
        for slot in slots {
            if let Some(connection) = slot.lock().await.take() {
                connection.close();
            }
        }
        for connection in self.inner.accepted.lock().await.drain(..) {
            connection.close();
        }
    }
}

impl Inner {
    fn view(&self) -> Arc<Vec<Member>> {
        self.view.load_full()
    }

    /// Who keeps `grain`'s directory entry in `view`: its owner among the
    /// silos, or etcd (one name for every entry, which view changes never
    /// move).
    fn entry_owner(&self, grain: &GrainId, view: &[Member]) -> Option<SiloId> {
        match &self.directory {
            DirectoryBackend::Partitioned => directory::owner(grain, view).cloned(),
            #[cfg(feature = "etcd")]
            DirectoryBackend::Etcd(_) => Some(SiloId::new("etcd", 0)),
        }
    }

    /// Whether this silo may serve: always under gossip; under etcd while
    /// it holds its lease.
    fn holds_lease(&self) -> bool {
        self.holds_lease.as_ref().is_none_or(|holds| holds())
    }

    fn is_live(&self, silo: &SiloId) -> bool {
        self.view.load().iter().any(|member| &member.silo == silo)
    }

    fn stop_tasks(&self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            task.abort();
        }
    }

    /// Answers a directory request for an entry this silo owns (rules 2
    /// and 3).
    fn answer_directory(&self, request: DirectoryRequest) -> DirectoryReply {
        let settling = self
            .view_changed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
            < self.handoff;
        let view = self.view();
        let grain = match &request {
            DirectoryRequest::Register { grain, .. }
            | DirectoryRequest::Lookup(grain)
            | DirectoryRequest::Unregister { grain, .. } => grain,
        };
        if directory::owner(grain, &view) != Some(&self.id) {
            return DirectoryReply::Retry;
        }
        match request {
            DirectoryRequest::Lookup(grain) => match self.partition.lookup(&grain) {
                Some(home) => DirectoryReply::Home(home),
                None if settling => DirectoryReply::Retry,
                None => DirectoryReply::Unknown,
            },
            DirectoryRequest::Register {
                grain,
                home,
                existing,
            } => {
                // A home from before the view changed may not have
                // re-registered yet: only it may claim the grain now.
                if settling && !existing && self.partition.lookup(&grain).is_none() {
                    return DirectoryReply::Retry;
                }
                // A proposer this silo does not see yet would be taken for
                // a dead one by the next registration.
                if !view.iter().any(|member| member.silo == home.silo) {
                    return DirectoryReply::Retry;
                }
                DirectoryReply::Home(self.partition.register(&grain, home, |silo| {
                    view.iter().any(|member| &member.silo == silo)
                }))
            }
            DirectoryRequest::Unregister {
                grain,
                home,
                activation,
            } => {
                match activation {
                    Some(activation) => {
                        self.partition.unregister(
                            &grain,
                            &ActivationAddress {
                                silo: home,
                                activation,
                            },
                        );
                    }
                    None => {
                        self.partition.unregister_silo(&grain, &home);
                    }
                }
                match self.partition.lookup(&grain) {
                    Some(other) => DirectoryReply::Home(other),
                    None => DirectoryReply::Unknown,
                }
            }
        }
    }

    /// Handles a call for `grain` arriving here (rule 2).
    async fn host(
        self: &Arc<Self>,
        grain: &GrainId,
        message: &str,
        payload: Bytes,
        one_way: bool,
    ) -> Result<Vec<u8>, RemoteError> {
        if self.stopped.load(Ordering::Acquire) || !self.holds_lease() {
            return Err(RemoteError::ShutDown);
        }
        let owner = self.entry_owner(grain, &self.view());
        // Rule 6: the home is pinned from before its registration until
        // the local silo has answered, so it is never given up while this
        // call may be registering it or starting its activation.
        let (registered_with, pin) = self.pin(grain)?;
        // Rule 5: never become home to a grain whose device needs do not
        // fit here now (placement decided on load that may be stale); the
        // memory is promised until the call that activates it returns.
        let _promise = match registered_with {
            None => match self.promise(&grain.type_name) {
                Ok(promise) => Some(promise),
                Err(no_room) => {
                    // An entry naming this silo may be left from before;
                    // it would send every caller back here.
                    pin.suspect_entry();
                    return Err(no_room);
                }
            },
            Some(_) => None,
        };
        if registered_with.is_none() || registered_with != owner {
            let node = ClusterNode {
                inner: self.clone(),
            };
            let proposed = ActivationAddress {
                silo: self.id.clone(),
                activation: self.next_activation.fetch_add(1, Ordering::Relaxed),
            };
            match node
                .directory(DirectoryRequest::Register {
                    grain: grain.clone(),
                    home: proposed,
                    existing: registered_with.is_some(),
                })
                .await
            {
                Ok(DirectoryReply::Home(home)) if home.silo == self.id => {
                    match self.homes.get_mut(grain) {
                        Some(mut entry) if entry.generation == pin.generation => {
                            entry.owner = owner;
                            entry.activation = home.activation;
                            entry.maybe_registered = false;
                        }
                        // The home was lost or replaced meanwhile: ask
                        // again rather than serve without it.
                        _ => return Err(RemoteError::Retry),
                    }
                }
                Ok(DirectoryReply::Home(home)) => {
                    // Lost: stop serving it, and let its activation here
                    // (if it was home before) go.
                    if registered_with.is_some() && self.homes.remove(grain).is_some() {
                        self.release(grain);
                    }
                    return Err(RemoteError::Moved(home.silo));
                }
                Ok(DirectoryReply::Retry | DirectoryReply::Unknown) => {
                    return Err(RemoteError::Retry);
                }
                Err(err) => {
                    // The registration may have been made and its answer
                    // lost.
                    pin.suspect_entry();
                    return Err(RemoteError::Other(err.to_string()));
                }
            }
        }
        // A leave may have begun while this call registered: it must not
        // start an activation the leave would not wait for.
        if self.stopped.load(Ordering::Acquire) || !self.holds_lease() {
            return Err(RemoteError::ShutDown);
        }
        let key = grain.key.clone();
        let outcome = if one_way {
            self.silo
                .tell_named(&grain.type_name, key, message, &payload)
                .await
                .map(|()| Vec::new())
        } else {
            self.silo
                .call_named(&grain.type_name, key, message, &payload)
                .await
        };
        outcome.map_err(RemoteError::from)
    }

    /// Pins `grain`'s home here for one call (rule 6), creating it
    /// unconfirmed if there is none; returns the owner it is registered
    /// with, if confirmed. A leaving home is not pinned: `Retry`.
    fn pin(self: &Arc<Self>, grain: &GrainId) -> Result<(Option<SiloId>, InFlight), RemoteError> {
        // The common case, a home already here: no key to clone.
        let found = self.homes.get_mut(grain).map(|mut home| {
            if home.leaving {
                return Err(RemoteError::Retry);
            }
            home.in_flight += 1;
            Ok((home.owner.clone(), home.generation))
        });
        let (registered_with, generation) = match found {
            Some(found) => found?,
            None => self.pin_new(grain)?,
        };
        Ok((
            registered_with,
            InFlight {
                inner: self.clone(),
                grain: grain.clone(),
                generation,
            },
        ))
    }

    /// [`Inner::pin`] where no home was found: one is made unconfirmed,
    /// unless another call made one meanwhile.
    fn pin_new(self: &Arc<Self>, grain: &GrainId) -> Result<(Option<SiloId>, u64), RemoteError> {
        match self.homes.entry(grain.clone()) {
            dashmap::Entry::Occupied(entry) if entry.get().leaving => Err(RemoteError::Retry),
            dashmap::Entry::Occupied(mut entry) => {
                let home = entry.get_mut();
                home.in_flight += 1;
                Ok((home.owner.clone(), home.generation))
            }
            dashmap::Entry::Vacant(entry) => {
                let generation = self.next_activation.fetch_add(1, Ordering::Relaxed);
                entry.insert(Home {
                    owner: None,
                    activation: 0,
                    in_flight: 1,
                    maybe_registered: false,
                    leaving: false,
                    generation,
                });
                Ok((None, generation))
            }
        }
    }

    /// Rule 6: `grain`'s activation here ended, or a call to it returned.
    /// With no call pinning the home and no activation left, the home is
    /// given up: its directory entry is removed (if one may name this
    /// silo), and the next call places the grain afresh.
    fn maybe_leave(self: &Arc<Self>, grain: &GrainId) {
        let unregister = {
            let Some(mut home) = self.homes.get_mut(grain) else {
                return;
            };
            if home.leaving
                || home.in_flight > 0
                || self.silo.is_active_named(&grain.type_name, &grain.key)
            {
                return;
            }
            let unregister = match (&home.owner, home.maybe_registered) {
                (Some(_), _) => Some(Some(home.activation)),
                (None, true) => Some(None),
                // Never registered: nothing names this silo.
                (None, false) => None,
            };
            if unregister.is_some() {
                home.leaving = true;
            }
            unregister
        };
        let Some(activation) = unregister else {
            self.homes.remove_if(grain, |_, home| {
                home.owner.is_none() && home.in_flight == 0 && !home.leaving
            });
            return;
        };
        let node = ClusterNode {
            inner: self.clone(),
        };
        let grain = grain.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.homes.remove(&grain);
            return;
        };
        runtime.spawn(async move {
            let inner = &node.inner;
            // The owner may change on the way: ask whoever owns the entry
            // now, for a while. An entry left behind names this silo and
            // only this silo acts on it: it becomes home again, or, full,
            // removes it (rule 5).
            let settle_by = deadline_after(inner.handoff.saturating_mul(4));
            while !inner.stopped.load(Ordering::Acquire) {
                let request = DirectoryRequest::Unregister {
                    grain: grain.clone(),
                    home: inner.id.clone(),
                    activation,
                };
                match node.directory(request).await {
                    Ok(DirectoryReply::Home(_) | DirectoryReply::Unknown) => break,
                    Ok(DirectoryReply::Retry) | Err(_) if Instant::now() < settle_by => {
                        tokio::time::sleep(inner.handoff / 8).await;
                    }
                    Ok(DirectoryReply::Retry) | Err(_) => break,
                }
            }
            if inner
                .homes
                .remove_if(&grain, |_, home| home.leaving)
                .is_some()
            {
                inner.given_up.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    /// Promises the device memory a new grain of `grain_type` declares on
    /// the device here with the most left beyond what is promised already,
    /// if one fits it (rule 5); a type that declares none always fits.
    fn promise(self: &Arc<Self>, grain_type: &str) -> Result<Promise, RemoteError> {
        let Some(needs) = self.needs.get(grain_type) else {
            return Ok(Promise {
                inner: self.clone(),
                device: 0,
                bytes: 0,
            });
        };
        // Read under the lock that releases promises, so that a promise
        // dropped after its activation reserved is never missed.
        let mut promised = self.promised.lock().unwrap_or_else(PoisonError::into_inner);
        let devices = self.load().devices;
        let chosen = devices
            .into_iter()
            .enumerate()
            .filter_map(|(index, mut device)| {
                let already = promised.get(&index).copied().unwrap_or(0);
                device.free_memory = device.free_memory.saturating_sub(already);
                needs.fits(&device).then_some((index, device.free_memory))
            })
            .max_by_key(|(index, left)| (*left, std::cmp::Reverse(*index)));
        let Some((device, _)) = chosen else {
            return Err(RemoteError::NoRoom);
        };
        *promised.entry(device).or_default() += needs.device_memory;
        Ok(Promise {
            inner: self.clone(),
            device,
            bytes: needs.device_memory,
        })
    }

    /// Rule 3 and 4: the view changed from `before` to `after`.
    async fn on_view_change(self: &Arc<Self>, before: &[Member], after: &[Member]) {
        *self
            .view_changed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        let live: HashSet<&SiloId> = after.iter().map(|member| &member.silo).collect();
        let gone: Vec<SiloId> = before
            .iter()
            .filter(|member| !live.contains(&member.silo))
            .map(|member| member.silo.clone())
            .collect();
        for silo in &gone {
            self.partition.forget_silo(silo);
            self.cache.forget_silo(silo);
            self.open.remove(silo);
            let slot = self
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(silo);
            if let Some(slot) = slot {
                // Waits at most handshake_timeout for a connect in progress.
                if let Some(connection) = slot.lock().await.take() {
                    connection.close();
                }
            }
            self.accepted.lock().await.retain(|connection| {
                if connection.peer() == silo {
                    connection.close();
                    false
                } else {
                    true
                }
            });
        }
        // Re-register homes whose entry changed owner.
        let node = ClusterNode {
            inner: self.clone(),
        };
        let homes: Vec<GrainId> = self.homes.iter().map(|entry| entry.key().clone()).collect();
        for grain in homes {
            let Some(new) = self.entry_owner(&grain, after) else {
                continue;
            };
            // Up to date, leaving (its entry is being removed), or not
            // registered yet (its first call registers it).
            let Some(activation) = self.homes.get(&grain).and_then(|home| {
                (home.owner.is_some() && home.owner.as_ref() != Some(&new) && !home.leaving)
                    .then_some(home.activation)
            }) else {
                continue;
            };
            let proposed = ActivationAddress {
                silo: self.id.clone(),
                activation,
            };
            // A few tries inside the hand-over window; a home that cannot
            // re-register in it is given up (its activation let go), since
            // after it another silo may claim the grain.
            let mut tries = 0;
            loop {
                tries += 1;
                let reply = node
                    .directory(DirectoryRequest::Register {
                        grain: grain.clone(),
                        home: proposed.clone(),
                        existing: true,
                    })
                    .await;
                match reply {
                    Ok(DirectoryReply::Home(home)) if home.silo == self.id => {
                        if let Some(mut entry) = self.homes.get_mut(&grain) {
                            entry.owner = Some(new);
                            entry.activation = home.activation;
                        }
                        break;
                    }
                    Ok(DirectoryReply::Home(_)) => {
                        if self.homes.remove(&grain).is_some() {
                            self.release(&grain);
                        }
                        break;
                    }
                    _ if tries < 4 && !self.stopped.load(Ordering::Acquire) => {
                        tokio::time::sleep(self.handoff / 8).await;
                    }
                    _ => {
                        if self.homes.remove(&grain).is_some() {
                            self.release(&grain);
                        }
                        break;
                    }
                }
            }
        }
    }

    /// Deactivates this silo's activation of `grain`, which it is no
    /// longer home to: the activation runs what it already holds, writes
    /// its state, and frees its resources (a resident buffer's device
    /// memory, say).
    fn release(&self, grain: &GrainId) {
        let silo = self.silo.clone();
        let (grain_type, key) = (grain.type_name.clone(), grain.key.clone());
        tokio::spawn(async move {
            if let Err(err) = silo.deactivate_named(&grain_type, key).await {
                tracing::debug!(%grain_type, error = %err, "a lost home's activation did not deactivate");
            }
        });
    }

    fn load(&self) -> SiloLoad {
        SiloLoad {
            activations: self.silo.live_activations(),
            devices: self
                .bridge
                .iter()
                .flat_map(|bridge| bridge.devices())
                .map(|(_, info, stats)| DeviceLoad {
                    backend: format!("{:?}", info.backend),
                    name: info.name,
                    total_memory: info.total_memory,
                    free_memory: stats.available,
                    queue_depth: stats.queue_depth,
                    compute_units: info.compute_units,
                })
                .collect(),
        }
    }
}

/// `wait` from now, or as far as the clock goes (a huge configured
/// hand-over window must not overflow).
fn deadline_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// A call to the local silo counted in its home's `in_flight` (rule 6).
struct InFlight {
    inner: Arc<Inner>,
    grain: GrainId,
    /// The pinned home's generation.
    generation: u64,
}

impl InFlight {
    /// The directory may hold an entry naming this silo for the grain
    /// although its home here is not confirmed: remove it when the home
    /// goes (rule 6).
    fn suspect_entry(&self) {
        if let Some(mut home) = self.inner.homes.get_mut(&self.grain) {
            if home.owner.is_none() && home.generation == self.generation {
                home.maybe_registered = true;
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let last = match self.inner.homes.get_mut(&self.grain) {
            Some(mut home) if home.generation == self.generation => {
                home.in_flight = home.in_flight.saturating_sub(1);
                home.in_flight == 0
            }
            // Removed or replaced: whoever removed it saw to its entry.
            _ => false,
        };
        if last {
            self.inner.maybe_leave(&self.grain);
        }
    }
}

/// Device memory promised to a grain becoming home here (rule 5).
struct Promise {
    inner: Arc<Inner>,
    /// The device's position in this silo's load.
    device: usize,
    bytes: u64,
}

impl Drop for Promise {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let mut promised = self
                .inner
                .promised
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(bytes) = promised.get_mut(&self.device) {
                *bytes = bytes.saturating_sub(self.bytes);
            }
        }
    }
}

/// Requests arriving over connections: directory operations and calls.
struct NodeInbound(Weak<Inner>);

impl Inbound for NodeInbound {
    fn request(
        &self,
        _from: &SiloId,
        request: InboundRequest,
    ) -> BoxFuture<'static, Result<Vec<u8>, RemoteError>> {
        let inner = self.0.upgrade();
        Box::pin(async move {
            let Some(inner) = inner.filter(|inner| !inner.stopped.load(Ordering::Acquire)) else {
                return Err(RemoteError::ShutDown);
            };
            if request.grain_type == DIRECTORY {
                let asked: DirectoryRequest = decode(&request.payload)
                    .map_err(|err| RemoteError::BadPayload(err.to_string()))?;
                return encode(&inner.answer_directory(asked))
                    .map_err(|err| RemoteError::Other(err.to_string()));
            }
            let grain = GrainId {
                type_name: request.grain_type,
                key: request.key,
            };
            inner
                .host(&grain, &request.message, request.payload, request.one_way)
                .await
        })
    }
}

impl NodeBuilder {
    /// Connects to other silos with `transport` (default TCP).
    pub fn transport(mut self, transport: Arc<dyn Transport>) -> NodeBuilder {
        self.transport = transport;
        self
    }

    /// Places new activations with `placement`.
    pub fn placement(mut self, placement: Arc<dyn PlacementStrategy>) -> NodeBuilder {
        self.placement = placement;
        self
    }

    /// Grains of type `grain_type` need `needs` of a device (GPU-aware
    /// placement).
    pub fn needs(mut self, grain_type: &str, needs: GpuNeeds) -> NodeBuilder {
        self.needs.insert(grain_type.to_string(), needs);
        self
    }

    /// Listens, joins the gossip over `gossip` (chitchat's UDP transport,
    /// or its channel transport in tests), and starts serving.
    pub async fn start(
        self,
        gossip: &dyn chitchat::transport::Transport,
    ) -> Result<ClusterNode, NodeError> {
        let (parts, listener, id) = self.bind().await?;
        let config = &parts.builder.config;
        let mut gossip_config = GossipConfig::new(
            config.cluster.clone(),
            id.clone(),
            config.gossip_address,
            config.seeds.clone(),
        );
        gossip_config.gossip_interval = config.gossip_interval;
        gossip_config.phi_threshold = config.phi_threshold;
        gossip_config.death_grace = config.death_grace;
        let membership = Membership::join(gossip_config, config.secret.clone(), gossip)
            .await
            .map_err(NodeError::Membership)?;
        parts
            .serve(
                listener,
                id,
                Provider::Gossip(Box::new(membership)),
                DirectoryBackend::Partitioned,
                None,
            )
            .await
    }

    /// Listens and joins through etcd instead of gossip: membership by
    /// leases and watches, and the grain directory in etcd (feature
    /// `etcd`). The config's gossip settings are not used.
    #[cfg(feature = "etcd")]
    pub async fn start_with_etcd(
        self,
        etcd: crate::etcd::EtcdConfig,
    ) -> Result<ClusterNode, NodeError> {
        let (parts, listener, id) = self.bind().await?;
        let membership = crate::etcd::EtcdMembership::join(etcd, id.clone(), SiloLoad::default())
            .await
            .map_err(NodeError::Etcd)?;
        let directory = DirectoryBackend::Etcd(Box::new(membership.directory()));
        let holds_lease: Box<dyn Fn() -> bool + Send + Sync> = Box::new(membership.lease_check());
        parts
            .serve(
                listener,
                id,
                Provider::Etcd {
                    membership: Box::new(membership),
                    published: None,
                },
                directory,
                Some(holds_lease),
            )
            .await
    }

    /// Claims the silo, then binds the listener: the silo's identity is
    /// the address bound and the configured incarnation.
    async fn bind(
        self,
    ) -> Result<(NodeParts, Box<dyn crate::transport::Listener>, SiloId), NodeError> {
        self.config.validate()?;
        let ended = claim(&self.silo)?;
        let listener = self
            .transport
            .bind(self.config.listen.clone())
            .await
            .map_err(|err| NodeError::Listen(err.to_string()))?;
        let id = SiloId::new(listener.local_address(), self.config.incarnation);
        let parts = NodeParts {
            ended,
            builder: self,
        };
        Ok((parts, listener, id))
    }
}

/// A silo claimed for one node: its activation-end listener (rule 6)
/// reaches the node once the node exists; dropped with the node (or with
/// a start that failed), it frees the silo.
struct Claim {
    node: Arc<std::sync::OnceLock<Weak<Inner>>>,
    _listener: granary_actors::EndedListenerGuard,
}

/// Claims `silo` for one node. Refused while another node has it.
fn claim(silo: &Silo) -> Result<Claim, NodeError> {
    let node: Arc<std::sync::OnceLock<Weak<Inner>>> = Arc::default();
    let reaches = node.clone();
    let listener = silo
        .on_activation_ended(Arc::new(move |grain, _| {
            if let Some(inner) = reaches.get().and_then(Weak::upgrade) {
                inner.maybe_leave(grain);
            }
        }))
        .map_err(|_| NodeError::SiloInUse)?;
    Ok(Claim {
        node,
        _listener: listener,
    })
}

/// What a node is made of, before it serves.
struct NodeParts {
    /// The silo, claimed for this node.
    ended: Claim,
    builder: NodeBuilder,
}

impl NodeParts {
    /// Starts serving on `listener` as `id`, with the view from `membership`.
    async fn serve(
        self,
        mut listener: Box<dyn crate::transport::Listener>,
        id: SiloId,
        membership: Provider,
        directory: DirectoryBackend,
        holds_lease: Option<Box<dyn Fn() -> bool + Send + Sync>>,
    ) -> Result<ClusterNode, NodeError> {
        let NodeParts {
            ended,
            builder:
                NodeBuilder {
                    silo,
                    config,
                    bridge,
                    transport,
                    placement,
                    needs,
                },
        } = self;
        let handoff = config
            .handoff
            .unwrap_or(config.gossip_interval.saturating_mul(5));
        let inner = Arc::new(Inner {
            id,
            silo,
            bridge,
            transport,
            view: arc_swap::ArcSwap::from_pointee(membership.members()),
            view_changed: Mutex::new(Instant::now()),
            members: membership.watch(),
            membership: tokio::sync::Mutex::new(Some(membership)),
            directory,
            handoff,
            partition: Partition::new(),
            cache: LocationCache::new(),
            homes: DashMap::new(),
            promised: Mutex::new(HashMap::new()),
            given_up: AtomicU64::new(0),
            stopped: std::sync::atomic::AtomicBool::new(false),
            holds_lease,
            claim: Mutex::new(None),
            connections: Mutex::new(HashMap::new()),
            open: DashMap::new(),
            accepted: tokio::sync::Mutex::new(Vec::new()),
            placement,
            needs,
            next_activation: AtomicU64::new(1),
            tasks: Mutex::new(Vec::new()),
            config,
        });
        let weak = Arc::downgrade(&inner);
        // Rule 6: an activation that ends may give up its home.
        let _ = ended.node.set(weak.clone());
        *inner.claim.lock().unwrap_or_else(PoisonError::into_inner) = Some(ended);
        let accepting = tokio::spawn({
            let weak = weak.clone();
            async move {
                while let Ok((io, _)) = listener.accept().await {
                    let Some(inner) = weak.upgrade() else { return };
                    let weak = weak.clone();
                    tokio::spawn(async move {
                        let accepted = connection::accept(
                            io,
                            inner.id.clone(),
                            &inner.config.cluster,
                            &inner.config.secret,
                            Arc::new(NodeInbound(weak)),
                            inner.config.connection,
                        )
                        .await;
                        match accepted {
                            Ok(connection) => {
                                let peer = connection.peer().clone();
                                // An open connection of our own stays the
                                // one we call on; this one serves the peer.
                                let slot = inner
                                    .connections
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .entry(peer.clone())
                                    .or_default()
                                    .clone();
                                // Busy: we are connecting to it ourselves.
                                if let Ok(mut slot) = slot.try_lock() {
                                    if slot.as_ref().is_none_or(Connection::is_closed) {
                                        *slot = Some(connection.clone());
                                        inner.open.insert(peer, connection.clone());
                                    }
                                }
                                let mut accepted = inner.accepted.lock().await;
                                accepted.retain(|kept| !kept.is_closed());
                                accepted.push(connection);
                            }
                            Err(err) => tracing::debug!(error = %err, "a connection was refused"),
                        }
                    });
                }
            }
        });
        let mut views = inner.members.clone();
        let watching = tokio::spawn({
            let weak = weak.clone();
            async move {
                while views.changed().await.is_ok() {
                    let after = Arc::new(views.borrow_and_update().clone());
                    let Some(inner) = weak.upgrade() else { return };
                    let before = inner.view.swap(after.clone());
                    let silos = |view: &[Member]| -> Vec<SiloId> {
                        view.iter().map(|member| member.silo.clone()).collect()
                    };
                    if silos(&before) != silos(&after) {
                        inner.on_view_change(&before, &after).await;
                    }
                }
            }
        });
        let publishing = tokio::spawn({
            let weak = weak.clone();
            let every = inner.config.load_interval.max(Duration::from_millis(10));
            async move {
                let mut ticks = tokio::time::interval(every);
                loop {
                    ticks.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    let load = inner.load();
                    if let Some(membership) = inner.membership.lock().await.as_mut() {
                        membership.publish_load(&load).await;
                    }
                }
            }
        });
        inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend([accepting, watching, publishing]);
        if inner.holds_lease.is_some() {
            // Etcd rule 6: a silo that lost its lease stops serving and
            // lets its activations go.
            let weak = Arc::downgrade(&inner);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let Some(inner) = weak.upgrade() else { return };
                    if inner.stopped.load(Ordering::Acquire) {
                        return;
                    }
                    if !inner.holds_lease() {
                        tracing::error!(silo = %inner.id, "lost the etcd lease: this node stops serving");
                        let node = ClusterNode { inner };
                        node.inner.stopped.store(true, Ordering::Release);
                        node.deactivate_homes().await;
                        if let Some(membership) = node.inner.membership.lock().await.take() {
                            let _ = membership.stop().await;
                        }
                        node.stop_serving().await;
                        return;
                    }
                }
            });
        }
        Ok(ClusterNode { inner })
    }
}

/// A reference to grain `G`, callable from this silo wherever it lives.
pub struct ClusterRef<G> {
    node: ClusterNode,
    key: GrainKey,
    _grain: std::marker::PhantomData<fn() -> G>,
}

impl<G> Clone for ClusterRef<G> {
    fn clone(&self) -> ClusterRef<G> {
        ClusterRef {
            node: self.node.clone(),
            key: self.key.clone(),
            _grain: std::marker::PhantomData,
        }
    }
}

impl<G: granary_actors::Grain> ClusterRef<G> {
    /// Sends `message` to the grain wherever it lives and waits for the
    /// reply. The grain type and the message must be registered by name.
    pub async fn call<M>(&self, message: M) -> Result<M::Reply, ClusterCallError>
    where
        G: Handler<M>,
        M: Message + Serialize,
        M::Reply: DeserializeOwned,
    {
        let silo = &self.node.inner.silo;
        let grain_type = silo
            .grain_type_name::<G>()
            .ok_or_else(|| ClusterCallError::NotRegistered(std::any::type_name::<G>().into()))?
            .to_string();
        let name = silo
            .message_name::<G, M>()
            .ok_or_else(|| ClusterCallError::NotRegistered(std::any::type_name::<M>().into()))?
            .to_string();
        let payload = encode(&message).map_err(|err| ClusterCallError::Payload(err.to_string()))?;
        let reply = self
            .node
            .call_named(&grain_type, self.key.clone(), &name, &payload)
            .await?;
        decode(&reply).map_err(|err| ClusterCallError::Payload(err.to_string()))
    }
}
