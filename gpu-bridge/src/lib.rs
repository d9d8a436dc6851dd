//! The per-node GPU bridge for Granary.
//!
//! Built so far:
//! - the [device broker](broker): the node's device inventory with memory
//!   reservations that never overcommit, device selection, and per-device
//!   statistics;
//! - the [memory pool](pool), which keeps device buffers in power-of-two
//!   size classes so that a request rents a buffer instead of paying for an
//!   allocation.
//!
//! Still to come (issue 3): the kernel catalog and the async tokio API
//! (`execute`, micro-batching, backpressure, CPU fallback) that grains use
//! to reach persistent kernels. See `ARCHITECTURE.md`.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod bridge;
pub mod broker;
pub mod pool;

pub use bridge::{
    BridgeBuilder, BridgeConfig, BuildError, ExecuteError, FallbackPolicy, GpuBridge,
};
pub use granary_kernels::StopMode;

pub use broker::{
    BrokerError, DeviceBroker, DeviceId, DeviceStats, InFlight, Requirements, Reservation,
};

pub use pool::{
    AllocError, Allocator, Buffer, HostAllocator, HostBuffer, MemoryPool, PoolConfig, PoolError,
    PoolStats, Rented,
};
