//! Helpers shared by the bridge tests.
#![allow(dead_code)]

use std::thread;
use std::time::Duration;

use granary_kernels::{ElementType, KernelSpec, Shape, Status};

/// `values` as request bytes.
pub fn f32s(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Response bytes as `f32`s.
pub fn from_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
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
    cpu: Some(stall),
};

/// How long [`STALL`] stalls.
pub const STALL_FOR: Duration = Duration::from_secs(6);

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
