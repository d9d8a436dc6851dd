//! The per-node GPU bridge for Granary.
//!
//! - The [bridge]: [`GpuBridge::execute`] runs a registered kernel
//!   on the best device (a persistent kernel for small requests, the
//!   launch-per-batch path for large ones), with micro-batching into the
//!   rings, bounded waits (`Overloaded`), hang detection and relaunch, CPU
//!   fallback, tracing spans and metrics. [`GpuBridge::execute_many`]
//!   sends many requests as one group (one ring claim, one wake-up, every
//!   answer in one buffer: [`ManyAnswers`]), and
//!   [`GpuBridge::kernel`] resolves a typed [`Kernel`] once, whose calls
//!   write elements straight into ring slots and answers straight into the
//!   caller's buffer.
//! - The [device broker](broker): the node's device inventory with memory
//!   reservations that never overcommit, device selection, and per-device
//!   statistics.
//! - The [memory pool](pool), which keeps buffers in power-of-two size
//!   classes so that a request rents a buffer instead of paying for an
//!   allocation; the bridge stages batch inputs in one.
//!
//! See `ARCHITECTURE.md` for the data path.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod bridge;
pub mod broker;
pub mod pool;

pub use bridge::{
    BridgeBuilder, BridgeConfig, BuildError, ExecuteError, FallbackPolicy, GpuBridge,
    InstanceHealth, KernelProbe, ManyAnswers, ManyAnswersIntoIter, ManyAnswersIter, Output, Part,
    ProbeAnswer, RelocateError, Relocated, ResidentBuffer, ResidentError, ResidentQuota,
    WeakResidentBuffer,
};
#[cfg(target_endian = "little")]
pub use bridge::{Element, Kernel, TypedKernel, shipped};
pub use granary_kernels::StopMode;

pub use broker::{
    BrokerError, DeviceBroker, DeviceId, DeviceStats, InFlight, Requirements, Reservation,
};

pub use pool::{
    AllocError, Allocator, Buffer, HostAllocator, HostBuffer, MemoryPool, PoolConfig, PoolError,
    PoolStats, Rented,
};
