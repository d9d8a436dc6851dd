//! Model-based property tests: random sequences of operations run against a
//! ring and against a `VecDeque` model of it, in both modes, and every
//! observable result has to agree.
//!
//! The model holds one entry per claimed, not yet released slot, in position
//! order. An entry is a message or, in MPSC mode only, a skipped slot left by
//! a batch that was dropped without being committed (it occupies its slot,
//! and counts in `Ring::len`, until the consumer passes it). The model also
//! tracks the position of its front entry, so message positions are checked
//! too.
//!
//! Operations: push (including over-long payloads and pushes into a full or
//! closed ring), pop, batch reserve (committed or dropped, slots written with
//! `write`, in place with `payload_mut` + `set_len`, or left untouched), chunked
//! read, and close (by any producer, the consumer or an observer view). After
//! every operation a second, role-less view attached to the same memory must
//! report the model's length and closed state.

use std::collections::VecDeque;
use std::sync::Arc;

use granary_ring::{
    Consumer, HeapRegion, Mode, Producer, Region, ReserveError, Ring, RingConfig, SpscProducer,
    TryPopError, TryPushError, WriteChunk,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

/// How one reserved slot gets its contents.
#[derive(Debug, Clone, Copy)]
enum WriteHow {
    /// `SlotMut::write`.
    Write,
    /// `payload_mut` then `set_len`.
    InPlace,
    /// Not written at all: the slot keeps length 0, request id 0, status 0.
    Untouched,
    /// An over-long `write` and an over-long `set_len` (both refused), then a
    /// valid `write`.
    TooLongThenWrite {
        /// Bytes past the maximum in the refused attempt, `1..=3`.
        excess: usize,
    },
}

/// The plan for one slot of a reservation.
#[derive(Debug, Clone)]
struct SlotPlan {
    how: WriteHow,
    request_id: u64,
    /// `None` leaves the status at 0.
    status: Option<u32>,
    /// At most the ring's maximum payload.
    len: usize,
}

/// Who closes the ring.
#[derive(Debug, Clone, Copy)]
enum Closer {
    /// The producer handle with this index.
    Producer(usize),
    Consumer,
    /// The role-less view attached to the same memory.
    Observer,
}

#[derive(Debug, Clone)]
enum Op {
    Push {
        producer: usize,
        request_id: u64,
        /// `0..=max_payload + 3`.
        len: usize,
    },
    Pop,
    Reserve {
        producer: usize,
        /// `0..=capacity + 1`.
        count: usize,
        commit: bool,
        /// One plan per slot; `capacity + 1` of them, the first `count` used.
        slots: Vec<SlotPlan>,
    },
    Read {
        max: usize,
    },
    Close(Closer),
}

/// One generated scenario.
#[derive(Debug, Clone)]
struct Scenario {
    capacity: u32,
    /// The `max_payload` asked for; the ring rounds it up.
    requested_max: u32,
    /// Byte the region is filled with before `init_in`, so formatting has
    /// to overwrite stale memory.
    stale_fill: u8,
    /// MPSC producer handles (clones); always 1 in SPSC.
    producers: usize,
    ops: Vec<Op>,
}

fn slot_plan(max: usize) -> impl Strategy<Value = SlotPlan> {
    let how = prop_oneof![
        3 => Just(WriteHow::Write),
        2 => Just(WriteHow::InPlace),
        1 => Just(WriteHow::Untouched),
        1 => (1..=3usize).prop_map(|excess| WriteHow::TooLongThenWrite { excess }),
    ];
    (
        how,
        any::<u64>(),
        proptest::option::of(any::<u32>()),
        0..=max,
    )
        .prop_map(|(how, request_id, status, len)| SlotPlan {
            how,
            request_id,
            status,
            len,
        })
}

fn op(capacity: usize, max: usize, producers: usize) -> impl Strategy<Value = Op> {
    let closer = prop_oneof![
        (0..producers).prop_map(Closer::Producer),
        Just(Closer::Consumer),
        Just(Closer::Observer),
    ];
    prop_oneof![
        30 => (0..producers, any::<u64>(), 0..=max + 3).prop_map(|(producer, request_id, len)| {
            Op::Push {
                producer,
                request_id,
                len,
            }
        }),
        20 => Just(Op::Pop),
        15 => (
            0..producers,
            0..=capacity + 1,
            any::<bool>(),
            vec(slot_plan(max), capacity + 1),
        )
            .prop_map(|(producer, count, commit, slots)| Op::Reserve {
                producer,
                count,
                commit,
                slots,
            }),
        15 => (0..=capacity + 2).prop_map(|max| Op::Read { max }),
        1 => closer.prop_map(Op::Close),
    ]
}

fn scenario(mode: Mode) -> impl Strategy<Value = Scenario> {
    let producers = match mode {
        Mode::Mpsc => 1..=3usize,
        Mode::Spsc => 1..=1usize,
    };
    (
        select(vec![2u32, 4, 8, 16]),
        0..=40u32,
        any::<u8>(),
        producers,
    )
        .prop_flat_map(move |(capacity, requested_max, stale_fill, producers)| {
            let max = RingConfig {
                mode,
                capacity,
                max_payload: requested_max,
            }
            .layout()
            .unwrap()
            .max_payload as usize;
            vec(op(capacity as usize, max, producers), 1..100).prop_map(move |ops| Scenario {
                capacity,
                requested_max,
                stale_fill,
                producers,
                ops,
            })
        })
}

/// A message as the model expects to read it back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    request_id: u64,
    status: u32,
    payload: Vec<u8>,
}

/// One claimed, unreleased slot.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Message(Expected),
    /// MPSC only: a slot of a dropped batch.
    Skip,
}

#[derive(Debug)]
struct Model {
    mode: Mode,
    capacity: usize,
    max_payload: usize,
    /// Entries from `head` on, in position order.
    slots: VecDeque<Entry>,
    /// Position of `slots[0]`.
    head: u64,
    closed: bool,
}

impl Model {
    fn free(&self) -> usize {
        self.capacity - self.slots.len()
    }

    /// What the consumer does before looking for a message: pass skipped
    /// slots at the head.
    fn settle_head(&mut self) {
        while self.slots.front() == Some(&Entry::Skip) {
            self.slots.pop_front();
            self.head += 1;
        }
    }

    fn empty_error(&self) -> TryPopError {
        if self.closed {
            TryPopError::Closed
        } else {
            TryPopError::Empty
        }
    }

    /// The error a reservation of `count` must give, if any. Precedence:
    /// bad count, then closed, then full.
    fn reserve_error(&self, count: usize) -> Option<ReserveError> {
        if count == 0 || count > self.capacity {
            Some(ReserveError::BadCount {
                requested: count,
                capacity: self.capacity,
            })
        } else if self.closed {
            Some(ReserveError::Closed)
        } else if self.free() < count {
            Some(ReserveError::Full { requested: count })
        } else {
            None
        }
    }

    /// The error a push of `payload` must give, if any. Precedence: too
    /// large, then closed, then full.
    fn push_error(&self, payload: &[u8]) -> Option<TryPushError<Vec<u8>>> {
        if payload.len() > self.max_payload {
            Some(TryPushError::PayloadTooLarge {
                len: payload.len(),
                max: self.max_payload,
                payload: payload.to_vec(),
            })
        } else if self.closed {
            Some(TryPushError::Closed(payload.to_vec()))
        } else if self.free() == 0 {
            Some(TryPushError::Full(payload.to_vec()))
        } else {
            None
        }
    }
}

enum Producers {
    Mpsc(Vec<Producer>),
    Spsc(SpscProducer),
}

impl Producers {
    fn push(
        &mut self,
        which: usize,
        request_id: u64,
        payload: Vec<u8>,
    ) -> Result<(), TryPushError<Vec<u8>>> {
        match self {
            Producers::Mpsc(producers) => producers[which].try_push_with(request_id, payload),
            Producers::Spsc(producer) => producer.try_push_with(request_id, payload),
        }
    }

    fn reserve(&mut self, which: usize, count: usize) -> Result<WriteChunk<'_>, ReserveError> {
        match self {
            Producers::Mpsc(producers) => producers[which].try_reserve(count),
            Producers::Spsc(producer) => producer.try_reserve(count),
        }
    }

    fn close(&self, which: usize) {
        match self {
            Producers::Mpsc(producers) => producers[which].close(),
            Producers::Spsc(producer) => producer.close(),
        }
    }

    fn all_closed(&self) -> Vec<bool> {
        match self {
            Producers::Mpsc(producers) => producers.iter().map(Producer::is_closed).collect(),
            Producers::Spsc(producer) => vec![producer.is_closed()],
        }
    }
}

/// Distinct contents for every message of a run: byte `i` of message number
/// `stamp` mixes the stamp's bytes with the index.
fn payload(stamp: u64, len: usize) -> Vec<u8> {
    let bytes = stamp.to_le_bytes();
    (0..len)
        .map(|i| bytes[i % 8] ^ (i as u8).wrapping_mul(151))
        .collect()
}

/// Checks a popped message against the model's front, then removes it.
fn check_pop(consumer: &mut Consumer, model: &mut Model) -> Result<(), TestCaseError> {
    model.settle_head();
    let result = consumer.try_pop();
    match model.slots.front() {
        None => {
            let want = model.empty_error();
            match result {
                Err(got) => prop_assert_eq!(got, want),
                Ok(message) => {
                    prop_assert!(false, "pop gave {message:?}; model expected {want:?}")
                }
            }
        }
        Some(Entry::Message(expected)) => {
            let expected = expected.clone();
            match result {
                Ok(message) => {
                    prop_assert_eq!(message.position(), model.head);
                    prop_assert_eq!(message.request_id(), expected.request_id);
                    prop_assert_eq!(message.status(), expected.status);
                    prop_assert_eq!(message.payload(), &expected.payload[..]);
                }
                Err(got) => prop_assert!(false, "pop gave {got:?}; model expected {expected:?}"),
            }
            model.slots.pop_front();
            model.head += 1;
        }
        Some(Entry::Skip) => unreachable!("settle_head removed leading skips"),
    }
    Ok(())
}

/// Checks a chunked read of at most `max` slots against the model's front,
/// then removes what it covered.
fn check_read(consumer: &mut Consumer, model: &mut Model, max: usize) -> Result<(), TestCaseError> {
    model.settle_head();
    let result = consumer.try_read(max);
    if model.slots.is_empty() {
        let want = model.empty_error();
        match result {
            Err(got) => prop_assert_eq!(got, want),
            Ok(chunk) => prop_assert!(false, "read gave {chunk:?}; model expected {want:?}"),
        }
        return Ok(());
    }
    // Every slot in the model is published, so the chunk runs to the limit
    // or to the end of what is claimed.
    let count = max.clamp(1, model.capacity).min(model.slots.len());
    let want: Vec<(u64, Expected)> = model
        .slots
        .iter()
        .take(count)
        .zip(model.head..)
        .filter_map(|(entry, position)| match entry {
            Entry::Message(expected) => Some((position, expected.clone())),
            Entry::Skip => None,
        })
        .collect();
    match result {
        Ok(chunk) => {
            prop_assert_eq!(
                chunk.len(),
                count,
                "slots in the chunk, skipped ones included"
            );
            prop_assert!(!chunk.is_empty());
            let got: Vec<(u64, Expected)> = chunk
                .iter()
                .map(|message| {
                    (
                        message.position,
                        Expected {
                            request_id: message.request_id,
                            status: message.status,
                            payload: message.payload.to_vec(),
                        },
                    )
                })
                .collect();
            prop_assert_eq!(got, want);
        }
        Err(got) => prop_assert!(false, "read({max}) gave {got:?}; model expected {want:?}"),
    }
    model.slots.drain(..count);
    model.head += count as u64;
    Ok(())
}

/// Runs a reservation of `count` slots filled per `plans`, committed or not.
fn check_reserve(
    producers: &mut Producers,
    model: &mut Model,
    which: usize,
    count: usize,
    commit: bool,
    plans: &[SlotPlan],
    stamp: &mut u64,
) -> Result<(), TestCaseError> {
    let want_err = model.reserve_error(count);
    let max = model.max_payload;
    let mut chunk = match (producers.reserve(which, count), want_err) {
        (Err(got), Some(want)) => {
            prop_assert_eq!(got, want);
            return Ok(());
        }
        (Ok(chunk), Some(want)) => {
            return Err(TestCaseError::fail(format!(
                "reserve({count}) gave {chunk:?}; model expected {want:?}"
            )));
        }
        (Err(got), None) => {
            return Err(TestCaseError::fail(format!(
                "reserve({count}) gave {got:?}; model expected a chunk"
            )));
        }
        (Ok(chunk), None) => chunk,
    };
    prop_assert_eq!(chunk.len(), count);
    prop_assert!(!chunk.is_empty());
    prop_assert_eq!(chunk.max_payload(), max);
    prop_assert!(chunk.slot(count).is_none());
    let mut written = Vec::with_capacity(count);
    for (index, plan) in plans.iter().take(count).enumerate() {
        *stamp += 1;
        let bytes = payload(*stamp, plan.len);
        let mut slot = chunk.slot(index).expect("index < count");
        let mut expected = Expected {
            request_id: 0,
            status: 0,
            payload: Vec::new(),
        };
        match plan.how {
            WriteHow::Untouched => {}
            WriteHow::Write => {
                slot.write(&bytes).unwrap();
                expected.payload = bytes;
            }
            WriteHow::InPlace => {
                let area = slot.payload_mut();
                prop_assert_eq!(area.len(), max);
                area[..bytes.len()].copy_from_slice(&bytes);
                slot.set_len(bytes.len()).unwrap();
                expected.payload = bytes;
            }
            WriteHow::TooLongThenWrite { excess } => {
                let err = slot.write(&vec![0xEE; max + excess]).unwrap_err();
                prop_assert_eq!((err.len, err.max), (max + excess, max));
                let err = slot.set_len(max + excess).unwrap_err();
                prop_assert_eq!((err.len, err.max), (max + excess, max));
                slot.write(&bytes).unwrap();
                expected.payload = bytes;
            }
        }
        if !matches!(plan.how, WriteHow::Untouched) {
            slot.set_request_id(plan.request_id);
            expected.request_id = plan.request_id;
            if let Some(status) = plan.status {
                slot.set_status(status);
                expected.status = status;
            }
        }
        written.push(Entry::Message(expected));
    }
    if commit {
        chunk.commit();
        model.slots.extend(written);
    } else {
        drop(chunk);
        if model.mode == Mode::Mpsc {
            // The claimed positions are published as skipped: they hold
            // their slots until the consumer passes them.
            model.slots.extend(std::iter::repeat_n(Entry::Skip, count));
        }
    }
    Ok(())
}

fn run(mode: Mode, scenario: &Scenario) -> Result<(), TestCaseError> {
    let config = RingConfig {
        mode,
        capacity: scenario.capacity,
        max_payload: scenario.requested_max,
    };
    let layout = config.layout().unwrap();
    let region = Arc::new(HeapRegion::zeroed(layout.total_bytes));
    // SAFETY: the region is fresh and nothing else refers to its memory yet;
    // it has `total_bytes` writable bytes.
    unsafe {
        region
            .base()
            .as_ptr()
            .write_bytes(scenario.stale_fill, layout.total_bytes)
    };
    // SAFETY: fresh memory that only this ring and the views attached
    // to it below use.
    let ring = unsafe { Ring::init_in(region.clone(), config) }.unwrap();
    prop_assert_eq!(ring.layout(), layout);
    let max_payload = layout.max_payload as usize;
    prop_assert!(max_payload >= scenario.requested_max as usize);
    prop_assert_eq!(
        layout.slot_size as usize,
        (32 + scenario.requested_max as usize).next_multiple_of(64)
    );
    // SAFETY: the observer view takes no role; `ring` takes both.
    let observer = unsafe { Ring::attach(region.clone()) }.unwrap();
    prop_assert_eq!(observer.layout(), layout);

    let (mut producers, mut consumer) = match mode {
        Mode::Mpsc => {
            let (producer, consumer) = ring.split_mpsc().unwrap();
            let mut all = vec![producer];
            for _ in 1..scenario.producers {
                all.push(all[0].clone());
            }
            (Producers::Mpsc(all), consumer)
        }
        Mode::Spsc => {
            let (producer, consumer) = ring.split_spsc().unwrap();
            (Producers::Spsc(producer), consumer)
        }
    };
    prop_assert_eq!(consumer.layout(), layout);

    let mut model = Model {
        mode,
        capacity: scenario.capacity as usize,
        max_payload,
        slots: VecDeque::new(),
        head: 0,
        closed: false,
    };
    let mut stamp = 0u64;
    for (step, op) in scenario.ops.iter().enumerate() {
        match op {
            Op::Push {
                producer,
                request_id,
                len,
            } => {
                stamp += 1;
                let bytes = payload(stamp, *len);
                let want = model.push_error(&bytes);
                let got = producers.push(*producer, *request_id, bytes.clone());
                match want {
                    // `TryPushError`'s equality compares the returned
                    // payload too: it must come back unchanged.
                    Some(want) => prop_assert_eq!(got, Err(want), "step {}", step),
                    None => {
                        prop_assert_eq!(got, Ok(()), "step {}", step);
                        model.slots.push_back(Entry::Message(Expected {
                            request_id: *request_id,
                            status: 0,
                            payload: bytes,
                        }));
                    }
                }
            }
            Op::Pop => check_pop(&mut consumer, &mut model)?,
            Op::Read { max } => check_read(&mut consumer, &mut model, *max)?,
            Op::Reserve {
                producer,
                count,
                commit,
                slots,
            } => check_reserve(
                &mut producers,
                &mut model,
                *producer,
                *count,
                *commit,
                slots,
                &mut stamp,
            )?,
            Op::Close(closer) => {
                match closer {
                    Closer::Producer(which) => producers.close(*which),
                    Closer::Consumer => consumer.close(),
                    Closer::Observer => observer.close(),
                }
                model.closed = true;
            }
        }
        prop_assert_eq!(observer.len(), model.slots.len(), "len after step {}", step);
        prop_assert_eq!(observer.is_empty(), model.slots.is_empty());
        prop_assert_eq!(observer.is_closed(), model.closed);
        prop_assert_eq!(consumer.is_closed(), model.closed);
        for closed in producers.all_closed() {
            prop_assert_eq!(closed, model.closed);
        }
    }

    // Finally close and drain: everything the model holds comes out, in
    // order, then the ring reports Closed, and stays closed to producers.
    consumer.close();
    model.closed = true;
    while !model.slots.is_empty() {
        check_pop(&mut consumer, &mut model)?;
    }
    check_pop(&mut consumer, &mut model)?;
    check_read(&mut consumer, &mut model, 1)?;
    prop_assert_eq!(observer.len(), 0);
    prop_assert!(matches!(
        producers.push(0, 1, Vec::new()),
        Err(TryPushError::Closed(_))
    ));
    prop_assert_eq!(producers.reserve(0, 1).unwrap_err(), ReserveError::Closed);
    Ok(())
}

proptest! {
    // Failures print a minimal scenario; nothing is written to disk.
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn mpsc_ring_matches_the_model(scenario in scenario(Mode::Mpsc)) {
        run(Mode::Mpsc, &scenario)?;
    }

    #[test]
    fn spsc_ring_matches_the_model(scenario in scenario(Mode::Spsc)) {
        run(Mode::Spsc, &scenario)?;
    }
}
