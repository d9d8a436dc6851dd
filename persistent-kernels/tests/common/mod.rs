//! Helpers shared by the kernel tests: shipped kernels speak little-endian
//! `f32`s.

/// Requests and responses of the shipped kernels are little-endian `f32`s.
#[allow(unused_imports)]
pub use granary_kernels::shipped::{bytes_f32 as from_f32s, f32_bytes as f32s};

/// Deterministic pseudo-random `f32`s in `[-1, 1)` (xorshift64*), so a
/// failure reproduces.
#[allow(dead_code)]
pub fn random_f32s(seed: u64, count: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..count)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let bits = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
            bits as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Serialises the tests that launch OpenCL persistent kernels: each holds
/// compute units while it runs (on POCL, host threads), and tests running
/// side by side would be refused for want of them.
#[allow(dead_code)]
pub fn opencl_device_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[allow(dead_code)]
pub mod resident;

/// Test binaries that decide at run time whether OpenCL is there.
#[allow(dead_code)]
#[path = "../../../build-support/runtime_gate.rs"]
pub mod gate;
