//! Resident buffers on the CPU backend and, where an OpenCL device or a
//! wgpu adapter is found when the tests run (POCL and lavapipe in CI), on
//! OpenCL and wgpu; the CUDA half is in
//! `cuda.rs`, run on a GPU machine.

mod common;

use common::gate;

use common::resident::ALL;
use granary_kernels::CpuBackend;

fn the_cpu_backend_keeps_the_resident_contract() {
    let backend = CpuBackend::new();
    for (name, check) in ALL {
        check(&backend).unwrap_or_else(|why| panic!("{name}: {why}"));
    }
}

fn a_cpu_backend_of_two_devices_keeps_the_contract_on_each_and_their_buffers_apart() {
    use granary_kernels::resident::{BatchOutput, BatchPart};
    use granary_kernels::{Backend, BackendError, DeviceInfo, host_device, shipped};
    let share = DeviceInfo {
        total_memory: 1 << 20,
        free_memory: 1 << 20,
        ..host_device()
    };
    let backend = CpuBackend::with_devices(vec![share.clone(), share]);
    let devices = backend.devices();
    assert_eq!(
        devices.iter().map(|d| d.index).collect::<Vec<_>>(),
        vec![0, 1]
    );
    for (name, check) in ALL {
        check(&backend).unwrap_or_else(|why| panic!("{name}: {why}"));
    }
    let on_second = backend.alloc_resident(1, 16).unwrap();
    assert_eq!(on_second.device(), 1);
    backend.write_resident(&*on_second, 0, &[7; 16]).unwrap();
    assert_eq!(
        backend.read_resident(&*on_second, 0, 16).unwrap(),
        vec![7; 16]
    );
    // A batch on the first device refuses the second's buffer.
    let scale = shipped::ALL
        .iter()
        .find(|spec| spec.id == "saxpy")
        .expect("saxpy is shipped");
    let refused = backend.run_batch_parts(
        0,
        scale,
        &[BatchPart::Resident(&*on_second)],
        BatchOutput::Host,
    );
    assert!(
        matches!(refused, Err(BackendError::BadBuffer(_))),
        "{refused:?}"
    );
    assert!(matches!(
        backend.alloc_resident(2, 16),
        Err(BackendError::UnknownDevice(2))
    ));
    // Device to device: the second's bytes copied into a buffer on the
    // first, directly; a copy between buffers of two lengths is refused.
    let on_first = backend.alloc_resident(0, 16).unwrap();
    backend
        .copy_resident(&*on_second, &*on_first)
        .expect("the CPU backend copies between its devices")
        .unwrap();
    assert_eq!(
        backend.read_resident(&*on_first, 0, 16).unwrap(),
        vec![7; 16]
    );
    let shorter = backend.alloc_resident(0, 8).unwrap();
    assert!(matches!(
        backend.copy_resident(&*on_second, &*shorter),
        Some(Err(BackendError::BadBuffer(_)))
    ));
}

fn the_opencl_backend_keeps_the_resident_contract() {
    let backend = granary_kernels::opencl::OpenClBackend::discover()
        .expect("an OpenCL runtime was found at build time");
    for (name, check) in ALL {
        check(&backend).unwrap_or_else(|why| panic!("{name}: {why}"));
    }
}

fn the_wgpu_backend_keeps_the_resident_contract() {
    let backend =
        granary_kernels::wgpu::WgpuBackend::discover().expect("a wgpu adapter (lavapipe in CI)");
    for (name, check) in ALL {
        check(&backend).unwrap_or_else(|why| panic!("{name}: {why}"));
    }
}

fn main() {
    gate::run(vec![
        gate::wgpu(
            "the_wgpu_backend_keeps_the_resident_contract",
            the_wgpu_backend_keeps_the_resident_contract,
        ),
        gate::test(
            "the_cpu_backend_keeps_the_resident_contract",
            the_cpu_backend_keeps_the_resident_contract,
        ),
        gate::test(
            "a_cpu_backend_of_two_devices_keeps_the_contract_on_each_and_their_buffers_apart",
            a_cpu_backend_of_two_devices_keeps_the_contract_on_each_and_their_buffers_apart,
        ),
        gate::opencl(
            "the_opencl_backend_keeps_the_resident_contract",
            the_opencl_backend_keeps_the_resident_contract,
        ),
    ]);
}
