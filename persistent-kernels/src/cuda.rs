//! The CUDA backend: device discovery, NVRTC builds with a per-device
//! module cache, persistent kernels over host-mapped rings
//! ([`CudaPersistentKernel`]), and the launch-per-batch path through device
//! buffers and pinned staging.
//!
//! CUDA is reached through cudarc with dynamic loading, layered as cudarc
//! does: `sys` (raw driver and NVRTC symbols) → `result` (calls returning
//! `Result`) → the safe types here. The workspace builds, and every binary
//! runs, with no CUDA installed: [`CudaBackend::discover`] checks that
//! libcuda and libnvrtc can be loaded before it makes any call, and returns
//! [`CudaError::Unavailable`] otherwise.
//!
//! Rules the backend keeps, because a persistent kernel never returns by
//! itself:
//! 1. Everything runs on non-blocking streams of its own; nothing is
//!    queued on the legacy default stream, which would wait for every
//!    running kernel.
//! 2. No call that may wait for the whole device (`cuCtxSynchronize`,
//!    `cuMemFree`, `cuMemFreeHost`) is made while the backend lives
//!    (rule 1 in `cuda/memory.rs`). Waits are on one stream or one event.
//! 3. Both entry points of a module are loaded eagerly (`cuFuncLoad`) when
//!    it is built: with CUDA's lazy loading, a first launch may otherwise
//!    need the context to be idle, which it never is.
//! 4. Every driver call is made with the device's context bound to the
//!    calling thread.

use std::collections::HashMap;
use std::ffi::CString;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::result::DriverError;
use cudarc::driver::sys::{self, CUdevice_attribute, CUdeviceptr, CUevent, CUfunction, CUmodule};
use cudarc::driver::{CudaContext, result};

use granary_ring::device::CUDA_HEADER;

use crate::DEVICE_PRELUDE;
use crate::backend::{Backend, BackendError, StagedInput, batch_output_len};
use crate::cpu::KernelConfig;
use crate::device::{BackendKind, DeviceInfo, DeviceKind};
use crate::kernel::PersistentKernel;
use crate::spec::KernelSpec;

mod memory;
pub mod nvrtc;
mod persistent;
mod resident;

pub use memory::{DeviceBytes, PINNED_LIMIT, PinnedBytes};
use memory::{HostCache, PinnedChunk, Stream, is_pinned};
pub use persistent::{CudaPersistentKernel, PERSISTENT_TEMPLATE};
pub use resident::CudaBuffer;

/// What went wrong in the CUDA backend.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CudaError {
    /// libcuda or libnvrtc cannot be loaded, or there is no device.
    Unavailable(String),
    /// No device with this index.
    UnknownDevice(usize),
    /// NVRTC rejected the source; `log` is its log.
    Build {
        /// The compiler's log.
        log: String,
    },
    /// A driver or NVRTC call failed.
    Api {
        /// What was being done.
        call: &'static str,
        /// The `CUresult` or `nvrtcResult` code.
        code: i32,
    },
    /// The input does not fit the kernel.
    BadInput(String),
    /// The kernel has no CUDA C source.
    NoSource,
    /// A module that is not built yet cannot be loaded while persistent
    /// kernels run on the device: the driver would wait for them to end,
    /// which they never do. Build every kernel first
    /// ([`Backend::prepare`]), as the bridge does; or stop the kernels.
    ModuleWhileRunning {
        /// Persistent kernels running on the device.
        running: u32,
    },
    /// The device's page-locked memory for batch inputs is at its bound.
    NoPinnedMemory {
        /// Bytes asked for (rounded up to a power of two).
        requested: usize,
        /// Bytes already allocated.
        allocated: usize,
        /// [`PINNED_LIMIT`].
        limit: usize,
    },
    /// Every block a device may give persistent kernels is taken.
    NoCapacity {
        /// Persistent kernels running on the device in this process.
        running: u32,
        /// The most that may run.
        limit: u32,
    },
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaError::Unavailable(why) => write!(f, "CUDA is unavailable: {why}"),
            CudaError::UnknownDevice(index) => write!(f, "no CUDA device {index}"),
            CudaError::Build { log } => write!(f, "CUDA C failed to build:\n{log}"),
            CudaError::Api { call, code } => write!(f, "CUDA {call} failed with {code}"),
            CudaError::BadInput(why) => write!(f, "bad input: {why}"),
            CudaError::NoSource => write!(f, "the kernel has no CUDA C source"),
            CudaError::ModuleWhileRunning { running } => write!(
                f,
                "a new module cannot be loaded while {running} persistent kernel(s) run on the device; build every kernel before the first launch"
            ),
            CudaError::NoPinnedMemory {
                requested,
                allocated,
                limit,
            } => write!(
                f,
                "{requested} more bytes of page-locked memory, with {allocated} of {limit} allocated"
            ),
            CudaError::NoCapacity { running, limit } => write!(
                f,
                "{running} persistent kernels already run on the device, the most it may hold is {limit}"
            ),
        }
    }
}

impl std::error::Error for CudaError {}

/// Device memory the stream-ordered allocator keeps for reuse after batch
/// buffers are freed, instead of handing it back to the driver at the next
/// synchronisation (its default threshold is 0, so every 64 MiB batch paid
/// for mapping fresh memory: measured at a fifth of the copy's speed).
pub const DEVICE_POOL_KEEP: u64 = 1 << 30;

/// Sets the device's default memory pool to keep [`DEVICE_POOL_KEEP`]
/// bytes: the batch path's device buffers are then recycled by the driver.
fn keep_freed_device_memory(context: &Arc<CudaContext>) -> Result<(), CudaError> {
    // SAFETY: a device of a live context.
    let pool = unsafe { result::device::get_default_mem_pool(context.cu_device()) }
        .map_err(driver("cuDeviceGetDefaultMemPool"))?;
    let mut keep = DEVICE_POOL_KEEP;
    // SAFETY: the release threshold is a u64, passed by pointer.
    unsafe {
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut keep as *mut u64).cast(),
        )
    }
    .map_err(driver("cuMemPoolSetAttribute"))
}

/// A driver error as a [`CudaError`], naming the call.
pub(crate) fn driver(call: &'static str) -> impl Fn(DriverError) -> CudaError {
    move |err| CudaError::Api {
        call,
        code: err.0 as i32,
    }
}

/// Whether libcuda can be loaded. No driver function is called.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library by its known names.
    unsafe { sys::is_culib_present() }
}

/// The CUDA C that NVRTC builds for `spec`: the ring layout, the status
/// codes, the kernel's own source and the persistent template.
pub fn program_source(spec: &KernelSpec) -> Result<String, CudaError> {
    let Some(process) = spec.cuda_c else {
        return Err(CudaError::NoSource);
    };
    Ok(format!(
        "{CUDA_HEADER}\n{DEVICE_PRELUDE}\n{process}\n{PERSISTENT_TEMPLATE}"
    ))
}

/// A loaded module with Granary's two entry points.
pub(crate) struct Module {
    context: Arc<CudaContext>,
    module: CUmodule,
    /// `granary_persistent(requests, responses, scratch, scratch_stride)`.
    pub(crate) persistent: CUfunction,
    /// `granary_batch(request, request_len, response, response_len)`.
    pub(crate) batch: CUfunction,
}

// SAFETY: module and function handles are context-wide driver objects,
// usable from any thread that binds the context (rule 4).
unsafe impl Send for Module {}
// SAFETY: as above; the handles are never mutated.
unsafe impl Sync for Module {}

impl Module {
    fn load(context: &Arc<CudaContext>, cubin: &[u8]) -> Result<Module, CudaError> {
        context
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))?;
        // SAFETY: a CUBIN image from NVRTC, alive for the call.
        let module = unsafe { result::module::load_data(cubin.as_ptr().cast()) }
            .map_err(driver("cuModuleLoadData"))?;
        let mut loaded = Module {
            context: context.clone(),
            module,
            persistent: std::ptr::null_mut(),
            batch: std::ptr::null_mut(),
        };
        loaded.persistent = loaded.function("granary_persistent")?;
        loaded.batch = loaded.function("granary_batch")?;
        Ok(loaded)
    }

    /// An entry point, loaded now (rule 3).
    fn function(&self, name: &str) -> Result<CUfunction, CudaError> {
        let name = CString::new(name).map_err(|_| CudaError::BadInput(name.to_string()))?;
        // SAFETY: a loaded module and a NUL-terminated name.
        let function = unsafe { result::module::get_function(self.module, name) }
            .map_err(driver("cuModuleGetFunction"))?;
        // SAFETY: a function of a loaded module.
        unsafe { sys::cuFuncLoad(function) }
            .result()
            .map_err(driver("cuFuncLoad"))?;
        Ok(function)
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        // Every kernel of the module has exited: persistent kernels hold
        // the module until they do, and batches run under a reference. An
        // unload beside another running kernel could wait for it (rule 3):
        // then the module stays loaded.
        if persistent::running_on(self.context.ordinal()) == 0
            && self.context.bind_to_thread().is_ok()
        {
            // SAFETY: loaded once, unloaded once.
            let _ = unsafe { result::module::unload(self.module) };
        }
    }
}

/// A stream with what one batch needs to pipeline its copies: two events
/// and two pinned staging chunks. Lanes are reused, never freed while the
/// backend lives (rule 2).
struct Lane {
    stream: Arc<Stream>,
    events: [CUevent; 2],
    chunks: [PinnedChunk; 2],
}

// SAFETY: driver handles usable from any thread with the context bound;
// one batch owns a lane at a time.
unsafe impl Send for Lane {}

/// Bytes per staging chunk: large enough that a copy runs at the link's
/// speed, small enough that the host's copy of the next chunk overlaps it.
pub const STAGING_CHUNK: usize = 4 << 20;

/// One CUDA device with its context and caches.
pub(crate) struct CudaDevice {
    pub(crate) info: DeviceInfo,
    pub(crate) context: Arc<CudaContext>,
    /// Compute capability as `major * 10 + minor` (90 on an H100).
    pub(crate) arch: u32,
    /// Built modules, keyed by the full source, so a hit is exact.
    modules: Mutex<HashMap<String, Arc<Module>>>,
    /// Idle batch lanes.
    lanes: Mutex<Vec<Lane>>,
    /// Host-mapped ring memory, recycled.
    pub(crate) host: Arc<HostCache>,
    /// Page-locked batch inputs handed to callers, recycled.
    pinned: Arc<HostCache>,
}

/// The CUDA devices of this node.
pub struct CudaBackend {
    devices: Vec<CudaDevice>,
}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|d| &d.info))
            .finish()
    }
}

impl CudaBackend {
    /// Finds every CUDA device: name, compute capability, SMs, total and
    /// free memory. Unavailable (not a panic) without libcuda, libnvrtc or
    /// a device.
    pub fn discover() -> Result<CudaBackend, CudaError> {
        if !driver_present() {
            return Err(CudaError::Unavailable(
                "the CUDA driver (libcuda) was not found".to_string(),
            ));
        }
        if !nvrtc::nvrtc_present() {
            return Err(CudaError::Unavailable(
                "NVRTC (libnvrtc) was not found on the library path".to_string(),
            ));
        }
        result::init().map_err(|err| CudaError::Unavailable(format!("cuInit failed: {err:?}")))?;
        let count = CudaContext::device_count().map_err(driver("cuDeviceGetCount"))?;
        if count <= 0 {
            return Err(CudaError::Unavailable("no CUDA device".to_string()));
        }
        let mut devices = Vec::new();
        for ordinal in 0..count as usize {
            let context = CudaContext::new(ordinal).map_err(driver("cuDevicePrimaryCtxRetain"))?;
            let name = context.name().map_err(driver("cuDeviceGetName"))?;
            let (major, minor) = context
                .compute_capability()
                .map_err(driver("cuDeviceGetAttribute"))?;
            let attribute = |attribute| {
                context
                    .attribute(attribute)
                    .map_err(driver("cuDeviceGetAttribute"))
            };
            let sms = attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
            if attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY)? == 0 {
                return Err(CudaError::Unavailable(format!(
                    "device {ordinal} ({name}) cannot map host memory"
                )));
            }
            keep_freed_device_memory(&context)?;
            let (free, total) = context.mem_get_info().map_err(driver("cuMemGetInfo"))?;
            let info = DeviceInfo {
                backend: BackendKind::Cuda,
                index: ordinal as u32,
                name: format!("{name} (sm_{major}{minor})"),
                kind: DeviceKind::Gpu,
                compute_units: (sms.max(1)) as u32,
                total_memory: total as u64,
                free_memory: (free as u64).min(total as u64),
            };
            devices.push(CudaDevice {
                info,
                host: HostCache::mapped(context.clone()),
                pinned: HostCache::pinned(context.clone()),
                context,
                arch: (major * 10 + minor) as u32,
                modules: Mutex::new(HashMap::new()),
                lanes: Mutex::new(Vec::new()),
            });
        }
        Ok(CudaBackend { devices })
    }

    /// The devices found.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.devices.iter().map(|d| d.info.clone()).collect()
    }

    /// Free and total memory of device `index` now, from `cuMemGetInfo`.
    pub fn memory(&self, index: usize) -> Result<(u64, u64), CudaError> {
        let device = self.device(index)?;
        device
            .context
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))?;
        let (free, total) = result::mem_get_info().map_err(driver("cuMemGetInfo"))?;
        Ok((free as u64, total as u64))
    }

    pub(crate) fn device(&self, index: usize) -> Result<&CudaDevice, CudaError> {
        self.devices
            .get(index)
            .ok_or(CudaError::UnknownDevice(index))
    }

    /// The module holding `spec`'s two entry points on device `index`,
    /// built by NVRTC for the device's architecture, or the cached one. A
    /// failed build returns NVRTC's log and caches nothing.
    pub(crate) fn module_for(
        &self,
        index: usize,
        spec: &KernelSpec,
    ) -> Result<Arc<Module>, CudaError> {
        let device = self.device(index)?;
        let source = program_source(spec)?;
        let mut modules = device
            .modules
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(module) = modules.get(&source) {
            return Ok(module.clone());
        }
        let cubin = nvrtc::compile_cubin(&source, device.arch, spec.id)?;
        let module = Arc::new(persistent::while_idle(index, || {
            Module::load(&device.context, &cubin)
        })?);
        modules.insert(source, module.clone());
        Ok(module)
    }

    /// Modules built so far for device `index`.
    pub fn cached_modules(&self, index: usize) -> Result<usize, CudaError> {
        Ok(self
            .device(index)?
            .modules
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len())
    }

    fn take_lane(&self, device: &CudaDevice) -> Result<Lane, CudaError> {
        if let Some(lane) = device
            .lanes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
        {
            return Ok(lane);
        }
        let stream = Stream::new(&device.context)?;
        let event = || {
            result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(driver("cuEventCreate"))
        };
        Ok(Lane {
            stream,
            events: [event()?, event()?],
            chunks: [
                PinnedChunk::new(&device.context, STAGING_CHUNK)?,
                PinnedChunk::new(&device.context, STAGING_CHUNK)?,
            ],
        })
    }

    /// Returns a lane to the device. After a failed batch, copies may still
    /// be queued on it: they are waited for first.
    fn give_lane<T>(device: &CudaDevice, lane: Lane, outcome: &Result<T, CudaError>) {
        if outcome.is_err() {
            // SAFETY: the lane's own stream, on its context.
            let synced = device.context.bind_to_thread().is_ok()
                && unsafe { result::stream::synchronize(lane.stream.raw) }.is_ok();
            if !synced {
                // A stream that cannot be waited for may still read the
                // chunks: the lane is not returned (a lane frees nothing
                // when dropped), so nothing reuses its chunks.
                return;
            }
        }
        device
            .lanes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(lane);
    }

    /// `len` bytes of page-locked host memory (zeroed when newly allocated;
    /// a recycled buffer holds earlier bytes) for a batch's input on
    /// device `index`. Write the input there and pass it to
    /// [`CudaBackend::run_batch`]: it then goes to the device by DMA with no
    /// staging copy (about 2.5 times faster for large inputs, BENCHMARKS.md).
    pub fn pinned(&self, index: usize, len: usize) -> Result<PinnedBytes, CudaError> {
        self.device(index)?.pinned.take_pinned(len)
    }

    /// Whether `bytes` are page-locked host memory that device `index`'s
    /// batch path copies from directly, by one DMA.
    pub fn is_page_locked(&self, index: usize, bytes: &[u8]) -> bool {
        self.device(index)
            .map(|device| is_pinned(&device.context, bytes))
            .unwrap_or(false)
    }

    /// Copies `input` into a new device buffer the way the batch path
    /// does, and returns when the bytes are on the device. Input already in
    /// page-locked memory ([`CudaBackend::pinned`]) goes by one DMA;
    /// anything else through two pinned staging chunks, so the host's copy
    /// of one chunk (split across a few threads) overlaps the DMA of the
    /// other.
    pub fn stage_in(&self, index: usize, input: &[u8]) -> Result<DeviceBytes, CudaError> {
        let device = self.device(index)?;
        let mut lane = self.take_lane(device)?;
        let outcome = (|| {
            let buffer = DeviceBytes::alloc(&lane.stream, input.len())?;
            upload(&device.context, &mut lane, buffer.pointer(), input)?;
            // SAFETY: a stream of the bound context.
            unsafe { result::stream::synchronize(lane.stream.raw) }
                .map_err(driver("cuStreamSynchronize"))?;
            Ok(buffer)
        })();
        Self::give_lane(device, lane, &outcome);
        outcome
    }

    /// Runs `spec`'s `granary_batch` over `request` on device `index`: the
    /// request is staged into a device buffer, the kernel runs one thread
    /// per output element (256 to a block), and the response comes back
    /// through the same pinned chunks.
    pub fn run_batch(
        &self,
        index: usize,
        spec: &KernelSpec,
        request: &[u8],
    ) -> Result<Vec<u8>, CudaError> {
        let output_len =
            batch_output_len(spec, request).map_err(|err| CudaError::BadInput(err.to_string()))?;
        let request_len = u32::try_from(request.len())
            .map_err(|_| CudaError::BadInput(format!("{} bytes exceed u32", request.len())))?;
        let response_len = u32::try_from(output_len)
            .map_err(|_| CudaError::BadInput(format!("{output_len} bytes exceed u32")))?;
        let device = self.device(index)?;
        let module = self.module_for(index, spec)?;
        let mut lane = self.take_lane(device)?;
        let outcome = (|| {
            let input = DeviceBytes::alloc(&lane.stream, request.len())?;
            let output = DeviceBytes::alloc(&lane.stream, output_len)?;
            upload(&device.context, &mut lane, input.pointer(), request)?;
            launch_batch(
                &module,
                &lane,
                (input.pointer(), request_len),
                (output.pointer(), response_len),
            )?;
            let mut response = vec![0u8; output_len];
            download(&mut lane, output.pointer(), &mut response)?;
            Ok(response)
        })();
        Self::give_lane(device, lane, &outcome);
        outcome
    }
}

/// Launches `module`'s `granary_batch` on `lane`'s stream over a request
/// and a response buffer (device address and length each): one thread per
/// output word, 256 to a block.
fn launch_batch(
    module: &Module,
    lane: &Lane,
    (mut input_pointer, mut request_len): (CUdeviceptr, u32),
    (mut output_pointer, mut response_len): (CUdeviceptr, u32),
) -> Result<(), CudaError> {
    let work_items = (response_len as usize / 4).max(1);
    let blocks = u32::try_from(work_items.div_ceil(256))
        .map_err(|_| CudaError::BadInput(format!("{work_items} work items")))?;
    let mut params = [
        (&mut input_pointer as *mut CUdeviceptr).cast(),
        (&mut request_len as *mut u32).cast(),
        (&mut output_pointer as *mut CUdeviceptr).cast(),
        (&mut response_len as *mut u32).cast(),
    ];
    // SAFETY: the parameters match granary_batch's signature (pointer, u32,
    // pointer, u32) and live across the call (the driver copies them at
    // launch); the caller passes buffers at least as large as the lengths,
    // and the kernel writes only below `response_len` (checked by the
    // kernel's `output_len` before any buffer was made).
    unsafe {
        result::launch_kernel(
            module.batch,
            (blocks, 1, 1),
            (256, 1, 1),
            0,
            lane.stream.raw,
            &mut params,
        )
    }
    .map_err(driver("cuLaunchKernel"))
}

/// Bytes each staging thread copies at a time.
const STRIPE: usize = 512 << 10;

/// The threads that copy between callers' memory and pinned chunks: one
/// core's memcpy (about 10 GB/s) is a fifth of what a PCIe 5 link carries.
/// At most 8, and none beyond half the machine's cores.
fn staging_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (cores / 2).clamp(1, 8);
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("granary-cuda-staging-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// Copies `from` into `to` (same length), split across the staging pool
/// when the copy is large enough to pay for it.
fn staged_copy(to: &mut [u8], from: &[u8]) {
    use rayon::prelude::*;
    match staging_pool() {
        Some(pool) if from.len() > STRIPE => pool.install(|| {
            to.par_chunks_mut(STRIPE)
                .zip(from.par_chunks(STRIPE))
                .for_each(|(to, from)| to.copy_from_slice(from));
        }),
        _ => to.copy_from_slice(from),
    }
}

/// Host → device through the lane's two chunks (see [`CudaBackend::stage_in`]).
/// Returns with the last copy queued, not finished.
fn upload(
    context: &Arc<CudaContext>,
    lane: &mut Lane,
    target: CUdeviceptr,
    input: &[u8],
) -> Result<(), CudaError> {
    if is_pinned(context, input) {
        // SAFETY: the target holds `input.len()` bytes; the source is
        // page-locked and borrowed until the caller has waited for the
        // stream (stage_in and run_batch both do before returning).
        let direct = unsafe {
            sys::cuMemcpyHtoDAsync_v2(target, input.as_ptr().cast(), input.len(), lane.stream.raw)
        };
        if direct == sys::cudaError_enum::CUDA_SUCCESS {
            return Ok(());
        }
        // Memory pinned for another context only: staged like any other.
    }
    for (k, piece) in input.chunks(STAGING_CHUNK).enumerate() {
        let which = k % 2;
        if k >= 2 {
            // The chunk's previous copy must have left it.
            // SAFETY: an event of the bound context, recorded below.
            unsafe { result::event::synchronize(lane.events[which]) }
                .map_err(driver("cuEventSynchronize"))?;
        }
        let chunk = &lane.chunks[which];
        debug_assert!(piece.len() <= chunk.len);
        // SAFETY: the chunk holds STAGING_CHUNK bytes, at least `piece.len()`,
        // owned by this lane, and no transfer reads it now (waited for
        // above): a unique borrow for the copy.
        let staging = unsafe { std::slice::from_raw_parts_mut(chunk.base.as_ptr(), piece.len()) };
        staged_copy(staging, piece);
        let offset = (k * STAGING_CHUNK) as CUdeviceptr;
        // SAFETY: the target holds `input.len()` bytes, so `piece` fits at
        // `offset`; the source is pinned and stays untouched until the
        // event recorded after the copy has fired.
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                target + offset,
                chunk.base.as_ptr().cast(),
                piece.len(),
                lane.stream.raw,
            )
            .result()
            .map_err(driver("cuMemcpyHtoDAsync"))?;
            result::event::record(lane.events[which], lane.stream.raw)
                .map_err(driver("cuEventRecord"))?;
        }
    }
    Ok(())
}

/// Device → host through the lane's two chunks: the copy of chunk k+1 is
/// queued before the host copies chunk k out. Returns with every byte in
/// `output`.
fn download(lane: &mut Lane, source: CUdeviceptr, output: &mut [u8]) -> Result<(), CudaError> {
    let total = output.len();
    let pieces = total.div_ceil(STAGING_CHUNK);
    let queue = |lane: &Lane, k: usize| -> Result<(), CudaError> {
        let start = k * STAGING_CHUNK;
        let len = (total - start).min(STAGING_CHUNK);
        let which = k % 2;
        debug_assert!(len <= lane.chunks[which].len);
        // SAFETY: the source holds `total` bytes; the chunk holds
        // STAGING_CHUNK and the host is done with it (each chunk is copied
        // out before it is queued again).
        unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                lane.chunks[which].base.as_ptr().cast(),
                source + start as CUdeviceptr,
                len,
                lane.stream.raw,
            )
            .result()
            .map_err(driver("cuMemcpyDtoHAsync"))?;
            result::event::record(lane.events[which], lane.stream.raw)
                .map_err(driver("cuEventRecord"))?;
        }
        Ok(())
    };
    if pieces > 0 {
        queue(lane, 0)?;
    }
    for k in 0..pieces {
        if k + 1 < pieces {
            queue(lane, k + 1)?;
        }
        let which = k % 2;
        // SAFETY: an event recorded after chunk k's copy.
        unsafe { result::event::synchronize(lane.events[which]) }
            .map_err(driver("cuEventSynchronize"))?;
        let start = k * STAGING_CHUNK;
        let len = (output.len() - start).min(STAGING_CHUNK);
        // SAFETY: the copy into the chunk has finished (event above), the
        // chunk holds at least `len` bytes, and the next copy into it is
        // queued only after this one.
        let staged = unsafe { std::slice::from_raw_parts(lane.chunks[which].base.as_ptr(), len) };
        staged_copy(&mut output[start..start + len], staged);
    }
    if pieces == 0 {
        // Nothing to copy back, but the kernel must have finished.
        // SAFETY: a stream of the bound context.
        unsafe { result::stream::synchronize(lane.stream.raw) }
            .map_err(driver("cuStreamSynchronize"))?;
    }
    Ok(())
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        for device in &mut self.devices {
            let lanes = device
                .lanes
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner);
            // Rule 2: nothing that may wait for the device while a
            // persistent kernel still runs on it (one that hung, or a
            // handle that outlives the backend): then the chunks are kept.
            let may_free = persistent::running_on(device.info.index as usize) == 0
                && device.context.bind_to_thread().is_ok();
            for lane in lanes.drain(..) {
                if !may_free {
                    continue;
                }
                // SAFETY: an idle lane: its last batch waited for its copies.
                // Events are destroyed once; the chunks are freed once, with
                // no transfer using them. The stream goes with its last
                // holder.
                unsafe {
                    for event in lane.events {
                        let _ = result::event::destroy(event);
                    }
                    for chunk in lane.chunks {
                        chunk.free();
                    }
                }
            }
        }
    }
}

impl Backend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        CudaBackend::devices(self)
    }

    fn prepare(&self, device: usize, spec: &KernelSpec) -> Result<(), BackendError> {
        self.module_for(device, spec)
            .map(drop)
            .map_err(|err| backend_error(err, spec))
    }

    fn build_before_launch(&self) -> bool {
        true
    }

    fn stage_input(
        &self,
        device: usize,
        input: &[u8],
    ) -> Option<Result<StagedInput, BackendError>> {
        // Beyond the page-locked bound (or where the host refuses to lock
        // more), the caller stages in ordinary memory instead.
        let mut pinned = self.pinned(device, input.len()).ok()?;
        staged_copy(&mut pinned, input);
        Some(Ok(Box::new(pinned) as StagedInput))
    }

    fn launch(
        &self,
        device: usize,
        spec: KernelSpec,
        config: &KernelConfig,
    ) -> Result<Box<dyn PersistentKernel>, BackendError> {
        CudaPersistentKernel::launch(self, device, spec, config)
            .map(|kernel| Box::new(kernel) as Box<dyn PersistentKernel>)
            .map_err(|err| backend_error(err, &spec))
    }

    fn run_batch(
        &self,
        device: usize,
        spec: &KernelSpec,
        request: &[u8],
    ) -> Result<Vec<u8>, BackendError> {
        // Shape errors first, typed, before any CUDA call.
        batch_output_len(spec, request)?;
        CudaBackend::run_batch(self, device, spec, request).map_err(|err| backend_error(err, spec))
    }

    fn alloc_resident(
        &self,
        device: usize,
        len: usize,
    ) -> Result<Box<dyn crate::DeviceBuffer>, BackendError> {
        Ok(Box::new(CudaBackend::alloc_resident(self, device, len)?))
    }

    fn write_resident(
        &self,
        buffer: &dyn crate::DeviceBuffer,
        offset: usize,
        data: &[u8],
    ) -> Result<(), BackendError> {
        CudaBackend::write_resident(self, buffer, offset, data)
    }

    fn read_resident(
        &self,
        buffer: &dyn crate::DeviceBuffer,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, BackendError> {
        CudaBackend::read_resident(self, buffer, offset, len)
    }

    fn run_batch_parts(
        &self,
        device: usize,
        spec: &KernelSpec,
        parts: &[crate::BatchPart<'_>],
        output: crate::BatchOutput<'_>,
    ) -> Result<Vec<u8>, BackendError> {
        CudaBackend::run_batch_parts(self, device, spec, parts, output)
    }
}

/// A CUDA error as the backend trait reports it.
fn backend_error(err: CudaError, spec: &KernelSpec) -> BackendError {
    match err {
        CudaError::Unavailable(why) => BackendError::Unavailable(why),
        CudaError::UnknownDevice(index) => BackendError::UnknownDevice(index),
        CudaError::Build { log } => BackendError::Build {
            kernel: spec.id,
            log,
        },
        CudaError::NoSource => BackendError::Unsupported {
            kernel: spec.id,
            backend: BackendKind::Cuda,
        },
        err @ (CudaError::NoCapacity { .. }
        | CudaError::ModuleWhileRunning { .. }
        | CudaError::NoPinnedMemory { .. }) => BackendError::NoCapacity(err.to_string()),
        other => BackendError::Device(other.to_string()),
    }
}
