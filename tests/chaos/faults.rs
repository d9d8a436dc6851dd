//! The faults, the seeded schedule they are injected in, and the run's
//! report.

use std::fmt;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use tokio::task::block_in_place;

use crate::history::{Op, Outcome, Summary};
use crate::net::Net;
use crate::relay::Relay;
use crate::silos::Silo;

/// How long a network fault lasts.
const WINDOW: Duration = Duration::from_secs(8);
/// How long a paused silo stays paused.
const PAUSE: Duration = Duration::from_secs(10);
/// How long a killed silo stays down.
const DOWN: Duration = Duration::from_secs(5);
/// Packets dropped under loss, in percent.
const LOSS_PERCENT: u32 = 20;
/// Delay added to each chunk to and from storage and etcd.
const DELAY: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// One silo cut off from everything: the other silos, the client,
    /// storage, etcd.
    Isolate(usize),
    /// The silos split in two groups (the first listed); the client still
    /// reaches both.
    Split(Vec<usize>),
    /// Random loss on every silo's inbound packets.
    Loss,
    /// Delay on the way to PostgreSQL and etcd.
    Delay,
    /// SIGKILL, then started again.
    Kill(usize),
    /// SIGSTOP, then SIGCONT.
    Pause(usize),
    /// SIGTERM (a drain), then started again.
    Restart(usize),
    /// The PostgreSQL server restarted.
    RestartPostgres,
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Isolate(_) => "partition (one silo cut off from all)",
            Fault::Split(_) => "partition (silos split 2 | 3)",
            Fault::Loss => "packet loss",
            Fault::Delay => "delay (storage, etcd)",
            Fault::Kill(_) => "kill -9",
            Fault::Pause(_) => "SIGSTOP 10 s",
            Fault::Restart(_) => "restart (drained)",
            Fault::RestartPostgres => "PostgreSQL restart",
        }
    }

    /// The fault aimed at the silos hosting counters now (`busiest` first):
    /// a fault on one silo strikes the busiest; a split puts the busiest
    /// with the first other silo the seed drew.
    pub fn aim(&self, busiest: usize) -> Fault {
        match self {
            Fault::Isolate(_) => Fault::Isolate(busiest),
            Fault::Kill(_) => Fault::Kill(busiest),
            Fault::Pause(_) => Fault::Pause(busiest),
            Fault::Restart(_) => Fault::Restart(busiest),
            Fault::Split(drawn) => {
                let other = drawn.iter().copied().find(|&i| i != busiest).unwrap_or(0);
                let mut group = vec![busiest, other];
                group.sort_unstable();
                Fault::Split(group)
            }
            other => other.clone(),
        }
    }

    /// Injects the fault, holds it, and heals it.
    pub async fn inject(
        &self,
        net: &Net,
        silos: &mut [Silo],
        postgres: &Relay,
        etcd: Option<&Relay>,
        postgres_cluster: &(String, String),
    ) -> Result<(), String> {
        match self {
            // nft and the signals are quick commands run to completion:
            // off the runtime's workers, which the load shares.
            Fault::Isolate(i) => {
                block_in_place(|| net.isolate(*i))?;
                tokio::time::sleep(WINDOW).await;
                block_in_place(|| net.heal())
            }
            Fault::Split(group) => {
                block_in_place(|| net.partition(group))?;
                tokio::time::sleep(WINDOW).await;
                block_in_place(|| net.heal())
            }
            Fault::Loss => {
                block_in_place(|| net.loss(LOSS_PERCENT))?;
                tokio::time::sleep(WINDOW).await;
                block_in_place(|| net.heal())
            }
            Fault::Delay => {
                postgres.set_delay(DELAY);
                if let Some(etcd) = etcd {
                    etcd.set_delay(DELAY);
                }
                tokio::time::sleep(WINDOW).await;
                postgres.set_delay(Duration::ZERO);
                if let Some(etcd) = etcd {
                    etcd.set_delay(Duration::ZERO);
                }
                Ok(())
            }
            Fault::Kill(i) => {
                let silo = &mut silos[*i];
                block_in_place(|| silo.kill())?;
                tokio::time::sleep(DOWN).await;
                silo.start()
            }
            Fault::Pause(i) => {
                block_in_place(|| silos[*i].pause())?;
                tokio::time::sleep(PAUSE).await;
                block_in_place(|| silos[*i].resume())
            }
            Fault::Restart(i) => {
                let silo = &mut silos[*i];
                block_in_place(|| silo.stop(Duration::from_secs(30)))?;
                silo.start()
            }
            Fault::RestartPostgres => {
                let (version, cluster) = postgres_cluster;
                block_in_place(|| crate::net::run("pg_ctlcluster", &[version, cluster, "restart"]))
            }
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Isolate(i) | Fault::Kill(i) | Fault::Pause(i) | Fault::Restart(i) => {
                write!(f, "{} of silo {i}", self.kind())
            }
            Fault::Split(group) => write!(f, "{}: {group:?} from the rest", self.kind()),
            Fault::Loss => write!(f, "{} ({LOSS_PERCENT}%)", self.kind()),
            Fault::Delay => write!(f, "{} ({DELAY:?} a chunk)", self.kind()),
            Fault::RestartPostgres => f.write_str(self.kind()),
        }
    }
}

/// Every kind of fault once, in an order and on silos drawn from a seed.
pub struct Schedule(Vec<Fault>);

impl Schedule {
    pub fn draw(seed: u64, silos: usize) -> Schedule {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..silos).collect();
        let mut pick = |rng: &mut StdRng| {
            order.shuffle(rng);
            order.clone()
        };
        let mut faults = vec![
            Fault::Isolate(pick(&mut rng)[0]),
            Fault::Split({
                let mut group = pick(&mut rng)[..2].to_vec();
                group.sort_unstable();
                group
            }),
            Fault::Loss,
            Fault::Delay,
            Fault::Kill(pick(&mut rng)[0]),
            Fault::Pause(pick(&mut rng)[0]),
            Fault::Restart(pick(&mut rng)[0]),
            Fault::RestartPostgres,
        ];
        faults.shuffle(&mut rng);
        Schedule(faults)
    }

    pub fn faults(&self) -> &[Fault] {
        &self.0
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The kinds and their order: a fault's silo is chosen when it is
        // injected (`Fault::aim`).
        let faults: Vec<&str> = self.0.iter().map(Fault::kind).collect();
        f.write_str(&faults.join("; "))
    }
}

/// A fault as it was injected: when (microseconds into the load), and how
/// long after it healed every counter answered again.
pub struct Injected {
    pub fault: Fault,
    pub began_us: u64,
    pub healed_us: u64,
    pub recovered: Option<Duration>,
}

impl Injected {
    /// Of the operations invoked from the fault's start until the counters
    /// answered again, how many there were and how many failed.
    fn failed_within(&self, ops: &[Op]) -> (usize, usize) {
        let end = self.healed_us
            + self
                .recovered
                .map_or(u64::MAX / 2, |d| d.as_micros() as u64);
        let within: Vec<&Op> = ops
            .iter()
            .filter(|op| (self.began_us..=end).contains(&op.invoked_us))
            .collect();
        let failed = within
            .iter()
            .filter(|op| op.outcome == Outcome::Failed)
            .count();
        (within.len(), failed)
    }
}

/// The run's figures, as a section of a report.
#[allow(clippy::too_many_arguments)]
pub fn report(
    membership: &str,
    seed: u64,
    took: Duration,
    ops: &[Op],
    summary: &Summary,
    recoveries: &[Injected],
    crashes: &[String],
    rejoined: &[String],
    members: usize,
    expected: usize,
) -> String {
    let mut times: Vec<Duration> = recoveries.iter().filter_map(|r| r.recovered).collect();
    times.sort_unstable();
    let median = times.get(times.len() / 2).copied().unwrap_or_default();
    let worst = times.last().copied().unwrap_or_default();
    let mut out = format!(
        "\n### Membership over {membership}, seed {seed}\n\n\
         - {} operations in {:.0} s: {} adds acknowledged, {} indeterminate (failed or timed out), \
         {} reads answered, {} failed\n\
         - {} activations acknowledged writes\n\
         - faults: {}\n\
         - time until every counter answered again after a fault healed: median {median:.1?}, worst {worst:.1?}\n\
         - anomalies: {}\n\
         - silos that stopped serving on purpose and were restarted (lease lost, or declared dead): {}\n\
         - silos that exited on their own otherwise (crashes): {}\n\
         - members at the end: {members} of {expected}\n\n\
         | fault | every counter answered again after it healed | operations failed from its start until then |\n|---|---|---|\n",
        ops.len(),
        took.as_secs_f64(),
        summary.adds_acknowledged,
        summary.adds_indeterminate,
        summary.reads_answered,
        summary.reads_failed,
        summary.writing_activations,
        recoveries.len(),
        summary.anomalies.len(),
        if rejoined.is_empty() {
            "none".to_string()
        } else {
            rejoined.join(", ")
        },
        crashes.len(),
    );
    for injected in recoveries {
        let recovered = injected
            .recovered
            .map_or("not within the bound".to_string(), |d| format!("{d:.1?}"));
        let (within, failed) = injected.failed_within(ops);
        out.push_str(&format!(
            "| {} | {recovered} | {failed} of {within} |\n",
            injected.fault
        ));
    }
    for anomaly in &summary.anomalies {
        out.push_str(&format!("\nanomaly: {anomaly}"));
    }
    for crash in crashes {
        out.push_str(&format!("\ncrash: {crash}"));
    }
    out.push('\n');
    out
}

pub mod tests {
    use super::*;

    pub fn a_seed_gives_the_same_schedule_and_every_kind() {
        let (a, b) = (Schedule::draw(42, 5), Schedule::draw(42, 5));
        assert_eq!(a.faults(), b.faults());
        let mut kinds: Vec<&str> = a.faults().iter().map(Fault::kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), 8, "{a}");
        let other = (0..20).map(|seed| Schedule::draw(seed, 5).to_string());
        let distinct: std::collections::HashSet<String> = other.collect();
        assert!(distinct.len() > 10, "seeds draw different schedules");
        for fault in a.faults() {
            if let Fault::Split(group) = fault {
                assert_eq!(group.len(), 2);
                assert!(group.iter().all(|&i| i < 5));
            }
        }
    }
}
