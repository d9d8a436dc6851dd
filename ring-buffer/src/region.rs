//! Memory that holds a ring.
//!
//! A ring does not care who allocated its bytes: the heap (the CPU backend),
//! pinned host-mapped memory (CUDA) or fine-grained SVM (OpenCL). Each of
//! those is a [`Region`]. This crate implements it for the heap
//! ([`HeapRegion`]), for shared ownership of any region (`Arc<R>`), and for
//! memory someone else owns ([`ExternalRegion`]); the device backends supply
//! their own.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::layout::REGION_ALIGN;

/// Who frees a region's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// Dropping the region frees the memory, through the named allocator
    /// (for example `"heap"`, `"cuda-pinned"`, `"opencl-svm"`).
    Owned {
        /// The allocator that frees it.
        allocator: &'static str,
    },
    /// The memory belongs to someone else, who frees it after every region
    /// over it is gone.
    Borrowed,
}

/// A contiguous block of memory that a ring lives in.
///
/// # Safety
///
/// An implementation promises, for as long as the value lives:
/// 1. `base()` points to `len()` bytes that are valid for reads and writes
///    from any thread, and never moves.
/// 2. Every byte is initialised (zeroed memory is fine).
/// 3. `base()` is aligned to at least `align()`, and `align()` is a power of
///    two.
/// 4. Whoever else touches the bytes (another view, a device) does so only
///    through the ring protocol in `docs/ring-protocol.md`: shared words with
///    atomic operations, payloads only while holding the slot.
pub unsafe trait Region: Send + Sync + 'static {
    /// Start of the memory.
    fn base(&self) -> NonNull<u8>;
    /// Number of bytes.
    fn len(&self) -> usize;
    /// Whether the region has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Alignment of `base()`.
    fn align(&self) -> usize;
    /// Who frees the memory.
    fn ownership(&self) -> Ownership;
}

/// Zeroed heap memory, aligned to 128 bytes, freed on drop.
pub struct HeapRegion {
    /// Non-null; points to `alloc_layout.size()` zeroed bytes from
    /// `alloc_zeroed`.
    base: NonNull<u8>,
    /// Bytes reported by `len()`; at most `alloc_layout.size()`.
    len: usize,
    /// The layout allocated: size `len.max(1)`, alignment [`REGION_ALIGN`].
    alloc_layout: Layout,
}

impl HeapRegion {
    /// Allocates `len` zeroed bytes aligned to 128. A `len` of zero still
    /// allocates one byte so the pointer is real.
    ///
    /// Allocation failure aborts through [`std::alloc::handle_alloc_error`],
    /// as it does for `Vec`; [`HeapRegion::try_zeroed`] returns it instead.
    pub fn zeroed(len: usize) -> HeapRegion {
        match HeapRegion::try_zeroed(len) {
            Some(region) => region,
            None => std::alloc::handle_alloc_error(
                Layout::from_size_align(len.max(1), REGION_ALIGN).unwrap_or(Layout::new::<u8>()),
            ),
        }
    }

    /// Allocates `len` zeroed bytes aligned to 128, or `None` if the
    /// allocator refuses (or `len` is within 128 bytes of `isize::MAX`).
    pub fn try_zeroed(len: usize) -> Option<HeapRegion> {
        let alloc_layout = Layout::from_size_align(len.max(1), REGION_ALIGN).ok()?;
        // SAFETY: `alloc_layout` has a non-zero size.
        let ptr = unsafe { alloc_zeroed(alloc_layout) };
        let base = NonNull::new(ptr)?;
        Some(HeapRegion {
            base,
            len,
            alloc_layout,
        })
    }
}

impl Drop for HeapRegion {
    fn drop(&mut self) {
        // SAFETY: `base` came from `alloc_zeroed(alloc_layout)` and is freed
        // exactly once, here.
        unsafe { dealloc(self.base.as_ptr(), self.alloc_layout) };
    }
}

impl fmt::Debug for HeapRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeapRegion")
            .field("base", &self.base)
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: the allocation is plain memory with no thread affinity; all
// concurrent access goes through the ring protocol.
unsafe impl Send for HeapRegion {}
// SAFETY: as above; `&HeapRegion` only hands out the base pointer.
unsafe impl Sync for HeapRegion {}

// SAFETY: 1. the allocation lives until drop and never moves; 2. it is
// zeroed; 3. it is aligned to `REGION_ALIGN`, a power of two; 4. a
// `HeapRegion` hands its memory to one ring (`Ring::new`, or `init_in`,
// whose unsafe contract covers sharing through `Arc`), and the crate's
// handles follow the protocol.
unsafe impl Region for HeapRegion {
    fn base(&self) -> NonNull<u8> {
        self.base
    }
    fn len(&self) -> usize {
        self.len
    }
    fn align(&self) -> usize {
        REGION_ALIGN
    }
    fn ownership(&self) -> Ownership {
        Ownership::Owned { allocator: "heap" }
    }
}

// SAFETY: an `Arc` keeps the inner region (and so its memory) alive for as
// long as any clone lives; every promise is the inner region's.
unsafe impl<R: Region> Region for Arc<R> {
    fn base(&self) -> NonNull<u8> {
        (**self).base()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
    fn align(&self) -> usize {
        (**self).align()
    }
    fn ownership(&self) -> Ownership {
        (**self).ownership()
    }
}

/// Memory owned elsewhere: a device mapping, a shared-memory segment, a
/// buffer a test corrupts on purpose. Dropping it frees nothing.
pub struct ExternalRegion {
    /// Non-null; valid for `len` bytes for the region's whole life (the
    /// constructor's contract).
    base: NonNull<u8>,
    /// Any length, including 0.
    len: usize,
}

impl ExternalRegion {
    /// Wraps `len` bytes at `base`.
    ///
    /// # Safety
    ///
    /// The caller upholds every promise of [`Region`] for these bytes until
    /// the returned value and every ring built on it are dropped.
    pub unsafe fn new(base: NonNull<u8>, len: usize) -> ExternalRegion {
        ExternalRegion { base, len }
    }
}

impl fmt::Debug for ExternalRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExternalRegion")
            .field("base", &self.base)
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: the constructor's caller promised the bytes are usable from any
// thread.
unsafe impl Send for ExternalRegion {}
// SAFETY: as above.
unsafe impl Sync for ExternalRegion {}

// SAFETY: the promises are the constructor's contract. `align()` reports the
// alignment the address actually has, a power of two.
unsafe impl Region for ExternalRegion {
    fn base(&self) -> NonNull<u8> {
        self.base
    }
    fn len(&self) -> usize {
        self.len
    }
    fn align(&self) -> usize {
        1 << (self.base.as_ptr() as usize).trailing_zeros().min(12)
    }
    fn ownership(&self) -> Ownership {
        Ownership::Borrowed
    }
}
