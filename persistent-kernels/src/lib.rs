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
//! Built so far: the spec types, the shipped kernels' CPU implementations
//! ([`shipped`]), the CPU backend's persistent kernel ([`cpu`]), a thread
//! running the loop above, device descriptions ([`device`]), and the first
//! part of the OpenCL backend ([`opencl`]: discovery, compilation with a
//! cache and build logs, the launch-per-batch path, and the persistent
//! kernel over fine-grained SVM rings). Still to come (issue 3): the backend
//! trait that unifies them, hang detection with relaunch, and the other
//! shipped kernels' device sources.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod cpu;
pub mod device;
pub mod opencl;
pub mod shipped;
mod spec;

pub use cpu::{
    Completion, CpuPersistentKernel, KernelConfig, LaunchError, StopMode, StopReport, SubmitError,
    Submitter,
};
pub use device::{BackendKind, DeviceInfo, DeviceKind, host_device};
pub use granary_ring::WaitPolicy;
pub use spec::{Count, CpuFn, ElementType, KernelSpec, Shape, ShapeError, Status};
