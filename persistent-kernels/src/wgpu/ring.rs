//! The wgpu backend's ring path (module rule 4): no persistent kernel, but
//! the same rings and kernel thread as the CPU backend, answering each
//! micro-batch with one dispatch of `granary_ring`.
//!
//! 1. The kernel thread takes every request queued, up to the
//!    micro-batch, and frees their slots (the CPU loop's rules hold:
//!    `cpu.rs`).
//! 2. The requests go into one storage buffer, each starting on a word; a
//!    job table says where each starts, how long it is, and where its
//!    response goes (each response gets the spec's response maximum). The
//!    kernel thread lays both out in host memory.
//! 3. The kernel thread never calls wgpu: a call may block in the driver
//!    for as long as the work queued before it (lavapipe's queue submit
//!    does, behind a long batch), and a thread blocked there cannot beat
//!    its heartbeat. Each kernel has a device thread that makes every
//!    wgpu call: one submission uploads, dispatches one invocation per
//!    job, and copies the job table and the responses into one read-back
//!    buffer, and the device thread waits on that submission alone. The
//!    kernel thread waits for the answer, beating, for at most
//!    [`DEVICE_TIMEOUT`](super::memory::DEVICE_TIMEOUT).
//! 4. Micro-batches carry sequence numbers: an answer that comes after its
//!    micro-batch was given up on is dropped, never taken for the next's.
//! 5. Each job's status and length come back from the table; a device
//!    failure, or a wait past the timeout, answers every request of the
//!    micro-batch with `Fault`, and the thread goes on with the next. An
//!    abandoning stop ends the wait within a beat: the micro-batch's
//!    requests are reported abandoned. The device thread ends when its
//!    kernel does (once the call in hand returns), and skips work queued
//!    behind a newer micro-batch (it was given up on).
//! 6. A lost device (wgpu's device-lost callback, or
//!    [`WgpuBackend::destroy_device`](super::WgpuBackend::destroy_device))
//!    is answered like a failure, and then the kernel thread ends (after
//!    any failed micro-batch, the device is asked whether it is lost;
//!    a wgpu call that panics on the device thread is a failure, not the
//!    thread's end),
//!    beating no more: the bridge takes the kernel for hung, and its
//!    relaunch fails (every launch on a lost device does), so the bridge
//!    routes around the device (its fallback, or `NoDevice`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::build::Pipelines;
use super::memory::{self, BEAT, DEVICE_TIMEOUT, words};
use super::{Gpu, WgpuError};
use crate::backend::BackendError;
use crate::cpu::{
    CpuPersistentKernel, Engine, Given, KernelConfig, LaunchError, MicroBatch, Taken,
};
use crate::hooks::CpuHooks;
use crate::kernel::PersistentKernel;
use crate::kernel::{Completion, CompletionRef, StopMode, StopReport, Submitter};
use crate::spec::{KernelSpec, Status};

/// Bytes of one `GranaryJob`: six words.
pub(crate) const JOB_BYTES: usize = 24;

/// A kernel on a wgpu device: a host thread that drains the ring into one
/// dispatch per micro-batch. It is not a persistent kernel (module rule 4).
pub struct WgpuRingKernel {
    inner: CpuPersistentKernel,
    dispatches: Arc<AtomicU64>,
}

impl std::fmt::Debug for WgpuRingKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuRingKernel")
            .field("kernel", &self.inner.spec().id)
            .field("processed", &self.inner.processed())
            .finish_non_exhaustive()
    }
}

impl WgpuRingKernel {
    pub(crate) fn launch(
        gpu: Arc<Gpu>,
        pipelines: Arc<Pipelines>,
        spec: KernelSpec,
        config: &KernelConfig,
        most: usize,
    ) -> Result<WgpuRingKernel, BackendError> {
        let dispatches = Arc::new(AtomicU64::new(0));
        let response_max = spec.response.max_bytes();
        let (work, inbox) = mpsc::channel::<Work>();
        let (outbox, done) = mpsc::channel();
        let watched = gpu.clone();
        thread::Builder::new()
            .name(format!("granary-wgpu-{}", spec.id))
            .spawn(move || {
                // Rule 3: every wgpu call of the ring path is made here.
                while let Ok(mut work) = inbox.recv() {
                    // Work queued behind a later micro-batch was given up
                    // on (rule 4): only the newest is waited for.
                    while let Ok(newer) = inbox.try_recv() {
                        work = newer;
                    }
                    // wgpu panics on some failures of a lost device (its
                    // poll's fatal errors): the thread answers them as
                    // failures and lives on, so that the kernel thread
                    // learns of the loss (rule 6).
                    let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        submit(&gpu, &pipelines, response_max, &work)
                    }))
                    .unwrap_or_else(|_| Err(WgpuError::Device("a wgpu call panicked".into())));
                    if outbox.send((work.sequence, answer)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|err| LaunchError::Thread(err.to_string()))?;
        let device = Dispatcher {
            gpu: watched,
            response_max,
            most: most.max(1),
            dispatches: dispatches.clone(),
            work,
            done,
            sequence: 0,
        };
        let inner = CpuPersistentKernel::launch_engine(
            spec,
            *config,
            CpuHooks::new(),
            Engine::MicroBatch(Box::new(device)),
        )?;
        Ok(WgpuRingKernel { inner, dispatches })
    }

    /// Requests answered so far.
    pub fn processed(&self) -> u64 {
        self.inner.processed()
    }

    /// Micro-batches dispatched so far: one per dispatch of `granary_ring`.
    pub fn dispatches(&self) -> u64 {
        self.dispatches.load(Ordering::Relaxed)
    }
}

impl PersistentKernel for WgpuRingKernel {
    fn spec(&self) -> &KernelSpec {
        self.inner.spec()
    }

    fn submitter(&self) -> Option<Submitter> {
        Some(self.inner.submitter())
    }

    fn try_complete(&mut self) -> Option<Completion> {
        self.inner.try_complete()
    }

    fn complete(&mut self, timeout: Duration) -> Option<Completion> {
        self.inner.complete(timeout)
    }

    fn try_complete_each(&mut self, max: usize, take: &mut dyn FnMut(CompletionRef<'_>)) -> usize {
        self.inner.try_complete_each(max, take)
    }

    fn complete_each(
        &mut self,
        timeout: Duration,
        max: usize,
        take: &mut dyn FnMut(CompletionRef<'_>),
    ) -> usize {
        self.inner.complete_each(timeout, max, take)
    }

    fn heartbeat(&self) -> u64 {
        self.inner.heartbeat()
    }

    fn stop(&mut self, mode: StopMode, timeout: Duration) -> StopReport {
        self.inner.stop_within(mode, timeout)
    }
}

/// Answers micro-batches through its kernel's device thread.
struct Dispatcher {
    /// Read only to see whether the device is lost (rule 6).
    gpu: Arc<Gpu>,
    response_max: usize,
    most: usize,
    dispatches: Arc<AtomicU64>,
    /// To the device thread; dropping it ends that thread (rule 5).
    work: mpsc::Sender<Work>,
    done: mpsc::Receiver<(u64, Result<Vec<u8>, WgpuError>)>,
    sequence: u64,
}

/// How a wait for the device thread ended without an answer.
enum Wait {
    /// The device failed, or did not answer in time.
    Failed(WgpuError),
    /// An abandoning stop came (rule 5).
    GaveUp,
}

/// One micro-batch laid out in host memory (rule 2).
struct Work {
    sequence: u64,
    count: usize,
    requests: Vec<u8>,
    jobs: Vec<u8>,
}

impl MicroBatch for Dispatcher {
    fn max_requests(&self) -> usize {
        self.most
    }

    fn run(
        &mut self,
        taken: &Taken,
        out: &mut Vec<u8>,
        answers: &mut Vec<(Status, std::ops::Range<usize>)>,
        beat: &dyn Fn() -> bool,
    ) -> Given {
        self.dispatches.fetch_add(1, Ordering::Relaxed);
        match self.dispatch(taken, beat) {
            Err(Wait::GaveUp) => return Given::Up,
            Ok(read) => {
                // Rule 5: the table, then the responses.
                let table = taken.len() * JOB_BYTES;
                let slot = words(self.response_max) as usize;
                out.extend_from_slice(&read[table.min(read.len())..]);
                for j in 0..taken.len() {
                    let word = |k: usize| {
                        let at = j * JOB_BYTES + k * 4;
                        read.get(at..at + 4).map_or(u32::MAX, |bytes| {
                            u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
                        })
                    };
                    // A status the kernel cannot give, or a response
                    // longer than its maximum, is a fault (as on the CPU).
                    let len = word(5) as usize;
                    let status = match Status::from_code(word(4)) {
                        Some(_) if len > self.response_max => Status::Fault,
                        Some(status) => status,
                        None => Status::Fault,
                    };
                    answers.push((status, j * slot..j * slot + len.min(self.response_max)));
                }
            }
            Err(Wait::Failed(err)) => {
                tracing::warn!(%err, requests = taken.len(), "a wgpu micro-batch failed");
                answers.extend((0..taken.len()).map(|_| (Status::Fault, 0..0)));
                // Rule 6: a lost device answers nothing again, whatever
                // error the batch met on its way.
                if matches!(err, WgpuError::Lost(_)) || self.gpu.check_alive().is_err() {
                    return Given::Lost;
                }
            }
        }
        Given::Answered
    }
}

impl Dispatcher {
    /// Lays the micro-batch out (rule 2), hands it to the device thread and
    /// waits for its answer, beating (rules 3 and 4): the job table
    /// followed by the responses, as read back.
    fn dispatch(&mut self, taken: &Taken, beat: &dyn Fn() -> bool) -> Result<Vec<u8>, Wait> {
        let count = taken.len();
        let slot = words(self.response_max);
        let mut requests = Vec::with_capacity(taken.bytes.len() + 4 * count);
        let mut jobs = Vec::with_capacity(count * JOB_BYTES);
        for j in 0..count {
            let payload = taken.payload(j);
            let at = requests.len() / 4;
            requests.extend_from_slice(payload);
            requests.resize(words(requests.len()) as usize, 0);
            let out = j as u64 * slot / 4;
            for value in [
                at as u64,
                payload.len() as u64,
                out,
                self.response_max as u64,
                u64::from(Status::Fault.code()),
                0,
            ] {
                let value = u32::try_from(value).map_err(|_| {
                    Wait::Failed(WgpuError::Device("a micro-batch too large".into()))
                })?;
                jobs.extend_from_slice(&value.to_le_bytes());
            }
        }
        self.sequence += 1;
        let sequence = self.sequence;
        self.work
            .send(Work {
                sequence,
                count,
                requests,
                jobs,
            })
            .map_err(|_| Wait::Failed(WgpuError::Device("the device thread has ended".into())))?;
        // The device thread's wait for its submission has no timeout
        // (memory.rs rule 3: wgpu-core 30 panics when a timed wait ends
        // under another thread's submission); only its wait for the map
        // callback after it is bounded by DEVICE_TIMEOUT. This wait is
        // bounded: DEVICE_TIMEOUT and a few beats, so that an answer the
        // device gives in time still arrives with its own error; past it
        // the micro-batch is answered Fault and a late answer is dropped
        // (rule 4).
        let deadline = Instant::now() + DEVICE_TIMEOUT + 4 * BEAT;
        loop {
            match self.done.recv_timeout(BEAT) {
                Ok((answered, answer)) if answered == sequence => {
                    return answer.map_err(Wait::Failed);
                }
                // A micro-batch given up on earlier (rule 4).
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    if !beat() {
                        return Err(Wait::GaveUp);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(Wait::Failed(WgpuError::Device(format!(
                        "the device did not answer within {DEVICE_TIMEOUT:?}"
                    ))));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Wait::Failed(WgpuError::Device(
                        "the device thread has ended".into(),
                    )));
                }
            }
        }
    }
}

/// One submission for a micro-batch, on the device thread (rule 3).
fn submit(
    gpu: &Gpu,
    pipelines: &Pipelines,
    response_max: usize,
    work: &Work,
) -> Result<Vec<u8>, WgpuError> {
    gpu.check_alive()?;
    let slot = words(response_max);
    let request_bytes = words(work.requests.len()).max(4);
    let table_bytes = work.jobs.len() as u64;
    let response_bytes = (slot * work.count as u64).max(4);
    gpu.check_binding(request_bytes)?;
    gpu.check_binding(response_bytes)?;
    let (x, y, row) = memory::grid(gpu, work.count as u64)?;
    let jobs_count = u32::try_from(work.count)
        .map_err(|_| WgpuError::Device("a micro-batch too large".into()))?;
    memory::scoped(gpu, || {
        use wgpu::BufferUsages as U;
        let input = gpu.pool.take(gpu, request_bytes, U::STORAGE | U::COPY_DST);
        let output = gpu.pool.take(gpu, response_bytes, U::STORAGE | U::COPY_SRC);
        let blocks = memory::params(gpu, [jobs_count, 0, row], 1)?;
        let uniform = gpu
            .pool
            .take(gpu, blocks.len() as u64, U::UNIFORM | U::COPY_DST);
        let table = gpu
            .pool
            .take(gpu, table_bytes, U::STORAGE | U::COPY_DST | U::COPY_SRC);
        let readback = gpu
            .pool
            .take(gpu, table_bytes + response_bytes, U::MAP_READ | U::COPY_DST);
        memory::stage(gpu, &input, 0, &work.requests);
        memory::stage(gpu, &table, 0, &work.jobs);
        memory::stage(gpu, &uniform, 0, &blocks);
        let group = memory::bind(
            gpu,
            [
                (&input, request_bytes),
                (&output, response_bytes),
                (&uniform, 16),
                (&table, table_bytes),
            ],
        );
        let mut encoder = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("granary ring"),
            });
        memory::dispatch(gpu, &mut encoder, &pipelines.ring, &group, (x, y), 1)?;
        encoder.copy_buffer_to_buffer(&table, 0, &readback, 0, table_bytes);
        encoder.copy_buffer_to_buffer(&output, 0, &readback, table_bytes, response_bytes);
        memory::finish(
            gpu,
            encoder,
            Some((&readback, (table_bytes + response_bytes) as usize)),
        )
    })
}
