//! The reminder service at 100 000 reminders, in memory and in redb.
//!
//! ```text
//! cargo bench -p granary-actors --bench reminders
//! ```
//!
//! - `rescan/*`: `Silo::rescan_reminders` over 100 000 rows: `warm` with
//!   every row already in the schedule (the periodic safety net, or a view
//!   change that moves nothing), `cold` into an empty schedule (a silo that
//!   just took every grain over).
//! - `fire_round/all/*`: 100 000 reminders due at the same instant: the
//!   time from that instant until every grain has handled its
//!   `ReminderFired` and every row's next due time is written (one firing
//!   round: the scheduler's wake-up, 100 000 tells, one batch of
//!   conditional writes). The grains are active already (the first,
//!   untimed round activates them).
//! - `fire_round/one_of_100k/*`: one of the 100 000 due, the same span: the
//!   round when few reminders fire.
//! - `legacy_blob/*`: the peer, the format before one row per reminder: the
//!   same 100 000 reminders as one state record, `load` (what a silo read at
//!   start and after every conflict) and `write` (what every firing round
//!   wrote, however few reminders fired).

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use futures_util::future::BoxFuture;
use granary_actors::storage::{BatchOutcome, StoredState};
use granary_actors::{
    DueUpdate, ETag, Grain, GrainContext, GrainId, GrainKey, Handler, LoneSilo, MemoryStorage,
    NewReminder, PersistentState, RedbStorage, ReminderFired, ReminderPlacement, ReminderRow,
    ReminderTable, Silo, SiloConfig, StorageError, StorageProvider,
};
use tokio::sync::Notify;

const REMINDERS: u64 = 100_000;
const HOUR_MS: u64 = 3_600_000;

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// Counts what a round did: fires the grains handled, due times written.
#[derive(Default)]
struct Progress {
    fired: AtomicU64,
    written: AtomicU64,
    changed: Notify,
}

impl Progress {
    async fn wait_for(&self, fired: u64, written: u64) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.fired.load(Ordering::Acquire) >= fired
                && self.written.load(Ordering::Acquire) >= written
            {
                return;
            }
            if tokio::time::timeout(Duration::from_secs(120), notified)
                .await
                .is_err()
            {
                panic!(
                    "a round stalled: {} fired, {} written",
                    self.fired.load(Ordering::Acquire),
                    self.written.load(Ordering::Acquire)
                );
            }
        }
    }
}

struct Tick;
impl Grain for Tick {
    fn new(_: &GrainKey) -> Tick {
        Tick
    }
}
impl Handler<ReminderFired> for Tick {
    async fn handle(&mut self, _: ReminderFired, ctx: &mut GrainContext) {
        if let Some(progress) = ctx.service::<Progress>() {
            progress.fired.fetch_add(1, Ordering::AcqRel);
            progress.changed.notify_waiters();
        }
    }
}

/// A provider that counts the due times written.
struct Counted {
    inner: Arc<dyn StorageProvider>,
    progress: Arc<Progress>,
}

impl Counted {
    fn table(&self) -> &dyn ReminderTable {
        self.inner.reminder_table().expect("a reminder table")
    }
}

impl StorageProvider for Counted {
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

impl ReminderTable for Counted {
    fn upsert<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
        period_ms: u64,
        next_due_ms: u64,
    ) -> BoxFuture<'a, Result<ETag, StorageError>> {
        self.table().upsert(grain, name, period_ms, next_due_ms)
    }
    fn update_due<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
        next_due_ms: u64,
        expected: ETag,
    ) -> BoxFuture<'a, Result<ETag, StorageError>> {
        self.table().update_due(grain, name, next_due_ms, expected)
    }
    fn update_due_batch<'a>(
        &'a self,
        updates: &'a [DueUpdate],
    ) -> BoxFuture<'a, Result<BatchOutcome, StorageError>> {
        Box::pin(async move {
            let outcome = self.table().update_due_batch(updates).await?;
            let written = outcome.iter().filter(|written| written.is_ok()).count();
            self.progress
                .written
                .fetch_add(written as u64, Ordering::AcqRel);
            self.progress.changed.notify_waiters();
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
    fn upsert_batch<'a>(
        &'a self,
        rows: &'a [NewReminder],
    ) -> BoxFuture<'a, Result<BatchOutcome, StorageError>> {
        self.table().upsert_batch(rows)
    }
}

/// Owns nothing: a silo that holds no reminders.
struct Nothing;
impl ReminderPlacement for Nothing {
    fn owns(&self, _: &GrainId) -> bool {
        false
    }
    fn notify_owner(&self, _: &GrainId) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

fn rows(due_ms: u64) -> Vec<NewReminder> {
    (0..REMINDERS)
        .map(|key| NewReminder {
            grain: GrainId {
                type_name: "tick".into(),
                key: GrainKey::U64(key),
            },
            name: "tick".into(),
            period_ms: HOUR_MS,
            next_due_ms: due_ms,
        })
        .collect()
}

/// Every row due at `due_ms`, written in one batch.
async fn set_due(table: &dyn ReminderTable, due_ms: u64) {
    let outcome = table.upsert_batch(&rows(due_ms)).await.expect("upserted");
    assert!(outcome.iter().all(Result::is_ok));
}

struct Fixture {
    silo: Silo,
    storage: Arc<dyn StorageProvider>,
    progress: Arc<Progress>,
    _dir: Option<tempfile::TempDir>,
}

fn fixture(rt: &tokio::runtime::Runtime, backend: &str) -> Fixture {
    let (inner, dir): (Arc<dyn StorageProvider>, _) = match backend {
        "memory" => (Arc::new(MemoryStorage::new()), None),
        _ => {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let storage = RedbStorage::open(dir.path().join("reminders.redb")).expect("redb");
            (Arc::new(storage), Some(dir))
        }
    };
    let progress = Arc::new(Progress::default());
    let storage: Arc<dyn StorageProvider> = Arc::new(Counted {
        inner,
        progress: progress.clone(),
    });
    let silo = rt.block_on(async {
        let silo = Silo::builder()
            .register::<Tick>("tick")
            .remindable::<Tick>()
            .service(progress.clone())
            .storage(storage.clone())
            .config(SiloConfig {
                mailbox_capacity: 16,
                ..SiloConfig::default()
            })
            .reminder_rescan(Duration::from_secs(3600))
            .build()
            .expect("a silo");
        let table = storage.reminder_table().expect("a table");
        set_due(table, wall_ms() + HOUR_MS).await;
        silo.rescan_reminders().await.expect("rescanned");
        silo
    });
    Fixture {
        silo,
        storage,
        progress,
        _dir: dir,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn rescan(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("rescan");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(REMINDERS));
    for backend in ["memory", "redb"] {
        let fixture = fixture(&rt, backend);
        group.bench_function(format!("warm/{backend}"), |b| {
            b.iter(|| {
                rt.block_on(fixture.silo.rescan_reminders())
                    .expect("rescanned")
            })
        });
        group.bench_function(format!("cold/{backend}"), |b| {
            b.iter_custom(|iterations| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iterations {
                        fixture.silo.set_reminder_placement(Arc::new(Nothing));
                        fixture.silo.rescan_reminders().await.expect("emptied");
                        fixture.silo.set_reminder_placement(Arc::new(LoneSilo));
                        let started = Instant::now();
                        fixture.silo.rescan_reminders().await.expect("rescanned");
                        total += started.elapsed();
                    }
                    total
                })
            })
        });
        rt.block_on(fixture.silo.shutdown());
    }
    group.finish();
}

fn fire_round(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("fire_round");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    for backend in ["memory", "redb"] {
        let fixture = fixture(&rt, backend);
        let table = fixture.storage.reminder_table().expect("a table");
        // How long setting the rows and loading them took last time: they
        // are made due well after that.
        let setup = std::cell::Cell::new(Duration::from_secs(2));
        // One round at `due`, timed from `due` until it is done.
        let round = || async {
            loop {
                let fired = fixture.progress.fired.load(Ordering::Acquire);
                let written = fixture.progress.written.load(Ordering::Acquire);
                let started = Instant::now();
                let due = wall_ms() + 2 * setup.get().as_millis() as u64 + 300;
                set_due(table, due).await;
                fixture.silo.rescan_reminders().await.expect("rescanned");
                setup.set(started.elapsed());
                let lead = due.saturating_sub(wall_ms());
                let due_at = Instant::now() + Duration::from_millis(lead);
                fixture
                    .progress
                    .wait_for(fired + REMINDERS, written + REMINDERS)
                    .await;
                if lead > 0 {
                    return due_at.elapsed();
                }
                // Setting the rows overran their due time (a stall on a
                // loaded machine): the round began untimed; again.
            }
        };
        // The first round activates the grains.
        rt.block_on(round());
        group.throughput(Throughput::Elements(REMINDERS));
        group.bench_function(format!("all/{backend}"), |b| {
            b.iter_custom(|iterations| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iterations {
                        total += round().await;
                    }
                    total
                })
            })
        });
        // One reminder of the 100 000 due: what a round costs when few fire
        // (the old format wrote the whole record for it).
        let one = GrainId {
            type_name: "tick".into(),
            key: GrainKey::U64(REMINDERS / 2),
        };
        let single = || async {
            loop {
                let fired = fixture.progress.fired.load(Ordering::Acquire);
                let written = fixture.progress.written.load(Ordering::Acquire);
                let due = wall_ms() + 500;
                table
                    .upsert(&one, "tick", HOUR_MS, due)
                    .await
                    .expect("upserted");
                fixture.silo.reminders_changed(&one).await.expect("re-read");
                let lead = due.saturating_sub(wall_ms());
                let due_at = Instant::now() + Duration::from_millis(lead);
                fixture.progress.wait_for(fired + 1, written + 1).await;
                if lead > 0 {
                    return due_at.elapsed();
                }
            }
        };
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("one_of_100k/{backend}"), |b| {
            b.iter_custom(|iterations| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iterations {
                        total += single().await;
                    }
                    total
                })
            })
        });
        rt.block_on(fixture.silo.shutdown());
    }
    group.finish();
}

/// A reminder as the one-record format kept it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct LegacyReminder {
    grain: GrainId,
    name: String,
    period_ms: u64,
    next_due_ms: u64,
}

fn legacy_blob(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("legacy_blob");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(REMINDERS));
    let record = GrainId {
        type_name: granary_actors::REMINDERS.into(),
        key: GrainKey::from("silo"),
    };
    let now = wall_ms();
    let all: Vec<LegacyReminder> = rows(now + HOUR_MS)
        .into_iter()
        .map(|row| LegacyReminder {
            grain: row.grain,
            name: row.name,
            period_ms: row.period_ms,
            next_due_ms: row.next_due_ms,
        })
        .collect();
    for backend in ["memory", "redb"] {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let storage: Arc<dyn StorageProvider> = match backend {
            "memory" => Arc::new(MemoryStorage::new()),
            _ => Arc::new(RedbStorage::open(dir.path().join("legacy.redb")).expect("redb")),
        };
        let mut state: PersistentState<Vec<LegacyReminder>> = rt
            .block_on(PersistentState::load(storage.clone(), record.clone()))
            .expect("loaded");
        *state.get_mut() = all.clone();
        rt.block_on(state.write()).expect("written");
        group.bench_function(format!("load/{backend}"), |b| {
            b.iter(|| {
                let loaded: PersistentState<Vec<LegacyReminder>> = rt
                    .block_on(PersistentState::load(storage.clone(), record.clone()))
                    .expect("loaded");
                black_box(loaded.get().len())
            })
        });
        group.bench_function(format!("write/{backend}"), |b| {
            b.iter(|| {
                // What a round did: the whole table, cloned, moved on, written.
                let mut updated = state.get().clone();
                if let Some(first) = updated.first_mut() {
                    first.next_due_ms += HOUR_MS;
                }
                *state.get_mut() = updated;
                rt.block_on(state.write()).expect("written");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, rescan, fire_round, legacy_blob);
criterion_main!(benches);
