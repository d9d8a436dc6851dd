// Detects an OpenCL runtime (an ICD loader and at least one vendor ICD) so
// that OpenCL tests report as ignored, with the reason, where none is
// installed, instead of passing without running. Libraries never depend on
// this: they load OpenCL at run time and report it unavailable.
//
// Included by the build scripts of the crates with OpenCL tests.

use std::path::Path;

/// Sets `cfg(granary_opencl)` where an OpenCL runtime is installed.
pub fn probe_opencl() {
    println!("cargo::rustc-check-cfg=cfg(granary_opencl)");
    println!("cargo::rerun-if-changed=/etc/OpenCL/vendors");
    let loader = [
        "/usr/lib/x86_64-linux-gnu/libOpenCL.so.1",
        "/usr/lib/aarch64-linux-gnu/libOpenCL.so.1",
        "/usr/lib64/libOpenCL.so.1",
        "/usr/lib/libOpenCL.so.1",
        "/usr/local/lib/libOpenCL.so.1",
    ]
    .iter()
    .any(|path| Path::new(path).exists());
    let vendor = std::fs::read_dir("/etc/OpenCL/vendors")
        .map(|entries| {
            entries
                .flatten()
                .any(|entry| entry.path().extension().is_some_and(|ext| ext == "icd"))
        })
        .unwrap_or(false);
    if loader && vendor {
        println!("cargo::rustc-cfg=granary_opencl");
    }
}
