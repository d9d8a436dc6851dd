//! Stateless workers: up to `max_workers` activations of one key share its
//! load; ordinary grains keep exactly one.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// A turn that holds its worker until the test opens the gate: counts the
/// turns running now and the most that ever ran at once.
#[derive(Clone)]
struct Gate {
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    open: tokio::sync::watch::Receiver<bool>,
}

struct Hold(Gate, u64);
impl Message for Hold {
    type Reply = u64;
}
impl Handler<Hold> for Hasher {
    async fn handle(&mut self, Hold(mut gate, n): Hold, _: &mut GrainContext) -> u64 {
        let now = gate.running.fetch_add(1, Ordering::SeqCst) + 1;
        gate.peak.fetch_max(now, Ordering::SeqCst);
        let _ = gate.open.wait_for(|open| *open).await;
        gate.running.fetch_sub(1, Ordering::SeqCst);
        n * 2
    }
}

fn gate() -> (Gate, tokio::sync::watch::Sender<bool>) {
    let (open, gate) = tokio::sync::watch::channel(false);
    (
        Gate {
            running: Arc::default(),
            peak: Arc::default(),
            open: gate,
        },
        open,
    )
}

/// Waits until `count` turns hold their workers (bounded only so that a
/// broken runtime fails rather than hangs).
async fn holding(gate: &Gate, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while gate.running.load(Ordering::SeqCst) < count {
        assert!(Instant::now() < deadline, "turns did not start");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateless_worker_spreads_one_key_over_several_activations() {
    let silo = Silo::builder()
        .register_stateless::<Hasher>("hasher", 4)
        .build()
        .unwrap();
    let (gate, open) = gate();
    let calls: Vec<_> = (0..8u64)
        .map(|n| {
            let hasher = silo.grain::<Hasher>("pool");
            let gate = gate.clone();
            tokio::spawn(async move { hasher.call(Hold(gate, n)).await })
        })
        .collect();
    // Four turns of one key run at once (four workers), not one.
    holding(&gate, 4).await;
    open.send_replace(true);
    for (n, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), 2 * n as u64);
    }
    assert_eq!(
        gate.peak.load(Ordering::SeqCst),
        4,
        "never more than max_workers"
    );
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
    let (gate, open) = gate();
    let first = {
        let (hasher, gate) = (hasher.clone(), gate.clone());
        tokio::spawn(async move { hasher.call(Hold(gate, 1)).await })
    };
    holding(&gate, 1).await;
    // The first worker is mid-turn with an empty mailbox and holds until
    // the gate opens: a second call can only finish if it starts a second
    // worker instead of queueing behind it.
    assert_eq!(hasher.call(Work(2)).await.unwrap(), 4);
    assert!(
        !first.is_finished(),
        "the first turn still holds its worker"
    );
    open.send_replace(true);
    assert_eq!(first.await.unwrap().unwrap(), 2);
    assert_eq!(silo.activations_started(), 2);
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_activation_limit_busy_workers_still_take_the_key_s_messages() {
    // Room for two activations; the key could have four workers.
    let silo = Silo::builder()
        .register_stateless::<Hasher>("hasher", 4)
        .configure(|config| config.activation_limit = Some(2))
        .build()
        .expect("the silo builds");
    let worker = silo.grain::<Hasher>("busy");
    let (gate, open) = gate();
    // One at a time: each holds its worker before the next is sent.
    let mut held = Vec::new();
    for n in 0..2u64 {
        let (worker, held_gate) = (worker.clone(), gate.clone());
        held.push(tokio::spawn(async move {
            worker.call(Hold(held_gate, n)).await
        }));
        holding(&gate, n as usize + 1).await;
    }
    assert_eq!(silo.live_activations(), 2);
    // Both workers busy, a slot free, no room for a third: the message
    // waits in a busy worker's mailbox instead of being refused.
    let queued = {
        let worker = worker.clone();
        tokio::spawn(async move { worker.call(Work(21)).await })
    };
    // Queued, not refused: it waits in a worker's mailbox.
    let deadline = Instant::now() + Duration::from_secs(30);
    while silo
        .grain_type_stats()
        .iter()
        .map(|stats| stats.mailbox_depth)
        .sum::<u64>()
        == 0
    {
        if queued.is_finished() {
            panic!("the third call ended before it queued: {:?}", queued.await);
        }
        assert!(Instant::now() < deadline, "the third call never queued");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    open.send(true).expect("the gate opens");
    for call in held {
        call.await.expect("a held call").expect("answered");
    }
    assert_eq!(
        queued
            .await
            .expect("the queued call")
            .expect("answered, not refused"),
        42
    );
    // Another key has no activation and no room: refused.
    let other = silo.grain::<Hasher>("other").call(Work(1)).await;
    assert!(
        matches!(other, Err(granary_actors::CallError::Overloaded { .. })),
        "{other:?}"
    );
    silo.shutdown().await;
}
