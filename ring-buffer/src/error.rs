//! Errors, one enum per operation. A value the ring refuses is handed back.

use std::fmt;

/// A ring configuration that cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The capacity is not a power of two in `2..=2^24`.
    Capacity {
        /// The requested capacity.
        capacity: u32,
    },
    /// The ring (`768 + capacity × slot size` bytes) does not fit this
    /// target's address space.
    TooLarge {
        /// The requested capacity.
        capacity: u32,
        /// The slot size it would have.
        slot_size: u32,
    },
    /// The allocator refused the ring's memory.
    OutOfMemory {
        /// Bytes the ring needs.
        bytes: usize,
    },
    /// The payload does not fit the largest slot (1 MiB).
    PayloadTooLarge {
        /// The requested maximum payload.
        max_payload: u32,
        /// The largest payload a slot can hold.
        limit: u32,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Capacity { capacity } => {
                write!(
                    f,
                    "ring capacity {capacity} is not a power of two in 2..=16777216"
                )
            }
            ConfigError::TooLarge {
                capacity,
                slot_size,
            } => write!(
                f,
                "a ring of {capacity} slots of {slot_size} bytes does not fit the address space"
            ),
            ConfigError::OutOfMemory { bytes } => {
                write!(f, "cannot allocate {bytes} bytes for the ring")
            }
            ConfigError::PayloadTooLarge { max_payload, limit } => {
                write!(
                    f,
                    "max payload {max_payload} bytes exceeds the slot limit of {limit} bytes"
                )
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// Why a ring could not be created in a caller's region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InitError {
    /// The configuration itself is invalid.
    Config(ConfigError),
    /// The region is smaller than the ring.
    RegionTooSmall {
        /// Bytes in the region.
        len: usize,
        /// Bytes the ring needs.
        required: usize,
    },
    /// The region's base is not 128-byte aligned.
    Misaligned {
        /// The base address.
        addr: usize,
        /// The alignment required.
        required: usize,
    },
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::Config(err) => err.fmt(f),
            InitError::RegionTooSmall { len, required } => {
                write!(
                    f,
                    "region of {len} bytes is too small for a ring of {required} bytes"
                )
            }
            InitError::Misaligned { addr, required } => {
                write!(
                    f,
                    "region base {addr:#x} is not aligned to {required} bytes"
                )
            }
        }
    }
}

impl std::error::Error for InitError {}

impl From<ConfigError> for InitError {
    fn from(err: ConfigError) -> InitError {
        InitError::Config(err)
    }
}

/// Memory that does not hold a valid ring, found when attaching to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BadLayout {
    /// The region's base is not 128-byte aligned.
    Misaligned {
        /// The base address.
        addr: usize,
        /// The alignment required.
        required: usize,
    },
    /// The region is shorter than the control block, or than the ring its
    /// header describes.
    TooSmall {
        /// Bytes in the region.
        len: usize,
        /// Bytes required.
        required: usize,
    },
    /// The first word is not `"GRNR"`.
    BadMagic {
        /// The word found.
        found: u32,
    },
    /// A layout version this build does not speak.
    WrongVersion {
        /// The version found.
        found: u32,
        /// The version this build writes.
        expected: u32,
    },
    /// The header's CRC does not match its fields.
    HeaderChecksum {
        /// The CRC stored in the header.
        stored: u32,
        /// The CRC of the fields as found.
        computed: u32,
    },
    /// A reserved header word is not zero.
    ReservedNotZero,
    /// The mode word is neither MPSC (1) nor SPSC (2).
    UnknownMode {
        /// The mode word found.
        found: u32,
    },
    /// The capacity is not a power of two in `2..=2^24`.
    BadCapacity {
        /// The capacity found.
        capacity: u32,
    },
    /// The slot size is not a multiple of 16 in `32..=1 MiB`, or does not
    /// agree with the maximum payload.
    WrongSlotSize {
        /// The slot size found.
        slot_size: u32,
        /// The maximum payload found.
        max_payload: u32,
    },
    /// Slots do not start right after the control block.
    WrongSlotsOffset {
        /// The offset found.
        found: u32,
    },
    /// The `closed` word is neither 0 nor 1, or (MPSC) says closed while the
    /// closed bit in `tail`, which `close()` sets first, is clear.
    BadClosedFlag {
        /// The word found.
        closed: u32,
    },
    /// `head` and `tail` are not positions of one ring: each must be below
    /// 2^63 and `head <= tail <= head + capacity`.
    BadIndices {
        /// The head found.
        head: u64,
        /// The tail found (without the MPSC closed bit).
        tail: u64,
    },
    /// The stored total size disagrees with capacity × slot size.
    WrongTotal {
        /// The total stored in the header.
        stored: u64,
        /// The total computed from the geometry.
        computed: u64,
    },
}

impl fmt::Display for BadLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "memory holds no valid ring: ")?;
        match self {
            BadLayout::Misaligned { addr, required } => {
                write!(f, "base {addr:#x} is not aligned to {required} bytes")
            }
            BadLayout::TooSmall { len, required } => {
                write!(f, "region of {len} bytes, {required} required")
            }
            BadLayout::BadMagic { found } => write!(f, "bad magic {found:#010x}"),
            BadLayout::WrongVersion { found, expected } => {
                write!(f, "layout version {found}, this build speaks {expected}")
            }
            BadLayout::HeaderChecksum { stored, computed } => {
                write!(
                    f,
                    "header checksum {stored:#010x} != computed {computed:#010x}"
                )
            }
            BadLayout::ReservedNotZero => write!(f, "reserved header words are not zero"),
            BadLayout::UnknownMode { found } => write!(f, "unknown mode {found}"),
            BadLayout::BadCapacity { capacity } => {
                write!(
                    f,
                    "capacity {capacity} is not a power of two in 2..=16777216"
                )
            }
            BadLayout::WrongSlotSize {
                slot_size,
                max_payload,
            } => {
                write!(
                    f,
                    "slot size {slot_size} with max payload {max_payload} is inconsistent"
                )
            }
            BadLayout::WrongSlotsOffset { found } => write!(f, "slots start at {found}, not 768"),
            BadLayout::BadClosedFlag { closed } => {
                write!(f, "closed word {closed} disagrees with the ring's state")
            }
            BadLayout::BadIndices { head, tail } => {
                write!(
                    f,
                    "head {head} and tail {tail} are not positions of one ring"
                )
            }
            BadLayout::WrongTotal { stored, computed } => {
                write!(f, "total size {stored} != computed {computed}")
            }
        }
    }
}

impl std::error::Error for BadLayout {}

/// The ring was opened in the other mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrongMode {
    /// The mode the ring was created with.
    pub actual: crate::Mode,
    /// The mode the caller asked for.
    pub requested: crate::Mode,
}

impl fmt::Display for WrongMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ring is {:?}, not {:?}", self.actual, self.requested)
    }
}

impl std::error::Error for WrongMode {}

/// A non-blocking push that did not enqueue. The payload comes back.
#[derive(Clone, PartialEq, Eq)]
pub enum TryPushError<P> {
    /// Every slot is in use.
    Full(P),
    /// The ring is closed.
    Closed(P),
    /// The payload is longer than a slot holds.
    PayloadTooLarge {
        /// The payload's length.
        len: usize,
        /// The largest payload a slot holds.
        max: usize,
        /// The payload, returned.
        payload: P,
    },
}

impl<P> TryPushError<P> {
    /// Takes back the payload that was not enqueued.
    pub fn into_inner(self) -> P {
        match self {
            TryPushError::Full(payload)
            | TryPushError::Closed(payload)
            | TryPushError::PayloadTooLarge { payload, .. } => payload,
        }
    }
}

/// A blocking push that did not enqueue. The payload comes back.
#[derive(Clone, PartialEq, Eq)]
pub enum PushError<P> {
    /// No slot freed up before the timeout.
    Timeout(P),
    /// The ring is closed.
    Closed(P),
    /// The payload is longer than a slot holds.
    PayloadTooLarge {
        /// The payload's length.
        len: usize,
        /// The largest payload a slot holds.
        max: usize,
        /// The payload, returned.
        payload: P,
    },
}

impl<P> PushError<P> {
    /// Takes back the payload that was not enqueued.
    pub fn into_inner(self) -> P {
        match self {
            PushError::Timeout(payload)
            | PushError::Closed(payload)
            | PushError::PayloadTooLarge { payload, .. } => payload,
        }
    }
}

macro_rules! payload_error_impls {
    ($name:ident, $busy:ident, $busy_text:literal) => {
        impl<P> fmt::Debug for $name<P> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    $name::$busy(_) => write!(f, concat!(stringify!($busy), "(..)")),
                    $name::Closed(_) => write!(f, "Closed(..)"),
                    $name::PayloadTooLarge { len, max, .. } => f
                        .debug_struct("PayloadTooLarge")
                        .field("len", len)
                        .field("max", max)
                        .finish_non_exhaustive(),
                }
            }
        }

        impl<P> fmt::Display for $name<P> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    $name::$busy(_) => write!(f, $busy_text),
                    $name::Closed(_) => write!(f, "ring is closed"),
                    $name::PayloadTooLarge { len, max, .. } => {
                        write!(
                            f,
                            "payload of {len} bytes exceeds the slot maximum of {max}"
                        )
                    }
                }
            }
        }

        impl<P> std::error::Error for $name<P> {}
    };
}

payload_error_impls!(TryPushError, Full, "ring is full");
payload_error_impls!(PushError, Timeout, "timed out waiting for a free slot");

/// A batch reservation that reserved nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReserveError {
    /// Fewer than the requested number of slots are free.
    Full {
        /// Slots requested.
        requested: usize,
    },
    /// The ring is closed.
    Closed,
    /// More slots than the ring has (or zero) were requested.
    BadCount {
        /// Slots requested.
        requested: usize,
        /// The ring's capacity.
        capacity: usize,
    },
}

impl fmt::Display for ReserveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReserveError::Full { requested } => write!(f, "fewer than {requested} slots are free"),
            ReserveError::Closed => write!(f, "ring is closed"),
            ReserveError::BadCount {
                requested,
                capacity,
            } => {
                write!(
                    f,
                    "cannot reserve {requested} slots in a ring of {capacity}"
                )
            }
        }
    }
}

impl std::error::Error for ReserveError {}

/// A non-blocking pop that returned nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TryPopError {
    /// No message is ready.
    Empty,
    /// The ring is closed and every message has been taken.
    Closed,
    /// The next slot claims a payload longer than a slot holds: the other side
    /// wrote a bad header. The slot has been released and the consumer moved
    /// past it, so the next pop continues with the following message.
    Corrupt {
        /// Position of the bad slot.
        position: u64,
        /// The length it claimed.
        len: u32,
        /// The largest payload a slot holds.
        max: u32,
    },
}

impl fmt::Display for TryPopError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TryPopError::Empty => write!(f, "ring is empty"),
            TryPopError::Closed => write!(f, "ring is closed and drained"),
            TryPopError::Corrupt { position, len, max } => write!(
                f,
                "slot at position {position} claims {len} bytes, more than the maximum {max}"
            ),
        }
    }
}

impl std::error::Error for TryPopError {}

/// A blocking pop that returned nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PopError {
    /// No message arrived before the timeout.
    Timeout,
    /// The ring is closed and every message has been taken.
    Closed,
    /// See [`TryPopError::Corrupt`].
    Corrupt {
        /// Position of the bad slot.
        position: u64,
        /// The length it claimed.
        len: u32,
        /// The largest payload a slot holds.
        max: u32,
    },
}

impl fmt::Display for PopError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PopError::Timeout => write!(f, "timed out waiting for a message"),
            PopError::Closed => write!(f, "ring is closed and drained"),
            PopError::Corrupt { position, len, max } => {
                TryPopError::Corrupt { position, len, max }.fmt(f)
            }
        }
    }
}

impl std::error::Error for PopError {}

/// A payload longer than the slot it is written into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadTooLarge {
    /// The payload's length.
    pub len: usize,
    /// The largest payload a slot holds.
    pub max: usize,
}

impl fmt::Display for PayloadTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "payload of {} bytes exceeds the slot maximum of {}",
            self.len, self.max
        )
    }
}

impl std::error::Error for PayloadTooLarge {}
