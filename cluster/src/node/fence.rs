//! Fencing after a stall: a silo whose own runtime stood still long enough
//! that its peers may take it for dead stops serving its homes before it
//! takes calls again (rule 7 of the protocol in `node/mod.rs`).
//!
//! 1. A task on the node's runtime stamps the time every quarter of a
//!    gossip interval (or every eighth of the fence bound, if that is
//!    sooner; at least every millisecond). A watchdog on an OS thread of its own, which a
//!    blocked runtime does not stop, reads the stamp.
//! 2. When the stamp is older than the fence bound, the watchdog fences the
//!    silo at once, from its own thread: it sets the fenced flag (every
//!    message that would make this silo a home is refused with `Retry`,
//!    so callers go back to the directory) and ends every home lease (no
//!    reference delivers to an activation here without the router). This
//!    happens while the runtime is still stalled, so nothing it runs when
//!    it wakes is served as before.
//! 3. The bound is 60% of the soonest the silo can be declared dead
//!    (`phi_threshold` gossip intervals of silence plus `death_grace`
//!    under gossip; the lease's time to live under etcd): the silo fences
//!    itself before anyone can place its grains elsewhere. Under etcd the
//!    watchdog also ends every home lease as soon as the silo can no
//!    longer be sure it holds its etcd lease.
//!    From the same thread it gives every home up in the local silo
//!    (rule 13 of `silo/mod.rs` in `granary-actors`): when the runtime
//!    wakes, each activation finishes the turn it was in and runs nothing
//!    more; what was queued is dropped unrun (a caller, here or on another
//!    silo, is told `Unavailable`; every dropped message is counted in
//!    `Silo::dropped_with_homes`).
//!    While fenced, the directory entries this silo owns are not answered
//!    either (`Retry`): they may be stale.
//! 4. Once the runtime runs again, the node forgets every home and waits
//!    until each activation here has ended (`on_deactivate` writes state;
//!    ETags refuse a write from an activation whose grain moved on), and
//!    forgets the homes it had learned. Grains it was home to are placed
//!    afresh by their next call, from their persisted state.
//!    The fence stays until every activation has ended, however long
//!    that takes (a turn that never ends keeps the silo fenced, with a
//!    warning every call timeout).
//! 5. Then, under gossip, it comes back as a new incarnation of its
//!    address (`incarnation.rs`): peers see the old incarnation replaced by
//!    the new one, drop whatever named the old, and re-register with the
//!    new one the homes whose entries it now owns, as for any silo that
//!    joins; the entries it owned as the old incarnation are dropped, and
//!    until its peers know the new one it answers `Retry` for an entry it
//!    lacks. The fence lifts once the silo has its new identity. So a stall
//!    leaves no activation of a grain that moved and keeps no entry that
//!    went stale while the silo was taken for dead. A silo that cannot
//!    rejoin stops serving. Under etcd the directory is not the silo's to
//!    rebuild: the fence lifts as soon as every activation has ended, and
//!    a silo that lost its lease has stopped already.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::{ClusterNode, Inner};

/// What the watchdog and the runtime share (rule 1).
pub(super) struct Fence {
    /// Set while the silo serves no home (rules 2 and 4).
    fenced: AtomicBool,
    /// Milliseconds since `epoch` when the runtime last stamped.
    stamp: AtomicU64,
    epoch: Instant,
    /// Times the silo fenced itself.
    fences: AtomicU64,
}

impl Fence {
    pub(super) fn new() -> Fence {
        Fence {
            fenced: AtomicBool::new(false),
            stamp: AtomicU64::new(0),
            epoch: Instant::now(),
            fences: AtomicU64::new(0),
        }
    }

    /// Whether the silo is fenced now.
    pub(super) fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// How many times the silo has fenced itself.
    pub(super) fn count(&self) -> u64 {
        self.fences.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn stamp(&self) {
        self.stamp.store(self.now_ms(), Ordering::Release);
    }

    /// How long the runtime has not stamped.
    fn silence(&self) -> Duration {
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.stamp.load(Ordering::Acquire)),
        )
    }
}

/// The soonest gossip peers can declare a silo dead under `config`.
pub(super) fn gossip_death(config: &super::NodeConfig) -> Duration {
    // Saturating: a huge threshold or interval (refused by `validate`,
    // but this must not panic) is "never".
    Duration::try_from_secs_f64(
        config.gossip_interval.as_secs_f64() * config.phi_threshold.max(0.0),
    )
    .unwrap_or(Duration::MAX)
    .saturating_add(config.death_grace)
}

/// The fence bound (rule 3): 60% of the soonest the silo can be declared
/// dead (`death`: gossip's detector, or an etcd lease's time to live).
pub(super) fn bound(death: Duration) -> Duration {
    death.mul_f64(0.6)
}

/// Starts the stamping task on the current runtime and the watchdog thread
/// (rule 1). Both end when the node is gone or stopped.
pub(super) fn start(inner: &Arc<Inner>, death: Duration) -> tokio::task::JoinHandle<()> {
    inner.fence.stamp();
    let limit = bound(death);
    // Stamp and look often enough that the bound is met well within it.
    let every = (inner.config.gossip_interval / 4)
        .min(limit / 8)
        .max(Duration::from_millis(1));
    let weak = Arc::downgrade(inner);
    let stamping = tokio::spawn({
        let weak = weak.clone();
        async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                inner.fence.stamp();
            }
        }
    });
    let runtime = tokio::runtime::Handle::current();
    let spawned = std::thread::Builder::new()
        .name("granary-fence".into())
        .spawn(move || watch(weak, runtime, every, limit));
    if let Err(err) = spawned {
        tracing::error!(error = %err, "cannot start the fence watchdog; a stalled silo will not fence itself");
    }
    stamping
}

/// The watchdog (rules 1 and 2).
fn watch(node: Weak<Inner>, runtime: tokio::runtime::Handle, every: Duration, limit: Duration) {
    loop {
        std::thread::sleep(every);
        let Some(inner) = node.upgrade() else { return };
        if inner.stopped.load(Ordering::Acquire) {
            return;
        }
        // Under etcd, a lease the silo can no longer be sure of ends every
        // home lease at once, from this thread (the node's own watcher
        // then stops it).
        if !inner.holds_lease() {
            inner.end_leases();
            continue;
        }
        if inner.fence.is_fenced() || inner.fence.silence() < limit {
            continue;
        }
        // Rule 2, from this thread: nothing the stalled runtime runs when
        // it wakes is served as before.
        inner.fence.fenced.store(true, Ordering::Release);
        inner.fence.fences.fetch_add(1, Ordering::Relaxed);
        inner.end_leases();
        inner.home_side.give_up_homes();
        tracing::warn!(
            silo = %inner.id(),
            silence = ?inner.fence.silence(),
            "the silo's runtime stood still long enough to be taken for dead: fencing"
        );
        let node = ClusterNode {
            inner: inner.clone(),
        };
        drop(inner);
        runtime.spawn(async move { recover(node).await });
    }
}

/// Rules 4 and 5: the homes go, the silo comes back as a new incarnation
/// (under gossip), then the fence lifts.
async fn recover(node: ClusterNode) {
    // Rule 4: the fence stays until every activation has ended, however
    // long that takes: one still running could run beside the grain's new
    // home.
    node.deactivate_homes_within(None).await;
    let inner = &node.inner;
    // Learned homes are hints, forgotten.
    for member in inner.view().iter() {
        inner.cache.forget_silo(&member.silo);
    }
    if matches!(inner.directory, super::DirectoryBackend::Partitioned) {
        match super::incarnation::rejoin(&node).await {
            super::incarnation::Rejoined::As(silo) => {
                inner.fence.fenced.store(false, Ordering::Release);
                tracing::info!(%silo, "fence lifted: every home here was given up, and the silo is a new incarnation");
            }
            super::incarnation::Rejoined::Stopped => {}
        }
        return;
    }
    inner.fence.fenced.store(false, Ordering::Release);
    tracing::info!(silo = %inner.id(), "fence lifted: every home here was given up");
}
