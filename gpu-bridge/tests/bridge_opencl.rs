//! The bridge on the OpenCL backend, run for real (POCL in CI): the same
//! scenarios as on the CPU, answered by OpenCL persistent kernels and the
//! OpenCL batch path. Reported as ignored, with the reason, where no OpenCL
//! device is found when the tests run.

mod common;

use common::{device, gate};

use std::sync::Arc;

use common::f32s;
use granary_gpu::{BridgeConfig, GpuBridge, StopMode};
use granary_kernels::BackendKind;
use granary_kernels::opencl::OpenClBackend;
use granary_kernels::shipped;

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

/// Requests the OpenCL device answered.
fn opencl_processed(bridge: &GpuBridge) -> u64 {
    device::processed_on(bridge, BackendKind::OpenCl)
}

fn cpu_processed(bridge: &GpuBridge) -> u64 {
    device::processed_on(bridge, BackendKind::Cpu)
}

async fn one_hundred_sequential_double_requests_on_opencl() {
    let _device = DEVICE.lock().await;
    device::one_hundred_sequential_doubles(bridge(BridgeConfig::default()), BackendKind::OpenCl)
        .await;
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
    device::every_shipped_kernel_matches_the_cpu(
        || bridge(BridgeConfig::default()),
        BackendKind::OpenCl,
    )
    .await;
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
    device::bad_input_and_shutdown(bridge).await;
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
