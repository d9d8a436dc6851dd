//! Faults a test injects into the CPU backend's persistent kernels.
//!
//! A persistent kernel that hangs keeps its device busy and stops beating
//! its heartbeat; the GPU bridge must notice, fail what was pending, and
//! relaunch it, and an operator's readiness probe must say so meanwhile.
//! These hooks let a test (or a `granary node` started with
//! `GRANARY_TEST_KERNEL_HANG`) make that happen on a machine with no GPU.
//!
//! 1. **Shared.** Every clone of a [`CpuHooks`] is the same set of hooks,
//!    and every kernel a [`CpuBackend`](crate::CpuBackend) launches (its
//!    relaunches included) holds a clone of its backend's hooks.
//! 2. **One hang.** [`CpuHooks::hang_after`] arms one hang: the kernel
//!    thread that takes the `after + 1`-th request (counted over every
//!    kernel of the backend from the moment it is armed) holds it for
//!    `duration` without beating its heartbeat, then processes it as usual.
//!    Exactly one request hangs; a kernel launched later (the relaunch)
//!    serves normally unless the hook is armed again.
//! 3. **Stoppable.** A hung kernel still obeys an abandoning stop: it looks
//!    at its stop flag every millisecond while it holds the request and, if
//!    stopped, exits without answering it (as a device kernel stuck in a
//!    loop never would), so a test's threads end promptly.
//! 4. **Free when unarmed.** An unarmed hook costs the kernel one acquire
//!    load per request (a plain load on x86). Arming it again while a
//!    kernel thread is between counting down and taking the hang may hand
//!    the new hang to that thread: arm it once per test.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Hooks that make the CPU backend's kernels misbehave on purpose (module
/// rules 1–4).
#[derive(Debug, Clone, Default)]
pub struct CpuHooks {
    state: Arc<HookState>,
}

#[derive(Debug, Default)]
struct HookState {
    /// Whether a hang is armed (rule 4: the only load on the fast path).
    armed: AtomicBool,
    /// Requests still to pass before the hang.
    remaining: AtomicU64,
    /// How long the hang lasts, in microseconds.
    hang_micros: AtomicU64,
}

impl CpuHooks {
    /// Hooks with nothing armed.
    pub fn new() -> CpuHooks {
        CpuHooks::default()
    }

    /// Arms one hang (rule 2): `after` requests pass, then the next one is
    /// held for `duration` without a heartbeat.
    pub fn hang_after(&self, after: u64, duration: Duration) {
        let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        self.state.hang_micros.store(micros, Ordering::Relaxed);
        self.state.remaining.store(after, Ordering::Relaxed);
        self.state.armed.store(true, Ordering::Release);
    }

    /// Whether a hang is armed and has not happened yet.
    pub fn is_armed(&self) -> bool {
        self.state.armed.load(Ordering::Acquire)
    }

    /// Called by a kernel thread for each request it takes: how long to
    /// hold it (rule 2), if this is the one.
    pub(crate) fn on_request(&self) -> Option<Duration> {
        if !self.state.armed.load(Ordering::Acquire) {
            return None;
        }
        // Count this request down; the one that finds zero hangs. A
        // concurrent disarm (another kernel took the hang) leaves zero too,
        // so `armed` is swapped off by exactly one thread.
        let passed = self
            .state
            .remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(1)
            })
            .is_ok();
        if passed {
            return None;
        }
        if !self.state.armed.swap(false, Ordering::AcqRel) {
            return None;
        }
        Some(Duration::from_micros(
            self.state.hang_micros.load(Ordering::Relaxed),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_the_request_after_the_count_hangs_once() {
        let hooks = CpuHooks::new();
        assert_eq!(hooks.on_request(), None);
        hooks.hang_after(2, Duration::from_millis(5));
        assert!(hooks.is_armed());
        assert_eq!(hooks.on_request(), None);
        assert_eq!(hooks.clone().on_request(), None);
        assert_eq!(hooks.on_request(), Some(Duration::from_millis(5)));
        assert!(!hooks.is_armed());
        assert_eq!(hooks.on_request(), None);
    }

    #[test]
    fn racing_kernels_hang_one_request_between_them() {
        let hooks = CpuHooks::new();
        hooks.hang_after(100, Duration::from_millis(1));
        let hangs: usize = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    let hooks = hooks.clone();
                    scope.spawn(move || (0..50).filter(|_| hooks.on_request().is_some()).count())
                })
                .collect();
            workers
                .into_iter()
                .map(|worker| worker.join().unwrap_or_default())
                .sum()
        });
        assert_eq!(hangs, 1);
    }
}
