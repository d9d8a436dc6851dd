//! Resident quotas: the most device memory one holder (a grain) may keep
//! in resident buffers, whatever the device has free.
//!
//! 1. **Charged before the device.** [`GpuBridge::allocate_resident_within`]
//!    charges the quota first, with a compare-and-swap that never lets
//!    what is held pass the limit, and only then asks the broker; a
//!    request that would pass it is [`ResidentError::OverQuota`] and
//!    touches no device, so a holder that asks for more than it declared
//!    never takes memory the cluster counted for someone else.
//! 2. **Given back with the buffer.** The charge lives in the buffer and is
//!    given back when its last handle goes, after the device memory and
//!    the broker's reservation (or at once, if the allocation failed).
//! 3. Clones of a quota share what is held: every buffer a holder keeps
//!    counts against one limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::GpuBridge;
use super::resident::{ResidentBuffer, ResidentError};
use crate::broker::{DeviceId, Requirements};

/// A limit on the bytes of resident buffers one holder keeps (rule 3:
/// clones share it).
#[derive(Debug, Clone)]
pub struct ResidentQuota {
    inner: Arc<QuotaInner>,
}

#[derive(Debug)]
struct QuotaInner {
    limit: u64,
    held: AtomicU64,
}

impl ResidentQuota {
    /// A quota of `limit` bytes, none held.
    pub fn new(limit: u64) -> ResidentQuota {
        ResidentQuota {
            inner: Arc::new(QuotaInner {
                limit,
                held: AtomicU64::new(0),
            }),
        }
    }

    /// The most bytes it lets its holder keep.
    pub fn limit(&self) -> u64 {
        self.inner.limit
    }

    /// The bytes its buffers hold now.
    pub fn held(&self) -> u64 {
        self.inner.held.load(Ordering::Acquire)
    }

    /// Rule 1: takes `bytes` from the quota, or says why not.
    pub(super) fn charge(&self, bytes: u64) -> Result<Charge, ResidentError> {
        let mut held = self.inner.held.load(Ordering::Acquire);
        loop {
            let over = || ResidentError::OverQuota {
                asked: bytes,
                held,
                limit: self.inner.limit,
            };
            let after = held.checked_add(bytes).ok_or_else(over)?;
            if after > self.inner.limit {
                return Err(over());
            }
            match self.inner.held.compare_exchange_weak(
                held,
                after,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(Charge {
                        quota: self.inner.clone(),
                        bytes,
                    });
                }
                Err(now) => held = now,
            }
        }
    }
}

/// Bytes charged to a quota, given back when dropped (rule 2).
#[derive(Debug)]
pub(super) struct Charge {
    quota: Arc<QuotaInner>,
    bytes: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.quota.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl GpuBridge {
    /// [`GpuBridge::allocate_resident`], charged to `quota` first (rule 1):
    /// [`ResidentError::OverQuota`] if the buffer would take its holder
    /// past its limit.
    pub async fn allocate_resident_within(
        &self,
        quota: &ResidentQuota,
        bytes: usize,
        need: &Requirements,
    ) -> Result<ResidentBuffer, ResidentError> {
        let charge = quota.charge(bytes as u64)?;
        self.allocate_resident_charged(bytes, need, Some(charge), None)
            .await
    }

    /// [`GpuBridge::allocate_resident_within`] on device `device` only: a
    /// holder whose other buffers are there keeps them all on one device
    /// (a batch runs over buffers of one device). `NoDevice` if that
    /// device does not meet `need` or has no room (once working memory
    /// drains, as rule 1 of `resident.rs` waits for).
    pub async fn allocate_resident_within_on(
        &self,
        quota: &ResidentQuota,
        device: DeviceId,
        bytes: usize,
        need: &Requirements,
    ) -> Result<ResidentBuffer, ResidentError> {
        let charge = quota.charge(bytes as u64)?;
        self.allocate_resident_charged(bytes, need, Some(charge), Some(device))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_refuses_what_would_pass_its_limit_and_takes_back_what_is_dropped() {
        let quota = ResidentQuota::new(100);
        let first = quota.charge(60).unwrap();
        assert_eq!(quota.held(), 60);
        assert_eq!(
            quota.charge(41).unwrap_err(),
            ResidentError::OverQuota {
                asked: 41,
                held: 60,
                limit: 100
            }
        );
        let shared = quota.clone();
        let second = shared.charge(40).unwrap();
        assert_eq!(quota.held(), 100);
        assert!(matches!(
            quota.charge(1),
            Err(ResidentError::OverQuota { held: 100, .. })
        ));
        drop(first);
        assert_eq!(quota.held(), 40);
        drop(second);
        assert_eq!(shared.held(), 0);
        assert!(matches!(
            quota.charge(u64::MAX),
            Err(ResidentError::OverQuota { .. })
        ));
    }

    #[test]
    fn charges_from_many_threads_never_pass_the_limit() {
        let quota = ResidentQuota::new(1_000);
        let charges: Vec<_> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..8)
                .map(|_| {
                    let quota = quota.clone();
                    scope.spawn(move || {
                        (0..100)
                            .filter_map(|_| quota.charge(7).ok())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|worker| worker.join().unwrap())
                .collect()
        });
        assert_eq!(charges.len(), 1_000 / 7);
        assert_eq!(quota.held(), (1_000 / 7) * 7);
        drop(charges);
        assert_eq!(quota.held(), 0);
    }
}
