//! A host without the secret gossips forged chitchat heartbeats for a dead
//! silo (chitchat trusts digests from anyone); the dead silo still leaves
//! every view, because its signed beat stops advancing. Found in review.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chitchat::transport::UdpTransport;
use chitchat::{ChitchatId, ChitchatMessage, Serializable};
use granary_cluster::{ClusterSecret, GossipConfig, Membership, SiloId};

fn secret() -> ClusterSecret {
    ClusterSecret::new(*b"the gossiping cluster's secret").unwrap()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn config(port: u16, seed: u16) -> GossipConfig {
    let mut config = GossipConfig::new(
        "test",
        SiloId::new(format!("silo-{port}"), 1),
        addr(port),
        vec![addr(seed).to_string()],
    );
    config.gossip_interval = Duration::from_millis(50);
    // Fail over fast: a short grace before a silent silo is declared dead.
    config.death_grace = Duration::from_millis(200);
    config
}

/// A SYN whose digest says `node` is at `heartbeat`.
fn forged_syn(node: &ChitchatId, heartbeat: u64) -> Vec<u8> {
    let mut buf = ChitchatMessage::BadCluster.serialize_to_vec();
    buf.truncate(3); // magic number and protocol version
    buf.push(0); // SYN
    1u16.serialize(&mut buf);
    node.serialize(&mut buf);
    heartbeat.serialize(&mut buf);
    0u64.serialize(&mut buf); // last gc version
    0u64.serialize(&mut buf); // max version
    "test".serialize(&mut buf);
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_heartbeats_do_not_keep_a_dead_silo_in_the_view() {
    let ports = common::free_udp_ports(3);
    let mut silos = Vec::new();
    for &port in &ports {
        silos.push(
            Membership::join(config(port, ports[0]), secret(), &UdpTransport)
                .await
                .unwrap(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while silos.iter().any(|s| s.members().len() != 3) {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dead = silos.pop().unwrap();
    let dead_port = ports[2];
    dead.stop().await.unwrap();
    let node = ChitchatId::new(format!("silo-{dead_port}"), 1, addr(dead_port));
    // The stranger holds no secret; it only knows the cluster's name.
    let stranger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let targets = [addr(ports[0]), addr(ports[1])];
    let forging = tokio::spawn(async move {
        for beat in 1_000_000u64.. {
            for target in targets {
                let _ = stranger.send_to(&forged_syn(&node, beat), target).await;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    let died = Instant::now();
    let mut dropped = false;
    while died.elapsed() < Duration::from_secs(10) {
        if silos.iter().all(|s| {
            s.members()
                .iter()
                .all(|m| m.silo.address != format!("silo-{dead_port}"))
        }) {
            dropped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    forging.abort();
    assert!(
        dropped,
        "the dead silo is still in the view 10 s after it died"
    );
}
