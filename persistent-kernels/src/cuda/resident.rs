//! Resident buffers on CUDA devices (the contract is in `resident.rs`).
//!
//! A buffer comes from the stream-ordered allocator, like the batch path's,
//! and is freed the same way (`cuMemFreeAsync`): a plain `cuMemFree` may
//! wait for the whole device, which never idles while a persistent kernel
//! runs. It is made, zeroed and waited for on a batch lane's stream, so it
//! is usable from any stream afterwards; every operation waits for its
//! stream before it returns (rule 5), and parts are copied device to
//! device.

use std::any::Any;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{CudaContext, result};

use super::memory::DeviceBytes;
use super::{CudaBackend, CudaError, backend_error, download, driver, launch_batch, upload};
use crate::backend::{BackendError, batch_output_len};
use crate::device::BackendKind;
use crate::resident::{self, BatchOutput, BatchPart, DeviceBuffer};
use crate::spec::KernelSpec;

/// A CUDA resident buffer.
pub struct CudaBuffer {
    bytes: DeviceBytes,
    device: usize,
    /// The context it was allocated in.
    context: Arc<CudaContext>,
    /// Held for each operation, which runs to the end before releasing it
    /// (rule 5).
    busy: Mutex<()>,
}

impl std::fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBuffer")
            .field("len", &self.bytes.len())
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl DeviceBuffer for CudaBuffer {
    fn len(&self) -> usize {
        self.bytes.len()
    }

    fn backend(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn device(&self) -> usize {
        self.device
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl CudaBuffer {
    fn hold(&self) -> MutexGuard<'_, ()> {
        self.busy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pointer(&self) -> CUdeviceptr {
        self.bytes.pointer()
    }
}

/// A CUDA failure outside any kernel.
fn device_error(err: CudaError) -> BackendError {
    match err {
        CudaError::UnknownDevice(index) => BackendError::UnknownDevice(index),
        CudaError::Unavailable(why) => BackendError::Unavailable(why),
        other => BackendError::Device(other.to_string()),
    }
}

/// Waits for `stream`'s work.
fn synchronize(stream: sys::CUstream) -> Result<(), CudaError> {
    // SAFETY: a stream of the context bound on this thread.
    unsafe { result::stream::synchronize(stream) }.map_err(driver("cuStreamSynchronize"))
}

impl CudaBackend {
    /// `buffer` as one of this backend's buffers on device `index`.
    fn own<'b>(
        &self,
        buffer: &'b dyn DeviceBuffer,
        index: usize,
    ) -> Result<&'b CudaBuffer, BackendError> {
        let own = resident::own_buffer::<CudaBuffer>(buffer, BackendKind::Cuda, index)?;
        let device = self.device(index).map_err(device_error)?;
        if Arc::ptr_eq(&own.context, &device.context) {
            Ok(own)
        } else {
            Err(BackendError::BadBuffer(
                "a buffer of another CUDA backend's context".into(),
            ))
        }
    }

    /// `len` zeroed bytes on device `index`.
    pub fn alloc_resident(&self, index: usize, len: usize) -> Result<CudaBuffer, BackendError> {
        let device = self.device(index).map_err(device_error)?;
        let lane = self.take_lane(device).map_err(device_error)?;
        let outcome = (|| {
            let bytes = DeviceBytes::alloc(&lane.stream, len)?;
            // SAFETY: the buffer holds `len.max(1)` bytes; the stream is the
            // one it was allocated on, of the context `alloc` bound.
            unsafe { sys::cuMemsetD8Async(bytes.pointer(), 0, len.max(1), lane.stream.raw) }
                .result()
                .map_err(driver("cuMemsetD8Async"))?;
            synchronize(lane.stream.raw)?;
            Ok(bytes)
        })();
        Self::give_lane(device, lane, &outcome);
        Ok(CudaBuffer {
            bytes: outcome.map_err(device_error)?,
            device: index,
            context: device.context.clone(),
            busy: Mutex::new(()),
        })
    }

    pub(super) fn write_resident(
        &self,
        buffer: &dyn DeviceBuffer,
        offset: usize,
        data: &[u8],
    ) -> Result<(), BackendError> {
        let buffer = self.own(buffer, buffer.device())?;
        resident::check_range(offset, data.len(), buffer.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let device = self.device(buffer.device).map_err(device_error)?;
        let _held = buffer.hold();
        device
            .context
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))
            .map_err(device_error)?;
        let mut lane = self.take_lane(device).map_err(device_error)?;
        let outcome = (|| {
            upload(
                &device.context,
                &mut lane,
                buffer.pointer() + offset as CUdeviceptr,
                data,
            )?;
            synchronize(lane.stream.raw)
        })();
        Self::give_lane(device, lane, &outcome);
        outcome.map_err(device_error)
    }

    pub(super) fn read_resident(
        &self,
        buffer: &dyn DeviceBuffer,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, BackendError> {
        let buffer = self.own(buffer, buffer.device())?;
        resident::check_range(offset, len, buffer.len())?;
        let mut out = vec![0u8; len];
        if len == 0 {
            return Ok(out);
        }
        let device = self.device(buffer.device).map_err(device_error)?;
        let _held = buffer.hold();
        device
            .context
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))
            .map_err(device_error)?;
        let mut lane = self.take_lane(device).map_err(device_error)?;
        let outcome = download(
            &mut lane,
            buffer.pointer() + offset as CUdeviceptr,
            &mut out,
        );
        Self::give_lane(device, lane, &outcome);
        outcome.map_err(device_error)?;
        Ok(out)
    }

    /// Runs `spec`'s `granary_batch` over the request made of `parts`
    /// (rules 2 to 4 of `resident.rs`): host parts are uploaded into the
    /// request buffer, resident parts copied into it device to device; an
    /// output buffer is the kernel's response argument itself.
    pub(super) fn run_batch_parts(
        &self,
        index: usize,
        spec: &KernelSpec,
        parts: &[BatchPart<'_>],
        output: BatchOutput<'_>,
    ) -> Result<Vec<u8>, BackendError> {
        // Every check before the first CUDA call.
        let output_len = batch_output_len(spec, &resident::request_probe(parts)?)?;
        let request_len = resident::request_len(parts)?;
        let mut sources = Vec::new();
        for part in parts {
            if let BatchPart::Resident(buffer) = part {
                sources.push(self.own(*buffer, index)?);
            }
        }
        let into = match output {
            BatchOutput::Host => None,
            BatchOutput::Into(buffer) => {
                resident::check_output(buffer, output_len)?;
                Some(self.own(buffer, index)?)
            }
        };
        let fail = |err: CudaError| backend_error(err, spec);
        let too_large = |len: usize| fail(CudaError::BadInput(format!("{len} bytes exceed u32")));
        let request_arg = u32::try_from(request_len).map_err(|_| too_large(request_len))?;
        let response_arg = u32::try_from(output_len).map_err(|_| too_large(output_len))?;
        let device = self.device(index).map_err(fail)?;
        let module = self.module_for(index, spec).map_err(fail)?;
        let mut lane = self.take_lane(device).map_err(fail)?;
        let outcome = (|| {
            let request = DeviceBytes::alloc(&lane.stream, request_len)?;
            let mut offset: usize = 0;
            let mut sources = sources.iter();
            for part in parts {
                let target = request.pointer() + offset as CUdeviceptr;
                match part {
                    BatchPart::Host(bytes) if !bytes.is_empty() => {
                        upload(&device.context, &mut lane, target, bytes)?;
                        // The next upload reuses the lane's staging chunks.
                        synchronize(lane.stream.raw)?;
                    }
                    BatchPart::Resident(_) => {
                        let Some(source) = sources.next() else {
                            return Err(CudaError::BadInput("a resident part went missing".into()));
                        };
                        if !source.is_empty() {
                            let _held = source.hold();
                            // SAFETY: the source holds `source.len()` bytes
                            // and the request holds every part, so the copy
                            // fits at `offset`; both are usable from this
                            // stream (the source was waited for when made).
                            unsafe {
                                sys::cuMemcpyDtoDAsync_v2(
                                    target,
                                    source.pointer(),
                                    source.len(),
                                    lane.stream.raw,
                                )
                            }
                            .result()
                            .map_err(driver("cuMemcpyDtoDAsync"))?;
                            // The source may be written as soon as it is
                            // released.
                            synchronize(lane.stream.raw)?;
                        }
                    }
                    BatchPart::Host(_) => {}
                }
                offset += part.len();
            }
            match into {
                Some(into) => {
                    let _held = into.hold();
                    launch_batch(
                        &module,
                        &lane,
                        (request.pointer(), request_arg),
                        (into.pointer(), response_arg),
                    )?;
                    synchronize(lane.stream.raw)?;
                    Ok(Vec::new())
                }
                None => {
                    let response = DeviceBytes::alloc(&lane.stream, output_len)?;
                    launch_batch(
                        &module,
                        &lane,
                        (request.pointer(), request_arg),
                        (response.pointer(), response_arg),
                    )?;
                    let mut out = vec![0u8; output_len];
                    download(&mut lane, response.pointer(), &mut out)?;
                    Ok(out)
                }
            }
        })();
        Self::give_lane(device, lane, &outcome);
        outcome.map_err(fail)
    }
}
