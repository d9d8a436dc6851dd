//! The rebalancer's rounds (rule 12): every `interval`, a node with a
//! [`RebalanceConfig`] reads the view and its own devices, asks
//! [`crate::rebalance::plan`] what to do, and does it: moves through
//! `migration.rs`, deactivations through the silo.
//!
//! 1. A round runs only while the node serves: not stopped, draining or
//!    fenced. Rounds never overlap: the next starts an `interval` after the
//!    last one's moves reached their verdicts.
//! 2. The candidates are the grains whose confirmed home is here, that are
//!    not moving, whose type is migratable and declares device memory, and
//!    that have an activation here (its idle time read from the silo).
//! 3. What the node sent a silo counts against it for three load
//!    intervals after the move, by which time the target's published load
//!    shows it (`rebalance.rs` rule 1).
//! 4. Each decision is counted by reason when carried out or failed
//!    (`stats.rs` rule 4) and logged at debug level with its reason.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use futures_util::StreamExt;
use granary_actors::migration::MigrationTarget;

use super::Inner;
use crate::SiloId;
use crate::membership::DeviceLoad;
use crate::rebalance::{Candidate, Plan, Reason, RebalanceConfig, Snapshot, long_queue, plan};

/// What a node's rounds carry from one to the next.
#[derive(Default)]
struct Rounds {
    /// Rule 3: bytes sent, by target, and until when they count.
    sent: Vec<(SiloId, u64, Instant)>,
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
            if inner.draining.load(Ordering::Acquire) || inner.fence.is_fenced() {
                continue;
            }
            inner.rebalance_round(&config, &mut rounds).await;
        }
    }))
}

impl Inner {
    /// One round (rules 1 to 4).
    async fn rebalance_round(self: &Arc<Self>, config: &RebalanceConfig, rounds: &mut Rounds) {
        let now = Instant::now();
        self.moved_at
            .retain(|_, at| now.duration_since(*at) < config.cool_down);
        rounds.sent.retain(|(_, _, until)| *until > now);
        let Some(bridge) = &self.bridge else { return };
        let mine = DeviceLoad::of_bridge(bridge);
        rounds.long_queue = if long_queue(config, &mine) {
            rounds.long_queue.saturating_add(1)
        } else {
            0
        };
        let me = self.id();
        let mut view: Vec<_> = self.view().as_ref().clone();
        match view.iter_mut().find(|member| member.silo == me) {
            Some(member) => member.load.devices = mine,
            None => return,
        }
        let grains = self.rebalance_candidates();
        let mut sent: HashMap<SiloId, u64> = HashMap::new();
        for (to, bytes, _) in &rounds.sent {
            *sent.entry(to.clone()).or_default() += bytes;
        }
        let Plan { moves, shed } = plan(
            config,
            &Snapshot {
                me: &me,
                view: &view,
                grains: &grains,
                sent: &sent,
                long_queue_rounds: rounds.long_queue,
            },
        );
        let counts_until = now + self.config.load_interval.saturating_mul(3);
        let done: Vec<_> = futures_util::stream::iter(moves)
            .map(|decided| async move {
                let target = MigrationTarget::Silo(decided.to.to_string());
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
                moved.is_ok().then_some((decided.to, decided.bytes))
            })
            .buffer_unordered(config.moves_per_round)
            .collect()
            .await;
        rounds.sent.extend(
            done.into_iter()
                .flatten()
                .map(|(to, bytes)| (to, bytes, counts_until)),
        );
        for grain in shed {
            let shed = self
                .silo
                .deactivate_named(&grain.type_name, grain.key.clone())
                .await;
            if let Err(err) = &shed {
                tracing::debug!(%grain, error = %err, "deactivating a grain under device-memory pressure failed");
            } else {
                tracing::debug!(%grain, "deactivated a grain under device-memory pressure");
            }
            self.stats.rebalanced(Reason::Pressure, shed.is_ok());
        }
    }

    /// Rule 2: this node's grains the rebalancer may move.
    fn rebalance_candidates(&self) -> Vec<Candidate> {
        let now = Instant::now();
        let cool_down = self
            .config
            .rebalance
            .as_ref()
            .map(|config| config.cool_down)
            .unwrap_or_default();
        self.homes
            .iter()
            .filter(|home| home.owner.is_some() && home.moving.is_none() && !home.leaving)
            .filter_map(|home| {
                let grain = home.key();
                let bytes = self.needs.get(&grain.type_name)?.device_memory;
                if bytes == 0 || !self.home_side.is_migratable(&grain.type_name) {
                    return None;
                }
                let idle_for = self.silo.idle_for(grain)?;
                let cooling = self
                    .moved_at
                    .get(grain)
                    .is_some_and(|at| now.duration_since(*at) < cool_down);
                Some(Candidate {
                    grain: grain.clone(),
                    bytes,
                    idle_for,
                    cooling,
                })
            })
            .collect()
    }
}
