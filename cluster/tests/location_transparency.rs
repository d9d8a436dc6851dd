//! One grain reference everywhere: what a caller sees across the cluster.
//!
//! So far: the failure detector's defaults, so that a silo whose runtime
//! stalls is not taken for dead (membership rule 3).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat::transport::ChannelTransport;
use granary_actors::storage::MemoryStorage;
use granary_actors::{Grain, GrainContext, GrainKey, Handler, Message, Silo};
use granary_cluster::{ClusterNode, ClusterSecret, InProcessNetwork, NodeConfig, NodeError};

/// A stateless worker (local to each silo) whose handler blocks its
/// thread: on a single-worker runtime, the whole silo stalls, gossip
/// included.
struct Staller;

impl Grain for Staller {
    fn new(_: &GrainKey) -> Staller {
        Staller
    }
}

struct Stall(Duration);

impl Message for Stall {
    type Reply = ();
}

impl Handler<Stall> for Staller {
    async fn handle(&mut self, Stall(period): Stall, _: &mut GrainContext) {
        std::thread::sleep(period);
    }
}

fn secret() -> ClusterSecret {
    ClusterSecret::new(*b"the in-process cluster's secret").unwrap()
}

fn gossip(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Node `n` of a cluster whose gossip ports start above `base`, with the
/// default failure detector.
fn config(n: u16, base: u16) -> NodeConfig {
    NodeConfig::new(
        "stall",
        secret(),
        format!("silo-{n}:7000"),
        gossip(base + n),
        vec![gossip(base + 1).to_string()],
    )
}

fn silo() -> Silo {
    Silo::builder()
        .register_stateless::<Staller>("staller", 1)
        .storage(Arc::new(MemoryStorage::new()))
        .build()
        .unwrap()
}

async fn start(
    config: NodeConfig,
    network: &InProcessNetwork,
    transport: &ChannelTransport,
) -> ClusterNode {
    let wire = Arc::new(network.transport(&config.listen));
    ClusterNode::builder(silo(), config)
        .transport(wire)
        .start(transport)
        .await
        .unwrap()
}

async fn converged(nodes: &[&ClusterNode], count: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while nodes.iter().any(|node| node.members().len() != count) {
        assert!(Instant::now() < deadline, "views did not converge");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_default_settings_a_three_second_stall_is_not_a_death() {
    let network = InProcessNetwork::new();
    let transport = ChannelTransport::default();
    let base = 42_000;
    let one = start(config(1, base), &network, &transport).await;
    let two = start(config(2, base), &network, &transport).await;
    // The third silo runs alone on a single-worker runtime of its own
    // thread, so that one blocking handler stalls all of it.
    let (started, node) = tokio::sync::oneshot::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (third_network, third_transport) = (network.clone(), transport.clone());
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let three = start(config(3, base), &third_network, &third_transport).await;
            let _ = started.send((three.clone(), tokio::runtime::Handle::current()));
            let _ = stopped.await;
            let _ = three.leave().await;
        });
    });
    let (three, third_runtime) = node.await.unwrap();
    converged(&[&one, &two, &three], 3).await;

    // Stall the third silo for 3 s: its handler blocks its only thread
    // (the call starts on that runtime, so the activation runs there).
    let staller = three.silo().grain::<Staller>(0u64);
    let stalled_at = Instant::now();
    let stall =
        third_runtime.spawn(async move { staller.call(Stall(Duration::from_secs(3))).await });
    // Watch every view for 7 s (past the stall, past the longest time a
    // silence of 3 s could still lead to a death): nobody drops anybody.
    let mut smallest = 3;
    while stalled_at.elapsed() < Duration::from_secs(7) {
        smallest = smallest.min(one.members().len()).min(two.members().len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stall.await.unwrap().unwrap();
    assert!(
        stalled_at.elapsed() >= Duration::from_secs(3),
        "the stall happened"
    );
    assert_eq!(smallest, 3, "a stalled silo was taken for dead");
    // The stalled silo's own view kept its peers too (checked now that it
    // runs again: it saw them silent for as long).
    converged(&[&one, &two, &three], 3).await;
    let ids: Vec<_> = three.members().into_iter().map(|m| m.silo).collect();
    assert!(ids.contains(one.id()) && ids.contains(two.id()));

    let _ = stop.send(());
    thread.join().unwrap();
    one.leave().await.unwrap();
    two.leave().await.unwrap();
}

#[tokio::test]
async fn failure_detector_settings_out_of_range_are_refused() {
    let network = InProcessNetwork::new();
    let transport = ChannelTransport::default();
    let cases = [
        (f64::NAN, Duration::from_millis(200)),
        (0.0, Duration::from_millis(200)),
        (-1.0, Duration::from_millis(200)),
        (f64::INFINITY, Duration::from_millis(200)),
        (8.0, Duration::ZERO),
    ];
    for (n, (phi, interval)) in (10..).zip(cases) {
        let mut bad = config(1, 42_100);
        bad.phi_threshold = phi;
        bad.gossip_interval = interval;
        let wire = Arc::new(network.transport(&bad.listen));
        let silo = silo();
        let started = ClusterNode::builder(silo.clone(), bad)
            .transport(wire)
            .start(&transport)
            .await;
        assert!(
            matches!(started, Err(NodeError::InvalidConfig(_))),
            "phi {phi}, interval {interval:?}: {started:?}"
        );
        // The silo was not claimed: a valid start on it still works.
        let valid = config(n, 42_100);
        let wire = Arc::new(network.transport(&valid.listen));
        let node = ClusterNode::builder(silo, valid)
            .transport(wire)
            .start(&transport)
            .await
            .unwrap();
        node.kill().await.unwrap();
    }
}
