//! NVRTC, the safe layer: CUDA C to a CUBIN for one architecture, with the
//! compiler's log on failure.
//!
//! Built over cudarc's `nvrtc::result` and `nvrtc::sys` (cudarc's own
//! `compile_ptx` produces PTX only and panics where the log cannot be
//! read). A CUBIN for the device's own `sm_XY` loads without the driver's
//! PTX JIT, so an NVRTC newer than the driver still works.

use std::ffi::{CStr, CString};

use cudarc::nvrtc::{result, sys};

use super::CudaError;

/// Options every Granary kernel is built with: no fused multiply-add, so
/// results match the CPU implementations to the bit (as `FP_CONTRACT OFF`
/// does for OpenCL C).
pub const BUILD_OPTIONS: [&str; 2] = ["--std=c++17", "--fmad=false"];

/// Whether the NVRTC library can be loaded (it is looked up on the library
/// path: CUDA's `lib64`, or the PyPI package `nvidia-cuda-nvrtc`).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the library by its known names; no NVRTC
    // function is called.
    unsafe { sys::is_culib_present() }
}

/// Compiles `source` for `sm_{arch}` (for example 90 for an H100) and
/// returns the CUBIN. `name` names the program in NVRTC's log.
pub fn compile_cubin(source: &str, arch: u32, name: &str) -> Result<Vec<u8>, CudaError> {
    if !nvrtc_present() {
        return Err(CudaError::Unavailable(
            "NVRTC (libnvrtc) was not found on the library path".to_string(),
        ));
    }
    let source = CString::new(source)
        .map_err(|_| CudaError::BadInput("CUDA C source holds a NUL byte".to_string()))?;
    let name = CString::new(name)
        .map_err(|_| CudaError::BadInput("program name holds a NUL byte".to_string()))?;
    let program =
        Program(result::create_program(&source, Some(&name)).map_err(nvrtc("nvrtcCreateProgram"))?);
    let mut options: Vec<String> = BUILD_OPTIONS.iter().map(|o| o.to_string()).collect();
    options.push(format!("--gpu-architecture=sm_{arch}"));
    // SAFETY: a live program; the options are plain strings.
    let compiled = unsafe { result::compile_program(program.0, &options) };
    if let Err(err) = compiled {
        let log = program.log().unwrap_or_else(|| "(no log)".to_string());
        return Err(CudaError::Build {
            log: format!("nvrtc {err:?} with {options:?}:\n{log}"),
        });
    }
    program.cubin()
}

/// An NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Program {
    /// The compile log, if NVRTC hands one back.
    fn log(&self) -> Option<String> {
        // SAFETY: a live program.
        let raw = unsafe { result::get_program_log(self.0) }.ok()?;
        // SAFETY: NVRTC's log is NUL-terminated within the buffer it sized.
        let text = unsafe { CStr::from_ptr(raw.as_ptr()) };
        Some(text.to_string_lossy().trim_end().to_string())
    }

    /// The compiled CUBIN.
    fn cubin(&self) -> Result<Vec<u8>, CudaError> {
        let mut size = 0usize;
        // SAFETY: a compiled program and a valid out-pointer.
        unsafe { sys::nvrtcGetCUBINSize(self.0, &mut size) }
            .result()
            .map_err(nvrtc("nvrtcGetCUBINSize"))?;
        let mut cubin = vec![0u8; size];
        // SAFETY: the buffer holds the `size` bytes NVRTC just reported.
        unsafe { sys::nvrtcGetCUBIN(self.0, cubin.as_mut_ptr().cast()) }
            .result()
            .map_err(nvrtc("nvrtcGetCUBIN"))?;
        if cubin.is_empty() {
            return Err(CudaError::Build {
                log: "NVRTC produced an empty CUBIN".to_string(),
            });
        }
        Ok(cubin)
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed once, here.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn nvrtc(call: &'static str) -> impl Fn(result::NvrtcError) -> CudaError {
    move |err| CudaError::Api {
        call,
        code: err.0 as i32,
    }
}
