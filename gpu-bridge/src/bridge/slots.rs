//! Where a ring request waits for its answer: one slot per ring entry, a
//! reusable answer buffer in each, and the waiting task's waker, so an
//! answer goes from the response ring to the caller with no channel and,
//! once warm, no allocation. The free slots are also the instance's
//! admission control: a call that finds none waits for one.
//!
//! # Rules
//!
//! 1. **Phases.** A slot is `Free`, `Waiting`, `Landed`, `Done`,
//!    `Abandoned` or `Orphaned`, and changes only under its lock:
//!    - [`Slots::claim`] makes a slot taken from the free queue `Waiting`
//!      with a fresh request id;
//!    - [`Slots::land`] copies an answer into a `Waiting` slot and makes it
//!      `Landed`, or frees an `Abandoned` one;
//!    - [`Slots::publish`] makes a `Landed` slot `Done` and wakes its
//!      waiter, or frees an `Orphaned` one;
//!    - a [`Ticket`] frees its `Done` slot once it has taken the answer;
//!      dropped first, it makes its `Waiting` slot `Abandoned` (the answer
//!      is still owed: the slot cannot be reused before it lands) and its
//!      `Landed` slot `Orphaned` (the answer is in and counted, only its
//!      publication is owed).
//!
//!    Every transition checks the request id, so a late or repeated answer
//!    for an id the slot no longer holds changes nothing. Only `Waiting`
//!    and `Abandoned` slots are owed an answer ([`Slots::pending`]), so an
//!    answer is landed, and counted, once.
//! 2. **Free means returned.** Whoever frees a slot pushes its index back
//!    to the free queue and, if a call waits for a slot, wakes one
//!    ([`Slots::take`]): a slot is reclaimed exactly once, by the ticket,
//!    by `land` or by `publish`. The slots in use are the requests in
//!    flight; no more than the ring holds can be, so the request ring
//!    cannot be full when the bridge submits (rule 1 of `instance.rs`).
//! 3. **Answers are copied once into the slot.** The answer's bytes are
//!    copied from the response ring into the slot's buffer, which keeps
//!    its capacity from request to request; the ticket hands them to the
//!    caller (who copies them into a fresh `Vec`, or its own buffer).
//!    Errors are stored as they are.
//! 4. **Counted, then seen.** Answers are landed a drain at a time; the
//!    drainer counts the drain (the broker, the metrics) and only then
//!    publishes it, so no caller sees an answer its counters do not show
//!    yet. Publishing stores `answered` (release, under the lock) and wakes
//!    the waiter once after the lock is released: the ticket's own waker,
//!    or, for a request of a [`Group`], the group's, when the group's last
//!    answer is published.
//! 5. **Spinning is bounded.** A ticket may spin on `answered` for a
//!    budget before it registers its waker, serving the response ring
//!    itself meanwhile (`instance.rs` rules 8 and 10); it always checks
//!    again after registering, under the lock, so an answer published in
//!    between is never missed.
//! 6. **Groups.** A request of a [`Group`] has no ticket: its answer lands
//!    in the group's buffer (by member number) and its slot is freed at
//!    once; the group is told at publication. A group counts its members
//!    before any is claimed, and a member that never reaches the ring is
//!    put and told at once, so the group is done exactly when every member
//!    has its answer. A group dropped before its answers land loses
//!    nothing: they land in it and free their slots all the same.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use super::error::ExecuteError;

/// Bits of a request id that hold the slot index (`instance.rs` rule 2).
pub(crate) const INDEX_BITS: u32 = 20;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;

/// Whether `request_id`'s sequence came before `cutoff`, a sequence
/// counter that runs on past 2^44 while the ids keep its low 44 bits: the
/// ids in flight at once span far less than half of that range, so the
/// distance back from `cutoff`, taken modulo 2^44, orders them across the
/// wrap (`instance.rs` rule 2).
pub(crate) fn sequence_before(request_id: u64, cutoff: u64) -> bool {
    const SEQUENCE_MASK: u64 = u64::MAX >> INDEX_BITS;
    let behind = cutoff.wrapping_sub(request_id >> INDEX_BITS) & SEQUENCE_MASK;
    behind != 0 && behind <= SEQUENCE_MASK / 2
}

/// The slot index a request id names.
pub(crate) fn index_of(request_id: u64) -> usize {
    (request_id & INDEX_MASK) as usize
}

/// What a waiter does with its answer, lent from the slot.
type Take<'a> = dyn FnMut(Result<&[u8], ExecuteError>) + 'a;

/// A slot's phase (rule 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Free,
    Waiting,
    Landed,
    Done,
    Abandoned,
    Orphaned,
}

/// Requests of one [`execute_many`](crate::GpuBridge::execute_many) call
/// (rule 6): their answers land straight in the group, which is woken once,
/// when the last is published.
#[derive(Debug)]
pub(crate) struct Group {
    /// Members not yet answered.
    remaining: AtomicUsize,
    waker: AtomicWaker,
    answers: Mutex<Answers>,
}

/// A group's answers, by member.
#[derive(Debug, Default)]
struct Answers {
    /// Every answer's bytes, in the order they landed.
    bytes: Vec<u8>,
    /// Each member's answer: where its bytes are, or its error; `None`
    /// until it lands.
    members: Vec<Option<Result<(usize, usize), ExecuteError>>>,
}

impl Group {
    /// A group of `members` requests, numbered from 0, all counted as
    /// unanswered (rule 6), with room for `answer_bytes` bytes of answers
    /// (a first guess: more fit).
    pub(crate) fn new(members: usize, answer_bytes: usize) -> Group {
        Group {
            remaining: AtomicUsize::new(members),
            waker: AtomicWaker::new(),
            answers: Mutex::new(Answers {
                bytes: Vec::with_capacity(answer_bytes),
                members: vec![None; members],
            }),
        }
    }

    /// Records member `member`'s answer; the group is told at publication.
    fn put(&self, member: usize, outcome: Result<&[u8], ExecuteError>) {
        let mut answers = lock(&self.answers);
        let entry = match outcome {
            Ok(bytes) => {
                let start = answers.bytes.len();
                answers.bytes.extend_from_slice(bytes);
                Ok((start, bytes.len()))
            }
            Err(err) => Err(err),
        };
        if let Some(slot) = answers.members.get_mut(member) {
            *slot = Some(entry);
        }
    }

    /// Member `member` never reached the ring: its error is put and told
    /// at once (rule 6).
    pub(crate) fn refuse(&self, member: usize, error: ExecuteError) {
        self.put(member, Err(error));
        self.arrive(1);
    }

    /// Once the group is done: every member's answer, taken out of the
    /// group under one lock (not one per member).
    pub(crate) fn answers(&self) -> GroupAnswers {
        let mut answers = lock(&self.answers);
        GroupAnswers(std::mem::take(&mut *answers))
    }

    /// Whether every member has its answer.
    pub(crate) fn is_done(&self) -> bool {
        self.remaining.load(Ordering::Acquire) == 0
    }

    /// Waits for the group's last answer.
    pub(crate) fn poll_done(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_done() {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.is_done() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn arrive(&self, count: usize) {
        if self.remaining.fetch_sub(count, Ordering::AcqRel) == count {
            self.waker.wake();
        }
    }
}

/// A done group's answers, out of its lock ([`Group::answers`]).
#[derive(Debug)]
pub(crate) struct GroupAnswers(Answers);

impl GroupAnswers {
    /// Member `member`'s answer, given to `take`; taken once.
    pub(crate) fn take<T>(
        &mut self,
        member: usize,
        take: impl FnOnce(Result<&[u8], ExecuteError>) -> T,
    ) -> T {
        let Answers { bytes, members } = &mut self.0;
        match members.get_mut(member).and_then(Option::take) {
            Some(Ok((start, len))) => match bytes.get(start..start + len) {
                Some(answer) => take(Ok(answer)),
                // Cannot happen: `put` records the range it appended.
                None => take(Err(ExecuteError::ShutDown)),
            },
            Some(Err(err)) => take(Err(err)),
            // Cannot happen once the group is done: every member is either
            // answered or refused before the count reaches zero.
            None => take(Err(ExecuteError::ShutDown)),
        }
    }
}

/// Who waits for a slot's answer.
enum Waiter {
    Task(Option<Waker>),
    /// A group, and the request's member number in it.
    Group(Arc<Group>, usize),
}

struct Slot {
    request_id: u64,
    phase: Phase,
    started: Instant,
    probe: bool,
    waiter: Waiter,
    /// The answer's bytes (rule 3).
    bytes: Vec<u8>,
    /// The answer, when it is an error.
    error: Option<ExecuteError>,
}

struct Cell {
    slot: Mutex<Slot>,
    /// The id of the last request answered in this slot (rule 4).
    answered: AtomicU64,
}

/// Answers landed and not yet published (rule 4), kept between drains so
/// that a drain allocates nothing once warm.
#[derive(Default)]
pub(crate) struct Landing {
    /// Requests whose tickets wait.
    ids: Vec<u64>,
    /// Groups with answers landed, and how many (runs of one group
    /// merged).
    groups: Vec<(Arc<Group>, usize)>,
}

/// The request an answer is for, as [`Slots::land`] shows it to its
/// accounting.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Answering {
    /// When its slot was claimed.
    pub(crate) started: Instant,
    /// Whether it is a health probe.
    pub(crate) probe: bool,
}

/// Why [`Slots::take`] gave no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoSlot {
    /// None came free before the deadline.
    TimedOut,
    /// The slots were closed: the instance stopped.
    Closed,
}

/// How often a call waiting for slots looks again even unwoken: a group
/// waits for several, and a wake-up goes to one waiter.
const RECHECK: Duration = Duration::from_millis(1);

/// The slot table.
pub(crate) struct Slots {
    cells: Box<[Cell]>,
    free: ArrayQueue<u32>,
    /// Calls waiting for a free slot (rule 2).
    waiting: AtomicUsize,
    room: Notify,
    closed: AtomicBool,
    /// Held by the one group gathering slots one by one ([`Slots::take`]).
    gathering: tokio::sync::Mutex<()>,
}

/// Slots a waiting call has gathered: given back unless they are handed
/// over (a failed or dropped wait).
struct Gathered<'a> {
    slots: &'a Slots,
    indices: Vec<u32>,
}

impl Drop for Gathered<'_> {
    fn drop(&mut self) {
        for index in self.indices.drain(..) {
            self.slots.give_back(index);
        }
    }
}

/// A caller counted in a gauge while it waits: for a slot (`waiting`), or
/// for device memory (the bridge's `memory_waiters`).
pub(super) struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    pub(super) fn enter(count: &'a AtomicUsize) -> Waiting<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Slots {
    /// `capacity` free slots, each buffer ready for `answer_bytes`.
    pub(crate) fn new(capacity: usize, answer_bytes: usize) -> Slots {
        let free = ArrayQueue::new(capacity);
        for index in 0..capacity as u32 {
            // Cannot fail: the queue holds `capacity` entries.
            let _ = free.push(index);
        }
        let now = Instant::now();
        Slots {
            cells: (0..capacity)
                .map(|_| Cell {
                    slot: Mutex::new(Slot {
                        request_id: u64::MAX,
                        phase: Phase::Free,
                        started: now,
                        probe: false,
                        waiter: Waiter::Task(None),
                        bytes: Vec::with_capacity(answer_bytes),
                        error: None,
                    }),
                    answered: AtomicU64::new(u64::MAX),
                })
                .collect(),
            free,
            waiting: AtomicUsize::new(0),
            room: Notify::new(),
            closed: AtomicBool::new(false),
            gathering: tokio::sync::Mutex::new(()),
        }
    }

    /// Slots in use: requests in flight, answers not yet taken.
    pub(crate) fn in_use(&self) -> usize {
        self.cells.len() - self.free.len()
    }

    /// A free slot's index, if one is free now.
    pub(crate) fn try_take(&self) -> Option<u32> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        self.free.pop()
    }

    /// `count` free slots' indices into `into`, all or none.
    fn try_take_many(&self, count: usize, into: &mut Vec<u32>) -> bool {
        if self.closed.load(Ordering::Acquire) || self.free.len() < count {
            return false;
        }
        let start = into.len();
        for _ in 0..count {
            match self.free.pop() {
                Some(index) => into.push(index),
                None => {
                    // Another call took some meanwhile: give these back.
                    for index in into.drain(start..) {
                        self.give_back(index);
                    }
                    return false;
                }
            }
        }
        true
    }

    /// Rule 2: `count` free slots (one for a single call), waiting until
    /// `deadline` for them. A group that cannot have all its slots at once
    /// gathers them as they come free, keeping what it has; one group
    /// gathers at a time (`gathering`), so two cannot each hold part of the
    /// table waiting for the rest, and single calls, which take any free
    /// slot, cannot starve it. Out of time, it gives back what it gathered.
    pub(crate) async fn take(
        &self,
        count: usize,
        deadline: Instant,
        into: &mut Vec<u32>,
    ) -> Result<(), NoSlot> {
        if self.try_take_many(count, into) {
            return Ok(());
        }
        let gate = if count > 1 {
            match tokio::time::timeout_at(deadline.into(), self.gathering.lock()).await {
                Ok(gate) => Some(gate),
                Err(_) => return Err(self.no_slot()),
            }
        } else {
            None
        };
        // Slots gathered so far go back if the wait fails or the call is
        // dropped while it waits.
        let mut gathered = Gathered {
            slots: self,
            indices: Vec::with_capacity(count),
        };
        self.gather(count, deadline, &mut gathered.indices, gate.is_some())
            .await?;
        into.append(&mut gathered.indices);
        Ok(())
    }

    /// [`Slots::take`]'s wait: looks, then sleeps until a slot is given
    /// back (or [`RECHECK`] passes), until `into` holds `count` new slots.
    /// `gathering`: keep slots one by one (a group holding the gate);
    /// otherwise take all at once.
    async fn gather(
        &self,
        count: usize,
        deadline: Instant,
        into: &mut Vec<u32>,
        gathering: bool,
    ) -> Result<(), NoSlot> {
        let look = |into: &mut Vec<u32>| {
            if self.closed.load(Ordering::Acquire) {
                return false;
            }
            if gathering {
                while into.len() < count {
                    match self.free.pop() {
                        Some(index) => into.push(index),
                        None => return false,
                    }
                }
                true
            } else {
                self.try_take_many(count, into)
            }
        };
        loop {
            if look(into) {
                return Ok(());
            }
            if self.closed.load(Ordering::Acquire) || Instant::now() >= deadline {
                return Err(self.no_slot());
            }
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Counted before the second look, which a release's wake-up
            // then cannot miss (it reads the count after its push); the
            // guard uncounts it however the wait ends, a dropped call too.
            let waiting = Waiting::enter(&self.waiting);
            if look(into) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !left.is_zero() && !self.closed.load(Ordering::Acquire) {
                let _ = tokio::time::timeout(left.min(RECHECK), notified).await;
            }
            drop(waiting);
        }
    }

    fn no_slot(&self) -> NoSlot {
        if self.closed.load(Ordering::Acquire) {
            NoSlot::Closed
        } else {
            NoSlot::TimedOut
        }
    }

    /// Rule 2: a slot is free again.
    pub(crate) fn give_back(&self, index: u32) {
        // Cannot fail: the index was taken from this queue.
        let _ = self.free.push(index);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.room.notify_one();
        }
    }

    /// No more slots are given out; waiting calls fail with `Closed`.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.room.notify_waiters();
    }

    /// Rule 1: makes slot `index` (taken from the free queue) hold request
    /// `sequence`, started at `started`. Returns the request id.
    pub(crate) fn claim(
        &self,
        index: u32,
        sequence: u64,
        started: Instant,
        probe: bool,
        group: Option<(&Arc<Group>, usize)>,
    ) -> u64 {
        let request_id = (sequence << INDEX_BITS) | u64::from(index);
        let mut slot = lock(&self.cells[index as usize].slot);
        slot.request_id = request_id;
        slot.phase = Phase::Waiting;
        slot.started = started;
        slot.probe = probe;
        slot.waiter = match group {
            Some((group, member)) => Waiter::Group(group.clone(), member),
            None => Waiter::Task(None),
        };
        slot.error = None;
        request_id
    }

    /// Rules 1–4 and 6: the answer to `request_id` lands: `Ok` with the
    /// kernel's bytes, or an error. `account` sees it first, under the
    /// slot's lock; a kept answer is remembered in `landing` for
    /// [`Slots::publish`].
    pub(crate) fn land(
        &self,
        request_id: u64,
        outcome: Result<&[u8], ExecuteError>,
        landing: &mut Landing,
        account: impl FnOnce(Answering, Result<(), &ExecuteError>),
    ) {
        let Some(cell) = self.cells.get(index_of(request_id)) else {
            return;
        };
        let mut slot = lock(&cell.slot);
        if slot.request_id != request_id {
            return;
        }
        let answering = Answering {
            started: slot.started,
            probe: slot.probe,
        };
        match slot.phase {
            Phase::Waiting => {}
            Phase::Abandoned => {
                account(answering, outcome.as_ref().map(|_| ()));
                slot.phase = Phase::Free;
                slot.waiter = Waiter::Task(None);
                drop(slot);
                self.give_back(index_of(request_id) as u32);
                return;
            }
            Phase::Free | Phase::Landed | Phase::Done | Phase::Orphaned => return,
        }
        account(answering, outcome.as_ref().map(|_| ()));
        if let Waiter::Group(group, member) = &slot.waiter {
            // Rule 6: straight into the group; the slot is done with.
            group.put(*member, outcome);
            match landing.groups.last_mut() {
                Some((last, count)) if Arc::ptr_eq(last, group) => *count += 1,
                _ => landing.groups.push((group.clone(), 1)),
            }
            slot.phase = Phase::Free;
            slot.waiter = Waiter::Task(None);
            drop(slot);
            self.give_back(index_of(request_id) as u32);
            return;
        }
        slot.bytes.clear();
        match outcome {
            Ok(bytes) => slot.bytes.extend_from_slice(bytes),
            Err(error) => slot.error = Some(error),
        }
        slot.phase = Phase::Landed;
        landing.ids.push(request_id);
    }

    /// Rule 4: makes every landed answer visible and wakes its waiter
    /// (tells each group once for all its answers); frees the slots of
    /// answers whose tickets were dropped after they landed.
    pub(crate) fn publish(&self, landing: &mut Landing) {
        for request_id in landing.ids.drain(..) {
            let Some(cell) = self.cells.get(index_of(request_id)) else {
                continue;
            };
            let mut slot = lock(&cell.slot);
            if slot.request_id != request_id {
                continue;
            }
            match slot.phase {
                Phase::Landed => {}
                Phase::Orphaned => {
                    slot.phase = Phase::Free;
                    slot.waiter = Waiter::Task(None);
                    slot.error = None;
                    drop(slot);
                    self.give_back(index_of(request_id) as u32);
                    continue;
                }
                Phase::Free | Phase::Waiting | Phase::Done | Phase::Abandoned => continue,
            }
            slot.phase = Phase::Done;
            cell.answered.store(request_id, Ordering::Release);
            let waker = match &mut slot.waiter {
                Waiter::Task(waker) => waker.take(),
                Waiter::Group(..) => None,
            };
            drop(slot);
            if let Some(waker) = waker {
                waker.wake();
            }
        }
        for (group, count) in landing.groups.drain(..) {
            group.arrive(count);
        }
    }

    /// Whether `request_id` is still owed its answer (rule 1).
    pub(crate) fn is_pending(&self, request_id: u64) -> bool {
        self.cells.get(index_of(request_id)).is_some_and(|cell| {
            let slot = lock(&cell.slot);
            slot.request_id == request_id && matches!(slot.phase, Phase::Waiting | Phase::Abandoned)
        })
    }

    /// The ids of every request still owed an answer (rule 1).
    pub(crate) fn pending(&self) -> Vec<u64> {
        self.cells
            .iter()
            .filter_map(|cell| {
                let slot = lock(&cell.slot);
                matches!(slot.phase, Phase::Waiting | Phase::Abandoned).then_some(slot.request_id)
            })
            .collect()
    }

    /// Rule 4: whether `request_id`'s answer is published, without the
    /// lock.
    fn is_answered(&self, request_id: u64) -> bool {
        self.cells
            .get(index_of(request_id))
            .is_some_and(|cell| cell.answered.load(Ordering::Acquire) == request_id)
    }

    /// Rules 1 and 3: `Ready` once the answer is published and handed to
    /// `take` (exactly once); the slot is then free.
    fn poll_take(&self, request_id: u64, cx: &mut Context<'_>, take: &mut Take<'_>) -> Poll<()> {
        let Some(cell) = self.cells.get(index_of(request_id)) else {
            take(Err(ExecuteError::ShutDown));
            return Poll::Ready(());
        };
        let mut slot = lock(&cell.slot);
        if slot.request_id != request_id {
            // Cannot happen: a ticket's slot is reclaimed only by the
            // ticket once it is `Done` (rule 1).
            take(Err(ExecuteError::ShutDown));
            return Poll::Ready(());
        }
        match slot.phase {
            Phase::Done => {}
            Phase::Waiting | Phase::Landed => {
                if let Waiter::Task(waker) = &mut slot.waiter {
                    match waker {
                        Some(waker) if waker.will_wake(cx.waker()) => {}
                        _ => *waker = Some(cx.waker().clone()),
                    }
                }
                return Poll::Pending;
            }
            // Cannot happen: only the ticket itself abandons its slot.
            Phase::Free | Phase::Abandoned | Phase::Orphaned => {
                take(Err(ExecuteError::ShutDown));
                return Poll::Ready(());
            }
        }
        let outcome = match slot.error.take() {
            Some(error) => Err(error),
            None => Ok(slot.bytes.as_slice()),
        };
        take(outcome);
        slot.phase = Phase::Free;
        slot.waiter = Waiter::Task(None);
        drop(slot);
        self.give_back(index_of(request_id) as u32);
        Poll::Ready(())
    }

    /// A ticket dropped before it took its answer (rule 1).
    fn release(&self, request_id: u64) {
        let Some(cell) = self.cells.get(index_of(request_id)) else {
            return;
        };
        let mut slot = lock(&cell.slot);
        if slot.request_id != request_id {
            return;
        }
        match slot.phase {
            Phase::Waiting => slot.phase = Phase::Abandoned,
            Phase::Landed => slot.phase = Phase::Orphaned,
            Phase::Done => {
                slot.phase = Phase::Free;
                slot.waiter = Waiter::Task(None);
                slot.error = None;
                drop(slot);
                self.give_back(index_of(request_id) as u32);
            }
            Phase::Free | Phase::Abandoned | Phase::Orphaned => {}
        }
    }
}

/// What serves a slot's answers: the instance that owns the slots.
pub(crate) trait Owner {
    /// The slot table.
    fn slots(&self) -> &Slots;
    /// How long a single request's ticket may spin before it parks
    /// (rule 5).
    fn spin_budget(&self) -> Duration;
    /// Spins up to `budget` until `done`, serving the response ring
    /// meanwhile, for a call holding `own` slots; returns whether `done`
    /// (rule 5).
    fn spin_wait(&self, budget: Duration, own: usize, done: &dyn Fn() -> bool) -> bool;
    /// A waiter parks (returns `Pending`, its waker registered): someone
    /// must serve the ring, and the waiter may land what is ready first.
    /// Returns whether it landed any answers (its own may be among them).
    fn parking(&self) -> bool;
}

/// A claim on one slot's answer. Dropped before the answer is taken, it
/// abandons the slot (rule 1), which the answer then frees.
pub(crate) struct Ticket<'a, O: Owner + ?Sized> {
    owner: &'a O,
    request_id: u64,
    taken: bool,
    spin: Option<Duration>,
}

impl<'a, O: Owner + ?Sized> Ticket<'a, O> {
    pub(crate) fn new(owner: &'a O, request_id: u64) -> Ticket<'a, O> {
        Ticket {
            owner,
            request_id,
            taken: false,
            spin: None,
        }
    }

    /// `Ready` once the answer is in and handed to `take`. The first poll
    /// may spin (rule 5); later ones do not.
    fn poll_take(&mut self, cx: &mut Context<'_>, take: &mut Take<'_>) -> Poll<()> {
        if self.taken {
            take(Err(ExecuteError::ShutDown));
            return Poll::Ready(());
        }
        if self.spin.is_none() {
            let spin = self.owner.spin_budget();
            self.spin = Some(spin);
            if !spin.is_zero() {
                let slots = self.owner.slots();
                let request_id = self.request_id;
                self.owner
                    .spin_wait(spin, 1, &|| slots.is_answered(request_id));
            }
        }
        let mut polled = self.owner.slots().poll_take(self.request_id, cx, take);
        // The waiter may land its own answer while it parks: it looks once
        // more and takes it now (the landing woke the task too; that later
        // poll finds nothing to do).
        if polled.is_pending() && self.owner.parking() {
            polled = self.owner.slots().poll_take(self.request_id, cx, take);
        }
        if polled.is_ready() {
            self.taken = true;
        }
        polled
    }

    /// Waits for the answer and copies it into a fresh `Vec`.
    pub(crate) async fn answer(self) -> Result<Vec<u8>, ExecuteError> {
        self.take(|outcome| outcome.map(<[u8]>::to_vec)).await
    }

    /// Waits for the answer and gives it to `take`, straight from the slot.
    pub(crate) async fn take<T>(
        mut self,
        take: impl FnOnce(Result<&[u8], ExecuteError>) -> T,
    ) -> T {
        let mut take = Some(take);
        let mut answer = None;
        std::future::poll_fn(|cx| {
            let polled = self.poll_take(cx, &mut |outcome| {
                if let Some(take) = take.take() {
                    answer = Some(take(outcome));
                }
            });
            match (polled, answer.take()) {
                (Poll::Ready(()), Some(answer)) => Poll::Ready(answer),
                // Cannot be `Ready` without an answer: `take` is handed the
                // outcome exactly once, when the poll is ready.
                _ => Poll::Pending,
            }
        })
        .await
    }
}

impl<O: Owner + ?Sized> Drop for Ticket<'_, O> {
    fn drop(&mut self) {
        if !self.taken {
            self.owner.slots().release(self.request_id);
        }
    }
}

/// Locks a slot, ignoring poison: every critical section leaves the slot
/// consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_are_ordered_across_the_44_bit_wrap() {
        let id = |sequence: u64, index: u64| (sequence << INDEX_BITS) | index;
        let wrap = 1u64 << 44;
        // Plainly before and after.
        assert!(sequence_before(id(5, 3), 9));
        assert!(!sequence_before(id(9, 3), 9));
        assert!(!sequence_before(id(10, 3), 9));
        // The counter has passed 2^44: an id sent just before the wrap is
        // before the cutoff, one sent just after it (its field reads 2) is
        // not, though 2 < the cutoff's raw value.
        let cutoff = wrap + 5;
        assert!(sequence_before(id(wrap - 1, 7), cutoff));
        assert!(sequence_before(id(wrap + 4, 7), cutoff));
        assert!(!sequence_before(id(wrap + 5, 7), cutoff));
        assert!(!sequence_before(id(wrap + 6, 7), cutoff));
    }
}
