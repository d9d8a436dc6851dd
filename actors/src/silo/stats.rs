//! Per grain type statistics: what an operator's metrics are made of
//! ([`Silo::grain_type_stats`](super::Silo::grain_type_stats)).
//!
//! 1. **Where.** Each registered grain type keeps its counters in relaxed
//!    atomics; a snapshot reads them, and the type's directory for what is
//!    live and queued now. Nothing here takes a lock on a message's path.
//! 2. **Messages.** An activation counts the messages it runs (each call,
//!    tell, read and timer or reminder tick) in a local counter, and adds
//!    it to its type's every [`FLUSH_EVERY`] messages, whenever it waits
//!    for the next message, and when it ends. So a snapshot counts every
//!    message of an idle activation, and lags a busy one by fewer than
//!    `FLUSH_EVERY`.
//! 3. **Turn time.** One turn in [`SAMPLE_EVERY`] per activation is timed
//!    (two clock reads), from its start to its end, into a histogram with
//!    fixed bounds ([`TURN_SECONDS_BOUNDS`]); a turn that ran nothing (an
//!    expired message) is no sample, and a batch of reads is one turn.
//!    Turns run while an activation deactivates are not sampled. A
//!    sampled histogram estimates the distribution; its count is the
//!    number of samples, not of messages.
//! 4. **Failures** are counted once per message, where they happen, by
//!    [`FailureReason`]: at the activation (a handler that panicked, a
//!    message whose remote sender's deadline passed before its turn, a
//!    message dropped with the silo's homes, a message dropped because its
//!    activation failed to start) and at the caller on this silo (a call,
//!    grain-to-grain call included, that timed out waiting for room,
//!    delivery or the reply; a remote sender's timeout is its own silo's,
//!    and the home counts the message as expired). Failures are off the
//!    fast path: counting them costs nothing when nothing fails.
//! 5. **Activations** started and ended are counted as they happen; the
//!    activations taking messages now, and the messages waiting in their
//!    mailboxes, are read from the type's directory when the snapshot is
//!    taken. A mailbox's count is what waits in its channel: an activation
//!    takes its queue in batches, so messages it has taken but not run yet
//!    (behind a long turn) are not in it, nor are senders waiting for
//!    room in a full mailbox (they wait at most their timeout).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::histogram::{Histogram, HistogramSnapshot};

/// Messages an activation runs between two additions to its type's count
/// (rule 2).
pub(super) const FLUSH_EVERY: u64 = 64;

/// One message in this many is timed (rule 3).
pub(super) const SAMPLE_EVERY: u64 = 16;

/// Upper bounds of the turn-time histogram's buckets, in seconds (rule 3);
/// a last bucket holds everything slower.
pub const TURN_SECONDS_BOUNDS: [f64; 12] = [
    1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 1.0,
];

/// Why a message of a grain type failed (rule 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureReason {
    /// Its handler panicked (the activation was reset).
    Panicked,
    /// Its sender's deadline passed before its turn started: not run.
    Expired,
    /// Dropped unrun when the silo gave its homes up after a stall.
    DroppedWithHome,
    /// Dropped because the activation it was for failed to start
    /// (`Grain::new` panicked or `on_activate` failed).
    ActivationFailed,
    /// A caller on this silo waited its whole timeout (for room, delivery
    /// or the reply).
    Timeout,
    /// Refused: the grain had no activation and the silo held its
    /// `activation_limit`.
    Overloaded,
}

impl FailureReason {
    /// Every reason, in the order of [`GrainTypeStats::failures`].
    pub const ALL: [FailureReason; 6] = [
        FailureReason::Panicked,
        FailureReason::Expired,
        FailureReason::DroppedWithHome,
        FailureReason::ActivationFailed,
        FailureReason::Timeout,
        FailureReason::Overloaded,
    ];

    /// The reason as a metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Panicked => "panicked",
            FailureReason::Expired => "expired",
            FailureReason::DroppedWithHome => "dropped_with_home",
            FailureReason::ActivationFailed => "activation_failed",
            FailureReason::Timeout => "timeout",
            FailureReason::Overloaded => "overloaded",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A grain type's counters (rules 1 to 5).
pub(super) struct TypeStats {
    messages: AtomicU64,
    turns: Histogram,
    failures: [AtomicU64; FailureReason::ALL.len()],
    started: AtomicU64,
    ended: AtomicU64,
}

impl Default for TypeStats {
    fn default() -> TypeStats {
        TypeStats {
            messages: AtomicU64::new(0),
            turns: Histogram::new(&TURN_SECONDS_BOUNDS),
            failures: Default::default(),
            started: AtomicU64::new(0),
            ended: AtomicU64::new(0),
        }
    }
}

impl TypeStats {
    /// Adds `messages` run by one activation (rule 2).
    pub(super) fn add_messages(&self, messages: u64) {
        if messages > 0 {
            self.messages.fetch_add(messages, Ordering::Relaxed);
        }
    }

    /// Records one sampled turn's time (rule 3).
    pub(super) fn record_turn(&self, took: std::time::Duration) {
        self.turns.record(took);
    }

    /// Counts one failure (rule 4).
    pub(crate) fn failed(&self, reason: FailureReason) {
        self.failures[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn activation_started(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn activation_ended(&self) {
        self.ended.fetch_add(1, Ordering::Relaxed);
    }

    /// The snapshot of these counters, with what the directory says now
    /// (rule 5).
    pub(super) fn snapshot(
        &self,
        grain_type: &str,
        stateless: bool,
        live_activations: u64,
        mailbox_depth: u64,
    ) -> GrainTypeStats {
        GrainTypeStats {
            grain_type: grain_type.to_string(),
            stateless,
            messages: self.messages.load(Ordering::Relaxed),
            failures: FailureReason::ALL
                .iter()
                .map(|reason| {
                    (
                        *reason,
                        self.failures[reason.index()].load(Ordering::Relaxed),
                    )
                })
                .collect(),
            activations_started: self.started.load(Ordering::Relaxed),
            activations_ended: self.ended.load(Ordering::Relaxed),
            live_activations,
            mailbox_depth,
            turn_seconds: self.turns.snapshot(),
        }
    }
}

/// A grain type's statistics at one moment (rules 1 to 5).
#[derive(Debug, Clone, PartialEq)]
pub struct GrainTypeStats {
    /// The type's registered name.
    pub grain_type: String,
    /// Registered as a stateless worker.
    pub stateless: bool,
    /// Messages run by its activations (rule 2).
    pub messages: u64,
    /// Failures, by reason, in the order of [`FailureReason::ALL`].
    pub failures: Vec<(FailureReason, u64)>,
    /// Activations started since the silo was built.
    pub activations_started: u64,
    /// Activations ended since the silo was built.
    pub activations_ended: u64,
    /// Activations taking messages now (not those deactivating).
    pub live_activations: u64,
    /// Messages waiting in its activations' mailboxes now, not yet taken
    /// (rule 5).
    pub mailbox_depth: u64,
    /// Sampled turn times (rule 3), bounded by [`TURN_SECONDS_BOUNDS`].
    pub turn_seconds: HistogramSnapshot,
}

/// An activation's side of rules 2 and 3: its local count, and whether the
/// next turn is sampled.
pub(super) struct ActivationCounts {
    unflushed: u64,
    until_sample: u64,
}

impl ActivationCounts {
    pub(super) fn new() -> ActivationCounts {
        ActivationCounts {
            unflushed: 0,
            // The first turn is sampled, so a grain called once is seen.
            until_sample: 0,
        }
    }

    /// Whether the next turn is timed (rule 3).
    pub(super) fn sample_next(&mut self) -> bool {
        if self.until_sample == 0 {
            self.until_sample = SAMPLE_EVERY - 1;
            true
        } else {
            self.until_sample -= 1;
            false
        }
    }

    /// Counts `messages` run, adding them to `stats` every `FLUSH_EVERY`.
    pub(super) fn ran(&mut self, messages: u64, stats: &TypeStats) {
        self.unflushed += messages;
        if self.unflushed >= FLUSH_EVERY {
            self.flush(stats);
        }
    }

    /// Adds what is counted to `stats` (rule 2).
    pub(super) fn flush(&mut self, stats: &TypeStats) {
        stats.add_messages(std::mem::take(&mut self.unflushed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn turns_fall_in_the_first_bucket_that_holds_them() {
        let stats = TypeStats::default();
        stats.record_turn(Duration::from_nanos(500));
        stats.record_turn(Duration::from_micros(5));
        stats.record_turn(Duration::from_millis(2));
        stats.record_turn(Duration::from_secs(3));
        let snapshot = stats.snapshot("t", false, 0, 0);
        let histogram = snapshot.turn_seconds;
        assert_eq!(histogram.count, 4);
        assert_eq!(histogram.buckets[0], 1, "500 ns ≤ 1 µs");
        assert_eq!(histogram.buckets[1], 1, "5 µs ≤ 5 µs");
        assert_eq!(histogram.buckets[7], 1, "2 ms ≤ 5 ms");
        assert_eq!(
            histogram.buckets[TURN_SECONDS_BOUNDS.len()],
            1,
            "3 s: slower"
        );
        assert!((histogram.sum_seconds - 3.002_005_5).abs() < 1e-9);
    }

    #[test]
    fn an_activation_flushes_every_so_often_and_samples_one_in_sixteen() {
        let stats = TypeStats::default();
        let mut counts = ActivationCounts::new();
        let sampled = (0..64).filter(|_| counts.sample_next()).count();
        assert_eq!(sampled as u64, 64 / SAMPLE_EVERY);
        for _ in 0..FLUSH_EVERY - 1 {
            counts.ran(1, &stats);
        }
        assert_eq!(stats.snapshot("t", false, 0, 0).messages, 0);
        counts.ran(1, &stats);
        assert_eq!(stats.snapshot("t", false, 0, 0).messages, FLUSH_EVERY);
        counts.ran(3, &stats);
        counts.flush(&stats);
        assert_eq!(stats.snapshot("t", false, 0, 0).messages, FLUSH_EVERY + 3);
    }

    #[test]
    fn failures_are_counted_by_reason() {
        let stats = TypeStats::default();
        stats.failed(FailureReason::Timeout);
        stats.failed(FailureReason::Timeout);
        stats.failed(FailureReason::Panicked);
        let failures = stats.snapshot("t", false, 0, 0).failures;
        assert_eq!(failures[0], (FailureReason::Panicked, 1));
        assert_eq!(failures[4], (FailureReason::Timeout, 2));
        assert_eq!(failures[1].1 + failures[2].1 + failures[3].1, 0);
    }
}
