//! Sets `cfg(granary_opencl)` for the OpenCL tests (see
//! `build-support/opencl_probe.rs`).

include!("../build-support/opencl_probe.rs");

fn main() {
    probe_opencl();
}
