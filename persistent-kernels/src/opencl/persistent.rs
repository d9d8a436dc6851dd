//! The OpenCL persistent kernel: rings in fine-grained SVM, drained by a
//! kernel that never returns until its request ring is closed.

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use granary_ring::{Ownership, Region, Ring, RingConfig, WaitPolicy};
use opencl3::command_queue::CommandQueue;
use opencl3::context::Context;
use opencl3::event::{CL_COMPLETE, Event};
use opencl3::kernel::{ExecuteKernel, Kernel};
use opencl3::memory::{CL_MEM_READ_WRITE, CL_MEM_SVM_ATOMICS, CL_MEM_SVM_FINE_GRAIN_BUFFER};

use super::{OpenClBackend, OpenClError, api};
use crate::host_ends::HostEnds;
use crate::kernel::PersistentKernel;
use crate::kernel::{Completion, CompletionRef, StopMode, StopReport, SubmitError, Submitter};
use crate::spec::KernelSpec;

/// The persistent-kernel template (OpenCL C 2.0), appended after the ring
/// layout and the spec's `granary_process`.
pub const PERSISTENT_TEMPLATE: &str = include_str!("../../device/persistent_opencl.cl");

/// Fine-grained SVM with atomics: host and device see each other's stores
/// and atomics while the kernel runs.
struct SvmRegion {
    /// Keeps the context (which owns the allocation) alive.
    context: Arc<Context>,
    /// From `clSVMAlloc`, `len` bytes, 128-byte aligned, zeroed.
    base: NonNull<u8>,
    len: usize,
}

impl SvmRegion {
    fn zeroed(context: Arc<Context>, len: usize) -> Result<SvmRegion, OpenClError> {
        let flags = CL_MEM_READ_WRITE | CL_MEM_SVM_FINE_GRAIN_BUFFER | CL_MEM_SVM_ATOMICS;
        // SAFETY: valid flags and context; the size is the ring's.
        let ptr = unsafe { opencl3::memory::svm_alloc(context.get(), flags, len, 128) }.map_err(
            |code| OpenClError::Api {
                call: "clSVMAlloc",
                code,
            },
        )?;
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(OpenClError::Api {
            call: "clSVMAlloc",
            code: 0,
        })?;
        // SAFETY: fine-grained SVM is host-accessible; `len` bytes were just
        // allocated and nobody else holds the pointer yet.
        unsafe { base.as_ptr().write_bytes(0, len) };
        Ok(SvmRegion { context, base, len })
    }
}

impl Drop for SvmRegion {
    fn drop(&mut self) {
        // SAFETY: allocated by `clSVMAlloc` in this context, freed once; the
        // kernel that used it has finished (the handle waits for it before
        // the rings, and so the regions, are dropped).
        let _ = unsafe { opencl3::memory::svm_free(self.context.get(), self.base.as_ptr().cast()) };
    }
}

// SAFETY: SVM memory is not tied to a thread; access follows the ring
// protocol.
unsafe impl Send for SvmRegion {}
// SAFETY: as above.
unsafe impl Sync for SvmRegion {}

// SAFETY: 1. the allocation lives until drop and never moves; 2. it is
// zeroed on allocation; 3. `clSVMAlloc` was asked for 128-byte alignment;
// 4. the host uses it through ring handles and the device through the
// persistent template, which follows docs/ring-protocol.md.
unsafe impl Region for SvmRegion {
    fn base(&self) -> NonNull<u8> {
        self.base
    }
    fn len(&self) -> usize {
        self.len
    }
    fn align(&self) -> usize {
        128
    }
    fn ownership(&self) -> Ownership {
        Ownership::Owned {
            allocator: "opencl-svm",
        }
    }
}

/// A persistent kernel running on an OpenCL device.
pub struct OpenClPersistentKernel {
    spec: KernelSpec,
    /// The host's ends of the two rings.
    ends: HostEnds,
    /// The launch; complete once the kernel has exited.
    event: Option<Event>,
    /// Kept alive while the kernel runs.
    _kernel: Kernel,
    _queue: CommandQueue,
    /// The compute units the kernel holds; released once it has exited.
    lease: Option<UnitLease>,
}

/// Compute units held by running persistent kernels, per device, across the
/// process. Each spinning work-group holds one compute unit (on POCL, a
/// host thread) for as long as its kernel runs, and a kernel launched
/// beyond them would never be scheduled: launches are refused instead.
static HELD_UNITS: Mutex<BTreeMap<String, u32>> = Mutex::new(BTreeMap::new());

/// A device as the registry knows it: its OpenCL id, the same in every
/// `OpenClBackend` of the process whatever devices each skipped, and its
/// name.
fn device_key(device: &super::OpenClDevice) -> String {
    format!("{:x}#{}", device.id, device.info.name)
}

/// Compute units held on one device; given back on drop.
#[derive(Debug)]
struct UnitLease {
    key: String,
    units: u32,
}

impl UnitLease {
    fn acquire(key: String, units: u32, limit: u32) -> Result<UnitLease, OpenClError> {
        let mut held = HELD_UNITS.lock().unwrap_or_else(PoisonError::into_inner);
        let now = held.get(&key).copied().unwrap_or(0);
        if now + units > limit {
            return Err(OpenClError::NoCapacity {
                held: now,
                requested: units,
                limit,
            });
        }
        held.insert(key.clone(), now + units);
        Ok(UnitLease { key, units })
    }

    /// Compute units held on the device with `key`.
    fn held(key: &str) -> u32 {
        let held = HELD_UNITS.lock().unwrap_or_else(PoisonError::into_inner);
        held.get(key).copied().unwrap_or(0)
    }
}

impl Drop for UnitLease {
    fn drop(&mut self) {
        let mut held = HELD_UNITS.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(now) = held.get_mut(&self.key) {
            *now = now.saturating_sub(self.units);
        }
    }
}

impl OpenClBackend {
    /// Compute units that persistent kernels hold on device `index`, across
    /// this process.
    pub fn held_compute_units(&self, index: usize) -> Result<u32, OpenClError> {
        Ok(UnitLease::held(&device_key(self.device(index)?)))
    }
}

impl std::fmt::Debug for OpenClPersistentKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenClPersistentKernel")
            .field("kernel", &self.spec.id)
            .finish_non_exhaustive()
    }
}

impl OpenClPersistentKernel {
    /// Launches `spec`'s persistent kernel on device `index`: one work-item
    /// per work-group and `work_groups` work-groups (POCL runs each spinning
    /// work-group on a CPU thread, so keep it at most the compute units).
    pub fn launch(
        backend: &OpenClBackend,
        index: usize,
        spec: KernelSpec,
        capacity: u32,
        work_groups: usize,
    ) -> Result<OpenClPersistentKernel, OpenClError> {
        OpenClPersistentKernel::launch_leaving(backend, index, spec, capacity, work_groups, 0)
    }

    /// [`OpenClPersistentKernel::launch`], refused with
    /// [`OpenClError::NoCapacity`] unless `keep_free` compute units stay
    /// free afterwards (for the batch path, or other kernels), counting
    /// every persistent kernel running on the device in this process.
    pub fn launch_leaving(
        backend: &OpenClBackend,
        index: usize,
        spec: KernelSpec,
        capacity: u32,
        work_groups: usize,
        keep_free: u32,
    ) -> Result<OpenClPersistentKernel, OpenClError> {
        let device = backend.device(index)?;
        let compute_units = device.info.compute_units;
        if work_groups == 0 || work_groups > compute_units as usize {
            return Err(OpenClError::BadInput(format!(
                "{work_groups} work-groups on a device with {compute_units} compute units"
            )));
        }
        let lease = UnitLease::acquire(
            device_key(device),
            work_groups as u32,
            compute_units.saturating_sub(keep_free),
        )?;
        let program = backend.program_for(index, &spec)?;
        let kernel =
            Kernel::create(&program, "granary_persistent").map_err(api("clCreateKernel"))?;
        let ring = |config: RingConfig| -> Result<Ring, OpenClError> {
            let layout = config
                .layout()
                .map_err(|err| OpenClError::BadInput(err.to_string()))?;
            let region = SvmRegion::zeroed(device.context.clone(), layout.total_bytes)?;
            // SAFETY: fresh SVM memory; the only other party is the kernel
            // launched below, which follows the ring protocol.
            unsafe { Ring::init_in(region, config) }
                .map_err(|err| OpenClError::BadInput(err.to_string()))
        };
        let request_ring = ring(RingConfig::mpsc(capacity, spec.request.ring_payload()))?;
        let response_ring = ring(RingConfig::mpsc(capacity, spec.response.ring_payload()))?;
        let request_base = request_ring.region().base().as_ptr();
        let response_base = response_ring.region().base().as_ptr();
        // The device holds the request ring's consumer role and is a
        // producer of responses; the host takes the other roles.
        let requests = request_ring
            .into_producer()
            .map_err(|err| OpenClError::BadInput(err.to_string()))?;
        let responses = response_ring.into_consumer();
        let queue = CommandQueue::create_default_with_properties(&device.context, 0, 0)
            .map_err(api("clCreateCommandQueue"))?;
        // SAFETY: the two arguments are SVM pointers to initialised rings,
        // matching the kernel's signature; one work-item per work-group.
        let event = unsafe {
            ExecuteKernel::new(&kernel)
                .set_arg_svm(request_base)
                .set_arg_svm(response_base)
                .set_global_work_size(work_groups)
                .set_local_work_size(1)
                .enqueue_nd_range(&queue)
                .map_err(api("clEnqueueNDRangeKernel"))?
        };
        // From here the kernel is queued: the rings may be freed only once
        // it has exited. A flush that fails drops the handle, which stops
        // the kernel and waits for it (and leaks the rings and its units if
        // it never exits), as for any other handle: releasing the queue
        // would send the kernel to the device anyway.
        let launched = OpenClPersistentKernel {
            spec,
            ends: HostEnds::new(spec, requests, responses, WaitPolicy::default()),
            event: Some(event),
            _kernel: kernel,
            lease: Some(lease),
            _queue: queue,
        };
        if let Err(code) = launched._queue.flush() {
            // Never flushed, the kernel would stay queued through the
            // handle's stop. With both rings closed it exits as soon as it
            // runs: finishing the queue sends it and waits, and the handle
            // then frees its units and rings.
            launched.ends.close_requests();
            launched.ends.close_responses();
            let _ = launched._queue.finish();
            return Err(api("clFlush")(code));
        }
        Ok(launched)
    }

    /// Submits one request; see [`Submitter::submit`].
    pub fn submit<P: AsRef<[u8]>>(
        &self,
        request_id: u64,
        payload: P,
    ) -> Result<(), SubmitError<P>> {
        self.ends.submit(request_id, payload)
    }

    /// Waits up to `timeout` for one completion.
    pub fn complete(&mut self, timeout: Duration) -> Option<Completion> {
        self.ends.complete(timeout)
    }

    /// Sets how [`OpenClPersistentKernel::complete`] waits (default:
    /// [`WaitPolicy::default`]).
    pub fn set_wait_policy(&mut self, policy: WaitPolicy) {
        self.ends.set_wait_policy(policy);
    }

    /// Takes one completion if one is ready.
    pub fn try_complete(&mut self) -> Option<Completion> {
        self.ends.try_complete()
    }

    /// The kernel loop's heartbeat (rule H1).
    pub fn heartbeat(&self) -> u64 {
        self.ends.heartbeat()
    }

    /// Closes the request ring and waits up to `timeout` for the kernel to
    /// answer what is queued and exit. `Ok(false)`: still running at the
    /// deadline (a hung device); the rings stay alive for it. `Err`: the
    /// kernel terminated abnormally; it holds no compute units any more.
    pub fn stop(&mut self, timeout: Duration) -> Result<bool, OpenClError> {
        self.stop_reading(timeout, None)
    }

    /// [`OpenClPersistentKernel::stop`], taking the answers into
    /// `completions` while it waits, if given: a kernel that waits for
    /// room in a full response ring then gets it, and exits.
    fn stop_reading(
        &mut self,
        timeout: Duration,
        mut completions: Option<&mut Vec<Completion>>,
    ) -> Result<bool, OpenClError> {
        self.ends.close_requests();
        let Some(event) = &self.event else {
            return Ok(true);
        };
        // A timeout too long to represent waits without a deadline.
        let deadline = Instant::now().checked_add(timeout);
        loop {
            if let Some(completions) = completions.as_deref_mut() {
                self.ends.drain_into(completions);
            }
            let status = event
                .command_execution_status()
                .map_err(api("clGetEventInfo"))?;
            if status.0 == CL_COMPLETE {
                self.event = None;
                self.lease = None;
                return Ok(true);
            }
            if status.0 < 0 {
                // Terminated abnormally: the kernel no longer runs, so its
                // compute units are free again and its rings may go (a
                // hang keeps both; only this is certain to have ended).
                self.event = None;
                self.lease = None;
                return Err(OpenClError::Api {
                    call: "persistent kernel",
                    code: status.0,
                });
            }
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops as [`PersistentKernel::stop`] does. Abandoning closes the
    /// response ring too: the kernel's next response claim fails, and it
    /// releases the request in hand and exits (template step 3).
    pub fn stop_with(&mut self, mode: StopMode, timeout: Duration) -> StopReport {
        if mode == StopMode::Abandon {
            self.ends.close_responses();
        }
        let mut report = StopReport::default();
        // Answers are read while the kernel drains (a full response ring
        // would hold it): every request submitted is answered (Drain).
        let stopped = self.stop_reading(timeout, Some(&mut report.completions));
        // A kernel that failed (terminated abnormally) reports no exit.
        report.exited = matches!(stopped, Ok(true));
        if report.exited {
            self.ends.drain_into(&mut report.completions);
        }
        report
    }
}

impl PersistentKernel for OpenClPersistentKernel {
    fn spec(&self) -> &KernelSpec {
        &self.spec
    }

    fn submitter(&self) -> Option<Submitter> {
        self.ends.submitter()
    }

    fn try_complete(&mut self) -> Option<Completion> {
        OpenClPersistentKernel::try_complete(self)
    }

    fn complete(&mut self, timeout: Duration) -> Option<Completion> {
        OpenClPersistentKernel::complete(self, timeout)
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
        OpenClPersistentKernel::heartbeat(self)
    }

    fn stop(&mut self, mode: StopMode, timeout: Duration) -> StopReport {
        self.stop_with(mode, timeout)
    }
}

impl Drop for OpenClPersistentKernel {
    fn drop(&mut self) {
        // The SVM rings must outlive the kernel: stop it and wait for it to
        // exit. The response ring is closed too (Abandon), so a kernel
        // waiting for room in a ring nobody reads still exits. A kernel
        // that does not exit in time keeps its rings: they are leaked
        // rather than freed under a running kernel.
        self.ends.close_responses();
        let stopped = self.stop(Duration::from_secs(10));
        // A kernel that terminated abnormally (its event cleared by the
        // stop) no longer runs either.
        if !matches!(stopped, Ok(true)) && self.event.is_some() {
            self.ends.leak();
            // Its compute units stay held too: the kernel still runs.
            std::mem::forget(self.lease.take());
        }
    }
}
