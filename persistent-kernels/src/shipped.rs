//! The kernels Granary ships: element-wise double (the latency-test
//! kernel), vector add, SAXPY, a dot-product reduction and matrix multiply.
//!
//! All values are little-endian `f32`. Each kernel has a CPU implementation
//! here and OpenCL C, CUDA C and WGSL sources in `kernels/`, with both
//! device entry points (see [`KernelSpec`]). A ring request carries at most
//! [`MAX_ELEMENTS`] elements per operand; the batch path takes up to
//! [`MAX_BATCH_ELEMENTS`] elements in all (a vector add of 1M elements, a
//! 1024² matrix multiply). The CPU implementations sum in element order,
//! as the device sources do, so results agree to the bit where the device
//! does not fuse multiply-adds.

use crate::spec::{ElementType, KernelSpec, Shape, Status, WGSL_CHUNK, Wgsl, one_pass};

/// Elements per operand a ring request may carry.
pub const MAX_ELEMENTS: u32 = 1024;

/// Elements a batch-path request may carry in all (128 MiB of `f32`).
pub const MAX_BATCH_ELEMENTS: u32 = 1 << 25;

/// `response[i] = 2 × request[i]`: the latency-test kernel.
pub const DOUBLE: KernelSpec = KernelSpec {
    id: "double",
    version: 1,
    request: Shape::between(ElementType::F32, 1, MAX_ELEMENTS, 1),
    response: Shape::between(ElementType::F32, 1, MAX_ELEMENTS, 1),
    batch_request: Shape::between(ElementType::F32, 1, MAX_BATCH_ELEMENTS, 1),
    output_len: same_len,
    opencl_c: Some(include_str!("../kernels/double.cl")),
    cuda_c: Some(include_str!("../kernels/double.cu")),
    wgsl: Some(Wgsl {
        source: include_str!("../kernels/double.wgsl"),
        passes: one_pass,
    }),
    cpu: Some(double),
};

/// `c = a + b`; the request is `a` followed by `b`, of equal length.
pub const VECTOR_ADD: KernelSpec = KernelSpec {
    id: "vector_add",
    version: 1,
    request: Shape::between(ElementType::F32, 2, 2 * MAX_ELEMENTS, 2),
    response: Shape::between(ElementType::F32, 1, MAX_ELEMENTS, 1),
    batch_request: Shape::between(ElementType::F32, 2, MAX_BATCH_ELEMENTS, 2),
    output_len: half_len,
    opencl_c: Some(include_str!("../kernels/vector_add.cl")),
    cuda_c: Some(include_str!("../kernels/vector_add.cu")),
    wgsl: Some(Wgsl {
        source: include_str!("../kernels/vector_add.wgsl"),
        passes: one_pass,
    }),
    cpu: Some(vector_add),
};

/// `y = a·x + y`; the request is the scalar `a`, then `x`, then `y`, of
/// equal length (so an odd element count). A non-finite `a` is bad input.
pub const SAXPY: KernelSpec = KernelSpec {
    id: "saxpy",
    version: 1,
    request: Shape::between(ElementType::F32, 3, 2 * MAX_ELEMENTS + 1, 1),
    response: Shape::between(ElementType::F32, 1, MAX_ELEMENTS, 1),
    batch_request: Shape::between(ElementType::F32, 3, MAX_BATCH_ELEMENTS - 1, 1),
    output_len: saxpy_len,
    opencl_c: Some(include_str!("../kernels/saxpy.cl")),
    cuda_c: Some(include_str!("../kernels/saxpy.cu")),
    wgsl: Some(Wgsl {
        source: include_str!("../kernels/saxpy.wgsl"),
        passes: one_pass,
    }),
    cpu: Some(saxpy),
};

/// `x · y`, one `f32`; the request is `x` followed by `y`.
pub const DOT: KernelSpec = KernelSpec {
    id: "dot",
    version: 1,
    request: Shape::between(ElementType::F32, 2, 2 * MAX_ELEMENTS, 2),
    response: Shape::exactly(ElementType::F32, 1),
    batch_request: Shape::between(ElementType::F32, 2, MAX_BATCH_ELEMENTS, 2),
    output_len: one_f32,
    opencl_c: Some(include_str!("../kernels/dot.cl")),
    cuda_c: Some(include_str!("../kernels/dot.cu")),
    wgsl: Some(Wgsl {
        source: include_str!("../kernels/dot.wgsl"),
        passes: dot_passes,
    }),
    cpu: Some(dot),
};

/// `C = A·B`; the request is the dimensions `n, k, m` (whole numbers as
/// `f32`), then `A` (`n×k`, row-major), then `B` (`k×m`); the response is
/// `C` (`n×m`).
pub const MATMUL: KernelSpec = KernelSpec {
    id: "matmul",
    version: 1,
    request: Shape::between(ElementType::F32, 5, 3 + 2 * MAX_ELEMENTS, 1),
    response: Shape::between(ElementType::F32, 1, MAX_ELEMENTS, 1),
    batch_request: Shape::between(ElementType::F32, 5, MAX_BATCH_ELEMENTS, 1),
    output_len: matmul_len,
    opencl_c: Some(include_str!("../kernels/matmul.cl")),
    cuda_c: Some(include_str!("../kernels/matmul.cu")),
    wgsl: Some(Wgsl {
        source: include_str!("../kernels/matmul.wgsl"),
        passes: matmul_passes,
    }),
    cpu: Some(matmul),
};

/// Every shipped kernel.
pub const ALL: [KernelSpec; 5] = [DOUBLE, VECTOR_ADD, SAXPY, DOT, MATMUL];

/// A request for [`MATMUL`]: `a` is `n×k` and `b` is `k×m`, row-major.
/// `None` if the slices do not have those lengths.
pub fn matmul_request(n: usize, k: usize, m: usize, a: &[f32], b: &[f32]) -> Option<Vec<u8>> {
    if a.len() != n.checked_mul(k)? || b.len() != k.checked_mul(m)? {
        return None;
    }
    let dims = [n as f32, k as f32, m as f32];
    Some(f32_bytes(&[&dims[..], a, b].concat()))
}

/// `values` as the bytes of a request: little-endian `f32`s, the layout
/// every shipped kernel takes.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect()
}

/// A response's bytes as `f32`s; a trailing partial element is ignored.
pub fn bytes_f32(bytes: &[u8]) -> Vec<f32> {
    floats(bytes).collect()
}

fn floats(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes.chunks_exact(4).map(|chunk| {
        let mut word = [0u8; 4];
        word.copy_from_slice(chunk);
        f32::from_le_bytes(word)
    })
}

/// Writes `values` into `out` as little-endian `f32`s; returns the bytes
/// written, or `Fault` if `out` is too small (a caller that did not size
/// the response with the kernel's `output_len`).
fn write_floats(values: impl Iterator<Item = f32>, out: &mut [u8]) -> Result<usize, Status> {
    let mut written = 0;
    for value in values {
        let slot = out.get_mut(written..written + 4).ok_or(Status::Fault)?;
        slot.copy_from_slice(&value.to_le_bytes());
        written += 4;
    }
    Ok(written)
}

fn same_len(request: &[u8]) -> Result<usize, Status> {
    Ok(request.len())
}

fn half_len(request: &[u8]) -> Result<usize, Status> {
    Ok(request.len() / 2)
}

fn one_f32(_: &[u8]) -> Result<usize, Status> {
    Ok(4)
}

/// Also checks the scalar, so the batch path rejects what the ring path
/// does.
fn saxpy_len(request: &[u8]) -> Result<usize, Status> {
    let count = request.len() / 4;
    if count % 2 == 0 {
        return Err(Status::BadLength);
    }
    let a = floats(request).next().ok_or(Status::BadLength)?;
    if !a.is_finite() {
        return Err(Status::BadInput);
    }
    Ok((count - 1) / 2 * 4)
}

/// `(n, k, m)` of a matmul request, checked against its length.
fn matmul_dims(request: &[u8]) -> Result<(usize, usize, usize), Status> {
    let mut dims = [0usize; 3];
    for (dim, value) in dims.iter_mut().zip(floats(request)) {
        // Whole numbers that f32 holds exactly.
        if !(1.0..=16_777_216.0).contains(&value) || value.fract() != 0.0 {
            return Err(Status::BadInput);
        }
        *dim = value as usize;
    }
    let [n, k, m] = dims;
    let expected = n
        .checked_mul(k)
        .zip(k.checked_mul(m))
        .and_then(|(a, b)| a.checked_add(b)?.checked_add(3));
    if expected != Some(request.len() / 4) {
        return Err(Status::BadLength);
    }
    Ok((n, k, m))
}

/// One WGSL pass per chunk of the sum's terms.
fn dot_passes(request: &[u8]) -> u32 {
    chunks(request.len() / 8)
}

/// One WGSL pass per chunk of the inner dimension.
fn matmul_passes(request: &[u8]) -> u32 {
    matmul_dims(request).map_or(1, |(_, k, _)| chunks(k))
}

fn chunks(terms: usize) -> u32 {
    u32::try_from(terms.div_ceil(WGSL_CHUNK as usize))
        .unwrap_or(u32::MAX)
        .max(1)
}

fn matmul_len(request: &[u8]) -> Result<usize, Status> {
    let (n, _, m) = matmul_dims(request)?;
    n.checked_mul(m)
        .and_then(|c| c.checked_mul(4))
        .ok_or(Status::BadInput)
}

fn double(request: &[u8], response: &mut [u8]) -> Result<usize, Status> {
    write_floats(floats(request).map(|x| 2.0 * x), response)
}

fn vector_add(request: &[u8], response: &mut [u8]) -> Result<usize, Status> {
    let (a, b) = request.split_at(request.len() / 2);
    write_floats(floats(a).zip(floats(b)).map(|(a, b)| a + b), response)
}

fn saxpy(request: &[u8], response: &mut [u8]) -> Result<usize, Status> {
    saxpy_len(request)?;
    let (scalar, vectors) = request.split_at(4);
    let a = floats(scalar).next().ok_or(Status::BadLength)?;
    let (x, y) = vectors.split_at(vectors.len() / 2);
    write_floats(floats(x).zip(floats(y)).map(|(x, y)| a * x + y), response)
}

fn dot(request: &[u8], response: &mut [u8]) -> Result<usize, Status> {
    let (x, y) = request.split_at(request.len() / 2);
    // A fold from +0.0 in element order, as the device sources sum.
    let sum = floats(x)
        .zip(floats(y))
        .fold(0.0f32, |sum, (x, y)| sum + x * y);
    write_floats(std::iter::once(sum), response)
}

fn matmul(request: &[u8], response: &mut [u8]) -> Result<usize, Status> {
    let (n, k, m) = matmul_dims(request)?;
    let values: Vec<f32> = floats(&request[12..]).collect();
    let (a, b) = values.split_at(n * k);
    let out_len = n * m * 4;
    let out = response.get_mut(..out_len).ok_or(Status::Fault)?;
    // Each C element is summed over `i` in order, as on the devices; the
    // row of B is walked through a transposed copy so the inner loop reads
    // memory in order.
    let mut b_t = vec![0.0f32; k * m];
    for i in 0..k {
        for col in 0..m {
            b_t[col * k + i] = b[i * m + col];
        }
    }
    for (row, a_row) in a.chunks_exact(k).enumerate() {
        for (col, b_col) in b_t.chunks_exact(k).enumerate() {
            let sum = a_row
                .iter()
                .zip(b_col)
                .fold(0.0f32, |sum, (x, y)| sum + x * y);
            let at = (row * m + col) * 4;
            out[at..at + 4].copy_from_slice(&sum.to_le_bytes());
        }
    }
    Ok(out_len)
}
