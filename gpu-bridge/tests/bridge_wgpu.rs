//! The bridge on the wgpu backend, run for real (lavapipe in CI): the
//! scenarios of the OpenCL suite, answered by micro-batch dispatches on the
//! ring path (wgpu runs no persistent kernel) and by the wgpu batch path,
//! and resident buffers that live on the wgpu device and move to the CPU
//! and back; a lost device routed around. Reported as ignored, with the
//! reason, where no wgpu adapter
//! opens a device when the tests run.

mod common;

use common::{device, gate};

use std::sync::Arc;

use common::{f32s, from_f32s};
use granary_gpu::{BridgeConfig, GpuBridge, Output, Part, Requirements, StopMode};
use granary_kernels::BackendKind;
use granary_kernels::shipped;
use granary_kernels::wgpu::WgpuBackend;

fn bridge(config: BridgeConfig) -> GpuBridge {
    let wgpu = WgpuBackend::discover().expect("a wgpu adapter (lavapipe in CI)");
    GpuBridge::builder()
        .backend(Arc::new(wgpu))
        .kernels(shipped::ALL)
        .config(config)
        .build()
        .unwrap()
}

async fn one_hundred_sequential_double_requests_on_wgpu() {
    device::one_hundred_sequential_doubles(bridge(BridgeConfig::default()), BackendKind::Wgpu)
        .await;
}

async fn eight_concurrent_callers_times_two_thousand_on_wgpu() {
    let bridge = bridge(BridgeConfig::default());
    common::double_from_concurrent_callers(&bridge, 8, 2_000).await;
    assert_eq!(device::processed_on(&bridge, BackendKind::Wgpu), 16_000);
    bridge.shutdown(StopMode::Drain).await;
}

async fn every_shipped_kernel_through_the_bridge_on_wgpu_matches_the_cpu() {
    device::every_shipped_kernel_matches_the_cpu(
        || bridge(BridgeConfig::default()),
        BackendKind::Wgpu,
    )
    .await;
}

async fn bad_input_and_shutdown_on_wgpu() {
    device::bad_input_and_shutdown(bridge).await;
}

/// The ring's dispatches queue behind a long batch on the device's one
/// queue (a 1024² product takes about a second on lavapipe); the ring
/// thread beats while it waits, so the bridge's hang detection, here at
/// 300 ms, never takes it for hung, and every small request is answered.
async fn a_long_batch_does_not_make_the_ring_look_hung() {
    let bridge = bridge(BridgeConfig {
        hang_timeout: std::time::Duration::from_millis(300),
        ..BridgeConfig::default()
    });
    bridge.execute("double", &f32s(&[1.0])).await.unwrap();
    let side = 1024;
    let a: Vec<f32> = (0..side * side).map(|i| (i % 31) as f32 * 0.25).collect();
    let product = shipped::matmul_request(side, side, side, &a, &a).unwrap();
    let long = {
        let bridge = bridge.clone();
        tokio::spawn(async move { bridge.execute("matmul", &product).await })
    };
    let mut during = 0;
    while !long.is_finished() {
        let doubled = bridge.execute("double", &f32s(&[during as f32])).await;
        assert_eq!(
            from_f32s(&doubled.expect("answered, not taken for hung")),
            [2.0 * during as f32]
        );
        during += 1;
    }
    let product = long.await.unwrap().expect("the long batch");
    assert_eq!(product.len(), side * side * 4);
    assert!(during > 0, "small requests ran while the batch did");
    assert_eq!(device::processed_on(&bridge, BackendKind::Cpu), 0);
    bridge.shutdown(StopMode::Drain).await;
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

/// A lost device (destroyed here, as a driver reset would leave it) ends
/// its ring kernel (`ring.rs` rule 6 of the kernels' wgpu backend): the
/// bridge takes the kernel for hung, cannot relaunch it on the lost
/// device, and routes the kernel's requests around it (to the CPU
/// fallback here). Every call meanwhile gets a typed answer.
async fn a_lost_device_is_routed_around() {
    use granary_gpu::ExecuteError;
    use std::time::{Duration, Instant};
    let wgpu = Arc::new(WgpuBackend::discover().expect("a wgpu adapter (lavapipe in CI)"));
    let bridge = GpuBridge::builder()
        .backend(wgpu.clone())
        .kernels(shipped::ALL)
        .config(BridgeConfig {
            hang_timeout: Duration::from_millis(300),
            ..BridgeConfig::default()
        })
        .build()
        .unwrap();
    let doubled = bridge.execute("double", &f32s(&[1.0])).await.unwrap();
    assert_eq!(from_f32s(&doubled), [2.0]);
    assert_eq!(device::processed_on(&bridge, BackendKind::Wgpu), 1);
    let cpu = device::processed_on(&bridge, BackendKind::Cpu);
    // Every wgpu device: the bridge may have used any.
    for index in 0..wgpu.devices().len() {
        wgpu.destroy_device(index).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut failed = 0;
    loop {
        match bridge.execute("double", &f32s(&[3.0])).await {
            Ok(doubled) => {
                assert_eq!(from_f32s(&doubled), [6.0]);
                break;
            }
            // While the bridge learns: the lost device's fault, the hang
            // it is taken for, or a request that met the failed relaunch.
            Err(
                ExecuteError::KernelFault { .. }
                | ExecuteError::DeviceHung { .. }
                | ExecuteError::DeviceFailed { .. },
            ) => {
                failed += 1;
            }
            Err(other) => panic!("a lost device's request: {other}"),
        }
        assert!(
            Instant::now() < deadline,
            "the bridge still sends to the lost device after {failed} failed requests"
        );
    }
    // From now on every request is answered by the CPU fallback.
    for n in 0..20 {
        let doubled = bridge.execute("double", &f32s(&[n as f32])).await.unwrap();
        assert_eq!(from_f32s(&doubled), [2.0 * n as f32]);
    }
    assert_eq!(device::processed_on(&bridge, BackendKind::Wgpu), 1);
    assert!(device::processed_on(&bridge, BackendKind::Cpu) >= cpu + 21);
    // Destroying a lost device again does nothing.
    wgpu.destroy_device(0).unwrap();
    bridge.shutdown(StopMode::Abandon).await;
}

fn main() {
    gate::run(vec![
        gate::wgpu("a_lost_device_is_routed_around", || {
            common::on_tokio(a_lost_device_is_routed_around)
        }),
        gate::wgpu("one_hundred_sequential_double_requests_on_wgpu", || {
            common::on_tokio(one_hundred_sequential_double_requests_on_wgpu)
        }),
        gate::wgpu(
            "eight_concurrent_callers_times_two_thousand_on_wgpu",
            || common::on_tokio(eight_concurrent_callers_times_two_thousand_on_wgpu),
        ),
        gate::wgpu(
            "every_shipped_kernel_through_the_bridge_on_wgpu_matches_the_cpu",
            || common::on_tokio(every_shipped_kernel_through_the_bridge_on_wgpu_matches_the_cpu),
        ),
        gate::wgpu("a_long_batch_does_not_make_the_ring_look_hung", || {
            common::on_tokio(a_long_batch_does_not_make_the_ring_look_hung)
        }),
        gate::wgpu("bad_input_and_shutdown_on_wgpu", || {
            common::on_tokio(bad_input_and_shutdown_on_wgpu)
        }),
        gate::wgpu(
            "a_resident_buffer_lives_on_wgpu_and_moves_through_the_host",
            || common::on_tokio(a_resident_buffer_lives_on_wgpu_and_moves_through_the_host),
        ),
    ]);
}
