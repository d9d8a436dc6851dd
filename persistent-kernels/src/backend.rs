//! The traits every backend implements, and the CPU backend.
//!
//! A [`Backend`] owns the devices of one API (CPU, OpenCL, CUDA). It can:
//! 1. list its devices ([`Backend::devices`]);
//! 2. build a kernel for a device, once ([`Backend::prepare`]; the build is
//!    cached per device and source, and a failed build returns the
//!    driver's log);
//! 3. launch a persistent kernel and hand back a [`PersistentKernel`]:
//!    submit through a [`Submitter`], poll completions, stop;
//! 4. run the launch-per-batch path with device buffers
//!    ([`Backend::run_batch`]) for inputs too large for a ring slot;
//! 5. keep resident buffers on a device across calls and run batches
//!    whose request parts and response live there
//!    ([`Backend::alloc_resident`], [`Backend::run_batch_parts`]; the
//!    contract is in `resident.rs`).
//!
//! The bridge drives every backend through these traits only: the CPU
//! backend here, OpenCL (`opencl.rs`) and CUDA (`cuda.rs`) all plug in the
//! same way.

use std::fmt;
use std::time::Duration;

use crate::cpu::{CpuPersistentKernel, KernelConfig, LaunchError};
use crate::device::{BackendKind, DeviceInfo, host_device};
use crate::hooks::CpuHooks;
use crate::kernel::{Completion, CompletionRef, PersistentKernel, StopMode, StopReport, Submitter};
use crate::resident::{self, BatchOutput, BatchPart, CpuBuffer, DeviceBuffer};
use crate::spec::{KernelSpec, ShapeError, Status};

/// What a backend operation can fail with.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendError {
    /// The backend's runtime is not installed or has no device.
    Unavailable(String),
    /// No device with this index on the backend.
    UnknownDevice(usize),
    /// The kernel has no source or implementation for this backend.
    Unsupported {
        /// The kernel.
        kernel: &'static str,
        /// The backend.
        backend: BackendKind,
    },
    /// The kernel failed to build; `log` is the compiler's log.
    Build {
        /// The kernel.
        kernel: &'static str,
        /// The build log.
        log: String,
    },
    /// The input does not fit the kernel's batch shape.
    WrongShape(ShapeError),
    /// The kernel rejected the input (bad length or bad contents).
    Rejected(Status),
    /// The device has no compute units left for another persistent kernel
    /// (each running one holds some until it stops). Retrying after a
    /// kernel stops may succeed.
    NoCapacity(String),
    /// A driver call or the device failed.
    Device(String),
    /// A resident buffer used where it cannot be: made by another backend
    /// or for another device, a range outside it, an output buffer whose
    /// length is not the response's.
    BadBuffer(String),
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::Unavailable(why) => write!(f, "backend unavailable: {why}"),
            BackendError::UnknownDevice(index) => write!(f, "no device {index}"),
            BackendError::Unsupported { kernel, backend } => {
                write!(f, "kernel {kernel:?} has no {backend:?} implementation")
            }
            BackendError::Build { kernel, log } => {
                write!(f, "kernel {kernel:?} failed to build:\n{log}")
            }
            BackendError::WrongShape(err) => write!(f, "input does not fit the kernel: {err}"),
            BackendError::Rejected(status) => {
                write!(f, "the kernel rejected the input: {status:?}")
            }
            BackendError::NoCapacity(why) => write!(f, "device busy: {why}"),
            BackendError::Device(why) => write!(f, "device failure: {why}"),
            BackendError::BadBuffer(why) => write!(f, "bad resident buffer: {why}"),
        }
    }
}

impl std::error::Error for BackendError {}

impl From<LaunchError> for BackendError {
    fn from(err: LaunchError) -> BackendError {
        match err {
            LaunchError::NoCpuImplementation { kernel } => BackendError::Unsupported {
                kernel,
                backend: BackendKind::Cpu,
            },
            other => BackendError::Device(other.to_string()),
        }
    }
}

/// A batch input copied into host memory a backend reads fastest from
/// (page-locked, for CUDA): see [`Backend::stage_input`].
pub type StagedInput = Box<dyn AsRef<[u8]> + Send + Sync>;

/// One API's devices: discovery, builds, persistent kernels, batches.
pub trait Backend: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// The devices found, indexed from 0.
    fn devices(&self) -> Vec<DeviceInfo>;

    /// Builds `spec` for `device`, or finds the cached build. Idempotent.
    fn prepare(&self, device: usize, spec: &KernelSpec) -> Result<(), BackendError>;

    /// Launches `spec`'s persistent kernel on `device`, building it first
    /// if needed.
    fn launch(
        &self,
        device: usize,
        spec: KernelSpec,
        config: &KernelConfig,
    ) -> Result<Box<dyn PersistentKernel>, BackendError>;

    /// Whether every kernel a caller may use should be built on a device
    /// ([`Backend::prepare`]) before the first persistent kernel is launched
    /// there. True for CUDA, where loading a module while a kernel that
    /// never returns is running may wait for that kernel to end.
    fn build_before_launch(&self) -> bool {
        false
    }

    /// A copy of `input` in host memory that [`Backend::run_batch`] on
    /// `device` copies to the device fastest, or `None` where the backend
    /// has no such memory, or none to spare (then any host buffer will do;
    /// an error means the same). CUDA hands back page-locked memory, up to
    /// a bound, filled by a few threads, which `run_batch` sends by one DMA
    /// without staging it again.
    fn stage_input(
        &self,
        device: usize,
        input: &[u8],
    ) -> Option<Result<StagedInput, BackendError>> {
        let _ = (device, input);
        None
    }

    /// Runs `spec` once over `request` on `device` with device buffers and
    /// returns the response. The request is checked against the kernel's
    /// batch shape and its `output_len` first.
    fn run_batch(
        &self,
        device: usize,
        spec: &KernelSpec,
        request: &[u8],
    ) -> Result<Vec<u8>, BackendError>;

    /// A resident buffer of `len` zeroed bytes on `device`. The default:
    /// the backend keeps none.
    fn alloc_resident(
        &self,
        device: usize,
        len: usize,
    ) -> Result<Box<dyn DeviceBuffer>, BackendError> {
        let _ = (device, len);
        Err(BackendError::Unavailable(format!(
            "the {:?} backend keeps no resident buffers",
            self.kind()
        )))
    }

    /// Copies `data` into `buffer` at `offset`.
    fn write_resident(
        &self,
        buffer: &dyn DeviceBuffer,
        offset: usize,
        data: &[u8],
    ) -> Result<(), BackendError> {
        let _ = (offset, data);
        Err(foreign(self.kind(), buffer))
    }

    /// Copies `len` bytes of `buffer` from `offset` to the host.
    fn read_resident(
        &self,
        buffer: &dyn DeviceBuffer,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, BackendError> {
        let _ = (offset, len);
        Err(foreign(self.kind(), buffer))
    }

    /// Copies every byte of `from` into `to`, two of this backend's
    /// buffers of one length on two of its devices, without the bytes
    /// crossing the host: a grain that moves between the devices of one
    /// node. `None` where the backend offers no such copy between these
    /// devices (the caller then stages the bytes through the host with
    /// [`Backend::read_resident`] and [`Backend::write_resident`]).
    fn copy_resident(
        &self,
        from: &dyn DeviceBuffer,
        to: &dyn DeviceBuffer,
    ) -> Option<Result<(), BackendError>> {
        let _ = (from, to);
        None
    }

    /// Runs `spec` once on `device` over the request made of `parts`, and
    /// puts the response where `output` says (the contract is in
    /// `resident.rs`). With [`BatchOutput::Into`] the returned bytes are
    /// empty.
    fn run_batch_parts(
        &self,
        device: usize,
        spec: &KernelSpec,
        parts: &[BatchPart<'_>],
        output: BatchOutput<'_>,
    ) -> Result<Vec<u8>, BackendError> {
        let _ = (device, spec, parts, output);
        Err(BackendError::Unavailable(format!(
            "the {:?} backend keeps no resident buffers",
            self.kind()
        )))
    }
}

/// A buffer handed to a backend that did not make it.
fn foreign(kind: BackendKind, buffer: &dyn DeviceBuffer) -> BackendError {
    BackendError::BadBuffer(format!(
        "a buffer of {:?} device {} used on the {kind:?} backend",
        buffer.backend(),
        buffer.device()
    ))
}

/// The response length of a batch request: the batch shape and the
/// kernel's own check, in that order.
pub fn batch_output_len(spec: &KernelSpec, request: &[u8]) -> Result<usize, BackendError> {
    spec.batch_request
        .check(request.len())
        .map_err(BackendError::WrongShape)?;
    (spec.output_len)(request).map_err(BackendError::Rejected)
}

/// The CPU backend: this host, as one device or several (each with the
/// memory it reports, for placement and migration between devices);
/// persistent kernels are threads.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    devices: Vec<DeviceInfo>,
    hooks: CpuHooks,
}

impl CpuBackend {
    /// The host as the backend's one device.
    pub fn new() -> CpuBackend {
        CpuBackend::with_device(host_device())
    }

    /// A CPU backend that reports `device` (for example with a memory limit
    /// configured for placement tests).
    pub fn with_device(device: DeviceInfo) -> CpuBackend {
        CpuBackend {
            devices: vec![device],
            hooks: CpuHooks::new(),
        }
    }

    /// A CPU backend of several devices, each reporting its own memory
    /// (the host's memory split in shares, as a node with several GPUs
    /// has them); none makes it [`CpuBackend::new`]'s one.
    pub fn with_devices(devices: Vec<DeviceInfo>) -> CpuBackend {
        if devices.is_empty() {
            return CpuBackend::new();
        }
        CpuBackend {
            devices: devices
                .into_iter()
                .enumerate()
                .map(|(index, info)| DeviceInfo {
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                    ..info
                })
                .collect(),
            hooks: CpuHooks::new(),
        }
    }

    /// The backend's test hooks ([`CpuHooks`]): faults armed on them reach
    /// every kernel this backend (or a clone of it) launches.
    pub fn hooks(&self) -> &CpuHooks {
        &self.hooks
    }

    fn check_device(&self, device: usize) -> Result<(), BackendError> {
        if device < self.devices.len() {
            Ok(())
        } else {
            Err(BackendError::UnknownDevice(device))
        }
    }
}

impl Default for CpuBackend {
    fn default() -> CpuBackend {
        CpuBackend::new()
    }
}

impl Backend for CpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        self.devices.clone()
    }

    fn prepare(&self, device: usize, spec: &KernelSpec) -> Result<(), BackendError> {
        self.check_device(device)?;
        match spec.cpu {
            Some(_) => Ok(()),
            None => Err(BackendError::Unsupported {
                kernel: spec.id,
                backend: BackendKind::Cpu,
            }),
        }
    }

    fn launch(
        &self,
        device: usize,
        spec: KernelSpec,
        config: &KernelConfig,
    ) -> Result<Box<dyn PersistentKernel>, BackendError> {
        self.check_device(device)?;
        Ok(Box::new(CpuPersistentKernel::launch_hooked(
            spec,
            *config,
            self.hooks.clone(),
        )?))
    }

    fn run_batch(
        &self,
        device: usize,
        spec: &KernelSpec,
        request: &[u8],
    ) -> Result<Vec<u8>, BackendError> {
        self.check_device(device)?;
        let Some(cpu) = spec.cpu else {
            return Err(BackendError::Unsupported {
                kernel: spec.id,
                backend: BackendKind::Cpu,
            });
        };
        let len = batch_output_len(spec, request)?;
        let mut response = vec![0u8; len];
        let written =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cpu(request, &mut response)))
                .unwrap_or(Err(Status::Fault))
                .map_err(BackendError::Rejected)?;
        response.truncate(written);
        Ok(response)
    }

    fn alloc_resident(
        &self,
        device: usize,
        len: usize,
    ) -> Result<Box<dyn DeviceBuffer>, BackendError> {
        self.check_device(device)?;
        Ok(Box::new(CpuBuffer::on(device, len)))
    }

    fn write_resident(
        &self,
        buffer: &dyn DeviceBuffer,
        offset: usize,
        data: &[u8],
    ) -> Result<(), BackendError> {
        let buffer = resident::own_buffer::<CpuBuffer>(buffer, BackendKind::Cpu, buffer.device())?;
        resident::check_range(offset, data.len(), buffer.len())?;
        buffer.with(|bytes| bytes[offset..offset + data.len()].copy_from_slice(data));
        Ok(())
    }

    fn read_resident(
        &self,
        buffer: &dyn DeviceBuffer,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, BackendError> {
        let buffer = resident::own_buffer::<CpuBuffer>(buffer, BackendKind::Cpu, buffer.device())?;
        resident::check_range(offset, len, buffer.len())?;
        Ok(buffer.with(|bytes| bytes[offset..offset + len].to_vec()))
    }

    /// The devices' memory is the host's: one copy between the two
    /// buffers' bytes.
    fn copy_resident(
        &self,
        from: &dyn DeviceBuffer,
        to: &dyn DeviceBuffer,
    ) -> Option<Result<(), BackendError>> {
        let copied = resident::own_buffer::<CpuBuffer>(from, BackendKind::Cpu, from.device())
            .and_then(|from| {
                let to = resident::own_buffer::<CpuBuffer>(to, BackendKind::Cpu, to.device())?;
                from.copy_into(to)
            });
        Some(copied)
    }

    fn run_batch_parts(
        &self,
        device: usize,
        spec: &KernelSpec,
        parts: &[BatchPart<'_>],
        output: BatchOutput<'_>,
    ) -> Result<Vec<u8>, BackendError> {
        self.check_device(device)?;
        // The device's memory is the host's: the request is assembled from
        // the parts' own bytes, so the kernel's checks see the real ones.
        let mut request = Vec::with_capacity(resident::request_len(parts)?);
        for part in parts {
            match part {
                BatchPart::Host(bytes) => request.extend_from_slice(bytes),
                BatchPart::Resident(buffer) => {
                    let buffer =
                        resident::own_buffer::<CpuBuffer>(*buffer, BackendKind::Cpu, device)?;
                    buffer.with(|bytes| request.extend_from_slice(bytes));
                }
            }
        }
        let into = match output {
            BatchOutput::Host => None,
            BatchOutput::Into(buffer) => Some(resident::own_buffer::<CpuBuffer>(
                buffer,
                BackendKind::Cpu,
                device,
            )?),
        };
        if let Some(into) = into {
            resident::check_output(into, batch_output_len(spec, &request)?)?;
        }
        let response = self.run_batch(device, spec, &request)?;
        match into {
            None => Ok(response),
            Some(into) => {
                into.with(|bytes| {
                    let written = response.len().min(bytes.len());
                    bytes[..written].copy_from_slice(&response[..written]);
                });
                Ok(Vec::new())
            }
        }
    }
}

impl PersistentKernel for CpuPersistentKernel {
    fn spec(&self) -> &KernelSpec {
        CpuPersistentKernel::spec(self)
    }

    fn submitter(&self) -> Option<Submitter> {
        Some(CpuPersistentKernel::submitter(self))
    }

    fn try_complete(&mut self) -> Option<Completion> {
        CpuPersistentKernel::try_complete(self)
    }

    fn complete(&mut self, timeout: Duration) -> Option<Completion> {
        CpuPersistentKernel::complete(self, timeout)
    }

    fn try_complete_each(&mut self, max: usize, take: &mut dyn FnMut(CompletionRef<'_>)) -> usize {
        CpuPersistentKernel::try_complete_each(self, max, take)
    }

    fn complete_each(
        &mut self,
        timeout: Duration,
        max: usize,
        take: &mut dyn FnMut(CompletionRef<'_>),
    ) -> usize {
        CpuPersistentKernel::complete_each(self, timeout, max, take)
    }

    fn heartbeat(&self) -> u64 {
        CpuPersistentKernel::heartbeat(self)
    }

    fn stop(&mut self, mode: StopMode, timeout: Duration) -> StopReport {
        self.stop_within(mode, timeout)
    }
}
