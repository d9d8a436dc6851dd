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

/// The CPU's answer for a shipped kernel computed with fused multiply-adds
/// (`a * b + c` in one rounding), summed in the same order: what a device
/// returns whose compiler contracts the kernel's multiply-adds. WGSL cannot
/// forbid it (naga marks none NoContraction), so the wgpu tests accept this
/// answer or the plain one, to the bit. `None` for kernels with no
/// multiply-add (double, vector_add).
#[allow(dead_code)]
pub fn fused_answer(kernel: &str, request: &[u8]) -> Option<Vec<u8>> {
    let values = from_f32s(request);
    let fused_dot = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .fold(0.0f32, |sum, (x, y)| x.mul_add(*y, sum))
    };
    let out: Vec<f32> = match kernel {
        "saxpy" => {
            let (a, rest) = values.split_first()?;
            let (x, y) = rest.split_at(rest.len() / 2);
            x.iter().zip(y).map(|(x, y)| a.mul_add(*x, *y)).collect()
        }
        "dot" => {
            let (x, y) = values.split_at(values.len() / 2);
            vec![fused_dot(x, y)]
        }
        "matmul" => {
            let (n, k, m) = (values[0] as usize, values[1] as usize, values[2] as usize);
            let (a, b) = values[3..].split_at(n * k);
            let mut c = Vec::with_capacity(n * m);
            for row in 0..n {
                for col in 0..m {
                    let column: Vec<f32> = (0..k).map(|i| b[i * m + col]).collect();
                    c.push(fused_dot(&a[row * k..(row + 1) * k], &column));
                }
            }
            c
        }
        _ => return None,
    };
    Some(f32s(&out))
}

/// Whether `got` is the CPU's answer `plain`, or, on a backend that may
/// contract multiply-adds (wgpu), the fused answer.
#[allow(dead_code)]
pub fn matches_cpu(
    kind: granary_kernels::BackendKind,
    kernel: &str,
    request: &[u8],
    got: &[u8],
    plain: &[u8],
) -> bool {
    got == plain
        || (kind == granary_kernels::BackendKind::Wgpu
            && fused_answer(kernel, request).is_some_and(|fused| fused == got))
}
