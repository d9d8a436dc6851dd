//! The OpenCL backend, first part: device discovery, compilation with a
//! per-device cache, and the launch-per-batch path with device buffers.
//!
//! OpenCL is loaded at run time (opencl3's `dynamic` feature): where no
//! OpenCL runtime is installed, [`OpenClBackend::discover`] returns
//! [`OpenClError::Unavailable`] and everything else keeps working. CI runs
//! this backend for real on POCL.
//!
//! Still to come (issue 3): the persistent kernel with its rings in
//! fine-grained SVM.

use std::collections::HashMap;
use std::fmt;
use std::ptr;
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
use opencl3::types::{CL_BLOCKING, cl_float, cl_uint};

use crate::device::{BackendKind, DeviceInfo, DeviceKind};

mod persistent;

pub use persistent::{OpenClPersistentKernel, PERSISTENT_TEMPLATE};

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
}

impl fmt::Display for OpenClError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenClError::Unavailable(why) => write!(f, "OpenCL is unavailable: {why}"),
            OpenClError::UnknownDevice(index) => write!(f, "no OpenCL device {index}"),
            OpenClError::Build { log } => write!(f, "OpenCL program failed to build:\n{log}"),
            OpenClError::Api { call, code } => write!(f, "OpenCL {call} failed with {code}"),
            OpenClError::BadInput(why) => write!(f, "bad input: {why}"),
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
    /// Shared with the SVM regions allocated in it, which must not outlive it.
    context: Arc<Context>,
    /// The batch path's in-order queue. Persistent kernels get their own,
    /// since one never finishes.
    queue: CommandQueue,
    /// Built programs keyed by (build options, source text), so a hit is
    /// exact.
    programs: Mutex<HashMap<(String, String), Arc<Program>>>,
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

/// Element-wise vector add for the batch path.
pub const VECTOR_ADD_SOURCE: &str = r#"
kernel void granary_vector_add(global const float* a, global const float* b,
                               global float* c, uint n) {
    size_t i = get_global_id(0);
    if (i < n) c[i] = a[i] + b[i];
}
"#;

impl OpenClBackend {
    /// Finds every OpenCL device on every platform, with a context and an
    /// in-order queue for each.
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
        let mut last_error = None;
        for platform in platforms {
            let ids = match platform.get_devices(CL_DEVICE_TYPE_ALL) {
                Ok(ids) => ids,
                Err(err) => {
                    last_error = Some(err);
                    continue;
                }
            };
            for id in ids {
                let device = Device::new(id);
                let info = describe(&device, devices.len() as u32)?;
                let context = Context::from_device(&device).map_err(api("clCreateContext"))?;
                let queue = CommandQueue::create_default_with_properties(&context, 0, 0)
                    .map_err(api("clCreateCommandQueue"))?;
                devices.push(OpenClDevice {
                    info,
                    context: Arc::new(context),
                    queue,
                    programs: Mutex::new(HashMap::new()),
                });
            }
        }
        if devices.is_empty() {
            let why = match last_error {
                Some(err) => format!("no OpenCL device on {platform_count} platform(s) ({err})"),
                None => format!("no OpenCL device on {platform_count} platform(s)"),
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

    /// `a + b` on device `index` through device buffers: the
    /// launch-per-batch path for inputs too big for a ring slot.
    pub fn vector_add(&self, index: usize, a: &[f32], b: &[f32]) -> Result<Vec<f32>, OpenClError> {
        if a.len() != b.len() {
            return Err(OpenClError::BadInput(format!(
                "vector add of {} and {} elements",
                a.len(),
                b.len()
            )));
        }
        let n = a.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let count = cl_uint::try_from(n)
            .map_err(|_| OpenClError::BadInput(format!("{n} elements exceed u32")))?;
        let device = self.device(index)?;
        let program = self.compile(index, VECTOR_ADD_SOURCE)?;
        let kernel =
            Kernel::create(&program, "granary_vector_add").map_err(api("clCreateKernel"))?;
        // SAFETY: null host pointers with no USE/COPY_HOST_PTR flags: the
        // buffers are device allocations of `n` floats.
        let (mut a_buffer, mut b_buffer, c_buffer) = unsafe {
            (
                Buffer::<cl_float>::create(&device.context, CL_MEM_READ_ONLY, n, ptr::null_mut())
                    .map_err(api("clCreateBuffer"))?,
                Buffer::<cl_float>::create(&device.context, CL_MEM_READ_ONLY, n, ptr::null_mut())
                    .map_err(api("clCreateBuffer"))?,
                Buffer::<cl_float>::create(&device.context, CL_MEM_WRITE_ONLY, n, ptr::null_mut())
                    .map_err(api("clCreateBuffer"))?,
            )
        };
        let mut c = vec![0.0f32; n];
        // SAFETY: blocking writes and reads of exactly `n` floats into and
        // out of buffers of `n` floats; the kernel's arguments match its
        // signature (three float buffers and a uint) and it writes only
        // indices below `n`. The queue is in order, so the read follows the
        // kernel.
        unsafe {
            device
                .queue
                .enqueue_write_buffer(&mut a_buffer, CL_BLOCKING, 0, a, &[])
                .map_err(api("clEnqueueWriteBuffer"))?;
            device
                .queue
                .enqueue_write_buffer(&mut b_buffer, CL_BLOCKING, 0, b, &[])
                .map_err(api("clEnqueueWriteBuffer"))?;
            ExecuteKernel::new(&kernel)
                .set_arg(&a_buffer)
                .set_arg(&b_buffer)
                .set_arg(&c_buffer)
                .set_arg(&count)
                .set_global_work_size(n)
                .enqueue_nd_range(&device.queue)
                .map_err(api("clEnqueueNDRangeKernel"))?;
            device
                .queue
                .enqueue_read_buffer(&c_buffer, CL_BLOCKING, 0, &mut c, &[])
                .map_err(api("clEnqueueReadBuffer"))?;
        }
        Ok(c)
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
