//! Kernel specs and persistent kernels for Granary.
//!
//! A [`KernelSpec`] describes one kernel: its id and version, the shapes of
//! its request and response, and its implementations. A persistent kernel
//! runs the spec's `process(request, response)` in a loop that drains a
//! request ring and answers on a response ring (rules in
//! `docs/ring-protocol.md`):
//!
//! 1. wait on the request ring: a bounded spin, then back-off;
//! 2. process the request, checking its length against the spec first;
//! 3. publish the response, tagged with the request's id and a [`Status`];
//! 4. bump the heartbeat;
//! 5. exit when the request ring is closed and drained, or at once when
//!    stopped with [`StopMode::Abandon`].
//!
//! Every backend implements [`Backend`] (discover devices, build with a
//! cache, launch a [`PersistentKernel`], run the launch-per-batch path):
//! the CPU backend ([`CpuBackend`], a thread runs the loop), OpenCL
//! ([`opencl`], rings in fine-grained SVM; run on POCL in CI) and CUDA
//! ([`cuda`], cudarc with the driver and NVRTC loaded at run time, rings in
//! pinned host-mapped memory drained by one persistent block; run on an
//! H100, see `docs/reports/`). The shipped kernels ([`shipped`]) have CPU,
//! OpenCL C and CUDA C implementations in `kernels/`.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod backend;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod hooks;
mod host_ends;
mod kernel;
pub mod opencl;
pub mod resident;
pub mod shipped;
mod spec;
pub mod wgpu;

pub use backend::{Backend, BackendError, CpuBackend, StagedInput, batch_output_len};
pub use cpu::{CpuPersistentKernel, KernelConfig, LaunchError};
pub use device::{BackendKind, DeviceInfo, DeviceKind, host_device};
pub use granary_ring::WaitPolicy;
pub use hooks::CpuHooks;
pub use kernel::{
    BatchSubmitError, Completion, CompletionRef, PersistentKernel, StopMode, StopReport,
    SubmitError, Submitter,
};
pub use resident::{BatchOutput, BatchPart, DeviceBuffer};
pub use spec::{
    Count, CpuFn, ElementType, KernelSpec, OutputLenFn, Shape, ShapeError, Status, WGSL_CHUNK,
    Wgsl, one_pass,
};

/// The status codes device sources return (`device/prelude.h`), placed
/// before every kernel's device source.
pub const DEVICE_PRELUDE: &str = include_str!("../device/prelude.h");
