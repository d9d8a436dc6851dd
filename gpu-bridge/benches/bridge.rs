//! The bridge's async API, with its peers, in one criterion run.
//!
//! ```text
//! cargo bench -p granary-gpu --bench bridge
//! ```
//!
//! - `bridge_round_trip/*`: one small request at a time (a 4-element
//!   `double`) from a tokio task, awaited before the next.
//!   - `cpu/bridge_execute`: through `GpuBridge::execute` and the CPU
//!     backend's persistent kernel;
//!   - `cpu/spawn_blocking_per_request`: the CPU backend's launch per
//!     request, the same work handed to tokio's blocking pool;
//!   - `opencl/bridge_execute` and `opencl/launch_per_request` (the OpenCL
//!     backend's batch path for the same input: buffers, a kernel launch,
//!     a blocking read), where an OpenCL runtime is present.
//! - `bridge_throughput/*`: 256 tasks each sending independent requests
//!   with up to 256 in flight; criterion's throughput is requests per
//!   second. `micro_batch_16` is the default configuration; `no_batching`
//!   sets `micro_batch` to 1, so every request takes its own ring claim.
//!   Both send through `GpuBridge::execute` (a name looked up, bytes in, a
//!   `Vec` out); `typed_call_into` sends the same requests through a
//!   resolved typed kernel, `call_into` a buffer of each task's own.
//! - `bridge_many_64/*`: one task sends 64 groups of 64 small requests:
//!   `bridge_execute_many` (bytes in, every answer in one buffer out),
//!   `typed_call_many_into` (`f32`s in, answers straight into one caller
//!   buffer), against `raw_kernel_batch`, the CPU kernel fed the same 64
//!   as one batch by its submitter and drained by spinning, with no bridge.
//!
//! The runtime has two worker threads, the machine's core count in CI;
//! `GRANARY_BENCH_WORKERS=n` sets another count.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use granary_gpu::shipped::Double;
use granary_gpu::{BridgeConfig, GpuBridge};
use granary_kernels::shipped::DOUBLE;
use granary_kernels::{Backend, CpuBackend};

mod common;
use common::{cpu_bridge, fan_out, fan_out_typed, request, runtime};

fn round_trip(c: &mut Criterion) {
    let rt = runtime();
    let payload = request();
    let mut group = c.benchmark_group("bridge_round_trip");

    let bridge = cpu_bridge(BridgeConfig::default().micro_batch);
    group.bench_function("cpu/bridge_execute", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(bridge.execute("double", &payload).await.unwrap()) })
    });
    rt.block_on(bridge.shutdown(granary_kernels::StopMode::Drain));

    let cpu = Arc::new(CpuBackend::new());
    group.bench_function("cpu/spawn_blocking_per_request", |b| {
        b.to_async(&rt).iter(|| {
            let (cpu, payload) = (cpu.clone(), payload.clone());
            async move {
                let answer =
                    tokio::task::spawn_blocking(move || cpu.run_batch(0, &DOUBLE, &payload))
                        .await
                        .unwrap()
                        .unwrap();
                black_box(answer)
            }
        })
    });

    match granary_kernels::opencl::OpenClBackend::discover() {
        Ok(opencl) => {
            let opencl = Arc::new(opencl);
            let bridge = GpuBridge::builder()
                .backend(opencl.clone())
                .kernel(DOUBLE)
                .build()
                .expect("a bridge");
            group.bench_function("opencl/bridge_execute", |b| {
                b.to_async(&rt)
                    .iter(|| async { black_box(bridge.execute("double", &payload).await.unwrap()) })
            });
            rt.block_on(bridge.shutdown(granary_kernels::StopMode::Drain));
            group.bench_function("opencl/launch_per_request", |b| {
                b.to_async(&rt).iter(|| {
                    let (opencl, payload) = (opencl.clone(), payload.clone());
                    async move {
                        let answer = tokio::task::spawn_blocking(move || {
                            opencl.run_batch(0, &DOUBLE, &payload)
                        })
                        .await
                        .unwrap()
                        .unwrap();
                        black_box(answer)
                    }
                })
            });
        }
        Err(err) => eprintln!("bridge_round_trip/opencl skipped: {err}"),
    }
    group.finish();
}

fn throughput(c: &mut Criterion) {
    let rt = runtime();
    let (tasks, per_task) = (256, 64);
    let mut group = c.benchmark_group("bridge_throughput");
    group.throughput(Throughput::Elements((tasks * per_task) as u64));
    group.sample_size(30);
    let default = BridgeConfig::default().micro_batch;
    for (name, micro_batch, typed) in [
        ("cpu/micro_batch_16", 16, false),
        ("cpu/no_batching", 1, false),
        ("cpu/typed_call_into", default, true),
    ] {
        let bridge = cpu_bridge(micro_batch);
        // Launch the kernel before measuring.
        rt.block_on(bridge.execute("double", &request())).unwrap();
        group.bench_function(name, |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    total += if typed {
                        rt.block_on(fan_out_typed(&bridge, tasks, per_task))
                    } else {
                        rt.block_on(fan_out(&bridge, tasks, per_task))
                    };
                }
                total
            })
        });
        rt.block_on(bridge.shutdown(granary_kernels::StopMode::Drain));
    }
    group.finish();
}

/// `execute_many` of 64 small requests from one task, against the raw
/// kernel fed the same 64 as one batch by its submitter (as the
/// `round_trip` bench of `granary-kernels` feeds it) and drained by
/// spinning on its response ring.
fn many(c: &mut Criterion) {
    const BATCH: usize = 64;
    const ROUNDS: usize = 64;
    let rt = runtime();
    let mut group = c.benchmark_group("bridge_many_64");
    group.throughput(Throughput::Elements((BATCH * ROUNDS) as u64));
    let inputs: Vec<Vec<u8>> = (0..BATCH).map(|_| request()).collect();

    let bridge = cpu_bridge(BridgeConfig::default().micro_batch);
    rt.block_on(bridge.execute("double", &request())).unwrap();
    group.bench_function("cpu/bridge_execute_many", |b| {
        b.to_async(&rt).iter(|| async {
            for _ in 0..ROUNDS {
                let answers = bridge.execute_many("double", &inputs).await;
                black_box(answers);
            }
        })
    });
    let double = bridge.kernel::<Double>().expect("double is registered");
    let typed: Vec<[f32; 4]> = (0..BATCH).map(|_| [1.0, 2.0, 3.0, 4.0]).collect();
    let mut output = vec![0.0f32; 4 * BATCH];
    group.bench_function("cpu/typed_call_many_into", |b| {
        b.iter_custom(|iterations| {
            rt.block_on(async {
                let started = std::time::Instant::now();
                for _ in 0..iterations {
                    for _ in 0..ROUNDS {
                        let placed = double.call_many_into(&typed, &mut output).await;
                        black_box(placed);
                    }
                }
                started.elapsed()
            })
        })
    });
    rt.block_on(bridge.shutdown(granary_kernels::StopMode::Drain));

    let mut kernel =
        granary_kernels::CpuPersistentKernel::launch(DOUBLE, BridgeConfig::default().kernel)
            .expect("a kernel");
    let submitter = kernel.submitter();
    let mut next = 0u64;
    group.bench_function("cpu/raw_kernel_batch", |b| {
        b.iter(|| {
            for _ in 0..ROUNDS {
                let batch: Vec<(u64, &[u8])> = inputs
                    .iter()
                    .map(|input| {
                        next += 1;
                        (next, input.as_slice())
                    })
                    .collect();
                submitter.submit_batch(&batch).expect("room for the batch");
                let mut answered = 0;
                while answered < BATCH {
                    answered += kernel.try_complete_each(BATCH - answered, &mut |completion| {
                        black_box(completion.payload);
                    });
                    std::hint::spin_loop();
                }
            }
        })
    });
    group.finish();
}

criterion_group!(benches, round_trip, throughput, many);
criterion_main!(benches);
