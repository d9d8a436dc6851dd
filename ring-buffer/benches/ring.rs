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
//!   carrying a 48-byte record (the bytes a granary slot moves for an 8-byte
//!   message: 32-byte header, 16-byte aligned payload).
//! - `mpsc_2p_8B`: two producers: granary MPSC against `ArrayQueue`, with a
//!   `u64` and with the 48-byte record.
//! - `batch_32`: one producer publishing 32 messages as one reserved batch
//!   against 32 single pushes, into granary MPSC.
//! - `slot_size`: granary SPSC with 64-byte and 4 KiB payloads.

use std::hint::black_box;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use crossbeam_queue::ArrayQueue;
use granary_ring::{Ring, RingConfig};

const CAPACITY: u32 = 1024;

/// Moves `messages` messages: each sender thread calls `send(sender, i)`
/// for its share of `i` until it returns true; this thread calls `receive`,
/// which returns how many messages it took, until all have arrived.
fn transfer<S: Send + 'static>(
    messages: u64,
    senders: Vec<S>,
    send: fn(&mut S, u64) -> bool,
    mut receive: impl FnMut() -> u64,
) -> Duration {
    let share = messages.div_ceil(senders.len() as u64);
    let total = share * senders.len() as u64;
    let started = Instant::now();
    let handles: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            thread::spawn(move || {
                for i in 0..share {
                    while !send(&mut sender, i) {
                        std::hint::spin_loop();
                    }
                }
            })
        })
        .collect();
    let mut received = 0;
    while received < total {
        match receive() {
            0 => std::hint::spin_loop(),
            n => received += n,
        }
    }
    let elapsed = started.elapsed();
    handles
        .into_iter()
        .for_each(|handle| handle.join().unwrap());
    elapsed
}

/// What a granary slot carries for an 8-byte message, as a plain record.
#[derive(Clone, Copy, Default)]
#[allow(dead_code)] // moved and black-boxed whole, never read field by field
struct Record48 {
    header: [u64; 4],
    payload: [u64; 2],
}

fn record(i: u64) -> Record48 {
    Record48 {
        header: [0, i, 8, 0],
        payload: [i, 0],
    }
}

fn granary_spsc(messages: u64, payload: usize) -> Duration {
    let ring = Ring::new(RingConfig::spsc(CAPACITY, payload as u32)).unwrap();
    let (producer, mut consumer) = ring.split_spsc().unwrap();
    let bytes = vec![7u8; payload];
    transfer(
        messages,
        vec![(producer, bytes)],
        |(producer, bytes), i| producer.try_push_with(i, &bytes[..]).is_ok(),
        move || match consumer.try_pop() {
            Ok(message) => {
                black_box(message.payload());
                1
            }
            Err(_) => 0,
        },
    )
}

fn granary_u64(messages: u64, producers: usize) -> Duration {
    let receive = |consumer: &mut granary_ring::Consumer| match consumer.try_pop() {
        Ok(message) => {
            let mut word = [0u8; 8];
            word.copy_from_slice(message.payload());
            black_box(u64::from_le_bytes(word));
            1
        }
        Err(_) => 0,
    };
    if producers == 1 {
        let ring = Ring::new(RingConfig::spsc(CAPACITY, 8)).unwrap();
        let (producer, mut consumer) = ring.split_spsc().unwrap();
        transfer(
            messages,
            vec![producer],
            |producer, i| producer.try_push(i.to_le_bytes()).is_ok(),
            move || receive(&mut consumer),
        )
    } else {
        let ring = Ring::new(RingConfig::mpsc(CAPACITY, 8)).unwrap();
        let (producer, mut consumer) = ring.split_mpsc().unwrap();
        transfer(
            messages,
            vec![producer; producers],
            |producer, i| producer.try_push(i.to_le_bytes()).is_ok(),
            move || receive(&mut consumer),
        )
    }
}

fn rtrb_spsc<T: Copy + Send + 'static>(messages: u64, make: fn(u64) -> T) -> Duration {
    let (producer, mut consumer) = rtrb::RingBuffer::<T>::new(CAPACITY as usize);
    transfer(
        messages,
        vec![(producer, make)],
        |(producer, make), i| producer.push(make(i)).is_ok(),
        move || match consumer.pop() {
            Ok(value) => {
                black_box(value);
                1
            }
            Err(_) => 0,
        },
    )
}

fn array_queue<T: Copy + Send + 'static>(
    messages: u64,
    producers: usize,
    make: fn(u64) -> T,
) -> Duration {
    let queue = Arc::new(ArrayQueue::<T>::new(CAPACITY as usize));
    let senders = (0..producers).map(|_| (queue.clone(), make)).collect();
    transfer(
        messages,
        senders,
        |(queue, make), i| queue.push(make(i)).is_ok(),
        move || match queue.pop() {
            Some(value) => {
                black_box(value);
                1
            }
            None => 0,
        },
    )
}

/// One producer sends messages in groups of 32, either as one reserved
/// batch or as 32 single pushes; the consumer drains in chunks either way.
fn granary_groups_of_32(messages: u64, batched: bool) -> Duration {
    let ring = Ring::new(RingConfig::mpsc(CAPACITY, 8)).unwrap();
    let (producer, mut consumer) = ring.split_mpsc().unwrap();
    let send_group: fn(&mut granary_ring::Producer, u64) -> bool = if batched {
        |producer, group| {
            let Ok(mut chunk) = producer.try_reserve(32) else {
                return false;
            };
            for i in 0..32 {
                let mut slot = chunk.slot(i).unwrap();
                slot.payload_mut()[..8].copy_from_slice(&(group * 32 + i as u64).to_le_bytes());
                slot.set_len(8).unwrap();
            }
            chunk.commit();
            true
        }
    } else {
        |producer, group| {
            for i in 0..32u64 {
                while producer.try_push((group * 32 + i).to_le_bytes()).is_err() {
                    std::hint::spin_loop();
                }
            }
            true
        }
    };
    // `transfer` counts groups on the sending side and messages here.
    let groups = messages.div_ceil(32);
    let mut received = 0u64;
    let elapsed = transfer(groups, vec![producer], send_group, move || {
        let before = received;
        if let Ok(chunk) = consumer.try_read(256) {
            for message in chunk.iter() {
                black_box(message.payload);
                received += 1;
            }
        }
        // Report whole groups so the totals line up.
        (received / 32).saturating_sub(before / 32)
    });
    // Per message, not per group.
    elapsed.mul_f64(messages as f64 / (groups * 32) as f64)
}

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
    g.bench_function("rtrb_48B_record", |b| {
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
    g.bench_function("crossbeam_array_queue_48B_record", |b| {
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
    g.bench_function("granary_spsc_64B", |b| {
        b.iter_custom(|n| granary_spsc(n, 64))
    });
    g.bench_function("granary_spsc_4KiB", |b| {
        b.iter_custom(|n| granary_spsc(n, 4096))
    });
    g.finish();
}

criterion_group!(ring, benches);
criterion_main!(ring);
