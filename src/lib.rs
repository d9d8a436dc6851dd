//! Granary: Orleans-style virtual actors whose compute goes to GPUs.
//!
//! This facade re-exports the workspace crates: the ring buffer, the
//! persistent kernels with their CPU and OpenCL backends, and the GPU
//! bridge. The actor runtime and the cluster follow (see
//! `ARCHITECTURE.md`).

pub use granary_actors as actors;
pub use granary_cluster as cluster;
pub use granary_gpu as gpu;
pub use granary_kernels as kernels;
pub use granary_ring as ring;

pub mod demo;
pub mod ring_demo;
