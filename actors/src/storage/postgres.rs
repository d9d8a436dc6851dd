//! Grain state in PostgreSQL.
//!
//! One table, `granary_grain_state (grain_type, grain_key, etag, data)`,
//! keyed by type name and encoded key. ETags come from a sequence, so they
//! are unique across the database and never reused. A write is one
//! statement whose `WHERE` clause (or `ON CONFLICT`) holds the ETag check,
//! so the check and the store are atomic without a transaction. The client
//! pipelines statements over one connection.
//!
//! # Reconnecting
//!
//! 1. A server that restarts ends the connection; so does the kernel, once
//!    data sent on a connection the network has cut stays unacknowledged
//!    for `TCP_USER_TIMEOUT` (unless the URL sets `tcp_user_timeout`). The
//!    operation that was on it fails with a `Backend` error, which for a
//!    write means its outcome is unknown: it may have committed. (The
//!    silo bounds every operation by its own `storage_timeout` as well.)
//! 2. The next operation finds the connection closed and opens a new one.
//!    One caller at a time opens; the callers that waited for it share
//!    its connection, or its failure, rather than each trying in turn.
//! 3. Opening (the TCP connect, startup and authentication) gives up after
//!    `CONNECT_TIMEOUT`, or the URL's `connect_timeout`: a server that
//!    accepts connections and never answers fails operations, it does not
//!    hold them.
//!
//! So the store serves again as soon as the server does.
//!
//! Reminders are rows of a second table, `granary_reminders (grain_type,
//! grain_key, name, period_ms, next_due_ms, etag)`, keyed by type name,
//! encoded key and name. Their ETags come from the same sequence, taken
//! when the row is written (for an upsert that meets a row, after its lock
//! is held), so a row's ETag only grows. A batch is its statements
//! pipelined, each with its own outcome.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, join_all};
use tokio_postgres::{Client, Config, NoTls};

use super::reminders::{
    BatchOutcome, DueUpdate, NewReminder, ReminderRow, ReminderTable, decode_grain,
    encode_grain_key, ms_to_sql, readable, sql_to_u64,
};
use super::{ETag, StorageError, StorageProvider, StoredState};
use crate::key::GrainId;

/// Grain state in a PostgreSQL database.
pub struct PostgresStorage {
    config: Config,
    /// The open connection's client; replaced when it has closed.
    current: RwLock<Arc<Client>>,
    /// Held by the one caller opening a new connection, with the last
    /// attempt's failure, if it failed, and when (rule 2).
    reopening: tokio::sync::Mutex<Option<(Instant, StorageError)>>,
}

/// How long opening a connection may take, unless the URL says (rule 3).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long sent data may stay unacknowledged before the kernel ends the
/// connection, unless the URL says (rule 1).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a connection, all of it within the connect timeout (rule 3), and
/// drives it on a task of its own.
async fn open(config: &Config) -> Result<Client, StorageError> {
    let limit = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(CONNECT_TIMEOUT);
    let (client, connection) = tokio::time::timeout(limit, config.connect(NoTls))
        .await
        .map_err(|_| backend(format!("no connection within {limit:?}")))?
        .map_err(backend)?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::warn!(error = %err, "the PostgreSQL connection ended; the next operation opens another");
        }
    });
    Ok(client)
}

impl std::fmt::Debug for PostgresStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStorage").finish_non_exhaustive()
    }
}

fn backend(err: impl std::fmt::Display) -> StorageError {
    StorageError::Backend(format!("postgres: {err}"))
}

/// A statement's failure, with the server's own message where there is one
/// (tokio-postgres' `Display` says only "db error").
fn db_error(err: tokio_postgres::Error) -> StorageError {
    match err.as_db_error() {
        Some(db) => backend(format!("{}: {}", db.code().code(), db.message())),
        None => backend(err),
    }
}

fn encode_key(grain: &GrainId) -> Result<Vec<u8>, StorageError> {
    postcard::to_allocvec(&grain.key).map_err(|err| StorageError::Serialization(err.to_string()))
}

/// ETags are stored as `bigint`; the sequence starts at 1. A row's
/// column that is not one (the table altered by hand) is an error, never a
/// panic, and a negative ETag is refused, not taken for another.
fn etag(row: &tokio_postgres::Row, column: usize) -> Result<ETag, StorageError> {
    sql_to_u64(row.try_get(column).map_err(backend)?)
}

fn expected_sql(expected: ETag) -> Result<i64, StorageError> {
    i64::try_from(expected)
        .map_err(|_| StorageError::Backend(format!("ETag {expected} is out of range")))
}

impl PostgresStorage {
    /// Connects to `url` (for example
    /// `postgres://granary:granary@127.0.0.1/granary`, without TLS: use it
    /// on a trusted network) and creates the tables and sequence if needed.
    pub async fn connect(url: &str) -> Result<PostgresStorage, StorageError> {
        let mut config: Config = url.parse().map_err(backend)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        let client = open(&config).await?;
        // `IF NOT EXISTS` does not make concurrent creation safe in
        // PostgreSQL (two sessions can both pass the check and one fails on
        // the catalog's unique index): silos that start together take a
        // transaction-scoped advisory lock first, so one creates and the
        // others find what it made.
        client
            .batch_execute(
                "BEGIN;
                 SELECT pg_advisory_xact_lock(7021946110542817);
                 CREATE SEQUENCE IF NOT EXISTS granary_etag_seq;
                 CREATE TABLE IF NOT EXISTS granary_grain_state (
                     grain_type text NOT NULL,
                     grain_key bytea NOT NULL,
                     etag bigint NOT NULL,
                     data bytea NOT NULL,
                     PRIMARY KEY (grain_type, grain_key)
                 );
                 CREATE TABLE IF NOT EXISTS granary_reminders (
                     grain_type text NOT NULL,
                     grain_key bytea NOT NULL,
                     name text NOT NULL,
                     period_ms bigint NOT NULL,
                     next_due_ms bigint NOT NULL,
                     etag bigint NOT NULL,
                     PRIMARY KEY (grain_type, grain_key, name)
                 );
                 COMMIT;",
            )
            .await
            .map_err(db_error)?;
        Ok(PostgresStorage {
            config,
            current: RwLock::new(Arc::new(client)),
            reopening: tokio::sync::Mutex::new(None),
        })
    }

    /// The client of the current connection, or of a new one where it has
    /// closed (rules 2 and 3).
    async fn client(&self) -> Result<Arc<Client>, StorageError> {
        let current = self.current();
        if !current.is_closed() {
            return Ok(current);
        }
        let asked = Instant::now();
        let mut last_failure = self.reopening.lock().await;
        // Someone else may have reopened it while this caller waited, or
        // failed to: share either.
        let current = self.current();
        if !current.is_closed() {
            return Ok(current);
        }
        if let Some((when, failure)) = last_failure.as_ref()
            && *when >= asked
        {
            return Err(failure.clone());
        }
        let fresh = match open(&self.config).await {
            Ok(client) => Arc::new(client),
            Err(failure) => {
                *last_failure = Some((Instant::now(), failure.clone()));
                return Err(failure);
            }
        };
        *last_failure = None;
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = fresh.clone();
        tracing::info!("reconnected to PostgreSQL");
        Ok(fresh)
    }

    fn current(&self) -> Arc<Client> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    async fn stored_etag(&self, grain: &GrainId, key: &[u8]) -> Result<Option<ETag>, StorageError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT etag FROM granary_grain_state WHERE grain_type = $1 AND grain_key = $2",
                &[&grain.type_name, &key],
            )
            .await
            .map_err(backend)?;
        row.map(|row| etag(&row, 0)).transpose()
    }

    async fn conflict(&self, grain: &GrainId, key: &[u8], expected: Option<ETag>) -> StorageError {
        match self.stored_etag(grain, key).await {
            Ok(actual) => StorageError::conflict(grain, expected, actual),
            Err(err) => err,
        }
    }
}

impl StorageProvider for PostgresStorage {
    fn read<'a>(
        &'a self,
        grain: &'a GrainId,
    ) -> BoxFuture<'a, Result<Option<StoredState>, StorageError>> {
        Box::pin(async move {
            let key = encode_key(grain)?;
            let row = self
                .client()
                .await?
                .query_opt(
                    "SELECT etag, data FROM granary_grain_state
                     WHERE grain_type = $1 AND grain_key = $2",
                    &[&grain.type_name, &key],
                )
                .await
                .map_err(backend)?;
            row.map(|row| {
                Ok(StoredState {
                    etag: etag(&row, 0)?,
                    data: row.try_get(1).map_err(backend)?,
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
        Box::pin(async move {
            let key = encode_key(grain)?;
            let row = match expected {
                None => self
                    .client()
                    .await?
                    .query_opt(
                        "INSERT INTO granary_grain_state (grain_type, grain_key, etag, data)
                         VALUES ($1, $2, nextval('granary_etag_seq'), $3)
                         ON CONFLICT DO NOTHING RETURNING etag",
                        &[&grain.type_name, &key, &data],
                    )
                    .await
                    .map_err(backend)?,
                Some(expected) => self
                    .client()
                    .await?
                    .query_opt(
                        "UPDATE granary_grain_state
                         SET etag = nextval('granary_etag_seq'), data = $3
                         WHERE grain_type = $1 AND grain_key = $2 AND etag = $4
                         RETURNING etag",
                        &[&grain.type_name, &key, &data, &expected_sql(expected)?],
                    )
                    .await
                    .map_err(backend)?,
            };
            match row {
                Some(row) => etag(&row, 0),
                None => Err(self.conflict(grain, &key, expected).await),
            }
        })
    }

    fn clear<'a>(
        &'a self,
        grain: &'a GrainId,
        expected: Option<ETag>,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            let key = encode_key(grain)?;
            let Some(expected) = expected else {
                // Clearing nothing: fine only if nothing is stored.
                let actual = self.stored_etag(grain, &key).await?;
                return StorageError::unless_current(grain, None, actual);
            };
            let deleted = self
                .client()
                .await?
                .execute(
                    "DELETE FROM granary_grain_state
                     WHERE grain_type = $1 AND grain_key = $2 AND etag = $3",
                    &[&grain.type_name, &key, &expected_sql(expected)?],
                )
                .await
                .map_err(backend)?;
            if deleted == 1 {
                Ok(())
            } else {
                Err(self.conflict(grain, &key, Some(expected)).await)
            }
        })
    }

    fn reminder_table(&self) -> Option<&dyn ReminderTable> {
        Some(self)
    }
}

/// The columns every reminder query selects, in this order.
const ROW_COLUMNS: &str = "grain_type, grain_key, name, period_ms, next_due_ms, etag";

fn reminder_row(row: &tokio_postgres::Row) -> Result<ReminderRow, StorageError> {
    let key: Vec<u8> = row.try_get(1).map_err(backend)?;
    Ok(ReminderRow {
        grain: decode_grain(row.try_get(0).map_err(backend)?, &key)?,
        name: row.try_get(2).map_err(backend)?,
        period_ms: sql_to_u64(row.try_get(3).map_err(backend)?)?,
        next_due_ms: sql_to_u64(row.try_get(4).map_err(backend)?)?,
        etag: sql_to_u64(row.try_get(5).map_err(backend)?)?,
    })
}

impl PostgresStorage {
    /// The ETag of `grain`'s reminder `name`, if the row exists.
    async fn reminder_etag(
        &self,
        grain: &GrainId,
        key: &[u8],
        name: &str,
    ) -> Result<Option<ETag>, StorageError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT etag FROM granary_reminders
                 WHERE grain_type = $1 AND grain_key = $2 AND name = $3",
                &[&grain.type_name, &key, &name],
            )
            .await
            .map_err(backend)?;
        row.map(|row| sql_to_u64(row.try_get(0).map_err(backend)?))
            .transpose()
    }
}

impl ReminderTable for PostgresStorage {
    fn upsert<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
        period_ms: u64,
        next_due_ms: u64,
    ) -> BoxFuture<'a, Result<ETag, StorageError>> {
        Box::pin(async move {
            let key = encode_grain_key(grain)?;
            let (period_ms, next_due_ms) = (ms_to_sql(period_ms)?, ms_to_sql(next_due_ms)?);
            // The update's ETag is taken once the conflicting row is locked.
            let row = self
                .client()
                .await?
                .query_one(
                    "INSERT INTO granary_reminders
                         (grain_type, grain_key, name, period_ms, next_due_ms, etag)
                     VALUES ($1, $2, $3, $4, $5, nextval('granary_etag_seq'))
                     ON CONFLICT (grain_type, grain_key, name) DO UPDATE SET
                         period_ms = excluded.period_ms,
                         next_due_ms = excluded.next_due_ms,
                         etag = nextval('granary_etag_seq')
                     RETURNING etag",
                    &[&grain.type_name, &key, &name, &period_ms, &next_due_ms],
                )
                .await
                .map_err(backend)?;
            sql_to_u64(row.try_get(0).map_err(backend)?)
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
            let key = encode_grain_key(grain)?;
            let next_due_ms = ms_to_sql(next_due_ms)?;
            let row = self
                .client()
                .await?
                .query_opt(
                    "UPDATE granary_reminders
                     SET next_due_ms = $4, etag = nextval('granary_etag_seq')
                     WHERE grain_type = $1 AND grain_key = $2 AND name = $3 AND etag = $5
                     RETURNING etag",
                    &[
                        &grain.type_name,
                        &key,
                        &name,
                        &next_due_ms,
                        &expected_sql(expected)?,
                    ],
                )
                .await
                .map_err(backend)?;
            match row {
                Some(row) => sql_to_u64(row.try_get(0).map_err(backend)?),
                None => Err(StorageError::conflict(
                    grain,
                    Some(expected),
                    self.reminder_etag(grain, &key, name).await?,
                )),
            }
        })
    }

    fn delete<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<ETag>, StorageError>> {
        Box::pin(async move {
            let key = encode_grain_key(grain)?;
            let row = self
                .client()
                .await?
                .query_opt(
                    "DELETE FROM granary_reminders
                     WHERE grain_type = $1 AND grain_key = $2 AND name = $3
                     RETURNING etag",
                    &[&grain.type_name, &key, &name],
                )
                .await
                .map_err(backend)?;
            // Contract rule 5: a row whose ETag cannot be read went all the
            // same, reported with ETag 0 (never issued).
            Ok(row.map(|row| {
                row.try_get::<_, i64>(0)
                    .ok()
                    .and_then(|etag| ETag::try_from(etag).ok())
                    .unwrap_or(0)
            }))
        })
    }

    fn read_grain<'a>(
        &'a self,
        grain: &'a GrainId,
    ) -> BoxFuture<'a, Result<Vec<ReminderRow>, StorageError>> {
        Box::pin(async move {
            let key = encode_grain_key(grain)?;
            let rows = self
                .client()
                .await?
                .query(
                    &format!(
                        "SELECT {ROW_COLUMNS} FROM granary_reminders
                         WHERE grain_type = $1 AND grain_key = $2 ORDER BY name"
                    ),
                    &[&grain.type_name, &key],
                )
                .await
                .map_err(backend)?;
            Ok(rows
                .iter()
                .filter_map(|row| readable(reminder_row(row), "postgres"))
                .collect())
        })
    }

    fn read_all(&self) -> BoxFuture<'_, Result<Vec<ReminderRow>, StorageError>> {
        Box::pin(async move {
            let rows = self
                .client()
                .await?
                .query(&format!("SELECT {ROW_COLUMNS} FROM granary_reminders"), &[])
                .await
                .map_err(backend)?;
            Ok(rows
                .iter()
                .filter_map(|row| readable(reminder_row(row), "postgres"))
                .collect())
        })
    }

    fn upsert_batch<'a>(
        &'a self,
        rows: &'a [NewReminder],
    ) -> BoxFuture<'a, Result<BatchOutcome, StorageError>> {
        // Pipelined on the one connection.
        Box::pin(async move {
            Ok(join_all(
                rows.iter()
                    .map(|row| self.upsert(&row.grain, &row.name, row.period_ms, row.next_due_ms)),
            )
            .await)
        })
    }

    fn update_due_batch<'a>(
        &'a self,
        updates: &'a [DueUpdate],
    ) -> BoxFuture<'a, Result<BatchOutcome, StorageError>> {
        Box::pin(async move {
            Ok(join_all(updates.iter().map(|update| {
                self.update_due(
                    &update.grain,
                    &update.name,
                    update.next_due_ms,
                    update.expected,
                )
            }))
            .await)
        })
    }
}
