//! Reminders persist: they fire whether or not the grain is active, and
//! after the silo restarts.

use std::sync::Arc;
use std::time::Duration;

use granary_actors::{
    ActivationError, Grain, GrainContext, GrainKey, Handler, MemoryStorage, Message,
    PersistentState, RedbStorage, ReminderError, ReminderFired, Silo, SiloConfig, SiloError,
    StorageProvider,
};

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
    async fn handle(&mut self, fired: ReminderFired, _: &mut GrainContext) {
        assert_eq!(fired.name, "wake");
        if let Some(state) = &mut self.fired {
            *state.get_mut() += 1;
            let _ = state.write().await;
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
        .storage(storage)
        .config(SiloConfig {
            idle_timeout: idle,
            ..SiloConfig::default()
        })
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reminder_fires_while_its_grain_is_deactivated() {
    let silo = silo(Arc::new(MemoryStorage::new()), Duration::from_millis(60));
    let alarm = silo.grain::<Alarm>("a");
    alarm
        .call(Set(Some(Duration::from_millis(150))))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let fired = alarm.call(Fired).await.unwrap();
    assert!(
        (3..=5).contains(&fired),
        "{fired} reminders in 700 ms at 150 ms"
    );
    assert!(
        silo.activations_started() >= 3,
        "each reminder reactivated the idle grain"
    );
    alarm.call(Set(None)).await.unwrap().unwrap();
    let stopped = alarm.call(Fired).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        alarm.call(Fired).await.unwrap() <= stopped + 1,
        "unregistered"
    );
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
    tokio::time::sleep(Duration::from_millis(500)).await;
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
        tokio::time::sleep(Duration::from_millis(500)).await;
        let alarm = restarted.grain::<Alarm>(key.as_str());
        assert!(alarm.call(Fired).await.unwrap() >= 2);
        // Leave the shared reminder record as it was found.
        alarm.call(Set(None)).await.unwrap().unwrap();
        restarted.shutdown().await;
    }
}
