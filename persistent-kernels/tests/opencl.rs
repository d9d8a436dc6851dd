//! The OpenCL backend, run for real (POCL in CI).
//!
//! Where this process finds no OpenCL device when it runs, these tests are
//! reported as ignored, with the reason printed, never as passed
//! (`build-support/runtime_gate.rs`).

mod common;

use common::gate;

use common::{f32s, from_f32s};
use granary_kernels::opencl::{OpenClBackend, OpenClError};
use granary_kernels::shipped::{MATMUL, VECTOR_ADD};
use granary_kernels::{Backend, BackendError, DeviceKind, KernelSpec, Shape, Status};

/// A trivial source for the cache test.
const SOURCE: &str = "kernel void granary_probe(global float* x) { x[get_global_id(0)] = 1.0f; }";

fn backend() -> OpenClBackend {
    OpenClBackend::discover().expect("an OpenCL runtime was found at build time")
}

fn discovery_reports_each_device_with_its_resources() {
    let devices = backend().devices();
    assert!(!devices.is_empty());
    for (index, device) in devices.iter().enumerate() {
        assert_eq!(device.index as usize, index);
        assert!(!device.name.is_empty());
        assert!(device.compute_units >= 1);
        assert!(device.total_memory > 0 && device.free_memory <= device.total_memory);
        assert!(matches!(
            device.kind,
            DeviceKind::Cpu | DeviceKind::Gpu | DeviceKind::Accelerator
        ));
    }
}

fn a_vector_add_of_one_million_elements_matches_the_cpu() {
    let backend = backend();
    let n = 1 << 20;
    let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32).collect();
    let request = f32s(&[a.clone(), b.clone()].concat());
    let c = from_f32s(&backend.run_batch(0, &VECTOR_ADD, &request).unwrap());
    assert_eq!(c.len(), n);
    for i in 0..n {
        assert_eq!(c[i], a[i] + b[i], "element {i}");
    }
}

fn builds_are_cached_per_source_and_failures_return_the_build_log() {
    let backend = backend();
    let first = backend.compile(0, SOURCE).unwrap();
    let again = backend.compile(0, SOURCE).unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&first, &again),
        "the second build came from the cache"
    );
    assert_eq!(backend.cached_programs(0).unwrap(), 1);
    let other = "kernel void other(global float* x) { x[get_global_id(0)] = 1.0f; }";
    backend.compile(0, other).unwrap();
    assert_eq!(backend.cached_programs(0).unwrap(), 2);
    match backend.compile(
        0,
        "kernel void broken(global float* x) { x[0] = undeclared; }",
    ) {
        Err(OpenClError::Build { log }) => assert!(log.contains("undeclared"), "log: {log}"),
        other => panic!("expected a build error, got {other:?}"),
    }
    assert_eq!(
        backend.cached_programs(0).unwrap(),
        2,
        "failures are not cached"
    );
    // The compiler ran for the two builds and the failure, not the hit.
    assert_eq!(backend.compiler_runs(0).unwrap(), 3);
    // A kernel's program, built once whoever asks (as OpenCL C 3.0 on
    // POCL: one run).
    backend.program_for(0, &VECTOR_ADD).unwrap();
    let runs = backend.compiler_runs(0).unwrap();
    backend.program_for(0, &VECTOR_ADD).unwrap();
    assert_eq!(backend.compiler_runs(0).unwrap(), runs);
}

fn bad_input_and_unknown_devices_are_typed_errors() {
    let backend = backend();
    // An odd element count is not two equal vectors.
    assert!(matches!(
        Backend::run_batch(&backend, 0, &VECTOR_ADD, &f32s(&[1.0, 2.0, 3.0])),
        Err(BackendError::WrongShape(_))
    ));
    // Dimensions that do not match the data.
    let bad_dims = f32s(&[2.0, 2.0, 2.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
    assert_eq!(
        Backend::run_batch(&backend, 0, &MATMUL, &bad_dims),
        Err(BackendError::Rejected(Status::BadLength))
    );
    let missing = backend.devices().len();
    let request = f32s(&[1.0, 2.0, 3.0, 4.0]);
    assert_eq!(
        Backend::run_batch(&backend, missing, &VECTOR_ADD, &request),
        Err(BackendError::UnknownDevice(missing))
    );
    assert_eq!(
        from_f32s(&Backend::run_batch(&backend, 0, &VECTOR_ADD, &request).unwrap()),
        vec![4.0, 6.0]
    );
    // A kernel without OpenCL C, and one whose source does not build.
    let no_source = KernelSpec {
        opencl_c: None,
        ..VECTOR_ADD
    };
    assert!(matches!(
        backend.prepare(0, &no_source),
        Err(BackendError::Unsupported { .. })
    ));
    let broken = KernelSpec {
        id: "broken",
        opencl_c: Some("uint granary_process(oops"),
        request: Shape::exactly(granary_kernels::ElementType::F32, 1),
        ..VECTOR_ADD
    };
    match backend.prepare(0, &broken) {
        Err(BackendError::Build { kernel, log }) => {
            assert_eq!(kernel, "broken");
            assert!(!log.is_empty());
        }
        other => panic!("expected a build error, got {other:?}"),
    }
    assert!(matches!(
        backend.program_for(0, &broken),
        Err(OpenClError::Build { .. })
    ));
}

fn main() {
    gate::run(vec![
        gate::opencl(
            "discovery_reports_each_device_with_its_resources",
            discovery_reports_each_device_with_its_resources,
        ),
        gate::opencl(
            "a_vector_add_of_one_million_elements_matches_the_cpu",
            a_vector_add_of_one_million_elements_matches_the_cpu,
        ),
        gate::opencl(
            "builds_are_cached_per_source_and_failures_return_the_build_log",
            builds_are_cached_per_source_and_failures_return_the_build_log,
        ),
        gate::opencl(
            "bad_input_and_unknown_devices_are_typed_errors",
            bad_input_and_unknown_devices_are_typed_errors,
        ),
    ]);
}
