//! The wgpu backend, run for real (lavapipe, Mesa's Vulkan on the CPU, in
//! CI; `GRANARY_REQUIRE_WGPU=1` there makes a missing adapter a failure).
//!
//! Where this process finds no adapter that opens a device, these tests are
//! reported as ignored, with the reason printed, never as passed
//! (`build-support/runtime_gate.rs`). The shipped kernels are checked
//! against the CPU on both paths in `shipped.rs`.

mod common;

use std::time::Duration;

use common::gate;
use common::{f32s, from_f32s, random_f32s};
use granary_kernels::shipped::{self, DOT, DOUBLE, MATMUL, SAXPY};
use granary_kernels::wgpu::{MemorySource, WgpuBackend, WgpuError, WgpuOptions};
use granary_kernels::{
    Backend, BackendError, BackendKind, BatchOutput, BatchPart, KernelConfig, KernelSpec,
    PersistentKernel, Status, StopMode, Wgsl, one_pass,
};

const WAIT: Duration = Duration::from_secs(60);

fn backend() -> WgpuBackend {
    WgpuBackend::discover().expect("a wgpu adapter (lavapipe in CI)")
}

/// Whether `got` is the CPU implementation's answer (or its fused form:
/// `common::fused_answer`).
fn matches_cpu(spec: &KernelSpec, request: &[u8], got: &[u8]) -> bool {
    let plain = granary_kernels::CpuBackend::new()
        .run_batch(0, spec, request)
        .expect("the CPU answers");
    common::matches_cpu(BackendKind::Wgpu, spec.id, request, got, &plain)
}

fn discovery_reports_each_adapter_with_its_api_limits_and_memory() {
    let backend = backend();
    let adapters = backend.adapters();
    assert!(!adapters.is_empty());
    for (index, adapter) in adapters.iter().enumerate() {
        let info = &adapter.info;
        assert_eq!(info.backend, BackendKind::Wgpu);
        assert_eq!(info.index as usize, index);
        assert!(!info.name.is_empty());
        assert!(["Vulkan", "Metal", "Dx12"].contains(&adapter.api.as_str()));
        assert!(info.total_memory > 0 && info.free_memory <= info.total_memory);
        assert!(adapter.max_storage_binding >= 1 << 20);
        assert!(adapter.max_workgroups_per_dimension >= 1);
        // Vulkan reports its heaps (rule 2); the other APIs take a share.
        let reported = adapter.api == "Vulkan";
        assert_eq!(
            adapter.memory == MemorySource::Reported,
            reported,
            "{adapter}"
        );
        let shown = adapter.to_string();
        assert!(
            shown.contains(&adapter.api) && shown.contains(&info.name),
            "{shown}"
        );
    }
    assert_eq!(
        backend.devices(),
        adapters.iter().map(|a| a.info.clone()).collect::<Vec<_>>()
    );
    assert!(!BackendKind::Wgpu.runs_persistent_kernels());
    assert!(BackendKind::OpenCl.runs_persistent_kernels());
}

fn options_out_of_range_are_refused() {
    for options in [
        WgpuOptions {
            memory_share: 0.0,
            ..WgpuOptions::default()
        },
        WgpuOptions {
            memory_share: f64::NAN,
            ..WgpuOptions::default()
        },
        WgpuOptions {
            micro_batch: 0,
            ..WgpuOptions::default()
        },
    ] {
        assert!(
            matches!(
                WgpuBackend::discover_with(options),
                Err(WgpuError::BadOptions(_))
            ),
            "{options:?}"
        );
    }
}

/// A WGSL source with a type error: `granary_out` takes an f32.
const BROKEN: &str = "
fn granary_process(at: u32, request_len: u32, out: u32, response_max: u32) -> vec2<u32> {
    granary_out(out, 1u);
    return vec2<u32>(0u, 4u);
}
fn granary_element(e: u32, request_len: u32, response_len: u32) {}
";

fn builds_are_cached_and_a_shader_error_returns_nagas_message() {
    let backend = backend();
    backend.prepare(0, &DOUBLE).unwrap();
    backend.prepare(0, &DOUBLE).unwrap();
    assert_eq!(
        backend.compiled(0).unwrap(),
        1,
        "the second came from the cache"
    );
    backend.prepare(0, &SAXPY).unwrap();
    assert_eq!(backend.compiled(0).unwrap(), 2);
    let broken = KernelSpec {
        id: "broken",
        wgsl: Some(Wgsl {
            source: BROKEN,
            passes: one_pass,
        }),
        ..DOUBLE
    };
    match backend.prepare(0, &broken) {
        Err(BackendError::Build { kernel, log }) => {
            assert_eq!(kernel, "broken");
            // naga's message points into the source.
            assert!(
                log.contains("error") && log.contains("granary_out"),
                "{log}"
            );
        }
        other => panic!("a broken shader built: {other:?}"),
    }
    assert_eq!(
        backend.compiled(0).unwrap(),
        2,
        "a failed build is not cached"
    );
    assert!(
        matches!(backend.prepare(0, &broken), Err(BackendError::Build { .. })),
        "nor remembered as built"
    );
    let none = KernelSpec {
        wgsl: None,
        ..DOUBLE
    };
    assert!(matches!(
        backend.prepare(0, &none),
        Err(BackendError::Unsupported {
            backend: BackendKind::Wgpu,
            ..
        })
    ));
    assert!(matches!(
        backend.launch(0, none, &KernelConfig::default()),
        Err(BackendError::Unsupported { .. })
    ));
    let beyond = backend.devices().len();
    assert!(matches!(
        backend.prepare(beyond, &DOUBLE),
        Err(BackendError::UnknownDevice(index)) if index == beyond
    ));
}

/// More work-groups than one dispatch dimension holds (65535 of 64): the
/// grid goes on in y, and every element is computed once.
fn a_batch_wider_than_one_dispatch_dimension_covers_every_element() {
    let backend = backend();
    let widest = backend.adapters()[0].max_workgroups_per_dimension as usize;
    let n = (widest * 64 + 4321).min(shipped::MAX_BATCH_ELEMENTS as usize);
    assert!(n > widest * 64, "the grid needs a second row");
    let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let request = f32s(&values);
    let doubled = from_f32s(&backend.run_batch(0, &DOUBLE, &request).unwrap());
    assert_eq!(doubled.len(), n);
    for (i, value) in doubled.iter().enumerate() {
        assert_eq!(*value, 2.0 * i as f32, "element {i}");
    }
}

/// Sums longer than one pass (32768 terms per invocation per dispatch)
/// carry their partial sums across passes, in order: bit for bit the CPU's.
fn long_sums_run_in_passes_and_match_the_cpu_to_the_bit() {
    let backend = backend();
    let pairs = 200_003;
    let request = f32s(&random_f32s(11, 2 * pairs));
    assert_eq!((DOT.wgsl.unwrap().passes)(&request), 7);
    let got = backend.run_batch(0, &DOT, &request).unwrap();
    assert!(matches_cpu(&DOT, &request, &got), "{:?}", from_f32s(&got));
    // A product whose inner dimension takes two passes.
    let (n, k, m) = (2, 40_000, 3);
    let a = random_f32s(12, n * k);
    let b = random_f32s(13, k * m);
    let request = shipped::matmul_request(n, k, m, &a, &b).unwrap();
    assert_eq!((MATMUL.wgsl.unwrap().passes)(&request), 2);
    let got = backend.run_batch(0, &MATMUL, &request).unwrap();
    assert!(
        matches_cpu(&MATMUL, &request, &got),
        "{:?}",
        from_f32s(&got)
    );
}

/// Many requests at once go out in micro-batches of at most the configured
/// size, and each is answered with its own response.
fn the_ring_drains_into_micro_batches_and_answers_each_request() {
    for micro_batch in [1, 7, 256] {
        let backend = WgpuBackend::discover_with(WgpuOptions {
            micro_batch,
            ..WgpuOptions::default()
        })
        .unwrap();
        let mut kernel = backend
            .launch_ring(0, DOUBLE, &KernelConfig::default())
            .unwrap();
        let submitter = kernel.submitter().unwrap();
        let requests: Vec<Vec<u8>> = (0..300)
            .map(|i| f32s(&random_f32s(i, 1 + i as usize % 50)))
            .collect();
        for (id, request) in requests.iter().enumerate() {
            submitter.submit(id as u64, request.as_slice()).unwrap();
        }
        let mut seen = std::collections::HashMap::new();
        for _ in 0..requests.len() {
            let done = kernel.complete(WAIT).expect("an answer");
            seen.insert(done.request_id, done);
        }
        for (id, request) in requests.iter().enumerate() {
            let done = &seen[&(id as u64)];
            assert_eq!(
                done.status,
                Status::Ok,
                "micro-batch {micro_batch}, request {id}"
            );
            assert!(matches_cpu(&DOUBLE, request, &done.payload));
        }
        // Never more requests in one dispatch than the micro-batch holds.
        let dispatches = kernel.dispatches() as usize;
        assert!(
            dispatches >= requests.len().div_ceil(micro_batch) && dispatches <= requests.len(),
            "{dispatches} dispatches for {} requests in micro-batches of {micro_batch}",
            requests.len()
        );
        // The idle thread goes on beating (bounded wait, no fixed sleep).
        let heartbeat = kernel.heartbeat();
        let deadline = std::time::Instant::now() + WAIT;
        while kernel.heartbeat() == heartbeat {
            assert!(
                std::time::Instant::now() < deadline,
                "the idle thread beats"
            );
            std::thread::yield_now();
        }
        assert!(kernel.stop(StopMode::Drain, WAIT).exited);
    }
}

/// An abandoning stop while the device works on a micro-batch (queued
/// behind a product that takes about a second on lavapipe) ends the kernel
/// within a beat, and reports the micro-batch's request abandoned.
fn an_abandoning_stop_does_not_wait_for_the_device() {
    let backend = std::sync::Arc::new(backend());
    let mut kernel = backend
        .launch_ring(0, DOUBLE, &KernelConfig::default())
        .unwrap();
    let submitter = kernel.submitter().unwrap();
    submitter.submit(0, f32s(&[1.0])).unwrap();
    kernel.complete(WAIT).expect("the kernel is warm");
    let side = 1024;
    let a: Vec<f32> = (0..side * side).map(|i| (i % 31) as f32 * 0.25).collect();
    let product = shipped::matmul_request(side, side, side, &a, &a).unwrap();
    let long = {
        let backend = backend.clone();
        std::thread::spawn(move || backend.run_batch(0, &MATMUL, &product).map(|c| c.len()))
    };
    // Submitted once the product is on the device: wait until the ring's
    // micro-batch has gone to the device, behind it.
    std::thread::sleep(Duration::from_millis(100));
    submitter.submit(1, f32s(&[2.0])).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while kernel.dispatches() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the micro-batch goes out"
        );
        std::thread::yield_now();
    }
    let started = std::time::Instant::now();
    let report = kernel.stop(StopMode::Abandon, Duration::from_secs(2));
    let waited = started.elapsed();
    let finished_first = long.is_finished();
    assert!(
        report.exited,
        "the stop ended the thread (after {waited:?})"
    );
    // Either the device answered first (the product was quicker than
    // expected), or the stop gave the request up; never both, never neither.
    let answered = report.completions.iter().any(|c| c.request_id == 1);
    let abandoned = report.abandoned.contains(&1);
    assert!(answered != abandoned, "{report:?}");
    if !finished_first {
        assert!(abandoned, "the device was still busy: {report:?}");
    }
    assert_eq!(long.join().unwrap().unwrap(), side * side * 4);
}

/// Writes and reads at offsets inside words touch only their own bytes
/// (rule 2 of `wgpu/resident.rs`); request parts must be whole words but
/// the last; another wgpu backend's buffer is refused.
fn unaligned_writes_keep_their_neighbours_and_foreign_buffers_are_refused() {
    let backend = backend();
    let buffer = backend.alloc_resident(0, 11).unwrap();
    backend.write_resident(&*buffer, 0, &[9; 11]).unwrap();
    backend.write_resident(&*buffer, 5, &[1, 2, 3]).unwrap();
    assert_eq!(
        backend.read_resident(&*buffer, 0, 11).unwrap(),
        [9, 9, 9, 9, 9, 1, 2, 3, 9, 9, 9]
    );
    assert_eq!(
        backend.read_resident(&*buffer, 6, 5).unwrap(),
        [2, 3, 9, 9, 9]
    );
    // Eight bytes of request, two floats, but the first part ends mid-word.
    let odd = backend.alloc_resident(0, 6).unwrap();
    let tail = [0u8; 2];
    let refused = backend.run_batch_parts(
        0,
        &DOUBLE,
        &[BatchPart::Resident(&*odd), BatchPart::Host(&tail)],
        BatchOutput::Host,
    );
    assert!(
        matches!(refused, Err(BackendError::BadBuffer(_))),
        "{refused:?}"
    );
    let other = WgpuBackend::discover().unwrap();
    let theirs = other.alloc_resident(0, 16).unwrap();
    assert!(matches!(
        backend.read_resident(&*theirs, 0, 4),
        Err(BackendError::BadBuffer(_))
    ));
    // wgpu offers no copy between two devices' buffers (each device owns
    // its memory): the caller stages through the host.
    assert!(backend.copy_resident(&*theirs, &*buffer).is_none());
}

fn main() {
    gate::run(vec![
        gate::wgpu(
            "discovery_reports_each_adapter_with_its_api_limits_and_memory",
            discovery_reports_each_adapter_with_its_api_limits_and_memory,
        ),
        gate::test(
            "options_out_of_range_are_refused",
            options_out_of_range_are_refused,
        ),
        gate::wgpu(
            "builds_are_cached_and_a_shader_error_returns_nagas_message",
            builds_are_cached_and_a_shader_error_returns_nagas_message,
        ),
        gate::wgpu(
            "a_batch_wider_than_one_dispatch_dimension_covers_every_element",
            a_batch_wider_than_one_dispatch_dimension_covers_every_element,
        ),
        gate::wgpu(
            "long_sums_run_in_passes_and_match_the_cpu_to_the_bit",
            long_sums_run_in_passes_and_match_the_cpu_to_the_bit,
        ),
        gate::wgpu(
            "the_ring_drains_into_micro_batches_and_answers_each_request",
            the_ring_drains_into_micro_batches_and_answers_each_request,
        ),
        gate::wgpu(
            "an_abandoning_stop_does_not_wait_for_the_device",
            an_abandoning_stop_does_not_wait_for_the_device,
        ),
        gate::wgpu(
            "unaligned_writes_keep_their_neighbours_and_foreign_buffers_are_refused",
            unaligned_writes_keep_their_neighbours_and_foreign_buffers_are_refused,
        ),
    ]);
}
