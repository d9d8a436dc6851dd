//! The history the clients record, and the checks run on it.
//!
//! Every operation is an invocation and a completion, each stamped in
//! microseconds since the run began, on one counter grain. An `Add` adds 1;
//! one that fails or times out is *indeterminate*: it may or may not have
//! taken effect. The checks, per grain:
//!
//! 1. **No acknowledged write lost.** The count read from storage at the
//!    end is at least the number of acknowledged adds and every value an
//!    operation returned, and at most the number of adds invoked.
//! 2. **Linearizable as a counter** (the bounds of Jepsen's counter
//!    checker, plus what unit adds allow): if operation `a` completed before
//!    `b` was invoked, `b`'s value is at least `a`'s, and greater when `b` is
//!    an add; no two acknowledged adds return the same value; and no value
//!    exceeds the number of adds invoked before the operation completed.
//! 3. **One writer at a time** (fencing). Acknowledged adds ordered by the
//!    stored version they wrote each replaced a version no older than the
//!    one before them wrote (two writers working from one version would
//!    break this), and once an activation's writes are followed by another
//!    activation's, the first never writes again.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// What an operation was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Add 1.
    Add,
    /// Read the stored count.
    Get,
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An add acknowledged: the count after it, the version it replaced and
    /// the one it wrote, and the activation that wrote it.
    Added {
        value: u64,
        replaced: Option<u64>,
        written: u64,
        activation: String,
    },
    /// A read answered.
    Read { value: u64 },
    /// Failed or timed out: for an add, indeterminate.
    Failed,
}

/// One operation of one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub grain: u64,
    pub kind: Kind,
    pub invoked_us: u64,
    pub completed_us: u64,
    pub outcome: Outcome,
}

impl Op {
    fn value(&self) -> Option<u64> {
        match self.outcome {
            Outcome::Added { value, .. } | Outcome::Read { value } => Some(value),
            Outcome::Failed => None,
        }
    }
}

/// A violation of one of the module's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anomaly {
    pub grain: u64,
    pub rule: &'static str,
    pub detail: String,
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "counter {}: {}: {}", self.grain, self.rule, self.detail)
    }
}

/// The figures of a checked history.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub adds_acknowledged: u64,
    pub adds_indeterminate: u64,
    pub reads_answered: u64,
    pub reads_failed: u64,
    /// Activations that acknowledged a write, over all grains.
    pub writing_activations: u64,
    pub anomalies: Vec<Anomaly>,
}

/// Checks `ops` against the module's rules, with each grain's count read
/// from storage once every fault had healed (`finals`; a grain missing there
/// is an anomaly).
pub fn check(ops: &[Op], finals: &BTreeMap<u64, u64>) -> Summary {
    let mut by_grain: BTreeMap<u64, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        by_grain.entry(op.grain).or_default().push(op);
    }
    let mut summary = Summary::default();
    for (&grain, ops) in &by_grain {
        let mut anomaly = |rule: &'static str, detail: String| {
            summary.anomalies.push(Anomaly {
                grain,
                rule,
                detail,
            })
        };
        let adds: Vec<&Op> = ops
            .iter()
            .copied()
            .filter(|op| op.kind == Kind::Add)
            .collect();
        let acked: Vec<&Op> = adds
            .iter()
            .copied()
            .filter(|op| matches!(op.outcome, Outcome::Added { .. }))
            .collect();
        let invoked = adds.len() as u64;
        summary.adds_acknowledged += acked.len() as u64;
        summary.adds_indeterminate += invoked - acked.len() as u64;
        for op in ops.iter().filter(|op| op.kind == Kind::Get) {
            match op.outcome {
                Outcome::Read { .. } => summary.reads_answered += 1,
                _ => summary.reads_failed += 1,
            }
        }

        // Rule 1.
        match finals.get(&grain) {
            None => anomaly("lost", "its count could not be read at the end".into()),
            Some(&fin) => {
                if fin < acked.len() as u64 {
                    anomaly(
                        "lost",
                        format!("{} adds acknowledged, {fin} stored", acked.len()),
                    );
                }
                if fin > invoked {
                    anomaly("lost", format!("{invoked} adds invoked, {fin} stored"));
                }
                if let Some(op) = ops.iter().find(|op| op.value().is_some_and(|v| v > fin)) {
                    anomaly(
                        "lost",
                        format!("{op:?} returned more than the {fin} stored at the end"),
                    );
                }
            }
        }

        // Rule 2: real-time order, by a sweep over completions.
        let mut by_completion: Vec<&Op> = ops
            .iter()
            .copied()
            .filter(|op| op.value().is_some())
            .collect();
        by_completion.sort_by_key(|op| op.completed_us);
        let mut by_invocation = by_completion.clone();
        by_invocation.sort_by_key(|op| op.invoked_us);
        let mut done = 0;
        let mut highest: Option<&Op> = None;
        for op in &by_invocation {
            while done < by_completion.len() && by_completion[done].completed_us < op.invoked_us {
                let earlier = by_completion[done];
                if highest.is_none_or(|h| h.value() < earlier.value()) {
                    highest = Some(earlier);
                }
                done += 1;
            }
            if let (Some(before), Some(value)) = (highest, op.value()) {
                let floor = before.value().unwrap_or(0);
                let stale = match op.kind {
                    Kind::Add => value <= floor,
                    Kind::Get => value < floor,
                };
                if stale {
                    anomaly(
                        "not linearizable",
                        format!("{op:?} follows {before:?} in real time but does not count it"),
                    );
                }
            }
        }
        let mut seen: HashMap<u64, &Op> = HashMap::new();
        for op in &acked {
            if let Some(value) = op.value()
                && let Some(other) = seen.insert(value, op)
            {
                anomaly(
                    "not linearizable",
                    format!("two adds acknowledged with the count {value}: {other:?} and {op:?}"),
                );
            }
        }
        let mut invocations: Vec<u64> = adds.iter().map(|op| op.invoked_us).collect();
        invocations.sort_unstable();
        for op in ops {
            if let Some(value) = op.value() {
                let possible = invocations.partition_point(|&t| t < op.completed_us) as u64;
                if value > possible {
                    anomaly(
                        "not linearizable",
                        format!(
                            "{op:?} counts {value}, but only {possible} adds were invoked by then"
                        ),
                    );
                }
            }
        }

        // Rule 3.
        let mut writes: Vec<(u64, Option<u64>, &str)> = acked
            .iter()
            .filter_map(|op| match &op.outcome {
                Outcome::Added {
                    replaced,
                    written,
                    activation,
                    ..
                } => Some((*written, *replaced, activation.as_str())),
                _ => None,
            })
            .collect();
        writes.sort_by_key(|&(written, ..)| written);
        let mut retired: Vec<&str> = Vec::new();
        for pair in writes.windows(2) {
            let ((before, _, first), (_, replaced, second)) = (pair[0], pair[1]);
            if replaced.is_none_or(|replaced| replaced < before) {
                anomaly(
                    "two writers",
                    format!(
                        "the write after version {before} replaced {replaced:?}: it worked from an older state"
                    ),
                );
            }
            if first != second {
                if retired.contains(&second) {
                    anomaly(
                        "two writers",
                        format!("activation {second} wrote again after {first} had written"),
                    );
                }
                retired.push(first);
            }
        }
        let mut writers: Vec<&str> = writes.iter().map(|&(.., a)| a).collect();
        writers.sort_unstable();
        writers.dedup();
        summary.writing_activations += writers.len() as u64;
    }
    summary
}

/// The checker's own tests: each rule catches the anomaly it names, and a
/// clean history passes.
pub mod tests {
    use super::*;

    fn add(
        grain: u64,
        t: (u64, u64),
        value: u64,
        replaced: Option<u64>,
        written: u64,
        activation: &str,
    ) -> Op {
        Op {
            grain,
            kind: Kind::Add,
            invoked_us: t.0,
            completed_us: t.1,
            outcome: Outcome::Added {
                value,
                replaced,
                written,
                activation: activation.into(),
            },
        }
    }

    fn failed(grain: u64, t: (u64, u64)) -> Op {
        Op {
            grain,
            kind: Kind::Add,
            invoked_us: t.0,
            completed_us: t.1,
            outcome: Outcome::Failed,
        }
    }

    fn read(grain: u64, t: (u64, u64), value: u64) -> Op {
        Op {
            grain,
            kind: Kind::Get,
            invoked_us: t.0,
            completed_us: t.1,
            outcome: Outcome::Read { value },
        }
    }

    fn rules(ops: &[Op], fin: u64) -> Vec<&'static str> {
        let summary = check(ops, &BTreeMap::from([(7, fin)]));
        summary.anomalies.iter().map(|a| a.rule).collect()
    }

    /// Two activations, one after the other; an indeterminate add that
    /// took effect; overlapping operations in either order.
    fn clean() -> Vec<Op> {
        vec![
            add(7, (0, 10), 1, None, 100, "a"),
            add(7, (5, 20), 2, Some(100), 101, "a"),
            read(7, (15, 25), 2),
            failed(7, (30, 40)), // took effect: version 102, count 3
            add(7, (50, 60), 4, Some(102), 103, "b"),
            read(7, (55, 70), 4),
            add(7, (65, 90), 5, Some(103), 105, "b"),
        ]
    }

    pub fn a_clean_history_passes() {
        assert_eq!(rules(&clean(), 5), Vec::<&str>::new());
        // An indeterminate add that took effect or did not: both pass.
        let ops = vec![add(7, (0, 10), 1, None, 1, "a"), failed(7, (20, 30))];
        assert_eq!(rules(&ops, 1), Vec::<&str>::new());
        assert_eq!(rules(&ops, 2), Vec::<&str>::new());
    }

    pub fn a_lost_acknowledged_write_is_caught() {
        assert_eq!(rules(&clean(), 3), vec!["lost", "lost"]);
        let summary = check(&clean(), &BTreeMap::new());
        assert_eq!(summary.anomalies.len(), 1, "{:?}", summary.anomalies);
        // More stored than ever invoked.
        assert_eq!(rules(&clean(), 7), vec!["lost"]);
    }

    pub fn a_stale_read_and_a_duplicate_count_are_caught() {
        let mut ops = clean();
        ops.push(read(7, (95, 99), 3)); // after the add that counted 5
        assert_eq!(rules(&ops, 5), vec!["not linearizable"]);
        let mut ops = clean();
        ops.push(add(7, (91, 95), 5, Some(105), 106, "b"));
        let found = rules(&ops, 6);
        assert!(
            found.iter().all(|r| *r == "not linearizable") && found.len() == 2,
            "{found:?}"
        );
        // A count higher than the adds invoked by then.
        let ops = vec![read(7, (0, 5), 1), add(7, (10, 20), 2, None, 1, "a")];
        let summary = check(&ops, &BTreeMap::from([(7, 1)]));
        assert!(
            summary
                .anomalies
                .iter()
                .any(|a| a.rule == "not linearizable" && a.detail.contains("invoked by then")),
            "{:?}",
            summary.anomalies
        );
    }

    pub fn two_writers_are_caught() {
        // Both activations wrote from version 101.
        let mut ops = clean();
        ops[4] = add(7, (50, 60), 4, Some(100), 103, "b");
        assert_eq!(rules(&ops, 5), vec!["two writers"]);
        // a, then b, then a again.
        let mut ops = clean();
        ops.push(add(7, (95, 99), 6, Some(105), 106, "a"));
        assert_eq!(rules(&ops, 6), vec!["two writers"]);
    }
}
