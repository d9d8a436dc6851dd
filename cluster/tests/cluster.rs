//! Clusters of silos in one process: grains reachable from every silo,
//! exactly one activation under concurrent first calls from every silo,
//! a killed silo's grains moving elsewhere with their persisted state,
//! calls in flight to a dead silo failing fast, and GPU-aware placement by
//! free device memory (CPU backends with memory limits), first calls
//! arriving together never overfilling a device, and homes given up when
//! their activations end (rule 6 in `node/mod.rs`). Over the
//! in-process network with chitchat's channel transport, and over TCP and
//! UDP on loopback.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat::transport::ChannelTransport;
use common::{Add, Counter, free_udp_ports};
use granary_actors::storage::{MemoryStorage, StorageProvider};
use granary_actors::{CallError, Grain, GrainContext, GrainKey, Handler, Message, Silo};
use granary_cluster::gossip::SealedUdpTransport;
use granary_cluster::{
    ClusterNode, ClusterSecret, GpuNeeds, InProcessNetwork, NodeConfig, PreferLocal, TcpTransport,
    Transport,
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
    silo_builder(storage).build().unwrap()
}

/// A silo that serves `bridge` to its grains; its node publishes the
/// bridge's devices.
fn silo_serving(storage: Arc<dyn StorageProvider>, bridge: Arc<GpuBridge>) -> Silo {
    silo_builder(storage).service(bridge).build().unwrap()
}

fn silo_builder(storage: Arc<dyn StorageProvider>) -> granary_actors::SiloBuilder {
    Silo::builder()
        .register::<Counter>("counter")
        .message::<Counter, Add>("add")
        .message::<Counter, Nap>("nap")
        .register::<Counter2>("tensor")
        .message::<Counter2, Add>("add")
        .storage(storage)
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
    ClusterSecret::new([0x92; 32]).unwrap()
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
    // Fail over fast: a short grace before a silent silo is declared dead.
    config.death_grace = Duration::from_millis(200);
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
        self.node_on(silo(self.storage.clone()), n, base, extra)
            .await
    }

    /// A node hosting `silo`.
    async fn node_on(
        &self,
        silo: Silo,
        n: u16,
        base: u16,
        extra: impl FnOnce(granary_cluster::NodeBuilder) -> granary_cluster::NodeBuilder,
    ) -> ClusterNode {
        let listen = format!("silo-{n}:7000");
        let builder = ClusterNode::builder(silo, config(&listen, base + n, base + 1))
            .transport(Arc::new(self.network.transport(&listen)));
        extra(builder).start(self.gossip.clone()).await.unwrap()
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

async fn add(node: &ClusterNode, key: u64, n: u64) -> Result<u64, CallError> {
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
    // Every silo called grains homed on the others: its remote calls are
    // counted and timed, and what sent calls elsewhere is counted by kind.
    for node in &nodes {
        let stats = node.stats();
        let remote = &stats.remote_calls;
        assert!(remote.count > 0, "{stats:?}");
        assert_eq!(remote.buckets.iter().sum::<u64>(), remote.count);
        assert!(remote.sum_seconds > 0.0);
        assert_eq!(stats.redirects.len(), granary_cluster::Redirect::ALL.len());
    }
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
        matches!(outcome, Err(CallError::Unavailable { .. })),
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
                .node_on(
                    silo_serving(cluster.storage.clone(), bridge),
                    n,
                    33_000,
                    move |b| {
                        b.needs("tensor", needs)
                            .placement(Arc::new(granary_cluster::GpuAware::strict()))
                    },
                )
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
            .start(SealedUdpTransport::new(secret(), "test"))
            .await
            .unwrap();
        nodes.push(node);
    }
    converged(&nodes.iter().collect::<Vec<_>>(), 3).await;
    every_silo_calls_every_grain(&nodes, 30).await;
}

/// A grain that keeps `SLAB_BYTES` resident on its silo's device while it
/// is active, as a GPU grain does, and counts how many of it are active at
/// once across the cluster.
struct Slab {
    buffer: Option<granary_gpu::ResidentBuffer>,
    tracker: Option<Arc<Tracker>>,
    state: Option<granary_actors::storage::PersistentState<u64>>,
}

const SLAB_BYTES: u64 = 8 << 20;

/// Shared by every silo of one in-process cluster.
#[derive(Default)]
struct Tracker {
    /// Activations alive now, per key.
    live: std::sync::Mutex<std::collections::HashMap<u64, u32>>,
    /// The most activations of one key ever alive at once.
    most: std::sync::atomic::AtomicU32,
    /// Silos whose activations refuse to start (by silo number).
    refuse_on: std::sync::Mutex<Option<u16>>,
    /// Every (key, silo number) that held an activation.
    seen: std::sync::Mutex<std::collections::HashSet<(u64, u16)>>,
}

/// Which silo a `Slab` lives on.
struct SiloNumber(u16);

impl Grain for Slab {
    fn new(_: &GrainKey) -> Slab {
        Slab {
            buffer: None,
            tracker: None,
            state: None,
        }
    }

    async fn on_activate(
        &mut self,
        ctx: &mut GrainContext,
    ) -> Result<(), granary_actors::ActivationError> {
        let tracker = ctx.service::<Tracker>().expect("a tracker");
        let here = ctx.service::<SiloNumber>().expect("a silo number").0;
        if *tracker.refuse_on.lock().unwrap() == Some(here) {
            return Err(granary_actors::ActivationError(format!(
                "silo {here} refuses slabs"
            )));
        }
        if let Some(bridge) = ctx.service::<GpuBridge>() {
            // Starting takes a while (state, a model to load), so first
            // calls arriving together all pass the room check before any
            // of them has reserved its memory.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let buffer = bridge
                .allocate_resident(SLAB_BYTES as usize, &granary_gpu::Requirements::default())
                .await
                .map_err(|err| granary_actors::ActivationError(err.to_string()))?;
            self.buffer = Some(buffer);
        }
        self.state = Some(ctx.load_state::<u64>().await?);
        let key = match ctx.id().key {
            GrainKey::U64(key) => key,
            _ => u64::MAX,
        };
        tracker.seen.lock().unwrap().insert((key, here));
        let mut live = tracker.live.lock().unwrap();
        let count = live.entry(key).or_default();
        *count += 1;
        tracker
            .most
            .fetch_max(*count, std::sync::atomic::Ordering::SeqCst);
        drop(live);
        self.tracker = Some(tracker);
        Ok(())
    }

    async fn on_deactivate(&mut self, ctx: &mut GrainContext) {
        self.buffer = None;
        if let (Some(tracker), GrainKey::U64(key)) = (&self.tracker, &ctx.id().key) {
            if let Some(count) = tracker.live.lock().unwrap().get_mut(key) {
                *count -= 1;
            }
        }
    }
}

impl Handler<Add> for Slab {
    async fn handle(&mut self, Add(n): Add, _: &mut GrainContext) -> u64 {
        let Some(state) = &mut self.state else {
            return 0;
        };
        *state.get_mut() += n;
        state.write().await.expect("the state is written");
        *state.get()
    }
}

fn slab_silo(
    storage: Arc<dyn StorageProvider>,
    tracker: Arc<Tracker>,
    n: u16,
    bridge: Option<Arc<GpuBridge>>,
) -> Silo {
    let mut builder = Silo::builder()
        .register::<Slab>("slab")
        .message::<Slab, Add>("add")
        .service(tracker)
        .service(Arc::new(SiloNumber(n)))
        .storage(storage);
    if let Some(bridge) = bridge {
        builder = builder.service(bridge);
    }
    builder.build().unwrap()
}

fn cpu_device_bridge(mib: u64) -> Arc<GpuBridge> {
    Arc::new(
        GpuBridge::builder()
            .cpu_backend(CpuBackend::with_device(DeviceInfo {
                total_memory: mib << 20,
                free_memory: mib << 20,
                ..host_device()
            }))
            .build()
            .unwrap(),
    )
}

/// Three silos for slabs under strict GPU-aware placement: silos 1 and 2
/// with CPU devices of `first` and `second` MiB, silo 3 with none (it
/// routes). Returns the nodes, once silo 3 sees both devices, and the
/// bridges.
async fn slab_cluster(
    cluster: &InProcess,
    tracker: &Arc<Tracker>,
    (first, second): (u64, u64),
    base: u16,
) -> (Vec<ClusterNode>, Vec<Option<Arc<GpuBridge>>>) {
    let needs = GpuNeeds {
        device_memory: SLAB_BYTES,
        ..GpuNeeds::default()
    };
    let (mut nodes, mut bridges) = (Vec::new(), Vec::new());
    for (n, mib) in [(1u16, Some(first)), (2, Some(second)), (3, None)] {
        let bridge = mib.map(cpu_device_bridge);
        bridges.push(bridge.clone());
        let silo = slab_silo(cluster.storage.clone(), tracker.clone(), n, bridge.clone());
        let needs = needs.clone();
        nodes.push(
            cluster
                .node_on(silo, n, base, move |builder| {
                    builder
                        .needs("slab", needs)
                        .placement(Arc::new(granary_cluster::GpuAware::strict()))
                })
                .await,
        );
    }
    converged(&nodes.iter().collect::<Vec<_>>(), 3).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while nodes[2]
        .members()
        .iter()
        .filter(|m| !m.load.devices.is_empty())
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "loads not published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (nodes, bridges)
}

/// Rule 5: placement decides on published load, which lags. Eight first
/// calls at once all pick the silo with the most free memory; it promises
/// memory as it accepts them and sends the ones beyond its device on
/// (`NoRoom`), so every activation fits and none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_calls_arriving_together_never_overfill_a_device() {
    let cluster = InProcess::new();
    let tracker = Arc::new(Tracker::default());
    // Room for 5 slabs on silo 1, 3 on silo 2; silo 3 has no devices.
    let (nodes, _bridges) = slab_cluster(&cluster, &tracker, (40, 24), 34_000).await;
    let calls: Vec<_> = (0..8u64)
        .map(|key| {
            let router = nodes[2].clone();
            tokio::spawn(async move { router.grain::<Slab>(key).call(Add(1)).await })
        })
        .collect();
    for (key, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap(), Ok(1), "slab {key}");
    }
    assert_eq!(
        nodes.iter().map(ClusterNode::homes).collect::<Vec<_>>(),
        [5, 3, 0],
        "each device filled to what it holds, not beyond"
    );
    // A ninth fits nowhere: refused with a typed error, nothing activated.
    let ninth = nodes[2].grain::<Slab>(8u64).call(Add(1)).await;
    assert!(ninth.is_err(), "{ninth:?}");
    assert_eq!(nodes.iter().map(ClusterNode::homes).sum::<usize>(), 8);
}

/// Waits until `node` has given up `count` homes in all (rule 6: its
/// directory entries are gone).
async fn homes_given_up_come_to(node: &ClusterNode, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.homes_given_up() < count {
        assert!(
            Instant::now() < deadline,
            "{} homes given up, expected {count}",
            node.homes_given_up()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `node` is home to `count` grains.
async fn homes_come_to(node: &ClusterNode, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.homes() != count {
        assert!(
            Instant::now() < deadline,
            "{} homes, expected {count}",
            node.homes()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Two silos for slabs with prefer-local placement and no devices, once
/// they see each other.
async fn two_slab_silos(
    cluster: &InProcess,
    tracker: &Arc<Tracker>,
    base: u16,
) -> Vec<ClusterNode> {
    let mut nodes = Vec::new();
    for n in 1..=2u16 {
        let silo = slab_silo(cluster.storage.clone(), tracker.clone(), n, None);
        nodes.push(
            cluster
                .node_on(silo, n, base, |b| b.placement(Arc::new(PreferLocal)))
                .await,
        );
    }
    converged(&nodes.iter().collect::<Vec<_>>(), 2).await;
    nodes
}

/// Rule 6: a grain whose activation ends gives its home up. With
/// prefer-local placement, the next call from another silo activates it
/// there, from its persisted state; without rule 6 the stale entry would
/// send it back to the first silo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grain_that_deactivates_gives_up_its_home_and_keeps_its_state() {
    let cluster = InProcess::new();
    let tracker = Arc::new(Tracker::default());
    let nodes = two_slab_silos(&cluster, &tracker, 35_000).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    assert_eq!(a.grain::<Slab>(7u64).call(Add(5)).await, Ok(5));
    assert_eq!((a.homes(), b.homes()), (1, 0));
    a.silo()
        .deactivate_named("slab", GrainKey::U64(7))
        .await
        .unwrap();
    homes_come_to(a, 0).await;
    homes_given_up_come_to(a, 1).await;
    assert_eq!(b.grain::<Slab>(7u64).call(Add(1)).await, Ok(6));
    assert_eq!((a.homes(), b.homes()), (0, 1), "activated where called");
    assert_eq!(a.grain::<Slab>(7u64).call(Add(1)).await, Ok(7));
    assert_eq!((a.homes(), b.homes()), (0, 1), "one home until it ends");
}

/// Rule 6: a failed activation gives the home up too, so the grain is not
/// stuck on a silo where it cannot start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_activation_gives_up_its_home() {
    let cluster = InProcess::new();
    let tracker = Arc::new(Tracker::default());
    let nodes = two_slab_silos(&cluster, &tracker, 36_000).await;
    *tracker.refuse_on.lock().unwrap() = Some(1);
    let refused = nodes[0].grain::<Slab>(3u64).call(Add(1)).await;
    assert!(
        matches!(refused, Err(CallError::TurnFailed { .. })),
        "{refused:?}"
    );
    homes_come_to(&nodes[0], 0).await;
    homes_given_up_come_to(&nodes[0], 1).await;
    assert_eq!(nodes[1].grain::<Slab>(3u64).call(Add(1)).await, Ok(1));
    assert_eq!(nodes[1].homes(), 1);
}

/// Rule 6 under churn: callers on both silos while both keep deactivating
/// the grains, until homes have been given up and taken again hundreds of
/// times (mostly by the same silo: a caller with the home cached sends its
/// next call there). Never are two activations of one grain alive at once,
/// and every acknowledged call is in the grain's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn homes_given_up_under_churn_never_make_a_second_activation() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let cluster = InProcess::new();
    let tracker = Arc::new(Tracker::default());
    let nodes = two_slab_silos(&cluster, &tracker, 37_000).await;
    let grains = 4u64;
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged: Arc<Vec<AtomicU64>> =
        Arc::new((0..grains).map(|_| AtomicU64::new(0)).collect());
    let churn: Vec<_> = nodes
        .iter()
        .map(|node| {
            let (node, stop) = (node.clone(), stop.clone());
            tokio::spawn(async move {
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = GrainKey::U64(round % grains);
                    let _ = node.silo().deactivate_named("slab", key).await;
                    round += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect();
    // One caller on each silo per grain, with gaps in which a deactivated
    // grain's home is free.
    let callers: Vec<_> = (0..grains * 2)
        .map(|caller| {
            let node = nodes[(caller % 2) as usize].clone();
            let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
            tokio::spawn(async move {
                let key = caller / 2;
                while !stop.load(Ordering::Relaxed) {
                    node.grain::<Slab>(key)
                        .call(Add(1))
                        .await
                        .expect("a call under churn");
                    acknowledged[key as usize].fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1 + caller % 3)).await;
                }
            })
        })
        .collect();
    // Long enough for homes to be given up and taken again many times.
    let given_up = || nodes.iter().map(ClusterNode::homes_given_up).sum::<u64>();
    let deadline = Instant::now() + Duration::from_secs(20);
    while given_up() < 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in churn.into_iter().chain(callers) {
        task.await.unwrap();
    }
    assert!(given_up() >= 200, "{} homes given up", given_up());
    assert_eq!(
        tracker.most.load(Ordering::SeqCst),
        1,
        "never two activations of one grain at once"
    );
    for key in 0..grains {
        assert_eq!(
            nodes[0].grain::<Slab>(key).call(Add(0)).await,
            Ok(acknowledged[key as usize].load(Ordering::Relaxed)),
            "grain {key} holds every acknowledged call"
        );
    }
}

fn slab_id(key: u64) -> granary_actors::GrainId {
    granary_actors::GrainId {
        type_name: "slab".into(),
        key: GrainKey::U64(key),
    }
}

/// Keys whose directory entry `owner` keeps in `view`.
fn slab_keys_owned_by(
    owner: &granary_cluster::SiloId,
    view: &[granary_cluster::Member],
) -> impl Iterator<Item = u64> + use<> {
    let (owner, view) = (owner.clone(), view.to_vec());
    (0..10_000u64)
        .filter(move |key| granary_cluster::directory::owner(&slab_id(*key), &view) == Some(&owner))
}

/// A node that was killed stays dead: a grain of its that deactivates
/// afterwards does not make it dial its peers again (rule 6 runs, but a
/// stopped node connects to no one and serves nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_serves_nothing_even_when_its_grains_deactivate_later() {
    let cluster = InProcess::new();
    let tracker = Arc::new(Tracker::default());
    let nodes = two_slab_silos(&cluster, &tracker, 38_000).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut keys = slab_keys_owned_by(&b.id(), &a.members());
    let (k1, k2) = (keys.next().unwrap(), keys.next().unwrap());
    assert_eq!(a.grain::<Slab>(k1).call(Add(1)).await, Ok(1));
    assert_eq!(a.grain::<Slab>(k2).call(Add(1)).await, Ok(1));
    a.kill().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The killed silo refuses everything (its connections are closed, and
    // its inbound side answers ShutDown): a call to a grain homed there
    // fails, until b takes it for dead and places the grain afresh (on a
    // loaded machine that may come first).
    let refused_or_moved = |outcome: &Result<u64, CallError>| match outcome {
        Err(CallError::Unavailable { .. }) => true,
        Ok(_) => !b.members().iter().any(|member| member.silo == a.id()),
        Err(_) => false,
    };
    let before = b.grain::<Slab>(k2).call(Add(1)).await;
    assert!(refused_or_moved(&before), "{before:?}");
    a.silo()
        .deactivate_named("slab", GrainKey::U64(k1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = b.grain::<Slab>(k2).call(Add(1)).await;
    assert!(
        refused_or_moved(&after),
        "the killed silo served a call: {after:?}"
    );
}

/// Rule 5 and 6: a directory entry left naming a silo that is no longer
/// home (its unregister was cut off) does not strand the grain once that
/// silo's device is full: the silo removes the entry as it answers
/// `NoRoom`, and the grain is placed where there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_entry_naming_a_full_silo_does_not_strand_its_grain() {
    let cluster = InProcess::new();
    let tracker = Arc::new(Tracker::default());
    // a: room for 3 slabs, b: 2, c routes and owns the entry.
    let (nodes, bridges) = slab_cluster(&cluster, &tracker, (24, 16), 39_000).await;
    let (a, c) = (&nodes[0], &nodes[2]);
    let key = slab_keys_owned_by(&c.id(), &c.members()).next().unwrap();
    assert_eq!(c.grain::<Slab>(key).call(Add(1)).await, Ok(1));
    assert_eq!(a.homes(), 1, "placed where memory is freest");
    // The unregister is cut off: the entry at c keeps naming a.
    cluster.network.cut(&a.id().address, &c.id().address);
    a.silo()
        .deactivate_named("slab", GrainKey::U64(key))
        .await
        .unwrap();
    homes_come_to(a, 0).await;
    cluster.network.heal(&a.id().address, &c.id().address);
    // a's device fills up.
    let _held = bridges[0]
        .clone()
        .unwrap()
        .allocate_resident(24 << 20, &granary_gpu::Requirements::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut outcome = c.grain::<Slab>(key).call(Add(1)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while outcome.is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        outcome = c.grain::<Slab>(key).call(Add(1)).await;
    }
    assert_eq!(outcome, Ok(2), "b has room for it");
    assert_eq!(nodes[1].homes(), 1);
}
