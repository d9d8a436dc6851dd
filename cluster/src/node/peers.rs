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
        let connection =
            tokio::time::timeout(inner.config.connection.handshake_timeout, connecting)
                .await
                .map_err(|_| unavailable("connecting timed out".into()))??;
        *slot = Some(connection.clone());
        inner.open.insert(peer.clone(), connection.clone());
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
