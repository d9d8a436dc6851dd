//! `/metrics` (admin rule 3): the Prometheus text exposition of a node.
//!
//! 1. **Families.** Each family is written once, with `# HELP` and
//!    `# TYPE`, then its samples: per grain type (from
//!    `Silo::grain_type_stats`), the silo, its storage
//!    (`Silo::storage_stats`) and reminders (`Silo::reminder_stats`), per
//!    device (from the bridge's broker), the cluster (from the node and
//!    `ClusterNode::stats`), then the `metrics` recorder's own output as
//!    it renders it.
//! 2. **Labels** are escaped as the format asks (backslash, quote,
//!    newline); a grain type's name or a device's is a label value, a
//!    grain key never is.
//! 3. **Histograms** are cumulative: each `le` bucket counts every sample
//!    at or below its bound, `+Inf` counts them all and equals `_count`.

use std::fmt::Write;

use granary_actors::histogram::HistogramSnapshot;
use granary_actors::{FailureReason, GrainTypeStats};

use super::AdminSources;

/// The exposition of `sources` (rule 1).
pub(super) fn render(sources: &AdminSources) -> String {
    let mut out = Exposition::default();
    grain_types(&mut out, &sources.silo.grain_type_stats());
    out.family(
        "granary_silo_activations",
        "gauge",
        "Activation tasks alive on this silo: starting, taking messages or deactivating.",
    );
    out.sample(
        "granary_silo_activations",
        &[],
        sources.silo.live_activations() as f64,
    );
    out.family(
        "granary_silo_senders_waiting",
        "gauge",
        "Senders (calls, tells, timer ticks) waiting now for room in a full activation mailbox on this silo.",
    );
    out.sample(
        "granary_silo_senders_waiting",
        &[],
        sources.silo.senders_waiting() as f64,
    );
    out.family(
        "granary_silo_dropped_with_homes_total",
        "counter",
        "Messages dropped unrun when the silo gave its homes up after a stall.",
    );
    out.sample(
        "granary_silo_dropped_with_homes_total",
        &[],
        sources.silo.dropped_with_homes() as f64,
    );
    storage(&mut out, &sources.silo.storage_stats());
    reminders(&mut out, &sources.silo.reminder_stats());
    if let Some(bridge) = &sources.bridge {
        devices(&mut out, bridge);
        kernels(&mut out, &bridge.kernel_health());
        out.family(
            "granary_device_fallbacks_total",
            "counter",
            "Requests run on the CPU fallback because no device could run them (by kernel and reason: granary_gpu_fallbacks_total, once there is one).",
        );
        out.sample(
            "granary_device_fallbacks_total",
            &[],
            bridge.fallbacks() as f64,
        );
    }
    if let Some(node) = &sources.node {
        cluster(&mut out, node);
    }
    let mut text = out.text;
    if let Some(recorder) = &sources.recorder {
        text.push_str(&recorder.render());
    }
    text
}

/// Per grain type families (rule 1).
fn grain_types(out: &mut Exposition, stats: &[GrainTypeStats]) {
    let per_type = |out: &mut Exposition,
                    name: &str,
                    kind: &str,
                    help: &str,
                    value: &dyn Fn(&GrainTypeStats) -> u64| {
        out.family(name, kind, help);
        for stats in stats {
            out.sample(
                name,
                &[("grain_type", &stats.grain_type)],
                value(stats) as f64,
            );
        }
    };
    per_type(
        out,
        "granary_grain_messages_total",
        "counter",
        "Messages run by activations of the grain type (calls, tells, reads, timer and reminder ticks).",
        &|stats| stats.messages,
    );
    out.family(
        "granary_grain_failures_total",
        "counter",
        "Messages of the grain type that failed, by reason.",
    );
    for stats in stats {
        for (reason, count) in &stats.failures {
            out.sample(
                "granary_grain_failures_total",
                &[
                    ("grain_type", &stats.grain_type),
                    ("reason", reason_label(*reason)),
                ],
                *count as f64,
            );
        }
    }
    per_type(
        out,
        "granary_grain_activations",
        "gauge",
        "Activations of the grain type taking messages now (not those deactivating).",
        &|stats| stats.live_activations,
    );
    per_type(
        out,
        "granary_grain_activations_started_total",
        "counter",
        "Activations of the grain type started.",
        &|stats| stats.activations_started,
    );
    per_type(
        out,
        "granary_grain_activations_ended_total",
        "counter",
        "Activations of the grain type ended.",
        &|stats| stats.activations_ended,
    );
    per_type(
        out,
        "granary_grain_mailbox_depth",
        "gauge",
        "Messages waiting in the grain type's mailboxes, not yet taken by their activation.",
        &|stats| stats.mailbox_depth,
    );
    let name = "granary_grain_turn_seconds";
    out.family(
        name,
        "histogram",
        "Time of a grain type's turns, sampled (one turn in 16 per activation; a batch of reads is one turn).",
    );
    for stats in stats {
        out.histogram(
            name,
            &[("grain_type", &stats.grain_type)],
            &stats.turn_seconds,
        );
    }
}

/// Storage families (rule 1).
fn storage(out: &mut Exposition, stats: &granary_actors::StorageStats) {
    let name = "granary_storage_operations_total";
    out.family(
        name,
        "counter",
        "Grain state operations, by operation and outcome (conflict: a stale ETag refused).",
    );
    for op in &stats.ops {
        for (outcome, count) in [
            ("done", op.done),
            ("conflict", op.conflicts),
            ("failed", op.failed),
        ] {
            out.sample(
                name,
                &[("op", op.op.as_str()), ("outcome", outcome)],
                count as f64,
            );
        }
    }
    let name = "granary_storage_operation_seconds";
    out.family(name, "histogram", "Grain state operations' latency.");
    for op in &stats.ops {
        out.histogram(name, &[("op", op.op.as_str())], &op.latency);
    }
}

/// Reminder families (rule 1).
fn reminders(out: &mut Exposition, stats: &granary_actors::ReminderStats) {
    for (name, kind, help, value) in [
        (
            "granary_reminders_owned",
            "gauge",
            "Reminders this silo owns and schedules now.",
            stats.owned,
        ),
        (
            "granary_reminders_due_total",
            "counter",
            "Reminder due times that came to this silo to fire.",
            stats.due,
        ),
        (
            "granary_reminders_fired_total",
            "counter",
            "Reminder due times delivered to their grain.",
            stats.fired,
        ),
        (
            "granary_reminders_failed_total",
            "counter",
            "Reminder due times not delivered (the grain failed to take it, or the silo was shutting down).",
            stats.failed,
        ),
    ] {
        out.family(name, kind, help);
        out.sample(name, &[], value as f64);
    }
}

fn reason_label(reason: FailureReason) -> &'static str {
    reason.as_str()
}

/// Per device families (rule 1).
fn devices(out: &mut Exposition, bridge: &granary_gpu::GpuBridge) {
    let devices = bridge.devices();
    let labels = |info: &granary_kernels::DeviceInfo| {
        [
            // The backend's own index, as the bridge's series label it.
            ("device", info.index.to_string()),
            ("backend", format!("{:?}", info.backend)),
            ("name", info.name.clone()),
        ]
    };
    type Value = fn(&granary_kernels::DeviceInfo, &granary_gpu::DeviceStats) -> f64;
    let families: [(&str, &str, &str, Value); 7] = [
        (
            "granary_device_memory_total_bytes",
            "gauge",
            "The device's memory in all.",
            |info, _| info.total_memory as f64,
        ),
        (
            "granary_device_memory_reserved_bytes",
            "gauge",
            "Device memory reserved for grains and requests now.",
            |_, stats| stats.reserved as f64,
        ),
        (
            "granary_device_memory_free_bytes",
            "gauge",
            "Device memory that can still be reserved.",
            |_, stats| stats.available as f64,
        ),
        (
            "granary_device_queue_depth",
            "gauge",
            "Requests started on the device and not finished.",
            |_, stats| stats.queue_depth as f64,
        ),
        (
            "granary_device_requests_total",
            "counter",
            "Requests the device finished successfully.",
            |_, stats| stats.processed as f64,
        ),
        (
            "granary_device_request_failures_total",
            "counter",
            "Requests that failed on the device or were dropped unfinished.",
            |_, stats| stats.failed as f64,
        ),
        (
            "granary_device_compute_units",
            "gauge",
            "The device's compute units (SMs, OpenCL compute units, cores).",
            |info, _| f64::from(info.compute_units),
        ),
    ];
    for (name, kind, help, value) in families {
        out.family(name, kind, help);
        for (_, info, stats) in &devices {
            let labels = labels(info);
            let labels: Vec<(&str, &str)> = labels
                .iter()
                .map(|(key, value)| (*key, value.as_str()))
                .collect();
            out.sample(name, &labels, value(info, stats));
        }
    }
}

/// Per persistent kernel families (rule 1): one series per kernel and
/// device it was launched on.
fn kernels(out: &mut Exposition, health: &[granary_gpu::InstanceHealth]) {
    type Value = fn(&granary_gpu::InstanceHealth) -> f64;
    let families: [(&str, &str, &str, Value); 5] = [
        (
            "granary_kernel_heartbeat_age_seconds",
            "gauge",
            "Seconds since the persistent kernel's heartbeat last moved. It beats idle and for every request it takes (not during one), so a value nearing the bridge's hang timeout (2 s by default) means it is stuck.",
            |health| health.since_heartbeat.as_secs_f64(),
        ),
        (
            "granary_kernel_ring_occupancy_ratio",
            "gauge",
            "Share of the kernel's ring slots holding requests now (0 to 1).",
            |health| health.ring_occupancy(),
        ),
        (
            "granary_kernel_hangs_total",
            "counter",
            "Times the kernel's heartbeat stood still with requests pending, failing them.",
            |health| health.hangs as f64,
        ),
        (
            "granary_kernel_relaunches_total",
            "counter",
            "Times the kernel was launched again after a hang.",
            |health| health.relaunches as f64,
        ),
        (
            "granary_kernel_failed",
            "gauge",
            "1 while the kernel's relaunch has failed (the bridge routes around it and retries).",
            |health| if health.failed { 1.0 } else { 0.0 },
        ),
    ];
    for (name, kind, help, value) in families {
        out.family(name, kind, help);
        for health in health {
            let device = health.device_index.to_string();
            let backend = format!("{:?}", health.backend);
            out.sample(
                name,
                &[
                    ("kernel", health.kernel),
                    ("backend", &backend),
                    ("device", &device),
                ],
                value(health),
            );
        }
    }
}

/// Cluster families (rule 1).
fn cluster(out: &mut Exposition, node: &granary_cluster::ClusterNode) {
    let gauges: [(&str, &str, &str, f64); 6] = [
        (
            "granary_cluster_members",
            "gauge",
            "Silos in this node's view of the cluster, itself included.",
            node.members().len() as f64,
        ),
        (
            "granary_cluster_homes",
            "gauge",
            "Grains this silo is home to now.",
            node.homes() as f64,
        ),
        (
            "granary_cluster_directory_entries",
            "gauge",
            "Directory entries this silo owns now.",
            node.directory_entries() as f64,
        ),
        (
            "granary_cluster_homes_given_up_total",
            "counter",
            "Homes this silo gave up because their activations ended.",
            node.homes_given_up() as f64,
        ),
        (
            "granary_cluster_fences_total",
            "counter",
            "Times this silo fenced itself after a stall.",
            node.fences() as f64,
        ),
        (
            "granary_cluster_fenced",
            "gauge",
            "1 while the silo is fenced after a stall.",
            if node.is_fenced() { 1.0 } else { 0.0 },
        ),
    ];
    for (name, kind, help, value) in gauges {
        out.family(name, kind, help);
        out.sample(name, &[], value);
    }
    if let Some(counts) = node.gossip_counts() {
        let name = "granary_gossip_datagrams_total";
        out.family(
            name,
            "counter",
            "Gossip datagrams, by outcome: sent, accepted, or dropped on receipt (unsealed, forged, stale, replayed, sessions_full, malformed, refused); trimmed and too_long are sent ones cut to the UDP limit or not sent.",
        );
        for (outcome, count) in [
            ("sent", counts.sent),
            ("accepted", counts.accepted),
            ("unsealed", counts.unsealed),
            ("forged", counts.forged),
            ("stale", counts.stale),
            ("replayed", counts.replayed),
            ("sessions_full", counts.sessions_full),
            ("malformed", counts.malformed),
            ("refused", counts.refused),
            ("undecoded", counts.undecoded),
            ("trimmed", counts.trimmed),
            ("too_long", counts.too_long),
        ] {
            out.sample(name, &[("outcome", outcome)], count as f64);
        }
    }
    let stats = node.stats();
    let name = "granary_cluster_redirects_total";
    out.family(
        name,
        "counter",
        "Answers that sent this silo's calls elsewhere or later, by kind (moved, retry, no_room, overloaded, shut_down).",
    );
    for (redirect, count) in &stats.redirects {
        out.sample(name, &[("answer", redirect.as_str())], *count as f64);
    }
    let name = "granary_cluster_remote_call_seconds";
    out.family(
        name,
        "histogram",
        "Latency of this silo's requests to other silos, from sending to the answer.",
    );
    out.histogram(name, &[], &stats.remote_calls);
    let name = "granary_migration_seconds";
    out.family(
        name,
        "histogram",
        "Grains that moved away from this silo, by how long each move took (from the request to the source letting go).",
    );
    out.histogram(name, &[], &stats.migrations);
    let name = "granary_migrations_failed_total";
    out.family(
        name,
        "counter",
        "Moves away from this silo that did not happen (the grain stayed), or whose outcome was unknown.",
    );
    out.sample(name, &[], stats.migrations_failed as f64);
    let name = "granary_migrated_bytes_total";
    out.family(
        name,
        "counter",
        "Bytes of the dehydrated states that moved away from this silo.",
    );
    out.sample(name, &[], stats.migrated_bytes as f64);
    let name = "granary_rebalance_decisions_total";
    out.family(
        name,
        "counter",
        "The rebalancer's decisions on this silo, by reason (high_water, spread, queue: moves; pressure: deactivations) and outcome (done, failed).",
    );
    for count in &stats.rebalance {
        for (outcome, value) in [("done", count.done), ("failed", count.failed)] {
            out.sample(
                name,
                &[("reason", count.reason.as_str()), ("outcome", outcome)],
                value as f64,
            );
        }
    }
}

/// The text being written (rules 1 and 2).
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// A histogram's samples (rule 3): its buckets, not cumulative,
    /// written cumulative.
    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], histogram: &HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (bound, count) in histogram.bounds.iter().zip(&histogram.buckets) {
            cumulative += count;
            let le = format!("{bound}");
            let mut with = labels.to_vec();
            with.push(("le", &le));
            self.sample(&bucket, &with, cumulative as f64);
        }
        let mut with = labels.to_vec();
        with.push(("le", "+Inf"));
        self.sample(&bucket, &with, histogram.count as f64);
        self.sample(&format!("{name}_sum"), labels, histogram.sum_seconds);
        self.sample(&format!("{name}_count"), labels, histogram.count as f64);
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (n, (key, value)) in labels.iter().enumerate() {
                if n > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{key}=\"");
                escape(&mut self.text, value);
                self.text.push('"');
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }
}

/// Rule 2: a label value as the text format writes it.
fn escape(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut out = Exposition::default();
        out.sample("x_total", &[("grain_type", "a\"b\\c\nd")], 3.0);
        assert_eq!(out.text, "x_total{grain_type=\"a\\\"b\\\\c\\nd\"} 3\n");
    }

    #[test]
    fn turn_histograms_are_cumulative() {
        let stats = GrainTypeStats {
            grain_type: "t".into(),
            stateless: false,
            messages: 5,
            failures: vec![],
            activations_started: 1,
            activations_ended: 0,
            live_activations: 1,
            mailbox_depth: 0,
            turn_seconds: HistogramSnapshot {
                bounds: &granary_actors::TURN_SECONDS_BOUNDS,
                buckets: {
                    let bounds = granary_actors::TURN_SECONDS_BOUNDS.len();
                    let mut buckets = vec![0; bounds + 1];
                    buckets[0] = 2;
                    buckets[3] = 1;
                    buckets[bounds] = 1;
                    buckets
                },
                count: 4,
                sum_seconds: 2.5,
            },
        };
        let mut out = Exposition::default();
        grain_types(&mut out, &[stats]);
        let text = out.text;
        assert!(
            text.contains(
                "granary_grain_turn_seconds_bucket{grain_type=\"t\",le=\"0.000001\"} 2\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("granary_grain_turn_seconds_bucket{grain_type=\"t\",le=\"0.00005\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("granary_grain_turn_seconds_bucket{grain_type=\"t\",le=\"1\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("granary_grain_turn_seconds_bucket{grain_type=\"t\",le=\"+Inf\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("granary_grain_turn_seconds_count{grain_type=\"t\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("granary_grain_messages_total{grain_type=\"t\"} 5\n"),
            "{text}"
        );
    }
}
