//! Resident buffers on the CPU backend and, where an OpenCL device is found
//! when the tests run (POCL in CI), on OpenCL; the CUDA half is in
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

fn the_opencl_backend_keeps_the_resident_contract() {
    let backend = granary_kernels::opencl::OpenClBackend::discover()
        .expect("an OpenCL runtime was found at build time");
    for (name, check) in ALL {
        check(&backend).unwrap_or_else(|why| panic!("{name}: {why}"));
    }
}

fn main() {
    gate::run(vec![
        gate::test(
            "the_cpu_backend_keeps_the_resident_contract",
            the_cpu_backend_keeps_the_resident_contract,
        ),
        gate::opencl(
            "the_opencl_backend_keeps_the_resident_contract",
            the_opencl_backend_keeps_the_resident_contract,
        ),
    ]);
}
