//! Helpers shared by the bridge tests.
#![allow(dead_code)]

use std::thread;
use std::time::Duration;

use granary_gpu::GpuBridge;
use granary_kernels::{ElementType, KernelSpec, Shape, Status};

/// Requests and responses of the shipped kernels are little-endian `f32`s.
pub use granary_kernels::shipped::{bytes_f32 as from_f32s, f32_bytes as f32s};

/// Test binaries that decide at run time whether OpenCL or wgpu is there.
#[path = "../../../build-support/runtime_gate.rs"]
pub mod gate;

pub mod device;

/// Runs an async test body on a two-worker tokio runtime, as
/// `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]` would.
pub fn on_tokio<F: std::future::Future<Output = ()>>(body: impl FnOnce() -> F) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime for the test")
        .block_on(body());
}

/// `callers` tasks each send `each` `double` requests, every one unique to
/// its caller and turn, and check every answer: nothing lost, nothing
/// mixed up.
pub async fn double_from_concurrent_callers(bridge: &GpuBridge, callers: u32, each: u32) {
    let tasks: Vec<_> = (0..callers)
        .map(|caller| {
            let bridge = bridge.clone();
            tokio::spawn(async move {
                for i in 0..each {
                    let input = [caller as f32, i as f32];
                    let output = bridge.execute("double", &f32s(&input)).await.unwrap();
                    assert_eq!(from_f32s(&output), input.map(|x| 2.0 * x));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// The input value that makes [`STALL`] stall.
pub const STALL_ON: f32 = 42.0;

/// Echoes one `f32`; stalls for [`STALL_FOR`] when it is [`STALL_ON`],
/// standing in for a device kernel that stops making progress.
pub const STALL: KernelSpec = KernelSpec {
    id: "stall",
    version: 1,
    request: Shape::exactly(ElementType::F32, 1),
    response: Shape::exactly(ElementType::F32, 1),
    batch_request: Shape::exactly(ElementType::F32, 1),
    output_len: |_| Ok(4),
    opencl_c: None,
    cuda_c: None,
    wgsl: None,
    cpu: Some(stall),
};

/// How long [`STALL`] stalls.
pub const STALL_FOR: Duration = Duration::from_secs(12);

fn stall(request: &[u8], response: &mut [u8]) -> Result<usize, Status> {
    if from_f32s(request) == [STALL_ON] {
        thread::sleep(STALL_FOR);
    }
    response[..4].copy_from_slice(request);
    Ok(4)
}

/// Takes one `f32` and sleeps that many milliseconds: a slow kernel.
pub const SLOW: KernelSpec = KernelSpec {
    id: "slow",
    cpu: Some(slow),
    ..STALL
};

fn slow(request: &[u8], response: &mut [u8]) -> Result<usize, Status> {
    let millis = from_f32s(request)[0];
    thread::sleep(Duration::from_millis(millis as u64));
    response[..4].copy_from_slice(request);
    Ok(4)
}
