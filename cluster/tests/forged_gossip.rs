//! Forged gossip against silos on sealed UDP (`sealed/mod.rs`): an
//! attacker on the gossip port who knows the cluster's name crafts Ack and
//! SynAck datagrams that set a live silo's own state at versions 2^63 and
//! `u64::MAX`, a digest entry with a 60 KB id, and heartbeats for a dead
//! silo sent on and off. Once without the secret (every datagram fails its
//! MAC), once as an insider holding it (every datagram passes its MAC and
//! meets rule 3's bounds). For 10 s the live silos stay in every view, no
//! task panics, the dead silo never comes back, and no silo sends a
//! datagram past the UDP limit.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chitchat::{ChitchatId, Serializable};
use granary_cluster::gossip::{GossipStats, SealedUdpTransport};
use granary_cluster::{ClusterSecret, GossipConfig, Membership, Purpose, SiloId};

const CLUSTER: &str = "forged";

fn secret() -> ClusterSecret {
    ClusterSecret::new([0xa3; 32]).expect("32 non-text bytes are a secret")
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn config(port: u16, seed: u16) -> GossipConfig {
    let mut config = GossipConfig::new(
        CLUSTER,
        SiloId::new(format!("silo-{port}"), 1),
        addr(port),
        vec![addr(seed).to_string()],
    );
    config.gossip_interval = Duration::from_millis(50);
    // Fail over fast: a short grace before a silent silo is declared dead.
    config.death_grace = Duration::from_millis(200);
    config
}

/// chitchat's message header: magic number, protocol version, type.
fn header(kind: u8) -> Vec<u8> {
    let mut buf = 45_139u16.to_le_bytes().to_vec();
    buf.push(0);
    buf.push(kind);
    buf
}

/// A digest naming `node` at `heartbeat` and `max_version`.
fn digest(buf: &mut Vec<u8>, node: &ChitchatId, heartbeat: u64, max_version: u64) {
    1u16.serialize(buf);
    node.serialize(buf);
    heartbeat.serialize(buf);
    0u64.serialize(buf); // last gc version
    max_version.serialize(buf);
}

/// A delta that sets `node`'s state to junk at `version`, in one plain
/// block.
fn delta(buf: &mut Vec<u8>, node: &ChitchatId, version: u64) {
    let mut ops = vec![0u8];
    node.serialize(&mut ops);
    0u64.serialize(&mut ops); // last gc version
    0u64.serialize(&mut ops); // from version
    ops.push(1);
    "granary.state".serialize(&mut ops);
    "00:{\"junk\":true}".serialize(&mut ops);
    version.serialize(&mut ops);
    ops.push(0); // set, not deleted
    ops.push(2);
    version.serialize(&mut ops);
    buf.push(2); // a plain block
    (ops.len() as u16).serialize(buf);
    buf.extend_from_slice(&ops);
    buf.push(0); // no more blocks
}

/// The attacker's datagrams, unsealed: for `victim`'s own state, a 60 KB
/// id, and (when `beat` is some) a heartbeat for `dead`.
fn forgeries(victim: &ChitchatId, dead: &ChitchatId, beat: Option<u64>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for version in [1u64 << 63, u64::MAX] {
        let mut ack = header(2);
        delta(&mut ack, victim, version);
        out.push(ack);
        let mut syn_ack = header(1);
        digest(&mut syn_ack, victim, version, version);
        delta(&mut syn_ack, victim, version);
        out.push(syn_ack);
    }
    let long = ChitchatId::new("x".repeat(60_000), 1, addr(9));
    let mut syn = header(0);
    digest(&mut syn, &long, 1, 1);
    CLUSTER.serialize(&mut syn);
    out.push(syn);
    if let Some(beat) = beat {
        let mut syn = header(0);
        digest(&mut syn, dead, beat, 5);
        CLUSTER.serialize(&mut syn);
        out.push(syn);
    }
    out
}

/// The header of a sealed datagram for `to`, as a silo would write it.
fn header_for(session: u64, counter: u64, to: SocketAddr) -> Vec<u8> {
    let mut header = b"GRG1".to_vec();
    header.extend_from_slice(&session.to_le_bytes());
    header.extend_from_slice(&counter.to_le_bytes());
    header.extend_from_slice(&granary_cluster::membership::unix_ms().to_le_bytes());
    let ip = match to.ip() {
        std::net::IpAddr::V4(ip) => ip.to_ipv6_mapped(),
        std::net::IpAddr::V6(ip) => ip,
    };
    header.extend_from_slice(&ip.octets());
    header.extend_from_slice(&to.port().to_le_bytes());
    header
}

/// `payload` sealed for `to` as a silo holding the secret would seal it.
fn seal(payload: &[u8], session: u64, counter: u64, to: SocketAddr) -> Vec<u8> {
    let mut sealed = header_for(session, counter, to);
    let tag = secret().tag(Purpose::Gossip, CLUSTER, &[&sealed, payload]);
    sealed.extend_from_slice(payload);
    sealed.extend_from_slice(&tag);
    sealed
}

/// Panics anywhere in this test binary (tasks included) since it started.
static PANICS: AtomicU64 = AtomicU64::new(0);

async fn forged_gossip_leaves_every_view_as_it_was(insider: bool) {
    let ports = common::free_udp_ports(3);
    let mut silos = Vec::new();
    let mut stats: Vec<Arc<GossipStats>> = Vec::new();
    for &port in &ports {
        let transport = SealedUdpTransport::new(secret(), CLUSTER);
        stats.push(transport.stats());
        silos.push(
            Membership::join(config(port, ports[0]), secret(), &transport)
                .await
                .expect("a silo joins"),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while silos.iter().any(|s| s.members().len() != 3) {
        assert!(Instant::now() < deadline, "the cluster did not form");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dead = silos.pop().expect("three silos");
    let dead_port = ports[2];
    dead.stop().await.expect("the silo stops");
    let dead_id = ChitchatId::new(format!("silo-{dead_port}"), 1, addr(dead_port));
    let victim = ChitchatId::new(format!("silo-{}", ports[0]), 1, addr(ports[0]));
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("a socket");
    let targets = [addr(ports[0]), addr(ports[1])];
    let forging = tokio::spawn(async move {
        let started = Instant::now();
        let mut counter = 0u64;
        for round in 0u64.. {
            // The dead silo's heartbeat: on for a second, off for one.
            let on = started.elapsed().as_secs() % 2 == 0;
            let beat = on.then_some(1_000_000 + round);
            for payload in forgeries(&victim, &dead_id, beat) {
                for target in targets {
                    let datagram = if insider {
                        counter += 1;
                        seal(&payload, 7, counter, target)
                    } else {
                        payload.clone()
                    };
                    let _ = attacker.send_to(&datagram, target).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    let live: Vec<String> = ports[..2]
        .iter()
        .map(|port| format!("silo-{port}"))
        .collect();
    let dead_name = format!("silo-{dead_port}");
    let started = Instant::now();
    let mut dropped_at = None;
    while started.elapsed() < Duration::from_secs(10) {
        for silo in &silos {
            let view: Vec<String> = silo.members().into_iter().map(|m| m.silo.address).collect();
            for name in &live {
                assert!(view.contains(name), "{name} left a view: {view:?}");
            }
            let has_dead = view.contains(&dead_name);
            match dropped_at {
                Some(at) => assert!(
                    !has_dead,
                    "the dead silo came back {:?} after it left",
                    started.elapsed() - at
                ),
                None if silos
                    .iter()
                    .all(|s| s.members().iter().all(|m| m.silo.address != dead_name)) =>
                {
                    dropped_at = Some(started.elapsed());
                }
                None => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    forging.abort();
    let dropped_at = dropped_at.expect("the dead silo left every view within 10 s");
    assert!(
        dropped_at < Duration::from_secs(5),
        "it took {dropped_at:?}"
    );
    assert_eq!(PANICS.load(Ordering::Relaxed), 0, "a task panicked");
    for (silo, stats) in silos.iter().zip(&stats) {
        let counts = stats.counts();
        assert!(counts.sent > 0 && counts.accepted > 0, "{counts:?}");
        assert_eq!(
            counts.too_long, 0,
            "a datagram past the UDP limit: {counts:?}"
        );
        assert_eq!(counts.malformed + counts.undecoded, 0, "{counts:?}");
        if insider {
            // Sealed right, refused by rule 3.
            assert!(counts.refused > 0, "{counts:?}");
        } else {
            assert!(counts.unsealed > 0, "{counts:?}");
            assert_eq!(counts.refused, 0, "{counts:?}");
        }
        assert_eq!(silo.members().len(), 2);
    }
    for silo in silos {
        silo.stop().await.expect("the silo stops");
    }
}

/// Both attackers in turn, in one test: the panic count is the binary's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_gossip_changes_no_view_with_or_without_the_secret() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::Relaxed);
        previous(info);
    }));
    forged_gossip_leaves_every_view_as_it_was(false).await;
    forged_gossip_leaves_every_view_as_it_was(true).await;
}

/// A datagram sealed with the secret but under another cluster's name, one
/// replayed, and one sealed for another silo are dropped before chitchat
/// sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datagram_sealed_for_another_cluster_or_replayed_is_dropped() {
    let port = common::free_udp_ports(1)[0];
    let transport = SealedUdpTransport::new(secret(), CLUSTER);
    let stats = transport.stats();
    let silo = Membership::join(config(port, port), secret(), &transport)
        .await
        .expect("a silo joins");
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("a socket");
    let stranger = ChitchatId::new("stranger".to_string(), 1, addr(9));
    let mut syn = header(0);
    digest(&mut syn, &stranger, 1, 1);
    CLUSTER.serialize(&mut syn);
    // Sealed right once, then sent again.
    let datagram = seal(&syn, 11, 1, addr(port));
    for _ in 0..2 {
        attacker.send_to(&datagram, addr(port)).await.expect("sent");
    }
    // Sealed right, but for another silo.
    let elsewhere = seal(&syn, 11, 2, addr(port.wrapping_add(1)));
    attacker
        .send_to(&elsewhere, addr(port))
        .await
        .expect("sent");
    // Another cluster's name under the same secret.
    let mut other = header_for(12, 1, addr(port));
    let tag = secret().tag(Purpose::Gossip, "another", &[&other, &syn]);
    other.extend_from_slice(&syn);
    other.extend_from_slice(&tag);
    attacker.send_to(&other, addr(port)).await.expect("sent");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let counts = stats.counts();
        if counts.replayed == 1 && counts.forged == 1 && counts.misdirected == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{counts:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    silo.stop().await.expect("the silo stops");
}
