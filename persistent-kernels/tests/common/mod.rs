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
