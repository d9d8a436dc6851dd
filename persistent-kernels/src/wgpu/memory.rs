//! Buffers and submissions (module rule 5).
//!
//! 1. **Pool.** Device buffers come from a per-device pool, keyed by usage
//!    and a power-of-two size class (at least 256 bytes), and go back when
//!    the call ends; at most [`KEEP`] per class are kept, and none larger
//!    than [`POOLED_MAX`] (a 128 MiB batch allocates its own). A read-back
//!    buffer goes back only once it is unmapped again: one whose map is
//!    pending, failed or in place when the call ends is destroyed, so no
//!    later call finds it mapped.
//! 2. **In.** Host bytes go in through the queue's mapped staging memory
//!    ([`wgpu::Queue::write_buffer_with`]); a part whose length is not a
//!    whole number of words is padded with zeros.
//! 3. **Out.** Results come back through a pooled read-back buffer, mapped
//!    after the call's own submission completes: the call waits on its
//!    submission index ([`wgpu::PollType::Wait`]), never on the whole
//!    queue, and with no timeout: wgpu-core 30 panics on an internal
//!    assertion when a timed wait ends while another thread's submission
//!    is still being made, which lavapipe's blocking queue submit makes
//!    happen. A device that never finishes therefore holds the call; the
//!    ring path makes these calls on a device thread of its own and its
//!    kernel thread gives up after [`DEVICE_TIMEOUT`] (`ring.rs` rule 3).
//!    The map's callback may run on another thread's poll after this one's
//!    returned: the call waits for the callback itself, polling without
//!    waiting, for at most [`DEVICE_TIMEOUT`].
//! 4. **Scopes.** Each call's device work runs inside validation,
//!    out-of-memory and internal error scopes ([`scoped`]); the first error
//!    caught is the call's [`WgpuError::Device`], except in a shader's
//!    build ([`scoped_build`]), where a validation error is the shader's
//!    [`WgpuError::Build`].

use std::cell::Cell;
use std::collections::HashMap;
use std::num::NonZeroU64;
use std::ops::Deref;
use std::sync::{Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use super::build::{GROUP, Pipelines};
use super::resident::WgpuBuffer;
use super::{Gpu, WgpuError};
use crate::resident::{BatchPart, DeviceBuffer};

/// Buffers kept per pool class (rule 1).
pub(crate) const KEEP: usize = 4;

/// The largest size class the pool keeps (rule 1).
pub(crate) const POOLED_MAX: u64 = 32 << 20;

/// The longest a call waits for its map callback, and the ring's kernel
/// thread for its device thread (rule 3).
pub(crate) const DEVICE_TIMEOUT: Duration = Duration::from_secs(120);

/// The step a call waits for its map callback in (rule 3), and how often
/// the ring's kernel thread beats while it waits for its device thread.
pub(crate) const BEAT: Duration = Duration::from_millis(50);

/// `len` rounded up to whole 4-byte words; a length within three bytes
/// of `u64::MAX` (which no device holds: its size check refuses it) stays
/// at the largest, rather than wrapping to a small one.
pub(crate) fn words(len: usize) -> u64 {
    (len as u64).div_ceil(4).saturating_mul(4)
}

/// A device's idle buffers (rule 1).
pub(crate) struct Pool {
    free: Mutex<HashMap<(u64, u32), Vec<wgpu::Buffer>>>,
}

impl Pool {
    pub(crate) fn new() -> Pool {
        Pool {
            free: Mutex::new(HashMap::new()),
        }
    }

    /// A buffer of at least `size` bytes with `usage`.
    pub(crate) fn take<'p>(
        &'p self,
        gpu: &Gpu,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> Pooled<'p> {
        let class = size.max(256).next_power_of_two();
        // A class beyond what one buffer may hold is allocated exactly.
        let class = if class > gpu.max_buffer {
            size.max(4)
        } else {
            class
        };
        let key = (class, usage.bits());
        let reused = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&key)
            .and_then(Vec::pop);
        let buffer = reused.unwrap_or_else(|| {
            gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("granary pool"),
                size: class,
                usage,
                mapped_at_creation: false,
            })
        });
        Pooled {
            buffer: Some(buffer),
            key,
            pool: self,
            reusable: Cell::new(true),
        }
    }
}

/// A pooled buffer, back in its pool when dropped if it may be reused
/// (rule 1).
pub(crate) struct Pooled<'p> {
    buffer: Option<wgpu::Buffer>,
    key: (u64, u32),
    pool: &'p Pool,
    /// False from a map request until the buffer is unmapped again.
    reusable: Cell<bool>,
}

impl Deref for Pooled<'_> {
    type Target = wgpu::Buffer;

    fn deref(&self) -> &wgpu::Buffer {
        // `buffer` is `Some` until drop.
        self.buffer.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let Some(buffer) = self.buffer.take() else {
            return;
        };
        if !self.reusable.get() || self.key.0 > POOLED_MAX {
            return;
        }
        let mut free = self
            .pool
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let class = free.entry(self.key).or_default();
        if class.len() < KEEP {
            class.push(buffer);
        }
    }
}

/// Runs `work` inside validation, out-of-memory and internal error scopes
/// (rule 4): the work's own error first, else the first error a scope
/// caught. Scopes are per thread: they are pushed and popped on the
/// calling thread, around work that runs there.
pub(crate) fn scoped<T>(
    gpu: &Gpu,
    work: impl FnOnce() -> Result<T, WgpuError>,
) -> Result<T, WgpuError> {
    scoped_as(gpu, work, |err| WgpuError::Device(err.to_string()))
}

/// [`scoped`] for a shader's build: a validation error is the shader's
/// (`Build`, with naga's or the driver's message), running out of memory
/// or an internal error the device's (`Device`), as for any other call.
pub(crate) fn scoped_build<T>(
    gpu: &Gpu,
    work: impl FnOnce() -> Result<T, WgpuError>,
) -> Result<T, WgpuError> {
    scoped_as(gpu, work, |err| match err {
        wgpu::Error::Validation { .. } => WgpuError::Build {
            log: err.to_string(),
        },
        err => WgpuError::Device(err.to_string()),
    })
}

/// `work` in the scopes (rule 4): its own error first, else the first a
/// scope caught, as `caught` calls it.
fn scoped_as<T>(
    gpu: &Gpu,
    work: impl FnOnce() -> Result<T, WgpuError>,
    caught_as: impl FnOnce(wgpu::Error) -> WgpuError,
) -> Result<T, WgpuError> {
    let (result, caught) = caught(gpu, work);
    let value = result?;
    match caught {
        Some(err) => Err(caught_as(err)),
        None => Ok(value),
    }
}

/// Runs `work` inside error scopes for validation, memory and internal
/// errors, and returns what it returned with the first error caught.
fn caught<T>(
    gpu: &Gpu,
    work: impl FnOnce() -> Result<T, WgpuError>,
) -> (Result<T, WgpuError>, Option<wgpu::Error>) {
    let scopes: Vec<wgpu::ErrorScopeGuard> = [
        wgpu::ErrorFilter::Validation,
        wgpu::ErrorFilter::OutOfMemory,
        wgpu::ErrorFilter::Internal,
    ]
    .into_iter()
    .map(|filter| gpu.device.push_error_scope(filter))
    .collect();
    let result = work();
    let mut caught = None;
    for scope in scopes.into_iter().rev() {
        if let Some(err) = pollster::block_on(scope.pop()) {
            caught.get_or_insert(err);
        }
    }
    (result, caught)
}

/// Writes `bytes` into `buffer` at `offset` through mapped staging memory
/// (rule 2). `offset` is a whole number of words.
pub(crate) fn stage(gpu: &Gpu, buffer: &wgpu::Buffer, offset: u64, bytes: &[u8]) {
    let Some(size) = NonZeroU64::new(words(bytes.len())) else {
        return;
    };
    let Some(mut view) = gpu.queue.write_buffer_with(buffer, offset, size) else {
        // A failed validation, which the call's scopes report.
        return;
    };
    if bytes.len() % 4 == 0 {
        view.copy_from_slice(bytes);
    } else {
        let mut padded = bytes.to_vec();
        padded.resize(size.get() as usize, 0);
        view.copy_from_slice(&padded);
    }
}

/// The dispatch grid for `invocations`: work-groups along x and y, and the
/// invocations in one row (what `granary_params.row` holds).
pub(crate) fn grid(gpu: &Gpu, invocations: u64) -> Result<(u32, u32, u32), WgpuError> {
    let groups = invocations.div_ceil(u64::from(GROUP)).max(1);
    let widest = u64::from(gpu.adapter.max_workgroups_per_dimension.max(1));
    let x = groups.min(widest);
    let y = groups.div_ceil(x);
    // Too much work for this device's grid is the device's limit, not a
    // bad buffer: the bridge may run the request elsewhere.
    if y > widest {
        return Err(WgpuError::Device(format!(
            "{invocations} invocations exceed the device's dispatch grid"
        )));
    }
    let row = x * u64::from(GROUP);
    let fits = |value: u64| {
        u32::try_from(value).map_err(|_| {
            WgpuError::Device(format!(
                "{invocations} invocations exceed the device's dispatch grid"
            ))
        })
    };
    Ok((fits(x)?, fits(y)?, fits(row)?))
}

/// Submits `encoder` and waits for that submission alone (rule 3); then
/// maps `len` bytes of `readback` (if any) and copies them out, leaving it
/// unmapped and reusable only if all went well (rule 1).
pub(crate) fn finish(
    gpu: &Gpu,
    encoder: wgpu::CommandEncoder,
    readback: Option<(&Pooled<'_>, usize)>,
) -> Result<Vec<u8>, WgpuError> {
    let deadline = Instant::now() + DEVICE_TIMEOUT;
    let late = || {
        WgpuError::Device(format!(
            "the device did not finish within {DEVICE_TIMEOUT:?}"
        ))
    };
    let index = gpu.queue.submit([encoder.finish()]);
    let (tx, rx) = mpsc::channel();
    let mapped = readback.filter(|(_, len)| *len > 0).map(|(buffer, len)| {
        buffer.reusable.set(false);
        buffer
            .slice(..words(len))
            .map_async(wgpu::MapMode::Read, move |result| {
                let _ = tx.send(result);
            });
        (buffer, len)
    });
    // No timeout on this wait (rule 3): wgpu-core 30 panics on an
    // internal assertion when a timed wait ends while another thread's
    // submission is still being made (seen on lavapipe, whose queue submit
    // blocks behind earlier work).
    gpu.device
        .poll(wgpu::PollType::Wait {
            submission_index: Some(index),
            timeout: None,
        })
        .map_err(|err| WgpuError::Device(err.to_string()))?;
    gpu.check_alive()?;
    let Some((buffer, len)) = mapped else {
        return Ok(Vec::new());
    };
    let result = loop {
        match rx.recv_timeout(BEAT) {
            Ok(result) => break result,
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                // Another thread's poll may hold the callback: poll too.
                let _ = gpu.device.poll(wgpu::PollType::Poll);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => return Err(late()),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(WgpuError::Device("the read-back was never mapped".into()));
            }
        }
    };
    result.map_err(|err| WgpuError::Device(format!("map: {err}")))?;
    let out = buffer
        .slice(..words(len))
        .get_mapped_range()
        .map(|view| view[..len].to_vec())
        .map_err(|err| WgpuError::Device(format!("map: {err}")));
    buffer.unmap();
    if out.is_ok() {
        buffer.reusable.set(true);
    }
    out
}

/// Records `passes` dispatches of `pipeline` over the grid `(x, y)`, each
/// with the parameters block of its pass (its dynamic offset). Each
/// dispatch is its own synchronisation scope: a pass sees what the one
/// before it wrote.
pub(crate) fn dispatch(
    gpu: &Gpu,
    encoder: &mut wgpu::CommandEncoder,
    pipeline: &wgpu::ComputePipeline,
    group: &wgpu::BindGroup,
    (x, y): (u32, u32),
    passes: u32,
) -> Result<(), WgpuError> {
    let stride = params_stride(gpu);
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("granary"),
        timestamp_writes: None,
    });
    pass.set_pipeline(pipeline);
    for block in 0..u64::from(passes.max(1)) {
        let offset = u32::try_from(block * stride)
            .map_err(|_| WgpuError::BadInput(format!("{passes} passes")))?;
        pass.set_bind_group(0, group, &[offset]);
        pass.dispatch_workgroups(x, y, 1);
    }
    Ok(())
}

/// A bind group over the four bindings of `prelude.wgsl`, each bound to
/// `bytes` of its buffer (whole words, at least one); the parameters'
/// offset is dynamic ([`params`]).
pub(crate) fn bind(gpu: &Gpu, buffers: [(&wgpu::Buffer, u64); 4]) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry<'_>> = buffers
        .iter()
        .enumerate()
        .map(|(binding, (buffer, bytes))| wgpu::BindGroupEntry {
            binding: binding as u32,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer,
                offset: 0,
                size: NonZeroU64::new((*bytes).max(4)),
            }),
        })
        .collect();
    gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("granary"),
        layout: &gpu.layout,
        entries: &entries,
    })
}

/// The distance between two blocks of parameters in the uniform buffer:
/// the device's dynamic-offset alignment.
pub(crate) fn params_stride(gpu: &Gpu) -> u64 {
    gpu.params_stride
}

/// `GranaryParams` for each pass, one block per [`params_stride`]: the
/// fourth word is the pass. Refused before anything is allocated if the
/// blocks would not fit one buffer or a dynamic offset.
pub(crate) fn params(gpu: &Gpu, values: [u32; 3], passes: u32) -> Result<Vec<u8>, WgpuError> {
    let stride = params_stride(gpu);
    let bytes = stride * u64::from(passes.max(1));
    let limit = gpu.max_buffer.min(u64::from(u32::MAX));
    if bytes > limit {
        return Err(WgpuError::TooLarge { bytes, limit });
    }
    let stride = stride as usize;
    let mut bytes = vec![0u8; stride * passes.max(1) as usize];
    for (pass, block) in bytes.chunks_exact_mut(stride).enumerate() {
        let words = [values[0], values[1], values[2], pass as u32];
        for (chunk, value) in block.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&value.to_le_bytes());
        }
    }
    Ok(bytes)
}

/// Runs `granary_batch` over the request made of `parts` (host bytes or
/// resident buffers of `gpu`), `passes` times in one submission, with
/// `output_len` bytes of response, returned to the host or copied into
/// `into` (the contract of `resident.rs`; module rules 5 and 7).
pub(crate) fn run_batch(
    gpu: &Gpu,
    pipelines: &Pipelines,
    parts: &[BatchPart<'_>],
    output_len: usize,
    passes: u32,
    into: Option<&WgpuBuffer>,
) -> Result<Vec<u8>, WgpuError> {
    let request_len: usize = parts.iter().map(BatchPart::len).sum();
    // Parts are placed in whole words: only the last may end mid-word
    // (module rule 7).
    if let Some(part) = parts.iter().rev().skip(1).find(|part| part.len() % 4 != 0) {
        return Err(WgpuError::BadInput(format!(
            "a request part of {} bytes: wgpu assembles requests in 4-byte words, so every \
             part but the last is a whole number of words",
            part.len()
        )));
    }
    let request_bytes = words(request_len).max(4);
    let response_bytes = words(output_len).max(4);
    gpu.check_binding(request_bytes)?;
    gpu.check_binding(response_bytes)?;
    let too_long = |len: usize| {
        u32::try_from(len).map_err(|_| WgpuError::TooLarge {
            bytes: len as u64,
            limit: u64::from(u32::MAX),
        })
    };
    let (request_u32, response_u32) = (too_long(request_len)?, too_long(output_len)?);
    let (x, y, row) = grid(gpu, response_bytes / 4)?;
    scoped(gpu, || {
        use wgpu::BufferUsages as U;
        let input = gpu.pool.take(gpu, request_bytes, U::STORAGE | U::COPY_DST);
        let output = gpu.pool.take(gpu, response_bytes, U::STORAGE | U::COPY_SRC);
        let blocks = params(gpu, [request_u32, response_u32, row], passes)?;
        let uniform = gpu
            .pool
            .take(gpu, blocks.len() as u64, U::UNIFORM | U::COPY_DST);
        let jobs = gpu.pool.take(gpu, 24, U::STORAGE);
        stage(gpu, &uniform, 0, &blocks);
        let mut encoder = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("granary batch"),
            });
        let mut offset = 0u64;
        for part in parts {
            match part {
                BatchPart::Host(bytes) => stage(gpu, &input, offset, bytes),
                BatchPart::Resident(buffer) => {
                    let buffer = buffer
                        .as_any()
                        .downcast_ref::<WgpuBuffer>()
                        .ok_or_else(|| WgpuError::BadInput("a foreign buffer".into()))?;
                    if !buffer.is_empty() {
                        encoder.copy_buffer_to_buffer(
                            buffer.raw(),
                            0,
                            &input,
                            offset,
                            words(buffer.len()),
                        );
                    }
                }
            }
            offset += part.len() as u64;
        }
        let group = bind(
            gpu,
            [
                (&input, request_bytes),
                (&output, response_bytes),
                (&uniform, 16),
                (&jobs, 24),
            ],
        );
        if output_len > 0 {
            dispatch(gpu, &mut encoder, &pipelines.batch, &group, (x, y), passes)?;
        }
        match into {
            Some(into) => {
                if output_len > 0 {
                    encoder.copy_buffer_to_buffer(&output, 0, into.raw(), 0, words(output_len));
                }
                finish(gpu, encoder, None)
            }
            None => {
                let readback = gpu
                    .pool
                    .take(gpu, response_bytes, U::MAP_READ | U::COPY_DST);
                if output_len > 0 {
                    encoder.copy_buffer_to_buffer(&output, 0, &readback, 0, words(output_len));
                }
                finish(gpu, encoder, Some((&readback, output_len)))
            }
        }
    })
}
