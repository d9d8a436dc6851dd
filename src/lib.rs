//! Granary: Orleans-style virtual actors whose compute goes to GPUs.
//!
//! This facade re-exports the workspace crates: the ring buffer, the
//! persistent kernels with their CPU, OpenCL and CUDA backends, the GPU
//! bridge, the actor runtime and the cluster (see `ARCHITECTURE.md`). It
//! also holds the `granary` CLI's demos; `granary node` and the multi-node
//! demo are the sample in `samples/cluster-demo`, re-exported as
//! [`cluster_demo`].

pub use granary_actors as actors;
pub use granary_cluster as cluster;
pub use granary_gpu as gpu;
pub use granary_kernels as kernels;
pub use granary_ring as ring;

pub use granary_cluster_demo as cluster_demo;
pub mod demo;
pub mod ring_demo;
