//! CUDA benchmarks, each beside its peer in the same run:
//!
//! - `cuda_round_trip`: one small `double` request through the persistent
//!   kernel (host-mapped rings) vs `cuLaunchKernel` + `cuStreamSynchronize`
//!   per request, the same kernel code reading and writing host-mapped
//!   buffers (so neither side pays for explicit copies).
//! - `cuda_throughput`: small requests submitted in batches of 256 (one ring
//!   claim each, the bridge's micro-batching) by four threads, answered by
//!   one block; time per request.
//! - `cuda_h2d`: the batch path's host-to-device copy of 64 MiB (`stage_in`)
//!   from pageable input (staged through two pinned chunks), the bridge's
//!   way (`Backend::stage_input` into page-locked memory, then one DMA) and
//!   from page-locked input, vs one `cuMemcpyHtoDAsync` from pinned memory
//!   of the same size.
//!
//! - `cuda_pcie_x1000`: what bounds the round trip: 1000 dependent device
//!   loads from host-mapped memory, and 1000 mapped stores each followed by
//!   `__threadfence_system()`, in one launch each.
//!
//! Without a GPU the bench prints why and measures nothing.
//! `cargo bench -p granary-kernels --bench cuda`; BENCHMARKS.md has figures.

use std::ffi::CString;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{CudaContext, result};
use granary_kernels::cuda::{CudaBackend, CudaPersistentKernel, nvrtc, program_source};
use granary_kernels::shipped::{DOUBLE, f32_bytes};
use granary_kernels::{KernelConfig, PersistentKernel, StopMode, WaitPolicy};

fn backend() -> Option<Arc<CudaBackend>> {
    match CudaBackend::discover() {
        Ok(backend) => Some(Arc::new(backend)),
        Err(err) => {
            eprintln!("cuda bench: SKIPPED: {err}");
            None
        }
    }
}

/// Pinned, device-mapped host memory for the launch-per-request peer.
struct Mapped {
    host: *mut u8,
    device: CUdeviceptr,
}

impl Mapped {
    fn new(bytes: usize) -> Mapped {
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: a context is bound by the caller; plain pinned memory.
        let host = unsafe { result::malloc_host(bytes, flags) }.expect("cuMemHostAlloc") as *mut u8;
        let mut device = 0;
        // SAFETY: `host` is device-mapped memory of this context.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device, host.cast(), 0) }
            .result()
            .expect("cuMemHostGetDevicePointer");
        Mapped { host, device }
    }
}

fn round_trip(c: &mut Criterion, backend: &CudaBackend) {
    let mut group = c.benchmark_group("cuda_round_trip");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));

    // Granary: the persistent kernel, spinning on both sides.
    let config = KernelConfig {
        policy: WaitPolicy::busy(),
        ..KernelConfig::default()
    };
    let mut kernel = CudaPersistentKernel::launch(backend, 0, DOUBLE, &config).expect("launch");
    let request = f32_bytes(&[1.5]);
    let mut id = 0u64;
    group.bench_function("persistent_kernel", |b| {
        b.iter(|| {
            id += 1;
            kernel.submit(id, request.as_slice()).expect("submit");
            let done = kernel.complete(Duration::from_secs(5)).expect("answer");
            assert_eq!(done.request_id, id);
        })
    });
    CudaPersistentKernel::stop_with(&mut kernel, StopMode::Drain, Duration::from_secs(5));
    drop(kernel);

    // The peer: one launch of the same kernel code per request.
    let context = CudaContext::new(0).expect("context");
    context.bind_to_thread().expect("bind");
    let source = program_source(&DOUBLE).expect("source");
    let (major, minor) = context.compute_capability().expect("cc");
    let cubin =
        nvrtc::compile_cubin(&source, (major * 10 + minor) as u32, "double").expect("nvrtc");
    // SAFETY: a CUBIN image alive for the call.
    let module = unsafe { result::module::load_data(cubin.as_ptr().cast()) }.expect("load");
    // SAFETY: a loaded module.
    let batch =
        unsafe { result::module::get_function(module, CString::new("granary_batch").unwrap()) }
            .expect("function");
    let stream = result::stream::create(result::stream::StreamKind::NonBlocking).expect("stream");
    let input = Mapped::new(4096);
    let output = Mapped::new(4096);
    group.bench_function("launch_per_request", |b| {
        b.iter(|| {
            // SAFETY: 4 bytes into a 4 KiB pinned buffer.
            unsafe { std::ptr::copy_nonoverlapping(request.as_ptr(), input.host, 4) };
            let mut input_pointer = input.device;
            let mut request_len = 4u32;
            let mut output_pointer = output.device;
            let mut response_len = 4u32;
            let mut params = [
                (&mut input_pointer as *mut CUdeviceptr).cast(),
                (&mut request_len as *mut u32).cast(),
                (&mut output_pointer as *mut CUdeviceptr).cast(),
                (&mut response_len as *mut u32).cast(),
            ];
            // SAFETY: granary_batch's signature; buffers of 4 KiB.
            unsafe {
                result::launch_kernel(batch, (1, 1, 1), (256, 1, 1), 0, stream, &mut params)
                    .expect("launch");
                result::stream::synchronize(stream).expect("sync");
            }
            let mut answer = [0u8; 4];
            // SAFETY: 4 bytes out of the pinned buffer, written by the
            // finished kernel.
            unsafe { std::ptr::copy_nonoverlapping(output.host, answer.as_mut_ptr(), 4) };
            assert_eq!(f32::from_le_bytes(answer), 3.0);
        })
    });
    group.finish();
}

fn throughput(c: &mut Criterion, backend: &CudaBackend) {
    const PRODUCERS: u64 = 4;
    const BATCH: usize = 256;
    let mut group = c.benchmark_group("cuda_throughput");
    group.measurement_time(Duration::from_secs(5));
    group.warm_up_time(Duration::from_secs(1));
    group.sample_size(10);
    group.throughput(Throughput::Elements(1));
    for threads in [256u32, 1024] {
        let config = KernelConfig {
            capacity: 1 << 16,
            threads_per_group: Some(threads),
            policy: WaitPolicy::busy(),
            ..KernelConfig::default()
        };
        let mut kernel = CudaPersistentKernel::launch(backend, 0, DOUBLE, &config).expect("launch");
        let submitter = kernel.submitter().expect("submitter");
        group.bench_function(format!("micro_batched_{threads}_threads"), |b| {
            b.iter_custom(|iters| {
                let per = iters.div_ceil(PRODUCERS);
                let total = per * PRODUCERS;
                let started = Instant::now();
                let producers: Vec<_> = (0..PRODUCERS)
                    .map(|p| {
                        let submitter = submitter.clone();
                        thread::spawn(move || {
                            let payload = 1.0f32.to_le_bytes();
                            let mut sent = 0u64;
                            let mut batch = Vec::with_capacity(BATCH);
                            while sent < per {
                                let n = (per - sent).min(BATCH as u64);
                                batch.clear();
                                batch.extend((0..n).map(|i| (p * per + sent + i, payload)));
                                while submitter.submit_batch(&batch).is_err() {
                                    std::hint::spin_loop();
                                }
                                sent += n;
                            }
                        })
                    })
                    .collect();
                let mut answered = 0;
                while answered < total {
                    if kernel.try_complete().is_some() {
                        answered += 1;
                    }
                }
                for producer in producers {
                    producer.join().expect("producer");
                }
                started.elapsed()
            })
        });
        CudaPersistentKernel::stop_with(&mut kernel, StopMode::Drain, Duration::from_secs(5));
    }
    group.finish();
}

fn h2d(c: &mut Criterion, backend: &CudaBackend) {
    const BYTES: usize = 64 << 20;
    let mut group = c.benchmark_group("cuda_h2d");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    group.sample_size(20);
    group.throughput(Throughput::Bytes(BYTES as u64));
    let input = vec![7u8; BYTES];
    // Pageable input straight to the backend: staged through two pinned
    // chunks, the host's copies split across a few threads.
    group.bench_function("batch_path_pageable_input", |b| {
        b.iter(|| backend.stage_in(0, &input).expect("stage_in"))
    });
    // What the bridge does: `Backend::stage_input` copies the caller's
    // bytes into page-locked memory (a few threads), then one DMA.
    group.bench_function("batch_path_via_stage_input", |b| {
        b.iter(|| {
            let staged = granary_kernels::Backend::stage_input(backend, 0, &input)
                .expect("CUDA stages")
                .expect("pinned memory");
            backend.stage_in(0, (*staged).as_ref()).expect("stage_in")
        })
    });
    // Input already in page-locked memory from `CudaBackend::pinned`.
    let mut pinned_input = backend.pinned(0, BYTES).expect("pinned");
    pinned_input.copy_from_slice(&input);
    group.bench_function("batch_path_pinned_input", |b| {
        b.iter(|| backend.stage_in(0, &pinned_input).expect("stage_in"))
    });
    let context = CudaContext::new(0).expect("context");
    context.bind_to_thread().expect("bind");
    // SAFETY: plain pinned memory of this context.
    let pinned = unsafe { result::malloc_host(BYTES, 0) }.expect("cuMemHostAlloc") as *mut u8;
    // SAFETY: BYTES bytes, just allocated.
    unsafe { std::ptr::write_bytes(pinned, 7, BYTES) };
    let stream = result::stream::create(result::stream::StreamKind::NonBlocking).expect("stream");
    // SAFETY: the context is bound.
    let target = unsafe { result::malloc_sync(BYTES) }.expect("cuMemAlloc");
    group.bench_function("cuMemcpyHtoD_from_pinned", |b| {
        b.iter(|| {
            // SAFETY: BYTES from pinned host memory into BYTES of device memory.
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(target, pinned.cast(), BYTES, stream)
                    .result()
                    .expect("copy");
                result::stream::synchronize(stream).expect("sync");
            }
        })
    });
    group.finish();
}

/// Two costs that bound the round trip: a device load from host-mapped
/// memory that must wait for the previous one (a pointer chase, 1000 per
/// launch), and a device store to host-mapped memory followed by
/// `__threadfence_system()` (1000 per launch). Time per launch / 1000 is
/// the cost of one.
fn pcie(c: &mut Criterion) {
    const SOURCE: &str = r#"
extern "C" __global__ void chase(const volatile unsigned long long* ring, unsigned long long* out) {
    unsigned long long at = 0;
    for (int i = 0; i < 1000; i++) at = ring[at];
    *out = at;
}
extern "C" __global__ void fenced_stores(volatile unsigned long long* slot) {
    for (unsigned long long i = 0; i < 1000; i++) { *slot = i; __threadfence_system(); }
}
"#;
    let context = CudaContext::new(0).expect("context");
    context.bind_to_thread().expect("bind");
    let (major, minor) = context.compute_capability().expect("cc");
    let cubin = nvrtc::compile_cubin(SOURCE, (major * 10 + minor) as u32, "pcie").expect("nvrtc");
    // SAFETY: a CUBIN image alive for the call.
    let module = unsafe { result::module::load_data(cubin.as_ptr().cast()) }.expect("load");
    let function = |name: &str| {
        // SAFETY: a loaded module.
        unsafe { result::module::get_function(module, CString::new(name).unwrap()) }
            .expect("function")
    };
    let (chase, fenced) = (function("chase"), function("fenced_stores"));
    let stream = result::stream::create(result::stream::StreamKind::NonBlocking).expect("stream");
    // A ring of 64 8-byte entries, each naming the next, 128 bytes apart.
    let memory = Mapped::new(64 * 128);
    for i in 0..64usize {
        // SAFETY: within the 8 KiB mapped buffer.
        unsafe { *(memory.host.add(i * 128) as *mut u64) = (((i + 1) % 64) * 16) as u64 };
    }
    let out = Mapped::new(4096);
    let mut group = c.benchmark_group("cuda_pcie_x1000");
    group.measurement_time(Duration::from_secs(2));
    group.warm_up_time(Duration::from_millis(500));
    let launch = |function, args: &mut [*mut std::ffi::c_void]| {
        // SAFETY: the kernels' signatures take one or two device pointers,
        // which `args` hold; both buffers are mapped and alive.
        unsafe {
            result::launch_kernel(function, (1, 1, 1), (1, 1, 1), 0, stream, args).expect("launch");
            result::stream::synchronize(stream).expect("sync");
        }
    };
    group.bench_function("dependent_mapped_loads", |b| {
        b.iter(|| {
            let (mut ring, mut target) = (memory.device, out.device);
            launch(
                chase,
                &mut [
                    (&mut ring as *mut CUdeviceptr).cast(),
                    (&mut target as *mut CUdeviceptr).cast(),
                ],
            );
        })
    });
    group.bench_function("mapped_store_and_threadfence_system", |b| {
        b.iter(|| {
            let mut slot = out.device;
            launch(fenced, &mut [(&mut slot as *mut CUdeviceptr).cast()]);
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let Some(backend) = backend() else {
        return;
    };
    pcie(c);
    round_trip(c, &backend);
    throughput(c, &backend);
    h2d(c, &backend);
}

criterion_group!(cuda, benches);
criterion_main!(cuda);
