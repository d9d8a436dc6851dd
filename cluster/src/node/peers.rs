//! The node's peers: the connection to each (opened on demand, closed
//! when the node stops; rule 4 of the protocol in `node/mod.rs`), the
//! membership provider the view comes from (`provider.rs`), and the
//! load published to it (rule 5).

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use super::serve::NodeInbound;
use super::{ClusterCallError, ClusterNode, Inner};
use crate::SiloId;
use crate::connection::{self, Connection};
use crate::membership::{DeviceLoad, SiloLoad};
use crate::wire::RemoteError;

/// Where the view comes from: gossip or etcd (`provider.rs`).
pub(super) type Provider = Box<dyn crate::provider::MembershipProvider>;

/// A peer's slot: the connection calls go out on, and how the last attempt
/// to open one failed. Its lock is held while connecting, so callers that
/// need the peer meanwhile wait for that one attempt.
#[derive(Default)]
pub(super) struct PeerSlot {
    pub(super) connection: Option<Connection>,
    /// When the last attempt ended, failed, and why: a caller that waited
    /// for the slot while it ran is answered the same (rule 4), rather
    /// than each making a full attempt of its own (a peer whose host died
    /// would make the k-th caller wait k handshake timeouts).
    failed: Option<(std::time::Instant, ClusterCallError)>,
}

impl ClusterNode {
    /// The open connection to `peer`, opened if needed.
    pub(super) async fn connection(&self, peer: &SiloId) -> Result<Connection, ClusterCallError> {
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
        let waited_from = std::time::Instant::now();
        let mut slot = slot.lock().await;
        // Rule 6: a node that stopped while this caller waited (its slots
        // drained, perhaps before this one was made) connects to no one.
        if inner.stopped.load(Ordering::Acquire) {
            return Err(ClusterCallError::Remote(RemoteError::ShutDown));
        }
        if let Some(connection) = slot.connection.as_ref() {
            if !connection.is_closed() {
                inner.open.insert(peer.clone(), connection.clone());
                return Ok(connection.clone());
            }
        }
        if let Some((ended, err)) = &slot.failed {
            if *ended >= waited_from {
                return Err(err.clone());
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
                inner.id(),
                peer,
                &inner.config.cluster,
                &inner.config.secret,
                Arc::new(NodeInbound(Arc::downgrade(inner))),
                inner.config.connection,
            )
            .await
            .map_err(|err| unavailable(err.to_string()))
        };
        let connected = tokio::time::timeout(inner.config.connection.handshake_timeout, connecting)
            .await
            .map_err(|_| unavailable("connecting timed out".into()))
            .and_then(|connected| connected);
        let connection = match connected {
            Ok(connection) => connection,
            Err(err) => {
                slot.failed = Some((std::time::Instant::now(), err.clone()));
                return Err(err);
            }
        };
        slot.connection = Some(connection.clone());
        slot.failed = None;
        inner.open.insert(peer.clone(), connection.clone());
        // A stop that began while connecting: `close_connections` cleared
        // `open` after setting the flag, so the insert above either came
        // before its clear or is seen here, and undone.
        if inner.stopped.load(Ordering::Acquire) {
            inner.open.remove(peer);
            slot.connection = None;
            connection.close();
            return Err(ClusterCallError::Remote(RemoteError::ShutDown));
        }
        Ok(connection)
    }
}

impl Inner {
    pub(super) fn load(&self) -> SiloLoad {
        SiloLoad {
            grain_types: self.hosts.clone(),
            activations: self.silo.live_activations(),
            activations_by_type: {
                let mut live: Vec<(String, u64)> = self
                    .silo
                    .grain_type_stats()
                    .into_iter()
                    .filter(|stats| stats.live_activations > 0)
                    .map(|stats| (stats.grain_type, stats.live_activations))
                    .collect();
                live.sort_by_key(|entry| std::cmp::Reverse(entry.1));
                live.truncate(crate::membership::MAX_LOAD_GRAIN_TYPES);
                live.into_iter().collect()
            },
            started_ms: self.started_ms,
            leaving: self.stopped.load(std::sync::atomic::Ordering::Acquire),
            fenced: self.fence.is_fenced(),
            published_ms: crate::membership::unix_ms(),
            devices: self
                .bridge
                .iter()
                .flat_map(|bridge| DeviceLoad::of_bridge(bridge))
                .collect(),
        }
    }
}
