//! The producing side: [`Producer`] (many, MPSC) and [`SpscProducer`] (one).
//!
//! Both write payloads straight into slot memory, either from a slice
//! (`try_push`) or through a [`WriteChunk`] that hands out the slots' bytes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{PayloadTooLarge, PushError, ReserveError, TryPushError};
use crate::layout::{LayoutInfo, SLOT_FLAG_SKIP, TAIL_CLOSED_BIT};
use crate::loom::{Ordering, WriteGuard};
use crate::ring::{Shared, SlotMeta, View};
use crate::wait::{WaitPolicy, Waiting};

/// Copies `bytes` and the metadata into the slot for `position`.
///
/// # Safety
/// The caller holds the slot (claimed, not published) and `bytes.len()` is at
/// most `view.max_payload()`.
#[inline(always)]
unsafe fn write_message(view: &View, position: u64, request_id: u64, bytes: &[u8]) {
    let _access = view.tracker(position).writing();
    let meta = SlotMeta {
        request_id,
        len: bytes.len() as u32,
        status: 0,
        flags: 0,
    };
    // SAFETY: the slot is held, so nobody else touches its bytes; the length
    // fits by the caller's check; source and slot cannot overlap because the
    // caller's slice is not inside a slot this producer holds unpublished.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), view.payload_ptr(position), bytes.len());
        view.write_meta(position, meta);
    }
}

/// Runs `try_push` under `policy` until it enqueues, the ring closes, or
/// `timeout` passes.
fn push_blocking<P: AsRef<[u8]>>(
    shared: &Shared,
    mut payload: P,
    policy: &WaitPolicy,
    timeout: Option<Duration>,
    mut try_push: impl FnMut(P) -> Result<(), TryPushError<P>>,
) -> Result<(), PushError<P>> {
    let mut waiting = Waiting::new(policy, timeout);
    let capacity = shared.view.capacity() as usize;
    loop {
        payload = match try_push(payload) {
            Ok(()) => return Ok(()),
            Err(TryPushError::Full(payload)) => payload,
            Err(TryPushError::Closed(payload)) => return Err(PushError::Closed(payload)),
            Err(TryPushError::PayloadTooLarge { len, max, payload }) => {
                return Err(PushError::PayloadTooLarge { len, max, payload });
            }
        };
        let still_full = || !shared.is_closed() && shared.len() >= capacity;
        if !waiting.step(
            &shared.not_full,
            shared.view.producer_heartbeat(),
            still_full,
        ) {
            return Err(PushError::Timeout(payload));
        }
    }
}

/// The most a slot holds, if `bytes` is longer. A push takes its payload's
/// bytes once (`AsRef::as_ref`), checks them here, and copies those same
/// bytes: a second `as_ref` could answer a longer slice than the one
/// checked (a safe impl may), and would run caller code while a claimed
/// slot waits to be published.
fn too_large(view: &View, bytes: &[u8]) -> Option<usize> {
    let max = view.max_payload();
    (bytes.len() > max).then_some(max)
}

enum ClaimError {
    Full,
    Closed,
}

/// A producer on an MPSC ring. Clone it for each producing thread.
#[derive(Clone)]
pub struct Producer {
    shared: Arc<Shared>,
}

impl Producer {
    pub(crate) fn new(shared: Arc<Shared>) -> Producer {
        Producer { shared }
    }

    /// Enqueues `payload` with request id 0 if a slot is free.
    #[inline]
    pub fn try_push<P: AsRef<[u8]>>(&self, payload: P) -> Result<(), TryPushError<P>> {
        self.try_push_with(0, payload)
    }

    /// Enqueues `payload` tagged with `request_id` if a slot is free. Never
    /// blocks; a refused payload comes back in the error.
    #[inline]
    pub fn try_push_with<P: AsRef<[u8]>>(
        &self,
        request_id: u64,
        payload: P,
    ) -> Result<(), TryPushError<P>> {
        let view = &self.shared.view;
        let bytes = payload.as_ref();
        if let Some(max) = too_large(view, bytes) {
            let len = bytes.len();
            return Err(TryPushError::PayloadTooLarge { len, max, payload });
        }
        let position = match self.claim(1) {
            Ok(position) => position,
            Err(ClaimError::Full) => return Err(TryPushError::Full(payload)),
            Err(ClaimError::Closed) => return Err(TryPushError::Closed(payload)),
        };
        // SAFETY: `claim` gave us the slot for `position`; `too_large`
        // checked the length of these very bytes.
        unsafe { write_message(view, position, request_id, bytes) };
        // Rule M3: publish. Pairs with the consumer's acquire load.
        view.sequence(position)
            .store(position + 1, Ordering::Release);
        self.shared.not_empty.wake_if_parked();
        Ok(())
    }

    /// Enqueues `payload` with request id 0, waiting per `policy` while the
    /// ring is full, for at most `timeout` (`None` waits until the ring
    /// closes).
    pub fn push<P: AsRef<[u8]>>(
        &self,
        payload: P,
        policy: &WaitPolicy,
        timeout: Option<Duration>,
    ) -> Result<(), PushError<P>> {
        self.push_with(0, payload, policy, timeout)
    }

    /// [`Producer::push`] with a request id.
    pub fn push_with<P: AsRef<[u8]>>(
        &self,
        request_id: u64,
        payload: P,
        policy: &WaitPolicy,
        timeout: Option<Duration>,
    ) -> Result<(), PushError<P>> {
        push_blocking(&self.shared, payload, policy, timeout, |p| {
            self.try_push_with(request_id, p)
        })
    }

    /// Reserves `count` consecutive slots, all or nothing, to fill in place.
    /// Dropping the chunk without [`WriteChunk::commit`] publishes its slots
    /// as skipped, so the consumer never waits on them.
    ///
    /// A chunk that is leaked (`mem::forget`) never publishes its slots, and
    /// the consumer stops at the first of them for good: the ring is sound
    /// but stuck, and never reports `Closed`. Do not leak chunks.
    pub fn try_reserve(&self, count: usize) -> Result<WriteChunk<'_>, ReserveError> {
        let view = &self.shared.view;
        let capacity = view.capacity() as usize;
        if count == 0 || count > capacity {
            return Err(ReserveError::BadCount {
                requested: count,
                capacity,
            });
        }
        match self.claim(count as u64) {
            Ok(start) => Ok(WriteChunk::new(&self.shared, start, count, Publish::Mpsc)),
            Err(ClaimError::Full) => Err(ReserveError::Full { requested: count }),
            Err(ClaimError::Closed) => Err(ReserveError::Closed),
        }
    }

    /// Rules M1–M2: claims `count` consecutive positions by advancing `tail`
    /// with a compare-and-swap, after checking that each slot is free.
    #[inline]
    fn claim(&self, count: u64) -> Result<u64, ClaimError> {
        let view = &self.shared.view;
        let mut tail = view.tail().load(Ordering::Relaxed);
        'retry: loop {
            if tail & TAIL_CLOSED_BIT != 0 {
                return Err(ClaimError::Closed);
            }
            for offset in 0..count {
                let position = tail + offset;
                let sequence = view.sequence(position).load(Ordering::Acquire);
                let lag = sequence.wrapping_sub(position) as i64;
                if lag < 0 {
                    // The slot still holds the message from one lap ago.
                    return Err(ClaimError::Full);
                }
                if lag > 0 {
                    // Another producer claimed this position: our tail is
                    // stale. That claim happened before the store we just
                    // acquired, so a reload must move; if it does not, the
                    // sequence is corrupt and the ring is reported full
                    // rather than spun on.
                    let reloaded = view.tail().load(Ordering::Relaxed);
                    if reloaded == tail {
                        return Err(ClaimError::Full);
                    }
                    tail = reloaded;
                    continue 'retry;
                }
            }
            match view.tail().compare_exchange_weak(
                tail,
                tail + count,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(tail),
                Err(current) => tail = current,
            }
        }
    }

    /// Closes the ring. Pushes that start afterwards fail with `Closed`; a
    /// push that raced with `close` either failed or was enqueued (the
    /// closed bit and the claim live in one word, `tail`). The consumer
    /// drains what was enqueued, then sees `Closed`. Wakes every waiter.
    pub fn close(&self) {
        self.shared.close();
    }

    /// Whether the ring has been closed.
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    /// The consumer's heartbeat (rule H1): how a producer on the host watches
    /// a device consumer's liveness.
    pub fn consumer_heartbeat(&self) -> u64 {
        self.shared
            .view
            .consumer_heartbeat()
            .load(Ordering::Relaxed)
    }

    /// Advances the producer heartbeat, for a producing loop that wants to
    /// show it is alive while idle.
    pub fn beat(&self) {
        self.shared
            .view
            .producer_heartbeat()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The ring's geometry.
    pub fn layout(&self) -> LayoutInfo {
        self.shared.view.info
    }
}

impl fmt::Debug for Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("layout", &self.shared.view.info)
            .finish_non_exhaustive()
    }
}

/// The single producer of an SPSC ring. Caches the consumer's index as rtrb
/// does, so a push reads the shared `head` only when the ring looks full.
pub struct SpscProducer {
    shared: Arc<Shared>,
    /// Next position to write; equals the shared `tail` between calls.
    tail: u64,
    /// Last `head` seen; at most the true head, so free space is never
    /// overestimated.
    cached_head: u64,
}

impl SpscProducer {
    pub(crate) fn new(shared: Arc<Shared>) -> SpscProducer {
        let tail = shared.view.tail().load(Ordering::Acquire);
        let cached_head = shared.view.head().load(Ordering::Acquire);
        SpscProducer {
            shared,
            tail,
            cached_head,
        }
    }

    /// Rule S1: whether `count` slots are free, refreshing the cached head
    /// only when the cached value says no.
    #[inline(always)]
    fn has_room(&mut self, count: u64) -> bool {
        let capacity = self.shared.view.capacity();
        if self
            .tail
            .wrapping_sub(self.cached_head)
            .saturating_add(count)
            <= capacity
        {
            return true;
        }
        self.cached_head = self.shared.view.head().load(Ordering::Acquire);
        self.tail
            .wrapping_sub(self.cached_head)
            .saturating_add(count)
            <= capacity
    }

    /// Enqueues `payload` with request id 0 if a slot is free.
    #[inline]
    pub fn try_push<P: AsRef<[u8]>>(&mut self, payload: P) -> Result<(), TryPushError<P>> {
        self.try_push_with(0, payload)
    }

    /// Enqueues `payload` tagged with `request_id` if a slot is free.
    #[inline]
    pub fn try_push_with<P: AsRef<[u8]>>(
        &mut self,
        request_id: u64,
        payload: P,
    ) -> Result<(), TryPushError<P>> {
        let bytes = payload.as_ref();
        if let Some(max) = too_large(&self.shared.view, bytes) {
            let len = bytes.len();
            return Err(TryPushError::PayloadTooLarge { len, max, payload });
        }
        if self.shared.view.closed().load(Ordering::Relaxed) != 0 {
            return Err(TryPushError::Closed(payload));
        }
        if !self.has_room(1) {
            return Err(TryPushError::Full(payload));
        }
        let position = self.tail;
        // SAFETY: `has_room` proved the slot for `position` was released by
        // the consumer, and only this producer writes SPSC slots;
        // `too_large` checked the length of these very bytes.
        unsafe { write_message(&self.shared.view, position, request_id, bytes) };
        // Rule S2: advance `tail` (for observers; it may run ahead of the
        // publications, never behind, so `head <= tail` always holds), then
        // publish through the slot's sequence, which pairs with the
        // consumer's acquire load.
        self.tail = position + 1;
        self.shared.view.tail().store(self.tail, Ordering::Release);
        self.shared
            .view
            .sequence(position)
            .store(position + 1, Ordering::Release);
        self.shared.not_empty.wake_if_parked();
        Ok(())
    }

    /// Enqueues `payload` with request id 0, waiting per `policy` while the
    /// ring is full, for at most `timeout`.
    pub fn push<P: AsRef<[u8]>>(
        &mut self,
        payload: P,
        policy: &WaitPolicy,
        timeout: Option<Duration>,
    ) -> Result<(), PushError<P>> {
        self.push_with(0, payload, policy, timeout)
    }

    /// [`SpscProducer::push`] with a request id.
    pub fn push_with<P: AsRef<[u8]>>(
        &mut self,
        request_id: u64,
        payload: P,
        policy: &WaitPolicy,
        timeout: Option<Duration>,
    ) -> Result<(), PushError<P>> {
        let shared = self.shared.clone();
        push_blocking(&shared, payload, policy, timeout, |p| {
            self.try_push_with(request_id, p)
        })
    }

    /// Reserves `count` consecutive slots to fill in place. Dropping the
    /// chunk without committing discards it.
    pub fn try_reserve(&mut self, count: usize) -> Result<WriteChunk<'_>, ReserveError> {
        let capacity = self.shared.view.capacity() as usize;
        if count == 0 || count > capacity {
            return Err(ReserveError::BadCount {
                requested: count,
                capacity,
            });
        }
        if self.shared.view.closed().load(Ordering::Relaxed) != 0 {
            return Err(ReserveError::Closed);
        }
        if !self.has_room(count as u64) {
            return Err(ReserveError::Full { requested: count });
        }
        let start = self.tail;
        Ok(WriteChunk::new(
            &self.shared,
            start,
            count,
            Publish::Spsc {
                tail: &mut self.tail,
            },
        ))
    }

    /// Closes the ring. Called here, on the only producer, it is a clean end
    /// of stream: everything pushed before is delivered. Called from the
    /// consumer's side it is a stop signal: see `docs/ring-protocol.md`, S5.
    pub fn close(&self) {
        self.shared.close();
    }

    /// Whether the ring has been closed.
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    /// Advances the producer heartbeat.
    pub fn beat(&self) {
        self.shared
            .view
            .producer_heartbeat()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The ring's geometry.
    pub fn layout(&self) -> LayoutInfo {
        self.shared.view.info
    }
}

impl fmt::Debug for SpscProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpscProducer")
            .field("layout", &self.shared.view.info)
            .field("tail", &self.tail)
            .finish_non_exhaustive()
    }
}

/// How a chunk publishes its slots.
enum Publish<'a> {
    /// Store each slot's sequence (rule M3).
    Mpsc,
    /// Store each slot's sequence, then advance the producer's tail (rule S2).
    Spsc { tail: &'a mut u64 },
}

/// Consecutive slots reserved by one producer, written in place.
///
/// Slots start with length 0, request id 0 and status 0.
pub struct WriteChunk<'a> {
    shared: &'a Shared,
    /// First reserved position.
    start: u64,
    /// Number of reserved slots, `1..=capacity`.
    count: usize,
    publish: Publish<'a>,
    /// Slots published so far by `publish_prefix`, `0..=count`; they are
    /// always the first ones.
    published: usize,
    /// Set by `commit` so `Drop` knows the slots are published.
    committed: bool,
}

impl<'a> WriteChunk<'a> {
    fn new(shared: &'a Shared, start: u64, count: usize, publish: Publish<'a>) -> WriteChunk<'a> {
        for position in start..start + count as u64 {
            let _access = shared.view.tracker(position).writing();
            // SAFETY: the reservation holds these slots.
            unsafe { shared.view.write_meta(position, SlotMeta::default()) };
        }
        WriteChunk {
            shared,
            start,
            count,
            publish,
            published: 0,
            committed: false,
        }
    }

    /// Number of reserved slots.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Always false: a chunk holds at least one slot.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Largest payload each slot holds.
    pub fn max_payload(&self) -> usize {
        self.shared.view.max_payload()
    }

    /// The `index`-th reserved slot, or `None` past the end or once it has
    /// been published (the consumer may be reading it).
    pub fn slot(&mut self, index: usize) -> Option<SlotMut<'_>> {
        if index >= self.count || index < self.published {
            return None;
        }
        let view = &self.shared.view;
        let position = self.start + index as u64;
        Some(SlotMut {
            view,
            position,
            _access: view.tracker(position).writing(),
        })
    }

    /// Publishes every slot not yet published. The consumer sees them in
    /// order.
    pub fn commit(mut self) {
        self.publish_range(self.count, 0);
        self.committed = true;
    }

    /// Publishes the first `end` slots (those not yet published), so the
    /// consumer can start on them while the rest are written: one claim
    /// for many messages, without holding the first back until the last is
    /// written. `end` is capped at the chunk's length. Published slots are
    /// the consumer's: `slot` no longer hands them out.
    pub fn publish_prefix(&mut self, end: usize) {
        self.publish_range(end.min(self.count), 0);
    }

    fn publish_range(&mut self, end: usize, flags: u32) {
        if end <= self.published {
            return;
        }
        let view = &self.shared.view;
        let first = self.start + self.published as u64;
        let last = self.start + end as u64;
        match &mut self.publish {
            Publish::Mpsc => {
                for position in first..last {
                    if flags != 0 {
                        let _access = view.tracker(position).writing();
                        // SAFETY: still held: not yet published.
                        unsafe {
                            view.write_meta(
                                position,
                                SlotMeta {
                                    flags,
                                    ..SlotMeta::default()
                                },
                            )
                        };
                    }
                    view.sequence(position)
                        .store(position + 1, Ordering::Release);
                }
            }
            Publish::Spsc { tail } => {
                if flags != 0 {
                    // An SPSC reservation was never visible: just forget
                    // what was not published.
                    return;
                }
                // Rule S2: tail first, then the publications.
                **tail = last;
                view.tail().store(last, Ordering::Release);
                for position in first..last {
                    view.sequence(position)
                        .store(position + 1, Ordering::Release);
                }
            }
        }
        self.published = end;
        self.shared.not_empty.wake_if_parked();
    }
}

impl Drop for WriteChunk<'_> {
    fn drop(&mut self) {
        if !self.committed {
            // MPSC: the positions are claimed and the consumer will wait on
            // them, so they must be published, marked as carrying nothing.
            self.publish_range(self.count, SLOT_FLAG_SKIP);
        }
    }
}

impl fmt::Debug for WriteChunk<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteChunk")
            .field("start", &self.start)
            .field("len", &self.count)
            .finish()
    }
}

/// One reserved slot, borrowed from a [`WriteChunk`].
pub struct SlotMut<'c> {
    view: &'c View,
    position: u64,
    /// Records, under loom, that this slot is being written.
    _access: WriteGuard,
}

impl SlotMut<'_> {
    /// The slot's whole payload area (`max_payload` bytes), to write in
    /// place. Follow with [`SlotMut::set_len`].
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let len = self.view.max_payload();
        let ptr = self.view.payload_ptr(self.position);
        // SAFETY: the chunk holds this slot exclusively until it is
        // published, which needs `&mut WriteChunk`, which this borrow blocks;
        // the bytes are initialised (Region contract).
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }

    /// Sets how many payload bytes the message carries.
    pub fn set_len(&mut self, len: usize) -> Result<(), PayloadTooLarge> {
        let max = self.view.max_payload();
        if len > max {
            return Err(PayloadTooLarge { len, max });
        }
        // SAFETY: the slot is held by the chunk this borrows from; the
        // field pointer is in bounds.
        unsafe {
            self.view
                .slot_field(self.position, |h| &raw mut (*h).len)
                .write(len as u32)
        };
        Ok(())
    }

    /// Copies `bytes` into the slot and sets the length.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), PayloadTooLarge> {
        let max = self.view.max_payload();
        if bytes.len() > max {
            return Err(PayloadTooLarge {
                len: bytes.len(),
                max,
            });
        }
        self.payload_mut()[..bytes.len()].copy_from_slice(bytes);
        self.set_len(bytes.len())
    }

    /// Sets the request id carried with the message.
    pub fn set_request_id(&mut self, request_id: u64) {
        // SAFETY: as in `set_len`.
        unsafe {
            self.view
                .slot_field(self.position, |h| &raw mut (*h).request_id)
                .write(request_id)
        };
    }

    /// Sets the status code carried with the message.
    pub fn set_status(&mut self, status: u32) {
        // SAFETY: as in `set_len`.
        unsafe {
            self.view
                .slot_field(self.position, |h| &raw mut (*h).status)
                .write(status)
        };
    }
}
