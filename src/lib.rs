//! Granary: Orleans-style virtual actors whose compute goes to GPUs.
//!
//! This facade re-exports the workspace crates. Today the ring buffer is
//! built; the kernels, bridge, actor runtime and cluster follow (see
//! `ARCHITECTURE.md`).

pub use granary_ring as ring;

pub mod demo;
