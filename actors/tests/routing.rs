//! The routing seam (`route.rs`) with a router of this test's own: silos in
//! one process, each grain's home chosen by its key, messages to another
//! silo encoded and handed to that silo's `HomeSide` as a cluster would.
//! What a grain reference promises must hold whichever silo the grain
//! lives on: typed delivery at home, reentrancy across silos, ordering,
//! deadlines on both ends, tells acknowledged, and typed errors.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use granary_actors::DispatchError;
use granary_actors::route::{Delivered, HomeSide, InboundRequest, Outbound, Router};
use granary_actors::{
    CallError, Grain, GrainContext, GrainId, GrainKey, GrainType, Handler, Message, NamedMessage,
    ReadHandler, Silo, SiloConfig,
};
use serde::{Deserialize, Serialize};

/// Routes by key: grain `k` lives on silo `k % silos`.
struct KeyRouter {
    me: usize,
    sides: Arc<OnceLock<Vec<HomeSide>>>,
    here: AtomicU64,
    sent: AtomicU64,
}

fn home_of(grain: &GrainId, silos: usize) -> usize {
    match grain.key {
        GrainKey::U64(key) => (key % silos as u64) as usize,
        _ => 0,
    }
}

impl Router for KeyRouter {
    fn dispatch(&self, message: Box<dyn Outbound>) -> BoxFuture<'_, Result<Delivered, CallError>> {
        Box::pin(async move {
            let sides = self.sides.get().expect("the test routes after setup");
            let home = home_of(message.grain(), sides.len());
            if home == self.me {
                self.here.fetch_add(1, Ordering::SeqCst);
                message.deliver_here(None).await?;
                return Ok(Delivered::Here);
            }
            self.sent.fetch_add(1, Ordering::SeqCst);
            let payload = message.encode()?;
            let grain = message.grain().clone();
            let name = message.message_name()?.to_string();
            let time_left = message
                .deadline()
                .saturating_duration_since(tokio::time::Instant::now());
            let reply = sides[home]
                .dispatch(InboundRequest {
                    grain_type: &grain.type_name,
                    key: grain.key.clone(),
                    message: &name,
                    payload: &payload,
                    kind: message.kind(),
                    chain: message.chain(),
                    time_left,
                })
                .await
                .map_err(|err| match err {
                    // The call's own failure at the home, as it happened.
                    DispatchError::Call(err) => err,
                    refused => CallError::Unavailable {
                        grain: grain.clone(),
                        reason: refused.to_string(),
                    },
                })?;
            Ok(Delivered::Elsewhere(reply))
        })
    }
}

/// Activations per grain key across every silo, counted in `on_activate`
/// and `on_deactivate`, and which silo each runs on.
#[derive(Default)]
struct Census {
    live: Mutex<std::collections::HashMap<u64, Vec<u64>>>,
}

static CENSUS: OnceLock<Census> = OnceLock::new();

/// A node of a path; remembers what it handled, in order.
#[derive(GrainType)]
#[grain(name = "node", messages(Walk, Mark, Slow), reads(Peek))]
struct Node {
    key: u64,
    seen: Vec<String>,
    silo: u64,
}

impl Grain for Node {
    fn new(key: &GrainKey) -> Node {
        let key = match key {
            GrainKey::U64(key) => *key,
            _ => u64::MAX,
        };
        Node {
            key,
            seen: Vec::new(),
            silo: u64::MAX,
        }
    }

    async fn on_activate(
        &mut self,
        ctx: &mut GrainContext,
    ) -> Result<(), granary_actors::ActivationError> {
        self.silo = ctx.service::<SiloNumber>().map_or(u64::MAX, |n| n.0);
        let census = CENSUS.get_or_init(Census::default);
        let mut live = census.live.lock().unwrap();
        live.entry(self.key).or_default().push(self.silo);
        Ok(())
    }

    async fn on_deactivate(&mut self, _: &mut GrainContext) {
        let census = CENSUS.get_or_init(Census::default);
        let mut live = census.live.lock().unwrap();
        if let Some(silos) = live.get_mut(&self.key) {
            silos.retain(|silo| *silo != self.silo);
        }
    }
}

struct SiloNumber(u64);

/// Walks `path`, through `GrainContext::call` (reentrant); answers the
/// sum of the keys visited and the silos they ran on.
#[derive(Message, Serialize, Deserialize)]
#[message(name = "walk", reply = Result<Walked, String>)]
struct Walk {
    path: Vec<u64>,
    /// How long the last node waits before answering, in ms.
    pause_ms: u64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Walked {
    sum: u64,
    silos: Vec<u64>,
}

impl Handler<Walk> for Node {
    async fn handle(&mut self, walk: Walk, ctx: &mut GrainContext) -> Result<Walked, String> {
        self.seen.push(format!("walk {:?}", walk.path));
        let Some((&next, rest)) = walk.path.split_first() else {
            tokio::time::sleep(Duration::from_millis(walk.pause_ms)).await;
            return Ok(Walked {
                sum: self.key,
                silos: vec![self.silo],
            });
        };
        let target = ctx.grain::<Node>(next);
        let onward = Walk {
            path: rest.to_vec(),
            pause_ms: walk.pause_ms,
        };
        let mut below = ctx
            .call(self, &target, onward)
            .await
            .map_err(|err| err.to_string())??;
        below.sum += self.key;
        below.silos.insert(0, self.silo);
        Ok(below)
    }
}

/// Records a mark; answers what the node has seen so far.
#[derive(Message, Serialize, Deserialize)]
#[message(name = "mark", reply = Vec<String>)]
struct Mark(String);
impl Handler<Mark> for Node {
    async fn handle(&mut self, Mark(mark): Mark, _: &mut GrainContext) -> Vec<String> {
        self.seen.push(mark);
        self.seen.clone()
    }
}

/// What the node has seen, as a read.
#[derive(Message, Serialize, Deserialize)]
#[message(name = "peek", reply = (u64, Vec<String>))]
struct Peek;
impl ReadHandler<Peek> for Node {
    async fn handle_read(&self, _: Peek, _: &GrainContext) -> (u64, Vec<String>) {
        (self.silo, self.seen.clone())
    }
}

/// Counts its runs (process-wide) after holding for `ms`.
#[derive(Message, Serialize, Deserialize)]
#[message(name = "slow")]
struct Slow(u64);
static SLOW_RUNS: AtomicU64 = AtomicU64::new(0);
static SLOW_STARTED: AtomicU64 = AtomicU64::new(0);
impl Handler<Slow> for Node {
    async fn handle(&mut self, Slow(ms): Slow, _: &mut GrainContext) {
        SLOW_STARTED.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        SLOW_RUNS.fetch_add(1, Ordering::SeqCst);
    }
}

/// Holds the grain for `ms` (the give-up test's own, so that its counts
/// are not shared with the deadline test's `Slow`).
struct Hold(u64);
impl Message for Hold {
    type Reply = ();
}
static HOLDS_STARTED: AtomicU64 = AtomicU64::new(0);
impl Handler<Hold> for Node {
    async fn handle(&mut self, Hold(ms): Hold, _: &mut GrainContext) {
        HOLDS_STARTED.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// Registered with no name: it cannot travel.
struct Local;
impl Message for Local {
    type Reply = ();
}
impl Handler<Local> for Node {
    async fn handle(&mut self, _: Local, _: &mut GrainContext) {}
}

/// A stateless worker: answers the silo it ran on.
#[derive(GrainType)]
#[grain(name = "worker", stateless(max_workers = 2))]
struct Worker;
impl Grain for Worker {
    fn new(_: &GrainKey) -> Worker {
        Worker
    }
}
struct Where;
impl Message for Where {
    type Reply = u64;
}
impl Handler<Where> for Worker {
    async fn handle(&mut self, _: Where, ctx: &mut GrainContext) -> u64 {
        ctx.service::<SiloNumber>().map_or(u64::MAX, |n| n.0)
    }
}

struct Cluster {
    silos: Vec<Silo>,
    routers: Vec<Arc<KeyRouter>>,
}

fn cluster(count: usize, call_timeout: Duration) -> Cluster {
    cluster_with(
        count,
        SiloConfig {
            call_timeout,
            ..SiloConfig::default()
        },
    )
}

fn cluster_with(count: usize, config: SiloConfig) -> Cluster {
    let sides = Arc::new(OnceLock::new());
    let mut silos = Vec::new();
    let mut routers = Vec::new();
    let mut homes = Vec::new();
    for n in 0..count {
        let silo = Silo::builder()
            .host::<Node>()
            .host::<Worker>()
            .service(Arc::new(SiloNumber(n as u64)))
            .config(config)
            .build()
            .unwrap();
        let router = Arc::new(KeyRouter {
            me: n,
            sides: sides.clone(),
            here: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        });
        homes.push(silo.route_through(router.clone()).unwrap());
        silos.push(silo);
        routers.push(router);
    }
    assert!(sides.set(homes).is_ok());
    Cluster { silos, routers }
}

impl Cluster {
    async fn shutdown(self) {
        for silo in &self.silos {
            silo.shutdown().await;
        }
    }
}

/// Never two live activations of one key in the census.
fn single_activations(keys: impl IntoIterator<Item = u64>) {
    let census = CENSUS.get_or_init(Census::default);
    let live = census.live.lock().unwrap();
    for key in keys {
        let silos = live.get(&key).cloned().unwrap_or_default();
        assert!(silos.len() <= 1, "grain {key} is live on silos {silos:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_reaches_its_grain_at_home_from_every_silo() {
    let cluster = cluster(3, Duration::from_secs(10));
    // Keys 100..112 live on silo key % 3; each is called from every silo.
    for key in 100..112u64 {
        for silo in &cluster.silos {
            let seen = silo
                .grain::<Node>(key)
                .call(Mark("hi".into()))
                .await
                .unwrap();
            assert_eq!(seen.last().map(String::as_str), Some("hi"));
            let (ran_on, _) = silo.grain::<Node>(key).read(Peek).await.unwrap();
            assert_eq!(ran_on, key % 3, "grain {key} ran at its home");
        }
    }
    for (n, silo) in cluster.silos.iter().enumerate() {
        for key in 100..112u64 {
            let active = silo.grain::<Node>(key).is_active();
            assert_eq!(active, key % 3 == n as u64, "grain {key} on silo {n}");
        }
    }
    single_activations(100..112);
    // Local homes took the typed path; the others went by name.
    for router in &cluster.routers {
        assert!(router.here.load(Ordering::SeqCst) > 0);
        assert!(router.sent.load(Ordering::SeqCst) > 0);
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_to_b_to_c_to_a_across_three_silos_completes() {
    let cluster = cluster(3, Duration::from_secs(5));
    // 300 on silo 0, 301 on silo 1, 302 on silo 2, then back to 300.
    let walked = cluster.silos[1]
        .grain::<Node>(300u64)
        .call(Walk {
            path: vec![301, 302, 300],
            pause_ms: 0,
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(walked.sum, 300 + 301 + 302 + 300);
    assert_eq!(walked.silos, vec![0, 1, 2, 0]);
    single_activations([300, 301, 302]);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_chains_message_waits_for_the_turn_across_silos() {
    let cluster = cluster(2, Duration::from_secs(5));
    // 400 (silo 0) → 401 (silo 1) → 400, the last hop holding 300 ms.
    let walk = {
        let grain = cluster.silos[1].grain::<Node>(400u64);
        tokio::spawn(async move {
            grain
                .call(Walk {
                    path: vec![401, 400],
                    pause_ms: 300,
                })
                .await
        })
    };
    // Wait until the walk is in 400's reentrant turn, then send a message
    // of another chain from the other silo: it runs after the walk.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, seen) = cluster.silos[0]
            .grain::<Node>(401u64)
            .read(Peek)
            .await
            .unwrap();
        if !seen.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the walk did not reach 401");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seen = cluster.silos[1]
        .grain::<Node>(400u64)
        .call(Mark("other chain".into()))
        .await
        .unwrap();
    assert!(walk.await.unwrap().unwrap().is_ok());
    assert_eq!(
        seen,
        vec![
            "walk [401, 400]".to_string(),
            "walk []".to_string(),
            "other chain".to_string()
        ],
        "the other chain's message ran after the walk, the reentrant step inside it"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_deadline_fails_on_both_ends() {
    let cluster = cluster(2, Duration::from_millis(300));
    let before = SLOW_RUNS.load(Ordering::SeqCst);
    assert_eq!(SLOW_STARTED.load(Ordering::SeqCst), before);
    // Grain 501 lives on silo 1. A long turn holds it...
    let busy = {
        let grain = cluster.silos[1].grain::<Node>(501u64);
        tokio::spawn(async move { grain.call(Slow(800)).await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while SLOW_STARTED.load(Ordering::SeqCst) == before {
        assert!(Instant::now() < deadline, "the long turn never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // ...so a call from silo 0 waits in its mailbox and gives up after
    // 300 ms.
    let late = cluster.silos[0].grain::<Node>(501u64).call(Slow(0)).await;
    assert!(matches!(late, Err(CallError::Timeout { .. })), "{late:?}");
    // The busy turn ends too late for its own caller (300 ms) as well.
    assert!(matches!(
        busy.await.unwrap(),
        Err(CallError::Timeout { .. })
    ));
    // Once the grain is free, nothing that expired runs: only the first
    // turn, which had started, counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    while SLOW_RUNS.load(Ordering::SeqCst) == before {
        assert!(Instant::now() < deadline, "the long turn never ended");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.silos[1]
        .grain::<Node>(501u64)
        .call(Mark("after".into()))
        .await
        .unwrap();
    assert_eq!(
        SLOW_RUNS.load(Ordering::SeqCst),
        before + 1,
        "the remote call whose sender gave up before its turn did not run"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tells_across_silos_are_acknowledged_and_keep_each_senders_order() {
    let cluster = cluster(3, Duration::from_secs(10));
    // 600 lives on silo 0; three senders on three silos tell it in turn.
    for round in 0..20 {
        for (n, silo) in cluster.silos.iter().enumerate() {
            silo.grain::<Node>(600u64)
                .tell(Mark(format!("{n}:{round}")))
                .await
                .unwrap();
        }
    }
    let (_, seen) = cluster.silos[2]
        .grain::<Node>(600u64)
        .read(Peek)
        .await
        .unwrap();
    assert_eq!(seen.len(), 60, "every tell was handled");
    for n in 0..3 {
        let mine: Vec<_> = seen
            .iter()
            .filter(|m| m.starts_with(&format!("{n}:")))
            .collect();
        let expected: Vec<String> = (0..20).map(|round| format!("{n}:{round}")).collect();
        assert_eq!(
            mine,
            expected.iter().collect::<Vec<_>>(),
            "sender {n}'s order"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_a_name_to_a_remote_home_is_a_typed_error() {
    let cluster = cluster(2, Duration::from_secs(5));
    // 701 lives on silo 1: `Local` cannot travel there.
    let remote = cluster.silos[0].grain::<Node>(701u64).call(Local).await;
    match &remote {
        Err(err @ CallError::NotRoutable { message, .. }) => {
            // The error names the message's Rust type.
            assert!(message.ends_with("::Local"), "{message}");
            assert!(
                err.to_string().contains("::Local has no registered name"),
                "{err}"
            );
        }
        other => panic!("{other:?}"),
    }
    // At home it is delivered on the typed path.
    cluster.silos[1]
        .grain::<Node>(701u64)
        .call(Local)
        .await
        .unwrap();
    // Names a silo does not know are refused, and the silo keeps serving.
    let unknown = cluster.silos[0]
        .call_named(Node::NAME, GrainKey::from(701u64), "no-such", &[])
        .await;
    assert!(unknown.is_err());
    let garbage = cluster.silos[0]
        .call_named(
            Node::NAME,
            GrainKey::from(701u64),
            Mark::NAME,
            &[0xff, 0xff, 0xff],
        )
        .await;
    assert!(garbage.is_err(), "{garbage:?}");
    cluster.silos[0]
        .grain::<Node>(701u64)
        .call(Mark("still serving".into()))
        .await
        .unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_workers_stay_local_and_named_calls_are_routed() {
    let cluster = cluster(2, Duration::from_secs(5));
    for (n, silo) in cluster.silos.iter().enumerate() {
        let sent = cluster.routers[n].sent.load(Ordering::SeqCst);
        // Key 1 would live on silo 1: a stateless worker ignores that.
        assert_eq!(
            silo.grain::<Worker>(1u64).call(Where).await.unwrap(),
            n as u64
        );
        assert_eq!(cluster.routers[n].sent.load(Ordering::SeqCst), sent);
    }
    // A named call on a routed silo goes to the grain's home.
    let payload = granary_actors::dispatch::encode(&Mark("named".into())).unwrap();
    let reply = cluster.silos[0]
        .call_named(Node::NAME, GrainKey::from(801u64), Mark::NAME, &payload)
        .await
        .unwrap();
    let seen: Vec<String> = granary_actors::dispatch::decode(&reply).unwrap();
    assert_eq!(seen, vec!["named".to_string()]);
    assert!(cluster.silos[1].grain::<Node>(801u64).is_active());
    assert!(!cluster.silos[0].grain::<Node>(801u64).is_active());
    // A silo is routed once.
    let again = cluster.silos[0].route_through(cluster.routers[1].clone());
    assert!(again.is_err());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giving_every_home_up_drops_what_is_queued_unrun_and_tells_the_callers() {
    let cluster = cluster(1, Duration::from_secs(10));
    let silo = &cluster.silos[0];
    let home = cluster.routers[0].sides.get().unwrap()[0].clone();
    let grain = silo.grain::<Node>(900u64);
    grain.call(Mark("before".into())).await.unwrap();
    // A turn holds the grain; calls and tells queue behind it.
    let started = HOLDS_STARTED.load(Ordering::SeqCst);
    let slow = tokio::spawn({
        let grain = grain.clone();
        async move { grain.call(Hold(300)).await }
    });
    while HOLDS_STARTED.load(Ordering::SeqCst) == started {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let queued_calls: Vec<_> = (0..3)
        .map(|n| {
            let grain = grain.clone();
            tokio::spawn(async move { grain.call(Mark(format!("queued {n}"))).await })
        })
        .collect();
    for n in 0..2 {
        grain.tell(Mark(format!("told {n}"))).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let dropped = silo.dropped_with_homes();
    home.give_up_homes();
    // The turn that was running finishes; nothing queued behind it runs.
    slow.await.unwrap().unwrap();
    for call in queued_calls {
        let refused = call.await.unwrap();
        assert!(
            matches!(refused, Err(CallError::Unavailable { .. })),
            "{refused:?}"
        );
    }
    assert_eq!(silo.dropped_with_homes(), dropped + 5);
    // The grain comes back fresh, without the dropped marks; a stateless
    // worker was never a home.
    assert_eq!(
        grain.call(Mark("after".into())).await.unwrap(),
        vec!["after".to_string()]
    );
    assert_eq!(silo.grain::<Worker>(1u64).call(Where).await.unwrap(), 0);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_waiting_for_room_at_a_give_up_starts_no_activation() {
    // Capacity 1: a turn holds the grain, one call is queued, and one
    // waits for room. The give-up drops the queued one; the waiting one is
    // handed back by the closing mailbox and must not start a new
    // activation on this silo (another may be the grain's home by now).
    let cluster = cluster_with(
        1,
        SiloConfig {
            call_timeout: Duration::from_secs(10),
            mailbox_capacity: 1,
            ..SiloConfig::default()
        },
    );
    let silo = &cluster.silos[0];
    let home = cluster.routers[0].sides.get().unwrap()[0].clone();
    let grain = silo.grain::<Node>(902u64);
    grain.call(Mark("before".into())).await.unwrap();
    let started = HOLDS_STARTED.load(Ordering::SeqCst);
    let slow = tokio::spawn({
        let grain = grain.clone();
        async move { grain.call(Hold(1000)).await }
    });
    while HOLDS_STARTED.load(Ordering::SeqCst) == started {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let queued = tokio::spawn({
        let grain = grain.clone();
        async move { grain.call(Mark("queued".into())).await }
    });
    let waiting = tokio::spawn({
        let grain = grain.clone();
        async move { grain.call(Mark("waiting".into())).await }
    });
    // One call fills the only slot and the other waits for room: both
    // began their delivery before the give-up (a turn of a second holds
    // the grain meanwhile).
    let bound = std::time::Instant::now() + Duration::from_secs(10);
    while silo.senders_waiting() == 0 {
        assert!(
            std::time::Instant::now() < bound,
            "no sender came to wait for room"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(silo.senders_waiting(), 1);
    let activations = silo.activations_started();
    home.give_up_homes();
    slow.await.unwrap().unwrap();
    for call in [queued, waiting] {
        let refused = call.await.unwrap();
        assert!(
            matches!(refused, Err(CallError::Unavailable { .. })),
            "{refused:?}"
        );
    }
    assert_eq!(silo.activations_started(), activations);
    assert_eq!(silo.senders_waiting(), 0);
    // A call made after the give-up activates the grain afresh.
    assert_eq!(
        grain.call(Mark("after".into())).await.unwrap(),
        vec!["after".to_string()]
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_message_taken_by_an_idle_activation_after_a_give_up_is_not_run() {
    // One thread: the tell is queued, and the give-up happens, before the
    // idle activation is polled again and takes the message.
    let cluster = cluster(1, Duration::from_secs(10));
    let silo = &cluster.silos[0];
    let home = cluster.routers[0].sides.get().unwrap()[0].clone();
    let grain = silo.grain::<Node>(901u64);
    grain.call(Mark("before".into())).await.unwrap();
    let dropped = silo.dropped_with_homes();
    grain.tell(Mark("queued".into())).await.unwrap();
    home.give_up_homes();
    while grain.is_active() {
        tokio::task::yield_now().await;
    }
    assert_eq!(silo.dropped_with_homes(), dropped + 1);
    assert_eq!(
        grain.call(Mark("after".into())).await.unwrap(),
        vec!["after".to_string()]
    );
    cluster.shutdown().await;
}
