//! The reminder table: one row per reminder, shared by every silo that
//! shares the storage (the service's rules are in `reminders.rs`).
//!
//! A row is `(grain, name, period_ms, next_due_ms)` with an ETag of its
//! own. The contract every provider keeps:
//!
//! 1. A row is keyed by `(grain, name)`; every `GrainKey` variant
//!    round-trips.
//! 2. Every write of a row ([`ReminderTable::upsert`],
//!    [`ReminderTable::update_due`]) gives it an ETag taken from the
//!    store's one counter: greater than any ETag the store issued before,
//!    and never reused, so a row deleted and registered again never comes
//!    back with an old version.
//! 3. `update_due` writes only if the row's ETag is the expected one, else
//!    it fails with [`StorageError::Conflict`] (`actual: None` where the
//!    row is gone); the check and the write are atomic.
//! 4. The batch operations are the single ones applied in order, each with
//!    its own outcome; a provider may run them in one transaction.
//! 5. A row that a read cannot decode (written by other tooling, or
//!    damaged: a grain key that does not decode, a negative period) is
//!    skipped with a warning ([`readable`]), not an error for the whole
//!    read: one bad row must not keep every other reminder of every silo
//!    from loading. A store that fails (I/O, connection) still fails the
//!    read. `delete` removes such a row all the same.

use std::collections::BTreeMap;

use futures_util::future::BoxFuture;

use super::{ETag, MemoryStorage, StorageError};
use crate::key::GrainId;

/// One stored reminder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReminderRow {
    /// The grain it belongs to.
    pub grain: GrainId,
    /// Its name, unique per grain.
    pub name: String,
    /// Its period in milliseconds.
    pub period_ms: u64,
    /// When it is next due, in wall-clock milliseconds since the Unix
    /// epoch.
    pub next_due_ms: u64,
    /// The row's version.
    pub etag: ETag,
}

/// A reminder to write unconditionally ([`ReminderTable::upsert_batch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReminder {
    /// The grain it belongs to.
    pub grain: GrainId,
    /// Its name, unique per grain.
    pub name: String,
    /// Its period in milliseconds.
    pub period_ms: u64,
    /// When it is first due, in wall-clock milliseconds since the Unix
    /// epoch.
    pub next_due_ms: u64,
}

/// A conditional move of one row's next due time
/// ([`ReminderTable::update_due_batch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueUpdate {
    /// The grain.
    pub grain: GrainId,
    /// The reminder's name.
    pub name: String,
    /// The new next due time.
    pub next_due_ms: u64,
    /// The ETag the row must still have.
    pub expected: ETag,
}

/// The outcome of each operation of a batch, in order.
pub type BatchOutcome = Vec<Result<ETag, StorageError>>;

/// Reminders, one row each, with per-row ETags (the module's contract).
/// Reached through `StorageProvider::reminder_table`.
pub trait ReminderTable: Send + Sync {
    /// Writes the row, replacing any with the same grain and name, whatever
    /// its version; returns the new ETag.
    fn upsert<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
        period_ms: u64,
        next_due_ms: u64,
    ) -> BoxFuture<'a, Result<ETag, StorageError>>;

    /// Moves the row's next due time if its ETag is `expected`; returns the
    /// new ETag, or `Conflict` if the row moved on or is gone.
    fn update_due<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
        next_due_ms: u64,
        expected: ETag,
    ) -> BoxFuture<'a, Result<ETag, StorageError>>;

    /// Removes the row; returns the ETag it had, `None` if there was none.
    fn delete<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<ETag>, StorageError>>;

    /// `grain`'s rows.
    fn read_grain<'a>(
        &'a self,
        grain: &'a GrainId,
    ) -> BoxFuture<'a, Result<Vec<ReminderRow>, StorageError>>;

    /// Every row (a silo's full rescan).
    fn read_all(&self) -> BoxFuture<'_, Result<Vec<ReminderRow>, StorageError>>;

    /// [`upsert`](Self::upsert) of each row, in order. The outer error is a
    /// failure of the whole batch (nothing written).
    fn upsert_batch<'a>(
        &'a self,
        rows: &'a [NewReminder],
    ) -> BoxFuture<'a, Result<BatchOutcome, StorageError>> {
        Box::pin(async move {
            let mut outcome = Vec::with_capacity(rows.len());
            for row in rows {
                outcome.push(
                    self.upsert(&row.grain, &row.name, row.period_ms, row.next_due_ms)
                        .await,
                );
            }
            Ok(outcome)
        })
    }

    /// [`update_due`](Self::update_due) of each update, in order, each with
    /// its own outcome (a `Conflict` for one does not stop the others). The
    /// outer error is a failure of the whole batch (nothing written).
    fn update_due_batch<'a>(
        &'a self,
        updates: &'a [DueUpdate],
    ) -> BoxFuture<'a, Result<BatchOutcome, StorageError>> {
        Box::pin(async move {
            let mut outcome = Vec::with_capacity(updates.len());
            for update in updates {
                outcome.push(
                    self.update_due(
                        &update.grain,
                        &update.name,
                        update.next_due_ms,
                        update.expected,
                    )
                    .await,
                );
            }
            Ok(outcome)
        })
    }
}

/// A row of `MemoryStorage`'s table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MemoryRow {
    period_ms: u64,
    next_due_ms: u64,
    etag: ETag,
}

/// `MemoryStorage`'s table: ordered by grain then name, so one grain's
/// rows are a range. ETags are taken under the lock, so they grow per row
/// (rule 2).
pub(crate) type MemoryTable = std::sync::Mutex<BTreeMap<(GrainId, String), MemoryRow>>;

impl MemoryStorage {
    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<(GrainId, String), MemoryRow>> {
        // No code that can panic runs under the lock but BTreeMap's own.
        self.reminders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn upsert_locked(
        &self,
        table: &mut BTreeMap<(GrainId, String), MemoryRow>,
        grain: &GrainId,
        name: &str,
        period_ms: u64,
        next_due_ms: u64,
    ) -> ETag {
        let etag = self.fresh_etag();
        table.insert(
            (grain.clone(), name.to_string()),
            MemoryRow {
                period_ms,
                next_due_ms,
                etag,
            },
        );
        etag
    }

    fn update_locked(
        &self,
        table: &mut BTreeMap<(GrainId, String), MemoryRow>,
        grain: &GrainId,
        name: &str,
        next_due_ms: u64,
        expected: ETag,
    ) -> Result<ETag, StorageError> {
        match table.get_mut(&(grain.clone(), name.to_string())) {
            Some(row) if row.etag == expected => {
                let etag = self.fresh_etag();
                row.next_due_ms = next_due_ms;
                row.etag = etag;
                Ok(etag)
            }
            Some(row) => Err(StorageError::conflict(
                grain,
                Some(expected),
                Some(row.etag),
            )),
            None => Err(StorageError::conflict(grain, Some(expected), None)),
        }
    }
}

fn memory_row(grain: &GrainId, name: &str, row: &MemoryRow) -> ReminderRow {
    ReminderRow {
        grain: grain.clone(),
        name: name.to_string(),
        period_ms: row.period_ms,
        next_due_ms: row.next_due_ms,
        etag: row.etag,
    }
}

impl ReminderTable for MemoryStorage {
    fn upsert<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
        period_ms: u64,
        next_due_ms: u64,
    ) -> BoxFuture<'a, Result<ETag, StorageError>> {
        Box::pin(async move {
            let mut table = self.table();
            Ok(self.upsert_locked(&mut table, grain, name, period_ms, next_due_ms))
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
            let mut table = self.table();
            self.update_locked(&mut table, grain, name, next_due_ms, expected)
        })
    }

    fn delete<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<ETag>, StorageError>> {
        Box::pin(async move {
            let mut table = self.table();
            Ok(table
                .remove(&(grain.clone(), name.to_string()))
                .map(|row| row.etag))
        })
    }

    fn read_grain<'a>(
        &'a self,
        grain: &'a GrainId,
    ) -> BoxFuture<'a, Result<Vec<ReminderRow>, StorageError>> {
        Box::pin(async move {
            let table = self.table();
            Ok(table
                .range((grain.clone(), String::new())..)
                .take_while(|((g, _), _)| g == grain)
                .map(|((g, name), row)| memory_row(g, name, row))
                .collect())
        })
    }

    fn read_all(&self) -> BoxFuture<'_, Result<Vec<ReminderRow>, StorageError>> {
        Box::pin(async move {
            let table = self.table();
            Ok(table
                .iter()
                .map(|((grain, name), row)| memory_row(grain, name, row))
                .collect())
        })
    }

    fn upsert_batch<'a>(
        &'a self,
        rows: &'a [NewReminder],
    ) -> BoxFuture<'a, Result<BatchOutcome, StorageError>> {
        Box::pin(async move {
            let mut table = self.table();
            Ok(rows
                .iter()
                .map(|row| {
                    Ok(self.upsert_locked(
                        &mut table,
                        &row.grain,
                        &row.name,
                        row.period_ms,
                        row.next_due_ms,
                    ))
                })
                .collect())
        })
    }

    fn update_due_batch<'a>(
        &'a self,
        updates: &'a [DueUpdate],
    ) -> BoxFuture<'a, Result<BatchOutcome, StorageError>> {
        Box::pin(async move {
            let mut table = self.table();
            Ok(updates
                .iter()
                .map(|update| {
                    self.update_locked(
                        &mut table,
                        &update.grain,
                        &update.name,
                        update.next_due_ms,
                        update.expected,
                    )
                })
                .collect())
        })
    }
}

/// Rule 5: `row` if it decoded; a row that did not is logged and skipped.
pub(crate) fn readable(
    row: Result<ReminderRow, StorageError>,
    store: &'static str,
) -> Option<ReminderRow> {
    match row {
        Ok(row) => Some(row),
        Err(err) => {
            tracing::warn!(
                store,
                error = %err,
                "a stored reminder row cannot be read; it is skipped (delete it, or register it again)"
            );
            None
        }
    }
}

/// Milliseconds as an SQL `bigint`/`INTEGER` (i64): the service keeps its
/// times and periods below 2^63 (`reminders.rs`, rule 9).
pub(crate) fn ms_to_sql(ms: u64) -> Result<i64, StorageError> {
    i64::try_from(ms)
        .map_err(|_| StorageError::Backend(format!("{ms} ms is out of the SQL range (2^63)")))
}

/// An SQL `bigint` as milliseconds or an ETag.
/// A stored integer that must not be negative; one that is was written by
/// something else than this crate (contract rule 5): a decoding failure.
pub(crate) fn sql_to_u64(value: i64) -> Result<u64, StorageError> {
    u64::try_from(value)
        .map_err(|_| StorageError::Serialization(format!("a negative value {value}")))
}

/// The grain key's bytes in the SQL tables' `grain_key` column (the type
/// name is a column of its own).
pub(crate) fn encode_grain_key(grain: &GrainId) -> Result<Vec<u8>, StorageError> {
    postcard::to_allocvec(&grain.key).map_err(|err| StorageError::Serialization(err.to_string()))
}

/// A grain from its SQL columns.
pub(crate) fn decode_grain(type_name: String, key: &[u8]) -> Result<GrainId, StorageError> {
    Ok(GrainId {
        type_name,
        key: postcard::from_bytes(key)
            .map_err(|err| StorageError::Serialization(err.to_string()))?,
    })
}
