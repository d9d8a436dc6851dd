//! A resident grain's update, with its data kept on the device, against the
//! same update sending the data each time, in one criterion run.
//!
//! ```text
//! cargo bench -p granary-gpu --bench resident
//! ```
//!
//! The update is `y = a·y + y` (SAXPY) over 1M `f32`s (4 MiB).
//! - `*/resident`: `execute_resident` with `y` in a resident buffer, both
//!   parts and the output: only the 4-byte scalar goes to the device.
//! - `*/send_each_time`: `execute` with the 8 MiB request `[a, y, y]`
//!   built on the host, and the 4 MiB answer brought back, as a grain
//!   without resident buffers must.
//!
//! On the CPU backend the device's memory is host memory, so the
//! difference is the copies and allocations alone; on OpenCL (POCL in CI,
//! host memory too) it adds the transfers; on CUDA it is bus traffic: 8 MiB
//! up and 4 MiB back each time against 4 bytes.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use granary_gpu::{GpuBridge, Output, Part, Requirements};
use granary_kernels::shipped::{SAXPY, f32_bytes};

mod common;
use common::runtime;

const ELEMENTS: usize = 1 << 20;

fn bridges() -> Vec<(&'static str, GpuBridge)> {
    let mut bridges = vec![(
        "cpu",
        GpuBridge::builder()
            .kernel(SAXPY)
            .build()
            .expect("a CPU bridge"),
    )];
    // Where a GPU is (built here, run on the GPU machine by
    // scripts/gpu-check.sh); elsewhere it says why and measures the rest.
    match granary_kernels::cuda::CudaBackend::discover() {
        Ok(cuda) => bridges.push((
            "cuda",
            GpuBridge::builder()
                .backend(Arc::new(cuda))
                .kernel(SAXPY)
                .build()
                .expect("a CUDA bridge"),
        )),
        Err(err) => eprintln!("resident bench: cuda SKIPPED: {err}"),
    }
    match granary_kernels::opencl::OpenClBackend::discover() {
        Ok(opencl) => bridges.push((
            "opencl",
            GpuBridge::builder()
                .backend(Arc::new(opencl))
                .kernel(SAXPY)
                .build()
                .expect("an OpenCL bridge"),
        )),
        Err(err) => eprintln!("resident bench: opencl SKIPPED: {err}"),
    }
    bridges
}

fn resident_update(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("resident_update");
    group.throughput(Throughput::Bytes((ELEMENTS * 4) as u64));
    group.sample_size(20);
    let start = vec![1.0f32; ELEMENTS];
    let scalar = f32_bytes(&[1.0e-7]);
    for (name, bridge) in bridges() {
        let buffer = rt
            .block_on(bridge.allocate_resident(ELEMENTS * 4, &Requirements::default()))
            .expect("a resident buffer");
        rt.block_on(buffer.write(0, &f32_bytes(&start)))
            .expect("written");
        group.bench_function(format!("{name}/resident"), |b| {
            b.to_async(&rt).iter(|| async {
                let parts = [
                    Part::Host(&scalar),
                    Part::Resident(&buffer),
                    Part::Resident(&buffer),
                ];
                black_box(
                    bridge
                        .execute_resident("saxpy", &parts, Output::Into(&buffer))
                        .await
                        .expect("an update"),
                )
            })
        });
        let mut y = start.clone();
        group.bench_function(format!("{name}/send_each_time"), |b| {
            b.iter(|| {
                let request: Vec<f32> = std::iter::once(1.0e-7)
                    .chain(y.iter().copied())
                    .chain(y.iter().copied())
                    .collect();
                let answer = rt
                    .block_on(bridge.execute("saxpy", &f32_bytes(&request)))
                    .expect("an update");
                y = granary_kernels::shipped::bytes_f32(&answer);
                black_box(y.len())
            })
        });
        drop(buffer);
        rt.block_on(bridge.shutdown(granary_kernels::StopMode::Drain));
    }
    group.finish();
}

criterion_group!(benches, resident_update);
criterion_main!(benches);
