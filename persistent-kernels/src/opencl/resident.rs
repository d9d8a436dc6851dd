//! Resident buffers on OpenCL devices (the contract is in `resident.rs`):
//! plain device buffers, written and read with blocking transfers on the
//! device's batch queue, and copied into a batch's request on the device.

use std::any::Any;
use std::ptr;
use std::sync::{Arc, Mutex, PoisonError};

use opencl3::context::Context;
use opencl3::kernel::{ExecuteKernel, Kernel};
use opencl3::memory::{Buffer, CL_MEM_READ_ONLY, CL_MEM_READ_WRITE, CL_MEM_WRITE_ONLY};
use opencl3::types::{CL_BLOCKING, cl_uint};

use super::{OpenClBackend, OpenClError, api, backend_error};
use crate::backend::{BackendError, batch_output_len};
use crate::device::BackendKind;
use crate::resident::{self, BatchOutput, BatchPart, DeviceBuffer};
use crate::spec::KernelSpec;

/// An OpenCL resident buffer.
pub struct ClBuffer {
    /// Locked for each operation, which the backend runs to the end before
    /// unlocking (rule 5): the queue, not the lock, orders the device's
    /// work, and the lock gives the `&mut` opencl3 asks for writes.
    buffer: Mutex<Buffer<u8>>,
    len: usize,
    device: usize,
    /// The buffer's context, kept alive by it.
    _context: Arc<Context>,
}

impl std::fmt::Debug for ClBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClBuffer")
            .field("len", &self.len)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl DeviceBuffer for ClBuffer {
    fn len(&self) -> usize {
        self.len
    }

    fn backend(&self) -> BackendKind {
        BackendKind::OpenCl
    }

    fn device(&self) -> usize {
        self.device
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl ClBuffer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Buffer<u8>> {
        // A panic while locked cannot leave the handle half-changed.
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An OpenCL failure outside any kernel.
fn device_error(err: OpenClError) -> BackendError {
    match err {
        OpenClError::UnknownDevice(index) => BackendError::UnknownDevice(index),
        OpenClError::Unavailable(why) => BackendError::Unavailable(why),
        other => BackendError::Device(other.to_string()),
    }
}

impl OpenClBackend {
    /// `buffer` as one of this backend's buffers on device `index`: the
    /// kind, the device and the context must all be this backend's.
    fn own<'b>(
        &self,
        buffer: &'b dyn DeviceBuffer,
        index: usize,
    ) -> Result<&'b ClBuffer, BackendError> {
        let own = resident::own_buffer::<ClBuffer>(buffer, BackendKind::OpenCl, index)?;
        let device = self.device(index).map_err(device_error)?;
        if Arc::ptr_eq(&own._context, &device.context) {
            Ok(own)
        } else {
            Err(BackendError::BadBuffer(
                "a buffer of another OpenCL backend's context".into(),
            ))
        }
    }

    /// `len` zeroed bytes on device `index`.
    pub fn alloc_resident(&self, index: usize, len: usize) -> Result<ClBuffer, BackendError> {
        let device = self.device(index).map_err(device_error)?;
        // Zero-length buffers are invalid in OpenCL: one byte, never used.
        // SAFETY: a null host pointer with no USE/COPY_HOST_PTR flag: a
        // plain device allocation.
        let mut buffer = unsafe {
            Buffer::<u8>::create(
                &device.context,
                CL_MEM_READ_WRITE,
                len.max(1),
                ptr::null_mut(),
            )
        }
        .map_err(api("clCreateBuffer"))
        .map_err(device_error)?;
        // SAFETY: fills the buffer's own `len.max(1)` bytes; blocking on
        // the queue below before the buffer is handed out.
        unsafe {
            device
                .queue
                .enqueue_fill_buffer(&mut buffer, &[0u8], 0, len.max(1), &[])
        }
        .map_err(api("clEnqueueFillBuffer"))
        .map_err(device_error)?;
        device
            .queue
            .finish()
            .map_err(api("clFinish"))
            .map_err(device_error)?;
        Ok(ClBuffer {
            buffer: Mutex::new(buffer),
            len,
            device: index,
            _context: device.context.clone(),
        })
    }

    pub(super) fn write_resident(
        &self,
        buffer: &dyn DeviceBuffer,
        offset: usize,
        data: &[u8],
    ) -> Result<(), BackendError> {
        let buffer = self.own(buffer, buffer.device())?;
        resident::check_range(offset, data.len(), buffer.len)?;
        if data.is_empty() {
            return Ok(());
        }
        let device = self.device(buffer.device).map_err(device_error)?;
        let mut guard = buffer.lock();
        // SAFETY: a blocking write of `data.len()` bytes at `offset`, inside
        // the buffer (checked above).
        unsafe {
            device
                .queue
                .enqueue_write_buffer(&mut guard, CL_BLOCKING, offset, data, &[])
        }
        .map_err(api("clEnqueueWriteBuffer"))
        .map_err(device_error)?;
        Ok(())
    }

    pub(super) fn read_resident(
        &self,
        buffer: &dyn DeviceBuffer,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, BackendError> {
        let buffer = self.own(buffer, buffer.device())?;
        resident::check_range(offset, len, buffer.len)?;
        let mut out = vec![0u8; len];
        if len == 0 {
            return Ok(out);
        }
        let device = self.device(buffer.device).map_err(device_error)?;
        let guard = buffer.lock();
        // SAFETY: a blocking read of `len` bytes at `offset`, inside the
        // buffer (checked above), into `out` of that length.
        unsafe {
            device
                .queue
                .enqueue_read_buffer(&guard, CL_BLOCKING, offset, &mut out, &[])
        }
        .map_err(api("clEnqueueReadBuffer"))
        .map_err(device_error)?;
        Ok(out)
    }

    /// Runs `spec`'s `granary_batch` over the request made of `parts`
    /// (rules 2 to 4 of `resident.rs`): host parts are written into the
    /// request buffer, resident parts copied into it on the device; an
    /// output buffer is the kernel's response argument itself.
    pub(super) fn run_batch_parts(
        &self,
        index: usize,
        spec: &KernelSpec,
        parts: &[BatchPart<'_>],
        output: BatchOutput<'_>,
    ) -> Result<Vec<u8>, BackendError> {
        // Every check before the first OpenCL call.
        let output_len = batch_output_len(spec, &resident::request_probe(parts)?)?;
        let request_len = resident::request_len(parts)?;
        for part in parts {
            if let BatchPart::Resident(buffer) = part {
                self.own(*buffer, index)?;
            }
        }
        let into = match output {
            BatchOutput::Host => None,
            BatchOutput::Into(buffer) => {
                resident::check_output(buffer, output_len)?;
                Some(self.own(buffer, index)?)
            }
        };
        let fail = |err: OpenClError| backend_error(err, spec);
        let too_large = |len: usize| fail(OpenClError::BadInput(format!("{len} bytes exceed u32")));
        let request_arg = cl_uint::try_from(request_len).map_err(|_| too_large(request_len))?;
        let response_arg = cl_uint::try_from(output_len).map_err(|_| too_large(output_len))?;
        let device = self.device(index).map_err(fail)?;
        let program = self.program_for(index, spec).map_err(fail)?;
        let kernel = Kernel::create(&program, "granary_batch")
            .map_err(api("clCreateKernel"))
            .map_err(fail)?;
        // SAFETY: a plain device allocation (null host pointer, no host
        // flags); one byte at least, as OpenCL requires.
        let mut request = unsafe {
            Buffer::<u8>::create(
                &device.context,
                CL_MEM_READ_ONLY,
                request_len.max(1),
                ptr::null_mut(),
            )
        }
        .map_err(api("clCreateBuffer"))
        .map_err(fail)?;
        let mut offset = 0;
        for part in parts {
            match part {
                BatchPart::Host(bytes) if !bytes.is_empty() => {
                    // SAFETY: a blocking write of the part's bytes at its
                    // offset in the request, which holds every part.
                    unsafe {
                        device.queue.enqueue_write_buffer(
                            &mut request,
                            CL_BLOCKING,
                            offset,
                            bytes,
                            &[],
                        )
                    }
                    .map_err(api("clEnqueueWriteBuffer"))
                    .map_err(fail)?;
                }
                BatchPart::Resident(buffer) if !buffer.is_empty() => {
                    let source = self.own(*buffer, index)?;
                    let guard = source.lock();
                    // SAFETY: copies the whole source, `source.len` bytes,
                    // to the part's offset in the request, which holds every
                    // part. The queue is in order, so the copy precedes the
                    // kernel; the lock is released once it is queued, and a
                    // later write to the source is queued after it.
                    unsafe {
                        device.queue.enqueue_copy_buffer(
                            &guard,
                            &mut request,
                            0,
                            offset,
                            source.len,
                            &[],
                        )
                    }
                    .map_err(api("clEnqueueCopyBuffer"))
                    .map_err(fail)?;
                }
                _ => {}
            }
            offset += part.len();
        }
        let work_items = (output_len / 4).max(1);
        match into {
            Some(into) => {
                let target = into.lock();
                // SAFETY: the arguments match granary_batch's signature
                // (buffer, uint, buffer, uint); the output buffer holds
                // exactly `output_len` bytes (checked above) and the kernel
                // writes only below it. The lock is held until the queue
                // has finished, so no other operation touches the buffer
                // meanwhile.
                unsafe {
                    ExecuteKernel::new(&kernel)
                        .set_arg(&request)
                        .set_arg(&request_arg)
                        .set_arg(&*target)
                        .set_arg(&response_arg)
                        .set_global_work_size(work_items)
                        .enqueue_nd_range(&device.queue)
                }
                .map_err(api("clEnqueueNDRangeKernel"))
                .map_err(fail)?;
                device
                    .queue
                    .finish()
                    .map_err(api("clFinish"))
                    .map_err(fail)?;
                Ok(Vec::new())
            }
            None => {
                // SAFETY: a plain device allocation, as above.
                let response = unsafe {
                    Buffer::<u8>::create(
                        &device.context,
                        CL_MEM_WRITE_ONLY,
                        output_len.max(1),
                        ptr::null_mut(),
                    )
                }
                .map_err(api("clCreateBuffer"))
                .map_err(fail)?;
                let mut out = vec![0u8; output_len];
                // SAFETY: as for the resident output above, into a response
                // buffer of `output_len` bytes; then a blocking read of
                // those bytes, after the kernel (in-order queue).
                unsafe {
                    ExecuteKernel::new(&kernel)
                        .set_arg(&request)
                        .set_arg(&request_arg)
                        .set_arg(&response)
                        .set_arg(&response_arg)
                        .set_global_work_size(work_items)
                        .enqueue_nd_range(&device.queue)
                        .map_err(api("clEnqueueNDRangeKernel"))
                        .map_err(fail)?;
                    if output_len > 0 {
                        device
                            .queue
                            .enqueue_read_buffer(&response, CL_BLOCKING, 0, &mut out, &[])
                            .map_err(api("clEnqueueReadBuffer"))
                            .map_err(fail)?;
                    }
                }
                device
                    .queue
                    .finish()
                    .map_err(api("clFinish"))
                    .map_err(fail)?;
                Ok(out)
            }
        }
    }
}
