//! The idle collector: one task per silo that finds the activations idle
//! long enough and tells them to deactivate (rule 5 of `silo/mod.rs`), and
//! the stamps `Silo::idle_for` reads. Orleans' activation collector does
//! the same job. Before it, every activation armed an interval of its own:
//! a silo holding a million grains woke a million tasks a second to find
//! them idle, and each paid a boxed timer for it (`BENCHMARKS.md`, issue
//! 18).
//!
//! # Rules
//!
//! 1. **Sweeps are numbered.** The collector sweeps every
//!    [`period`] (a quarter of `idle_timeout`, from 100 µs to 1 s, so that
//!    shedding reacts to memory pressure within a second); each sweep first
//!    advances the silo's sweep number. The task starts with the silo's
//!    first activation, on that activation's runtime, and ends when the
//!    silo shuts down or is dropped; if its runtime goes away first, the
//!    next activation starts another ([`ensure_running`]).
//! 2. **Activations stamp their mailbox** (`mailbox.rs` rule 8): with the
//!    sweep number current when the activation is made, and when a turn
//!    that keeps it alive (rule 8 of `silo/mod.rs`) ends; with [`BUSY`]
//!    while any turn runs, so that a turn longer than the idle timeout is
//!    not collected in its middle. A turn that does not keep the grain
//!    alive (a timer's tick) puts back the stamp it found.
//! 3. **Idle is counted in whole periods.** At sweep `n`, an activation
//!    stamped `s` was last active in period `s` (which ended when sweep
//!    `s + 1` began), so it has been idle through `n - 1 - s` periods. It
//!    is collected when those periods reach `idle_timeout`, or reach one
//!    while the silo holds more than `max_activations`: the collector
//!    queues `Turn::Collect(n)` in its mailbox without waiting (a full
//!    mailbox is a busy grain, looked at again next sweep). The activation
//!    deactivates on it only if its stamp is still below `n` then: a
//!    message that came in meanwhile keeps it alive, and no decision taken
//!    on a stale stamp ends it.
//! 4. **Nothing is held while sending.** The senders to collect are listed
//!    under the directory's read locks, one shard at a time, and told
//!    after: the collector never holds a directory lock while it takes a
//!    mailbox's.
//! 5. **`idle_for` is read, not kept.** [`Silo::idle_for`] answers from the
//!    stamp of the grain's directory entry: `n - 1 - s` periods after sweep
//!    `n`, zero while a turn runs or when it worked since.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::envelope::{Envelope, Turn, fresh_chain};
use super::registry::{Entry, GrainType};
use super::{Silo, SiloInner};
use crate::grain::Grain;
use crate::key::GrainKey;

/// The stamp of an activation running a turn (rule 2).
pub(super) const BUSY: u64 = u64::MAX;

/// How often the collector sweeps, for a silo whose activations are
/// collected after `idle` (rule 1).
pub(super) fn period(idle: Duration) -> Duration {
    (idle / 4)
        .min(Duration::from_secs(1))
        .max(Duration::from_micros(100))
}

/// Whole periods an activation stamped `stamp` has been idle after sweep
/// `sweep` (rule 3); zero while it is busy.
pub(super) fn idle_periods(sweep: u64, stamp: u64) -> u64 {
    if stamp == BUSY {
        0
    } else {
        sweep.saturating_sub(1).saturating_sub(stamp)
    }
}

/// One grain type as the collector sees it.
pub(super) trait Collect: Send + Sync {
    /// The type's registered name.
    fn name(&self) -> &str;
    /// Tells the activations idle for at least `periods` periods after
    /// sweep `sweep` to deactivate (rules 3 and 4).
    fn collect(&self, sweep: u64, periods: u64);
    /// The stamp of `key`'s activation, if it has one and is not a
    /// stateless worker (rule 5).
    fn stamp(&self, key: &GrainKey) -> Option<u64>;
}

impl<G: Grain> Collect for GrainType<G> {
    fn name(&self) -> &str {
        &self.name
    }

    fn collect(&self, sweep: u64, periods: u64) {
        let mut idle = Vec::new();
        for slots in self.directory.iter() {
            for slot in slots.iter() {
                if let Some(Entry::Active(sender)) = slot {
                    if !sender.is_closed() && idle_periods(sweep, sender.activity()) >= periods {
                        idle.push(sender.clone());
                    }
                }
            }
        }
        for sender in idle {
            // Rule 3: full (busy) or closed (already deactivating): looked
            // at again next sweep, if still there.
            let _ = sender.try_send(Envelope {
                chain: fresh_chain(),
                keeps_alive: false,
                expires: None,
                turn: Turn::Collect(sweep),
            });
        }
    }

    fn stamp(&self, key: &GrainKey) -> Option<u64> {
        if self.stateless {
            return None;
        }
        let slots = self.directory.get(key)?;
        slots.iter().find_map(|slot| match slot {
            Some(Entry::Active(sender)) => Some(sender.activity()),
            _ => None,
        })
    }
}

/// Starts the silo's collector unless it runs (rule 1). Called as an
/// activation is made, inside its runtime.
pub(super) fn ensure_running(silo: &Silo) {
    let inner = &silo.inner;
    if inner.collecting.load(Ordering::Acquire)
        || inner.shutting_down.load(Ordering::Acquire)
        || inner.collecting.swap(true, Ordering::AcqRel)
    {
        return;
    }
    let running = Running(Arc::downgrade(&silo.inner));
    let shutdown = inner.shutdown.clone();
    let every = period(inner.config.idle_timeout);
    inner.tasks.spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let Some(inner) = running.0.upgrade() else {
                return;
            };
            sweep(&inner, every);
        }
    });
}

/// One sweep (rules 1 and 3).
fn sweep(inner: &SiloInner, every: Duration) {
    let sweep = inner.sweep.fetch_add(1, Ordering::AcqRel) + 1;
    let idle = inner.config.idle_timeout;
    // Whole periods that make `idle_timeout`, at least one.
    let periods = (idle.as_nanos().div_ceil(every.as_nanos().max(1))).max(1);
    let periods = u64::try_from(periods).unwrap_or(u64::MAX);
    let crowded = inner
        .config
        .max_activations
        .is_some_and(|most| inner.live.load(Ordering::Relaxed) > most);
    let periods = if crowded { 1 } else { periods };
    for grain_type in &inner.collected {
        grain_type.collect(sweep, periods);
    }
}

/// Marks the collector stopped however its task ends (returning, or
/// dropped with its runtime), so that the next activation starts another.
struct Running(Weak<SiloInner>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.collecting.store(false, Ordering::Release);
        }
    }
}

impl Silo {
    /// The sweep number now (`collector.rs` rule 1).
    pub(super) fn sweep_number(&self) -> u64 {
        self.inner.sweep.load(Ordering::Acquire)
    }

    /// How long `grain`'s activation here has been idle (no message that
    /// keeps it alive, rule 8), in whole periods of the idle collector (a
    /// quarter of `idle_timeout`, at most a second; `collector.rs` rule 5),
    /// and zero while a turn runs and from the turn that ended its
    /// idleness on. `None` when it has no activation here, or is a
    /// stateless worker. What a cluster reads to move or shed the grains
    /// idle longest first.
    pub fn idle_for(&self, grain: &crate::GrainId) -> Option<Duration> {
        let grain_type = self
            .inner
            .collected
            .iter()
            .find(|grain_type| grain_type.name() == grain.type_name)?;
        let stamp = grain_type.stamp(&grain.key)?;
        let periods = idle_periods(self.sweep_number(), stamp);
        let every = period(self.inner.config.idle_timeout);
        Some(every.saturating_mul(u32::try_from(periods).unwrap_or(u32::MAX)))
    }
}
