//! An activation's bounded mailbox: many senders, one receiver, with
//! senders that wait for room handing their message over as they park.
//!
//! # Rules
//!
//! 1. **Bound.** At most `capacity` messages are queued, less one per
//!    [`Permit`] held. A message offered to a full mailbox is refused
//!    ([`TrySendError::Full`]) or parked by [`Sender::send`].
//! 2. **Parking hands the message over.** A sender that must wait leaves
//!    its message in the mailbox's parked list with a ticket (increasing)
//!    and its deadline, and sleeps. Memory stays bounded: a parked message
//!    is one the sender would have held anyway, and each waiting sender
//!    parks one.
//! 3. **Admission is first come, first served.** When a slot frees (the
//!    receiver takes a message, a permit is dropped), the oldest parked
//!    message moves into the queue, the admission watermark passes its
//!    ticket, and its sender is woken. A new message never overtakes a
//!    parked one: while any is parked, the mailbox counts as full. So
//!    messages keep the order in which their senders reached the mailbox.
//! 4. **Completion is one load.** A woken sender whose ticket is below the
//!    watermark is done; it takes no lock.
//! 5. **Deadlines are swept, not timed.** No timer is armed per waiting
//!    sender. A silo-wide [`Sweeper`] wakes, every tick, the parked senders
//!    whose deadline has passed; a woken sender that is still parked and
//!    past its deadline takes its message out of the mailbox, drops it and
//!    fails with [`SendError::Timeout`]. A sender times out at most one
//!    tick late while the sweeping task runs; it runs on the runtime of the
//!    first sender that parked. If that runtime goes away, the task wakes
//!    the senders still parked as it is dropped, and the first of them
//!    polled on a runtime still alive starts another there (as does the
//!    next sender that parks).
//! 6. **Closing** refuses new messages ([`TrySendError::Closed`] and
//!    [`SendError::Closed`] hand the message back) and wakes every parked
//!    sender, which takes its message back. Queued messages stay for the
//!    receiver to drain. Dropping the receiver closes the mailbox and drops
//!    what is queued. The receiver may open it again
//!    ([`Receiver::reopen`]: a migration that did not happen); the senders
//!    refused meanwhile had their messages back, and send them again.
//! 7. **Cancellation.** A send future dropped while parked takes its
//!    message out, unless it was admitted first: then it is delivered.
//! 8. **An activity stamp rides along.** One word per mailbox, written
//!    ([`Sender::set_activity`]) and read ([`Sender::activity`]) by the
//!    silo, sequentially consistent, never looked at by the mailbox
//!    itself: where the silo's idle collector finds when the activation
//!    behind it last worked (`silo/collector.rs` rules 2 and 7), with no
//!    allocation of its own.
//! 9. **An idle receiver hands its batch's room back.** When the
//!    receiver finds nothing queued and registers to be woken, the room
//!    of its (empty) batch moves to the queue if the queue has none, and
//!    an empty parked-senders list and the wakers kept for admitted
//!    senders are freed (outside the lock). So the mailbox allocates
//!    nothing for messages that come one at a time (the buffer passes
//!    from the queue to the batch as the receiver takes a message,
//!    `take_all`'s swap, and back as it waits), and an activation none of
//!    whose messages arrived while it ran a turn holds one buffer, not one
//!    in the queue and one in its batch (a message that arrives during a
//!    turn makes the queue a second one, and both are kept). Room a burst
//!    made is kept too: freeing buffers at every wait cost the ask with
//!    100 callers 5-9% (`BENCHMARKS.md`, issue 18's sixth session), as
//!    each burst made them again. A message queued with no room makes
//!    room for one slot, not the four a `VecDeque` would.
//! 10. **Waiting senders are counted** silo-wide (the [`Sweeper`] every
//!     mailbox of a silo shares): one up when a sender parks, one down when
//!     it leaves the parked list however it leaves (admitted, timed out,
//!     closed, cancelled), both under the mailbox's lock, so it never
//!     goes below zero. The parked list counts its own pushes and
//!     removals, so no path that parks or unparks can skip the count. It
//!     is the silo's backpressure gauge
//!     (`Silo::senders_waiting`). A send future leaked while parked
//!     (`mem::forget`) never leaves, and stays counted, as its message
//!     stays parked.
//!
//! Everything is under one mutex, held for a few pointer moves and the
//! growth of a queue or list that is full or not yet made; wakers are
//! woken after it is released. The words read without it (the watermark
//! of rule 4, the free slots and the closed flag) and the mutex come from
//! `crate::loom`, and the models in `mailbox/loom.rs` explore the
//! hand-over, cancellation, timeouts, closing and waiting over their
//! interleavings (with two or three preemptions). Rules 2 to 4 are the
//! hand-off of Go's channels (a parked sender's message is taken by the one who frees the
//! slot); the sweep replaces tokio's per-waiter timers, which in the
//! fan-in benchmark cost a fifth of the time (`BENCHMARKS.md`).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

use crate::loom::{AtomicBool, AtomicU64, AtomicUsize, Mutex, MutexGuard};

/// A sender whose message waits for room (rule 2).
struct Parked<T> {
    /// Increasing in parking order.
    ticket: u64,
    message: T,
    waker: Waker,
    deadline: Instant,
}

struct State<T> {
    /// At most `capacity - reserved` messages.
    queue: VecDeque<T>,
    /// Oldest first; tickets increase from front to back.
    parked: ParkedList<T>,
    /// The ticket the next parked sender gets.
    next_ticket: u64,
    /// Slots held by permits, `0..=capacity` (a `u32`, as `capacity` is:
    /// with the flags beside it, one word).
    reserved: u32,
    closed: bool,
    /// The receiver, waiting for a message.
    receiver: Option<Waker>,
    /// Whether the sweeper holds this mailbox (so it is listed once).
    swept: bool,
}

/// The parked senders (rule 2), boxed and made when the first one parks:
/// most mailboxes never see a sender wait, and every live activation keeps
/// its mailbox's shared state for as long as it lives.
#[expect(
    clippy::box_collection,
    reason = "one pointer in place instead of an empty collection's three words: the point is the room kept per live activation"
)]
struct ParkedList<T>(Option<Box<VecDeque<Parked<T>>>>);

impl<T> ParkedList<T> {
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|parked| parked.is_empty())
    }

    /// Parks a sender, counted in `waiting` (rule 10).
    fn push_back(&mut self, parked: Parked<T>, waiting: &Sweeper) {
        self.0.get_or_insert_with(Box::default).push_back(parked);
        waiting.parked_one();
    }

    /// The oldest parked sender, no longer counted in `waiting` (rule 10).
    fn pop_front(&mut self, waiting: &Sweeper) -> Option<Parked<T>> {
        let parked = self.0.as_mut()?.pop_front()?;
        waiting.unparked_one();
        Some(parked)
    }

    /// The list's room, moved out to be freed, if no sender is parked
    /// (rule 9).
    fn release_if_empty(&mut self) -> ParkedList<T> {
        if self.is_empty() {
            std::mem::replace(self, ParkedList(None))
        } else {
            ParkedList(None)
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Parked<T>> {
        self.0.iter().flat_map(|parked| parked.iter())
    }

    /// Where the sender with `ticket` is, if it is parked.
    fn find(&self, ticket: u64) -> Option<usize> {
        self.0
            .as_ref()?
            .binary_search_by_key(&ticket, |parked| parked.ticket)
            .ok()
    }

    /// The sender at `index`, no longer counted in `waiting` (rule 10).
    fn remove(&mut self, index: usize, waiting: &Sweeper) -> Option<Parked<T>> {
        let parked = self.0.as_mut()?.remove(index)?;
        waiting.unparked_one();
        Some(parked)
    }

    fn get_mut(&mut self, index: usize) -> Option<&mut Parked<T>> {
        self.0.as_mut()?.get_mut(index)
    }
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Slots, at least 1; a `u32` (`SiloConfig` refuses a larger
    /// capacity, and `channel` cuts one to `u32::MAX`), so that it and
    /// `closed` share a word: every live
    /// activation keeps this block, and 136 bytes are a 144-byte chunk
    /// where 152 were a 160-byte one.
    capacity: u32,
    /// Every parked ticket below this was admitted (rule 4).
    admitted: AtomicU64,
    /// Free slots, `0..=capacity`, mirrored from `state` for lock-free
    /// reads; 0 while senders are parked.
    free: AtomicUsize,
    /// Mirrors `state.closed`.
    closed: AtomicBool,
    /// Rule 8.
    activity: AtomicU64,
    sweeper: Arc<Sweeper>,
}

impl<T> State<T> {
    /// Slots taken: queued messages and permits.
    fn held(&self) -> usize {
        self.queue.len() + self.reserved as usize
    }
}

impl<T> Shared<T> {
    /// The mailbox's slots.
    fn slots(&self) -> usize {
        self.capacity as usize
    }

    /// The state; a panic while it was locked (only in a waker or a drop,
    /// never between two updates) leaves it consistent.
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Rule 3: a freed slot takes the oldest parked message. Returns its
    /// sender, to wake once the lock is released. One is enough: while a
    /// sender is parked the queue is full, and each caller frees one slot.
    fn admit(&self, state: &mut State<T>) -> Option<Waker> {
        let mut woken = None;
        if !state.closed && state.held() < self.slots() {
            if let Some(parked) = state.parked.pop_front(&self.sweeper) {
                state.queue.push_back(parked.message);
                self.admitted.store(parked.ticket + 1, Ordering::Release);
                woken = Some(parked.waker);
            }
        }
        self.mirror(state);
        woken
    }

    /// Whether a new message may be queued now: a slot is free and no
    /// sender is parked (rules 1 and 3).
    fn has_room(&self, state: &State<T>) -> bool {
        state.parked.is_empty() && state.held() < self.slots()
    }

    fn mirror(&self, state: &State<T>) {
        let free = if state.parked.is_empty() {
            self.slots().saturating_sub(state.held())
        } else {
            0
        };
        self.free.store(free, Ordering::Relaxed);
    }

    /// Rule 6.
    fn close(&self) -> Vec<Waker> {
        let mut state = self.lock();
        if state.closed {
            // Every parked sender was woken by the first close.
            return Vec::new();
        }
        state.closed = true;
        self.closed.store(true, Ordering::Release);
        let mut woken: Vec<Waker> = state
            .parked
            .iter()
            .map(|parked| parked.waker.clone())
            .collect();
        woken.extend(state.receiver.take());
        self.mirror(&state);
        woken
    }

    /// Rule 6: takes messages again. A sender the close woke that has not
    /// run since is still parked: it is admitted now, as a freed slot
    /// would admit it (rule 3), and woken (it finds its message taken).
    fn reopen(&self) -> Vec<Waker> {
        let mut state = self.lock();
        state.closed = false;
        self.closed.store(false, Ordering::Release);
        let mut admitted = Vec::new();
        while let Some(sender) = self.admit(&mut state) {
            admitted.push(sender);
        }
        self.mirror(&state);
        admitted
    }
}

/// Creates a mailbox of `capacity` slots (at least 1) whose parked senders
/// `sweeper` times out.
pub(crate) fn channel<T: Send + 'static>(
    capacity: usize,
    sweeper: Arc<Sweeper>,
) -> (Sender<T>, Receiver<T>) {
    let capacity = u32::try_from(capacity.max(1)).unwrap_or(u32::MAX);
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            parked: ParkedList(None),
            next_ticket: 0,
            reserved: 0,
            closed: false,
            receiver: None,
            swept: false,
        }),
        capacity,
        admitted: AtomicU64::new(0),
        free: AtomicUsize::new(capacity as usize),
        closed: AtomicBool::new(false),
        activity: AtomicU64::new(0),
        sweeper,
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver {
            shared,
            admitted: None,
        },
    )
}

/// Why [`Sender::try_send`] refused a message, which comes back.
#[derive(Debug)]
pub(crate) enum TrySendError<T> {
    /// No free slot (rule 1).
    Full(T),
    /// The mailbox is closed (rule 6).
    Closed(T),
}

/// Why [`Sender::send`] did not deliver.
#[derive(Debug)]
pub(crate) enum SendError<T> {
    /// The mailbox closed; the message comes back.
    Closed(T),
    /// The deadline passed while the sender waited for room; the message
    /// was dropped.
    Timeout,
}

/// The sending end; cheap to clone.
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Sender<T> {
        Sender {
            shared: self.shared.clone(),
        }
    }
}

/// Wakes `woken`; call with no lock held.
fn wake_all(woken: Vec<Waker>) {
    for waker in woken {
        waker.wake();
    }
}

impl<T> Sender<T> {
    /// Queues `message` if a slot is free and no sender is parked.
    pub(crate) fn try_send(&self, message: T) -> Result<(), TrySendError<T>> {
        try_send(&self.shared, message)
    }

    /// Whether the mailbox is closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Wakes the receiver if it waits for a message, so that it looks at
    /// whatever else it waits for.
    pub(crate) fn wake_receiver(&self) {
        let receiver = self.shared.lock().receiver.take();
        if let Some(receiver) = receiver {
            receiver.wake();
        }
    }

    /// The activity stamp (rule 8).
    pub(crate) fn activity(&self) -> u64 {
        self.shared.activity.load(Ordering::SeqCst)
    }

    /// Sets the activity stamp (rule 8).
    pub(crate) fn set_activity(&self, stamp: u64) {
        self.shared.activity.store(stamp, Ordering::SeqCst);
    }

    /// Free slots now (0 while senders are parked).
    pub(crate) fn capacity(&self) -> usize {
        self.shared.free.load(Ordering::Relaxed)
    }

    /// Slots in all.
    pub(crate) fn max_capacity(&self) -> usize {
        self.shared.slots()
    }

    /// Holds one free slot until the permit is dropped, if one is free.
    pub(crate) fn try_reserve(&self) -> Option<Permit<T>> {
        let mut state = self.shared.lock();
        if state.closed || !self.shared.has_room(&state) {
            return None;
        }
        state.reserved += 1;
        self.shared.mirror(&state);
        Some(Permit {
            shared: self.shared.clone(),
        })
    }
}

impl<T: Send + 'static> Sender<T> {
    /// Queues `message`, parking it until a slot frees (rules 2 to 5), at
    /// most until `deadline`.
    pub(crate) fn send(&self, message: T, deadline: Instant) -> SendFuture<'_, T> {
        SendFuture {
            sender: self,
            deadline,
            stage: Stage::Unsent(message),
        }
    }
}

/// Queues `message` if a slot is free and no sender is parked (rules 1
/// and 3). A mailbox that looks full is refused without taking the lock;
/// one that only looked so is found out by the sender's next step, which
/// takes it.
fn try_send<T>(shared: &Shared<T>, message: T) -> Result<(), TrySendError<T>> {
    if shared.free.load(Ordering::Relaxed) == 0 && !shared.closed.load(Ordering::Acquire) {
        return Err(TrySendError::Full(message));
    }
    let state = shared.lock();
    if state.closed {
        return Err(TrySendError::Closed(message));
    }
    if !shared.has_room(&state) {
        return Err(TrySendError::Full(message));
    }
    queue_and_wake(shared, state, message);
    Ok(())
}

/// Queues `message` (the caller checked for room), releases the lock, and
/// wakes the receiver if it waits.
fn queue_and_wake<T>(shared: &Shared<T>, mut state: MutexGuard<'_, State<T>>, message: T) {
    // A message with no room takes room for one, not the four a
    // `VecDeque` would: most mailboxes (an idle grain's) never hold more
    // (rule 9).
    if state.queue.capacity() == 0 {
        state.queue.reserve_exact(1);
    }
    state.queue.push_back(message);
    shared.mirror(&state);
    let receiver = state.receiver.take();
    drop(state);
    if let Some(receiver) = receiver {
        receiver.wake();
    }
}

/// A grain reference's memory of the mailbox it last delivered to, so that
/// the next message skips the directory. Read without a lock or a
/// reference count (`arc-swap`); a closed mailbox is never used, so a stale
/// entry costs one more lookup, nothing else.
pub(crate) struct SenderCache<T> {
    last: arc_swap::ArcSwapOption<Shared<T>>,
}

impl<T> SenderCache<T> {
    pub(crate) fn new() -> SenderCache<T> {
        SenderCache {
            last: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// Remembers `sender`.
    pub(crate) fn set(&self, sender: &Sender<T>) {
        self.last.store(Some(sender.shared.clone()));
    }

    /// Queues `message` in the remembered mailbox if it is open and has a
    /// free slot. `Full` hands back the message with the mailbox, to wait
    /// on; anything else (nothing remembered, closed) hands back the
    /// message alone.
    pub(crate) fn try_send(&self, message: T) -> Result<(), (T, Option<Sender<T>>)> {
        let last = self.last.load();
        let Some(shared) = last.as_ref() else {
            return Err((message, None));
        };
        match try_send(shared, message) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(message)) => Err((
                message,
                Some(Sender {
                    shared: shared.clone(),
                }),
            )),
            Err(TrySendError::Closed(message)) => Err((message, None)),
        }
    }
}

impl<T> SenderCache<T> {
    /// Queues the message `make` builds in the remembered mailbox, if it is
    /// open and has a free slot; `make` runs only then (under the
    /// mailbox's lock), so a refused message never leaves its sender.
    pub(crate) fn try_send_with(&self, make: impl FnOnce() -> Option<T>) -> bool {
        let last = self.last.load();
        let Some(shared) = last.as_ref() else {
            return false;
        };
        if shared.free.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let state = shared.lock();
        if state.closed || !shared.has_room(&state) {
            return false;
        }
        match make() {
            Some(message) => {
                queue_and_wake(shared, state, message);
                true
            }
            None => false,
        }
    }
}

impl<T> Clone for SenderCache<T> {
    fn clone(&self) -> SenderCache<T> {
        SenderCache {
            last: arc_swap::ArcSwapOption::new(self.last.load_full()),
        }
    }
}

/// One slot held (rule 1); dropping it frees the slot.
pub(crate) struct Permit<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Drop for Permit<T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.reserved = state.reserved.saturating_sub(1);
        let admitted = self.shared.admit(&mut state);
        // An admitted message is new to the receiver.
        let receiver = admitted.as_ref().and_then(|_| state.receiver.take());
        drop(state);
        admitted.into_iter().chain(receiver).for_each(Waker::wake);
    }
}

enum Stage<T> {
    Unsent(T),
    Parked { ticket: u64 },
    Done,
}

/// The future of [`Sender::send`].
pub(crate) struct SendFuture<'s, T> {
    sender: &'s Sender<T>,
    deadline: Instant,
    stage: Stage<T>,
}

// The message is moved, never pinned.
impl<T> Unpin for SendFuture<'_, T> {}

impl<T: Send + 'static> Future for SendFuture<'_, T> {
    type Output = Result<(), SendError<T>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let shared = &self.sender.shared;
        match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Done => Poll::Ready(Ok(())),
            Stage::Unsent(message) => {
                let mut state = shared.lock();
                if state.closed {
                    return Poll::Ready(Err(SendError::Closed(message)));
                }
                if shared.has_room(&state) {
                    queue_and_wake(shared, state, message);
                    return Poll::Ready(Ok(()));
                }
                let ticket = state.next_ticket;
                state.next_ticket += 1;
                state.parked.push_back(
                    Parked {
                        ticket,
                        message,
                        waker: cx.waker().clone(),
                        deadline: self.deadline,
                    },
                    &shared.sweeper,
                );
                shared.mirror(&state);
                let sweep = !std::mem::replace(&mut state.swept, true);
                drop(state);
                if sweep {
                    let weak = Arc::downgrade(shared);
                    shared.sweeper.watch(Some(weak));
                } else if !shared.sweeper.running.load(Ordering::Acquire) {
                    // Listed, but the sweeping task is gone (its runtime
                    // shut down): start another.
                    shared.sweeper.watch::<T>(None);
                }
                self.stage = Stage::Parked { ticket };
                Poll::Pending
            }
            Stage::Parked { ticket } => {
                if shared.admitted.load(Ordering::Acquire) > ticket {
                    return Poll::Ready(Ok(()));
                }
                let mut state = shared.lock();
                if shared.admitted.load(Ordering::Acquire) > ticket {
                    return Poll::Ready(Ok(()));
                }
                let Some(index) = state.parked.find(ticket) else {
                    // Not admitted and not parked: cannot happen, as only
                    // this future removes its entry; report it delivered
                    // rather than wait for nothing.
                    return Poll::Ready(Ok(()));
                };
                let closed = state.closed;
                let expired = !closed && Instant::now() >= self.deadline;
                if closed || expired {
                    let parked = state.parked.remove(index, &shared.sweeper);
                    shared.mirror(&state);
                    drop(state);
                    return Poll::Ready(match parked {
                        Some(parked) if closed => Err(SendError::Closed(parked.message)),
                        _ => Err(SendError::Timeout),
                    });
                }
                if let Some(parked) = state.parked.get_mut(index) {
                    if !parked.waker.will_wake(cx.waker()) {
                        parked.waker = cx.waker().clone();
                    }
                }
                drop(state);
                if !shared.sweeper.running.load(Ordering::Acquire) {
                    // The sweeping task's runtime shut down (it woke us):
                    // start another on this one. The mailbox is still
                    // listed.
                    shared.sweeper.watch::<T>(None);
                }
                self.stage = Stage::Parked { ticket };
                Poll::Pending
            }
        }
    }
}

impl<T> Drop for SendFuture<'_, T> {
    fn drop(&mut self) {
        // Rule 7: a parked message not yet admitted goes with its sender.
        if let Stage::Parked { ticket } = self.stage {
            let shared = &self.sender.shared;
            if shared.admitted.load(Ordering::Acquire) > ticket {
                return;
            }
            let mut state = shared.lock();
            let removed = state
                .parked
                .find(ticket)
                .and_then(|index| state.parked.remove(index, &shared.sweeper));
            shared.mirror(&state);
            drop(state);
            drop(removed);
        }
    }
}

/// Moves `shared`'s queue to the back of `batch` and refills it from parked
/// senders (rule 3), then releases the lock and wakes them (through
/// `admitted`, made with the first admission and kept to reuse its
/// allocation until the receiver waits: rule 9).
#[expect(
    clippy::box_collection,
    reason = "one pointer in place instead of an empty collection's three words: the point is the room kept per live activation"
)]
fn take_all<T>(
    shared: &Shared<T>,
    mut state: MutexGuard<'_, State<T>>,
    batch: &mut VecDeque<T>,
    admitted: &mut Option<Box<Vec<Waker>>>,
) {
    if batch.is_empty() {
        // Swapped, so both deques keep their allocations.
        std::mem::swap(&mut state.queue, batch);
    } else {
        batch.append(&mut state.queue);
    }
    while let Some(sender) = shared.admit(&mut state) {
        admitted.get_or_insert_with(Box::default).push(sender);
    }
    drop(state);
    if let Some(admitted) = admitted {
        admitted.drain(..).for_each(Waker::wake);
    }
}

/// The receiver, having found the queue empty, waits: registers to be
/// woken, then rule 9: the room of its `batch`, if that is empty, moves to
/// the queue if the queue has none (a receiver taking one message at a
/// time passes no batch), and an empty parked list and the `admitted`
/// wakers are freed once the lock is released.
#[expect(
    clippy::box_collection,
    reason = "the receiver's own boxed room (`Receiver::admitted`), freed here"
)]
fn wait<T>(
    mut state: MutexGuard<'_, State<T>>,
    cx: &Context<'_>,
    batch: Option<&mut VecDeque<T>>,
    admitted: &mut Option<Box<Vec<Waker>>>,
) {
    match &mut state.receiver {
        Some(waker) if waker.will_wake(cx.waker()) => {}
        receiver => *receiver = Some(cx.waker().clone()),
    }
    if let Some(batch) = batch.filter(|batch| batch.is_empty()) {
        if state.queue.capacity() == 0 {
            std::mem::swap(&mut state.queue, batch);
        }
    }
    let parked = state.parked.release_if_empty();
    drop(state);
    drop(parked);
    *admitted = None;
}

/// The receiving end, held by the activation.
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
    /// Senders admitted by [`Receiver::try_recv_all`], woken after the
    /// lock is released; made when a sender is first admitted (most
    /// mailboxes never see one wait) and kept to reuse its allocation
    /// until the receiver waits (rule 9).
    #[expect(
        clippy::box_collection,
        reason = "one pointer in place instead of an empty collection's three words: the point is the room kept per live activation"
    )]
    admitted: Option<Box<Vec<Waker>>>,
}

impl<T> Receiver<T> {
    /// The oldest queued message, if any; frees its slot for the oldest
    /// parked sender (rule 3).
    pub(crate) fn try_recv(&mut self) -> Option<T> {
        let mut state = self.shared.lock();
        let message = state.queue.pop_front()?;
        let admitted = self.shared.admit(&mut state);
        drop(state);
        if let Some(sender) = admitted {
            sender.wake();
        }
        Some(message)
    }

    /// Moves every queued message to the back of `batch`, and fills the
    /// freed slots from the parked senders (rule 3); returns whether any
    /// message moved. One lock for the lot: the receiver of a busy mailbox
    /// works through a batch while senders refill the mailbox, so it holds
    /// at most twice its capacity (three times with the reentrant
    /// set-aside messages of `silo/mod.rs`'s rule 7).
    pub(crate) fn try_recv_all(&mut self, batch: &mut VecDeque<T>) -> bool {
        let state = self.shared.lock();
        if state.queue.is_empty() {
            return false;
        }
        take_all(&self.shared, state, batch, &mut self.admitted);
        true
    }

    /// [`Receiver::try_recv_all`], or else registers to be woken, in one
    /// lock. `Ready(false)`: the mailbox is closed and drained.
    pub(crate) fn poll_recv_all(
        &mut self,
        cx: &mut Context<'_>,
        batch: &mut VecDeque<T>,
    ) -> Poll<bool> {
        let state = self.shared.lock();
        if state.queue.is_empty() {
            if state.closed {
                return Poll::Ready(false);
            }
            wait(state, cx, Some(batch), &mut self.admitted);
            return Poll::Pending;
        }
        take_all(&self.shared, state, batch, &mut self.admitted);
        Poll::Ready(true)
    }

    /// The oldest queued message, waiting for one; `None` once the mailbox
    /// is closed and drained.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = self.shared.lock();
        if let Some(message) = state.queue.pop_front() {
            let admitted = self.shared.admit(&mut state);
            drop(state);
            if let Some(sender) = admitted {
                sender.wake();
            }
            return Poll::Ready(Some(message));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        wait(state, cx, None, &mut self.admitted);
        Poll::Pending
    }

    /// [`Receiver::poll_recv`] as a future.
    pub(crate) async fn recv(&mut self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Refuses new messages and hands parked ones back (rule 6).
    pub(crate) fn close(&mut self) {
        wake_all(self.shared.close());
    }

    /// Whether the mailbox is closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Takes messages again after [`Receiver::close`] (rule 6).
    pub(crate) fn reopen(&mut self) {
        wake_all(self.shared.reopen());
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.shared.lock().queue.is_empty()
    }

    /// The queue's room, for tests of rule 9.
    #[cfg(test)]
    pub(crate) fn queue_capacity(&self) -> usize {
        self.shared.lock().queue.capacity()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let woken = self.shared.close();
        let queued = std::mem::take(&mut self.shared.lock().queue);
        // Dropped messages may wake their callers: no lock held.
        drop(queued);
        wake_all(woken);
    }
}

/// A mailbox as the sweeper sees it.
trait Sweep: Send + Sync {
    /// Wakes the parked senders whose deadline is `now` or past; returns
    /// whether any sender is still parked (if not, the sweeper lets the
    /// mailbox go, and its next parked sender lists it again).
    fn sweep(&self, now: Instant) -> bool;

    /// Wakes every parked sender, to look at the sweeper again (its task
    /// is gone).
    fn wake_parked(&self);
}

impl<T: Send> Sweep for Shared<T> {
    fn sweep(&self, now: Instant) -> bool {
        let mut state = self.lock();
        let woken: Vec<Waker> = state
            .parked
            .iter()
            .filter(|parked| parked.deadline <= now)
            .map(|parked| parked.waker.clone())
            .collect();
        let keep = !state.parked.is_empty();
        state.swept = keep;
        drop(state);
        wake_all(woken);
        keep
    }

    fn wake_parked(&self) {
        let woken: Vec<Waker> = self
            .lock()
            .parked
            .iter()
            .map(|parked| parked.waker.clone())
            .collect();
        wake_all(woken);
    }
}

/// Marks the sweeper stopped when its task ends, also when the task is
/// dropped (its runtime shut down) or panics, so that the next parked
/// sender starts another. The list is taken only between two awaits, so it
/// is whole whenever the task can be dropped. A task that did not end on
/// its own wakes the senders still parked: each one polled on a runtime
/// that is still alive starts another sweeper there (rule 5), so senders
/// served by other runtimes still time out.
struct Ended(Option<Arc<Sweeper>>);

impl Drop for Ended {
    fn drop(&mut self) {
        if let Some(sweeper) = self.0.take() {
            let mut watched = sweeper
                .watched
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            watched.running = false;
            sweeper.running.store(false, Ordering::Release);
            let listed = watched.mailboxes.clone();
            drop(watched);
            for mailbox in listed.iter().filter_map(Weak::upgrade) {
                mailbox.wake_parked();
            }
        }
    }
}

/// Times out the parked senders of a silo's mailboxes (rule 5): one task,
/// running only while some sender is parked.
pub(crate) struct Sweeper {
    /// How often parked senders are checked: a sender times out at most
    /// this late.
    tick: Duration,
    watched: Mutex<Watched>,
    /// Mirrors `watched.running`, for a lock-free check.
    running: AtomicBool,
    /// Senders parked now in this silo's mailboxes (rule 10), counted
    /// under each mailbox's lock as its parked list grows and shrinks.
    waiting: AtomicUsize,
}

struct Watched {
    mailboxes: Vec<Weak<dyn Sweep>>,
    /// Whether the sweeping task is running.
    running: bool,
}

impl Sweeper {
    /// A sweeper that checks every `tick` (at least 1 ms).
    pub(crate) fn new(tick: Duration) -> Arc<Sweeper> {
        Arc::new(Sweeper {
            tick: tick.max(Duration::from_millis(1)),
            watched: Mutex::new(Watched {
                mailboxes: Vec::new(),
                running: false,
            }),
            running: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
        })
    }

    /// Senders parked now, waiting for room in this silo's mailboxes
    /// (rule 10).
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// A sender parked; called under its mailbox's lock, by
    /// `ParkedList::push_back` only.
    fn parked_one(&self) {
        self.waiting.fetch_add(1, Ordering::Relaxed);
    }

    /// A sender left the parked list (admitted, timed out, handed its
    /// message back or cancelled); called under its mailbox's lock, after
    /// the `parked_one` of the same sender, by `ParkedList`'s `pop_front`
    /// and `remove` only.
    fn unparked_one(&self) {
        self.waiting.fetch_sub(1, Ordering::Relaxed);
    }

    /// The tick for a silo whose calls time out after `timeout`: a
    /// twentieth of it, from 1 ms to 50 ms.
    pub(crate) fn tick_for(timeout: Duration) -> Duration {
        (timeout / 20).clamp(Duration::from_millis(1), Duration::from_millis(50))
    }

    fn watch<T: Send + 'static>(self: &Arc<Self>, mailbox: Option<Weak<Shared<T>>>) {
        let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(mailbox) = mailbox {
            watched.mailboxes.push(mailbox);
        }
        if watched.running {
            return;
        }
        // Parking happens in a task polled by tokio; without a runtime
        // there is nothing to sweep with, and the sender waits for room or
        // for the mailbox to close.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        watched.running = true;
        self.running.store(true, Ordering::Release);
        drop(watched);
        // The guard travels in the task: dropped with it, run or not.
        runtime.spawn(self.clone().run(Ended(Some(self.clone()))));
    }

    async fn run(self: Arc<Self>, mut ended: Ended) {
        let mut ticks = tokio::time::interval(self.tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let mailboxes = {
                let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
                if watched.mailboxes.is_empty() {
                    // Stopped under the lock that `watch` checks.
                    watched.running = false;
                    self.running.store(false, Ordering::Release);
                    ended.0 = None;
                    return;
                }
                std::mem::take(&mut watched.mailboxes)
            };
            let now = Instant::now();
            let kept: Vec<Weak<dyn Sweep>> = mailboxes
                .into_iter()
                .filter(|mailbox| mailbox.upgrade().is_some_and(|mailbox| mailbox.sweep(now)))
                .collect();
            let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
            watched.mailboxes.extend(kept);
        }
    }
}

#[cfg(all(test, loom))]
mod loom;
#[cfg(all(test, not(loom)))]
mod tests;
