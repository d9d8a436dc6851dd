//! The runtime's guarantees (docs/runtime-semantics.md), one test each.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use granary_actors::{
    ActivationError, CallError, Grain, GrainContext, GrainKey, Handler, MemoryStorage, Message,
    PersistentState, Silo, SiloConfig, SiloError, StorageError, StorageProvider,
};

/// Counts activations per silo (a silo service).
#[derive(Default)]
struct Activations(AtomicU64);

/// A counter whose value persists.
struct Counter {
    state: Option<PersistentState<u64>>,
}

impl Grain for Counter {
    fn new(_: &GrainKey) -> Counter {
        Counter { state: None }
    }

    async fn on_activate(&mut self, ctx: &mut GrainContext) -> Result<(), ActivationError> {
        if let Some(count) = ctx.service::<Activations>() {
            count.0.fetch_add(1, Ordering::SeqCst);
        }
        self.state = Some(ctx.load_state::<u64>().await?);
        Ok(())
    }

    async fn on_deactivate(&mut self, _: &mut GrainContext) {
        if let Some(state) = &mut self.state {
            let _ = state.write().await;
        }
    }
}

struct Add(u64);
impl Message for Add {
    type Reply = u64;
}
impl Handler<Add> for Counter {
    async fn handle(&mut self, Add(n): Add, _: &mut GrainContext) -> u64 {
        let state = self.state.as_mut().expect("activated");
        *state.get_mut() += n;
        *state.get()
    }
}

struct Get;
impl Message for Get {
    type Reply = u64;
}
impl Handler<Get> for Counter {
    async fn handle(&mut self, _: Get, _: &mut GrainContext) -> u64 {
        *self.state.as_ref().expect("activated").get()
    }
}

/// Sleeps for the given time, or panics when asked.
struct Sleep(Duration);
impl Message for Sleep {
    type Reply = ();
}
impl Handler<Sleep> for Counter {
    async fn handle(&mut self, Sleep(time): Sleep, _: &mut GrainContext) {
        tokio::time::sleep(time).await;
    }
}

/// Holds the turn until `open` turns true; `started` says it began.
struct Hold {
    started: Arc<std::sync::atomic::AtomicBool>,
    open: tokio::sync::watch::Receiver<bool>,
}
impl Message for Hold {
    type Reply = ();
}
impl Handler<Hold> for Counter {
    async fn handle(&mut self, mut hold: Hold, _: &mut GrainContext) {
        hold.started.store(true, Ordering::SeqCst);
        let _ = hold.open.wait_for(|open| *open).await;
    }
}

/// A [`Hold`] message, whether its turn has started, and its gate.
fn hold() -> (
    Hold,
    Arc<std::sync::atomic::AtomicBool>,
    tokio::sync::watch::Sender<bool>,
) {
    let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (open, gate) = tokio::sync::watch::channel(false);
    let message = Hold {
        started: started.clone(),
        open: gate,
    };
    (message, started, open)
}

struct Panic;
impl Message for Panic {
    type Reply = ();
}
impl Handler<Panic> for Counter {
    async fn handle(&mut self, _: Panic, _: &mut GrainContext) {
        panic!("a handler bug");
    }
}

/// Records `(sender, sequence)` pairs in arrival order.
struct Log(Vec<(u32, u32)>);
impl Grain for Log {
    fn new(_: &GrainKey) -> Log {
        Log(Vec::new())
    }
}
struct Record(u32, u32);
impl Message for Record {
    type Reply = ();
}
impl Handler<Record> for Log {
    async fn handle(&mut self, Record(sender, sequence): Record, _: &mut GrainContext) {
        self.0.push((sender, sequence));
    }
}
struct Entries;
impl Message for Entries {
    type Reply = Vec<(u32, u32)>;
}
impl Handler<Entries> for Log {
    async fn handle(&mut self, _: Entries, _: &mut GrainContext) -> Vec<(u32, u32)> {
        self.0.clone()
    }
}

/// Never registered.
struct Stranger;
impl Grain for Stranger {
    fn new(_: &GrainKey) -> Stranger {
        Stranger
    }
}
impl Handler<Get> for Stranger {
    async fn handle(&mut self, _: Get, _: &mut GrainContext) -> u64 {
        0
    }
}

fn silo(config: SiloConfig, storage: Arc<dyn StorageProvider>) -> (Silo, Arc<Activations>) {
    let activations = Arc::new(Activations::default());
    let silo = Silo::builder()
        .register::<Counter>("counter")
        .register::<Log>("log")
        .service(activations.clone())
        .storage(storage)
        .config(config)
        .build()
        .unwrap();
    (silo, activations)
}

fn activations(silo: &Silo) -> u64 {
    silo.activations_started()
}

/// Waits until `done` holds, polling; the bound only keeps a broken
/// runtime from hanging the test.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "never {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_thousand_concurrent_first_calls_make_exactly_one_activation() {
    let (silo, counted) = silo(SiloConfig::default(), Arc::new(MemoryStorage::new()));
    let calls: Vec<_> = (0..1000)
        .map(|_| {
            let counter = silo.grain::<Counter>("hot");
            tokio::spawn(async move { counter.call(Add(1)).await })
        })
        .collect();
    let mut replies = Vec::new();
    for call in calls {
        replies.push(call.await.unwrap().unwrap());
    }
    replies.sort_unstable();
    assert_eq!(
        replies,
        (1..=1000).collect::<Vec<u64>>(),
        "every turn ran once, in turn"
    );
    assert_eq!(activations(&silo), 1);
    // `on_activate` ran exactly once, per the silo service the grain bumps.
    let service = counted.0.load(Ordering::SeqCst);
    assert_eq!(service, 1);
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_from_one_sender_run_in_the_order_sent() {
    let (silo, _) = silo(SiloConfig::default(), Arc::new(MemoryStorage::new()));
    let senders: Vec<_> = (0..4u32)
        .map(|sender| {
            let log = silo.grain::<Log>(7u64);
            tokio::spawn(async move {
                for sequence in 0..500 {
                    log.tell(Record(sender, sequence)).await.unwrap();
                }
            })
        })
        .collect();
    for sender in senders {
        sender.await.unwrap();
    }
    let entries = silo.grain::<Log>(7u64).call(Entries).await.unwrap();
    assert_eq!(entries.len(), 2000);
    for sender in 0..4 {
        let sequence: Vec<u32> = entries
            .iter()
            .filter(|(from, _)| *from == sender)
            .map(|(_, sequence)| *sequence)
            .collect();
        assert_eq!(sequence, (0..500).collect::<Vec<_>>(), "sender {sender}");
    }
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_grain_is_deactivated_and_reactivated_with_its_state() {
    let config = SiloConfig {
        idle_timeout: Duration::from_millis(100),
        ..SiloConfig::default()
    };
    let (silo, _) = silo(config, Arc::new(MemoryStorage::new()));
    let counter = silo.grain::<Counter>((9u64, "tenant"));
    assert_eq!(counter.call(Add(5)).await.unwrap(), 5);
    assert_eq!(silo.live_activations(), 1);
    eventually("deactivated when idle", || silo.live_activations() == 0).await;
    assert_eq!(counter.call(Get).await.unwrap(), 5, "state restored");
    assert_eq!(activations(&silo), 2);
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_racing_a_deactivation_are_never_lost() {
    // Deactivations every few milliseconds while calls keep coming.
    let config = SiloConfig {
        idle_timeout: Duration::from_millis(2),
        ..SiloConfig::default()
    };
    let (silo, _) = silo(config, Arc::new(MemoryStorage::new()));
    let counter = silo.grain::<Counter>("flapping");
    for expected in 1..=200u64 {
        assert_eq!(counter.call(Add(1)).await.unwrap(), expected);
        if expected % 50 == 0 {
            // Now and then a full deactivation, so that the check below
            // never depends on how the pauses and idle checks line up.
            eventually("deactivated", || silo.live_activations() == 0).await;
        } else if expected % 3 == 0 {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
    assert!(
        activations(&silo) > 1,
        "the grain was deactivated in between"
    );
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_time_out_and_the_silo_keeps_serving() {
    // Long enough that the calls after the timeout are not at risk on a
    // loaded machine; the slow turn holds until the test lets it go, so
    // the first call times out however long the timeout is.
    let call_timeout = Duration::from_secs(1);
    let config = SiloConfig {
        call_timeout,
        ..SiloConfig::default()
    };
    let (silo, _) = silo(config, Arc::new(MemoryStorage::new()));
    let counter = silo.grain::<Counter>("slow");
    let (held, _, open) = hold();
    match counter.call(held).await {
        Err(CallError::Timeout { grain, after }) => {
            assert_eq!(grain.type_name, "counter");
            assert_eq!(after, call_timeout);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    // The slow turn finishes, then the grain answers again.
    open.send_replace(true);
    assert_eq!(counter.call(Add(1)).await.unwrap(), 1);
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_its_call_and_resets_the_activation() {
    let storage = Arc::new(MemoryStorage::new());
    let (silo, counted) = silo(SiloConfig::default(), storage);
    let counter = silo.grain::<Counter>("fragile");
    assert_eq!(counter.call(Add(3)).await.unwrap(), 3);
    assert!(matches!(
        counter.call(Panic).await,
        Err(CallError::TurnFailed { .. })
    ));
    // A fresh object, activated again: the unsaved in-memory value is gone.
    assert_eq!(counter.call(Get).await.unwrap(), 0);
    assert_eq!(counted.0.load(Ordering::SeqCst), 2);
    // Other grains were never affected.
    assert_eq!(
        silo.grain::<Counter>("sturdy").call(Add(1)).await.unwrap(),
        1
    );
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_makes_senders_wait_bounded_by_the_call_timeout() {
    let config = SiloConfig {
        mailbox_capacity: 1,
        call_timeout: Duration::from_millis(150),
        ..SiloConfig::default()
    };
    let (silo, _) = silo(config, Arc::new(MemoryStorage::new()));
    let counter = silo.grain::<Counter>("busy");
    // One turn running (held until the gate opens), one message queued:
    // the mailbox is full, and stays full.
    let (held, running, open) = hold();
    counter.tell(held).await.unwrap();
    eventually("the held turn started", || running.load(Ordering::SeqCst)).await;
    counter
        .tell(Sleep(Duration::from_millis(10)))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    assert!(matches!(
        counter.tell(Add(1)).await,
        Err(CallError::Timeout { .. })
    ));
    // No room ever came, so the error shows that the wait is bounded; it
    // took at least the call timeout, and (with room for a loaded machine)
    // not much more.
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(150), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "bounded wait: {waited:?}");
    open.send_replace(true);
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_deactivates_gracefully_and_writes_state() {
    let storage = Arc::new(MemoryStorage::new());
    let (silo, _) = silo(SiloConfig::default(), storage.clone());
    for key in 0..10u64 {
        silo.grain::<Counter>(key).call(Add(key + 1)).await.unwrap();
    }
    silo.shutdown().await;
    assert_eq!(silo.live_activations(), 0);
    assert!(matches!(
        silo.grain::<Counter>(1u64).call(Get).await,
        Err(CallError::ShutDown)
    ));
    // A new silo on the same storage finds every grain's state.
    let (second, _) = self::silo(SiloConfig::default(), storage);
    for key in 0..10u64 {
        assert_eq!(
            second.grain::<Counter>(key).call(Get).await.unwrap(),
            key + 1
        );
    }
    second.shutdown().await;
}

#[tokio::test]
async fn unregistered_grains_and_duplicate_names_are_clear_errors() {
    let (silo, _) = silo(SiloConfig::default(), Arc::new(MemoryStorage::new()));
    match silo.grain::<Stranger>("x").call(Get).await {
        Err(CallError::NotRegistered { type_name }) => assert!(type_name.ends_with("Stranger")),
        other => panic!("expected NotRegistered, got {other:?}"),
    }
    assert_eq!(
        Silo::builder()
            .register::<Counter>("same")
            .register::<Log>("same")
            .build()
            .unwrap_err(),
        SiloError::DuplicateName("same".into())
    );
    silo.shutdown().await;
}

#[tokio::test]
async fn a_stale_write_is_rejected_never_lost() {
    let storage: Arc<dyn StorageProvider> = Arc::new(MemoryStorage::new());
    let id = granary_actors::GrainId {
        type_name: "counter".into(),
        key: GrainKey::from("contended"),
    };
    let mut first = PersistentState::<u64>::load(storage.clone(), id.clone())
        .await
        .unwrap();
    let mut second = PersistentState::<u64>::load(storage.clone(), id.clone())
        .await
        .unwrap();
    *first.get_mut() = 1;
    first.write().await.unwrap();
    *second.get_mut() = 2;
    match second.write().await {
        Err(StorageError::Conflict {
            expected, actual, ..
        }) => {
            assert_eq!(expected, None);
            assert_eq!(actual, first.etag());
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // The winner's value is what is stored; the loser can reload and retry.
    let mut reloaded = PersistentState::<u64>::load(storage, id).await.unwrap();
    assert_eq!(*reloaded.get(), 1);
    *reloaded.get_mut() += 2;
    reloaded.write().await.unwrap();
    assert!(matches!(
        first.write().await,
        Err(StorageError::Conflict { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_in_redb_survives_a_silo_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silo.redb");
    {
        let storage = Arc::new(granary_actors::RedbStorage::open(&path).unwrap());
        let (silo, _) = silo(SiloConfig::default(), storage);
        silo.grain::<Counter>("durable")
            .call(Add(41))
            .await
            .unwrap();
        silo.grain::<Counter>("durable").call(Add(1)).await.unwrap();
        // Graceful shutdown writes the state; then the silo and its
        // database handle go away.
        silo.shutdown().await;
    }
    let storage = Arc::new(granary_actors::RedbStorage::open(&path).unwrap());
    let (restarted, _) = silo(SiloConfig::default(), storage);
    assert_eq!(
        restarted
            .grain::<Counter>("durable")
            .call(Get)
            .await
            .unwrap(),
        42
    );
    restarted.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_activations_are_shed_under_memory_pressure() {
    let config = SiloConfig {
        idle_timeout: Duration::from_secs(600),
        max_activations: Some(10),
        ..SiloConfig::default()
    };
    let (silo, _) = silo(config, Arc::new(MemoryStorage::new()));
    for key in 0..40u64 {
        silo.grain::<Counter>(key).call(Add(1)).await.unwrap();
    }
    assert!(silo.live_activations() > 10);
    // Idle checks run at most a second apart.
    eventually("shed to the limit", || silo.live_activations() <= 10).await;
    // Shed grains come back with their state when called.
    assert_eq!(silo.grain::<Counter>(3u64).call(Get).await.unwrap(), 1);
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_activation_limit_new_grains_are_refused_and_held_ones_serve() {
    let config = SiloConfig {
        activation_limit: Some(3),
        ..SiloConfig::default()
    };
    let (silo, _) = silo(config, Arc::new(MemoryStorage::new()));
    for key in 0..3u64 {
        silo.grain::<Counter>(key)
            .call(Add(1))
            .await
            .expect("under the limit");
    }
    // A fourth grain is refused, typed, and nothing of it is left behind.
    let refused = silo.grain::<Counter>(3u64).call(Add(1)).await;
    assert!(
        matches!(&refused, Err(CallError::Overloaded { grain }) if grain.key == GrainKey::U64(3)),
        "{refused:?}"
    );
    assert!(!silo.grain::<Counter>(3u64).is_active());
    assert_eq!(silo.live_activations(), 3);
    // The grains it holds serve on.
    assert_eq!(
        silo.grain::<Counter>(1u64).call(Get).await.expect("held"),
        1
    );
    // Once one leaves, a new one starts.
    silo.grain::<Counter>(0u64)
        .deactivate()
        .await
        .expect("deactivating one");
    eventually("one activation gone", || silo.live_activations() == 2).await;
    silo.grain::<Counter>(3u64)
        .call(Add(1))
        .await
        .expect("room again");
    assert_eq!(silo.live_activations(), 3);
    let stats = silo.grain_type_stats();
    let overloaded = stats
        .iter()
        .flat_map(|t| t.failures.iter())
        .find(|(reason, _)| *reason == granary_actors::FailureReason::Overloaded)
        .map(|(_, count)| *count);
    assert_eq!(overloaded, Some(1));
    silo.shutdown().await;
}

#[test]
fn an_activation_limit_of_zero_or_below_the_shedding_threshold_is_refused() {
    for (limit, shed) in [(Some(0), None), (Some(5), Some(10))] {
        let built = Silo::builder()
            .register::<Counter>("counter")
            .config(SiloConfig {
                activation_limit: limit,
                max_activations: shed,
                ..SiloConfig::default()
            })
            .build();
        assert!(
            matches!(built, Err(SiloError::InvalidConfig(_))),
            "{limit:?} with {shed:?}"
        );
    }
    let zero_timeout = Silo::builder()
        .register::<Counter>("counter")
        .configure(|config| config.storage_timeout = Duration::ZERO)
        .build();
    assert!(matches!(zero_timeout, Err(SiloError::InvalidConfig(_))));
}

#[test]
fn one_type_under_two_names_is_refused() {
    assert!(matches!(
        Silo::builder()
            .register::<Counter>("counter")
            .register::<Counter>("tally")
            .build(),
        Err(SiloError::InvalidConfig(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grain_deactivated_on_request_writes_its_state_and_comes_back_with_it() {
    let storage = Arc::new(MemoryStorage::new());
    let (silo, _) = silo(SiloConfig::default(), storage);
    let counter = silo.grain::<Counter>("asked-to-leave");
    // Nothing to deactivate yet: nothing is activated either.
    counter.deactivate().await.unwrap();
    assert_eq!(silo.live_activations(), 0);
    assert_eq!(counter.call(Add(4)).await.unwrap(), 4);
    // Messages already queued run before it goes.
    let queued = counter.tell(Add(1));
    queued.await.unwrap();
    counter.deactivate().await.unwrap();
    eventually("deactivated", || silo.live_activations() == 0).await;
    assert_eq!(activations(&silo), 1);
    // Reactivated from the state on_deactivate wrote.
    assert_eq!(counter.call(Get).await.unwrap(), 5);
    assert_eq!(activations(&silo), 2);
    // By name, as the cluster does.
    silo.deactivate_named("counter", GrainKey::from("asked-to-leave"))
        .await
        .unwrap();
    assert!(matches!(
        silo.deactivate_named("nothing", GrainKey::from("x")).await,
        Err(granary_actors::DispatchError::UnknownGrainType(_))
    ));
    silo.shutdown().await;
}

/// A grain that never starts.
struct Refuser;
impl Grain for Refuser {
    fn new(_: &GrainKey) -> Refuser {
        Refuser
    }

    async fn on_activate(&mut self, _: &mut GrainContext) -> Result<(), ActivationError> {
        Err(ActivationError("refused".into()))
    }
}
impl Handler<Add> for Refuser {
    async fn handle(&mut self, Add(n): Add, _: &mut GrainContext) -> u64 {
        n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_activation_that_ends_is_reported_once_with_how_it_ended() {
    use granary_actors::{ActivationEnd, GrainId};
    let silo = Silo::builder()
        .register::<Counter>("counter")
        .register::<Refuser>("refuser")
        .storage(Arc::new(MemoryStorage::new()))
        .build()
        .unwrap();
    let (ended, mut reports) = tokio::sync::mpsc::unbounded_channel();
    // The listener runs after the entry is gone: the grain is no longer
    // active when it is told.
    let watched = silo.clone();
    let first = silo.on_activation_ended(Arc::new(|_: &GrainId, _| {}));
    assert!(first.is_ok());
    assert!(
        silo.on_activation_ended(Arc::new(|_: &GrainId, _| {}))
            .is_err(),
        "a second listener is refused while the first's guard lives"
    );
    drop(first);
    let _guard = silo
        .on_activation_ended(Arc::new(move |grain: &GrainId, how| {
            let active = watched.is_active_named(&grain.type_name, &grain.key);
            let _ = ended.send((grain.to_string(), how, active));
        }))
        .map_err(drop)
        .expect("a listener once the first's guard is gone");
    let counter = silo.grain::<Counter>(1u64);
    assert!(!counter.is_active());
    assert_eq!(counter.call(Add(2)).await.unwrap(), 2);
    assert!(counter.is_active());
    assert!(silo.is_active_named("counter", &GrainKey::U64(1)));
    assert!(!silo.is_active_named("no such type", &GrainKey::U64(1)));
    counter.deactivate().await.unwrap();
    let report = tokio::time::timeout(Duration::from_secs(30), reports.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        report,
        ("counter/1".to_string(), ActivationEnd::Deactivated, false)
    );
    assert!(!counter.is_active());

    let refused = silo.grain::<Refuser>(9u64).call(Add(1)).await;
    assert!(
        matches!(refused, Err(CallError::TurnFailed { .. })),
        "{refused:?}"
    );
    let report = tokio::time::timeout(Duration::from_secs(30), reports.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        report,
        (
            "refuser/9".to_string(),
            ActivationEnd::ActivationFailed,
            false
        )
    );
    silo.shutdown().await;
    assert!(reports.try_recv().is_err(), "nothing else ended");
}

/// Registers with the `Registry` grain when it activates, through
/// `GrainContext::call` (which lends this grain while it waits).
struct Joiner;
impl Grain for Joiner {
    fn new(_: &GrainKey) -> Joiner {
        Joiner
    }

    async fn on_activate(&mut self, ctx: &mut GrainContext) -> Result<(), ActivationError> {
        let registry = ctx.grain::<Registry>(0u64);
        ctx.call(self, &registry, Join)
            .await
            .map_err(|err| ActivationError(err.to_string()))
    }
}

struct Ping;
impl Message for Ping {
    type Reply = ();
}
impl Handler<Ping> for Joiner {
    async fn handle(&mut self, _: Ping, _: &mut GrainContext) {}
}

/// Logs the start and end of each `Join`, which waits on a slow grain
/// through `GrainContext::call` (lending the registry meanwhile).
struct Registry;
static JOIN_LOG: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
impl Grain for Registry {
    fn new(_: &GrainKey) -> Registry {
        Registry
    }
}

struct Join;
impl Message for Join {
    type Reply = ();
}
impl Handler<Join> for Registry {
    async fn handle(&mut self, _: Join, ctx: &mut GrainContext) {
        JOIN_LOG.lock().unwrap().push("in");
        let slow = ctx.grain::<Slow>(0u64);
        let _ = ctx.call(self, &slow, Nap).await;
        JOIN_LOG.lock().unwrap().push("out");
    }
}

struct Slow;
impl Grain for Slow {
    fn new(_: &GrainKey) -> Slow {
        Slow
    }
}
struct Nap;
impl Message for Nap {
    type Reply = ();
}
impl Handler<Nap> for Slow {
    async fn handle(&mut self, _: Nap, _: &mut GrainContext) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_from_two_activations_hooks_do_not_share_a_chain() {
    // Two grains activate at once, and each one's `on_activate` calls the
    // registry, whose turn lends it while it waits on a slow grain. The
    // two hooks' calls belong to different chains: the second `Join` must
    // wait for the first turn, never run inside it.
    let silo = Silo::builder()
        .register::<Joiner>("joiner")
        .register::<Registry>("registry")
        .register::<Slow>("slow")
        .build()
        .unwrap();
    let (one, two) = (silo.grain::<Joiner>(1u64), silo.grain::<Joiner>(2u64));
    let (first, second) = tokio::join!(one.call(Ping), two.call(Ping));
    first.unwrap();
    second.unwrap();
    assert_eq!(*JOIN_LOG.lock().unwrap(), ["in", "out", "in", "out"]);
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deactivate_never_starts_an_activation() {
    // Deactivations race the activation they end: one may find the
    // mailbox open and reach it only once it has closed. Then it must do
    // nothing, not activate the grain only to deactivate it. Each round
    // activates the grain once (the call) and deactivates it from two
    // tasks at once.
    let silo = Silo::builder()
        .register::<Ponger>("ponger")
        .build()
        .unwrap();
    let grain = silo.grain::<Ponger>(7u64);
    let rounds = 2000;
    let started = silo.activations_started();
    for _ in 0..rounds {
        grain.call(Pong).await.unwrap();
        let racing: Vec<_> = (0..2)
            .map(|_| {
                let grain = grain.clone();
                tokio::spawn(async move { grain.deactivate().await })
            })
            .collect();
        for deactivation in racing {
            deactivation.await.unwrap().unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while grain.is_active() {
            assert!(std::time::Instant::now() < deadline, "never deactivated");
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(silo.activations_started(), started + rounds);
    silo.shutdown().await;
    // A silo shut down has nothing to deactivate, and says so.
    assert!(matches!(grain.deactivate().await, Err(CallError::ShutDown)));
}

struct Ponger;
impl Grain for Ponger {
    fn new(_: &GrainKey) -> Ponger {
        Ponger
    }
}
struct Pong;
impl Message for Pong {
    type Reply = ();
}
impl Handler<Pong> for Ponger {
    async fn handle(&mut self, _: Pong, _: &mut GrainContext) {}
}

/// Whether a `Tracked` value is alive, and how many activations started
/// while one still was.
static TRACKED_ALIVE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static OVERLAPS: AtomicU64 = AtomicU64::new(0);

/// An activation-local value whose drop takes a while.
struct Tracked;
impl Drop for Tracked {
    fn drop(&mut self) {
        std::thread::sleep(Duration::from_millis(50));
        TRACKED_ALIVE.store(false, Ordering::SeqCst);
    }
}

struct Keeper;
impl Grain for Keeper {
    fn new(_: &GrainKey) -> Keeper {
        Keeper
    }

    async fn on_activate(&mut self, ctx: &mut GrainContext) -> Result<(), ActivationError> {
        if TRACKED_ALIVE.swap(true, Ordering::SeqCst) {
            OVERLAPS.fetch_add(1, Ordering::SeqCst);
        }
        ctx.activation_local(|| Tracked);
        Ok(())
    }
}
impl Handler<Pong> for Keeper {
    async fn handle(&mut self, _: Pong, _: &mut GrainContext) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activations_locals_are_gone_before_the_next_activation_starts() {
    // A call waiting for the grain's deactivation starts the next
    // activation once the old one is gone: its locals included (rule 5),
    // though dropping them takes 50 ms.
    let silo = Silo::builder()
        .register::<Keeper>("keeper")
        .build()
        .unwrap();
    let grain = silo.grain::<Keeper>(1u64);
    for _ in 0..3 {
        grain.call(Pong).await.unwrap();
        grain.deactivate().await.unwrap();
        grain.call(Pong).await.unwrap();
        grain.deactivate().await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while grain.is_active() {
        assert!(std::time::Instant::now() < deadline, "never deactivated");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(OVERLAPS.load(Ordering::SeqCst), 0);
    silo.shutdown().await;
}
