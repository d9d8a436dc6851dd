//! The memory pool: classes, bounds, accounting, and concurrent use.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use granary_gpu::pool::{
    AllocError, Allocator, Buffer, HostAllocator, HostBuffer, MemoryPool, PoolConfig, PoolError,
};
use proptest::prelude::*;

fn config(max_cached_per_class: usize, max_cached_bytes: usize) -> PoolConfig {
    PoolConfig {
        min_class: 8,
        max_class: 20,
        max_cached_per_class,
        max_cached_bytes,
    }
}

#[test]
fn requests_round_up_to_power_of_two_classes() {
    let pool = MemoryPool::new(HostAllocator, PoolConfig::default()).unwrap();
    for (asked, got) in [
        (0, 256),
        (1, 256),
        (256, 256),
        (257, 512),
        (4096, 4096),
        (5000, 8192),
    ] {
        let buffer = pool.rent(asked).unwrap();
        assert_eq!(
            (buffer.capacity(), buffer.as_slice().len()),
            (got, got),
            "asked {asked}"
        );
    }
}

#[test]
fn a_returned_buffer_is_rented_again_with_its_contents() {
    let pool = MemoryPool::new(HostAllocator, config(4, 1 << 20)).unwrap();
    let mut first = pool.rent(1000).unwrap();
    first.as_mut_slice()[..4].copy_from_slice(b"seen");
    drop(first);
    let again = pool.rent(600).unwrap();
    assert_eq!(
        &again.as_slice()[..4],
        b"seen",
        "same 1 KiB buffer came back"
    );
    let stats = pool.stats();
    assert_eq!((stats.hits, stats.misses, stats.returns), (1, 1, 1));
    assert_eq!(stats.cached_bytes, 0);
    assert!((stats.hit_ratio() - 0.5).abs() < 1e-9);
}

#[test]
fn too_large_and_bad_configs_are_typed_errors() {
    let pool = MemoryPool::new(HostAllocator, config(4, 1 << 20)).unwrap();
    assert_eq!(
        pool.rent((1 << 20) + 1).unwrap_err(),
        PoolError::TooLarge {
            bytes: (1 << 20) + 1,
            max: 1 << 20
        }
    );
    for bad in [
        PoolConfig {
            min_class: 21,
            ..config(4, 0)
        },
        PoolConfig {
            max_class: 41,
            ..config(4, 0)
        },
        PoolConfig {
            max_cached_per_class: 0,
            ..config(4, 0)
        },
    ] {
        assert!(matches!(
            MemoryPool::new(HostAllocator, bad),
            Err(PoolError::BadConfig(_))
        ));
    }
}

#[test]
fn each_class_keeps_at_most_its_bound_and_frees_the_rest() {
    let pool = MemoryPool::new(HostAllocator, config(2, 1 << 30)).unwrap();
    let rented: Vec<_> = (0..5).map(|_| pool.rent(4096).unwrap()).collect();
    drop(rented);
    let stats = pool.stats();
    assert_eq!(
        (stats.returns, stats.frees, stats.cached_bytes),
        (2, 3, 2 * 4096)
    );
}

#[test]
fn idle_bytes_never_exceed_the_byte_bound() {
    let pool = MemoryPool::new(HostAllocator, config(64, 10_000)).unwrap();
    let rented: Vec<_> = (0..8).map(|_| pool.rent(4096).unwrap()).collect();
    drop(rented);
    let stats = pool.stats();
    assert_eq!(
        stats.cached_bytes,
        2 * 4096,
        "a third 4 KiB buffer would pass 10 000 bytes"
    );
    assert_eq!(stats.frees, 6);
}

#[test]
fn trim_frees_every_idle_buffer() {
    let pool = MemoryPool::new(HostAllocator, config(8, 1 << 30)).unwrap();
    drop(
        (0..3)
            .map(|i| pool.rent(256 << i).unwrap())
            .collect::<Vec<_>>(),
    );
    assert_eq!(pool.stats().cached_bytes, 256 + 512 + 1024);
    assert_eq!(pool.trim(), 256 + 512 + 1024);
    assert_eq!(pool.stats().cached_bytes, 0);
    assert_eq!(pool.rent(256).map(|_| ()), Ok(()));
    assert_eq!(pool.stats().misses, 4, "trimmed buffers are gone");
}

#[test]
fn detached_buffers_leave_the_accounting() {
    let pool = MemoryPool::new(HostAllocator, config(8, 1 << 30)).unwrap();
    let buffer: HostBuffer = pool.rent(300).unwrap().detach();
    assert_eq!(buffer.capacity(), 512);
    let stats = pool.stats();
    assert_eq!((stats.cached_bytes, stats.returns, stats.frees), (0, 0, 0));
}

/// An allocator that fails after a budget, and counts live buffers.
struct Budgeted {
    budget: AtomicUsize,
    live: Arc<AtomicUsize>,
}

struct Counted {
    bytes: usize,
    live: Arc<AtomicUsize>,
}

impl Buffer for Counted {
    fn capacity(&self) -> usize {
        self.bytes
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Allocator for Budgeted {
    type Buffer = Counted;
    fn allocate(&self, bytes: usize) -> Result<Counted, AllocError> {
        let left = self.budget.load(Ordering::SeqCst);
        if left < bytes {
            return Err(AllocError {
                bytes,
                reason: format!("only {left} bytes left"),
            });
        }
        self.budget.fetch_sub(bytes, Ordering::SeqCst);
        self.live.fetch_add(1, Ordering::SeqCst);
        Ok(Counted {
            bytes,
            live: self.live.clone(),
        })
    }
}

#[test]
fn allocator_failures_are_reported_and_nothing_leaks() {
    let live = Arc::new(AtomicUsize::new(0));
    let allocator = Budgeted {
        budget: AtomicUsize::new(1024),
        live: live.clone(),
    };
    let pool = MemoryPool::new(allocator, config(4, 1 << 30)).unwrap();
    let a = pool.rent(512).unwrap();
    let b = pool.rent(512).unwrap();
    match pool.rent(512) {
        Err(PoolError::Alloc(err)) => assert_eq!(err.bytes, 512),
        other => panic!("expected Alloc, got {other:?}"),
    }
    drop((a, b));
    // Both come back from the free list; the allocator is not asked again.
    let again = (pool.rent(400).unwrap(), pool.rent(300).unwrap());
    drop(again);
    assert_eq!(live.load(Ordering::SeqCst), 2);
    drop(pool);
    assert_eq!(
        live.load(Ordering::SeqCst),
        0,
        "dropping the pool frees idle buffers"
    );
}

#[test]
fn a_rented_buffer_outlives_its_pool_handle() {
    let live = Arc::new(AtomicUsize::new(0));
    let allocator = Budgeted {
        budget: AtomicUsize::new(1 << 20),
        live: live.clone(),
    };
    let pool = MemoryPool::new(allocator, config(4, 1 << 30)).unwrap();
    let rented = pool.rent(256).unwrap();
    drop(pool);
    assert_eq!(rented.capacity(), 256);
    drop(rented);
    assert_eq!(live.load(Ordering::SeqCst), 0);
}

#[test]
fn concurrent_renters_keep_the_accounting_exact() {
    let pool = MemoryPool::new(HostAllocator, config(16, 1 << 30)).unwrap();
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let pool = pool.clone();
            thread::spawn(move || {
                for i in 0..5_000usize {
                    let size = 256 << ((i + t) % 5);
                    let mut buffer = pool.rent(size).unwrap();
                    buffer.as_mut_slice()[0] = t as u8;
                    assert!(buffer.capacity() >= size);
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
    let stats = pool.stats();
    assert_eq!(stats.hits + stats.misses, 20_000);
    assert_eq!(stats.returns + stats.frees, 20_000);
    assert!(stats.hit_ratio() > 0.9, "{stats:?}");
}

#[derive(Debug, Clone)]
enum Op {
    Rent(usize),
    Return(usize),
    Trim,
}

proptest! {
    /// Random rents, returns and trims against a model of the free lists.
    #[test]
    fn matches_a_model_of_its_free_lists(
        ops in prop::collection::vec(prop_oneof![
            (0usize..5000).prop_map(Op::Rent),
            (0usize..64).prop_map(Op::Return),
            Just(Op::Trim),
        ], 1..200),
        per_class in 1usize..4,
        byte_bound in 0usize..20_000,
    ) {
        let pool = MemoryPool::new(HostAllocator, config(per_class, byte_bound)).unwrap();
        let mut rented = Vec::new();
        let mut idle: HashMap<usize, usize> = HashMap::new();
        let (mut hits, mut misses) = (0u64, 0u64);
        for op in ops {
            match op {
                Op::Rent(bytes) => {
                    let size = bytes.max(256).next_power_of_two();
                    let buffer = pool.rent(bytes).unwrap();
                    prop_assert_eq!(buffer.capacity(), size);
                    match idle.get_mut(&size) {
                        Some(n) if *n > 0 => { *n -= 1; hits += 1; }
                        _ => misses += 1,
                    }
                    rented.push(buffer);
                }
                Op::Return(index) if !rented.is_empty() => {
                    let buffer = rented.swap_remove(index % rented.len());
                    let size = buffer.capacity();
                    let cached: usize = idle.iter().map(|(s, n)| s * n).sum();
                    let in_class = idle.get(&size).copied().unwrap_or(0);
                    drop(buffer);
                    if in_class < per_class && cached + size <= byte_bound {
                        *idle.entry(size).or_default() += 1;
                    }
                }
                Op::Return(_) => {}
                Op::Trim => {
                    let cached: usize = idle.iter().map(|(s, n)| s * n).sum();
                    prop_assert_eq!(pool.trim(), cached);
                    idle.clear();
                }
            }
            let stats = pool.stats();
            let cached: usize = idle.iter().map(|(s, n)| s * n).sum();
            prop_assert_eq!(stats.cached_bytes, cached);
            prop_assert!(stats.cached_bytes <= byte_bound);
            prop_assert_eq!((stats.hits, stats.misses), (hits, misses));
        }
    }
}
