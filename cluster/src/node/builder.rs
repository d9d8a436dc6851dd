//! [`NodeBuilder`]: a node's transport, placement and grains' device
//! needs (rule 5 of the protocol in `node/mod.rs`), and its start:
//! claim the silo, bind, join through gossip or etcd, serve.

use std::collections::HashMap;
use std::sync::Arc;

use granary_actors::Silo;
use granary_gpu::GpuBridge;

use super::directory_client::DirectoryBackend;
use super::serve::{NodeParts, claim};
use super::{ClusterNode, NodeConfig, NodeError};
use crate::SiloId;
use crate::membership::SiloLoad;
use crate::membership::{GossipConfig, Membership};
use crate::placement::{GpuNeeds, PlacementStrategy};
use crate::provider::GossipProvider;
use crate::transport::Transport;

/// Builds a [`ClusterNode`].
pub struct NodeBuilder {
    pub(super) silo: Silo,
    pub(super) config: NodeConfig,
    pub(super) bridge: Option<Arc<GpuBridge>>,
    pub(super) transport: Arc<dyn Transport>,
    pub(super) placement: Arc<dyn PlacementStrategy>,
    pub(super) needs: HashMap<String, GpuNeeds>,
    /// An external client: hosts no grain (rule 2).
    pub(super) client: bool,
    /// What its sealed gossip counts, if it gossips sealed.
    pub(super) gossip_stats: Option<Arc<crate::sealed::GossipStats>>,
}

impl NodeBuilder {
    /// Joins as an external client (a web front end, a tool): the node
    /// calls grains wherever they live through the same `GrainRef`, but
    /// hosts none, so placement never picks it, whatever grain types its
    /// silo registers (it registers them for their message names).
    pub fn client(mut self) -> NodeBuilder {
        self.client = true;
        self
    }

    /// Reports what `stats` counts as the node's gossip
    /// ([`ClusterNode::gossip_counts`]): pass the stats of the
    /// [`SealedUdpTransport`](crate::gossip::SealedUdpTransport) the node
    /// starts with.
    pub fn gossip_stats(mut self, stats: Arc<crate::sealed::GossipStats>) -> NodeBuilder {
        self.gossip_stats = Some(stats);
        self
    }

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
    /// or its channel transport in tests), and starts serving. The node
    /// keeps the transport: after a stall that may have been taken for a
    /// death it gossips again over it as a new incarnation (rule 7).
    pub async fn start(
        self,
        gossip: impl chitchat::transport::Transport,
    ) -> Result<ClusterNode, NodeError> {
        let gossip: Arc<dyn chitchat::transport::Transport> = Arc::new(gossip);
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
        gossip_config.load = parts.builder.first_load();
        let death = super::fence::gossip_death(config);
        let membership = Membership::join(gossip_config, config.secret.clone(), gossip.as_ref())
            .await
            .map_err(NodeError::Membership)?;
        parts
            .serve(
                listener,
                id,
                Box::new(GossipProvider::new(membership, gossip)),
                DirectoryBackend::Partitioned,
                None,
                death,
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
        let ttl = etcd.ttl;
        let first_load = parts.builder.first_load();
        let membership = crate::etcd::EtcdMembership::join(
            etcd,
            parts.builder.config.secret.clone(),
            id.clone(),
            first_load,
        )
        .await
        .map_err(NodeError::Etcd)?;
        let directory = DirectoryBackend::Etcd(Box::new(membership.directory()));
        let holds_lease: Box<dyn Fn() -> bool + Send + Sync> = Box::new(membership.lease_check());
        parts
            .serve(
                listener,
                id,
                Box::new(crate::provider::EtcdProvider::new(membership)),
                directory,
                Some(holds_lease),
                ttl,
            )
            .await
    }

    /// Listens and serves with the membership `provider` makes from this
    /// silo's identity: a view a test changes at will, one silo at a time.
    #[cfg(test)]
    pub(super) async fn start_with_provider(
        self,
        provider: impl FnOnce(SiloId) -> super::peers::Provider,
    ) -> Result<ClusterNode, NodeError> {
        let (parts, listener, id) = self.bind().await?;
        let death = super::fence::gossip_death(&parts.builder.config);
        let membership = provider(id.clone());
        parts
            .serve(
                listener,
                id,
                membership,
                DirectoryBackend::Partitioned,
                None,
                death,
            )
            .await
    }

    /// The grain types this node hosts (none for a client): what placement
    /// on other silos looks at (rule 2).
    pub(super) fn hosts(&self) -> Vec<String> {
        if self.client {
            Vec::new()
        } else {
            self.silo.routed_grain_types()
        }
    }

    /// The load the node joins with: what it hosts, before any activation.
    fn first_load(&self) -> SiloLoad {
        SiloLoad {
            grain_types: self.hosts(),
            ..SiloLoad::default()
        }
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
