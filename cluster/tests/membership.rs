//! Gossip membership: silos join through a seed, see each other and each
//! other's load, notice one that dies, drop one that leaves at once, and
//! keep only the newest incarnation of a silo that restarts. Over
//! chitchat's in-process channel transport (which serialises every message
//! and can cut links) and over UDP on loopback.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chitchat::transport::ChannelTransport;
use granary_cluster::gossip::SealedUdpTransport;
use granary_cluster::{
    ClusterSecret, DeviceLoad, GossipConfig, Member, Membership, SiloId, SiloLoad,
};

fn secret() -> ClusterSecret {
    ClusterSecret::new([0xa3; 32]).unwrap()
}

fn gossip_address(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn config(port: u16, incarnation: u64, seed: u16) -> GossipConfig {
    let mut config = GossipConfig::new(
        "test",
        SiloId::new(format!("silo-{port}"), incarnation),
        gossip_address(port),
        vec![gossip_address(seed).to_string()],
    );
    config.gossip_interval = Duration::from_millis(50);
    // Fail over fast: a short grace before a silent silo is declared dead.
    config.death_grace = Duration::from_millis(200);
    config
}

/// Waits until `membership`'s view satisfies `ok`, at most `within`.
async fn until(membership: &Membership, within: Duration, ok: impl Fn(&[Member]) -> bool) {
    let mut view = membership.watch();
    let deadline = Instant::now() + within;
    loop {
        if ok(&view.borrow_and_update()) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || tokio::time::timeout(left, view.changed()).await.is_err() {
            panic!(
                "view of {} did not settle within {within:?}: {:?}",
                membership.silo(),
                membership.members()
            );
        }
    }
}

fn addresses(members: &[Member]) -> Vec<String> {
    members.iter().map(|m| m.silo.address.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_silos_join_through_a_seed_and_see_each_others_load() {
    let transport = ChannelTransport::default();
    let mut silos = Vec::new();
    for port in 20_001..=20_005 {
        silos.push(
            Membership::join(config(port, 1, 20_001), secret(), &transport)
                .await
                .unwrap(),
        );
    }
    let all: Vec<String> = (20_001..=20_005).map(|p| format!("silo-{p}")).collect();
    for silo in &silos {
        until(silo, Duration::from_secs(10), |m| addresses(m) == all).await;
    }
    let load = SiloLoad {
        grain_types: Vec::new(),
        activations: 42,
        devices: vec![DeviceLoad {
            backend: "Cuda".into(),
            name: "H100".into(),
            total_memory: 80 << 30,
            free_memory: 60 << 30,
            queue_depth: 3,
            compute_units: 132,
            reserved_memory: 20 << 30,
            kept_memory: 16 << 30,
            processed: 7,
            failed: 1,
            latency_sum_ns: 7_000,
        }],
        activations_by_type: [("tensor".to_string(), 42)].into(),
        started_ms: 1_800_000_000_000,
        leaving: false,
        fenced: true,
        published_ms: 1_800_000_001_000,
    };
    silos[2].publish_load(&load).await;
    for silo in &silos {
        until(silo, Duration::from_secs(10), |m| {
            m.iter()
                .any(|member| member.silo.address == "silo-20003" && member.load == load)
        })
        .await;
    }
    for silo in silos {
        silo.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silo_that_dies_is_dropped_by_the_failure_detector_and_one_that_leaves_at_once() {
    let transport = ChannelTransport::default();
    let mut silos = Vec::new();
    for port in 21_001..=21_004 {
        silos.push(
            Membership::join(config(port, 1, 21_001), secret(), &transport)
                .await
                .unwrap(),
        );
    }
    for silo in &silos {
        until(silo, Duration::from_secs(10), |m| m.len() == 4).await;
    }
    // Silo 4 crashes: its heartbeats stop.
    let dead = silos.pop().unwrap();
    let died = Instant::now();
    dead.stop().await.unwrap();
    for silo in &silos {
        until(silo, Duration::from_secs(20), |m| {
            !addresses(m).contains(&"silo-21004".to_string())
        })
        .await;
    }
    let detected = died.elapsed();
    // Silo 3 leaves: no detector needed.
    let leaving = silos.pop().unwrap();
    let left = Instant::now();
    let leave = tokio::spawn(leaving.leave());
    for silo in &silos {
        until(silo, Duration::from_secs(5), |m| {
            addresses(m) == ["silo-21001", "silo-21002"]
        })
        .await;
    }
    assert!(
        left.elapsed() < detected,
        "leaving ({:?}) is seen sooner than dying ({detected:?})",
        left.elapsed()
    );
    leave.await.unwrap().unwrap();
    for silo in silos {
        silo.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silo_that_restarts_comes_back_with_a_new_incarnation_only() {
    let transport = ChannelTransport::default();
    let seed = Membership::join(config(22_001, 1, 22_001), secret(), &transport)
        .await
        .unwrap();
    let first = Membership::join(config(22_002, 1, 22_001), secret(), &transport)
        .await
        .unwrap();
    until(&seed, Duration::from_secs(10), |m| m.len() == 2).await;
    first.stop().await.unwrap();
    // The same address, restarted: a greater incarnation.
    let second = Membership::join(config(22_002, 2, 22_001), secret(), &transport)
        .await
        .unwrap();
    until(&seed, Duration::from_secs(20), |m| {
        m.iter()
            .filter(|member| member.silo.address == "silo-22002")
            .map(|member| member.silo.incarnation)
            .collect::<Vec<_>>()
            == [2]
    })
    .await;
    second.stop().await.unwrap();
    seed.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silo_that_rejoins_replaces_its_old_incarnation_and_keeps_its_load() {
    rejoin_over(&ChannelTransport::default(), 22_101).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silo_rejoins_on_the_same_udp_port() {
    rejoin_over(&SealedUdpTransport::new(secret(), "test"), 22_111).await;
}

/// A seed on `base` and a silo on `base + 1`, which rejoins.
async fn rejoin_over(transport: &dyn chitchat::transport::Transport, base: u16) {
    let seed = Membership::join(config(base, 1, base), secret(), transport)
        .await
        .unwrap();
    let first = Membership::join(config(base + 1, 7, base), secret(), transport)
        .await
        .unwrap();
    let load = SiloLoad {
        activations: 42,
        ..SiloLoad::default()
    };
    first.publish_load(&load).await;
    until(&seed, Duration::from_secs(10), |m| {
        m.iter().any(|member| member.load.activations == 42)
    })
    .await;
    // In the same process, on the same address: a greater incarnation,
    // gossiping again over the same transport.
    let second = first.rejoin(transport).await.unwrap();
    let again = second.silo();
    assert_eq!(again.address, format!("silo-{}", base + 1));
    assert!(again.incarnation > 7, "{again}");
    until(&seed, Duration::from_secs(20), |m| {
        let mine: Vec<_> = m
            .iter()
            .filter(|member| member.silo.address == again.address)
            .collect();
        mine.len() == 1 && mine[0].silo == again && mine[0].load.activations == 42
    })
    .await;
    until(&second, Duration::from_secs(10), |m| m.len() == 2).await;
    second.stop().await.unwrap();
    seed.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_isolates_a_silo_until_it_is_healed() {
    let transport = ChannelTransport::default();
    let mut silos = Vec::new();
    for port in 23_001..=23_003 {
        silos.push(
            Membership::join(config(port, 1, 23_001), secret(), &transport)
                .await
                .unwrap(),
        );
    }
    for silo in &silos {
        until(silo, Duration::from_secs(10), |m| m.len() == 3).await;
    }
    // Silo 3 can no longer reach anyone.
    for other in [23_001, 23_002] {
        transport
            .remove_link(gossip_address(23_003), gossip_address(other))
            .await;
    }
    for silo in &silos[..2] {
        until(silo, Duration::from_secs(20), |m| m.len() == 2).await;
    }
    until(&silos[2], Duration::from_secs(20), |m| m.len() == 1).await;
    for other in [23_001, 23_002] {
        transport
            .add_link(gossip_address(23_003), gossip_address(other))
            .await;
    }
    for silo in &silos {
        until(silo, Duration::from_secs(20), |m| m.len() == 3).await;
    }
    for silo in silos {
        silo.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_silos_gossip_over_udp_on_loopback() {
    let ports = common::free_udp_ports(3);
    let mut silos = Vec::new();
    for &port in &ports {
        silos.push(
            Membership::join(
                config(port, 1, ports[0]),
                secret(),
                &SealedUdpTransport::new(secret(), "test"),
            )
            .await
            .unwrap(),
        );
    }
    for silo in &silos {
        until(silo, Duration::from_secs(10), |m| m.len() == 3).await;
    }
    for silo in silos {
        silo.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_secret_gossips_but_is_never_a_member() {
    let transport = ChannelTransport::default();
    let a = Membership::join(config(24_001, 1, 24_001), secret(), &transport)
        .await
        .unwrap();
    let b = Membership::join(config(24_002, 1, 24_001), secret(), &transport)
        .await
        .unwrap();
    let stranger_secret = ClusterSecret::new([0xb4; 32]).unwrap();
    let stranger = Membership::join(config(24_003, 1, 24_001), stranger_secret, &transport)
        .await
        .unwrap();
    until(&a, Duration::from_secs(10), |m| m.len() == 2).await;
    // Give the stranger's gossip every chance to be heard.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for member in [&a, &b] {
        assert_eq!(addresses(&member.members()), ["silo-24001", "silo-24002"]);
    }
    // The stranger cannot verify the members either.
    assert_eq!(addresses(&stranger.members()), ["silo-24003"]);
    for silo in [a, b, stranger] {
        silo.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silo_that_dies_is_dropped_over_udp_too() {
    let ports = common::free_udp_ports(3);
    let mut silos = Vec::new();
    for &port in &ports {
        let mut config = config(port, 1, ports[0]);
        config.gossip_interval = Duration::from_millis(100);
        // Fail over fast: a short grace before a silent silo is declared dead.
        config.death_grace = Duration::from_millis(200);
        silos.push(
            Membership::join(config, secret(), &SealedUdpTransport::new(secret(), "test"))
                .await
                .unwrap(),
        );
    }
    for silo in &silos {
        until(silo, Duration::from_secs(10), |m| m.len() == 3).await;
    }
    let dead = silos.pop().unwrap();
    dead.stop().await.unwrap();
    for silo in &silos {
        until(silo, Duration::from_secs(20), |m| m.len() == 2).await;
    }
    for silo in silos {
        silo.stop().await.unwrap();
    }
}
