//! Persistent kernels for Granary (not built yet).
//!
//! This crate will hold the kernel spec (id, version, request and response
//! layouts, device source in OpenCL C and CUDA C, and a CPU implementation),
//! the persistent-kernel loop template that drains a `granary-ring` request
//! ring and answers on a response ring, and the backend trait with its CPU
//! and OpenCL implementations. See issue 3 and `ARCHITECTURE.md`.
