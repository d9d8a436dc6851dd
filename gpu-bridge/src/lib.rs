//! The per-node GPU bridge for Granary (not built yet).
//!
//! This crate will hold the device broker (inventory, memory reservations,
//! selection), the per-device memory pool, the kernel catalog, and the async
//! tokio API (`execute`, batching, backpressure, CPU fallback) that grains
//! use to reach persistent kernels. See issue 3 and `ARCHITECTURE.md`.
