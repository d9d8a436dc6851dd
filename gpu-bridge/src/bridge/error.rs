//! What the bridge's calls fail with.

use std::fmt;
use std::time::Duration;

use granary_kernels::{BackendKind, ElementType, ShapeError, Status};

/// Why a request through the bridge failed. The bridge keeps serving after
/// every one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExecuteError {
    /// No kernel with this id is registered.
    UnknownKernel(String),
    /// The kernel is registered, but not in the version asked for.
    UnknownVersion {
        /// The kernel.
        kernel: &'static str,
        /// The version asked for.
        version: u32,
        /// The versions registered, oldest first.
        registered: Vec<u32>,
    },
    /// The input's length does not fit the kernel's request shape (wrong
    /// element size, or a count the kernel does not take).
    WrongShape {
        /// The kernel.
        kernel: &'static str,
        /// Why.
        error: ShapeError,
    },
    /// The input is larger than the kernel's batch path takes.
    TooLarge {
        /// The kernel.
        kernel: &'static str,
        /// Bytes given.
        len: usize,
        /// The most the kernel takes.
        max: usize,
    },
    /// The kernel rejected the input: a bad length or bad contents.
    Rejected {
        /// The kernel.
        kernel: &'static str,
        /// `BadLength` or `BadInput`.
        status: Status,
    },
    /// The kernel failed while processing (`Fault`), or reported that it
    /// has no implementation (`Unsupported`).
    KernelFault {
        /// The kernel.
        kernel: &'static str,
        /// The status it answered with.
        status: Status,
    },
    /// The kernel failed to build for the chosen device, and the fallback
    /// policy is to fail.
    Compile {
        /// The kernel.
        kernel: &'static str,
        /// The backend.
        backend: BackendKind,
        /// The compiler's log.
        log: String,
    },
    /// No device can run the kernel (and no CPU fallback applies).
    NoDevice {
        /// The kernel.
        kernel: &'static str,
    },
    /// What the request waited for stayed taken for the whole wait
    /// (`BridgeConfig::overload_timeout`): the kernel's ring slots, or
    /// device memory that other requests held (a batch's input and output,
    /// or a first launch's rings). Worth trying again later.
    Overloaded {
        /// The kernel.
        kernel: &'static str,
        /// How long the call waited.
        waited: Duration,
    },
    /// The kernel's heartbeat stopped while this request was pending. The
    /// kernel is relaunched; the request was not answered.
    DeviceHung {
        /// The kernel.
        kernel: &'static str,
        /// The backend.
        backend: BackendKind,
        /// The device's index on its backend.
        device: u32,
    },
    /// The device failed (a driver error, a relaunch that failed, too
    /// little device memory), and the fallback policy is to fail.
    DeviceFailed {
        /// The kernel.
        kernel: &'static str,
        /// The backend.
        backend: BackendKind,
        /// What happened.
        reason: String,
    },
    /// A resident buffer that cannot be used here: on another device
    /// than the request's other buffers, an output buffer whose length is
    /// not the response's, or none given where one is needed.
    WrongBuffer {
        /// The kernel.
        kernel: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A typed handle's element type is not the kernel's
    /// (`GpuBridge::kernel_named`).
    WrongElement {
        /// The kernel.
        kernel: &'static str,
        /// Which of its shapes: `request`, `batch request` or `response`.
        side: &'static str,
        /// The element type the kernel's shape names.
        expected: ElementType,
        /// The element type asked for.
        given: ElementType,
    },
    /// A caller's buffer is too small for the kernel's answer (typed
    /// `call_into`): the answer is dropped.
    OutputTooSmall {
        /// The kernel.
        kernel: &'static str,
        /// Elements in the answer.
        needed: usize,
        /// Elements the buffer had room for.
        capacity: usize,
    },
    /// The bridge is shutting down or has shut down.
    ShutDown,
}

impl fmt::Display for ExecuteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecuteError::UnknownKernel(id) => write!(f, "no kernel {id:?} is registered"),
            ExecuteError::UnknownVersion {
                kernel,
                version,
                registered,
            } => write!(
                f,
                "kernel {kernel:?} is registered in versions {registered:?}, not {version}"
            ),
            ExecuteError::WrongShape { kernel, error } => {
                write!(f, "input does not fit kernel {kernel:?}: {error}")
            }
            ExecuteError::TooLarge { kernel, len, max } => write!(
                f,
                "input of {len} bytes exceeds kernel {kernel:?}'s limit of {max} bytes"
            ),
            ExecuteError::Rejected { kernel, status } => {
                write!(f, "kernel {kernel:?} rejected the input ({status:?})")
            }
            ExecuteError::KernelFault { kernel, status } => {
                write!(f, "kernel {kernel:?} failed ({status:?})")
            }
            ExecuteError::Compile {
                kernel,
                backend,
                log,
            } => write!(
                f,
                "kernel {kernel:?} failed to build on {backend:?}:\n{log}"
            ),
            ExecuteError::NoDevice { kernel } => {
                write!(f, "no device can run kernel {kernel:?}")
            }
            ExecuteError::Overloaded { kernel, waited } => write!(
                f,
                "kernel {kernel:?} is overloaded: nothing it needs freed up in {waited:?}"
            ),
            ExecuteError::DeviceHung {
                kernel,
                backend,
                device,
            } => write!(
                f,
                "kernel {kernel:?} on {backend:?} device {device} stopped beating while the request was pending"
            ),
            ExecuteError::DeviceFailed {
                kernel,
                backend,
                reason,
            } => write!(f, "kernel {kernel:?} on {backend:?} failed: {reason}"),
            ExecuteError::WrongBuffer { kernel, reason } => {
                write!(
                    f,
                    "kernel {kernel:?} cannot use that resident buffer: {reason}"
                )
            }
            ExecuteError::WrongElement {
                kernel,
                side,
                expected,
                given,
            } => write!(
                f,
                "kernel {kernel:?}'s {side} holds {expected:?}, not {given:?}"
            ),
            ExecuteError::OutputTooSmall {
                kernel,
                needed,
                capacity,
            } => write!(
                f,
                "kernel {kernel:?} answered {needed} elements, the buffer holds {capacity}"
            ),
            ExecuteError::ShutDown => write!(f, "the GPU bridge has shut down"),
        }
    }
}

impl std::error::Error for ExecuteError {}

impl ExecuteError {
    /// A short, stable name for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            ExecuteError::UnknownKernel(_) => "unknown_kernel",
            ExecuteError::UnknownVersion { .. } => "unknown_version",
            ExecuteError::WrongShape { .. } => "wrong_shape",
            ExecuteError::TooLarge { .. } => "too_large",
            ExecuteError::Rejected { .. } => "rejected",
            ExecuteError::KernelFault { .. } => "kernel_fault",
            ExecuteError::Compile { .. } => "compile",
            ExecuteError::NoDevice { .. } => "no_device",
            ExecuteError::Overloaded { .. } => "overloaded",
            ExecuteError::DeviceHung { .. } => "device_hung",
            ExecuteError::DeviceFailed { .. } => "device_failed",
            ExecuteError::WrongBuffer { .. } => "wrong_buffer",
            ExecuteError::WrongElement { .. } => "wrong_element",
            ExecuteError::OutputTooSmall { .. } => "output_too_small",
            ExecuteError::ShutDown => "shut_down",
        }
    }
}

/// Why a bridge could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildError {
    /// A kernel was registered twice under one id and version.
    DuplicateKernel {
        /// The kernel's id.
        id: &'static str,
        /// The version registered twice.
        version: u32,
    },
    /// A configuration value is out of range.
    InvalidConfig(String),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::DuplicateKernel { id, version } => {
                write!(f, "kernel {id:?} version {version} is registered twice")
            }
            BuildError::InvalidConfig(why) => write!(f, "invalid bridge configuration: {why}"),
        }
    }
}

impl std::error::Error for BuildError {}
