//! What the node counts of its calls to other silos
//! ([`ClusterNode::stats`](super::ClusterNode::stats)).
//!
//! 1. Each request sent to another silo is timed, from handing it to the
//!    connection to its answer (two clock reads against a network round
//!    trip), into a histogram with fixed bounds
//!    ([`REMOTE_SECONDS_BOUNDS`]).
//! 2. Each answer that sends the call elsewhere or later is counted by
//!    kind: `Moved` (the home is another silo), `Retry` (the home is in
//!    flux), `NoRoom` (the silo's devices cannot take the grain),
//!    `Overloaded` and `ShutDown`.
//! 3. Each grain that moves away from this silo (`migration.rs`) is timed,
//!    from the request to the source letting go, and its state's bytes
//!    added up; a move that did not happen is counted.
//! 4. Each rebalancer decision (`rebalance.rs`) is counted by its reason,
//!    once it is carried out or has failed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use granary_actors::histogram::{Histogram, HistogramSnapshot};

use crate::rebalance::Reason;

/// Upper bounds of the remote call histogram's buckets, in seconds; a last
/// bucket holds everything slower.
pub const REMOTE_SECONDS_BOUNDS: [f64; 10] = [
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 0.01, 0.05, 0.25, 1.0,
];

/// An answer that sent a call elsewhere or later (rule 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Redirect {
    /// The grain's home is another silo.
    Moved,
    /// The grain's home is in flux: ask the directory again.
    Retry,
    /// The silo's devices cannot take the grain: placed elsewhere.
    NoRoom,
    /// The silo is overloaded.
    Overloaded,
    /// The silo is shutting down.
    ShutDown,
}

impl Redirect {
    /// Every kind, in the order of [`ClusterStats::redirects`].
    pub const ALL: [Redirect; 5] = [
        Redirect::Moved,
        Redirect::Retry,
        Redirect::NoRoom,
        Redirect::Overloaded,
        Redirect::ShutDown,
    ];

    /// The kind as a metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Redirect::Moved => "moved",
            Redirect::Retry => "retry",
            Redirect::NoRoom => "no_room",
            Redirect::Overloaded => "overloaded",
            Redirect::ShutDown => "shut_down",
        }
    }
}

/// Upper bounds of the migration histogram's buckets, in seconds.
pub const MIGRATION_SECONDS_BOUNDS: [f64; 8] = [1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

/// The node's counters (rules 1 to 4).
pub(super) struct NodeStats {
    redirects: [AtomicU64; Redirect::ALL.len()],
    /// Per reason, decisions carried out and failed.
    rebalance: [[AtomicU64; 2]; Reason::ALL.len()],
    remote: Histogram,
    migrations: Histogram,
    migrations_failed: AtomicU64,
    migrated_bytes: AtomicU64,
}

impl Default for NodeStats {
    fn default() -> NodeStats {
        NodeStats {
            redirects: Default::default(),
            rebalance: Default::default(),
            remote: Histogram::new(&REMOTE_SECONDS_BOUNDS),
            migrations: Histogram::new(&MIGRATION_SECONDS_BOUNDS),
            migrations_failed: AtomicU64::new(0),
            migrated_bytes: AtomicU64::new(0),
        }
    }
}

impl NodeStats {
    pub(super) fn redirected(&self, redirect: Redirect) {
        self.redirects[redirect as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn remote_call(&self, took: Duration) {
        self.remote.record(took);
    }

    /// A grain moved away from here (rule 3).
    pub(super) fn migrated(&self, took: Duration, bytes: u64) {
        self.migrations.record(took);
        self.migrated_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A move away from here did not happen, or its outcome is unknown
    /// (rule 3).
    pub(super) fn migration_failed(&self) {
        self.migrations_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// A rebalancer decision for `reason` was carried out, or failed
    /// (rule 4).
    pub(super) fn rebalanced(&self, reason: Reason, done: bool) {
        self.rebalance[reason as usize][usize::from(!done)].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self) -> ClusterStats {
        ClusterStats {
            rebalance: Reason::ALL
                .iter()
                .map(|reason| {
                    let [done, failed] = &self.rebalance[*reason as usize];
                    RebalanceCount {
                        reason: *reason,
                        done: done.load(Ordering::Relaxed),
                        failed: failed.load(Ordering::Relaxed),
                    }
                })
                .collect(),
            redirects: Redirect::ALL
                .iter()
                .map(|kind| {
                    (
                        *kind,
                        self.redirects[*kind as usize].load(Ordering::Relaxed),
                    )
                })
                .collect(),
            remote_calls: self.remote.snapshot(),
            migrations: self.migrations.snapshot(),
            migrations_failed: self.migrations_failed.load(Ordering::Relaxed),
            migrated_bytes: self.migrated_bytes.load(Ordering::Relaxed),
        }
    }
}

/// The node's calls to other silos, counted (rules 1 and 2).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterStats {
    /// Answers that sent a call elsewhere or later, by kind, in the order
    /// of [`Redirect::ALL`].
    pub redirects: Vec<(Redirect, u64)>,
    /// The latency of requests to other silos that were answered, bounded
    /// by [`REMOTE_SECONDS_BOUNDS`].
    pub remote_calls: HistogramSnapshot,
    /// Grains that moved away from this silo, by how long each move took
    /// (from the request to the source letting go), bounded by
    /// [`MIGRATION_SECONDS_BOUNDS`].
    pub migrations: HistogramSnapshot,
    /// Moves away from this silo that did not happen.
    pub migrations_failed: u64,
    /// The bytes of the dehydrated states that moved away.
    pub migrated_bytes: u64,
    /// The rebalancer's decisions, by reason, in the order of
    /// [`Reason::ALL`].
    pub rebalance: Vec<RebalanceCount>,
}

/// The rebalancer's decisions for one reason (rule 4): moves, or for
/// [`Reason::Pressure`] deactivations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebalanceCount {
    /// Why.
    pub reason: Reason,
    /// Carried out.
    pub done: u64,
    /// Tried, and failed (the grain stayed where it was).
    pub failed: u64,
}
