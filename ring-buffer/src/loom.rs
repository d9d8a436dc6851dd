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

/// Tracks accesses to one slot's payload bytes.
///
/// Under loom this is a [`loom::cell::UnsafeCell`] whose `with`/`with_mut`
/// record each access, so the model checker reports a payload read that is not
/// ordered after the write that produced it. Outside loom it is zero-sized and
/// the closures run directly.
#[cfg(loom)]
#[derive(Debug, Default)]
pub(crate) struct AccessTracker(loom::cell::UnsafeCell<()>);

#[cfg(loom)]
impl AccessTracker {
    pub(crate) fn read<T>(&self, f: impl FnOnce() -> T) -> T {
        self.0.with(|_| f())
    }
    pub(crate) fn write<T>(&self, f: impl FnOnce() -> T) -> T {
        self.0.with_mut(|_| f())
    }
}

#[cfg(not(loom))]
#[derive(Debug, Default)]
pub(crate) struct AccessTracker;

#[cfg(not(loom))]
impl AccessTracker {
    #[inline(always)]
    pub(crate) fn read<T>(&self, f: impl FnOnce() -> T) -> T {
        f()
    }
    #[inline(always)]
    pub(crate) fn write<T>(&self, f: impl FnOnce() -> T) -> T {
        f()
    }
}
