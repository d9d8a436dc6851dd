//! The actors side of migration (`migration.rs`), on silos with a router
//! that keeps every grain local: a departure between turns, its verdict
//! (commit: the grain leaves without `on_deactivate`; abort: it goes on,
//! and the calls that waited run in their order), a dehydrate that fails,
//! an arrival and its confirmation, and what is refused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use granary_actors::migration::{
    Dehydrated, HookError, Migratable, MigrationError, MigrationTarget,
};
use granary_actors::route::{Delivered, HomeSide, Outbound, Router};
use granary_actors::{
    ActivationEnd, CallError, Grain, GrainContext, GrainId, GrainKey, GrainType, Handler, Message,
    Silo,
};

/// Delivers every message here.
struct Here;

impl Router for Here {
    fn dispatch(&self, message: Box<dyn Outbound>) -> BoxFuture<'_, Result<Delivered, CallError>> {
        Box::pin(async move { message.deliver_here(None).await.map(|()| Delivered::Here) })
    }
}

/// How often `on_deactivate` ran, on any silo.
#[derive(Default)]
struct Deactivations(AtomicU64);

#[derive(GrainType)]
#[grain(name = "notebook", migratable)]
struct Notebook {
    lines: Vec<String>,
    deactivations: Option<Arc<Deactivations>>,
    ticks: u64,
    timer: Option<granary_actors::Timer>,
}

impl Grain for Notebook {
    fn new(_: &GrainKey) -> Notebook {
        Notebook {
            lines: Vec::new(),
            deactivations: None,
            ticks: 0,
            timer: None,
        }
    }

    async fn on_activate(
        &mut self,
        ctx: &mut GrainContext,
    ) -> Result<(), granary_actors::ActivationError> {
        self.deactivations = ctx.service::<Deactivations>();
        Ok(())
    }

    async fn on_deactivate(&mut self, _: &mut GrainContext) {
        if let Some(count) = &self.deactivations {
            count.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Migratable for Notebook {
    async fn dehydrate(
        &mut self,
        _: &mut GrainContext,
        into: &mut Dehydrated,
    ) -> Result<(), HookError> {
        if self.lines.iter().any(|line| line == "stay") {
            return Err("this notebook stays".into());
        }
        into.put("lines", &self.lines)
    }

    async fn rehydrate(&mut self, _: &mut GrainContext, from: Dehydrated) -> Result<(), HookError> {
        self.lines = from.get("lines")?;
        Ok(())
    }
}

struct Append(&'static str);
impl Message for Append {
    type Reply = usize;
}
impl Handler<Append> for Notebook {
    async fn handle(&mut self, Append(line): Append, _: &mut GrainContext) -> usize {
        self.lines.push(line.to_string());
        self.lines.len()
    }
}

/// Keeps the grain busy for a while.
struct Nap(u64);
impl Message for Nap {
    type Reply = ();
}
impl Handler<Nap> for Notebook {
    async fn handle(&mut self, Nap(ms): Nap, _: &mut GrainContext) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// Starts a timer ticking every 5 ms.
struct StartTicking;
impl Message for StartTicking {
    type Reply = ();
}
impl Handler<StartTicking> for Notebook {
    async fn handle(&mut self, _: StartTicking, ctx: &mut GrainContext) {
        self.timer = ctx
            .register_timer::<Notebook, Tick>(
                Duration::from_millis(5),
                Some(Duration::from_millis(5)),
                || Tick,
            )
            .ok();
    }
}
struct Tick;
impl Message for Tick {
    type Reply = ();
}
impl Handler<Tick> for Notebook {
    async fn handle(&mut self, _: Tick, _: &mut GrainContext) {
        self.ticks += 1;
    }
}
struct Ticks;
impl Message for Ticks {
    type Reply = u64;
}
impl Handler<Ticks> for Notebook {
    async fn handle(&mut self, _: Ticks, _: &mut GrainContext) -> u64 {
        self.ticks
    }
}

struct Read;
impl Message for Read {
    type Reply = Vec<String>;
}
impl Handler<Read> for Notebook {
    async fn handle(&mut self, _: Read, _: &mut GrainContext) -> Vec<String> {
        self.lines.clone()
    }
}

/// Not migratable.
struct Plain;
impl Grain for Plain {
    fn new(_: &GrainKey) -> Plain {
        Plain
    }
}

struct Silos {
    silo: Silo,
    home: HomeSide,
    ended: Arc<Mutex<Vec<(GrainId, ActivationEnd)>>>,
    _guard: granary_actors::EndedListenerGuard,
}

fn silo(deactivations: &Arc<Deactivations>) -> Silos {
    silo_with(deactivations, granary_actors::SiloConfig::default())
}

fn silo_with(deactivations: &Arc<Deactivations>, config: granary_actors::SiloConfig) -> Silos {
    // The derive's `migratable` registers it as such.
    let silo = Silo::builder()
        .config(config)
        .host::<Notebook>()
        .register::<Plain>("plain")
        .service(deactivations.clone())
        .build()
        .unwrap();
    let ended = Arc::new(Mutex::new(Vec::new()));
    let seen = ended.clone();
    let guard = silo
        .on_activation_ended(Arc::new(move |grain, end| {
            seen.lock().unwrap().push((grain.clone(), end));
        }))
        .unwrap_or_else(|_| panic!("a listener"));
    let home = silo.route_through(Arc::new(Here)).unwrap();
    Silos {
        silo,
        home,
        ended,
        _guard: guard,
    }
}

fn notebook(key: &str) -> GrainId {
    GrainId {
        type_name: "notebook".into(),
        key: GrainKey::Str(key.into()),
    }
}

/// Waits for the grain's activation to end (for as long as a loaded
/// machine takes; the event ends the wait).
async fn ended_with(silos: &Silos, grain: &GrainId) -> ActivationEnd {
    for _ in 0..15_000 {
        if let Some((_, end)) = silos.ended.lock().unwrap().iter().find(|(g, _)| g == grain) {
            return *end;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("{grain} did not end");
}

/// Waits until `count` messages are queued in the notebook's mailbox:
/// what a test orders its senders by, rather than by sleeping.
async fn queued(silos: &Silos, count: u64) {
    loop {
        let depth: u64 = silos
            .silo
            .grain_type_stats()
            .iter()
            .filter(|stats| stats.grain_type == "notebook")
            .map(|stats| stats.mailbox_depth)
            .sum();
        if depth >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn a_silo_without_a_moving_router_refuses_with_a_typed_error() {
    let lone = Silo::builder()
        .register::<Notebook>("notebook")
        .migratable::<Notebook>()
        .register::<Plain>("plain")
        .build()
        .unwrap();
    lone.grain::<Notebook>("a").call(Append("1")).await.unwrap();
    assert!(matches!(
        lone.grain::<Notebook>("a")
            .migrate(MigrationTarget::Any)
            .await,
        Err(MigrationError::Unsupported { .. })
    ));
    assert!(matches!(
        lone.grain::<Plain>("a").migrate(MigrationTarget::Any).await,
        Err(MigrationError::NotMigratable { .. })
    ));
    // The router that keeps grains local moves none either.
    let deactivations = Arc::new(Deactivations::default());
    let routed = silo(&deactivations);
    routed
        .silo
        .grain::<Notebook>("a")
        .call(Append("1"))
        .await
        .unwrap();
    assert!(matches!(
        routed
            .silo
            .grain::<Notebook>("a")
            .migrate(MigrationTarget::Any)
            .await,
        Err(MigrationError::Unsupported { .. })
    ));
    // Nothing to depart.
    assert!(matches!(
        routed.home.depart(&notebook("none")).await,
        Err(MigrationError::NotActive { .. })
    ));
    assert!(
        !lone.is_routed() && !routed.silo.grain::<Notebook>("none").is_active(),
        "a departure never activates a grain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_departure_goes_on_and_runs_the_calls_that_waited_in_order() {
    let deactivations = Arc::new(Deactivations::default());
    let silos = silo(&deactivations);
    let book = silos.silo.grain::<Notebook>("a");
    book.call(Append("1")).await.unwrap();
    let mut departure = silos.home.depart(&notebook("a")).await.unwrap();
    let state = departure.take_state().unwrap();
    assert_eq!(state.get::<Vec<String>>("lines").unwrap(), ["1"]);
    // Calls sent while the grain waits for its verdict wait too, in order.
    let sender = book.clone();
    let waiting = tokio::spawn(async move {
        let two = sender.call(Append("2")).await.unwrap();
        let three = sender.call(Append("3")).await.unwrap();
        (two, three)
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "a call ran during a departure");
    departure.abort();
    assert_eq!(waiting.await.unwrap(), (2, 3));
    assert_eq!(book.call(Read).await.unwrap(), ["1", "2", "3"]);
    // A departure dropped undecided is an abort too.
    drop(silos.home.depart(&notebook("a")).await.unwrap());
    assert_eq!(book.call(Append("4")).await.unwrap(), 4);
    assert_eq!(deactivations.0.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_dehydrate_that_fails_leaves_the_grain_running() {
    let deactivations = Arc::new(Deactivations::default());
    let silos = silo(&deactivations);
    let book = silos.silo.grain::<Notebook>("a");
    book.call(Append("stay")).await.unwrap();
    match silos.home.depart(&notebook("a")).await {
        Err(MigrationError::Hook { reason, .. }) => assert!(reason.contains("stays"), "{reason}"),
        other => panic!("a failing dehydrate: {other:?}"),
    }
    assert_eq!(book.call(Append("next")).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_departure_leaves_without_on_deactivate_and_arrives_elsewhere() {
    let deactivations = Arc::new(Deactivations::default());
    let (from, to) = (silo(&deactivations), silo(&deactivations));
    let id = notebook("a");
    from.silo
        .grain::<Notebook>("a")
        .call(Append("1"))
        .await
        .unwrap();
    from.silo
        .grain::<Notebook>("a")
        .call(Append("2"))
        .await
        .unwrap();
    let mut departure = from.home.depart(&id).await.unwrap();
    let state = departure.take_state().unwrap();
    let arrival = to.home.arrive(&id, state.clone()).await.unwrap();
    // A second arrival of an active grain is refused.
    assert!(matches!(
        to.home.arrive(&id, state.clone()).await,
        Err(MigrationError::Busy { .. })
    ));
    arrival.confirm();
    departure.commit().await;
    assert_eq!(ended_with(&from, &id).await, ActivationEnd::Migrated);
    assert!(!from.silo.grain::<Notebook>("a").is_active());
    assert_eq!(
        deactivations.0.load(Ordering::SeqCst),
        0,
        "no on_deactivate"
    );
    assert_eq!(
        to.silo.grain::<Notebook>("a").call(Read).await.unwrap(),
        ["1", "2"]
    );
    // An arrival never confirmed ends without on_deactivate.
    let third = silo(&deactivations);
    drop(third.home.arrive(&id, state.clone()).await.unwrap());
    assert_eq!(
        ended_with(&third, &id).await,
        ActivationEnd::ActivationFailed
    );
    assert_eq!(deactivations.0.load(Ordering::SeqCst), 0);
    // A state that is not the grain's fails its rehydrate, typed.
    let fourth = silo(&deactivations);
    match fourth.home.arrive(&id, Dehydrated::new()).await {
        Err(MigrationError::Hook { reason, .. }) => {
            assert!(reason.contains("lines"), "{reason}")
        }
        other => panic!("an empty state: {other:?}"),
    }
    assert_eq!(
        ended_with(&fourth, &id).await,
        ActivationEnd::ActivationFailed
    );
    assert!(!fourth.silo.grain::<Notebook>("a").is_active());
}

#[tokio::test]
async fn senders_parked_on_a_full_mailbox_get_in_after_an_aborted_departure() {
    let deactivations = Arc::new(Deactivations::default());
    let config = granary_actors::SiloConfig {
        mailbox_capacity: 1,
        ..granary_actors::SiloConfig::default()
    };
    let silos = Arc::new(silo_with(&deactivations, config));
    let book = silos.silo.grain::<Notebook>("a");
    // A grain that refuses to leave, kept busy while a departure and ten
    // calls queue up behind it (nine of them parked on the full mailbox).
    book.call(Append("stay")).await.unwrap();
    let busy = tokio::spawn({
        let book = book.clone();
        async move { book.call(Nap(50)).await }
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let departing = tokio::spawn({
        let silos = silos.clone();
        async move { silos.home.depart(&notebook("a")).await }
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let book = book.clone();
            tokio::spawn(async move { book.call(Append("x")).await })
        })
        .collect();
    busy.await.unwrap().unwrap();
    assert!(matches!(
        departing.await.unwrap(),
        Err(MigrationError::Hook { .. })
    ));
    for call in calls {
        tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("a parked call got in after the abort")
            .unwrap()
            .unwrap();
    }
    assert_eq!(book.call(Read).await.unwrap().len(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_keeps_ticking_after_an_aborted_departure() {
    let deactivations = Arc::new(Deactivations::default());
    let silos = silo(&deactivations);
    let book = silos.silo.grain::<Notebook>("a");
    book.call(StartTicking).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let departure = silos.home.depart(&notebook("a")).await.unwrap();
    // Ticks that fall in the departure wait for its verdict.
    tokio::time::sleep(Duration::from_millis(30)).await;
    departure.abort();
    // The timer ticks on: three more ticks arrive (the wait ends with the
    // event; a stopped timer would leave the count where it was).
    let after_abort = book.call(Ticks).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        while book.call(Ticks).await.unwrap() < after_abort + 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the timer stopped with the aborted departure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deactivation_queued_before_an_aborted_departure_still_happens() {
    let deactivations = Arc::new(Deactivations::default());
    let silos = Arc::new(silo(&deactivations));
    let book = silos.silo.grain::<Notebook>("a");
    book.call(Append("1")).await.unwrap();
    let busy = tokio::spawn({
        let book = book.clone();
        async move { book.call(Nap(50)).await }
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let departing = tokio::spawn({
        let silos = silos.clone();
        async move { silos.home.depart(&notebook("a")).await }
    });
    // The departure's request is queued behind the nap.
    queued(&silos, 1).await;
    // Queued behind the departure's request: run by the departure's drain.
    book.deactivate().await.unwrap();
    busy.await.unwrap().unwrap();
    departing.await.unwrap().unwrap().abort();
    assert_eq!(
        ended_with(&silos, &notebook("a")).await,
        ActivationEnd::Deactivated
    );
    assert_eq!(deactivations.0.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_activation_runs_nothing_and_then_the_calls_that_waited_in_order() {
    let deactivations = Arc::new(Deactivations::default());
    let silos = silo(&deactivations);
    let book = silos.silo.grain::<Notebook>("a");
    book.call(Append("1")).await.unwrap();
    let paused = silos.home.pause(&notebook("a")).await.unwrap();
    // Calls sent while paused wait in the mailbox: two from one sender,
    // in order, and a read from another (queued before or after the
    // first). The wait for them to be queued ends with the event (bounded
    // only against a hang).
    let sender = book.clone();
    let waiting = tokio::spawn(async move {
        let two = sender.call(Append("2")).await.unwrap();
        let three = sender.call(Append("3")).await.unwrap();
        (two, three)
    });
    let reader = book.clone();
    let read = tokio::spawn(async move { reader.call(Read).await });
    tokio::time::timeout(Duration::from_secs(60), queued(&silos, 2))
        .await
        .expect("the calls reached the mailbox");
    assert!(!waiting.is_finished(), "a call ran during a pause");
    assert!(!read.is_finished(), "a read ran during a pause");
    drop(paused);
    assert_eq!(waiting.await.unwrap(), (2, 3));
    // The read ran after the pause, where it was queued: it saw the first
    // line, and the second if that was queued first.
    let seen = read.await.unwrap().unwrap();
    assert!(seen == ["1"] || seen == ["1", "2"], "the read saw {seen:?}");
    assert_eq!(book.call(Read).await.unwrap(), ["1", "2", "3"]);
    // The same object went on: nothing was deactivated or reloaded.
    assert_eq!(deactivations.0.load(Ordering::SeqCst), 0);
    // What is refused: no activation, a type that is not migratable, and
    // an activation that is leaving.
    assert!(matches!(
        silos.home.pause(&notebook("none")).await,
        Err(MigrationError::NotActive { .. })
    ));
    let plain = GrainId {
        type_name: "plain".into(),
        key: GrainKey::Str("p".into()),
    };
    assert!(matches!(
        silos.home.pause(&plain).await,
        Err(MigrationError::NotMigratable { .. })
    ));
    assert!(
        !silos.silo.grain::<Notebook>("none").is_active(),
        "a pause never activates a grain"
    );
    let departure = silos.home.depart(&notebook("a")).await.unwrap();
    let refused = {
        let home = &silos.home;
        tokio::time::timeout(Duration::from_secs(60), home.pause(&notebook("a"))).await
    };
    assert!(
        matches!(refused, Ok(Err(MigrationError::NotActive { .. }))),
        "{refused:?}"
    );
    departure.abort();
    assert_eq!(book.call(Append("4")).await.unwrap(), 4);
}
