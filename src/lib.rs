//! Granary: Orleans-style virtual actors whose compute goes to GPUs.
//!
//! This facade re-exports the workspace crates: the ring buffer, the
//! kernels with their CPU, OpenCL, CUDA and wgpu backends, the GPU
//! bridge, the actor runtime and the cluster (see `ARCHITECTURE.md`). It
//! also holds what the `granary` CLI runs: a cluster node from its TOML
//! file ([`node_file`], `granary node`, hosting grains its caller passes),
//! and the demos ([`demo`], [`ring_demo`], and [`cluster_demo`], the
//! multi-node demo whose grains `granary node` hosts).

pub use granary_actors as actors;
pub use granary_cluster as cluster;
pub use granary_gpu as gpu;
pub use granary_kernels as kernels;
pub use granary_ring as ring;

pub mod admin;
pub mod certs;
pub mod cluster_demo;
pub mod demo;
pub mod node_file;
pub mod ring_demo;
