//! The one place that chooses between `std` and [`loom`] synchronisation.
//!
//! Everything in this crate that the loom model checker must see (the ring's
//! atomics, the waiters' mutex and condition variable, payload accesses)
//! goes through this module. Build with `RUSTFLAGS="--cfg loom"` to run the
//! model tests in `tests/loom.rs`.
//!
//! [`loom`]: https://docs.rs/loom

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, fence};
#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, fence};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex};

pub(crate) use std::sync::atomic::Ordering;

/// Hint for a busy-wait step. Under loom this yields to the model's scheduler,
/// which needs to see every spin to explore interleavings.
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}

/// Gives up the CPU for one scheduling quantum.
#[inline]
pub(crate) fn yield_now() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::thread::yield_now();
}

/// Tracks accesses to one slot's payload and header bytes.
///
/// Under loom this is a [`loom::cell::UnsafeCell`]; a guard from
/// [`AccessTracker::reading`] or [`AccessTracker::writing`] records an access
/// that lasts until the guard drops, and loom reports any access that is not
/// ordered after a conflicting one. Handles keep the guard for as long as
/// they lend out the bytes. Outside loom the tracker and its guards are
/// zero-sized and do nothing.
#[cfg(loom)]
#[derive(Debug, Default)]
pub(crate) struct AccessTracker(loom::cell::UnsafeCell<()>);

/// A recorded shared access; ends when dropped.
#[cfg(loom)]
pub(crate) type ReadGuard = loom::cell::ConstPtr<()>;
/// A recorded exclusive access; ends when dropped.
#[cfg(loom)]
pub(crate) type WriteGuard = loom::cell::MutPtr<()>;

#[cfg(loom)]
impl AccessTracker {
    pub(crate) fn reading(&self) -> ReadGuard {
        self.0.get()
    }
    pub(crate) fn writing(&self) -> WriteGuard {
        self.0.get_mut()
    }
}

#[cfg(not(loom))]
#[derive(Debug, Default)]
pub(crate) struct AccessTracker;

/// A recorded shared access (nothing outside loom).
#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct ReadGuard;
/// A recorded exclusive access (nothing outside loom).
#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct WriteGuard;

#[cfg(not(loom))]
impl AccessTracker {
    #[inline(always)]
    pub(crate) fn reading(&self) -> ReadGuard {
        ReadGuard
    }
    #[inline(always)]
    pub(crate) fn writing(&self) -> WriteGuard {
        WriteGuard
    }
}
