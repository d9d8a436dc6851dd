//! Resident buffers through the bridge: device memory a caller (a resident
//! grain) keeps across calls, reserved in the broker for as long as it
//! lives.
//!
//! 1. **Reserved first.** [`GpuBridge::allocate_resident`] picks a primary
//!    device that meets the requirements and has room (the broker's choice:
//!    most free memory per queued request), reserves the bytes as kept
//!    memory (`DeviceStats::kept`), then allocates. With no such device it
//!    falls back to the CPU device under `FallbackPolicy::Cpu` (before any
//!    wait). When none has room now but one would once requests' working
//!    memory drains (the bytes fit beside what is kept: resident buffers
//!    and kernels' rings), it waits for that, up to `overload_timeout`,
//!    unless the bridge shuts down; otherwise, or after that, it fails
//!    with [`ResidentError::NoDevice`]. The reservation goes into the
//!    blocking job with the allocation, so a caller that stops waiting
//!    never leaves memory unreserved. An allocation on one named device
//!    (`allocate_resident_within_on`) takes a primary device, or the CPU
//!    device only when it is the fallback.
//! 2. **Released last.** Dropping the last handle frees the device memory,
//!    then releases the reservation (broker invariant 2). A job still
//!    running on the buffer holds its memory (and its use lock, rule 5),
//!    so a caller that gives up early never frees memory under the
//!    device.
//! 3. **Batches over resident parts.** [`GpuBridge::execute_resident`] runs
//!    a kernel's batch path over a request made of host bytes and resident
//!    buffers, with the response returned or written into a resident
//!    buffer; only host parts cross the bus. Every buffer must be on one
//!    device, where the kernel runs; the request's temporary device
//!    buffers are reserved like any batch's. The rules of the parts are
//!    `granary_kernels::resident`'s.
//! 4. Backend work runs on tokio's blocking pool, as the batch path's does.
//! 5. **Moved whole, between uses.** [`GpuBridge::relocate_all`] moves a
//!    set of buffers (a holder's: [`GpuBridge::relocate`] for one) to
//!    another device of the bridge, and every clone of each handle follows
//!    it. It waits until no use of them is running (every read, write and
//!    batch holds each buffer's use lock shared until its blocking job is
//!    done; a relocation holds them alone; both take them in address
//!    order, so neither waits on the other in a cycle). The target must
//!    meet what each buffer was made for (kind, backend, compute units)
//!    and keep resident buffers (rule 1's devices). It then reserves and
//!    allocates every buffer's bytes there (rule 1: the target's room
//!    first; no wait for working memory to drain, `NoDevice` at once),
//!    copies them (device to device with [`Backend::copy_resident`] where
//!    both devices are one backend's and it offers that copy, else staged
//!    through the host; the copy job holds the use locks until it ends,
//!    even if the caller stops waiting), and only then points every handle
//!    at its new memory and frees the old (rule 2) on the blocking pool.
//!    All or none: a failure at any step, or a caller that stops waiting
//!    before the switch, leaves every buffer where it was, with its bytes,
//!    and nothing was freed that would have to be allocated again. The
//!    checks that do not depend on where a buffer is now (the target's
//!    kind and whether it keeps resident buffers) come before any wait. The quota charge
//!    goes with the bytes: a buffer counts once against its holder's quota
//!    throughout.

use std::sync::{Arc, Weak};

use granary_kernels::{Backend, BackendKind, BatchOutput, BatchPart, DeviceBuffer};

use super::record_failure;
use super::{FallbackPolicy, GpuBridge, Shared, execute_error, refused, supports};
use crate::ExecuteError;
use crate::broker::{DeviceId, Requirements, Reservation};

/// Why a resident buffer could not be made, written or read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResidentError {
    /// No device meets the requirements with this much free memory.
    NoDevice {
        /// The bytes asked for.
        bytes: u64,
    },
    /// A range outside the buffer.
    OutOfRange {
        /// Where the range starts.
        offset: usize,
        /// Its length.
        len: usize,
        /// The buffer's length.
        buffer: usize,
    },
    /// The device or its driver failed.
    Device {
        /// The backend.
        backend: BackendKind,
        /// What failed.
        reason: String,
    },
    /// The buffer would take its holder past its quota (the device memory
    /// it declared): refused before any device is touched
    /// (`bridge/quota.rs`).
    OverQuota {
        /// The bytes asked for.
        asked: u64,
        /// The bytes the holder's buffers hold already.
        held: u64,
        /// Its quota.
        limit: u64,
    },
    /// The bridge has shut down.
    ShutDown,
}

impl std::fmt::Display for ResidentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResidentError::NoDevice { bytes } => {
                write!(f, "no device has {bytes} bytes free for a resident buffer")
            }
            ResidentError::OutOfRange {
                offset,
                len,
                buffer,
            } => write!(
                f,
                "{len} bytes at offset {offset} lie outside a resident buffer of {buffer} bytes"
            ),
            ResidentError::Device { backend, reason } => {
                write!(f, "resident buffer on {backend:?}: {reason}")
            }
            ResidentError::OverQuota { asked, held, limit } => write!(
                f,
                "a resident buffer of {asked} bytes would take its holder past its quota: \
                 {held} of {limit} bytes held already"
            ),
            ResidentError::ShutDown => write!(f, "the GPU bridge has shut down"),
        }
    }
}

impl std::error::Error for ResidentError {}

/// Why a resident buffer did not move to another device (rule 5). In
/// every case it is where it was, with its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelocateError {
    /// The bridge has no such device.
    NoSuchDevice {
        /// The device asked for.
        device: DeviceId,
    },
    /// The buffer is on that device already.
    AlreadyThere {
        /// The device.
        device: DeviceId,
    },
    /// The buffer was allocated by another bridge.
    Foreign,
    /// The device does not meet what the buffer's was made to meet (its
    /// kind, backend or compute units), or keeps no resident buffers (the
    /// CPU device when it is not the fallback).
    Unlike {
        /// The device asked for.
        device: DeviceId,
    },
    /// The target device has no room for it, failed, or the bridge has
    /// shut down.
    Resident(ResidentError),
}

impl std::fmt::Display for RelocateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelocateError::NoSuchDevice { device } => {
                write!(f, "the bridge has no device {}", device.0)
            }
            RelocateError::AlreadyThere { device } => {
                write!(f, "the buffer is on device {} already", device.0)
            }
            RelocateError::Foreign => f.write_str("the buffer was allocated by another bridge"),
            RelocateError::Unlike { device } => write!(
                f,
                "device {} does not meet what the buffer was made for, or keeps no resident buffers",
                device.0
            ),
            RelocateError::Resident(err) => write!(f, "the buffer cannot move: {err}"),
        }
    }
}

impl std::error::Error for RelocateError {}

/// A relocation done (rule 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relocated {
    /// The bytes moved.
    pub bytes: u64,
    /// Whether they went device to device ([`Backend::copy_resident`])
    /// rather than through the host.
    pub direct: bool,
}

/// The memory a handle points at. Fields drop in declaration order: the
/// memory, then its reservation (rule 2), then its share of the holder's
/// quota charge, then the gauges are brought up to date.
struct Inner {
    buffer: Box<dyn DeviceBuffer>,
    _reservation: Reservation,
    /// Shared by the memory a relocation leaves and the memory it makes
    /// (rule 5), so the holder is charged once.
    charge: Option<Arc<super::quota::Charge>>,
    _report: ReportMemory,
    backend: Arc<dyn Backend>,
    device: DeviceId,
}

impl Inner {
    fn buffer(&self) -> &dyn DeviceBuffer {
        self.buffer.as_ref()
    }

    /// Whether the buffer was allocated by the bridge `shared` is.
    fn belongs_to(&self, shared: &Arc<Shared>) -> bool {
        std::ptr::eq(self._report.bridge.as_ptr(), Arc::as_ptr(shared))
    }
}

/// Publishes a device's memory figures when dropped.
struct ReportMemory {
    /// Weak: a buffer does not keep the bridge alive.
    bridge: Weak<Shared>,
    device: DeviceId,
}

impl Drop for ReportMemory {
    fn drop(&mut self) {
        if let Some(shared) = self.bridge.upgrade() {
            GpuBridge { shared }.report_memory(self.device);
        }
    }
}

/// What every clone of one handle shares (rule 5).
struct Slot {
    /// The memory the buffer's bytes are in now; replaced only by a
    /// relocation, which holds `uses` alone.
    place: std::sync::RwLock<Arc<Inner>>,
    /// Held shared by each use until its job is done, alone by a
    /// relocation.
    uses: Arc<tokio::sync::RwLock<()>>,
    len: usize,
    /// What its device had to meet when it was made: a relocation's
    /// target must meet it too.
    need: Requirements,
}

impl Slot {
    /// The memory the bytes are in now (rule 5).
    fn place(&self) -> Arc<Inner> {
        self.place
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The slots of `buffers`, each once, in the order their use locks are
/// taken (rule 5: address order, by batches and relocations alike).
fn in_lock_order<'a>(buffers: impl IntoIterator<Item = &'a ResidentBuffer>) -> Vec<&'a Arc<Slot>> {
    let mut slots: Vec<&Arc<Slot>> = buffers.into_iter().map(|buffer| &buffer.slot).collect();
    slots.sort_by_key(|slot| Arc::as_ptr(slot));
    slots.dedup_by(|a, b| Arc::ptr_eq(a, b));
    slots
}

/// Copies `from`'s bytes into `next` (rule 5): device to device where one
/// backend holds both and offers it (`true`), else through the host.
fn copy_between(from: &Inner, next: &Inner) -> Result<bool, granary_kernels::BackendError> {
    let direct = Arc::ptr_eq(&from.backend, &next.backend)
        .then(|| next.backend.copy_resident(from.buffer(), next.buffer()))
        .flatten();
    match direct {
        Some(done) => done.map(|()| true),
        None => {
            let len = from.buffer().len();
            let bytes = from.backend.read_resident(from.buffer(), 0, len)?;
            next.backend.write_resident(next.buffer(), 0, &bytes)?;
            Ok(false)
        }
    }
}

/// A buffer kept on a device across calls; cheap to clone, every clone
/// is the same buffer. Its memory is reserved in the bridge's broker until
/// the last clone (and the last job using it) is gone. It stays on its
/// device unless [`GpuBridge::relocate`] moves it (rule 5).
#[derive(Clone)]
pub struct ResidentBuffer {
    slot: Arc<Slot>,
}

/// A handle that does not keep its buffer alive
/// ([`ResidentBuffer::downgrade`]): what a registry of a holder's buffers
/// keeps.
#[derive(Clone, Debug, Default)]
pub struct WeakResidentBuffer {
    slot: Weak<Slot>,
}

impl WeakResidentBuffer {
    /// The buffer, if a handle to it still lives.
    pub fn upgrade(&self) -> Option<ResidentBuffer> {
        self.slot.upgrade().map(|slot| ResidentBuffer { slot })
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ResidentBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResidentBuffer")
            .field("len", &self.len())
            .field("device", &self.device())
            .field("backend", &self.backend())
            .finish()
    }
}

/// One part of a request for [`GpuBridge::execute_resident`].
#[derive(Debug, Clone, Copy)]
pub enum Part<'a> {
    /// Bytes from the host.
    Host(&'a [u8]),
    /// A whole resident buffer, read on the device.
    Resident(&'a ResidentBuffer),
}

/// Where [`GpuBridge::execute_resident`] puts the response.
#[derive(Debug, Clone, Copy)]
pub enum Output<'a> {
    /// Back to the caller.
    Host,
    /// Into this resident buffer, whose length must be the response's; the
    /// call then returns no bytes.
    Into(&'a ResidentBuffer),
}

impl ResidentBuffer {
    fn new(inner: Inner, need: Requirements) -> ResidentBuffer {
        ResidentBuffer {
            slot: Arc::new(Slot {
                len: inner.buffer().len(),
                place: std::sync::RwLock::new(Arc::new(inner)),
                uses: Arc::new(tokio::sync::RwLock::new(())),
                need,
            }),
        }
    }

    /// The memory the bytes are in now (rule 5).
    fn place(&self) -> Arc<Inner> {
        self.slot.place()
    }

    /// A use of the buffer (rule 5): no relocation runs until the guard
    /// goes, and the memory is the buffer's for that long.
    async fn in_use(&self) -> (tokio::sync::OwnedRwLockReadGuard<()>, Arc<Inner>) {
        let guard = self.slot.uses.clone().read_owned().await;
        (guard, self.place())
    }

    /// Whether `self` and `other` are clones of one buffer.
    pub fn same_buffer(&self, other: &ResidentBuffer) -> bool {
        Arc::ptr_eq(&self.slot, &other.slot)
    }

    /// A handle that does not keep the buffer alive.
    pub fn downgrade(&self) -> WeakResidentBuffer {
        WeakResidentBuffer {
            slot: Arc::downgrade(&self.slot),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.slot.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device it lives on (another one after a relocation: rule 5).
    pub fn device(&self) -> DeviceId {
        self.place().device
    }

    /// The backend of its device.
    pub fn backend(&self) -> BackendKind {
        self.place().backend.kind()
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<(), ResidentError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(ResidentError::OutOfRange {
                offset,
                len,
                buffer: self.len(),
            }),
        }
    }

    /// Copies `data` into the buffer at `offset`.
    pub async fn write(&self, offset: usize, data: &[u8]) -> Result<(), ResidentError> {
        self.check_range(offset, data.len())?;
        let data = data.to_vec();
        let (using, inner) = self.in_use().await;
        self.blocking(using, inner, move |inner| {
            inner.backend.write_resident(inner.buffer(), offset, &data)
        })
        .await
    }

    /// Copies `len` bytes from `offset` to the host.
    pub async fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>, ResidentError> {
        self.check_range(offset, len)?;
        let (using, inner) = self.in_use().await;
        self.blocking(using, inner, move |inner| {
            inner.backend.read_resident(inner.buffer(), offset, len)
        })
        .await
    }

    /// Every byte of the buffer, copied to the host: what a grain that
    /// migrates carries to its next device (`ResidentBuffer::import` puts
    /// it back there).
    pub async fn export(&self) -> Result<Vec<u8>, ResidentError> {
        self.read(0, self.len()).await
    }

    /// Fills the whole buffer with `bytes`, which must be exactly its
    /// length: the other end of [`ResidentBuffer::export`], on the device
    /// a migrated grain's new activation allocated. Takes the bytes
    /// without copying them again.
    pub async fn import(&self, bytes: Vec<u8>) -> Result<(), ResidentError> {
        if bytes.len() != self.len() {
            return Err(ResidentError::OutOfRange {
                offset: 0,
                len: bytes.len(),
                buffer: self.len(),
            });
        }
        let (using, inner) = self.in_use().await;
        self.blocking(using, inner, move |inner| {
            inner.backend.write_resident(inner.buffer(), 0, &bytes)
        })
        .await
    }

    /// Runs `job` on `inner` on the blocking pool (rule 4), with errors
    /// typed. The use guard goes only once the job is done and has let
    /// go of the memory (rule 5), even if the caller stops waiting.
    async fn blocking<T: Send + 'static>(
        &self,
        using: tokio::sync::OwnedRwLockReadGuard<()>,
        inner: Arc<Inner>,
        job: impl FnOnce(&Inner) -> Result<T, granary_kernels::BackendError> + Send + 'static,
    ) -> Result<T, ResidentError> {
        let backend = inner.backend.kind();
        let job = move || {
            let done = job(&inner);
            drop(inner);
            drop(using);
            done
        };
        match tokio::task::spawn_blocking(job).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(ResidentError::Device {
                backend,
                reason: err.to_string(),
            }),
            Err(err) => Err(ResidentError::Device {
                backend,
                reason: format!("the job failed: {err}"),
            }),
        }
    }
}

/// A part as the request holds it before it runs: host bytes borrowed.
enum HeldPart<'a> {
    Host(&'a [u8]),
    Resident(Arc<Inner>),
}

impl HeldPart<'_> {
    fn part(&self) -> BatchPart<'_> {
        match self {
            HeldPart::Host(bytes) => BatchPart::Host(bytes),
            HeldPart::Resident(inner) => BatchPart::Resident(inner.buffer()),
        }
    }
}

/// A part that the blocking job owns.
enum OwnedPart {
    Host(Vec<u8>),
    Resident(Arc<Inner>),
}

impl OwnedPart {
    fn part(&self) -> BatchPart<'_> {
        match self {
            OwnedPart::Host(bytes) => BatchPart::Host(bytes),
            OwnedPart::Resident(inner) => BatchPart::Resident(inner.buffer()),
        }
    }
}

impl GpuBridge {
    /// A resident buffer of `bytes` zeroed bytes on a device that meets
    /// `need` and has room (rule 1).
    pub async fn allocate_resident(
        &self,
        bytes: usize,
        need: &Requirements,
    ) -> Result<ResidentBuffer, ResidentError> {
        self.allocate_resident_charged(bytes, need, None, None)
            .await
    }

    fn shut_down(&self) -> bool {
        self.shared
            .shut_down
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether resident buffers may live on device `id`: a primary device,
    /// or the CPU device when it is the fallback (rule 1).
    pub fn keeps_resident(&self, id: DeviceId) -> bool {
        let Some(slot) = self.shared.devices.get(id.0) else {
            return false;
        };
        let cpu = self.shared.cpu;
        slot.primary
            || (id == cpu
                && self.shared.config.fallback == FallbackPolicy::Cpu
                && !self.shared.devices[cpu.0].primary)
    }

    /// [`GpuBridge::allocate_resident`], holding `charge` (a quota's) for
    /// as long as the buffer lives; on device `only` alone, if given (it
    /// must be one [`GpuBridge::keeps_resident`] allows).
    pub(super) async fn allocate_resident_charged(
        &self,
        bytes: usize,
        need: &Requirements,
        charge: Option<super::quota::Charge>,
        only: Option<DeviceId>,
    ) -> Result<ResidentBuffer, ResidentError> {
        if self.shut_down() {
            return Err(ResidentError::ShutDown);
        }
        let wanted = bytes as u64;
        let made_for = Requirements {
            min_free_memory: 0,
            ..*need
        };
        let need = Requirements {
            min_free_memory: need.min_free_memory.max(wanted),
            ..*need
        };
        let broker = &self.shared.broker;
        let cpu = self.shared.cpu;
        // The primary devices that meet `need`, else the CPU device when it
        // is the fallback; or only the device asked for.
        let select = |need: &Requirements, room: &dyn Fn(DeviceId) -> bool| {
            if let Some(only) = only {
                return broker
                    .select_where(need, |id| id == only && self.keeps_resident(id) && room(id));
            }
            broker
                .select_where(need, |id| self.shared.devices[id.0].primary && room(id))
                .or_else(|| {
                    let fallback = self.shared.config.fallback == FallbackPolicy::Cpu
                        && !self.shared.devices[cpu.0].primary;
                    fallback
                        .then(|| broker.select_where(need, |id| id == cpu && room(id)))
                        .flatten()
                })
        };
        // Rule 1: a device that would have room once requests' working
        // memory drains is waited for, up to `overload_timeout`.
        let room_once_drained = |id: DeviceId| {
            broker
                .unkept(id)
                .is_ok_and(|room| room >= need.min_free_memory)
        };
        let anywhere = Requirements {
            min_free_memory: 0,
            ..need
        };
        let started = std::time::Instant::now();
        let (chosen, reservation) = loop {
            if self.shut_down() {
                return Err(ResidentError::ShutDown);
            }
            if let Some(chosen) = select(&need, &|_| true) {
                if let Ok(reservation) = broker.reserve_kept(chosen, wanted) {
                    break (chosen, reservation);
                }
            }
            let drains = select(&anywhere, &room_once_drained).is_some();
            if !drains || started.elapsed() >= self.shared.config.overload_timeout {
                return Err(ResidentError::NoDevice { bytes: wanted });
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        };
        let inner = self
            .make_inner(chosen, bytes, reservation, charge.map(Arc::new))
            .await?;
        Ok(ResidentBuffer::new(inner, made_for))
    }

    /// Allocates `bytes` on `device` under `reservation` (rules 1 and 2:
    /// the reservation goes into the blocking job with the allocation, so
    /// a caller that stops waiting never leaves memory without one; so
    /// does the quota's charge, given back only once the job ends, so that
    /// its holder never has more allocated than its quota, `quota.rs` rule
    /// 2).
    async fn make_inner(
        &self,
        device: DeviceId,
        bytes: usize,
        reservation: Reservation,
        charge: Option<Arc<super::quota::Charge>>,
    ) -> Result<Inner, ResidentError> {
        let slot = &self.shared.devices[device.0];
        let backend = slot.backend.clone();
        let index = slot.index;
        let kind = backend.kind();
        let made = {
            let backend = backend.clone();
            tokio::task::spawn_blocking(move || {
                backend
                    .alloc_resident(index, bytes)
                    .map(|memory| (memory, reservation, charge))
            })
            .await
        };
        let (buffer, reservation, charge) = match made {
            Ok(Ok(made)) => made,
            Ok(Err(err)) => {
                return Err(ResidentError::Device {
                    backend: kind,
                    reason: err.to_string(),
                });
            }
            Err(err) => {
                return Err(ResidentError::Device {
                    backend: kind,
                    reason: format!("the allocation failed: {err}"),
                });
            }
        };
        self.report_memory(device);
        Ok(Inner {
            buffer,
            _reservation: reservation,
            charge,
            _report: ReportMemory {
                bridge: Arc::downgrade(&self.shared),
                device,
            },
            backend,
            device,
        })
    }

    /// Moves `buffer` to device `to` of this bridge (rule 5); every clone
    /// of the handle follows it. On an error the buffer is where it was,
    /// with its bytes.
    pub async fn relocate(
        &self,
        buffer: &ResidentBuffer,
        to: DeviceId,
    ) -> Result<Relocated, RelocateError> {
        self.relocate_all(std::slice::from_ref(buffer), to).await
    }

    /// Moves every one of `buffers` to device `to` of this bridge,
    /// together (rule 5): all of them, or, on an error, none (each is
    /// where it was, with its bytes). Those on `to` already stay;
    /// `AlreadyThere` if all are.
    pub async fn relocate_all(
        &self,
        buffers: &[ResidentBuffer],
        to: DeviceId,
    ) -> Result<Relocated, RelocateError> {
        if self.shut_down() {
            return Err(RelocateError::Resident(ResidentError::ShutDown));
        }
        if to.0 >= self.shared.devices.len() {
            return Err(RelocateError::NoSuchDevice { device: to });
        }
        // Which bridge made a buffer never changes: checked before waiting.
        if buffers
            .iter()
            .any(|buffer| !buffer.place().belongs_to(&self.shared))
        {
            return Err(RelocateError::Foreign);
        }
        // Each buffer once, its use lock taken alone in address order (as
        // every batch takes them shared: no two wait on each other).
        let slots = in_lock_order(buffers);
        // What each buffer was made for never changes either.
        let broker = &self.shared.broker;
        let unlike = |slot: &Arc<Slot>| broker.select_where(&slot.need, |id| id == to).is_none();
        if !self.keeps_resident(to) || slots.iter().any(|slot| unlike(slot)) {
            return Err(RelocateError::Unlike { device: to });
        }
        let mut moving = Vec::with_capacity(slots.len());
        for slot in &slots {
            moving.push(slot.uses.clone().write_owned().await);
        }
        let leaving: Vec<(&Arc<Slot>, Arc<Inner>)> = slots
            .iter()
            .map(|slot| (*slot, slot.place()))
            .filter(|(_, from)| from.device != to)
            .collect();
        if leaving.is_empty() {
            return Err(RelocateError::AlreadyThere { device: to });
        }
        // Rule 1: the target's room first, for every buffer.
        let bytes: u64 = leaving.iter().map(|(slot, _)| slot.len as u64).sum();
        let mut reservations = Vec::with_capacity(leaving.len());
        for (slot, _) in &leaving {
            match broker.reserve_kept(to, slot.len as u64) {
                Ok(reservation) => reservations.push(reservation),
                Err(_) => {
                    return Err(RelocateError::Resident(ResidentError::NoDevice { bytes }));
                }
            }
        }
        let mut arriving = Vec::with_capacity(leaving.len());
        for ((slot, from), reservation) in leaving.iter().zip(reservations) {
            let next = self
                .make_inner(to, slot.len, reservation, from.charge.clone())
                .await
                .map_err(RelocateError::Resident)?;
            arriving.push(Arc::new(next));
        }
        let kind = self.shared.devices[to.0].backend.kind();
        // The copy job holds the use locks until it ends, even if this
        // future is dropped meanwhile (rule 2): then nothing switches.
        let copied = {
            let pairs: Vec<(Arc<Inner>, Arc<Inner>)> = leaving
                .iter()
                .map(|(_, from)| from.clone())
                .zip(arriving.iter().cloned())
                .collect();
            tokio::task::spawn_blocking(move || {
                let mut direct = true;
                for (from, next) in &pairs {
                    match copy_between(from, next) {
                        Ok(copied) => direct &= copied,
                        Err(err) => return (Err(err), moving),
                    }
                }
                (Ok(direct), moving)
            })
            .await
        };
        let copy_failed = |reason: String| {
            RelocateError::Resident(ResidentError::Device {
                backend: kind,
                reason: format!("the copy failed: {reason}"),
            })
        };
        let (direct, moving) = match copied {
            Ok((Ok(direct), moving)) => (direct, moving),
            Ok((Err(err), _)) => return Err(copy_failed(err.to_string())),
            Err(err) => return Err(copy_failed(err.to_string())),
        };
        // The switch, with no await in it: every handle now reaches the
        // new memory.
        let mut left = Vec::with_capacity(leaving.len());
        for ((slot, from), next) in leaving.into_iter().zip(arriving) {
            *slot
                .place
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = next;
            left.push(from);
        }
        drop(moving);
        // The old memory goes with these last references to it, freed on
        // the blocking pool (rule 4); awaited, so that the device's figures
        // are up to date when this returns.
        let _ = tokio::task::spawn_blocking(move || drop(left)).await;
        Ok(Relocated { bytes, direct })
    }

    /// Runs kernel `kernel_id`'s batch path over the request made of
    /// `parts`, on the device of the resident buffers given, and puts the
    /// response where `output` says (rule 3). With [`Output::Into`] the
    /// returned bytes are empty.
    pub async fn execute_resident(
        &self,
        kernel_id: &str,
        parts: &[Part<'_>],
        output: Output<'_>,
    ) -> Result<Vec<u8>, ExecuteError> {
        let (_, spec) = self
            .lookup(kernel_id)
            .map_err(|err| refused("unknown", err))?;
        let kernel = spec.id;
        let wrong = |reason: String| refused(kernel, ExecuteError::WrongBuffer { kernel, reason });
        // The device: the one every resident buffer is on.
        let buffers: Vec<&ResidentBuffer> = parts
            .iter()
            .filter_map(|part| match part {
                Part::Resident(buffer) => Some(*buffer),
                Part::Host(_) => None,
            })
            .chain(match output {
                Output::Into(buffer) => Some(buffer),
                Output::Host => None,
            })
            .collect();
        // Rule 5: each buffer (once, however often it appears) is held in
        // use until the job is done, so none moves under it; the locks are
        // taken in address order, as a relocation takes them.
        let slots = in_lock_order(buffers.iter().copied());
        let mut using = Vec::with_capacity(slots.len());
        for slot in slots {
            using.push(slot.uses.clone().read_owned().await);
        }
        // Where each part's bytes are, fixed while the locks are held.
        let held: Vec<HeldPart<'_>> = parts
            .iter()
            .map(|part| match part {
                Part::Host(bytes) => HeldPart::Host(bytes),
                Part::Resident(buffer) => HeldPart::Resident(buffer.place()),
            })
            .collect();
        let into = match output {
            Output::Into(buffer) => Some(buffer.place()),
            Output::Host => None,
        };
        let places: Vec<&Arc<Inner>> = held
            .iter()
            .filter_map(|part| match part {
                HeldPart::Resident(inner) => Some(inner),
                HeldPart::Host(_) => None,
            })
            .chain(&into)
            .collect();
        let Some(device) = places.first().map(|inner| inner.device) else {
            return Err(wrong(
                "no resident buffer among the parts or the output: use execute".into(),
            ));
        };
        // Device ids are per bridge: another bridge's device 0 is not ours.
        if places.iter().any(|inner| !inner.belongs_to(&self.shared)) {
            return Err(wrong("a buffer allocated by another bridge".into()));
        }
        if let Some(other) = places.iter().find(|inner| inner.device != device) {
            return Err(wrong(format!(
                "buffers on two devices ({:?} and {:?})",
                device, other.device
            )));
        }
        let slot = &self.shared.devices[device.0];
        let kind = slot.backend.kind();
        if !supports(kind, &spec) {
            return Err(refused(kernel, ExecuteError::NoDevice { kernel }));
        }
        // The request's temporary buffers, reserved like any batch's: the
        // request, and the response unless it goes into a buffer. Shape and
        // kernel checks come first, typed, before any device work.
        let probe_parts: Vec<BatchPart<'_>> = held.iter().map(HeldPart::part).collect();
        let checked = granary_kernels::resident::request_probe(&probe_parts).and_then(|probe| {
            Ok((
                probe.len(),
                granary_kernels::batch_output_len(&spec, &probe)?,
            ))
        });
        let (request_len, output_len) = match checked {
            Ok(lens) => lens,
            Err(err) => {
                let err = execute_error(&spec, kind, err);
                record_failure(kernel, kind, &err);
                return Err(err);
            }
        };
        let temporary = request_len
            + match output {
                Output::Host => output_len,
                Output::Into(_) => 0,
            };
        let reservation = self
            .reserve_within(&spec, device, temporary as u64)
            .await
            .inspect_err(|err| record_failure(kernel, kind, err))?;
        let in_flight =
            self.shared
                .broker
                .begin(device)
                .map_err(|err| ExecuteError::DeviceFailed {
                    kernel,
                    backend: kind,
                    reason: err.to_string(),
                })?;
        drop(probe_parts);
        // Host bytes are copied only now, once the request may run.
        let owned: Vec<OwnedPart> = held
            .into_iter()
            .map(|part| match part {
                HeldPart::Host(bytes) => OwnedPart::Host(bytes.to_vec()),
                HeldPart::Resident(inner) => OwnedPart::Resident(inner),
            })
            .collect();
        let backend = slot.backend.clone();
        let index = slot.index;
        let bridge = self.clone();
        let started = std::time::Instant::now();
        let job = tokio::task::spawn_blocking(move || {
            let parts: Vec<BatchPart<'_>> = owned.iter().map(OwnedPart::part).collect();
            let output = match &into {
                Some(inner) => BatchOutput::Into(inner.buffer()),
                None => BatchOutput::Host,
            };
            let outcome = backend.run_batch_parts(index, &spec, &parts, output);
            // Everything the job holds goes before it counts as finished, so
            // a broker whose queue depth reads zero holds no reservation
            // for a job (a caller that gave up can wait on that).
            drop(parts);
            drop(owned);
            drop(into);
            drop(using);
            drop(reservation);
            bridge.report_memory(device);
            let labels = [
                ("kernel", spec.id.to_string()),
                ("backend", format!("{kind:?}")),
                ("device", index.to_string()),
            ];
            match outcome {
                Ok(response) => {
                    let latency = started.elapsed();
                    in_flight.succeed(latency);
                    metrics::counter!("granary_gpu_requests_total", &labels).increment(1);
                    metrics::histogram!("granary_gpu_request_seconds", &labels)
                        .record(latency.as_secs_f64());
                    Ok(response)
                }
                Err(err) => {
                    in_flight.fail();
                    let err = execute_error(&spec, kind, err);
                    record_failure(spec.id, kind, &err);
                    Err(err)
                }
            }
        });
        job.await.unwrap_or_else(|err| {
            Err(ExecuteError::DeviceFailed {
                kernel,
                backend: kind,
                reason: format!("the batch job failed: {err}"),
            })
        })
    }
}
