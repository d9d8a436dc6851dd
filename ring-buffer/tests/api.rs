//! Behaviour of the public API, one property per test.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use granary_ring::{
    BadLayout, ConfigError, ExternalRegion, HeapRegion, InitError, Mode, PopError, PushError,
    Region, ReserveError, Ring, RingConfig, TryPopError, TryPushError, WaitPolicy, WrongMode,
};

fn mpsc(capacity: u32, max_payload: u32) -> (granary_ring::Producer, granary_ring::Consumer) {
    Ring::new(RingConfig::mpsc(capacity, max_payload))
        .unwrap()
        .split_mpsc()
        .unwrap()
}

fn spsc(capacity: u32, max_payload: u32) -> (granary_ring::SpscProducer, granary_ring::Consumer) {
    Ring::new(RingConfig::spsc(capacity, max_payload))
        .unwrap()
        .split_spsc()
        .unwrap()
}

#[test]
fn round_trip_keeps_payload_request_id_and_order() {
    let (producer, mut consumer) = mpsc(8, 64);
    for i in 0..5u64 {
        producer.try_push_with(100 + i, i.to_le_bytes()).unwrap();
    }
    for i in 0..5u64 {
        let message = consumer.try_pop().unwrap();
        assert_eq!(message.request_id(), 100 + i);
        assert_eq!(message.payload(), i.to_le_bytes());
        assert_eq!(message.position(), i);
        assert_eq!(message.status(), 0);
    }
    assert_eq!(consumer.try_pop().unwrap_err(), TryPopError::Empty);
}

#[test]
fn full_gives_the_payload_back_in_both_modes() {
    let (producer, mut consumer) = mpsc(4, 8);
    for _ in 0..4 {
        producer.try_push(vec![1u8]).unwrap();
    }
    match producer.try_push(vec![9u8, 9]) {
        Err(TryPushError::Full(payload)) => assert_eq!(payload, vec![9, 9]),
        other => panic!("expected Full, got {other:?}"),
    }
    drop(consumer.try_pop().unwrap());
    producer.try_push(vec![2u8]).unwrap();

    let (mut producer, _consumer) = spsc(2, 8);
    producer.try_push(*b"a").unwrap();
    producer.try_push(*b"b").unwrap();
    assert_eq!(producer.try_push(*b"c").unwrap_err().into_inner(), *b"c");
}

#[test]
fn zero_length_and_maximum_length_payloads() {
    for mode in [Mode::Mpsc, Mode::Spsc] {
        let ring = Ring::new(RingConfig {
            mode,
            capacity: 4,
            max_payload: 100,
        })
        .unwrap();
        let max = ring.layout().max_payload as usize;
        assert_eq!(
            max, 160,
            "100 + 32 rounds up to a 192-byte slot (three lines)"
        );
        let big: Vec<u8> = (0..max).map(|i| (i * 7) as u8).collect();
        let too_big = vec![0u8; max + 1];
        type Push = Box<dyn FnMut(&[u8]) -> Result<(), String>>;
        let (push, mut pop): (Push, _) = match mode {
            Mode::Mpsc => {
                let (p, c) = ring.split_mpsc().unwrap();
                (
                    Box::new(move |b: &[u8]| p.try_push(b).map_err(|e| e.to_string())),
                    c,
                )
            }
            Mode::Spsc => {
                let (mut p, c) = ring.split_spsc().unwrap();
                (
                    Box::new(move |b: &[u8]| p.try_push(b).map_err(|e| e.to_string())),
                    c,
                )
            }
        };
        let mut push = push;
        push(&[]).unwrap();
        push(&big).unwrap();
        let err = push(&too_big).unwrap_err();
        assert!(
            err.contains("161 bytes exceeds the slot maximum of 160"),
            "{err}"
        );
        assert_eq!(pop.try_pop().unwrap().payload(), &[] as &[u8]);
        assert_eq!(pop.try_pop().unwrap().payload(), &big[..]);
        assert_eq!(pop.try_pop().unwrap_err(), TryPopError::Empty);
    }
}

#[test]
fn payload_too_large_reports_len_and_max_and_returns_payload() {
    // 32 + the 32-byte header is exactly one 64-byte slot.
    let (producer, _consumer) = mpsc(4, 32);
    match producer.try_push(vec![0u8; 33]) {
        Err(TryPushError::PayloadTooLarge { len, max, payload }) => {
            assert_eq!((len, max, payload.len()), (33, 32, 33));
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
}

/// A payload whose bytes grow after the first look: a safe `AsRef` may
/// answer differently each call.
#[derive(Debug)]
struct Growing {
    looks: std::cell::Cell<u32>,
    bytes: Vec<u8>,
}

impl Growing {
    fn new(first: u8, len: usize) -> Growing {
        let mut bytes = vec![0xEE; len];
        bytes[0] = first;
        Growing {
            looks: std::cell::Cell::new(0),
            bytes,
        }
    }
}

impl AsRef<[u8]> for Growing {
    fn as_ref(&self) -> &[u8] {
        let looks = self.looks.get();
        self.looks.set(looks + 1);
        if looks == 0 {
            &self.bytes[..1]
        } else {
            &self.bytes
        }
    }
}

#[test]
fn a_payload_that_grows_after_its_check_writes_only_the_bytes_checked() {
    // A push reads its payload's bytes once: it checks and copies the
    // one-byte slice the first look gave, never the 200 bytes a later look
    // would (past the 32-byte slot, into the next slot's header).
    let (producer, mut consumer) = mpsc(4, 32);
    producer.try_push_with(1, Growing::new(7, 200)).unwrap();
    producer.try_push_with(2, vec![9u8; 32]).unwrap();
    let (mut spsc_producer, mut spsc_consumer) = spsc(4, 32);
    spsc_producer
        .try_push_with(1, Growing::new(7, 200))
        .unwrap();
    spsc_producer.try_push_with(2, vec![9u8; 32]).unwrap();
    for consumer in [&mut consumer, &mut spsc_consumer] {
        let first = consumer.try_pop().unwrap();
        assert_eq!((first.request_id(), first.payload()), (1, &[7u8][..]));
        drop(first);
        let second = consumer.try_pop().unwrap();
        assert_eq!((second.request_id(), second.payload()), (2, &[9u8; 32][..]));
    }
}

#[test]
fn bad_configs_are_typed_errors() {
    assert_eq!(
        Ring::new(RingConfig::mpsc(3, 8)).unwrap_err(),
        ConfigError::Capacity { capacity: 3 }
    );
    assert_eq!(
        Ring::new(RingConfig::mpsc(1, 8)).unwrap_err(),
        ConfigError::Capacity { capacity: 1 }
    );
    assert!(matches!(
        Ring::new(RingConfig::spsc(4, 2 << 20)).unwrap_err(),
        ConfigError::PayloadTooLarge { .. }
    ));
    let err = Ring::new(RingConfig::mpsc(4, 8))
        .unwrap()
        .split_spsc()
        .unwrap_err();
    assert_eq!(
        err,
        WrongMode {
            actual: Mode::Mpsc,
            requested: Mode::Spsc
        }
    );
}

#[test]
fn close_drains_then_reports_closed_in_both_modes() {
    let (producer, mut consumer) = mpsc(8, 8);
    producer.try_push(*b"x").unwrap();
    producer.close();
    assert!(matches!(
        producer.try_push(*b"y"),
        Err(TryPushError::Closed(_))
    ));
    assert_eq!(producer.try_reserve(1).unwrap_err(), ReserveError::Closed);
    assert_eq!(consumer.try_pop().unwrap().payload(), b"x");
    assert_eq!(consumer.try_pop().unwrap_err(), TryPopError::Closed);

    let (mut producer, mut consumer) = spsc(8, 8);
    producer.try_push(*b"x").unwrap();
    consumer.close();
    assert!(matches!(
        producer.try_push(*b"y"),
        Err(TryPushError::Closed(_))
    ));
    assert_eq!(consumer.try_pop().unwrap().payload(), b"x");
    assert_eq!(consumer.try_pop().unwrap_err(), TryPopError::Closed);
}

#[test]
fn batch_reserve_writes_in_place_and_commits_in_order() {
    let (producer, mut consumer) = mpsc(8, 16);
    let mut chunk = producer.try_reserve(3).unwrap();
    assert_eq!(chunk.len(), 3);
    for i in 0..3 {
        let mut slot = chunk.slot(i).unwrap();
        slot.payload_mut()[..2].copy_from_slice(&[i as u8, 0xAB]);
        slot.set_len(2).unwrap();
        slot.set_request_id(i as u64 * 10);
        slot.set_status(i as u32);
    }
    assert!(chunk.slot(3).is_none());
    assert_eq!(
        consumer.try_pop().unwrap_err(),
        TryPopError::Empty,
        "not visible before commit"
    );
    chunk.commit();
    let read = consumer.try_read(10).unwrap();
    let got: Vec<_> = read
        .iter()
        .map(|m| (m.request_id, m.status, m.payload.to_vec()))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 0, vec![0, 0xAB]),
            (10, 1, vec![1, 0xAB]),
            (20, 2, vec![2, 0xAB])
        ]
    );
}

#[test]
fn reserve_is_all_or_nothing_and_checks_its_count() {
    let (producer, mut consumer) = mpsc(8, 8);
    for _ in 0..6 {
        producer.try_push(*b"z").unwrap();
    }
    assert_eq!(
        producer.try_reserve(3).unwrap_err(),
        ReserveError::Full { requested: 3 }
    );
    assert_eq!(
        producer.try_reserve(0).unwrap_err(),
        ReserveError::BadCount {
            requested: 0,
            capacity: 8
        }
    );
    assert_eq!(
        producer.try_reserve(9).unwrap_err(),
        ReserveError::BadCount {
            requested: 9,
            capacity: 8
        }
    );
    producer.try_reserve(2).unwrap().commit();
    assert_eq!(consumer.try_read(100).unwrap().len(), 8);

    let (mut producer, _consumer) = spsc(4, 8);
    producer.try_push(*b"z").unwrap();
    assert_eq!(
        producer.try_reserve(4).unwrap_err(),
        ReserveError::Full { requested: 4 }
    );
    producer.try_reserve(3).unwrap().commit();
}

#[test]
fn dropped_chunks_are_skipped_in_mpsc_and_discarded_in_spsc() {
    let (producer, mut consumer) = mpsc(4, 8);
    producer.try_push(*b"1").unwrap();
    drop(producer.try_reserve(2).unwrap());
    producer.try_push(*b"2").unwrap();
    assert_eq!(consumer.try_pop().unwrap().payload(), b"1");
    assert_eq!(consumer.try_pop().unwrap().payload(), b"2");
    assert_eq!(consumer.try_pop().unwrap_err(), TryPopError::Empty);
    // The skipped slots were released: all four slots are free again.
    drop(producer.try_reserve(4).unwrap());

    let (mut producer, mut consumer) = spsc(4, 8);
    drop(producer.try_reserve(3).unwrap());
    producer.try_push(*b"3").unwrap();
    assert_eq!(consumer.try_pop().unwrap().payload(), b"3");
    assert_eq!(consumer.try_pop().unwrap_err(), TryPopError::Empty);
}

#[test]
fn a_chunk_publishes_its_prefix_while_the_rest_is_written() {
    for mode in ["mpsc", "spsc"] {
        let (mpsc_producer, mut spsc_producer, mut consumer) = match mode {
            "mpsc" => {
                let (producer, consumer) = mpsc(8, 8);
                (Some(producer), None, consumer)
            }
            _ => {
                let (producer, consumer) = spsc(8, 8);
                (None, Some(producer), consumer)
            }
        };
        let mut chunk = match (&mpsc_producer, &mut spsc_producer) {
            (Some(producer), _) => producer.try_reserve(4).unwrap(),
            (_, Some(producer)) => producer.try_reserve(4).unwrap(),
            _ => unreachable!(),
        };
        for index in 0..2 {
            chunk.slot(index).unwrap().write(&[index as u8]).unwrap();
        }
        chunk.publish_prefix(2);
        // Published slots are the consumer's now.
        assert!(chunk.slot(1).is_none(), "{mode}");
        chunk.slot(2).unwrap().write(&[2]).unwrap();
        // Publishing is in order and idempotent; beyond the end is capped.
        chunk.publish_prefix(1);
        chunk.publish_prefix(3);
        {
            let read = consumer.try_read(8).unwrap();
            assert_eq!(
                read.iter().map(|m| m.payload[0]).collect::<Vec<_>>(),
                [0, 1, 2],
                "{mode}"
            );
        }
        // Dropped uncommitted: MPSC skips the last slot, SPSC forgets it.
        drop(chunk);
        assert_eq!(
            consumer.try_pop().unwrap_err(),
            TryPopError::Empty,
            "{mode}"
        );
        match (&mpsc_producer, &mut spsc_producer) {
            (Some(producer), _) => producer.try_push(*b"x").unwrap(),
            (_, Some(producer)) => producer.try_push(*b"x").unwrap(),
            _ => unreachable!(),
        }
        assert_eq!(consumer.try_pop().unwrap().payload(), b"x", "{mode}");
    }
}

#[test]
fn slot_write_checks_length() {
    let (producer, _consumer) = mpsc(4, 32);
    let mut chunk = producer.try_reserve(1).unwrap();
    let mut slot = chunk.slot(0).unwrap();
    let err = slot.write(&[0u8; 33]).unwrap_err();
    assert_eq!((err.len, err.max), (33, 32));
    assert!(slot.set_len(33).is_err());
    slot.write(&[5u8; 32]).unwrap();
    chunk.commit();
}

#[test]
fn try_read_stops_at_unpublished_slots_and_at_its_limit() {
    let (producer, mut consumer) = mpsc(16, 8);
    for i in 0..5u8 {
        producer.try_push([i]).unwrap();
    }
    let held = producer.try_reserve(1).unwrap();
    producer.try_push([9u8]).unwrap();
    {
        let chunk = consumer.try_read(3).unwrap();
        assert_eq!(
            chunk.iter().map(|m| m.payload[0]).collect::<Vec<_>>(),
            [0, 1, 2]
        );
    }
    {
        let chunk = consumer.try_read(100).unwrap();
        assert_eq!(
            chunk.iter().map(|m| m.payload[0]).collect::<Vec<_>>(),
            [3, 4]
        );
    }
    assert_eq!(consumer.try_read(100).unwrap_err(), TryPopError::Empty);
    drop(held);
    let chunk = consumer.try_read(100).unwrap();
    assert_eq!(chunk.iter().map(|m| m.payload[0]).collect::<Vec<_>>(), [9]);
}

#[test]
fn attach_shares_one_ring_between_two_views() {
    let region = Arc::new(HeapRegion::zeroed(
        RingConfig::mpsc(8, 24).layout().unwrap().total_bytes,
    ));
    // SAFETY: fresh memory that only this ring and the views attached
    // to it below use.
    let host = unsafe { Ring::init_in(region.clone(), RingConfig::mpsc(8, 24)) }.unwrap();
    // SAFETY: the host view takes only the producer role; the second view
    // takes the only consumer.
    let device = unsafe { Ring::attach(region.clone()) }.unwrap();
    assert_eq!(device.layout(), host.layout());
    assert_eq!(device.region().base(), host.region().base());
    let producer = host.into_producer().unwrap();
    let mut consumer = device.into_consumer();
    producer.try_push_with(42, b"across views").unwrap();
    let message = consumer.try_pop().unwrap();
    assert_eq!(
        (message.request_id(), message.payload()),
        (42, &b"across views"[..])
    );
    drop(message);
    producer.close();
    assert_eq!(consumer.try_pop().unwrap_err(), TryPopError::Closed);
}

#[test]
fn init_rejects_small_and_misaligned_regions() {
    let config = RingConfig::spsc(4, 16);
    let total = config.layout().unwrap().total_bytes;
    assert_eq!(
        // SAFETY: fresh memory that only this ring and the views attached
        // to it below use.
        unsafe { Ring::init_in(HeapRegion::zeroed(total - 1), config) }.unwrap_err(),
        InitError::RegionTooSmall {
            len: total - 1,
            required: total
        }
    );
    let backing = HeapRegion::zeroed(total + 64);
    // SAFETY: `backing` outlives the region and the ring (both dropped at the
    // end of this block, the ring never being created).
    let shifted = unsafe {
        ExternalRegion::new(
            std::ptr::NonNull::new(backing.base().as_ptr().add(64)).unwrap(),
            total,
        )
    };
    assert!(matches!(
        // SAFETY: fresh memory that only this ring and the views attached
        // to it below use.
        unsafe { Ring::init_in(shifted, config) },
        Err(InitError::Misaligned { .. })
    ));
    // SAFETY: as above.
    let unaligned = unsafe {
        ExternalRegion::new(
            std::ptr::NonNull::new(backing.base().as_ptr().add(64)).unwrap(),
            total,
        )
    };
    assert!(matches!(
        Ring::inspect(&unaligned),
        Err(BadLayout::Misaligned { .. })
    ));
}

#[test]
fn attach_rejects_head_and_tail_that_are_not_positions_of_one_ring() {
    for (head, tail) in [
        (10u64, 0u64),
        (0, 1000),
        (u64::MAX, u64::MAX),
        (1 << 63, 1 << 63),
    ] {
        let config = RingConfig::spsc(4, 8);
        let region = Arc::new(HeapRegion::zeroed(config.layout().unwrap().total_bytes));
        // SAFETY: fresh memory that only this ring and the views attached
        // to it below use.
        drop(unsafe { Ring::init_in(region.clone(), config) }.unwrap());
        // SAFETY: no ring handle is alive on this memory; head is at byte 256
        // and tail at byte 128 (docs/ring-protocol.md).
        unsafe {
            region.base().as_ptr().add(256).cast::<u64>().write(head);
            region.base().as_ptr().add(128).cast::<u64>().write(tail);
        }
        // SAFETY: no other view of this memory exists.
        let err = unsafe { Ring::attach(region) }.unwrap_err();
        assert!(
            matches!(err, BadLayout::BadIndices { .. }),
            "{head} {tail}: {err}"
        );
    }
}

#[test]
fn corrupt_slot_length_is_reported_and_skipped() {
    let config = RingConfig::mpsc(4, 8);
    let region = Arc::new(HeapRegion::zeroed(config.layout().unwrap().total_bytes));
    // SAFETY: fresh memory that only this ring and the views attached
    // to it below use.
    let ring = unsafe { Ring::init_in(region.clone(), config) }.unwrap();
    let (producer, mut consumer) = ring.split_mpsc().unwrap();
    producer.try_push(*b"bad").unwrap();
    producer.try_push(*b"good").unwrap();
    // Simulate a device that wrote a bad header: slot 0's len at byte 768+16.
    // SAFETY: slot 0 is published and nobody reads it concurrently here.
    unsafe {
        region
            .base()
            .as_ptr()
            .add(768 + 16)
            .cast::<u32>()
            .write(9999)
    };
    assert_eq!(
        consumer.try_pop().unwrap_err(),
        TryPopError::Corrupt {
            position: 0,
            len: 9999,
            max: 32
        }
    );
    assert_eq!(consumer.try_pop().unwrap().payload(), b"good");
}

#[test]
fn blocking_pop_times_out_and_blocking_push_times_out() {
    let (producer, mut consumer) = mpsc(2, 8);
    let policy = WaitPolicy::default();
    let started = Instant::now();
    assert_eq!(
        consumer
            .pop(&policy, Some(Duration::from_millis(20)))
            .unwrap_err(),
        PopError::Timeout
    );
    assert!(started.elapsed() >= Duration::from_millis(20));
    producer.try_push(*b"a").unwrap();
    producer.try_push(*b"b").unwrap();
    match producer.push(*b"c", &policy, Some(Duration::from_millis(20))) {
        Err(PushError::Timeout(payload)) => assert_eq!(&payload, b"c"),
        other => panic!("expected Timeout, got {other:?}"),
    }
}

#[test]
fn close_wakes_every_blocked_waiter() {
    // Parks long enough that only a wake-up, not a timed re-check, ends the
    // wait within the test's bound.
    let policy = WaitPolicy {
        spins: 0,
        yields: 0,
        park_min: Duration::from_secs(30),
        park_max: Duration::from_secs(30),
    };
    let (producer, mut consumer) = mpsc(2, 8);
    producer.try_push(*b"1").unwrap();
    producer.try_push(*b"2").unwrap();
    let blocked_producers: Vec<_> = (0..3)
        .map(|_| {
            let producer = producer.clone();
            thread::spawn(move || producer.push(*b"3", &policy, None))
        })
        .collect();
    let (spsc_producer, mut spsc_consumer) = spsc(2, 8);
    let blocked_consumer = thread::spawn(move || spsc_consumer.pop(&policy, None).map(|_| ()));
    thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    producer.close();
    spsc_producer.close();
    for handle in blocked_producers {
        assert!(matches!(handle.join().unwrap(), Err(PushError::Closed(_))));
    }
    assert_eq!(blocked_consumer.join().unwrap(), Err(PopError::Closed));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waiters slept through close"
    );
    // The two messages pushed before close are still delivered.
    assert_eq!(consumer.try_pop().unwrap().payload(), b"1");
    assert_eq!(consumer.try_pop().unwrap().payload(), b"2");
    assert_eq!(consumer.try_pop().unwrap_err(), TryPopError::Closed);
}

#[test]
fn blocking_pop_is_woken_by_a_push() {
    let policy = WaitPolicy {
        spins: 0,
        yields: 0,
        park_min: Duration::from_secs(30),
        park_max: Duration::from_secs(30),
    };
    let (producer, mut consumer) = mpsc(4, 8);
    let waiter = thread::spawn(move || {
        let message = consumer
            .pop(&policy, Some(Duration::from_secs(60)))
            .map(|m| m.payload().to_vec());
        (message, consumer)
    });
    thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    producer.push(*b"wake", &policy, None).unwrap();
    let (message, _consumer) = waiter.join().unwrap();
    assert_eq!(message.unwrap(), b"wake");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn heartbeats_advance_while_waiting_and_on_beat() {
    let ring = Ring::new(RingConfig::spsc(2, 8)).unwrap();
    let (beat_view, _) = (ring.consumer_heartbeat(), ring.producer_heartbeat());
    assert_eq!(beat_view, 0);
    let config = RingConfig::spsc(2, 8);
    let region = Arc::new(HeapRegion::zeroed(config.layout().unwrap().total_bytes));
    // SAFETY: fresh memory that only this ring and the views attached
    // to it below use.
    let ring = unsafe { Ring::init_in(region.clone(), config) }.unwrap();
    // SAFETY: the observer view takes no role.
    let observer = unsafe { Ring::attach(region) }.unwrap();
    let (producer, mut consumer) = ring.split_spsc().unwrap();
    producer.beat();
    producer.beat();
    assert_eq!(observer.producer_heartbeat(), 2);
    let _ = consumer.pop(&WaitPolicy::default(), Some(Duration::from_millis(5)));
    assert!(observer.consumer_heartbeat() > 0);
}

/// A view over `region` laid out as `config`, plus the region for poking at
/// its bytes the way a misbehaving device would.
fn poked_ring(config: RingConfig) -> (Arc<HeapRegion>, Ring) {
    let region = Arc::new(HeapRegion::zeroed(config.layout().unwrap().total_bytes));
    // SAFETY: fresh memory; the test writes to it only where it says.
    let ring = unsafe { Ring::init_in(region.clone(), config) }.unwrap();
    (region, ring)
}

/// Writes `value` at byte `offset` of `region`.
fn poke<T>(region: &HeapRegion, offset: usize, value: T) {
    // SAFETY: the offset is inside the ring (callers pass control-block or
    // slot-header offsets), and no handle accesses that word concurrently.
    unsafe {
        region
            .base()
            .as_ptr()
            .add(offset)
            .cast::<T>()
            .write_unaligned(value)
    };
}

#[test]
fn attach_rejects_the_closed_bit_in_an_spsc_tail() {
    let (region, ring) = poked_ring(RingConfig::spsc(4, 8));
    drop(ring);
    poke(&region, 128, 1u64 << 63);
    // SAFETY: no other view exists.
    let err = unsafe { Ring::attach(region) }.unwrap_err();
    assert_eq!(
        err,
        BadLayout::BadIndices {
            head: 0,
            tail: 1 << 63
        }
    );
}

#[test]
fn a_corrupt_tail_is_never_read_through() {
    let (region, ring) = poked_ring(RingConfig::spsc(4, 8));
    let mut consumer = ring.into_consumer();
    // A producer that moves `tail` without publishing slots delivers nothing:
    // the consumer trusts only each slot's sequence.
    poke(&region, 128, 1000u64);
    assert_eq!(consumer.try_pop().unwrap_err(), TryPopError::Empty);
    assert_eq!(consumer.try_read(4).unwrap_err(), TryPopError::Empty);
}

#[test]
fn a_corrupt_sequence_makes_try_push_return_instead_of_spinning() {
    let (region, ring) = poked_ring(RingConfig::mpsc(4, 8));
    let producer = ring.into_producer().unwrap();
    // Slot 0's sequence (byte 768) claims position 5 is already taken.
    poke(&region, 768, 5u64);
    assert!(matches!(
        producer.try_push(*b"x"),
        Err(TryPushError::Full(_))
    ));
}

#[test]
fn a_read_chunk_never_lends_more_than_max_payload() {
    let (region, ring) = poked_ring(RingConfig::mpsc(4, 16));
    let (producer, mut consumer) = ring.split_mpsc().unwrap();
    producer.try_push(*b"abc").unwrap();
    let chunk = consumer.try_read(4).unwrap();
    // A misbehaving producer rewrites the length after the chunk was taken.
    poke(&region, 768 + 16, 1u32 << 20);
    let lens: Vec<usize> = chunk.iter().map(|m| m.payload.len()).collect();
    // 16 + the 32-byte header rounds up to a 64-byte slot: 32 bytes max.
    assert_eq!(lens, [32]);
}

#[test]
fn a_closed_ring_with_an_unpublished_slot_parks_its_consumer() {
    let policy = WaitPolicy {
        spins: 0,
        yields: 0,
        park_min: Duration::from_millis(20),
        park_max: Duration::from_millis(20),
    };
    let (region, ring) = poked_ring(RingConfig::mpsc(4, 8));
    // SAFETY: the observer takes no role.
    let observer = unsafe { Ring::attach(region.clone()) }.unwrap();
    let (producer, mut consumer) = ring.split_mpsc().unwrap();
    let held = producer.try_reserve(1).unwrap();
    producer.close();
    assert_eq!(
        consumer
            .pop(&policy, Some(Duration::from_millis(200)))
            .unwrap_err(),
        PopError::Timeout
    );
    // Each wait step advances the heartbeat once: parked steps of 20 ms give
    // about ten; a busy loop would give hundreds of thousands.
    let steps = observer.consumer_heartbeat();
    assert!(
        (1..100).contains(&steps),
        "{steps} wait steps in 200 ms: not parked"
    );
    drop(held);
    assert_eq!(consumer.try_pop().unwrap_err(), TryPopError::Closed);
}

#[test]
fn extreme_wait_policies_do_not_panic() {
    let (_producer, mut consumer) = mpsc(2, 8);
    for (park_min, park_max) in [
        (Duration::MAX, Duration::MAX),
        (Duration::ZERO, Duration::ZERO),
    ] {
        let policy = WaitPolicy {
            spins: 0,
            yields: 0,
            park_min,
            park_max,
        };
        assert_eq!(
            consumer
                .pop(&policy, Some(Duration::from_millis(5)))
                .unwrap_err(),
            PopError::Timeout
        );
    }
}

#[test]
fn a_ring_too_big_to_allocate_is_an_error_not_an_abort() {
    // 2^24 slots of 1 MiB: 16 TiB, beyond this machine.
    let err = Ring::new(RingConfig::mpsc(1 << 24, (1 << 20) - 32)).unwrap_err();
    assert!(matches!(err, ConfigError::OutOfMemory { .. }), "{err}");
}

#[test]
fn attach_checks_the_closed_word() {
    for (mode, closed, tail, ok) in [
        (Mode::Spsc, 1u32, 0u64, true),
        (Mode::Spsc, 2, 0, false),
        (Mode::Mpsc, 1, 1 << 63, true),
        (Mode::Mpsc, 1, 0, false),
        (Mode::Mpsc, 0, 1 << 63, true),
    ] {
        let (region, ring) = poked_ring(RingConfig {
            mode,
            capacity: 4,
            max_payload: 8,
        });
        drop(ring);
        poke(&region, 384, closed);
        poke(&region, 128, tail);
        // SAFETY: no other view exists.
        let result = unsafe { Ring::attach(region) }.map(|_| ());
        assert_eq!(
            result.is_ok(),
            ok,
            "{mode:?} closed={closed} tail={tail:#x}: {result:?}"
        );
        if !ok {
            assert_eq!(result.unwrap_err(), BadLayout::BadClosedFlag { closed });
        }
    }
}
