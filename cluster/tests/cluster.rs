//! Clusters of silos in one process: grains reachable from every silo,
//! exactly one activation under concurrent first calls from every silo,
//! a killed silo's grains moving elsewhere with their persisted state,
//! calls in flight to a dead silo failing fast, and GPU-aware placement by
//! free device memory (CPU backends with memory limits). Over the
//! in-process network with chitchat's channel transport, and over TCP and
//! UDP on loopback.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat::transport::{ChannelTransport, Transport as GossipTransport, UdpTransport};
use common::{Add, Counter, free_udp_ports};
use granary_actors::storage::{MemoryStorage, StorageProvider};
use granary_actors::{Grain, GrainContext, GrainKey, Handler, Message, Silo};
use granary_cluster::{
    ClusterCallError, ClusterNode, ClusterSecret, GpuNeeds, InProcessNetwork, NodeConfig,
    PreferLocal, TcpTransport, Transport,
};
use granary_gpu::GpuBridge;
use granary_kernels::{CpuBackend, DeviceInfo, host_device};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Nap(u64);
impl Message for Nap {
    type Reply = ();
}
impl Handler<Nap> for Counter {
    async fn handle(&mut self, Nap(ms): Nap, _: &mut GrainContext) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

fn silo(storage: Arc<dyn StorageProvider>) -> Silo {
    Silo::builder()
        .register::<Counter>("counter")
        .message::<Counter, Add>("add")
        .message::<Counter, Nap>("nap")
        .register::<Counter2>("tensor")
        .message::<Counter2, Add>("add")
        .storage(storage)
        .build()
        .unwrap()
}

/// The same grain under another name, for placement by device needs.
struct Counter2(u64);
impl Grain for Counter2 {
    fn new(_: &GrainKey) -> Counter2 {
        Counter2(0)
    }
}
impl Handler<Add> for Counter2 {
    async fn handle(&mut self, Add(n): Add, _: &mut GrainContext) -> u64 {
        self.0 += n;
        self.0
    }
}

fn secret() -> ClusterSecret {
    ClusterSecret::new(*b"the in-process cluster's secret").unwrap()
}

fn gossip(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn config(listen: &str, port: u16, seed: u16) -> NodeConfig {
    let mut config = NodeConfig::new(
        "test",
        secret(),
        listen,
        gossip(port),
        vec![gossip(seed).to_string()],
    );
    config.gossip_interval = Duration::from_millis(50);
    config.load_interval = Duration::from_millis(50);
    config
}

struct InProcess {
    network: InProcessNetwork,
    gossip: ChannelTransport,
    storage: Arc<MemoryStorage>,
}

impl InProcess {
    fn new() -> InProcess {
        InProcess {
            network: InProcessNetwork::new(),
            gossip: ChannelTransport::default(),
            storage: Arc::new(MemoryStorage::new()),
        }
    }

    async fn node(&self, n: u16, base: u16) -> ClusterNode {
        self.node_with(n, base, |builder| builder).await
    }

    async fn node_with(
        &self,
        n: u16,
        base: u16,
        extra: impl FnOnce(granary_cluster::NodeBuilder) -> granary_cluster::NodeBuilder,
    ) -> ClusterNode {
        let listen = format!("silo-{n}:7000");
        let builder = ClusterNode::builder(
            silo(self.storage.clone()),
            config(&listen, base + n, base + 1),
        )
        .transport(Arc::new(self.network.transport(&listen)));
        extra(builder).start(&self.gossip).await.unwrap()
    }
}

/// Waits until every node sees `count` members.
async fn converged(nodes: &[&ClusterNode], count: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while nodes.iter().any(|node| node.members().len() != count) {
        assert!(
            Instant::now() < deadline,
            "views did not converge: {:?}",
            nodes.iter().map(|n| n.members().len()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn add(node: &ClusterNode, key: u64, n: u64) -> Result<u64, ClusterCallError> {
    node.grain::<Counter>(key).call(Add(n)).await
}

async fn every_silo_calls_every_grain(nodes: &[ClusterNode], grains: u64) {
    let calls: Vec<_> = nodes
        .iter()
        .flat_map(|node| {
            (0..grains).map(move |key| {
                let node = node.clone();
                tokio::spawn(async move { add(&node, key, 1).await.unwrap() })
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
    let activations: u64 = nodes.iter().map(|n| n.silo().activations_started()).sum();
    assert_eq!(activations, grains, "exactly one activation per grain");
    let homes: usize = nodes.iter().map(ClusterNode::homes).sum();
    assert_eq!(homes as u64, grains);
    for key in 0..grains {
        assert_eq!(add(&nodes[0], key, 0).await.unwrap(), nodes.len() as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_silo_calls_every_grain_at_once_and_each_is_activated_once() {
    let cluster = InProcess::new();
    let nodes = vec![
        cluster.node(1, 30_000).await,
        cluster.node(2, 30_000).await,
        cluster.node(3, 30_000).await,
        cluster.node(4, 30_000).await,
    ];
    converged(&nodes.iter().collect::<Vec<_>>(), 4).await;
    every_silo_calls_every_grain(&nodes, 80).await;
    // Spread over the silos: the default placement hashes grains that
    // need no device.
    assert!(
        nodes.iter().all(|n| n.homes() > 0),
        "{:?}",
        nodes.iter().map(ClusterNode::homes).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_silos_grains_move_elsewhere_with_their_state() {
    let cluster = InProcess::new();
    let nodes = [
        cluster.node(1, 31_000).await,
        cluster.node(2, 31_000).await,
        cluster.node(3, 31_000).await,
    ];
    converged(&nodes.iter().collect::<Vec<_>>(), 3).await;
    for key in 0..30 {
        assert_eq!(add(&nodes[(key % 3) as usize], key, 5).await.unwrap(), 5);
    }
    let victim = nodes
        .iter()
        .position(|node| node.homes() > 0)
        .expect("some silo hosts grains");
    let moved = nodes[victim].homes();
    cluster.network.isolate(&nodes[victim].id().address);
    nodes[victim].kill().await.unwrap();
    let survivors: Vec<&ClusterNode> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, node)| node)
        .collect();
    converged(&survivors, 2).await;
    // Every grain answers again, from its persisted state.
    for key in 0..30 {
        assert_eq!(add(survivors[0], key, 1).await.unwrap(), 6, "grain {key}");
    }
    let homes: usize = survivors.iter().map(|n| n.homes()).sum();
    assert_eq!(homes, 30, "the {moved} grains of the dead silo moved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_to_a_dead_silo_fail_fast() {
    let cluster = InProcess::new();
    let local = |b: granary_cluster::NodeBuilder| b.placement(Arc::new(PreferLocal));
    let a = cluster.node_with(1, 32_000, local).await;
    let c = cluster.node_with(2, 32_000, local).await;
    converged(&[&a, &c], 2).await;
    // Homed on c: c calls it first, and placement prefers the caller.
    add(&c, 7, 1).await.unwrap();
    assert_eq!(c.homes(), 1);
    let napping = {
        let a = a.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let outcome = a.grain::<Counter>(7u64).call(Nap(10_000)).await;
            (outcome, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    cluster.network.isolate(&c.id().address);
    let (outcome, took) = napping.await.unwrap();
    assert!(
        matches!(outcome, Err(ClusterCallError::SiloUnavailable { .. })),
        "{outcome:?}"
    );
    assert!(took < Duration::from_secs(2), "failed fast: {took:?}");
    c.kill().await.unwrap();
    converged(&[&a], 1).await;
    // The grain comes back on a, from its state.
    assert_eq!(add(&a, 7, 1).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_grains_are_placed_where_device_memory_is_freest_and_never_where_they_do_not_fit() {
    let cluster = InProcess::new();
    let bridge = |free_mib: u64| {
        let device = DeviceInfo {
            total_memory: free_mib << 20,
            free_memory: free_mib << 20,
            ..host_device()
        };
        Arc::new(
            GpuBridge::builder()
                .cpu_backend(CpuBackend::with_device(device))
                .build()
                .unwrap(),
        )
    };
    let needs = GpuNeeds {
        device_memory: 300 << 20,
        ..GpuNeeds::default()
    };
    let mut nodes = Vec::new();
    for (n, free) in [(1u16, 256u64), (2, 1024), (3, 512)] {
        let (bridge, needs) = (bridge(free), needs.clone());
        nodes.push(
            cluster
                .node_with(n, 33_000, move |b| {
                    b.bridge(bridge)
                        .needs("tensor", needs)
                        .placement(Arc::new(granary_cluster::GpuAware::strict()))
                })
                .await,
        );
    }
    converged(&nodes.iter().collect::<Vec<_>>(), 3).await;
    // Wait for every silo's devices to be known everywhere.
    let deadline = Instant::now() + Duration::from_secs(10);
    while nodes
        .iter()
        .any(|node| node.members().iter().any(|m| m.load.devices.is_empty()))
    {
        assert!(Instant::now() < deadline, "loads not published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for key in 0..5u64 {
        let from = &nodes[(key % 3) as usize];
        assert_eq!(from.grain::<Counter2>(key).call(Add(1)).await.unwrap(), 1);
    }
    assert_eq!(
        nodes.iter().map(ClusterNode::homes).collect::<Vec<_>>(),
        [0, 5, 0],
        "all on the silo with 1 GiB free; none on the one with 256 MiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_silos_over_tcp_and_udp() {
    let storage = Arc::new(MemoryStorage::new());
    let ports = free_udp_ports(3);
    let mut nodes = Vec::new();
    for &port in &ports {
        let mut config = config("127.0.0.1:0", port, ports[0]);
        config.seeds = vec![gossip(ports[0]).to_string()];
        config.gossip_address = gossip(port);
        let node = ClusterNode::builder(silo(storage.clone()), config)
            .transport(Arc::new(TcpTransport) as Arc<dyn Transport>)
            .start(&UdpTransport as &dyn GossipTransport)
            .await
            .unwrap();
        nodes.push(node);
    }
    converged(&nodes.iter().collect::<Vec<_>>(), 3).await;
    every_silo_calls_every_grain(&nodes, 30).await;
}
