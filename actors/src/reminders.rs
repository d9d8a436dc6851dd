//! Reminders: persistent, periodic messages to a grain, which fire whether
//! or not the grain is active, and across silo restarts.
//!
//! # Rules
//!
//! 1. A reminder is `(grain, name, period, next due time)`, kept in the
//!    silo's storage under one record ([`REMINDERS`]) written with its
//!    ETag, so a reminder registered before a restart is found after it.
//! 2. One service task per silo loads the record when the silo starts,
//!    sleeps until the earliest due time (or a change), and fires every
//!    due reminder by sending its grain a [`ReminderFired`] message; the
//!    message activates the grain if needed. The next due time moves on by
//!    whole periods, so a silo that was down fires a missed reminder once,
//!    not once per missed period.
//! 3. Only grain types registered with `SiloBuilder::remindable` can hold
//!    reminders: they handle `ReminderFired`, and the silo knows how to
//!    reach them by their registered name.
//! 4. Times are wall-clock milliseconds since the Unix epoch, so they mean
//!    the same after a restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::error::CallError;
use crate::grain::{Handler, Message};
use crate::key::{GrainId, GrainKey};
use crate::silo::Silo;
use crate::storage::{PersistentState, StorageError, StorageProvider};

/// The storage record that holds a silo's reminders (rule 1).
pub const REMINDERS: &str = "granary.reminders";

/// The message a reminder sends its grain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReminderFired {
    /// The reminder's name.
    pub name: String,
}

impl Message for ReminderFired {
    type Reply = ();
}

/// One reminder (rule 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Reminder {
    grain: GrainId,
    name: String,
    period_ms: u64,
    next_due_ms: u64,
}

/// Sends `ReminderFired` to a grain of one registered type.
pub(crate) type Dispatch =
    Arc<dyn Fn(&Silo, GrainKey, String) -> BoxFuture<'static, Result<(), CallError>> + Send + Sync>;

/// The dispatcher of grain type `G` (rule 3).
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
    /// Storing the reminders failed.
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

/// A silo's reminders and the means to fire them.
pub(crate) struct Reminders {
    dispatch: HashMap<String, Dispatch>,
    table: tokio::sync::Mutex<Option<PersistentState<Vec<Reminder>>>>,
    storage: Arc<dyn StorageProvider>,
    changed: tokio::sync::Notify,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

impl Reminders {
    pub(crate) fn new(
        dispatch: HashMap<String, Dispatch>,
        storage: Arc<dyn StorageProvider>,
    ) -> Reminders {
        Reminders {
            dispatch,
            table: tokio::sync::Mutex::new(None),
            storage,
            changed: tokio::sync::Notify::new(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.dispatch.is_empty()
    }

    fn record_id() -> GrainId {
        GrainId {
            type_name: REMINDERS.to_string(),
            key: GrainKey::from("silo"),
        }
    }

    /// The table, loaded on first use (rule 1).
    async fn table(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<PersistentState<Vec<Reminder>>>>, StorageError>
    {
        let mut table = self.table.lock().await;
        if table.is_none() {
            *table = Some(PersistentState::load(self.storage.clone(), Self::record_id()).await?);
        }
        Ok(table)
    }

    /// Adds or replaces `grain`'s reminder `name`.
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
            .filter(|ms| *ms >= 1)
            .ok_or(ReminderError::BadPeriod(period))?;
        let due_ms = u64::try_from(due.as_millis()).map_err(|_| ReminderError::BadPeriod(due))?;
        let mut guard = self.table().await.map_err(ReminderError::Storage)?;
        let Some(table) = guard.as_mut() else {
            return Err(ReminderError::Storage(StorageError::Backend(
                "reminders not loaded".into(),
            )));
        };
        let reminder = Reminder {
            grain: grain.clone(),
            name: name.to_string(),
            period_ms,
            next_due_ms: now_ms().saturating_add(due_ms),
        };
        let mut updated = table.get().clone();
        updated.retain(|r| !(r.grain == *grain && r.name == name));
        updated.push(reminder);
        Self::store(&mut guard, updated).await?;
        drop(guard);
        self.changed.notify_one();
        Ok(())
    }

    /// Removes `grain`'s reminder `name`; returns whether it existed.
    pub(crate) async fn unregister(
        &self,
        grain: &GrainId,
        name: &str,
    ) -> Result<bool, ReminderError> {
        let mut guard = self.table().await.map_err(ReminderError::Storage)?;
        let Some(table) = guard.as_mut() else {
            return Ok(false);
        };
        let mut updated = table.get().clone();
        updated.retain(|r| !(r.grain == *grain && r.name == name));
        let removed = updated.len() != table.get().len();
        if removed {
            Self::store(&mut guard, updated).await?;
        }
        Ok(removed)
    }

    /// Writes `updated` as the new table. The in-memory table changes only
    /// if the write succeeds; on a conflict (another writer) it is dropped,
    /// so the next use reloads it.
    async fn store(
        guard: &mut tokio::sync::MutexGuard<'_, Option<PersistentState<Vec<Reminder>>>>,
        updated: Vec<Reminder>,
    ) -> Result<(), ReminderError> {
        let Some(table) = guard.as_mut() else {
            return Err(ReminderError::Storage(StorageError::Backend(
                "reminders not loaded".into(),
            )));
        };
        let previous = std::mem::replace(table.get_mut(), updated);
        match table.write().await {
            Ok(()) => Ok(()),
            Err(err) => {
                *table.get_mut() = previous;
                if matches!(err, StorageError::Conflict { .. }) {
                    **guard = None;
                }
                Err(ReminderError::Storage(err))
            }
        }
    }

    /// The service loop (rule 2); ends when `stop` is cancelled or the
    /// silo is gone.
    pub(crate) async fn run(
        self: Arc<Reminders>,
        silo: std::sync::Weak<crate::silo::SiloInner>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let Some(inner) = silo.upgrade() else { return };
            let fired = self.fire_due(&Silo::from_inner(inner)).await;
            let wait = match fired {
                Ok(wait) => wait,
                Err(err) => {
                    tracing::warn!(error = %err, "reminders could not be loaded or saved; retrying");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Fires what is due, saves the new due times, and returns how long to
    /// sleep until the next one.
    async fn fire_due(&self, silo: &Silo) -> Result<Duration, StorageError> {
        let mut guard = self.table().await?;
        let Some(table) = guard.as_mut() else {
            return Ok(Duration::from_secs(1));
        };
        let now = now_ms();
        let mut fired = Vec::new();
        let mut updated = table.get().clone();
        for reminder in updated.iter_mut() {
            if reminder.next_due_ms <= now {
                fired.push((reminder.grain.clone(), reminder.name.clone()));
                // Whole periods past now: a missed period fires once. A
                // zero period (foreign data) counts as 1 ms.
                let period = reminder.period_ms.max(1);
                let behind = (now - reminder.next_due_ms) / period + 1;
                reminder.next_due_ms = reminder
                    .next_due_ms
                    .saturating_add(behind.saturating_mul(period));
            }
        }
        if !fired.is_empty() {
            // Fire only what the store recorded as fired.
            if let Err(err) = Self::store(&mut guard, updated).await {
                return Err(match err {
                    ReminderError::Storage(err) => err,
                    other => StorageError::Backend(other.to_string()),
                });
            }
        }
        let Some(table) = guard.as_ref() else {
            return Ok(Duration::from_millis(100));
        };
        let next = table
            .get()
            .iter()
            .map(|reminder| reminder.next_due_ms)
            .min()
            .map_or(Duration::from_secs(1), |due| {
                Duration::from_millis(due.saturating_sub(now))
            });
        drop(guard);
        for (grain, name) in fired {
            if let Some(dispatch) = self.dispatch.get(&grain.type_name) {
                let send = dispatch(silo, grain.key.clone(), name.clone());
                tokio::spawn(async move {
                    if let Err(err) = send.await {
                        tracing::warn!(grain = %grain, reminder = name, error = %err, "a reminder could not be delivered");
                    }
                });
            }
        }
        Ok(next)
    }
}
