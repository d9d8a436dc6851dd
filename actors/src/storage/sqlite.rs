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

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

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
    ETag::try_from(value).map_err(|_| backend(format!("a negative ETag {value}")))
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
            let next: i64 = txn
                .query_row(
                    "SELECT value FROM meta WHERE name = 'next_etag'",
                    [],
                    |row| row.get(0),
                )
                .optional()
                .map_err(backend)?
                .unwrap_or(1);
            txn.execute(
                "INSERT INTO meta (name, value) VALUES ('next_etag', ?1)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                params![next + 1],
            )
            .map_err(backend)?;
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
}
