//! The idle collector (`actors/src/silo/collector.rs`): idleness counted
//! in whole sweeps, a turn counted busy however long it runs, shedding
//! the longest idle and no more than the excess, and a collector that
//! belongs to no runtime.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use granary_actors::{Grain, GrainContext, GrainId, GrainKey, Handler, Message, Silo, SiloConfig};

/// Counts its activations and deactivations (a silo service).
#[derive(Default)]
struct Lives {
    activated: AtomicU64,
    /// `on_deactivate` started.
    deactivating: AtomicU64,
    /// `on_deactivate` ended.
    deactivated: AtomicU64,
}

/// How long `on_deactivate` takes (a silo service; none by default).
struct SlowExit(Duration);

/// Adds, and sleeps as long as asked.
struct Sleeper(u64);

impl Grain for Sleeper {
    fn new(_: &GrainKey) -> Sleeper {
        Sleeper(0)
    }

    async fn on_activate(
        &mut self,
        ctx: &mut GrainContext,
    ) -> Result<(), granary_actors::ActivationError> {
        if let Some(lives) = ctx.service::<Lives>() {
            lives.activated.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn on_deactivate(&mut self, ctx: &mut GrainContext) {
        if let Some(lives) = ctx.service::<Lives>() {
            lives.deactivating.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(SlowExit(slow)) = ctx.service::<SlowExit>().as_deref() {
            tokio::time::sleep(*slow).await;
        }
        if let Some(lives) = ctx.service::<Lives>() {
            lives.deactivated.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Adds one after sleeping `.0`; answers the count.
struct Nap(Duration);
impl Message for Nap {
    type Reply = u64;
}
impl Handler<Nap> for Sleeper {
    async fn handle(&mut self, Nap(nap): Nap, _: &mut GrainContext) -> u64 {
        tokio::time::sleep(nap).await;
        self.0 += 1;
        self.0
    }
}

fn silo(idle_timeout: Duration) -> (Silo, Arc<Lives>) {
    silo_with(SiloConfig {
        idle_timeout,
        ..SiloConfig::default()
    })
}

fn silo_with(config: SiloConfig) -> (Silo, Arc<Lives>) {
    silo_exiting(config, Duration::ZERO)
}

fn silo_exiting(config: SiloConfig, exit: Duration) -> (Silo, Arc<Lives>) {
    let lives = Arc::new(Lives::default());
    let silo = Silo::builder()
        .register::<Sleeper>("sleeper")
        .service(lives.clone())
        .service(Arc::new(SlowExit(exit)))
        .config(config)
        .build()
        .expect("a silo");
    (silo, lives)
}

fn id(key: u64) -> GrainId {
    GrainId {
        type_name: "sleeper".to_string(),
        key: GrainKey::U64(key),
    }
}

/// Activates grains 0..10, waits `gap`, then activates grains 10..60:
/// sixty live, the first ten idle longest.
async fn ten_then_fifty(silo: &Silo, gap: Duration) {
    for key in 0..10u64 {
        silo.grain::<Sleeper>(key)
            .call(Nap(Duration::ZERO))
            .await
            .unwrap();
    }
    tokio::time::sleep(gap).await;
    for key in 10..60u64 {
        silo.grain::<Sleeper>(key)
            .call(Nap(Duration::ZERO))
            .await
            .unwrap();
    }
}

/// Waits until `done` holds, failing after 10 s.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_for_counts_whole_periods_and_a_call_sets_it_back_to_zero() {
    // Sweeps every 500 ms (a quarter of the idle timeout).
    let (silo, lives) = silo(Duration::from_secs(2));
    let grain = silo.grain::<Sleeper>(1u64);
    assert_eq!(silo.idle_for(&id(1)), None, "no activation yet");
    assert_eq!(grain.call(Nap(Duration::ZERO)).await.unwrap(), 1);
    assert_eq!(silo.idle_for(&id(1)), Some(Duration::ZERO), "just worked");
    eventually("idle through a period or more", || {
        silo.idle_for(&id(1))
            .is_some_and(|idle| idle >= Duration::from_millis(500))
    })
    .await;
    let idle = silo.idle_for(&id(1)).unwrap();
    assert_eq!(idle.as_millis() % 500, 0, "whole periods: {idle:?}");
    assert_eq!(grain.call(Nap(Duration::ZERO)).await.unwrap(), 2);
    assert_eq!(
        silo.idle_for(&id(1)),
        Some(Duration::ZERO),
        "a call ends the idleness"
    );
    eventually("collected", || !grain.is_active()).await;
    assert_eq!(lives.deactivated.load(Ordering::SeqCst), 1);
    assert_eq!(silo.idle_for(&id(1)), None, "no activation any more");
    assert_eq!(silo.idle_for(&id(2)), None, "never activated");
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_longer_than_the_idle_timeout_counts_as_busy_throughout() {
    // Sweeps every 50 ms; the turn takes eight idle timeouts, and is
    // watched for all but the last one.
    let (silo, lives) = silo(Duration::from_millis(200));
    let grain = silo.grain::<Sleeper>(7u64);
    let long = tokio::spawn({
        let grain = grain.clone();
        async move { grain.call(Nap(Duration::from_millis(1600))).await }
    });
    eventually("activated", || lives.activated.load(Ordering::SeqCst) == 1).await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1400) {
        assert_eq!(
            silo.idle_for(&id(7)),
            Some(Duration::ZERO),
            "busy in a turn is not idle"
        );
        assert_eq!(lives.deactivated.load(Ordering::SeqCst), 0);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Queued while the turn still runs, so it runs on the same
    // activation whatever the machine's delays.
    let next = tokio::spawn({
        let grain = grain.clone();
        async move { grain.call(Nap(Duration::ZERO)).await }
    });
    assert_eq!(long.await.unwrap().unwrap(), 1);
    assert_eq!(next.await.unwrap().unwrap(), 2);
    assert_eq!(lives.activated.load(Ordering::SeqCst), 1);
    eventually("collected once idle", || !grain.is_active()).await;
    assert_eq!(lives.deactivated.load(Ordering::SeqCst), 1);
    silo.shutdown().await;
}

#[test]
fn the_collector_belongs_to_no_runtime() {
    let (silo, lives) = silo(Duration::from_millis(20));
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    };
    // The first runtime's activation starts the collector; the runtime
    // goes away with the idle activation's task.
    runtime().block_on(async {
        silo.grain::<Sleeper>(1u64)
            .call(Nap(Duration::ZERO))
            .await
            .unwrap();
    });
    // A grain activated on the next runtime is collected by the same
    // collector, which no runtime owns.
    runtime().block_on(async {
        let grain = silo.grain::<Sleeper>(2u64);
        grain.call(Nap(Duration::ZERO)).await.unwrap();
        eventually("collected", || !grain.is_active()).await;
        assert!(lives.deactivated.load(Ordering::SeqCst) >= 1);
        silo.shutdown().await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shedding_takes_the_longest_idle_and_stops_at_the_limit() {
    // Sweeps every 500 ms; the idle timeout (four sweeps) is not reached
    // by the grains that stay before the test ends.
    let (silo, lives) = silo_with(SiloConfig {
        idle_timeout: Duration::from_secs(2),
        max_activations: Some(50),
        ..SiloConfig::default()
    });
    // Ten grains go idle first; two sweeps later fifty more come: ten too
    // many, and the first ten have idled longest.
    ten_then_fifty(&silo, Duration::from_millis(1100)).await;
    eventually("shed to the limit", || {
        lives.deactivated.load(Ordering::SeqCst) == 10
    })
    .await;
    // Another sweep: nothing more is shed at the limit.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(lives.deactivated.load(Ordering::SeqCst), 10);
    assert_eq!(silo.live_activations(), 50);
    for key in 0..10u64 {
        assert!(
            !silo.grain::<Sleeper>(key).is_active(),
            "{key} idled longest"
        );
    }
    for key in 10..60u64 {
        assert!(
            silo.grain::<Sleeper>(key).is_active(),
            "{key} is within the limit"
        );
    }
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grain_activated_between_the_collectors_walks_is_collected_in_time() {
    // Sweeps every 100 ms; the collector reads the directory only when
    // its oldest stamp can be due, so the second grain, younger than
    // what the last walk saw, must not be forgotten until a later walk.
    let (silo, lives) = silo(Duration::from_millis(400));
    let first = silo.grain::<Sleeper>(1u64);
    let second = silo.grain::<Sleeper>(2u64);
    first.call(Nap(Duration::ZERO)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    second.call(Nap(Duration::ZERO)).await.unwrap();
    let started = Instant::now();
    eventually("the first collected", || !first.is_active()).await;
    assert!(second.is_active(), "the second is younger");
    eventually("the second collected", || !second.is_active()).await;
    // Idle 400 ms plus at most two periods of lateness, with room for a
    // slow machine; a forgotten grain would wait for the next walk of an
    // unrelated grain, or for ever.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(lives.deactivated.load(Ordering::SeqCst), 2);
    // The directory is empty now; a grain activated after that walk is
    // collected too.
    let third = silo.grain::<Sleeper>(3u64);
    third.call(Nap(Duration::ZERO)).await.unwrap();
    let started = Instant::now();
    eventually("the third collected", || !third.is_active()).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_deactivation_is_not_shed_twice_over() {
    // Sweeps every second; each deactivation takes 2.5 s, so the ten shed
    // are still live (ending) through the next sweep.
    let (silo, lives) = silo_exiting(
        SiloConfig {
            idle_timeout: Duration::from_secs(4),
            max_activations: Some(50),
            ..SiloConfig::default()
        },
        Duration::from_millis(2500),
    );
    ten_then_fifty(&silo, Duration::from_millis(2200)).await;
    eventually("ten shed", || {
        lives.deactivating.load(Ordering::SeqCst) == 10
    })
    .await;
    assert_eq!(silo.live_activations(), 60, "still ending");
    // The next sweep comes while they end: the excess is already on its
    // way out, so nothing more is shed.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(lives.deactivating.load(Ordering::SeqCst), 10);
    for key in 0..10u64 {
        assert!(
            silo.grain::<Sleeper>(key).is_active(),
            "{key} is still ending"
        );
    }
    // An activation leaves the live count just after `on_deactivate`.
    eventually("ended", || silo.live_activations() == 50).await;
    assert_eq!(lives.deactivated.load(Ordering::SeqCst), 10);
    silo.shutdown().await;
}
