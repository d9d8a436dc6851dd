//! The workloads both ring benches run: producer thread(s) moving messages
//! to a consumer on the calling thread, for granary and for its peers. Each
//! function moves `messages` messages and returns the elapsed time.

// Each bench binary uses a different subset of these workloads.
#![allow(dead_code)]

use std::hint::black_box;
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use granary_ring::{Ring, RingConfig};

pub const CAPACITY: u32 = 1024;

/// Pins the calling thread to core `index` modulo the core count, so every
/// peer runs with the same placement: the receiver on core 0 and every
/// sender on core 1 (two senders take turns there rather than one of them
/// sharing the receiver's core). Unpinned, the scheduler's placement changed
/// results by several times from run to run.
pub fn pin(index: usize) {
    // Read once, before any thread is pinned: a pinned thread (and every
    // thread it spawns) would see only its own core.
    static CORES: OnceLock<Vec<core_affinity::CoreId>> = OnceLock::new();
    let cores = CORES.get_or_init(|| core_affinity::get_core_ids().unwrap_or_default());
    if !cores.is_empty() {
        core_affinity::set_for_current(cores[index % cores.len()]);
    }
}

/// Moves `messages` messages: each sender thread calls `send(sender, i)`
/// for its share of `i` until it returns true; this thread calls `receive`,
/// which returns how many messages it took, until all have arrived.
pub fn transfer<S: Send + 'static>(
    messages: u64,
    senders: Vec<S>,
    send: fn(&mut S, u64) -> bool,
    mut receive: impl FnMut() -> u64,
) -> Duration {
    pin(0);
    let share = messages.div_ceil(senders.len() as u64);
    let total = share * senders.len() as u64;
    let started = Instant::now();
    let handles: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            thread::spawn(move || {
                pin(1);
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
pub struct SlotRecord {
    header: [u64; 4],
    payload: [u64; 2],
}

pub fn record(i: u64) -> SlotRecord {
    SlotRecord {
        header: [0, i, 8, 0],
        payload: [i, 0],
    }
}

pub fn granary_spsc(messages: u64, payload: usize) -> Duration {
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

pub fn granary_u64(messages: u64, producers: usize) -> Duration {
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

pub fn rtrb_spsc<T: Copy + Send + 'static>(messages: u64, make: fn(u64) -> T) -> Duration {
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

pub fn array_queue<T: Copy + Send + 'static>(
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
pub fn granary_groups_of_32(messages: u64, batched: bool) -> Duration {
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
