//! Each grain's device-memory quota: what its type declares
//! ([`NodeBuilder::needs`](super::NodeBuilder::needs)), enforced on the
//! resident buffers it allocates through [`DeviceQuotas`].
//!
//! 1. **One quota per activation.** The first allocation of an activation
//!    makes its quota, with the limit its type declares, and keeps it with
//!    the activation (`GrainContext::activation_local`): every later
//!    allocation of that activation is charged to it, and it goes with
//!    the activation (its buffers keep their charges until they go). A
//!    later activation of the grain has its own, and its predecessor's
//!    buffers are gone by then (rule 5 of the silo: activations never
//!    overlap).
//! 2. **Refused, never taken.** A buffer that would take the grain past
//!    what it declared is [`ResidentError::OverQuota`] before any device
//!    is touched (`granary_gpu`'s quota rule 1): placement promised each
//!    grain only what it declared (rule 5 of `node/mod.rs`), so a grain
//!    that asks for more never gets memory counted for another, and
//!    nothing is evicted to make room for it. A type that declares no
//!    device memory has a quota of none.
//! 3. **Where it lives.** The device of each grain's last buffer is noted
//!    for the rebalancer (`rebalance.rs` rule 3 weighs grains against the
//!    device they are on), and forgotten when its activation ends.
//!
//! Grains reach it as a service: `ctx.service::<DeviceQuotas>()`, provided
//! by the node to its silo when it starts, on silos with a GPU bridge.

use std::collections::HashMap;
use std::sync::Arc;

use dashmap::DashMap;
use granary_actors::{GrainContext, GrainId};
use granary_gpu::{GpuBridge, Requirements, ResidentBuffer, ResidentError, ResidentQuota};

use crate::placement::GpuNeeds;

/// The node's grains' device-memory quotas (rules 1 to 3).
pub struct DeviceQuotas {
    bridge: Arc<GpuBridge>,
    declared: HashMap<String, u64>,
    /// Rule 3: the device index of each grain's last buffer.
    devices: DashMap<GrainId, usize>,
}

impl std::fmt::Debug for DeviceQuotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceQuotas")
            .field("declared", &self.declared)
            .finish_non_exhaustive()
    }
}

/// The quota an activation keeps (rule 1).
struct ActivationQuota(ResidentQuota);

impl DeviceQuotas {
    pub(super) fn new(bridge: Arc<GpuBridge>, needs: &HashMap<String, GpuNeeds>) -> DeviceQuotas {
        DeviceQuotas {
            bridge,
            declared: needs
                .iter()
                .map(|(grain_type, needs)| (grain_type.clone(), needs.device_memory))
                .collect(),
            devices: DashMap::new(),
        }
    }

    /// The device memory `grain_type` declares (0 if none).
    pub fn declared(&self, grain_type: &str) -> u64 {
        self.declared.get(grain_type).copied().unwrap_or(0)
    }

    /// The quota of `ctx`'s activation (rule 1): made with what its type
    /// declares on first use.
    pub fn quota(&self, ctx: &GrainContext) -> ResidentQuota {
        let declared = self.declared(&ctx.id().type_name);
        ctx.activation_local(|| ActivationQuota(ResidentQuota::new(declared)))
            .0
            .clone()
    }

    /// A resident buffer of `bytes` for `ctx`'s grain, charged to its
    /// activation's quota (rule 2): [`ResidentError::OverQuota`] if it
    /// would take the grain past what its type declares.
    pub async fn allocate(
        &self,
        ctx: &GrainContext,
        bytes: usize,
        need: &Requirements,
    ) -> Result<ResidentBuffer, ResidentError> {
        let quota = self.quota(ctx);
        let buffer = self
            .bridge
            .allocate_resident_within(&quota, bytes, need)
            .await?;
        self.devices.insert(ctx.id().clone(), buffer.device().0);
        Ok(buffer)
    }

    /// Rule 3: the device `grain`'s last buffer went to, while it is
    /// active.
    pub(super) fn device_of(&self, grain: &GrainId) -> Option<usize> {
        self.devices.get(grain).map(|device| *device)
    }

    /// Rule 3: `grain`'s activation ended.
    pub(super) fn forget(&self, grain: &GrainId) {
        self.devices.remove(grain);
    }
}
