//! Grain state in an embedded redb database: the default store of a
//! single node, kept across restarts.
//!
//! One table maps an encoded `GrainId` to its state, prefixed with its
//! ETag; a second holds the next ETag. Each write is one redb write
//! transaction, which redb runs one at a time: the ETag check and the
//! store are atomic. ETags come from one counter kept in the database, so
//! a state cleared and written again never reuses an old version. redb is
//! blocking, so every operation runs on tokio's blocking pool.
//!
//! Reminders have a third table, `granary_reminders`, one row each: the key
//! is the encoded `GrainId` followed by the encoded name (postcard's
//! encodings delimit themselves, so one grain's rows are the range of keys
//! that start with its encoded id), the value the row's ETag, period and
//! next due time, 8 bytes each. Their ETags come from the same counter. A
//! batch is one transaction.

use std::path::Path;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::reminders::{
    BatchOutcome, DueUpdate, NewReminder, ReminderRow, ReminderTable, readable,
};
use super::{ETag, StorageError, StorageProvider, StoredState};
use crate::key::GrainId;

const STATES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("grain_state");
const REMINDERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("granary_reminders");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_ETAG: &str = "next_etag";

/// Grain state in a redb file.
#[derive(Clone)]
pub struct RedbStorage {
    db: Arc<Database>,
}

impl std::fmt::Debug for RedbStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStorage").finish_non_exhaustive()
    }
}

fn backend(err: impl std::fmt::Display) -> StorageError {
    StorageError::Backend(format!("redb: {err}"))
}

fn encode_key(grain: &GrainId) -> Result<Vec<u8>, StorageError> {
    postcard::to_allocvec(grain).map_err(|err| StorageError::Serialization(err.to_string()))
}

/// `(etag, data)` from a stored value: 8 bytes of ETag, then the state.
fn decode_value(value: &[u8]) -> Result<StoredState, StorageError> {
    let (etag, data) = value
        .split_first_chunk::<8>()
        .ok_or_else(|| StorageError::Serialization("redb: a stored value is truncated".into()))?;
    Ok(StoredState {
        data: data.to_vec(),
        etag: u64::from_le_bytes(*etag),
    })
}

impl RedbStorage {
    /// Opens the database at `path`, creating it if needed.
    pub fn open(path: impl AsRef<Path>) -> Result<RedbStorage, StorageError> {
        let db = Database::create(path).map_err(backend)?;
        // Create every table, so reads never meet a missing table.
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(STATES).map_err(backend)?;
        txn.open_table(META).map_err(backend)?;
        txn.open_table(REMINDERS).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(RedbStorage { db: Arc::new(db) })
    }

    /// Runs `work` on the blocking pool.
    fn blocking<'a, T: Send + 'static>(
        &'a self,
        work: impl FnOnce(&Database) -> Result<T, StorageError> + Send + 'static,
    ) -> BoxFuture<'a, Result<T, StorageError>> {
        let db = self.db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || work(&db))
                .await
                .map_err(|err| StorageError::Backend(format!("redb task: {err}")))?
        })
    }
}

/// Takes the next ETag from the counter in `META`.
fn take_etag(txn: &redb::WriteTransaction) -> Result<ETag, StorageError> {
    let mut meta = txn.open_table(META).map_err(backend)?;
    let etag = meta
        .get(NEXT_ETAG)
        .map_err(backend)?
        .map_or(1, |next| next.value());
    meta.insert(NEXT_ETAG, etag + 1).map_err(backend)?;
    Ok(etag)
}

/// The stored ETag of `key` in an open write transaction's table.
fn stored_etag(
    table: &redb::Table<'_, &[u8], &[u8]>,
    key: &[u8],
) -> Result<Option<ETag>, StorageError> {
    match table.get(key).map_err(backend)? {
        Some(value) => Ok(Some(decode_value(value.value())?.etag)),
        None => Ok(None),
    }
}

impl StorageProvider for RedbStorage {
    fn read<'a>(
        &'a self,
        grain: &'a GrainId,
    ) -> BoxFuture<'a, Result<Option<StoredState>, StorageError>> {
        let key = encode_key(grain);
        self.blocking(move |db| {
            let key = key?;
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(STATES).map_err(backend)?;
            match table.get(key.as_slice()).map_err(backend)? {
                Some(value) => Ok(Some(decode_value(value.value())?)),
                None => Ok(None),
            }
        })
    }

    fn write<'a>(
        &'a self,
        grain: &'a GrainId,
        data: &'a [u8],
        expected: Option<ETag>,
    ) -> BoxFuture<'a, Result<ETag, StorageError>> {
        let key = encode_key(grain);
        let grain = grain.clone();
        let data = data.to_vec();
        self.blocking(move |db| {
            let key = key?;
            let txn = db.begin_write().map_err(backend)?;
            let etag = {
                let mut table = txn.open_table(STATES).map_err(backend)?;
                StorageError::unless_current(&grain, expected, stored_etag(&table, &key)?)?;
                let etag = take_etag(&txn)?;
                let mut value = Vec::with_capacity(8 + data.len());
                value.extend_from_slice(&etag.to_le_bytes());
                value.extend_from_slice(&data);
                table
                    .insert(key.as_slice(), value.as_slice())
                    .map_err(backend)?;
                etag
            };
            txn.commit().map_err(backend)?;
            Ok(etag)
        })
    }

    fn clear<'a>(
        &'a self,
        grain: &'a GrainId,
        expected: Option<ETag>,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        let key = encode_key(grain);
        let grain = grain.clone();
        self.blocking(move |db| {
            let key = key?;
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut table = txn.open_table(STATES).map_err(backend)?;
                StorageError::unless_current(&grain, expected, stored_etag(&table, &key)?)?;
                table.remove(key.as_slice()).map_err(backend)?;
            }
            txn.commit().map_err(backend)?;
            Ok(())
        })
    }

    fn reminder_table(&self) -> Option<&dyn ReminderTable> {
        Some(self)
    }
}

/// A reminder row's key: the encoded grain, then the encoded name.
fn reminder_key(grain: &GrainId, name: &str) -> Result<Vec<u8>, StorageError> {
    postcard::to_extend(name, encode_key(grain)?)
        .map_err(|err| StorageError::Serialization(err.to_string()))
}

/// A reminder row's value: ETag, period, next due time.
fn reminder_value(etag: ETag, period_ms: u64, next_due_ms: u64) -> [u8; 24] {
    let mut value = [0; 24];
    value[..8].copy_from_slice(&etag.to_le_bytes());
    value[8..16].copy_from_slice(&period_ms.to_le_bytes());
    value[16..].copy_from_slice(&next_due_ms.to_le_bytes());
    value
}

/// `(etag, period, next due)` from a stored reminder value.
fn decode_reminder_value(value: &[u8]) -> Result<(ETag, u64, u64), StorageError> {
    let truncated = || StorageError::Serialization("redb: a stored reminder is truncated".into());
    let (etag, rest) = value.split_first_chunk::<8>().ok_or_else(truncated)?;
    let (period, rest) = rest.split_first_chunk::<8>().ok_or_else(truncated)?;
    let (due, _) = rest.split_first_chunk::<8>().ok_or_else(truncated)?;
    Ok((
        u64::from_le_bytes(*etag),
        u64::from_le_bytes(*period),
        u64::from_le_bytes(*due),
    ))
}

/// A row from its stored key and value.
fn decode_reminder(key: &[u8], value: &[u8]) -> Result<ReminderRow, StorageError> {
    let serialization = |err: postcard::Error| StorageError::Serialization(err.to_string());
    let (grain, name) = postcard::take_from_bytes::<GrainId>(key).map_err(serialization)?;
    let name = postcard::from_bytes::<String>(name).map_err(serialization)?;
    let (etag, period_ms, next_due_ms) = decode_reminder_value(value)?;
    Ok(ReminderRow {
        grain,
        name,
        period_ms,
        next_due_ms,
        etag,
    })
}

/// Writes a reminder row unconditionally in an open transaction.
fn upsert_in(
    txn: &redb::WriteTransaction,
    grain: &GrainId,
    name: &str,
    period_ms: u64,
    next_due_ms: u64,
) -> Result<ETag, StorageError> {
    let key = reminder_key(grain, name)?;
    let etag = take_etag(txn)?;
    let mut table = txn.open_table(REMINDERS).map_err(backend)?;
    table
        .insert(
            key.as_slice(),
            reminder_value(etag, period_ms, next_due_ms).as_slice(),
        )
        .map_err(backend)?;
    Ok(etag)
}

/// Moves a reminder row's due time if its ETag is `expected`, in an open
/// transaction.
fn update_in(
    txn: &redb::WriteTransaction,
    grain: &GrainId,
    name: &str,
    next_due_ms: u64,
    expected: ETag,
) -> Result<ETag, StorageError> {
    let key = reminder_key(grain, name)?;
    let stored = {
        let table = txn.open_table(REMINDERS).map_err(backend)?;
        let stored = table.get(key.as_slice()).map_err(backend)?;
        match stored {
            Some(value) => Some(decode_reminder_value(value.value())?),
            None => None,
        }
    };
    let Some((etag, period_ms, _)) = stored else {
        return Err(StorageError::conflict(grain, Some(expected), None));
    };
    StorageError::unless_current(grain, Some(expected), Some(etag))?;
    let etag = take_etag(txn)?;
    let mut table = txn.open_table(REMINDERS).map_err(backend)?;
    table
        .insert(
            key.as_slice(),
            reminder_value(etag, period_ms, next_due_ms).as_slice(),
        )
        .map_err(backend)?;
    Ok(etag)
}

impl ReminderTable for RedbStorage {
    fn upsert<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
        period_ms: u64,
        next_due_ms: u64,
    ) -> BoxFuture<'a, Result<ETag, StorageError>> {
        let (grain, name) = (grain.clone(), name.to_string());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let etag = upsert_in(&txn, &grain, &name, period_ms, next_due_ms)?;
            txn.commit().map_err(backend)?;
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
        let (grain, name) = (grain.clone(), name.to_string());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let etag = update_in(&txn, &grain, &name, next_due_ms, expected)?;
            txn.commit().map_err(backend)?;
            Ok(etag)
        })
    }

    fn delete<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<ETag>, StorageError>> {
        let key = reminder_key(grain, name);
        self.blocking(move |db| {
            let key = key?;
            let txn = db.begin_write().map_err(backend)?;
            let removed = {
                let mut table = txn.open_table(REMINDERS).map_err(backend)?;
                let removed = table.remove(key.as_slice()).map_err(backend)?;
                // A row that cannot be read goes all the same (contract
                // rule 5); no read returns it, so an ETag of 0 (never
                // issued) tombstones nothing.
                removed.map(|value| decode_reminder_value(value.value()).map_or(0, |row| row.0))
            };
            txn.commit().map_err(backend)?;
            Ok(removed)
        })
    }

    fn read_grain<'a>(
        &'a self,
        grain: &'a GrainId,
    ) -> BoxFuture<'a, Result<Vec<ReminderRow>, StorageError>> {
        let prefix = encode_key(grain);
        self.blocking(move |db| {
            let prefix = prefix?;
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(REMINDERS).map_err(backend)?;
            let mut rows = Vec::new();
            for entry in table.range(prefix.as_slice()..).map_err(backend)? {
                let (key, value) = entry.map_err(backend)?;
                if !key.value().starts_with(&prefix) {
                    break;
                }
                rows.extend(readable(
                    decode_reminder(key.value(), value.value()),
                    "redb",
                ));
            }
            Ok(rows)
        })
    }

    fn read_all(&self) -> BoxFuture<'_, Result<Vec<ReminderRow>, StorageError>> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(REMINDERS).map_err(backend)?;
            let mut rows =
                Vec::with_capacity(usize::try_from(table.len().map_err(backend)?).unwrap_or(0));
            for entry in table.iter().map_err(backend)? {
                let (key, value) = entry.map_err(backend)?;
                rows.extend(readable(
                    decode_reminder(key.value(), value.value()),
                    "redb",
                ));
            }
            Ok(rows)
        })
    }

    fn upsert_batch<'a>(
        &'a self,
        rows: &'a [NewReminder],
    ) -> BoxFuture<'a, Result<BatchOutcome, StorageError>> {
        let rows = rows.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let mut outcome = Vec::with_capacity(rows.len());
            for row in &rows {
                outcome.push(Ok(upsert_in(
                    &txn,
                    &row.grain,
                    &row.name,
                    row.period_ms,
                    row.next_due_ms,
                )?));
            }
            txn.commit().map_err(backend)?;
            Ok(outcome)
        })
    }

    fn update_due_batch<'a>(
        &'a self,
        updates: &'a [DueUpdate],
    ) -> BoxFuture<'a, Result<BatchOutcome, StorageError>> {
        let updates = updates.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let mut outcome = Vec::with_capacity(updates.len());
            for update in &updates {
                let result = update_in(
                    &txn,
                    &update.grain,
                    &update.name,
                    update.next_due_ms,
                    update.expected,
                );
                match result {
                    Ok(etag) => outcome.push(Ok(etag)),
                    Err(conflict @ StorageError::Conflict { .. }) => outcome.push(Err(conflict)),
                    // The transaction is in doubt: nothing is committed.
                    Err(err) => return Err(err),
                }
            }
            txn.commit().map_err(backend)?;
            Ok(outcome)
        })
    }
}
