//! NVRTC builds the CUDA C of every shipped kernel, with the persistent
//! template, for every architecture Granary supports. No GPU is needed:
//! CI runs this with NVRTC from PyPI (`nvidia-cuda-nvrtc`, 13.0.x), so a
//! syntax error in any `.cu` source fails CI.
//!
//! Where NVRTC cannot be loaded the tests are reported as ignored, with the
//! reason printed, never as passed.

use granary_kernels::cuda::{CudaError, nvrtc, program_source};
use granary_kernels::shipped::ALL;
use libtest_mimic::{Arguments, Failed, Trial};

/// Volta (the first with the PTX acquire/release used by the template),
/// Ampere, Ada and Hopper. NVRTC 13 dropped everything before Turing, so
/// sm_70 is not among them.
const ARCHITECTURES: [u32; 4] = [75, 80, 89, 90];

fn main() {
    let args = Arguments::from_args();
    let missing = !nvrtc::nvrtc_present();
    if missing {
        eprintln!(
            "cuda_nvrtc: SKIPPED: libnvrtc was not found on the library path \
             (pip install nvidia-cuda-nvrtc==13.0.*, then add its lib to LD_LIBRARY_PATH)"
        );
    }
    let mut trials = Vec::new();
    for spec in ALL {
        for arch in ARCHITECTURES {
            trials.push(
                Trial::test(format!("{}_builds_for_sm_{arch}", spec.id), move || {
                    let source = program_source(&spec).map_err(|e| Failed::from(e.to_string()))?;
                    let cubin = nvrtc::compile_cubin(&source, arch, spec.id)
                        .map_err(|e| Failed::from(e.to_string()))?;
                    // An ELF image, as the driver loads it.
                    if cubin.get(..4) != Some(b"\x7fELF".as_slice()) {
                        return Err("NVRTC's CUBIN is not an ELF image".into());
                    }
                    Ok(())
                })
                .with_ignored_flag(missing),
            );
        }
    }
    trials.push(
        Trial::test("a_syntax_error_returns_the_compiler_log", || {
            let broken = "extern \"C\" __global__ void granary_broken() { int x = ; }";
            match nvrtc::compile_cubin(broken, 90, "broken") {
                Err(CudaError::Build { log }) if log.contains("expected an expression") => Ok(()),
                other => {
                    Err(format!("expected a build error with NVRTC's log, got {other:?}").into())
                }
            }
        })
        .with_ignored_flag(missing),
    );
    trials.push(Trial::test(
        "a_kernel_without_cuda_c_has_no_program",
        || {
            let mut spec = granary_kernels::shipped::DOUBLE;
            spec.cuda_c = None;
            match program_source(&spec) {
                Err(CudaError::NoSource) => Ok(()),
                other => Err(format!("expected NoSource, got {other:?}").into()),
            }
        },
    ));
    libtest_mimic::run(&args, trials).exit();
}
