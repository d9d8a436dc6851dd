//! The bridge: the async API that grains call to run kernels.
//!
//! `bridge.execute(kernel_id, input).await` picks a route and a device:
//!
//! 1. **Catalog.** The kernel must be registered (specs are registered once,
//!    when the bridge is built). One id may be registered in several
//!    versions side by side, each with its own persistent kernels; a call
//!    names a version ([`GpuBridge::execute_version`], a typed handle of
//!    that version) or takes the latest. The same id and version twice is
//!    a build error.
//! 2. **Route.** A request that fits a ring slot, and whose answer fits one,
//!    goes to a persistent kernel. A larger one takes the launch-per-batch
//!    path. Anything beyond the kernel's batch shape is `TooLarge`, and a
//!    length the kernel cannot take is `WrongShape`, before any device is
//!    touched.
//! 3. **Device.** Among the primary backends' devices that have the kernel
//!    and are healthy, the broker picks the one with the most free memory
//!    per request in flight. The kernel is built and launched there on its
//!    first request (lazily, once per kernel and device; a failed build is
//!    remembered, not retried on every call). The launch reserves the
//!    kernel's rings in the broker, kept for its life; memory that
//!    requests hold is waited for, up to `overload_timeout` from the
//!    caller's start, as a batch waits (rule 6). A device still busy then,
//!    or whose memory resident buffers and rings keep, is not remembered
//!    as failed: this call goes elsewhere (rule 4), and a later one
//!    launches again. Only rings larger than the device are for good.
//! 4. **Fallback.** When no device can run the kernel (it failed to build,
//!    its device failed or was busy at its launch, or it has no source for
//!    any device), the request
//!    runs on the CPU backend if the kernel has a CPU implementation and
//!    the policy is [`FallbackPolicy::Cpu`]. Each fallback is counted
//!    (`granary_gpu_fallbacks_total`) and logged at debug level; the device
//!    failure that caused it is logged once, as a warning.
//! 5. **Ring path.** See `bridge/instance.rs` for slots, request ids,
//!    micro-batching, groups, completions, spinning callers, hang
//!    detection and stopping, and `bridge/slots.rs` for how an answer
//!    reaches its caller. [`GpuBridge::execute_many`] sends its ring-sized
//!    requests as groups of at most the ring's capacity; typed handles
//!    (`bridge/typed.rs`) take the same routes.
//! 6. **Batch path.** The request's input and output bytes are reserved on
//!    the device in the broker first (so it never overcommits; a caller
//!    waits up to `overload_timeout` for memory, then `Overloaded`; an
//!    abandoning shutdown ends the wait with `ShutDown`, a draining one
//!    lets it run on; only a request larger than what resident buffers and
//!    rings leave on every device that runs the kernel falls back or is
//!    refused with `NoDevice`), the input is copied into a staging buffer
//!    rented from the bridge's
//!    [memory pool](crate::pool), and the backend runs the kernel on a
//!    blocking thread.
//! 7. **Resident buffers.** Device memory a caller keeps across calls,
//!    reserved in the broker for as long as it lives; batches may take
//!    their request from it and write their response into it, so only the
//!    host parts cross the bus (`bridge/resident.rs`). A holder may be
//!    held to a quota of such memory (`bridge/quota.rs`).
//! 8. **Health.** [`GpuBridge::kernel_health`] snapshots every launched
//!    persistent kernel (heartbeat age, ring occupancy, hangs, relaunches,
//!    whether its relaunch failed); [`GpuBridge::probe`] sends each idle
//!    one a probe request, checks each busy one's heartbeat, and says which
//!    answered within a bound (`bridge/instance.rs` rule 6). Kernels not
//!    launched yet (no request has needed them), and those whose first
//!    launch failed (their requests take the CPU fallback, counted), are
//!    neither listed nor probed.
//!
//! Every request runs in a `granary_gpu.execute` tracing span at debug
//! level. Metrics: `granary_gpu_requests_total`,
//! `granary_gpu_failures_total` (by reason), `granary_gpu_request_seconds`,
//! `granary_gpu_queue_depth`, `granary_gpu_fallbacks_total`,
//! `granary_gpu_device_memory_used_bytes` /
//! `_free_bytes`, and the batch path's staging pool:
//! `granary_gpu_pool_hits_total`, `_misses_total`, `_cached_bytes`. Install a `metrics` recorder before building the bridge:
//! instances register their handles when they launch.

mod config;
mod error;
mod instance;
mod many;
mod quota;
mod resident;
mod slots;
#[cfg(target_endian = "little")]
mod typed;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use granary_kernels::{
    Backend, BackendError, BackendKind, CpuBackend, DeviceInfo, KernelSpec, StagedInput, Status,
    StopMode, batch_output_len,
};
use granary_ring::RingConfig;
use tokio::sync::OnceCell;
use tracing::Instrument;

pub use config::{BridgeConfig, FallbackPolicy};
pub use error::{BuildError, ExecuteError};
pub use instance::{InstanceHealth, ProbeAnswer};
use instance::{KernelInstance, Launcher, record_failure, record_failure_labelled};
pub use many::{ManyAnswers, ManyAnswersIntoIter, ManyAnswersIter};
pub use quota::ResidentQuota;
pub use resident::{
    Output, Part, RelocateError, Relocated, ResidentBuffer, ResidentError, WeakResidentBuffer,
};
use slots::Owner;
#[cfg(target_endian = "little")]
pub use typed::{Element, Kernel, TypedKernel, shipped};

use crate::broker::{BrokerError, DeviceBroker, DeviceId, DeviceStats, Requirements, Reservation};
use crate::pool::{HostAllocator, MemoryPool, PoolConfig, PoolStats, Rented};

/// One kernel's answer to [`GpuBridge::probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelProbe {
    /// The kernel's health after the probe.
    pub health: InstanceHealth,
    /// How the kernel showed it answers, or why it did not in time.
    pub answered: Result<ProbeAnswer, String>,
}

/// A device and the backend that drives it.
struct DeviceSlot {
    backend: Arc<dyn Backend>,
    /// Index among its backend's devices.
    index: usize,
    info: DeviceInfo,
    /// Routed to first; the CPU backend is primary only when no other
    /// backend was given.
    primary: bool,
}

/// A launched (or failed) kernel instance.
type InstanceCell = OnceCell<Result<Arc<KernelInstance>, BackendError>>;

struct Shared {
    kernels: Vec<KernelSpec>,
    /// Each id's kernels, oldest version first (rule 1).
    by_id: HashMap<&'static str, Vec<usize>>,
    devices: Vec<DeviceSlot>,
    /// The CPU backend's device: the fallback.
    cpu: DeviceId,
    broker: DeviceBroker,
    /// `kernels.len() × devices.len()`, kernel-major.
    instances: Box<[InstanceCell]>,
    config: BridgeConfig,
    shut_down: AtomicBool,
    /// First launches under way (`launch_once`): a shutdown waits for
    /// them, so that it finds and stops what they launch.
    launching: std::sync::atomic::AtomicUsize,
    /// First launches and batches waiting for device memory now
    /// (`wait_for_memory`; [`GpuBridge::waiting_for_memory`]).
    memory_waiters: std::sync::atomic::AtomicUsize,
    /// The first shutdown's mode (`MODE_DRAIN` or `MODE_ABANDON`; `0`
    /// before any), set once before `shut_down`: every kernel is stopped
    /// that way, by a later shutdown, a caller that sees the flag
    /// (`checked`) or a late launch alike, so a `Drain` still answers what
    /// was accepted.
    stop_mode: std::sync::atomic::AtomicU8,
    /// Requests that fell back to the CPU backend (rule 4).
    fallbacks: std::sync::atomic::AtomicU64,
    /// Host staging buffers for the batch path.
    staging: MemoryPool<HostAllocator>,
}

impl Drop for Shared {
    /// The last handle gone: every kernel is told to stop. Their threads
    /// exit on their own; nothing blocks here, which may be inside a
    /// runtime.
    fn drop(&mut self) {
        for instance in self
            .instances
            .iter()
            .filter_map(|cell| cell.get()?.as_ref().ok())
        {
            instance.request_stop(StopMode::Abandon);
        }
    }
}

/// The node's GPU bridge. Cheap to clone; every clone is the same bridge.
#[derive(Clone)]
pub struct GpuBridge {
    shared: Arc<Shared>,
}

impl fmt::Debug for GpuBridge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuBridge")
            .field("kernels", &self.shared.by_id.keys().collect::<Vec<_>>())
            .field("devices", &self.shared.broker)
            .finish_non_exhaustive()
    }
}

/// Builds a [`GpuBridge`].
pub struct BridgeBuilder {
    backends: Vec<Arc<dyn Backend>>,
    cpu: CpuBackend,
    kernels: Vec<KernelSpec>,
    config: BridgeConfig,
    /// The most memory the broker lends per device, if capped.
    memory_limit: Option<u64>,
}

impl Default for BridgeBuilder {
    fn default() -> BridgeBuilder {
        BridgeBuilder::new()
    }
}

impl fmt::Debug for BridgeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BridgeBuilder")
            .field("kernels", &self.kernels.len())
            .field("backends", &self.backends.len())
            .finish_non_exhaustive()
    }
}

impl BridgeBuilder {
    /// A bridge with only the CPU backend and no kernels.
    pub fn new() -> BridgeBuilder {
        BridgeBuilder {
            backends: Vec::new(),
            cpu: CpuBackend::new(),
            kernels: Vec::new(),
            config: BridgeConfig::default(),
            memory_limit: None,
        }
    }

    /// Adds a device backend (OpenCL, CUDA). Its devices are routed to
    /// before the CPU backend, which then serves as the fallback.
    pub fn backend(mut self, backend: Arc<dyn Backend>) -> BridgeBuilder {
        self.backends.push(backend);
        self
    }

    /// Replaces the CPU backend (for example one reporting a memory limit).
    pub fn cpu_backend(mut self, cpu: CpuBackend) -> BridgeBuilder {
        self.cpu = cpu;
        self
    }

    /// Registers a kernel.
    pub fn kernel(mut self, spec: KernelSpec) -> BridgeBuilder {
        self.kernels.push(spec);
        self
    }

    /// Registers several kernels.
    pub fn kernels(mut self, specs: impl IntoIterator<Item = KernelSpec>) -> BridgeBuilder {
        self.kernels.extend(specs);
        self
    }

    /// Caps the memory the broker lends on each device (every backend's,
    /// the CPU's too) at `bytes`: the device then reports at most that
    /// much, total and free, to reservations and to placement. For
    /// processes that share a device, each with its own share.
    pub fn device_memory_limit(mut self, bytes: u64) -> BridgeBuilder {
        self.memory_limit = Some(bytes);
        self
    }

    /// Sets the configuration.
    pub fn config(mut self, config: BridgeConfig) -> BridgeBuilder {
        self.config = config;
        self
    }

    /// Builds the bridge. Nothing is compiled or launched yet.
    pub fn build(self) -> Result<GpuBridge, BuildError> {
        self.config.validate().map_err(BuildError::InvalidConfig)?;
        let mut by_id: HashMap<&'static str, Vec<usize>> = HashMap::new();
        for (position, spec) in self.kernels.iter().enumerate() {
            let versions = by_id.entry(spec.id).or_default();
            if versions
                .iter()
                .any(|&other| self.kernels[other].version == spec.version)
            {
                return Err(BuildError::DuplicateKernel {
                    id: spec.id,
                    version: spec.version,
                });
            }
            versions.push(position);
        }
        for versions in by_id.values_mut() {
            versions.sort_by_key(|&position| self.kernels[position].version);
        }
        let cpu_primary = self.backends.is_empty();
        let limit = |mut info: DeviceInfo| {
            if let Some(limit) = self.memory_limit {
                info.total_memory = info.total_memory.min(limit);
                info.free_memory = info.free_memory.min(limit);
            }
            info
        };
        let mut devices = Vec::new();
        for backend in self.backends {
            for (index, info) in backend.devices().into_iter().map(limit).enumerate() {
                devices.push(DeviceSlot {
                    backend: backend.clone(),
                    index,
                    info,
                    primary: true,
                });
            }
        }
        let cpu = DeviceId(devices.len());
        let cpu_backend: Arc<dyn Backend> = Arc::new(self.cpu);
        for (index, info) in cpu_backend.devices().into_iter().map(limit).enumerate() {
            devices.push(DeviceSlot {
                backend: cpu_backend.clone(),
                index,
                info,
                primary: cpu_primary,
            });
        }
        let broker = DeviceBroker::new(devices.iter().map(|d| d.info.clone()).collect());
        let instances = (0..self.kernels.len() * devices.len())
            .map(|_| OnceCell::new())
            .collect();
        let bridge = GpuBridge {
            shared: Arc::new(Shared {
                kernels: self.kernels,
                by_id,
                devices,
                cpu,
                broker,
                instances,
                config: self.config,
                shut_down: AtomicBool::new(false),
                launching: std::sync::atomic::AtomicUsize::new(0),
                memory_waiters: std::sync::atomic::AtomicUsize::new(0),
                stop_mode: std::sync::atomic::AtomicU8::new(0),
                fallbacks: std::sync::atomic::AtomicU64::new(0),
                staging: MemoryPool::new(HostAllocator, PoolConfig::default())
                    .map_err(|err| BuildError::InvalidConfig(err.to_string()))?,
            }),
        };
        for id in 0..bridge.shared.devices.len() {
            bridge.report_memory(DeviceId(id));
        }
        // The pool's series exist (at zero) before the first batch.
        bridge.report_pool();
        Ok(bridge)
    }
}

/// Batch inputs at least this large are staged with the tokio worker
/// handed over to other tasks (`block_in_place`): about 100 µs of copying.
const BLOCKING_STAGE_BYTES: usize = 1 << 20;

/// A batch input on its way to the backend.
enum Staged {
    /// In the backend's staging memory.
    Backend(StagedInput),
    /// In a buffer from the bridge's pool.
    Pool(Rented<HostAllocator>),
}

impl Staged {
    fn bytes(&self) -> &[u8] {
        match self {
            Staged::Backend(staged) => (**staged).as_ref(),
            Staged::Pool(rented) => rented.as_slice(),
        }
    }
}

/// Why a wait for a device's memory ended without it
/// (`GpuBridge::wait_for_memory`).
enum NoMemory {
    /// `overload_timeout` passed with the memory still lent to other
    /// requests; `available` was unreserved at the last try.
    TimedOut { available: u64 },
    /// The bridge shut down while the caller waited.
    ShutDown,
    /// The broker refused for another reason (an unknown device).
    Broker(BrokerError),
}

/// Where a request goes.
enum Route {
    Ring,
    Batch { output_len: usize },
}

impl GpuBridge {
    /// A builder.
    pub fn builder() -> BridgeBuilder {
        BridgeBuilder::new()
    }

    /// The registered kernels.
    pub fn kernels(&self) -> impl Iterator<Item = &KernelSpec> {
        self.shared.kernels.iter()
    }

    /// The device broker: devices, reservations and per-device stats.
    pub fn broker(&self) -> &DeviceBroker {
        &self.shared.broker
    }

    /// Every device with its counters.
    pub fn devices(&self) -> Vec<(DeviceId, DeviceInfo, DeviceStats)> {
        self.shared
            .devices
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| {
                let id = DeviceId(i);
                let stats = self.shared.broker.stats(id).ok()?;
                Some((id, slot.info.clone(), stats))
            })
            .collect()
    }

    /// Requests that fell back to the CPU backend because no device could
    /// run them (rule 4), since the bridge was built.
    pub fn fallbacks(&self) -> u64 {
        self.shared.fallbacks.load(Ordering::Relaxed)
    }

    /// First launches (rule 3; one however many callers wait on it) and
    /// batches (rule 6) waiting now for device memory lent to other
    /// requests. Each leaves the count once it reserves its memory, times
    /// out, is ended by a shutdown or a broker error, or when its caller
    /// stops waiting. Resident buffers waiting for memory
    /// (`bridge/resident.rs` rule 1) are not counted. A wait counted here
    /// sees any later shutdown at its next try (every millisecond).
    pub fn waiting_for_memory(&self) -> usize {
        self.shared.memory_waiters.load(Ordering::Acquire)
    }

    /// Every launched persistent kernel's health, in kernel then device
    /// order (rule 8).
    pub fn kernel_health(&self) -> Vec<InstanceHealth> {
        self.launched().map(|instance| instance.health()).collect()
    }

    /// Checks every launched persistent kernel at once, waiting at most
    /// `timeout` for each (rule 8): an idle one is sent a probe request, a
    /// busy one answers by its heartbeat. Each kernel's health, with how it
    /// answered or why it did not.
    pub async fn probe(&self, timeout: std::time::Duration) -> Vec<KernelProbe> {
        let probes = self.launched().map(|instance| async move {
            let answered = instance.probe(timeout).await;
            KernelProbe {
                health: instance.health(),
                answered,
            }
        });
        futures_util::future::join_all(probes).await
    }

    fn launched(&self) -> impl Iterator<Item = &Arc<KernelInstance>> {
        self.shared
            .instances
            .iter()
            .filter_map(|cell| cell.get()?.as_ref().ok())
    }

    /// Runs kernel `kernel_id`, in exactly `version`, on `input` and returns
    /// its response (`UnknownVersion` if that version is not registered).
    pub async fn execute_version(
        &self,
        kernel_id: &str,
        version: u32,
        input: &[u8],
    ) -> Result<Vec<u8>, ExecuteError> {
        let span = tracing::debug_span!(
            "granary_gpu.execute",
            kernel = kernel_id,
            version,
            bytes = input.len()
        );
        async {
            let (kernel, spec) = self
                .lookup_version(kernel_id, version)
                .map_err(|err| refused("unknown", err))?;
            self.run_one(kernel, &spec, input, |answer| answer.map(<[u8]>::to_vec))
                .await
        }
        .instrument(span)
        .await
    }

    /// Runs kernel `kernel_id` (its latest version) on `input` and returns
    /// its response.
    pub async fn execute(&self, kernel_id: &str, input: &[u8]) -> Result<Vec<u8>, ExecuteError> {
        let span = tracing::debug_span!(
            "granary_gpu.execute",
            kernel = kernel_id,
            bytes = input.len()
        );
        self.execute_inner(kernel_id, input).instrument(span).await
    }

    async fn execute_inner(&self, kernel_id: &str, input: &[u8]) -> Result<Vec<u8>, ExecuteError> {
        let (kernel, spec) = self
            .lookup(kernel_id)
            .map_err(|err| refused("unknown", err))?;
        self.run_one(kernel, &spec, input, |answer| answer.map(<[u8]>::to_vec))
            .await
    }

    /// Rules 2–6 for one request: routes it, runs it, and gives its answer
    /// to `take` (straight from its slot, on the ring path).
    pub(crate) async fn run_one<T>(
        &self,
        kernel: usize,
        spec: &KernelSpec,
        input: &[u8],
        take: impl FnOnce(Result<&[u8], ExecuteError>) -> Result<T, ExecuteError>,
    ) -> Result<T, ExecuteError> {
        let route = self
            .route(spec, input)
            .map_err(|err| refused(spec.id, err))?;
        match route {
            Route::Ring => {
                let instance = self
                    .instance_for(kernel, spec)
                    .await
                    .map_err(|err| refused(spec.id, err))?;
                let answer = instance
                    .send(input)
                    .await
                    .map_err(|err| refused(spec.id, err))?;
                // Failures from here on are counted where they happen.
                answer.take(take).await
            }
            Route::Batch { output_len } => {
                let bytes = self.run_batch(spec, input, output_len).await?;
                take(Ok(&bytes))
            }
        }
    }

    /// Runs kernel `kernel_id` (its latest version) on every input; the
    /// answers come back in input order, each its own `Result`, their bytes
    /// in one buffer ([`ManyAnswers`]). Ring-sized inputs go to one
    /// persistent kernel as a group (`bridge/instance.rs` rule 9): their
    /// slots taken together, one ring claim, written straight from the
    /// slices, and one wake-up when the last is answered. Larger inputs
    /// take the batch path, one after another. Dropping the future gives
    /// every slot back (answers still owed free theirs as they land).
    pub async fn execute_many<I: AsRef<[u8]>>(&self, kernel_id: &str, inputs: &[I]) -> ManyAnswers {
        let span = tracing::debug_span!(
            "granary_gpu.execute_many",
            kernel = kernel_id,
            requests = inputs.len()
        );
        self.execute_many_inner(kernel_id, inputs)
            .instrument(span)
            .await
    }

    async fn execute_many_inner<I: AsRef<[u8]>>(
        &self,
        kernel_id: &str,
        inputs: &[I],
    ) -> ManyAnswers {
        match self.lookup(kernel_id) {
            Ok((kernel, spec)) => {
                // Room for the ring answers as long as their inputs: exact
                // for element-wise kernels, a first guess for the rest (the
                // buffer grows). Only ring-sized inputs count, so a refused
                // or batch-sized one reserves nothing here.
                let ring_bytes = inputs
                    .iter()
                    .map(AsRef::as_ref)
                    .filter(|input| spec.fits_ring(input))
                    .fold(0usize, |sum, input| sum.saturating_add(input.len()));
                let mut answers = ManyAnswers::with_capacity(inputs.len(), ring_bytes);
                self.run_many(kernel, &spec, inputs, |answer| answers.push(answer))
                    .await;
                answers
            }
            Err(err) => {
                let mut answers = ManyAnswers::with_capacity(inputs.len(), 0);
                for _ in inputs {
                    answers.push(Err(refused("unknown", err.clone())));
                }
                answers
            }
        }
    }

    /// Rule 5 for a group: routes every input, sends the ring-sized ones
    /// as groups of at most the ring's capacity, runs the rest on the batch
    /// path, and gives each request's outcome (its answer, or its error)
    /// to `take`, once per input and in input order.
    pub(crate) async fn run_many<I: AsRef<[u8]>>(
        &self,
        kernel: usize,
        spec: &KernelSpec,
        inputs: &[I],
        mut take: impl FnMut(Result<&[u8], ExecuteError>),
    ) {
        enum Entry {
            Ring,
            Done(ExecuteError),
            Batch(usize),
        }
        let entries: Vec<Entry> = inputs
            .iter()
            .map(|input| match self.route(spec, input.as_ref()) {
                Ok(Route::Ring) => Entry::Ring,
                Ok(Route::Batch { output_len }) => Entry::Batch(output_len),
                Err(err) => Entry::Done(refused(spec.id, err)),
            })
            .collect();
        let ring: Vec<&[u8]> = inputs
            .iter()
            .zip(&entries)
            .filter(|(_, entry)| matches!(entry, Entry::Ring))
            .map(|(input, _)| input.as_ref())
            .collect();
        let instance = if ring.is_empty() {
            Ok(None)
        } else {
            self.instance_for(kernel, spec).await.map(Some)
        };
        // Every chunk's group, kept until its answers are taken in input
        // order below (a group's slots are free as soon as its answers
        // land).
        let mut groups = Vec::new();
        if let Ok(Some(instance)) = &instance {
            for chunk in ring.chunks(instance.capacity()) {
                let answer_bytes = chunk.iter().map(|input| input.len()).sum();
                let group = Arc::new(slots::Group::new(chunk.len(), answer_bytes));
                instance.send_many(chunk, &group).await;
                let spin = instance.spin_budget_for(chunk.len());
                if !spin.is_zero() {
                    // A group's slots are free once its answers land.
                    instance.spin_wait(spin, 0, &|| group.is_done());
                }
                std::future::poll_fn(|cx| {
                    let done = group.poll_done(cx);
                    // Its last answer may be among those it lands while it
                    // parks: then it looks once more (the landing woke the
                    // task too, for one idle poll later).
                    if done.is_pending() && instance.parking() {
                        return group.poll_done(cx);
                    }
                    done
                })
                .await;
                groups.push((group, chunk.len()));
            }
        }
        // The ring answers, group by group and member by member, each
        // group's taken out of it at once.
        let mut answers: Vec<slots::GroupAnswers> =
            groups.iter().map(|(group, _)| group.answers()).collect();
        let mut members = groups
            .iter()
            .enumerate()
            .flat_map(|(index, (_, len))| (0..*len).map(move |member| (index, member)));
        for (entry, input) in entries.into_iter().zip(inputs) {
            match entry {
                Entry::Done(err) => take(Err(err)),
                Entry::Ring => match (&instance, members.next()) {
                    (Err(err), _) => take(Err(refused(spec.id, err.clone()))),
                    (Ok(_), Some((index, member))) => match answers.get_mut(index) {
                        Some(group) => group.take(member, &mut take),
                        // Cannot happen: one set of answers per group.
                        None => take(Err(ExecuteError::ShutDown)),
                    },
                    (Ok(_), None) => take(Err(ExecuteError::ShutDown)),
                },
                Entry::Batch(output_len) => {
                    match self.run_batch(spec, input.as_ref(), output_len).await {
                        Ok(bytes) => take(Ok(&bytes)),
                        Err(err) => take(Err(err)),
                    }
                }
            }
        }
    }

    /// Stops every kernel: `Drain` answers every request already accepted,
    /// `Abandon` fails the ones not yet answered with `ShutDown`. Requests
    /// made afterwards fail with `ShutDown`. A kernel's first launch still
    /// under way (its caller may have gone) is waited for, up to
    /// `stop_timeout`, and stopped too, in the same mode (one that ends
    /// later stops its kernel itself); none starts afterwards. The first
    /// shutdown's mode holds for every kernel: a later call waits as this
    /// one does, but does not change it. Returns once every kernel's
    /// thread has exited (or been given up on after `stop_timeout`): about
    /// twice `stop_timeout`, plus a hung kernel's relaunch if one is under
    /// way then (the completion thread sees the stop after it).
    pub async fn shutdown(&self, mode: StopMode) {
        // SeqCst, with `launch_once`'s count and check: a launch either
        // sees the flag and launches nothing, or is counted here and
        // waited for (a launch runs on its own task, caller or not).
        // The wait is bounded as the joins are (a driver that hangs in a
        // launch must not hang the shutdown); a launch that ends later
        // stops what it launched itself (`launch_once`).
        let code = match mode {
            StopMode::Drain => MODE_DRAIN,
            StopMode::Abandon => MODE_ABANDON,
        };
        let _ = self
            .shared
            .stop_mode
            .compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst);
        self.shared.shut_down.store(true, Ordering::SeqCst);
        let mode = self.shutdown_mode();
        let waited = Instant::now();
        while self.shared.launching.load(Ordering::SeqCst) > 0
            && waited.elapsed() < self.shared.config.stop_timeout
        {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let instances: Vec<Arc<KernelInstance>> = self
            .shared
            .instances
            .iter()
            .filter_map(|cell| cell.get()?.as_ref().ok().cloned())
            .collect();
        for instance in &instances {
            instance.request_stop(mode);
        }
        let joined = tokio::task::spawn_blocking(move || {
            for instance in instances {
                instance.join();
            }
        });
        if joined.await.is_err() {
            tracing::error!("a kernel's completion thread panicked during shutdown");
        }
    }

    fn lookup(&self, kernel_id: &str) -> Result<(usize, KernelSpec), ExecuteError> {
        if self.shared.shut_down.load(Ordering::Acquire) {
            return Err(ExecuteError::ShutDown);
        }
        match self
            .shared
            .by_id
            .get(kernel_id)
            .and_then(|versions| versions.last())
        {
            Some(&kernel) => Ok((kernel, self.shared.kernels[kernel])),
            None => Err(ExecuteError::UnknownKernel(kernel_id.to_string())),
        }
    }

    /// Rule 1: kernel `kernel_id` in exactly `version`.
    pub(crate) fn lookup_version(
        &self,
        kernel_id: &str,
        version: u32,
    ) -> Result<(usize, KernelSpec), ExecuteError> {
        if self.shared.shut_down.load(Ordering::Acquire) {
            return Err(ExecuteError::ShutDown);
        }
        let Some(versions) = self.shared.by_id.get(kernel_id) else {
            return Err(ExecuteError::UnknownKernel(kernel_id.to_string()));
        };
        versions
            .iter()
            .map(|&kernel| (kernel, self.shared.kernels[kernel]))
            .find(|(_, spec)| spec.version == version)
            .ok_or_else(|| ExecuteError::UnknownVersion {
                kernel: self.shared.kernels[versions[0]].id,
                version,
                registered: versions
                    .iter()
                    .map(|&kernel| self.shared.kernels[kernel].version)
                    .collect(),
            })
    }

    /// The versions registered under `kernel_id`, oldest first (empty if
    /// none is).
    pub fn versions(&self, kernel_id: &str) -> Vec<u32> {
        self.shared
            .by_id
            .get(kernel_id)
            .map(|versions| {
                versions
                    .iter()
                    .map(|&kernel| self.shared.kernels[kernel].version)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether calls are refused because the bridge was shut down.
    pub(crate) fn is_shut_down(&self) -> bool {
        self.shared.shut_down.load(Ordering::Acquire)
    }

    /// Rule 2 of the module docs.
    fn route(&self, spec: &KernelSpec, input: &[u8]) -> Result<Route, ExecuteError> {
        let kernel = spec.id;
        if spec.fits_ring(input) {
            return Ok(Route::Ring);
        }
        let max = spec.batch_request.max_bytes();
        if input.len() > max {
            return Err(ExecuteError::TooLarge {
                kernel,
                len: input.len(),
                max,
            });
        }
        match batch_output_len(spec, input) {
            Ok(output_len) => Ok(Route::Batch { output_len }),
            Err(BackendError::WrongShape(error)) => Err(ExecuteError::WrongShape { kernel, error }),
            Err(BackendError::Rejected(status)) => Err(ExecuteError::Rejected { kernel, status }),
            Err(other) => Err(ExecuteError::DeviceFailed {
                kernel,
                backend: BackendKind::Cpu,
                reason: other.to_string(),
            }),
        }
    }

    fn cell(&self, kernel: usize, device: DeviceId) -> &InstanceCell {
        &self.shared.instances[kernel * self.shared.devices.len() + device.0]
    }

    /// Whether `device` can run `spec`'s persistent kernel now.
    fn usable(&self, kernel: usize, spec: &KernelSpec, device: DeviceId) -> bool {
        let slot = &self.shared.devices[device.0];
        slot.primary
            && supports(slot.backend.kind(), spec)
            && match self.cell(kernel, device).get() {
                None => true,
                Some(Ok(instance)) => !instance.is_failed(),
                Some(Err(_)) => false,
            }
    }

    /// Rules 3 and 4: the instance that serves this request.
    async fn instance_for(
        &self,
        kernel: usize,
        spec: &KernelSpec,
    ) -> Result<Arc<KernelInstance>, ExecuteError> {
        // A first launch waits for ring memory up to `overload_timeout`
        // from here, over every device it tries (rule 3).
        let since = Instant::now();
        // A device busy at its launch (`NoCapacity`: no ring memory after
        // the wait, or no room the backend gives persistent kernels) is
        // an overload, worth a later try; anything else failed.
        let failed = |backend: BackendKind, err: BackendError| match err {
            BackendError::NoCapacity(_) => ExecuteError::Overloaded {
                kernel: spec.id,
                waited: since.elapsed(),
            },
            err => execute_error(spec, backend, err),
        };
        let mut cause = None;
        let need = Requirements::default();
        // Each device is tried at most once per call.
        let mut tried = Vec::new();
        while let Some(device) = self.shared.broker.select_where(&need, |id| {
            !tried.contains(&id) && self.usable(kernel, spec, id)
        }) {
            tried.push(device);
            match self.instance(kernel, spec, device, since).await {
                Ok(instance) => return Ok(instance),
                Err(_) if self.shared.shut_down.load(Ordering::Acquire) => {
                    return Err(ExecuteError::ShutDown);
                }
                Err(err) => cause = Some((device, err)),
            }
        }
        if cause.is_none() {
            cause = self.remembered_failure(kernel, spec);
        }
        let cpu = self.shared.cpu;
        if self.shared.devices[cpu.0].primary {
            return match cause {
                Some((_, err)) => Err(failed(BackendKind::Cpu, err)),
                None => Err(ExecuteError::NoDevice { kernel: spec.id }),
            };
        }
        let from = cause
            .as_ref()
            .map(|(device, _)| self.shared.devices[device.0].backend.kind());
        if !self.may_fall_back(spec) {
            return match cause {
                Some((device, err)) => {
                    Err(failed(self.shared.devices[device.0].backend.kind(), err))
                }
                None => Err(ExecuteError::NoDevice { kernel: spec.id }),
            };
        }
        let reason = match cause {
            Some((_, BackendError::NoCapacity(_))) => "device busy",
            _ => "no usable device",
        };
        self.count_fallback(spec, from, reason);
        self.instance(kernel, spec, cpu, since)
            .await
            .map_err(|err| failed(BackendKind::Cpu, err))
    }

    /// Why no device can run `spec`'s persistent kernel: a launch that
    /// failed, or an instance whose relaunch failed.
    fn remembered_failure(
        &self,
        kernel: usize,
        spec: &KernelSpec,
    ) -> Option<(DeviceId, BackendError)> {
        (0..self.shared.devices.len())
            .map(DeviceId)
            .find_map(|device| {
                let slot = &self.shared.devices[device.0];
                if !slot.primary || !supports(slot.backend.kind(), spec) {
                    return None;
                }
                match self.cell(kernel, device).get()? {
                    Err(err) => Some((device, err.clone())),
                    Ok(instance) if instance.is_failed() => Some((
                        device,
                        BackendError::Device("the kernel hung and could not be relaunched".into()),
                    )),
                    Ok(_) => None,
                }
            })
    }

    fn may_fall_back(&self, spec: &KernelSpec) -> bool {
        self.shared.config.fallback == FallbackPolicy::Cpu && spec.cpu.is_some()
    }

    fn count_fallback(&self, spec: &KernelSpec, from: Option<BackendKind>, reason: &'static str) {
        let from = from.map_or_else(|| "none".to_string(), |kind| format!("{kind:?}"));
        tracing::debug!(kernel = spec.id, from = %from, reason, "request falls back to the CPU backend");
        self.shared.fallbacks.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(
            "granary_gpu_fallbacks_total",
            "kernel" => spec.id,
            "from" => from,
            "reason" => reason
        )
        .increment(1);
    }

    /// The instance of `spec` on `device`, launched on first use; a
    /// launch waits for ring memory up to `overload_timeout` after `since`
    /// (when the caller began).
    ///
    /// The launch runs in a task of its own: a caller that gives up (its
    /// future dropped by a timeout) does not abandon a half-made instance,
    /// whose result still lands in the cell, where shutdown finds it.
    async fn instance(
        &self,
        kernel: usize,
        spec: &KernelSpec,
        device: DeviceId,
        since: Instant,
    ) -> Result<Arc<KernelInstance>, BackendError> {
        if let Some(result) = self.cell(kernel, device).get() {
            return self.checked(result.clone());
        }
        let bridge = self.clone();
        let spec = *spec;
        let launch =
            tokio::spawn(async move { bridge.launch_once(kernel, spec, device, since).await });
        let result = launch
            .await
            .unwrap_or_else(|err| Err(BackendError::Device(err.to_string())))?;
        self.checked(result)
    }

    /// An instance from the cell, unless a shutdown began meanwhile.
    fn checked(
        &self,
        result: Result<Arc<KernelInstance>, BackendError>,
    ) -> Result<Arc<KernelInstance>, BackendError> {
        let instance = result?;
        if self.shared.shut_down.load(Ordering::SeqCst) {
            // Launched while a shutdown began: stop it too, as the
            // shutdown does.
            instance.request_stop(self.shutdown_mode());
            return Err(BackendError::Unavailable("the bridge has shut down".into()));
        }
        Ok(instance)
    }

    /// The mode of the shutdown that began (stored before its flag).
    fn shutdown_mode(&self) -> StopMode {
        if self.shared.stop_mode.load(Ordering::SeqCst) == MODE_ABANDON {
            StopMode::Abandon
        } else {
            StopMode::Drain
        }
    }

    /// Fills the cell of `spec` on `device` once. The outer error is
    /// transient (the device is busy): not cached, so a later request tries
    /// again. The inner result, success or failed build, is cached.
    async fn launch_once(
        &self,
        kernel: usize,
        spec: KernelSpec,
        device: DeviceId,
        since: Instant,
    ) -> Result<Result<Arc<KernelInstance>, BackendError>, BackendError> {
        /// Counts a launch under way until it ends, however it ends.
        struct Launching<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Launching<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.shared.launching.fetch_add(1, Ordering::SeqCst);
        let _launching = Launching(&self.shared.launching);
        // A shutdown that began may have collected the instances already
        // (see `shutdown`): launch nothing it would not stop.
        if self.shared.shut_down.load(Ordering::SeqCst) {
            return Err(BackendError::Unavailable("the bridge has shut down".into()));
        }
        // A caller's wait for ring memory counts from its start (`since`):
        // one that waited for another caller's launch, which ran out of
        // time, does not wait as long again.
        let cell = self.cell(kernel, device);
        let result = cell
            .get_or_try_init(|| async {
                // A launch that waited for another one, which failed
                // (not cached), checks again: none starts once a
                // shutdown began.
                if self.shared.shut_down.load(Ordering::SeqCst) {
                    return Err(BackendError::Unavailable("the bridge has shut down".into()));
                }
                let slot = &self.shared.devices[device.0];
                let launcher = Launcher {
                    backend: slot.backend.clone(),
                    device_index: slot.index,
                };
                let broker = self.shared.broker.clone();
                let config = self.shared.config;
                let started = Instant::now();
                if launcher.backend.build_before_launch() {
                    // Every kernel of the catalog, before any of them runs
                    // for good (cached after the first time), and before
                    // the rings are reserved: a build may take seconds,
                    // and requests keep that memory meanwhile. A failed
                    // build is reported when that kernel is used.
                    let (backend, index) = (launcher.backend.clone(), launcher.device_index);
                    let catalog = self.shared.kernels.clone();
                    let built = tokio::task::spawn_blocking(move || {
                        for other in &catalog {
                            let _ = backend.prepare(index, other);
                        }
                    })
                    .await;
                    if let Err(err) = built {
                        return Ok(Err(BackendError::Device(err.to_string())));
                    }
                }
                // Kept for the kernel's life: never working memory.
                let rings = ring_bytes(&spec, config.kernel.capacity);
                let reservation = match self.reserve_rings(device, rings, since).await {
                    Ok(Ok(reservation)) => reservation,
                    Ok(Err(never)) => {
                        tracing::warn!(
                            kernel = spec.id,
                            device = slot.index,
                            error = %never,
                            "kernel could not be launched; requests go elsewhere"
                        );
                        return Ok(Err(never));
                    }
                    Err(busy) => {
                        tracing::debug!(
                            kernel = spec.id,
                            device = slot.index,
                            error = %busy,
                            "device busy; requests go elsewhere for now"
                        );
                        return Err(busy);
                    }
                };
                let launched = tokio::task::spawn_blocking(move || {
                    KernelInstance::start(spec, device, launcher, broker, config, Some(reservation))
                })
                .await
                .unwrap_or_else(|err| Err(BackendError::Device(err.to_string())));
                match &launched {
                    Ok(instance) => tracing::debug!(
                        kernel = spec.id,
                        backend = ?instance.backend(),
                        device = slot.index,
                        elapsed = ?started.elapsed(),
                        "kernel launched"
                    ),
                    Err(err @ BackendError::NoCapacity(_)) => tracing::debug!(
                        kernel = spec.id,
                        backend = ?slot.backend.kind(),
                        device = slot.index,
                        error = %err,
                        "device busy; requests go elsewhere for now"
                    ),
                    Err(err) => tracing::warn!(
                        kernel = spec.id,
                        backend = ?slot.backend.kind(),
                        device = slot.index,
                        error = %err,
                        "kernel could not be launched; requests go elsewhere"
                    ),
                }
                self.report_memory(device);
                match launched {
                    Err(err @ BackendError::NoCapacity(_)) => Err(err),
                    other => Ok(other),
                }
            })
            .await?;
        // A shutdown that gave up waiting for this launch (past its
        // `stop_timeout`) has not seen it: it stops itself.
        if let Ok(instance) = result {
            if self.shared.shut_down.load(Ordering::SeqCst) {
                instance.request_stop(self.shutdown_mode());
            }
        }
        Ok(result.clone())
    }

    /// Reserves `bytes` of `device` for a first launch's rings, kept for
    /// the kernel's life (rule 3). Memory that requests hold now is waited
    /// for, up to `overload_timeout` after `since` (when the caller's
    /// launch began), as a batch waits (rule 6). Like
    /// `launch_once`, the outer error is transient and not remembered:
    /// working memory still lent out when the wait ends, or rings larger
    /// than what resident buffers and other rings leave (they may be freed
    /// later). The inner one is for good: rings larger than the device.
    async fn reserve_rings(
        &self,
        device: DeviceId,
        bytes: u64,
        since: Instant,
    ) -> Result<Result<Reservation, BackendError>, BackendError> {
        let broker = &self.shared.broker;
        let device_error = |err: BrokerError| BackendError::Device(err.to_string());
        let capacity = broker.capacity(device).map_err(device_error)?;
        if bytes > capacity {
            return Ok(Err(BackendError::Device(format!(
                "the kernel's rings take {bytes} bytes, more than the {capacity} bytes the device \
                 lends"
            ))));
        }
        let room = broker.unkept(device).map_err(device_error)?;
        if bytes > room {
            return Err(BackendError::NoCapacity(format!(
                "the kernel's rings take {bytes} bytes, and resident buffers and other kernels' \
                 rings leave {room} of the device"
            )));
        }
        match self
            .wait_for_memory(since, false, || broker.reserve_kept(device, bytes))
            .await
        {
            Ok(reservation) => Ok(Ok(reservation)),
            // A shutdown waits for launches under way: this one stops
            // waiting for memory.
            Err(NoMemory::ShutDown) => {
                Err(BackendError::Unavailable("the bridge has shut down".into()))
            }
            Err(NoMemory::TimedOut { available }) => Err(BackendError::NoCapacity(format!(
                "no memory for the kernel's rings: they take {bytes} bytes, and requests left \
                 {available} unreserved for {:?}",
                since.elapsed()
            ))),
            Err(NoMemory::Broker(err)) => Err(device_error(err)),
        }
    }

    /// Tries `reserve` every millisecond while the memory it asks for is
    /// lent to other requests, until `overload_timeout` after `since`
    /// (rules 3 and 6) or a shutdown: any shutdown, or for an accepted
    /// request that a draining shutdown answers (`drained`: a batch's),
    /// only an abandoning one. The one wait of a first launch's rings and
    /// of a batch's working memory.
    async fn wait_for_memory(
        &self,
        since: Instant,
        drained: bool,
        mut reserve: impl FnMut() -> Result<Reservation, BrokerError>,
    ) -> Result<Reservation, NoMemory> {
        let ended = || {
            self.shared.shut_down.load(Ordering::SeqCst)
                && !(drained && self.shutdown_mode() == StopMode::Drain)
        };
        // Counted from the first miss until this returns or is dropped.
        let mut waiting: Option<slots::Waiting<'_>> = None;
        loop {
            match reserve() {
                Ok(reservation) => return Ok(reservation),
                Err(BrokerError::InsufficientMemory { .. }) if ended() => {
                    return Err(NoMemory::ShutDown);
                }
                Err(BrokerError::InsufficientMemory { available, .. })
                    if since.elapsed() >= self.shared.config.overload_timeout =>
                {
                    return Err(NoMemory::TimedOut { available });
                }
                Err(BrokerError::InsufficientMemory { .. }) => {
                    waiting
                        .get_or_insert_with(|| slots::Waiting::enter(&self.shared.memory_waiters));
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                Err(err) => return Err(NoMemory::Broker(err)),
            }
        }
    }

    /// Rule 6 of the module docs.
    async fn run_batch(
        &self,
        spec: &KernelSpec,
        input: &[u8],
        output_len: usize,
    ) -> Result<Vec<u8>, ExecuteError> {
        let bytes = (input.len() + output_len) as u64;
        let need = Requirements {
            min_free_memory: bytes,
            ..Requirements::default()
        };
        let broker = &self.shared.broker;
        let runs_it = |id: DeviceId| {
            let slot = &self.shared.devices[id.0];
            slot.primary && supports(slot.backend.kind(), spec)
        };
        // A device with the memory free now; else one busy now that could
        // hold the request once other requests' working memory drains
        // (memory kept by resident buffers and rings does not come back
        // with it), which `batch_on` waits for, bounded (rule 6:
        // `Overloaded`, not a fallback or `NoDevice` for memory that is
        // only lent out for the moment).
        let chosen = broker.select_where(&need, runs_it).or_else(|| {
            broker.select_where(&Requirements::default(), |id| {
                runs_it(id) && broker.unkept(id).is_ok_and(|room| room >= bytes)
            })
        });
        let cpu = self.shared.cpu;
        let device = match chosen {
            Some(device) => device,
            // The CPU is the only device: `batch_on` waits, bounded, for
            // memory, or says the request is larger than what resident
            // buffers leave of it.
            None if self.shared.devices[cpu.0].primary => cpu,
            None if self.may_fall_back(spec) => {
                self.count_fallback(spec, None, "no device with that much memory not kept");
                cpu
            }
            None => return Err(refused(spec.id, ExecuteError::NoDevice { kernel: spec.id })),
        };
        match self.batch_on(spec, input, device, bytes).await {
            Err(err @ (ExecuteError::Compile { .. } | ExecuteError::DeviceFailed { .. }))
                if device != cpu && self.may_fall_back(spec) =>
            {
                self.count_fallback(
                    spec,
                    Some(self.shared.devices[device.0].backend.kind()),
                    err.reason(),
                );
                self.batch_on(spec, input, cpu, bytes).await
            }
            other => other,
        }
    }

    /// Reserves `bytes` on `device`, waiting up to `overload_timeout` for
    /// other requests to release memory (then `Overloaded`; an abandoning
    /// shutdown ends the wait with `ShutDown`, and a draining one lets it
    /// run on, as it answers every request already accepted). A request larger than what resident
    /// buffers and rings leave of the device (memory that no request gives
    /// back) fails at once.
    async fn reserve_within(
        &self,
        spec: &KernelSpec,
        device: DeviceId,
        bytes: u64,
    ) -> Result<Reservation, ExecuteError> {
        let broker = &self.shared.broker;
        let backend = self.shared.devices[device.0].backend.kind();
        // What working memory can ever have here: the device's memory less
        // what resident buffers and rings keep.
        let room = broker.unkept(device).unwrap_or(0);
        if bytes > room {
            return Err(ExecuteError::DeviceFailed {
                kernel: spec.id,
                backend,
                reason: format!(
                    "{bytes} bytes exceed the {room} bytes of the device not kept by \
                     resident buffers and rings"
                ),
            });
        }
        let started = Instant::now();
        self.wait_for_memory(started, true, || broker.reserve(device, bytes))
            .await
            .map_err(|why| match why {
                NoMemory::ShutDown => ExecuteError::ShutDown,
                NoMemory::TimedOut { .. } => ExecuteError::Overloaded {
                    kernel: spec.id,
                    waited: started.elapsed(),
                },
                NoMemory::Broker(err) => ExecuteError::DeviceFailed {
                    kernel: spec.id,
                    backend,
                    reason: err.to_string(),
                },
            })
    }

    async fn batch_on(
        &self,
        spec: &KernelSpec,
        input: &[u8],
        device: DeviceId,
        bytes: u64,
    ) -> Result<Vec<u8>, ExecuteError> {
        let slot = &self.shared.devices[device.0];
        let kind = slot.backend.kind();
        let broker = &self.shared.broker;
        // Reserve before allocating (broker invariant 2).
        let reservation = self
            .reserve_within(spec, device, bytes)
            .await
            .inspect_err(|err| record_failure(spec.id, kind, err))?;
        self.report_memory(device);
        let in_flight = broker
            .begin(device)
            .map_err(|err| ExecuteError::DeviceFailed {
                kernel: spec.id,
                backend: kind,
                reason: err.to_string(),
            })?;
        let backend = slot.backend.clone();
        let index = slot.index;
        let owned_spec = *spec;
        let started = Instant::now();
        // The input travels to the blocking thread in a pooled staging
        // buffer: a large batch then costs a copy into warm memory, not a
        // fresh allocation and its page faults.
        // A large copy (and, for CUDA, perhaps a page-locked allocation)
        // would hold this tokio worker for a while: on a multi-thread
        // runtime the worker hands its other tasks over first.
        let blocking_stage = input.len() >= BLOCKING_STAGE_BYTES
            && tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
                runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
            });
        let staged = if blocking_stage {
            tokio::task::block_in_place(|| self.stage_input(spec, &slot.backend, index, input))
        } else {
            self.stage_input(spec, &slot.backend, index, input)
        };
        let staging = match staged {
            Ok(staging) => staging,
            Err(err) => {
                in_flight.fail();
                let err = execute_error(spec, kind, err);
                record_failure(spec.id, kind, &err);
                return Err(err);
            }
        };
        // The reservation, the in-flight record and the outcome's metrics
        // belong to the blocking job, which runs to the end even if the
        // caller gives up: memory is released only after the backend has
        // freed its buffers (broker invariant 2).
        let bridge = self.clone();
        let len = input.len();
        let job = tokio::task::spawn_blocking(move || {
            let outcome = backend.run_batch(index, &owned_spec, &staging.bytes()[..len]);
            drop(staging);
            drop(reservation);
            bridge.report_pool();
            bridge.report_memory(device);
            let labels = [
                ("kernel", owned_spec.id.to_string()),
                ("backend", format!("{kind:?}")),
                ("device", index.to_string()),
            ];
            match outcome {
                Ok(output) => {
                    let latency = started.elapsed();
                    in_flight.succeed(latency);
                    metrics::counter!("granary_gpu_requests_total", &labels).increment(1);
                    metrics::histogram!("granary_gpu_request_seconds", &labels)
                        .record(latency.as_secs_f64());
                    Ok(output)
                }
                Err(err) => {
                    in_flight.fail();
                    let err = execute_error(&owned_spec, kind, err);
                    record_failure(owned_spec.id, kind, &err);
                    Err(err)
                }
            }
        });
        job.await.unwrap_or_else(|err| {
            Err(ExecuteError::DeviceFailed {
                kernel: spec.id,
                backend: kind,
                reason: format!("the batch job failed: {err}"),
            })
        })
    }

    /// A copy of `input` for the batch job: in the backend's own staging
    /// memory where it has some (page-locked for CUDA, sent by one DMA),
    /// else in a buffer from the bridge's pool.
    fn stage_input(
        &self,
        spec: &KernelSpec,
        backend: &Arc<dyn Backend>,
        index: usize,
        input: &[u8],
    ) -> Result<Staged, BackendError> {
        let kind = backend.kind();
        match backend.stage_input(index, input) {
            Some(Ok(staged)) => return Ok(Staged::Backend(staged)),
            // The backend's staging memory is short: the pool's will do.
            Some(Err(err)) => tracing::debug!(
                kernel = spec.id,
                backend = ?kind,
                error = %err,
                "staging in the bridge's pool instead"
            ),
            None => {}
        }
        let mut staging = self
            .shared
            .staging
            .rent(input.len().max(1))
            .map_err(|err| {
                BackendError::Device(format!(
                    "no staging buffer for {} bytes of {} on {kind:?}: {err}",
                    input.len(),
                    spec.id
                ))
            })?;
        staging.as_mut_slice()[..input.len()].copy_from_slice(input);
        Ok(Staged::Pool(staging))
    }

    /// The staging pool's counters: its hit ratio is what the pool saves.
    pub fn staging_pool_stats(&self) -> PoolStats {
        self.shared.staging.stats()
    }

    /// Publishes the staging pool's counters.
    fn report_pool(&self) {
        let stats = self.shared.staging.stats();
        metrics::counter!("granary_gpu_pool_hits_total").absolute(stats.hits);
        metrics::counter!("granary_gpu_pool_misses_total").absolute(stats.misses);
        metrics::gauge!("granary_gpu_pool_cached_bytes").set(stats.cached_bytes as f64);
    }

    /// Publishes `device`'s memory gauges.
    fn report_memory(&self, device: DeviceId) {
        let Ok(stats) = self.shared.broker.stats(device) else {
            return;
        };
        let slot = &self.shared.devices[device.0];
        let labels = [
            ("backend", format!("{:?}", slot.backend.kind())),
            ("device", slot.index.to_string()),
        ];
        metrics::gauge!("granary_gpu_device_memory_used_bytes", &labels).set(stats.reserved as f64);
        metrics::gauge!("granary_gpu_device_memory_free_bytes", &labels)
            .set(stats.available as f64);
    }
}

/// Counts a request refused before it reached a device, and passes the
/// error on.
fn refused(kernel: &'static str, err: ExecuteError) -> ExecuteError {
    record_failure_labelled(kernel, "none".into(), &err);
    err
}

/// Whether `kind` has an implementation of `spec`.
fn supports(kind: BackendKind, spec: &KernelSpec) -> bool {
    match kind {
        BackendKind::Cpu => spec.cpu.is_some(),
        BackendKind::OpenCl => spec.opencl_c.is_some(),
        BackendKind::Cuda => spec.cuda_c.is_some(),
        BackendKind::Wgpu => spec.wgsl.is_some(),
    }
}

/// Device memory a kernel's two rings take.
fn ring_bytes(spec: &KernelSpec, capacity: u32) -> u64 {
    let ring = |max: usize| {
        RingConfig::mpsc(capacity, u32::try_from(max).unwrap_or(u32::MAX))
            .layout()
            .map_or(0, |layout| layout.total_bytes as u64)
    };
    ring(spec.request.max_bytes()) + ring(spec.response.max_bytes())
}

/// `Shared::stop_mode`'s values.
const MODE_DRAIN: u8 = 1;
const MODE_ABANDON: u8 = 2;

/// A backend error as a caller sees it.
fn execute_error(spec: &KernelSpec, backend: BackendKind, err: BackendError) -> ExecuteError {
    let kernel = spec.id;
    match err {
        BackendError::Build { log, .. } => ExecuteError::Compile {
            kernel,
            backend,
            log,
        },
        BackendError::Unsupported { .. } => ExecuteError::NoDevice { kernel },
        BackendError::WrongShape(error) => ExecuteError::WrongShape { kernel, error },
        BackendError::Rejected(status @ (Status::BadLength | Status::BadInput)) => {
            ExecuteError::Rejected { kernel, status }
        }
        BackendError::Rejected(status) => ExecuteError::KernelFault { kernel, status },
        BackendError::BadBuffer(reason) => ExecuteError::WrongBuffer { kernel, reason },
        other => ExecuteError::DeviceFailed {
            kernel,
            backend,
            reason: other.to_string(),
        },
    }
}
