//! A per-device memory pool with power-of-two size classes.
//!
//! # Invariants
//!
//! 1. A request for `n` bytes is served from class `c = max(min_class,
//!    ceil(log2 n))`, whose buffers hold exactly `2^c` bytes; requests above
//!    the largest class are refused ([`PoolError::TooLarge`]), never
//!    silently served by a smaller buffer.
//! 2. Each class keeps at most `max_cached_per_class` idle buffers, in a
//!    lock-free bounded queue (`crossbeam_queue::ArrayQueue`). A returned
//!    buffer that finds its class full is freed, so idle memory is bounded by
//!    `sum over classes of max_cached_per_class × 2^c`, and by
//!    `max_cached_bytes` overall.
//! 3. A rented buffer goes back to its pool when the [`Rented`] guard drops,
//!    on any thread. Nothing is lost if the pool is gone first: the guard
//!    holds the pool alive.
//! 4. Counters (hits, misses, returns, frees) only grow; `cached_bytes`
//!    equals the bytes of the buffers sitting in the free lists, up to the
//!    moments between a queue operation and its counter update.
//!
//! The pool is generic over an [`Allocator`]: the CPU backend's
//! [`HostAllocator`] hands out aligned host memory; the OpenCL and CUDA
//! backends provide device allocators.

use std::fmt;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam_queue::ArrayQueue;

/// Memory a pool hands out. Freed when dropped.
pub trait Buffer: Send + 'static {
    /// Capacity in bytes.
    fn capacity(&self) -> usize;
}

/// Where a pool's buffers come from: one device's memory.
pub trait Allocator: Send + Sync + 'static {
    /// The buffers this allocator makes.
    type Buffer: Buffer;
    /// Allocates a buffer of exactly `bytes` bytes.
    fn allocate(&self, bytes: usize) -> Result<Self::Buffer, AllocError>;
}

/// An allocation the allocator could not make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocError {
    /// Bytes requested.
    pub bytes: usize,
    /// What the allocator reported.
    pub reason: String,
}

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot allocate {} bytes: {}", self.bytes, self.reason)
    }
}

impl std::error::Error for AllocError {}

/// Host memory, 64-byte aligned, for the CPU backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostAllocator;

/// A host buffer from [`HostAllocator`]. Its bytes start zeroed.
pub struct HostBuffer {
    /// 64-byte aligned blocks; `bytes` of them are in use.
    blocks: Box<[Block]>,
    /// Capacity in bytes; `blocks.len() * 64 >= bytes`.
    bytes: usize,
}

/// The unit of a host buffer: 64 bytes, 64-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([u8; 64]);

impl HostBuffer {
    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        let blocks: &[Block] = &self.blocks;
        // SAFETY: `Block` is 64 plain bytes with no padding, so the blocks
        // are `blocks.len() * 64` initialised bytes; `bytes` is at most that.
        unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), self.bytes) }
    }

    /// The buffer's bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let blocks: &mut [Block] = &mut self.blocks;
        // SAFETY: as in `as_slice`, through a unique borrow.
        unsafe { std::slice::from_raw_parts_mut(blocks.as_mut_ptr().cast::<u8>(), self.bytes) }
    }
}

impl fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostBuffer")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Buffer for HostBuffer {
    fn capacity(&self) -> usize {
        self.bytes
    }
}

impl Allocator for HostAllocator {
    type Buffer = HostBuffer;

    fn allocate(&self, bytes: usize) -> Result<HostBuffer, AllocError> {
        let count = bytes.div_ceil(64);
        let mut blocks = Vec::new();
        blocks.try_reserve_exact(count).map_err(|err| AllocError {
            bytes,
            reason: err.to_string(),
        })?;
        blocks.resize(count, Block([0; 64]));
        Ok(HostBuffer {
            blocks: blocks.into_boxed_slice(),
            bytes,
        })
    }
}

/// How a pool is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// log2 of the smallest class's size, `0..=max_class` (default 8: 256 B).
    pub min_class: u32,
    /// log2 of the largest class's size, at most 40 (default 30: 1 GiB).
    pub max_class: u32,
    /// Idle buffers kept per class, at least 1 (default 64).
    pub max_cached_per_class: usize,
    /// Idle bytes kept across all classes (default 256 MiB). A returned
    /// buffer that would exceed it is freed.
    pub max_cached_bytes: usize,
}

impl Default for PoolConfig {
    fn default() -> PoolConfig {
        PoolConfig {
            min_class: 8,
            max_class: 30,
            max_cached_per_class: 64,
            max_cached_bytes: 256 << 20,
        }
    }
}

/// Why a rent failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolError {
    /// The request is larger than the largest class.
    TooLarge {
        /// Bytes requested.
        bytes: usize,
        /// The largest class's size.
        max: usize,
    },
    /// The allocator could not make a new buffer.
    Alloc(AllocError),
    /// The configuration is invalid.
    BadConfig(&'static str),
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::TooLarge { bytes, max } => {
                write!(
                    f,
                    "{bytes} bytes exceeds the pool's largest class of {max} bytes"
                )
            }
            PoolError::Alloc(err) => err.fmt(f),
            PoolError::BadConfig(why) => write!(f, "invalid pool configuration: {why}"),
        }
    }
}

impl std::error::Error for PoolError {}

/// A snapshot of a pool's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Rents served from a free list.
    pub hits: u64,
    /// Rents that allocated.
    pub misses: u64,
    /// Buffers that went back to a free list.
    pub returns: u64,
    /// Buffers freed: returned to a full class, over the byte bound, or
    /// trimmed.
    pub frees: u64,
    /// Bytes sitting idle in the free lists.
    pub cached_bytes: usize,
}

impl PoolStats {
    /// `hits / (hits + misses)`, or 0 before the first rent.
    pub fn hit_ratio(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}

struct PoolInner<A: Allocator> {
    allocator: A,
    config: PoolConfig,
    /// One free list per class, index `class - min_class`.
    classes: Box<[ArrayQueue<A::Buffer>]>,
    hits: AtomicU64,
    misses: AtomicU64,
    returns: AtomicU64,
    frees: AtomicU64,
    cached_bytes: AtomicUsize,
}

/// A pool of buffers from one allocator. Cheap to clone (shared).
pub struct MemoryPool<A: Allocator> {
    inner: Arc<PoolInner<A>>,
}

impl<A: Allocator> Clone for MemoryPool<A> {
    fn clone(&self) -> Self {
        MemoryPool {
            inner: self.inner.clone(),
        }
    }
}

impl<A: Allocator> fmt::Debug for MemoryPool<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryPool")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl<A: Allocator> MemoryPool<A> {
    /// A pool over `allocator`.
    pub fn new(allocator: A, config: PoolConfig) -> Result<MemoryPool<A>, PoolError> {
        if config.max_class > 40 {
            return Err(PoolError::BadConfig("max_class is above 40 (1 TiB)"));
        }
        if config.min_class > config.max_class {
            return Err(PoolError::BadConfig("min_class is above max_class"));
        }
        if config.max_cached_per_class == 0 {
            return Err(PoolError::BadConfig("max_cached_per_class is 0"));
        }
        if usize::BITS <= config.max_class {
            return Err(PoolError::BadConfig("max_class does not fit this target"));
        }
        let classes = (config.min_class..=config.max_class)
            .map(|_| ArrayQueue::new(config.max_cached_per_class))
            .collect();
        Ok(MemoryPool {
            inner: Arc::new(PoolInner {
                allocator,
                config,
                classes,
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                returns: AtomicU64::new(0),
                frees: AtomicU64::new(0),
                cached_bytes: AtomicUsize::new(0),
            }),
        })
    }

    /// The class that serves `bytes`, or `TooLarge`.
    fn class_of(&self, bytes: usize) -> Result<u32, PoolError> {
        let config = &self.inner.config;
        let max = 1usize << config.max_class;
        if bytes > max {
            return Err(PoolError::TooLarge { bytes, max });
        }
        let class = bytes.max(1).next_power_of_two().trailing_zeros();
        Ok(class.max(config.min_class))
    }

    /// Rents a buffer of at least `bytes` bytes (exactly the class size). Its
    /// contents are whatever the last renter left; the allocator's initial
    /// contents on a miss.
    pub fn rent(&self, bytes: usize) -> Result<Rented<A>, PoolError> {
        let class = self.class_of(bytes)?;
        let inner = &self.inner;
        let size = 1usize << class;
        let buffer = match inner.classes[(class - inner.config.min_class) as usize].pop() {
            Some(buffer) => {
                inner.hits.fetch_add(1, Ordering::Relaxed);
                inner.cached_bytes.fetch_sub(size, Ordering::Relaxed);
                buffer
            }
            None => {
                inner.misses.fetch_add(1, Ordering::Relaxed);
                inner.allocator.allocate(size).map_err(PoolError::Alloc)?
            }
        };
        Ok(Rented {
            buffer: ManuallyDrop::new(buffer),
            class,
            pool: self.inner.clone(),
        })
    }

    /// Frees every idle buffer. Returns the bytes freed.
    pub fn trim(&self) -> usize {
        let inner = &self.inner;
        let mut freed = 0;
        for (offset, queue) in inner.classes.iter().enumerate() {
            let size = 1usize << (inner.config.min_class as usize + offset);
            while let Some(buffer) = queue.pop() {
                inner.cached_bytes.fetch_sub(size, Ordering::Relaxed);
                inner.frees.fetch_add(1, Ordering::Relaxed);
                freed += size;
                drop(buffer);
            }
        }
        freed
    }

    /// The pool's counters now.
    pub fn stats(&self) -> PoolStats {
        let inner = &self.inner;
        PoolStats {
            hits: inner.hits.load(Ordering::Relaxed),
            misses: inner.misses.load(Ordering::Relaxed),
            returns: inner.returns.load(Ordering::Relaxed),
            frees: inner.frees.load(Ordering::Relaxed),
            cached_bytes: inner.cached_bytes.load(Ordering::Relaxed),
        }
    }

    /// The configuration.
    pub fn config(&self) -> PoolConfig {
        self.inner.config
    }
}

impl<A: Allocator> PoolInner<A> {
    /// Rule 2: keeps `buffer` if its class and the byte bound have room,
    /// frees it otherwise.
    fn give_back(&self, class: u32, buffer: A::Buffer) {
        let size = 1usize << class;
        // Reserve the bytes first so concurrent returns cannot overshoot.
        let cached = self.cached_bytes.fetch_add(size, Ordering::Relaxed);
        if cached + size > self.config.max_cached_bytes {
            self.cached_bytes.fetch_sub(size, Ordering::Relaxed);
            self.frees.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match self.classes[(class - self.config.min_class) as usize].push(buffer) {
            Ok(()) => {
                self.returns.fetch_add(1, Ordering::Relaxed);
            }
            Err(buffer) => {
                self.cached_bytes.fetch_sub(size, Ordering::Relaxed);
                self.frees.fetch_add(1, Ordering::Relaxed);
                drop(buffer);
            }
        }
    }
}

/// A rented buffer. Goes back to its pool when dropped.
pub struct Rented<A: Allocator> {
    /// Taken exactly once: by `drop` or by `detach` (which then forgets
    /// `self`, so `drop` does not run).
    buffer: ManuallyDrop<A::Buffer>,
    /// The class it came from, in `min_class..=max_class`.
    class: u32,
    pool: Arc<PoolInner<A>>,
}

impl<A: Allocator> Rented<A> {
    /// The buffer's size: its class's size.
    pub fn capacity(&self) -> usize {
        1usize << self.class
    }

    /// Takes the buffer out of the pool for good: it is freed when the
    /// returned value drops instead of going back.
    pub fn detach(self) -> A::Buffer {
        let mut this = ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped (ManuallyDrop), so the buffer is
        // taken once, here; the pool handle is moved out and dropped below.
        let buffer = unsafe { ManuallyDrop::take(&mut this.buffer) };
        // SAFETY: `pool` is read once and `this` is not used afterwards.
        drop(unsafe { std::ptr::read(&this.pool) });
        buffer
    }
}

impl<A: Allocator> Deref for Rented<A> {
    type Target = A::Buffer;
    fn deref(&self) -> &A::Buffer {
        &self.buffer
    }
}

impl<A: Allocator> DerefMut for Rented<A> {
    fn deref_mut(&mut self) -> &mut A::Buffer {
        &mut self.buffer
    }
}

impl<A: Allocator> Drop for Rented<A> {
    fn drop(&mut self) {
        // SAFETY: `drop` runs at most once and `detach` forgets `self`, so
        // the buffer has not been taken and is not used after this.
        let buffer = unsafe { ManuallyDrop::take(&mut self.buffer) };
        self.pool.give_back(self.class, buffer);
    }
}

impl<A: Allocator> fmt::Debug for Rented<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rented")
            .field("capacity", &self.capacity())
            .finish_non_exhaustive()
    }
}
