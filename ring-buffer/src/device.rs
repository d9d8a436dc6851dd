//! The ring layout as C declarations, for device code.
//!
//! Each header is a backend prelude (integer and atomic types for that
//! language) followed by the shared `granary_ring_layout.h`: the structs, the
//! offsets as `#define`s, compile-time size and offset checks, and a macro
//! that locates a slot. Kernels include the header for their backend
//! before their own code. `tests/device_layout.rs` compiles the shared part
//! with the host C compiler and checks every offset against `offset_of!`.

/// The layout declarations alone, with no prelude.
pub const LAYOUT_H: &str = include_str!("../device/granary_ring_layout.h");

/// The layout for CUDA C (NVRTC or nvcc).
pub const CUDA_HEADER: &str = concat!(
    include_str!("../device/prelude_cuda.cuh"),
    include_str!("../device/granary_ring_layout.h")
);

/// The layout for OpenCL C 2.0.
pub const OPENCL_HEADER: &str = concat!(
    include_str!("../device/prelude_opencl.cl"),
    include_str!("../device/granary_ring_layout.h")
);
