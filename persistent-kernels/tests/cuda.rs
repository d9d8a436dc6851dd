//! The CUDA backend on a real GPU: discovery, every shipped kernel against
//! the CPU on both paths, the round trip, many concurrent callers, stops
//! with requests in flight, and bad input.
//!
//! The decision is made when the binary runs, not when it is built (the
//! binaries are built on a machine without a GPU and run on one that has
//! it): where CUDA is unavailable every test is reported as ignored, and
//! the reason is printed, never as passed. `scripts/gpu-check.sh` runs this
//! binary on the GPU machine.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use granary_kernels::cuda::{CudaBackend, CudaError, CudaPersistentKernel};
use granary_kernels::shipped::{ALL, DOUBLE, SAXPY, bytes_f32, f32_bytes};
use granary_kernels::{
    Backend, BackendError, Completion, KernelConfig, KernelSpec, PersistentKernel, Status,
    StopMode, SubmitError, WaitPolicy,
};
use libtest_mimic::{Arguments, Failed, Trial};

type Outcome = Result<(), Failed>;
type Test = fn(&Arc<CudaBackend>) -> Outcome;

fn fail(why: impl std::fmt::Display) -> Failed {
    Failed::from(why.to_string())
}

fn main() {
    let args = Arguments::from_args();
    let backend = match CudaBackend::discover() {
        Ok(backend) => Some(Arc::new(backend)),
        Err(err) => {
            eprintln!("cuda: SKIPPED: every CUDA test is ignored: {err}");
            None
        }
    };
    let tests: Vec<(&str, Test)> = vec![
        ("discovery_reports_every_gpu", discovery_reports_every_gpu),
        (
            "every_shipped_kernel_matches_the_cpu_on_the_ring",
            every_kernel_on_the_ring,
        ),
        (
            "every_shipped_kernel_matches_the_cpu_in_a_batch",
            every_kernel_in_a_batch,
        ),
        ("a_batch_of_64_mib_round_trips", a_large_batch_round_trips),
        (
            "a_batch_from_pinned_memory_goes_by_dma",
            a_batch_from_pinned_memory,
        ),
        (
            "one_hundred_sequential_doubles",
            one_hundred_sequential_doubles,
        ),
        (
            "eight_threads_of_100k_requests_lose_nothing",
            eight_threads_lose_nothing,
        ),
        (
            "drain_answers_every_request_in_flight",
            drain_answers_in_flight,
        ),
        (
            "abandon_exits_with_requests_in_flight",
            abandon_exits_in_flight,
        ),
        (
            "abandon_stops_a_busy_kernel_at_its_next_turn",
            abandon_stops_a_busy_kernel,
        ),
        (
            "dropping_a_kernel_with_full_rings_ends_it",
            dropping_a_kernel_with_full_rings,
        ),
        ("two_kernels_run_side_by_side", two_kernels_side_by_side),
        (
            "bad_input_is_typed_and_the_kernel_keeps_serving",
            bad_input_is_typed,
        ),
        ("small_rings_and_blocks_work", small_rings_and_blocks),
        (
            "a_module_build_beside_a_running_kernel_is_refused",
            a_module_build_beside_a_running_kernel_is_refused,
        ),
    ];
    let mut trials: Vec<Trial> = tests
        .into_iter()
        .map(|(name, test)| {
            let backend = backend.clone();
            let ignored = backend.is_none();
            Trial::test(name, move || match &backend {
                Some(backend) => test(backend),
                None => Ok(()),
            })
            .with_ignored_flag(ignored)
        })
        .collect();
    // The resident-buffer contract, as on the CPU and OpenCL backends.
    trials.extend(common::resident::ALL.into_iter().map(|(name, check)| {
        let backend = backend.clone();
        let ignored = backend.is_none();
        Trial::test(format!("resident_{name}"), move || match &backend {
            Some(backend) => check(backend.as_ref()).map_err(fail),
            None => Ok(()),
        })
        .with_ignored_flag(ignored)
    }));
    // One GPU: the tests run one at a time, so timings are their own.
    let mut args = args;
    args.test_threads = Some(1);
    libtest_mimic::run(&args, trials).exit();
}

fn launch(
    backend: &CudaBackend,
    spec: KernelSpec,
    config: KernelConfig,
) -> Result<CudaPersistentKernel, Failed> {
    CudaPersistentKernel::launch(backend, 0, spec, &config).map_err(fail)
}

fn spin() -> KernelConfig {
    KernelConfig {
        policy: WaitPolicy::busy(),
        ..KernelConfig::default()
    }
}

/// Waits for `count` completions, at most `timeout` in all.
fn collect(
    kernel: &mut CudaPersistentKernel,
    count: usize,
    timeout: Duration,
) -> Result<Vec<Completion>, Failed> {
    let deadline = Instant::now() + timeout;
    let mut done = Vec::with_capacity(count);
    while done.len() < count {
        if Instant::now() > deadline {
            return Err(fail(format!(
                "{} of {count} completions before the deadline",
                done.len()
            )));
        }
        if let Some(completion) = kernel.complete(Duration::from_millis(100)) {
            done.push(completion);
        }
    }
    Ok(done)
}

/// A request for `spec` of about `elements` elements, and the CPU's answer.
fn request_for(spec: &KernelSpec, seed: u32, elements: usize) -> (Vec<u8>, Vec<u8>) {
    let value = |i: usize| {
        ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0
    };
    let floats: Vec<f32> = match spec.id {
        "saxpy" => std::iter::once(1.5)
            .chain((0..2 * elements).map(value))
            .collect(),
        "matmul" => {
            // m x k times k x n, with m = n = 4 and k = elements / 8.
            let k = (elements / 8).max(1);
            [4.0, k as f32, 4.0]
                .into_iter()
                .chain((0..4 * k + k * 4).map(value))
                .collect()
        }
        "double" => (0..elements).map(value).collect(),
        _ => (0..2 * elements).map(value).collect(),
    };
    let request = f32_bytes(&floats);
    let expected = CpuAnswer::of(spec, &request);
    (request, expected.0)
}

struct CpuAnswer(Vec<u8>);

impl CpuAnswer {
    fn of(spec: &KernelSpec, request: &[u8]) -> CpuAnswer {
        let len = (spec.output_len)(request).unwrap_or(0);
        let mut out = vec![0u8; len];
        let cpu = spec.cpu.expect("shipped kernels have CPU implementations");
        let written = cpu(request, &mut out).unwrap_or(0);
        out.truncate(written);
        CpuAnswer(out)
    }
}

fn discovery_reports_every_gpu(backend: &Arc<CudaBackend>) -> Outcome {
    let devices = backend.devices();
    if devices.is_empty() {
        return Err(fail("no device"));
    }
    for (index, device) in devices.iter().enumerate() {
        eprintln!("  device {index}: {device}");
        if device.index as usize != index || device.name.is_empty() || device.compute_units == 0 {
            return Err(fail(format!("bad device record {device:?}")));
        }
        if device.total_memory == 0 || device.free_memory > device.total_memory {
            return Err(fail(format!("bad memory figures {device:?}")));
        }
        let (free, total) = backend.memory(index).map_err(fail)?;
        if total != device.total_memory || free > total {
            return Err(fail(format!("cuMemGetInfo now says {free} of {total}")));
        }
    }
    Ok(())
}

fn every_kernel_on_the_ring(backend: &Arc<CudaBackend>) -> Outcome {
    for spec in ALL {
        let mut kernel = launch(backend, spec, spin())?;
        let mut expected = Vec::new();
        for (id, elements) in [1usize, 7, 64, 333, 1024].into_iter().enumerate() {
            let (request, answer) = request_for(&spec, id as u32, elements);
            kernel
                .submit(id as u64, request)
                .map_err(|e| fail(format!("{e:?}")))?;
            expected.push(answer);
        }
        let mut done = collect(&mut kernel, expected.len(), Duration::from_secs(20))?;
        done.sort_by_key(|c| c.request_id);
        for (completion, answer) in done.iter().zip(&expected) {
            if completion.status != Status::Ok || &completion.payload != answer {
                return Err(fail(format!(
                    "{}: request {} gave {:?} with {} bytes, the CPU {} bytes",
                    spec.id,
                    completion.request_id,
                    completion.status,
                    completion.payload.len(),
                    answer.len()
                )));
            }
        }
        let report = kernel.stop_with(StopMode::Drain, Duration::from_secs(10));
        if !report.exited {
            return Err(fail(format!("{} did not exit", spec.id)));
        }
    }
    Ok(())
}

fn every_kernel_in_a_batch(backend: &Arc<CudaBackend>) -> Outcome {
    for spec in ALL {
        for elements in [1usize, 1000, 1 << 20] {
            let (request, answer) = request_for(&spec, 7, elements);
            let response = backend.run_batch(0, &spec, &request).map_err(fail)?;
            if response != answer {
                let got = bytes_f32(&response);
                let want = bytes_f32(&answer);
                let first = got
                    .iter()
                    .zip(&want)
                    .position(|(a, b)| a.to_bits() != b.to_bits());
                return Err(fail(format!(
                    "{} x {elements}: {} bytes vs {}, first difference at {first:?}",
                    spec.id,
                    response.len(),
                    answer.len()
                )));
            }
        }
    }
    Ok(())
}

fn a_large_batch_round_trips(backend: &Arc<CudaBackend>) -> Outcome {
    let n = 16 << 20; // 64 MiB of f32: sixteen staging chunks each way
    let input: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    let response = backend
        .run_batch(0, &DOUBLE, &f32_bytes(&input))
        .map_err(fail)?;
    let output = bytes_f32(&response);
    if output.len() != n || output.iter().zip(&input).any(|(o, i)| *o != 2.0 * i) {
        return Err(fail("a doubled 64 MiB vector came back wrong"));
    }
    Ok(())
}

fn a_batch_from_pinned_memory(backend: &Arc<CudaBackend>) -> Outcome {
    let n = 3 << 20; // 12 MiB: three staging chunks' worth
    let input: Vec<f32> = (0..n).map(|i| (i % 4099) as f32 - 2000.0).collect();
    let bytes = f32_bytes(&input);
    let mut pinned = backend.pinned(0, bytes.len()).map_err(fail)?;
    pinned.copy_from_slice(&bytes);
    // The DMA path is taken only for page-locked memory, and it is.
    if !backend.is_page_locked(0, &pinned) || backend.is_page_locked(0, &bytes) {
        return Err(fail("page-locked memory is not told apart from pageable"));
    }
    let direct = backend.run_batch(0, &DOUBLE, &pinned).map_err(fail)?;
    let staged = Backend::stage_input(&**backend, 0, &bytes)
        .ok_or_else(|| fail("CUDA offers no staging"))?
        .map_err(fail)?;
    let via_stage = backend
        .run_batch(0, &DOUBLE, (*staged).as_ref())
        .map_err(fail)?;
    let expected: Vec<f32> = input.iter().map(|x| 2.0 * x).collect();
    if bytes_f32(&direct) != expected || bytes_f32(&via_stage) != expected {
        return Err(fail("a batch from page-locked memory came back wrong"));
    }
    // A fresh size comes zeroed.
    let fresh = backend.pinned(0, 3 << 25).map_err(fail)?;
    if fresh.len() != 3 << 25 || fresh.iter().any(|&b| b != 0) {
        return Err(fail("a new pinned buffer was not zeroed"));
    }
    Ok(())
}

fn one_hundred_sequential_doubles(backend: &Arc<CudaBackend>) -> Outcome {
    let mut kernel = launch(backend, DOUBLE, spin())?;
    let mut times = Vec::new();
    for id in 0..100u64 {
        let value = id as f32;
        let started = Instant::now();
        kernel
            .submit(id, f32_bytes(&[value]))
            .map_err(|e| fail(format!("{e:?}")))?;
        let completion = kernel
            .complete(Duration::from_secs(5))
            .ok_or_else(|| fail(format!("request {id} unanswered")))?;
        times.push(started.elapsed());
        if completion.request_id != id || bytes_f32(&completion.payload) != [2.0 * value] {
            return Err(fail(format!("request {id} answered {completion:?}")));
        }
    }
    times.sort();
    eprintln!(
        "  100 sequential doubles: p50 {:.2} us, p99 {:.2} us, min {:.2} us",
        times[50].as_secs_f64() * 1e6,
        times[99].as_secs_f64() * 1e6,
        times[0].as_secs_f64() * 1e6
    );
    if !kernel
        .stop_with(StopMode::Drain, Duration::from_secs(10))
        .exited
    {
        return Err(fail("the kernel did not exit"));
    }
    Ok(())
}

fn eight_threads_lose_nothing(backend: &Arc<CudaBackend>) -> Outcome {
    const THREADS: u64 = 8;
    const EACH: u64 = 100_000;
    let mut kernel = launch(
        backend,
        DOUBLE,
        KernelConfig {
            capacity: 4096,
            ..spin()
        },
    )?;
    let submitter = kernel.submitter().ok_or_else(|| fail("no submitter"))?;
    let started = Instant::now();
    let producers: Vec<_> = (0..THREADS)
        .map(|thread| {
            let submitter = submitter.clone();
            thread::spawn(move || {
                for i in 0..EACH {
                    let id = thread * EACH + i;
                    let mut payload = f32_bytes(&[id as f32]);
                    loop {
                        match submitter.submit(id, payload) {
                            Ok(()) => break,
                            Err(SubmitError::Full(back)) => {
                                payload = back;
                                std::hint::spin_loop();
                            }
                            Err(other) => panic!("submit failed: {other:?}"),
                        }
                    }
                }
            })
        })
        .collect();
    let total = (THREADS * EACH) as usize;
    let mut seen = vec![false; total];
    let mut answered = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while answered < total {
        if Instant::now() > deadline {
            return Err(fail(format!("{answered} of {total} answered in time")));
        }
        let Some(completion) = kernel.complete(Duration::from_millis(100)) else {
            continue;
        };
        let id = completion.request_id as usize;
        if id >= total || seen[id] {
            return Err(fail(format!("unexpected or repeated id {id}")));
        }
        if completion.status != Status::Ok || bytes_f32(&completion.payload) != [2.0 * id as f32] {
            return Err(fail(format!("request {id} answered {completion:?}")));
        }
        seen[id] = true;
        answered += 1;
    }
    for producer in producers {
        producer.join().map_err(|_| fail("a producer panicked"))?;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "  {THREADS} threads x {EACH} requests: all {total} answered once in {:.2} s ({:.2} M req/s)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64() / 1e6
    );
    if !kernel
        .stop_with(StopMode::Drain, Duration::from_secs(10))
        .exited
    {
        return Err(fail("the kernel did not exit"));
    }
    Ok(())
}

fn abandon_stops_a_busy_kernel(backend: &Arc<CudaBackend>) -> Outcome {
    // One thread and 4 KiB requests: the kernel is busy for tens of
    // milliseconds, with room in the response ring all along. Abandon must
    // end it at its next turn, not after the queue.
    let config = KernelConfig {
        capacity: 4096,
        threads_per_group: Some(1),
        ..spin()
    };
    let mut kernel = launch(backend, DOUBLE, config)?;
    for id in 0..4000u64 {
        kernel
            .submit(id, f32_bytes(&[1.0; 1024]))
            .map_err(|e| fail(format!("{e:?}")))?;
    }
    let started = Instant::now();
    let report = kernel.stop_with(StopMode::Abandon, Duration::from_secs(10));
    let took = started.elapsed();
    eprintln!(
        "  abandon of a busy kernel: exited in {took:?}, {} of 4000 answered",
        report.completions.len()
    );
    if !report.exited || report.completions.len() >= 4000 {
        return Err(fail(format!(
            "exited {} with {} answered: Abandon ran the queue",
            report.exited,
            report.completions.len()
        )));
    }
    Ok(())
}

fn dropping_a_kernel_with_full_rings(backend: &Arc<CudaBackend>) -> Outcome {
    // Both rings full and nobody reading: the kernel waits for room. Dropping
    // the handle must still end it promptly and give its SM back.
    let config = KernelConfig {
        capacity: 64,
        ..spin()
    };
    let kernel = launch(backend, DOUBLE, config)?;
    // Both rings hold 64: submit until 128 are in, however long the kernel
    // takes to fill the response ring (bounded only so that a kernel that
    // never takes them fails rather than hangs).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut submitted = 0u64;
    while submitted < 128 && Instant::now() < deadline {
        if kernel.submit(submitted, f32_bytes(&[1.0])).is_ok() {
            submitted += 1;
        }
    }
    let started = Instant::now();
    drop(kernel);
    let took = started.elapsed();
    eprintln!("  dropped with {submitted} requests submitted, in {took:?}");
    if submitted < 128 || took > Duration::from_secs(2) {
        return Err(fail(format!(
            "{submitted} submitted; the drop took {took:?}"
        )));
    }
    // Nothing runs on the device any more: a new module may be loaded.
    let mut fresh = DOUBLE;
    let source = format!("{}\n/* after a drop */\n", DOUBLE.cuda_c.unwrap_or(""));
    fresh.cuda_c = Some(Box::leak(source.into_boxed_str()));
    Backend::prepare(&**backend, 0, &fresh).map_err(fail)
}

fn drain_answers_in_flight(backend: &Arc<CudaBackend>) -> Outcome {
    let mut kernel = launch(
        backend,
        DOUBLE,
        KernelConfig {
            capacity: 1024,
            ..spin()
        },
    )?;
    for id in 0..1000u64 {
        kernel
            .submit(id, f32_bytes(&[1.0; 256]))
            .map_err(|e| fail(format!("{e:?}")))?;
    }
    // Stop at once: every submitted request is still answered.
    let report = kernel.stop_with(StopMode::Drain, Duration::from_secs(10));
    if !report.exited {
        return Err(fail("the kernel did not exit"));
    }
    let mut ids: Vec<u64> = report.completions.iter().map(|c| c.request_id).collect();
    ids.sort_unstable();
    if ids != (0..1000).collect::<Vec<_>>() {
        return Err(fail(format!("{} of 1000 answered by the drain", ids.len())));
    }
    if report.completions.iter().any(|c| c.status != Status::Ok) {
        return Err(fail("a drained request failed"));
    }
    match kernel.submit(5000, f32_bytes(&[1.0])) {
        Err(SubmitError::Stopped(_)) => Ok(()),
        other => Err(fail(format!("a submit after stop gave {other:?}"))),
    }
}

fn abandon_exits_in_flight(backend: &Arc<CudaBackend>) -> Outcome {
    // Small rings, and nobody reading responses: the kernel fills the
    // response ring and waits for room with requests still queued.
    let mut kernel = launch(
        backend,
        DOUBLE,
        KernelConfig {
            capacity: 64,
            ..spin()
        },
    )?;
    let submitter = kernel.submitter().ok_or_else(|| fail("no submitter"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut id = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if submitter.submit(id, f32_bytes(&[1.0; 64])).is_ok() {
                    id += 1;
                }
            }
            id
        })
    };
    thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    let report = kernel.stop_with(StopMode::Abandon, Duration::from_secs(10));
    stop.store(true, Ordering::Relaxed);
    let submitted = producer.join().map_err(|_| fail("the producer panicked"))?;
    if !report.exited {
        return Err(fail("the kernel did not exit after Abandon"));
    }
    eprintln!(
        "  abandon: exited in {:?} with {} of {submitted} requests answered",
        started.elapsed(),
        report.completions.len()
    );
    if report.completions.len() as u64 > submitted {
        return Err(fail("more answers than requests"));
    }
    Ok(())
}

fn two_kernels_side_by_side(backend: &Arc<CudaBackend>) -> Outcome {
    // Both modules are built first (a module cannot be loaded beside a
    // running kernel, see the last test); the kernels, and a batch, then run
    // side by side on their own non-blocking streams.
    Backend::prepare(&**backend, 0, &DOUBLE).map_err(fail)?;
    Backend::prepare(&**backend, 0, &SAXPY).map_err(fail)?;
    let mut first = launch(backend, DOUBLE, spin())?;
    first
        .submit(1, f32_bytes(&[2.0]))
        .map_err(|e| fail(format!("{e:?}")))?;
    let mut second = launch(backend, SAXPY, spin())?;
    second
        .submit(2, f32_bytes(&[2.0, 1.0, 10.0]))
        .map_err(|e| fail(format!("{e:?}")))?;
    // And a batch kernel runs beside both.
    let batch = backend
        .run_batch(0, &DOUBLE, &f32_bytes(&[3.0; 4096]))
        .map_err(fail)?;
    let a = collect(&mut first, 1, Duration::from_secs(10))?;
    let b = collect(&mut second, 1, Duration::from_secs(10))?;
    if bytes_f32(&a[0].payload) != [4.0]
        || bytes_f32(&b[0].payload) != [12.0]
        || bytes_f32(&batch) != [6.0; 4096]
    {
        return Err(fail(format!("wrong answers {a:?} {b:?}")));
    }
    // Stopping one (and freeing its memory) while the other spins.
    drop(first);
    second
        .submit(3, f32_bytes(&[1.0, 1.0, 1.0]))
        .map_err(|e| fail(format!("{e:?}")))?;
    let c = collect(&mut second, 1, Duration::from_secs(10))?;
    if bytes_f32(&c[0].payload) != [2.0] {
        return Err(fail(format!("wrong answer {c:?}")));
    }
    Ok(())
}

fn bad_input_is_typed(backend: &Arc<CudaBackend>) -> Outcome {
    let mut kernel = launch(backend, SAXPY, spin())?;
    // The kernel's own check: a non-finite scale factor.
    kernel
        .submit(1, f32_bytes(&[f32::NAN, 1.0, 2.0]))
        .map_err(|e| fail(format!("{e:?}")))?;
    kernel
        .submit(2, f32_bytes(&[2.0, 1.0, 2.0]))
        .map_err(|e| fail(format!("{e:?}")))?;
    let mut done = collect(&mut kernel, 2, Duration::from_secs(10))?;
    done.sort_by_key(|c| c.request_id);
    if done[0].status != Status::BadInput || !done[0].payload.is_empty() {
        return Err(fail(format!("a NaN scale gave {:?}", done[0])));
    }
    if done[1].status != Status::Ok || bytes_f32(&done[1].payload) != [4.0] {
        return Err(fail(format!("the next request gave {:?}", done[1])));
    }
    // The shape check, before the ring.
    if !matches!(
        kernel.submit(3, vec![0u8; 5]),
        Err(SubmitError::WrongShape(..))
    ) {
        return Err(fail("a 5-byte request was not refused"));
    }
    // The batch path: shape errors and kernel rejections are typed.
    match Backend::run_batch(&**backend, 0, &DOUBLE, &[0u8; 6]) {
        Err(BackendError::WrongShape(_)) => {}
        other => return Err(fail(format!("a 6-byte batch gave {other:?}"))),
    }
    match Backend::run_batch(&**backend, 9, &DOUBLE, &[0u8; 4]) {
        Err(BackendError::UnknownDevice(9)) => {}
        other => return Err(fail(format!("device 9 gave {other:?}"))),
    }
    // A kernel whose CUDA C does not compile: NVRTC's log comes back.
    let mut broken = DOUBLE;
    broken.id = "broken";
    broken.cuda_c = Some("__device__ unsigned int granary_process(oops");
    match Backend::prepare(&**backend, 0, &broken) {
        Err(BackendError::Build { log, .. }) if !log.is_empty() => {}
        other => return Err(fail(format!("a broken source gave {other:?}"))),
    }
    match CudaPersistentKernel::launch(backend, 0, broken, &spin()) {
        Err(CudaError::Build { .. }) => {}
        other => return Err(fail(format!("launching a broken source gave {other:?}"))),
    }
    kernel.stop_with(StopMode::Drain, Duration::from_secs(10));
    Ok(())
}

fn small_rings_and_blocks(backend: &Arc<CudaBackend>) -> Outcome {
    for (capacity, threads) in [
        (2u32, None),
        (8, Some(3)),
        (64, Some(32)),
        (1024, Some(1024)),
    ] {
        let config = KernelConfig {
            capacity,
            threads_per_group: threads,
            ..spin()
        };
        let mut kernel = launch(backend, DOUBLE, config)?;
        let submitter = kernel.submitter().ok_or_else(|| fail("no submitter"))?;
        let count = 5000u64;
        let mut next = 0u64;
        let mut answered = 0u64;
        let deadline = Instant::now() + Duration::from_secs(30);
        while answered < count {
            if Instant::now() > deadline {
                return Err(fail(format!("capacity {capacity}: {answered} of {count}")));
            }
            while next < count && submitter.submit(next, f32_bytes(&[next as f32])).is_ok() {
                next += 1;
            }
            while let Some(completion) = kernel.try_complete() {
                if bytes_f32(&completion.payload) != [2.0 * completion.request_id as f32] {
                    return Err(fail(format!("capacity {capacity}: {completion:?}")));
                }
                answered += 1;
            }
        }
        let report = kernel.stop_with(StopMode::Drain, Duration::from_secs(10));
        if !report.exited {
            return Err(fail(format!("capacity {capacity}: no exit")));
        }
    }
    Ok(())
}

fn a_module_build_beside_a_running_kernel_is_refused(backend: &Arc<CudaBackend>) -> Outcome {
    // A source no earlier test built, so its module is not in the cache.
    let mut fresh = granary_kernels::shipped::VECTOR_ADD;
    let source = format!(
        "{}\n/* built while another kernel runs */\n",
        fresh.cuda_c.unwrap_or("")
    );
    fresh.cuda_c = Some(Box::leak(source.into_boxed_str()));
    let mut running = launch(backend, DOUBLE, spin())?;
    running
        .submit(1, f32_bytes(&[1.0]))
        .map_err(|e| fail(format!("{e:?}")))?;
    collect(&mut running, 1, Duration::from_secs(10))?;
    // Loading it now would wait for the running kernel forever (the driver
    // does); the backend refuses, typed, and the running kernel serves on.
    let (sender, receiver) = std::sync::mpsc::channel();
    let builder = backend.clone();
    thread::spawn(move || {
        let _ = sender.send(Backend::prepare(&*builder, 0, &fresh));
    });
    match receiver.recv_timeout(Duration::from_secs(20)) {
        Ok(Err(BackendError::NoCapacity(why))) if why.contains("cannot be loaded") => {}
        Ok(other) => {
            return Err(fail(format!(
                "building beside a running kernel gave {other:?}"
            )));
        }
        Err(_) => return Err(fail("the build did not return in 20 s")),
    }
    running
        .submit(2, f32_bytes(&[2.0]))
        .map_err(|e| fail(format!("{e:?}")))?;
    let done = collect(&mut running, 1, Duration::from_secs(10))?;
    if bytes_f32(&done[0].payload) != [4.0] {
        return Err(fail(format!("the running kernel answered {done:?}")));
    }
    // Once it has stopped, the same build goes through.
    running.stop_with(StopMode::Drain, Duration::from_secs(10));
    drop(running);
    Backend::prepare(&**backend, 0, &fresh).map_err(fail)
}
