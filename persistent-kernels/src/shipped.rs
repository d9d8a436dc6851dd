//! The kernels Granary ships, with their CPU implementations.
//!
//! All values are little-endian `f32`. Request sizes are bounded so that a
//! request fits one ring slot of [`MAX_ELEMENTS`] `f32`s per operand; larger
//! inputs take the bridge's batch path. [`DOUBLE`] has its OpenCL C
//! `granary_process`, run by the OpenCL persistent kernel and checked
//! against the CPU result; the others' device sources (and every CUDA C
//! source) are still to come.

use crate::spec::{ElementType, KernelSpec, Shape, Status};

/// Elements per operand a ring request may carry.
pub const MAX_ELEMENTS: u32 = 1024;

/// `response[i] = 2 × request[i]`: the latency-test kernel.
pub const DOUBLE: KernelSpec = KernelSpec {
    id: "double",
    version: 1,
    request: Shape::between(ElementType::F32, 1, MAX_ELEMENTS, 1),
    response: Shape::between(ElementType::F32, 1, MAX_ELEMENTS, 1),
    opencl_c: Some(DOUBLE_OPENCL),
    cuda_c: None,
    cpu: Some(double),
};

/// `c = a + b`; the request is `a` followed by `b`, of equal length.
pub const VECTOR_ADD: KernelSpec = KernelSpec {
    id: "vector_add",
    version: 1,
    request: Shape::between(ElementType::F32, 2, 2 * MAX_ELEMENTS, 2),
    response: Shape::between(ElementType::F32, 1, MAX_ELEMENTS, 1),
    opencl_c: None,
    cuda_c: None,
    cpu: Some(vector_add),
};

/// `y = a·x + y`; the request is the scalar `a`, then `x`, then `y`, of
/// equal length (so an odd element count).
pub const SAXPY: KernelSpec = KernelSpec {
    id: "saxpy",
    version: 1,
    request: Shape::between(ElementType::F32, 3, 2 * MAX_ELEMENTS + 1, 1),
    response: Shape::between(ElementType::F32, 1, MAX_ELEMENTS, 1),
    opencl_c: None,
    cuda_c: None,
    cpu: Some(saxpy),
};

/// `x · y`, one `f32`; the request is `x` followed by `y`.
pub const DOT: KernelSpec = KernelSpec {
    id: "dot",
    version: 1,
    request: Shape::between(ElementType::F32, 2, 2 * MAX_ELEMENTS, 2),
    response: Shape::exactly(ElementType::F32, 1),
    opencl_c: None,
    cuda_c: None,
    cpu: Some(dot),
};

/// `granary_process` for [`DOUBLE`] in OpenCL C: payloads are 16-byte
/// aligned in their slots, so they can be read as `float`s.
const DOUBLE_OPENCL: &str = r#"
uint granary_process(global const uchar* request, uint request_len,
                     global uchar* response, uint response_max, uint* response_len) {
    if (request_len == 0u || request_len % 4u != 0u || request_len > response_max) return 1u;
    global const float* in = (global const float*)request;
    global float* out = (global float*)response;
    for (uint i = 0; i < request_len / 4u; i++) out[i] = 2.0f * in[i];
    *response_len = request_len;
    return 0u;
}
"#;

/// Every shipped kernel.
pub const ALL: [KernelSpec; 4] = [DOUBLE, VECTOR_ADD, SAXPY, DOT];

fn floats(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes.chunks_exact(4).map(|chunk| {
        let mut word = [0u8; 4];
        word.copy_from_slice(chunk);
        f32::from_le_bytes(word)
    })
}

/// Writes `values` into `out` as little-endian `f32`s; returns the bytes
/// written, or `Fault` if `out` is too small (a response shape that does
/// not match the kernel).
fn write_floats(values: impl Iterator<Item = f32>, out: &mut [u8]) -> Result<usize, Status> {
    let mut written = 0;
    for value in values {
        let slot = out.get_mut(written..written + 4).ok_or(Status::Fault)?;
        slot.copy_from_slice(&value.to_le_bytes());
        written += 4;
    }
    Ok(written)
}

fn double(request: &[u8], response: &mut [u8]) -> Result<usize, Status> {
    write_floats(floats(request).map(|x| 2.0 * x), response)
}

fn vector_add(request: &[u8], response: &mut [u8]) -> Result<usize, Status> {
    let (a, b) = request.split_at(request.len() / 2);
    write_floats(floats(a).zip(floats(b)).map(|(a, b)| a + b), response)
}

fn saxpy(request: &[u8], response: &mut [u8]) -> Result<usize, Status> {
    let count = request.len() / 4;
    if count % 2 == 0 {
        return Err(Status::BadLength);
    }
    let (scalar, vectors) = request.split_at(4);
    let a = floats(scalar).next().ok_or(Status::BadLength)?;
    if !a.is_finite() {
        return Err(Status::BadInput);
    }
    let (x, y) = vectors.split_at(vectors.len() / 2);
    write_floats(floats(x).zip(floats(y)).map(|(x, y)| a * x + y), response)
}

fn dot(request: &[u8], response: &mut [u8]) -> Result<usize, Status> {
    let (x, y) = request.split_at(request.len() / 2);
    let sum: f32 = floats(x).zip(floats(y)).map(|(x, y)| x * y).sum();
    write_floats(std::iter::once(sum), response)
}
