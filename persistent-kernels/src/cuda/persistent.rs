//! The CUDA persistent kernel: one block drains a request ring and answers
//! on a response ring, both in pinned host memory mapped into the device.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{CudaContext, result};
use granary_ring::{Ring, RingConfig, WaitPolicy};

use super::memory::{DeviceBytes, MappedRegion, Stream};
use super::{CudaBackend, CudaError, Module, driver};
use crate::cpu::KernelConfig;
use crate::host_ends::HostEnds;
use crate::kernel::PersistentKernel;
use crate::kernel::{Completion, CompletionRef, StopMode, StopReport, SubmitError, Submitter};
use crate::spec::KernelSpec;

/// The persistent-kernel template (CUDA C), appended after the ring layout
/// and the spec's `granary_process`.
pub const PERSISTENT_TEMPLATE: &str = include_str!("../../device/persistent_cuda.cu");

/// Threads in the block when the configuration leaves it to the backend.
pub const DEFAULT_THREADS: u32 = 256;

/// Persistent kernels running per device in this process. Each holds one
/// block, resident on one SM for as long as it runs; the bridge keeps some
/// SMs free for batch kernels.
static RUNNING: Mutex<BTreeMap<usize, u32>> = Mutex::new(BTreeMap::new());

/// Persistent kernels running (or leaked while running) on `device`.
pub(crate) fn running_on(device: usize) -> u32 {
    let running = RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
    running.get(&device).copied().unwrap_or(0)
}

/// Runs `load` unless a persistent kernel runs (or is about to) on
/// `device`: loading a module then would wait for kernels that never end
/// (rule 3 of the backend). No launch can begin while `load` runs.
pub(crate) fn while_idle<T>(
    device: usize,
    load: impl FnOnce() -> Result<T, CudaError>,
) -> Result<T, CudaError> {
    let running = RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
    match running.get(&device).copied().unwrap_or(0) {
        0 => load(),
        count => Err(CudaError::ModuleWhileRunning { running: count }),
    }
}

/// One persistent kernel's place on a device; given back on drop.
#[derive(Debug)]
struct BlockLease {
    device: usize,
}

impl BlockLease {
    fn acquire(device: usize, limit: u32) -> Result<BlockLease, CudaError> {
        let mut running = RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
        let now = running.get(&device).copied().unwrap_or(0);
        if now >= limit {
            return Err(CudaError::NoCapacity {
                running: now,
                limit,
            });
        }
        running.insert(device, now + 1);
        Ok(BlockLease { device })
    }
}

impl Drop for BlockLease {
    fn drop(&mut self) {
        let mut running = RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(now) = running.get_mut(&self.device) {
            *now = now.saturating_sub(1);
        }
    }
}

/// A persistent kernel running on a CUDA device.
pub struct CudaPersistentKernel {
    spec: KernelSpec,
    /// The host's ends of the two rings.
    ends: HostEnds,
    context: Arc<CudaContext>,
    /// The kernel's own non-blocking stream: idle once the kernel has
    /// exited (`cuStreamQuery`), so nothing needs to be queued after the
    /// launch, and nothing can fail after it.
    stream: Arc<Stream>,
    /// `false` until the kernel is seen to have exited.
    finished: bool,
    /// Per-thread request and response copies, on the kernel's stream.
    scratch: Option<DeviceBytes>,
    /// Held until the kernel has exited.
    module: Option<Arc<Module>>,
    lease: Option<BlockLease>,
    threads: u32,
}

impl std::fmt::Debug for CudaPersistentKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaPersistentKernel")
            .field("kernel", &self.spec.id)
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

impl CudaPersistentKernel {
    /// Launches `spec`'s persistent kernel on device `index`: one block of
    /// `config.threads_per_group` threads (default 256, at most the ring's
    /// capacity and 1024) over two rings of `config.capacity` slots.
    /// Refused with [`CudaError::NoCapacity`] unless
    /// `config.keep_free_compute_units` SMs stay free of persistent kernels.
    pub fn launch(
        backend: &CudaBackend,
        index: usize,
        spec: KernelSpec,
        config: &KernelConfig,
    ) -> Result<CudaPersistentKernel, CudaError> {
        let device = backend.device(index)?;
        let threads = config
            .threads_per_group
            .unwrap_or(DEFAULT_THREADS)
            .min(config.capacity)
            .min(1024);
        if threads == 0 {
            return Err(CudaError::BadInput("a block of 0 threads".to_string()));
        }
        let limit = device
            .info
            .compute_units
            .saturating_sub(config.keep_free_compute_units);
        // The module first: it can only be loaded while no kernel runs.
        let module = backend.module_for(index, &spec)?;
        let lease = BlockLease::acquire(index, limit)?;
        let ring = |config: RingConfig| -> Result<(Ring, CUdeviceptr), CudaError> {
            let layout = config
                .layout()
                .map_err(|err| CudaError::BadInput(err.to_string()))?;
            let region = MappedRegion::zeroed(&device.host, layout.total_bytes)?;
            let device_pointer = region.device_pointer();
            // SAFETY: fresh, zeroed memory; the only other party is the
            // kernel launched below, which follows the ring protocol.
            let ring = unsafe { Ring::init_in(region, config) }
                .map_err(|err| CudaError::BadInput(err.to_string()))?;
            Ok((ring, device_pointer))
        };
        let request_max = spec.request.ring_payload();
        let response_max = spec.response.ring_payload();
        // Requests: many host producers, the block as the one consumer.
        // Responses: the block as the one producer (SPSC, see the template).
        let (request_ring, request_pointer) = ring(RingConfig::mpsc(config.capacity, request_max))?;
        let (response_ring, response_pointer) =
            ring(RingConfig::spsc(config.capacity, response_max))?;
        let round16 = |bytes: u32| (bytes + 15) & !15;
        // The template copies whole 16-byte words: a request's copy takes
        // its payload room rounded up, then the response's room.
        let stride = round16(request_ring.layout().max_payload)
            + round16(response_ring.layout().max_payload);
        let requests = request_ring
            .into_producer()
            .map_err(|err| CudaError::BadInput(err.to_string()))?;
        let responses = response_ring.into_consumer();

        let stream = Stream::new(&device.context)?;
        let scratch = DeviceBytes::alloc(&stream, stride as usize * threads as usize)?;
        let mut request_pointer = request_pointer;
        let mut response_pointer = response_pointer;
        let mut scratch_pointer = scratch.pointer();
        let mut stride = stride;
        let mut params = [
            (&mut request_pointer as *mut CUdeviceptr).cast(),
            (&mut response_pointer as *mut CUdeviceptr).cast(),
            (&mut scratch_pointer as *mut CUdeviceptr).cast(),
            (&mut stride as *mut u32).cast(),
        ];
        // SAFETY: the parameters match granary_persistent's signature
        // (three device pointers, one u32) and are copied at launch; the
        // rings are initialised, mapped and outlive the kernel (the handle
        // keeps them until the kernel has exited, or leaks them); the
        // scratch holds `stride` bytes per thread. Nothing after this call
        // can fail, so a launched kernel always has its handle.
        unsafe {
            result::launch_kernel(
                module.persistent,
                (1, 1, 1),
                (threads, 1, 1),
                0,
                stream.raw,
                &mut params,
            )
        }
        .map_err(driver("cuLaunchKernel"))?;
        Ok(CudaPersistentKernel {
            spec,
            ends: HostEnds::new(spec, requests, responses, config.policy),
            context: device.context.clone(),
            stream,
            finished: false,
            scratch: Some(scratch),
            module: Some(module),
            lease: Some(lease),
            threads,
        })
    }

    /// Threads in the kernel's block.
    pub fn threads(&self) -> u32 {
        self.threads
    }

    /// Submits one request; see [`Submitter::submit`].
    pub fn submit<P: AsRef<[u8]>>(
        &self,
        request_id: u64,
        payload: P,
    ) -> Result<(), SubmitError<P>> {
        self.ends.submit(request_id, payload)
    }

    /// Sets how [`CudaPersistentKernel::complete`] waits.
    pub fn set_wait_policy(&mut self, policy: WaitPolicy) {
        self.ends.set_wait_policy(policy);
    }

    /// Waits up to `timeout` for one completion.
    pub fn complete(&mut self, timeout: Duration) -> Option<Completion> {
        self.ends.complete(timeout)
    }

    /// Takes one completion if one is ready.
    pub fn try_complete(&mut self) -> Option<Completion> {
        self.ends.try_complete()
    }

    /// The kernel's heartbeat (rule H1).
    pub fn heartbeat(&self) -> u64 {
        self.ends.heartbeat()
    }

    /// Whether the kernel has exited, from its event.
    fn poll_exit(&mut self) -> Result<bool, CudaError> {
        if self.finished {
            return Ok(true);
        }
        self.context
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))?;
        // SAFETY: the kernel's own stream, on the bound context; the scratch
        // is freed on it only after the kernel is seen to have exited.
        match unsafe { sys::cuStreamQuery(self.stream.raw) } {
            sys::cudaError_enum::CUDA_SUCCESS => {
                self.finished = true;
                Ok(true)
            }
            sys::cudaError_enum::CUDA_ERROR_NOT_READY => Ok(false),
            other => Err(CudaError::Api {
                call: "persistent kernel",
                code: other as i32,
            }),
        }
    }

    /// Gives back what only the running kernel needed. The rings stay
    /// until the handle drops, for completions still to be read.
    fn release(&mut self) {
        self.scratch = None;
        self.module = None;
        self.lease = None;
    }

    /// Stops as [`PersistentKernel::stop`] does. Abandoning closes the
    /// response ring too: the template reads its `closed` word every turn
    /// and exits before it takes another request. While a drain waits, the
    /// responses are read into the report, so a kernel that has filled the
    /// response ring can still finish.
    pub fn stop_with(&mut self, mode: StopMode, timeout: Duration) -> StopReport {
        if mode == StopMode::Abandon {
            self.ends.close_responses();
        }
        self.ends.close_requests();
        let mut report = StopReport::default();
        let deadline = Instant::now().checked_add(timeout);
        let mut pause = Duration::from_micros(10);
        loop {
            self.ends.drain_into(&mut report.completions);
            match self.poll_exit() {
                Ok(true) => {
                    self.release();
                    report.exited = true;
                    break;
                }
                Ok(false) => {}
                // A kernel that failed reports no exit; its rings are kept.
                Err(_) => break,
            }
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                break;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
        if report.exited {
            self.ends.drain_into(&mut report.completions);
        }
        report
    }
}

impl PersistentKernel for CudaPersistentKernel {
    fn spec(&self) -> &KernelSpec {
        &self.spec
    }

    fn submitter(&self) -> Option<Submitter> {
        self.ends.submitter()
    }

    fn try_complete(&mut self) -> Option<Completion> {
        CudaPersistentKernel::try_complete(self)
    }

    fn complete(&mut self, timeout: Duration) -> Option<Completion> {
        CudaPersistentKernel::complete(self, timeout)
    }

    fn try_complete_each(&mut self, max: usize, take: &mut dyn FnMut(CompletionRef<'_>)) -> usize {
        self.ends.try_complete_each(max, take)
    }

    fn complete_each(
        &mut self,
        timeout: Duration,
        max: usize,
        take: &mut dyn FnMut(CompletionRef<'_>),
    ) -> usize {
        self.ends.complete_each(timeout, max, take)
    }

    fn heartbeat(&self) -> u64 {
        CudaPersistentKernel::heartbeat(self)
    }

    fn stop(&mut self, mode: StopMode, timeout: Duration) -> StopReport {
        self.stop_with(mode, timeout)
    }
}

impl Drop for CudaPersistentKernel {
    fn drop(&mut self) {
        // The rings must outlive the kernel: stop it (Abandon, so a full
        // response ring nobody reads cannot hold it) and wait for it. One
        // that does not exit in time keeps everything it uses, leaked
        // rather than freed under a running kernel, and its lease, so the
        // device is known to be busy for good.
        if !self
            .stop_with(StopMode::Abandon, Duration::from_secs(10))
            .exited
        {
            self.ends.leak();
            std::mem::forget(self.scratch.take());
            std::mem::forget(self.module.take());
            std::mem::forget(self.lease.take());
        }
        // The stream goes with its last holder (the scratch, if leaked).
    }
}
