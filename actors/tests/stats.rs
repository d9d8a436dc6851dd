//! Per grain type statistics (`silo/stats.rs`): messages, failures by
//! reason, activations, queued messages and sampled turn times, as
//! `Silo::grain_type_stats` reports them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use granary_actors::{
    CallError, FailureReason, Grain, GrainContext, GrainKey, GrainTypeStats, Handler, Message,
    ReadHandler, Silo, SiloConfig, TURN_SECONDS_BOUNDS,
};
use tokio::sync::Notify;

struct Tally(u64);

impl Grain for Tally {
    fn new(_: &GrainKey) -> Tally {
        Tally(0)
    }
}

struct Add;
impl Message for Add {
    type Reply = u64;
}
impl Handler<Add> for Tally {
    async fn handle(&mut self, _: Add, _: &mut GrainContext) -> u64 {
        self.0 += 1;
        self.0
    }
}

struct Peek;
impl Message for Peek {
    type Reply = u64;
}
impl ReadHandler<Peek> for Tally {
    async fn handle_read(&self, _: Peek, _: &GrainContext) -> u64 {
        self.0
    }
}

struct Boom;
impl Message for Boom {
    type Reply = ();
}
impl Handler<Boom> for Tally {
    async fn handle(&mut self, _: Boom, _: &mut GrainContext) {
        panic!("boom");
    }
}

/// Says its turn started, then holds it until released.
struct Hold {
    started: Arc<Notify>,
    release: Arc<Notify>,
}
impl Message for Hold {
    type Reply = ();
}
impl Handler<Hold> for Tally {
    async fn handle(&mut self, hold: Hold, _: &mut GrainContext) {
        hold.started.notify_one();
        hold.release.notified().await;
    }
}

/// A grain that cannot be activated.
struct Broken;
impl Grain for Broken {
    fn new(_: &GrainKey) -> Broken {
        Broken
    }

    async fn on_activate(
        &mut self,
        _: &mut GrainContext,
    ) -> Result<(), granary_actors::ActivationError> {
        Err(granary_actors::ActivationError("no".into()))
    }
}
impl Handler<Add> for Broken {
    async fn handle(&mut self, _: Add, _: &mut GrainContext) -> u64 {
        0
    }
}

/// A second type, so that statistics are per type.
struct Other;
impl Grain for Other {
    fn new(_: &GrainKey) -> Other {
        Other
    }
}
impl Handler<Add> for Other {
    async fn handle(&mut self, _: Add, _: &mut GrainContext) -> u64 {
        0
    }
}

fn silo(call_timeout: Duration) -> Silo {
    Silo::builder()
        .register::<Tally>("tally")
        .register::<Other>("other")
        .register::<Broken>("broken")
        .config(SiloConfig {
            call_timeout,
            ..SiloConfig::default()
        })
        .build()
        .unwrap()
}

fn of<'a>(stats: &'a [GrainTypeStats], name: &str) -> &'a GrainTypeStats {
    stats
        .iter()
        .find(|stats| stats.grain_type == name)
        .unwrap_or_else(|| panic!("no statistics for {name}"))
}

fn failures(stats: &GrainTypeStats, reason: FailureReason) -> u64 {
    stats
        .failures
        .iter()
        .find(|(counted, _)| *counted == reason)
        .map_or(0, |(_, n)| *n)
}

/// Waits until `ok` holds for the silo's statistics of `name`.
async fn until(silo: &Silo, name: &str, ok: impl Fn(&GrainTypeStats) -> bool) -> GrainTypeStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = silo.grain_type_stats();
        let stats = of(&stats, name);
        if ok(stats) {
            return stats.clone();
        }
        assert!(Instant::now() < deadline, "{stats:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn messages_activations_and_turn_times_are_counted_per_type() {
    let silo = silo(Duration::from_secs(30));
    let before = silo.grain_type_stats();
    assert_eq!(before.len(), 3);
    assert_eq!(of(&before, "tally").messages, 0);
    for key in 0..3u64 {
        for _ in 0..100 {
            silo.grain::<Tally>(key).call(Add).await.unwrap();
        }
        silo.grain::<Tally>(key).read(Peek).await.unwrap();
    }
    silo.grain::<Other>(9u64).call(Add).await.unwrap();
    // Every activation waits for its next message now, so all it ran is
    // counted (rule 2).
    let tally = until(&silo, "tally", |stats| stats.messages == 303).await;
    assert_eq!(tally.activations_started, 3);
    assert_eq!(tally.activations_ended, 0);
    assert_eq!(tally.live_activations, 3);
    assert_eq!(tally.mailbox_depth, 0);
    assert!(!tally.stateless);
    assert!(tally.failures.iter().all(|(_, n)| *n == 0), "{tally:?}");
    // One turn in 16 per activation is timed, the first among them.
    let histogram = &tally.turn_seconds;
    assert_eq!(histogram.buckets.len(), TURN_SECONDS_BOUNDS.len() + 1);
    assert!((3 * 6..=3 * 7).contains(&histogram.count), "{histogram:?}");
    assert_eq!(histogram.buckets.iter().sum::<u64>(), histogram.count);
    assert!(histogram.sum_seconds > 0.0);
    let other = until(&silo, "other", |stats| stats.messages == 1).await;
    assert_eq!(other.activations_started, 1);

    silo.grain::<Tally>(0u64).deactivate().await.unwrap();
    let tally = until(&silo, "tally", |stats| stats.activations_ended == 1).await;
    assert_eq!(tally.live_activations, 2);
}

#[tokio::test]
async fn failures_are_counted_by_reason_and_queued_messages_are_seen() {
    let silo = silo(Duration::from_millis(200));
    // A panicking handler: the call fails, the count says why.
    let boom = silo.grain::<Tally>(1u64).call(Boom).await;
    assert!(
        matches!(boom, Err(CallError::TurnFailed { .. })),
        "{boom:?}"
    );
    until(&silo, "tally", |stats| {
        failures(stats, FailureReason::Panicked) == 1
    })
    .await;

    // A grain that cannot be activated: each message it drops is counted.
    for _ in 0..2 {
        let refused = silo.grain::<Broken>(1u64).call(Add).await;
        assert!(
            matches!(refused, Err(CallError::TurnFailed { .. })),
            "{refused:?}"
        );
    }
    until(&silo, "broken", |stats| {
        failures(stats, FailureReason::ActivationFailed) == 2
    })
    .await;

    // A turn held while tells queue behind it (sent once it holds, so
    // they wait in the mailbox, not taken), and a call that times out.
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let held = silo.grain::<Tally>(2u64);
    held.tell(Hold {
        started: started.clone(),
        release: release.clone(),
    })
    .await
    .unwrap();
    started.notified().await;
    for _ in 0..5 {
        held.tell(Add).await.unwrap();
    }
    assert_eq!(of(&silo.grain_type_stats(), "tally").mailbox_depth, 5);
    let queued = until(&silo, "tally", |stats| stats.mailbox_depth >= 5).await;
    assert!(queued.mailbox_depth >= 5, "{queued:?}");
    let late = held.call(Add).await;
    assert!(matches!(late, Err(CallError::Timeout { .. })), "{late:?}");
    until(&silo, "tally", |stats| {
        failures(stats, FailureReason::Timeout) == 1
    })
    .await;
    // Once the held turn ends, the queue drains: a local call that timed
    // out still runs (only a remote sender's deadline travels with its
    // message, silo rule 11).
    release.notify_one();
    let after = until(&silo, "tally", |stats| {
        stats.mailbox_depth == 0 && stats.messages == 1 + 1 + 5 + 1
    })
    .await;
    assert_eq!(failures(&after, FailureReason::Panicked), 1);
    assert_eq!(failures(&after, FailureReason::Timeout), 1);
    assert_eq!(failures(&after, FailureReason::ActivationFailed), 0);
    assert_eq!(failures(&after, FailureReason::Expired), 0);
}
