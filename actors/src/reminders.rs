//! Reminders: persistent, periodic messages to a grain, which fire whether
//! or not the grain is active, across silo restarts, and on one silo of
//! the silos that share the storage.
//!
//! # Rules
//!
//! 1. **One row per reminder.** A reminder is a row `(grain, name, period,
//!    next due time)` of the storage's reminder table
//!    ([`ReminderTable`](crate::storage::ReminderTable), from
//!    `StorageProvider::reminder_table`), with an ETag of its own that
//!    grows on every write. Every silo sharing the storage shares the
//!    table. A silo with remindable grain types over a provider without a
//!    table is refused at build.
//! 2. **Ownership.** A silo fires only the reminders it owns: its
//!    [`ReminderPlacement`] says, per grain, whether it does. A lone silo
//!    owns everything ([`LoneSilo`]); a cluster node installs its own with
//!    `Silo::set_reminder_placement`. The silo's schedule holds the owned
//!    rows, loaded by a full rescan of the table when the service starts,
//!    when a placement is installed, on `Silo::rescan_reminders` (the
//!    cluster calls it after every view change) and every
//!    `SiloBuilder::reminder_rescan` (30 s by default: a safety net for a
//!    lost notification); `Silo::reminders_changed` re-reads one grain's
//!    rows.
//! 3. **Registration.** `register` writes the row unconditionally (a new
//!    ETag, and the first due time `now + due`); if this silo owns the
//!    grain it schedules the row at once, else it tells the owner through
//!    [`ReminderPlacement::notify_owner`]. `unregister` deletes the row,
//!    answers whether it existed, drops it from this silo's schedule, and
//!    tells the owner if that is another silo.
//! 4. **Firing.** One scheduler task per silo sleeps until the earliest
//!    owned due time (or a change), then fires every due row: it sends the
//!    grain [`ReminderFired`] through its grain reference (the message
//!    activates it if needed), THEN moves the row's due time on by whole
//!    periods past now with a conditional write against the row's ETag (the
//!    round's writes go as one batch). So a silo that was down fires a
//!    missed reminder once, not once per missed period. A row is not fired
//!    again while its write is under way. A firing refused because the silo
//!    (or the grain's home) is shutting down, or had no room for the grain
//!    (`CallError::Overloaded`: its activation limit), is not written: the
//!    next owner fires it, or this silo tries again a second later. A firing that
//!    could not be delivered otherwise (the grain's mailbox stayed full past
//!    the call timeout, its home on another silo could not be reached) is
//!    logged and counts as fired. On a silo that routes its
//!    grain references (a cluster node), the message goes to the grain's
//!    home wherever it is, under the name [`REMINDER_FIRED`].
//! 5. **Conflicts.** A write refused because the row's ETag moved means
//!    someone else wrote it (re-registered it, or another owner fired it):
//!    the silo re-reads the grain's rows and adopts them, and does not fire
//!    the due time it just fired again; a deleted row leaves the schedule.
//!    A write that fails otherwise (the store is down) leaves the new due
//!    time in this silo's memory only, with the row's ETag: it is not fired
//!    again here, and the next firing writes against the same ETag.
//! 6. **Newest wins.** Reads of the table race with changes made on this
//!    silo (registrations, firings' writes, removals). A row read replaces
//!    an entry not changed since the read began; an entry changed since
//!    keeps the greater ETag; a row this silo deleted after the read began
//!    is not brought back (`reminders/schedule.rs`).
//! 7. **Guarantee.** While every silo agrees on the owners, each due time
//!    fires exactly once across all the silos that share the storage. When
//!    ownership of a grain moves (a silo dies or joins), a due time may
//!    fire once more for that move, never more: the old owner fired it and
//!    the new owner loaded the row before the old owner's write landed (the
//!    later of the two writes then conflicts, rule 5). A reminder is never
//!    lost while some silo owns it: its row stays until it is unregistered,
//!    and the owner's rescans find it. (A row the store cannot decode, put
//!    there by other tooling or damage, is skipped with a warning and does
//!    not fire: the reminder table's rule 5.) A removed reminder may still fire
//!    once if its firing was under way, or, removed on a silo that does not
//!    own it, before the owner hears of it. Due times missed while no silo
//!    fired them (all were down, or the owner stalled past a period) fire
//!    once, as in rule 4.
//! 8. **Remindable types.** Only grain types registered with
//!    `SiloBuilder::remindable` can hold reminders: they handle
//!    `ReminderFired`, and the silo knows how to reach them by their
//!    registered name. A silo leaves rows of types it does not know to the
//!    silos that do.
//! 9. **Times** are wall-clock milliseconds since the Unix epoch, so they
//!    mean the same after a restart and on every silo, and are kept below
//!    2^63 (the SQL stores' integers): a period must be at least 1 ms and
//!    below 2^63 ms, and a later due time is capped there.
//! 10. **Earlier versions** kept a silo's reminders in one state record
//!     ([`REMINDERS`]); a silo's first rescan copies any such record into
//!     the table and clears it. Only rows the table lacks are copied, so an
//!     import tried again never moves a row that fired since back to its
//!     old due time. Once this silo has copied a version of the record, it
//!     only clears that version, so it brings back no reminder unregistered
//!     since; another silo that imports the same record before it is
//!     cleared copies what the table lacks then (the record is read by
//!     every silo once, at its first rescan).

mod schedule;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::{BoxFuture, join_all};
use serde::{Deserialize, Serialize};

use self::schedule::{Firing, Schedule, Scope, Written};
use crate::error::CallError;
use crate::grain::{Handler, Message};
use crate::key::{GrainId, GrainKey};
use crate::silo::Silo;
use crate::storage::{DueUpdate, NewReminder, ReminderTable, StorageError, StorageProvider};

/// The state record in which earlier versions kept a silo's reminders, all
/// in one; a silo copies it into the reminder table once and clears it
/// (rule 10).
pub const REMINDERS: &str = "granary.reminders";

/// The latest due time and the longest period (rule 9).
const MAX_MS: u64 = u64::MAX >> 1;

/// How often a silo rescans the table unless told otherwise
/// (`SiloBuilder::reminder_rescan`).
pub(crate) const DEFAULT_RESCAN: Duration = Duration::from_secs(30);

/// How soon a firing refused for a shutdown or for want of room is tried
/// again here (rule 4).
const NOT_FIRED_RETRY_MS: u64 = 1_000;

/// How soon a failed rescan is tried again.
const RESCAN_RETRY: Duration = Duration::from_secs(1);

/// The name [`ReminderFired`] is registered under for every remindable
/// grain type (`SiloBuilder::remindable`), so that it travels to a grain
/// whose home is another silo.
pub const REMINDER_FIRED: &str = "granary.ReminderFired";

/// The message a reminder sends its grain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReminderFired {
    /// The reminder's name.
    pub name: String,
}

impl Message for ReminderFired {
    type Reply = ();
}

impl crate::grain::NamedMessage for ReminderFired {
    const NAME: &'static str = REMINDER_FIRED;
}

/// Decides which silo fires which grain's reminders (rule 2). A cluster
/// node installs one on its silo with `Silo::set_reminder_placement` (every
/// silo's placement should name one owner per grain for a given view, such
/// as a hash of the grain over the live silos); a silo starts with
/// [`LoneSilo`].
pub trait ReminderPlacement: Send + Sync + 'static {
    /// Whether this silo fires `grain`'s reminders now. Asked for every
    /// row of a rescan and before every firing, with the silo's schedule
    /// locked: it must be quick and must not block.
    fn owns(&self, grain: &GrainId) -> bool;

    /// Tells the silo that owns `grain`'s reminders that its rows changed:
    /// a registration or removal made on this silo for a grain it does not
    /// own. The owner answers with `Silo::reminders_changed`. A lost
    /// notification is made good by the owner's next rescan.
    fn notify_owner(&self, grain: &GrainId) -> BoxFuture<'static, ()>;
}

/// The placement of a silo on its own: it owns every grain's reminders.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoneSilo;

impl ReminderPlacement for LoneSilo {
    fn owns(&self, _: &GrainId) -> bool {
        true
    }

    fn notify_owner(&self, _: &GrainId) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// One reminder as earlier versions stored it, in one record (rule 10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LegacyReminder {
    grain: GrainId,
    name: String,
    period_ms: u64,
    next_due_ms: u64,
}

/// Sends `ReminderFired` to a grain of one registered type.
pub(crate) type Dispatch =
    Arc<dyn Fn(&Silo, GrainKey, String) -> BoxFuture<'static, Result<(), CallError>> + Send + Sync>;

/// The dispatcher of grain type `G` (rule 8).
pub(crate) fn dispatcher<G: Handler<ReminderFired>>() -> Dispatch {
    Arc::new(|silo: &Silo, key: GrainKey, name: String| {
        let grain = silo.grain::<G>(key);
        Box::pin(async move { grain.tell(ReminderFired { name }).await })
    })
}

/// Why a reminder operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReminderError {
    /// The grain's type was not registered with `SiloBuilder::remindable`.
    NotRemindable(String),
    /// The period is shorter than the service can honour (1 ms) or too
    /// long to represent.
    BadPeriod(Duration),
    /// Storing or reading the reminders failed.
    Storage(StorageError),
}

impl std::fmt::Display for ReminderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReminderError::NotRemindable(name) => write!(
                f,
                "grain type {name:?} cannot hold reminders: register it with SiloBuilder::remindable"
            ),
            ReminderError::BadPeriod(period) => {
                write!(f, "reminder period {period:?} is out of range")
            }
            ReminderError::Storage(err) => write!(f, "reminders: {err}"),
        }
    }
}

impl std::error::Error for ReminderError {}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// A silo's reminder service: its placement, its schedule and the means to
/// fire them.
pub(crate) struct Reminders {
    dispatch: HashMap<String, Dispatch>,
    storage: Arc<dyn StorageProvider>,
    placement: RwLock<Arc<dyn ReminderPlacement>>,
    /// The owned rows (rules 2, 4 to 6). Never held across an await.
    schedule: std::sync::Mutex<Schedule>,
    /// Held by every read of the table that is merged into the schedule,
    /// so merges happen in the order of the reads; `true` once the legacy
    /// record has been dealt with (rule 10).
    loading: tokio::sync::Mutex<bool>,
    /// Wakes the scheduler: the schedule changed.
    changed: tokio::sync::Notify,
    /// A placement was installed: the scheduler rescans.
    rescan_requested: AtomicBool,
    /// The version of the legacy record whose rows this silo copied into
    /// the table: what is left of the import is clearing it (rule 10).
    legacy_copied: std::sync::Mutex<Option<crate::storage::ETag>>,
    rescan_every: Duration,
    /// Reminders that came due here, were delivered, or could not be
    /// (`ReminderStats`).
    due: std::sync::atomic::AtomicU64,
    delivered: std::sync::atomic::AtomicU64,
    undelivered: std::sync::atomic::AtomicU64,
}

/// A silo's reminders, counted ([`crate::Silo::reminder_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReminderStats {
    /// Reminders this silo owns and schedules now.
    pub owned: u64,
    /// Due times that came here to fire.
    pub due: u64,
    /// Of those, delivered to their grain.
    pub fired: u64,
    /// Of those, not delivered (the grain failed to take it, or this silo
    /// was shutting down: the row keeps its due time then).
    pub failed: u64,
}

impl Reminders {
    pub(crate) fn new(
        dispatch: HashMap<String, Dispatch>,
        storage: Arc<dyn StorageProvider>,
        rescan_every: Duration,
    ) -> Reminders {
        Reminders {
            dispatch,
            storage,
            placement: RwLock::new(Arc::new(LoneSilo)),
            schedule: std::sync::Mutex::new(Schedule::default()),
            loading: tokio::sync::Mutex::new(false),
            changed: tokio::sync::Notify::new(),
            rescan_requested: AtomicBool::new(false),
            legacy_copied: std::sync::Mutex::new(None),
            rescan_every,
            due: Default::default(),
            delivered: Default::default(),
            undelivered: Default::default(),
        }
    }

    /// The counts (`ReminderStats`).
    pub(crate) fn stats(&self) -> ReminderStats {
        ReminderStats {
            owned: self
                .schedule
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .len() as u64,
            due: self.due.load(Ordering::Relaxed),
            fired: self.delivered.load(Ordering::Relaxed),
            failed: self.undelivered.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.dispatch.is_empty()
    }

    /// The remindable types, by registered name, for `build`'s check.
    pub(crate) fn remindable_types(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.dispatch.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    fn table(&self) -> Result<&dyn ReminderTable, ReminderError> {
        // `build` refuses remindable types over a provider without one.
        self.storage.reminder_table().ok_or_else(|| {
            ReminderError::Storage(StorageError::Backend(
                "the storage provider keeps no reminder table".into(),
            ))
        })
    }

    fn schedule(&self) -> std::sync::MutexGuard<'_, Schedule> {
        // Schedule's methods leave it whole if they panic part-way only in
        // the collections' own code.
        self.schedule.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn placement(&self) -> Arc<dyn ReminderPlacement> {
        self.placement
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Installs `placement` and has the scheduler rescan (rule 2).
    pub(crate) fn set_placement(&self, placement: Arc<dyn ReminderPlacement>) {
        *self
            .placement
            .write()
            .unwrap_or_else(PoisonError::into_inner) = placement;
        self.rescan_requested.store(true, Ordering::Release);
        self.changed.notify_one();
    }

    /// Whether this silo fires `grain`'s reminders: it owns them and knows
    /// the type (rules 2, 8).
    fn keeps(&self, placement: &dyn ReminderPlacement, grain: &GrainId) -> bool {
        self.dispatch.contains_key(&grain.type_name) && placement.owns(grain)
    }

    /// Adds or replaces `grain`'s reminder `name` (rule 3).
    pub(crate) async fn register(
        &self,
        grain: &GrainId,
        name: &str,
        due: Duration,
        period: Duration,
    ) -> Result<(), ReminderError> {
        if !self.dispatch.contains_key(&grain.type_name) {
            return Err(ReminderError::NotRemindable(grain.type_name.clone()));
        }
        let period_ms = u64::try_from(period.as_millis())
            .ok()
            .filter(|ms| (1..=MAX_MS).contains(ms))
            .ok_or(ReminderError::BadPeriod(period))?;
        // A first due time past the representable is capped (rule 9), as
        // any later one is: it is not a bad period.
        let due_ms = u64::try_from(due.as_millis()).unwrap_or(u64::MAX);
        let next_due_ms = now_ms().saturating_add(due_ms).min(MAX_MS);
        let etag = self
            .table()?
            .upsert(grain, name, period_ms, next_due_ms)
            .await
            .map_err(ReminderError::Storage)?;
        let placement = self.placement();
        if placement.owns(grain) {
            self.schedule().registered(
                (grain.clone(), name.to_string()),
                period_ms,
                next_due_ms,
                etag,
            );
            self.changed.notify_one();
        } else {
            placement.notify_owner(grain).await;
        }
        Ok(())
    }

    /// Removes `grain`'s reminder `name`; returns whether it existed
    /// (rule 3).
    pub(crate) async fn unregister(
        &self,
        grain: &GrainId,
        name: &str,
    ) -> Result<bool, ReminderError> {
        let Some(table) = self.storage.reminder_table() else {
            // No table, so no reminders (and no remindable types).
            return Ok(false);
        };
        let deleted = table
            .delete(grain, name)
            .await
            .map_err(ReminderError::Storage)?;
        self.schedule()
            .unregistered((grain.clone(), name.to_string()), deleted);
        let placement = self.placement();
        if deleted.is_some() && !placement.owns(grain) {
            placement.notify_owner(grain).await;
        }
        Ok(deleted.is_some())
    }

    /// Reloads every row and keeps the owned ones (rule 2).
    pub(crate) async fn rescan(&self) -> Result<(), ReminderError> {
        if self.is_empty() {
            return Ok(());
        }
        let table = self.table()?;
        let mut loading = self.loading.lock().await;
        if !*loading {
            *loading = self.import_legacy(table).await;
        }
        let start = self.schedule().begin_read();
        let rows = table.read_all().await.map_err(ReminderError::Storage)?;
        let placement = self.placement();
        self.schedule().merge(start, rows, Scope::All, &|grain| {
            self.keeps(placement.as_ref(), grain)
        });
        drop(loading);
        self.changed.notify_one();
        Ok(())
    }

    /// Re-reads `grain`'s rows (rule 2); after a conflict, `fired` are the
    /// firings of this grain whose writes lost (rule 5).
    async fn reload_grain(&self, grain: &GrainId, fired: &[Firing]) -> Result<(), ReminderError> {
        if !self.dispatch.contains_key(&grain.type_name) {
            return Ok(());
        }
        let table = self.table()?;
        let loading = self.loading.lock().await;
        let start = self.schedule().begin_read();
        let read = table.read_grain(grain).await;
        let placement = self.placement();
        let mut schedule = self.schedule();
        let read = read.map(|rows| {
            schedule.merge(start, rows, Scope::Grain(grain), &|grain| {
                self.keeps(placement.as_ref(), grain)
            });
        });
        for firing in fired {
            schedule.after_conflict(firing);
        }
        drop((schedule, loading));
        self.changed.notify_one();
        read.map_err(ReminderError::Storage)
    }

    /// Copies the record of earlier versions into the table and clears it
    /// (rule 10); returns whether that is done (or there was none).
    async fn import_legacy(&self, table: &dyn ReminderTable) -> bool {
        let record = GrainId {
            type_name: REMINDERS.to_string(),
            key: GrainKey::from("silo"),
        };
        let stored = match self.storage.read(&record).await {
            Ok(Some(stored)) => stored,
            Ok(None) => return true,
            Err(err) => {
                tracing::warn!(error = %err, "the reminders of an earlier version could not be read; trying again at the next rescan");
                return false;
            }
        };
        let legacy: Vec<LegacyReminder> = match postcard::from_bytes(&stored.data) {
            Ok(legacy) => legacy,
            Err(err) => {
                tracing::warn!(error = %err, record = %record, "the reminders of an earlier version cannot be decoded; left as they are");
                return true;
            }
        };
        let mut copied = 0;
        let already = *self
            .legacy_copied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            == Some(stored.etag);
        if !already {
            // Only rows the table lacks: an import tried again (its record
            // not cleared, or by another silo at once) must not move a row
            // that fired since back to its old due time, nor give it a new
            // version.
            let present: std::collections::HashSet<(GrainId, String)> = match table.read_all().await
            {
                Ok(rows) => rows.into_iter().map(|row| (row.grain, row.name)).collect(),
                Err(err) => {
                    tracing::warn!(error = %err, "the reminder table could not be read to copy the reminders of an earlier version; trying again at the next rescan");
                    return false;
                }
            };
            let rows: Vec<NewReminder> = legacy
                .into_iter()
                .filter(|reminder| {
                    !present.contains(&(reminder.grain.clone(), reminder.name.clone()))
                })
                .map(|reminder| NewReminder {
                    grain: reminder.grain,
                    name: reminder.name,
                    period_ms: reminder.period_ms.clamp(1, MAX_MS),
                    next_due_ms: reminder.next_due_ms.min(MAX_MS),
                })
                .collect();
            copied = rows.len();
            let written = table.upsert_batch(&rows).await;
            let failed = match written {
                Ok(outcome) => outcome.into_iter().find_map(Result::err),
                Err(err) => Some(err),
            };
            if let Some(err) = failed {
                tracing::warn!(error = %err, "the reminders of an earlier version could not be copied; trying again at the next rescan");
                return false;
            }
            // Copied: a later try only clears this version of the record,
            // so a reminder unregistered meanwhile stays gone.
            *self
                .legacy_copied
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(stored.etag);
        }
        match self.storage.clear(&record, Some(stored.etag)).await {
            // A conflict: another silo imported it at the same time.
            Ok(()) | Err(StorageError::Conflict { .. }) => {
                tracing::info!(
                    copied_now = copied,
                    "the reminders of an earlier version are in the reminder table, and their record is cleared"
                );
                true
            }
            Err(err) => {
                tracing::warn!(error = %err, "the reminders of an earlier version were copied but not cleared; trying again at the next rescan");
                false
            }
        }
    }

    /// The scheduler (rules 2, 4): rescans when asked or due, fires what is
    /// due, sleeps until the next due time, a change or the next rescan.
    /// Ends when `stop` is cancelled or the silo is gone.
    pub(crate) async fn run(
        self: Arc<Reminders>,
        silo: std::sync::Weak<crate::silo::SiloInner>,
        stop: tokio_util::sync::CancellationToken,
        rounds: tokio_util::task::TaskTracker,
    ) {
        let mut next_scan = tokio::time::Instant::now();
        loop {
            if self.rescan_requested.swap(false, Ordering::AcqRel)
                || tokio::time::Instant::now() >= next_scan
            {
                let scanned = tokio::select! {
                    _ = stop.cancelled() => return,
                    scanned = self.rescan() => scanned,
                };
                let after = match scanned {
                    Ok(()) => self.rescan_every,
                    Err(err) => {
                        tracing::warn!(error = %err, "reminders could not be loaded; retrying");
                        RESCAN_RETRY.min(self.rescan_every)
                    }
                };
                next_scan = tokio::time::Instant::now() + after;
            }
            let placement = self.placement();
            let firings = self
                .schedule()
                .take_due(now_ms(), &|grain| self.keeps(placement.as_ref(), grain));
            if !firings.is_empty() {
                let Some(inner) = silo.upgrade() else { return };
                rounds.spawn(self.clone().fire(Silo::from_inner(inner), firings));
            }
            let until_due = self.schedule().next_due().map_or(Duration::MAX, |due| {
                Duration::from_millis(due.saturating_sub(now_ms()))
            });
            let until_scan = next_scan.saturating_duration_since(tokio::time::Instant::now());
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(until_due.min(until_scan)) => {}
            }
        }
    }

    /// One firing round (rules 4, 5): delivers, then writes the new due
    /// times as one batch, then settles the schedule.
    async fn fire(self: Arc<Reminders>, silo: Silo, firings: Vec<Firing>) {
        let sends = firings.iter().map(|firing| {
            let (grain, name) = &firing.key;
            let dispatch = self.dispatch.get(&grain.type_name).cloned();
            let silo = silo.clone();
            let (key, name) = (grain.key.clone(), name.clone());
            async move {
                match dispatch {
                    Some(dispatch) => dispatch(&silo, key, name).await,
                    // `take_due` takes only remindable types (rule 8).
                    None => Err(CallError::NotRegistered {
                        type_name: "a type this silo cannot remind",
                    }),
                }
            }
        });
        self.due.fetch_add(firings.len() as u64, Ordering::Relaxed);
        let delivered = join_all(sends).await;
        drop(silo);
        let succeeded = delivered.iter().filter(|sent| sent.is_ok()).count() as u64;
        self.delivered.fetch_add(succeeded, Ordering::Relaxed);
        self.undelivered
            .fetch_add(delivered.len() as u64 - succeeded, Ordering::Relaxed);
        let mut fired = Vec::with_capacity(firings.len());
        let mut not_fired = Vec::new();
        for (firing, delivered) in firings.into_iter().zip(delivered) {
            match delivered {
                Ok(()) => fired.push(firing),
                // Not fired: the row keeps its due time for the next owner,
                // or for the next scan once the silo has room again.
                Err(CallError::ShutDown | CallError::Overloaded { .. }) => not_fired.push(firing),
                Err(err) => {
                    let (grain, name) = &firing.key;
                    tracing::warn!(grain = %grain, reminder = name, error = %err, "a reminder could not be delivered");
                    fired.push(firing);
                }
            }
        }
        let updates: Vec<DueUpdate> = fired
            .iter()
            .map(|firing| DueUpdate {
                grain: firing.key.0.clone(),
                name: firing.key.1.clone(),
                next_due_ms: firing.next_due_ms,
                expected: firing.etag,
            })
            .collect();
        let outcome = match self.table() {
            Ok(table) if !updates.is_empty() => table
                .update_due_batch(&updates)
                .await
                .map_err(ReminderError::Storage),
            Ok(_) => Ok(Vec::new()),
            Err(err) => Err(err),
        };
        let mut conflicts: HashMap<GrainId, Vec<Firing>> = HashMap::new();
        {
            let mut schedule = self.schedule();
            let retry_ms = now_ms().saturating_add(NOT_FIRED_RETRY_MS);
            for firing in &not_fired {
                schedule.not_fired(firing, retry_ms);
            }
            match outcome {
                Ok(outcome) => {
                    for (firing, written) in fired.into_iter().zip(outcome) {
                        match written {
                            Ok(etag) => schedule.written(&firing, Written::Saved(etag)),
                            Err(StorageError::Conflict { .. }) => conflicts
                                .entry(firing.key.0.clone())
                                .or_default()
                                .push(firing),
                            Err(err) => {
                                tracing::warn!(grain = %firing.key.0, reminder = firing.key.1, error = %err, "a reminder's next due time could not be stored");
                                schedule.written(&firing, Written::Unsaved);
                            }
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, reminders = fired.len(), "the reminders' next due times could not be stored");
                    for firing in &fired {
                        schedule.written(firing, Written::Unsaved);
                    }
                }
            }
        }
        for (grain, lost) in conflicts {
            if let Err(err) = self.reload_grain(&grain, &lost).await {
                tracing::warn!(grain = %grain, error = %err, "a grain's reminders could not be re-read after a conflict");
            }
        }
        self.changed.notify_one();
    }
}

/// Reminder ownership on a silo (rule 2): the hooks a cluster node uses.
impl Silo {
    /// Installs the placement that decides which grains' reminders this
    /// silo fires, and has the silo rescan the reminder table to keep the
    /// rows it owns now. A silo starts with [`LoneSilo`] (it owns every
    /// grain's reminders); a cluster node installs its own once the silo is
    /// built.
    pub fn set_reminder_placement(&self, placement: Arc<dyn ReminderPlacement>) {
        self.reminder_service().set_placement(placement);
    }

    /// Reloads every reminder row and keeps those this silo owns under its
    /// placement: the cluster calls it after every view change. Returns
    /// once the schedule holds the rows (a silo without remindable types
    /// has nothing to do).
    pub async fn rescan_reminders(&self) -> Result<(), ReminderError> {
        self.reminder_service().rescan().await
    }

    /// Re-reads `grain`'s reminder rows: the owner's side of
    /// [`ReminderPlacement::notify_owner`]. Rows of a grain this silo does
    /// not own (or whose type it does not know) are dropped from its
    /// schedule.
    pub async fn reminders_changed(&self, grain: &GrainId) -> Result<(), ReminderError> {
        self.reminder_service().reload_grain(grain, &[]).await
    }
}
