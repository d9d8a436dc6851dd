//! The rebalancer's rounds (rule 12 of `node/mod.rs`): every `interval`, a
//! node with a [`RebalanceConfig`] reads the view and its own devices,
//! asks [`crate::rebalance::plan`] what to do, and does it: moves through
//! `migration.rs`, deactivations through the silo.
//!
//! 1. A round, and each move and deactivation in it, starts only while
//!    the node serves: not stopped, draining or fenced (a move the round
//!    stopped waiting for, rule 7, runs on to its verdict, as a move
//!    under way does when the node starts to drain). Rounds never overlap:
//!    the next starts an `interval` after the last one ended, once each of
//!    its moves reached its verdict or was waited for as long as rule 7
//!    allows.
//! 2. The candidates are the grains whose confirmed home is here, that are
//!    not moving, whose type declares device memory, and that have an
//!    activation here (its idle time read from the silo, the device of its
//!    buffers from its quota); those whose type is not migratable may only
//!    be deactivated, and those whose move to another silo failed lately
//!    may not move to another silo (rule 6).
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
//!    a round does not shed again for an excess already being shed. A move
//!    to another silo counts as leaving the same way from its start until
//!    its verdict (or its activation's end), which matters once the round
//!    stopped waiting for it (rule 7).
//! 5. Each decision is counted by reason when carried out or failed
//!    (`stats.rs` rule 4) and logged at debug level with its reason; each
//!    round logs at debug level what it decided from (every silo's used
//!    memory, what this node sent it still counting, its total; the
//!    candidates) and how many moves and deactivations it planned.
//! 6. A grain whose move to another silo failed for a reason that may
//!    hold again (no target had room, it or its target was busy, a hook
//!    failed, its entry changed, or the target could not be reached; not
//!    for `NotActive`, `AlreadyThere`, `Unknown` or a shutdown) may not
//!    move to another silo in the four rounds after the one in which the
//!    failure was learnt, counted by round, not by time, so that a long
//!    round does not let it lapse; it may still move between this node's
//!    devices or, past high water, be deactivated (`crate::rebalance` rule
//!    7). Grains that tie
//!    (busy ones all idle 0) are planned in the same order each round:
//!    without this, the same few would be planned however often they
//!    fail, and the others never tried.
//! 7. Each move is carried out on a task of its own, which counts and logs
//!    what it came to (rule 5) and remembers a failure (rule 6; rule 6 of
//!    `crate::rebalance` for a move between this node's devices). The round
//!    waits for it at most four call timeouts: a move's steps are each
//!    bounded by the call timeout, except the departure's wait for the
//!    grain's turns and `dehydrate` and its commit's wait for the grain's
//!    drop. Past that the round goes on without it; the move itself runs
//!    to its verdict on its task (a departure dropped after the switch
//!    would leave two activations), its grain is no
//!    candidate meanwhile (it is moving, rule 2), it counts against its
//!    target as a move that ended then (rule 3) and as leaving here
//!    (rule 4), and its verdict is still counted and remembered.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::StreamExt;
use granary_actors::GrainId;
use granary_actors::migration::{MigrationError, MigrationTarget};
use tokio::task::JoinHandle;

use super::Inner;
use crate::SiloId;
use crate::membership::DeviceLoad;
use crate::rebalance::{
    Candidate, Destination, Move, Plan, Reason, RebalanceConfig, Snapshot, long_queue, plan,
};

/// How many rounds a grain whose move to another silo failed may not move
/// to another silo (rule 6).
const AWAY_REFUSED_ROUNDS: u64 = 4;

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
        // Rule 6: rounds are numbered from 1.
        let round = self.rebalance_round.fetch_add(1, Ordering::Relaxed) + 1;
        // Rule 6: failures older than four rounds are forgotten.
        forget_refused(&self.away_refused, round);
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
        // Rule 5: what the round decided from, so that a silo that stops
        // moving can be told apart from one whose moves do not end.
        if tracing::enabled!(tracing::Level::DEBUG) {
            let fills: Vec<String> = view
                .iter()
                .map(|member| {
                    let (used, total) = crate::rebalance::silo_fill(&member.load.devices);
                    let sent = sent.get(&member.silo).copied().unwrap_or(0);
                    format!("{}: {used}+{sent}/{total}", member.silo)
                })
                .collect();
            tracing::debug!(
                round,
                silos = ?fills,
                candidates = grains.len(),
                cooling = grains.iter().filter(|grain| grain.cooling).count(),
                refused_away = grains.iter().filter(|grain| !grain.away).count(),
                shedding = self.shedding.len(),
                moves = moves.len(),
                shed = shed.len(),
                "a rebalancer round decided"
            );
        }
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
        // Rule 7: how long the round waits for one move.
        let move_bound = self.config.connection.call_timeout.saturating_mul(4);
        // Each candidate's device and weight: for a move counted as
        // leaving (rule 4) and for the sheds below.
        let weights: HashMap<&GrainId, (Option<usize>, u64)> = grains
            .iter()
            .map(|candidate| (&candidate.grain, (candidate.device, candidate.bytes)))
            .collect();
        let weights = &weights;
        let done: Vec<_> = futures_util::stream::iter(moves)
            .map(|decided| async move {
                if !self.serving() {
                    return None;
                }
                let (grain, to, bytes) = (decided.grain.clone(), decided.to.clone(), decided.bytes);
                if to.silo().is_some() {
                    // Rules 4 and 7: leaving here until its verdict, which
                    // `carry_out` (or, if it moved, the end listener)
                    // takes back; noted before the move can end.
                    self.shedding.insert(
                        grain.clone(),
                        Shedding {
                            device: weights.get(&grain).and_then(|(device, _)| *device),
                            bytes,
                            until: Instant::now() + move_bound.saturating_mul(2),
                        },
                    );
                }
                let carrying = tokio::spawn({
                    let inner = self.clone();
                    async move { inner.carry_out(decided).await }
                });
                let counts = match waited_within(move_bound, carrying).await {
                    Some(moved) => moved,
                    // Rule 7: still going; it counts as if it had moved.
                    None => {
                        tracing::debug!(
                            %grain,
                            %to,
                            waited = ?move_bound,
                            "a rebalancer move goes on to its verdict without the round"
                        );
                        true
                    }
                };
                let took_ms = u64::try_from(decided_at.elapsed().as_millis()).unwrap_or(u64::MAX);
                // A move between this silo's devices shows in its own
                // devices, read fresh each round: nothing to count.
                let Destination::Silo(to) = to else {
                    return None;
                };
                let baseline = baselines.get(&to).copied().unwrap_or(0);
                counts.then(|| Sent {
                    shown_from_ms: baseline
                        .saturating_add(took_ms)
                        .saturating_add(staleness_ms),
                    to,
                    bytes,
                    until: Instant::now() + counts_for,
                })
            })
            .buffer_unordered(config.moves_per_round)
            .collect()
            .await;
        rounds.sent.extend(done.into_iter().flatten());
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
        tracing::debug!(round, took = ?now.elapsed(), "a rebalancer round ended");
    }

    /// Carries out the move `decided`, on a task of its own (rule 7):
    /// counts and logs what it came to (rule 5), remembers a failure in
    /// the round it is learnt in (rule 6; rule 6 of `crate::rebalance` for
    /// a move between this node's devices), and ends its counting as
    /// leaving (rule 4). Whether the grain moved.
    async fn carry_out(self: &Arc<Self>, decided: Move) -> bool {
        let target = match &decided.to {
            Destination::Device(device) => MigrationTarget::Device {
                silo: None,
                device: u32::try_from(*device).unwrap_or(u32::MAX),
            },
            Destination::Silo(to) => MigrationTarget::Silo(to.to_string()),
        };
        // Already on a task of its own: the move runs to its verdict.
        let moved = self.migrate_here(&decided.grain, &target).await;
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
        match (&moved, &decided.to) {
            (Err(_), Destination::Device(_)) => {
                self.local_refused.insert(decided.grain, Instant::now());
            }
            (_, Destination::Silo(_)) => {
                // Rules 4 and 7: no longer leaving (if it moved, the end
                // listener may have forgotten it first).
                self.shedding.remove(&decided.grain);
                if moved.as_ref().is_err_and(may_hold_again) {
                    let round = self.rebalance_round.load(Ordering::Relaxed);
                    self.away_refused.insert(decided.grain, round);
                }
            }
            _ => {}
        }
        moved.is_ok()
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
                    away: !self.away_refused.contains_key(grain),
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

/// Rule 6: forgets the failed moves away of rounds more than four before
/// `round`.
fn forget_refused(refused: &DashMap<GrainId, u64>, round: u64) {
    refused.retain(|_, failed_in| round.saturating_sub(*failed_in) <= AWAY_REFUSED_ROUNDS);
}

/// Rule 6: whether a move away that failed with `err` may fail the same way
/// next round.
fn may_hold_again(err: &MigrationError) -> bool {
    matches!(
        err,
        MigrationError::NoTarget { .. }
            | MigrationError::Busy { .. }
            | MigrationError::Hook { .. }
            | MigrationError::Conflict { .. }
            | MigrationError::Unavailable { .. }
    )
}

/// Rule 7: whether the move `carrying` carries out moved, if it came to a
/// verdict within `bound`; `None` if it is still going. Its task is not
/// cancelled either way (a `JoinHandle` dropped leaves its task running): a
/// move that has begun runs to its verdict. A task that ended abnormally
/// moved nothing the round can count.
async fn waited_within(bound: Duration, carrying: JoinHandle<bool>) -> Option<bool> {
    tokio::time::timeout(bound, carrying)
        .await
        .ok()
        .map(|ended| ended.unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use granary_actors::GrainKey;

    use super::*;

    fn candidate(key: u64) -> Candidate {
        Candidate {
            grain: GrainId {
                type_name: "Ledger".into(),
                key: GrainKey::U64(key),
            },
            bytes: 4 << 20,
            // Called all the time: every one idle 0, a tie.
            idle_for: Duration::ZERO,
            cooling: false,
            device: Some(0),
            movable: true,
            local: true,
            away: true,
        }
    }

    fn keys_of(refused: &DashMap<GrainId, u64>) -> Vec<GrainKey> {
        refused
            .iter()
            .map(|entry| entry.key().key.clone())
            .collect()
    }

    #[test]
    fn a_failed_move_away_is_remembered_for_four_rounds_then_forgotten() {
        let refused = DashMap::new();
        refused.insert(candidate(0).grain, 3);
        refused.insert(candidate(1).grain, 5);
        // The four rounds after round 3's failure remember it.
        for round in 4..=7 {
            forget_refused(&refused, round);
            assert!(refused.contains_key(&candidate(0).grain), "round {round}");
        }
        forget_refused(&refused, 8);
        assert_eq!(keys_of(&refused), [GrainKey::U64(1)]);
        forget_refused(&refused, 10);
        assert!(refused.is_empty());
    }

    #[test]
    fn only_failures_that_may_hold_again_are_remembered() {
        let grain = candidate(0).grain;
        for err in [
            MigrationError::NoTarget {
                grain: grain.clone(),
                reason: "full".into(),
            },
            MigrationError::Busy {
                grain: grain.clone(),
            },
            MigrationError::Unavailable {
                grain: grain.clone(),
                reason: "unreachable".into(),
            },
        ] {
            assert!(may_hold_again(&err), "{err}");
        }
        for err in [
            MigrationError::NotActive {
                grain: grain.clone(),
            },
            MigrationError::AlreadyThere {
                grain: grain.clone(),
            },
            MigrationError::ShutDown,
        ] {
            assert!(!may_hold_again(&err), "{err}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_round_stops_waiting_for_a_move_past_its_bound_and_the_move_goes_on() {
        let bound = Duration::from_secs(120);
        // A move that reaches its verdict in time.
        assert_eq!(
            waited_within(bound, tokio::spawn(async { true })).await,
            Some(true)
        );
        assert_eq!(
            waited_within(bound, tokio::spawn(async { false })).await,
            Some(false)
        );
        // One that hangs (a departure waiting on its grain) until told.
        let (verdict, reached) = tokio::sync::oneshot::channel::<()>();
        let moved = Arc::new(AtomicBool::new(false));
        let carrying = tokio::spawn({
            let moved = moved.clone();
            async move {
                let _ = reached.await;
                moved.store(true, Ordering::SeqCst);
                true
            }
        });
        let started = tokio::time::Instant::now();
        assert_eq!(waited_within(bound, carrying).await, None);
        assert!(started.elapsed() >= bound);
        // Not cancelled: it still reaches its verdict.
        assert!(verdict.send(()).is_ok(), "the move was cancelled");
        let until = tokio::time::Instant::now() + Duration::from_secs(1);
        while !moved.load(Ordering::SeqCst) && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(moved.load(Ordering::SeqCst), "the move did not go on");
    }
}
