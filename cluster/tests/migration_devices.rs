//! Migration on device backends: the load test of `migration.rs` with each
//! silo's bridge on an OpenCL device (POCL in CI) or a wgpu adapter
//! (lavapipe in CI), its share capped by a device memory limit. 30 grains
//! with 1 MiB resident buffers on the device, each moved once under 3,000
//! calls: every call answered in order, every buffer bit for bit after its
//! trip device → host → device, one activation at a time, and the device
//! memory reserved back to one buffer per grain. Placement sees the
//! device like any other. Where no such device is found a case reports as
//! ignored, and says why (`build-support/runtime_gate.rs`).

mod common;

// Only its device cases are used here.
#[allow(dead_code)]
#[path = "../../build-support/runtime_gate.rs"]
mod gate;

use std::sync::Arc;

use common::tensor::{Cluster, Moves, moves_under_load};
use granary_gpu::GpuBridge;
use granary_kernels::{Backend, BackendKind};

fn bridge_on(backend: Arc<dyn Backend>, mib: u64) -> Arc<GpuBridge> {
    Arc::new(
        GpuBridge::builder()
            .backend(backend)
            .device_memory_limit(mib << 20)
            .build()
            .expect("a bridge on the device"),
    )
}

fn grains_move_between_devices_under_load(
    base: u16,
    kind: BackendKind,
    backend: impl Fn() -> Arc<dyn Backend>,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let cluster = Cluster::new(base);
        let nodes = [
            cluster.node_on(1, bridge_on(backend(), 128)).await,
            cluster.node_on(2, bridge_on(backend(), 128)).await,
            cluster.node_on(3, bridge_on(backend(), 128)).await,
        ];
        moves_under_load(&cluster, &nodes, 30, 10, 3_000, false, Moves::AcrossSilos).await;
        // The buffers lived on the device, not the CPU fallback.
        for node in &nodes {
            let on_device: u64 = node
                .bridge
                .devices()
                .iter()
                .filter(|(_, info, _)| info.backend == kind)
                .map(|(_, _, stats)| stats.reserved)
                .sum();
            let anywhere: u64 = node
                .bridge
                .devices()
                .iter()
                .map(|(_, _, stats)| stats.reserved)
                .sum();
            assert_eq!(on_device, anywhere, "every buffer on the {kind:?} device");
        }
    });
}

fn main() {
    gate::run(vec![
        gate::opencl("grains_move_between_opencl_devices_under_load", || {
            grains_move_between_devices_under_load(47_600, BackendKind::OpenCl, || {
                Arc::new(
                    granary_kernels::opencl::OpenClBackend::discover()
                        .expect("an OpenCL device (the gate checked)"),
                )
            })
        }),
        gate::wgpu("grains_move_between_wgpu_devices_under_load", || {
            grains_move_between_devices_under_load(48_000, BackendKind::Wgpu, || {
                Arc::new(
                    granary_kernels::wgpu::WgpuBackend::discover()
                        .expect("a wgpu adapter (the gate checked)"),
                )
            })
        }),
    ]);
}
