//! Memory pool rent and return against a fresh allocation, in one run.
//!
//! ```text
//! cargo bench -p granary-gpu --bench pool
//! ```
//!
//! `pool_rent_return/<size>` rents and returns one buffer from a warm pool;
//! `fresh_allocation/<size>` allocates and frees the same size with the
//! allocator the pool wraps (the CPU backend's `HostAllocator`, which hands
//! out zeroed, 64-byte aligned memory). The steady-workload hit ratio is
//! printed before the timings.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use granary_gpu::pool::{Allocator, HostAllocator, MemoryPool, PoolConfig};

/// A steady workload: 8 requests in flight, sizes cycling over five classes,
/// 100 000 rents. Returns the pool's hit ratio.
fn steady_hit_ratio() -> f64 {
    let pool = MemoryPool::new(HostAllocator, PoolConfig::default()).unwrap();
    let mut in_flight = std::collections::VecDeque::new();
    for i in 0..100_000usize {
        let size = 1000 << (i % 5);
        in_flight.push_back(pool.rent(size).unwrap());
        if in_flight.len() > 8 {
            in_flight.pop_front();
        }
    }
    pool.stats().hit_ratio()
}

fn benches(c: &mut Criterion) {
    println!("steady workload hit ratio: {:.4}", steady_hit_ratio());
    let mut group = c.benchmark_group("pool_rent_return");
    for size in [4 << 10, 64 << 10, 1 << 20] {
        let pool = MemoryPool::new(HostAllocator, PoolConfig::default()).unwrap();
        drop(pool.rent(size).unwrap());
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
            b.iter(|| black_box(pool.rent(black_box(size)).unwrap().capacity()))
        });
    }
    group.finish();
    let mut group = c.benchmark_group("fresh_allocation");
    for size in [4 << 10, 64 << 10, 1 << 20] {
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
            b.iter(|| {
                black_box(
                    HostAllocator
                        .allocate(black_box(size))
                        .unwrap()
                        .as_slice()
                        .len(),
                )
            })
        });
    }
    group.finish();
}

criterion_group!(pool, benches);
criterion_main!(pool);
