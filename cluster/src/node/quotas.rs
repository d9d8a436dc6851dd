//! Each grain's device-memory quota: what its type declares
//! ([`NodeBuilder::needs`](super::NodeBuilder::needs)), enforced on the
//! resident buffers it allocates through [`DeviceQuotas`].
//!
//! 1. **One quota per activation.** The first allocation of a grain's
//!    activation makes its quota, with the limit its type declares; every
//!    later one, from any clone, is charged to the same quota, and the
//!    quota is forgotten when the activation ends (its buffers go with it).
//! 2. **Refused, never taken.** A buffer that would take the grain past
//!    what it declared is [`ResidentError::OverQuota`] before any device
//!    is touched (`granary_gpu`'s quota rule 1): placement promised each
//!    grain only what it declared (rule 5 of `node/mod.rs`), so a grain
//!    that asks for more never gets memory counted for another, and
//!    nothing is evicted to make room for it. A type that declares no
//!    device memory has a quota of none.
//!
//! Grains reach it as a service: `ctx.service::<DeviceQuotas>()`, provided
//! by the node to its silo when it starts, on silos with a GPU bridge.

use std::collections::HashMap;
use std::sync::Arc;

use dashmap::DashMap;
use granary_actors::GrainId;
use granary_gpu::{GpuBridge, Requirements, ResidentBuffer, ResidentError, ResidentQuota};

use crate::placement::GpuNeeds;

/// The node's grains' device-memory quotas (rules 1 and 2).
pub struct DeviceQuotas {
    bridge: Arc<GpuBridge>,
    declared: HashMap<String, u64>,
    live: DashMap<GrainId, ResidentQuota>,
}

impl std::fmt::Debug for DeviceQuotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceQuotas")
            .field("declared", &self.declared)
            .field("live", &self.live.len())
            .finish_non_exhaustive()
    }
}

impl DeviceQuotas {
    pub(super) fn new(bridge: Arc<GpuBridge>, needs: &HashMap<String, GpuNeeds>) -> DeviceQuotas {
        DeviceQuotas {
            bridge,
            declared: needs
                .iter()
                .map(|(grain_type, needs)| (grain_type.clone(), needs.device_memory))
                .collect(),
            live: DashMap::new(),
        }
    }

    /// The device memory `grain_type` declares (0 if none).
    pub fn declared(&self, grain_type: &str) -> u64 {
        self.declared.get(grain_type).copied().unwrap_or(0)
    }

    /// `grain`'s quota (rule 1): the one its activation holds, or a new one
    /// of what its type declares.
    pub fn quota(&self, grain: &GrainId) -> ResidentQuota {
        self.live
            .entry(grain.clone())
            .or_insert_with(|| ResidentQuota::new(self.declared(&grain.type_name)))
            .clone()
    }

    /// A resident buffer of `bytes` for `grain`, charged to its quota
    /// (rule 2): [`ResidentError::OverQuota`] if it would take the grain
    /// past what its type declares.
    pub async fn allocate(
        &self,
        grain: &GrainId,
        bytes: usize,
        need: &Requirements,
    ) -> Result<ResidentBuffer, ResidentError> {
        let quota = self.quota(grain);
        self.bridge
            .allocate_resident_within(&quota, bytes, need)
            .await
    }

    /// Rule 1: `grain`'s activation ended.
    pub(super) fn forget(&self, grain: &GrainId) {
        self.live.remove(grain);
    }
}
