//! The OpenCL backend: device discovery, compilation with a per-device
//! cache, the launch-per-batch path with device buffers, and persistent
//! kernels over fine-grained SVM rings ([`OpenClPersistentKernel`]).
//!
//! OpenCL is loaded at run time (opencl3's `dynamic` feature): where no
//! OpenCL runtime is installed, [`OpenClBackend::discover`] returns
//! [`OpenClError::Unavailable`] and everything else keeps working. CI runs
//! this backend for real on POCL.

use std::collections::HashMap;
use std::fmt;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use opencl3::command_queue::CommandQueue;
use opencl3::context::Context;
use opencl3::device::{
    CL_DEVICE_TYPE_ACCELERATOR, CL_DEVICE_TYPE_ALL, CL_DEVICE_TYPE_CPU, CL_DEVICE_TYPE_GPU, Device,
};
use opencl3::kernel::{ExecuteKernel, Kernel};
use opencl3::memory::{Buffer, CL_MEM_READ_ONLY, CL_MEM_WRITE_ONLY};
use opencl3::platform::get_platforms;
use opencl3::program::Program;
use opencl3::types::{CL_BLOCKING, cl_uint};

use granary_ring::device::OPENCL_HEADER;

use crate::DEVICE_PRELUDE;
use crate::backend::{Backend, BackendError, batch_output_len};
use crate::cpu::KernelConfig;
use crate::device::{BackendKind, DeviceInfo, DeviceKind};
use crate::kernel::PersistentKernel;
use crate::spec::KernelSpec;

mod persistent;
mod resident;

pub use persistent::{OpenClPersistentKernel, PERSISTENT_TEMPLATE};
pub use resident::ClBuffer;

/// What went wrong in the OpenCL backend.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpenClError {
    /// No OpenCL runtime could be loaded, or it has no platform.
    Unavailable(String),
    /// No device with this index.
    UnknownDevice(usize),
    /// A program failed to build; `log` is the driver's build log.
    Build {
        /// The build log.
        log: String,
    },
    /// An OpenCL call failed.
    Api {
        /// What was being done.
        call: &'static str,
        /// The OpenCL error code.
        code: i32,
    },
    /// The input does not fit the kernel.
    BadInput(String),
    /// The kernel has no OpenCL C source.
    NoSource,
    /// Launching would hold more compute units than the device may give
    /// persistent kernels.
    NoCapacity {
        /// Compute units held by running persistent kernels.
        held: u32,
        /// Compute units the launch asked for.
        requested: u32,
        /// The most that may be held.
        limit: u32,
    },
}

impl fmt::Display for OpenClError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenClError::Unavailable(why) => write!(f, "OpenCL is unavailable: {why}"),
            OpenClError::UnknownDevice(index) => write!(f, "no OpenCL device {index}"),
            OpenClError::Build { log } => write!(f, "OpenCL program failed to build:\n{log}"),
            OpenClError::Api { call, code } => write!(f, "OpenCL {call} failed with {code}"),
            OpenClError::BadInput(why) => write!(f, "bad input: {why}"),
            OpenClError::NoSource => write!(f, "the kernel has no OpenCL C source"),
            OpenClError::NoCapacity {
                held,
                requested,
                limit,
            } => write!(
                f,
                "{requested} more compute units for a persistent kernel, with {held} of {limit} held"
            ),
        }
    }
}

impl std::error::Error for OpenClError {}

fn api(call: &'static str) -> impl Fn(opencl3::error_codes::ClError) -> OpenClError {
    move |err| OpenClError::Api { call, code: err.0 }
}

/// One OpenCL device with its context, queue and compiled programs.
struct OpenClDevice {
    info: DeviceInfo,
    /// The device's OpenCL id, as a number (a handle, never dereferenced):
    /// what tells it apart across backends (the persistent kernels'
    /// compute-unit registry keys on it).
    id: usize,
    /// Shared with the SVM regions allocated in it, which must not outlive it.
    context: Arc<Context>,
    /// The batch path's in-order queue. Persistent kernels get their own,
    /// since one never finishes.
    queue: CommandQueue,
    /// Built programs keyed by (build options, source text), so a hit is
    /// exact.
    programs: Mutex<HashMap<(String, String), Arc<Program>>>,
    /// Times the compiler ran (a cache miss), failed builds included.
    compiler_runs: AtomicU64,
    /// Set once a kernel's program failed to build as OpenCL C 3.0 and
    /// then built as 2.0: the device's compiler is taken to refuse 3.0,
    /// and later programs are built as 2.0 first (`program_for`).
    refuses_c3: AtomicBool,
}

/// The OpenCL devices of this node.
pub struct OpenClBackend {
    devices: Vec<OpenClDevice>,
}

impl fmt::Debug for OpenClBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|d| &d.info))
            .finish()
    }
}

impl OpenClBackend {
    /// Finds every OpenCL device on every platform, with a context and an
    /// in-order queue for each. A device whose description, context or
    /// queue fails is skipped (logged at warn), not the whole backend:
    /// [`OpenClError::Unavailable`], with every reason, only when no
    /// device is left.
    pub fn discover() -> Result<OpenClBackend, OpenClError> {
        // ICD loaders and drivers initialise themselves on first use, and
        // POCL was seen to report no device to one of two threads
        // discovering at once: discovery is serialised.
        static DISCOVERY: Mutex<()> = Mutex::new(());
        let _serial = DISCOVERY.lock().unwrap_or_else(PoisonError::into_inner);
        let platforms = get_platforms()
            .map_err(|err| OpenClError::Unavailable(format!("no platform ({err})")))?;
        let platform_count = platforms.len();
        let mut devices = Vec::new();
        let mut skipped = Vec::new();
        for platform in platforms {
            let ids = match platform.get_devices(CL_DEVICE_TYPE_ALL) {
                Ok(ids) => ids,
                Err(err) => {
                    skipped.push(format!("a platform's devices: {err}"));
                    continue;
                }
            };
            for id in ids {
                let device = Device::new(id);
                let index = u32::try_from(devices.len()).unwrap_or(u32::MAX);
                let opened = describe(&device, index).and_then(|info| {
                    let context = Context::from_device(&device).map_err(api("clCreateContext"))?;
                    let queue = CommandQueue::create_default_with_properties(&context, 0, 0)
                        .map_err(api("clCreateCommandQueue"))?;
                    Ok(OpenClDevice {
                        info,
                        id: id as usize,
                        context: Arc::new(context),
                        queue,
                        programs: Mutex::new(HashMap::new()),
                        compiler_runs: AtomicU64::new(0),
                        refuses_c3: AtomicBool::new(false),
                    })
                });
                match opened {
                    Ok(opened) => devices.push(opened),
                    Err(err) => {
                        tracing::warn!(error = %err, "an OpenCL device was skipped");
                        skipped.push(err.to_string());
                    }
                }
            }
        }
        if devices.is_empty() {
            let why = if skipped.is_empty() {
                format!("no OpenCL device on {platform_count} platform(s)")
            } else {
                format!(
                    "no OpenCL device on {platform_count} platform(s) ({})",
                    skipped.join("; ")
                )
            };
            return Err(OpenClError::Unavailable(why));
        }
        Ok(OpenClBackend { devices })
    }

    /// The devices found.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.devices
            .iter()
            .map(|device| device.info.clone())
            .collect()
    }

    fn device(&self, index: usize) -> Result<&OpenClDevice, OpenClError> {
        self.devices
            .get(index)
            .ok_or(OpenClError::UnknownDevice(index))
    }

    /// Builds `source` for device `index`, or returns the cached build. A
    /// build failure returns the driver's build log and caches nothing.
    pub fn compile(&self, index: usize, source: &str) -> Result<Arc<Program>, OpenClError> {
        self.compile_with(index, source, "")
    }

    /// [`OpenClBackend::compile`] with build options (for example
    /// `-cl-std=CL2.0`); the cache keys on the options too.
    pub fn compile_with(
        &self,
        index: usize,
        source: &str,
        options: &str,
    ) -> Result<Arc<Program>, OpenClError> {
        let device = self.device(index)?;
        let mut programs = device
            .programs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let key = (options.to_string(), source.to_string());
        if let Some(program) = programs.get(&key) {
            return Ok(program.clone());
        }
        device.compiler_runs.fetch_add(1, Ordering::Relaxed);
        let program = Program::create_and_build_from_source(&device.context, source, options)
            .map_err(|log| OpenClError::Build { log })?;
        let program = Arc::new(program);
        programs.insert(key, program.clone());
        Ok(program)
    }

    /// Programs built so far for device `index`.
    pub fn cached_programs(&self, index: usize) -> Result<usize, OpenClError> {
        let device = self.device(index)?;
        Ok(device
            .programs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len())
    }

    /// Times device `index`'s compiler ran: builds the cache did not
    /// answer, failed ones included.
    pub fn compiler_runs(&self, index: usize) -> Result<u64, OpenClError> {
        Ok(self.device(index)?.compiler_runs.load(Ordering::Relaxed))
    }

    /// The program holding `spec`'s two entry points on device `index`:
    /// the ring layout, the prelude, the kernel's OpenCL C and the
    /// persistent template, built as OpenCL C 3.0 (POCL's C11 atomics only
    /// build there) or else 2.0. Cached like any build. A failed build is
    /// not cached, so once a program built only as 2.0, the device's
    /// later programs try 2.0 first (`two_standards`): a compiler
    /// that refuses 3.0 is not asked again on every call.
    pub fn program_for(
        &self,
        index: usize,
        spec: &KernelSpec,
    ) -> Result<Arc<Program>, OpenClError> {
        let Some(process) = spec.opencl_c else {
            return Err(OpenClError::NoSource);
        };
        let device = self.device(index)?;
        let source = format!(
            "{OPENCL_HEADER}\n{DEVICE_PRELUDE}\n{process}\n{}",
            persistent::PERSISTENT_TEMPLATE
        );
        two_standards(&device.refuses_c3, |options| {
            self.compile_with(index, &source, options)
        })
    }

    /// Runs `spec`'s `granary_batch` over `request` on device `index`, one
    /// work-item per output element, through device buffers: the
    /// launch-per-batch path for inputs too big for a ring slot.
    pub fn run_batch(
        &self,
        index: usize,
        spec: &KernelSpec,
        request: &[u8],
    ) -> Result<Vec<u8>, OpenClError> {
        let output_len = batch_output_len(spec, request)
            .map_err(|err| OpenClError::BadInput(err.to_string()))?;
        let request_len = cl_uint::try_from(request.len())
            .map_err(|_| OpenClError::BadInput(format!("{} bytes exceed u32", request.len())))?;
        let response_len = cl_uint::try_from(output_len)
            .map_err(|_| OpenClError::BadInput(format!("{output_len} bytes exceed u32")))?;
        let device = self.device(index)?;
        let program = self.program_for(index, spec)?;
        let kernel = Kernel::create(&program, "granary_batch").map_err(api("clCreateKernel"))?;
        // Zero-length buffers are invalid in OpenCL; a kernel never sees the
        // padding byte, since both lengths travel as arguments.
        let request_bytes = request.len().max(1);
        let response_bytes = output_len.max(1);
        // SAFETY: null host pointers with no USE/COPY_HOST_PTR flags: plain
        // device allocations of the given sizes.
        let (mut request_buffer, response_buffer) = unsafe {
            (
                Buffer::<u8>::create(
                    &device.context,
                    CL_MEM_READ_ONLY,
                    request_bytes,
                    ptr::null_mut(),
                )
                .map_err(api("clCreateBuffer"))?,
                Buffer::<u8>::create(
                    &device.context,
                    CL_MEM_WRITE_ONLY,
                    response_bytes,
                    ptr::null_mut(),
                )
                .map_err(api("clCreateBuffer"))?,
            )
        };
        let mut response = vec![0u8; output_len];
        let work_items = (output_len / 4).max(1);
        // SAFETY: a blocking write of `request.len()` bytes into a buffer at
        // least that large, and a blocking read of `output_len` bytes out of
        // one at least that large. The arguments match `granary_batch`'s
        // signature (buffer, uint, buffer, uint), and the kernel writes only
        // below `response_len` (checked by `output_len` above). The queue
        // is in order, so the read follows the kernel.
        unsafe {
            if !request.is_empty() {
                device
                    .queue
                    .enqueue_write_buffer(&mut request_buffer, CL_BLOCKING, 0, request, &[])
                    .map_err(api("clEnqueueWriteBuffer"))?;
            }
            ExecuteKernel::new(&kernel)
                .set_arg(&request_buffer)
                .set_arg(&request_len)
                .set_arg(&response_buffer)
                .set_arg(&response_len)
                .set_global_work_size(work_items)
                .enqueue_nd_range(&device.queue)
                .map_err(api("clEnqueueNDRangeKernel"))?;
            if output_len > 0 {
                device
                    .queue
                    .enqueue_read_buffer(&response_buffer, CL_BLOCKING, 0, &mut response, &[])
                    .map_err(api("clEnqueueReadBuffer"))?;
            }
        }
        device.queue.finish().map_err(api("clFinish"))?;
        Ok(response)
    }
}

impl Backend for OpenClBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::OpenCl
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        OpenClBackend::devices(self)
    }

    fn prepare(&self, device: usize, spec: &KernelSpec) -> Result<(), BackendError> {
        self.program_for(device, spec)
            .map(drop)
            .map_err(|err| backend_error(err, spec))
    }

    fn launch(
        &self,
        device: usize,
        spec: KernelSpec,
        config: &KernelConfig,
    ) -> Result<Box<dyn PersistentKernel>, BackendError> {
        let work_groups = config.work_groups.unwrap_or(1) as usize;
        OpenClPersistentKernel::launch_leaving(
            self,
            device,
            spec,
            config.capacity,
            work_groups,
            config.keep_free_compute_units,
        )
        .map(|mut kernel| {
            kernel.set_wait_policy(config.policy);
            Box::new(kernel) as Box<dyn PersistentKernel>
        })
        .map_err(|err| backend_error(err, &spec))
    }

    fn run_batch(
        &self,
        device: usize,
        spec: &KernelSpec,
        request: &[u8],
    ) -> Result<Vec<u8>, BackendError> {
        // Shape errors first, typed, before any OpenCL call.
        batch_output_len(spec, request)?;
        OpenClBackend::run_batch(self, device, spec, request)
            .map_err(|err| backend_error(err, spec))
    }

    fn alloc_resident(
        &self,
        device: usize,
        len: usize,
    ) -> Result<Box<dyn crate::DeviceBuffer>, BackendError> {
        Ok(Box::new(OpenClBackend::alloc_resident(self, device, len)?))
    }

    fn write_resident(
        &self,
        buffer: &dyn crate::DeviceBuffer,
        offset: usize,
        data: &[u8],
    ) -> Result<(), BackendError> {
        OpenClBackend::write_resident(self, buffer, offset, data)
    }

    fn read_resident(
        &self,
        buffer: &dyn crate::DeviceBuffer,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, BackendError> {
        OpenClBackend::read_resident(self, buffer, offset, len)
    }

    fn run_batch_parts(
        &self,
        device: usize,
        spec: &KernelSpec,
        parts: &[crate::BatchPart<'_>],
        output: crate::BatchOutput<'_>,
    ) -> Result<Vec<u8>, BackendError> {
        OpenClBackend::run_batch_parts(self, device, spec, parts, output)
    }
}

/// Builds with `build` as OpenCL C 3.0 then 2.0, or 2.0 then 3.0 once
/// `refuses_c3` is set; sets it when 2.0 built after 3.0 failed, and
/// clears it when 3.0 built after 2.0 failed. A program that fails both
/// ways carries both logs.
fn two_standards<T>(
    refuses_c3: &AtomicBool,
    mut build: impl FnMut(&'static str) -> Result<T, OpenClError>,
) -> Result<T, OpenClError> {
    const C3: (&str, &str) = ("-cl-std=CL3.0", "OpenCL C 3.0");
    const C2: (&str, &str) = ("-cl-std=CL2.0", "OpenCL C 2.0");
    let (first, second) = if refuses_c3.load(Ordering::Relaxed) {
        (C2, C3)
    } else {
        (C3, C2)
    };
    let first_log = match build(first.0) {
        Err(OpenClError::Build { log }) => log,
        other => return other,
    };
    match build(second.0) {
        Err(OpenClError::Build { log }) => Err(OpenClError::Build {
            log: format!("as {}:\n{first_log}\nas {}:\n{log}", first.1, second.1),
        }),
        Ok(program) => {
            refuses_c3.store(second == C2, Ordering::Relaxed);
            Ok(program)
        }
        other => other,
    }
}

/// An OpenCL error as the backend trait reports it.
fn backend_error(err: OpenClError, spec: &KernelSpec) -> BackendError {
    match err {
        OpenClError::Unavailable(why) => BackendError::Unavailable(why),
        OpenClError::UnknownDevice(index) => BackendError::UnknownDevice(index),
        OpenClError::Build { log } => BackendError::Build {
            kernel: spec.id,
            log,
        },
        OpenClError::NoSource => BackendError::Unsupported {
            kernel: spec.id,
            backend: BackendKind::OpenCl,
        },
        err @ OpenClError::NoCapacity { .. } => BackendError::NoCapacity(err.to_string()),
        other => BackendError::Device(other.to_string()),
    }
}

fn describe(device: &Device, index: u32) -> Result<DeviceInfo, OpenClError> {
    let kind = match device.dev_type().map_err(api("clGetDeviceInfo"))? {
        t if t & CL_DEVICE_TYPE_GPU != 0 => DeviceKind::Gpu,
        t if t & CL_DEVICE_TYPE_CPU != 0 => DeviceKind::Cpu,
        t if t & CL_DEVICE_TYPE_ACCELERATOR != 0 => DeviceKind::Accelerator,
        _ => DeviceKind::Accelerator,
    };
    let total = device.global_mem_size().map_err(api("clGetDeviceInfo"))?;
    Ok(DeviceInfo {
        backend: BackendKind::OpenCl,
        index,
        name: device.name().map_err(api("clGetDeviceInfo"))?,
        kind,
        compute_units: device
            .max_compute_units()
            .map_err(api("clGetDeviceInfo"))?
            .max(1),
        total_memory: total,
        // OpenCL reports no free-memory figure; the broker's reservations
        // account for what Granary itself uses.
        free_memory: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compiler that builds only under the options in `takes`, and
    /// records each run's options.
    fn compiler<'a>(
        takes: &'a [&'a str],
        runs: &'a mut Vec<&'static str>,
    ) -> impl FnMut(&'static str) -> Result<&'static str, OpenClError> + 'a {
        move |options| {
            runs.push(options);
            if takes.contains(&options) {
                Ok(options)
            } else {
                Err(OpenClError::Build {
                    log: format!("refused {options}"),
                })
            }
        }
    }

    #[test]
    fn a_compiler_that_refuses_3_0_is_asked_for_2_0_first_from_then_on() {
        let refuses = AtomicBool::new(false);
        let mut runs = Vec::new();
        let built = two_standards(&refuses, compiler(&["-cl-std=CL2.0"], &mut runs));
        assert_eq!(built.unwrap(), "-cl-std=CL2.0");
        assert_eq!(runs, ["-cl-std=CL3.0", "-cl-std=CL2.0"]);
        assert!(refuses.load(Ordering::Relaxed));
        // The next program: one run, as 2.0.
        let mut runs = Vec::new();
        let built = two_standards(&refuses, compiler(&["-cl-std=CL2.0"], &mut runs));
        assert_eq!(built.unwrap(), "-cl-std=CL2.0");
        assert_eq!(runs, ["-cl-std=CL2.0"]);
        // A program that builds only as 3.0 still builds, and 3.0 is
        // tried first again.
        let mut runs = Vec::new();
        let built = two_standards(&refuses, compiler(&["-cl-std=CL3.0"], &mut runs));
        assert_eq!(built.unwrap(), "-cl-std=CL3.0");
        assert_eq!(runs, ["-cl-std=CL2.0", "-cl-std=CL3.0"]);
        assert!(!refuses.load(Ordering::Relaxed));
    }

    #[test]
    fn a_program_that_builds_neither_way_carries_both_logs_and_other_errors_end_at_once() {
        let refuses = AtomicBool::new(false);
        let mut runs = Vec::new();
        match two_standards(&refuses, compiler(&[], &mut runs)) {
            Err(OpenClError::Build { log }) => assert_eq!(
                log,
                "as OpenCL C 3.0:\nrefused -cl-std=CL3.0\nas OpenCL C 2.0:\nrefused -cl-std=CL2.0"
            ),
            other => panic!("{other:?}"),
        }
        assert!(!refuses.load(Ordering::Relaxed));
        let mut runs = 0;
        let failed = two_standards::<()>(&refuses, |_| {
            runs += 1;
            Err(OpenClError::Api {
                call: "clBuildProgram",
                code: -5,
            })
        });
        assert!(matches!(failed, Err(OpenClError::Api { .. })), "{failed:?}");
        assert_eq!(runs, 1);
    }
}
