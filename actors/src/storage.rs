//! Grain state persistence with optimistic concurrency.
//!
//! Every stored state carries an ETag, a version that changes on every
//! write. A write names the ETag it expects to replace (`None`: no state
//! stored yet); if the store holds anything else, the write is refused with
//! [`StorageError::Conflict`]. A stale writer (an activation that lost the
//! race with another) therefore fails loudly instead of overwriting newer
//! state.
//!
//! Reminders live beside the states, in a table of their own with one row
//! per reminder ([`ReminderTable`], `storage/reminders.rs`), which a
//! provider hands out through [`StorageProvider::reminder_table`].

use std::fmt;
use std::sync::Arc;

use dashmap::DashMap;
use futures_util::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::key::GrainId;

mod counted;
mod postgres;
mod redb;
mod reminders;
mod sqlite;

pub(crate) use self::counted::CountedStorage;
pub use self::counted::{STORAGE_SECONDS_BOUNDS, StorageOp, StorageOpStats, StorageStats};
pub use self::postgres::PostgresStorage;
pub use self::redb::RedbStorage;
pub use self::reminders::{BatchOutcome, DueUpdate, NewReminder, ReminderRow, ReminderTable};
pub use self::sqlite::SqliteStorage;

/// A state version: changes on every write.
pub type ETag = u64;

/// A stored state and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredState {
    /// The serialised state.
    pub data: Vec<u8>,
    /// Its version.
    pub etag: ETag,
}

/// Why a storage operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StorageError {
    /// The stored version is not the one the write expected.
    Conflict {
        /// The grain.
        grain: GrainId,
        /// The version the writer expected (`None`: nothing stored).
        expected: Option<ETag>,
        /// The version stored (`None`: nothing stored).
        actual: Option<ETag>,
    },
    /// The state could not be encoded or decoded.
    Serialization(String),
    /// The storage backend failed.
    Backend(String),
    /// The storage backend did not answer within the silo's
    /// `storage_timeout`; a write's outcome is unknown.
    Timeout(std::time::Duration),
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::Conflict {
                grain,
                expected,
                actual,
            } => write!(
                f,
                "stale write to {grain}: expected version {expected:?}, stored {actual:?}"
            ),
            StorageError::Serialization(why) => write!(f, "state encoding: {why}"),
            StorageError::Backend(why) => write!(f, "storage backend: {why}"),
            StorageError::Timeout(after) => {
                write!(f, "storage backend: no answer within {after:?}")
            }
        }
    }
}

impl std::error::Error for StorageError {}

impl StorageError {
    /// A `Conflict` for `grain`.
    pub(crate) fn conflict(
        grain: &GrainId,
        expected: Option<ETag>,
        actual: Option<ETag>,
    ) -> StorageError {
        StorageError::Conflict {
            grain: grain.clone(),
            expected,
            actual,
        }
    }

    /// `Ok` if the stored version `actual` is the `expected` one, else a
    /// `Conflict`: the check every provider makes before it writes.
    pub(crate) fn unless_current(
        grain: &GrainId,
        expected: Option<ETag>,
        actual: Option<ETag>,
    ) -> Result<(), StorageError> {
        if actual == expected {
            Ok(())
        } else {
            Err(StorageError::conflict(grain, expected, actual))
        }
    }
}

/// Where grain state lives. Implementations: [`MemoryStorage`],
/// [`RedbStorage`] (embedded, on disk), [`SqliteStorage`] (shared by the
/// processes of one machine) and [`PostgresStorage`].
pub trait StorageProvider: Send + Sync + 'static {
    /// The grain's state and version, if any is stored.
    fn read<'a>(
        &'a self,
        grain: &'a GrainId,
    ) -> BoxFuture<'a, Result<Option<StoredState>, StorageError>>;

    /// Stores `data` if the stored version is `expected`; returns the new
    /// version.
    fn write<'a>(
        &'a self,
        grain: &'a GrainId,
        data: &'a [u8],
        expected: Option<ETag>,
    ) -> BoxFuture<'a, Result<ETag, StorageError>>;

    /// Removes the state if the stored version is `expected`.
    fn clear<'a>(
        &'a self,
        grain: &'a GrainId,
        expected: Option<ETag>,
    ) -> BoxFuture<'a, Result<(), StorageError>>;

    /// The provider's reminder table, if it keeps one (every built-in
    /// provider does). A silo with remindable grain types needs one: it is
    /// refused at build without.
    fn reminder_table(&self) -> Option<&dyn ReminderTable> {
        None
    }
}

/// State in process memory: for tests, and for grains whose state may be
/// lost with the process.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    states: DashMap<GrainId, StoredState>,
    /// Versions are unique across the store, so a cleared and rewritten
    /// state never reuses an old ETag.
    next_etag: std::sync::atomic::AtomicU64,
    /// The reminder table (`storage/reminders.rs`).
    reminders: self::reminders::MemoryTable,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> MemoryStorage {
        MemoryStorage::default()
    }

    fn fresh_etag(&self) -> ETag {
        self.next_etag
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }
}

impl StorageProvider for MemoryStorage {
    fn read<'a>(
        &'a self,
        grain: &'a GrainId,
    ) -> BoxFuture<'a, Result<Option<StoredState>, StorageError>> {
        Box::pin(async move { Ok(self.states.get(grain).map(|state| state.clone())) })
    }

    fn write<'a>(
        &'a self,
        grain: &'a GrainId,
        data: &'a [u8],
        expected: Option<ETag>,
    ) -> BoxFuture<'a, Result<ETag, StorageError>> {
        Box::pin(async move {
            let etag = self.fresh_etag();
            match self.states.entry(grain.clone()) {
                dashmap::Entry::Occupied(mut stored) => {
                    let actual = stored.get().etag;
                    StorageError::unless_current(grain, expected, Some(actual))?;
                    stored.insert(StoredState {
                        data: data.to_vec(),
                        etag,
                    });
                }
                dashmap::Entry::Vacant(vacant) => {
                    StorageError::unless_current(grain, expected, None)?;
                    vacant.insert(StoredState {
                        data: data.to_vec(),
                        etag,
                    });
                }
            }
            Ok(etag)
        })
    }

    fn clear<'a>(
        &'a self,
        grain: &'a GrainId,
        expected: Option<ETag>,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            let Some(expected_etag) = expected else {
                // Clearing nothing: fine only if nothing is stored.
                let actual = self.states.get(grain).map(|state| state.etag);
                return StorageError::unless_current(grain, None, actual);
            };
            // The check and the removal are one operation on the entry.
            match self
                .states
                .remove_if(grain, |_, state| state.etag == expected_etag)
            {
                Some(_) => Ok(()),
                None => {
                    let actual = self.states.get(grain).map(|state| state.etag);
                    Err(StorageError::conflict(grain, expected, actual))
                }
            }
        })
    }

    fn reminder_table(&self) -> Option<&dyn ReminderTable> {
        Some(self)
    }
}

/// A grain's typed state, loaded from its silo's storage, with the version
/// it was read at. Change it through [`PersistentState::get_mut`], then
/// [`PersistentState::write`].
pub struct PersistentState<T> {
    value: T,
    etag: Option<ETag>,
    grain: GrainId,
    storage: Arc<dyn StorageProvider>,
}

impl<T: fmt::Debug> fmt::Debug for PersistentState<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PersistentState")
            .field("grain", &self.grain)
            .field("etag", &self.etag)
            .field("value", &self.value)
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned + Default> PersistentState<T> {
    /// Reads the state (the default value where nothing is stored).
    pub async fn load(
        storage: Arc<dyn StorageProvider>,
        grain: GrainId,
    ) -> Result<PersistentState<T>, StorageError> {
        let (value, etag) = match storage.read(&grain).await? {
            Some(stored) => (
                postcard::from_bytes(&stored.data)
                    .map_err(|err| StorageError::Serialization(err.to_string()))?,
                Some(stored.etag),
            ),
            None => (T::default(), None),
        };
        Ok(PersistentState {
            value,
            etag,
            grain,
            storage,
        })
    }

    /// A state as another activation held it, value and ETag (a grain
    /// that migrated, `migration.rs` rule 1).
    pub(crate) fn resumed(
        value: T,
        etag: Option<ETag>,
        grain: GrainId,
        storage: Arc<dyn StorageProvider>,
    ) -> PersistentState<T> {
        PersistentState {
            value,
            etag,
            grain,
            storage,
        }
    }

    /// The state.
    pub fn get(&self) -> &T {
        &self.value
    }

    /// The state, to change; nothing is stored until [`write`](Self::write).
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.value
    }

    /// The version the state was read or last written at.
    pub fn etag(&self) -> Option<ETag> {
        self.etag
    }

    /// Stores the state; fails with `Conflict` if someone else wrote since.
    pub async fn write(&mut self) -> Result<(), StorageError> {
        let data = postcard::to_allocvec(&self.value)
            .map_err(|err| StorageError::Serialization(err.to_string()))?;
        self.etag = Some(self.storage.write(&self.grain, &data, self.etag).await?);
        Ok(())
    }

    /// Removes the stored state and resets the value to its default.
    pub async fn clear(&mut self) -> Result<(), StorageError> {
        self.storage.clear(&self.grain, self.etag).await?;
        self.etag = None;
        self.value = T::default();
        Ok(())
    }
}
