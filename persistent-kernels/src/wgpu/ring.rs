//! The wgpu backend's ring path (module rule 4): no persistent kernel, but
//! the same rings and kernel thread as the CPU backend, answering each
//! micro-batch with one dispatch of `granary_ring`.
//!
//! 1. The thread takes every request queued, up to the micro-batch, and
//!    frees their slots (the CPU loop's rules hold: `cpu.rs`).
//! 2. The requests go into one storage buffer, each starting on a word; a
//!    job table says where each starts, how long it is, and where its
//!    response goes (each response gets the spec's response maximum).
//! 3. One submission uploads, dispatches one invocation per job, and copies
//!    the job table and the responses into one read-back buffer; the
//!    thread waits on that submission alone.
//! 4. Each job's status and length come back from the table; a device
//!    failure answers every request of the micro-batch with `Fault`, and
//!    the thread goes on with the next.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::build::Pipelines;
use super::memory::{self, words};
use super::{Gpu, WgpuError};
use crate::backend::{BackendError, PersistentKernel};
use crate::cpu::{
    Completion, CpuPersistentKernel, Engine, KernelConfig, MicroBatch, StopMode, StopReport,
    Submitter, Taken,
};
use crate::hooks::CpuHooks;
use crate::spec::{KernelSpec, Status};

/// Bytes of one `GranaryJob`: six words.
const JOB_BYTES: usize = 24;

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
        let device = Dispatcher {
            gpu,
            pipelines,
            response_max: spec.response.max_bytes(),
            most: most.max(1),
            dispatches: dispatches.clone(),
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

    fn heartbeat(&self) -> u64 {
        self.inner.heartbeat()
    }

    fn stop(&mut self, mode: StopMode, timeout: Duration) -> StopReport {
        self.inner.stop_within(mode, timeout)
    }
}

/// Answers micro-batches on one device.
struct Dispatcher {
    gpu: Arc<Gpu>,
    pipelines: Arc<Pipelines>,
    response_max: usize,
    most: usize,
    dispatches: Arc<AtomicU64>,
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
        beat: &dyn Fn(),
    ) {
        self.dispatches.fetch_add(1, Ordering::Relaxed);
        match self.dispatch(taken, beat) {
            Ok(read) => {
                // Rule 4: the table, then the responses.
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
            Err(err) => {
                tracing::warn!(%err, requests = taken.len(), "a wgpu micro-batch failed");
                answers.extend((0..taken.len()).map(|_| (Status::Fault, 0..0)));
            }
        }
    }
}

impl Dispatcher {
    /// One submission for the micro-batch (rules 2 and 3): the job table
    /// followed by the responses, as read back.
    fn dispatch(&self, taken: &Taken, beat: &dyn Fn()) -> Result<Vec<u8>, WgpuError> {
        let gpu = &*self.gpu;
        gpu.check_alive()?;
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
                let value = u32::try_from(value)
                    .map_err(|_| WgpuError::BadInput("a micro-batch too large".into()))?;
                jobs.extend_from_slice(&value.to_le_bytes());
            }
        }
        let request_bytes = words(requests.len()).max(4);
        let table_bytes = (count * JOB_BYTES) as u64;
        let response_bytes = (slot * count as u64).max(4);
        gpu.check_binding(request_bytes)?;
        gpu.check_binding(response_bytes)?;
        let (x, y, row) = memory::grid(gpu, count as u64)?;
        let jobs_count = u32::try_from(count)
            .map_err(|_| WgpuError::BadInput("a micro-batch too large".into()))?;
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
            let readback =
                gpu.pool
                    .take(gpu, table_bytes + response_bytes, U::MAP_READ | U::COPY_DST);
            memory::stage(gpu, &input, 0, &requests);
            memory::stage(gpu, &table, 0, &jobs);
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
            memory::dispatch(gpu, &mut encoder, &self.pipelines.ring, &group, (x, y), 1)?;
            encoder.copy_buffer_to_buffer(&table, 0, &readback, 0, table_bytes);
            encoder.copy_buffer_to_buffer(&output, 0, &readback, table_bytes, response_bytes);
            memory::finish(
                gpu,
                encoder,
                Some((&readback, (table_bytes + response_bytes) as usize)),
                beat,
            )
        })
    }
}
