//! Every shipped kernel on every backend present, checked against its CPU
//! implementation: through a persistent kernel's rings and through the
//! launch-per-batch path. The OpenCL half runs on POCL in CI and is
//! reported as ignored, with the reason, where no OpenCL device is found
//! when the tests run; the wgpu half runs on lavapipe in CI, and likewise.

mod common;

use common::gate;

use std::collections::HashMap;
use std::time::Duration;

use common::{f32s, from_f32s, random_f32s};
use granary_kernels::shipped::{self, DOT, DOUBLE, MATMUL, SAXPY, VECTOR_ADD};
use granary_kernels::{
    Backend, BackendError, CpuBackend, KernelConfig, KernelSpec, Status, StopMode,
};

const WAIT: Duration = Duration::from_secs(30);

/// Requests of several sizes for `spec`, each fitting a ring slot.
fn ring_requests(spec: &KernelSpec) -> Vec<Vec<u8>> {
    let sizes = [1usize, 2, 7, 64, 1024];
    sizes
        .iter()
        .enumerate()
        .map(|(seed, &n)| request(spec, seed as u64, n))
        .collect()
}

/// A request for `spec` with `n` elements per operand (for matmul, an
/// `n×k` by `k×m` product with about `n` elements per matrix).
fn request(spec: &KernelSpec, seed: u64, n: usize) -> Vec<u8> {
    match spec.id {
        "double" => f32s(&random_f32s(seed, n)),
        "vector_add" | "dot" => f32s(&random_f32s(seed, 2 * n)),
        "saxpy" => {
            let mut values = random_f32s(seed, 2 * n + 1);
            values[0] = 1.75;
            f32s(&values)
        }
        "matmul" => {
            let side = (n as f64).sqrt().max(1.0) as usize;
            let (rows, inner, cols) = (side, side.max(2) - 1, side);
            let a = random_f32s(seed, rows * inner);
            let b = random_f32s(seed + 100, inner * cols);
            shipped::matmul_request(rows, inner, cols, &a, &b).unwrap()
        }
        other => panic!("no request generator for {other}"),
    }
}

/// The CPU implementation's answer.
fn expected(spec: &KernelSpec, request: &[u8]) -> Vec<u8> {
    let len = (spec.output_len)(request).unwrap();
    let mut out = vec![0u8; len];
    let written = (spec.cpu.unwrap())(request, &mut out).unwrap();
    out.truncate(written);
    out
}

fn backends() -> Vec<Box<dyn Backend>> {
    let mut backends: Vec<Box<dyn Backend>> = vec![Box::new(CpuBackend::new())];
    // The OpenCL tests run only where discovery succeeds (the gate).
    if let Ok(opencl) = granary_kernels::opencl::OpenClBackend::discover() {
        backends.push(Box::new(opencl));
    }
    backends
}

fn ring_path_matches_the_cpu(backend: &dyn Backend) {
    for spec in shipped::ALL {
        let mut kernel = backend
            .launch(0, spec, &KernelConfig::default())
            .unwrap_or_else(|err| panic!("{:?} {}: {err}", backend.kind(), spec.id));
        let submitter = kernel.submitter().unwrap();
        let requests = ring_requests(&spec);
        for (id, request) in requests.iter().enumerate() {
            assert!(spec.fits_ring(request), "{} request {id}", spec.id);
            submitter.submit(id as u64, request.as_slice()).unwrap();
        }
        let mut answers = HashMap::new();
        for _ in 0..requests.len() {
            let done = kernel.complete(WAIT).expect("an answer");
            answers.insert(done.request_id, done);
        }
        for (id, request) in requests.iter().enumerate() {
            let done = &answers[&(id as u64)];
            assert_eq!(done.status, Status::Ok, "{:?} {}", backend.kind(), spec.id);
            assert!(
                common::matches_cpu(
                    backend.kind(),
                    spec.id,
                    request,
                    &done.payload,
                    &expected(&spec, request)
                ),
                "{:?} {} request {id}: {:?}",
                backend.kind(),
                spec.id,
                from_f32s(&done.payload).get(..4)
            );
        }
        let report = kernel.stop(StopMode::Drain, WAIT);
        assert!(report.exited);
    }
}

fn batch_path_matches_the_cpu(backend: &dyn Backend) {
    for spec in [DOUBLE, VECTOR_ADD, SAXPY, DOT] {
        let request = request(&spec, 7, 100_000);
        assert!(!spec.fits_ring(&request));
        let answer = backend.run_batch(0, &spec, &request).unwrap();
        assert!(
            common::matches_cpu(
                backend.kind(),
                spec.id,
                &request,
                &answer,
                &expected(&spec, &request)
            ),
            "{:?} {}",
            backend.kind(),
            spec.id
        );
    }
    // A 1024² matrix multiply; 2000 sampled elements are checked against a
    // dot product of a row of A and a column of B, summed in order.
    let n = 1024;
    let a = random_f32s(1, n * n);
    let b = random_f32s(2, n * n);
    let request = shipped::matmul_request(n, n, n, &a, &b).unwrap();
    let c = from_f32s(&backend.run_batch(0, &MATMUL, &request).unwrap());
    assert_eq!(c.len(), n * n);
    for sample in 0..2000usize {
        let at = sample.wrapping_mul(2_654_435_761) % (n * n);
        let (row, col) = (at / n, at % n);
        let want = (0..n).fold(0.0f32, |sum, i| sum + a[row * n + i] * b[i * n + col]);
        // wgpu may contract the multiply-adds (`common::fused_answer`).
        let fused = (0..n).fold(0.0f32, |sum, i| a[row * n + i].mul_add(b[i * n + col], sum));
        let contracts = backend.kind() == granary_kernels::BackendKind::Wgpu;
        assert!(
            c[at] == want || (contracts && c[at] == fused),
            "{:?} C[{row}][{col}]: {} not {want}",
            backend.kind(),
            c[at]
        );
    }
}

fn bad_input_comes_back_as_a_status(backend: &dyn Backend) {
    let mut kernel = backend.launch(0, MATMUL, &KernelConfig::default()).unwrap();
    let submitter = kernel.submitter().unwrap();
    // Dimensions that are not whole numbers, and dimensions that do not
    // match the data.
    submitter
        .submit(1, f32s(&[1.5, 1.0, 1.0, 2.0, 3.0]))
        .unwrap();
    submitter
        .submit(2, f32s(&[2.0, 2.0, 2.0, 1.0, 2.0]))
        .unwrap();
    let mut statuses: Vec<_> = (0..2)
        .map(|_| {
            let done = kernel.complete(WAIT).unwrap();
            assert!(done.payload.is_empty());
            (done.request_id, done.status)
        })
        .collect();
    statuses.sort_by_key(|(id, _)| *id);
    assert_eq!(statuses, [(1, Status::BadInput), (2, Status::BadLength)]);
    // The kernel keeps serving.
    let good = request(&MATMUL, 3, 16);
    submitter.submit(3, good.as_slice()).unwrap();
    assert_eq!(
        kernel.complete(WAIT).unwrap().payload,
        expected(&MATMUL, &good)
    );
    assert!(kernel.stop(StopMode::Drain, WAIT).exited);
    // Batch-path bad input is a typed error.
    assert!(matches!(
        backend.run_batch(0, &SAXPY, &f32s(&[f32::NAN, 1.0, 2.0])),
        Err(BackendError::Rejected(Status::BadInput))
    ));
}

fn stopping_with_requests_in_flight(backend: &dyn Backend) {
    for mode in [StopMode::Drain, StopMode::Abandon] {
        let mut kernel = backend.launch(0, DOUBLE, &KernelConfig::default()).unwrap();
        let submitter = kernel.submitter().unwrap();
        let payload = f32s(&[1.0; 256]);
        let mut submitted = 0u64;
        while submitted < 1000 && submitter.submit(submitted, payload.as_slice()).is_ok() {
            submitted += 1;
        }
        let report = kernel.stop(mode, WAIT);
        assert!(report.exited, "{:?} {mode:?}", backend.kind());
        let mut seen: Vec<u64> = report.completions.iter().map(|c| c.request_id).collect();
        seen.extend(&report.abandoned);
        seen.sort_unstable();
        seen.dedup();
        let answered = report.completions.len() + report.abandoned.len();
        assert_eq!(seen.len(), answered, "no request reported twice");
        if mode == StopMode::Drain {
            assert_eq!(report.completions.len() as u64, submitted, "all drained");
        } else {
            assert!(answered as u64 <= submitted);
        }
        assert!(submitter.submit(0, payload.as_slice()).is_err(), "closed");
    }
}

fn cpu_ring_path_matches_the_cpu_implementations() {
    ring_path_matches_the_cpu(&CpuBackend::new());
}

fn cpu_batch_path_runs_every_kernel() {
    batch_path_matches_the_cpu(&CpuBackend::new());
}

fn cpu_bad_input_and_stops() {
    bad_input_comes_back_as_a_status(&CpuBackend::new());
    stopping_with_requests_in_flight(&CpuBackend::new());
}

fn opencl_ring_path_matches_the_cpu_implementations() {
    let _device = common::opencl_device_lock();
    ring_path_matches_the_cpu(backends()[1].as_ref());
}

fn opencl_batch_path_matches_the_cpu_implementations() {
    let _device = common::opencl_device_lock();
    batch_path_matches_the_cpu(backends()[1].as_ref());
}

fn opencl_bad_input_and_stops() {
    let _device = common::opencl_device_lock();
    let backends = backends();
    bad_input_comes_back_as_a_status(backends[1].as_ref());
    stopping_with_requests_in_flight(backends[1].as_ref());
}

fn wgpu() -> granary_kernels::wgpu::WgpuBackend {
    granary_kernels::wgpu::WgpuBackend::discover().expect("a wgpu adapter (lavapipe in CI)")
}

fn wgpu_ring_path_matches_the_cpu_implementations() {
    ring_path_matches_the_cpu(&wgpu());
}

fn wgpu_batch_path_matches_the_cpu_implementations() {
    batch_path_matches_the_cpu(&wgpu());
}

fn wgpu_bad_input_and_stops() {
    let backend = wgpu();
    bad_input_comes_back_as_a_status(&backend);
    stopping_with_requests_in_flight(&backend);
}

fn main() {
    gate::run(vec![
        gate::wgpu(
            "wgpu_ring_path_matches_the_cpu_implementations",
            wgpu_ring_path_matches_the_cpu_implementations,
        ),
        gate::wgpu(
            "wgpu_batch_path_matches_the_cpu_implementations",
            wgpu_batch_path_matches_the_cpu_implementations,
        ),
        gate::wgpu("wgpu_bad_input_and_stops", wgpu_bad_input_and_stops),
        gate::test(
            "cpu_ring_path_matches_the_cpu_implementations",
            cpu_ring_path_matches_the_cpu_implementations,
        ),
        gate::test(
            "cpu_batch_path_runs_every_kernel",
            cpu_batch_path_runs_every_kernel,
        ),
        gate::test("cpu_bad_input_and_stops", cpu_bad_input_and_stops),
        gate::opencl(
            "opencl_ring_path_matches_the_cpu_implementations",
            opencl_ring_path_matches_the_cpu_implementations,
        ),
        gate::opencl(
            "opencl_batch_path_matches_the_cpu_implementations",
            opencl_batch_path_matches_the_cpu_implementations,
        ),
        gate::opencl("opencl_bad_input_and_stops", opencl_bad_input_and_stops),
    ]);
}
