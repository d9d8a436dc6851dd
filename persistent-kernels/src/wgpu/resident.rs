//! Resident buffers on wgpu devices (the contract is in `resident.rs` of
//! the crate; module rule 7 of `wgpu.rs`).
//!
//! 1. A [`WgpuBuffer`] holds its length rounded up to whole words; the
//!    bytes past its length stay zero.
//! 2. A write or read at offsets that are not whole words covers the words
//!    around it: a write reads those words back first and writes them
//!    whole, so the bytes outside the range keep their values. Such a
//!    write holds the buffer's patch lock from its read to its write, so
//!    two of them at once (the bridge lets writes share a buffer) cannot
//!    each write back the other's bytes as they were. Writes and reads
//!    each wait for their own submission.
//! 3. Resident parts of a batch are copied into the request on the device;
//!    a response goes into a resident buffer by a copy on the device.
//! 4. There is no copy between two devices (each wgpu device owns its
//!    memory): [`Backend::copy_resident`](crate::Backend::copy_resident)
//!    keeps its default, and the caller stages through the host.

use std::any::Any;
use std::sync::Arc;

use super::memory::{self, scoped, words};
use super::{Gpu, WgpuBackend, WgpuError, backend_error, build, device_error};
use crate::backend::{BackendError, batch_output_len};
use crate::device::BackendKind;
use crate::resident::{self, BatchOutput, BatchPart, DeviceBuffer};
use crate::spec::KernelSpec;

/// A wgpu resident buffer.
pub struct WgpuBuffer {
    buffer: wgpu::Buffer,
    len: usize,
    device: usize,
    /// The device that made it, to tell this backend's buffers from
    /// another wgpu backend's.
    gpu: Arc<Gpu>,
    /// Held by a write that is not whole words, from reading the words
    /// around it to writing them back (rule 2).
    patch: std::sync::Mutex<()>,
}

impl std::fmt::Debug for WgpuBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuBuffer")
            .field("len", &self.len)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl DeviceBuffer for WgpuBuffer {
    fn len(&self) -> usize {
        self.len
    }

    fn backend(&self) -> BackendKind {
        BackendKind::Wgpu
    }

    fn device(&self) -> usize {
        self.device
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl WgpuBuffer {
    /// `len` zeroed bytes on `gpu` (rule 1; wgpu zeroes new buffers).
    pub(crate) fn new(gpu: &Arc<Gpu>, device: usize, len: usize) -> Result<WgpuBuffer, WgpuError> {
        let size = words(len).max(4);
        gpu.check_binding(size)?;
        let buffer = scoped(gpu, || {
            Ok(gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("granary resident"),
                size,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }))
        })?;
        Ok(WgpuBuffer {
            buffer,
            len,
            device,
            gpu: gpu.clone(),
            patch: std::sync::Mutex::new(()),
        })
    }

    /// The wgpu buffer.
    pub(crate) fn raw(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

impl WgpuBackend {
    /// `buffer` as one of this backend's buffers on device `index`.
    fn own<'b>(
        &self,
        buffer: &'b dyn DeviceBuffer,
        index: usize,
    ) -> Result<&'b WgpuBuffer, BackendError> {
        let own = resident::own_buffer::<WgpuBuffer>(buffer, BackendKind::Wgpu, index)?;
        let gpu = self.gpu(index).map_err(device_error)?;
        if !Arc::ptr_eq(gpu, &own.gpu) {
            return Err(BackendError::BadBuffer(
                "a buffer made by another wgpu backend".into(),
            ));
        }
        Ok(own)
    }
}

/// The whole words around `len` bytes at `offset`: their start and length.
fn covering(offset: usize, len: usize) -> (u64, usize) {
    let start = offset / 4 * 4;
    let end = words(offset + len) as usize;
    (start as u64, end - start)
}

/// Copies `len` bytes at `offset` of `buffer` to the host (rule 2).
fn read_words(
    gpu: &Gpu,
    buffer: &WgpuBuffer,
    offset: usize,
    len: usize,
) -> Result<Vec<u8>, WgpuError> {
    let (start, span) = covering(offset, len);
    let words = scoped(gpu, || {
        let readback = gpu.pool.take(
            gpu,
            span as u64,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        let mut encoder = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("granary read"),
            });
        encoder.copy_buffer_to_buffer(buffer.raw(), start, &readback, 0, span as u64);
        memory::finish(gpu, encoder, Some((&readback, span)))
    })?;
    let skip = offset - start as usize;
    Ok(words[skip..skip + len].to_vec())
}

/// Writes `data` into `buffer` at `offset` (rule 2).
pub(super) fn write(
    backend: &WgpuBackend,
    buffer: &dyn DeviceBuffer,
    offset: usize,
    data: &[u8],
) -> Result<(), BackendError> {
    let own = backend.own(buffer, buffer.device())?;
    resident::check_range(offset, data.len(), own.len)?;
    if data.is_empty() {
        return Ok(());
    }
    let gpu = &own.gpu;
    let (start, span) = covering(offset, data.len());
    let whole = start as usize == offset && span == data.len();
    // Rule 2: held until the patched words are written back (a panic while
    // it was held left nothing half done: the lock guards no data).
    let _patching = (!whole).then(|| {
        own.patch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    });
    let bytes = if whole {
        data.to_vec()
    } else {
        // Rule 2: the words around the range, read back and patched.
        let mut around = read_words(gpu, own, start as usize, span).map_err(device_error)?;
        let skip = offset - start as usize;
        around[skip..skip + data.len()].copy_from_slice(data);
        around
    };
    scoped(gpu, || {
        memory::stage(gpu, own.raw(), start, &bytes);
        let encoder = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("granary write"),
            });
        memory::finish(gpu, encoder, None)
    })
    .map_err(device_error)?;
    Ok(())
}

/// Copies `len` bytes of `buffer` from `offset` to the host.
pub(super) fn read(
    backend: &WgpuBackend,
    buffer: &dyn DeviceBuffer,
    offset: usize,
    len: usize,
) -> Result<Vec<u8>, BackendError> {
    let own = backend.own(buffer, buffer.device())?;
    resident::check_range(offset, len, own.len)?;
    if len == 0 {
        return Ok(Vec::new());
    }
    read_words(&own.gpu, own, offset, len).map_err(device_error)
}

/// Runs `spec` over the request made of `parts` on `device`, the response
/// to the host or into a resident buffer (rule 3).
pub(super) fn run_batch_parts(
    backend: &WgpuBackend,
    device: usize,
    spec: &KernelSpec,
    parts: &[BatchPart<'_>],
    output: BatchOutput<'_>,
) -> Result<Vec<u8>, BackendError> {
    let gpu = backend.gpu(device).map_err(device_error)?;
    for part in parts {
        if let BatchPart::Resident(buffer) = part {
            backend.own(*buffer, device)?;
        }
    }
    let into = match output {
        BatchOutput::Host => None,
        BatchOutput::Into(buffer) => Some(backend.own(buffer, device)?),
    };
    let probe = resident::request_probe(parts)?;
    let output_len = batch_output_len(spec, &probe)?;
    if let Some(into) = into {
        resident::check_output(into, output_len)?;
    }
    let pipelines = build::pipelines(gpu, spec).map_err(|err| backend_error(err, spec))?;
    // The pass count reads the request as `output_len` does (rule 4 of the
    // crate's contract: what sizes the work is in host parts).
    let passes = spec.wgsl.map_or(1, |wgsl| (wgsl.passes)(&probe));
    memory::run_batch(gpu, &pipelines, parts, output_len, passes, into)
        .map_err(|err| backend_error(err, spec))
}
