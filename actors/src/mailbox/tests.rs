//! The mailbox's rules, one test or more each.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use futures_util::poll;
use tokio::time::Instant;

use super::{SendError, Sweeper, TrySendError, channel};

fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

fn sweeper() -> Arc<Sweeper> {
    Sweeper::new(Duration::from_millis(5))
}

/// Counts drops, to see that no message is lost or kept.
struct Tracked(u32, Arc<AtomicUsize>);
impl Drop for Tracked {
    fn drop(&mut self) {
        self.1.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn a_full_mailbox_refuses_and_hands_the_message_back() {
    let (sender, mut receiver) = channel::<u32>(2, sweeper());
    assert_eq!(sender.capacity(), 2);
    sender.try_send(1).unwrap();
    sender.try_send(2).unwrap();
    assert_eq!(sender.capacity(), 0);
    assert!(matches!(sender.try_send(3), Err(TrySendError::Full(3))));
    assert_eq!(receiver.try_recv(), Some(1));
    sender.try_send(3).unwrap();
    assert_eq!(receiver.try_recv(), Some(2));
    assert_eq!(receiver.try_recv(), Some(3));
    assert_eq!(receiver.try_recv(), None);
    assert_eq!(sender.capacity(), 2);
}

#[tokio::test]
async fn parked_senders_are_admitted_in_order_as_slots_free() {
    let (sender, mut receiver) = channel::<u32>(1, sweeper());
    sender.try_send(0).unwrap();
    let mut first = pin!(sender.send(1, far()));
    let mut second = pin!(sender.send(2, far()));
    assert!(poll!(first.as_mut()).is_pending());
    assert!(poll!(second.as_mut()).is_pending());
    // Parked senders make the mailbox full for newcomers (rule 3).
    assert!(matches!(sender.try_send(9), Err(TrySendError::Full(9))));
    assert_eq!(sender.capacity(), 0);

    assert_eq!(receiver.try_recv(), Some(0));
    // The oldest parked message took the slot; its sender is done.
    assert!(matches!(poll!(first.as_mut()), Poll::Ready(Ok(()))));
    assert!(poll!(second.as_mut()).is_pending());
    assert_eq!(receiver.try_recv(), Some(1));
    assert!(matches!(poll!(second.as_mut()), Poll::Ready(Ok(()))));
    assert_eq!(receiver.recv().await, Some(2));
    assert_eq!(sender.capacity(), 1);
}

#[tokio::test]
async fn a_parked_sender_times_out_within_a_tick_and_its_message_is_dropped() {
    let drops = Arc::new(AtomicUsize::new(0));
    let (sender, mut receiver) = channel::<Tracked>(1, sweeper());
    sender.try_send(Tracked(0, drops.clone())).ok().unwrap();
    let started = Instant::now();
    let sent = sender
        .send(
            Tracked(1, drops.clone()),
            started + Duration::from_millis(30),
        )
        .await;
    let waited = started.elapsed();
    assert!(matches!(sent, Err(SendError::Timeout)));
    assert!(waited >= Duration::from_millis(30), "{waited:?}");
    assert!(waited < Duration::from_millis(500), "{waited:?}");
    assert_eq!(drops.load(Ordering::SeqCst), 1);
    // The queued message is untouched, and the slot frees normally.
    assert_eq!(receiver.try_recv().map(|m| m.0), Some(0));
    assert!(receiver.try_recv().is_none());
    sender.try_send(Tracked(2, drops.clone())).ok().unwrap();
}

#[tokio::test]
async fn closing_hands_parked_messages_back_and_keeps_queued_ones() {
    let (sender, mut receiver) = channel::<u32>(1, sweeper());
    sender.try_send(1).unwrap();
    let mut parked = pin!(sender.send(2, far()));
    assert!(poll!(parked.as_mut()).is_pending());
    receiver.close();
    assert!(sender.is_closed());
    assert!(matches!(
        poll!(parked.as_mut()),
        Poll::Ready(Err(SendError::Closed(2)))
    ));
    assert!(matches!(sender.try_send(3), Err(TrySendError::Closed(3))));
    assert!(matches!(
        sender.send(4, far()).await,
        Err(SendError::Closed(4))
    ));
    // Rule 6: what was queued is drained, then the end.
    assert_eq!(receiver.recv().await, Some(1));
    assert_eq!(receiver.recv().await, None);
}

#[tokio::test]
async fn a_reopened_mailbox_takes_messages_again_after_those_it_kept() {
    let (sender, mut receiver) = channel::<u32>(2, sweeper());
    sender.try_send(1).unwrap();
    receiver.close();
    assert!(matches!(sender.try_send(2), Err(TrySendError::Closed(2))));
    // Rule 6: the receiver opens it again; the refused sender sends again.
    receiver.reopen();
    assert!(!sender.is_closed());
    sender.try_send(2).unwrap();
    assert_eq!(receiver.recv().await, Some(1));
    assert_eq!(receiver.recv().await, Some(2));
    let mut next = pin!(receiver.recv());
    assert!(
        poll!(next.as_mut()).is_pending(),
        "open and empty: it waits"
    );
}

#[tokio::test]
async fn senders_parked_across_a_close_and_reopen_are_admitted() {
    let (sender, mut receiver) = channel::<u32>(1, sweeper());
    sender.try_send(1).unwrap();
    // Two senders park; the close wakes them, but they do not run before
    // the mailbox reopens (the receiver drains and reopens at once).
    let mut two = pin!(sender.send(2, far()));
    let mut three = pin!(sender.send(3, far()));
    assert!(poll!(two.as_mut()).is_pending());
    assert!(poll!(three.as_mut()).is_pending());
    receiver.close();
    assert_eq!(receiver.recv().await, Some(1));
    receiver.reopen();
    // Rule 3 after the reopen: the oldest parked one was admitted.
    assert!(matches!(poll!(two.as_mut()), Poll::Ready(Ok(()))));
    assert!(poll!(three.as_mut()).is_pending());
    assert_eq!(receiver.recv().await, Some(2));
    assert!(matches!(poll!(three.as_mut()), Poll::Ready(Ok(()))));
    assert_eq!(receiver.recv().await, Some(3));
}

/// Rule 10: the count the mailboxes of one silo share goes up as a sender
/// parks and down however it leaves: admitted, cancelled, timed out, or
/// handed its message back by a close.
#[tokio::test]
async fn waiting_senders_are_counted_until_they_leave_however_they_leave() {
    let sweeper = sweeper();
    let (one, mut one_receiver) = channel::<u32>(1, sweeper.clone());
    let (two, mut two_receiver) = channel::<u32>(1, sweeper.clone());
    one.try_send(0).unwrap();
    two.try_send(0).unwrap();
    let mut admitted = pin!(one.send(1, far()));
    let mut timing_out = pin!(one.send(2, Instant::now() + Duration::from_millis(20)));
    let mut closed = pin!(two.send(3, far()));
    assert_eq!(sweeper.waiting(), 0);
    assert!(poll!(admitted.as_mut()).is_pending());
    assert!(poll!(timing_out.as_mut()).is_pending());
    assert!(poll!(closed.as_mut()).is_pending());
    {
        let mut cancelled = pin!(two.send(4, far()));
        assert!(poll!(cancelled.as_mut()).is_pending());
        assert_eq!(sweeper.waiting(), 4);
    }
    assert_eq!(sweeper.waiting(), 3);
    // A slot frees: the oldest parked sender is admitted.
    assert_eq!(one_receiver.try_recv(), Some(0));
    assert_eq!(sweeper.waiting(), 2);
    assert!(matches!(poll!(admitted.as_mut()), Poll::Ready(Ok(()))));
    assert!(matches!(timing_out.await, Err(SendError::Timeout)));
    assert_eq!(sweeper.waiting(), 1);
    // A close wakes the sender, which leaves as it takes its message back.
    two_receiver.close();
    assert!(matches!(
        poll!(closed.as_mut()),
        Poll::Ready(Err(SendError::Closed(3)))
    ));
    assert_eq!(sweeper.waiting(), 0);
    assert_eq!(one_receiver.try_recv(), Some(1));
}

#[tokio::test]
async fn a_dropped_parked_send_takes_its_message_with_it() {
    let drops = Arc::new(AtomicUsize::new(0));
    let (sender, mut receiver) = channel::<Tracked>(1, sweeper());
    sender.try_send(Tracked(0, drops.clone())).ok().unwrap();
    {
        let mut parked = pin!(sender.send(Tracked(1, drops.clone()), far()));
        assert!(poll!(parked.as_mut()).is_pending());
    }
    assert_eq!(drops.load(Ordering::SeqCst), 1);
    let mut next = pin!(sender.send(Tracked(2, drops.clone()), far()));
    assert!(poll!(next.as_mut()).is_pending());
    assert_eq!(receiver.try_recv().map(|m| m.0), Some(0));
    assert!(matches!(poll!(next.as_mut()), Poll::Ready(Ok(()))));
    assert_eq!(receiver.try_recv().map(|m| m.0), Some(2));
}

#[tokio::test]
async fn a_send_dropped_after_admission_is_still_delivered() {
    let (sender, mut receiver) = channel::<u32>(1, sweeper());
    sender.try_send(0).unwrap();
    {
        let mut parked = pin!(sender.send(1, far()));
        assert!(poll!(parked.as_mut()).is_pending());
        assert_eq!(receiver.try_recv(), Some(0));
    }
    assert_eq!(receiver.try_recv(), Some(1));
}

#[tokio::test]
async fn a_permit_holds_a_slot_and_its_drop_admits_a_parked_sender() {
    let (sender, mut receiver) = channel::<u32>(2, sweeper());
    let permit = sender.try_reserve().unwrap();
    assert_eq!(sender.capacity(), 1);
    sender.try_send(1).unwrap();
    assert!(sender.try_reserve().is_none());
    let mut parked = pin!(sender.send(2, far()));
    assert!(poll!(parked.as_mut()).is_pending());
    drop(permit);
    assert!(matches!(poll!(parked.as_mut()), Poll::Ready(Ok(()))));
    assert_eq!(receiver.try_recv(), Some(1));
    assert_eq!(receiver.try_recv(), Some(2));
}

#[tokio::test]
async fn dropping_the_receiver_drops_queued_messages_and_returns_parked_ones() {
    let drops = Arc::new(AtomicUsize::new(0));
    let (sender, receiver) = channel::<Tracked>(1, sweeper());
    sender.try_send(Tracked(0, drops.clone())).ok().unwrap();
    let mut parked = pin!(sender.send(Tracked(1, drops.clone()), far()));
    assert!(poll!(parked.as_mut()).is_pending());
    drop(receiver);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
    match poll!(parked.as_mut()) {
        Poll::Ready(Err(SendError::Closed(message))) => assert_eq!(message.0, 1),
        other => panic!("expected the message back, got {:?}", other.is_ready()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_senders_through_a_tiny_mailbox_lose_nothing_and_keep_their_order() {
    const SENDERS: u32 = 8;
    const EACH: u32 = 5000;
    let (sender, mut receiver) = channel::<(u32, u32)>(3, sweeper());
    let tasks: Vec<_> = (0..SENDERS)
        .map(|who| {
            let sender = sender.clone();
            tokio::spawn(async move {
                for n in 0..EACH {
                    let mut message = (who, n);
                    loop {
                        match sender.try_send(message) {
                            Ok(()) => break,
                            Err(TrySendError::Full(back)) => {
                                sender.send(back, far()).await.unwrap();
                                break;
                            }
                            Err(TrySendError::Closed(back)) => message = back,
                        }
                    }
                }
            })
        })
        .collect();
    let mut next = vec![0u32; SENDERS as usize];
    for _ in 0..SENDERS * EACH {
        let (who, n) = receiver.recv().await.unwrap();
        assert_eq!(next[who as usize], n, "sender {who} out of order");
        next[who as usize] += 1;
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert!(receiver.try_recv().is_none());
    assert_eq!(sender.capacity(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn senders_timing_out_while_others_are_admitted_lose_nothing_else() {
    let drops = Arc::new(AtomicUsize::new(0));
    let (sender, mut receiver) = channel::<Tracked>(2, sweeper());
    let delivered = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..64u32)
        .map(|n| {
            let sender = sender.clone();
            let drops = drops.clone();
            let delivered = delivered.clone();
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_millis(u64::from(n % 4) * 10);
                if sender.send(Tracked(n, drops), deadline).await.is_ok() {
                    delivered.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    // Take slowly, so that some senders time out while parked.
    let mut received = 0;
    let stop = Instant::now() + Duration::from_millis(100);
    while Instant::now() < stop {
        if receiver.try_recv().is_some() {
            received += 1;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for task in tasks {
        task.await.unwrap();
    }
    while receiver.try_recv().is_some() {
        received += 1;
    }
    // Every message was received or dropped by its timed-out sender, once.
    assert_eq!(received, delivered.load(Ordering::SeqCst));
    assert_eq!(drops.load(Ordering::SeqCst), 64);
    // Every sender left the parked list, admitted or timed out (rule 10).
    assert_eq!(sender.shared.sweeper.waiting(), 0);
    assert!(received < 64, "some senders should have timed out");
}

#[tokio::test]
async fn taking_all_at_once_keeps_order_and_refills_from_parked_senders() {
    let (sender, mut receiver) = channel::<u32>(2, sweeper());
    sender.try_send(1).unwrap();
    sender.try_send(2).unwrap();
    let mut third = pin!(sender.send(3, far()));
    let mut fourth = pin!(sender.send(4, far()));
    let mut fifth = pin!(sender.send(5, far()));
    for parked in [third.as_mut(), fourth.as_mut(), fifth.as_mut()] {
        assert!(poll!(parked).is_pending());
    }
    let mut batch = std::collections::VecDeque::from([0]);
    assert!(receiver.try_recv_all(&mut batch));
    assert_eq!(batch, [0, 1, 2]);
    // Both freed slots went to the oldest parked senders, in order.
    assert!(matches!(poll!(third.as_mut()), Poll::Ready(Ok(()))));
    assert!(matches!(poll!(fourth.as_mut()), Poll::Ready(Ok(()))));
    assert!(poll!(fifth.as_mut()).is_pending());
    batch.clear();
    assert!(receiver.try_recv_all(&mut batch));
    assert_eq!(batch, [3, 4]);
    assert!(matches!(poll!(fifth.as_mut()), Poll::Ready(Ok(()))));
    assert_eq!(receiver.try_recv(), Some(5));
    assert!(!receiver.try_recv_all(&mut batch));
    assert_eq!(sender.capacity(), 2);
}

#[tokio::test]
async fn closing_again_wakes_no_parked_sender_twice() {
    use std::task::{Context, Wake, Waker};
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let count = Arc::new(Count(AtomicUsize::new(0)));
    let waker = Waker::from(count.clone());
    let mut cx = Context::from_waker(&waker);
    let (sender, mut receiver) = channel::<u32>(1, sweeper());
    sender.try_send(0).unwrap();
    let mut sends: Vec<_> = (0..1000).map(|n| Box::pin(sender.send(n, far()))).collect();
    for send in &mut sends {
        assert!(send.as_mut().poll(&mut cx).is_pending());
    }
    // Closing again (an activation's end may close a closed mailbox)
    // wakes no sender a second time: each parked sender is woken once.
    receiver.close();
    receiver.close();
    receiver.close();
    assert_eq!(
        count.0.load(Ordering::SeqCst),
        1000,
        "one wake per parked sender, however many closes"
    );
}

/// Rule 9: a receiver that finds nothing and waits frees the parked
/// list once empty and the wakers it kept for admitted senders, keeps the
/// room a burst made, and keeps a parked sender's list; messages that
/// come one at a time pass one buffer between the queue and the batch,
/// and the queue makes no other.
#[tokio::test]
async fn an_idle_mailbox_keeps_one_buffer() {
    let room = |sender: &super::Sender<u32>| {
        let state = sender.shared.lock();
        (state.queue.capacity(), state.parked.0.is_some())
    };
    let (sender, mut receiver) = channel::<u32>(2, sweeper());
    sender.try_send(1).unwrap();
    sender.try_send(2).unwrap();
    let mut third = pin!(sender.send(3, far()));
    assert!(poll!(third.as_mut()).is_pending());
    let mut batch = std::collections::VecDeque::new();
    assert!(receiver.try_recv_all(&mut batch));
    assert_eq!(batch, [1, 2]);
    assert!(receiver.admitted.is_some());
    assert!(matches!(poll!(third.as_mut()), Poll::Ready(Ok(()))));
    // Not idle: a message (the admitted one) is queued.
    let (queue, parked) = room(&sender);
    assert!(queue > 0 && parked);
    batch.clear();
    {
        let mut next = pin!(std::future::poll_fn(
            |cx| receiver.poll_recv_all(cx, &mut batch)
        ));
        assert!(matches!(poll!(next.as_mut()), Poll::Ready(true)));
        assert!(poll!(next.as_mut()).is_pending());
    }
    assert_eq!(batch, [3]);
    let (queue, parked) = room(&sender);
    assert!(queue > 1, "the burst's room is kept");
    assert!(!parked, "the empty parked list is freed");
    assert!(receiver.admitted.is_none());

    // One message at a time: the buffer the first one made passes from the
    // queue to the batch and back.
    let (sender, mut receiver) = channel::<u32>(2, sweeper());
    let mut batch = std::collections::VecDeque::new();
    for message in 4..7 {
        sender.try_send(message).unwrap();
        assert_eq!(room(&sender), (1, false));
        {
            let mut next = pin!(std::future::poll_fn(|cx| {
                let taken = receiver.poll_recv_all(cx, &mut batch);
                if taken.is_ready() {
                    assert_eq!(batch.pop_front(), Some(message));
                }
                taken
            }));
            assert!(matches!(poll!(next.as_mut()), Poll::Ready(true)));
            assert!(poll!(next.as_mut()).is_pending());
        }
        assert_eq!(room(&sender), (1, false));
        assert_eq!(batch.capacity(), 0);
    }

    // A parked sender keeps its list through an idle poll of `poll_recv`:
    // with every slot held by a permit, a sender parks while nothing is
    // queued.
    let permits: Vec<_> = (0..2).map(|_| sender.try_reserve().unwrap()).collect();
    let mut seventh = pin!(sender.send(7, far()));
    assert!(poll!(seventh.as_mut()).is_pending());
    {
        let mut idle = pin!(receiver.recv());
        assert!(poll!(idle.as_mut()).is_pending());
    }
    assert_eq!(room(&sender), (1, true));
    drop(permits);
    assert!(matches!(poll!(seventh.as_mut()), Poll::Ready(Ok(()))));
    assert_eq!(receiver.recv().await, Some(7));
    {
        let mut idle = pin!(receiver.recv());
        assert!(poll!(idle.as_mut()).is_pending());
    }
    assert_eq!(room(&sender), (1, false));
    sender.try_send(8).unwrap();
    assert_eq!(receiver.try_recv(), Some(8));
}

/// Every live activation keeps its mailbox's shared block: with the
/// reference counts, at most 136 bytes (glibc's 144-byte chunk; 152 would
/// take 160).
#[test]
fn the_shared_block_stays_small() {
    let shared = std::mem::size_of::<super::Shared<[u64; 7]>>();
    assert!(
        shared <= 120,
        "the mailbox's shared block is {shared} bytes, more than 120"
    );
}

/// Rule 5: the sweeper runs on the runtime of the first sender that
/// parked. When that runtime shuts down, a sender parked from another
/// runtime must still time out (the sweeper's task wakes it as it is
/// dropped, and it starts another sweeper on its own runtime).
#[test]
fn a_sender_on_another_runtime_times_out_after_the_sweepers_runtime_shut_down() {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    };
    let waited_for = |sweeper: &Sweeper, count: usize| {
        let bound = std::time::Instant::now() + Duration::from_secs(10);
        while sweeper.waiting() != count {
            assert!(std::time::Instant::now() < bound, "never parked");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let sweeper = sweeper();
    let (first, _first_receiver) = channel::<u32>(1, sweeper.clone());
    let (second, _second_receiver) = channel::<u32>(1, sweeper.clone());
    first.try_send(0).unwrap();
    second.try_send(0).unwrap();
    // The first sender parks on runtime `a`, which starts the sweeper.
    let a = runtime();
    a.spawn(async move { first.send(1, far()).await.is_ok() });
    waited_for(&sweeper, 1);
    // The second parks on runtime `b`, with a deadline that passes only
    // after `a` is gone.
    let b = runtime();
    let deadline = Instant::now() + Duration::from_millis(300);
    let timing_out = b.spawn(async move { second.send(2, deadline).await });
    waited_for(&sweeper, 2);
    drop(a);
    let sent =
        b.block_on(async { tokio::time::timeout(Duration::from_secs(10), timing_out).await });
    assert!(
        matches!(sent, Ok(Ok(Err(SendError::Timeout)))),
        "{:?}",
        sent.map(|joined| joined.map(|sent| sent.is_ok()))
    );
    // Both senders left: one timed out, one dropped with its runtime.
    assert_eq!(sweeper.waiting(), 0);
}
