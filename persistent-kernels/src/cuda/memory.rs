//! CUDA memory: host-mapped ring regions, pinned staging chunks and
//! stream-ordered device buffers.
//!
//! Invariants:
//! 1. Nothing here frees memory with a call that may wait for the whole
//!    device (`cuMemFree`, `cuMemFreeHost`) while the backend lives: a
//!    persistent kernel never ends by itself, so such a wait could last
//!    forever. Ring regions and staging chunks go back to a per-device
//!    cache and are freed when the last handle on the cache is dropped;
//!    device buffers are freed with `cuMemFreeAsync` on their stream, into
//!    the device's stream-ordered pool, which keeps up to
//!    [`DEVICE_POOL_KEEP`](super::DEVICE_POOL_KEEP) bytes for the next
//!    batch: the device-buffer pool is the driver's.
//! 2. Every driver call is made with the device's context bound to the
//!    calling thread.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::sys::{self, CUdeviceptr, CUstream};
use cudarc::driver::{CudaContext, result};
use granary_ring::{Ownership, Region};

use super::persistent::running_on;
use super::{CudaError, driver};

/// A non-blocking stream, destroyed when the last holder drops it: lanes,
/// persistent kernels and the device buffers freed on it share it, so a
/// buffer never frees on a destroyed stream.
pub(crate) struct Stream {
    context: Arc<CudaContext>,
    pub(crate) raw: CUstream,
}

// SAFETY: a driver handle usable from any thread that binds the context,
// which every use does.
unsafe impl Send for Stream {}
// SAFETY: as above; the handle is never mutated.
unsafe impl Sync for Stream {}

impl Stream {
    pub(crate) fn new(context: &Arc<CudaContext>) -> Result<Arc<Stream>, CudaError> {
        context
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))?;
        let raw = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(driver("cuStreamCreate"))?;
        Ok(Arc::new(Stream {
            context: context.clone(),
            raw,
        }))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.context.bind_to_thread().is_ok() {
            // SAFETY: created once, destroyed once. Work still queued on it
            // completes first; destroying does not wait for other streams.
            let _ = unsafe { result::stream::destroy(self.raw) };
        }
    }
}

/// Whether the device's host allocations may be freed now: not while a
/// persistent kernel runs there (rule 1; a hung kernel's lease is never
/// given back, so its device keeps everything for good).
fn may_free(context: &CudaContext) -> bool {
    running_on(context.ordinal()) == 0 && context.bind_to_thread().is_ok()
}

/// Page-locked host allocations of one device's context, all made with
/// the same `cuMemHostAlloc` flags, recycled by exact size, and freed when
/// the last holder goes (rule 1).
pub(crate) struct HostCache {
    context: Arc<CudaContext>,
    /// `cuMemHostAlloc` flags of every allocation.
    flags: u32,
    /// Bytes the cache may allocate in all, handed out or cached.
    limit: usize,
    /// Bytes allocated so far, at most `limit`.
    allocated: AtomicUsize,
    /// Free allocations: (base, bytes).
    free: Mutex<Vec<(NonNull<u8>, usize)>>,
}

// SAFETY: the cached pointers are host allocations owned by the cache, used
// by one holder at a time; the mutex serialises the list.
unsafe impl Send for HostCache {}
// SAFETY: as above.
unsafe impl Sync for HostCache {}

/// The most page-locked memory one device's cache allocates for batch
/// inputs. Page-locked memory is taken from the host for good (rule 1), so
/// it is bounded; beyond it callers stage in ordinary memory.
pub const PINNED_LIMIT: usize = 1 << 30;

impl HostCache {
    /// Ring memory: page-locked, mapped into the device's address space
    /// (not write-combined: the host reads it too), unbounded (rings are
    /// few and sized by their configuration).
    pub(crate) fn mapped(context: Arc<CudaContext>) -> Arc<HostCache> {
        HostCache::with(
            context,
            sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE,
            usize::MAX,
        )
    }

    /// Batch inputs: page-locked, up to [`PINNED_LIMIT`].
    pub(crate) fn pinned(context: Arc<CudaContext>) -> Arc<HostCache> {
        HostCache::with(context, sys::CU_MEMHOSTALLOC_PORTABLE, PINNED_LIMIT)
    }

    fn with(context: Arc<CudaContext>, flags: u32, limit: usize) -> Arc<HostCache> {
        Arc::new(HostCache {
            context,
            flags,
            limit,
            allocated: AtomicUsize::new(0),
            free: Mutex::new(Vec::new()),
        })
    }

    /// Exactly `bytes`: a cached allocation of that size (`false`: its
    /// bytes are what its last holder left), or a new one (`true`: its
    /// bytes are uninitialised).
    fn take(&self, bytes: usize) -> Result<(NonNull<u8>, bool), CudaError> {
        let cached = {
            let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
            free.iter()
                .position(|&(_, len)| len == bytes)
                .map(|at| free.swap_remove(at).0)
        };
        if let Some(base) = cached {
            return Ok((base, false));
        }
        let before = self.allocated.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) > self.limit {
            self.allocated.fetch_sub(bytes, Ordering::Relaxed);
            return Err(CudaError::NoPinnedMemory {
                requested: bytes,
                allocated: before,
                limit: self.limit,
            });
        }
        let allocated = (|| {
            self.context
                .bind_to_thread()
                .map_err(driver("cuCtxSetCurrent"))?;
            // SAFETY: the context is bound; the flags are valid
            // cuMemHostAlloc flags (never write-combined).
            let ptr = unsafe { result::malloc_host(bytes, self.flags) }
                .map_err(driver("cuMemHostAlloc"))?;
            NonNull::new(ptr.cast::<u8>()).ok_or(CudaError::Api {
                call: "cuMemHostAlloc",
                code: 0,
            })
        })();
        match allocated {
            Ok(base) => Ok((base, true)),
            Err(err) => {
                self.allocated.fetch_sub(bytes, Ordering::Relaxed);
                Err(err)
            }
        }
    }

    fn give_back(&self, base: NonNull<u8>, bytes: usize) {
        self.free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((base, bytes));
    }

    /// The device address of host-mapped memory at `base`.
    fn device_pointer(&self, base: NonNull<u8>) -> Result<CUdeviceptr, CudaError> {
        self.context
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))?;
        let mut device = 0;
        // SAFETY: `base` came from cuMemHostAlloc with DEVICEMAP in this
        // context; flags must be 0.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device, base.as_ptr().cast(), 0) }
            .result()
            .map_err(driver("cuMemHostGetDevicePointer"))?;
        Ok(device)
    }

    /// `len` bytes of page-locked memory for a batch input, as a power of
    /// two from 4 KiB: zeroed when new, else what its last holder left.
    pub(crate) fn take_pinned(self: &Arc<Self>, len: usize) -> Result<PinnedBytes, CudaError> {
        let capacity = len
            .max(4096)
            .checked_next_power_of_two()
            .ok_or_else(|| CudaError::BadInput(format!("{len} bytes of pinned memory")))?;
        let (base, fresh) = self.take(capacity)?;
        if fresh {
            // SAFETY: fresh, so uninitialised: `capacity` bytes owned by
            // the new handle alone are zeroed once. A recycled buffer holds
            // its last user's (initialised) bytes, which a staged input
            // overwrites anyway: zeroing 64 MiB again measured as slow as
            // the copy itself.
            unsafe { base.as_ptr().write_bytes(0, capacity) };
        }
        Ok(PinnedBytes {
            cache: self.clone(),
            base,
            capacity,
            len,
        })
    }
}

impl Drop for HostCache {
    fn drop(&mut self) {
        // The last region and the backend are gone: no kernel uses these.
        if !may_free(&self.context) {
            return;
        }
        let free = self.free.get_mut().unwrap_or_else(PoisonError::into_inner);
        for (base, _) in free.drain(..) {
            // SAFETY: from cuMemHostAlloc, freed once; nothing refers to it.
            let _ = unsafe { result::free_host(base.as_ptr().cast()) };
        }
    }
}

/// A ring's memory: pinned, mapped into the device, 4 KiB aligned (the
/// driver allocates whole pages).
pub(crate) struct MappedRegion {
    cache: Arc<HostCache>,
    base: NonNull<u8>,
    len: usize,
    /// `base` as the device addresses it.
    device: CUdeviceptr,
}

impl MappedRegion {
    pub(crate) fn zeroed(cache: &Arc<HostCache>, len: usize) -> Result<MappedRegion, CudaError> {
        let (base, _) = cache.take(len)?;
        // SAFETY: `len` bytes owned by this region alone; a ring needs them
        // zeroed, whoever held them before.
        unsafe { base.as_ptr().write_bytes(0, len) };
        let device = match cache.device_pointer(base) {
            Ok(device) => device,
            Err(err) => {
                cache.give_back(base, len);
                return Err(err);
            }
        };
        Ok(MappedRegion {
            cache: cache.clone(),
            base,
            len,
            device,
        })
    }

    pub(crate) fn device_pointer(&self) -> CUdeviceptr {
        self.device
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        // Rule 1: back to the cache, not to the driver.
        self.cache.give_back(self.base, self.len);
    }
}

// SAFETY: pinned host memory is not tied to a thread; access follows the
// ring protocol.
unsafe impl Send for MappedRegion {}
// SAFETY: as above.
unsafe impl Sync for MappedRegion {}

// SAFETY: 1. the allocation lives (in the cache) until drop and never moves;
// 2. it is zeroed when taken; 3. the driver returns page-aligned memory, so
// 128-byte alignment holds; 4. the host uses it through ring handles and the
// device through the persistent template, which follows
// docs/ring-protocol.md.
unsafe impl Region for MappedRegion {
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
            allocator: "cuda-host-mapped",
        }
    }
}

/// Device memory from the stream-ordered allocator, freed on its stream
/// when dropped (rule 1).
pub struct DeviceBytes {
    pointer: CUdeviceptr,
    len: usize,
    /// The stream the buffer was allocated on and is freed on; kept alive
    /// by the buffer.
    stream: Arc<Stream>,
}

// SAFETY: a device address and a stream handle; the driver accepts both from
// any thread with the context bound, which every use does.
unsafe impl Send for DeviceBytes {}
// SAFETY: shared references only read the fields.
unsafe impl Sync for DeviceBytes {}

impl std::fmt::Debug for DeviceBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBytes")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl DeviceBytes {
    /// `len` bytes (at least 1) on `stream`, usable by work queued after
    /// this call on the same stream.
    pub(crate) fn alloc(stream: &Arc<Stream>, len: usize) -> Result<DeviceBytes, CudaError> {
        stream
            .context
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))?;
        // SAFETY: the context is bound and the stream belongs to it.
        let pointer = unsafe { result::malloc_async(stream.raw, len.max(1)) }
            .map_err(driver("cuMemAllocAsync"))?;
        Ok(DeviceBytes {
            pointer,
            len,
            stream: stream.clone(),
        })
    }

    /// The device address.
    pub fn pointer(&self) -> CUdeviceptr {
        self.pointer
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for DeviceBytes {
    fn drop(&mut self) {
        if self.stream.context.bind_to_thread().is_ok() {
            // SAFETY: allocated on the stream, which this buffer keeps
            // alive, and freed once, after the work queued on it.
            let _ = unsafe { result::free_async(self.pointer, self.stream.raw) };
        }
    }
}

/// A pinned host chunk for staging batch transfers (not mapped, not
/// write-combined: the host both writes and reads it).
pub(crate) struct PinnedChunk {
    pub(crate) base: NonNull<u8>,
    pub(crate) len: usize,
}

// SAFETY: host memory owned by one lane at a time.
unsafe impl Send for PinnedChunk {}

impl PinnedChunk {
    pub(crate) fn new(context: &Arc<CudaContext>, len: usize) -> Result<PinnedChunk, CudaError> {
        context
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))?;
        // SAFETY: the context is bound; portable pinned memory.
        let ptr = unsafe { result::malloc_host(len, sys::CU_MEMHOSTALLOC_PORTABLE) }
            .map_err(driver("cuMemHostAlloc"))?;
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(CudaError::Api {
            call: "cuMemHostAlloc",
            code: 0,
        })?;
        Ok(PinnedChunk { base, len })
    }

    /// Frees the chunk. Only for a backend being dropped (rule 1).
    ///
    /// # Safety
    /// No transfer may still use the chunk, and the context must be bound.
    pub(crate) unsafe fn free(self) {
        // SAFETY: from cuMemHostAlloc, freed once (the caller's promise).
        let _ = unsafe { result::free_host(self.base.as_ptr().cast()) };
    }
}

/// Whether `bytes` lie in page-locked host memory that the driver can copy
/// from directly (`cuMemHostAlloc`, or registered with `cuMemHostRegister`).
/// A Rust slice lies within one allocation, so its first byte decides.
pub(crate) fn is_pinned(context: &Arc<CudaContext>, bytes: &[u8]) -> bool {
    if bytes.is_empty() || context.bind_to_thread().is_err() {
        return false;
    }
    let mut memory_type = 0u32;
    // SAFETY: a valid out-pointer for a CUmemorytype (a u32 enum) and the
    // address of live host memory; pageable memory returns an error.
    let found = unsafe {
        sys::cuPointerGetAttribute(
            (&mut memory_type as *mut u32).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            bytes.as_ptr() as CUdeviceptr,
        )
    };
    found == sys::cudaError_enum::CUDA_SUCCESS
        && memory_type == sys::CUmemorytype::CU_MEMORYTYPE_HOST as u32
}

/// Page-locked host memory for a batch's input, from
/// [`CudaBackend::pinned`](super::CudaBackend::pinned): a batch whose input
/// is here is copied to the device by DMA straight from it, with no staging
/// copy. Given back to the device's cache when dropped (rule 1).
pub struct PinnedBytes {
    cache: Arc<HostCache>,
    base: NonNull<u8>,
    /// Bytes allocated, at least `len`.
    capacity: usize,
    len: usize,
}

// SAFETY: host memory owned by this handle alone.
unsafe impl Send for PinnedBytes {}
// SAFETY: shared references only read.
unsafe impl Sync for PinnedBytes {}

impl std::fmt::Debug for PinnedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedBytes")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for PinnedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len <= capacity` bytes, initialised (zeroed when taken),
        // owned by this handle.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for PinnedBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, through a unique borrow.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for PinnedBytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for PinnedBytes {
    fn drop(&mut self) {
        self.cache.give_back(self.base, self.capacity);
    }
}
