//! Loom model tests of push, pop, batches (contending claims, published
//! prefixes, chunked reads) and close.
//!
//! Run with:
//! `RUSTFLAGS="--cfg loom" cargo test -p granary-ring --release --test loom`
//! (`.ci/run` does, with its own target directory). Under `--cfg loom` the
//! ring's shared words are loom atomics and every payload access is
//! recorded, so loom explores the interleavings and reports a payload read
//! that is not ordered after its write, as well as deadlocks and lost
//! wake-ups.

#[cfg(not(loom))]
#[test]
#[ignore = "loom models run only under RUSTFLAGS=\"--cfg loom\" (see the file's docs; .ci/run does)"]
fn loom_models_need_cfg_loom() {}

#[cfg(loom)]
mod models {
    use std::time::Duration;

    use granary_ring::{
        Consumer, PopError, Ring, RingConfig, TryPopError, TryPushError, WaitPolicy,
    };
    use loom::thread;

    /// Parks at once (loom cannot explore long spin phases), with no timeout
    /// in the model: only a wake-up ends the park.
    const PARK: WaitPolicy = WaitPolicy {
        spins: 0,
        yields: 0,
        park_min: Duration::from_secs(3600),
        park_max: Duration::from_secs(3600),
    };

    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(f);
    }

    /// Pops until `count` messages arrived, yielding on Empty.
    fn drain(consumer: &mut Consumer, count: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        while got.len() < count {
            match consumer.try_pop() {
                Ok(message) => got.push(message.payload().to_vec()),
                Err(TryPopError::Empty) => thread::yield_now(),
                Err(err) => panic!("unexpected {err}"),
            }
        }
        got
    }

    #[test]
    fn mpsc_two_producers_each_message_arrives_once() {
        model(|| {
            let (producer, mut consumer) = Ring::new(RingConfig::mpsc(2, 16))
                .unwrap()
                .split_mpsc()
                .unwrap();
            let other = producer.clone();
            let a = thread::spawn(move || other.try_push(*b"a").unwrap());
            producer.try_push(*b"b").unwrap();
            let mut got = drain(&mut consumer, 2);
            a.join().unwrap();
            got.sort();
            assert_eq!(got, vec![b"a".to_vec(), b"b".to_vec()]);
            assert_eq!(consumer.try_pop().unwrap_err(), TryPopError::Empty);
        });
    }

    #[test]
    fn mpsc_wraps_around_with_a_concurrent_consumer() {
        model(|| {
            let (producer, mut consumer) = Ring::new(RingConfig::mpsc(2, 16))
                .unwrap()
                .split_mpsc()
                .unwrap();
            let popper = thread::spawn(move || drain(&mut consumer, 3));
            for byte in [1u8, 2, 3] {
                let mut payload = [byte];
                loop {
                    match producer.try_push(payload) {
                        Ok(()) => break,
                        Err(TryPushError::Full(back)) => {
                            payload = back;
                            thread::yield_now();
                        }
                        Err(err) => panic!("unexpected {err}"),
                    }
                }
            }
            assert_eq!(popper.join().unwrap(), vec![vec![1], vec![2], vec![3]]);
        });
    }

    #[test]
    fn spsc_wraps_around_in_order() {
        model(|| {
            let (mut producer, mut consumer) = Ring::new(RingConfig::spsc(2, 16))
                .unwrap()
                .split_spsc()
                .unwrap();
            let pusher = thread::spawn(move || {
                for byte in [1u8, 2, 3] {
                    while producer.try_push([byte]).is_err() {
                        thread::yield_now();
                    }
                }
            });
            assert_eq!(drain(&mut consumer, 3), vec![vec![1], vec![2], vec![3]]);
            pusher.join().unwrap();
        });
    }

    #[test]
    fn batch_commit_is_contiguous_and_dropped_batch_is_skipped() {
        model(|| {
            let (producer, mut consumer) = Ring::new(RingConfig::mpsc(4, 16))
                .unwrap()
                .split_mpsc()
                .unwrap();
            let batcher = producer.clone();
            let batch = thread::spawn(move || {
                let mut chunk = batcher.try_reserve(2).unwrap();
                chunk.slot(0).unwrap().write(b"x1").unwrap();
                chunk.slot(1).unwrap().write(b"x2").unwrap();
                chunk.commit();
                // Claimed then abandoned: the consumer must not wait on it.
                drop(batcher.try_reserve(1).unwrap());
            });
            producer.try_push(*b"y").unwrap();
            let got = drain(&mut consumer, 3);
            batch.join().unwrap();
            let x1 = got.iter().position(|p| p == b"x1").unwrap();
            assert_eq!(got[x1 + 1], b"x2", "a batch is contiguous: {got:?}");
            assert!(got.contains(&b"y".to_vec()));
            assert_eq!(consumer.try_pop().unwrap_err(), TryPopError::Empty);
        });
    }

    /// Reads chunks (`try_read`) until `count` messages arrived, yielding
    /// on Empty; a chunk's skipped slots carry no message.
    fn read_chunks(consumer: &mut Consumer, count: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        while got.len() < count {
            match consumer.try_read(4) {
                Ok(chunk) => got.extend(chunk.iter().map(|m| m.payload.to_vec())),
                Err(TryPopError::Empty) => thread::yield_now(),
                Err(err) => panic!("unexpected {err}"),
            }
        }
        got
    }

    /// `try_read` on an MPSC ring while two producers publish out of
    /// order (rule M3: a later claim may publish first) and one claim is
    /// dropped unwritten: each message arrives once, no chunk runs past an
    /// unpublished slot, and the skipped slot delivers nothing.
    #[test]
    fn mpsc_try_read_takes_each_published_message_once() {
        model(|| {
            let (producer, mut consumer) = Ring::new(RingConfig::mpsc(4, 16))
                .unwrap()
                .split_mpsc()
                .unwrap();
            let other = producer.clone();
            let a = thread::spawn(move || {
                drop(other.try_reserve(1).unwrap());
                other.try_push(*b"a").unwrap();
            });
            producer.try_push(*b"b").unwrap();
            let mut got = read_chunks(&mut consumer, 2);
            a.join().unwrap();
            got.sort();
            assert_eq!(got, vec![b"a".to_vec(), b"b".to_vec()]);
            assert_eq!(consumer.try_pop().unwrap_err(), TryPopError::Empty);
        });
    }

    /// `publish_prefix` hands the first slots of a chunk to the consumer
    /// while the rest are still written: the consumer reads them, in
    /// order, racing the writes of the others (loom checks every payload
    /// read is ordered after its write). A chunk dropped after a prefix
    /// skips only what it did not publish.
    #[test]
    fn a_published_prefix_is_read_while_the_rest_is_written() {
        model(|| {
            let (producer, mut consumer) = Ring::new(RingConfig::mpsc(4, 16))
                .unwrap()
                .split_mpsc()
                .unwrap();
            let writer = thread::spawn(move || {
                let mut chunk = producer.try_reserve(3).unwrap();
                chunk.slot(0).unwrap().write(b"p0").unwrap();
                chunk.publish_prefix(1);
                assert!(
                    chunk.slot(0).is_none(),
                    "a published slot is the consumer's"
                );
                chunk.slot(1).unwrap().write(b"p1").unwrap();
                chunk.publish_prefix(2);
                // Slot 2 is never written: dropped, it is skipped.
                drop(chunk);
                producer.try_push(*b"z").unwrap();
            });
            let got = drain(&mut consumer, 3);
            writer.join().unwrap();
            assert_eq!(got, vec![b"p0".to_vec(), b"p1".to_vec(), b"z".to_vec()]);
            assert_eq!(consumer.try_pop().unwrap_err(), TryPopError::Empty);
        });
    }

    /// Two producers claim batches of two at once (rules M1-M2: one
    /// compare-and-swap each): the claims never overlap, each batch is
    /// contiguous, and all four messages arrive once.
    #[test]
    fn contending_batch_claims_never_overlap() {
        model(|| {
            let (producer, mut consumer) = Ring::new(RingConfig::mpsc(4, 16))
                .unwrap()
                .split_mpsc()
                .unwrap();
            let other = producer.clone();
            let batch = |producer: &granary_ring::Producer, tag: u8| {
                let mut chunk = producer.try_reserve(2).unwrap();
                chunk.slot(0).unwrap().write(&[tag, 1]).unwrap();
                chunk.slot(1).unwrap().write(&[tag, 2]).unwrap();
                chunk.commit();
            };
            let a = thread::spawn(move || batch(&other, b'a'));
            batch(&producer, b'b');
            let got = read_chunks(&mut consumer, 4);
            a.join().unwrap();
            for tag in [b'a', b'b'] {
                let first = got.iter().position(|p| p == &[tag, 1]).unwrap();
                assert_eq!(got[first + 1], [tag, 2], "a batch is contiguous: {got:?}");
            }
            assert_eq!(consumer.try_pop().unwrap_err(), TryPopError::Empty);
        });
    }

    #[test]
    fn close_racing_a_push_loses_nothing_that_was_accepted() {
        model(|| {
            let (producer, mut consumer) = Ring::new(RingConfig::mpsc(2, 16))
                .unwrap()
                .split_mpsc()
                .unwrap();
            let closer = producer.clone();
            let close = thread::spawn(move || closer.close());
            let accepted = producer.try_push(*b"m").is_ok();
            close.join().unwrap();
            let mut delivered = 0;
            loop {
                match consumer.try_pop() {
                    Ok(message) => {
                        assert_eq!(message.payload(), b"m");
                        delivered += 1;
                    }
                    Err(TryPopError::Closed) => break,
                    Err(TryPopError::Empty) => thread::yield_now(),
                    Err(err) => panic!("unexpected {err}"),
                }
            }
            assert_eq!(delivered, usize::from(accepted));
        });
    }

    #[test]
    fn close_wakes_a_parked_consumer() {
        model(|| {
            let (producer, mut consumer) = Ring::new(RingConfig::spsc(2, 16))
                .unwrap()
                .split_spsc()
                .unwrap();
            let waiter = thread::spawn(move || consumer.pop(&PARK, None).map(|_| ()));
            producer.close();
            assert_eq!(waiter.join().unwrap(), Err(PopError::Closed));
        });
    }

    #[test]
    fn close_wakes_a_parked_producer() {
        model(|| {
            let (producer, _consumer) = Ring::new(RingConfig::mpsc(2, 16))
                .unwrap()
                .split_mpsc()
                .unwrap();
            producer.try_push(*b"1").unwrap();
            producer.try_push(*b"2").unwrap();
            let blocked = producer.clone();
            let waiter = thread::spawn(move || blocked.push(*b"3", &PARK, None).is_err());
            producer.close();
            assert!(waiter.join().unwrap());
        });
    }

    #[test]
    fn a_push_wakes_a_parked_consumer() {
        model(|| {
            let (producer, mut consumer) = Ring::new(RingConfig::mpsc(2, 16))
                .unwrap()
                .split_mpsc()
                .unwrap();
            let waiter =
                thread::spawn(move || consumer.pop(&PARK, None).map(|m| m.payload().to_vec()));
            producer.try_push(*b"w").unwrap();
            assert_eq!(waiter.join().unwrap().unwrap(), b"w");
        });
    }

    #[test]
    fn spsc_batch_commit_is_read_as_a_chunk_in_order() {
        model(|| {
            let (mut producer, mut consumer) = Ring::new(RingConfig::spsc(4, 16))
                .unwrap()
                .split_spsc()
                .unwrap();
            let writer = thread::spawn(move || {
                let mut chunk = producer.try_reserve(2).unwrap();
                chunk.slot(0).unwrap().write(b"c1").unwrap();
                chunk.slot(1).unwrap().write(b"c2").unwrap();
                chunk.commit();
                // Dropped without commit: never visible.
                drop(producer.try_reserve(1).unwrap());
                producer.try_push(*b"c3").unwrap();
            });
            let mut got = Vec::new();
            while got.len() < 3 {
                match consumer.try_read(4) {
                    Ok(chunk) => got.extend(chunk.iter().map(|m| m.payload.to_vec())),
                    Err(TryPopError::Empty) => thread::yield_now(),
                    Err(err) => panic!("unexpected {err}"),
                }
            }
            writer.join().unwrap();
            assert_eq!(got, vec![b"c1".to_vec(), b"c2".to_vec(), b"c3".to_vec()]);
        });
    }

    #[test]
    fn spsc_close_by_the_producer_delivers_everything_pushed_before() {
        model(|| {
            let (mut producer, mut consumer) = Ring::new(RingConfig::spsc(2, 16))
                .unwrap()
                .split_spsc()
                .unwrap();
            let writer = thread::spawn(move || {
                producer.try_push(*b"a").unwrap();
                producer.try_push(*b"b").unwrap();
                producer.close();
            });
            let mut got = Vec::new();
            loop {
                match consumer.try_pop() {
                    Ok(message) => got.push(message.payload().to_vec()),
                    Err(TryPopError::Closed) => break,
                    Err(TryPopError::Empty) => thread::yield_now(),
                    Err(err) => panic!("unexpected {err}"),
                }
            }
            writer.join().unwrap();
            assert_eq!(got, vec![b"a".to_vec(), b"b".to_vec()]);
        });
    }
}
