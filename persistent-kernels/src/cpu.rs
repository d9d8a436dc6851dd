//! The CPU backend's persistent kernel: a dedicated thread runs the kernel
//! loop over a request ring and a response ring, exactly as a device kernel
//! does over host-mapped memory.
//!
//! - Requests go into an MPSC ring, so any number of [`Submitter`]s can feed
//!   one kernel; responses come back on an SPSC ring (the kernel thread is
//!   its only producer), each tagged with its request's id and a [`Status`].
//! - The loop checks every request against the spec's request shape before
//!   calling the CPU implementation, catches a panicking implementation, and
//!   answers both with a status instead of dying.
//! - [`CpuPersistentKernel::stop`] either drains (every submitted request is
//!   answered) or abandons (the loop exits at once and the unprocessed
//!   requests' ids come back in the [`StopReport`], the one in hand
//!   included). `stop` joins the thread; `stop_within` joins it if it
//!   exits in time, and otherwise detaches it (the report says
//!   `exited: false`), to exit once the call in hand returns.
//! - The same thread and rings serve a device that cannot run a persistent
//!   kernel (wgpu): the loop then takes every request queued, up to a
//!   micro-batch, and hands them to the device as one dispatch
//!   ([`MicroBatch`]); it answers a request of the wrong length at once and
//!   the rest in the order taken.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use granary_ring::{
    ConfigError, Consumer, PopError, ReserveError, Ring, RingConfig, SpscProducer, TryPopError,
    WaitPolicy,
};

use crate::hooks::CpuHooks;
use crate::kernel::{
    Completion, CompletionRef, StopMode, StopReport, SubmitError, Submitter, completion,
    lend_ready, lend_waiting,
};
use crate::spec::{KernelSpec, Status};

/// How a CPU persistent kernel is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelConfig {
    /// Slots in each ring: a power of two in `2..=2^24` (default 1024).
    pub capacity: u32,
    /// How the kernel thread waits for requests and for response space.
    pub policy: WaitPolicy,
    /// Longest the kernel thread waits before it beats its heartbeat and
    /// checks for a stop (default 1 ms).
    pub idle_poll: Duration,
    /// Work-groups (device backends) that share the request ring; `None`
    /// lets the backend choose: one on a CPU device, where each spinning
    /// work-group holds a host thread. Ignored by the CPU backend.
    pub work_groups: Option<u32>,
    /// Work-items in each work-group; `None` lets the backend choose. The
    /// CUDA backend runs one block of this many threads (default 256, at
    /// most the capacity and 1024); OpenCL and the CPU ignore it.
    pub threads_per_group: Option<u32>,
    /// Compute units a device backend must leave free when it launches
    /// this kernel, counting every persistent kernel already running on the
    /// device (default 0). The bridge keeps one free, so that batch
    /// kernels can still run. Ignored by the CPU backend, and by wgpu,
    /// which runs no persistent kernel (its host thread holds no compute
    /// unit; `work_groups` and `threads_per_group` do not apply there
    /// either).
    pub keep_free_compute_units: u32,
}

impl Default for KernelConfig {
    fn default() -> KernelConfig {
        KernelConfig {
            capacity: 1024,
            policy: WaitPolicy::default(),
            idle_poll: Duration::from_millis(1),
            work_groups: None,
            threads_per_group: None,
            keep_free_compute_units: 0,
        }
    }
}

/// A wait policy that remembers idleness: it waits with `busy` while work
/// flows, and after a wait that timed out it parks at once. An idle kernel
/// (or completion poller) then sleeps between its periodic wake-ups instead
/// of spinning and yielding afresh every poll interval.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdleWait {
    busy: WaitPolicy,
    idle: WaitPolicy,
    was_idle: bool,
}

impl IdleWait {
    pub(crate) fn new(busy: WaitPolicy) -> IdleWait {
        IdleWait {
            busy,
            // Parks at once, starting at a quarter of `park_max`: a host
            // producer wakes it on its next push; a device producer's
            // answer is seen at the end of the park in progress (at most
            // `park_max`).
            idle: WaitPolicy {
                spins: 0,
                yields: 0,
                park_min: (busy.park_max / 4).max(busy.park_min),
                ..busy
            },
            was_idle: false,
        }
    }

    /// The policy for the next wait.
    pub(crate) fn policy(&self) -> &WaitPolicy {
        if self.was_idle {
            &self.idle
        } else {
            &self.busy
        }
    }

    /// Records whether the last wait found work.
    pub(crate) fn record(&mut self, found_work: bool) {
        self.was_idle = !found_work;
    }
}

/// Why a kernel could not be launched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchError {
    /// The spec has no CPU implementation.
    NoCpuImplementation {
        /// The kernel's id.
        kernel: &'static str,
    },
    /// A ring could not be created.
    Ring(ConfigError),
    /// The kernel thread could not be started.
    Thread(String),
}

impl fmt::Display for LaunchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LaunchError::NoCpuImplementation { kernel } => {
                write!(f, "kernel {kernel:?} has no CPU implementation")
            }
            LaunchError::Ring(err) => write!(f, "ring: {err}"),
            LaunchError::Thread(err) => write!(f, "cannot start the kernel thread: {err}"),
        }
    }
}

impl std::error::Error for LaunchError {}

/// What answers the requests a kernel thread takes from its ring.
pub(crate) enum Engine {
    /// The spec's CPU implementation, one request at a time, writing into
    /// the response slot.
    Cpu(crate::spec::CpuFn),
    /// A device that answers a micro-batch of requests per call.
    MicroBatch(Box<dyn MicroBatch>),
}

/// Requests taken from the ring for one micro-batch: ids and payloads,
/// copied out so that their slots are free before the device runs.
#[derive(Debug, Default)]
pub(crate) struct Taken {
    /// Request ids, in the order taken.
    pub(crate) ids: Vec<u64>,
    /// Payloads, one after the other.
    pub(crate) bytes: Vec<u8>,
    /// Each payload's range in `bytes`.
    pub(crate) spans: Vec<std::ops::Range<usize>>,
}

impl Taken {
    fn clear(&mut self) {
        self.ids.clear();
        self.bytes.clear();
        self.spans.clear();
    }

    /// Takes `message` if its length fits `shape`, else records its id in
    /// `rejected`.
    fn sort(
        &mut self,
        shape: &crate::spec::Shape,
        message: &granary_ring::Message<'_>,
        rejected: &mut Vec<u64>,
    ) {
        if shape.check(message.payload().len()).is_ok() {
            self.push(message.request_id(), message.payload());
        } else {
            rejected.push(message.request_id());
        }
    }

    fn push(&mut self, request_id: u64, payload: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(payload);
        self.ids.push(request_id);
        self.spans.push(start..self.bytes.len());
    }

    /// The requests taken.
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Payload `i`.
    pub(crate) fn payload(&self, i: usize) -> &[u8] {
        &self.bytes[self.spans[i].clone()]
    }
}

/// A device that answers several ring requests with one dispatch.
pub(crate) trait MicroBatch: Send {
    /// The most requests one call takes.
    fn max_requests(&self) -> usize;

    /// Answers every request in `taken`, in order: `answers[i]` is the
    /// status of request `i` and its response's range in `out`. Every
    /// request has passed the spec's request shape. A device failure
    /// answers each request with [`Status::Fault`]; the loop goes on,
    /// unless the device is gone for good ([`Given::Lost`]).
    /// `beat` beats the loop's heartbeat and says whether to go on: a
    /// call that waits on the device calls it while it waits, so a long
    /// wait is not taken for a hang, and gives up when it returns false
    /// (an abandoning stop), returning [`Given::Up`].
    fn run(
        &mut self,
        taken: &Taken,
        out: &mut Vec<u8>,
        answers: &mut Vec<(Status, std::ops::Range<usize>)>,
        beat: &dyn Fn() -> bool,
    ) -> Given;
}

/// Whether a [`MicroBatch`] answered its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Given {
    /// `answers` holds one answer per request.
    Answered,
    /// The stop came while the device worked: nothing is answered.
    Up,
    /// The device is lost (`answers` holds one answer per request, each a
    /// fault): the loop publishes them and ends without closing the
    /// response ring. The kernel stops beating, so its owner takes it for
    /// hung and relaunches it (the bridge's `instance.rs` rule 5), which
    /// fails on a lost device: the bridge routes around it.
    Lost,
}

/// A persistent kernel on a CPU thread.
pub struct CpuPersistentKernel {
    submitter: Submitter,
    responses: Consumer,
    abort: Arc<AtomicBool>,
    processed: Arc<AtomicU64>,
    /// `Some` until `stop`; yields the request ring's consumer back.
    /// Also yields the ids of requests the loop took but could not answer
    /// (a micro-batch in hand when an abandoning stop came).
    worker: Option<JoinHandle<(Consumer, Vec<u64>)>>,
    wait: IdleWait,
}

impl fmt::Debug for CpuPersistentKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuPersistentKernel")
            .field("kernel", &self.submitter.spec().id)
            .field("processed", &self.processed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl CpuPersistentKernel {
    /// Starts the kernel thread for `spec`.
    pub fn launch(
        spec: KernelSpec,
        config: KernelConfig,
    ) -> Result<CpuPersistentKernel, LaunchError> {
        CpuPersistentKernel::launch_hooked(spec, config, CpuHooks::new())
    }

    /// [`CpuPersistentKernel::launch`] with test hooks ([`CpuHooks`]).
    pub(crate) fn launch_hooked(
        spec: KernelSpec,
        config: KernelConfig,
        hooks: CpuHooks,
    ) -> Result<CpuPersistentKernel, LaunchError> {
        let Some(cpu) = spec.cpu else {
            return Err(LaunchError::NoCpuImplementation { kernel: spec.id });
        };
        CpuPersistentKernel::launch_engine(spec, config, hooks, Engine::Cpu(cpu))
    }

    /// The kernel thread and its rings, answering through `engine`.
    pub(crate) fn launch_engine(
        spec: KernelSpec,
        config: KernelConfig,
        hooks: CpuHooks,
        engine: Engine,
    ) -> Result<CpuPersistentKernel, LaunchError> {
        let request_ring = Ring::new(RingConfig::mpsc(
            config.capacity,
            spec.request.ring_payload(),
        ))
        .map_err(LaunchError::Ring)?;
        let response_ring = Ring::new(RingConfig::spsc(
            config.capacity,
            spec.response.ring_payload(),
        ))
        .map_err(LaunchError::Ring)?;
        let (requests, request_consumer) = request_ring
            .split_mpsc()
            .map_err(|err| LaunchError::Thread(err.to_string()))?;
        let (response_producer, responses) = response_ring
            .split_spsc()
            .map_err(|err| LaunchError::Thread(err.to_string()))?;
        let abort = Arc::new(AtomicBool::new(false));
        let processed = Arc::new(AtomicU64::new(0));
        let kernel_loop = KernelLoop {
            spec,
            requests: request_consumer,
            responses: response_producer,
            abort: abort.clone(),
            processed: processed.clone(),
            config,
            wait: IdleWait::new(config.policy),
            hooks,
        };
        let worker = thread::Builder::new()
            .name(format!("granary-kernel-{}", spec.id))
            .spawn(move || match engine {
                Engine::Cpu(cpu) => kernel_loop.run(cpu),
                Engine::MicroBatch(device) => kernel_loop.run_batched(device),
            })
            .map_err(|err| LaunchError::Thread(err.to_string()))?;
        Ok(CpuPersistentKernel {
            submitter: Submitter::new(spec, requests),
            responses,
            abort,
            processed,
            worker: Some(worker),
            wait: IdleWait::new(config.policy),
        })
    }

    /// The kernel's spec.
    pub fn spec(&self) -> &KernelSpec {
        self.submitter.spec()
    }

    /// A handle for submitting from other threads.
    pub fn submitter(&self) -> Submitter {
        self.submitter.clone()
    }

    /// Submits one request; see [`Submitter::submit`].
    pub fn submit<P: AsRef<[u8]>>(
        &self,
        request_id: u64,
        payload: P,
    ) -> Result<(), SubmitError<P>> {
        self.submitter.submit(request_id, payload)
    }

    /// Takes one completion if one is ready. A corrupt response (never
    /// written by this crate's loop) is skipped, so that the ones behind it
    /// are still taken.
    pub fn try_complete(&mut self) -> Option<Completion> {
        loop {
            match self.responses.try_pop() {
                Ok(message) => return Some(completion(&message)),
                Err(TryPopError::Corrupt { .. }) => {}
                Err(_) => return None,
            }
        }
    }

    /// Lends up to `max` ready completions to `take` without copying their
    /// bytes (rule 3 of `kernel.rs`); returns how many.
    pub fn try_complete_each(
        &mut self,
        max: usize,
        take: &mut dyn FnMut(CompletionRef<'_>),
    ) -> usize {
        lend_ready(&mut self.responses, max, take)
    }

    /// Waits up to `timeout` for a completion, then lends it and up to
    /// `max - 1` more that are ready to `take`; returns how many.
    pub fn complete_each(
        &mut self,
        timeout: Duration,
        max: usize,
        take: &mut dyn FnMut(CompletionRef<'_>),
    ) -> usize {
        lend_waiting(&mut self.responses, &mut self.wait, timeout, max, take)
    }

    /// Waits up to `timeout` for one completion; `None` if none arrived.
    pub fn complete(&mut self, timeout: Duration) -> Option<Completion> {
        let done = self
            .responses
            .pop(self.wait.policy(), Some(timeout))
            .ok()
            .map(|message| completion(&message));
        self.wait.record(done.is_some());
        done
    }

    /// The kernel loop's heartbeat: advances on every iteration, busy or
    /// idle, and while it waits for response space (rule H1). It is the sum
    /// of the request ring's consumer heartbeat and the response ring's
    /// producer heartbeat, the two words the loop beats.
    pub fn heartbeat(&self) -> u64 {
        self.submitter.consumer_heartbeat() + self.responses.producer_heartbeat()
    }

    /// Requests processed so far.
    pub fn processed(&self) -> u64 {
        self.processed.load(Ordering::Relaxed)
    }

    /// Stops the kernel and joins its thread, however long that takes.
    pub fn stop(mut self, mode: StopMode) -> StopReport {
        self.shut_down(mode, None)
    }

    /// Stops the kernel, waiting at most `timeout` for its thread. A thread
    /// still busy at the deadline (an implementation that never returns) is
    /// detached and the report says `exited: false`. It exits on its own
    /// once the call in hand returns: at once after an `Abandon` (the stop
    /// flag is set), after answering the queue after a `Drain` (the ring is
    /// closed).
    pub fn stop_within(&mut self, mode: StopMode, timeout: Duration) -> StopReport {
        self.shut_down(mode, Some(timeout))
    }

    fn shut_down(&mut self, mode: StopMode, timeout: Option<Duration>) -> StopReport {
        let mut report = StopReport::default();
        let Some(worker) = self.worker.take() else {
            report.exited = true;
            return report;
        };
        if mode == StopMode::Abandon {
            self.abort.store(true, Ordering::Release);
        }
        // No new requests; in Drain mode the loop answers the rest and then
        // sees the ring closed and drained.
        self.submitter.close();
        // Completions are taken while the thread finishes: a draining
        // loop with more answers than the response ring holds waits for
        // room, which only taking them gives it. No timeout, or one too
        // long to represent, waits without a deadline.
        let deadline = timeout.and_then(|timeout| std::time::Instant::now().checked_add(timeout));
        while !worker.is_finished()
            && deadline.is_none_or(|deadline| std::time::Instant::now() < deadline)
        {
            let mut took = false;
            while let Some(completion) = self.try_complete() {
                report.completions.push(completion);
                took = true;
            }
            if !took {
                thread::sleep(Duration::from_micros(100));
            }
        }
        let finished = worker.is_finished();
        if finished {
            report.exited = true;
            match worker.join() {
                Ok((mut requests, unanswered)) => {
                    report.abandoned.extend_from_slice(&unanswered);
                    // The ring is closed: `Empty` means a submitter claimed
                    // a slot before the close and has not published it
                    // yet; it will, and its `submit` answers `Ok`, so the
                    // request is waited for and listed (rule C3: `Closed`
                    // comes once every claimed slot is published), until
                    // the stop's deadline. The wait parks (a closed ring
                    // with a claim unpublished is no news to a consumer,
                    // and its parks are bounded) rather than spin.
                    let policy = WaitPolicy::default();
                    loop {
                        let left = deadline.map(|deadline| {
                            deadline.saturating_duration_since(std::time::Instant::now())
                        });
                        match requests.pop(&policy, left) {
                            Ok(message) => report.abandoned.push(message.request_id()),
                            Err(PopError::Corrupt { .. }) => {}
                            Err(_) => break,
                        }
                    }
                }
                Err(_) => report.thread_panicked = true,
            }
        }
        // Otherwise the worker is detached: dropping a JoinHandle does not
        // stop the thread, and the thread owns what it uses.
        while let Some(completion) = self.try_complete() {
            report.completions.push(completion);
        }
        report.processed = self.processed.load(Ordering::Relaxed);
        report
    }
}

/// How long a dropped kernel waits for its thread before detaching it.
const DROP_TIMEOUT: Duration = Duration::from_secs(5);

impl Drop for CpuPersistentKernel {
    /// A kernel dropped without `stop` abandons its queue and joins its
    /// thread, so no thread outlives its handle (unless the thread is stuck
    /// in an implementation for longer than five seconds; then it is
    /// detached rather than waited on forever).
    fn drop(&mut self) {
        self.shut_down(StopMode::Abandon, Some(DROP_TIMEOUT));
        // A thread detached by an earlier `stop_within(Drain, ..)` that
        // timed out is told to stop too, so that it does not wait for
        // response room that nobody will make.
        self.abort.store(true, Ordering::Release);
    }
}

/// The state the kernel thread owns.
struct KernelLoop {
    spec: KernelSpec,
    requests: Consumer,
    responses: SpscProducer,
    abort: Arc<AtomicBool>,
    processed: Arc<AtomicU64>,
    config: KernelConfig,
    wait: IdleWait,
    hooks: CpuHooks,
}

impl KernelLoop {
    /// The persistent-kernel loop (steps 1–5 in the crate docs). Returns the
    /// request consumer so that `stop` can list what was left, and the id
    /// of the request in hand when a stop ended the loop unanswered (rule
    /// 4 of `kernel.rs`: its slot is released, so the ring lists it no
    /// more).
    fn run(mut self, cpu: crate::spec::CpuFn) -> (Consumer, Vec<u64>) {
        let response_max = self.spec.response.max_bytes();
        let mut unanswered = Vec::new();
        'serve: while !self.abort.load(Ordering::Acquire) {
            // 4. Heartbeat, busy or idle.
            self.requests.beat();
            // 1. Wait for a request, bounded so stops and heartbeats go on.
            let message = match self
                .requests
                .pop(self.wait.policy(), Some(self.config.idle_poll))
            {
                Ok(message) => message,
                Err(PopError::Closed) => break,
                // Timeout, or a corrupt slot the ring already skipped.
                Err(_) => {
                    self.wait.record(false);
                    continue;
                }
            };
            self.wait.record(true);
            let request_id = message.request_id();
            // A hang a test armed (`hooks` rule 2): hold the request with
            // no heartbeat; an abandoning stop ends it unanswered (rule 3).
            if let Some(hang) = self.hooks.on_request() {
                let until = std::time::Instant::now() + hang;
                while std::time::Instant::now() < until {
                    if self.abort.load(Ordering::Acquire) {
                        unanswered.push(request_id);
                        break 'serve;
                    }
                    thread::sleep(Duration::from_millis(1));
                }
            }
            // 3 (first half). A response slot, waiting while the host is
            // behind on collecting.
            if !wait_for_room(&mut self.responses, &self.abort) {
                unanswered.push(request_id);
                break;
            }
            let Ok(mut chunk) = self.responses.try_reserve(1) else {
                unanswered.push(request_id);
                break;
            };
            let Some(mut slot) = chunk.slot(0) else {
                unanswered.push(request_id);
                break;
            };
            // 2. Process: shape check, then the implementation, caught.
            let request = message.payload();
            let output = &mut slot.payload_mut()[..response_max];
            let outcome = match self.spec.request.check(request.len()) {
                Err(_) => Err(Status::BadLength),
                Ok(_) => catch_unwind(AssertUnwindSafe(|| cpu(request, output)))
                    .unwrap_or(Err(Status::Fault)),
            };
            let (len, status) = match outcome {
                Ok(len) if len <= response_max => (len, Status::Ok),
                Ok(_) => (0, Status::Fault),
                Err(status) => (0, status),
            };
            // `len <= response_max <= max_payload`, so this cannot fail.
            let _ = slot.set_len(len);
            slot.set_status(status.code());
            slot.set_request_id(request_id);
            // 3. Release the request, then publish the response (rule K1:
            // whoever sees the response may count the request's slot free).
            drop(message);
            chunk.commit();
            self.processed.fetch_add(1, Ordering::Relaxed);
        }
        // The kernel is the response ring's only producer: closing it here
        // is a clean end of stream (rule S5).
        self.responses.close();
        (self.requests, unanswered)
    }

    /// Publishes one response: false if the loop must end.
    fn publish(&mut self, request_id: u64, status: Status, payload: &[u8]) -> bool {
        if !wait_for_room(&mut self.responses, &self.abort) {
            return false;
        }
        let Ok(mut chunk) = self.responses.try_reserve(1) else {
            return false;
        };
        let Some(mut slot) = chunk.slot(0) else {
            return false;
        };
        let len = payload.len().min(slot.payload_mut().len());
        slot.payload_mut()[..len].copy_from_slice(&payload[..len]);
        // `len` is at most the slot's payload, so this cannot fail.
        let _ = slot.set_len(len);
        slot.set_status(status.code());
        slot.set_request_id(request_id);
        chunk.commit();
        self.processed.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The loop for a device that answers micro-batches: steps 1–5 of the
    /// crate docs, with step 2 taking every request queued (up to the
    /// device's micro-batch) and running them as one dispatch. The
    /// requests' slots are released when taken, and the responses are
    /// published after (rule K1). A request that fails the shape is
    /// answered at once, without the device; the others are answered in
    /// the order taken. An abandoning stop ends the loop between
    /// micro-batches, or while the device works on one (the device's
    /// `beat` returns false); requests of the one in hand that were not
    /// answered go back as unanswered, for the stop report.
    fn run_batched(mut self, mut device: Box<dyn MicroBatch>) -> (Consumer, Vec<u64>) {
        let response_max = self.spec.response.max_bytes();
        let most = device.max_requests().max(1);
        let mut taken = Taken::default();
        let mut rejected = Vec::new();
        let mut out = Vec::new();
        let mut answers = Vec::new();
        let mut unanswered = Vec::new();
        'serve: while !self.abort.load(Ordering::Acquire) {
            self.requests.beat();
            taken.clear();
            rejected.clear();
            let shape = self.spec.request;
            match self
                .requests
                .pop(self.wait.policy(), Some(self.config.idle_poll))
            {
                Ok(message) => taken.sort(&shape, &message, &mut rejected),
                Err(PopError::Closed) => break,
                Err(_) => {
                    self.wait.record(false);
                    continue;
                }
            }
            self.wait.record(true);
            while taken.len() + rejected.len() < most {
                match self.requests.try_pop() {
                    Ok(message) => taken.sort(&shape, &message, &mut rejected),
                    Err(TryPopError::Corrupt { .. }) => {}
                    Err(_) => break,
                }
            }
            for (at, &request_id) in rejected.iter().enumerate() {
                if !self.publish(request_id, Status::BadLength, &[]) {
                    unanswered.extend_from_slice(&rejected[at..]);
                    unanswered.extend_from_slice(&taken.ids);
                    break 'serve;
                }
            }
            if taken.len() == 0 {
                continue;
            }
            out.clear();
            answers.clear();
            let requests = &self.requests;
            let abort = &self.abort;
            let beat = || {
                requests.beat();
                !abort.load(Ordering::Acquire)
            };
            // A panicking device answers Fault, as a panicking CPU
            // implementation does.
            let given = catch_unwind(AssertUnwindSafe(|| {
                device.run(&taken, &mut out, &mut answers, &beat)
            }))
            .unwrap_or_else(|_| {
                answers.clear();
                Given::Answered
            });
            if given == Given::Up {
                unanswered.extend_from_slice(&taken.ids);
                break 'serve;
            }
            let lost = given == Given::Lost;
            for i in 0..taken.len() {
                let (status, payload) = match answers.get(i) {
                    Some((Status::Ok, span)) if span.len() <= response_max => {
                        match out.get(span.clone()) {
                            Some(payload) => (Status::Ok, payload),
                            None => (Status::Fault, &[][..]),
                        }
                    }
                    Some((Status::Ok, _)) | None => (Status::Fault, &[][..]),
                    Some((status, _)) => (*status, &[][..]),
                };
                if !self.publish(taken.ids[i], status, payload) {
                    unanswered.extend_from_slice(&taken.ids[i..]);
                    break 'serve;
                }
            }
            if lost {
                // `Given::Lost`: the response ring stays open (a closed
                // one would answer its owner's every wait at once), and
                // the loop beats no more.
                tracing::error!(
                    kernel = self.spec.id,
                    "the device is lost; the kernel loop ends"
                );
                return (self.requests, unanswered);
            }
        }
        self.responses.close();
        (self.requests, unanswered)
    }
}

/// Waits until the response ring has a free slot: false once the
/// kernel is stopped with `Abandon` or the ring is closed.
fn wait_for_room(responses: &mut SpscProducer, abort: &AtomicBool) -> bool {
    loop {
        // Probe for room; an SPSC reservation dropped uncommitted has
        // no effect. (Keeping the first reservation would need a borrow
        // that outlives the loop, which the borrow checker does not yet
        // accept.)
        match responses.try_reserve(1).map(drop) {
            Ok(()) => return true,
            Err(ReserveError::Full { .. }) if !abort.load(Ordering::Acquire) => {
                // A request may be borrowed from the request ring: beat
                // on the response ring's heartbeat instead.
                responses.beat();
                thread::sleep(Duration::from_micros(50));
            }
            Err(_) => return false,
        }
    }
}
