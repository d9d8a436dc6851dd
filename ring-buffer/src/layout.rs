//! The memory layout of a ring: the contract with device code.
//!
//! A ring is one contiguous region. The [`ControlBlock`] comes first
//! ([`CONTROL_BYTES`] bytes, six 128-byte lines), then `capacity` slots of
//! `slot_size` bytes each. Every slot starts with a [`SlotHeader`]
//! ([`SLOT_HEADER_BYTES`] bytes) followed by up to `max_payload` bytes.
//!
//! ```text
//! offset  0    line 0  RingHeader: magic, version, mode, capacity, slot_size,
//!                      max_payload, slots_offset, total_bytes, header_crc
//! offset  128  line 1  tail                (producers; bit 63 = closed, MPSC)
//! offset  256  line 2  head                (consumer)
//! offset  384  line 3  closed              (0 = open, 1 = closed)
//! offset  512  line 4  producer_heartbeat
//! offset  640  line 5  consumer_heartbeat
//! offset  768          slot 0 | slot 1 | ... | slot capacity-1
//! slot:   0 sequence | 8 request_id | 16 len | 20 status | 24 flags | 28 reserved | 32 payload
//! ```
//!
//! The same layout is declared in C for CUDA and OpenCL in
//! [`crate::device`]; `tests/device_layout.rs` compiles those declarations
//! with the host C compiler and checks every offset against `offset_of!`.
//! The protocol over this memory is written out as numbered rules in
//! `docs/ring-protocol.md`.

use std::mem::{offset_of, size_of};
use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::error::{BadLayout, ConfigError};

/// `"GRNR"` read as a little-endian `u32`: the first word of every ring.
pub const MAGIC: u32 = u32::from_le_bytes(*b"GRNR");
/// The layout version this crate writes and accepts. Bumped on any change to
/// an offset, a field's meaning or the protocol.
pub const LAYOUT_VERSION: u32 = 1;
/// Size of one control-block line. 128 bytes covers the adjacent-line
/// prefetcher on x86 and the 128-byte lines of Apple and some ARM cores, so
/// head and tail never share a line.
pub const LINE_BYTES: usize = 128;
/// Size of the control block; the slots start here.
pub const CONTROL_BYTES: usize = 6 * LINE_BYTES;
/// Size of the header at the start of every slot.
pub const SLOT_HEADER_BYTES: usize = 32;
/// Slot sizes are multiples of this, so every payload is 16-byte aligned
/// (enough for `float4`/`int4` loads on a device). This is what the layout
/// accepts; [`RingConfig`] itself always picks whole cache lines.
pub const SLOT_ALIGN: usize = 16;
/// [`RingConfig::layout`] rounds slots up to whole lines of this size.
/// Measured: 8-byte messages in 48-byte slots (two slots sharing lines)
/// took 3.7× as long per message as in 64-byte slots (BENCHMARKS.md).
pub const CACHE_LINE_BYTES: usize = 64;
/// The smallest capacity. Vyukov's sequence scheme cannot tell "written" from
/// "free" in a one-slot ring.
pub const MIN_CAPACITY: u32 = 2;
/// The largest capacity: 2^24 slots.
pub const MAX_CAPACITY: u32 = 1 << 24;
/// The largest slot: 1 MiB. Larger inputs take the bridge's batch path.
pub const MAX_SLOT_BYTES: u32 = 1 << 20;
/// The alignment a region's base address must have.
pub const REGION_ALIGN: usize = LINE_BYTES;
/// Bit 63 of `tail` in MPSC mode: set once by `close()`; a producer's claim
/// (a compare-and-swap on `tail`) fails while it is set.
pub const TAIL_CLOSED_BIT: u64 = 1 << 63;
/// Slot flag: the slot was claimed but carries no message (a producer's batch
/// was dropped before it committed every slot). The consumer releases it
/// without delivering it.
pub const SLOT_FLAG_SKIP: u32 = 1;

/// How producers and the consumer coordinate. Stored in the header as a `u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Mode {
    /// Many producers, one consumer: Dmitry Vyukov's bounded queue. Each slot's
    /// `sequence` says whether it is free or written. Used for requests
    /// (many grains to one kernel).
    Mpsc = 1,
    /// One producer, one consumer. The producer finds room with a cached
    /// copy of `head`, as rtrb does, and needs no compare-and-swap; it
    /// publishes through each slot's `sequence` like MPSC, so the consumer
    /// never reads the producer's `tail` line. Used for responses (a kernel
    /// to the host).
    Spsc = 2,
}

impl Mode {
    fn from_u32(value: u32) -> Option<Mode> {
        match value {
            1 => Some(Mode::Mpsc),
            2 => Some(Mode::Spsc),
            _ => None,
        }
    }
}

/// Line 0 of the control block. Written once by `init`, read-only afterwards.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RingHeader {
    /// Always [`MAGIC`].
    pub magic: u32,
    /// Always [`LAYOUT_VERSION`].
    pub version: u32,
    /// [`Mode`] as a `u32`: 1 = MPSC, 2 = SPSC.
    pub mode: u32,
    /// Number of slots: a power of two in `MIN_CAPACITY..=MAX_CAPACITY`.
    pub capacity: u32,
    /// Bytes from one slot to the next: a multiple of [`SLOT_ALIGN`] in
    /// `SLOT_HEADER_BYTES..=MAX_SLOT_BYTES` (exactly `SLOT_HEADER_BYTES` for
    /// a ring that only carries empty payloads).
    pub slot_size: u32,
    /// `slot_size - SLOT_HEADER_BYTES`: the largest payload a slot holds.
    pub max_payload: u32,
    /// Offset of slot 0 from the base: always [`CONTROL_BYTES`].
    pub slots_offset: u32,
    /// Reserved, zero.
    pub flags: u32,
    /// `slots_offset + capacity * slot_size`: the bytes the ring occupies.
    pub total_bytes: u64,
    /// CRC-32 (IEEE) of bytes `0..40` of this header, so that corruption of
    /// any field is caught on attach.
    pub header_crc: u32,
    /// Reserved, zero.
    pub reserved: [u32; 21],
}

/// One 128-byte line holding a single atomic word.
#[repr(C, align(128))]
#[derive(Debug)]
pub struct Line<T> {
    /// The word; the rest of the line is padding.
    pub value: T,
}

/// The control block at offset 0 of every ring.
#[repr(C, align(128))]
#[derive(Debug)]
pub struct ControlBlock {
    /// Immutable description of the ring.
    pub header: RingHeader,
    /// Next position producers claim. In MPSC mode bit 63 is
    /// [`TAIL_CLOSED_BIT`]; positions stay below 2^63.
    pub tail: Line<AtomicU64>,
    /// Next position the consumer reads. Positions grow without wrapping;
    /// slot index is `position & (capacity - 1)`.
    pub head: Line<AtomicU64>,
    /// 0 while open, 1 once closed. Device loops poll this.
    pub closed: Line<AtomicU32>,
    /// Advanced by the producing side's loop (not per message).
    pub producer_heartbeat: Line<AtomicU64>,
    /// Advanced by the consuming side's loop (not per message).
    pub consumer_heartbeat: Line<AtomicU64>,
}

/// The header at the start of every slot.
#[repr(C)]
#[derive(Debug)]
pub struct SlotHeader {
    /// MPSC: Vyukov's sequence. Equals the position `p` when the slot is free
    /// for position `p`; `p + 1` once the message for `p` is written;
    /// `p + capacity` once the consumer has released it. SPSC: 0 at
    /// creation, `p + 1` once the message for `p` is written (the consumer
    /// does not write it back; the producer tracks room through `head`).
    pub sequence: AtomicU64,
    /// Caller-chosen id carried with the message; responses echo it.
    pub request_id: u64,
    /// Payload length in bytes, `0..=max_payload`.
    pub len: u32,
    /// Caller- or device-defined status code; 0 means OK by convention.
    pub status: u32,
    /// Bit set of `SLOT_FLAG_*`.
    pub flags: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

const _: () = {
    assert!(size_of::<RingHeader>() == LINE_BYTES);
    assert!(size_of::<ControlBlock>() == CONTROL_BYTES);
    assert!(offset_of!(ControlBlock, tail) == LINE_BYTES);
    assert!(offset_of!(ControlBlock, head) == 2 * LINE_BYTES);
    assert!(offset_of!(ControlBlock, closed) == 3 * LINE_BYTES);
    assert!(offset_of!(ControlBlock, producer_heartbeat) == 4 * LINE_BYTES);
    assert!(offset_of!(ControlBlock, consumer_heartbeat) == 5 * LINE_BYTES);
    assert!(size_of::<SlotHeader>() == SLOT_HEADER_BYTES);
    assert!(offset_of!(RingHeader, header_crc) == HEADER_CRC_COVERS);
};

/// The header CRC covers bytes `0..HEADER_CRC_COVERS`.
pub const HEADER_CRC_COVERS: usize = 40;

/// What a caller asks for when creating a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingConfig {
    /// Coordination mode.
    pub mode: Mode,
    /// Number of slots: a power of two in `2..=2^24`.
    pub capacity: u32,
    /// Largest payload in bytes. The slot size is this plus the 32-byte slot
    /// header, rounded up to whole 64-byte cache lines, so that neighbouring
    /// slots never share a line: a producer writing slot `k + 1` never
    /// steals the line the consumer is reading slot `k` from.
    pub max_payload: u32,
}

impl RingConfig {
    /// A many-producer ring.
    pub fn mpsc(capacity: u32, max_payload: u32) -> RingConfig {
        RingConfig {
            mode: Mode::Mpsc,
            capacity,
            max_payload,
        }
    }

    /// A single-producer ring.
    pub fn spsc(capacity: u32, max_payload: u32) -> RingConfig {
        RingConfig {
            mode: Mode::Spsc,
            capacity,
            max_payload,
        }
    }

    /// Checks the configuration and computes the layout it gives.
    pub fn layout(&self) -> Result<LayoutInfo, ConfigError> {
        if !self.capacity.is_power_of_two()
            || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&self.capacity)
        {
            return Err(ConfigError::Capacity {
                capacity: self.capacity,
            });
        }
        let max_slot_payload = MAX_SLOT_BYTES - SLOT_HEADER_BYTES as u32;
        if self.max_payload > max_slot_payload {
            return Err(ConfigError::PayloadTooLarge {
                max_payload: self.max_payload,
                limit: max_slot_payload,
            });
        }
        let slot_size =
            (SLOT_HEADER_BYTES as u32 + self.max_payload).next_multiple_of(CACHE_LINE_BYTES as u32);
        LayoutInfo::new(self.mode, self.capacity, slot_size).ok_or(ConfigError::TooLarge {
            capacity: self.capacity,
            slot_size,
        })
    }
}

/// The validated geometry of a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutInfo {
    /// Coordination mode.
    pub mode: Mode,
    /// Number of slots (a power of two).
    pub capacity: u32,
    /// Bytes per slot, header included.
    pub slot_size: u32,
    /// Largest payload: `slot_size - 32`. May exceed the requested maximum:
    /// a ring this crate makes rounds its slots up to a cache line (64
    /// bytes); an attached layout's slots need only be a multiple of
    /// [`SLOT_ALIGN`] (16).
    pub max_payload: u32,
    /// Bytes the whole ring occupies.
    pub total_bytes: usize,
}

impl LayoutInfo {
    /// `None` when the ring's size does not fit this target's address
    /// space (up to 2^44 bytes, so only on 32-bit targets).
    fn new(mode: Mode, capacity: u32, slot_size: u32) -> Option<LayoutInfo> {
        let total = (CONTROL_BYTES as u64)
            .checked_add(u64::from(capacity).checked_mul(u64::from(slot_size))?)?;
        let total_bytes = usize::try_from(total)
            .ok()
            .filter(|&t| t <= isize::MAX as usize)?;
        Some(LayoutInfo {
            mode,
            capacity,
            slot_size,
            max_payload: slot_size - SLOT_HEADER_BYTES as u32,
            total_bytes,
        })
    }

    /// The header that `init` writes for this layout.
    pub(crate) fn header(&self) -> RingHeader {
        let mut header = RingHeader {
            magic: MAGIC,
            version: LAYOUT_VERSION,
            mode: self.mode as u32,
            capacity: self.capacity,
            slot_size: self.slot_size,
            max_payload: self.max_payload,
            slots_offset: CONTROL_BYTES as u32,
            flags: 0,
            total_bytes: self.total_bytes as u64,
            header_crc: 0,
            reserved: [0; 21],
        };
        header.header_crc = header_crc(&header);
        header
    }

    /// Validates a header read from memory of `region_len` bytes at address
    /// `base_addr`. Every check the attach path makes lives here.
    pub(crate) fn validate(
        header: &RingHeader,
        base_addr: usize,
        region_len: usize,
    ) -> Result<LayoutInfo, BadLayout> {
        if base_addr % REGION_ALIGN != 0 {
            return Err(BadLayout::Misaligned {
                addr: base_addr,
                required: REGION_ALIGN,
            });
        }
        if region_len < CONTROL_BYTES {
            return Err(BadLayout::TooSmall {
                len: region_len,
                required: CONTROL_BYTES,
            });
        }
        if header.magic != MAGIC {
            return Err(BadLayout::BadMagic {
                found: header.magic,
            });
        }
        if header.version != LAYOUT_VERSION {
            return Err(BadLayout::WrongVersion {
                found: header.version,
                expected: LAYOUT_VERSION,
            });
        }
        let computed = header_crc(header);
        if header.header_crc != computed {
            return Err(BadLayout::HeaderChecksum {
                stored: header.header_crc,
                computed,
            });
        }
        if header.flags != 0 || header.reserved.iter().any(|&word| word != 0) {
            return Err(BadLayout::ReservedNotZero);
        }
        let Some(mode) = Mode::from_u32(header.mode) else {
            return Err(BadLayout::UnknownMode { found: header.mode });
        };
        if !header.capacity.is_power_of_two()
            || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&header.capacity)
        {
            return Err(BadLayout::BadCapacity {
                capacity: header.capacity,
            });
        }
        let slot_size = header.slot_size;
        if slot_size < SLOT_HEADER_BYTES as u32
            || slot_size > MAX_SLOT_BYTES
            || slot_size % SLOT_ALIGN as u32 != 0
            || header.max_payload != slot_size - SLOT_HEADER_BYTES as u32
        {
            return Err(BadLayout::WrongSlotSize {
                slot_size,
                max_payload: header.max_payload,
            });
        }
        if header.slots_offset != CONTROL_BYTES as u32 {
            return Err(BadLayout::WrongSlotsOffset {
                found: header.slots_offset,
            });
        }
        let computed = CONTROL_BYTES as u64 + u64::from(header.capacity) * u64::from(slot_size);
        if header.total_bytes != computed {
            return Err(BadLayout::WrongTotal {
                stored: header.total_bytes,
                computed,
            });
        }
        // A total beyond the address space cannot fit in any region.
        let Some(info) = LayoutInfo::new(mode, header.capacity, slot_size) else {
            return Err(BadLayout::TooSmall {
                len: region_len,
                required: usize::MAX,
            });
        };
        if region_len < info.total_bytes {
            return Err(BadLayout::TooSmall {
                len: region_len,
                required: info.total_bytes,
            });
        }
        Ok(info)
    }
}

/// CRC-32 of the header's first [`HEADER_CRC_COVERS`] bytes, computed from
/// the fields in little-endian order (the byte order of every supported host
/// and device).
pub(crate) fn header_crc(header: &RingHeader) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    for word in [
        header.magic,
        header.version,
        header.mode,
        header.capacity,
        header.slot_size,
        header.max_payload,
        header.slots_offset,
        header.flags,
    ] {
        hasher.update(&word.to_le_bytes());
    }
    hasher.update(&header.total_bytes.to_le_bytes());
    hasher.finalize()
}
