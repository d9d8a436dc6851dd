//! The node's peers: the connection to each (opened on demand, closed
//! when the node stops; rule 4 of the protocol in `node/mod.rs`), the
//! membership provider the view comes from (gossip or etcd), and the
//! load published to it (rule 5).

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use super::serve::NodeInbound;
use super::{ClusterCallError, ClusterNode, Inner};
use crate::SiloId;
use crate::connection::{self, Connection};
use crate::membership::{DeviceLoad, Member, Membership, MembershipError, SiloLoad};
use crate::wire::RemoteError;

/// Where the view comes from.
pub(super) enum Provider {
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
    pub(super) fn members(&self) -> Vec<Member> {
        match self {
            Provider::Gossip(membership) => membership.members(),
            #[cfg(feature = "etcd")]
            Provider::Etcd { membership, .. } => membership.members(),
        }
    }

    pub(super) fn watch(&self) -> tokio::sync::watch::Receiver<Vec<Member>> {
        match self {
            Provider::Gossip(membership) => membership.watch(),
            #[cfg(feature = "etcd")]
            Provider::Etcd { membership, .. } => membership.watch(),
        }
    }

    pub(super) async fn publish_load(&mut self, load: &SiloLoad) {
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

    pub(super) async fn leave(self) -> Result<(), MembershipError> {
        match self {
            Provider::Gossip(membership) => membership.leave().await,
            #[cfg(feature = "etcd")]
            Provider::Etcd { membership, .. } => membership
                .leave()
                .await
                .map_err(|err| MembershipError::Stop(err.to_string())),
        }
    }

    pub(super) async fn stop(self) -> Result<(), MembershipError> {
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
}

impl Inner {
    pub(super) fn load(&self) -> SiloLoad {
        SiloLoad {
            grain_types: self.hosts.clone(),
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
