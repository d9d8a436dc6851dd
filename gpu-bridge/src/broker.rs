//! The device broker: an inventory of devices with memory accounting,
//! reservations that never overcommit, device selection, and per-device
//! statistics.
//!
//! # Invariants
//!
//! 1. Each device's `reserved` bytes never exceed its capacity (the free
//!    memory it reported when registered): a reservation is a
//!    compare-and-swap that only succeeds while `reserved + bytes <=
//!    capacity`, so concurrent reservations cannot overshoot, and `reserved`
//!    never goes below zero because only a live [`Reservation`] subtracts
//!    what it added, once, on drop.
//! 2. Reserve before allocating: backends allocate device memory only under
//!    a `Reservation`, and drop it after freeing.
//! 3. Selection is a pure function of the current counters: among devices
//!    that meet the [`Requirements`], the one with the most unreserved
//!    memory per request in flight, `available / (1 + queue_depth)`; ties go
//!    to the lower id.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use granary_kernels::{BackendKind, DeviceInfo, DeviceKind};
use hdrhistogram::Histogram;

/// A device's position in its broker, from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub usize);

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BrokerError {
    /// No device with this id.
    UnknownDevice(DeviceId),
    /// The device has less unreserved memory than asked for.
    InsufficientMemory {
        /// The device.
        device: DeviceId,
        /// Bytes asked for.
        requested: u64,
        /// Bytes unreserved when asked.
        available: u64,
    },
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerError::UnknownDevice(id) => write!(f, "no device {}", id.0),
            BrokerError::InsufficientMemory {
                device,
                requested,
                available,
            } => write!(
                f,
                "device {} has {available} bytes unreserved, {requested} requested",
                device.0
            ),
        }
    }
}

impl std::error::Error for BrokerError {}

/// What a request needs from a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Requirements {
    /// Unreserved memory the device must have, in bytes.
    pub min_free_memory: u64,
    /// Only this kind of device, if set.
    pub kind: Option<DeviceKind>,
    /// Only this backend, if set.
    pub backend: Option<BackendKind>,
    /// At least this many compute units.
    pub min_compute_units: u32,
}

/// A device's counters at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceStats {
    /// Requests started and not yet finished.
    pub queue_depth: u64,
    /// Requests finished successfully.
    pub processed: u64,
    /// Requests that failed (or were dropped unfinished).
    pub failed: u64,
    /// Median latency of successful requests, if any.
    pub latency_p50: Option<Duration>,
    /// 99th-percentile latency of successful requests, if any.
    pub latency_p99: Option<Duration>,
    /// The latencies of every successful request added up: with
    /// `processed`, the mean latency between two snapshots.
    pub latency_total: Duration,
    /// Bytes reserved now.
    pub reserved: u64,
    /// Of `reserved`, the bytes kept across requests (resident buffers and
    /// persistent kernels' rings, [`DeviceBroker::reserve_kept`]); the rest
    /// is requests' working memory, which comes and goes with them.
    pub kept: u64,
    /// Bytes that can still be reserved.
    pub available: u64,
}

struct DeviceEntry {
    info: DeviceInfo,
    /// The most that may be reserved: the free memory at registration.
    capacity: u64,
    /// `0..=capacity` (invariant 1).
    reserved: AtomicU64,
    /// Of `reserved`, what reservations made with `reserve_kept` hold.
    kept: AtomicU64,
    queue_depth: AtomicU64,
    processed: AtomicU64,
    failed: AtomicU64,
    /// Latencies of successful requests in nanoseconds, 1 ns to 1 h.
    latency_ns: Mutex<Histogram<u64>>,
    /// Every success's latency added up, in nanoseconds.
    latency_sum_ns: AtomicU64,
}

impl DeviceEntry {
    fn available(&self) -> u64 {
        self.capacity
            .saturating_sub(self.reserved.load(Ordering::Acquire))
    }

    /// Ends one request: counts it, records a success's latency, and
    /// lowers the queue depth.
    fn record(&self, latency: Option<Duration>) {
        match latency {
            Some(latency) => {
                self.processed.fetch_add(1, Ordering::AcqRel);
                let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
                self.latency_sum_ns.fetch_add(nanos, Ordering::Relaxed);
                self.latency_ns
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .saturating_record(nanos);
            }
            None => {
                self.failed.fetch_add(1, Ordering::AcqRel);
            }
        }
        self.queue_depth.fetch_sub(1, Ordering::AcqRel);
    }

    /// [`DeviceEntry::record`] for many requests at once.
    fn record_many(&self, answered: &[u64], failed: usize) {
        if !answered.is_empty() {
            let mut sum = 0u64;
            let mut histogram = self
                .latency_ns
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for &nanos in answered {
                let nanos = nanos.max(1);
                sum = sum.saturating_add(nanos);
                histogram.saturating_record(nanos);
            }
            drop(histogram);
            self.latency_sum_ns.fetch_add(sum, Ordering::Relaxed);
            self.processed
                .fetch_add(answered.len() as u64, Ordering::AcqRel);
        }
        if failed > 0 {
            self.failed.fetch_add(failed as u64, Ordering::AcqRel);
        }
        self.queue_depth
            .fetch_sub((answered.len() + failed) as u64, Ordering::AcqRel);
    }

    fn meets(&self, need: &Requirements) -> bool {
        self.available() >= need.min_free_memory
            && need.kind.is_none_or(|kind| kind == self.info.kind)
            && need
                .backend
                .is_none_or(|backend| backend == self.info.backend)
            && self.info.compute_units >= need.min_compute_units
    }
}

/// The devices of one node, shared by every request on it. Cheap to clone.
#[derive(Clone)]
pub struct DeviceBroker {
    devices: Arc<[DeviceEntry]>,
}

impl fmt::Debug for DeviceBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|d| &d.info))
            .finish()
    }
}

impl DeviceBroker {
    /// A broker over `devices`, in order: the first is `DeviceId(0)`. Each
    /// device's reservable capacity is the free memory it reported.
    pub fn new(devices: Vec<DeviceInfo>) -> DeviceBroker {
        let devices = devices
            .into_iter()
            .map(|info| DeviceEntry {
                capacity: info.free_memory,
                info,
                reserved: AtomicU64::new(0),
                kept: AtomicU64::new(0),
                queue_depth: AtomicU64::new(0),
                processed: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                latency_ns: Mutex::new(
                    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect(
                        "constant bounds: low >= 1, high >= 2 * low, 3 significant figures",
                    ),
                ),
                latency_sum_ns: AtomicU64::new(0),
            })
            .collect();
        DeviceBroker { devices }
    }

    fn entry(&self, device: DeviceId) -> Result<&DeviceEntry, BrokerError> {
        self.devices
            .get(device.0)
            .ok_or(BrokerError::UnknownDevice(device))
    }

    /// The devices, with their ids.
    pub fn devices(&self) -> impl Iterator<Item = (DeviceId, &DeviceInfo)> {
        self.devices
            .iter()
            .enumerate()
            .map(|(i, d)| (DeviceId(i), &d.info))
    }

    /// Reserves `bytes` of `device`'s memory until the returned guard drops.
    pub fn reserve(&self, device: DeviceId, bytes: u64) -> Result<Reservation, BrokerError> {
        let entry = self.entry(device)?;
        let mut reserved = entry.reserved.load(Ordering::Acquire);
        loop {
            let available = entry.capacity.saturating_sub(reserved);
            if bytes > available {
                return Err(BrokerError::InsufficientMemory {
                    device,
                    requested: bytes,
                    available,
                });
            }
            match entry.reserved.compare_exchange_weak(
                reserved,
                reserved + bytes,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(Reservation {
                        broker: self.clone(),
                        device,
                        bytes,
                        kept: false,
                    });
                }
                Err(current) => reserved = current,
            }
        }
    }

    /// [`DeviceBroker::reserve`], for memory kept across requests (a
    /// resident buffer): counted in [`DeviceStats::kept`] too, so that
    /// what is settled on a device can be told from working memory.
    pub fn reserve_kept(&self, device: DeviceId, bytes: u64) -> Result<Reservation, BrokerError> {
        let mut reservation = self.reserve(device, bytes)?;
        if let Some(entry) = self.devices.get(device.0) {
            entry.kept.fetch_add(bytes, Ordering::AcqRel);
            reservation.kept = true;
        }
        Ok(reservation)
    }

    /// Bytes of `device` not kept ([`DeviceBroker::reserve_kept`]): what
    /// could be reserved once requests' working memory has drained.
    pub fn unkept(&self, device: DeviceId) -> Result<u64, BrokerError> {
        let entry = self.entry(device)?;
        Ok(entry
            .capacity
            .saturating_sub(entry.kept.load(Ordering::Acquire)))
    }

    /// The most that may ever be reserved on `device`: its free memory
    /// when the broker was made, or the configured cap.
    pub fn capacity(&self, device: DeviceId) -> Result<u64, BrokerError> {
        Ok(self.entry(device)?.capacity)
    }

    /// Bytes of `device` that can still be reserved.
    pub fn available(&self, device: DeviceId) -> Result<u64, BrokerError> {
        Ok(self.entry(device)?.available())
    }

    /// The device that best meets `need` (invariant 3), if any does.
    pub fn select(&self, need: &Requirements) -> Option<DeviceId> {
        self.select_where(need, |_| true)
    }

    /// [`DeviceBroker::select`] among the devices `allowed` accepts (the
    /// bridge passes the devices that have the kernel and are healthy).
    pub fn select_where(
        &self,
        need: &Requirements,
        allowed: impl Fn(DeviceId) -> bool,
    ) -> Option<DeviceId> {
        self.devices
            .iter()
            .enumerate()
            .filter(|(i, entry)| allowed(DeviceId(*i)) && entry.meets(need))
            .map(|(i, entry)| {
                let depth = entry.queue_depth.load(Ordering::Acquire);
                (DeviceId(i), entry.available() as f64 / (1 + depth) as f64)
            })
            // Higher score wins; on equal scores the lower id compares
            // greater, so ties go to the lower id (invariant 3).
            .max_by(|(a_id, a), (b_id, b)| a.total_cmp(b).then(b_id.cmp(a_id)))
            .map(|(id, _)| id)
    }

    /// Marks a request as started on `device` (its queue depth rises until
    /// the returned guard is finished or dropped).
    pub fn begin(&self, device: DeviceId) -> Result<InFlight, BrokerError> {
        self.entry(device)?
            .queue_depth
            .fetch_add(1, Ordering::AcqRel);
        Ok(InFlight {
            broker: self.clone(),
            device,
            finished: false,
        })
    }

    /// [`DeviceBroker::begin`] without a guard, for a caller that always
    /// finishes with [`DeviceBroker::finish`] (the bridge's slots do): no
    /// broker handle is cloned per request.
    pub(crate) fn enter(&self, device: DeviceId) -> Result<(), BrokerError> {
        self.entry(device)?
            .queue_depth
            .fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Ends a request begun with [`DeviceBroker::enter`]: `Some(latency)`
    /// for a success, `None` for a failure.
    pub(crate) fn finish(&self, device: DeviceId, latency: Option<Duration>) {
        if let Some(entry) = self.devices.get(device.0) {
            entry.record(latency);
        }
    }

    /// Ends many requests at once: `answered` holds the round trips of the
    /// successes in nanoseconds, `failed` counts the failures. One pass
    /// over the counters and one histogram lock for the lot.
    pub(crate) fn finish_many(&self, device: DeviceId, answered: &[u64], failed: usize) {
        if let Some(entry) = self.devices.get(device.0) {
            entry.record_many(answered, failed);
        }
    }

    /// `device`'s counters now.
    pub fn stats(&self, device: DeviceId) -> Result<DeviceStats, BrokerError> {
        let entry = self.entry(device)?;
        let histogram = entry
            .latency_ns
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let quantile = |q: f64| {
            (!histogram.is_empty()).then(|| Duration::from_nanos(histogram.value_at_quantile(q)))
        };
        let reserved = entry.reserved.load(Ordering::Acquire);
        Ok(DeviceStats {
            queue_depth: entry.queue_depth.load(Ordering::Acquire),
            processed: entry.processed.load(Ordering::Acquire),
            failed: entry.failed.load(Ordering::Acquire),
            latency_p50: quantile(0.5),
            latency_p99: quantile(0.99),
            latency_total: Duration::from_nanos(entry.latency_sum_ns.load(Ordering::Relaxed)),
            reserved,
            kept: entry.kept.load(Ordering::Acquire),
            available: entry.capacity.saturating_sub(reserved),
        })
    }
}

/// Reserved device memory; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    broker: DeviceBroker,
    device: DeviceId,
    /// Added to the device's `reserved` when made; subtracted once on drop.
    bytes: u64,
    /// Also counted in the device's `kept` ([`DeviceBroker::reserve_kept`]).
    kept: bool,
}

impl Reservation {
    /// The device the memory is on.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// Bytes reserved.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(entry) = self.broker.devices.get(self.device.0) {
            if self.kept {
                entry.kept.fetch_sub(self.bytes, Ordering::AcqRel);
            }
            entry.reserved.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}

/// A request in flight on a device.
#[derive(Debug)]
pub struct InFlight {
    broker: DeviceBroker,
    device: DeviceId,
    finished: bool,
}

impl InFlight {
    /// Records the request as done after `latency`.
    pub fn succeed(mut self, latency: Duration) {
        self.finished = true;
        self.broker.finish(self.device, Some(latency));
    }

    /// Records the request as failed.
    pub fn fail(mut self) {
        self.finished = true;
        self.record_failure();
    }

    fn record_failure(&self) {
        self.broker.finish(self.device, None);
    }
}

impl Drop for InFlight {
    /// A request dropped without an outcome (its caller gave up, or
    /// panicked) counts as failed.
    fn drop(&mut self) {
        if !self.finished {
            self.record_failure();
        }
    }
}
