//! Ring throughput against its peers, all in one criterion run.
//!
//! Every benchmark moves messages from producer thread(s) to a consumer on
//! the benchmark thread, and reports the time per message (criterion's
//! "time" is per element here; throughput is messages per second).
//!
//! ```text
//! cargo bench -p granary-ring --bench ring
//! ```
//!
//! Groups:
//! - `spsc_8B`: one producer, one consumer, 8-byte messages: granary SPSC
//!   against rtrb (`u64`, and a 48-byte record: the bytes a granary slot
//!   moves for an 8-byte message) and `crossbeam_queue::ArrayQueue`.
//! - `mpsc_2p_8B`: two producers: granary MPSC against `ArrayQueue`.
//! - `batch_32`: one producer publishing 32 messages as one reserved batch
//!   against 32 single pushes, into granary MPSC.
//! - `slot_size`: granary SPSC with 64-byte and 4 KiB payloads.

use std::hint::black_box;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use crossbeam_queue::ArrayQueue;
use granary_ring::{Ring, RingConfig};

const CAPACITY: u32 = 1024;

fn spin() {
    std::hint::spin_loop();
}

fn granary_spsc(messages: u64, payload: usize) -> Duration {
    let ring = Ring::new(RingConfig::spsc(CAPACITY, payload as u32)).unwrap();
    let (mut producer, mut consumer) = ring.split_spsc().unwrap();
    let bytes = vec![7u8; payload];
    let started = Instant::now();
    let handle = thread::spawn(move || {
        for i in 0..messages {
            while producer.try_push_with(i, &bytes[..]).is_err() {
                spin();
            }
        }
    });
    let mut received = 0;
    while received < messages {
        match consumer.try_pop() {
            Ok(message) => {
                black_box(message.payload());
                received += 1;
            }
            Err(_) => spin(),
        }
    }
    let elapsed = started.elapsed();
    handle.join().unwrap();
    elapsed
}

fn granary_spsc_u64(messages: u64) -> Duration {
    let ring = Ring::new(RingConfig::spsc(CAPACITY, 8)).unwrap();
    let (mut producer, mut consumer) = ring.split_spsc().unwrap();
    let started = Instant::now();
    let handle = thread::spawn(move || {
        for i in 0..messages {
            while producer.try_push(i.to_le_bytes()).is_err() {
                spin();
            }
        }
    });
    let mut received = 0;
    while received < messages {
        match consumer.try_pop() {
            Ok(message) => {
                let mut word = [0u8; 8];
                word.copy_from_slice(message.payload());
                black_box(u64::from_le_bytes(word));
                received += 1;
            }
            Err(_) => spin(),
        }
    }
    let elapsed = started.elapsed();
    handle.join().unwrap();
    elapsed
}

fn rtrb_spsc_u64(messages: u64) -> Duration {
    let (mut producer, mut consumer) = rtrb::RingBuffer::<u64>::new(CAPACITY as usize);
    let started = Instant::now();
    let handle = thread::spawn(move || {
        for i in 0..messages {
            while producer.push(i).is_err() {
                spin();
            }
        }
    });
    let mut received = 0;
    while received < messages {
        match consumer.pop() {
            Ok(value) => {
                black_box(value);
                received += 1;
            }
            Err(_) => spin(),
        }
    }
    let elapsed = started.elapsed();
    handle.join().unwrap();
    elapsed
}

/// rtrb carrying what a granary slot carries for an 8-byte message: the
/// 32-byte slot header and a 16-byte-aligned payload, 48 bytes in all.
#[derive(Clone, Copy, Default)]
#[allow(dead_code)] // fields exist to be copied, like a slot's
struct SlotSized {
    sequence: u64,
    request_id: u64,
    len: u32,
    status: u32,
    flags: u32,
    reserved: u32,
    payload: [u64; 2],
}

fn rtrb_spsc_48b(messages: u64) -> Duration {
    let (mut producer, mut consumer) = rtrb::RingBuffer::<SlotSized>::new(CAPACITY as usize);
    let started = Instant::now();
    let handle = thread::spawn(move || {
        for i in 0..messages {
            let record = SlotSized {
                request_id: i,
                len: 8,
                payload: [i, 0],
                ..SlotSized::default()
            };
            while producer.push(record).is_err() {
                spin();
            }
        }
    });
    let mut received = 0;
    while received < messages {
        match consumer.pop() {
            Ok(record) => {
                black_box(record.payload[0]);
                received += 1;
            }
            Err(_) => spin(),
        }
    }
    let elapsed = started.elapsed();
    handle.join().unwrap();
    elapsed
}

fn array_queue_u64(messages: u64, producers: u64) -> Duration {
    let queue = Arc::new(ArrayQueue::<u64>::new(CAPACITY as usize));
    let per_producer = messages / producers;
    let started = Instant::now();
    let handles: Vec<_> = (0..producers)
        .map(|_| {
            let queue = queue.clone();
            thread::spawn(move || {
                for i in 0..per_producer {
                    while queue.push(i).is_err() {
                        spin();
                    }
                }
            })
        })
        .collect();
    let mut received = 0;
    while received < per_producer * producers {
        match queue.pop() {
            Some(value) => {
                black_box(value);
                received += 1;
            }
            None => spin(),
        }
    }
    let elapsed = started.elapsed();
    handles.into_iter().for_each(|h| h.join().unwrap());
    elapsed
}

fn granary_mpsc_u64(messages: u64, producers: u64) -> Duration {
    let ring = Ring::new(RingConfig::mpsc(CAPACITY, 8)).unwrap();
    let (producer, mut consumer) = ring.split_mpsc().unwrap();
    let per_producer = messages / producers;
    let started = Instant::now();
    let handles: Vec<_> = (0..producers)
        .map(|_| {
            let producer = producer.clone();
            thread::spawn(move || {
                for i in 0..per_producer {
                    while producer.try_push(i.to_le_bytes()).is_err() {
                        spin();
                    }
                }
            })
        })
        .collect();
    let mut received = 0;
    while received < per_producer * producers {
        match consumer.try_pop() {
            Ok(message) => {
                let mut word = [0u8; 8];
                word.copy_from_slice(message.payload());
                black_box(u64::from_le_bytes(word));
                received += 1;
            }
            Err(_) => spin(),
        }
    }
    let elapsed = started.elapsed();
    handles.into_iter().for_each(|h| h.join().unwrap());
    elapsed
}

/// One producer sends `messages` in groups of 32, either as one reserved
/// batch or as 32 single pushes; the consumer drains in chunks either way.
fn granary_mpsc_groups_of_32(messages: u64, batched: bool) -> Duration {
    let ring = Ring::new(RingConfig::mpsc(CAPACITY, 8)).unwrap();
    let (producer, mut consumer) = ring.split_mpsc().unwrap();
    let groups = messages.div_ceil(32);
    let started = Instant::now();
    let handle = thread::spawn(move || {
        for group in 0..groups {
            if batched {
                let mut chunk = loop {
                    match producer.try_reserve(32) {
                        Ok(chunk) => break chunk,
                        Err(_) => spin(),
                    }
                };
                for i in 0..32 {
                    let mut slot = chunk.slot(i).unwrap();
                    slot.payload_mut()[..8].copy_from_slice(&(group * 32 + i as u64).to_le_bytes());
                    // 8 <= max_payload by construction.
                    let _ = slot.set_len(8);
                }
                chunk.commit();
            } else {
                for i in 0..32u64 {
                    while producer.try_push((group * 32 + i).to_le_bytes()).is_err() {
                        spin();
                    }
                }
            }
        }
    });
    let mut received = 0;
    while received < groups * 32 {
        match consumer.try_read(256) {
            Ok(chunk) => {
                for message in chunk.iter() {
                    black_box(message.payload);
                    received += 1;
                }
            }
            Err(_) => spin(),
        }
    }
    let elapsed = started.elapsed();
    handle.join().unwrap();
    elapsed
}

fn configure<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    group.sample_size(30);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    group
}

fn benches(c: &mut Criterion) {
    let mut group = configure(c, "spsc_8B");
    group.bench_function("granary_spsc", |b| b.iter_custom(granary_spsc_u64));
    group.bench_function("rtrb", |b| b.iter_custom(rtrb_spsc_u64));
    group.bench_function("rtrb_48B_record", |b| b.iter_custom(rtrb_spsc_48b));
    group.bench_function("crossbeam_array_queue", |b| {
        b.iter_custom(|n| array_queue_u64(n, 1))
    });
    group.finish();

    let mut group = configure(c, "mpsc_2p_8B");
    group.bench_function("granary_mpsc", |b| {
        b.iter_custom(|n| granary_mpsc_u64(n.max(2), 2))
    });
    group.bench_function("crossbeam_array_queue", |b| {
        b.iter_custom(|n| array_queue_u64(n.max(2), 2))
    });
    group.finish();

    let mut group = configure(c, "batch_32");
    group.bench_function("reserve_commit_32", |b| {
        b.iter_custom(|n| granary_mpsc_groups_of_32(n, true))
    });
    group.bench_function("single_push_x32", |b| {
        b.iter_custom(|n| granary_mpsc_groups_of_32(n, false))
    });
    group.finish();

    let mut group = configure(c, "slot_size");
    group.bench_function("granary_spsc_64B", |b| {
        b.iter_custom(|n| granary_spsc(n, 64))
    });
    group.bench_function("granary_spsc_4KiB", |b| {
        b.iter_custom(|n| granary_spsc(n, 4096))
    });
    group.finish();
}

criterion_group!(ring, benches);
criterion_main!(ring);
