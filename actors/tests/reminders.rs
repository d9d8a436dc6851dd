//! Reminders persist: they fire whether or not the grain is active, and
//! after the silo restarts. Silos sharing one storage share the reminders:
//! each due time fires once, on the silo that owns the grain, and the
//! reminders of a silo that goes keep firing on another.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use granary_actors::storage::{BatchOutcome, StoredState};
use granary_actors::{
    ActivationError, DueUpdate, ETag, Grain, GrainContext, GrainId, GrainKey, Handler, LoneSilo,
    MemoryStorage, Message, PersistentState, RedbStorage, ReminderError, ReminderFired,
    ReminderPlacement, ReminderRow, ReminderTable, Silo, SiloConfig, SiloError, SqliteStorage,
    StorageError, StorageProvider,
};
use tokio::sync::Notify;

/// Counts the reminders it receives, in persisted state.
struct Alarm {
    fired: Option<PersistentState<u32>>,
}

impl Grain for Alarm {
    fn new(_: &GrainKey) -> Alarm {
        Alarm { fired: None }
    }
    async fn on_activate(&mut self, ctx: &mut GrainContext) -> Result<(), ActivationError> {
        self.fired = Some(ctx.load_state().await?);
        Ok(())
    }
}

impl Handler<ReminderFired> for Alarm {
    async fn handle(&mut self, fired: ReminderFired, ctx: &mut GrainContext) {
        assert_eq!(fired.name, "wake");
        if let Some(state) = &mut self.fired {
            *state.get_mut() += 1;
            let _ = state.write().await;
        }
        if let (GrainKey::Str(key), Some(pulse)) = (&ctx.id().key, ctx.service::<Pulse>()) {
            pulse.beat(key);
        }
    }
}

/// The fires `Alarm`s handled on one silo, by key, to wait on.
#[derive(Default)]
struct Pulse {
    beats: Mutex<HashMap<String, u32>>,
    changed: Notify,
}

impl Pulse {
    fn beat(&self, key: &str) {
        *self
            .beats
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_default() += 1;
        self.changed.notify_waiters();
    }

    fn beats(&self, key: &str) -> u32 {
        self.beats.lock().unwrap().get(key).copied().unwrap_or(0)
    }

    /// Waits until `done` holds, checked at every fire, at most 20 s.
    async fn wait_until(&self, what: &str, mut done: impl FnMut(&Pulse) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(self) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("waited 20 s for {what}");
            }
        }
    }
}

/// Sets (`Some(period)`) or clears the reminder.
struct Set(Option<Duration>);
impl Message for Set {
    type Reply = Result<(), ReminderError>;
}
impl Handler<Set> for Alarm {
    async fn handle(
        &mut self,
        Set(period): Set,
        ctx: &mut GrainContext,
    ) -> Result<(), ReminderError> {
        match period {
            Some(period) => ctx.register_reminder("wake", period, period).await,
            None => ctx.unregister_reminder("wake").await.map(drop),
        }
    }
}

struct Fired;
impl Message for Fired {
    type Reply = u32;
}
impl Handler<Fired> for Alarm {
    async fn handle(&mut self, _: Fired, _: &mut GrainContext) -> u32 {
        self.fired.as_ref().map_or(0, |state| *state.get())
    }
}

/// Not remindable.
struct Plain;
impl Grain for Plain {
    fn new(_: &GrainKey) -> Plain {
        Plain
    }
}
impl Handler<Set> for Plain {
    async fn handle(&mut self, _: Set, ctx: &mut GrainContext) -> Result<(), ReminderError> {
        ctx.register_reminder("wake", Duration::from_secs(1), Duration::from_secs(1))
            .await
    }
}

fn silo(storage: Arc<dyn StorageProvider>, idle: Duration) -> Silo {
    Silo::builder()
        .register::<Alarm>("alarm")
        .register::<Plain>("plain")
        .remindable::<Alarm>()
        .service(Arc::new(Pulse::default()))
        .storage(storage)
        .config(SiloConfig {
            idle_timeout: idle,
            ..SiloConfig::default()
        })
        .build()
        .unwrap()
}

fn pulse(silo: &Silo) -> Arc<Pulse> {
    silo.service::<Pulse>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reminder_fires_while_its_grain_is_deactivated() {
    // Idle for 60 ms, woken every 150 ms: the grain is deactivated between
    // fires, and each fire activates it again.
    let silo = silo(Arc::new(MemoryStorage::new()), Duration::from_millis(60));
    let pulse = pulse(&silo);
    let alarm = silo.grain::<Alarm>("a");
    let period = Duration::from_millis(150);
    let registered = std::time::Instant::now();
    alarm.call(Set(Some(period))).await.unwrap().unwrap();
    pulse
        .wait_until("3 fires, reactivating the grain", |pulse| {
            pulse.beats("a") >= 3 && silo.activations_started() >= 3
        })
        .await;
    // Never ahead of time: at most one fire per period elapsed.
    let fired = pulse.beats("a");
    let periods = registered.elapsed().as_millis() / period.as_millis();
    assert!(
        u128::from(fired) <= periods,
        "{fired} fires in {periods} periods"
    );
    // The count the grain kept in its state, across its activations.
    assert!(alarm.call(Fired).await.unwrap() >= 3);

    alarm.call(Set(None)).await.unwrap().unwrap();
    let stopped = pulse.beats("a");
    // Another grain's reminder, first due after three periods: once it has
    // fired, the removed one has had time to fire three times.
    silo.grain::<Alarm>("sentinel")
        .call(Set(Some(period * 3)))
        .await
        .unwrap()
        .unwrap();
    pulse
        .wait_until("the sentinel", |pulse| pulse.beats("sentinel") >= 1)
        .await;
    assert!(
        pulse.beats("a") <= stopped + 1,
        "unregistered, yet fired {} times more",
        pulse.beats("a") - stopped
    );
    // Counted: every due time that came here was delivered (one may be
    // delivered and not yet run, or run and not yet counted); the
    // sentinel's reminder is still owned, the removed one is not.
    let stats = silo.reminder_stats();
    let beats = u64::from(pulse.beats("a") + pulse.beats("sentinel"));
    assert!(stats.fired.abs_diff(beats) <= 1, "{stats:?}, {beats} beats");
    // Due is counted before delivery, fired and failed after it.
    assert!(stats.due >= stats.fired + stats.failed, "{stats:?}");
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert_eq!(stats.owned, 1, "{stats:?}");
    // The grain's state went through the counted storage (reminder rows
    // are the table's own, not counted there).
    let storage = silo.storage_stats();
    assert!(storage.ops.iter().any(|op| op.done > 0), "{storage:?}");
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reminder_survives_a_silo_restart_with_redb() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reminders.redb");
    {
        let storage = Arc::new(RedbStorage::open(&path).unwrap());
        let silo = silo(storage, Duration::from_secs(60));
        silo.grain::<Alarm>("b")
            .call(Set(Some(Duration::from_millis(100))))
            .await
            .unwrap()
            .unwrap();
        silo.shutdown().await;
    }
    // A new silo on the same file: nobody calls the grain, yet it is woken.
    let storage = Arc::new(RedbStorage::open(&path).unwrap());
    let restarted = silo(storage, Duration::from_secs(60));
    pulse(&restarted)
        .wait_until("two fires after the restart", |pulse| pulse.beats("b") >= 2)
        .await;
    assert!(
        restarted.activations_started() >= 1,
        "the reminder activated it"
    );
    assert!(restarted.grain::<Alarm>("b").call(Fired).await.unwrap() >= 2);
    restarted.shutdown().await;
}

#[tokio::test]
async fn only_remindable_grains_hold_reminders() {
    let silo = silo(Arc::new(MemoryStorage::new()), Duration::from_secs(60));
    assert!(matches!(
        silo.grain::<Plain>("p").call(Set(None)).await.unwrap(),
        Err(ReminderError::NotRemindable(name)) if name == "plain"
    ));
    silo.shutdown().await;
    assert!(matches!(
        Silo::builder()
            .remindable::<Alarm>()
            .register::<Alarm>("alarm")
            .build(),
        Err(SiloError::InvalidConfig(_))
    ));
}

#[test]
fn a_silo_with_reminders_needs_a_runtime() {
    let built = Silo::builder()
        .register::<Alarm>("alarm")
        .remindable::<Alarm>()
        .build();
    assert!(matches!(built, Err(SiloError::InvalidConfig(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(granary_postgres),
    ignore = "set GRANARY_POSTGRES_URL to a PostgreSQL server (CI starts one)"
)]
async fn a_reminder_survives_a_silo_restart_with_postgres() {
    #[cfg(granary_postgres)]
    {
        let url = env!("GRANARY_POSTGRES_URL");
        // The database outlives the test: a fresh grain each run.
        let key = uuid::Uuid::new_v4().to_string();
        {
            let storage = Arc::new(granary_actors::PostgresStorage::connect(url).await.unwrap());
            let silo = silo(storage, Duration::from_secs(60));
            silo.grain::<Alarm>(key.as_str())
                .call(Set(Some(Duration::from_millis(100))))
                .await
                .unwrap()
                .unwrap();
            silo.shutdown().await;
        }
        let storage = Arc::new(granary_actors::PostgresStorage::connect(url).await.unwrap());
        let restarted = silo(storage, Duration::from_secs(60));
        pulse(&restarted)
            .wait_until("two fires after the restart", |pulse| {
                pulse.beats(&key) >= 2
            })
            .await;
        let alarm = restarted.grain::<Alarm>(key.as_str());
        assert!(alarm.call(Fired).await.unwrap() >= 2);
        // Leave the shared reminder table as it was found (the grain's
        // state row stays, as it always has).
        alarm.call(Set(None)).await.unwrap().unwrap();
        restarted.shutdown().await;
    }
}

// ---------------------------------------------------------------------
// Reminders that belong to the cluster: several silos over one storage.
// ---------------------------------------------------------------------

/// Fires seen by grains, per grain key, across every silo of a test.
#[derive(Default)]
struct Fires {
    counts: Mutex<HashMap<u64, u32>>,
    changed: Notify,
}

impl Fires {
    fn record(&self, key: u64) {
        *self.counts.lock().unwrap().entry(key).or_default() += 1;
        self.changed.notify_waiters();
    }

    fn count(&self, key: u64) -> u32 {
        self.counts.lock().unwrap().get(&key).copied().unwrap_or(0)
    }

    fn snapshot(&self) -> HashMap<u64, u32> {
        self.counts.lock().unwrap().clone()
    }

    /// Waits until `done` holds, at most `bound`.
    async fn wait_until(&self, what: &str, bound: Duration, mut done: impl FnMut(&Fires) -> bool) {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(self) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("waited {bound:?} for {what}: {:?}", self.snapshot());
            }
        }
    }
}

/// A remindable grain keyed by number that reports its fires to `Fires`.
struct Beeper;

impl Grain for Beeper {
    fn new(_: &GrainKey) -> Beeper {
        Beeper
    }
}

impl Handler<ReminderFired> for Beeper {
    async fn handle(&mut self, _: ReminderFired, ctx: &mut GrainContext) {
        if let (GrainKey::U64(key), Some(fires)) = (&ctx.id().key, ctx.service::<Fires>()) {
            fires.record(*key);
        }
    }
}

/// Registers (`Some(period)`, first due after one period) or removes
/// reminder `name`; answers whether a removed one existed.
struct Beep(&'static str, Option<Duration>);
impl Message for Beep {
    type Reply = Result<bool, ReminderError>;
}
impl Handler<Beep> for Beeper {
    async fn handle(
        &mut self,
        Beep(name, period): Beep,
        ctx: &mut GrainContext,
    ) -> Result<bool, ReminderError> {
        match period {
            Some(period) => ctx
                .register_reminder(name, period, period)
                .await
                .map(|()| true),
            None => ctx.unregister_reminder(name).await,
        }
    }
}

fn beeper(key: u64) -> GrainId {
    GrainId {
        type_name: "beeper".into(),
        key: GrainKey::U64(key),
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Every attempt to write a fired due time back, whoever made it: the
/// storage each silo sees is wrapped in a [`Recorded`] sharing one ledger.
/// A firing is always followed by exactly one conditional write against
/// the version it fired (rule 4), won or lost, so the ledger counts fires
/// per (grain, due time) without looking at clocks.
#[derive(Default)]
struct Ledger {
    state: Mutex<LedgerState>,
}

#[derive(Default)]
struct LedgerState {
    /// The due time each row version held.
    due_of: HashMap<ETag, u64>,
    /// Per (grain key, due time fired): the silos that fired it.
    fired: BTreeMap<(u64, u64), Vec<&'static str>>,
}

impl Ledger {
    fn written(&self, etag: ETag, due: u64) {
        self.state.lock().unwrap().due_of.insert(etag, due);
    }

    fn attempted(
        &self,
        silo: &'static str,
        grain: &GrainId,
        next_due_ms: u64,
        expected: ETag,
        outcome: &Result<ETag, StorageError>,
    ) {
        let mut state = self.state.lock().unwrap();
        let due = state.due_of.get(&expected).copied().unwrap_or(u64::MAX);
        let key = match grain.key {
            GrainKey::U64(key) => key,
            _ => u64::MAX,
        };
        match outcome {
            Ok(etag) => {
                state.due_of.insert(*etag, next_due_ms);
                state.fired.entry((key, due)).or_default().push(silo);
            }
            Err(StorageError::Conflict { .. }) => {
                state.fired.entry((key, due)).or_default().push(silo);
            }
            Err(_) => {}
        }
    }

    fn fired(&self) -> BTreeMap<(u64, u64), Vec<&'static str>> {
        self.state.lock().unwrap().fired.clone()
    }
}

/// A storage provider that tells the ledger of every reminder write.
struct Recorded {
    inner: Arc<dyn StorageProvider>,
    ledger: Arc<Ledger>,
    silo: &'static str,
}

impl Recorded {
    fn table(&self) -> &dyn ReminderTable {
        self.inner.reminder_table().expect("a reminder table")
    }
}

impl StorageProvider for Recorded {
    fn read<'a>(
        &'a self,
        grain: &'a GrainId,
    ) -> BoxFuture<'a, Result<Option<StoredState>, StorageError>> {
        self.inner.read(grain)
    }
    fn write<'a>(
        &'a self,
        grain: &'a GrainId,
        data: &'a [u8],
        expected: Option<ETag>,
    ) -> BoxFuture<'a, Result<ETag, StorageError>> {
        self.inner.write(grain, data, expected)
    }
    fn clear<'a>(
        &'a self,
        grain: &'a GrainId,
        expected: Option<ETag>,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        self.inner.clear(grain, expected)
    }
    fn reminder_table(&self) -> Option<&dyn ReminderTable> {
        Some(self)
    }
}

impl ReminderTable for Recorded {
    fn upsert<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
        period_ms: u64,
        next_due_ms: u64,
    ) -> BoxFuture<'a, Result<ETag, StorageError>> {
        Box::pin(async move {
            let etag = self
                .table()
                .upsert(grain, name, period_ms, next_due_ms)
                .await?;
            self.ledger.written(etag, next_due_ms);
            Ok(etag)
        })
    }
    fn update_due<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
        next_due_ms: u64,
        expected: ETag,
    ) -> BoxFuture<'a, Result<ETag, StorageError>> {
        Box::pin(async move {
            let outcome = self
                .table()
                .update_due(grain, name, next_due_ms, expected)
                .await;
            self.ledger
                .attempted(self.silo, grain, next_due_ms, expected, &outcome);
            outcome
        })
    }
    fn update_due_batch<'a>(
        &'a self,
        updates: &'a [DueUpdate],
    ) -> BoxFuture<'a, Result<BatchOutcome, StorageError>> {
        Box::pin(async move {
            let outcome = self.table().update_due_batch(updates).await?;
            for (update, outcome) in updates.iter().zip(&outcome) {
                self.ledger.attempted(
                    self.silo,
                    &update.grain,
                    update.next_due_ms,
                    update.expected,
                    outcome,
                );
            }
            Ok(outcome)
        })
    }
    fn delete<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<ETag>, StorageError>> {
        self.table().delete(grain, name)
    }
    fn read_grain<'a>(
        &'a self,
        grain: &'a GrainId,
    ) -> BoxFuture<'a, Result<Vec<ReminderRow>, StorageError>> {
        self.table().read_grain(grain)
    }
    fn read_all(&self) -> BoxFuture<'_, Result<Vec<ReminderRow>, StorageError>> {
        self.table().read_all()
    }
}

/// Owns the grains of one key parity; tells the peer silo of changes to
/// the others'.
struct Parity {
    even: bool,
    peer: OnceLock<Silo>,
}

impl Parity {
    fn new(even: bool) -> Arc<Parity> {
        Arc::new(Parity {
            even,
            peer: OnceLock::new(),
        })
    }
}

impl ReminderPlacement for Parity {
    fn owns(&self, grain: &GrainId) -> bool {
        matches!(grain.key, GrainKey::U64(key) if (key % 2 == 0) == self.even)
    }
    fn notify_owner(&self, grain: &GrainId) -> BoxFuture<'static, ()> {
        let (peer, grain) = (self.peer.get().cloned(), grain.clone());
        Box::pin(async move {
            if let Some(peer) = peer {
                peer.reminders_changed(&grain).await.unwrap();
            }
        })
    }
}

/// Owns every grain: the survivor of a failover.
struct Everything;
impl ReminderPlacement for Everything {
    fn owns(&self, _: &GrainId) -> bool {
        true
    }
    fn notify_owner(&self, _: &GrainId) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

fn beeper_silo(storage: Arc<dyn StorageProvider>, fires: &Arc<Fires>, rescan: Duration) -> Silo {
    Silo::builder()
        .register::<Beeper>("beeper")
        .remindable::<Beeper>()
        .service(fires.clone())
        .storage(storage)
        .reminder_rescan(rescan)
        .build()
        .unwrap()
}

/// Two silos, each owning half the grains, then one shut down and the
/// other owning everything.
async fn two_silos_then_failover(a: Arc<dyn StorageProvider>, b: Arc<dyn StorageProvider>) {
    const REMINDERS: u64 = 50;
    const PERIOD: Duration = Duration::from_millis(200);
    let period_ms = PERIOD.as_millis() as u64;
    let fires = Arc::new(Fires::default());
    let ledger = Arc::new(Ledger::default());
    let recorded = |inner, silo| -> Arc<dyn StorageProvider> {
        Arc::new(Recorded {
            inner,
            ledger: ledger.clone(),
            silo,
        })
    };
    // The periodic rescan is a safety net; the test must pass without it.
    let hour = Duration::from_secs(3600);
    let silo_a = beeper_silo(recorded(a, "a"), &fires, hour);
    let silo_b = beeper_silo(recorded(b, "b"), &fires, hour);
    let (even, odd) = (Parity::new(true), Parity::new(false));
    even.peer.set(silo_b.clone()).ok();
    odd.peer.set(silo_a.clone()).ok();
    silo_a.set_reminder_placement(even);
    silo_b.set_reminder_placement(odd);
    silo_a.rescan_reminders().await.unwrap();
    silo_b.rescan_reminders().await.unwrap();

    // Registered on one silo: the other's half reaches it by notification.
    for key in 0..REMINDERS {
        let registered = silo_a
            .grain::<Beeper>(key)
            .call(Beep("beep", Some(PERIOD)))
            .await
            .unwrap();
        assert_eq!(registered, Ok(true));
    }
    // About 3 s of firing, with a rescan on each silo part-way (as after a
    // view change that moves nothing): each keeps its own half only.
    fires
        .wait_until(
            "5 fires of every reminder",
            Duration::from_secs(30),
            |fires| (0..REMINDERS).all(|key| fires.count(key) >= 5),
        )
        .await;
    silo_a.rescan_reminders().await.unwrap();
    silo_b.rescan_reminders().await.unwrap();
    fires
        .wait_until(
            "15 fires of every reminder",
            Duration::from_secs(30),
            |fires| (0..REMINDERS).all(|key| fires.count(key) >= 15),
        )
        .await;

    // B goes; A takes every grain.
    let stopping = wall_ms();
    silo_b.shutdown().await;
    let switched = wall_ms();
    silo_a.set_reminder_placement(Arc::new(Everything));
    silo_a.rescan_reminders().await.unwrap();
    let at_switch = fires.snapshot();
    fires
        .wait_until(
            "3 more fires of every reminder",
            Duration::from_secs(30),
            |fires| {
                (0..REMINDERS)
                    .all(|key| fires.count(key) >= at_switch.get(&key).copied().unwrap_or(0) + 3)
            },
        )
        .await;
    silo_a.shutdown().await;

    // Both silos are down, their firings written: the ledger is complete.
    let fired = ledger.fired();
    let handled = fires.snapshot();
    for key in 0..REMINDERS {
        let dues: Vec<(u64, &Vec<&str>)> = fired
            .range((key, 0)..=(key, u64::MAX))
            .map(|((_, due), silos)| (*due, silos))
            .collect();
        assert!(
            dues.iter().all(|(due, _)| *due != u64::MAX),
            "{key}: a due time the ledger never saw"
        );
        // Each fire the grain saw is one attempt to write its due time.
        let attempts: usize = dues.iter().map(|(_, silos)| silos.len()).sum();
        assert_eq!(attempts, handled[&key] as usize, "grain {key}");
        let owner = if key % 2 == 0 { "a" } else { "b" };
        let twice: Vec<u64> = dues
            .iter()
            .filter(|(_, silos)| silos.len() > 1)
            .map(|(due, _)| *due)
            .collect();
        if key % 2 == 0 {
            // Never moved: each due time exactly once, always by A.
            assert!(twice.is_empty(), "grain {key} fired twice at {twice:?}");
            assert!(dues.iter().all(|(_, silos)| silos == &&vec!["a"]));
        } else {
            // Moved once: at most one due time fired twice, at the switch.
            assert!(twice.len() <= 1, "grain {key} fired twice at {twice:?}");
            for due in &twice {
                assert!(
                    *due + period_ms >= stopping && *due <= switched + period_ms,
                    "grain {key}: a double fire at {due}, not at the switch ({stopping}..{switched})"
                );
            }
            // B fired before the switch, A after; A's first due time was due
            // within a period of the switch: nothing was lost.
            let first_by_a = dues
                .iter()
                .find(|(_, silos)| silos.contains(&"a"))
                .map(|(due, _)| *due)
                .unwrap();
            assert!(
                first_by_a <= switched + period_ms,
                "grain {key}: first fired by A at {first_by_a}, switch at {switched}"
            );
            assert!(
                dues.iter()
                    .filter(|(due, _)| *due < stopping.saturating_sub(period_ms))
                    .all(|(_, silos)| silos == &&vec![owner]),
                "grain {key}: fired by a silo that did not own it"
            );
        }
        // Nothing fired ahead of time or skipped in steady state: due times
        // are at least a period apart.
        for pair in dues.windows(2) {
            assert!(pair[1].0 >= pair[0].0 + period_ms, "grain {key}: {pair:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_silos_sharing_memory_storage_fire_each_due_time_once_and_fail_over() {
    let storage: Arc<dyn StorageProvider> = Arc::new(MemoryStorage::new());
    two_silos_then_failover(storage.clone(), storage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_silos_sharing_a_sqlite_file_fire_each_due_time_once_and_fail_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reminders.sqlite");
    // Two handles on one file, as two processes would have.
    two_silos_then_failover(
        Arc::new(SqliteStorage::open(&path).unwrap()),
        Arc::new(SqliteStorage::open(&path).unwrap()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_on_a_silo_that_does_not_own_the_grain_reaches_the_owner() {
    let storage: Arc<dyn StorageProvider> = Arc::new(MemoryStorage::new());
    let ledger = Arc::new(Ledger::default());
    let fires = Arc::new(Fires::default());
    let hour = Duration::from_secs(3600);
    let on = |silo| -> Arc<dyn StorageProvider> {
        Arc::new(Recorded {
            inner: storage.clone(),
            ledger: ledger.clone(),
            silo,
        })
    };
    let (silo_a, silo_b) = (
        beeper_silo(on("a"), &fires, hour),
        beeper_silo(on("b"), &fires, hour),
    );
    let (even, odd) = (Parity::new(true), Parity::new(false));
    even.peer.set(silo_b.clone()).ok();
    odd.peer.set(silo_a.clone()).ok();
    silo_a.set_reminder_placement(even);
    silo_b.set_reminder_placement(odd);
    silo_a.rescan_reminders().await.unwrap();
    silo_b.rescan_reminders().await.unwrap();

    // Grain 7 is B's; registered through A, which does not fire it.
    let seven = silo_a.grain::<Beeper>(7u64);
    let period = Duration::from_millis(100);
    assert_eq!(
        seven.call(Beep("beep", Some(period))).await.unwrap(),
        Ok(true)
    );
    fires
        .wait_until("grain 7 fired 3 times", Duration::from_secs(20), |fires| {
            fires.count(7) >= 3
        })
        .await;
    assert!(
        ledger.fired().values().all(|silos| silos == &vec!["b"]),
        "only the owner fires: {:?}",
        ledger.fired()
    );
    // Removed through A: the owner hears of it before the answer comes.
    assert_eq!(seven.call(Beep("beep", None)).await.unwrap(), Ok(true));
    let stopped = fires.count(7);
    // A second reminder on the same grain, due after two periods of the
    // first: once it has fired, the first has had time to fire twice.
    assert_eq!(
        seven
            .call(Beep("sentinel", Some(period * 2)))
            .await
            .unwrap(),
        Ok(true)
    );
    fires
        .wait_until("the sentinel", Duration::from_secs(20), |fires| {
            fires.count(7) > stopped + 1
        })
        .await;
    // One of the fires since may be the removed reminder's, if its firing
    // was under way; the sentinel's are the rest.
    let since = fires.count(7) - stopped;
    assert!(since <= 2, "{since} fires after the removal");
    assert_eq!(seven.call(Beep("sentinel", None)).await.unwrap(), Ok(true));
    silo_a.shutdown().await;
    silo_b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregister_answers_true_once_and_the_row_is_gone() {
    let storage = Arc::new(MemoryStorage::new());
    let fires = Arc::new(Fires::default());
    let silo = beeper_silo(storage.clone(), &fires, Duration::from_secs(30));
    let grain = silo.grain::<Beeper>(1u64);
    assert_eq!(
        grain
            .call(Beep("beep", Some(Duration::from_secs(60))))
            .await
            .unwrap(),
        Ok(true)
    );
    let table = storage.reminder_table().unwrap();
    assert_eq!(table.read_grain(&beeper(1)).await.unwrap().len(), 1);
    assert_eq!(grain.call(Beep("beep", None)).await.unwrap(), Ok(true));
    assert_eq!(grain.call(Beep("beep", None)).await.unwrap(), Ok(false));
    assert_eq!(table.read_grain(&beeper(1)).await.unwrap(), vec![]);
    assert_eq!(table.read_all().await.unwrap(), vec![]);
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reminders_are_a_hundred_rows_and_a_rescan_finds_them() {
    let storage = Arc::new(MemoryStorage::new());
    let fires = Arc::new(Fires::default());
    let silo = beeper_silo(storage.clone(), &fires, Duration::from_secs(30));
    // Registered while the silo owns nothing: nothing fires.
    struct Nothing;
    impl ReminderPlacement for Nothing {
        fn owns(&self, _: &GrainId) -> bool {
            false
        }
        fn notify_owner(&self, _: &GrainId) -> BoxFuture<'static, ()> {
            Box::pin(async {})
        }
    }
    silo.set_reminder_placement(Arc::new(Nothing));
    silo.rescan_reminders().await.unwrap();
    for key in 0..100u64 {
        silo.grain::<Beeper>(key)
            .call(Beep("beep", Some(Duration::from_millis(100))))
            .await
            .unwrap()
            .unwrap();
    }
    let rows = storage.reminder_table().unwrap().read_all().await.unwrap();
    assert_eq!(rows.len(), 100);
    assert_eq!(fires.snapshot(), HashMap::new());
    // Owning everything again: installing the placement rescans.
    silo.set_reminder_placement(Arc::new(LoneSilo));
    fires
        .wait_until("every reminder fired", Duration::from_secs(20), |fires| {
            (0..100).all(|key| fires.count(key) >= 1)
        })
        .await;
    silo.shutdown().await;
}

/// A provider without a reminder table (the trait's default).
struct NoTable(MemoryStorage);

impl StorageProvider for NoTable {
    fn read<'a>(
        &'a self,
        grain: &'a GrainId,
    ) -> BoxFuture<'a, Result<Option<StoredState>, StorageError>> {
        self.0.read(grain)
    }
    fn write<'a>(
        &'a self,
        grain: &'a GrainId,
        data: &'a [u8],
        expected: Option<ETag>,
    ) -> BoxFuture<'a, Result<ETag, StorageError>> {
        self.0.write(grain, data, expected)
    }
    fn clear<'a>(
        &'a self,
        grain: &'a GrainId,
        expected: Option<ETag>,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        self.0.clear(grain, expected)
    }
}

#[tokio::test]
async fn a_silo_with_remindable_grains_needs_a_reminder_table() {
    let refused = Silo::builder()
        .register::<Alarm>("alarm")
        .remindable::<Alarm>()
        .storage(Arc::new(NoTable(MemoryStorage::new())))
        .build();
    assert!(
        matches!(&refused, Err(SiloError::InvalidConfig(why)) if why.contains("reminder table")),
        "{refused:?}"
    );
    // Without remindable grains the table is not needed.
    let silo = Silo::builder()
        .register::<Plain>("plain")
        .storage(Arc::new(NoTable(MemoryStorage::new())))
        .build()
        .unwrap();
    silo.shutdown().await;
    // A rescan interval of zero is refused too.
    assert!(matches!(
        Silo::builder()
            .register::<Alarm>("alarm")
            .remindable::<Alarm>()
            .reminder_rescan(Duration::ZERO)
            .build(),
        Err(SiloError::InvalidConfig(_))
    ));
}

/// A reminder as the one-record format of earlier versions held it.
#[derive(serde::Serialize)]
struct OldReminder {
    grain: GrainId,
    name: String,
    period_ms: u64,
    next_due_ms: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reminders_of_an_earlier_version_are_copied_into_the_table() {
    let storage = Arc::new(MemoryStorage::new());
    let record = GrainId {
        type_name: granary_actors::REMINDERS.into(),
        key: GrainKey::from("silo"),
    };
    let old = vec![OldReminder {
        grain: beeper(3),
        name: "beep".into(),
        period_ms: 100,
        next_due_ms: wall_ms(),
    }];
    let data = postcard::to_allocvec(&old).unwrap();
    storage.write(&record, &data, None).await.unwrap();
    let fires = Arc::new(Fires::default());
    let silo = beeper_silo(storage.clone(), &fires, Duration::from_secs(30));
    fires
        .wait_until("the old reminder", Duration::from_secs(20), |fires| {
            fires.count(3) >= 2
        })
        .await;
    assert_eq!(storage.read(&record).await.unwrap(), None, "cleared");
    let rows = storage.reminder_table().unwrap().read_all().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].grain.clone(), rows[0].period_ms), (beeper(3), 100));
    silo.shutdown().await;
}

/// Memory storage whose clears of the legacy reminders record fail while
/// `failing` is set.
struct FailsLegacyClear {
    inner: MemoryStorage,
    failing: std::sync::atomic::AtomicBool,
}

impl StorageProvider for FailsLegacyClear {
    fn read<'a>(
        &'a self,
        grain: &'a GrainId,
    ) -> BoxFuture<'a, Result<Option<StoredState>, StorageError>> {
        self.inner.read(grain)
    }

    fn write<'a>(
        &'a self,
        grain: &'a GrainId,
        data: &'a [u8],
        expected: Option<ETag>,
    ) -> BoxFuture<'a, Result<ETag, StorageError>> {
        self.inner.write(grain, data, expected)
    }

    fn clear<'a>(
        &'a self,
        grain: &'a GrainId,
        expected: Option<ETag>,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        if grain.type_name == granary_actors::REMINDERS
            && self.failing.load(std::sync::atomic::Ordering::SeqCst)
        {
            return Box::pin(async { Err(StorageError::Backend("injected".into())) });
        }
        self.inner.clear(grain, expected)
    }

    fn reminder_table(&self) -> Option<&dyn ReminderTable> {
        self.inner.reminder_table()
    }
}

/// Rule 10: an import whose clear failed is tried again at each rescan,
/// and those tries only clear. A reminder unregistered in between stays
/// gone. (In review, each try upserted every legacy row again: the
/// unregistered reminder came back, and rows that had fired since went
/// back to their old due times.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_import_tried_again_brings_back_no_reminder_unregistered_since() {
    let storage = Arc::new(FailsLegacyClear {
        inner: MemoryStorage::new(),
        failing: std::sync::atomic::AtomicBool::new(true),
    });
    let record = GrainId {
        type_name: granary_actors::REMINDERS.into(),
        key: GrainKey::from("silo"),
    };
    let old = vec![OldReminder {
        grain: beeper(4),
        name: "beep".into(),
        period_ms: 100,
        next_due_ms: wall_ms(),
    }];
    storage
        .write(&record, &postcard::to_allocvec(&old).unwrap(), None)
        .await
        .unwrap();
    let fires = Arc::new(Fires::default());
    let silo = beeper_silo(storage.clone(), &fires, Duration::from_millis(300));
    fires
        .wait_until("the old reminder", Duration::from_secs(20), |fires| {
            fires.count(4) >= 1
        })
        .await;
    // The clears fail: the record is still there, and is tried again at
    // each rescan, before and after the reminder is unregistered.
    assert!(storage.read(&record).await.unwrap().is_some());
    assert_eq!(
        silo.grain::<Beeper>(4u64)
            .call(Beep("beep", None))
            .await
            .unwrap(),
        Ok(true)
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        storage.reminder_table().unwrap().read_all().await.unwrap(),
        vec![],
        "an unregistered reminder came back while the record stayed"
    );
    storage
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    // The next rescans clear the record, and copy nothing back.
    let bound = std::time::Instant::now() + Duration::from_secs(20);
    while storage.read(&record).await.unwrap().is_some() {
        assert!(
            std::time::Instant::now() < bound,
            "the record is never cleared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        storage.reminder_table().unwrap().read_all().await.unwrap(),
        vec![],
        "an unregistered reminder came back"
    );
    silo.shutdown().await;
}
