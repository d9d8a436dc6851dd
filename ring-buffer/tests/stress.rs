//! Stress: four producers × one million messages into one consumer.
//!
//! Every message carries its producer, its sequence number and a checksum of
//! both. The consumer checks that nothing is lost, nothing is duplicated,
//! each producer's messages arrive in order, and no payload is torn. Two
//! producers push one message at a time; two reserve and commit batches.

use std::thread;
use std::time::{Duration, Instant};

use granary_ring::{Consumer, Producer, Ring, RingConfig, SpscProducer, TryPopError, WaitPolicy};

const PRODUCERS: u64 = 4;
const PER_PRODUCER: u64 = 1_000_000;
/// How long the consumer waits without a message before failing.
const STALL_LIMIT: Duration = Duration::from_secs(30);

fn encode(producer: u64, sequence: u64) -> [u8; 24] {
    let mut bytes = [0u8; 24];
    bytes[..8].copy_from_slice(&producer.to_le_bytes());
    bytes[8..16].copy_from_slice(&sequence.to_le_bytes());
    bytes[16..].copy_from_slice(&checksum(producer, sequence).to_le_bytes());
    bytes
}

fn checksum(producer: u64, sequence: u64) -> u64 {
    (producer.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ sequence).wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

fn decode(payload: &[u8], request_id: u64) -> (u64, u64) {
    assert_eq!(payload.len(), 24, "torn length");
    let word = |i: usize| u64::from_le_bytes(payload[i * 8..i * 8 + 8].try_into().unwrap());
    let (producer, sequence, sum) = (word(0), word(1), word(2));
    assert_eq!(sum, checksum(producer, sequence), "torn payload");
    assert_eq!(
        request_id,
        producer << 32 | sequence,
        "request id does not match payload"
    );
    (producer, sequence)
}

fn produce_single(producer: Producer, id: u64) {
    let policy = WaitPolicy::default();
    for sequence in 0..PER_PRODUCER {
        producer
            .push_with(id << 32 | sequence, encode(id, sequence), &policy, None)
            .unwrap();
    }
}

fn produce_batched(producer: Producer, id: u64) {
    let mut sequence = 0;
    let mut batch = 1 + id as usize;
    while sequence < PER_PRODUCER {
        let count = batch.min((PER_PRODUCER - sequence) as usize);
        match producer.try_reserve(count) {
            Ok(mut chunk) => {
                for i in 0..count {
                    let mut slot = chunk.slot(i).unwrap();
                    slot.write(&encode(id, sequence + i as u64)).unwrap();
                    slot.set_request_id(id << 32 | (sequence + i as u64));
                }
                chunk.commit();
                sequence += count as u64;
                batch = batch % 31 + 1;
            }
            Err(_) => thread::yield_now(),
        }
    }
}

fn consume(mut consumer: Consumer, producers: u64, total: u64) {
    let mut next = vec![0u64; producers as usize];
    let mut received = 0u64;
    let policy = WaitPolicy::default();
    let mut check = |payload: &[u8], request_id: u64| {
        let (producer, sequence) = decode(payload, request_id);
        assert_eq!(
            sequence, next[producer as usize],
            "out of order or duplicated"
        );
        next[producer as usize] += 1;
        received += 1;
        received
    };
    let mut done = 0;
    let mut last_progress = (Instant::now(), 0);
    while done < total {
        // A lost message must fail the test, not hang it.
        if done != last_progress.1 {
            last_progress = (Instant::now(), done);
        } else if last_progress.0.elapsed() > STALL_LIMIT {
            panic!("no message for {STALL_LIMIT:?}: {done} of {total} arrived");
        }
        let got_chunk = match consumer.try_read(64) {
            Ok(chunk) => {
                for message in chunk.iter() {
                    done = check(message.payload, message.request_id);
                }
                true
            }
            Err(TryPopError::Empty) => false,
            Err(err) => panic!("unexpected {err}"),
        };
        if !got_chunk {
            if let Ok(message) = consumer.pop(&policy, Some(Duration::from_millis(1))) {
                done = check(message.payload(), message.request_id());
            }
        }
    }
    assert!(
        next.iter().all(|&n| n == PER_PRODUCER),
        "lost messages: {next:?}"
    );
    assert_eq!(
        consumer.try_pop().unwrap_err(),
        TryPopError::Empty,
        "extra messages"
    );
}

#[test]
fn four_producers_one_million_each_no_loss_no_duplicate_fifo_per_producer() {
    let ring = Ring::new(RingConfig::mpsc(1024, 24)).unwrap();
    let (producer, consumer) = ring.split_mpsc().unwrap();
    let handles: Vec<_> = (0..PRODUCERS)
        .map(|id| {
            let producer = producer.clone();
            thread::spawn(move || {
                if id % 2 == 0 {
                    produce_single(producer, id);
                } else {
                    produce_batched(producer, id);
                }
            })
        })
        .collect();
    drop(producer);
    consume(consumer, PRODUCERS, PRODUCERS * PER_PRODUCER);
    for handle in handles {
        handle.join().unwrap();
    }
}

#[test]
fn spsc_one_million_in_order() {
    let ring = Ring::new(RingConfig::spsc(256, 24)).unwrap();
    let (producer, consumer): (SpscProducer, Consumer) = ring.split_spsc().unwrap();
    let handle = thread::spawn(move || {
        let mut producer = producer;
        let policy = WaitPolicy::default();
        for sequence in 0..PER_PRODUCER {
            producer
                .push_with(sequence, encode(0, sequence), &policy, None)
                .unwrap();
        }
        producer.close();
    });
    let mut consumer = consumer;
    let policy = WaitPolicy::default();
    let mut expected = 0;
    loop {
        match consumer.pop(&policy, Some(STALL_LIMIT)) {
            Ok(message) => {
                let (_, sequence) = decode(message.payload(), message.request_id());
                assert_eq!(sequence, expected);
                expected += 1;
            }
            Err(granary_ring::PopError::Closed) => break,
            Err(err) => panic!("unexpected {err}"),
        }
    }
    assert_eq!(expected, PER_PRODUCER);
    handle.join().unwrap();
}
