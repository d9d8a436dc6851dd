//! The rebalancer's decisions: which GPU grains a silo moves (away, or
//! between its own devices), where, and why, from the cluster's gossiped
//! load. A pure function of what it is
//! given ([`plan`]): the node feeds it each round and carries the moves out
//! (`node/rebalance.rs`); tests build views by hand.
//!
//! # Rules
//!
//! 1. **Each silo decides for its own grains.** A silo moves only grains
//!    whose home it is, to silos that host their type and are neither
//!    leaving nor fenced. Its own devices are read fresh; other silos'
//!    from their last published load, plus what this silo sent them since
//!    that load could have counted it.
//! 2. **Used memory** of a device is what is settled on it
//!    ([`DeviceLoad::settled_memory`]: `total - free`, less requests'
//!    working memory, which comes and goes with each request and would
//!    make decisions chase noise); of a silo, the sum over its devices but
//!    a CPU fallback device beside others (GPU grains live on the others).
//!    A grain weighs the device memory its type declares. Fractions are of
//!    the device's or silo's total.
//! 3. **High water.** When one of this silo's devices holds more than
//!    `high_water` of its memory, the silo moves grains on that device
//!    until what they weigh covers its excess down to `high_water -
//!    hysteresis`: to another of its own devices that stays within rule
//!    6's fill limit first (the cheapest move: no network, and the
//!    activation stays, `node/migration.rs` rule 7), the emptiest such;
//!    else away. A grain counts against the device its buffers are on;
//!    one whose device is not known, only on a silo of one device (and it
//!    only moves away).
//! 4. **Spread.** Otherwise, when this silo is above the cluster's mean
//!    fraction (over the silos that host its grains' types) and more than
//!    `margin` above the emptiest of them (a silo that just joined with
//!    free memory), it moves its excess over the mean to the silos below
//!    the mean, each taking a share in proportion to its deficit. Every
//!    silo above the mean does the same from its view of the cluster, so
//!    where their views agree (the same hosted types, nothing sent but
//!    not yet shown) they fill each deficit and no more, and otherwise
//!    rule 6's fill limit bounds what a target takes. A grain moves only
//!    when more
//!    than half of it is due from here and to there, so two silos a grain
//!    apart trade nothing; once all are within `margin`, nothing moves
//!    (the hysteresis that stops oscillation).
//! 5. **Queue.** Otherwise, when one of this silo's devices has had at
//!    least `queue_depth` requests waiting for `queue_rounds` rounds in a
//!    row while another device with the same backend and at least as many
//!    compute units has none, the silo moves its busiest grain (idle
//!    shortest) there, one per round: the busiest grain on a busy device
//!    to such a device of its own first, else its busiest grain to such
//!    a device of another silo.
//! 6. **Never oversubscribe, never twice.** A silo never plans a move that
//!    takes a target (a silo, or a device of its own) past `high_water -
//!    hysteresis` of its memory, nor past its memory. A target silo's
//!    reservation then checks its room (`DeviceLoad::room`, less what it
//!    promised) and its high water mark
//!    again (rule 1 of `node/migration.rs`), so silos deciding at once may
//!    together fill a target up to high water, never past it; a move
//!    between a silo's own devices reserves the bytes on the device
//!    before copying (rule 7 there), and only this silo decides for them.
//!    No grain that moved within `cool_down` moves again, and one whose
//!    move between this silo's devices failed moves only away for that
//!    long, and one whose move to another silo failed lately (`away`
//!    false, `node/rebalance.rs` rule 6) moves only between this silo's
//!    devices for a few rounds (past high water, it counts as a grain that
//!    cannot move, rule 7); at most
//!    `moves_per_round` moves a round; grains idle longest go first for
//!    memory (rules 3 and 4), those idle alike in the order given. A grain
//!    never moves mid-turn: a departure happens between turns
//!    (`granary_actors::migration`).
//! 7. **Pressure.** When rule 3's excess cannot all move (no target has
//!    room, the grain's type is not migratable, or its move to another
//!    silo failed lately and no device here takes it; a grain that may move
//!    but is past the round's `moves_per_round` waits for the next round
//!    instead), grains on that device
//!    idle at least `shed_idle` are deactivated, oldest idle first, at
//!    most `moves_per_round` a round, until the rest is covered: they
//!    write their state and free their memory, and their next call
//!    activates them wherever they fit. Grains cooling down after a move
//!    are not shed. A new GPU grain that would take a device past
//!    `high_water` is not made home there (rule 5 of `node/mod.rs`): it
//!    goes elsewhere.

use std::collections::HashMap;
use std::time::Duration;

use granary_actors::GrainId;

use crate::SiloId;
use crate::membership::{DeviceLoad, Member};
use crate::placement::GpuNeeds;

/// The rebalancer's settings (`NodeConfig::rebalance`).
#[derive(Debug, Clone, PartialEq)]
pub struct RebalanceConfig {
    /// How often a silo decides (default 5 s).
    pub interval: Duration,
    /// The fraction of a device's memory past which its silo sheds grains
    /// and takes no new GPU grain (rule 3 and 7; default 0.9).
    pub high_water: f64,
    /// How far below `high_water` a shedding silo goes, and how far below
    /// it a move may fill a target (rules 3 and 6; default 0.1).
    pub hysteresis: f64,
    /// How far above the emptiest silo a silo above the mean may be before
    /// it spreads its grains (rule 4; default 0.15).
    pub margin: f64,
    /// Requests waiting on a device that count as a long queue (rule 5;
    /// default 32).
    pub queue_depth: u64,
    /// Rounds in a row a queue must stay long (rule 5; default 3).
    pub queue_rounds: u32,
    /// The most moves a silo starts in one round (rule 6; default 4).
    pub moves_per_round: usize,
    /// How long a grain that moved stays put (rule 6; default 60 s).
    pub cool_down: Duration,
    /// How long a grain must have been idle before pressure deactivates it
    /// (rule 7; default 30 s).
    pub shed_idle: Duration,
}

impl Default for RebalanceConfig {
    fn default() -> RebalanceConfig {
        RebalanceConfig {
            interval: Duration::from_secs(5),
            high_water: 0.9,
            hysteresis: 0.1,
            margin: 0.15,
            queue_depth: 32,
            queue_rounds: 3,
            moves_per_round: 4,
            cool_down: Duration::from_secs(60),
            shed_idle: Duration::from_secs(30),
        }
    }
}

impl RebalanceConfig {
    /// Refuses settings the rules cannot work with.
    pub fn validate(&self) -> Result<(), String> {
        let fraction = |name: &str, value: f64| {
            if value.is_finite() && (0.0..=1.0).contains(&value) {
                Ok(())
            } else {
                Err(format!("{name} must be between 0 and 1, not {value}"))
            }
        };
        fraction("high_water", self.high_water)?;
        fraction("hysteresis", self.hysteresis)?;
        fraction("margin", self.margin)?;
        if self.high_water == 0.0 {
            return Err("high_water must be more than 0: at 0 no silo takes a GPU grain".into());
        }
        if self.hysteresis >= self.high_water {
            return Err(format!(
                "hysteresis ({}) must be below high_water ({}): a move may fill a target up to \
                 their difference",
                self.hysteresis, self.high_water
            ));
        }
        if self.interval.is_zero() {
            return Err("interval must be more than zero".into());
        }
        if self.moves_per_round == 0 {
            return Err("moves_per_round must be at least 1".into());
        }
        if self.queue_depth == 0 || self.queue_rounds == 0 {
            return Err("queue_depth and queue_rounds must be at least 1".into());
        }
        Ok(())
    }

    /// Whether a device with `used` of `total` bytes is past the high
    /// water mark (rule 3).
    pub fn past_high_water(&self, used: u64, total: u64) -> bool {
        total > 0 && used as f64 > self.high_water * total as f64
    }

    /// The most a target may hold after a move (rule 6), in bytes.
    fn fill_limit(&self, total: u64) -> f64 {
        (self.high_water - self.hysteresis) * total as f64
    }

    /// Rule 6: whether `bytes` more on a target holding `used` of `total`
    /// keeps it within the fill limit and its memory.
    fn room_for(&self, used: u64, total: u64, bytes: u64) -> bool {
        let after = used.saturating_add(bytes);
        after as f64 <= self.fill_limit(total) && after <= total
    }
}

/// Why a grain moves (rules 3 to 5), or is deactivated (rule 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// A device here is past the high water mark.
    HighWater,
    /// This silo is above the cluster's mean and more than the margin
    /// above the emptiest silo.
    Spread,
    /// A device's queue stays long while a like device elsewhere is idle.
    Queue,
    /// Past the high water mark with nowhere to move: deactivated.
    Pressure,
}

impl Reason {
    /// Every reason, in the order of `ClusterStats::rebalance`.
    pub const ALL: [Reason; 4] = [
        Reason::HighWater,
        Reason::Spread,
        Reason::Queue,
        Reason::Pressure,
    ];

    /// The reason as a metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::HighWater => "high_water",
            Reason::Spread => "spread",
            Reason::Queue => "queue",
            Reason::Pressure => "pressure",
        }
    }
}

/// A grain this silo could move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The grain.
    pub grain: GrainId,
    /// The device memory its type declares.
    pub bytes: u64,
    /// How long its activation has been idle.
    pub idle_for: Duration,
    /// Whether it moved within the cool-down (rule 6).
    pub cooling: bool,
    /// The index of the device its buffers are on, if known (rule 3).
    pub device: Option<usize>,
    /// Whether its type may migrate; one that may not is only ever
    /// deactivated (rule 7).
    pub movable: bool,
    /// Whether it may move between this silo's devices: not while a
    /// failed move of it there is within the cool-down (rule 6), so that
    /// it moves away instead.
    pub local: bool,
    /// Whether it may move to another silo: not for a few rounds after a
    /// failed move of it there (rule 6), so that others are tried; past
    /// high water it then counts as a grain that cannot move (rule 7).
    pub away: bool,
}

/// What a round decides from.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot<'a> {
    /// This silo.
    pub me: &'a SiloId,
    /// The live view, this silo's own devices read fresh (rule 1).
    pub view: &'a [Member],
    /// This silo's GPU grains that may move.
    pub grains: &'a [Candidate],
    /// Bytes this silo sent each silo that its published load may not
    /// count yet (rule 1).
    pub sent: &'a HashMap<SiloId, u64>,
    /// Rounds in a row one of this silo's devices has had a long queue
    /// (rule 5), counted by the caller with [`long_queue`].
    pub long_queue_rounds: u32,
    /// What each grain type needs of a device, for moves between this
    /// silo's devices (rules 3 and 5); a type not here needs nothing.
    pub needs: &'a HashMap<String, GpuNeeds>,
}

/// Where a move goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Away, to this silo.
    Silo(SiloId),
    /// To this device of the deciding silo (rules 3 and 5).
    Device(usize),
}

impl Destination {
    /// The silo of a move away.
    pub fn silo(&self) -> Option<&SiloId> {
        match self {
            Destination::Silo(silo) => Some(silo),
            Destination::Device(_) => None,
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Silo(silo) => write!(f, "silo {silo}"),
            Destination::Device(device) => write!(f, "device {device} here"),
        }
    }
}

/// One move decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// The grain.
    pub grain: GrainId,
    /// Where it goes.
    pub to: Destination,
    /// What it weighs.
    pub bytes: u64,
    /// Why.
    pub reason: Reason,
}

/// What a round decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Grains to move.
    pub moves: Vec<Move>,
    /// Grains to deactivate (rule 7).
    pub shed: Vec<GrainId>,
}

/// Whether one of `devices` has a long queue (rule 5).
pub fn long_queue(config: &RebalanceConfig, devices: &[DeviceLoad]) -> bool {
    devices
        .iter()
        .any(|device| device.queue_depth >= config.queue_depth)
}

fn used(device: &DeviceLoad) -> u64 {
    device.settled_memory()
}

/// A silo that may take grains, as this round sees it (rules 1 and 2).
struct Target<'a> {
    member: &'a Member,
    total: u64,
    used: u64,
    /// Rule 4: its share of this silo's excess still to fill.
    share: f64,
}

impl Target<'_> {
    fn fraction(&self) -> f64 {
        self.used as f64 / self.total as f64
    }

    /// Rule 6: whether `bytes` more keeps it below the fill limit and
    /// within its memory.
    fn takes(&self, config: &RebalanceConfig, grain: &GrainId, bytes: u64) -> bool {
        self.member.load.grain_types.contains(&grain.type_name)
            && config.room_for(self.used, self.total, bytes)
    }
}

/// One of this silo's devices, as a target of a move between them (rules
/// 3 and 5).
struct LocalDevice {
    index: usize,
    used: u64,
    total: u64,
}

impl LocalDevice {
    /// Rule 6: whether `bytes` more keeps it below the fill limit and
    /// within its memory.
    fn takes(&self, config: &RebalanceConfig, bytes: u64) -> bool {
        config.room_for(self.used, self.total, bytes)
    }
}

/// The emptiest of `local` but device `from` that takes `bytes` and
/// `suits` (rule 3).
fn emptiest_but<'a>(
    config: &RebalanceConfig,
    local: &'a mut [LocalDevice],
    from: usize,
    bytes: u64,
    suits: impl Fn(usize) -> bool,
) -> Option<&'a mut LocalDevice> {
    local
        .iter_mut()
        .filter(|device| device.index != from && device.takes(config, bytes) && suits(device.index))
        .min_by(|a, b| {
            (a.used as f64 / a.total as f64).total_cmp(&(b.used as f64 / b.total as f64))
        })
}

/// Whether `device`, of this silo, is of the backend and has the compute
/// units `candidate`'s type needs (rules 3 and 5).
fn suits(snapshot: &Snapshot<'_>, candidate: &Candidate, device: &DeviceLoad) -> bool {
    snapshot
        .needs
        .get(&candidate.grain.type_name)
        .is_none_or(|needs| needs.suits(device))
}

/// The devices of `devices` that are weighed (rule 2): all but a CPU
/// fallback device beside other devices (GPU grains live on the others).
fn weighed(devices: &[DeviceLoad]) -> impl Iterator<Item = (usize, &DeviceLoad)> {
    let only_cpu = devices.iter().all(|device| device.backend == "Cpu");
    devices
        .iter()
        .enumerate()
        .filter(move |(_, device)| only_cpu || device.backend != "Cpu")
}

/// Used and total bytes of a silo's `devices`, as the rebalancer weighs
/// them (rule 2).
pub fn silo_fill(devices: &[DeviceLoad]) -> (u64, u64) {
    weighed(devices).fold((0u64, 0u64), |(used, total), (_, device)| {
        (
            used.saturating_add(device.settled_memory()),
            total.saturating_add(device.total_memory),
        )
    })
}

/// The index of a silo's one weighed device, if it has one (rule 3: where
/// a grain whose device is not known counts).
pub(crate) fn single_weighed(devices: &[DeviceLoad]) -> Option<usize> {
    let mut weighed = weighed(devices);
    match (weighed.next(), weighed.next()) {
        (Some((index, _)), None) => Some(index),
        _ => None,
    }
}

/// Decides this round's moves and deactivations (rules 1 to 7).
pub fn plan(config: &RebalanceConfig, snapshot: &Snapshot<'_>) -> Plan {
    let mut plan = Plan::default();
    let Some(me) = snapshot
        .view
        .iter()
        .find(|member| member.silo == *snapshot.me)
    else {
        return plan;
    };
    let mine = &me.load.devices;
    let (my_used, my_total) = silo_fill(mine);
    if my_total == 0 {
        return plan;
    }
    // Grains idle longest first (rule 6), cooling ones left out; those
    // that cannot move may only be deactivated (rule 7).
    let mut eligible: Vec<&Candidate> = snapshot
        .grains
        .iter()
        .filter(|candidate| !candidate.cooling)
        .collect();
    eligible.sort_by_key(|candidate| std::cmp::Reverse(candidate.idle_for));
    let movable: Vec<&Candidate> = eligible
        .iter()
        .copied()
        .filter(|candidate| candidate.movable)
        .collect();
    // Rule 1: the silos that may take grains: hosting a type of this
    // silo's movable grains, neither leaving nor fenced.
    let hosted = |member: &Member| {
        movable
            .iter()
            .any(|candidate| member.load.grain_types.contains(&candidate.grain.type_name))
    };
    let mut targets: Vec<Target<'_>> = snapshot
        .view
        .iter()
        .filter(|member| {
            member.silo != *snapshot.me
                && !member.load.leaving
                && !member.load.fenced
                && hosted(member)
        })
        .filter_map(|member| {
            let (used, total) = silo_fill(&member.load.devices);
            let sent = snapshot.sent.get(&member.silo).copied().unwrap_or(0);
            (total > 0).then_some(Target {
                member,
                total,
                used: used.saturating_add(sent).min(total),
                share: 0.0,
            })
        })
        .collect();

    // Rule 3: each device past high water, and its excess. A grain counts
    // against the device its buffers are on; one whose device is not known
    // only on a silo of one weighed device.
    let mut excess: HashMap<usize, f64> = weighed(mine)
        .filter(|(_, device)| config.past_high_water(used(device), device.total_memory))
        .map(|(index, device)| {
            (
                index,
                used(device) as f64 - config.fill_limit(device.total_memory),
            )
        })
        .collect();
    // This silo's own devices, as targets of moves between them.
    let mut local: Vec<LocalDevice> = weighed(mine)
        .map(|(index, device)| LocalDevice {
            index,
            used: used(device),
            total: device.total_memory,
        })
        .collect();
    if !excess.is_empty() {
        let single = single_weighed(mine);
        let mut unplaced = Vec::new();
        for candidate in &eligible {
            let Some(device) = candidate.device.or(single) else {
                continue;
            };
            let Some(left) = excess.get_mut(&device).filter(|left| **left > 0.0) else {
                continue;
            };
            if !candidate.movable {
                unplaced.push((*candidate, device));
                continue;
            }
            // Past the round's moves, a grain that may move waits for the
            // next round rather than being shed.
            if plan.moves.len() >= config.moves_per_round {
                continue;
            }
            // The emptiest other device here that takes it, first.
            let here = candidate
                .device
                .filter(|_| candidate.local)
                .and_then(|from| {
                    emptiest_but(config, &mut local, from, candidate.bytes, |index| {
                        suits(snapshot, candidate, &mine[index])
                    })
                });
            if let Some(to) = here {
                to.used += candidate.bytes;
                *left -= candidate.bytes as f64;
                plan.moves.push(Move {
                    grain: candidate.grain.clone(),
                    to: Destination::Device(to.index),
                    bytes: candidate.bytes,
                    reason: Reason::HighWater,
                });
                continue;
            }
            // One whose move away failed lately cannot move: rule 7 sheds
            // it if it is idle long enough (rule 6).
            if !candidate.away {
                unplaced.push((*candidate, device));
                continue;
            }
            // The emptiest target that takes it.
            let best = targets
                .iter_mut()
                .filter(|target| target.takes(config, &candidate.grain, candidate.bytes))
                .min_by(|a, b| a.fraction().total_cmp(&b.fraction()));
            match best {
                Some(target) => {
                    target.used += candidate.bytes;
                    *left -= candidate.bytes as f64;
                    plan.moves.push(Move {
                        grain: candidate.grain.clone(),
                        to: Destination::Silo(target.member.silo.clone()),
                        bytes: candidate.bytes,
                        reason: Reason::HighWater,
                    });
                }
                None => unplaced.push((*candidate, device)),
            }
        }
        // Rule 7: what could not move, idle long enough, is deactivated.
        for (candidate, device) in unplaced {
            if plan.shed.len() >= config.moves_per_round {
                break;
            }
            let Some(left) = excess.get_mut(&device).filter(|left| **left > 0.0) else {
                continue;
            };
            if candidate.idle_for >= config.shed_idle {
                *left -= candidate.bytes as f64;
                plan.shed.push(candidate.grain.clone());
            }
        }
        return plan;
    }

    // Rule 4: spread over the cluster's mean.
    let all_used = targets
        .iter()
        .fold(my_used, |sum, target| sum.saturating_add(target.used));
    let all_total = targets
        .iter()
        .fold(my_total, |sum, target| sum.saturating_add(target.total));
    let mean = all_used as f64 / all_total as f64;
    let my_fraction = my_used as f64 / my_total as f64;
    let emptiest = targets
        .iter()
        .map(Target::fraction)
        .min_by(f64::total_cmp)
        .unwrap_or(my_fraction);
    if my_fraction > mean && my_fraction - emptiest > config.margin {
        let my_excess = my_used as f64 - mean * my_total as f64;
        let deficit =
            |target: &Target<'_>| (mean * target.total as f64 - target.used as f64).max(0.0);
        let deficits: f64 = targets.iter().map(deficit).sum();
        if deficits > 0.0 {
            for target in &mut targets {
                target.share = my_excess * deficit(target) / deficits;
            }
            let mut left = my_excess;
            for candidate in movable.iter().filter(|candidate| candidate.away) {
                if plan.moves.len() >= config.moves_per_round {
                    break;
                }
                let half = candidate.bytes as f64 / 2.0;
                // A whole grain moves when more than half of it is due
                // here and there: strictly, so that two silos a grain
                // apart do not trade one back and forth.
                if left <= half {
                    continue;
                }
                let best = targets
                    .iter_mut()
                    .filter(|target| {
                        target.share > half
                            && target.takes(config, &candidate.grain, candidate.bytes)
                    })
                    .max_by(|a, b| a.share.total_cmp(&b.share));
                if let Some(target) = best {
                    target.used += candidate.bytes;
                    target.share -= candidate.bytes as f64;
                    left -= candidate.bytes as f64;
                    plan.moves.push(Move {
                        grain: candidate.grain.clone(),
                        to: Destination::Silo(target.member.silo.clone()),
                        bytes: candidate.bytes,
                        reason: Reason::Spread,
                    });
                }
            }
        }
        if !plan.moves.is_empty() {
            return plan;
        }
    }

    // Rule 5: a long queue here, an idle like device there.
    if snapshot.long_queue_rounds >= config.queue_rounds {
        let busy: Vec<&DeviceLoad> = mine
            .iter()
            .filter(|device| device.queue_depth >= config.queue_depth)
            .collect();
        // Between this silo's devices first: the busiest grain on a busy
        // device, to an idle like device here with room.
        let mut on_busy: Vec<&Candidate> = movable
            .iter()
            .copied()
            .filter(|candidate| {
                candidate.local
                    && candidate
                        .device
                        .and_then(|device| mine.get(device))
                        .is_some_and(|device| device.queue_depth >= config.queue_depth)
            })
            .collect();
        on_busy.sort_by_key(|candidate| candidate.idle_for);
        for candidate in on_busy {
            let Some(from) = candidate.device.and_then(|device| mine.get(device)) else {
                continue;
            };
            let idle_like = |index: usize| {
                mine.get(index).is_some_and(|theirs| {
                    theirs.queue_depth == 0
                        && theirs.backend == from.backend
                        && theirs.compute_units >= from.compute_units
                })
            };
            let to = local.iter().find(|to| {
                idle_like(to.index)
                    && to.takes(config, candidate.bytes)
                    && suits(snapshot, candidate, &mine[to.index])
            });
            if let Some(to) = to {
                plan.moves.push(Move {
                    grain: candidate.grain.clone(),
                    to: Destination::Device(to.index),
                    bytes: candidate.bytes,
                    reason: Reason::Queue,
                });
                return plan;
            }
        }
        let like_and_idle = |target: &Target<'_>| {
            target.member.load.devices.iter().any(|theirs| {
                theirs.queue_depth == 0
                    && busy.iter().any(|ours| {
                        theirs.backend == ours.backend && theirs.compute_units >= ours.compute_units
                    })
            })
        };
        // The busiest grain that may move away: idle shortest.
        if let Some(candidate) = movable
            .iter()
            .filter(|candidate| candidate.away)
            .min_by_key(|candidate| candidate.idle_for)
        {
            if let Some(target) = targets.iter().find(|target| {
                like_and_idle(target) && target.takes(config, &candidate.grain, candidate.bytes)
            }) {
                plan.moves.push(Move {
                    grain: candidate.grain.clone(),
                    to: Destination::Silo(target.member.silo.clone()),
                    bytes: candidate.bytes,
                    reason: Reason::Queue,
                });
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests;
