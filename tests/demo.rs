//! `granary demo` end to end: the library entry point on every backend
//! present, and the binary the README tells users to run.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use granary::demo::{self, DemoConfig, DemoError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_checks_every_answer_and_reports_each_backend_and_path() {
    let config = DemoConfig {
        callers: 8,
        requests: 4_000,
        small_elements: 4,
        batch_every: 250,
        batch_elements: 4096,
        grains: 50,
        // At 50, 150, ... per caller: never where a batch request falls.
        fan_out_every: 100,
        fan_out: 8,
    };
    let (backends, skipped) = demo::backends();
    let present = backends.len();
    let last = Arc::new(AtomicU64::new(0));
    let seen = last.clone();
    let report = demo::run(config, backends, skipped, move |done| {
        seen.store(done, Ordering::Relaxed)
    })
    .await
    .unwrap();
    // A ring, a fan-out and a batch row per backend.
    assert_eq!(report.paths.len(), 3 * present);
    for rows in report.paths.chunks(3) {
        let (ring, fan_out, batch) = (&rows[0], &rows[1], &rows[2]);
        assert_eq!(
            (ring.path, fan_out.path, batch.path),
            ("ring", "fan-out", "batch")
        );
        // 8 callers × 500 calls: 2 batch and 5 fan-out calls each, of 8
        // requests per fan-out.
        assert_eq!(batch.requests, 8 * 2);
        assert_eq!(fan_out.requests, 8 * 5 * 8);
        assert_eq!(fan_out.latency_ns.len(), 8 * 5);
        assert_eq!(ring.requests, 4_000 - 8 * 2 - 8 * 5);
        assert!(ring.latency_us(0.5) <= ring.latency_us(0.99));
        assert!(ring.throughput() > 0.0);
        assert!(fan_out.throughput() > 0.0);
    }
    assert!(last.load(Ordering::Relaxed) > 0);
    // Every grain was activated once per backend.
    assert_eq!(report.activations, 50 * present as u64);
    let table = report.to_string();
    assert!(
        table.starts_with("| backend |    path | requests |"),
        "{table}"
    );
    let widths: Vec<usize> = table
        .lines()
        .filter(|line| line.starts_with('|'))
        .map(|line| line.chars().count())
        .collect();
    assert!(
        widths.iter().all(|&w| w == widths[0]),
        "ragged table:\n{table}"
    );
}

#[tokio::test]
async fn bad_parameters_are_typed_errors() {
    for config in [
        DemoConfig {
            callers: 0,
            ..DemoConfig::default()
        },
        DemoConfig {
            callers: u32::MAX,
            ..DemoConfig::default()
        },
        DemoConfig {
            batch_elements: 1 << 24,
            ..DemoConfig::default()
        },
        DemoConfig {
            small_elements: 2000,
            ..DemoConfig::default()
        },
        DemoConfig {
            batch_elements: 16,
            ..DemoConfig::default()
        },
        DemoConfig {
            grains: 0,
            ..DemoConfig::default()
        },
        DemoConfig {
            fan_out: 1,
            ..DemoConfig::default()
        },
    ] {
        assert!(matches!(
            demo::run(config, Vec::new(), Vec::new(), |_| {}).await,
            Err(DemoError::BadParameter(_))
        ));
    }
}

#[test]
fn the_binary_runs_the_demo_and_prints_the_table() {
    let output = Command::new(env!("CARGO_BIN_EXE_granary"))
        .args([
            "demo",
            "--callers",
            "4",
            "--requests",
            "3000",
            "--batch-every",
            "100",
            "--no-progress",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("|     Cpu |    ring |"), "{stdout}");
    assert!(stdout.contains("|     Cpu | fan-out |"), "{stdout}");
    assert!(stdout.contains("|     Cpu |   batch |"), "{stdout}");
    assert!(stdout.contains("req/s"), "{stdout}");
    assert!(
        stdout.contains("grain activations over 1000 grains"),
        "{stdout}"
    );
    // A knob of the other demo is refused, not ignored: the single-node
    // demo runs on every backend present and knows no `--calls`; the
    // multi-node demo has no callers of its own.
    for args in [
        &["demo", "--backend", "cuda"][..],
        &["demo", "--calls", "5"],
        &["demo", "--nodes", "3", "--callers", "4"],
        &["demo", "--nodes", "3", "--batch-every", "0"],
    ] {
        let refused = Command::new(env!("CARGO_BIN_EXE_granary"))
            .args(args)
            .output()
            .unwrap();
        assert!(!refused.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            stderr.contains("cannot be used with") || stderr.contains("required"),
            "{args:?}: {stderr}"
        );
    }
    let refused = Command::new(env!("CARGO_BIN_EXE_granary"))
        .args(["demo", "--callers", "0", "--no-progress"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("at least one caller"));
}
