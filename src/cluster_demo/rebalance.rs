//! `granary demo --nodes N --rebalance`: the rebalancer at work
//! (`granary_cluster::rebalance`).
//!
//! 1. Starts `N - 1` silo processes with small device shares, every one
//!    with a rebalancer, and fills them with ledgers up to the high water
//!    mark (a silo past it takes no new GPU grain), less a step's working
//!    memory: 20 ledgers of 4 MiB in 96 MiB.
//! 2. Keeps every ledger busy (sequential `Apply`s, each notifying its
//!    auditor) and prints, twice a second, each silo's settled device
//!    memory (resident buffers, not steps' working memory) as the
//!    cluster's gossip shows it, and the moves seen so far (a
//!    ledger's answer names the silo it ran on: a change is a move).
//! 3. Starts the last silo, empty. The full silos move ledgers to it,
//!    with their persisted state and resident buffers, until every silo is
//!    within the margin of the others; then nothing moves (each ledger
//!    that moved stays put for the cool-down).
//! 4. Stops the load and checks, as the main cluster demo does, that every
//!    acknowledged step is in its ledger's persisted total and in its
//!    auditor's counts, and that no ledger is active on two silos.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use granary_cluster::ClusterNode;
use granary_cluster::rebalance::silo_fill;

use super::grains::{
    AUDITORS, Apply, Audit, Auditor, LEDGER_DEVICE_BYTES, Ledger, Read, auditor_of,
};
use super::run::{DemoCluster, census};
use crate::node_file::{DeviceBackend, NodeRunError, RebalanceFile, Signals};

/// Device memory each silo lends, in MiB: 24 ledgers' worth, so that the
/// tenth left free above the high water mark holds a step's working
/// memory.
pub const SILO_MIB: u64 = 24 * (LEDGER_DEVICE_BYTES >> 20);

/// Ledgers per silo at the start: what fits below the high water mark
/// (90%) with a ledger to spare, and room left for a step's working
/// memory (a SAXPY over a ledger's buffer reserves its request, two
/// buffers' worth and its scalar, while it runs).
const LEDGERS_PER_SILO: u32 = 20;

/// How long a step may go unacknowledged before the demo reports it lost.
pub(super) const STEP_DEADLINE: Duration = Duration::from_secs(30);

/// How far apart the silos may end, in points of used memory.
pub const SPREAD_GOAL: f64 = 20.0;

/// How a rebalance demo runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebalanceDemoConfig {
    /// Silo processes in the end (at least 2: the last one joins later).
    pub nodes: u32,
    /// The silos' device backend.
    pub backend: DeviceBackend,
    /// etcd endpoints, as for the main cluster demo.
    pub etcd: Option<Vec<String>>,
}

/// One line of the table: when, each silo's used device memory in points
/// (`None`: not in the cluster yet), and the moves seen so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Since the load began.
    pub at: Duration,
    /// Per silo, in start order.
    pub used: Vec<Option<f64>>,
    /// Ledger moves seen so far.
    pub moves: u64,
}

impl Sample {
    /// The spread between the fullest and emptiest silo, infinite while a
    /// silo is not in the cluster.
    pub fn spread(&self) -> f64 {
        if self.used.is_empty() || self.used.iter().any(Option::is_none) {
            return f64::INFINITY;
        }
        let used: Vec<f64> = self.used.iter().flatten().copied().collect();
        used.iter().cloned().fold(f64::MIN, f64::max)
            - used.iter().cloned().fold(f64::MAX, f64::min)
    }
}

impl std::fmt::Display for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:>7.1} s", self.at.as_secs_f64())?;
        for used in &self.used {
            match used {
                Some(points) => write!(f, " {points:>8.0}%")?,
                None => write!(f, " {:>9}", "-")?,
            }
        }
        write!(f, " {:>7}", self.moves)
    }
}

/// What a rebalance demo saw and checked.
#[derive(Debug, Clone)]
pub struct RebalanceDemoReport {
    /// The silos' addresses, in start order.
    pub silos: Vec<String>,
    /// The table: every sample taken.
    pub samples: Vec<Sample>,
    /// Ledgers seen to move (an answer named another silo than the one
    /// before), and how many times each.
    pub moved: HashMap<u64, u64>,
    /// Steps acknowledged, each ledger's first (placing it) included.
    pub calls: u64,
    /// Calls retried.
    pub retried: u64,
    /// Ledgers and auditors whose persisted state misses an acknowledged
    /// step.
    pub lost: Vec<String>,
    /// Grains active on two silos, and silos the census could not reach.
    pub duplicates: Vec<String>,
}

impl RebalanceDemoReport {
    /// The spread at the end.
    pub fn final_spread(&self) -> f64 {
        self.samples.last().map_or(f64::MAX, Sample::spread)
    }

    /// Whether it did what it shows: ledgers moved, every silo ended in the
    /// cluster and the one that joined holds ledgers, the spread closed
    /// below [`SPREAD_GOAL`], none moved twice, nothing was lost, and no
    /// grain was active on two silos.
    pub fn passed(&self) -> bool {
        let joined_holds = self
            .samples
            .last()
            .and_then(|last| last.used.last().copied().flatten())
            .is_some_and(|points| points > 0.0);
        !self.moved.is_empty()
            && joined_holds
            && self.final_spread() < SPREAD_GOAL
            && self.moved.values().all(|times| *times == 1)
            && self.lost.is_empty()
            && self.duplicates.is_empty()
    }
}

impl std::fmt::Display for RebalanceDemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let moves: u64 = self.moved.values().sum();
        writeln!(
            f,
            "{} ledgers moved ({moves} moves, none twice: {}); used device memory now spread over {:.0} points (goal: under {SPREAD_GOAL:.0})",
            self.moved.len(),
            self.moved.values().all(|times| *times == 1),
            self.final_spread()
        )?;
        writeln!(
            f,
            "{} calls acknowledged ({} retried after a failure) while ledgers moved",
            self.calls, self.retried
        )?;
        if self.lost.is_empty() {
            writeln!(
                f,
                "every acknowledged step is in its ledger's persisted total and its auditor's counts"
            )?;
        } else {
            writeln!(f, "LOST: {}", self.lost.join("; "))?;
        }
        if self.duplicates.is_empty() {
            writeln!(f, "census: no grain active on two silos")?;
        } else {
            writeln!(f, "CENSUS: {}", self.duplicates.join("; "))?;
        }
        writeln!(f, "{}", if self.passed() { "PASS" } else { "FAIL" })
    }
}

/// The table's header for `silos`.
pub fn header(silos: u32) -> String {
    let mut line = format!("{:>9}", "time");
    for n in 1..=silos {
        line.push_str(&format!(" {:>9}", format!("silo {n}")));
    }
    line.push_str(&format!(" {:>7}", "moves"));
    line
}

/// Each silo's used device memory in points, as `node`'s view shows it and
/// the rebalancer weighs it: what is settled there (ledgers' buffers), not
/// steps' working memory, on the ledgers' devices (not a CPU fallback).
fn used(node: &ClusterNode, silos: &[(String, u64)], count: usize) -> Vec<Option<f64>> {
    let members = node.members();
    (0..count)
        .map(|n| {
            let (address, _) = silos.get(n)?;
            let member = members.iter().find(|m| m.silo.address == *address)?;
            let (settled, total) = silo_fill(&member.load.devices);
            (total > 0).then(|| 100.0 * settled as f64 / total as f64)
        })
        .collect()
}

/// Runs the rebalance demo (see the module docs); `row` gets each line of
/// the table as it is taken, the header first. Drive it from a thread that
/// outlives the run (`Runtime::block_on`'s caller): on Linux its silos
/// die with that thread (the module docs).
pub async fn run_rebalance_demo(
    config: RebalanceDemoConfig,
    row: impl Fn(&str) + Send + Sync + 'static,
) -> Result<RebalanceDemoReport, NodeRunError> {
    if config.nodes < 2 {
        return Err(NodeRunError(
            "the rebalance demo needs at least 2 nodes: the last one joins later".into(),
        ));
    }
    let mut signals = Signals::new()?;
    // Nothing is killed here: the default grace before a silent silo is
    // declared dead, so that a loaded machine takes none for dead.
    let cluster = DemoCluster::new(config.etcd.as_ref(), None)?;
    cluster
        .run(
            &mut signals,
            async move |cluster: &mut DemoCluster| demo(cluster, config, row).await,
            RebalanceDemoReport::passed,
        )
        .await
}

/// The rebalance demo on `cluster` once it is made: the first silos
/// filled, the last one joined, the moves watched and the checks.
async fn demo(
    cluster: &mut DemoCluster,
    config: RebalanceDemoConfig,
    row: impl Fn(&str) + Send + Sync + 'static,
) -> Result<RebalanceDemoReport, NodeRunError> {
    let rebalance = RebalanceFile {
        interval_ms: Some(500),
        // Ledgers stay active throughout: none is shed.
        shed_idle_secs: Some(3_600),
        ..RebalanceFile::default()
    };
    for _ in 1..config.nodes {
        cluster.start_silo(config.backend, SILO_MIB, Some(rebalance.clone()))?;
    }
    let node = cluster.join().await?;
    cluster.formed(&node).await?;
    // 1. Fill the first silos, one ledger at a time (first calls made
    // together are promised memory conservatively).
    let ledgers = LEDGERS_PER_SILO * (config.nodes - 1);
    for ledger in 0..u64::from(ledgers) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match node
                .grain::<Ledger>(ledger)
                .call(Apply { seq: 1, amount: 1 })
                .await
            {
                Ok(Ok(applied)) if applied.state.applied >= 1 => break,
                other if Instant::now() > deadline => {
                    return Err(NodeRunError(format!(
                        "ledger {ledger} could not be placed: {other:?} (used device memory per \
                         silo: {:?}); the silos' logs are in {}",
                        used(&node, &cluster.silos, cluster.silos.len()),
                        cluster.dir().display()
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    // 2. Every ledger busy: one caller each, stepping it in order.
    let stop = Arc::new(AtomicBool::new(false));
    let retried = Arc::new(AtomicU64::new(0));
    let moves = Arc::new(AtomicU64::new(0));
    let moved: Arc<std::sync::Mutex<HashMap<u64, u64>>> = Arc::default();
    let drivers: Vec<_> = (0..u64::from(ledgers))
        .map(|key| {
            let (node, stop, retried, moves, moved) = (
                node.clone(),
                stop.clone(),
                retried.clone(),
                moves.clone(),
                moved.clone(),
            );
            tokio::spawn(async move {
                let ledger = node.grain::<Ledger>(key);
                let mut last_silo: Option<String> = None;
                let mut acked = 1;
                while !stop.load(Ordering::Acquire) {
                    let seq = acked + 1;
                    let apply = Apply { seq, amount: seq };
                    // A step unanswered for this long is lost, and said so.
                    let deadline = Instant::now() + STEP_DEADLINE;
                    loop {
                        match ledger.call(apply).await {
                            Ok(Ok(applied)) if applied.state.applied >= seq => {
                                if let Some(notice) = applied.notified {
                                    if last_silo
                                        .as_ref()
                                        .is_some_and(|was| *was != notice.ledger_silo)
                                    {
                                        moves.fetch_add(1, Ordering::Relaxed);
                                        if let Ok(mut moved) = moved.lock() {
                                            *moved.entry(key).or_default() += 1;
                                        }
                                    }
                                    last_silo = Some(notice.ledger_silo);
                                }
                                break;
                            }
                            other if Instant::now() > deadline => {
                                let lost = format!(
                                    "ledger {key}: step {seq} not acknowledged in \
                                     {STEP_DEADLINE:?}: {other:?}"
                                );
                                return (acked, Some(lost));
                            }
                            other => {
                                if std::env::var_os("GRANARY_DEMO_DEBUG").is_some() {
                                    eprintln!("ledger {key} seq {seq}: {other:?}");
                                }
                                retried.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                    acked = seq;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (acked, None)
            })
        })
        .collect();
    row(&header(config.nodes));
    let started = Instant::now();
    let mut samples = Vec::new();
    let sample = |samples: &mut Vec<Sample>, cluster: &DemoCluster| {
        let taken = Sample {
            at: started.elapsed(),
            used: used(&node, &cluster.silos, config.nodes as usize),
            moves: moves.load(Ordering::Relaxed),
        };
        row(&taken.to_string());
        samples.push(taken);
    };
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        sample(&mut samples, cluster);
    }
    // 3. The last silo joins, empty.
    cluster.start_silo(config.backend, SILO_MIB, Some(rebalance))?;
    cluster.formed(&node).await?;
    // Until the spread has closed and three samples in a row saw no move,
    // for at most 40 s.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut quiet = 0;
    let mut last_moves = moves.load(Ordering::Relaxed);
    while quiet < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        sample(&mut samples, cluster);
        let now = moves.load(Ordering::Relaxed);
        let settled = samples.last().is_some_and(|s| s.spread() < SPREAD_GOAL);
        quiet = if settled && now == last_moves {
            quiet + 1
        } else {
            0
        };
        last_moves = now;
    }
    // 4. Stop, then check what was acknowledged.
    stop.store(true, Ordering::Release);
    let mut acked = Vec::new();
    let mut lost = Vec::new();
    for driver in drivers {
        let (steps, unanswered) = driver
            .await
            .map_err(|err| NodeRunError(format!("a caller failed: {err}")))?;
        acked.push(steps);
        lost.extend(unanswered);
    }
    for (key, acked) in acked.iter().enumerate() {
        let want = acked * (acked + 1) / 2;
        match node.grain::<Ledger>(key as u64).call(Read).await {
            Ok(state) if state.applied == *acked && state.total == want => {}
            Ok(state) => lost.push(format!(
                "ledger {key}: {state:?}, {acked} steps acknowledged"
            )),
            Err(err) => lost.push(format!("ledger {key}: {err}")),
        }
    }
    let auditors = AUDITORS.min(u64::from(ledgers));
    for auditor in 0..auditors {
        match node.grain::<Auditor>(auditor).call(Audit).await {
            Ok(audit) => {
                for (key, acked) in acked.iter().enumerate() {
                    let key = key as u64;
                    if auditor_of(key) != auditor {
                        continue;
                    }
                    let entry = audit.ledgers.get(&key).copied().unwrap_or_default();
                    if entry.notes != *acked || entry.last_seq != *acked {
                        lost.push(format!("auditor {auditor}, ledger {key}: {entry:?}"));
                    }
                }
            }
            Err(err) => lost.push(format!("auditor {auditor}: {err}")),
        }
    }
    let (_, duplicates) = census(&node, &cluster.silos, "", ledgers, auditors).await;
    let report = RebalanceDemoReport {
        silos: cluster.silos.iter().map(|(silo, _)| silo.clone()).collect(),
        samples,
        moved: moved.lock().map(|moved| moved.clone()).unwrap_or_default(),
        calls: acked.iter().sum(),
        retried: retried.load(Ordering::Relaxed),
        lost,
        duplicates,
    };
    let _ = node.leave().await;
    Ok(report)
}
