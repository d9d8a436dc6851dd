//! A node whose file says `devices = { backend = "wgpu" }` lends its wgpu
//! adapter to its grains, which run kernels there like on any other
//! device. Reported as ignored, with the reason, where no wgpu adapter
//! opens a device when the test runs (`build-support/runtime_gate.rs`);
//! that the node then refuses to start, naming wgpu, is checked by
//! `cluster_demo.rs` with the Vulkan driver hidden.

// Only its wgpu case is used here.
#[allow(dead_code)]
#[path = "../build-support/runtime_gate.rs"]
mod gate;

use granary::actors::SiloBuilder;
use granary::gpu::GpuBridge;
use granary::kernels::BackendKind;
use granary::kernels::shipped::{bytes_f32, f32_bytes};
use granary::node_file::{DeviceBackend, NodeDevices, NodeFile, start_node};

fn no_grains(silo: SiloBuilder, _: &NodeDevices) -> SiloBuilder {
    silo
}

fn a_node_on_wgpu_serves_kernels_there() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let gossip = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|socket| socket.local_addr())
            .expect("a free port");
        let file = NodeFile::from_toml(&format!(
            "cluster = \"node-wgpu-test\"\n\
             secret = \"5f2a9c41e07bd3386a11f04c9be2d57003e8a6b1c94f2d0e7ab36c5d18f09e42\"\n\
             listen = \"127.0.0.1:0\"\ngossip = \"{gossip}\"\nstorage = {{ kind = \"memory\" }}\n\
             devices = {{ backend = \"wgpu\", memory_mib = 64 }}\n"
        ))
        .expect("a valid file");
        assert_eq!(file.devices.backend, DeviceBackend::Wgpu);
        let node = start_node(&file, &no_grains)
            .await
            .expect("the node starts on wgpu");
        let bridge = node
            .silo()
            .service::<GpuBridge>()
            .expect("the node serves its bridge");
        let doubled = bridge
            .execute("double", &f32_bytes(&[1.5, -4.0]))
            .await
            .expect("the wgpu device answers");
        assert_eq!(bytes_f32(&doubled), [3.0, -8.0]);
        let (_, info, stats) = bridge.devices().remove(0);
        assert_eq!(info.backend, BackendKind::Wgpu);
        assert!(stats.available <= 64 << 20, "the file's limit: {stats:?}");
        assert_eq!(stats.processed, 1);
        node.leave().await.expect("the node leaves");
    });
}

fn main() {
    gate::run(vec![gate::wgpu(
        "a_node_on_wgpu_serves_kernels_there",
        a_node_on_wgpu_serves_kernels_there,
    )]);
}
