//! The consuming side: one [`Consumer`] per ring, in either mode.
//!
//! Messages are read in place. A [`Message`] or a [`ReadChunk`] borrows the
//! consumer and releases its slots when dropped.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{PopError, TryPopError};
use crate::layout::{LayoutInfo, Mode, SLOT_FLAG_SKIP, TAIL_CLOSED_BIT};
use crate::loom::Ordering;
use crate::ring::{Shared, SlotMeta};
use crate::wait::{WaitPolicy, Waiting};

/// The consumer of a ring. There is exactly one per ring across every view
/// and device (see [`crate::Ring::attach`]).
pub struct Consumer {
    shared: Arc<Shared>,
    mode: Mode,
    /// Next position to read; equals the shared `head` between calls.
    head: u64,
    /// SPSC only: last `tail` seen, at most the true tail.
    cached_tail: u64,
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
        Consumer {
            shared,
            mode,
            head,
            cached_tail: head,
        }
    }

    /// Rules M4 / S3: whether the slot at `position` holds a published
    /// message, and its metadata if so.
    #[inline(always)]
    fn peek(&mut self, position: u64) -> Next {
        let view = &self.shared.view;
        let ready = match self.mode {
            Mode::Mpsc => {
                view.sequence(position).load(Ordering::Acquire) == position.wrapping_add(1)
            }
            Mode::Spsc => {
                position < self.cached_tail || {
                    self.cached_tail = view.tail().load(Ordering::Acquire);
                    position < self.cached_tail
                }
            }
        };
        if ready {
            // SAFETY: the acquire load above saw the slot published, and only
            // this consumer releases it.
            Next::Ready(unsafe { view.read_meta(position) })
        } else {
            Next::NotReady
        }
    }

    /// Rules M5 / S4: hands `count` slots from `head` back to producers.
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

    /// Rule C3: the ring is closed and nothing claimed remains unread.
    fn closed_and_drained(&self) -> bool {
        let view = &self.shared.view;
        match self.mode {
            Mode::Mpsc => {
                let tail = view.tail().load(Ordering::Acquire);
                tail & TAIL_CLOSED_BIT != 0 && tail & !TAIL_CLOSED_BIT == self.head
            }
            Mode::Spsc => {
                view.closed().load(Ordering::Acquire) != 0
                    && view.tail().load(Ordering::Acquire) == self.head
            }
        }
    }

    fn empty_or_closed(&self) -> TryPopError {
        if self.closed_and_drained() {
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
        Ok(Message {
            consumer: self,
            position,
            meta,
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
        Ok(Message {
            consumer: self,
            position,
            meta,
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
        Ok(ReadChunk {
            start: self.head,
            count,
            consumer: self,
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

/// Whether anything changed that a parked consumer at `head` should see.
fn has_news(shared: &Shared, mode: Mode, head: u64) -> bool {
    let view = &shared.view;
    let published = match mode {
        Mode::Mpsc => view.sequence(head).load(Ordering::Acquire) == head.wrapping_add(1),
        Mode::Spsc => view.tail().load(Ordering::Acquire) != head,
    };
    published || shared.is_closed()
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
    meta: SlotMeta,
}

impl Message<'_> {
    /// The payload bytes, in slot memory.
    pub fn payload(&self) -> &[u8] {
        let view = &self.consumer.shared.view;
        view.tracker(self.position).read(|| {
            // SAFETY: the slot was published (acquire-observed in `peek`) and
            // is not released until this message drops; `len` was checked
            // against `max_payload`.
            unsafe {
                std::slice::from_raw_parts(view.payload_ptr(self.position), self.meta.len as usize)
            }
        })
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
    fn drop(&mut self) {
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
            let payload = view.tracker(position).read(|| {
                // SAFETY: as above; `try_read` admitted only lengths within
                // `max_payload`.
                unsafe { std::slice::from_raw_parts(view.payload_ptr(position), meta.len as usize) }
            });
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
