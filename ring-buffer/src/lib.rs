//! Lock-free ring buffers in memory that host threads and device kernels
//! share.
//!
//! A Granary ring carries requests from many grains to one persistent kernel,
//! and responses back. Its bytes live in a [`Region`]: plain heap memory for
//! the CPU backend, pinned host-mapped memory for CUDA, fine-grained SVM for
//! OpenCL. The [memory layout](layout) is the contract with device code and
//! is shipped as C declarations in [`device`].
//!
//! # Invariants
//!
//! 1. Positions (`head`, `tail`, slot sequences) are 64-bit counters that
//!    only grow; the slot for position `p` is `p & (capacity - 1)`. They
//!    stay below 2^63, which at a billion messages a second is 292 years.
//! 2. `head <= tail <= head + capacity` (ignoring the MPSC closed bit).
//! 3. A slot's payload and header are touched by exactly one party at a
//!    time: the producer that claimed it, until it publishes; then the
//!    consumer, until it releases.
//! 4. Publication is a release store of the slot's `sequence` that the
//!    consumer observes with an acquire load; release is the mirror image
//!    (the slot's `sequence` in MPSC, `head` in SPSC). No other ordering is
//!    relied on in the fast path.
//! 5. Nothing read from shared memory is trusted: attaching validates the
//!    whole header ([`BadLayout`]), and a slot length over `max_payload` is
//!    reported ([`TryPopError::Corrupt`]), never used.
//!
//! # Algorithms
//!
//! - [`Mode::Mpsc`] is Dmitry Vyukov's bounded MPMC queue
//!   (<https://www.1024cores.net/home/lock-free-algorithms/queues/bounded-mpmc-queue>),
//!   used with a single consumer, extended with all-or-nothing batch claims
//!   and a closed bit in `tail`.
//! - [`Mode::Spsc`] finds room like Lamport's single-producer
//!   single-consumer ring with a cached index, as rtrb does
//!   (<https://github.com/mgeier/rtrb>), and publishes through per-slot
//!   sequences as FastForward does (Giacomoni, Moseley and Vachharajani,
//!   PPoPP 2008), so the consumer never reads the producer's index line.
//!
//! The rules are numbered in `docs/ring-protocol.md`; the code cites them.
//!
//! # Example
//!
//! ```
//! use granary_ring::{Ring, RingConfig};
//!
//! let ring = Ring::new(RingConfig::mpsc(64, 56))?;
//! let (producer, mut consumer) = ring.split_mpsc()?;
//! producer.try_push_with(7, b"hello")?;
//! let message = consumer.try_pop()?;
//! assert_eq!((message.request_id(), message.payload()), (7, &b"hello"[..]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

// The layout is little-endian (docs/ring-protocol.md) and the structs are
// native-endian: refuse to build where the two differ.
#[cfg(target_endian = "big")]
compile_error!("granary-ring's shared-memory layout is little-endian only");

mod consumer;
pub mod device;
mod error;
pub mod layout;
mod loom;
mod producer;
mod region;
mod ring;
mod wait;

pub use consumer::{Consumer, Message, MessageRef, ReadChunk};
pub use error::{
    BadLayout, ConfigError, InitError, PayloadTooLarge, PopError, PushError, ReserveError,
    TryPopError, TryPushError, WrongMode,
};
pub use layout::{LayoutInfo, Mode, RingConfig};
pub use producer::{Producer, SlotMut, SpscProducer, WriteChunk};
pub use region::{ExternalRegion, HeapRegion, Ownership, Region};
pub use ring::Ring;
pub use wait::WaitPolicy;
