//! The `granary demo` path end to end: the library entry point and the
//! binary the README tells users to run.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use granary::ring_demo::{self as demo, RingDemoConfig, RingDemoError};

#[test]
fn demo_moves_every_message_and_reports_consistent_latency() {
    let config = RingDemoConfig {
        producers: 3,
        messages_per_producer: 20_000,
        payload: 40,
        capacity: 64,
    };
    let last = AtomicU64::new(0);
    let report = demo::run(config, |received| last.store(received, Ordering::Relaxed)).unwrap();
    assert_eq!(report.received, 60_000);
    assert_eq!(
        last.load(Ordering::Relaxed),
        60_000,
        "final progress is the total"
    );
    assert_eq!(report.latency_ns.len(), 60_000);
    assert!(report.latency_us(0.5) <= report.latency_us(0.99));
    assert!(report.throughput() > 0.0);
    let table = report.to_string();
    assert!(
        table
            .lines()
            .any(|line| line.starts_with("| messages ") && line.contains("| 60000 × 40 B ")),
        "{table}"
    );
    let widths: Vec<usize> = table.lines().map(|line| line.chars().count()).collect();
    assert!(
        widths.iter().all(|&w| w == widths[0]),
        "ragged table:\n{table}"
    );
}

#[test]
fn demo_refuses_bad_parameters_with_typed_errors() {
    let bad_payload = RingDemoConfig {
        payload: 8,
        ..RingDemoConfig::default()
    };
    assert!(matches!(
        demo::run(bad_payload, |_| {}),
        Err(RingDemoError::BadParameter(_))
    ));
    // More producer threads than the demo starts: refused, not an abort
    // in a Vec's allocation.
    let too_many = RingDemoConfig {
        producers: u32::MAX,
        ..RingDemoConfig::default()
    };
    assert!(matches!(
        demo::run(too_many, |_| {}),
        Err(RingDemoError::BadParameter(_))
    ));
    let overflowing = RingDemoConfig {
        producers: 2,
        messages_per_producer: u64::MAX,
        ..RingDemoConfig::default()
    };
    assert!(matches!(
        demo::run(overflowing, |_| {}),
        Err(RingDemoError::BadParameter(_))
    ));
    let bad_capacity = RingDemoConfig {
        capacity: 1000,
        messages_per_producer: 1,
        ..RingDemoConfig::default()
    };
    assert!(matches!(
        demo::run(bad_capacity, |_| {}),
        Err(RingDemoError::Ring(_))
    ));
}

#[test]
fn the_binary_runs_the_demo_and_prints_the_table() {
    let output = Command::new(env!("CARGO_BIN_EXE_granary"))
        .args([
            "ring-demo",
            "--producers",
            "2",
            "--messages",
            "5000",
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
    assert!(stdout.contains("| throughput "), "{stdout}");
    assert!(stdout.contains("| latency p99 "), "{stdout}");
    assert!(stdout.contains("10000 × 64 B"), "{stdout}");

    let refused = Command::new(env!("CARGO_BIN_EXE_granary"))
        .args(["ring-demo", "--capacity", "1000", "--no-progress"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not a power of two"));
}

#[test]
fn the_binary_lists_devices() {
    let output = Command::new(env!("CARGO_BIN_EXE_granary"))
        .arg("devices")
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains(" device(s):"), "{stdout}");
    assert!(
        stdout.contains("Cpu#0") && stdout.contains("MiB free of"),
        "{stdout}"
    );
    // Either an OpenCL device is listed or the backend says why it is not,
    // in the words discovery gives in this process.
    match granary::kernels::opencl::OpenClBackend::discover() {
        Ok(_) => assert!(stdout.contains("OpenCl#0"), "{stdout}"),
        Err(err) => assert!(stdout.contains(&err.to_string()), "{err}: {stdout}"),
    }
    match granary::kernels::cuda::CudaBackend::discover() {
        Ok(_) => assert!(stdout.contains("Cuda#0"), "{stdout}"),
        Err(err) => assert!(stdout.contains(&err.to_string()), "{err}: {stdout}"),
    }
    // A wgpu adapter is listed with its API and the plain statement that it
    // runs no persistent kernel; or the backend says why there is none.
    match granary::kernels::wgpu::WgpuBackend::discover() {
        Ok(backend) => {
            let api = &backend.adapters()[0].api;
            assert!(stdout.contains("Wgpu#0"), "{stdout}");
            assert!(stdout.contains(&format!("    {api} ")), "{stdout}");
            assert!(stdout.contains("runs no persistent kernel"), "{stdout}");
        }
        Err(err) => assert!(stdout.contains(&err.to_string()), "{err}: {stdout}"),
    }
    assert!(stdout.contains("runs persistent kernels"), "{stdout}");
}
