//! A latency histogram with fixed bucket bounds, in relaxed atomics: what
//! the statistics of grain types, storage and the cluster record into.
//!
//! 1. A sample falls in the first bucket whose bound (in seconds) it does
//!    not exceed, or in the last bucket, which holds everything slower.
//! 2. Recording is two relaxed additions (the bucket and the sum, in
//!    nanoseconds); a snapshot reads them, so it may see one without the
//!    other for a sample being recorded, never a torn count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A latency histogram (rules 1 and 2).
pub struct Histogram {
    bounds: &'static [f64],
    /// One per bound, then the overflow bucket.
    buckets: Box<[AtomicU64]>,
    nanos: AtomicU64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.snapshot().fmt(f)
    }
}

impl Histogram {
    /// An empty histogram with buckets up to each of `bounds`, in seconds,
    /// ascending.
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            nanos: AtomicU64::new(0),
        }
    }

    /// Records one sample (rule 1).
    pub fn record(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = self
            .bounds
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(self.bounds.len());
        if let Some(bucket) = self.buckets.get(bucket) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.nanos.fetch_add(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// What it holds now (rule 2).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .map(|bucket| bucket.load(Ordering::Relaxed))
            .collect();
        HistogramSnapshot {
            bounds: self.bounds,
            count: buckets.iter().sum(),
            buckets,
            sum_seconds: self.nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// A histogram at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// The buckets' upper bounds, in seconds.
    pub bounds: &'static [f64],
    /// Samples per bucket (not cumulative): one per bound, then one for
    /// slower samples.
    pub buckets: Vec<u64>,
    /// Samples in all.
    pub count: u64,
    /// The samples' time in all, in seconds.
    pub sum_seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_fall_in_the_first_bucket_that_holds_them() {
        let histogram = Histogram::new(&[1e-6, 5e-6, 1e-3]);
        histogram.record(Duration::from_nanos(500));
        histogram.record(Duration::from_micros(5));
        histogram.record(Duration::from_micros(800));
        histogram.record(Duration::from_secs(3));
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.buckets, [1, 1, 1, 1]);
        assert_eq!(snapshot.count, 4);
        assert!((snapshot.sum_seconds - 3.000_805_5).abs() < 1e-9);
    }
}
