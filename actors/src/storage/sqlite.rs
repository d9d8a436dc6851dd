//! Grain state in a SQLite file, shared by the processes of one machine.
//!
//! SQLite locks its file across processes, so several silos on one host
//! (the multi-node demo, a test cluster) can share it; redb allows one
//! process per file. Each write is an `IMMEDIATE` transaction: it takes the
//! file's write lock first, so the ETag check and the store are atomic
//! across processes. ETags come from one counter kept in the database, so
//! a cleared and rewritten state never reuses an old version. The file is
//! in WAL mode and a writer waits up to `BUSY_TIMEOUT` for another. SQLite
//! is blocking, so every operation runs on tokio's blocking pool.
//!
//! Reminders are rows of `granary_reminders (grain_type, grain_key, name,
//! period_ms, next_due_ms, etag)`, keyed by type name, encoded key and
//! name; their ETags come from the same counter, and each write (a batch:
//! all of it) is one `IMMEDIATE` transaction.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::reminders::{
    BatchOutcome, DueUpdate, NewReminder, ReminderRow, ReminderTable, decode_grain,
    encode_grain_key, ms_to_sql, readable, sql_to_u64,
};
use super::{ETag, StorageError, StorageProvider, StoredState};
use crate::key::GrainId;

/// How long a writer waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Grain state in a SQLite file.
#[derive(Clone)]
pub struct SqliteStorage {
    connection: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStorage").finish_non_exhaustive()
    }
}

fn backend(err: impl std::fmt::Display) -> StorageError {
    StorageError::Backend(format!("sqlite: {err}"))
}

fn encode_key(grain: &GrainId) -> Result<Vec<u8>, StorageError> {
    postcard::to_allocvec(grain).map_err(|err| StorageError::Serialization(err.to_string()))
}

/// ETags are stored as SQLite integers (i64); they never reach 2^63.
fn etag_of(value: i64) -> Result<ETag, StorageError> {
    ETag::try_from(value)
        .map_err(|_| StorageError::Serialization(format!("a negative ETag {value}")))
}

/// Whether SQLite refused for a lock held elsewhere.
fn is_busy(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

impl SqliteStorage {
    /// Opens the database at `path`, creating it and its tables if needed.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStorage, StorageError> {
        let connection = Connection::open(path).map_err(backend)?;
        connection.busy_timeout(BUSY_TIMEOUT).map_err(backend)?;
        // Switching to WAL and creating the tables take the file's lock,
        // and SQLite may refuse at once rather than wait when processes
        // open a new file together: such a refusal is retried.
        let setup = || {
            connection.execute_batch(
                "PRAGMA journal_mode = WAL;
                 BEGIN IMMEDIATE;
                 CREATE TABLE IF NOT EXISTS grain_state (
                     key BLOB PRIMARY KEY,
                     etag INTEGER NOT NULL,
                     data BLOB NOT NULL
                 );
                 CREATE TABLE IF NOT EXISTS meta (
                     name TEXT PRIMARY KEY,
                     value INTEGER NOT NULL
                 );
                 CREATE TABLE IF NOT EXISTS granary_reminders (
                     grain_type TEXT NOT NULL,
                     grain_key BLOB NOT NULL,
                     name TEXT NOT NULL,
                     period_ms INTEGER NOT NULL,
                     next_due_ms INTEGER NOT NULL,
                     etag INTEGER NOT NULL,
                     PRIMARY KEY (grain_type, grain_key, name)
                 );
                 COMMIT;",
            )
        };
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            match setup() {
                Ok(()) => break,
                Err(err) if is_busy(&err) && started.elapsed() < BUSY_TIMEOUT => {
                    // A failed batch may leave its transaction open.
                    let _ = connection.execute_batch("ROLLBACK;");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Err(err) => return Err(backend(err)),
            }
        }
        Ok(SqliteStorage {
            connection: Arc::new(Mutex::new(connection)),
        })
    }

    /// Runs `work` on the blocking pool with the connection.
    fn blocking<'a, T: Send + 'static>(
        &'a self,
        work: impl FnOnce(&mut Connection) -> Result<T, StorageError> + Send + 'static,
    ) -> BoxFuture<'a, Result<T, StorageError>> {
        let connection = self.connection.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                // A panic inside SQLite's calls leaves no half-done Rust
                // state behind the lock.
                let mut connection = connection.lock().unwrap_or_else(PoisonError::into_inner);
                work(&mut connection)
            })
            .await
            .map_err(|err| StorageError::Backend(format!("sqlite task: {err}")))?
        })
    }
}

/// Takes the next ETag from the counter in `meta`, within a transaction.
fn take_etag(txn: &rusqlite::Transaction<'_>) -> Result<i64, StorageError> {
    // Cached statements: a batch takes one per row.
    let next: i64 = txn
        .prepare_cached("SELECT value FROM meta WHERE name = 'next_etag'")
        .map_err(backend)?
        .query_row([], |row| row.get(0))
        .optional()
        .map_err(backend)?
        .unwrap_or(1);
    txn.prepare_cached(
        "INSERT INTO meta (name, value) VALUES ('next_etag', ?1)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
    )
    .map_err(backend)?
    .execute(params![next + 1])
    .map_err(backend)?;
    Ok(next)
}

/// The stored ETag of `key` within a transaction.
fn stored_etag(txn: &rusqlite::Transaction<'_>, key: &[u8]) -> Result<Option<ETag>, StorageError> {
    txn.query_row(
        "SELECT etag FROM grain_state WHERE key = ?1",
        params![key],
        |row| row.get::<_, i64>(0),
    )
    .optional()
    .map_err(backend)?
    .map(etag_of)
    .transpose()
}

impl StorageProvider for SqliteStorage {
    fn read<'a>(
        &'a self,
        grain: &'a GrainId,
    ) -> BoxFuture<'a, Result<Option<StoredState>, StorageError>> {
        let key = encode_key(grain);
        self.blocking(move |connection| {
            let key = key?;
            let row = connection
                .query_row(
                    "SELECT etag, data FROM grain_state WHERE key = ?1",
                    params![key],
                    |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?)),
                )
                .optional()
                .map_err(backend)?;
            row.map(|(etag, data)| {
                Ok(StoredState {
                    data,
                    etag: etag_of(etag)?,
                })
            })
            .transpose()
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
        self.blocking(move |connection| {
            let key = key?;
            let txn = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            StorageError::unless_current(&grain, expected, stored_etag(&txn, &key)?)?;
            let next = take_etag(&txn)?;
            txn.execute(
                "INSERT INTO grain_state (key, etag, data) VALUES (?1, ?2, ?3)
                 ON CONFLICT (key) DO UPDATE SET etag = excluded.etag, data = excluded.data",
                params![key, next, data],
            )
            .map_err(backend)?;
            txn.commit().map_err(backend)?;
            etag_of(next)
        })
    }

    fn clear<'a>(
        &'a self,
        grain: &'a GrainId,
        expected: Option<ETag>,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        let key = encode_key(grain);
        let grain = grain.clone();
        self.blocking(move |connection| {
            let key = key?;
            let txn = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            StorageError::unless_current(&grain, expected, stored_etag(&txn, &key)?)?;
            txn.execute("DELETE FROM grain_state WHERE key = ?1", params![key])
                .map_err(backend)?;
            txn.commit().map_err(backend)?;
            Ok(())
        })
    }

    fn reminder_table(&self) -> Option<&dyn ReminderTable> {
        Some(self)
    }
}

/// A reminder row's key columns, and the name.
struct RowKey {
    grain: GrainId,
    key: Vec<u8>,
    name: String,
}

impl RowKey {
    fn new(grain: &GrainId, name: &str) -> Result<RowKey, StorageError> {
        Ok(RowKey {
            grain: grain.clone(),
            key: encode_grain_key(grain)?,
            name: name.to_string(),
        })
    }
}

/// The ETag of a reminder row, if it exists, within a transaction.
fn stored_reminder_etag(
    txn: &rusqlite::Transaction<'_>,
    row: &RowKey,
) -> Result<Option<ETag>, StorageError> {
    txn.prepare_cached(
        "SELECT etag FROM granary_reminders
         WHERE grain_type = ?1 AND grain_key = ?2 AND name = ?3",
    )
    .map_err(backend)?
    .query_row(params![row.grain.type_name, row.key, row.name], |stored| {
        stored.get::<_, i64>(0)
    })
    .optional()
    .map_err(backend)?
    .map(etag_of)
    .transpose()
}

/// Writes a reminder row unconditionally within a transaction.
fn upsert_in(
    txn: &rusqlite::Transaction<'_>,
    row: &RowKey,
    period_ms: u64,
    next_due_ms: u64,
) -> Result<ETag, StorageError> {
    let (period_ms, next_due_ms) = (ms_to_sql(period_ms)?, ms_to_sql(next_due_ms)?);
    let etag = take_etag(txn)?;
    txn.prepare_cached(
        "INSERT INTO granary_reminders (grain_type, grain_key, name, period_ms, next_due_ms, etag)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (grain_type, grain_key, name) DO UPDATE SET
             period_ms = excluded.period_ms,
             next_due_ms = excluded.next_due_ms,
             etag = excluded.etag",
    )
    .map_err(backend)?
    .execute(params![
        row.grain.type_name,
        row.key,
        row.name,
        period_ms,
        next_due_ms,
        etag
    ])
    .map_err(backend)?;
    etag_of(etag)
}

/// Moves a reminder row's due time if its ETag is `expected`, within a
/// transaction.
fn update_in(
    txn: &rusqlite::Transaction<'_>,
    row: &RowKey,
    next_due_ms: u64,
    expected: ETag,
) -> Result<ETag, StorageError> {
    let next_due_ms = ms_to_sql(next_due_ms)?;
    let stored = stored_reminder_etag(txn, row)?;
    StorageError::unless_current(&row.grain, Some(expected), stored)?;
    let etag = take_etag(txn)?;
    txn.prepare_cached(
        "UPDATE granary_reminders SET next_due_ms = ?4, etag = ?5
         WHERE grain_type = ?1 AND grain_key = ?2 AND name = ?3",
    )
    .map_err(backend)?
    .execute(params![
        row.grain.type_name,
        row.key,
        row.name,
        next_due_ms,
        etag
    ])
    .map_err(backend)?;
    etag_of(etag)
}

/// The columns every reminder query selects, in this order.
const ROW_COLUMNS: &str = "grain_type, grain_key, name, period_ms, next_due_ms, etag";

/// Reads the rows a query selects with [`ROW_COLUMNS`].
fn collect_rows(
    statement: &mut rusqlite::Statement<'_>,
    params: impl rusqlite::Params,
) -> Result<Vec<ReminderRow>, StorageError> {
    let raw = statement
        .query_map(params, |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, Vec<u8>>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, i64>(4)?,
                row.get::<_, i64>(5)?,
            ))
        })
        .map_err(backend)?;
    let mut rows = Vec::new();
    for row in raw {
        let decoded = match row {
            Ok((grain_type, key, name, period_ms, next_due_ms, etag)) => (|| {
                Ok(ReminderRow {
                    grain: decode_grain(grain_type, &key)?,
                    name,
                    period_ms: sql_to_u64(period_ms)?,
                    next_due_ms: sql_to_u64(next_due_ms)?,
                    etag: etag_of(etag)?,
                })
            })(),
            // A column of the wrong type or range: this row is unreadable
            // (contract rule 5); anything else is the store failing.
            Err(
                err @ (rusqlite::Error::FromSqlConversionFailure(..)
                | rusqlite::Error::InvalidColumnType(..)
                | rusqlite::Error::IntegralValueOutOfRange(..)),
            ) => Err(StorageError::Serialization(err.to_string())),
            Err(err) => return Err(backend(err)),
        };
        rows.extend(readable(decoded, "sqlite"));
    }
    Ok(rows)
}

impl SqliteStorage {
    /// Runs `work` in one `IMMEDIATE` transaction, committed if it succeeds.
    fn write_txn<'a, T: Send + 'static>(
        &'a self,
        work: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StorageError> + Send + 'static,
    ) -> BoxFuture<'a, Result<T, StorageError>> {
        self.blocking(move |connection| {
            let txn = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            let done = work(&txn)?;
            txn.commit().map_err(backend)?;
            Ok(done)
        })
    }
}

impl ReminderTable for SqliteStorage {
    fn upsert<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
        period_ms: u64,
        next_due_ms: u64,
    ) -> BoxFuture<'a, Result<ETag, StorageError>> {
        let row = RowKey::new(grain, name);
        self.write_txn(move |txn| upsert_in(txn, &row?, period_ms, next_due_ms))
    }

    fn update_due<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
        next_due_ms: u64,
        expected: ETag,
    ) -> BoxFuture<'a, Result<ETag, StorageError>> {
        let row = RowKey::new(grain, name);
        self.write_txn(move |txn| update_in(txn, &row?, next_due_ms, expected))
    }

    fn delete<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<ETag>, StorageError>> {
        let row = RowKey::new(grain, name);
        self.write_txn(move |txn| {
            let row = row?;
            // Contract rule 5: a row whose ETag cannot be read goes all
            // the same, reported with ETag 0 (never issued).
            let stored = txn
                .prepare_cached(
                    "SELECT etag FROM granary_reminders
                     WHERE grain_type = ?1 AND grain_key = ?2 AND name = ?3",
                )
                .map_err(backend)?
                .query_row(params![row.grain.type_name, row.key, row.name], |stored| {
                    stored.get::<_, rusqlite::types::Value>(0)
                })
                .optional()
                .map_err(backend)?
                .map(|etag| match etag {
                    rusqlite::types::Value::Integer(etag) => ETag::try_from(etag).unwrap_or(0),
                    _ => 0,
                });
            if stored.is_some() {
                txn.execute(
                    "DELETE FROM granary_reminders
                     WHERE grain_type = ?1 AND grain_key = ?2 AND name = ?3",
                    params![row.grain.type_name, row.key, row.name],
                )
                .map_err(backend)?;
            }
            Ok(stored)
        })
    }

    fn read_grain<'a>(
        &'a self,
        grain: &'a GrainId,
    ) -> BoxFuture<'a, Result<Vec<ReminderRow>, StorageError>> {
        let key = encode_grain_key(grain);
        let grain_type = grain.type_name.clone();
        self.blocking(move |connection| {
            let key = key?;
            let mut statement = connection
                .prepare_cached(&format!(
                    "SELECT {ROW_COLUMNS} FROM granary_reminders
                     WHERE grain_type = ?1 AND grain_key = ?2 ORDER BY name"
                ))
                .map_err(backend)?;
            collect_rows(&mut statement, params![grain_type, key])
        })
    }

    fn read_all(&self) -> BoxFuture<'_, Result<Vec<ReminderRow>, StorageError>> {
        self.blocking(move |connection| {
            let mut statement = connection
                .prepare_cached(&format!("SELECT {ROW_COLUMNS} FROM granary_reminders"))
                .map_err(backend)?;
            collect_rows(&mut statement, [])
        })
    }

    fn upsert_batch<'a>(
        &'a self,
        rows: &'a [NewReminder],
    ) -> BoxFuture<'a, Result<BatchOutcome, StorageError>> {
        let rows: Result<Vec<_>, _> = rows
            .iter()
            .map(|row| {
                Ok((
                    RowKey::new(&row.grain, &row.name)?,
                    row.period_ms,
                    row.next_due_ms,
                ))
            })
            .collect();
        self.write_txn(move |txn| {
            let mut outcome = Vec::new();
            for (row, period_ms, next_due_ms) in rows? {
                outcome.push(Ok(upsert_in(txn, &row, period_ms, next_due_ms)?));
            }
            Ok(outcome)
        })
    }

    fn update_due_batch<'a>(
        &'a self,
        updates: &'a [DueUpdate],
    ) -> BoxFuture<'a, Result<BatchOutcome, StorageError>> {
        let updates: Result<Vec<_>, _> = updates
            .iter()
            .map(|update| {
                Ok((
                    RowKey::new(&update.grain, &update.name)?,
                    update.next_due_ms,
                    update.expected,
                ))
            })
            .collect();
        self.write_txn(move |txn| {
            let mut outcome = Vec::new();
            for (row, next_due_ms, expected) in updates? {
                match update_in(txn, &row, next_due_ms, expected) {
                    Ok(etag) => outcome.push(Ok(etag)),
                    Err(conflict @ StorageError::Conflict { .. }) => outcome.push(Err(conflict)),
                    // Nothing is committed.
                    Err(err) => return Err(err),
                }
            }
            Ok(outcome)
        })
    }
}
