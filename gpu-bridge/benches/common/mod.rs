//! Workloads shared by the bridge benches.
#![allow(dead_code)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use granary_gpu::{BridgeConfig, GpuBridge};
use granary_kernels::shipped::{DOUBLE, f32_bytes};

/// A tokio runtime with two workers (the CI machine's cores), or
/// `GRANARY_BENCH_WORKERS`.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::env::var("GRANARY_BENCH_WORKERS")
                .ok()
                .and_then(|workers| workers.parse().ok())
                .unwrap_or(2),
        )
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The request every bench sends: a 4-element `double`.
pub fn request() -> Vec<u8> {
    f32_bytes(&[1.0, 2.0, 3.0, 4.0])
}

/// A CPU-backend bridge serving `double`, with `micro_batch`.
pub fn cpu_bridge(micro_batch: usize) -> GpuBridge {
    GpuBridge::builder()
        .kernel(DOUBLE)
        .config(BridgeConfig {
            micro_batch,
            ..BridgeConfig::default()
        })
        .build()
        .expect("a bridge")
}

/// Runs `tasks` tasks that `task` makes, all at once; returns the wall
/// time until the last has ended.
async fn all_at_once<F>(tasks: usize, task: impl Fn() -> F) -> Duration
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks).map(|_| tokio::spawn(task())).collect();
    for handle in handles {
        handle.await.unwrap();
    }
    started.elapsed()
}

/// `tasks` tasks send `per_task` requests each, all at once; returns the
/// wall time.
pub async fn fan_out(bridge: &GpuBridge, tasks: usize, per_task: usize) -> Duration {
    all_at_once(tasks, || {
        let bridge = bridge.clone();
        async move {
            let payload = request();
            for _ in 0..per_task {
                black_box(bridge.execute("double", &payload).await.unwrap());
            }
        }
    })
    .await
}

/// The shipped `double` as a typed kernel.
fn double(bridge: &GpuBridge) -> granary_gpu::Kernel<f32, f32> {
    bridge
        .kernel::<granary_gpu::shipped::Double>()
        .expect("double is registered")
}

/// `tasks` tasks send `per_task` single typed requests each (a resolved
/// `Kernel`, `call_into` a buffer of the task's own: no name looked up, no
/// `Vec` per answer), all at once; returns the wall time.
pub async fn fan_out_typed(bridge: &GpuBridge, tasks: usize, per_task: usize) -> Duration {
    let double = double(bridge);
    all_at_once(tasks, || {
        let double = double.clone();
        async move {
            let input = [1.0f32, 2.0, 3.0, 4.0];
            let mut output = [0.0f32; 4];
            for _ in 0..per_task {
                black_box(double.call_into(&input, &mut output).await.unwrap());
            }
        }
    })
    .await
}

/// `tasks` tasks send `per_task` requests each as typed groups of `group`
/// (`call_many_into`), all at once; returns the wall time.
pub async fn fan_out_groups(
    bridge: &GpuBridge,
    tasks: usize,
    per_task: usize,
    group: usize,
) -> Duration {
    assert_eq!(per_task % group, 0, "whole groups only");
    let double = double(bridge);
    all_at_once(tasks, || {
        let double = double.clone();
        async move {
            let inputs: Vec<[f32; 4]> = (0..group).map(|_| [1.0, 2.0, 3.0, 4.0]).collect();
            let mut output = vec![0.0f32; 4 * group];
            for _ in 0..per_task / group {
                for placed in double.call_many_into(&inputs, &mut output).await {
                    black_box(placed.expect("a group's request answered"));
                }
            }
        }
    })
    .await
}
