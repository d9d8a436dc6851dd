//! The bridge on the CUDA backend, with its peers, in one criterion run.
//!
//! ```text
//! GRANARY_BENCH_WORKERS=8 cargo bench -p granary-gpu --bench bridge_cuda
//! ```
//!
//! - `bridge_cuda_round_trip/bridge_execute`: one 4-element `double` at a
//!   time from a tokio task through `GpuBridge::execute` and the CUDA
//!   persistent kernel; `launch_per_request`: the same input through the
//!   CUDA batch path (stream, staging, `cuLaunchKernel`, copies back) on
//!   tokio's blocking pool.
//! - `bridge_cuda_throughput/*`: 256 tasks each sending 256 requests, all
//!   in flight at once; criterion's throughput is requests per second, with
//!   the default micro-batch (16) and with 64, and as typed groups of 64
//!   (`call_many_into`, one ring claim and one wake per group).
//!
//! Without a GPU it prints why and measures nothing.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use granary_gpu::{BridgeConfig, FallbackPolicy, GpuBridge};
use granary_kernels::cuda::CudaBackend;
use granary_kernels::shipped::DOUBLE;
use granary_kernels::{Backend, KernelConfig, StopMode, WaitPolicy};

mod common;
use common::{fan_out, fan_out_groups, request, runtime};

fn cuda_bridge(backend: &Arc<CudaBackend>, micro_batch: usize) -> GpuBridge {
    GpuBridge::builder()
        .backend(backend.clone())
        .kernel(DOUBLE)
        .config(BridgeConfig {
            micro_batch,
            fallback: FallbackPolicy::Fail,
            kernel: KernelConfig {
                capacity: 4096,
                policy: WaitPolicy::busy(),
                ..KernelConfig::default()
            },
            ..BridgeConfig::default()
        })
        .build()
        .expect("a bridge")
}

fn benches(c: &mut Criterion) {
    let backend = match CudaBackend::discover() {
        Ok(backend) => Arc::new(backend),
        Err(err) => {
            eprintln!("bridge_cuda bench: SKIPPED: {err}");
            return;
        }
    };
    let rt = runtime();
    let payload = request();

    let mut group = c.benchmark_group("bridge_cuda_round_trip");
    group.measurement_time(Duration::from_secs(3));
    let bridge = cuda_bridge(&backend, BridgeConfig::default().micro_batch);
    group.bench_function("bridge_execute", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(bridge.execute("double", &payload).await.unwrap()) })
    });
    rt.block_on(bridge.shutdown(StopMode::Drain));
    group.bench_function("launch_per_request", |b| {
        b.to_async(&rt).iter(|| {
            let (backend, payload) = (backend.clone(), payload.clone());
            async move {
                let answer = tokio::task::spawn_blocking(move || {
                    Backend::run_batch(&*backend, 0, &DOUBLE, &payload)
                })
                .await
                .unwrap()
                .unwrap();
                black_box(answer)
            }
        })
    });
    group.finish();

    let (tasks, per_task) = (256, 256);
    let mut group = c.benchmark_group("bridge_cuda_throughput");
    group.throughput(Throughput::Elements((tasks * per_task) as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for (name, micro_batch) in [("micro_batch_16", 16), ("micro_batch_64", 64)] {
        let bridge = cuda_bridge(&backend, micro_batch);
        rt.block_on(bridge.execute("double", &request())).unwrap();
        group.bench_function(name, |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    total += rt.block_on(fan_out(&bridge, tasks, per_task));
                }
                total
            })
        });
        rt.block_on(bridge.shutdown(StopMode::Drain));
    }
    // The same requests as typed groups of 64 (`call_many_into`).
    let bridge = cuda_bridge(&backend, BridgeConfig::default().micro_batch);
    rt.block_on(bridge.execute("double", &request())).unwrap();
    group.bench_function("typed_groups_of_64", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                total += rt.block_on(fan_out_groups(&bridge, tasks, per_task, 64));
            }
            total
        })
    });
    rt.block_on(bridge.shutdown(StopMode::Drain));
    group.finish();
}

criterion_group!(bridge_cuda, benches);
criterion_main!(bridge_cuda);
