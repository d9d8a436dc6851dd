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
//! 3. **Where it lives.** Each activation's buffers are noted (weakly: a
//!    note keeps no memory alive). A grain's buffers stay on one device
//!    (a batch runs over buffers of one device): once it holds one, the
//!    next go to that device or fail with `NoDevice`. The device they are
//!    on is what the rebalancer weighs the grain against (`rebalance.rs`
//!    rule 3); the note is dropped when the activation ends (a later
//!    activation's first allocation notes it again).
//! 4. **Moved together.** [`DeviceQuotas::relocate`] moves every buffer a
//!    paused activation holds to another device of the node, all or none
//!    (`granary_gpu`'s `resident.rs` rule 5: the target's room first for
//!    all of them, the copies device to device where the backend offers
//!    them, the switch only once every copy is made), so the grain's
//!    buffers stay on one device. Allocations of the activation wait for
//!    the move, and a move for an allocation under way.
//!
//! Buffers a grain makes other than through [`DeviceQuotas::allocate`]
//! (with the bridge and [`DeviceQuotas::quota`], say) are charged to its
//! quota but not noted: they are not kept on its device, and do not move
//! with it.
//!
//! Grains reach it as a service: `ctx.service::<DeviceQuotas>()`, provided
//! by the node to its silo when it starts, on silos with a GPU bridge.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use dashmap::DashMap;
use granary_actors::migration::{Dehydrated, HookError};
use granary_actors::{GrainContext, GrainId};
use granary_gpu::{
    DeviceId, GpuBridge, RelocateError, Relocated, Requirements, ResidentBuffer, ResidentError,
    ResidentQuota, WeakResidentBuffer,
};

use crate::placement::GpuNeeds;

/// The node's grains' device-memory quotas (rules 1 to 4).
pub struct DeviceQuotas {
    bridge: Arc<GpuBridge>,
    declared: HashMap<String, u64>,
    /// Rule 3: each active grain's buffers, as its activation keeps them.
    held: DashMap<GrainId, Weak<Held>>,
    /// Rule 3: grains whose first buffer goes to a given device (an
    /// arrival moved to a named device), while a pin lives.
    pins: DashMap<GrainId, usize>,
}

impl std::fmt::Debug for DeviceQuotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceQuotas")
            .field("declared", &self.declared)
            .finish_non_exhaustive()
    }
}

/// What an activation keeps (rules 1 and 3): its quota and its buffers.
struct Held {
    quota: ResidentQuota,
    buffers: Mutex<Vec<WeakResidentBuffer>>,
    /// Held by an allocation from its choice of device until its buffer
    /// is noted, and by a move for its whole length: two allocations of
    /// one activation (interleaved reads, or futures joined in a turn)
    /// pick one device, and none is made during a move (rules 3 and 4).
    placing: tokio::sync::Mutex<()>,
}

impl Held {
    /// The buffers still alive, forgetting the others.
    fn live(&self) -> Vec<ResidentBuffer> {
        let mut buffers = self.buffers.lock().unwrap_or_else(PoisonError::into_inner);
        let mut live = Vec::with_capacity(buffers.len());
        buffers.retain(|buffer| match buffer.upgrade() {
            Some(buffer) => {
                live.push(buffer);
                true
            }
            None => false,
        });
        live
    }
}

/// A grain pinned to a device (rule 3), until dropped.
pub(super) struct Pin {
    quotas: Arc<DeviceQuotas>,
    grain: GrainId,
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.quotas.pins.remove(&self.grain);
    }
}

/// A move between devices that did not happen (rule 4): the grain's
/// buffers are where they were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum DeviceMoveError {
    /// The grain holds no resident buffer here: nothing to move.
    NothingHeld,
    /// Its buffers could not move (none did).
    Relocate(RelocateError),
}

impl std::fmt::Display for DeviceMoveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceMoveError::NothingHeld => f.write_str("the grain holds no device memory here"),
            DeviceMoveError::Relocate(err) => err.fmt(f),
        }
    }
}

impl std::error::Error for DeviceMoveError {}

impl DeviceQuotas {
    pub(super) fn new(bridge: Arc<GpuBridge>, needs: &HashMap<String, GpuNeeds>) -> DeviceQuotas {
        DeviceQuotas {
            bridge,
            declared: needs
                .iter()
                .map(|(grain_type, needs)| (grain_type.clone(), needs.device_memory))
                .collect(),
            held: DashMap::new(),
            pins: DashMap::new(),
        }
    }

    /// The device memory `grain_type` declares (0 if none).
    pub fn declared(&self, grain_type: &str) -> u64 {
        self.declared.get(grain_type).copied().unwrap_or(0)
    }

    /// The quota of `ctx`'s activation (rule 1): made with what its type
    /// declares on first use.
    pub fn quota(&self, ctx: &GrainContext) -> ResidentQuota {
        self.held(ctx).quota.clone()
    }

    /// What `ctx`'s activation keeps (rules 1 and 3), noted for the node.
    fn held(&self, ctx: &GrainContext) -> Arc<Held> {
        let declared = self.declared(ctx.type_name());
        let held = ctx.activation_local(|| Held {
            quota: ResidentQuota::new(declared),
            buffers: Mutex::new(Vec::new()),
            placing: tokio::sync::Mutex::new(()),
        });
        self.held.insert(ctx.id().clone(), Arc::downgrade(&held));
        held
    }

    /// A resident buffer of `bytes` for `ctx`'s grain, charged to its
    /// activation's quota (rule 2): [`ResidentError::OverQuota`] if it
    /// would take the grain past what its type declares. It goes to the
    /// device of the grain's other buffers, if it holds any (rule 3).
    pub async fn allocate(
        &self,
        ctx: &GrainContext,
        bytes: usize,
        need: &Requirements,
    ) -> Result<ResidentBuffer, ResidentError> {
        let held = self.held(ctx);
        let _placing = held.placing.lock().await;
        let device = match held.live().first() {
            Some(other) => Some(other.device()),
            None => self.pins.get(ctx.id()).map(|pin| DeviceId(*pin)),
        };
        let buffer = match device {
            Some(device) => {
                self.bridge
                    .allocate_resident_within_on(&held.quota, device, bytes, need)
                    .await?
            }
            None => {
                self.bridge
                    .allocate_resident_within(&held.quota, bytes, need)
                    .await?
            }
        };
        held.buffers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(buffer.downgrade());
        Ok(buffer)
    }

    /// `buffer`'s bytes as part `name` of `into` (device to host): what a
    /// GPU grain's `dehydrate` does with each resident buffer it carries
    /// to another silo; [`DeviceQuotas::take_resident`] is the other half.
    pub async fn put_resident(
        into: &mut Dehydrated,
        name: &str,
        buffer: &ResidentBuffer,
    ) -> Result<(), HookError> {
        let bytes = buffer
            .export()
            .await
            .map_err(|err| HookError(format!("exporting resident buffer {name:?}: {err}")))?;
        into.put_bytes(name, bytes);
        Ok(())
    }

    /// A resident buffer made from part `name` of `from` (host to device),
    /// allocated as [`DeviceQuotas::allocate`] does (charged to the grain's
    /// quota, on the device a move named: rule 3) and filled with the
    /// part's bytes, which are taken out of `from`: what a GPU grain's
    /// `rehydrate` does with each buffer [`DeviceQuotas::put_resident`]
    /// carried.
    pub async fn take_resident(
        &self,
        ctx: &GrainContext,
        from: &mut Dehydrated,
        name: &str,
        need: &Requirements,
    ) -> Result<ResidentBuffer, HookError> {
        let bytes = from.take_bytes(name)?;
        let buffer = self
            .allocate(ctx, bytes.len(), need)
            .await
            .map_err(|err| HookError(format!("allocating resident buffer {name:?}: {err}")))?;
        buffer
            .import(bytes)
            .await
            .map_err(|err| HookError(format!("importing resident buffer {name:?}: {err}")))?;
        Ok(buffer)
    }

    /// Rule 3: the device `grain`'s buffers are on, while it is active
    /// and holds any.
    pub(super) fn device_of(&self, grain: &GrainId) -> Option<usize> {
        let held = self.held.get(grain)?.upgrade()?;
        held.live().first().map(|buffer| buffer.device().0)
    }

    /// Rule 3: `grain`'s first buffers go to device `device` until the
    /// pin is dropped.
    pub(super) fn pin(self: &Arc<Self>, grain: &GrainId, device: usize) -> Pin {
        self.pins.insert(grain.clone(), device);
        Pin {
            quotas: self.clone(),
            grain: grain.clone(),
        }
    }

    /// Whether resident buffers may live on device `device` of the node
    /// (`GpuBridge::keeps_resident`: a primary device, or the CPU device
    /// when it is the fallback).
    pub(super) fn keeps_resident(&self, device: usize) -> bool {
        self.bridge.keeps_resident(DeviceId(device))
    }

    /// Rule 3: `grain`'s activation ended (a successor's note, once it
    /// has made one, stays).
    pub(super) fn forget(&self, grain: &GrainId) {
        self.held
            .remove_if(grain, |_, held| held.strong_count() == 0);
    }

    /// Rule 4: moves every buffer `grain`'s activation holds to device
    /// `to`, all or none (`granary_gpu`'s `resident.rs` rule 5), with the
    /// activation paused (`granary_actors::migration` rule 6) and its
    /// allocations held off, so that none is used or made meanwhile.
    pub(super) async fn relocate(
        &self,
        grain: &GrainId,
        to: usize,
    ) -> Result<Relocated, DeviceMoveError> {
        let held = self
            .held
            .get(grain)
            .and_then(|held| held.upgrade())
            .ok_or(DeviceMoveError::NothingHeld)?;
        let _placing = held.placing.lock().await;
        let buffers = held.live();
        if buffers.is_empty() {
            return Err(DeviceMoveError::NothingHeld);
        }
        self.bridge
            .relocate_all(&buffers, DeviceId(to))
            .await
            .map_err(DeviceMoveError::Relocate)
    }
}
