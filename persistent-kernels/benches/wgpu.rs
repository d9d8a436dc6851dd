//! The wgpu backend (lavapipe here and in CI) beside the persistent
//! backends, in one criterion run:
//!
//! ```text
//! cargo bench -p granary-kernels --bench wgpu
//! ```
//!
//! 1. `small_request_16B_double`: one 16-byte `double` request's round
//!    trip, submitted and then spun on until answered: through the CPU
//!    backend's persistent kernel, the OpenCL persistent kernel (POCL), and
//!    the wgpu ring path (a host thread that dispatches once per
//!    micro-batch, here a micro-batch of one). `..._x64` submits 64 at once
//!    and waits for all: the figure is per 64, so the micro-batch's
//!    amortisation shows.
//! 2. `vector_add_1M_batch`: the batch path over 1M + 1M floats, wgpu
//!    against OpenCL on POCL (and the CPU backend).
//! 3. `matmul_1024_batch`: a 1024² product on the batch path, wgpu against
//!    OpenCL on POCL.
//!
//! A backend that is not present prints why and its functions are skipped.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use granary_kernels::shipped::{DOUBLE, MATMUL, VECTOR_ADD, f32_bytes, matmul_request};
use granary_kernels::{Backend, CpuBackend, KernelConfig, PersistentKernel, StopMode, WaitPolicy};

fn backends() -> Vec<(&'static str, Box<dyn Backend>)> {
    let mut present: Vec<(&'static str, Box<dyn Backend>)> =
        vec![("cpu", Box::new(CpuBackend::new()))];
    match granary_kernels::opencl::OpenClBackend::discover() {
        Ok(opencl) => present.push(("opencl", Box::new(opencl))),
        Err(err) => println!("opencl bench: SKIPPED: {err}"),
    }
    match granary_kernels::wgpu::WgpuBackend::discover() {
        Ok(wgpu) => present.push(("wgpu", Box::new(wgpu))),
        // scripts/gpu-check.sh sets it: there a missing adapter is a failure.
        Err(err) if std::env::var_os("GRANARY_REQUIRE_WGPU").is_some_and(|v| v == "1") => {
            panic!("wgpu bench: no adapter, and GRANARY_REQUIRE_WGPU=1: {err}")
        }
        Err(err) => println!("wgpu bench: SKIPPED: {err}"),
    }
    present
}

/// Submits `requests` and spins until every answer is back.
fn round_trip(kernel: &mut dyn PersistentKernel, next: &mut u64, requests: usize, payload: &[u8]) {
    let submitter = kernel.submitter().expect("a running kernel");
    for _ in 0..requests {
        *next += 1;
        submitter.submit(*next, payload).expect("room in the ring");
    }
    let mut answered = 0;
    while answered < requests {
        match kernel.try_complete() {
            Some(done) => {
                black_box(done);
                answered += 1;
            }
            None => std::hint::spin_loop(),
        }
    }
}

fn small_requests(c: &mut Criterion, present: &[(&'static str, Box<dyn Backend>)]) {
    let payload = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    let config = KernelConfig {
        policy: WaitPolicy::busy(),
        ..KernelConfig::default()
    };
    let mut group = c.benchmark_group("small_request_16B_double");
    for (name, backend) in present {
        // One kernel at a time: on POCL a persistent kernel holds a core.
        let mut kernel = backend.launch(0, DOUBLE, &config).expect("a kernel");
        let mut next = 0;
        let label = if backend.kind().runs_persistent_kernels() {
            format!("{name}_persistent")
        } else {
            format!("{name}_micro_batch")
        };
        group.bench_function(&label, |b| {
            b.iter(|| round_trip(kernel.as_mut(), &mut next, 1, &payload))
        });
        group.bench_function(format!("{label}_x64"), |b| {
            b.iter(|| round_trip(kernel.as_mut(), &mut next, 64, &payload))
        });
        kernel.stop(StopMode::Drain, Duration::from_secs(10));
    }
    group.finish();
}

fn batches(c: &mut Criterion, present: &[(&'static str, Box<dyn Backend>)]) {
    let n = 1 << 20;
    let values: Vec<f32> = (0..2 * n).map(|i| (i % 977) as f32 * 0.5).collect();
    let add = f32_bytes(&values);
    let mut group = c.benchmark_group("vector_add_1M_batch");
    group.sample_size(20);
    for (name, backend) in present {
        group.bench_function(*name, |b| {
            b.iter(|| black_box(backend.run_batch(0, &VECTOR_ADD, &add).expect("an answer")))
        });
    }
    group.finish();
    let side = 1024;
    let a: Vec<f32> = (0..side * side).map(|i| (i % 31) as f32 * 0.25).collect();
    let product = matmul_request(side, side, side, &a, &a).expect("a square product");
    let mut group = c.benchmark_group("matmul_1024_batch");
    group.sample_size(10);
    for (name, backend) in present.iter().filter(|(name, _)| *name != "cpu") {
        group.bench_function(*name, |b| {
            b.iter(|| black_box(backend.run_batch(0, &MATMUL, &product).expect("an answer")))
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    let present = backends();
    small_requests(c, &present);
    batches(c, &present);
}

criterion_group!(wgpu_benches, benches);
criterion_main!(wgpu_benches);
