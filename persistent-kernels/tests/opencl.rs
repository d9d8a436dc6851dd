//! The OpenCL backend, run for real (POCL in CI).
//!
//! Where no OpenCL runtime was found when these tests were built, they are
//! reported as ignored with the reason (see build.rs), not as passed.

use granary_kernels::DeviceKind;
use granary_kernels::opencl::{OpenClBackend, OpenClError, VECTOR_ADD_SOURCE};

fn backend() -> OpenClBackend {
    OpenClBackend::discover().expect("an OpenCL runtime was found at build time")
}

#[test]
#[cfg_attr(
    not(granary_opencl),
    ignore = "no OpenCL runtime when this test was built"
)]
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

#[test]
#[cfg_attr(
    not(granary_opencl),
    ignore = "no OpenCL runtime when this test was built"
)]
fn a_vector_add_of_one_million_elements_matches_the_cpu() {
    let backend = backend();
    let n = 1 << 20;
    let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32).collect();
    let c = backend.vector_add(0, &a, &b).unwrap();
    assert_eq!(c.len(), n);
    for i in 0..n {
        assert_eq!(c[i], a[i] + b[i], "element {i}");
    }
}

#[test]
#[cfg_attr(
    not(granary_opencl),
    ignore = "no OpenCL runtime when this test was built"
)]
fn builds_are_cached_per_source_and_failures_return_the_build_log() {
    let backend = backend();
    let first = backend.compile(0, VECTOR_ADD_SOURCE).unwrap();
    let again = backend.compile(0, VECTOR_ADD_SOURCE).unwrap();
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
}

#[test]
#[cfg_attr(
    not(granary_opencl),
    ignore = "no OpenCL runtime when this test was built"
)]
fn bad_input_and_unknown_devices_are_typed_errors() {
    let backend = backend();
    assert!(matches!(
        backend.vector_add(0, &[1.0], &[1.0, 2.0]),
        Err(OpenClError::BadInput(_))
    ));
    assert_eq!(backend.vector_add(0, &[], &[]), Ok(Vec::new()));
    let missing = backend.devices().len();
    assert_eq!(
        backend.vector_add(missing, &[1.0], &[1.0]),
        Err(OpenClError::UnknownDevice(missing))
    );
    assert_eq!(
        backend.vector_add(0, &[1.0, 2.0], &[3.0, 4.0]),
        Ok(vec![4.0, 6.0])
    );
}
