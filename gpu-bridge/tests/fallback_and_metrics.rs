//! CPU fallback when a device cannot build or run a kernel, and the metrics
//! the bridge reports. A device backend whose builds always fail stands in
//! for a broken driver, so this runs on every machine.

mod common;

use std::sync::Arc;

use common::{f32s, from_f32s};
use granary_gpu::{BridgeConfig, ExecuteError, FallbackPolicy, GpuBridge, StopMode};
use granary_kernels::shipped;
use granary_kernels::{
    Backend, BackendError, BackendKind, DeviceInfo, DeviceKind, KernelConfig, KernelSpec,
    PersistentKernel,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// A "GPU" whose compiler rejects everything.
struct BrokenCompiler;

const LOG: &str = "error: this driver builds nothing";

impl Backend for BrokenCompiler {
    fn kind(&self) -> BackendKind {
        BackendKind::OpenCl
    }
    fn devices(&self) -> Vec<DeviceInfo> {
        vec![DeviceInfo {
            backend: BackendKind::OpenCl,
            index: 0,
            name: "broken".into(),
            kind: DeviceKind::Gpu,
            compute_units: 8,
            total_memory: 1 << 30,
            free_memory: 1 << 30,
        }]
    }
    fn prepare(&self, _: usize, spec: &KernelSpec) -> Result<(), BackendError> {
        Err(BackendError::Build {
            kernel: spec.id,
            log: LOG.into(),
        })
    }
    fn launch(
        &self,
        device: usize,
        spec: KernelSpec,
        _: &KernelConfig,
    ) -> Result<Box<dyn PersistentKernel>, BackendError> {
        self.prepare(device, &spec).map(|()| unreachable!())
    }
    fn run_batch(
        &self,
        device: usize,
        spec: &KernelSpec,
        _: &[u8],
    ) -> Result<Vec<u8>, BackendError> {
        self.prepare(device, spec).map(|()| unreachable!())
    }
}

fn broken_bridge(fallback: FallbackPolicy) -> GpuBridge {
    GpuBridge::builder()
        .backend(Arc::new(BrokenCompiler))
        .kernels(shipped::ALL)
        .config(BridgeConfig {
            fallback,
            ..BridgeConfig::default()
        })
        .build()
        .unwrap()
}

type Entries = Vec<(
    metrics_util::CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;

/// Counters accumulate across snapshots here: each snapshot drains them.
struct Counters {
    snapshotter: Snapshotter,
    seen: Entries,
}

impl Counters {
    fn take(&mut self) {
        self.seen.extend(self.snapshotter.snapshot().into_vec());
    }
}

fn counter(counters: &mut Counters, name: &str, label: (&str, &str)) -> u64 {
    counters.take();
    counters
        .seen
        .iter()
        .filter(|(key, _, _, _)| {
            key.key().name() == name
                && key
                    .key()
                    .labels()
                    .any(|l| l.key() == label.0 && l.value() == label.1)
        })
        .map(|(_, _, _, value)| match value {
            DebugValue::Counter(count) => *count,
            _ => 0,
        })
        .sum()
}

fn histogram_count(counters: &mut Counters, name: &str) -> usize {
    counters.take();
    counters
        .seen
        .iter()
        .filter(|(key, _, _, _)| key.key().name() == name)
        .map(|(_, _, _, value)| match value {
            DebugValue::Histogram(values) => values.len(),
            _ => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_failure_and_metrics() {
    // One test, so the process-wide recorder sees only this test's calls.
    let recorder = DebuggingRecorder::new();
    let mut counters = Counters {
        snapshotter: recorder.snapshotter(),
        seen: Vec::new(),
    };
    recorder.install().unwrap();

    // Fall back: the requests succeed on the CPU, and are counted.
    let bridge = broken_bridge(FallbackPolicy::Cpu);
    for i in 0..10 {
        let output = bridge.execute("double", &f32s(&[i as f32])).await.unwrap();
        assert_eq!(from_f32s(&output), [2.0 * i as f32]);
    }
    let big = f32s(&vec![1.0; 4096]);
    assert_eq!(
        from_f32s(&bridge.execute("vector_add", &big).await.unwrap()),
        vec![2.0; 2048]
    );
    let devices = bridge.devices();
    let (gpu, cpu) = (&devices[0], &devices[1]);
    assert_eq!(gpu.1.name, "broken");
    assert_eq!(gpu.2.processed, 0);
    assert_eq!(cpu.2.processed, 11);
    assert_eq!(
        counter(
            &mut counters,
            "granary_gpu_fallbacks_total",
            ("kernel", "double")
        ),
        10
    );
    assert_eq!(
        counter(
            &mut counters,
            "granary_gpu_fallbacks_total",
            ("kernel", "vector_add")
        ),
        1
    );
    assert_eq!(
        counter(
            &mut counters,
            "granary_gpu_requests_total",
            ("backend", "Cpu")
        ),
        11
    );
    assert!(histogram_count(&mut counters, "granary_gpu_request_seconds") >= 11);

    // Fail: the build log comes back, typed, and the bridge keeps serving.
    let strict = broken_bridge(FallbackPolicy::Fail);
    for _ in 0..2 {
        match strict.execute("double", &f32s(&[1.0])).await {
            Err(ExecuteError::Compile {
                kernel,
                backend,
                log,
            }) => {
                assert_eq!(
                    (kernel, backend, log.as_str()),
                    ("double", BackendKind::OpenCl, LOG)
                );
            }
            other => panic!("expected a compile error, got {other:?}"),
        }
    }
    assert!(matches!(
        strict.execute("vector_add", &big).await,
        Err(ExecuteError::Compile { .. })
    ));
    // A kernel-rejected input counts as a failure with its reason.
    let rejected = bridge.execute("saxpy", &f32s(&[f32::NAN, 1.0, 2.0])).await;
    assert!(matches!(rejected, Err(ExecuteError::Rejected { .. })));
    assert!(
        counter(
            &mut counters,
            "granary_gpu_failures_total",
            ("reason", "rejected")
        ) >= 1
    );
    assert!(
        counter(
            &mut counters,
            "granary_gpu_failures_total",
            ("reason", "compile")
        ) >= 1
    );
    // The batch request's staging buffer came from the pool, and the pool
    // reports.
    counters.take();
    for name in [
        "granary_gpu_pool_hits_total",
        "granary_gpu_pool_misses_total",
    ] {
        assert!(
            counters
                .seen
                .iter()
                .any(|(key, _, _, _)| key.key().name() == name),
            "{name}"
        );
    }
    assert!(bridge.staging_pool_stats().misses >= 1);
    // Device memory gauges exist for both devices.
    counters.take();
    let mut gauges: Vec<String> = counters
        .seen
        .iter()
        .filter(|(key, _, _, _)| key.key().name() == "granary_gpu_device_memory_free_bytes")
        .map(|(key, _, _, _)| format!("{:?}", key.key().labels().collect::<Vec<_>>()))
        .collect();
    gauges.sort();
    gauges.dedup();
    assert_eq!(gauges.len(), 2, "{gauges:?}");
    bridge.shutdown(StopMode::Drain).await;
    strict.shutdown(StopMode::Drain).await;
}
