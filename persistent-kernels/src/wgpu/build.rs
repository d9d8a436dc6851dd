//! WGSL builds (module rule 3): the prelude, the kernel's source and the
//! entry points, checked with naga, then built into two compute pipelines
//! on the backend's one bind-group layout, cached per device and source.

use std::sync::{Arc, PoisonError};

use super::memory::scoped_build;
use super::{Gpu, WgpuError};
use crate::spec::{KernelSpec, WGSL_CHUNK};

/// The WGSL placed before every kernel's source: status codes, bindings and
/// word accessors (`device/prelude.wgsl`).
pub const PRELUDE_WGSL: &str = include_str!("../../device/prelude.wgsl");

/// The WGSL placed after every kernel's source: the `granary_batch` and
/// `granary_ring` entry points (`device/dispatch.wgsl`).
pub const DISPATCH_WGSL: &str = include_str!("../../device/dispatch.wgsl");

/// Invocations per work-group in both entry points (`GRANARY_GROUP`).
pub(crate) const GROUP: u32 = 64;

/// One kernel's two pipelines on one device.
#[derive(Debug)]
pub(crate) struct Pipelines {
    pub(crate) batch: wgpu::ComputePipeline,
    pub(crate) ring: wgpu::ComputePipeline,
}

/// The bindings of `prelude.wgsl`: request (read), response (read-write),
/// parameters (uniform, at a dynamic offset: one block per batch pass),
/// jobs (read-write).
pub(crate) fn bind_group_layout(device: &wgpu::Device) -> wgpu::BindGroupLayout {
    let storage = |binding, read_only| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    };
    device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("granary"),
        entries: &[
            storage(0, true),
            storage(1, false),
            wgpu::BindGroupLayoutEntry {
                binding: 2,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: true,
                    min_binding_size: None,
                },
                count: None,
            },
            storage(3, false),
        ],
    })
}

/// The whole WGSL of `spec`, or [`WgpuError::NoSource`].
/// The host's constants, placed first, so that the WGSL and the host agree
/// on them by construction.
pub(crate) fn constants() -> String {
    format!("const GRANARY_GROUP: u32 = {GROUP}u;\nconst GRANARY_CHUNK: u32 = {WGSL_CHUNK}u;\n")
}

pub(crate) fn source(spec: &KernelSpec) -> Result<String, WgpuError> {
    let kernel = spec.wgsl.ok_or(WgpuError::NoSource)?.source;
    Ok(format!(
        "{}{PRELUDE_WGSL}\n{kernel}\n{DISPATCH_WGSL}",
        constants()
    ))
}

/// Checks `source` with naga: its parse or validation error, rendered
/// against the source, is the build log.
pub(crate) fn check(source: &str) -> Result<(), WgpuError> {
    use wgpu::naga;
    let module = naga::front::wgsl::parse_str(source).map_err(|err| WgpuError::Build {
        log: err.emit_to_string(source),
    })?;
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::default(),
    )
    .validate(&module)
    .map_err(|err| WgpuError::Build {
        log: err.emit_to_string(source),
    })?;
    Ok(())
}

/// `spec`'s pipelines on `gpu`, built once (module rule 3).
pub(crate) fn pipelines(gpu: &Gpu, spec: &KernelSpec) -> Result<Arc<Pipelines>, WgpuError> {
    let source = source(spec)?;
    let mut builds = gpu.builds.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(built) = builds.get(&source) {
        return Ok(built.clone());
    }
    check(&source)?;
    let built = scoped_build(gpu, || {
        let module = gpu
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(spec.id),
                source: wgpu::ShaderSource::Wgsl(source.as_str().into()),
            });
        let pipeline = |entry_point| {
            gpu.device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(spec.id),
                    layout: Some(&gpu.pipeline_layout),
                    module: &module,
                    entry_point: Some(entry_point),
                    compilation_options: wgpu::PipelineCompilationOptions::default(),
                    cache: None,
                })
        };
        Ok(Pipelines {
            batch: pipeline("granary_batch"),
            ring: pipeline("granary_ring"),
        })
    })?;
    let built = Arc::new(built);
    builds.insert(source, built.clone());
    gpu.compiled
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(built)
}

#[cfg(test)]
mod tests {
    use wgpu::naga;

    use super::{constants, source};
    use crate::shipped::ALL;

    /// The sizes the host lays out (`ring.rs`, `memory.rs`) are the sizes
    /// naga gives the WGSL structs.
    #[test]
    fn the_host_and_the_wgsl_agree_on_the_structs() {
        let module =
            naga::front::wgsl::parse_str(&format!("{}{}", constants(), super::PRELUDE_WGSL))
                .expect("the prelude parses");
        let size = |name: &str| {
            module
                .types
                .iter()
                .find(|(_, ty)| ty.name.as_deref() == Some(name))
                .map(|(_, ty)| ty.inner.size(module.to_ctx()) as usize)
                .unwrap_or_else(|| panic!("no struct {name}"))
        };
        assert_eq!(size("GranaryJob"), crate::wgpu::ring::JOB_BYTES);
        assert_eq!(size("GranaryParams"), 16);
    }

    /// Every shipped kernel's whole source passes naga's checks (what a
    /// build runs before the driver sees it), with no device needed.
    #[test]
    fn every_shipped_kernel_passes_nagas_checks() {
        for spec in ALL {
            let text = source(&spec).expect("a WGSL source");
            super::check(&text).unwrap_or_else(|err| panic!("{}: {err}", spec.id));
        }
    }
}
