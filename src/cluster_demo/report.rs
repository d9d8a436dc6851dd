//! What the demo measured and checked, and how it is printed.

use std::fmt;
use std::time::Duration;

use super::grains::{AUDITORS, SiloActivity};

/// What a multi-node demo measured.
#[derive(Debug, Clone)]
pub struct ClusterDemoReport {
    /// The silos, with their device memory (MiB).
    pub silos: Vec<(String, u64)>,
    /// Ledgers per silo address before the kill.
    pub before: Vec<(String, usize)>,
    /// Ledgers per silo address at the end.
    pub after: Vec<(String, usize)>,
    /// The silo killed.
    pub killed: String,
    /// Calls acknowledged.
    pub calls: u64,
    /// Calls that failed and were retried.
    pub retried: u64,
    /// Median and 99th percentile latency of acknowledged calls.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Wall time of the load.
    pub elapsed: Duration,
    /// Ledgers whose persisted total was not what was acknowledged.
    pub lost: Vec<String>,
    /// Notifications (ledger → auditor calls) acknowledged: one per
    /// acknowledged `Apply`.
    pub notified: u64,
    /// Of those, the ones whose ledger and auditor ran on different silos.
    pub crossed: u64,
    /// Auditors whose persisted counts miss an acknowledged notification.
    pub audit_lost: Vec<String>,
    /// Each live silo's activations at the end (the census), this
    /// process's own (a client: none) last.
    pub census: Vec<SiloActivity>,
    /// Ledgers and auditors active on more than one silo, and silos the
    /// census could not reach.
    pub duplicates: Vec<String>,
}

impl ClusterDemoReport {
    /// Whether every check held: no ledger or auditor state lost, no
    /// grain active on two silos.
    pub fn passed(&self) -> bool {
        self.lost.is_empty() && self.audit_lost.is_empty() && self.duplicates.is_empty()
    }
}

impl fmt::Display for ClusterDemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "silos (device memory):")?;
        for (silo, mib) in &self.silos {
            writeln!(f, "  {silo}  {mib} MiB")?;
        }
        writeln!(f, "ledgers per silo, placed by free device memory:")?;
        let after: std::collections::HashMap<&str, usize> =
            self.after.iter().map(|(s, n)| (s.as_str(), *n)).collect();
        for (silo, before) in &self.before {
            let mark = if *silo == self.killed {
                "  (killed)"
            } else {
                ""
            };
            writeln!(
                f,
                "  {silo}  before {before:>3}  after {:>3}{mark}",
                after.get(silo.as_str()).copied().unwrap_or(0)
            )?;
        }
        let throughput = self.calls as f64 / self.elapsed.as_secs_f64().max(1e-9);
        writeln!(
            f,
            "calls: {} acknowledged, {} retried after failures; p50 {:?}, p99 {:?}; {:.0} calls/s",
            self.calls, self.retried, self.p50, self.p99, throughput
        )?;
        writeln!(
            f,
            "grain-to-grain calls (ledger -> auditor, {AUDITORS} auditors): {} notifications acknowledged, {} crossed silos",
            self.notified, self.crossed
        )?;
        if self.lost.is_empty() {
            writeln!(
                f,
                "persisted state: every ledger holds every acknowledged call"
            )?;
        } else {
            writeln!(f, "persisted state LOST for: {}", self.lost.join(", "))?;
        }
        if self.audit_lost.is_empty() {
            writeln!(
                f,
                "audited state: every auditor counts every acknowledged notification"
            )?;
        } else {
            writeln!(f, "audited state LOST for: {}", self.audit_lost.join(", "))?;
        }
        writeln!(f, "activations at the end, per live silo:")?;
        for silo in &self.census {
            writeln!(
                f,
                "  {}  live {:>3}: {:>3} ledgers, {:>2} auditors",
                silo.silo,
                silo.live,
                silo.ledgers.len(),
                silo.auditors.len()
            )?;
        }
        let total =
            |count: fn(&SiloActivity) -> usize| -> usize { self.census.iter().map(count).sum() };
        writeln!(
            f,
            "  cluster-wide: {} live, {} ledgers, {} auditors (and one inspector per silo)",
            self.census.iter().map(|silo| silo.live).sum::<u64>(),
            total(|silo| silo.ledgers.len()),
            total(|silo| silo.auditors.len())
        )?;
        if self.duplicates.is_empty() {
            writeln!(f, "single activation: no grain is active on two silos")
        } else {
            writeln!(
                f,
                "single activation BROKEN: {}",
                self.duplicates.join(", ")
            )
        }
    }
}
