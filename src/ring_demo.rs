//! `granary ring-demo`: drives the request ring alone under load.
//!
//! Producer threads (standing in for grains) push timestamped requests into
//! one MPSC ring; one consumer thread (standing in for a persistent kernel)
//! drains it in chunks, verifies every payload's checksum and per-producer
//! order, and records the enqueue-to-dequeue latency of each message. The
//! main demo runs through the bridge (`granary demo`).

use std::fmt;
use std::thread;
use std::time::{Duration, Instant};

use granary_ring::{ConfigError, Ring, RingConfig, TryPopError, WaitPolicy};
use hdrhistogram::Histogram;

/// What the demo runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingDemoConfig {
    /// Producer threads, at least 1.
    pub producers: u32,
    /// Messages each producer sends.
    pub messages_per_producer: u64,
    /// Payload bytes per message, at least 24 (timestamp, sequence, checksum).
    pub payload: u32,
    /// Ring capacity: a power of two.
    pub capacity: u32,
}

impl Default for RingDemoConfig {
    fn default() -> RingDemoConfig {
        RingDemoConfig {
            producers: 4,
            messages_per_producer: 1_000_000,
            payload: 64,
            capacity: 4096,
        }
    }
}

/// Why the demo could not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingDemoError {
    /// The ring configuration was refused.
    Ring(ConfigError),
    /// A parameter is out of range.
    BadParameter(String),
    /// The consumer saw a message that failed verification.
    Verification(String),
    /// A producer thread could not be started.
    Thread(String),
}

impl fmt::Display for RingDemoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingDemoError::Ring(err) => write!(f, "ring: {err}"),
            RingDemoError::BadParameter(why) => write!(f, "bad parameter: {why}"),
            RingDemoError::Verification(why) => write!(f, "verification failed: {why}"),
            RingDemoError::Thread(why) => write!(f, "cannot start a producer thread: {why}"),
        }
    }
}

impl std::error::Error for RingDemoError {}

/// What the demo measured.
#[derive(Debug, Clone)]
pub struct RingDemoReport {
    /// The configuration that ran.
    pub config: RingDemoConfig,
    /// Messages the consumer received and verified.
    pub received: u64,
    /// Wall time from the first push to the last pop.
    pub elapsed: Duration,
    /// Enqueue-to-dequeue latency in nanoseconds.
    pub latency_ns: Histogram<u64>,
}

impl RingDemoReport {
    /// Messages per second.
    pub fn throughput(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64()
    }

    /// Latency at `quantile` (0.0..=1.0), in microseconds.
    pub fn latency_us(&self, quantile: f64) -> f64 {
        self.latency_ns.value_at_quantile(quantile) as f64 / 1_000.0
    }
}

impl RingDemoReport {
    /// The report as (metric, value) rows.
    pub fn rows(&self) -> Vec<(String, String)> {
        let c = &self.config;
        let megabytes = self.throughput() * f64::from(c.payload) / 1e6;
        let mut rows = vec![
            (
                "path".to_string(),
                format!(
                    "{} producers → MPSC ring ({} slots) → 1 consumer",
                    c.producers, c.capacity
                ),
            ),
            (
                "messages".to_string(),
                format!("{} × {} B", self.received, c.payload),
            ),
            (
                "elapsed".to_string(),
                format!("{:.3} s", self.elapsed.as_secs_f64()),
            ),
            (
                "throughput".to_string(),
                format!(
                    "{:.2} M msg/s ({megabytes:.0} MB/s)",
                    self.throughput() / 1e6
                ),
            ),
        ];
        for (label, quantile) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
            rows.push((
                format!("latency {label}"),
                format!("{:.1} µs", self.latency_us(quantile)),
            ));
        }
        rows.push((
            "latency max".to_string(),
            format!("{:.1} µs", self.latency_ns.max() as f64 / 1_000.0),
        ));
        rows
    }
}

impl fmt::Display for RingDemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows = self.rows();
        let width = |text: &str| text.chars().count();
        let left = rows
            .iter()
            .map(|(metric, _)| width(metric))
            .max()
            .unwrap_or(0)
            .max(6);
        let right = rows
            .iter()
            .map(|(_, value)| width(value))
            .max()
            .unwrap_or(0)
            .max(5);
        writeln!(f, "| {:<left$} | {:<right$} |", "metric", "value")?;
        writeln!(f, "|{}|{}|", "-".repeat(left + 2), "-".repeat(right + 2))?;
        for (index, (metric, value)) in rows.iter().enumerate() {
            // `{:<N}` pads by chars, which is what a terminal shows here.
            write!(f, "| {metric:<left$} | {value:<right$} |")?;
            if index + 1 < rows.len() {
                writeln!(f)?;
            }
        }
        Ok(())
    }
}

/// Payload layout: nanoseconds since start at push, sequence, checksum, then
/// filler up to the payload size.
fn checksum(producer: u64, sequence: u64, sent_ns: u64) -> u64 {
    (producer.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ sequence ^ sent_ns.rotate_left(17))
        .wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

fn word(payload: &[u8], index: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&payload[index * 8..index * 8 + 8]);
    u64::from_le_bytes(bytes)
}

/// The most producer threads the demo starts.
const MAX_PRODUCERS: u32 = 1024;

/// Runs the demo, calling `progress(received)` from the consumer about every
/// 64 Ki messages.
pub fn run(
    config: RingDemoConfig,
    progress: impl Fn(u64),
) -> Result<RingDemoReport, RingDemoError> {
    if config.producers == 0 || config.messages_per_producer == 0 {
        return Err(RingDemoError::BadParameter(
            "producers and messages must be at least 1".into(),
        ));
    }
    if config.producers > MAX_PRODUCERS {
        return Err(RingDemoError::BadParameter(format!(
            "{} producers: at most {MAX_PRODUCERS} (each is a thread)",
            config.producers
        )));
    }
    if config.payload < 24 {
        return Err(RingDemoError::BadParameter(format!(
            "payload {} B is below the 24 B the demo stamps into each message",
            config.payload
        )));
    }
    let total = u64::from(config.producers)
        .checked_mul(config.messages_per_producer)
        .ok_or_else(|| {
            RingDemoError::BadParameter("producers × messages overflows 64 bits".into())
        })?;
    let ring = Ring::new(RingConfig::mpsc(config.capacity, config.payload))
        .map_err(RingDemoError::Ring)?;
    let (producer, mut consumer) = ring
        .split_mpsc()
        .map_err(|err| RingDemoError::BadParameter(err.to_string()))?;
    let started = Instant::now();
    let policy = WaitPolicy::default();
    let mut handles = Vec::with_capacity(config.producers as usize);
    for id in 0..u64::from(config.producers) {
        let producer = producer.clone();
        let spawned = thread::Builder::new()
            .name(format!("demo-producer-{id}"))
            .spawn(move || {
                let mut payload = vec![0u8; config.payload as usize];
                for sequence in 0..config.messages_per_producer {
                    let sent_ns = started.elapsed().as_nanos() as u64;
                    payload[..8].copy_from_slice(&sent_ns.to_le_bytes());
                    payload[8..16].copy_from_slice(&sequence.to_le_bytes());
                    payload[16..24].copy_from_slice(&checksum(id, sequence, sent_ns).to_le_bytes());
                    if producer.push_with(id, &payload[..], &policy, None).is_err() {
                        return; // Closed: the consumer gave up.
                    }
                }
            });
        match spawned {
            Ok(handle) => handles.push(handle),
            Err(err) => {
                consumer.close();
                for handle in handles {
                    let _ = handle.join();
                }
                return Err(RingDemoError::Thread(err.to_string()));
            }
        }
    }
    drop(producer);

    let mut next = vec![0u64; config.producers as usize];
    let mut latency_ns = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
        .map_err(|err| RingDemoError::BadParameter(err.to_string()))?;
    let mut received = 0u64;
    let mut failure = None;
    'consume: while received < total {
        let chunk = match consumer.try_read(256) {
            Ok(chunk) => chunk,
            Err(TryPopError::Empty) => {
                thread::yield_now();
                continue;
            }
            Err(err) => {
                failure = Some(err.to_string());
                break;
            }
        };
        let now_ns = started.elapsed().as_nanos() as u64;
        for message in chunk.iter() {
            let id = message.request_id as usize;
            let (sent_ns, sequence) = (word(message.payload, 0), word(message.payload, 1));
            if id >= next.len()
                || sequence != next[id]
                || word(message.payload, 2) != checksum(id as u64, sequence, sent_ns)
            {
                failure = Some(format!(
                    "message at position {} is out of order or corrupt",
                    message.position
                ));
                break 'consume;
            }
            next[id] += 1;
            latency_ns.saturating_record(now_ns.saturating_sub(sent_ns).max(1));
            received += 1;
            if received % 65_536 == 0 {
                progress(received);
            }
        }
    }
    let elapsed = started.elapsed();
    if let Some(why) = failure {
        consumer.close();
        for handle in handles {
            let _ = handle.join();
        }
        return Err(RingDemoError::Verification(why));
    }
    for handle in handles {
        let _ = handle.join();
    }
    progress(received);
    Ok(RingDemoReport {
        config,
        received,
        elapsed,
        latency_ns,
    })
}
