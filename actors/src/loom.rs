//! The one place that chooses between `std` and [`loom`] synchronisation
//! for the parts of this crate the loom model checker must see: the
//! mailbox's lock and its lock-free words (`mailbox.rs`), and the
//! sweeper's.
//!
//! The cfg is given to this crate alone, not through `RUSTFLAGS` (under a
//! global `--cfg loom` tokio leaves out its `net` module, and the crates
//! built on it stop compiling):
//!
//! ```text
//! cargo rustc -p granary-actors --lib --profile test -- --cfg loom
//! ```
//!
//! and then runs the test binary it built on `mailbox::loom`
//! (`scripts/loom-actors.sh` does both; `.ci/run` runs it). loom is a
//! dev-dependency, so it is there for exactly that build.
//!
//! [`loom`]: https://docs.rs/loom

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
#[cfg(loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
#[cfg(not(loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};
