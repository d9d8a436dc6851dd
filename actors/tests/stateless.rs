//! Stateless workers: up to `max_workers` activations of one key share its
//! load; ordinary grains keep exactly one.

use std::time::{Duration, Instant};

use granary_actors::{Grain, GrainContext, GrainKey, Handler, Message, Silo, SiloError};

struct Hasher;
impl Grain for Hasher {
    fn new(_: &GrainKey) -> Hasher {
        Hasher
    }
}

/// Work that takes 100 ms of waiting.
struct Work(u64);
impl Message for Work {
    type Reply = u64;
}
impl Handler<Work> for Hasher {
    async fn handle(&mut self, Work(n): Work, _: &mut GrainContext) -> u64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        n * 2
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateless_worker_spreads_one_key_over_several_activations() {
    let silo = Silo::builder()
        .register_stateless::<Hasher>("hasher", 4)
        .build()
        .unwrap();
    let started = Instant::now();
    let calls: Vec<_> = (0..8u64)
        .map(|n| {
            let hasher = silo.grain::<Hasher>("pool");
            tokio::spawn(async move { hasher.call(Work(n)).await })
        })
        .collect();
    for (n, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), 2 * n as u64);
    }
    // Eight 100 ms turns on four workers: two rounds, not eight.
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_millis(500), "{elapsed:?}");
    assert_eq!(silo.activations_started(), 4, "never more than max_workers");
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordinary_grain_runs_the_same_load_one_turn_at_a_time() {
    let silo = Silo::builder()
        .register::<Hasher>("hasher")
        .build()
        .unwrap();
    let started = Instant::now();
    let calls: Vec<_> = (0..4u64)
        .map(|n| {
            let hasher = silo.grain::<Hasher>("single");
            tokio::spawn(async move { hasher.call(Work(n)).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(silo.activations_started(), 1);
    silo.shutdown().await;
}

#[test]
fn zero_workers_is_refused() {
    assert!(matches!(
        Silo::builder().register_stateless::<Hasher>("h", 0).build(),
        Err(SiloError::InvalidConfig(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_worker_is_not_chosen_while_a_slot_is_free() {
    let silo = Silo::builder()
        .register_stateless::<Hasher>("hasher", 4)
        .build()
        .unwrap();
    let hasher = silo.grain::<Hasher>("pool");
    let first = {
        let hasher = hasher.clone();
        tokio::spawn(async move { hasher.call(Work(1)).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The first worker is mid-turn with an empty mailbox: a second call
    // starts a second worker instead of queueing behind it.
    let started = Instant::now();
    assert_eq!(hasher.call(Work(2)).await.unwrap(), 4);
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(first.await.unwrap().unwrap(), 2);
    assert_eq!(silo.activations_started(), 2);
    silo.shutdown().await;
}
