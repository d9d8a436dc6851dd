//! A storage provider counted: what [`Silo::storage_stats`] reports
//! (`crate::Silo::storage_stats`). Every silo wraps its provider in one.
//!
//! 1. Each operation on grain state (read, write, clear) is timed, two
//!    clock reads around the provider's own future (storage is slower
//!    than a clock read by orders of magnitude), into a histogram with
//!    fixed bounds ([`STORAGE_SECONDS_BOUNDS`]), and counted by outcome:
//!    done, refused for a stale ETag (a conflict), or failed.
//! 2. The reminder table is the provider's own, uncounted, each of its
//!    operations bounded as rule 3 bounds grain state's ([`TimedTable`]):
//!    a store that stops answering fails a registration, a firing round's
//!    write or a rescan with [`StorageError::Timeout`] (a firing's write
//!    then takes the reminders service's unsaved path), rather than holding
//!    an activation, a round, or a silo's shutdown, forever. One row's
//!    operation waits `storage_timeout`; a whole-table read or a batch,
//!    which grow with the table, [`SCAN_TIMEOUTS`] times as long (a minute
//!    by default). A redb or SQLite operation cut off runs on to its end
//!    on its blocking thread; its answer is dropped.
//! 3. Each operation on grain state waits at most the silo's
//!    `storage_timeout` for the provider: past it, the provider's future is
//!    dropped and the operation fails with [`StorageError::Timeout`]
//!    (counted as failed). A write that timed out may still have happened:
//!    its outcome is unknown, as for any `Backend` error.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use super::reminders::{BatchOutcome, DueUpdate, NewReminder, ReminderRow};
use super::{ETag, ReminderTable, StorageError, StorageProvider, StoredState};
use crate::histogram::{Histogram, HistogramSnapshot};
use crate::key::GrainId;

/// Upper bounds of the storage latency histogram's buckets, in seconds; a
/// last bucket holds everything slower.
pub const STORAGE_SECONDS_BOUNDS: [f64; 10] =
    [1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 1.0];

/// A storage operation (rule 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StorageOp {
    /// A state read.
    Read,
    /// A state write.
    Write,
    /// A state removal.
    Clear,
}

impl StorageOp {
    /// Every operation, in the order of [`StorageStats::ops`].
    pub const ALL: [StorageOp; 3] = [StorageOp::Read, StorageOp::Write, StorageOp::Clear];

    /// The operation as a metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            StorageOp::Read => "read",
            StorageOp::Write => "write",
            StorageOp::Clear => "clear",
        }
    }
}

/// One operation's counters (rule 1).
struct OpCounters {
    done: AtomicU64,
    conflicts: AtomicU64,
    failed: AtomicU64,
    latency: Histogram,
}

impl Default for OpCounters {
    fn default() -> OpCounters {
        OpCounters {
            done: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            latency: Histogram::new(&STORAGE_SECONDS_BOUNDS),
        }
    }
}

impl OpCounters {
    fn record<T>(&self, started: Instant, outcome: &Result<T, StorageError>) {
        self.latency.record(started.elapsed());
        let counter = match outcome {
            Ok(_) => &self.done,
            Err(StorageError::Conflict { .. }) => &self.conflicts,
            Err(_) => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self, op: StorageOp) -> StorageOpStats {
        StorageOpStats {
            op,
            done: self.done.load(Ordering::Relaxed),
            conflicts: self.conflicts.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            latency: self.latency.snapshot(),
        }
    }
}

/// One storage operation's statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageOpStats {
    /// Which operation.
    pub op: StorageOp,
    /// Done.
    pub done: u64,
    /// Refused: the stored ETag was not the one expected.
    pub conflicts: u64,
    /// Failed otherwise (the backend, or encoding).
    pub failed: u64,
    /// Their latency, bounded by [`STORAGE_SECONDS_BOUNDS`].
    pub latency: HistogramSnapshot,
}

/// A silo's storage statistics, one entry per operation.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageStats {
    /// Per operation, in the order of [`StorageOp::ALL`].
    pub ops: Vec<StorageOpStats>,
}

/// The provider a silo uses: its own, counted (rules 1 and 2).
pub(crate) struct CountedStorage {
    inner: Arc<dyn StorageProvider>,
    counters: [OpCounters; 3],
    timeout: Duration,
    /// The provider's reminder table, bounded (rule 2).
    table: TimedTable,
}

impl CountedStorage {
    pub(crate) fn new(inner: Arc<dyn StorageProvider>, timeout: Duration) -> CountedStorage {
        CountedStorage {
            inner: inner.clone(),
            counters: Default::default(),
            timeout,
            table: TimedTable { inner, timeout },
        }
    }

    /// Rules 1 and 3: `operation`, bounded by the timeout, timed and
    /// counted in `counters`.
    async fn bounded<T>(
        &self,
        counters: &OpCounters,
        operation: BoxFuture<'_, Result<T, StorageError>>,
    ) -> Result<T, StorageError> {
        let started = Instant::now();
        let outcome = tokio::time::timeout(self.timeout, operation)
            .await
            .unwrap_or(Err(StorageError::Timeout(self.timeout)));
        counters.record(started, &outcome);
        outcome
    }

    /// The provider itself, uncounted (a health probe's reads are not
    /// grain state operations).
    pub(crate) fn uncounted(&self) -> &dyn StorageProvider {
        self.inner.as_ref()
    }

    pub(crate) fn stats(&self) -> StorageStats {
        StorageStats {
            ops: StorageOp::ALL
                .iter()
                .zip(&self.counters)
                .map(|(op, counters)| counters.snapshot(*op))
                .collect(),
        }
    }
}

impl StorageProvider for CountedStorage {
    fn read<'a>(
        &'a self,
        grain: &'a GrainId,
    ) -> BoxFuture<'a, Result<Option<StoredState>, StorageError>> {
        Box::pin(self.bounded(&self.counters[0], self.inner.read(grain)))
    }

    fn write<'a>(
        &'a self,
        grain: &'a GrainId,
        data: &'a [u8],
        expected: Option<ETag>,
    ) -> BoxFuture<'a, Result<ETag, StorageError>> {
        Box::pin(self.bounded(&self.counters[1], self.inner.write(grain, data, expected)))
    }

    fn clear<'a>(
        &'a self,
        grain: &'a GrainId,
        expected: Option<ETag>,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(self.bounded(&self.counters[2], self.inner.clear(grain, expected)))
    }

    fn reminder_table(&self) -> Option<&dyn ReminderTable> {
        self.inner
            .reminder_table()
            .map(|_| &self.table as &dyn ReminderTable)
    }
}

/// How many `storage_timeout`s a whole-table read or a batch of the
/// reminder table may take (rule 2).
pub(crate) const SCAN_TIMEOUTS: u32 = 6;

/// A provider's reminder table, each operation bounded by `timeout`
/// (rule 2). Only handed out where the provider has a table.
struct TimedTable {
    inner: Arc<dyn StorageProvider>,
    timeout: Duration,
}

impl TimedTable {
    /// A whole-table read's or a batch's bound.
    fn scan_timeout(&self) -> Duration {
        self.timeout.saturating_mul(SCAN_TIMEOUTS)
    }

    fn bounded<'a, T: Send + 'a>(
        &'a self,
        limit: Duration,
        operation: impl FnOnce(&'a dyn ReminderTable) -> BoxFuture<'a, Result<T, StorageError>>
        + Send
        + 'a,
    ) -> BoxFuture<'a, Result<T, StorageError>> {
        Box::pin(async move {
            let Some(table) = self.inner.reminder_table() else {
                return Err(StorageError::Backend(
                    "the storage provider has no reminder table".into(),
                ));
            };
            tokio::time::timeout(limit, operation(table))
                .await
                .unwrap_or(Err(StorageError::Timeout(limit)))
        })
    }
}

impl ReminderTable for TimedTable {
    fn upsert<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
        period_ms: u64,
        next_due_ms: u64,
    ) -> BoxFuture<'a, Result<ETag, StorageError>> {
        self.bounded(self.timeout, move |table| {
            table.upsert(grain, name, period_ms, next_due_ms)
        })
    }

    fn update_due<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
        next_due_ms: u64,
        expected: ETag,
    ) -> BoxFuture<'a, Result<ETag, StorageError>> {
        self.bounded(self.timeout, move |table| {
            table.update_due(grain, name, next_due_ms, expected)
        })
    }

    fn delete<'a>(
        &'a self,
        grain: &'a GrainId,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<ETag>, StorageError>> {
        self.bounded(self.timeout, move |table| table.delete(grain, name))
    }

    fn read_grain<'a>(
        &'a self,
        grain: &'a GrainId,
    ) -> BoxFuture<'a, Result<Vec<ReminderRow>, StorageError>> {
        self.bounded(self.timeout, move |table| table.read_grain(grain))
    }

    fn read_all(&self) -> BoxFuture<'_, Result<Vec<ReminderRow>, StorageError>> {
        self.bounded(self.scan_timeout(), |table| table.read_all())
    }

    fn upsert_batch<'a>(
        &'a self,
        rows: &'a [NewReminder],
    ) -> BoxFuture<'a, Result<BatchOutcome, StorageError>> {
        self.bounded(self.scan_timeout(), move |table| table.upsert_batch(rows))
    }

    fn update_due_batch<'a>(
        &'a self,
        updates: &'a [DueUpdate],
    ) -> BoxFuture<'a, Result<BatchOutcome, StorageError>> {
        self.bounded(self.scan_timeout(), move |table| {
            table.update_due_batch(updates)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::GrainKey;
    use crate::storage::MemoryStorage;

    #[tokio::test]
    async fn operations_are_counted_by_outcome() {
        let counted = CountedStorage::new(Arc::new(MemoryStorage::new()), Duration::from_secs(10));
        let grain = GrainId {
            type_name: "t".into(),
            key: GrainKey::U64(1),
        };
        assert_eq!(counted.read(&grain).await, Ok(None));
        let etag = counted.write(&grain, b"one", None).await.unwrap();
        // A stale writer: refused, and counted as a conflict.
        assert!(matches!(
            counted.write(&grain, b"two", None).await,
            Err(StorageError::Conflict { .. })
        ));
        counted.clear(&grain, Some(etag)).await.unwrap();
        let stats = counted.stats();
        let [read, write, clear] = &stats.ops[..] else {
            panic!("three operations");
        };
        assert_eq!((read.done, read.conflicts, read.latency.count), (1, 0, 1));
        assert_eq!(
            (write.done, write.conflicts, write.latency.count),
            (1, 1, 2)
        );
        assert_eq!((clear.done, clear.failed), (1, 0));
        assert!(write.latency.sum_seconds >= 0.0);
    }

    /// A provider that never answers.
    struct Silent;

    impl StorageProvider for Silent {
        fn read<'a>(
            &'a self,
            _: &'a GrainId,
        ) -> BoxFuture<'a, Result<Option<StoredState>, StorageError>> {
            Box::pin(std::future::pending())
        }

        fn write<'a>(
            &'a self,
            _: &'a GrainId,
            _: &'a [u8],
            _: Option<ETag>,
        ) -> BoxFuture<'a, Result<ETag, StorageError>> {
            Box::pin(std::future::pending())
        }

        fn clear<'a>(
            &'a self,
            _: &'a GrainId,
            _: Option<ETag>,
        ) -> BoxFuture<'a, Result<(), StorageError>> {
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test]
    async fn an_operation_past_the_timeout_fails_and_is_counted_failed() {
        let timeout = Duration::from_millis(100);
        let counted = CountedStorage::new(Arc::new(Silent), timeout);
        let grain = GrainId {
            type_name: "t".into(),
            key: GrainKey::U64(1),
        };
        let began = Instant::now();
        assert_eq!(
            counted.read(&grain).await,
            Err(StorageError::Timeout(timeout))
        );
        assert!(began.elapsed() >= timeout && began.elapsed() < timeout * 20);
        assert_eq!(
            counted.write(&grain, b"x", None).await,
            Err(StorageError::Timeout(timeout))
        );
        assert_eq!(
            counted.clear(&grain, Some(1)).await,
            Err(StorageError::Timeout(timeout))
        );
        let failed: Vec<u64> = counted.stats().ops.iter().map(|op| op.failed).collect();
        assert_eq!(failed, [1, 1, 1]);
    }

    /// A store whose reminder table never answers.
    struct SilentTable;

    impl ReminderTable for SilentTable {
        fn upsert<'a>(
            &'a self,
            _: &'a GrainId,
            _: &'a str,
            _: u64,
            _: u64,
        ) -> BoxFuture<'a, Result<ETag, StorageError>> {
            Box::pin(std::future::pending())
        }

        fn update_due<'a>(
            &'a self,
            _: &'a GrainId,
            _: &'a str,
            _: u64,
            _: ETag,
        ) -> BoxFuture<'a, Result<ETag, StorageError>> {
            Box::pin(std::future::pending())
        }

        fn delete<'a>(
            &'a self,
            _: &'a GrainId,
            _: &'a str,
        ) -> BoxFuture<'a, Result<Option<ETag>, StorageError>> {
            Box::pin(std::future::pending())
        }

        fn read_grain<'a>(
            &'a self,
            _: &'a GrainId,
        ) -> BoxFuture<'a, Result<Vec<ReminderRow>, StorageError>> {
            Box::pin(std::future::pending())
        }

        fn read_all(&self) -> BoxFuture<'_, Result<Vec<ReminderRow>, StorageError>> {
            Box::pin(std::future::pending())
        }
    }

    /// Grain state in memory, reminders in a table that never answers.
    struct StalledReminders(MemoryStorage, SilentTable);

    impl StorageProvider for StalledReminders {
        fn read<'a>(
            &'a self,
            grain: &'a GrainId,
        ) -> BoxFuture<'a, Result<Option<StoredState>, StorageError>> {
            self.0.read(grain)
        }

        fn write<'a>(
            &'a self,
            grain: &'a GrainId,
            data: &'a [u8],
            expected: Option<ETag>,
        ) -> BoxFuture<'a, Result<ETag, StorageError>> {
            self.0.write(grain, data, expected)
        }

        fn clear<'a>(
            &'a self,
            grain: &'a GrainId,
            expected: Option<ETag>,
        ) -> BoxFuture<'a, Result<(), StorageError>> {
            self.0.clear(grain, expected)
        }

        fn reminder_table(&self) -> Option<&dyn ReminderTable> {
            Some(&self.1)
        }
    }

    /// Rule 2: every reminder table operation fails at the timeout instead
    /// of holding its caller (an activation registering, a firing round,
    /// a rescan, a silo's shutdown waiting for them) forever.
    #[tokio::test]
    async fn a_reminder_table_past_the_timeout_fails_every_operation() {
        let timeout = Duration::from_millis(50);
        let counted = CountedStorage::new(
            Arc::new(StalledReminders(MemoryStorage::new(), SilentTable)),
            timeout,
        );
        let table = counted.reminder_table().expect("the provider's table");
        let grain = GrainId {
            type_name: "t".into(),
            key: GrainKey::U64(1),
        };
        let late = Err(StorageError::Timeout(timeout));
        assert_eq!(table.upsert(&grain, "r", 10, 20).await, late);
        assert_eq!(table.update_due(&grain, "r", 30, 1).await, late);
        assert_eq!(
            table.delete(&grain, "r").await,
            Err(StorageError::Timeout(timeout))
        );
        assert_eq!(
            table.read_grain(&grain).await,
            Err(StorageError::Timeout(timeout))
        );
        let scan = timeout * SCAN_TIMEOUTS;
        assert_eq!(table.read_all().await, Err(StorageError::Timeout(scan)));
        let update = DueUpdate {
            grain: grain.clone(),
            name: "r".into(),
            next_due_ms: 30,
            expected: 1,
        };
        assert_eq!(
            table.update_due_batch(&[update]).await,
            Err(StorageError::Timeout(scan))
        );
        // No table, none handed out.
        assert!(
            CountedStorage::new(Arc::new(Silent), timeout)
                .reminder_table()
                .is_none()
        );
    }
}
