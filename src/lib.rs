//! Granary: Orleans-style virtual actors whose compute goes to GPUs.
//!
//! This facade re-exports the workspace crates. Today the ring buffer and
//! the bridge's memory pool are built; the kernels, the rest of the bridge,
//! the actor runtime and the cluster follow (see `ARCHITECTURE.md`).

pub use granary_actors as actors;
pub use granary_cluster as cluster;
pub use granary_gpu as gpu;
pub use granary_kernels as kernels;
pub use granary_ring as ring;

pub mod demo;
