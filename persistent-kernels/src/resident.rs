//! Resident buffers: device memory that outlives a call, so a grain can
//! keep its data on the device and send only what changes.
//!
//! # Contract
//!
//! 1. A [`DeviceBuffer`] is made by one backend for one of its devices
//!    ([`Backend::alloc_resident`](crate::Backend::alloc_resident)). Its
//!    length is fixed and its bytes start zeroed. Only the backend that made
//!    it may use it; any other reports [`BackendError::BadBuffer`].
//! 2. A batch may take its request in parts ([`BatchPart`]): host bytes,
//!    or a whole resident buffer. The kernel sees one request, the parts
//!    concatenated. Resident parts are copied on the device, never through
//!    the host. The wgpu backend assembles the request in 4-byte words:
//!    there every part but the last must be a whole number of words, and
//!    another is refused with [`BackendError::BadBuffer`].
//! 3. The response goes back to the host, or into a resident buffer of
//!    exactly the response's length ([`BatchOutput::Into`]). The request is
//!    assembled before the kernel runs, so a buffer may be both a part and
//!    the output (`y = a·x + y` in place).
//! 4. The response's length comes from the kernel's `output_len`, which
//!    reads the request: resident parts read as zeros there. What sizes the
//!    output (dimensions, scalars the kernel checks) belongs in host parts.
//! 5. Operations on one buffer are ordered by the caller: the backend
//!    serialises each one (it returns when the device is done), so a
//!    buffer is never read and written at once by two of them unless the
//!    caller runs them concurrently.

use std::any::Any;
use std::fmt;
use std::sync::{Mutex, PoisonError};

use crate::backend::BackendError;
use crate::device::BackendKind;

/// Bytes kept on one device across calls (rule 1).
pub trait DeviceBuffer: Send + Sync + fmt::Debug {
    /// Length in bytes.
    fn len(&self) -> usize;

    /// Whether it holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The backend that made it.
    fn backend(&self) -> BackendKind;

    /// The index of its device among the backend's devices.
    fn device(&self) -> usize;

    /// The buffer as its backend sees it.
    fn as_any(&self) -> &dyn Any;
}

/// One part of a batch request (rule 2).
#[derive(Debug, Clone, Copy)]
pub enum BatchPart<'a> {
    /// Bytes from the host, copied to the device.
    Host(&'a [u8]),
    /// A whole resident buffer, copied on the device.
    Resident(&'a dyn DeviceBuffer),
}

impl BatchPart<'_> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            BatchPart::Host(bytes) => bytes.len(),
            BatchPart::Resident(buffer) => buffer.len(),
        }
    }

    /// Whether the part is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a batch's response goes (rule 3).
#[derive(Debug, Clone, Copy)]
pub enum BatchOutput<'a> {
    /// Back to the host: the call returns it.
    Host,
    /// Into this resident buffer, whose length must be the response's; the
    /// call returns no bytes.
    Into(&'a dyn DeviceBuffer),
}

/// The request as `output_len` sees it (rule 4): host parts as they are,
/// resident parts as zeros. The zeros come from a zeroed allocation, so a
/// large resident part costs address space, not memory, unless read.
pub fn request_probe(parts: &[BatchPart<'_>]) -> Result<Vec<u8>, BackendError> {
    let total = request_len(parts)?;
    let mut probe = vec![0u8; total];
    let mut offset = 0;
    for part in parts {
        if let BatchPart::Host(bytes) = part {
            probe[offset..offset + bytes.len()].copy_from_slice(bytes);
        }
        offset += part.len();
    }
    Ok(probe)
}

/// The concatenated request's length.
pub fn request_len(parts: &[BatchPart<'_>]) -> Result<usize, BackendError> {
    parts
        .iter()
        .try_fold(0usize, |total, part| total.checked_add(part.len()))
        .ok_or_else(|| BackendError::BadBuffer("the request's parts overflow usize".into()))
}

/// Checks that `buffer` is one of `backend`'s buffers on `device` and
/// returns it as `B`.
pub fn own_buffer<B: 'static>(
    buffer: &dyn DeviceBuffer,
    backend: BackendKind,
    device: usize,
) -> Result<&B, BackendError> {
    if buffer.backend() != backend || buffer.device() != device {
        return Err(BackendError::BadBuffer(format!(
            "a buffer of {:?} device {} used on {backend:?} device {device}",
            buffer.backend(),
            buffer.device()
        )));
    }
    buffer.as_any().downcast_ref::<B>().ok_or_else(|| {
        BackendError::BadBuffer(format!("a buffer not made by this {backend:?} backend"))
    })
}

/// Checks that `len` bytes at `offset` lie inside a buffer of `buffer_len`.
pub fn check_range(offset: usize, len: usize, buffer_len: usize) -> Result<(), BackendError> {
    match offset.checked_add(len) {
        Some(end) if end <= buffer_len => Ok(()),
        _ => Err(BackendError::BadBuffer(format!(
            "{len} bytes at offset {offset} do not fit a buffer of {buffer_len} bytes"
        ))),
    }
}

/// Checks that an output buffer holds exactly the response.
pub fn check_output(buffer: &dyn DeviceBuffer, output_len: usize) -> Result<(), BackendError> {
    if buffer.len() == output_len {
        Ok(())
    } else {
        Err(BackendError::BadBuffer(format!(
            "the response is {output_len} bytes but the output buffer holds {}",
            buffer.len()
        )))
    }
}

/// The CPU backend's resident buffer: its device's memory is this host's.
#[derive(Debug)]
pub struct CpuBuffer {
    bytes: Mutex<Vec<u8>>,
    len: usize,
    /// Which of the CPU backend's devices it belongs to.
    device: usize,
}

impl CpuBuffer {
    /// `len` zeroed bytes on the CPU backend's first device.
    pub fn new(len: usize) -> CpuBuffer {
        CpuBuffer::on(0, len)
    }

    /// `len` zeroed bytes on the CPU backend's device `device`.
    pub fn on(device: usize, len: usize) -> CpuBuffer {
        CpuBuffer {
            bytes: Mutex::new(vec![0; len]),
            len,
            device,
        }
    }

    /// Runs `f` on the bytes. A panic while they were borrowed left them
    /// as bytes still, so a poisoned lock is taken over.
    pub fn with<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> R {
        f(&mut self.bytes.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Copies every byte into `to`, of the same length. The two locks are
    /// taken in address order, so that two copies between the same
    /// buffers in opposite directions run one after the other and never
    /// deadlock; a copy into itself changes nothing.
    pub fn copy_into(&self, to: &CpuBuffer) -> Result<(), BackendError> {
        if self.len != to.len {
            return Err(BackendError::BadBuffer(format!(
                "a copy of {} bytes into a buffer of {}",
                self.len, to.len
            )));
        }
        if std::ptr::eq(self, to) {
            return Ok(());
        }
        fn lock(buffer: &CpuBuffer) -> std::sync::MutexGuard<'_, Vec<u8>> {
            buffer.bytes.lock().unwrap_or_else(PoisonError::into_inner)
        }
        let (from, mut into) = if (self as *const CpuBuffer) < (to as *const CpuBuffer) {
            let from = lock(self);
            (from, lock(to))
        } else {
            let into = lock(to);
            (lock(self), into)
        };
        into.copy_from_slice(&from);
        Ok(())
    }
}

impl DeviceBuffer for CpuBuffer {
    fn len(&self) -> usize {
        self.len
    }

    fn backend(&self) -> BackendKind {
        BackendKind::Cpu
    }

    fn device(&self) -> usize {
        self.device
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
