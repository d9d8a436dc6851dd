//! The rebalancer's rounds (rule 12 of `node/mod.rs`): every `interval`, a
//! node with a [`RebalanceConfig`] reads the view and its own devices,
//! asks [`crate::rebalance::plan`] what to do, and does it: moves through
//! `migration.rs`, deactivations through the silo.
//!
//! 1. A round, and each move and deactivation in it, runs only while the
//!    node serves: not stopped, draining or fenced. Rounds never overlap:
//!    the next starts an `interval` after the last one's moves reached
//!    their verdicts.
//! 2. The candidates are the grains whose confirmed home is here, that are
//!    not moving, whose type declares device memory, and that have an
//!    activation here (its idle time read from the silo, the device of its
//!    buffers from its quota); those whose type is not migratable may only
//!    be deactivated.
//! 3. A move between this node's devices is a `MigrationTarget::Device`
//!    of this silo (`migration.rs` rule 7), and counts against no other
//!    silo: the node's own devices are read fresh each round. What the
//!    node sent a silo counts against it until the target
//!    publishes a load taken after the move ended, or for at most ten load
//!    intervals or two rounds, whichever is longer (`rebalance.rs` rule
//!    1). "After" is judged on the target's clock alone: the time stamp of
//!    the load this node decided from, plus the time the move took here,
//!    plus two load intervals for that load's staleness.
//! 4. A grain asked to deactivate is no candidate until its activation has
//!    ended (the silo's end listener forgets it; at most four call
//!    timeouts), and the memory it holds counts as gone meanwhile, so that
//!    a round does not shed again for an excess already being shed.
//! 5. Each decision is counted by reason when carried out or failed
//!    (`stats.rs` rule 4) and logged at debug level with its reason.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use futures_util::StreamExt;
use granary_actors::GrainId;
use granary_actors::migration::MigrationTarget;

use super::Inner;
use crate::SiloId;
use crate::membership::DeviceLoad;
use crate::rebalance::{
    Candidate, Destination, Plan, Reason, RebalanceConfig, Snapshot, long_queue, plan,
};

/// Bytes sent to a silo (rule 3).
struct Sent {
    to: SiloId,
    bytes: u64,
    /// The first load time stamp of the target's, by its clock, that
    /// counts the move.
    shown_from_ms: u64,
    /// When it stops counting whatever the target publishes.
    until: Instant,
}

/// A grain asked to deactivate (rule 4).
pub(super) struct Shedding {
    /// The device its buffers are on, if known.
    device: Option<usize>,
    /// What it weighs.
    bytes: u64,
    /// When it stops counting as leaving, whatever happens.
    until: Instant,
}

/// What a node's rounds carry from one to the next.
#[derive(Default)]
struct Rounds {
    sent: Vec<Sent>,
    /// Rounds in a row with a long queue here (`rebalance.rs` rule 5).
    long_queue: u32,
}

/// Starts the node's rebalancer, if it has one and a GPU bridge.
pub(super) fn start(inner: &Arc<Inner>) -> Option<tokio::task::JoinHandle<()>> {
    let config = inner.config.rebalance.clone()?;
    inner.bridge.as_ref()?;
    let weak: Weak<Inner> = Arc::downgrade(inner);
    Some(tokio::spawn(async move {
        let mut rounds = Rounds::default();
        loop {
            tokio::time::sleep(config.interval).await;
            let Some(inner) = weak.upgrade() else { return };
            if inner.stopped.load(Ordering::Acquire) {
                return;
            }
            if inner.serving() {
                inner.rebalance_round(&config, &mut rounds).await;
            }
        }
    }))
}

impl Inner {
    /// Rule 1: whether the node may move or shed grains now.
    fn serving(&self) -> bool {
        !self.stopped.load(Ordering::Acquire)
            && !self.draining.load(Ordering::Acquire)
            && !self.fence.is_fenced()
    }

    /// One round (rules 1 to 5).
    async fn rebalance_round(self: &Arc<Self>, config: &RebalanceConfig, rounds: &mut Rounds) {
        let now = Instant::now();
        self.moved_at
            .retain(|_, at| now.duration_since(*at) < config.cool_down);
        self.local_refused
            .retain(|_, at| now.duration_since(*at) < config.cool_down);
        let Some(bridge) = &self.bridge else { return };
        let me = self.id();
        let mut view: Vec<_> = self.view().as_ref().clone();
        // Rule 3: what a target's load shows, or what outlived its bound,
        // no longer counts.
        let published = |view: &[crate::membership::Member], silo: &SiloId| {
            view.iter()
                .find(|member| member.silo == *silo)
                .map_or(0, |member| member.load.published_ms)
        };
        rounds
            .sent
            .retain(|sent| published(&view, &sent.to) < sent.shown_from_ms && sent.until > now);
        // Rule 4: past its bound, a shed grain counts as here again.
        self.shedding.retain(|_, shedding| shedding.until > now);
        let mut mine = DeviceLoad::of_bridge(bridge);
        let single = crate::rebalance::single_weighed(&mine);
        rounds.long_queue = if long_queue(config, &mine) {
            rounds.long_queue.saturating_add(1)
        } else {
            0
        };
        for shedding in self.shedding.iter() {
            let device = shedding.device.or(single);
            if let Some(device) = device.and_then(|index| mine.get_mut(index)) {
                device.free_memory = device.free_memory.saturating_add(shedding.bytes);
            }
        }
        match view.iter_mut().find(|member| member.silo == me) {
            Some(member) => member.load.devices = mine,
            None => return,
        }
        let grains: Vec<Candidate> = self
            .rebalance_candidates(config)
            .into_iter()
            .filter(|candidate| !self.shedding.contains_key(&candidate.grain))
            .collect();
        let mut sent: HashMap<SiloId, u64> = HashMap::new();
        for counted in &rounds.sent {
            *sent.entry(counted.to.clone()).or_default() += counted.bytes;
        }
        let Plan { moves, shed } = plan(
            config,
            &Snapshot {
                me: &me,
                view: &view,
                grains: &grains,
                sent: &sent,
                long_queue_rounds: rounds.long_queue,
                needs: &self.needs,
            },
        );
        let counts_for = self
            .config
            .load_interval
            .saturating_mul(10)
            .max(config.interval.saturating_mul(2));
        let staleness_ms = u64::try_from(self.config.load_interval.saturating_mul(2).as_millis())
            .unwrap_or(u64::MAX);
        let decided_at = Instant::now();
        let baselines: HashMap<SiloId, u64> = moves
            .iter()
            .filter_map(|decided| decided.to.silo())
            .map(|to| (to.clone(), published(&view, to)))
            .collect();
        let baselines = &baselines;
        let done: Vec<_> = futures_util::stream::iter(moves)
            .map(|decided| async move {
                if !self.serving() {
                    return None;
                }
                let target = match &decided.to {
                    Destination::Device(device) => MigrationTarget::Device {
                        silo: None,
                        device: u32::try_from(*device).unwrap_or(u32::MAX),
                    },
                    Destination::Silo(to) => MigrationTarget::Silo(to.to_string()),
                };
                let moved = self.migrate_here_detached(&decided.grain, &target).await;
                match &moved {
                    Ok(migrated) => tracing::debug!(
                        grain = %decided.grain,
                        to = %decided.to,
                        reason = decided.reason.as_str(),
                        took = ?migrated.took,
                        "the rebalancer moved a grain"
                    ),
                    Err(err) => tracing::debug!(
                        grain = %decided.grain,
                        to = %decided.to,
                        reason = decided.reason.as_str(),
                        error = %err,
                        "a rebalancer move did not happen"
                    ),
                }
                self.stats.rebalanced(decided.reason, moved.is_ok());
                if moved.is_err() && matches!(decided.to, Destination::Device(_)) {
                    self.local_refused
                        .insert(decided.grain.clone(), Instant::now());
                }
                let took_ms = u64::try_from(decided_at.elapsed().as_millis()).unwrap_or(u64::MAX);
                // A move between this silo's devices shows in its own
                // devices, read fresh each round: nothing to count.
                let Destination::Silo(to) = decided.to else {
                    return None;
                };
                let baseline = baselines.get(&to).copied().unwrap_or(0);
                moved.is_ok().then(|| Sent {
                    shown_from_ms: baseline
                        .saturating_add(took_ms)
                        .saturating_add(staleness_ms),
                    to,
                    bytes: decided.bytes,
                    until: Instant::now() + counts_for,
                })
            })
            .buffer_unordered(config.moves_per_round)
            .collect()
            .await;
        rounds.sent.extend(done.into_iter().flatten());
        let weights: HashMap<&GrainId, (Option<usize>, u64)> = grains
            .iter()
            .map(|candidate| (&candidate.grain, (candidate.device, candidate.bytes)))
            .collect();
        let shed_bound = self.config.connection.call_timeout.saturating_mul(4);
        for grain in shed {
            if !self.serving() {
                break;
            }
            // Noted before it is asked, so that the end listener, which
            // may run before the request returns, finds it to forget.
            if let Some((device, bytes)) = weights.get(&grain) {
                self.shedding.insert(
                    grain.clone(),
                    Shedding {
                        device: *device,
                        bytes: *bytes,
                        until: Instant::now() + shed_bound,
                    },
                );
            }
            let shed = self
                .silo
                .deactivate_named(&grain.type_name, grain.key.clone())
                .await;
            match &shed {
                Ok(()) => {
                    tracing::debug!(%grain, "deactivating a grain under device-memory pressure");
                }
                Err(err) => {
                    self.shedding.remove(&grain);
                    tracing::debug!(%grain, error = %err, "deactivating a grain under device-memory pressure failed");
                }
            }
            self.stats.rebalanced(Reason::Pressure, shed.is_ok());
        }
    }

    /// Rule 2: this node's grains the rebalancer may move or shed.
    fn rebalance_candidates(&self, config: &RebalanceConfig) -> Vec<Candidate> {
        let now = Instant::now();
        self.homes
            .iter()
            .filter(|home| home.owner.is_some() && home.moving.is_none() && !home.leaving)
            .filter_map(|home| {
                let grain = home.key();
                let bytes = self.gpu_bytes(&grain.type_name)?;
                let idle_for = self.silo.idle_for(grain)?;
                let cooling = self
                    .moved_at
                    .get(grain)
                    .is_some_and(|at| now.duration_since(*at) < config.cool_down);
                Some(Candidate {
                    grain: grain.clone(),
                    bytes,
                    idle_for,
                    cooling,
                    device: self
                        .quotas
                        .as_ref()
                        .and_then(|quotas| quotas.device_of(grain)),
                    movable: self.home_side.is_migratable(&grain.type_name),
                    local: !self.local_refused.contains_key(grain),
                })
            })
            .collect()
    }

    /// The device memory `grain_type` declares, if any: what makes its
    /// grains GPU grains, which a leave moves first (`migration.rs` rule 6)
    /// and the rebalancer weighs.
    pub(super) fn gpu_bytes(&self, grain_type: &str) -> Option<u64> {
        self.needs
            .get(grain_type)
            .map(|needs| needs.device_memory)
            .filter(|bytes| *bytes > 0)
    }

    /// Notes that `grain` moved now, away or here, when a rebalancer will
    /// read it (`rebalance.rs` rule 6).
    pub(super) fn note_moved(&self, grain: &GrainId) {
        if self.config.rebalance.is_some() && self.bridge.is_some() {
            self.moved_at.insert(grain.clone(), Instant::now());
        }
    }
}
