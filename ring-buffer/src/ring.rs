//! The host's view of a ring, and the handle that creates or attaches one.

use std::fmt;
use std::ptr::{NonNull, addr_of, addr_of_mut};
use std::sync::Arc;

use crate::consumer::Consumer;
use crate::error::{BadLayout, ConfigError, InitError, WrongMode};
use crate::layout::{
    CONTROL_BYTES, ControlBlock, LayoutInfo, Mode, REGION_ALIGN, RingConfig, RingHeader,
    SlotHeader, TAIL_CLOSED_BIT,
};
use crate::loom::{AccessTracker, AtomicU32, AtomicU64, Ordering};
use crate::producer::{Producer, SpscProducer};
use crate::region::{HeapRegion, Region};
use crate::wait::Waiters;

/// Metadata of one slot, copied out of its header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SlotMeta {
    pub(crate) request_id: u64,
    pub(crate) len: u32,
    pub(crate) status: u32,
    pub(crate) flags: u32,
}

/// Under loom the shared words live in loom atomics beside the region, so the
/// model checker sees every access; payload bytes stay in the region.
#[cfg(loom)]
struct ModelWords {
    tail: AtomicU64,
    head: AtomicU64,
    closed: AtomicU32,
    producer_heartbeat: AtomicU64,
    consumer_heartbeat: AtomicU64,
    sequences: Box<[AtomicU64]>,
}

/// Typed access to a ring's memory. Holds no ownership; [`Shared`] keeps the
/// region alive.
pub(crate) struct View {
    /// Base of the region; 128-byte aligned; `info.total_bytes` valid bytes.
    base: NonNull<u8>,
    pub(crate) info: LayoutInfo,
    /// `capacity - 1`; capacity is a power of two.
    mask: u64,
    /// `info.capacity` as a `u64`, kept to spare the hot paths a conversion.
    capacity: u64,
    /// Slot size in bytes, as `info.slot_size`.
    slot_size: usize,
    /// Under loom, one per slot: records payload and header accesses.
    #[cfg(loom)]
    trackers: Box<[AccessTracker]>,
    #[cfg(loom)]
    model: ModelWords,
}

impl View {
    /// # Safety
    /// `base` points to at least `info.total_bytes` bytes that stay valid for
    /// the view's life and hold (or are about to be given) this layout.
    unsafe fn new(base: NonNull<u8>, info: LayoutInfo) -> View {
        View {
            base,
            info,
            mask: u64::from(info.capacity) - 1,
            capacity: u64::from(info.capacity),
            slot_size: info.slot_size as usize,
            #[cfg(loom)]
            trackers: std::iter::repeat_with(AccessTracker::default)
                .take(info.capacity as usize)
                .collect(),
            #[cfg(loom)]
            model: ModelWords {
                tail: AtomicU64::new(0),
                head: AtomicU64::new(0),
                closed: AtomicU32::new(0),
                producer_heartbeat: AtomicU64::new(0),
                consumer_heartbeat: AtomicU64::new(0),
                // As `format` writes them: rule M0 for MPSC, zero for SPSC.
                sequences: (0..u64::from(info.capacity))
                    .map(|position| {
                        AtomicU64::new(if info.mode == Mode::Mpsc { position } else { 0 })
                    })
                    .collect(),
            },
        }
    }

    #[cfg(not(loom))]
    #[inline(always)]
    fn control(&self) -> &ControlBlock {
        // SAFETY: the region starts with a control block (validated or just
        // written), is 128-byte aligned, and outlives `self`. Shared words
        // are atomics; the header is never written after `format` (the
        // contract of `init_in`, and `new` owns fresh memory).
        unsafe { self.base.cast::<ControlBlock>().as_ref() }
    }

    #[inline(always)]
    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    #[inline(always)]
    pub(crate) fn max_payload(&self) -> usize {
        self.info.max_payload as usize
    }

    #[inline(always)]
    pub(crate) fn tail(&self) -> &AtomicU64 {
        #[cfg(loom)]
        return &self.model.tail;
        #[cfg(not(loom))]
        &self.control().tail.value
    }

    #[inline(always)]
    pub(crate) fn head(&self) -> &AtomicU64 {
        #[cfg(loom)]
        return &self.model.head;
        #[cfg(not(loom))]
        &self.control().head.value
    }

    #[inline(always)]
    pub(crate) fn closed(&self) -> &AtomicU32 {
        #[cfg(loom)]
        return &self.model.closed;
        #[cfg(not(loom))]
        &self.control().closed.value
    }

    #[inline(always)]
    pub(crate) fn producer_heartbeat(&self) -> &AtomicU64 {
        #[cfg(loom)]
        return &self.model.producer_heartbeat;
        #[cfg(not(loom))]
        &self.control().producer_heartbeat.value
    }

    #[inline(always)]
    pub(crate) fn consumer_heartbeat(&self) -> &AtomicU64 {
        #[cfg(loom)]
        return &self.model.consumer_heartbeat;
        #[cfg(not(loom))]
        &self.control().consumer_heartbeat.value
    }

    /// Header of the slot that holds `position`.
    #[inline(always)]
    fn slot_header(&self, position: u64) -> *mut SlotHeader {
        let index = (position & self.mask) as usize;
        let offset = CONTROL_BYTES + index * self.slot_size;
        // SAFETY: `index < capacity`, so the slot lies inside the
        // `total_bytes` the view covers.
        unsafe { self.base.as_ptr().add(offset).cast() }
    }

    #[inline(always)]
    pub(crate) fn sequence(&self, position: u64) -> &AtomicU64 {
        #[cfg(loom)]
        return &self.model.sequences[(position & self.mask) as usize];
        // SAFETY: the slot header is in bounds, 16-byte aligned (slots start
        // at 768 and are multiples of 16 apart), and `sequence` is only ever
        // accessed atomically.
        #[cfg(not(loom))]
        unsafe {
            &(*self.slot_header(position)).sequence
        }
    }

    #[inline(always)]
    pub(crate) fn tracker(&self, position: u64) -> &AccessTracker {
        #[cfg(loom)]
        return &self.trackers[(position & self.mask) as usize];
        // Zero-sized and stateless outside loom: no per-slot lookup.
        #[cfg(not(loom))]
        {
            let _ = position;
            &AccessTracker
        }
    }

    /// Start of the payload of the slot that holds `position`.
    #[inline(always)]
    pub(crate) fn payload_ptr(&self, position: u64) -> *mut u8 {
        // SAFETY: the payload directly follows the 32-byte slot header and
        // has `max_payload` bytes inside the slot.
        unsafe {
            self.slot_header(position)
                .cast::<u8>()
                .add(size_of::<SlotHeader>())
        }
    }

    /// Pointer to one field of the header of the slot that holds
    /// `position`, chosen by `field` (for example `|h| &raw mut (*h).len`).
    /// Writing through it needs the slot held.
    #[inline(always)]
    pub(crate) fn slot_field<T>(
        &self,
        position: u64,
        field: impl FnOnce(*mut SlotHeader) -> *mut T,
    ) -> *mut T {
        field(self.slot_header(position))
    }

    /// Writes a slot's metadata.
    ///
    /// # Safety
    /// The caller holds the slot for `position` (claimed, not yet published).
    #[inline(always)]
    pub(crate) unsafe fn write_meta(&self, position: u64, meta: SlotMeta) {
        let header = self.slot_header(position);
        // SAFETY: the caller holds the slot, so nobody else reads or writes
        // these non-atomic fields now; the pointers are in bounds.
        unsafe {
            addr_of_mut!((*header).request_id).write(meta.request_id);
            addr_of_mut!((*header).len).write(meta.len);
            addr_of_mut!((*header).status).write(meta.status);
            addr_of_mut!((*header).flags).write(meta.flags);
        }
    }

    /// Reads a slot's metadata.
    ///
    /// # Safety
    /// The caller holds the slot for `position` (published, not yet
    /// released), having observed its publication with acquire ordering.
    #[inline(always)]
    pub(crate) unsafe fn read_meta(&self, position: u64) -> SlotMeta {
        let header = self.slot_header(position);
        // SAFETY: the producer finished these writes before the release that
        // the caller acquired; nobody writes them until the caller releases.
        unsafe {
            SlotMeta {
                request_id: addr_of!((*header).request_id).read(),
                len: addr_of!((*header).len).read(),
                status: addr_of!((*header).status).read(),
                flags: addr_of!((*header).flags).read(),
            }
        }
    }
}

/// Rule P2: checks that `head` and `tail` describe a ring of `capacity`
/// slots: both below 2^63 and `head <= tail <= head + capacity`. Only MPSC
/// rings carry the closed bit in `tail`. Reads head, tail, then head again,
/// so that progress made between the reads on a ring in use does not look
/// like corruption; if head keeps moving, the upper bound (which progress can
/// break) is not checked.
fn check_indices(
    head: &std::sync::atomic::AtomicU64,
    tail: &std::sync::atomic::AtomicU64,
    mode: Mode,
    capacity: u64,
) -> Result<(), BadLayout> {
    use std::sync::atomic::Ordering::Acquire;
    let closed_bit = if mode == Mode::Mpsc {
        TAIL_CLOSED_BIT
    } else {
        0
    };
    for _ in 0..4 {
        let head_before = head.load(Acquire);
        let tail_now = tail.load(Acquire) & !closed_bit;
        let head_after = head.load(Acquire);
        let bad = BadLayout::BadIndices {
            head: head_before,
            tail: tail_now,
        };
        if tail_now >= TAIL_CLOSED_BIT || head_before > tail_now {
            return Err(bad);
        }
        if head_before == head_after {
            return if tail_now - head_before <= capacity {
                Ok(())
            } else {
                Err(bad)
            };
        }
    }
    Ok(())
}

/// Rule A1: the `closed` word is 0 or 1, and in MPSC mode a 1 comes with
/// the tail bit that `close()` sets before it (the bit alone is a close in
/// progress, and fine).
fn check_closed(control: &ControlBlock, mode: Mode) -> Result<(), BadLayout> {
    use std::sync::atomic::Ordering::Acquire;
    let closed = control.closed.value.load(Acquire);
    let tail_bit = control.tail.value.load(Acquire) & TAIL_CLOSED_BIT != 0;
    match (closed, mode) {
        (0, _) | (1, Mode::Spsc) => Ok(()),
        (1, Mode::Mpsc) if tail_bit => Ok(()),
        _ => Err(BadLayout::BadClosedFlag { closed }),
    }
}

/// What every handle of one ring shares.
pub(crate) struct Shared {
    pub(crate) view: View,
    pub(crate) not_empty: Waiters,
    pub(crate) not_full: Waiters,
    /// Keeps the memory alive; read only through `view` (and `Ring::region`
    /// for its base and length).
    region: Box<dyn Region>,
}

// SAFETY: the region is Send + Sync (a `Region` requirement); `View` only
// holds a pointer into it, and all cross-thread access to that memory follows
// the ring protocol (atomics for shared words, exclusive slot ownership for
// payloads and slot headers).
unsafe impl Send for Shared {}
// SAFETY: as above; `&Shared` methods only use atomics and held slots.
unsafe impl Sync for Shared {}

impl Shared {
    pub(crate) fn close(&self) {
        if self.view.info.mode == Mode::Mpsc {
            self.view.tail().fetch_or(TAIL_CLOSED_BIT, Ordering::SeqCst);
        }
        self.view.closed().store(1, Ordering::SeqCst);
        self.not_empty.wake_all();
        self.not_full.wake_all();
    }

    /// Rule C1: in MPSC mode the closed bit in `tail` is the authority
    /// (producers obey it); in SPSC mode the `closed` word.
    pub(crate) fn is_closed(&self) -> bool {
        match self.view.info.mode {
            Mode::Mpsc => self.view.tail().load(Ordering::Acquire) & TAIL_CLOSED_BIT != 0,
            Mode::Spsc => self.view.closed().load(Ordering::Acquire) != 0,
        }
    }

    /// Messages claimed or written but not yet released, from a snapshot of
    /// the indices (exact only when nobody is moving them).
    pub(crate) fn len(&self) -> usize {
        let head = self.view.head().load(Ordering::Acquire);
        let tail = self.view.tail().load(Ordering::Acquire) & !TAIL_CLOSED_BIT;
        tail.saturating_sub(head).min(self.view.capacity()) as usize
    }
}

/// A ring: memory laid out per [`crate::layout`], plus the host's handle on
/// it. Split it into a producer and a [`Consumer`] to use it.
pub struct Ring {
    shared: Arc<Shared>,
}

impl Ring {
    /// Creates a ring in fresh heap memory.
    pub fn new(config: RingConfig) -> Result<Ring, ConfigError> {
        let info = config.layout()?;
        let region = HeapRegion::try_zeroed(info.total_bytes).ok_or(ConfigError::OutOfMemory {
            bytes: info.total_bytes,
        })?;
        // SAFETY: a fresh heap region of exactly `total_bytes`, 128-byte
        // aligned, that nothing else can see.
        Ok(unsafe { Ring::format(Box::new(region), info) })
    }

    /// Lays out a new, empty ring in `region`, overwriting its control block
    /// and slot headers.
    ///
    /// # Safety
    ///
    /// Until the returned ring and every view attached to it are dropped,
    /// nothing accesses the region's bytes except through those views and
    /// through device code that follows `docs/ring-protocol.md`. In
    /// particular no other ring may be created in, or still be live on, the
    /// same memory (a region shared through `Arc` makes that possible, so
    /// the compiler cannot check it).
    pub unsafe fn init_in(region: impl Region, config: RingConfig) -> Result<Ring, InitError> {
        let info = config.layout()?;
        let addr = region.base().as_ptr() as usize;
        if addr % REGION_ALIGN != 0 {
            return Err(InitError::Misaligned {
                addr,
                required: REGION_ALIGN,
            });
        }
        if region.len() < info.total_bytes {
            return Err(InitError::RegionTooSmall {
                len: region.len(),
                required: info.total_bytes,
            });
        }
        // SAFETY: checked just above: large enough and aligned; the caller
        // guarantees nobody else uses the memory while it is formatted.
        Ok(unsafe { Ring::format(Box::new(region), info) })
    }

    /// Writes an empty ring with layout `info` into `region`.
    ///
    /// # Safety
    /// `region` is at least `info.total_bytes` long, 128-byte aligned, and
    /// nobody else accesses it during this call.
    unsafe fn format(region: Box<dyn Region>, info: LayoutInfo) -> Ring {
        let base = region.base();
        // SAFETY: per the contract the writes are in bounds and exclusive.
        unsafe {
            let control = base.cast::<ControlBlock>().as_ptr();
            base.as_ptr().write_bytes(0, CONTROL_BYTES);
            addr_of_mut!((*control).header).write(info.header());
            let view = View::new(base, info);
            for position in 0..u64::from(info.capacity) {
                let header = view.slot_header(position);
                header.cast::<u8>().write_bytes(0, size_of::<SlotHeader>());
                let sequence = if info.mode == Mode::Mpsc { position } else { 0 };
                (*header).sequence.store(sequence, Ordering::Relaxed);
            }
            Ring::from_region(region, info)
        }
    }

    /// Attaches to memory that already holds a ring, for example one a device
    /// or another view created. Every header field is validated; memory that
    /// holds no valid ring gives [`BadLayout`].
    ///
    /// # Safety
    ///
    /// Roles are exclusive across all views of one ring. The caller must not
    /// obtain the consumer role (`into_consumer`, `split_*`) through this view
    /// while another view or a device holds it, nor, in SPSC mode, the
    /// producer role (`into_spsc_producer`, `split_spsc`). MPSC producers
    /// (`into_producer`) may be on any number of views. A view whose peer
    /// roles live elsewhere takes its own role with `into_*`, never with
    /// `split_*`.
    pub unsafe fn attach(region: impl Region) -> Result<Ring, BadLayout> {
        let info = Ring::inspect(&region)?;
        // SAFETY: `inspect` validated the layout over this region.
        Ok(unsafe { Ring::from_region(Box::new(region), info) })
    }

    /// Validates the ring in `region` without attaching to it.
    pub fn inspect(region: &dyn Region) -> Result<LayoutInfo, BadLayout> {
        let base = region.base();
        let addr = base.as_ptr() as usize;
        if addr % REGION_ALIGN != 0 {
            return Err(BadLayout::Misaligned {
                addr,
                required: REGION_ALIGN,
            });
        }
        if region.len() < CONTROL_BYTES {
            return Err(BadLayout::TooSmall {
                len: region.len(),
                required: CONTROL_BYTES,
            });
        }
        // SAFETY: at least 128 initialised bytes at an aligned address (Region
        // contract). The header is plain data written only by `init_in` /
        // `new`, whose contract excludes any other access while they run.
        let header: RingHeader = unsafe { base.cast::<RingHeader>().as_ptr().read() };
        let info = LayoutInfo::validate(&header, addr, region.len())?;
        // SAFETY: validated above: the region holds a whole control block at
        // an aligned address; `head` and `tail` are only accessed atomically.
        let control = unsafe { base.cast::<ControlBlock>().as_ref() };
        check_indices(
            &control.head.value,
            &control.tail.value,
            info.mode,
            u64::from(info.capacity),
        )?;
        check_closed(control, info.mode)?;
        Ok(info)
    }

    /// # Safety
    /// `region` holds a ring with layout `info`.
    unsafe fn from_region(region: Box<dyn Region>, info: LayoutInfo) -> Ring {
        // SAFETY: the caller guarantees the layout; the Box keeps the region
        // alive as long as `Shared`.
        let view = unsafe { View::new(region.base(), info) };
        Ring {
            shared: Arc::new(Shared {
                view,
                not_empty: Waiters::default(),
                not_full: Waiters::default(),
                region,
            }),
        }
    }

    /// The ring's geometry.
    pub fn layout(&self) -> LayoutInfo {
        self.shared.view.info
    }

    /// Takes only the producer role of an MPSC ring: for a view whose
    /// consumer is a device or another view.
    pub fn into_producer(self) -> Result<Producer, WrongMode> {
        self.check_mode(Mode::Mpsc)?;
        Ok(Producer::new(self.shared))
    }

    /// Takes only the producer role of an SPSC ring.
    pub fn into_spsc_producer(self) -> Result<SpscProducer, WrongMode> {
        self.check_mode(Mode::Spsc)?;
        Ok(SpscProducer::new(self.shared))
    }

    /// Takes only the consumer role, in either mode: for a view whose
    /// producers are a device or other views.
    pub fn into_consumer(self) -> Consumer {
        Consumer::new(self.shared)
    }

    /// The memory the ring lives in: its base is what device code is given.
    pub fn region(&self) -> &dyn Region {
        &*self.shared.region
    }

    /// Splits an MPSC ring into a cloneable producer and the consumer.
    pub fn split_mpsc(self) -> Result<(Producer, Consumer), WrongMode> {
        self.check_mode(Mode::Mpsc)?;
        Ok((
            Producer::new(self.shared.clone()),
            Consumer::new(self.shared),
        ))
    }

    /// Splits an SPSC ring into its producer and its consumer.
    pub fn split_spsc(self) -> Result<(SpscProducer, Consumer), WrongMode> {
        self.check_mode(Mode::Spsc)?;
        Ok((
            SpscProducer::new(self.shared.clone()),
            Consumer::new(self.shared),
        ))
    }

    fn check_mode(&self, requested: Mode) -> Result<(), WrongMode> {
        let actual = self.shared.view.info.mode;
        if actual == requested {
            Ok(())
        } else {
            Err(WrongMode { actual, requested })
        }
    }

    /// Closes the ring: see [`Producer::close`].
    pub fn close(&self) {
        self.shared.close();
    }

    /// Whether the ring has been closed.
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    /// Messages in flight, from a snapshot of the indices.
    pub fn len(&self) -> usize {
        self.shared.len()
    }

    /// Whether no message is in flight, from a snapshot of the indices.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The producing side's heartbeat counter.
    pub fn producer_heartbeat(&self) -> u64 {
        self.shared
            .view
            .producer_heartbeat()
            .load(Ordering::Relaxed)
    }

    /// The consuming side's heartbeat counter.
    pub fn consumer_heartbeat(&self) -> u64 {
        self.shared
            .view
            .consumer_heartbeat()
            .load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("layout", &self.shared.view.info)
            .field("len", &self.len())
            .field("closed", &self.is_closed())
            .finish()
    }
}
