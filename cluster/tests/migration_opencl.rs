//! Migration on OpenCL devices (POCL in CI): the load test of
//! `migration.rs` with each silo's bridge on the OpenCL device, its share
//! capped by a device memory limit. 30 grains with 1 MiB resident buffers
//! on the device, each moved once under 3,000 calls: every call answered
//! in order, every buffer bit for bit after its trip device → host →
//! device, one activation at a time, and the device memory reserved back
//! to one buffer per grain. Where no OpenCL device is found it reports as
//! ignored, and says why (`build-support/runtime_gate.rs`).

mod common;

// Only its OpenCL cases are used here.
#[allow(dead_code)]
#[path = "../../build-support/runtime_gate.rs"]
mod gate;

use std::sync::Arc;

use common::tensor::{Cluster, Moves, moves_under_load};
use granary_gpu::GpuBridge;
use granary_kernels::BackendKind;

fn opencl_bridge(mib: u64) -> Arc<GpuBridge> {
    let opencl = granary_kernels::opencl::OpenClBackend::discover()
        .expect("an OpenCL device (the gate checked)");
    Arc::new(
        GpuBridge::builder()
            .backend(Arc::new(opencl))
            .device_memory_limit(mib << 20)
            .build()
            .expect("a bridge on OpenCL"),
    )
}

fn grains_move_between_opencl_devices_under_load() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let cluster = Cluster::new(47_600);
        let nodes = [
            cluster.node_on(1, opencl_bridge(128)).await,
            cluster.node_on(2, opencl_bridge(128)).await,
            cluster.node_on(3, opencl_bridge(128)).await,
        ];
        moves_under_load(&cluster, &nodes, 30, 10, 3_000, false, Moves::AcrossSilos).await;
        // The buffers lived on the OpenCL device, not the CPU fallback.
        for node in &nodes {
            let on_opencl: u64 = node
                .bridge
                .devices()
                .iter()
                .filter(|(_, info, _)| info.backend == BackendKind::OpenCl)
                .map(|(_, _, stats)| stats.reserved)
                .sum();
            let anywhere: u64 = node
                .bridge
                .devices()
                .iter()
                .map(|(_, _, stats)| stats.reserved)
                .sum();
            assert_eq!(on_opencl, anywhere, "every buffer on the OpenCL device");
        }
    });
}

fn main() {
    gate::run(vec![gate::opencl(
        "grains_move_between_opencl_devices_under_load",
        grains_move_between_opencl_devices_under_load,
    )]);
}
