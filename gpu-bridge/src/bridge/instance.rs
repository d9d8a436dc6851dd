//! One persistent kernel on one device, as the bridge runs it.
//!
//! # Protocol
//!
//! 1. **Slots.** An instance has `capacity` slots, the size of its rings.
//!    A call takes a free slot before anything else, waiting at most
//!    `overload_timeout` for one (then `Overloaded`; a group takes all its
//!    slots at once). The slot holds the call's answer until the call
//!    takes it (or, for a call dropped unanswered, until the answer lands),
//!    and only then is it free again (`slots.rs` rules 1 and 2). So at
//!    most `capacity` requests are in flight, the request ring can never
//!    be full when the
//!    bridge submits (kernels release a request's slot before publishing
//!    its response, rule K1 of `docs/ring-protocol.md`), and memory is
//!    bounded by the slots. Several work-groups release slots out of
//!    order, so there the ring can still be full for a moment: requests
//!    then stay staged, and the completion thread flushes them as answers
//!    come back.
//! 2. **Request ids** are `sequence << 20 | slot index`, the sequence's
//!    low 44 bits: unique among all requests that can be in flight
//!    together (ids repeat only after 2^44 requests, about 20 days at 10 M
//!    a second, and are ordered across that wrap by `sequence_before`),
//!    and a completion finds its slot without a map. A completion whose id
//!    does not match its slot's is stale and dropped.
//! 3. **Micro-batching** (flat combining): a call that finds the flusher
//!    lock free takes it, moves anything staged into the ring, then writes
//!    its own request straight from its slice. A call that finds the lock
//!    held stages a copy in a lock-free queue and tries to flush. The
//!    flusher moves staged requests into the ring up to `micro_batch` per
//!    claim, publishing each slot as soon as it is written, so requests
//!    that arrive together cost one claim and the kernel never waits for
//!    the end of a batch. After releasing the lock, a flusher looks at the
//!    queue again; a SeqCst fence on both sides (stage, fence, try-lock;
//!    unlock, fence, look) means a request staged while the lock was held
//!    is seen either by its own caller or by the departing flusher, so none
//!    is stranded.
//! 4. **Completions.** One thread per instance owns the kernel handle: it
//!    waits for completions, dispatches each to its slot, and watches the
//!    heartbeat.
//! 5. **Hangs.** If the heartbeat stands still for `hang_timeout` while
//!    requests are in flight, the thread takes the flusher lock (no more
//!    submissions), stops the kernel (abandon), delivers any answers it
//!    still gave, fails every other pending request with `DeviceHung`, and
//!    relaunches. If the relaunch fails, the instance is marked failed, the
//!    bridge routes around it, and the thread tries again every 250 ms (a
//!    device whose compute units the hung kernel still holds may free up).
//!    A request answered while it sat staged is dropped by the flusher,
//!    never submitted without its slot.
//! 6. **Health.** The completion thread notes when the heartbeat last
//!    moved, and counts hangs and relaunches, for
//!    [`GpuBridge::kernel_health`](crate::GpuBridge::kernel_health). An
//!    idle kernel is probed: a request like any other (a slot, the ring,
//!    the kernel's loop) holding the smallest zeroed payload the kernel's
//!    shape allows; any answer the kernel gives, even a rejection, shows
//!    it answers. A probe is not counted as a request: not in the broker's
//!    counters, not in the request metrics. A busy kernel (requests in
//!    flight, or no payload its shape allows) is not sent one, which would
//!    only queue behind the work: it answers if its heartbeat moved within
//!    the probe's bound (it beats for every request it takes, not while
//!    one runs). A probe left unanswered past the bound fails every later
//!    check until it is answered or failed: its own slot must not pass for
//!    work.
//! 7. **Stop.** A stop request is carried out by the completion thread:
//!    drain (flush what is staged, let the kernel answer everything) or
//!    abandon (stop at once); whatever is still pending afterwards fails
//!    with `ShutDown`. Then the thread exits.
//! 8. **Waiting for an answer.** A call waits on its slot (`slots.rs`): the
//!    completion thread copies the answer in, lent from the response ring,
//!    and wakes the call's task. While at most `SPIN_MAX_IN_FLIGHT`
//!    requests are in flight, a call first spins for up to four times the
//!    kernel's average round trip (capped by `BridgeConfig::spin`; not at
//!    all where the average is over half the cap): a lone caller then
//!    takes its answer without its worker parking and being woken, which
//!    costs more than a small request's whole round trip.
//! 9. **Groups.** `execute_many` takes its slots together, writes its
//!    requests into the ring in one claim per `capacity` straight from the
//!    caller's slices (after anything staged), and is woken once, by its
//!    last answer. A request whose shape the ring refuses fails alone and
//!    the rest go in; a ring that stops mid-batch fails the rest.
//!    A hang recovery between a group's claims and its submission may have
//!    failed some of its members: the group then sends only those still
//!    owed an answer (`recoveries`), since a failed member's slot may
//!    already hold another request.
//! 10. **Serving the ring.** The response ring has one consumer at a
//!     time, behind the `serving` lock. The completion thread holds it
//!     while it waits for answers. A spinning caller (rule 8) takes it only
//!     with `try_lock`, lands and settles whatever is ready, and flushes
//!     staged requests; finding it held, it sets `delegate` and yields its
//!     core. Seeing `delegate`, the completion thread steps aside (parks,
//!     looking at the ring and the heartbeat at least every millisecond)
//!     as long as every slot in use belongs to a spinning caller
//!     (`pollers`, counted while they spin). A call takes its slot before
//!     it can park, and a waiter that parks reads `aside` after it
//!     registered its waker; the thread sets `aside` and then counts the
//!     slots in use (all sequentially consistent), so either the thread
//!     sees the waiter's slot and stays, or the waiter sees `aside` and
//!     wakes it. A spinner counted for a slot that is not its own (a
//!     group's, freed as its answers land) reads `aside` when it leaves
//!     and wakes the thread if slots other than its own are still in use.
//!     A lone caller thus takes its answer from the ring itself, with no
//!     thread hop and no wake-up, and a crowd of parked callers costs no
//!     shared counter per request.
//! 11. **Serving under load.** The completion thread waits holding the
//!     ring only when it found nothing ready: while answers flow it takes
//!     what is ready, lets go of the ring and yields its core before it
//!     looks again. A call about to park (its waker registered) takes the
//!     ring if it is free (`try_lock`, never asking the thread to step
//!     aside) and lands what is ready, at most `capacity` answers, so the
//!     tasks it wakes go to its own worker's queue rather than being woken
//!     from outside the runtime, and flushes what is staged; if it landed
//!     any, it looks at its own slot again before parking, so an answer it
//!     landed for itself is taken in this poll (the landing has woken its
//!     task, which is then polled once more for nothing). It only ever
//!     adds a consumer behind the same lock: the thread never steps aside
//!     for it (rule 10 is unchanged), so an answer nobody else takes is
//!     still the thread's to land. Answers landed by callers are counted
//!     (`landed`), and the thread counts a change of that count as
//!     progress (rule 5), as it does its own. While a caller lands, the
//!     thread waits for the ring's lock behind it (the caller's landing,
//!     broker count and metrics: bounded by `capacity` answers).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use granary_kernels::{
    Backend, BackendKind, BatchSubmitError, CompletionRef, KernelSpec, PersistentKernel, Status,
    StopMode, SubmitError, Submitter,
};

use super::config::BridgeConfig;
use super::error::ExecuteError;
use super::slots::{Group, Landing, NoSlot, Owner, Slots, Ticket, sequence_before};
use crate::broker::{DeviceBroker, DeviceId, Reservation};

/// A claim on one request's answer.
pub(crate) type Answer<'a> = Ticket<'a, KernelInstance>;

/// A ticket spins before it parks only while at most this many requests
/// are in flight on its kernel (rule 8): a lone caller waits for latency,
/// a crowd is better served by the worker running other tasks.
const SPIN_MAX_IN_FLIGHT: usize = 2;

/// A request staged for the flusher.
struct Staged {
    request_id: u64,
    payload: Vec<u8>,
}

/// What the serving lock guards (rule 10).
struct Serving {
    kernel: Option<Box<dyn PersistentKernel>>,
    /// Kept between drains, so a drain allocates nothing once warm.
    drain: Drain,
}

/// One drain's landed answers and their count (rule 4 of `slots.rs`).
#[derive(Default)]
struct Drain {
    landing: Landing,
    /// Round trips of the answers landed, in nanoseconds.
    answered: Vec<u64>,
    /// Failures landed.
    failed: usize,
    /// When the drain's first answer landed: one clock read per drain.
    now: Option<Instant>,
}

/// What the flusher lock guards.
struct Flusher {
    /// `None` while stopping, stopped or failed: staged requests then fail.
    submitter: Option<Submitter>,
    /// Reused between flushes.
    batch: Vec<(u64, Vec<u8>)>,
}

/// Labels and handles for the instance's metrics.
struct InstanceMetrics {
    requests: metrics::Counter,
    latency: metrics::Histogram,
    queue_depth: metrics::Gauge,
}

/// How to relaunch the kernel after a hang.
pub(crate) struct Launcher {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) device_index: usize,
}

/// How often a failed instance tries to relaunch its kernel.
const RELAUNCH_RETRY: Duration = Duration::from_millis(250);

const RUNNING: u8 = 0;
const STOP_DRAIN: u8 = 1;
const STOP_ABANDON: u8 = 2;

/// One persistent kernel on one device, with its slots and its thread.
pub(crate) struct KernelInstance {
    spec: KernelSpec,
    device: DeviceId,
    backend: BackendKind,
    device_index: u32,
    config: BridgeConfig,
    broker: DeviceBroker,
    /// Rules 1 and 2: the requests' slots, which are also the instance's
    /// admission control.
    slots: Slots,
    /// Hang recoveries so far (rule 5), for groups claiming slots across
    /// one.
    recoveries: AtomicU64,
    next_sequence: AtomicU64,
    /// Rule 8: a moving average of answered requests' round trips, in
    /// nanoseconds (0 before the first).
    round_trip_ns: AtomicU64,
    /// Rule 3.
    staging: ArrayQueue<Staged>,
    flusher: Mutex<Flusher>,
    /// The running kernel and the drain scratch; the kernel is `None` once
    /// stopped (rule 7). The completion thread holds it while it waits for
    /// answers; a spinning caller takes it only with `try_lock` (rule 10).
    serving: Mutex<Serving>,
    /// Rule 10: set by a spinning caller that found the kernel held; the
    /// completion thread then steps aside while no waiter is parked.
    delegate: AtomicBool,
    /// Rule 10: the completion thread has stepped aside.
    aside: AtomicBool,
    /// Rule 11: answers landed by callers, for the thread's progress.
    landed: AtomicU64,
    /// Rule 10: callers spinning for their answers now.
    pollers: AtomicUsize,
    /// The completion thread, to wake it when it stepped aside.
    completions: OnceLock<thread::Thread>,
    /// `RUNNING`, `STOP_DRAIN` or `STOP_ABANDON`.
    stop: AtomicU8,
    /// Set when a relaunch failed (rule 5); the bridge routes around it.
    failed: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
    metrics: InstanceMetrics,
    /// Rule 6: when the instance started, and how long after that the
    /// heartbeat last moved (nanoseconds).
    born: Instant,
    last_beat: AtomicU64,
    hangs: AtomicU64,
    relaunches: AtomicU64,
    /// The last probe's request id, and when it was sent (rule 6).
    last_probe: Mutex<Option<(u64, Instant)>>,
    /// The device memory its rings take, held for its life.
    _rings: Option<Reservation>,
}

impl KernelInstance {
    /// Launches the kernel and starts its completion thread.
    pub(crate) fn start(
        spec: KernelSpec,
        device: DeviceId,
        launcher: Launcher,
        broker: DeviceBroker,
        config: BridgeConfig,
        rings: Option<Reservation>,
    ) -> Result<Arc<KernelInstance>, granary_kernels::BackendError> {
        let kernel = launcher
            .backend
            .launch(launcher.device_index, spec, &config.kernel)?;
        let Some(submitter) = kernel.submitter() else {
            return Err(granary_kernels::BackendError::Device(
                "the kernel stopped as it started".into(),
            ));
        };
        let capacity = config.kernel.capacity as usize;
        let backend = launcher.backend.kind();
        let device_index = launcher.device_index as u32;
        let labels = [
            ("kernel", spec.id.to_string()),
            ("backend", format!("{backend:?}")),
            ("device", device_index.to_string()),
        ];
        let instance = Arc::new(KernelInstance {
            spec,
            device,
            backend,
            device_index,
            config,
            broker,
            slots: Slots::new(capacity, spec.response.max_bytes()),
            recoveries: AtomicU64::new(0),
            next_sequence: AtomicU64::new(0),
            round_trip_ns: AtomicU64::new(0),
            staging: ArrayQueue::new(capacity),
            flusher: Mutex::new(Flusher {
                submitter: Some(submitter),
                batch: Vec::with_capacity(config.micro_batch),
            }),
            serving: Mutex::new(Serving {
                kernel: Some(kernel),
                drain: Drain::default(),
            }),
            delegate: AtomicBool::new(false),
            aside: AtomicBool::new(false),
            landed: AtomicU64::new(0),
            pollers: AtomicUsize::new(0),
            completions: OnceLock::new(),
            stop: AtomicU8::new(RUNNING),
            failed: AtomicBool::new(false),
            thread: Mutex::new(None),
            metrics: InstanceMetrics {
                requests: metrics::counter!("granary_gpu_requests_total", &labels),
                latency: metrics::histogram!("granary_gpu_request_seconds", &labels),
                queue_depth: metrics::gauge!("granary_gpu_queue_depth", &labels),
            },
            born: Instant::now(),
            last_beat: AtomicU64::new(0),
            hangs: AtomicU64::new(0),
            relaunches: AtomicU64::new(0),
            last_probe: Mutex::new(None),
            _rings: rings,
        });
        let worker = instance.clone();
        let handle = thread::Builder::new()
            .name(format!("granary-bridge-{}", spec.id))
            .spawn(move || {
                let serving = worker.clone();
                let outcome = catch_unwind(AssertUnwindSafe(move || serving.run(launcher)));
                if outcome.is_err() {
                    // A bug, but no caller may wait forever for it: fail
                    // everything pending and refuse new requests.
                    tracing::error!(kernel = worker.spec.id, "the completion thread panicked");
                    worker.failed.store(true, Ordering::Release);
                    lock(&worker.flusher).submitter = None;
                    // Answers landed before the panic are published, and
                    // the kernel is stopped as its thread's unwinding
                    // would have done before it was shared.
                    let (kernel, mut drain) = {
                        let mut serving = lock(&worker.serving);
                        (serving.kernel.take(), std::mem::take(&mut serving.drain))
                    };
                    worker.settle(&mut drain);
                    worker.fail_all(&ExecuteError::DeviceFailed {
                        kernel: worker.spec.id,
                        backend: worker.backend,
                        reason: "the bridge's completion thread panicked".into(),
                    });
                    worker.slots.close();
                    if let Some(kernel) = kernel {
                        reap(kernel, false);
                    }
                }
            })
            .map_err(|err| granary_kernels::BackendError::Device(err.to_string()))?;
        let _ = instance.completions.set(handle.thread().clone());
        *lock(&instance.thread) = Some(handle);
        Ok(instance)
    }

    pub(crate) fn backend(&self) -> BackendKind {
        self.backend
    }

    /// Whether the instance can take requests (rule 5).
    pub(crate) fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Rule 1: `count` free slots (one for a single call), waiting at most
    /// `overload_timeout` for them.
    async fn acquire(&self, count: usize, into: &mut Vec<u32>) -> Result<(), ExecuteError> {
        let started = Instant::now();
        // A timeout too long to represent waits for good (a century).
        let deadline = started
            .checked_add(self.config.overload_timeout)
            .or_else(|| started.checked_add(Duration::from_secs(100 * 365 * 86_400)))
            .unwrap_or(started);
        match self.slots.take(count, deadline, into).await {
            Ok(()) => Ok(()),
            Err(NoSlot::Closed) => Err(ExecuteError::ShutDown),
            Err(NoSlot::TimedOut) => Err(ExecuteError::Overloaded {
                kernel: self.spec.id,
                waited: started.elapsed(),
            }),
        }
    }

    /// One free slot for a single call (rule 1).
    async fn acquire_one(&self) -> Result<u32, ExecuteError> {
        if let Some(index) = self.slots.try_take() {
            return Ok(index);
        }
        let mut one = Vec::with_capacity(1);
        self.acquire(1, &mut one).await?;
        one.pop().ok_or_else(|| self.unavailable())
    }

    /// Makes slot `index` hold a request (rule 1) and returns its id; on
    /// failure the slot is given back.
    fn register(
        &self,
        index: u32,
        sequence: u64,
        started: Instant,
        probe: bool,
        group: Option<(&Arc<Group>, usize)>,
    ) -> Result<u64, ExecuteError> {
        // Counted in the broker until `answer` finishes it (a probe is not:
        // rule 6, which remembers it instead). The broker knows every
        // device an instance runs on, so this cannot fail.
        if !probe {
            if let Err(err) = self.broker.enter(self.device) {
                self.slots.give_back(index);
                return Err(ExecuteError::DeviceFailed {
                    kernel: self.spec.id,
                    backend: self.backend,
                    reason: err.to_string(),
                });
            }
        }
        let request_id = self.slots.claim(index, sequence, started, probe, group);
        if probe {
            *lock(&self.last_probe) = Some((request_id, Instant::now()));
        } else {
            self.metrics.queue_depth.increment(1.0);
        }
        Ok(request_id)
    }

    fn stage_with(
        &self,
        index: u32,
        payload: Vec<u8>,
        probe: bool,
    ) -> Result<Answer<'_>, ExecuteError> {
        let sequence = self.next_sequence.fetch_add(1, Ordering::Relaxed);
        let request_id = self.register(index, sequence, Instant::now(), probe, None)?;
        if let Err(staged) = self.staging.push(Staged {
            request_id,
            payload,
        }) {
            // Cannot happen: staged requests hold slots, and the queue has
            // one entry per slot.
            self.finish(staged.request_id, Err(self.unavailable()));
        }
        Ok(Ticket::new(self, request_id))
    }

    /// Sends one request and returns the ticket its answer comes on. When
    /// no flush is under way, the caller takes the flusher lock and writes
    /// its request straight into the ring (after anything staged), with no
    /// copy of its own; otherwise it stages a copy for the flusher, which
    /// is where requests that arrive together are batched (rule 3).
    pub(crate) async fn send(&self, input: &[u8]) -> Result<Answer<'_>, ExecuteError> {
        let index = self.acquire_one().await?;
        self.send_with(index, input, false)
    }

    /// [`KernelInstance::send`] once slot `index` is held.
    fn send_with(&self, index: u32, input: &[u8], probe: bool) -> Result<Answer<'_>, ExecuteError> {
        let mut flusher = match self.flusher.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                let ticket = self.stage_with(index, input.to_vec(), probe)?;
                self.flush();
                return Ok(ticket);
            }
        };
        let sequence = self.next_sequence.fetch_add(1, Ordering::Relaxed);
        let request_id = self.register(index, sequence, Instant::now(), probe, None)?;
        self.flush_locked(&mut flusher);
        let outcome = match &flusher.submitter {
            Some(submitter) => submitter.submit(request_id, input),
            None => Err(SubmitError::Stopped(input)),
        };
        let failure = match outcome {
            Ok(()) => None,
            // Rule 1: only out-of-order releases (several work-groups)
            // leave the ring full; the request waits staged until the
            // completion thread sees a slot free.
            Err(SubmitError::Full(_)) => self.stage_copy(request_id, input).err(),
            Err(SubmitError::WrongShape(error, _)) => Some(ExecuteError::WrongShape {
                kernel: self.spec.id,
                error,
            }),
            Err(SubmitError::Stopped(_)) => Some(self.unavailable()),
        };
        drop(flusher);
        if let Some(error) = failure {
            self.finish(request_id, Err(error));
        }
        // Requests staged while the lock was held.
        fence(Ordering::SeqCst);
        self.flush_staged();
        Ok(Ticket::new(self, request_id))
    }

    /// Sends every input (at most `capacity`) as `group`'s members, in
    /// input order (rule 9): the slots taken together, one ring claim
    /// written straight from the caller's slices, the answers landing in
    /// the group, and one wake when the last is published. A member that
    /// never reaches the ring is refused in the group, and counted as a
    /// failure.
    pub(crate) async fn send_many<I: AsRef<[u8]>>(&self, inputs: &[I], group: &Arc<Group>) {
        let refuse = |member: usize, error: ExecuteError| {
            record_failure(self.spec.id, self.backend, &error);
            group.refuse(member, error);
        };
        let (inputs, beyond) = inputs.split_at(inputs.len().min(self.capacity()));
        // More than the ring holds could never be in flight at once.
        for member in inputs.len()..inputs.len() + beyond.len() {
            refuse(
                member,
                ExecuteError::DeviceFailed {
                    kernel: self.spec.id,
                    backend: self.backend,
                    reason: format!("a group larger than the ring's {} slots", self.capacity()),
                },
            );
        }
        // Flush before waiting for slots, or requests staged by others could
        // wait on this call's slots.
        self.flush();
        let mut indices = Vec::with_capacity(inputs.len());
        if let Err(err) = self.acquire(inputs.len(), &mut indices).await {
            for member in 0..inputs.len() {
                refuse(member, err.clone());
            }
            return;
        }
        let mut batch: Vec<(u64, &[u8])> = Vec::with_capacity(inputs.len());
        // Rule 9: read before the sequence range is taken.
        let recoveries = self.recoveries.load(Ordering::SeqCst);
        // One clock read and one sequence range for the group: its
        // requests start together.
        let started = Instant::now();
        let first = self
            .next_sequence
            .fetch_add(inputs.len() as u64, Ordering::SeqCst);
        for ((member, input), index) in inputs.iter().enumerate().zip(indices) {
            let sequence = first + member as u64;
            match self.register(index, sequence, started, false, Some((group, member))) {
                Ok(request_id) => batch.push((request_id, input.as_ref())),
                Err(err) => refuse(member, err),
            }
        }
        if !batch.is_empty() {
            self.submit_group(&mut batch, recoveries);
        }
    }

    /// The instance's slots: the most requests in flight at once.
    pub(crate) fn capacity(&self) -> usize {
        self.config.kernel.capacity as usize
    }

    /// Rules 1 and 3: stages a copy of a request the ring cannot take now,
    /// for the flusher to send as slots come free. The queue holds one
    /// entry per slot, so it cannot be full while the request holds one.
    fn stage_copy(&self, request_id: u64, input: &[u8]) -> Result<(), ExecuteError> {
        self.staging
            .push(Staged {
                request_id,
                payload: input.to_vec(),
            })
            .map_err(|_| self.unavailable())
    }

    /// Writes a group's requests into the ring in one claim (rule 9),
    /// after anything staged; what the ring cannot take now is staged.
    /// `recoveries` is the count of hang recoveries when the group's slots
    /// were claimed: a recovery since then may have failed members, which
    /// are not sent (their slots may already hold other requests).
    fn submit_group(&self, batch: &mut Vec<(u64, &[u8])>, recoveries: u64) {
        let mut flusher = lock(&self.flusher);
        if self.recoveries.load(Ordering::SeqCst) != recoveries {
            batch.retain(|&(request_id, _)| self.is_pending(request_id));
        }
        self.flush_locked(&mut flusher);
        let outcome = match &flusher.submitter {
            Some(submitter) => submitter.submit_batch(batch),
            None => Err(BatchSubmitError::Stopped),
        };
        let mut failures = Vec::new();
        match outcome {
            Ok(()) => {}
            Err(BatchSubmitError::WrongShape { .. }) => {
                // Each request on its own: only the ones that do not fit
                // fail, the rest go in.
                for &(request_id, input) in batch.iter() {
                    let submitted = match &flusher.submitter {
                        Some(submitter) => submitter.submit(request_id, input),
                        None => Err(SubmitError::Stopped(input)),
                    };
                    match submitted {
                        Ok(()) => {}
                        Err(SubmitError::WrongShape(error, _)) => failures.push((
                            request_id,
                            ExecuteError::WrongShape {
                                kernel: self.spec.id,
                                error,
                            },
                        )),
                        Err(SubmitError::Full(input)) => {
                            if let Err(error) = self.stage_copy(request_id, input) {
                                failures.push((request_id, error));
                            }
                        }
                        Err(SubmitError::Stopped(_)) => {
                            failures.push((request_id, self.unavailable()));
                        }
                    }
                }
            }
            Err(BatchSubmitError::Interrupted { enqueued, .. }) => {
                let error = ExecuteError::DeviceFailed {
                    kernel: self.spec.id,
                    backend: self.backend,
                    reason: "the request ring refused part of a batch".into(),
                };
                for &(request_id, _) in &batch[enqueued..] {
                    failures.push((request_id, error.clone()));
                }
            }
            Err(BatchSubmitError::Stopped) => {
                for &(request_id, _) in batch.iter() {
                    failures.push((request_id, self.unavailable()));
                }
            }
            // Full (out-of-order releases only, rule 1) or a count the ring
            // does not take in one claim: staged, the flusher feeds them in.
            Err(_) => {
                for &(request_id, input) in batch.iter() {
                    if let Err(error) = self.stage_copy(request_id, input) {
                        failures.push((request_id, error));
                    }
                }
            }
        }
        drop(flusher);
        for (request_id, error) in failures {
            self.finish(request_id, Err(error));
        }
        fence(Ordering::SeqCst);
        self.flush_staged();
    }

    /// Rule 6: whether the kernel answers within `timeout`: an idle one
    /// is sent a probe (`Answered` with its round trip, even if rejected),
    /// a busy one answers by its heartbeat (`Busy`); `Err` says why not.
    pub(crate) async fn probe(&self, timeout: Duration) -> Result<ProbeAnswer, String> {
        if self.is_failed() {
            return Err("its relaunch failed; the bridge retries it".into());
        }
        if self.stop.load(Ordering::Acquire) != RUNNING {
            return Err("stopped".into());
        }
        // An earlier probe still unanswered past the bound: the kernel is
        // not answering, whatever its heartbeat (the probe's own slot would
        // otherwise make it look busy).
        let last = *lock(&self.last_probe);
        if let Some((request_id, sent)) = last {
            if self.is_pending(request_id) && sent.elapsed() >= timeout {
                return Err(format!(
                    "its last probe has waited {:?} unanswered",
                    sent.elapsed()
                ));
            }
        }
        // Busy: its answers show whether it works, and a probe would only
        // queue behind them (a saturated kernel is not a hung one).
        let idle = match probe_len(&self.spec.request) {
            Some(len) if self.in_flight() == 0 => self.slots.try_take().map(|index| (index, len)),
            _ => None,
        };
        let Some((index, len)) = idle else {
            let since_heartbeat = self.health().since_heartbeat;
            return if since_heartbeat < timeout {
                Ok(ProbeAnswer::Busy { since_heartbeat })
            } else {
                Err(format!(
                    "its heartbeat stood still for {since_heartbeat:?} with {} request(s) in flight",
                    self.in_flight()
                ))
            };
        };
        let started = Instant::now();
        let ticket = self
            .send_with(index, &vec![0u8; len], true)
            .map_err(|err| err.to_string())?;
        match tokio::time::timeout(timeout, ticket.answer()).await {
            Ok(Ok(_) | Err(ExecuteError::Rejected { .. } | ExecuteError::KernelFault { .. })) => {
                Ok(ProbeAnswer::Answered(started.elapsed()))
            }
            Ok(Err(err)) => Err(err.to_string()),
            Err(_elapsed) => Err(format!("no answer within {timeout:?}")),
        }
    }

    /// Rule 6: a snapshot of the instance's health.
    pub(crate) fn health(&self) -> InstanceHealth {
        let beat = Duration::from_nanos(self.last_beat.load(Ordering::Acquire));
        InstanceHealth {
            kernel: self.spec.id,
            device: self.device,
            backend: self.backend,
            device_index: self.device_index,
            since_heartbeat: self.born.elapsed().saturating_sub(beat),
            in_flight: self.in_flight(),
            capacity: self.config.kernel.capacity as usize,
            hangs: self.hangs.load(Ordering::Relaxed),
            relaunches: self.relaunches.load(Ordering::Relaxed),
            failed: self.is_failed(),
        }
    }

    /// Rule 6: the heartbeat moved now.
    fn beat(&self) {
        let nanos = u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_beat.store(nanos, Ordering::Release);
    }

    /// Rule 3: moves staged requests into the ring. Stops early when the
    /// ring is full; the completion thread flushes again as answers free
    /// slots.
    pub(crate) fn flush(&self) {
        loop {
            fence(Ordering::SeqCst);
            let mut flusher = match self.flusher.try_lock() {
                Ok(guard) => guard,
                Err(TryLockError::WouldBlock) => return,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            };
            let ring_full = self.flush_locked(&mut flusher);
            drop(flusher);
            fence(Ordering::SeqCst);
            if ring_full || self.staging.is_empty() {
                return;
            }
        }
    }

    /// Rule 3: [`flush`](Self::flush), if anything is staged.
    fn flush_staged(&self) {
        if !self.staging.is_empty() {
            self.flush();
        }
    }

    /// Moves staged requests into the ring, `micro_batch` per claim.
    /// Returns whether it stopped because the ring was full.
    fn flush_locked(&self, flusher: &mut Flusher) -> bool {
        let Flusher { submitter, batch } = flusher;
        let mut ring_full = false;
        loop {
            batch.clear();
            while batch.len() < self.config.micro_batch {
                match self.staging.pop() {
                    // A request answered while it sat staged (failed by a
                    // hang recovery) is dropped: its slot and permit are
                    // already someone else's.
                    Some(staged) if self.is_pending(staged.request_id) => {
                        batch.push((staged.request_id, staged.payload));
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            let outcome = match submitter {
                Some(submitter) => submitter.submit_batch(batch),
                None => Err(BatchSubmitError::Stopped),
            };
            let failed_from = match outcome {
                Ok(()) => continue,
                Err(BatchSubmitError::Full) => {
                    // Rule 1: out-of-order releases only. Keep them staged.
                    for (request_id, payload) in batch.drain(..) {
                        if self
                            .staging
                            .push(Staged {
                                request_id,
                                payload,
                            })
                            .is_err()
                        {
                            self.finish(request_id, Err(self.unavailable()));
                        }
                    }
                    ring_full = true;
                    break;
                }
                Err(BatchSubmitError::Interrupted { enqueued, .. }) => enqueued,
                Err(_) => 0,
            };
            let error = match outcome {
                Err(BatchSubmitError::Stopped) => self.unavailable(),
                Err(BatchSubmitError::WrongShape { error, .. }) => ExecuteError::WrongShape {
                    kernel: self.spec.id,
                    error,
                },
                Err(err) => ExecuteError::DeviceFailed {
                    kernel: self.spec.id,
                    backend: self.backend,
                    reason: format!("the request ring refused a batch: {err}"),
                },
                Ok(()) => continue,
            };
            // Those before `failed_from` are in the ring and will be
            // answered.
            for (request_id, _) in batch.drain(failed_from..) {
                self.finish(request_id, Err(error.clone()));
            }
        }
        batch.clear();
        ring_full
    }

    /// Whether `request_id` still waits for its answer.
    fn is_pending(&self, request_id: u64) -> bool {
        self.slots.is_pending(request_id)
    }

    /// The error for requests that reach an instance that cannot serve.
    fn unavailable(&self) -> ExecuteError {
        if self.stop.load(Ordering::Acquire) != RUNNING {
            ExecuteError::ShutDown
        } else {
            ExecuteError::DeviceFailed {
                kernel: self.spec.id,
                backend: self.backend,
                reason: "the kernel could not be relaunched".into(),
            }
        }
    }

    /// Answers the request `request_id` (rule 1) on its own, outside a
    /// drain. A stale id (rule 2) is ignored.
    fn finish(&self, request_id: u64, outcome: Result<&[u8], ExecuteError>) {
        let mut drain = Drain::default();
        self.land(&mut drain, request_id, outcome);
        self.settle(&mut drain);
    }

    /// Lands one answer in its slot and counts it in `drain` (rule 4 of
    /// `slots.rs`); [`KernelInstance::settle`] makes it visible.
    fn land(&self, drain: &mut Drain, request_id: u64, outcome: Result<&[u8], ExecuteError>) {
        let Drain {
            landing,
            answered,
            failed,
            now,
        } = drain;
        self.slots
            .land(request_id, outcome, landing, |answering, outcome| {
                // Rule 6: a probe is not counted.
                if answering.probe {
                    return;
                }
                match outcome {
                    Ok(()) => {
                        let now = *now.get_or_insert_with(Instant::now);
                        let latency = now.saturating_duration_since(answering.started);
                        answered.push(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
                    }
                    Err(err) => {
                        *failed += 1;
                        record_failure(self.spec.id, self.backend, err);
                    }
                }
            });
    }

    /// Lands a completion lent by the kernel.
    fn land_completion(&self, drain: &mut Drain, completion: CompletionRef<'_>) {
        let kernel = self.spec.id;
        let outcome = match completion.status {
            Status::Ok => Ok(completion.payload),
            status @ (Status::BadLength | Status::BadInput) => {
                Err(ExecuteError::Rejected { kernel, status })
            }
            status => Err(ExecuteError::KernelFault { kernel, status }),
        };
        self.land(drain, completion.request_id, outcome);
    }

    /// Rule 4 of `slots.rs`: counts what `drain` landed (the broker, the
    /// metrics, the round-trip average) all at once, then publishes it.
    fn settle(&self, drain: &mut Drain) {
        let total = drain.answered.len() + drain.failed;
        if total > 0 {
            self.broker
                .finish_many(self.device, &drain.answered, drain.failed);
            self.metrics.requests.increment(drain.answered.len() as u64);
            for &nanos in &drain.answered {
                self.metrics.latency.record(nanos as f64 / 1e9);
            }
            self.metrics.queue_depth.decrement(total as f64);
            if !drain.answered.is_empty() {
                let sum: u128 = drain.answered.iter().map(|&n| u128::from(n)).sum();
                let mean = sum / drain.answered.len() as u128;
                self.note_round_trip(u64::try_from(mean).unwrap_or(u64::MAX));
            }
        }
        drain.answered.clear();
        drain.failed = 0;
        drain.now = None;
        self.slots.publish(&mut drain.landing);
    }

    /// Rule 8: folds a drain's mean round trip into the moving average
    /// (weight 1/8).
    fn note_round_trip(&self, sample: u64) {
        let average = self.round_trip_ns.load(Ordering::Relaxed);
        let next = if average == 0 {
            sample
        } else {
            average - average / 8 + sample / 8
        };
        self.round_trip_ns.store(next, Ordering::Relaxed);
    }

    /// Lands and settles completions a stop handed back.
    fn settle_all(&self, completions: &[granary_kernels::Completion]) {
        let mut drain = Drain::default();
        for completion in completions {
            self.land_completion(&mut drain, completion.as_ref());
        }
        self.settle(&mut drain);
    }

    /// Fails every pending request (staged or submitted) with `error`.
    fn fail_all(&self, error: &ExecuteError) {
        while self.staging.pop().is_some() {}
        for request_id in self.slots.pending() {
            self.finish(request_id, Err(error.clone()));
        }
    }

    /// Rule 5: fails the pending requests whose sequence is below
    /// `cutoff`, staged or sent; later ones keep their slots and stay
    /// staged. (Failing those too would fail a request the hung kernel
    /// never saw: one sent the moment an earlier caller got its
    /// `DeviceHung`.)
    fn fail_registered_before(&self, cutoff: u64, error: &ExecuteError) {
        let before = |request_id: u64| sequence_before(request_id, cutoff);
        let kept: Vec<Staged> = std::iter::from_fn(|| self.staging.pop())
            .filter(|staged| !before(staged.request_id))
            .collect();
        for staged in kept {
            if let Err(staged) = self.staging.push(staged) {
                self.finish(staged.request_id, Err(self.unavailable()));
            }
        }
        for request_id in self.slots.pending().into_iter().filter(|&id| before(id)) {
            self.finish(request_id, Err(error.clone()));
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.in_use()
    }

    /// Asks the completion thread to stop (rule 7); `join` waits for it.
    pub(crate) fn request_stop(&self, mode: StopMode) {
        let code = match mode {
            StopMode::Drain => STOP_DRAIN,
            StopMode::Abandon => STOP_ABANDON,
        };
        let _ = self
            .stop
            .compare_exchange(RUNNING, code, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Waits for the completion thread to exit.
    pub(crate) fn join(&self) {
        let handle = lock(&self.thread).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }

    /// The completion thread (rules 4–7 and 10).
    fn run(self: Arc<KernelInstance>, launcher: Launcher) {
        let poll = (self.config.hang_timeout / 4).min(Duration::from_millis(1));
        let mut heartbeat = lock(&self.serving)
            .kernel
            .as_ref()
            .map_or(0, |k| k.heartbeat());
        let mut progress = Instant::now();
        // Rule 11: answers callers landed, as last seen.
        let mut landed = self.landed.load(Ordering::Relaxed);
        // While failed: when to try the relaunch again, and whether the
        // stopped kernel had exited (rule 5).
        let mut retry_at = Instant::now();
        let mut stopped_exited = true;
        loop {
            match self.stop.load(Ordering::Acquire) {
                RUNNING => {}
                STOP_DRAIN => return self.shut_down(StopMode::Drain),
                _ => return self.shut_down(StopMode::Abandon),
            }
            if self.is_failed() {
                if Instant::now() >= retry_at {
                    let mut serving = lock(&self.serving);
                    let mut flusher = lock(&self.flusher);
                    let relaunched = serving.kernel.as_mut().is_some_and(|kernel| {
                        self.relaunch(&mut flusher, kernel, &launcher, stopped_exited)
                    });
                    if relaunched {
                        heartbeat = serving.kernel.as_ref().map_or(0, |k| k.heartbeat());
                        progress = Instant::now();
                    } else {
                        retry_at = Instant::now() + RELAUNCH_RETRY;
                    }
                }
                // Requests that slipped in meanwhile fail, typed.
                self.flush_staged();
                thread::sleep(poll);
                continue;
            }
            // Rule 10: stepped aside, take only what is ready (answers of
            // callers that gave up, or that a spinning caller has not taken
            // yet) and park between looks.
            let delegated = self.step_aside();
            let mut guard = lock(&self.serving);
            let Serving { kernel, drain } = &mut *guard;
            let Some(kernel) = kernel.as_mut() else {
                // Cannot happen: only a stop takes the kernel, and the stop
                // returns from this loop.
                return;
            };
            let mut land = |completion: CompletionRef<'_>| self.land_completion(drain, completion);
            // Rule 11: what is ready first; a wait holding the ring only
            // when nothing was.
            let ready = kernel.try_complete_each(usize::MAX, &mut land);
            let taken = if delegated || ready > 0 {
                ready
            } else {
                kernel.complete_each(poll, usize::MAX, &mut land)
            };
            self.settle(drain);
            let by_callers = self.landed.load(Ordering::Relaxed);
            if taken > 0 || by_callers != landed {
                landed = by_callers;
                progress = Instant::now();
            }
            let beat = kernel.heartbeat();
            if beat != heartbeat {
                heartbeat = beat;
                progress = Instant::now();
                self.beat();
            } else if self.in_flight() > 0 && progress.elapsed() >= self.config.hang_timeout {
                stopped_exited = self.recover(kernel, &launcher);
                retry_at = Instant::now() + RELAUNCH_RETRY;
                heartbeat = kernel.heartbeat();
                progress = Instant::now();
            }
            drop(guard);
            // Rules 1 and 3: requests left staged (a full ring, a caller
            // that gave up mid-flush) go in now.
            self.flush_staged();
            if delegated {
                if taken == 0 {
                    thread::park_timeout(poll);
                }
                self.aside.store(false, Ordering::SeqCst);
            } else if ready > 0 {
                // Rule 11: answers flow; the callers' workers may land the
                // next ones themselves.
                thread::yield_now();
            }
        }
    }

    /// Rule 10: takes every answer ready in the response ring, unless the
    /// kernel is held (by the completion thread waiting for answers, or by
    /// another spinning caller); a caller that finds it held asks the
    /// completion thread to step aside.
    /// Returns whether it could look.
    fn poll_ring(&self) -> bool {
        self.take_ready(true).is_some()
    }

    /// Rules 10 and 11: takes the answers ready in the response ring, at
    /// most `capacity`, if the ring is free; finding it held, asks the
    /// completion thread to step aside if `delegate`. Returns how many it
    /// landed, or `None` if it could not look.
    fn take_ready(&self, delegate: bool) -> Option<usize> {
        let mut guard = match self.serving.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                if delegate && !self.delegate.load(Ordering::Relaxed) {
                    self.delegate.store(true, Ordering::SeqCst);
                }
                return None;
            }
        };
        let Serving { kernel, drain } = &mut *guard;
        let Some(kernel) = kernel.as_mut() else {
            return Some(0);
        };
        let landed = kernel.try_complete_each(self.capacity(), &mut |completion| {
            self.land_completion(drain, completion)
        });
        self.settle(drain);
        if landed > 0 {
            // Rule 11: progress the completion thread did not see.
            self.landed.fetch_add(landed as u64, Ordering::Relaxed);
        }
        Some(landed)
    }

    /// Rule 10: whether the completion thread steps aside this turn: a
    /// caller asked it to, and every slot in use belongs to a spinning
    /// caller. `aside` is set before the slots are counted; a caller takes
    /// its slot before it can park and reads `aside` when it parks; a
    /// spinner that leaves reads it too, and wakes the thread if slots not
    /// its own are in use (all sequentially consistent).
    fn step_aside(&self) -> bool {
        if !self.delegate.load(Ordering::SeqCst) {
            return false;
        }
        self.aside.store(true, Ordering::SeqCst);
        if self.slots.in_use() <= self.pollers.load(Ordering::SeqCst) {
            return true;
        }
        self.aside.store(false, Ordering::SeqCst);
        self.delegate.store(false, Ordering::SeqCst);
        false
    }

    /// Rule 5. Returns whether the hung kernel exited when stopped.
    fn recover(&self, kernel: &mut Box<dyn PersistentKernel>, launcher: &Launcher) -> bool {
        tracing::warn!(
            kernel = self.spec.id,
            backend = ?self.backend,
            device = self.device_index,
            in_flight = self.in_flight(),
            "kernel heartbeat stopped with requests pending; relaunching"
        );
        self.hangs.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(
            "granary_gpu_hangs_total",
            "kernel" => self.spec.id,
            "backend" => format!("{:?}", self.backend)
        )
        .increment(1);
        let mut flusher = lock(&self.flusher);
        flusher.submitter = None;
        // Only requests registered before the lock was taken can have been
        // sent to the hung kernel: sending takes the lock, held from here
        // until the relaunch. Later ones stay staged for the fresh kernel.
        let cutoff = self.next_sequence.load(Ordering::SeqCst);
        // Rule 9: a group that took its sequence range below `cutoff` read
        // `recoveries` before that, so before this increment (all four
        // sequentially consistent): it checks what is still owed before it
        // sends.
        self.recoveries.fetch_add(1, Ordering::SeqCst);
        let report = kernel.stop(StopMode::Abandon, Duration::from_millis(100));
        self.settle_all(&report.completions);
        self.fail_registered_before(
            cutoff,
            &ExecuteError::DeviceHung {
                kernel: self.spec.id,
                backend: self.backend,
                device: self.device_index,
            },
        );
        if !self.relaunch(&mut flusher, kernel, launcher, report.exited) {
            tracing::error!(
                kernel = self.spec.id,
                backend = ?self.backend,
                "relaunch failed; the bridge routes around this device and retries"
            );
        }
        drop(flusher);
        // Requests staged while the lock was held.
        self.flush();
        report.exited
    }

    /// Launches a fresh kernel in place of the stopped one, under the
    /// flusher lock. On failure the instance is marked failed (the bridge
    /// routes around it) and the caller retries later: a busy device (its
    /// compute units still held by the hung kernel) may free up.
    fn relaunch(
        &self,
        flusher: &mut Flusher,
        kernel: &mut Box<dyn PersistentKernel>,
        launcher: &Launcher,
        stopped_exited: bool,
    ) -> bool {
        match launcher
            .backend
            .launch(launcher.device_index, self.spec, &self.config.kernel)
        {
            Ok(fresh) => {
                flusher.submitter = fresh.submitter();
                let stopped = std::mem::replace(kernel, fresh);
                reap(stopped, stopped_exited);
                self.failed.store(false, Ordering::Release);
                self.relaunches.fetch_add(1, Ordering::Relaxed);
                self.beat();
                true
            }
            Err(err) => {
                tracing::debug!(
                    kernel = self.spec.id,
                    backend = ?self.backend,
                    error = %err,
                    "relaunch failed"
                );
                self.failed.store(true, Ordering::Release);
                false
            }
        }
    }

    /// Rule 7.
    fn shut_down(&self, mode: StopMode) {
        let Some(mut kernel) = lock(&self.serving).kernel.take() else {
            return;
        };
        let mut flusher = lock(&self.flusher);
        if mode == StopMode::Drain {
            self.flush_locked(&mut flusher);
        }
        flusher.submitter = None;
        drop(flusher);
        let report = kernel.stop(mode, self.config.stop_timeout);
        self.settle_all(&report.completions);
        // Whatever is left was abandoned, or the kernel did not exit.
        self.fail_all(&ExecuteError::ShutDown);
        self.slots.close();
        if !report.exited {
            tracing::error!(
                kernel = self.spec.id,
                backend = ?self.backend,
                "kernel did not exit within the stop timeout; its resources are left to it"
            );
        }
        reap(kernel, report.exited);
    }
}

impl Owner for KernelInstance {
    fn slots(&self) -> &Slots {
        &self.slots
    }

    fn spin_budget(&self) -> Duration {
        self.spin_budget_for(1)
    }

    /// Rules 8 and 10.
    fn spin_wait(&self, budget: Duration, own: usize, done: &dyn Fn() -> bool) -> bool {
        if done() {
            return true;
        }
        // Rule 10: counted while it spins, so the completion thread knows
        // whom it leaves the ring to.
        self.pollers.fetch_add(1, Ordering::SeqCst);
        let answered = self.spin_serving(budget, done);
        self.pollers.fetch_sub(1, Ordering::SeqCst);
        // The thread may have stepped aside counting this spinner for a
        // slot that is someone else's (a group's slots are free once its
        // answers land; another spinner may have come and gone): if slots
        // other than this caller's are in use and not all spinners', it
        // comes back.
        if self.aside.load(Ordering::SeqCst)
            && self.slots.in_use() > self.pollers.load(Ordering::SeqCst) + own
        {
            if let Some(thread) = self.completions.get() {
                thread.unpark();
            }
        }
        answered
    }

    /// Rule 10: a waiter parks; if the completion thread has stepped
    /// aside, it comes back to serve the ring. Rule 11: the waiter first
    /// lands what is ready, if the ring is free, and says whether it
    /// landed any.
    fn parking(&self) -> bool {
        if self.aside.load(Ordering::SeqCst) {
            if let Some(thread) = self.completions.get() {
                thread.unpark();
            }
        }
        let landed = self.take_ready(false).is_some_and(|landed| landed > 0);
        // Rules 1 and 3: answers free slots; requests staged for want of
        // ring room go in now, not when the thread next looks.
        if landed {
            self.flush_staged();
        }
        landed
    }
}

impl KernelInstance {
    /// Rule 10: [`Owner::spin_wait`]'s loop.
    fn spin_serving(&self, budget: Duration, done: &dyn Fn() -> bool) -> bool {
        let started = Instant::now();
        let mut round = 0u32;
        loop {
            let looked = self.poll_ring();
            if done() {
                return true;
            }
            // Rule 3: staged requests go in while the completion thread
            // is aside.
            self.flush_staged();
            round = round.wrapping_add(1);
            // The clock costs more than a look at the ring.
            if round % 16 == 0 && started.elapsed() >= budget {
                return false;
            }
            if looked {
                std::hint::spin_loop();
            } else {
                // The completion thread holds the ring and will answer:
                // give it the core.
                thread::yield_now();
            }
        }
    }

    /// Rule 8: how long a call with `own` requests in flight may spin.
    pub(crate) fn spin_budget_for(&self, own: usize) -> Duration {
        let most = self.config.spin;
        let typical = Duration::from_nanos(self.round_trip_ns.load(Ordering::Relaxed));
        // Answers usually take longer than a spin may: park at once (read
        // first: it is cheaper than counting the slots in use).
        if most.is_zero() || typical * 2 > most {
            return Duration::ZERO;
        }
        if self.in_flight() > own + SPIN_MAX_IN_FLIGHT - 1 {
            return Duration::ZERO;
        }
        if typical.is_zero() {
            // No answer yet to judge by.
            return most;
        }
        (typical * 4).min(most)
    }
}

/// One kernel instance's health (rule 6), as
/// [`GpuBridge::kernel_health`](crate::GpuBridge::kernel_health) gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceHealth {
    /// The kernel's id.
    pub kernel: &'static str,
    /// The device it runs on.
    pub device: DeviceId,
    /// The device's backend.
    pub backend: BackendKind,
    /// The device's index within its backend.
    pub device_index: u32,
    /// How long ago its heartbeat last moved, as the completion thread saw
    /// it (it looks at least every millisecond). A running kernel beats
    /// busy or idle, so this stays near zero unless it hangs.
    pub since_heartbeat: Duration,
    /// Requests in its slots now (probes included; a request answered a
    /// moment ago counts until its caller takes the answer).
    pub in_flight: usize,
    /// Its slots: the size of its rings.
    pub capacity: usize,
    /// Times its heartbeat stood still with requests pending (rule 5).
    pub hangs: u64,
    /// Times it was launched again after a hang (rule 5).
    pub relaunches: u64,
    /// Whether its last relaunch failed (the bridge routes around it and
    /// retries).
    pub failed: bool,
}

impl InstanceHealth {
    /// The share of its ring slots in use, `0.0..=1.0`.
    pub fn ring_occupancy(&self) -> f64 {
        if self.capacity == 0 {
            0.0
        } else {
            self.in_flight as f64 / self.capacity as f64
        }
    }
}

/// How a kernel showed it answers (rule 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeAnswer {
    /// It was idle and answered a probe request in this round trip.
    Answered(Duration),
    /// It was busy, and its heartbeat moved this long ago.
    Busy {
        /// How long ago its heartbeat moved.
        since_heartbeat: Duration,
    },
}

/// The smallest request `shape` allows, in bytes (rule 6): the fewest
/// elements that are a multiple of its step; `None` if no count is.
fn probe_len(shape: &granary_kernels::Shape) -> Option<usize> {
    let count = match shape.count {
        granary_kernels::Count::Exactly(n) => n,
        granary_kernels::Count::Between { min, max, multiple } => {
            let step = multiple.max(1);
            let count = min.checked_next_multiple_of(step)?;
            (count <= max).then_some(count)?
        }
    };
    Some(count as usize * shape.element.size())
}

/// Drops a stopped kernel. One that had not exited is dropped on a thread
/// of its own: a backend's handle may wait for its kernel before freeing
/// memory the kernel still uses (OpenCL waits up to 10 s, then leaks), and
/// the completion thread must not wait with it.
fn reap(kernel: Box<dyn PersistentKernel>, exited: bool) {
    if exited {
        drop(kernel);
        return;
    }
    let spawned = thread::Builder::new()
        .name("granary-reaper".into())
        .spawn(move || drop(kernel));
    if let Err(err) = spawned {
        tracing::error!(error = %err, "cannot start a thread to release a hung kernel");
    }
}

/// Counts a failed request.
pub(crate) fn record_failure(kernel: &'static str, backend: BackendKind, err: &ExecuteError) {
    record_failure_labelled(kernel, format!("{backend:?}"), err);
}

/// Counts a failed request; `backend` is `"none"` for requests refused
/// before reaching a device, and `kernel` is `"unknown"` for ids that are
/// not registered (never the caller's string: labels stay bounded).
pub(crate) fn record_failure_labelled(kernel: &'static str, backend: String, err: &ExecuteError) {
    metrics::counter!(
        "granary_gpu_failures_total",
        "kernel" => kernel,
        "backend" => backend,
        "reason" => err.reason()
    )
    .increment(1);
}

/// Locks a mutex, ignoring poison: every critical section here leaves its
/// data consistent, so a panic elsewhere does not make it unusable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
