//! Resident buffers on the CPU backend and, where an OpenCL runtime was
//! found at build time (POCL in CI), on OpenCL; the CUDA half is in
//! `cuda.rs`, run on a GPU machine.

mod common;

use common::resident::ALL;
use granary_kernels::CpuBackend;

#[test]
fn the_cpu_backend_keeps_the_resident_contract() {
    let backend = CpuBackend::new();
    for (name, check) in ALL {
        check(&backend).unwrap_or_else(|why| panic!("{name}: {why}"));
    }
}

#[test]
#[cfg_attr(
    not(granary_opencl),
    ignore = "no OpenCL runtime when this test was built"
)]
fn the_opencl_backend_keeps_the_resident_contract() {
    let backend = granary_kernels::opencl::OpenClBackend::discover()
        .expect("an OpenCL runtime was found at build time");
    for (name, check) in ALL {
        check(&backend).unwrap_or_else(|why| panic!("{name}: {why}"));
    }
}
