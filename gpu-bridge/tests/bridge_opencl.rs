//! The bridge on the OpenCL backend, run for real (POCL in CI): the same
//! scenarios as on the CPU, answered by OpenCL persistent kernels and the
//! OpenCL batch path. Reported as ignored, with the reason, where no OpenCL
//! device is found when the tests run.

mod common;

use common::gate;

use std::sync::Arc;
use std::time::Duration;

use common::{f32s, from_f32s};
use granary_gpu::{BridgeConfig, ExecuteError, GpuBridge, StopMode};
use granary_kernels::opencl::OpenClBackend;
use granary_kernels::shipped;
use granary_kernels::{BackendKind, KernelConfig};

/// Serialises these tests: a persistent kernel holds a compute unit (on
/// POCL, a host thread) while it runs, and the bridge leaves one free for
/// batch work, so on a 2-core machine one kernel runs at a time.
static DEVICE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn bridge(config: BridgeConfig) -> GpuBridge {
    let opencl = OpenClBackend::discover().expect("an OpenCL runtime was found at build time");
    GpuBridge::builder()
        .backend(Arc::new(opencl))
        .kernels(shipped::ALL)
        .config(config)
        .build()
        .unwrap()
}

/// Requests the OpenCL device answered (the bridge's first device).
fn opencl_processed(bridge: &GpuBridge) -> u64 {
    let (_, info, stats) = bridge.devices().remove(0);
    assert_eq!(info.backend, BackendKind::OpenCl);
    stats.processed
}

fn cpu_processed(bridge: &GpuBridge) -> u64 {
    let (_, info, stats) = bridge.devices().pop().unwrap();
    assert_eq!(info.backend, BackendKind::Cpu);
    stats.processed
}

async fn one_hundred_sequential_double_requests_on_opencl() {
    let _device = DEVICE.lock().await;
    let bridge = bridge(BridgeConfig::default());
    for i in 0..100 {
        let input = [i as f32, 3.25, -7.0];
        let output = bridge.execute("double", &f32s(&input)).await.unwrap();
        assert_eq!(from_f32s(&output), input.map(|x| 2.0 * x), "request {i}");
    }
    assert_eq!(
        (opencl_processed(&bridge), cpu_processed(&bridge)),
        (100, 0)
    );
    bridge.shutdown(StopMode::Drain).await;
}

async fn eight_concurrent_callers_times_ten_thousand_on_opencl() {
    let _device = DEVICE.lock().await;
    let bridge = bridge(BridgeConfig::default());
    common::double_from_concurrent_callers(&bridge, 8, 10_000).await;
    assert_eq!(opencl_processed(&bridge), 80_000);
    bridge.shutdown(StopMode::Drain).await;
}

async fn every_shipped_kernel_through_the_bridge_matches_the_cpu() {
    let _device = DEVICE.lock().await;
    let cpu_only = GpuBridge::builder().kernels(shipped::ALL).build().unwrap();
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
        // The batch path: a 1M-element vector add and a 256² product.
        (
            "vector_add",
            f32s(&(0..2 << 20).map(|i| (i % 977) as f32).collect::<Vec<_>>()),
        ),
        (
            "matmul",
            shipped::matmul_request(256, 256, 256, &vec![0.5; 256 * 256], &vec![0.25; 256 * 256])
                .unwrap(),
        ),
    ];
    for (kernel, input) in &inputs {
        // A bridge per request: one persistent kernel at a time fits.
        let bridge = bridge(BridgeConfig::default());
        let on_device = bridge.execute(kernel, input).await.unwrap();
        let on_cpu = cpu_only.execute(kernel, input).await.unwrap();
        assert_eq!(on_device, on_cpu, "{kernel} on {} bytes", input.len());
        assert_eq!(cpu_processed(&bridge), 0, "{kernel} did not fall back");
        assert_eq!(opencl_processed(&bridge), 1);
        if *kernel == "matmul" && input.len() < 100 {
            assert_eq!(from_f32s(&on_device), [58.0, 64.0, 139.0, 154.0]);
        }
        bridge.shutdown(StopMode::Drain).await;
    }
    cpu_only.shutdown(StopMode::Drain).await;
}

async fn a_busy_device_sends_further_kernels_to_the_cpu() {
    let _device = DEVICE.lock().await;
    let bridge = bridge(BridgeConfig::default());
    let units = bridge.devices()[0].1.compute_units;
    // One kernel per compute unit but the one kept free for batch work.
    let kernels = ["double", "vector_add", "saxpy", "dot", "matmul"];
    let fits = (units - 1).min(kernels.len() as u32) as usize;
    let small: Vec<Vec<u8>> = vec![
        f32s(&[1.0]),
        f32s(&[1.0, 2.0]),
        f32s(&[2.0, 1.0, 1.0]),
        f32s(&[1.0, 2.0]),
        shipped::matmul_request(1, 1, 1, &[2.0], &[3.0]).unwrap(),
    ];
    for (kernel, input) in kernels.iter().zip(&small) {
        bridge.execute(kernel, input).await.unwrap();
    }
    assert_eq!(opencl_processed(&bridge), fits as u64);
    assert_eq!(cpu_processed(&bridge), (kernels.len() - fits) as u64);
    // The batch path still runs on the device.
    let big = f32s(&vec![1.0; 4096]);
    bridge.execute("vector_add", &big).await.unwrap();
    assert_eq!(opencl_processed(&bridge), fits as u64 + 1);
    bridge.shutdown(StopMode::Drain).await;
}

async fn bad_input_and_shutdown_on_opencl() {
    let _device = DEVICE.lock().await;
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
    // Shutdown with requests in flight drains them; the kernel is warmed up
    // first, so the requests reach it before the shutdown begins.
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

fn main() {
    gate::run(vec![
        gate::opencl("one_hundred_sequential_double_requests_on_opencl", || {
            common::on_tokio(one_hundred_sequential_double_requests_on_opencl)
        }),
        gate::opencl(
            "eight_concurrent_callers_times_ten_thousand_on_opencl",
            || common::on_tokio(eight_concurrent_callers_times_ten_thousand_on_opencl),
        ),
        gate::opencl(
            "every_shipped_kernel_through_the_bridge_matches_the_cpu",
            || common::on_tokio(every_shipped_kernel_through_the_bridge_matches_the_cpu),
        ),
        gate::opencl("a_busy_device_sends_further_kernels_to_the_cpu", || {
            common::on_tokio(a_busy_device_sends_further_kernels_to_the_cpu)
        }),
        gate::opencl("bad_input_and_shutdown_on_opencl", || {
            common::on_tokio(bad_input_and_shutdown_on_opencl)
        }),
    ]);
}
