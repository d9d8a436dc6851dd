//! Grain state in PostgreSQL.
//!
//! One table, `granary_grain_state (grain_type, grain_key, etag, data)`,
//! keyed by type name and encoded key. ETags come from a sequence, so they
//! are unique across the database and never reused. A write is one
//! statement whose `WHERE` clause (or `ON CONFLICT`) holds the ETag check,
//! so the check and the store are atomic without a transaction. The client
//! pipelines statements over one connection.

use futures_util::future::BoxFuture;
use tokio_postgres::{Client, NoTls};

use super::{ETag, StorageError, StorageProvider, StoredState};
use crate::key::GrainId;

/// Grain state in a PostgreSQL database.
pub struct PostgresStorage {
    client: Client,
}

impl std::fmt::Debug for PostgresStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStorage").finish_non_exhaustive()
    }
}

fn backend(err: impl std::fmt::Display) -> StorageError {
    StorageError::Backend(format!("postgres: {err}"))
}

fn encode_key(grain: &GrainId) -> Result<Vec<u8>, StorageError> {
    postcard::to_allocvec(&grain.key).map_err(|err| StorageError::Serialization(err.to_string()))
}

/// ETags are stored as `bigint`; the sequence starts at 1.
fn etag(value: i64) -> ETag {
    u64::try_from(value).unwrap_or(0)
}

fn expected_sql(expected: ETag) -> Result<i64, StorageError> {
    i64::try_from(expected)
        .map_err(|_| StorageError::Backend(format!("ETag {expected} is out of range")))
}

impl PostgresStorage {
    /// Connects to `url` (for example
    /// `postgres://granary:granary@127.0.0.1/granary`, without TLS: use it
    /// on a trusted network) and creates the table and sequence if needed.
    pub async fn connect(url: &str) -> Result<PostgresStorage, StorageError> {
        let (client, connection) = tokio_postgres::connect(url, NoTls).await.map_err(backend)?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::error!(error = %err, "the PostgreSQL connection failed");
            }
        });
        client
            .batch_execute(
                "CREATE SEQUENCE IF NOT EXISTS granary_etag_seq;
                 CREATE TABLE IF NOT EXISTS granary_grain_state (
                     grain_type text NOT NULL,
                     grain_key bytea NOT NULL,
                     etag bigint NOT NULL,
                     data bytea NOT NULL,
                     PRIMARY KEY (grain_type, grain_key)
                 );",
            )
            .await
            .map_err(backend)?;
        Ok(PostgresStorage { client })
    }

    async fn stored_etag(&self, grain: &GrainId, key: &[u8]) -> Result<Option<ETag>, StorageError> {
        let row = self
            .client
            .query_opt(
                "SELECT etag FROM granary_grain_state WHERE grain_type = $1 AND grain_key = $2",
                &[&grain.type_name, &key],
            )
            .await
            .map_err(backend)?;
        Ok(row.map(|row| etag(row.get(0))))
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
                .client
                .query_opt(
                    "SELECT etag, data FROM granary_grain_state
                     WHERE grain_type = $1 AND grain_key = $2",
                    &[&grain.type_name, &key],
                )
                .await
                .map_err(backend)?;
            Ok(row.map(|row| StoredState {
                etag: etag(row.get(0)),
                data: row.get(1),
            }))
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
                    .client
                    .query_opt(
                        "INSERT INTO granary_grain_state (grain_type, grain_key, etag, data)
                         VALUES ($1, $2, nextval('granary_etag_seq'), $3)
                         ON CONFLICT DO NOTHING RETURNING etag",
                        &[&grain.type_name, &key, &data],
                    )
                    .await
                    .map_err(backend)?,
                Some(expected) => self
                    .client
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
                Some(row) => Ok(etag(row.get(0))),
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
                .client
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
}
