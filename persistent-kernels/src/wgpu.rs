//! The wgpu backend: Vulkan, Metal and DX12 through one API, with WGSL
//! kernels. CI runs it for real on Mesa's lavapipe, a Vulkan driver on the
//! CPU.
//!
//! # Rules
//!
//! 1. **Discovery.** [`WgpuBackend::discover`] takes every adapter of the
//!    primary APIs (Vulkan, Metal, DX12) and opens one device and queue on
//!    each, with the adapter's own limits. An adapter whose device cannot
//!    be opened is skipped and said why ([`WgpuBackend::skipped`]), and so
//!    is a device already opened through another API (Windows lists one
//!    GPU under Vulkan and DX12; the first API listed that opens it is
//!    kept). Adapters of one model (vendor, device id, type and name) are
//!    one device when their PCI buses agree, where both APIs give buses;
//!    where one does not, the k-th adapter of the model an API lists is the
//!    k-th the other listed. Identical GPUs listed by one API are each a
//!    device, and one whose device did not open through one API is tried
//!    through the next. No adapter at all is [`WgpuError::Unavailable`],
//!    and everything else keeps working.
//! 2. **Memory.** A Vulkan adapter reports its device-local heaps, and
//!    their sum is the device's memory. Metal and DX12 report none through
//!    wgpu: such a device gets the configured share of the host's memory
//!    ([`WgpuOptions::memory_share`]), and [`Adapter::memory`] says which.
//! 3. **Builds.** A kernel's WGSL is placed between `device/prelude.wgsl`
//!    and `device/dispatch.wgsl`, checked with naga, then built into two
//!    pipelines (`granary_batch`, `granary_ring`) on one bind-group
//!    layout. Builds are cached per device and source; a failed one returns
//!    naga's or the driver's message (`Build`; a device out of memory or
//!    failing inside is `Device`, as for any call) and caches nothing.
//! 4. **No persistent kernel.** WGSL gives a spinning shader no
//!    forward-progress guarantee and the host no coherent memory it could
//!    poll, so this backend never runs one: [`Backend::launch`] starts a
//!    host thread on the same rings that drains every queued request, up
//!    to a micro-batch, into one dispatch of `granary_ring`
//!    ([`WgpuRingKernel`]); [`BackendKind::runs_persistent_kernels`] says
//!    so, and `granary devices` prints it. The kernel configuration's
//!    work-groups, threads per group and compute units to keep free are
//!    for persistent kernels, and ignored here.
//! 5. **Batches.** Storage buffers come from a per-device pool; the host's
//!    bytes go in through the queue's mapped staging memory and come back
//!    through a mapped read-back buffer; a call waits on its own
//!    submission index, never on the whole queue (`memory.rs`).
//! 6. **Errors never panic.** Every device call after discovery runs
//!    inside error scopes, so a failure is a typed [`WgpuError`]; wgpu's
//!    uncaptured-error handler (which panics by default) is replaced by
//!    one that logs what no scope caught. A lost device is recorded by the
//!    device-lost callback and fails every later call with the driver's
//!    reason.
//! 7. **Words.** WGSL reads storage in 32-bit words. A resident buffer's
//!    reads and writes at offsets inside words cover the words around
//!    them (`wgpu/resident.rs` rule 2). A request is assembled on the
//!    device word by word, so every part but the last must be a whole
//!    number of words; another part is refused with
//!    [`BackendError::BadBuffer`] (the crate's contract, rule 2).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::backend::{Backend, BackendError, batch_output_len};
use crate::cpu::KernelConfig;
use crate::device::{BackendKind, DeviceInfo, DeviceKind, host_device};
use crate::kernel::PersistentKernel;
use crate::resident::{BatchOutput, BatchPart, DeviceBuffer};
use crate::spec::KernelSpec;

mod build;
mod memory;
mod resident;
mod ring;

pub use build::{DISPATCH_WGSL, PRELUDE_WGSL};
pub use resident::WgpuBuffer;
pub use ring::WgpuRingKernel;

/// What went wrong in the wgpu backend.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WgpuError {
    /// No adapter was found, or none could open a device.
    Unavailable(String),
    /// No device with this index.
    UnknownDevice(usize),
    /// A shader failed to build; `log` is naga's or the driver's message.
    Build {
        /// The message.
        log: String,
    },
    /// The kernel has no WGSL source.
    NoSource,
    /// The input does not fit the kernel or the device.
    BadInput(String),
    /// A buffer larger than the device allows in one binding.
    TooLarge {
        /// Bytes asked for.
        bytes: u64,
        /// The device's limit.
        limit: u64,
    },
    /// A device call failed, or the device did not finish in time.
    Device(String),
    /// The device was lost; it fails every call from now on.
    Lost(String),
    /// Bad options.
    BadOptions(String),
}

impl fmt::Display for WgpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WgpuError::Unavailable(why) => write!(f, "wgpu is unavailable: {why}"),
            WgpuError::UnknownDevice(index) => write!(f, "no wgpu device {index}"),
            WgpuError::Build { log } => write!(f, "WGSL failed to build:\n{log}"),
            WgpuError::NoSource => write!(f, "the kernel has no WGSL source"),
            WgpuError::BadInput(why) => write!(f, "bad input: {why}"),
            WgpuError::TooLarge { bytes, limit } => write!(
                f,
                "a buffer of {bytes} bytes exceeds the device's {limit}-byte storage binding"
            ),
            WgpuError::Device(why) => write!(f, "wgpu device failure: {why}"),
            WgpuError::Lost(why) => write!(f, "the wgpu device was lost: {why}"),
            WgpuError::BadOptions(why) => write!(f, "bad wgpu options: {why}"),
        }
    }
}

impl std::error::Error for WgpuError {}

/// How the backend is set up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WgpuOptions {
    /// The share of the host's memory a device that reports none is taken
    /// to have (rule 2), in `(0, 1]`; default 0.5.
    pub memory_share: f64,
    /// The most ring requests one dispatch answers (rule 4), at least 1;
    /// default 256.
    pub micro_batch: usize,
}

impl Default for WgpuOptions {
    fn default() -> WgpuOptions {
        WgpuOptions {
            memory_share: 0.5,
            micro_batch: 256,
        }
    }
}

/// Where a device's memory figure came from (rule 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemorySource {
    /// The driver reported it (Vulkan's device-local heaps).
    Reported,
    /// The configured share of the host's memory.
    HostShare,
}

/// One adapter as discovered, with what `granary devices` shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    /// The device as the bridge and placement see it.
    pub info: DeviceInfo,
    /// The API: `Vulkan`, `Metal` or `Dx12`.
    pub api: String,
    /// The adapter's own device type (`Cpu`, `DiscreteGpu`, ...).
    pub device_type: String,
    /// The driver's name and version.
    pub driver: String,
    /// The largest storage buffer one binding may hold, in bytes.
    pub max_storage_binding: u64,
    /// The most work-groups one dispatch dimension may hold.
    pub max_workgroups_per_dimension: u32,
    /// Where `info`'s memory figure came from.
    pub memory: MemorySource,
}

impl fmt::Display for Adapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} via {} ({}, driver {}; storage bindings up to {} MiB; memory {})",
            self.info,
            self.api,
            self.device_type,
            self.driver,
            self.max_storage_binding >> 20,
            match self.memory {
                MemorySource::Reported => "reported by the driver",
                MemorySource::HostShare => "a configured share of the host's",
            }
        )
    }
}

/// One device: its queue, builds, buffer pool and health.
pub(crate) struct Gpu {
    pub(crate) adapter: Adapter,
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) layout: wgpu::BindGroupLayout,
    pub(crate) pipeline_layout: wgpu::PipelineLayout,
    /// Built pipelines keyed by the whole WGSL source, so a hit is exact.
    pub(crate) builds: Mutex<HashMap<String, Arc<build::Pipelines>>>,
    pub(crate) pool: memory::Pool,
    /// Why the device was lost (rule 6).
    pub(crate) fault: Arc<Mutex<Option<String>>>,
    /// Kernels compiled (cache misses that built).
    pub(crate) compiled: AtomicU64,
    /// The device's largest buffer, read once at open (asking wgpu copies
    /// every limit, and the pool asks per buffer).
    pub(crate) max_buffer: u64,
    /// Bytes between two parameter blocks: the uniform dynamic-offset
    /// alignment, read once at open.
    pub(crate) params_stride: u64,
}

impl Gpu {
    /// The device's lost reason, if it was lost.
    pub(crate) fn check_alive(&self) -> Result<(), WgpuError> {
        match &*self.fault.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(why) => Err(WgpuError::Lost(why.clone())),
            None => Ok(()),
        }
    }

    /// The largest storage binding, checked against `bytes`.
    pub(crate) fn check_binding(&self, bytes: u64) -> Result<(), WgpuError> {
        let limit = self.adapter.max_storage_binding;
        if bytes > limit {
            Err(WgpuError::TooLarge { bytes, limit })
        } else {
            Ok(())
        }
    }
}

/// What tells a physical device apart across the APIs that list it
/// (rule 1).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    vendor: u32,
    device: u32,
    kind: wgpu::DeviceType,
    name: String,
    /// The PCI bus, where the API gives it (empty where not).
    bus: String,
}

impl Identity {
    fn of(info: &wgpu::AdapterInfo) -> Identity {
        Identity {
            vendor: info.vendor,
            device: info.device,
            kind: info.device_type,
            name: info.name.clone(),
            bus: info.device_pci_bus_id.clone(),
        }
    }

    /// Whether the two are the same model of device.
    fn same_model(&self, other: &Identity) -> bool {
        self.vendor == other.vendor
            && self.device == other.device
            && self.kind == other.kind
            && self.name == other.name
    }
}

/// One adapter discovery listed (rule 1).
#[derive(Debug, Clone)]
struct Listed {
    identity: Identity,
    api: wgpu::Backend,
    /// Whether its device opened.
    opened: bool,
}

/// The API through which an adapter's device was already opened, if it
/// was (rule 1), given the adapters listed before it. On each other API,
/// its device is the adapter of its model with its bus, where both give
/// buses; else the k-th of its model that API listed, where its own API
/// listed k of the model before it. Only a device that opened there makes
/// it one to skip.
fn opened_elsewhere(
    listed: &[Listed],
    identity: &Identity,
    api: wgpu::Backend,
) -> Option<wgpu::Backend> {
    let before = listed
        .iter()
        .filter(|entry| entry.api == api && entry.identity.same_model(identity))
        .count();
    let mut others: Vec<wgpu::Backend> = Vec::new();
    for entry in listed {
        if entry.api != api && !others.contains(&entry.api) {
            others.push(entry.api);
        }
    }
    others.into_iter().find(|&other| {
        let model: Vec<&Listed> = listed
            .iter()
            .filter(|entry| entry.api == other && entry.identity.same_model(identity))
            .collect();
        let buses =
            !identity.bus.is_empty() && model.iter().all(|entry| !entry.identity.bus.is_empty());
        let device = if buses {
            model
                .into_iter()
                .find(|entry| entry.identity.bus == identity.bus)
        } else {
            model.get(before).copied()
        };
        device.is_some_and(|entry| entry.opened)
    })
}

/// The wgpu devices of this node.
pub struct WgpuBackend {
    gpus: Vec<Arc<Gpu>>,
    skipped: Vec<String>,
    options: WgpuOptions,
}

impl fmt::Debug for WgpuBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.gpus.iter().map(|gpu| &gpu.adapter.info))
            .finish()
    }
}

impl WgpuBackend {
    /// Every adapter of the primary APIs, with default options (rule 1).
    pub fn discover() -> Result<WgpuBackend, WgpuError> {
        WgpuBackend::discover_with(WgpuOptions::default())
    }

    /// [`WgpuBackend::discover`] with `options`.
    pub fn discover_with(options: WgpuOptions) -> Result<WgpuBackend, WgpuError> {
        if !(options.memory_share > 0.0 && options.memory_share <= 1.0) {
            return Err(WgpuError::BadOptions(format!(
                "memory_share {} is not in (0, 1]",
                options.memory_share
            )));
        }
        if options.micro_batch == 0 {
            return Err(WgpuError::BadOptions("micro_batch is 0".into()));
        }
        let backends = wgpu::Backends::PRIMARY;
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends,
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let adapters = pollster::block_on(instance.enumerate_adapters(backends));
        let found = adapters.len();
        let mut gpus: Vec<Arc<Gpu>> = Vec::new();
        let mut skipped = Vec::new();
        // Every adapter listed so far, and whether its device opened
        // (rule 1).
        let mut listed: Vec<Listed> = Vec::new();
        for adapter in adapters {
            let info = adapter.get_info();
            let identity = Identity::of(&info);
            let elsewhere = opened_elsewhere(&listed, &identity, info.backend);
            let mut entry = Listed {
                identity,
                api: info.backend,
                opened: false,
            };
            if let Some(api) = elsewhere {
                skipped.push(format!(
                    "{} via {:?}: the same device as one opened via {api:?}",
                    info.name, info.backend
                ));
            } else {
                let index = u32::try_from(gpus.len()).unwrap_or(u32::MAX);
                match open(&adapter, index, options.memory_share) {
                    Ok(gpu) => {
                        gpus.push(Arc::new(gpu));
                        entry.opened = true;
                    }
                    Err(why) => {
                        skipped.push(format!("{} via {:?}: {why}", info.name, info.backend));
                    }
                }
            }
            listed.push(entry);
        }
        if gpus.is_empty() {
            let why = if found == 0 {
                "no Vulkan, Metal or DX12 adapter".to_string()
            } else {
                format!("{found} adapter(s), none opened: {}", skipped.join("; "))
            };
            return Err(WgpuError::Unavailable(why));
        }
        Ok(WgpuBackend {
            gpus,
            skipped,
            options,
        })
    }

    /// The adapters opened, with their APIs, limits and memory sources.
    pub fn adapters(&self) -> Vec<Adapter> {
        self.gpus.iter().map(|gpu| gpu.adapter.clone()).collect()
    }

    /// Adapters found whose device could not be opened, and why.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// The devices found.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.gpus
            .iter()
            .map(|gpu| gpu.adapter.info.clone())
            .collect()
    }

    pub(crate) fn gpu(&self, index: usize) -> Result<&Arc<Gpu>, WgpuError> {
        let gpu = self
            .gpus
            .get(index)
            .ok_or(WgpuError::UnknownDevice(index))?;
        gpu.check_alive()?;
        Ok(gpu)
    }

    /// Builds `spec`'s WGSL on device `index`, or finds the cached build
    /// (rule 3).
    pub fn prepare_kernel(&self, index: usize, spec: &KernelSpec) -> Result<(), WgpuError> {
        build::pipelines(self.gpu(index)?, spec).map(drop)
    }

    /// Destroys device `index` (wgpu's `Device::destroy`): every later
    /// call of this backend on it fails as lost (`WgpuError::Lost`), as
    /// after a driver reset, and wgpu frees its memory once its queue is
    /// empty. Its ring kernels end (`ring.rs` rule 6). Destroying a device
    /// again does nothing. Tests use it to lose a device on demand.
    pub fn destroy_device(&self, index: usize) -> Result<(), WgpuError> {
        let gpu = self
            .gpus
            .get(index)
            .ok_or(WgpuError::UnknownDevice(index))?;
        // Lost first, so that no call starts on the device once it is
        // destroyed; the device-lost callback keeps this reason.
        gpu.fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(|| "destroyed".into());
        gpu.device.destroy();
        Ok(())
    }

    /// Kernels compiled on device `index` so far: a build the cache
    /// answers compiles nothing, and a failed one counts for nothing.
    pub fn compiled(&self, index: usize) -> Result<u64, WgpuError> {
        Ok(self.gpu(index)?.compiled.load(Ordering::Relaxed))
    }

    /// Starts `spec`'s ring kernel on device `index` (rule 4): a host
    /// thread that drains the ring into one dispatch per micro-batch.
    /// [`Backend::launch`] returns the same, boxed.
    pub fn launch_ring(
        &self,
        index: usize,
        spec: KernelSpec,
        config: &KernelConfig,
    ) -> Result<WgpuRingKernel, BackendError> {
        let gpu = self.gpu(index).map_err(|err| backend_error(err, &spec))?;
        let pipelines = build::pipelines(gpu, &spec).map_err(|err| backend_error(err, &spec))?;
        let most = self.options.micro_batch.min(config.capacity as usize);
        WgpuRingKernel::launch(gpu.clone(), pipelines, spec, config, most)
    }

    /// Runs `spec`'s `granary_batch` over `request` on device `index`, one
    /// invocation per output word (rule 5).
    pub fn run_batch(
        &self,
        index: usize,
        spec: &KernelSpec,
        request: &[u8],
    ) -> Result<Vec<u8>, WgpuError> {
        let output_len =
            batch_output_len(spec, request).map_err(|err| WgpuError::BadInput(err.to_string()))?;
        let gpu = self.gpu(index)?;
        let pipelines = build::pipelines(gpu, spec)?;
        let passes = spec.wgsl.map_or(1, |wgsl| (wgsl.passes)(request));
        memory::run_batch(
            gpu,
            &pipelines,
            &[BatchPart::Host(request)],
            output_len,
            passes,
            None,
        )
    }
}

/// Opens a device on `adapter` and describes it (rules 1, 2 and 6).
fn open(adapter: &wgpu::Adapter, index: u32, share: f64) -> Result<Gpu, String> {
    let info = adapter.get_info();
    let limits = adapter.limits();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("granary"),
        required_limits: limits.clone(),
        ..Default::default()
    }))
    .map_err(|err| err.to_string())?;
    let fault = Arc::new(Mutex::new(None));
    let lost = fault.clone();
    device.set_device_lost_callback(move |reason, message| {
        let mut fault = lost.lock().unwrap_or_else(PoisonError::into_inner);
        fault.get_or_insert(format!("{reason:?}: {message}"));
    });
    // wgpu's default handler panics on an error no scope caught. Every
    // call here runs in error scopes (rule 6), so none should reach it; one
    // that does is logged, not panicked on, and the call that made it has
    // already returned its scope's error.
    device.on_uncaptured_error(Arc::new(|error: wgpu::Error| {
        tracing::warn!(%error, "a wgpu error outside any error scope");
    }));
    let (total, source) = device_memory(
        vulkan_device_memory(adapter),
        host_device().total_memory,
        share,
    );
    let kind = match info.device_type {
        wgpu::DeviceType::Cpu => DeviceKind::Cpu,
        wgpu::DeviceType::DiscreteGpu
        | wgpu::DeviceType::IntegratedGpu
        | wgpu::DeviceType::VirtualGpu => DeviceKind::Gpu,
        wgpu::DeviceType::Other => DeviceKind::Accelerator,
    };
    let compute_units = match kind {
        // lavapipe runs work-groups on the host's threads.
        DeviceKind::Cpu => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        // wgpu reports no compute-unit count for GPUs.
        _ => 1,
    };
    let device_info = DeviceInfo {
        backend: BackendKind::Wgpu,
        index,
        name: info.name.clone(),
        kind,
        compute_units,
        total_memory: total,
        // wgpu reports no free-memory figure; the broker's reservations
        // account for what Granary itself uses.
        free_memory: total,
    };
    let layout = build::bind_group_layout(&device);
    let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some("granary"),
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let pool = memory::Pool::new();
    Ok(Gpu {
        adapter: Adapter {
            info: device_info,
            api: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info)
                .trim()
                .to_string(),
            max_storage_binding: limits
                .max_storage_buffer_binding_size
                .min(limits.max_buffer_size),
            max_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
            memory: source,
        },
        device,
        queue,
        layout,
        pipeline_layout,
        builds: Mutex::new(HashMap::new()),
        pool,
        fault,
        compiled: AtomicU64::new(0),
        max_buffer: limits.max_buffer_size,
        params_stride: u64::from(limits.min_uniform_buffer_offset_alignment).max(16),
    })
}

/// A device's memory and where the figure came from (rule 2): what the
/// driver reported, else `share` of the host's `host_total`.
fn device_memory(reported: Option<u64>, host_total: u64, share: f64) -> (u64, MemorySource) {
    match reported {
        Some(bytes) if bytes > 0 => (bytes, MemorySource::Reported),
        _ => ((host_total as f64 * share) as u64, MemorySource::HostShare),
    }
}

/// The sum of a Vulkan adapter's device-local heaps; `None` on other APIs
/// (rule 2), and on Apple platforms, where wgpu has no Vulkan.
#[cfg(any(target_vendor = "apple", target_arch = "wasm32"))]
fn vulkan_device_memory(_: &wgpu::Adapter) -> Option<u64> {
    None
}

/// The sum of a Vulkan adapter's device-local heaps; `None` on other APIs
/// (rule 2).
#[cfg(not(any(target_vendor = "apple", target_arch = "wasm32")))]
fn vulkan_device_memory(adapter: &wgpu::Adapter) -> Option<u64> {
    if adapter.get_info().backend != wgpu::Backend::Vulkan {
        return None;
    }
    // SAFETY: the hal adapter is only read, while `adapter` (which owns
    // it) is alive; no handle escapes this function.
    let hal = unsafe { adapter.as_hal::<wgpu::hal::api::Vulkan>() }?;
    let instance = hal.shared_instance().raw_instance();
    // SAFETY: the physical device belongs to this instance (wgpu
    // enumerated it there), and the call only reads its properties.
    let properties =
        unsafe { instance.get_physical_device_memory_properties(hal.raw_physical_device()) };
    // VK_MEMORY_HEAP_DEVICE_LOCAL_BIT is bit 0.
    const DEVICE_LOCAL: u32 = 1;
    let count = (properties.memory_heap_count as usize).min(properties.memory_heaps.len());
    Some(
        properties.memory_heaps[..count]
            .iter()
            .filter(|heap| heap.flags.as_raw() & DEVICE_LOCAL != 0)
            .map(|heap| heap.size)
            .sum(),
    )
}

impl Backend for WgpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Wgpu
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        WgpuBackend::devices(self)
    }

    fn prepare(&self, device: usize, spec: &KernelSpec) -> Result<(), BackendError> {
        self.prepare_kernel(device, spec)
            .map_err(|err| backend_error(err, spec))
    }

    /// No persistent kernel (rule 4): a host thread on the rings that
    /// dispatches one micro-batch at a time.
    fn launch(
        &self,
        device: usize,
        spec: KernelSpec,
        config: &KernelConfig,
    ) -> Result<Box<dyn PersistentKernel>, BackendError> {
        self.launch_ring(device, spec, config)
            .map(|kernel| Box::new(kernel) as Box<dyn PersistentKernel>)
    }

    fn run_batch(
        &self,
        device: usize,
        spec: &KernelSpec,
        request: &[u8],
    ) -> Result<Vec<u8>, BackendError> {
        // Shape errors first, typed, before any device call.
        batch_output_len(spec, request)?;
        WgpuBackend::run_batch(self, device, spec, request).map_err(|err| backend_error(err, spec))
    }

    fn alloc_resident(
        &self,
        device: usize,
        len: usize,
    ) -> Result<Box<dyn DeviceBuffer>, BackendError> {
        let gpu = self.gpu(device).map_err(device_error)?;
        Ok(Box::new(
            WgpuBuffer::new(gpu, device, len).map_err(device_error)?,
        ))
    }

    fn write_resident(
        &self,
        buffer: &dyn DeviceBuffer,
        offset: usize,
        data: &[u8],
    ) -> Result<(), BackendError> {
        resident::write(self, buffer, offset, data)
    }

    fn read_resident(
        &self,
        buffer: &dyn DeviceBuffer,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, BackendError> {
        resident::read(self, buffer, offset, len)
    }

    fn run_batch_parts(
        &self,
        device: usize,
        spec: &KernelSpec,
        parts: &[BatchPart<'_>],
        output: BatchOutput<'_>,
    ) -> Result<Vec<u8>, BackendError> {
        resident::run_batch_parts(self, device, spec, parts, output)
    }
}

/// A wgpu error as the backend trait reports it.
pub(crate) fn backend_error(err: WgpuError, spec: &KernelSpec) -> BackendError {
    match err {
        WgpuError::Build { log } => BackendError::Build {
            kernel: spec.id,
            log,
        },
        WgpuError::NoSource => BackendError::Unsupported {
            kernel: spec.id,
            backend: BackendKind::Wgpu,
        },
        other => device_error(other),
    }
}

/// A wgpu error outside any kernel.
pub(crate) fn device_error(err: WgpuError) -> BackendError {
    match err {
        WgpuError::Unavailable(why) => BackendError::Unavailable(why),
        WgpuError::UnknownDevice(index) => BackendError::UnknownDevice(index),
        WgpuError::BadInput(why) => BackendError::BadBuffer(why),
        other => BackendError::Device(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::{Identity, Listed, MemorySource, device_memory, opened_elsewhere};
    use wgpu::Backend::{Dx12, Vulkan};

    fn gpu(bus: &str) -> Identity {
        Identity {
            vendor: 0x10de,
            device: 0x2330,
            kind: wgpu::DeviceType::DiscreteGpu,
            name: "NVIDIA H100".into(),
            bus: bus.into(),
        }
    }

    /// Discovery's choices for adapters listed in order, each opening
    /// unless `fails` says it does not: which are skipped as opened via
    /// another API.
    fn discover(adapters: &[(&str, wgpu::Backend, bool)]) -> Vec<Option<wgpu::Backend>> {
        let mut listed = Vec::new();
        adapters
            .iter()
            .map(|&(bus, api, fails)| {
                let elsewhere = opened_elsewhere(&listed, &gpu(bus), api);
                listed.push(Listed {
                    identity: gpu(bus),
                    api,
                    opened: elsewhere.is_none() && !fails,
                });
                elsewhere
            })
            .collect()
    }

    /// Rule 1: identical GPUs are each a device; one GPU listed by two
    /// APIs is one, matched by bus or, without one, by order; one that
    /// did not open through the first API is tried through the second.
    #[test]
    fn identical_gpus_are_each_opened_and_a_second_api_listing_is_not() {
        for buses in [["0:1", "0:2", "0:3", "0:4"], [""; 4]] {
            // Four identical GPUs under one API: each opened.
            let one_api: Vec<_> = buses.iter().map(|bus| (*bus, Vulkan, false)).collect();
            assert_eq!(discover(&one_api), vec![None; 4], "{buses:?}");
            // The same four again under DX12, the second of which did not
            // open through Vulkan: only it is tried again.
            let mut two_apis: Vec<_> = buses
                .iter()
                .enumerate()
                .map(|(n, bus)| (*bus, Vulkan, n == 1))
                .collect();
            two_apis.extend(buses.iter().map(|bus| (*bus, Dx12, false)));
            let mut want = vec![None; 4];
            want.extend([Some(Vulkan), None, Some(Vulkan), Some(Vulkan)]);
            assert_eq!(discover(&two_apis), want, "{buses:?}");
        }
        // Vulkan gives buses, DX12 none: matched by order.
        assert_eq!(
            discover(&[
                ("0:1", Vulkan, false),
                ("0:2", Vulkan, false),
                ("", Dx12, false),
                ("", Dx12, false),
                ("", Dx12, false),
            ]),
            vec![None, None, Some(Vulkan), Some(Vulkan), None]
        );
        // Both give buses: another bus is another device, whatever the
        // order.
        assert_eq!(
            discover(&[
                ("0:1", Vulkan, false),
                ("0:9", Dx12, false),
                ("0:1", Dx12, false)
            ]),
            vec![None, None, Some(Vulkan)]
        );
    }

    #[test]
    fn a_reported_figure_wins_and_none_takes_the_configured_share() {
        assert_eq!(
            device_memory(Some(8 << 30), 64 << 30, 0.5),
            (8 << 30, MemorySource::Reported)
        );
        for unreported in [None, Some(0)] {
            assert_eq!(
                device_memory(unreported, 64 << 30, 0.25),
                (16 << 30, MemorySource::HostShare)
            );
        }
    }
}
