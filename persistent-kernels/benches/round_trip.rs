//! One small request's round trip through a CPU persistent kernel, against
//! launching the work per request (a fresh thread, the CPU backend's
//! analogue of a kernel launch), in one criterion run.
//!
//! ```text
//! cargo bench -p granary-kernels --bench round_trip
//! ```
//!
//! The persistent side submits one 16-byte `double` request and spins on
//! `try_complete` until its answer is back: the raw ring round trip, with no
//! async layer. Criterion's figure is the median over samples of the mean
//! time per round trip.

use std::hint::black_box;
use std::thread;

use criterion::{Criterion, criterion_group, criterion_main};
use granary_kernels::shipped::DOUBLE;
use granary_kernels::{CpuPersistentKernel, KernelConfig, WaitPolicy};

fn request() -> Vec<u8> {
    [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("round_trip_16B_double");
    let config = KernelConfig {
        policy: WaitPolicy::busy(),
        ..KernelConfig::default()
    };
    let mut kernel = CpuPersistentKernel::launch(DOUBLE, config).unwrap();
    let payload = request();
    let mut id = 0u64;
    group.bench_function("persistent_kernel", |b| {
        b.iter(|| {
            id += 1;
            kernel.submit(id, &payload[..]).unwrap();
            loop {
                if let Some(done) = kernel.try_complete() {
                    break black_box(done);
                }
                std::hint::spin_loop();
            }
        })
    });
    let cpu = DOUBLE.cpu.unwrap();
    group.bench_function("launch_per_request", |b| {
        b.iter(|| {
            let request = payload.clone();
            thread::spawn(move || {
                let mut out = vec![0u8; 16];
                let n = cpu(&request, &mut out).unwrap();
                out.truncate(n);
                out
            })
            .join()
            .unwrap()
        })
    });
    group.finish();
    drop(kernel);
}

criterion_group!(round_trip, benches);
criterion_main!(round_trip);
