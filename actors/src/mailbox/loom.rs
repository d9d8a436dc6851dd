//! Loom models of the mailbox: the hand-over of a parked sender's message
//! (rules 2 to 4) to both receive paths, in order, cancellation (rule 7),
//! timeouts (rule 5), closing and reopening (rule 6), permits (rule 1),
//! the receiver's wait (rule 9) and a reference's cached send, explored
//! over the interleavings of their locks and lock-free words
//! (`crate::loom`) with two or three preemptions.
//!
//! A lost wake-up shows as a deadlock (`block_on` parks a model thread
//! until its waker is woken, and loom fails an execution in which every
//! thread waits); a message lost, kept or delivered twice fails a count.
//!
//! Run with `scripts/loom-actors.sh` (the cfg is given to this crate
//! alone; see `crate::loom`). Without it these models are not compiled.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use ::loom::future::block_on;
use ::loom::sync::atomic::AtomicUsize;
use ::loom::thread;
use futures_util::task::noop_waker_ref;
use tokio::time::Instant;

use super::{Receiver, SendError, Sender, SenderCache, Sweep, Sweeper, channel};

/// Explores every interleaving with at most `bound` preemptions.
fn model(bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = ::loom::model::Builder::new();
    builder.preemption_bound = Some(bound);
    builder.check(f);
}

/// A deadline the models never reach: only a wake-up ends a wait. The
/// sweeper is never started (no tokio runtime in a model thread).
fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

fn mailbox<T: Send + 'static>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    channel(capacity, Sweeper::new(Duration::from_secs(3600)))
}

/// A mailbox of `capacity` slots holding `queued`.
fn holding<T: Send + 'static>(
    capacity: usize,
    queued: impl IntoIterator<Item = T>,
) -> (Sender<T>, Receiver<T>) {
    let (sender, receiver) = mailbox(capacity);
    for message in queued {
        assert!(sender.try_send(message).is_ok(), "room to queue");
    }
    (sender, receiver)
}

/// A thread for each of `messages` that sends it, waiting for room, and
/// must deliver it.
fn delivering(sender: &Sender<u32>, messages: [u32; 2]) -> [thread::JoinHandle<()>; 2] {
    messages.map(|message| {
        let sender = sender.clone();
        thread::spawn(move || assert!(block_on(sender.send(message, far())).is_ok()))
    })
}

/// Receives a batch at a time (`poll_recv_all`, the activation's path)
/// until `count` messages arrived, checking `sender`'s mirror after each.
fn receive_batches(receiver: &mut Receiver<u32>, sender: &Sender<u32>, count: usize) -> Vec<u32> {
    let mut batch = VecDeque::new();
    let mut arrived = Vec::new();
    while arrived.len() < count {
        let open = block_on(poll_fn(|cx| receiver.poll_recv_all(cx, &mut batch)));
        assert!(open);
        arrived.extend(batch.drain(..));
        assert_mirror(sender);
    }
    arrived
}

/// A thread that sends `message` until `deadline`, waiting for room, and
/// ends with how it went.
fn sending<T: Send + 'static>(
    sender: &Sender<T>,
    message: T,
    deadline: Instant,
) -> thread::JoinHandle<Result<(), SendError<T>>> {
    let sender = sender.clone();
    thread::spawn(move || block_on(sender.send(message, deadline)))
}

/// Counts drops, to see that a message is neither lost nor dropped twice.
struct Tracked(u32, ::loom::sync::Arc<AtomicUsize>);

impl Drop for Tracked {
    fn drop(&mut self) {
        self.1.fetch_add(1, Ordering::SeqCst);
    }
}

/// Free slots as the lock sees them, against the lock-free mirror the
/// senders read (`Shared::mirror`), the parked senders against the
/// sweeper's count (rule 10), and rule 3: while a sender is parked
/// in an open mailbox, every slot is taken (a freed slot admits one).
fn assert_mirror<T>(sender: &Sender<T>) {
    let state = sender.shared.lock();
    let free = if state.parked.is_empty() {
        sender.shared.slots() - state.held()
    } else {
        0
    };
    let admitted_all =
        state.closed || state.parked.is_empty() || state.held() == sender.shared.slots();
    // Read under the lock, which every change of the mirror and of the
    // waiting count holds (this mailbox has a sweeper of its own).
    let mirrored = sender.capacity();
    let parked = state.parked.iter().count();
    let waiting = sender.shared.sweeper.waiting();
    drop(state);
    assert_eq!(mirrored, free);
    assert_eq!(waiting, parked, "rule 10: the waiting count");
    assert!(admitted_all, "a sender parked beside a free slot");
}

/// Two senders and a receiver that waits between batches (rule 9 moves
/// its batch's room to the queue as it waits): both messages arrive, and
/// each sender's once.
#[test]
fn messages_sent_while_the_receiver_waits_all_arrive() {
    model(3, || {
        let (sender, mut receiver) = mailbox::<u32>(2);
        let senders: Vec<_> = [1, 2]
            .into_iter()
            .map(|message| {
                let sender = sender.clone();
                thread::spawn(move || assert!(sender.try_send(message).is_ok()))
            })
            .collect();
        let mut arrived = receive_batches(&mut receiver, &sender, 2);
        arrived.sort_unstable();
        assert_eq!(arrived, [1, 2]);
        for sender in senders {
            sender.join().expect("a sender thread");
        }
        assert_mirror(&sender);
    });
}

/// A full mailbox and two senders that park (rules 2 to 4): each is
/// admitted as the receiver frees a slot, is woken, and finds itself done
/// with one load or under the lock; every message arrives once.
#[test]
fn parked_senders_are_admitted_and_woken() {
    model(2, || {
        let (sender, mut receiver) = holding::<u32>(1, [0]);
        let senders = delivering(&sender, [1, 2]);
        let mut arrived = Vec::new();
        while arrived.len() < 3 {
            arrived.push(block_on(receiver.recv()).expect("the mailbox is open"));
        }
        arrived.sort_unstable();
        assert_eq!(arrived, [0, 1, 2]);
        for sender in senders {
            sender.join().expect("a sender thread");
        }
        assert_mirror(&sender);
    });
}

/// A send dropped after its first poll, racing the receiver freeing the
/// slot it waits for (rule 7): its message is either delivered (admitted
/// before the drop) or dropped with the future, never both and never
/// kept in the parked list.
#[test]
fn a_cancelled_send_delivers_or_drops_its_message_once() {
    model(3, || {
        let drops = ::loom::sync::Arc::new(AtomicUsize::new(0));
        let (sender, mut receiver) = holding::<Tracked>(1, [Tracked(0, drops.clone())]);
        let cancelling = {
            let sender = sender.clone();
            let drops = drops.clone();
            thread::spawn(move || {
                let mut send = pin!(sender.send(Tracked(1, drops), far()));
                let mut cx = Context::from_waker(noop_waker_ref());
                // Pending (parked) or Ready (the slot was free already):
                // either way the future is then dropped.
                let first = send.as_mut().poll(&mut cx);
                assert!(matches!(first, Poll::Pending | Poll::Ready(Ok(()))));
            })
        };
        let receiving = thread::spawn(move || {
            let first = receiver.try_recv().expect("message 0 is queued");
            (receiver, first)
        });
        cancelling.join().expect("the cancelling thread");
        // Dropped, the future took its message out unless it was admitted
        // first: nothing of it stays parked.
        assert!(sender.shared.lock().parked.is_empty());
        let (mut receiver, first) = receiving.join().expect("the receiving thread");
        assert_eq!(first.0, 0);
        let delivered = receiver.try_recv();
        assert!(receiver.try_recv().is_none());
        assert!(sender.shared.lock().parked.is_empty());
        assert_mirror(&sender);
        // Dropped so far: only message 1, if it was not delivered.
        let cancelled = usize::from(delivered.is_none());
        assert_eq!(drops.load(Ordering::SeqCst), cancelled);
        if let Some(message) = &delivered {
            assert_eq!(message.0, 1);
        }
        drop((first, delivered));
        assert_eq!(drops.load(Ordering::SeqCst), 2);
    });
}

/// A sender racing the receiver taking a message and then closing (rules
/// 3 and 6): admitted or queued before the close (its message stays
/// queued for the receiver), or refused after it with its message back,
/// never both, never neither.
#[test]
fn a_send_racing_a_take_and_a_close_is_delivered_or_refused() {
    model(3, || {
        let (sender, mut receiver) = holding::<u32>(1, [0]);
        let sending = sending(&sender, 5, far());
        assert_eq!(receiver.try_recv(), Some(0));
        receiver.close();
        let sent = sending.join().expect("the sending thread");
        match sent {
            Ok(()) => assert_eq!(receiver.try_recv(), Some(5)),
            Err(SendError::Closed(message)) => {
                assert_eq!(message, 5);
                assert_eq!(receiver.try_recv(), None);
            }
            Err(SendError::Timeout) => panic!("no deadline passes in the model"),
        }
        assert!(sender.shared.lock().parked.is_empty());
    });
}

/// Closing, taking the queued message while closed (which admits no one)
/// and reopening, while a sender waits (rule 6): the sender either ran
/// while the mailbox was closed and has its message back, or is admitted
/// (by the reopening, as the slot freed while closed admitted no one, or
/// it finds the room), and its message arrives after the one queued
/// before it.
#[test]
fn reopening_admits_a_sender_the_close_did_not_reach() {
    model(3, || {
        let (sender, mut receiver) = holding::<u32>(1, [0]);
        let sending = sending(&sender, 5, far());
        receiver.close();
        assert_eq!(receiver.try_recv(), Some(0));
        receiver.reopen();
        let sent = sending.join().expect("the sending thread");
        match sent {
            Ok(()) => assert_eq!(receiver.try_recv(), Some(5)),
            Err(SendError::Closed(message)) => {
                assert_eq!(message, 5);
                assert_eq!(receiver.try_recv(), None);
            }
            Err(SendError::Timeout) => panic!("no deadline passes in the model"),
        }
        assert!(sender.shared.lock().parked.is_empty());
        assert_mirror(&sender);
    });
}

/// A permit holding the only slot, a sender parked behind it and a
/// receiver waiting (rule 1): dropping the permit admits the sender's
/// message and wakes the receiver too.
#[test]
fn dropping_a_permit_admits_a_parked_sender_and_wakes_the_receiver() {
    model(3, || {
        let (sender, mut receiver) = mailbox::<u32>(1);
        let permit = sender.try_reserve().expect("the slot is free");
        let sending = {
            let sender = sender.clone();
            thread::spawn(move || assert!(block_on(sender.send(7, far())).is_ok()))
        };
        let releasing = thread::spawn(move || drop(permit));
        assert_eq!(block_on(receiver.recv()), Some(7));
        sending.join().expect("the sending thread");
        releasing.join().expect("the releasing thread");
        assert_mirror(&sender);
    });
}

/// The receiver dropped while a sender waits for room (rule 6): the sender
/// is woken and has its message back.
#[test]
fn a_dropped_receiver_hands_a_parked_message_back() {
    model(3, || {
        let drops = ::loom::sync::Arc::new(AtomicUsize::new(0));
        let (sender, receiver) = holding::<Tracked>(1, [Tracked(0, drops.clone())]);
        let sending = sending(&sender, Tracked(5, drops.clone()), far());
        drop(receiver);
        match sending.join().expect("the sending thread") {
            Err(SendError::Closed(message)) => {
                assert_eq!(message.0, 5);
                // Message 0 went with the receiver; 5 is still here.
                assert_eq!(drops.load(Ordering::SeqCst), 1);
            }
            Ok(()) => panic!("nothing freed a slot"),
            Err(SendError::Timeout) => panic!("no deadline passes in the model"),
        }
        assert_eq!(drops.load(Ordering::SeqCst), 2);
        // Rule 10: the sender left the parked list as it took its message.
        assert_eq!(sender.shared.sweeper.waiting(), 0);
    });
}

/// Two sends from one task, the first polled first (rule 3): whether each
/// queues or parks, their messages arrive in that order, after the one
/// queued before them.
#[test]
fn parked_messages_arrive_in_the_order_their_senders_came() {
    model(3, || {
        let (sender, mut receiver) = holding::<u32>(1, [0]);
        let sending = {
            let sender = sender.clone();
            thread::spawn(move || {
                let (first, second) = block_on(futures_util::future::join(
                    sender.send(1, far()),
                    sender.send(2, far()),
                ));
                assert!(first.is_ok() && second.is_ok());
            })
        };
        let mut arrived = Vec::new();
        while arrived.len() < 3 {
            arrived.push(block_on(receiver.recv()).expect("the mailbox is open"));
        }
        assert_eq!(arrived, [0, 1, 2]);
        sending.join().expect("the sending thread");
        assert_mirror(&sender);
    });
}

/// The activation's receive path, a batch at a time, with senders parked
/// behind a full mailbox (rules 3 and 9): taking the batch admits them and
/// wakes them after the lock is released, and every message arrives once,
/// the queued ones first.
#[test]
fn a_batch_taken_admits_the_parked_senders() {
    model(2, || {
        let (sender, mut receiver) = holding::<u32>(2, [0, 1]);
        let senders = delivering(&sender, [2, 3]);
        let mut arrived = receive_batches(&mut receiver, &sender, 4);
        assert_eq!(arrived[..2], [0, 1]);
        arrived.sort_unstable();
        assert_eq!(arrived, [0, 1, 2, 3]);
        for sender in senders {
            sender.join().expect("a sender thread");
        }
        assert_mirror(&sender);
    });
}

/// A parked sender and a close (rule 6): whether the sender parked before
/// the close or came after it, it has its message back, and what was
/// queued stays for the receiver.
#[test]
fn closing_hands_a_parked_message_back() {
    model(3, || {
        let (sender, mut receiver) = holding::<u32>(1, [0]);
        let sending = sending(&sender, 5, far());
        receiver.close();
        assert_eq!(receiver.try_recv(), Some(0));
        match sending.join().expect("the sending thread") {
            Err(SendError::Closed(message)) => assert_eq!(message, 5),
            Ok(()) => panic!("a closed mailbox admitted a message"),
            Err(SendError::Timeout) => panic!("no deadline passes in the model"),
        }
        assert_eq!(receiver.try_recv(), None);
        assert!(sender.shared.lock().parked.is_empty());
        assert_eq!(sender.shared.sweeper.waiting(), 0, "rule 10");
    });
}

/// A sender whose deadline has passed, the sweep (rule 5) and the receiver
/// freeing a slot: the sender is admitted (its message delivered) or times
/// out (its message dropped, once), and is never left waiting.
#[test]
fn a_swept_sender_times_out_or_is_admitted() {
    model(3, || {
        let drops = ::loom::sync::Arc::new(AtomicUsize::new(0));
        let (sender, mut receiver) = holding::<Tracked>(1, [Tracked(0, drops.clone())]);
        let sending = sending(&sender, Tracked(1, drops.clone()), Instant::now());
        let sweeping = {
            let sender = sender.clone();
            thread::spawn(move || {
                sender.shared.sweep(Instant::now());
            })
        };
        let first = receiver.try_recv().expect("message 0 is queued");
        let sent = sending.join().expect("the sending thread");
        sweeping.join().expect("the sweeping thread");
        let delivered = receiver.try_recv();
        match sent {
            Ok(()) => {
                assert_eq!(delivered.as_ref().map(|message| message.0), Some(1));
                assert_eq!(drops.load(Ordering::SeqCst), 0);
            }
            Err(SendError::Timeout) => {
                assert!(delivered.is_none());
                assert_eq!(drops.load(Ordering::SeqCst), 1);
            }
            Err(SendError::Closed(_)) => panic!("nothing closed the mailbox"),
        }
        assert!(sender.shared.lock().parked.is_empty());
        assert_mirror(&sender);
        drop((first, delivered));
        assert_eq!(drops.load(Ordering::SeqCst), 2);
    });
}

/// A reference's cached send (`SenderCache::try_send_with`, the ask's fast
/// path) racing the receiver freeing the only slot and closing: the
/// message is made exactly when it is queued, and a queued one is there
/// for the receiver.
#[test]
fn a_cached_send_makes_its_message_only_when_it_is_queued() {
    model(3, || {
        let (sender, mut receiver) = holding::<u32>(1, [0]);
        let cache = SenderCache::new();
        cache.set(&sender);
        let made = ::loom::sync::Arc::new(AtomicUsize::new(0));
        let sending = {
            let made = made.clone();
            thread::spawn(move || {
                cache.try_send_with(|| {
                    made.fetch_add(1, Ordering::SeqCst);
                    Some(7)
                })
            })
        };
        assert_eq!(receiver.try_recv(), Some(0));
        receiver.close();
        let queued = sending.join().expect("the sending thread");
        assert_eq!(made.load(Ordering::SeqCst), usize::from(queued));
        assert_eq!(receiver.try_recv(), queued.then_some(7));
        assert_eq!(receiver.try_recv(), None);
    });
}

/// A send polled once with one waker and then waited on with another (a
/// future moved between tasks, or polled by `select!` first): the parked
/// entry takes the new waker, so the admission wakes the task that waits.
#[test]
fn a_parked_sender_polled_with_a_new_waker_is_woken_through_it() {
    model(3, || {
        let (sender, mut receiver) = holding::<u32>(1, [0]);
        let sending = {
            let sender = sender.clone();
            thread::spawn(move || {
                let mut send = pin!(sender.send(1, far()));
                let mut cx = Context::from_waker(noop_waker_ref());
                if send.as_mut().poll(&mut cx).is_pending() {
                    assert!(block_on(send.as_mut()).is_ok());
                }
            })
        };
        assert_eq!(receiver.try_recv(), Some(0));
        sending.join().expect("the sending thread");
        assert_eq!(receiver.try_recv(), Some(1));
        assert_mirror(&sender);
    });
}

/// A sender parked past its deadline, with nothing but the sweep (rule 5)
/// to wake it, however the sweep's ticks fall around its parking: it times
/// out, and its message is dropped once.
#[test]
fn a_parked_sender_past_its_deadline_is_swept_out() {
    model(2, || {
        let drops = ::loom::sync::Arc::new(AtomicUsize::new(0));
        let (sender, receiver) = holding::<Tracked>(1, [Tracked(0, drops.clone())]);
        let finished = ::loom::sync::Arc::new(::loom::sync::atomic::AtomicBool::new(false));
        let sweeping = {
            let sender = sender.clone();
            let finished = finished.clone();
            thread::spawn(move || {
                // The sweeper's ticks, until the sender is done.
                while !finished.load(Ordering::SeqCst) {
                    sender.shared.sweep(Instant::now());
                    thread::yield_now();
                }
            })
        };
        let sent = block_on(sender.send(Tracked(1, drops.clone()), Instant::now()));
        finished.store(true, Ordering::SeqCst);
        sweeping.join().expect("the sweeping thread");
        assert!(matches!(sent, Err(SendError::Timeout)));
        assert_eq!(drops.load(Ordering::SeqCst), 1);
        assert!(sender.shared.lock().parked.is_empty());
        assert_mirror(&sender);
        drop(receiver);
        assert_eq!(drops.load(Ordering::SeqCst), 2);
    });
}
