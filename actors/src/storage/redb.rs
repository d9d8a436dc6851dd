//! Grain state in an embedded redb database: the default store of a
//! single node, kept across restarts.
//!
//! One table maps an encoded `GrainId` to its state, prefixed with its
//! ETag; a second holds the next ETag. Each write is one redb write
//! transaction, which redb runs one at a time: the ETag check and the
//! store are atomic. ETags come from one counter kept in the database, so
//! a state cleared and written again never reuses an old version. redb is
//! blocking, so every operation runs on tokio's blocking pool.

use std::path::Path;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{ETag, StorageError, StorageProvider, StoredState};
use crate::key::GrainId;

const STATES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("grain_state");
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
        .ok_or_else(|| StorageError::Backend("redb: a stored value is truncated".into()))?;
    Ok(StoredState {
        data: data.to_vec(),
        etag: u64::from_le_bytes(*etag),
    })
}

impl RedbStorage {
    /// Opens the database at `path`, creating it if needed.
    pub fn open(path: impl AsRef<Path>) -> Result<RedbStorage, StorageError> {
        let db = Database::create(path).map_err(backend)?;
        // Create both tables, so reads never meet a missing table.
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(STATES).map_err(backend)?;
        txn.open_table(META).map_err(backend)?;
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
                let mut meta = txn.open_table(META).map_err(backend)?;
                let etag = meta
                    .get(NEXT_ETAG)
                    .map_err(backend)?
                    .map_or(1, |next| next.value());
                meta.insert(NEXT_ETAG, etag + 1).map_err(backend)?;
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
}
