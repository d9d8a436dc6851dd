//! The device broker: accounting, selection and statistics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use granary_gpu::broker::{BrokerError, DeviceBroker, DeviceId, Requirements};
use granary_kernels::{BackendKind, DeviceInfo, DeviceKind, host_device};

fn device(index: u32, kind: DeviceKind, free: u64, compute_units: u32) -> DeviceInfo {
    DeviceInfo {
        backend: if kind == DeviceKind::Cpu {
            BackendKind::Cpu
        } else {
            BackendKind::OpenCl
        },
        index,
        name: format!("test device {index}"),
        kind,
        compute_units,
        total_memory: free * 2,
        free_memory: free,
    }
}

#[test]
fn reservations_are_released_on_drop_and_refused_beyond_capacity() {
    let broker = DeviceBroker::new(vec![device(0, DeviceKind::Gpu, 1000, 8)]);
    let gpu = DeviceId(0);
    let a = broker.reserve(gpu, 600).unwrap();
    assert_eq!(broker.available(gpu), Ok(400));
    assert_eq!(
        broker.reserve(gpu, 401).unwrap_err(),
        BrokerError::InsufficientMemory {
            device: gpu,
            requested: 401,
            available: 400
        }
    );
    let b = broker.reserve(gpu, 400).unwrap();
    assert_eq!(broker.available(gpu), Ok(0));
    drop(a);
    assert_eq!(broker.available(gpu), Ok(600));
    drop(b);
    assert_eq!(broker.stats(gpu).unwrap().reserved, 0);
    assert_eq!(
        broker.reserve(DeviceId(7), 1).unwrap_err(),
        BrokerError::UnknownDevice(DeviceId(7))
    );
}

#[test]
fn concurrent_reservations_never_overcommit_and_never_go_negative() {
    const CAPACITY: u64 = 10_000;
    let broker = DeviceBroker::new(vec![device(0, DeviceKind::Gpu, CAPACITY, 8)]);
    let gpu = DeviceId(0);
    let stop = Arc::new(AtomicBool::new(false));
    let worst = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (broker, stop, worst) = (broker.clone(), stop.clone(), worst.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let reserved = broker.stats(gpu).unwrap().reserved;
                worst.fetch_max(reserved, Ordering::Relaxed);
            }
        })
    };
    let start = Arc::new(Barrier::new(4));
    let workers: Vec<_> = (0..4u64)
        .map(|t| {
            let (broker, start) = (broker.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                let mut held = Vec::new();
                let mut granted = 0u64;
                for i in 0..20_000u64 {
                    let bytes = 1 + (i * 7919 + t * 104_729) % 3_000;
                    if let Ok(reservation) = broker.reserve(gpu, bytes) {
                        granted += 1;
                        held.push(reservation);
                    }
                    if held.len() > 2 || i % 3 == 0 {
                        held.pop();
                    }
                }
                granted
            })
        })
        .collect();
    let granted: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    assert!(worst.load(Ordering::Relaxed) <= CAPACITY, "overcommitted");
    assert!(
        granted > 1_000,
        "the test must actually reserve ({granted})"
    );
    let stats = broker.stats(gpu).unwrap();
    assert_eq!((stats.reserved, stats.available), (0, CAPACITY));
}

#[test]
fn selection_prefers_free_memory_per_queued_request_within_requirements() {
    let broker = DeviceBroker::new(vec![
        device(0, DeviceKind::Cpu, 8_000, 2),
        device(1, DeviceKind::Gpu, 4_000, 80),
        device(2, DeviceKind::Gpu, 6_000, 40),
    ]);
    assert_eq!(broker.select(&Requirements::default()), Some(DeviceId(0)));
    let gpus = Requirements {
        kind: Some(DeviceKind::Gpu),
        ..Requirements::default()
    };
    assert_eq!(broker.select(&gpus), Some(DeviceId(2)));
    // Two requests queued on device 2: 6000 / 3 < 4000 / 1.
    let busy = (
        broker.begin(DeviceId(2)).unwrap(),
        broker.begin(DeviceId(2)).unwrap(),
    );
    assert_eq!(broker.select(&gpus), Some(DeviceId(1)));
    drop(busy);
    let big = Requirements {
        min_free_memory: 5_000,
        kind: Some(DeviceKind::Gpu),
        ..gpus
    };
    assert_eq!(broker.select(&big), Some(DeviceId(2)));
    let _hold = broker.reserve(DeviceId(2), 2_000).unwrap();
    assert_eq!(
        broker.select(&big),
        None,
        "no GPU has 5000 bytes unreserved now"
    );
    let wide = Requirements {
        min_compute_units: 50,
        ..Requirements::default()
    };
    assert_eq!(broker.select(&wide), Some(DeviceId(1)));
    let cuda = Requirements {
        backend: Some(BackendKind::Cuda),
        ..Requirements::default()
    };
    assert_eq!(broker.select(&cuda), None);
}

#[test]
fn statistics_count_outcomes_and_report_latency_percentiles() {
    let broker = DeviceBroker::new(vec![device(0, DeviceKind::Gpu, 1 << 20, 8)]);
    let gpu = DeviceId(0);
    for micros in 1..=100u64 {
        broker
            .begin(gpu)
            .unwrap()
            .succeed(Duration::from_micros(micros));
    }
    broker.begin(gpu).unwrap().fail();
    drop(broker.begin(gpu).unwrap()); // abandoned: counts as failed
    let pending = broker.begin(gpu).unwrap();
    let stats = broker.stats(gpu).unwrap();
    assert_eq!(
        (stats.processed, stats.failed, stats.queue_depth),
        (100, 2, 1)
    );
    let p50 = stats.latency_p50.unwrap().as_micros();
    let p99 = stats.latency_p99.unwrap().as_micros();
    assert!((49..=51).contains(&p50), "p50 {p50}");
    assert!((98..=100).contains(&p99), "p99 {p99}");
    drop(pending);
    assert_eq!(broker.stats(gpu).unwrap().queue_depth, 0);
    let empty = DeviceBroker::new(vec![device(0, DeviceKind::Gpu, 1, 1)]);
    assert_eq!(empty.stats(gpu).unwrap().latency_p50, None);
}

#[test]
fn the_host_device_describes_this_machine() {
    let host = host_device();
    assert_eq!(
        (host.backend, host.kind, host.index),
        (BackendKind::Cpu, DeviceKind::Cpu, 0)
    );
    assert!(host.compute_units >= 1);
    assert!(host.free_memory <= host.total_memory);
    if std::path::Path::new("/proc/meminfo").exists() {
        assert!(host.total_memory > 0, "read /proc/meminfo");
    }
    let broker = DeviceBroker::new(vec![host]);
    assert!(broker.reserve(DeviceId(0), 1 << 20).is_ok());
}

#[test]
fn meminfo_parsing_handles_missing_and_malformed_fields() {
    use granary_kernels::device::parse_meminfo;
    let text = "MemTotal:       24576000 kB\nMemFree: 100 kB\nMemAvailable:   20000000 kB\n";
    assert_eq!(parse_meminfo(text), (24_576_000 * 1024, 20_000_000 * 1024));
    assert_eq!(parse_meminfo("MemTotal: lots\n"), (0, 0));
    assert_eq!(parse_meminfo(""), (0, 0));
}
