//! Granary's cluster: silos on several machines that act as one.
//!
//! Its parts:
//! - [`transport`]: byte streams between silos, over TCP or an in-process
//!   network that still serialises every frame and can cut links;
//! - [`wire`]: the frames (length-delimited, a postcard header, raw
//!   payload bytes) and the protocol version the handshake announces;
//! - [`auth`]: the cluster secret and the handshake that proves it;
//! - [`connection`]: one authenticated, multiplexed, pipelined connection
//!   per pair of silos, whose calls fail fast when it closes;
//! - [`membership`]: gossip (chitchat) with phi-accrual failure detection
//!   and a grace before a silent silo is declared dead, each silo's load
//!   in its signed node state;
//! - [`placement`]: random, prefer-local, hash, least-activations and
//!   GPU-aware placement over the membership view;
//! - [`directory`]: rendezvous ownership of directory entries, the
//!   first-registration-wins partition, and the callers' location cache;
//! - [`node`]: [`ClusterNode`], a silo joined to the cluster: the silo's
//!   router (one `GrainRef` everywhere: calls, tells and reads routed to
//!   the grain's home wherever it is), the directory service between silos
//!   and its hand-over on view changes, homes and their device-memory
//!   promises, failover when a silo dies, fencing after a stall,
//!   cluster-owned reminders, and notifications to observers on other
//!   silos;
//! - `etcd` (feature `etcd`): membership by leases and the grain directory
//!   in etcd, with fencing when a silo loses its lease.
//!
//! `granary node` and `granary demo --nodes N` (the `granary` crate) run
//! silos from TOML files; see `ARCHITECTURE.md` for how the parts fit.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod auth;
pub mod connection;
pub mod directory;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod membership;
pub mod node;
pub mod placement;
pub mod provider;
pub mod rebalance;
mod sealed;
mod slots;
pub mod tls;
pub mod transport;
pub mod wire;

use serde::{Deserialize, Serialize};

/// Gossip transports for [`NodeBuilder::start`]: sealed UDP for real
/// clusters ([`SealedUdpTransport`](gossip::SealedUdpTransport), `sealed`'s
/// rules), chitchat's in-process channels for tests, so that starting a
/// node needs no dependency on chitchat of its own. chitchat's plain
/// `UdpTransport` authenticates nothing: any host that can reach the port
/// can alter the view.
pub mod gossip {
    pub use crate::sealed::{
        FRESH, GossipCounts, GossipStats, MAX_JUMP, MAX_NAME, MAX_NODES, MAX_VERSION,
        SealedUdpTransport, TRACK_FOR,
    };
    pub use chitchat::transport::{ChannelTransport, Transport, UdpTransport};
}

/// Entry points of the cargo-fuzz targets (`tests/fuzz`) into what is
/// private here; built only under `--cfg fuzzing`, which cargo-fuzz sets.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::sealed::fuzz::{envelope, gossip};
}

pub use auth::{BadSecret, ClusterSecret, Purpose, SECRET_LEN};
pub use connection::{
    Admission, AnyPeer, CallFailure, ConnectError, Connection, ConnectionConfig, Inbound,
    InboundRequest, Outgoing, accept, connect,
};
pub use directory::{ActivationAddress, LocationCache, Partition};
pub use membership::{
    DeviceLoad, GossipConfig, MAX_LOAD_GRAIN_TYPES, Member, Membership, MembershipError, SiloLoad,
    unix_ms,
};
pub use node::{
    ClusterCallError, ClusterNode, ClusterStats, DeviceQuotas, MAX_PHI, NodeBuilder, NodeConfig,
    NodeError, REMOTE_SECONDS_BOUNDS, RebalanceCount, Redirect,
};
pub use placement::{
    GpuAware, GpuNeeds, HashPlacement, LeastActivations, PlacementError, PlacementRequest,
    PlacementStrategy, PreferLocal, RandomPlacement,
};
pub use provider::{GossipProvider, MembershipProvider, RejoinError};
pub use transport::{InProcessNetwork, InProcessTransport, Listener, TcpTransport, Transport};
pub use wire::RemoteError;

/// A silo's identity in the cluster: where it listens, and which life of
/// that address it is (a silo that restarts on the same address comes back
/// with a greater incarnation, so the cluster never mistakes it for the
/// one that died).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SiloId {
    /// The address it listens on.
    pub address: String,
    /// Which start of the silo at that address; greater is newer.
    pub incarnation: u64,
}

impl SiloId {
    /// The silo at `address`, in its `incarnation`.
    pub fn new(address: impl Into<String>, incarnation: u64) -> SiloId {
        SiloId {
            address: address.into(),
            incarnation,
        }
    }
}

impl std::fmt::Display for SiloId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.address, self.incarnation)
    }
}

/// Why a text is not a [`SiloId`] written out (`address#incarnation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseSiloIdError(String);

impl std::fmt::Display for ParseSiloIdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} is not a silo id (address#incarnation)", self.0)
    }
}

impl std::error::Error for ParseSiloIdError {}

impl std::str::FromStr for SiloId {
    type Err = ParseSiloIdError;

    /// Reads what `Display` writes: `address#incarnation`.
    fn from_str(text: &str) -> Result<SiloId, ParseSiloIdError> {
        let (address, incarnation) = text
            .rsplit_once('#')
            .ok_or_else(|| ParseSiloIdError(text.to_string()))?;
        let incarnation = incarnation
            .parse()
            .map_err(|_| ParseSiloIdError(text.to_string()))?;
        if address.is_empty() {
            return Err(ParseSiloIdError(text.to_string()));
        }
        Ok(SiloId::new(address, incarnation))
    }
}
