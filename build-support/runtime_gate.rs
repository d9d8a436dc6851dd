// Test binaries that decide when they run, not when they are built, whether
// the runtime a test needs is present.
//
// Rules:
// 1. A test that needs OpenCL runs only where `OpenClBackend::discover`
//    succeeds in the test process: a platform with at least one device. The
//    ICD loader alone is not enough (it is installed on many machines with
//    no platform behind it).
// 2. Where OpenCL is unavailable, each such test is reported as ignored,
//    never as passed, and the reason is printed once on stderr. Run with
//    `--include-ignored` to see them fail for that reason.
// 3. Tests that need nothing always run. A panic is a failure (libtest-mimic
//    catches it), so test bodies keep their plain `assert!`s.
// 4. A test that needs wgpu runs only where `WgpuBackend::discover` opens
//    at least one device, and is reported as ignored elsewhere, like
//    OpenCL's. With `GRANARY_REQUIRE_WGPU=1` (CI, which installs lavapipe)
//    it always runs, so a missing adapter fails it instead.
//
// Included by the test targets of the crates with OpenCL or wgpu tests,
// which set `harness = false`. A build-time probe decided
// this before and was wrong wherever the ICD loader was installed without a
// platform behind it.

use libtest_mimic::{Arguments, Trial};

/// What a test needs from the machine it runs on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Runs everywhere.
    Nothing,
    /// An OpenCL platform with a device (rule 1).
    OpenCl,
    /// A wgpu adapter (Vulkan, Metal or DX12) that opens a device (rule 4).
    Wgpu,
}

/// One test of a gated binary.
pub struct Case {
    name: &'static str,
    needs: Needs,
    body: Box<dyn FnOnce() + Send + 'static>,
}

/// A test that runs everywhere.
pub fn test(name: &'static str, body: impl FnOnce() + Send + 'static) -> Case {
    Case {
        name,
        needs: Needs::Nothing,
        body: Box::new(body),
    }
}

/// A test that runs only where an OpenCL device is found (rule 1).
pub fn opencl(name: &'static str, body: impl FnOnce() + Send + 'static) -> Case {
    Case {
        name,
        needs: Needs::OpenCl,
        body: Box::new(body),
    }
}

/// A test that runs only where a wgpu device opens (rule 4).
pub fn wgpu(name: &'static str, body: impl FnOnce() + Send + 'static) -> Case {
    Case {
        name,
        needs: Needs::Wgpu,
        body: Box::new(body),
    }
}

/// Whether a wgpu device opens here, and why not (rule 4).
pub fn wgpu_available() -> Result<(), String> {
    if std::env::var_os("GRANARY_REQUIRE_WGPU").is_some_and(|value| value == "1") {
        return Ok(());
    }
    granary_kernels::wgpu::WgpuBackend::discover()
        .map(drop)
        .map_err(|err| err.to_string())
}

/// Whether OpenCL is usable here, and why not (rule 1).
pub fn opencl_available() -> Result<(), String> {
    granary_kernels::opencl::OpenClBackend::discover()
        .map(drop)
        .map_err(|err| err.to_string())
}

/// Runs the cases under libtest's command line and exits (rules 2 and 3).
pub fn run(cases: Vec<Case>) -> ! {
    let args = Arguments::from_args();
    let needs_opencl = cases
        .iter()
        .filter(|case| case.needs == Needs::OpenCl)
        .count();
    let opencl = if needs_opencl > 0 {
        opencl_available()
    } else {
        Ok(())
    };
    if let Err(why) = &opencl {
        eprintln!("opencl: SKIPPED: {needs_opencl} OpenCL test(s) reported as ignored: {why}");
    }
    let needs_wgpu = cases
        .iter()
        .filter(|case| case.needs == Needs::Wgpu)
        .count();
    let wgpu = if needs_wgpu > 0 {
        wgpu_available()
    } else {
        Ok(())
    };
    if let Err(why) = &wgpu {
        eprintln!("wgpu: SKIPPED: {needs_wgpu} wgpu test(s) reported as ignored: {why}");
    }
    let trials = cases
        .into_iter()
        .map(|case| {
            let unavailable = match case.needs {
                Needs::Nothing => false,
                Needs::OpenCl => opencl.is_err(),
                Needs::Wgpu => wgpu.is_err(),
            };
            let body = case.body;
            Trial::test(case.name, move || {
                body();
                Ok(())
            })
            .with_ignored_flag(unavailable)
        })
        .collect();
    libtest_mimic::run(&args, trials).exit()
}
