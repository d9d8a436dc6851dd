//! Ring throughput against its peers, all in one criterion run.
//!
//! Every benchmark moves messages from producer thread(s) to a consumer on
//! the benchmark thread and reports the time per message (throughput is
//! messages per second).
//!
//! ```text
//! cargo bench -p granary-ring --bench ring
//! ```
//!
//! Groups:
//! - `spsc_8B`: one producer, one consumer, 8-byte messages: granary SPSC
//!   against rtrb and `crossbeam_queue::ArrayQueue` carrying a `u64`, and
//!   carrying a 64-byte record (the bytes a granary slot moves for an 8-byte
//!   message: the 32-byte header and the payload in one 64-byte slot).
//! - `mpsc_2p_8B`: two producers: granary MPSC against `ArrayQueue`, with a
//!   `u64` and with the 64-byte record.
//! - `batch_32`: one producer publishing 32 messages as one reserved batch
//!   against 32 single pushes, into granary MPSC.
//! - `slot_size`: granary SPSC with 64-byte and 4 KiB slots (header
//!   included), each message filling its slot.

use std::time::Duration;

use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};

mod common;
use common::*;

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    group.sample_size(30);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    group
}

fn benches(c: &mut Criterion) {
    let mut g = group(c, "spsc_8B");
    g.bench_function("granary_spsc", |b| b.iter_custom(|n| granary_u64(n, 1)));
    g.bench_function("rtrb", |b| b.iter_custom(|n| rtrb_spsc(n, |i| i)));
    g.bench_function("rtrb_64B_record", |b| {
        b.iter_custom(|n| rtrb_spsc(n, record))
    });
    g.bench_function("crossbeam_array_queue", |b| {
        b.iter_custom(|n| array_queue(n, 1, |i| i))
    });
    g.finish();

    let mut g = group(c, "mpsc_2p_8B");
    g.bench_function("granary_mpsc", |b| b.iter_custom(|n| granary_u64(n, 2)));
    g.bench_function("crossbeam_array_queue", |b| {
        b.iter_custom(|n| array_queue(n, 2, |i| i))
    });
    g.bench_function("crossbeam_array_queue_64B_record", |b| {
        b.iter_custom(|n| array_queue(n, 2, record))
    });
    g.finish();

    let mut g = group(c, "batch_32");
    g.bench_function("reserve_commit_32", |b| {
        b.iter_custom(|n| granary_groups_of_32(n, true))
    });
    g.bench_function("single_push_x32", |b| {
        b.iter_custom(|n| granary_groups_of_32(n, false))
    });
    g.finish();

    let mut g = group(c, "slot_size");
    // Slot sizes, header included: full payloads of 32 and 4064 bytes.
    g.bench_function("granary_spsc_64B_slot", |b| {
        b.iter_custom(|n| granary_spsc(n, 64 - 32))
    });
    g.bench_function("granary_spsc_4KiB_slot", |b| {
        b.iter_custom(|n| granary_spsc(n, 4096 - 32))
    });
    g.finish();
}

criterion_group!(ring, benches);
criterion_main!(ring);
