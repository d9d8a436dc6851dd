//! The bridge on the wgpu backend, run for real (lavapipe in CI): the
//! scenarios of the OpenCL suite, answered by micro-batch dispatches on the
//! ring path (wgpu runs no persistent kernel) and by the wgpu batch path,
//! and resident buffers that live on the wgpu device and move to the CPU
//! and back. Reported as ignored, with the reason, where no wgpu adapter
//! opens a device when the tests run.

mod common;

use common::gate;

use std::sync::Arc;
use std::time::Duration;

use common::{f32s, from_f32s};
use granary_gpu::{BridgeConfig, ExecuteError, GpuBridge, Output, Part, Requirements, StopMode};
use granary_kernels::shipped;
use granary_kernels::wgpu::WgpuBackend;
use granary_kernels::{BackendKind, KernelConfig};

fn bridge(config: BridgeConfig) -> GpuBridge {
    let wgpu = WgpuBackend::discover().expect("a wgpu adapter (lavapipe in CI)");
    GpuBridge::builder()
        .backend(Arc::new(wgpu))
        .kernels(shipped::ALL)
        .config(config)
        .build()
        .unwrap()
}

/// Requests the wgpu device answered (the bridge's first device).
fn wgpu_processed(bridge: &GpuBridge) -> u64 {
    let (_, info, stats) = bridge.devices().remove(0);
    assert_eq!(info.backend, BackendKind::Wgpu);
    stats.processed
}

fn cpu_processed(bridge: &GpuBridge) -> u64 {
    let (_, info, stats) = bridge.devices().pop().unwrap();
    assert_eq!(info.backend, BackendKind::Cpu);
    stats.processed
}

async fn one_hundred_sequential_double_requests_on_wgpu() {
    let bridge = bridge(BridgeConfig::default());
    for i in 0..100 {
        let input = [i as f32, 3.25, -7.0];
        let output = bridge.execute("double", &f32s(&input)).await.unwrap();
        assert_eq!(from_f32s(&output), input.map(|x| 2.0 * x), "request {i}");
    }
    assert_eq!((wgpu_processed(&bridge), cpu_processed(&bridge)), (100, 0));
    bridge.shutdown(StopMode::Drain).await;
}

async fn eight_concurrent_callers_times_two_thousand_on_wgpu() {
    let bridge = bridge(BridgeConfig::default());
    common::double_from_concurrent_callers(&bridge, 8, 2_000).await;
    assert_eq!(wgpu_processed(&bridge), 16_000);
    bridge.shutdown(StopMode::Drain).await;
}

async fn every_shipped_kernel_through_the_bridge_matches_the_cpu() {
    let cpu_only = GpuBridge::builder().kernels(shipped::ALL).build().unwrap();
    let bridge = bridge(BridgeConfig::default());
    let inputs: Vec<(&str, Vec<u8>)> = vec![
        ("double", f32s(&[1.0, -2.5, 1e-7])),
        ("vector_add", f32s(&[1.0, 2.0, 3.0, 4.0])),
        ("saxpy", f32s(&[0.5, 1.0, 2.0, 10.0, 20.0])),
        ("dot", f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])),
        (
            "matmul",
            shipped::matmul_request(
                2,
                3,
                2,
                &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                &[7.0, 8.0, 9.0, 10.0, 11.0, 12.0],
            )
            .unwrap(),
        ),
        // The batch path: a 1M-element vector add, a 256² product and a
        // dot product longer than one WGSL pass.
        (
            "vector_add",
            f32s(&(0..2 << 20).map(|i| (i % 977) as f32).collect::<Vec<_>>()),
        ),
        (
            "matmul",
            shipped::matmul_request(256, 256, 256, &vec![0.5; 256 * 256], &vec![0.25; 256 * 256])
                .unwrap(),
        ),
        (
            "dot",
            f32s(
                &(0..200_000)
                    .map(|i| (i % 13) as f32 * 0.5)
                    .collect::<Vec<_>>(),
            ),
        ),
    ];
    for (done, (kernel, input)) in inputs.iter().enumerate() {
        let on_device = bridge.execute(kernel, input).await.unwrap();
        let on_cpu = cpu_only.execute(kernel, input).await.unwrap();
        assert_eq!(on_device, on_cpu, "{kernel} on {} bytes", input.len());
        assert_eq!(
            wgpu_processed(&bridge),
            done as u64 + 1,
            "{kernel} ran on wgpu"
        );
        if *kernel == "matmul" && input.len() < 100 {
            assert_eq!(from_f32s(&on_device), [58.0, 64.0, 139.0, 154.0]);
        }
    }
    assert_eq!(cpu_processed(&bridge), 0, "nothing fell back");
    bridge.shutdown(StopMode::Drain).await;
    cpu_only.shutdown(StopMode::Drain).await;
}

async fn bad_input_and_shutdown_on_wgpu() {
    let bridge = bridge(BridgeConfig {
        kernel: KernelConfig {
            capacity: 256,
            ..KernelConfig::default()
        },
        hang_timeout: Duration::from_secs(30),
        ..BridgeConfig::default()
    });
    // A device-side rejection comes back typed; the kernel keeps serving.
    let bad_dims = f32s(&[1.5, 1.0, 1.0, 2.0, 3.0]);
    assert!(matches!(
        bridge.execute("matmul", &bad_dims).await,
        Err(ExecuteError::Rejected {
            kernel: "matmul",
            ..
        })
    ));
    let good = shipped::matmul_request(1, 1, 1, &[3.0], &[4.0]).unwrap();
    assert_eq!(
        from_f32s(&bridge.execute("matmul", &good).await.unwrap()),
        [12.0]
    );
    bridge.shutdown(StopMode::Drain).await;
    // Shutdown with requests in flight drains them.
    let bridge = self::bridge(BridgeConfig {
        hang_timeout: Duration::from_secs(30),
        ..BridgeConfig::default()
    });
    bridge.execute("double", &f32s(&[0.0])).await.unwrap();
    let calls: Vec<_> = (0..200)
        .map(|i| {
            let bridge = bridge.clone();
            tokio::spawn(async move { bridge.execute("double", &f32s(&[i as f32; 256])).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    bridge.shutdown(StopMode::Drain).await;
    let mut answered = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(output) => {
                assert_eq!(output.len(), 1024);
                answered += 1;
            }
            Err(ExecuteError::ShutDown) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(answered > 0);
    assert_eq!(
        bridge.execute("double", &f32s(&[1.0])).await,
        Err(ExecuteError::ShutDown)
    );
}

/// A resident buffer lives on the wgpu device, serves in-place batches,
/// and moves to the CPU device through the host and back with its bytes.
async fn a_resident_buffer_lives_on_wgpu_and_moves_through_the_host() {
    let bridge = bridge(BridgeConfig::default());
    let n = 3000;
    let start: Vec<f32> = (0..n).map(|i| (i % 100) as f32 * 0.125).collect();
    let buffer = bridge
        .allocate_resident(n * 4, &Requirements::default())
        .await
        .unwrap();
    assert_eq!(buffer.backend(), BackendKind::Wgpu, "a primary device");
    buffer.import(f32s(&start)).await.unwrap();
    let scalar = f32s(&[2.0]);
    bridge
        .execute_resident(
            "saxpy",
            &[
                Part::Host(&scalar),
                Part::Resident(&buffer),
                Part::Resident(&buffer),
            ],
            Output::Into(&buffer),
        )
        .await
        .unwrap();
    let tripled: Vec<f32> = start.iter().map(|y| 2.0 * y + y).collect();
    assert_eq!(from_f32s(&buffer.export().await.unwrap()), tripled);
    let on_wgpu = buffer.device();
    let cpu = bridge
        .devices()
        .into_iter()
        .find(|(_, info, _)| info.backend == BackendKind::Cpu)
        .map(|(id, _, _)| id)
        .expect("the CPU fallback device");
    let moved = bridge.relocate(&buffer, cpu).await.unwrap();
    assert!(!moved.direct, "two backends: through the host");
    assert_eq!(buffer.backend(), BackendKind::Cpu);
    assert_eq!(from_f32s(&buffer.export().await.unwrap()), tripled);
    bridge.relocate(&buffer, on_wgpu).await.unwrap();
    assert_eq!(buffer.backend(), BackendKind::Wgpu);
    assert_eq!(from_f32s(&buffer.export().await.unwrap()), tripled);
}

fn main() {
    gate::run(vec![
        gate::wgpu("one_hundred_sequential_double_requests_on_wgpu", || {
            common::on_tokio(one_hundred_sequential_double_requests_on_wgpu)
        }),
        gate::wgpu(
            "eight_concurrent_callers_times_two_thousand_on_wgpu",
            || common::on_tokio(eight_concurrent_callers_times_two_thousand_on_wgpu),
        ),
        gate::wgpu(
            "every_shipped_kernel_through_the_bridge_matches_the_cpu",
            || common::on_tokio(every_shipped_kernel_through_the_bridge_matches_the_cpu),
        ),
        gate::wgpu("bad_input_and_shutdown_on_wgpu", || {
            common::on_tokio(bad_input_and_shutdown_on_wgpu)
        }),
        gate::wgpu(
            "a_resident_buffer_lives_on_wgpu_and_moves_through_the_host",
            || common::on_tokio(a_resident_buffer_lives_on_wgpu_and_moves_through_the_host),
        ),
    ]);
}
