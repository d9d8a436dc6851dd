//! What exporting metrics costs the hot paths: the local ask and the GPU
//! bridge's ring round trip, each with and without the Prometheus exporter
//! (`metrics-exporter-prometheus`, as `granary node` installs it for its
//! admin endpoint), in one criterion run.
//!
//! ```text
//! cargo bench -p granary --bench metrics_cost
//! ```
//!
//! A process has one global `metrics` recorder, installed once. So the
//! bench installs a switch: a recorder that hands out the exporter's
//! handles while it is on and no-op handles while it is off. The "without"
//! bridge launches its kernel (and registers its handles) while the switch
//! is off, the "with" bridge while it is on, so the two run side by side
//! in one process with exactly what each would have alone. An upkeep
//! thread folds the exporter's histograms every 5 s, as the admin endpoint
//! does. The actor runtime records nothing through the facade (its
//! statistics are its own counters, on in both), so the ask pair shows the
//! exporter costs it nothing; it is measured anyway.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use granary::actors::{Grain, GrainContext, GrainKey, Handler, Message, Silo};
use granary::gpu::GpuBridge;
use granary::kernels::shipped::{self, f32_bytes};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

/// The switch (module docs).
struct Switch {
    on: AtomicBool,
    exporter: PrometheusRecorder,
}

impl Recorder for Switch {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.exporter.describe_counter(key, unit, description);
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.exporter.describe_gauge(key, unit, description);
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.exporter.describe_histogram(key, unit, description);
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        if self.on.load(Ordering::Acquire) {
            self.exporter.register_counter(key, metadata)
        } else {
            Counter::noop()
        }
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        if self.on.load(Ordering::Acquire) {
            self.exporter.register_gauge(key, metadata)
        } else {
            Gauge::noop()
        }
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        if self.on.load(Ordering::Acquire) {
            self.exporter.register_histogram(key, metadata)
        } else {
            Histogram::noop()
        }
    }
}

struct Counter64(u64);
impl Grain for Counter64 {
    fn new(_: &GrainKey) -> Counter64 {
        Counter64(0)
    }
}
struct Add(u64);
impl Message for Add {
    type Reply = u64;
}
impl Handler<Add> for Counter64 {
    async fn handle(&mut self, Add(n): Add, _: &mut GrainContext) -> u64 {
        self.0 += n;
        self.0
    }
}

fn silo() -> Silo {
    Silo::builder()
        .register::<Counter64>("counter")
        .build()
        .expect("a silo")
}

fn bridge(rt: &tokio::runtime::Runtime) -> GpuBridge {
    let bridge = GpuBridge::builder()
        .kernel(shipped::DOUBLE)
        .build()
        .expect("a bridge");
    // The first request launches the kernel, registering its handles with
    // the recorder the switch hands out now.
    rt.block_on(bridge.execute("double", &f32_bytes(&[1.0])))
        .expect("the kernel answers");
    bridge
}

fn metrics_cost(c: &mut Criterion) {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("granary_gpu_request_seconds".into()),
            &[
                1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 1.0,
            ],
        )
        .expect("buckets")
        .build_recorder();
    let handle = recorder.handle();
    let switch = Arc::new(Switch {
        on: AtomicBool::new(false),
        exporter: recorder,
    });
    // `metrics` implements `Recorder` for `Arc<R>`: the bench keeps a
    // handle on the switch.
    metrics::set_global_recorder(switch.clone()).expect("the only recorder");
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_secs(5));
            handle.run_upkeep();
        }
    });

    // One thread, as the actors bench runs the local ask.
    let local = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let (silo_without, bridge_without) = (silo(), bridge(&rt));
    switch.on.store(true, Ordering::Release);
    let (silo_with, bridge_with) = (silo(), bridge(&rt));

    let mut group = c.benchmark_group("metrics_cost/ask");
    for (name, silo) in [("without", &silo_without), ("with", &silo_with)] {
        let counter = silo.grain::<Counter64>(1u64);
        group.bench_function(name, |b| {
            b.iter(|| {
                local
                    .block_on(counter.call(Add(black_box(1))))
                    .expect("answered")
            })
        });
    }
    group.finish();

    let input = f32_bytes(&[1.5, 2.5]);
    let mut group = c.benchmark_group("metrics_cost/bridge_round_trip");
    for (name, bridge) in [("without", &bridge_without), ("with", &bridge_with)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(bridge.execute("double", black_box(&input)))
                    .expect("answered")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, metrics_cost);
criterion_main!(benches);
