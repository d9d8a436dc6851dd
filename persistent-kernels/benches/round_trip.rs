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
//!
//! Where an OpenCL runtime is present (POCL in CI), the same comparison runs
//! on OpenCL: the persistent kernel over SVM rings against enqueueing a
//! `double` kernel per request (write the input buffer, launch, read the
//! output, blocking). Without one, that group prints why and is skipped.

use std::hint::black_box;
use std::thread;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main};
use granary_kernels::shipped::DOUBLE;
use granary_kernels::{Completion, CpuPersistentKernel, KernelConfig, WaitPolicy};

fn request() -> Vec<u8> {
    [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// One round trip per iteration: submit a 16-byte `double` request, then
/// spin on `try_complete` until its answer is back.
fn bench_persistent<K>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    kernel: &mut K,
    submit: fn(&K, u64, &[u8]) -> Result<(), String>,
    try_complete: fn(&mut K) -> Option<Completion>,
) {
    let payload = request();
    let mut id = 0u64;
    group.bench_function("persistent_kernel", |b| {
        b.iter(|| {
            id += 1;
            submit(kernel, id, &payload).unwrap();
            loop {
                if let Some(done) = try_complete(kernel) {
                    break black_box(done);
                }
                std::hint::spin_loop();
            }
        })
    });
}

fn benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("round_trip_16B_double");
    let config = KernelConfig {
        policy: WaitPolicy::busy(),
        ..KernelConfig::default()
    };
    let mut kernel = CpuPersistentKernel::launch(DOUBLE, config).unwrap();
    bench_persistent(
        &mut group,
        &mut kernel,
        |kernel, id, payload| kernel.submit(id, payload).map_err(|err| err.to_string()),
        CpuPersistentKernel::try_complete,
    );
    let cpu = DOUBLE.cpu.unwrap();
    let payload = request();
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
    opencl(c);
}

fn opencl(c: &mut Criterion) {
    use granary_kernels::opencl::{OpenClBackend, OpenClPersistentKernel};
    use opencl3::command_queue::CommandQueue;
    use opencl3::context::Context;
    use opencl3::device::{CL_DEVICE_TYPE_ALL, Device, get_all_devices};
    use opencl3::kernel::{ExecuteKernel, Kernel};
    use opencl3::memory::{Buffer, CL_MEM_READ_ONLY, CL_MEM_WRITE_ONLY};
    use opencl3::program::Program;
    use opencl3::types::{CL_BLOCKING, cl_float};

    let backend = match OpenClBackend::discover() {
        Ok(backend) => backend,
        Err(err) => {
            println!("round_trip_16B_double_opencl: skipped, {err}");
            return;
        }
    };
    let mut group = c.benchmark_group("round_trip_16B_double_opencl");
    let mut kernel = OpenClPersistentKernel::launch(&backend, 0, DOUBLE, 256, 1).unwrap();
    bench_persistent(
        &mut group,
        &mut kernel,
        |kernel, id, payload| kernel.submit(id, payload).map_err(|err| err.to_string()),
        OpenClPersistentKernel::try_complete,
    );
    drop(kernel);

    // Launch per request, on its own context and queue.
    let device = Device::new(get_all_devices(CL_DEVICE_TYPE_ALL).unwrap()[0]);
    let context = Context::from_device(&device).unwrap();
    let queue = CommandQueue::create_default_with_properties(&context, 0, 0).unwrap();
    let source = "kernel void double_batch(global const float* in, global float* out) {
        size_t i = get_global_id(0); out[i] = 2.0f * in[i]; }";
    let program = Program::create_and_build_from_source(&context, source, "").unwrap();
    let launch = Kernel::create(&program, "double_batch").unwrap();
    let input = [1.0f32, 2.0, 3.0, 4.0];
    // SAFETY: device buffers of four floats, no host pointer.
    let (mut in_buffer, out_buffer) = unsafe {
        (
            Buffer::<cl_float>::create(&context, CL_MEM_READ_ONLY, 4, std::ptr::null_mut())
                .unwrap(),
            Buffer::<cl_float>::create(&context, CL_MEM_WRITE_ONLY, 4, std::ptr::null_mut())
                .unwrap(),
        )
    };
    group.bench_function("launch_per_request", |b| {
        b.iter(|| {
            let mut output = [0.0f32; 4];
            // SAFETY: blocking transfers of four floats into and out of
            // four-float buffers; the kernel writes indices 0..4.
            unsafe {
                queue
                    .enqueue_write_buffer(&mut in_buffer, CL_BLOCKING, 0, &input, &[])
                    .unwrap();
                ExecuteKernel::new(&launch)
                    .set_arg(&in_buffer)
                    .set_arg(&out_buffer)
                    .set_global_work_size(4)
                    .enqueue_nd_range(&queue)
                    .unwrap();
                queue
                    .enqueue_read_buffer(&out_buffer, CL_BLOCKING, 0, &mut output, &[])
                    .unwrap();
            }
            black_box(output)
        })
    });
    group.finish();
}

criterion_group!(round_trip, benches);
criterion_main!(round_trip);
