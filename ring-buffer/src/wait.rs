//! How a blocked party waits: spin, then yield, then park.
//!
//! A device cannot wake a host thread, so parking is always bounded: a parked
//! thread re-checks the ring at least every `park_max`. Threads parked
//! through handles of the same [`crate::Ring`] (one host view) wake each
//! other early:
//! - `close()` wakes every thread parked through that view at once, with a
//!   full fence, so none of them misses it;
//! - a push or a pop wakes the other side's parked threads when it sees one
//!   registered. That check is a relaxed load, kept off the fast path's
//!   fences, so in a narrow race a waiter sleeps until its park interval ends
//!   instead (under `--cfg loom` the check is fenced so the model stays
//!   exact).
//!
//! Threads parked through another view of the same memory, like a device,
//! notice changes at their next re-check, within `park_max`.

use std::sync::PoisonError;
use std::time::{Duration, Instant};

use crate::loom::{AtomicU64, AtomicUsize, Condvar, Mutex, Ordering, fence, spin_hint, yield_now};

/// A waiting policy: how many times to spin, then to yield, then how long to
/// park between checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitPolicy {
    /// Busy-wait steps before yielding. Each step is one `spin_loop` hint.
    pub spins: u32,
    /// `yield_now` steps before parking.
    pub yields: u32,
    /// First park interval; doubles on each park up to `park_max`. Intervals
    /// below 1 µs are raised to 1 µs.
    pub park_min: Duration,
    /// Longest park interval: the worst-case delay to notice a device's
    /// progress. Must be at least `park_min`.
    pub park_max: Duration,
}

impl Default for WaitPolicy {
    /// 128 spins, 16 yields, then parks from 10 µs growing to 1 ms.
    fn default() -> WaitPolicy {
        WaitPolicy {
            spins: 128,
            yields: 16,
            park_min: Duration::from_micros(10),
            park_max: Duration::from_millis(1),
        }
    }
}

impl WaitPolicy {
    /// Never parks: spin then yield forever. Lowest latency, burns a core.
    pub fn busy() -> WaitPolicy {
        WaitPolicy {
            spins: 1024,
            yields: u32::MAX,
            ..WaitPolicy::default()
        }
    }
}

/// The shortest park: a zero interval would turn parking into a busy loop.
const MIN_PARK: Duration = Duration::from_micros(1);

/// One wait in progress: tracks which phase the policy is in and the deadline.
pub(crate) struct Waiting<'p> {
    policy: &'p WaitPolicy,
    deadline: Option<Instant>,
    /// Steps taken so far; saturates.
    step: u32,
    /// Next park interval, in `park_min..=park_max`.
    park: Duration,
}

impl<'p> Waiting<'p> {
    pub(crate) fn new(policy: &'p WaitPolicy, timeout: Option<Duration>) -> Waiting<'p> {
        Waiting {
            policy,
            deadline: timeout.and_then(|t| Instant::now().checked_add(t)),
            step: 0,
            park: policy.park_min.max(MIN_PARK),
        }
    }

    /// Waits one step. Returns `false` once the deadline has passed.
    /// `heartbeat` is the waiting side's heartbeat, advanced on each yield
    /// and park step so a blocked party still shows it is alive.
    pub(crate) fn step(
        &mut self,
        waiters: &Waiters,
        heartbeat: &AtomicU64,
        still_blocked: impl Fn() -> bool,
    ) -> bool {
        let policy = self.policy;
        if self.step < policy.spins {
            // No heartbeat here: every blocked producer shares one
            // heartbeat line, and spinning threads would fight over it.
            spin_hint();
            // Reading the clock costs more than a spin step: look at the
            // deadline every 64 spins only (a spin phase is short).
            if self.step % 64 != 63 {
                self.step += 1;
                return true;
            }
        } else if self.step - policy.spins < policy.yields {
            heartbeat.fetch_add(1, Ordering::Relaxed);
            yield_now();
        } else {
            heartbeat.fetch_add(1, Ordering::Relaxed);
            let mut park = self.park;
            if let Some(deadline) = self.deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                park = park.min(left);
            }
            waiters.park(park, still_blocked);
            let longest = policy.park_max.max(policy.park_min).max(MIN_PARK);
            self.park = self.park.saturating_mul(2).min(longest);
        }
        self.step = self.step.saturating_add(1);
        match self.deadline {
            Some(deadline) => Instant::now() < deadline,
            None => true,
        }
    }
}

/// Host threads parked on one condition of a ring (not empty, or not full).
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    /// Threads between registering and leaving `park`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    condvar: Condvar,
}

impl Waiters {
    /// Parks for at most `interval` unless `still_blocked()` turns false.
    fn park(&self, interval: Duration, still_blocked: impl Fn() -> bool) {
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        // Pairs with the fence in `wake_all`: either the waker sees this
        // sleeper, or this thread's check below sees the waker's state.
        fence(Ordering::SeqCst);
        let guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        if still_blocked() {
            // A spurious or timed-out wake is fine: the caller re-checks.
            drop(self.condvar.wait_timeout(guard, interval));
        } else {
            drop(guard);
        }
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Wakes every parked thread, with no lost wake-up: used by `close()`.
    pub(crate) fn wake_all(&self) {
        fence(Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.condvar.notify_all();
        }
    }

    /// Wakes parked threads if any are visible, after a push or a pop. See
    /// the module docs for why this check is relaxed outside loom.
    #[inline]
    pub(crate) fn wake_if_parked(&self) {
        #[cfg(loom)]
        self.wake_all();
        #[cfg(not(loom))]
        if self.sleepers.load(Ordering::Relaxed) > 0 {
            self.wake_all();
        }
    }
}
