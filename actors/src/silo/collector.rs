//! The idle collector: one thread per silo that finds the activations
//! idle long enough and tells them to deactivate (rule 5 of
//! `silo/mod.rs`), and the stamps `Silo::idle_for` reads. Orleans'
//! activation collector does the same job. Before it, every activation
//! armed an interval of its own: a silo holding a million grains woke a
//! million tasks a second to find them idle, and each paid a boxed timer
//! for it (`BENCHMARKS.md`, "Live grains and the actor ask").
//!
//! # Rules
//!
//! 1. **Sweeps are numbered.** The collector sweeps every [`period`] (a
//!    quarter of `idle_timeout`, from 100 µs to 1 s, so that shedding
//!    reacts to memory pressure within a second); each sweep first
//!    advances the silo's sweep number; sweeps start at least a period
//!    apart (a late one does not bring the next forward). The collector
//!    runs on a thread of its own, started with the silo's first
//!    activation: it belongs to no runtime (a silo may serve from several,
//!    one after another), and its walk over the directory runs on no
//!    runtime's worker (it holds each directory shard's read lock while it
//!    reads that shard, as any reader does). It holds the silo weakly
//!    between sweeps, and ends at the first sweep after the silo shut down
//!    or was dropped.
//! 2. **Activations stamp their mailbox** (`mailbox.rs` rule 8): busy
//!    (the [`BUSY`] bit set) from the moment the activation is made until
//!    its grain is activated (or has arrived), and while any turn or pause
//!    runs, so that neither is collected in its middle; otherwise the
//!    sweep number current when
//!    the grain was activated, or when a turn that keeps it alive (rule 8
//!    of `silo/mod.rs`) ended last. A turn that does not keep it alive (a
//!    timer's tick) puts back the stamp it found; a pause puts it back
//!    moved on by the sweeps the pause lasted (neither activity nor
//!    idleness). The stamp is `BUSY` before the activation's entry is in
//!    the directory.
//! 3. **Idle is counted in whole periods.** At sweep `n`, an activation
//!    stamped `s` was last active in period `s` (which ended when sweep
//!    `s + 1` began), so it has been idle through `n - 1 - s` periods. It
//!    is a candidate when those periods reach `idle_timeout` and its
//!    mailbox is empty (a message waiting is work to do, and one waiting
//!    `Turn::Collect` is enough): the collector queues `Turn::Collect(n)`
//!    without waiting. The activation deactivates on it only if its stamp
//!    is still below `n` and nothing else waits in its mailbox then: a
//!    message that came in meanwhile, before or after the collect, keeps
//!    it alive, and no decision taken on a stale stamp ends it.
//! 4. **Shedding takes the oldest, and no more than it must.** While the
//!    silo holds more than `max_activations`, a candidate needs one idle
//!    period only, and a sweep collects at most the excess, the longest
//!    idle first: every candidate stamped before the excess-th oldest
//!    stamp, then from those stamped with it. The excess is counted net
//!    of the activations already on their way out: those that left their
//!    loop to deactivate, however told, counted in `ending` ([`Ending`])
//!    until they are gone, and the shedding collects not yet taken, each
//!    carrying a [`Shed`] token counted in `shedding` until its activation
//!    counts as ending (or kept the grain, or the collect was dropped). So
//!    a slow deactivation is not shed twice over.
//! 5. **A sweep reads the directory only when something can be due.**
//!    A stamp only moves forward over an activation's life (a turn or a
//!    pause puts back at least what it found), and a new activation's is
//!    at least the sweep number when it is made; so after a walk at sweep
//!    `n` that found `o` the oldest stamp, nothing can be a candidate
//!    before sweep `o + 1 + periods`, and the sweeps before it only
//!    advance the sweep number. (An entry whose mailbox closed is dead,
//!    its activation gone or going, and does not count; one activation in
//!    a long turn or pause holds the walks at every sweep while it lasts,
//!    rightly.) A busy stamp keeps
//!    the stamp it had below [`BUSY`], which is what it is put back to
//!    at the latest (or a newer sweep number), so it counts as that. A
//!    silo above `max_activations` walks at every sweep.
//! 6. **Nothing is held while sending.** The senders to collect are listed
//!    under the directory's read locks, one shard at a time, and told
//!    after: the collector never holds a directory lock while it takes a
//!    mailbox's.
//! 7. **The stamp and the sweep number are sequentially consistent.** An
//!    activation stores `BUSY`, later reads the sweep number and stores
//!    it; the collector advances the sweep number, then reads the stamp.
//!    In one total order, a collector that missed the `BUSY` advanced the
//!    sweep number before the turn's end read it, so the turn's new stamp
//!    is at least `n` and keeps the grain.
//! 8. **`idle_for` is read, not kept.** [`Silo::idle_for`] answers from
//!    the stamp of the grain's directory entry: `n - 1 - s` periods after
//!    sweep `n`, zero while it activates, is paused or runs a turn, and
//!    `None` while it departs or deactivates (its entry is then
//!    `Deactivating`) and once its mailbox closed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::envelope::{Envelope, Turn, fresh_chain};
use super::registry::{Entry, GrainType};
use super::{Silo, SiloInner};
use crate::grain::Grain;
use crate::key::GrainKey;

/// The bit set in the stamp of an activation that activates or runs a
/// turn or a pause (rule 2); the bits below it keep the stamp it had
/// (rule 5).
pub(super) const BUSY: u64 = 1 << 63;

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
    if stamp & BUSY != 0 {
        0
    } else {
        sweep.saturating_sub(1).saturating_sub(stamp)
    }
}

/// A shedding collect's place in the silo's count of activations being
/// shed (rule 4), given back when dropped.
pub(crate) struct Shed(Arc<AtomicU64>);

impl Shed {
    fn new(shedding: &Arc<AtomicU64>) -> Shed {
        shedding.fetch_add(1, Ordering::AcqRel);
        Shed(shedding.clone())
    }
}

impl Drop for Shed {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An activation's place among those ending (rule 4), from leaving its
/// loop until it is gone.
pub(super) struct Ending(Silo);

impl Ending {
    pub(super) fn new(silo: &Silo) -> Ending {
        silo.inner.ending.fetch_add(1, Ordering::AcqRel);
        Ending(silo.clone())
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        self.0.inner.ending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What `Turn::Collect` carries: the sweep that chose the activation, and
/// whether it sheds (rules 3 and 4).
pub(crate) struct Collecting {
    pub(super) sweep: u64,
    pub(super) shed: Option<Shed>,
}

/// Which candidates a sweep collects (rules 3 and 4).
#[derive(Debug, Clone, Copy)]
pub(super) struct Choose {
    /// The sweep's number.
    sweep: u64,
    /// Idle periods a candidate needs.
    periods: u64,
    /// The newest stamp collected (rule 4); `u64::MAX` for any.
    newest: u64,
}

/// One grain type as the collector sees it.
pub(super) trait Collect: Send + Sync {
    /// The type's registered name.
    fn name(&self) -> &str;
    /// Adds the stamps of the type's candidates to `stamps` (rule 4).
    fn stamps(&self, choose: Choose, stamps: &mut Vec<u64>);
    /// Tells at most `budget` candidates to deactivate, taking what it
    /// told from `budget`, each with a [`Shed`] counted in `shedding` if
    /// given (rules 3, 4 and 6). Returns the oldest stamp it saw, a busy
    /// activation's as the stamp under its busy bit (rule 5); `u64::MAX`
    /// for none.
    fn collect(&self, choose: Choose, budget: &mut u64, shedding: Option<&Arc<AtomicU64>>) -> u64;
    /// The stamp of `key`'s activation, if it has one, its mailbox is open
    /// and it is not a stateless worker (rule 8).
    fn stamp(&self, key: &GrainKey) -> Option<u64>;
}

impl<G: Grain> GrainType<G> {
    /// Calls `found` with each candidate's sender and stamp (rule 3);
    /// returns the oldest stamp seen (rule 5).
    fn candidates(&self, choose: Choose, mut found: impl FnMut(&SenderOf<G>, u64)) -> u64 {
        let mut oldest = u64::MAX;
        for slots in self.directory.iter() {
            for slot in slots.iter() {
                let Some(Entry::Active(sender)) = slot else {
                    continue;
                };
                if sender.is_closed() {
                    // Rule 5: dead.
                    continue;
                }
                let stamp = sender.activity();
                oldest = oldest.min(stamp & !BUSY);
                if sender.capacity() == sender.max_capacity()
                    && stamp <= choose.newest
                    && idle_periods(choose.sweep, stamp) >= choose.periods
                {
                    found(sender, stamp);
                }
            }
        }
        oldest
    }
}

type SenderOf<G> = crate::mailbox::Sender<Envelope<G>>;

impl<G: Grain> Collect for GrainType<G> {
    fn name(&self) -> &str {
        &self.name
    }

    fn stamps(&self, choose: Choose, stamps: &mut Vec<u64>) {
        let _ = self.candidates(choose, |_, stamp| stamps.push(stamp));
    }

    fn collect(&self, choose: Choose, budget: &mut u64, shedding: Option<&Arc<AtomicU64>>) -> u64 {
        let mut idle = Vec::new();
        let oldest = self.candidates(choose, |sender, _| {
            if *budget > 0 {
                *budget -= 1;
                idle.push(sender.clone());
            }
        });
        for sender in idle {
            // Rule 3: filled or closed since: looked at again next sweep,
            // if still there.
            let _ = sender.try_send(Envelope {
                chain: fresh_chain(),
                keeps_alive: false,
                expires: None,
                turn: Turn::Collect(Collecting {
                    sweep: choose.sweep,
                    shed: shedding.map(Shed::new),
                }),
            });
        }
        oldest
    }

    fn stamp(&self, key: &GrainKey) -> Option<u64> {
        if self.stateless {
            return None;
        }
        let slots = self.directory.get(key)?;
        slots.iter().find_map(|slot| match slot {
            Some(Entry::Active(sender)) if !sender.is_closed() => Some(sender.activity()),
            _ => None,
        })
    }
}

/// The newest stamp among the `excess` oldest of `stamps` (rule 4):
/// collecting every candidate stamped at most that, `excess` at most,
/// takes the longest idle first. `u64::MAX` when there are no more
/// candidates than that.
pub(super) fn newest_of_oldest(stamps: &mut [u64], excess: u64) -> u64 {
    let excess = usize::try_from(excess).unwrap_or(usize::MAX);
    if excess == 0 || stamps.len() <= excess {
        return u64::MAX;
    }
    *stamps.select_nth_unstable(excess - 1).1
}

/// Starts the silo's collector unless it runs (rule 1). Called as an
/// activation is made.
pub(super) fn ensure_running(silo: &Silo) {
    let inner = &silo.inner;
    if inner.collecting.load(Ordering::Acquire)
        || inner.shutting_down.load(Ordering::Acquire)
        || inner.collecting.swap(true, Ordering::AcqRel)
    {
        return;
    }
    let weak = Arc::downgrade(&silo.inner);
    let every = period(inner.config.idle_timeout);
    let spawned = std::thread::Builder::new()
        .name("granary-collector".into())
        .spawn(move || {
            let _running = Running(weak.clone());
            let mut next = Instant::now() + every;
            // Rule 5: the first sweep at which something can be due.
            let mut due = 0;
            loop {
                let now = Instant::now();
                if now < next {
                    std::thread::sleep(next - now);
                    continue;
                }
                // Rule 1: a period after this one began, however late it
                // is (a stalled machine), never a burst to catch up.
                next = now + every;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                if inner.shutting_down.load(Ordering::Acquire) {
                    return;
                }
                sweep(&inner, every, &mut due);
            }
        });
    if let Err(err) = spawned {
        // The next activation tries again.
        tracing::warn!(error = %err, "the idle collector's thread did not start");
        inner.collecting.store(false, Ordering::Release);
    }
}

/// One sweep (rules 1, 3 to 5); `due` is the first sweep that needs to
/// read the directory, moved on by each one that does.
fn sweep(inner: &SiloInner, every: Duration, due: &mut u64) {
    let sweep = inner.sweep.fetch_add(1, Ordering::SeqCst) + 1;
    let idle = inner.config.idle_timeout;
    // Whole periods that make `idle_timeout`, at least one.
    let periods = idle.as_nanos().div_ceil(every.as_nanos().max(1)).max(1);
    let periods = u64::try_from(periods).unwrap_or(u64::MAX);
    let live = inner.live.load(Ordering::Relaxed);
    // Rule 4: net of the activations already on their way out.
    let excess = inner.config.max_activations.map_or(0, |most| {
        live.saturating_sub(most)
            .saturating_sub(inner.ending.load(Ordering::Acquire))
            .saturating_sub(inner.shedding.load(Ordering::Acquire))
    });
    if excess == 0 {
        if sweep < *due {
            return;
        }
        let choose = Choose {
            sweep,
            periods,
            newest: u64::MAX,
        };
        let mut budget = u64::MAX;
        let mut oldest = u64::MAX;
        for grain_type in &inner.collected {
            oldest = oldest.min(grain_type.collect(choose, &mut budget, None));
        }
        // Rule 5 (an activation told now counts too: it may stay; and one
        // made after this walk is stamped at least `sweep`).
        *due = oldest.min(sweep).saturating_add(1).saturating_add(periods);
        return;
    }
    // Rule 5: crowded, every sweep reads; so does the first after.
    *due = 0;
    let crowded = Choose {
        sweep,
        periods: 1,
        newest: u64::MAX,
    };
    let mut stamps = Vec::new();
    for grain_type in &inner.collected {
        grain_type.stamps(crowded, &mut stamps);
    }
    let newest = newest_of_oldest(&mut stamps, excess);
    let mut budget = excess;
    // Those stamped before the cut first, then those stamped with it: a
    // candidate told once holds a collect, and is no candidate the second
    // time round.
    for newest in [newest.saturating_sub(1), newest] {
        for grain_type in &inner.collected {
            grain_type.collect(
                Choose { newest, ..crowded },
                &mut budget,
                Some(&inner.shedding),
            );
        }
    }
}

/// Marks the collector stopped however its thread ends, so that a silo
/// still in use (the thread panicked) starts another with its next
/// activation.
struct Running(Weak<SiloInner>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.collecting.store(false, Ordering::Release);
        }
    }
}

impl Silo {
    /// The sweep number now (`collector.rs` rules 1 and 7).
    pub(super) fn sweep_number(&self) -> u64 {
        self.inner.sweep.load(Ordering::SeqCst)
    }

    /// How long `grain`'s activation here has been idle (no message that
    /// keeps it alive, rule 8), in whole periods of the idle collector (a
    /// quarter of `idle_timeout`, at most a second; `collector.rs` rule 8),
    /// and zero while it activates, is paused or runs a turn and from the
    /// turn that ended its idleness on. `None` when it has no open
    /// activation here (none, or one departing or deactivating), or is a
    /// stateless worker. What a cluster reads to move or shed the
    /// grains idle longest first.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_periods_count_whole_periods_since_the_stamp() {
        // Stamped in period 3: idle through none until sweep 5 began.
        assert_eq!(idle_periods(4, 3), 0);
        assert_eq!(idle_periods(5, 3), 1);
        assert_eq!(idle_periods(9, 3), 5);
        // Worked after the last sweep: not idle.
        assert_eq!(idle_periods(4, 4), 0);
        assert_eq!(idle_periods(0, 0), 0);
        assert_eq!(idle_periods(u64::MAX - 1, BUSY), 0);
    }

    #[test]
    fn shedding_takes_the_oldest_stamps_and_no_more() {
        let mut stamps = vec![7, 3, 9, 3, 5, 1];
        // The three oldest are 1, 3, 3: everything stamped 3 or before.
        assert_eq!(newest_of_oldest(&mut stamps, 3), 3);
        let mut stamps = vec![7, 3, 9, 3, 5, 1];
        assert_eq!(newest_of_oldest(&mut stamps, 1), 1);
        // No more candidates than the excess: all of them.
        let mut stamps = vec![4, 2];
        assert_eq!(newest_of_oldest(&mut stamps, 2), u64::MAX);
        assert_eq!(newest_of_oldest(&mut [], 5), u64::MAX);
        assert_eq!(newest_of_oldest(&mut [1, 2], 0), u64::MAX);
    }

    #[test]
    fn the_period_is_a_quarter_of_the_idle_timeout_within_bounds() {
        assert_eq!(
            period(Duration::from_millis(400)),
            Duration::from_millis(100)
        );
        assert_eq!(period(Duration::from_secs(900)), Duration::from_secs(1));
        assert_eq!(period(Duration::ZERO), Duration::from_micros(100));
    }
}
