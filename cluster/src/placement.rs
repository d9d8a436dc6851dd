//! Where a new activation goes.
//!
//! A [`PlacementStrategy`] picks a silo for a grain that has no activation,
//! from the membership view (each live silo with its load). Built in:
//!
//! - [`RandomPlacement`]: any live silo, uniformly;
//! - [`PreferLocal`]: the calling silo if it is live, else another;
//! - [`HashPlacement`]: the silo a rendezvous hash of the grain's identity
//!   picks, so every silo picks the same one for the same view;
//! - [`LeastActivations`]: the silo with the fewest activations (ties to
//!   the lowest id);
//! - [`GpuAware`]: for grains that declare [`GpuNeeds`]:
//!   1. only silos with a device where the grain fits are candidates:
//!      enough free memory, the backend and compute units asked for (free
//!      now, not [`DeviceLoad::room`], which counts memory lent to
//!      requests: a first call is placed where its buffers need not wait
//!      for it; a migration's target counts room, `node/migration.rs`
//!      rule 1);
//!   2. among them, the one whose best such device has the most free
//!      memory, then the shortest queue, then the lowest id;
//!   3. never a silo where the grain does not fit; when none fits, the
//!      configured fallback: another strategy (the grain runs on its CPU)
//!      or [`PlacementError::NoDeviceFits`].
//!
//! Custom strategies implement the trait. Decisions read only the view
//! they are given, so they are pure functions of it: tests and benches
//! build views by hand.

use std::sync::atomic::{AtomicU64, Ordering};

use granary_actors::GrainId;

use crate::SiloId;
use crate::membership::{DeviceLoad, Member};

/// What a grain needs of a device (rule 1 of [`GpuAware`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuNeeds {
    /// Free device memory, in bytes.
    pub device_memory: u64,
    /// Only this backend (`Cpu`, `OpenCl`, `Cuda`, `Wgpu`), if set.
    pub backend: Option<String>,
    /// At least this many compute units.
    pub min_compute_units: u32,
}

impl GpuNeeds {
    /// Whether the grain fits `device`: it [`suits`](GpuNeeds::suits) it
    /// and has the memory free there.
    pub fn fits(&self, device: &DeviceLoad) -> bool {
        device.free_memory >= self.device_memory && self.suits(device)
    }

    /// Whether `device` is of the backend and has the compute units the
    /// grain needs, whatever its free memory.
    pub fn suits(&self, device: &DeviceLoad) -> bool {
        device.compute_units >= self.min_compute_units
            && self
                .backend
                .as_deref()
                .is_none_or(|backend| backend == device.backend)
    }
}

/// A placement to decide.
#[derive(Debug, Clone, Copy)]
pub struct PlacementRequest<'a> {
    /// The grain to activate.
    pub grain: &'a GrainId,
    /// The silo asking (where the first call arrived).
    pub caller: &'a SiloId,
    /// What the grain needs of a device, if anything.
    pub needs: Option<&'a GpuNeeds>,
}

/// Why no silo was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlacementError {
    /// The view has no live silo.
    NoSilos,
    /// No silo has a device where the grain fits, and the strategy does not
    /// fall back to the CPU.
    NoDeviceFits {
        /// What the grain needs.
        needs: GpuNeeds,
    },
}

impl std::fmt::Display for PlacementError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlacementError::NoSilos => write!(f, "no live silo to place the grain on"),
            PlacementError::NoDeviceFits { needs } => write!(
                f,
                "no silo has a device with {} bytes free{}{}",
                needs.device_memory,
                needs
                    .backend
                    .as_deref()
                    .map(|backend| format!(" on {backend}"))
                    .unwrap_or_default(),
                if needs.min_compute_units > 0 {
                    format!(" and {} compute units", needs.min_compute_units)
                } else {
                    String::new()
                }
            ),
        }
    }
}

impl std::error::Error for PlacementError {}

/// Picks the silo for a new activation.
pub trait PlacementStrategy: Send + Sync + 'static {
    /// A silo among `members` (the live view, sorted by id) for `request`.
    fn place(
        &self,
        request: &PlacementRequest<'_>,
        members: &[Member],
    ) -> Result<SiloId, PlacementError>;
}

/// Any live silo, uniformly (a per-strategy xorshift generator seeded from
/// the OS).
#[derive(Debug)]
pub struct RandomPlacement {
    state: AtomicU64,
}

impl Default for RandomPlacement {
    fn default() -> RandomPlacement {
        let mut seed = [0u8; 8];
        // Without OS randomness, a fixed odd seed still spreads grains.
        let seed = match getrandom::fill(&mut seed) {
            Ok(()) => u64::from_le_bytes(seed) | 1,
            Err(_) => 0x9E37_79B9_7F4A_7C15,
        };
        RandomPlacement {
            state: AtomicU64::new(seed),
        }
    }
}

impl PlacementStrategy for RandomPlacement {
    fn place(
        &self,
        _: &PlacementRequest<'_>,
        members: &[Member],
    ) -> Result<SiloId, PlacementError> {
        if members.is_empty() {
            return Err(PlacementError::NoSilos);
        }
        // xorshift64; a lost update under contention only repeats a draw.
        let mut x = self.state.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state.store(x, Ordering::Relaxed);
        Ok(members[(x % members.len() as u64) as usize].silo.clone())
    }
}

/// The calling silo when it is live, else the rendezvous hash's choice.
#[derive(Debug, Clone, Copy, Default)]
pub struct PreferLocal;

impl PlacementStrategy for PreferLocal {
    fn place(
        &self,
        request: &PlacementRequest<'_>,
        members: &[Member],
    ) -> Result<SiloId, PlacementError> {
        match members.iter().find(|member| &member.silo == request.caller) {
            Some(local) => Ok(local.silo.clone()),
            None => HashPlacement.place(request, members),
        }
    }
}

/// The silo a rendezvous (highest-random-weight) hash of the grain's
/// identity and each silo's picks: every silo computes the same choice from
/// the same view, and a change of view moves only the grains of the silos
/// that came or went.
#[derive(Debug, Clone, Copy, Default)]
pub struct HashPlacement;

impl PlacementStrategy for HashPlacement {
    fn place(
        &self,
        request: &PlacementRequest<'_>,
        members: &[Member],
    ) -> Result<SiloId, PlacementError> {
        let grain = grain_hash(request.grain);
        members
            .iter()
            .max_by_key(|member| (rendezvous(grain, &member.silo), &member.silo))
            .map(|member| member.silo.clone())
            .ok_or(PlacementError::NoSilos)
    }
}

/// The silo with the fewest activations, ties to the lowest id.
#[derive(Debug, Clone, Copy, Default)]
pub struct LeastActivations;

impl PlacementStrategy for LeastActivations {
    fn place(
        &self,
        _: &PlacementRequest<'_>,
        members: &[Member],
    ) -> Result<SiloId, PlacementError> {
        members
            .iter()
            .min_by_key(|member| (member.load.activations, &member.silo))
            .map(|member| member.silo.clone())
            .ok_or(PlacementError::NoSilos)
    }
}

/// Placement by device fit and free memory (the module docs' rules 1 to
/// 3). Requests without [`GpuNeeds`] go to the fallback.
pub struct GpuAware {
    /// Where grains go when no device fits (or they need none); `None`
    /// refuses those that need a device.
    pub fallback: Option<Box<dyn PlacementStrategy>>,
}

impl std::fmt::Debug for GpuAware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuAware")
            .field("falls_back", &self.fallback.is_some())
            .finish()
    }
}

impl GpuAware {
    /// Falls back to the silo with the fewest activations.
    pub fn with_cpu_fallback() -> GpuAware {
        GpuAware::with_fallback(Box::new(LeastActivations))
    }

    /// Falls back to `fallback` (the grain runs on that silo's CPU).
    pub fn with_fallback(fallback: Box<dyn PlacementStrategy>) -> GpuAware {
        GpuAware {
            fallback: Some(fallback),
        }
    }

    /// Refuses grains that fit no device.
    pub fn strict() -> GpuAware {
        GpuAware { fallback: None }
    }
}

impl PlacementStrategy for GpuAware {
    fn place(
        &self,
        request: &PlacementRequest<'_>,
        members: &[Member],
    ) -> Result<SiloId, PlacementError> {
        if members.is_empty() {
            return Err(PlacementError::NoSilos);
        }
        let Some(needs) = request.needs else {
            return match &self.fallback {
                Some(fallback) => fallback.place(request, members),
                None => LeastActivations.place(request, members),
            };
        };
        // Rule 2: per silo its best fitting device, as (free memory,
        // shorter queue); the best silo by that, then the lowest id.
        let best = members
            .iter()
            .filter_map(|member| {
                member
                    .load
                    .devices
                    .iter()
                    .filter(|device| needs.fits(device))
                    .map(|device| (device.free_memory, std::cmp::Reverse(device.queue_depth)))
                    .max()
                    .map(|score| (score, std::cmp::Reverse(&member.silo)))
            })
            .max();
        match (best, &self.fallback) {
            (Some((_, std::cmp::Reverse(silo))), _) => Ok(silo.clone()),
            // Rule 3.
            (None, Some(fallback)) => fallback.place(request, members),
            (None, None) => Err(PlacementError::NoDeviceFits {
                needs: needs.clone(),
            }),
        }
    }
}

/// FNV-1a over the grain's type name and key, finished with splitmix64: a
/// hash that is the same on every silo and every build.
fn grain_hash(grain: &GrainId) -> u64 {
    let mut hash = Fnv::default();
    hash.write(grain.type_name.as_bytes());
    hash.write(&[0xff]);
    match &grain.key {
        granary_actors::GrainKey::Str(key) => {
            hash.write(&[0]);
            hash.write(key.as_bytes());
        }
        granary_actors::GrainKey::U64(key) => {
            hash.write(&[1]);
            hash.write(&key.to_le_bytes());
        }
        granary_actors::GrainKey::Uuid(key) => {
            hash.write(&[2]);
            hash.write(key.as_bytes());
        }
        granary_actors::GrainKey::Compound(key, extension) => {
            hash.write(&[3]);
            hash.write(&key.to_le_bytes());
            hash.write(extension.as_bytes());
        }
    }
    mix(hash.0)
}

/// The weight of `silo` for a grain hashed to `grain` (rendezvous hashing).
pub(crate) fn rendezvous(grain: u64, silo: &SiloId) -> u64 {
    let mut hash = Fnv(grain);
    hash.write(silo.address.as_bytes());
    hash.write(&silo.incarnation.to_le_bytes());
    mix(hash.0)
}

/// The hash [`HashPlacement`] and the directory use for a grain.
pub(crate) fn grain_key_hash(grain: &GrainId) -> u64 {
    grain_hash(grain)
}

struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// splitmix64's finaliser: spreads FNV's low-entropy high bits.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests;
