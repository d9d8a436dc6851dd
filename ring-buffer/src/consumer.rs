//! The consuming side: one [`Consumer`] per ring, in either mode.
//!
//! Messages are read in place. A [`Message`] or a [`ReadChunk`] borrows the
//! consumer and releases its slots when dropped.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{PopError, TryPopError};
use crate::layout::{LayoutInfo, Mode, SLOT_FLAG_SKIP, TAIL_CLOSED_BIT};
use crate::loom::{Ordering, ReadGuard};
use crate::ring::{Shared, SlotMeta};
use crate::wait::{WaitPolicy, Waiting};

/// The consumer of a ring. There is exactly one per ring across every view
/// and device (see [`crate::Ring::attach`]).
pub struct Consumer {
    shared: Arc<Shared>,
    mode: Mode,
    /// Next position to read; equals the shared `head` between calls.
    head: u64,
}

/// What the next slot holds.
enum Next {
    Ready(SlotMeta),
    NotReady,
}

impl Consumer {
    pub(crate) fn new(shared: Arc<Shared>) -> Consumer {
        let mode = shared.view.info.mode;
        let head = shared.view.head().load(Ordering::Acquire);
        Consumer { shared, mode, head }
    }

    /// Rules M4 / S3: whether the slot at `position` holds a published
    /// message, and its metadata if so. Both modes publish through the
    /// slot's sequence, so the consumer never reads the producers' `tail`
    /// line while messages flow.
    #[inline(always)]
    fn peek(&self, position: u64) -> Next {
        let view = &self.shared.view;
        let ready = view.sequence(position).load(Ordering::Acquire) == position.wrapping_add(1);
        if ready {
            let _access = view.tracker(position).reading();
            // SAFETY: the acquire load above saw the slot published, and only
            // this consumer releases it.
            Next::Ready(unsafe { view.read_meta(position) })
        } else {
            Next::NotReady
        }
    }

    /// Rules M5 / S4: hands `count` slots from `head` back to producers:
    /// MPSC producers find free slots by their sequence, the SPSC producer
    /// by `head` alone.
    #[inline(always)]
    fn release(&mut self, count: u64) {
        let view = &self.shared.view;
        if self.mode == Mode::Mpsc {
            let capacity = view.capacity();
            for position in self.head..self.head + count {
                view.sequence(position)
                    .store(position + capacity, Ordering::Release);
            }
        }
        self.head += count;
        view.head().store(self.head, Ordering::Release);
        self.shared.not_full.wake_if_parked();
    }

    fn empty_or_closed(&self) -> TryPopError {
        if closed_and_drained(&self.shared, self.mode, self.head) {
            TryPopError::Closed
        } else {
            TryPopError::Empty
        }
    }

    /// Finds the next deliverable message at `head` without taking it:
    /// releases skipped slots, and releases and reports a corrupt one.
    #[inline(always)]
    fn next_message(&mut self) -> Result<SlotMeta, TryPopError> {
        loop {
            let position = self.head;
            let meta = match self.peek(position) {
                Next::Ready(meta) => meta,
                Next::NotReady => return Err(self.empty_or_closed()),
            };
            if meta.flags & SLOT_FLAG_SKIP != 0 {
                self.release(1);
                continue;
            }
            let max = self.shared.view.info.max_payload;
            if meta.len > max {
                self.release(1);
                return Err(TryPopError::Corrupt {
                    position,
                    len: meta.len,
                    max,
                });
            }
            return Ok(meta);
        }
    }

    /// Takes the next message if one is ready. Never blocks.
    ///
    /// Skipped slots (from a producer's dropped batch) are released silently.
    /// A slot whose header claims more than `max_payload` bytes is released
    /// and reported as [`TryPopError::Corrupt`]; the next call goes on.
    #[inline]
    pub fn try_pop(&mut self) -> Result<Message<'_>, TryPopError> {
        let meta = self.next_message()?;
        let position = self.head;
        let access = Some(self.shared.view.tracker(position).reading());
        Ok(Message {
            consumer: self,
            position,
            meta,
            access,
        })
    }

    /// Takes the next message, waiting per `policy` for at most `timeout`
    /// (`None` waits until the ring is closed and drained).
    pub fn pop(
        &mut self,
        policy: &WaitPolicy,
        timeout: Option<Duration>,
    ) -> Result<Message<'_>, PopError> {
        let shared = self.shared.clone();
        let mut waiting = Waiting::new(policy, timeout);
        let meta = loop {
            match self.next_message() {
                Ok(meta) => break meta,
                Err(TryPopError::Empty) => {}
                Err(TryPopError::Closed) => return Err(PopError::Closed),
                Err(TryPopError::Corrupt { position, len, max }) => {
                    return Err(PopError::Corrupt { position, len, max });
                }
            }
            let (head, mode) = (self.head, self.mode);
            let still_empty = || !has_news(&shared, mode, head);
            if !waiting.step(
                &shared.not_empty,
                shared.view.consumer_heartbeat(),
                still_empty,
            ) {
                return Err(PopError::Timeout);
            }
        };
        let position = self.head;
        let access = Some(self.shared.view.tracker(position).reading());
        Ok(Message {
            consumer: self,
            position,
            meta,
            access,
        })
    }

    /// Takes up to `max` ready messages at once, read in place. The chunk
    /// stops before a corrupt slot, which a later call reports. A `max` of 0
    /// is taken as 1.
    pub fn try_read(&mut self, max: usize) -> Result<ReadChunk<'_>, TryPopError> {
        // Settles skipped and corrupt slots at the head, so the chunk starts
        // with a deliverable message.
        self.next_message()?;
        let limit = max.clamp(1, self.shared.view.capacity() as usize) as u64;
        let max_payload = self.shared.view.info.max_payload;
        let mut count = 1;
        while count < limit {
            match self.peek(self.head + count) {
                Next::Ready(meta)
                    if meta.len <= max_payload || meta.flags & SLOT_FLAG_SKIP != 0 =>
                {
                    count += 1;
                }
                _ => break,
            }
        }
        let start = self.head;
        #[cfg(loom)]
        let access = (start..start + count)
            .map(|position| self.shared.view.tracker(position).reading())
            .collect();
        Ok(ReadChunk {
            start,
            count,
            consumer: self,
            #[cfg(loom)]
            access,
        })
    }

    /// Closes the ring (see [`crate::Producer::close`]).
    pub fn close(&self) {
        self.shared.close();
    }

    /// Whether the ring has been closed.
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    /// The producing side's heartbeat (rule H1): how a consumer on the host
    /// watches a device producer's liveness.
    pub fn producer_heartbeat(&self) -> u64 {
        self.shared
            .view
            .producer_heartbeat()
            .load(Ordering::Relaxed)
    }

    /// Advances the consumer heartbeat.
    pub fn beat(&self) {
        self.shared
            .view
            .consumer_heartbeat()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The ring's geometry.
    pub fn layout(&self) -> LayoutInfo {
        self.shared.view.info
    }
}

/// Rule C3: the ring is closed and nothing claimed remains unread.
#[inline(always)]
fn closed_and_drained(shared: &Shared, mode: Mode, head: u64) -> bool {
    let view = &shared.view;
    // The `closed` word is read-mostly, while `tail` is the producers' hot
    // line: polling `tail` on every empty pop would pull it away from them
    // (rule C1 sets the tail bit before this word, so a ring whose word is
    // still 0 is at most momentarily closed, and reporting Empty is right).
    if view.closed().load(Ordering::Acquire) == 0 {
        return false;
    }
    match mode {
        Mode::Mpsc => {
            let tail = view.tail().load(Ordering::Acquire);
            tail & TAIL_CLOSED_BIT != 0 && tail & !TAIL_CLOSED_BIT == head
        }
        Mode::Spsc => view.tail().load(Ordering::Acquire) == head,
    }
}

/// Whether anything changed that a parked consumer at `head` should see: a
/// publication, or the end of the stream. A ring that is closed but still
/// has a claimed, unpublished slot is not news: the waiter parks until the
/// slot is published.
fn has_news(shared: &Shared, mode: Mode, head: u64) -> bool {
    let view = &shared.view;
    let published = view.sequence(head).load(Ordering::Acquire) == head.wrapping_add(1);
    published || closed_and_drained(shared, mode, head)
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("layout", &self.shared.view.info)
            .field("head", &self.head)
            .finish_non_exhaustive()
    }
}

/// A message read in place. Dropping it releases the slot.
pub struct Message<'a> {
    consumer: &'a mut Consumer,
    position: u64,
    /// Validated in `next_message`: `len <= max_payload`.
    meta: SlotMeta,
    /// Records, under loom, that the slot is being read. Taken (ended)
    /// before the slot is released.
    access: Option<ReadGuard>,
}

impl Message<'_> {
    /// The payload bytes, in slot memory.
    pub fn payload(&self) -> &[u8] {
        let view = &self.consumer.shared.view;
        // SAFETY: the slot was published (acquire-observed in `peek`) and is
        // not released until this message drops; `len` was checked against
        // `max_payload` and is our own copy.
        unsafe {
            std::slice::from_raw_parts(view.payload_ptr(self.position), self.meta.len as usize)
        }
    }

    /// The request id the producer attached.
    pub fn request_id(&self) -> u64 {
        self.meta.request_id
    }

    /// The status code the producer attached.
    pub fn status(&self) -> u32 {
        self.meta.status
    }

    /// The message's position in the ring's sequence (0, 1, 2, ...).
    pub fn position(&self) -> u64 {
        self.position
    }
}

impl Drop for Message<'_> {
    #[inline]
    fn drop(&mut self) {
        // The read ends before the slot goes back to the producers.
        self.access = None;
        self.consumer.release(1);
    }
}

impl fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("position", &self.position)
            .field("request_id", &self.meta.request_id)
            .field("status", &self.meta.status)
            .field("len", &self.meta.len)
            .finish()
    }
}

/// A run of consecutive ready slots. Dropping it releases them all at once.
pub struct ReadChunk<'a> {
    consumer: &'a mut Consumer,
    /// First position in the chunk.
    start: u64,
    /// Slots in the chunk, `1..=capacity`; skipped slots included.
    count: u64,
    /// Records, under loom, that the chunk's slots are being read.
    #[cfg(loom)]
    access: Vec<ReadGuard>,
}

impl<'a> ReadChunk<'a> {
    /// Number of slots in the chunk, skipped ones included.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Always false: a chunk holds at least one slot.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The messages, in order, skipping slots that carry none.
    pub fn iter(&self) -> impl Iterator<Item = MessageRef<'_>> {
        let view = &self.consumer.shared.view;
        (self.start..self.start + self.count).filter_map(move |position| {
            // SAFETY: every position in the chunk was seen published and is
            // held until the chunk drops.
            let meta = unsafe { view.read_meta(position) };
            if meta.flags & SLOT_FLAG_SKIP != 0 {
                return None;
            }
            // `try_read` admitted only lengths within `max_payload`, but the
            // header is re-read here, so a producer that breaks the protocol
            // could have changed it since: clamp rather than trust it.
            let len = meta.len.min(view.info.max_payload) as usize;
            // SAFETY: as above, and `len` is within the slot.
            let payload = unsafe { std::slice::from_raw_parts(view.payload_ptr(position), len) };
            Some(MessageRef {
                position,
                request_id: meta.request_id,
                status: meta.status,
                payload,
            })
        })
    }
}

impl Drop for ReadChunk<'_> {
    fn drop(&mut self) {
        // The reads end before the slots go back to the producers.
        #[cfg(loom)]
        self.access.clear();
        self.consumer.release(self.count);
    }
}

impl fmt::Debug for ReadChunk<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadChunk")
            .field("start", &self.start)
            .field("len", &self.count)
            .finish()
    }
}

/// One message of a [`ReadChunk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRef<'a> {
    /// Position in the ring's sequence.
    pub position: u64,
    /// The request id the producer attached.
    pub request_id: u64,
    /// The status code the producer attached.
    pub status: u32,
    /// The payload, in slot memory.
    pub payload: &'a [u8],
}
