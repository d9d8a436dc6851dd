//! Helpers shared by the kernel tests: shipped kernels speak little-endian
//! `f32`s.

/// `values` as the bytes of a request.
pub fn f32s(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A response's bytes as `f32`s.
pub fn from_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

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
