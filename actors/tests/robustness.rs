//! Failure cases that must neither hang nor lose the activation: a caller
//! that gives up inside a reentrant call, a grain whose constructor panics,
//! a grain that calls itself while deactivating, and extreme timeouts.

use std::time::{Duration, Instant};

use granary_actors::{
    CallError, Grain, GrainContext, GrainKey, Handler, Message, Silo, SiloConfig,
};

struct Node {
    seen: u32,
}

impl Grain for Node {
    fn new(key: &GrainKey) -> Node {
        if *key == GrainKey::from("cursed") {
            panic!("cannot build this one");
        }
        Node { seen: 0 }
    }

    async fn on_deactivate(&mut self, ctx: &mut GrainContext) {
        if ctx.id().key == GrainKey::from("selfish") {
            // A call to itself while deactivating: must fail, not hang.
            let me = ctx.silo().grain::<Node>("selfish");
            let _ = me.call(Count).await;
        }
    }
}

struct Count;
impl Message for Count {
    type Reply = u32;
}
impl Handler<Count> for Node {
    async fn handle(&mut self, _: Count, _: &mut GrainContext) -> u32 {
        self.seen += 1;
        self.seen
    }
}

struct Slow;
impl Message for Slow {
    type Reply = ();
}
impl Handler<Slow> for Node {
    async fn handle(&mut self, _: Slow, _: &mut GrainContext) {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Calls `Slow` on another node through `ctx.call`, giving up after 50 ms.
struct Impatient;
impl Message for Impatient {
    type Reply = bool;
}
impl Handler<Impatient> for Node {
    async fn handle(&mut self, _: Impatient, ctx: &mut GrainContext) -> bool {
        let other = ctx.silo().grain::<Node>("other");
        tokio::time::timeout(Duration::from_millis(50), ctx.call(self, &other, Slow))
            .await
            .is_err()
    }
}

fn silo(config: SiloConfig) -> Silo {
    Silo::builder()
        .register::<Node>("node")
        .config(config)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giving_up_on_a_reentrant_call_keeps_the_mailbox() {
    let silo = silo(SiloConfig::default());
    let node = silo.grain::<Node>("a");
    let queued = {
        let node = node.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            node.call(Count).await
        })
    };
    assert!(
        node.call(Impatient).await.unwrap(),
        "the inner call timed out"
    );
    // The message queued behind the turn ran, and the grain goes on.
    assert_eq!(queued.await.unwrap().unwrap(), 1);
    assert_eq!(node.call(Count).await.unwrap(), 2);
    assert_eq!(
        silo.activations_started(),
        2,
        "a and other; a was never lost"
    );
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_constructor_fails_calls_promptly() {
    // The default 30 s call timeout: a call that waited it out would end
    // in `Timeout`, not `TurnFailed`, and the bound below leaves a loaded
    // machine room while still far short of it.
    let silo = silo(SiloConfig::default());
    let started = Instant::now();
    assert!(matches!(
        silo.grain::<Node>("cursed").call(Count).await,
        Err(CallError::TurnFailed { .. })
    ));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // Other grains are fine.
    assert_eq!(silo.grain::<Node>("fine").call(Count).await.unwrap(), 1);
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grain_calling_itself_while_deactivating_does_not_hang() {
    // A call timeout that the calls after the deactivation keep to even on
    // a loaded machine.
    let silo = silo(SiloConfig {
        call_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_millis(50),
        ..SiloConfig::default()
    });
    let node = silo.grain::<Node>("selfish");
    assert_eq!(node.call(Count).await.unwrap(), 1);
    // It deactivates when idle; its self-call times out; then it is gone
    // (bounded only so that a hang fails rather than hangs the test).
    let deadline = Instant::now() + Duration::from_secs(30);
    while silo.live_activations() > 0 {
        assert!(Instant::now() < deadline, "never deactivated");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(node.call(Count).await.unwrap(), 1, "a new activation");
    let started = Instant::now();
    silo.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown returns"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbounded_call_timeout_is_accepted() {
    let silo = silo(SiloConfig {
        call_timeout: Duration::MAX,
        idle_timeout: Duration::MAX,
        ..SiloConfig::default()
    });
    assert_eq!(silo.grain::<Node>("x").call(Count).await.unwrap(), 1);
    silo.shutdown().await;
}
