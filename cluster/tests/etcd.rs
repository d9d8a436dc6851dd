//! The etcd provider against a real etcd (`GRANARY_ETCD_ENDPOINTS`; CI
//! starts Debian's etcd-server on loopback): joins, loads, a graceful
//! leave, a crash noticed when the lease expires, a rejoin as a new
//! incarnation, exactly one winner among concurrent registrations, and
//! entries that go with their silo; and cluster nodes on etcd: exactly
//! one activation under concurrent first calls from every silo, and a
//! killed silo's grains moving with their state once its lease expires.
//! Each test uses a cluster name of its own, so runs never see each
//! other's keys.

#![cfg(feature = "etcd")]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Add, Counter};
use granary_actors::storage::MemoryStorage;
use granary_actors::{GrainId, GrainKey, Silo};
use granary_cluster::etcd::{EtcdConfig, EtcdError, EtcdMembership};
use granary_cluster::{
    ClusterNode, ClusterSecret, InProcessNetwork, Member, NodeConfig, SiloId, SiloLoad,
};

#[cfg(granary_etcd)]
const ENDPOINTS: &str = env!("GRANARY_ETCD_ENDPOINTS");
#[cfg(not(granary_etcd))]
const ENDPOINTS: &str = "";

/// A cluster of its own for one test.
fn config(test: &str) -> EtcdConfig {
    common::etcd_config(test, ENDPOINTS)
}

/// The secret every record of these tests is signed with.
fn secret() -> ClusterSecret {
    ClusterSecret::new([0xd6; 32]).expect("32 non-text bytes are a secret")
}

fn silo(n: u64) -> SiloId {
    SiloId::new(format!("10.0.0.{n}:7000"), 100 + n)
}

async fn view_becomes(membership: &EtcdMembership, want: &[SiloId]) -> Vec<Member> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let members = membership.members();
        let silos: Vec<SiloId> = members.iter().map(|m| m.silo.clone()).collect();
        if silos == want {
            return members;
        }
        assert!(
            Instant::now() < deadline,
            "the view is {silos:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(granary_etcd),
    ignore = "GRANARY_ETCD_ENDPOINTS was not set when this test was built (CI starts an etcd)"
)]
async fn silos_join_publish_load_leave_crash_and_rejoin() {
    let config = config("membership");
    let a = EtcdMembership::join(config.clone(), secret(), silo(1), SiloLoad::default())
        .await
        .unwrap();
    let b = EtcdMembership::join(config.clone(), secret(), silo(2), SiloLoad::default())
        .await
        .unwrap();
    let c = EtcdMembership::join(config.clone(), secret(), silo(3), SiloLoad::default())
        .await
        .unwrap();
    let all = [silo(1), silo(2), silo(3)];
    for membership in [&a, &b, &c] {
        view_becomes(membership, &all).await;
    }
    // Load travels.
    b.publish_load(SiloLoad {
        grain_types: Vec::new(),
        activations: 42,
        ..SiloLoad::default()
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while a
        .members()
        .iter()
        .find(|m| m.silo == silo(2))
        .is_none_or(|m| m.load.activations != 42)
    {
        assert!(Instant::now() < deadline, "b's load never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A graceful leave is seen at once (well inside the lease's ttl).
    let left = Instant::now();
    c.leave().await.unwrap();
    view_becomes(&a, &[silo(1), silo(2)]).await;
    assert!(left.elapsed() < config.ttl, "{:?}", left.elapsed());
    // A crash is seen when the lease expires.
    let crashed = Instant::now();
    b.stop();
    view_becomes(&a, &[silo(1)]).await;
    let noticed = crashed.elapsed();
    assert!(noticed >= config.ttl / 2, "noticed after {noticed:?}");
    // A rejoin is a new incarnation, seen beside nothing of the old one.
    let again = SiloId::new(silo(2).address, silo(2).incarnation + 1);
    let b2 = EtcdMembership::join(config.clone(), secret(), again.clone(), SiloLoad::default())
        .await
        .unwrap();
    view_becomes(&a, &[silo(1), again.clone()]).await;
    view_becomes(&b2, &[silo(1), again]).await;
    a.leave().await.unwrap();
    b2.leave().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(granary_etcd),
    ignore = "GRANARY_ETCD_ENDPOINTS was not set when this test was built (CI starts an etcd)"
)]
async fn the_first_registration_wins_and_entries_go_with_their_silo() {
    let config = config("directory");
    let mut silos = Vec::new();
    for n in 1..=3 {
        silos.push(
            EtcdMembership::join(config.clone(), secret(), silo(n), SiloLoad::default())
                .await
                .unwrap(),
        );
    }
    let grain = |key: u64| GrainId {
        type_name: "ledger".into(),
        key: GrainKey::U64(key),
    };
    // Every silo registers every grain at once, several times over.
    for key in 0..20u64 {
        let attempts: Vec<_> = silos
            .iter()
            .flat_map(|membership| {
                let directory = membership.directory();
                (0..3u64).map(move |activation| {
                    let directory = directory.clone();
                    tokio::spawn(async move { directory.register(&grain(key), activation).await })
                })
            })
            .collect();
        let mut homes = Vec::new();
        for attempt in attempts {
            homes.push(attempt.await.unwrap().unwrap());
        }
        assert!(
            homes.windows(2).all(|pair| pair[0] == pair[1]),
            "grain {key}: more than one home: {homes:?}"
        );
        let looked_up = silos[0].directory().lookup(&grain(key)).await.unwrap();
        assert_eq!(looked_up.as_ref(), homes.first(), "grain {key}");
    }
    // Only the silo that registered an entry removes it.
    let home = silos[0]
        .directory()
        .lookup(&grain(0))
        .await
        .unwrap()
        .unwrap();
    let (owner, others): (Vec<_>, Vec<_>) = silos.iter().partition(|m| *m.silo() == home.silo);
    for other in others {
        assert!(!other.directory().unregister(&grain(0), None).await.unwrap());
    }
    assert!(
        owner[0]
            .directory()
            .unregister(&grain(0), None)
            .await
            .unwrap()
    );
    assert_eq!(silos[1].directory().lookup(&grain(0)).await.unwrap(), None);
    // A new registration after it wins.
    let next = silos[1].directory().register(&grain(0), 9).await.unwrap();
    assert_eq!((next.silo, next.activation), (silo(2), 9));

    // A silo that stops takes its entries with it when its lease expires;
    // one that leaves, at once.
    let on_three: Vec<u64> = {
        let mut keys = Vec::new();
        for key in 1..20u64 {
            let home = silos[0]
                .directory()
                .lookup(&grain(key))
                .await
                .unwrap()
                .unwrap();
            if home.silo == silo(3) {
                keys.push(key);
            }
        }
        keys
    };
    let third = silos.pop().unwrap();
    third.stop();
    let deadline = Instant::now() + Duration::from_secs(15);
    for key in &on_three {
        while silos[0]
            .directory()
            .lookup(&grain(*key))
            .await
            .unwrap()
            .is_some()
        {
            assert!(
                Instant::now() < deadline,
                "grain {key}'s entry outlived its silo"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let taken = silos[0]
            .directory()
            .register(&grain(*key), 1)
            .await
            .unwrap();
        assert_eq!(taken.silo, silo(1));
    }
    let second = silos.pop().unwrap();
    let second_homes: Vec<u64> = {
        let mut keys = Vec::new();
        for key in 0..20u64 {
            if let Some(home) = silos[0].directory().lookup(&grain(key)).await.unwrap() {
                if home.silo == silo(2) {
                    keys.push(key);
                }
            }
        }
        keys
    };
    assert!(!second_homes.is_empty());
    second.leave().await.unwrap();
    for key in second_homes {
        assert_eq!(
            silos[0].directory().lookup(&grain(key)).await.unwrap(),
            None
        );
    }
    silos.pop().unwrap().leave().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configurations_and_an_unreachable_etcd_are_typed_errors() {
    let mut config = EtcdConfig::new("c", Vec::new());
    assert!(matches!(
        EtcdMembership::join(config.clone(), secret(), silo(1), SiloLoad::default()).await,
        Err(EtcdError::InvalidConfig(_))
    ));
    config.endpoints = vec!["http://127.0.0.1:1".into()];
    config.ttl = Duration::from_millis(500);
    assert!(matches!(
        EtcdMembership::join(config.clone(), secret(), silo(1), SiloLoad::default()).await,
        Err(EtcdError::InvalidConfig(_))
    ));
    config.ttl = Duration::from_secs(2);
    config.cluster = "a/b".into();
    assert!(matches!(
        EtcdMembership::join(config.clone(), secret(), silo(1), SiloLoad::default()).await,
        Err(EtcdError::InvalidConfig(_))
    ));
    // Nothing listens on port 1: refused, within the timeout.
    config.cluster = "c".into();
    config.timeout = Duration::from_secs(2);
    let started = Instant::now();
    let refused = EtcdMembership::join(config, secret(), silo(1), SiloLoad::default()).await;
    assert!(
        matches!(refused, Err(EtcdError::Connect(_) | EtcdError::Request(_))),
        "{refused:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A node on etcd over the in-process network.
async fn etcd_node(
    network: &InProcessNetwork,
    storage: &Arc<MemoryStorage>,
    etcd: &EtcdConfig,
    n: u16,
) -> ClusterNode {
    let silo = Silo::builder()
        .register::<Counter>("counter")
        .message::<Counter, Add>("add")
        .storage(storage.clone())
        .build()
        .unwrap();
    start_on_etcd(network, silo, &format!("etcd-silo-{n}:7000"), etcd.clone())
        .await
        .unwrap()
}

/// Starts a node hosting `silo` at `listen` on the in-process network,
/// with membership and directory in `etcd`.
async fn start_on_etcd(
    network: &InProcessNetwork,
    silo: Silo,
    listen: &str,
    etcd: EtcdConfig,
) -> Result<ClusterNode, granary_cluster::NodeError> {
    let config = NodeConfig::new(
        "etcd-test",
        ClusterSecret::new([0xd6; 32]).unwrap(),
        listen,
        "127.0.0.1:1".parse().unwrap(),
        Vec::new(),
    );
    // The tensor of the migration test declares its resident buffer, as
    // every GPU grain type must for its quota (`node/quotas.rs`).
    let tensor = granary_cluster::GpuNeeds {
        device_memory: common::tensor::BUFFER as u64,
        ..granary_cluster::GpuNeeds::default()
    };
    ClusterNode::builder(silo, config)
        .transport(Arc::new(network.transport(listen)))
        .needs("tensor", tensor)
        .start_with_etcd(etcd)
        .await
}

async fn nodes_see(nodes: &[&ClusterNode], count: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while nodes.iter().any(|node| node.members().len() != count) {
        assert!(Instant::now() < deadline, "views did not converge");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(granary_etcd),
    ignore = "GRANARY_ETCD_ENDPOINTS was not set when this test was built (CI starts an etcd)"
)]
async fn a_cluster_on_etcd_activates_each_grain_once_and_survives_a_killed_silo() {
    let etcd = config("nodes");
    let network = InProcessNetwork::new();
    let storage = Arc::new(MemoryStorage::new());
    let mut nodes = Vec::new();
    for n in 1..=3 {
        nodes.push(etcd_node(&network, &storage, &etcd, n).await);
    }
    nodes_see(&nodes.iter().collect::<Vec<_>>(), 3).await;
    let grains = 30u64;
    let calls: Vec<_> = nodes
        .iter()
        .flat_map(|node| {
            (0..grains).map(move |key| {
                let node = node.clone();
                tokio::spawn(async move { node.grain::<Counter>(key).call(Add(1)).await })
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let activations: u64 = nodes.iter().map(|n| n.silo().activations_started()).sum();
    assert_eq!(activations, grains, "exactly one activation per grain");
    assert_eq!(
        nodes.iter().map(ClusterNode::homes).sum::<usize>(),
        grains as usize
    );

    // Kill the busiest silo: its lease expires, its entries with it, and
    // its grains start elsewhere from their state.
    let victim = (0..3)
        .max_by_key(|i| nodes[*i].homes())
        .expect("three nodes");
    let moved = nodes[victim].homes();
    assert!(moved > 0);
    network.isolate(&nodes[victim].id().address);
    nodes[victim].kill().await.unwrap();
    let survivors: Vec<&ClusterNode> = (0..3).filter(|i| *i != victim).map(|i| &nodes[i]).collect();
    nodes_see(&survivors, 2).await;
    for key in 0..grains {
        assert_eq!(
            survivors[0].grain::<Counter>(key).call(Add(1)).await,
            Ok(4),
            "grain {key}"
        );
    }
    assert_eq!(
        survivors.iter().map(|n| n.homes()).sum::<usize>(),
        grains as usize,
        "the {moved} grains of the dead silo moved"
    );
    for node in survivors {
        node.leave().await.unwrap();
    }
}

/// A TCP proxy in front of etcd that can pass traffic, hold it (a silent
/// partition: connections stay open, nothing moves), or cut every
/// connection at once.
struct Proxy {
    endpoint: String,
    holding: Arc<std::sync::atomic::AtomicBool>,
    pumps: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Proxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = ENDPOINTS
            .split(',')
            .next()
            .unwrap_or_default()
            .trim_start_matches("http://")
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let holding = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pumps: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (hold, tasks) = (holding.clone(), pumps.clone());
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                // Closed with a reset, as a crashed peer or a middlebox
                // would.
                let _ = client.set_zero_linger();
                let _ = server.set_zero_linger();
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                for (mut from, mut to) in [
                    (
                        Box::new(client_read) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(server_write) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(server_read), Box::new(client_write)),
                ] {
                    let hold = hold.clone();
                    tasks.lock().unwrap().push(tokio::spawn(async move {
                        let mut buffer = vec![0u8; 64 << 10];
                        while let Ok(read) = from.read(&mut buffer).await {
                            if read == 0 {
                                break;
                            }
                            while hold.load(std::sync::atomic::Ordering::Relaxed) {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            if to.write_all(&buffer[..read]).await.is_err() {
                                break;
                            }
                        }
                    }));
                }
            }
        });
        Proxy {
            endpoint,
            holding,
            pumps,
            accepting,
        }
    }

    fn hold(&self) {
        self.holding
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Closes every connection through the proxy (new ones are accepted).
    fn reset(&self) {
        for pump in self.pumps.lock().unwrap().drain(..) {
            pump.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.reset();
    }
}

fn through(proxy: &Proxy, mut config: EtcdConfig) -> EtcdConfig {
    config.endpoints = vec![proxy.endpoint.clone()];
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(granary_etcd),
    ignore = "GRANARY_ETCD_ENDPOINTS was not set when this test was built (CI starts an etcd)"
)]
async fn a_reset_connection_to_etcd_does_not_end_membership() {
    let config = config("reset");
    let proxy = Proxy::start().await;
    let a = EtcdMembership::join(
        through(&proxy, config.clone()),
        secret(),
        silo(1),
        SiloLoad::default(),
    )
    .await
    .unwrap();
    let b = EtcdMembership::join(config.clone(), secret(), silo(2), SiloLoad::default())
        .await
        .unwrap();
    view_becomes(&b, &[silo(1), silo(2)]).await;
    proxy.reset();
    // Three lease lifetimes later a still holds its lease and its place.
    tokio::time::sleep(config.ttl * 3).await;
    assert!(a.holds_lease(), "the keep-alive did not recover");
    assert_eq!(
        b.members()
            .iter()
            .map(|m| m.silo.clone())
            .collect::<Vec<_>>(),
        [silo(1), silo(2)]
    );
    view_becomes(&a, &[silo(1), silo(2)]).await;
    a.leave().await.unwrap();
    b.leave().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(granary_etcd),
    ignore = "GRANARY_ETCD_ENDPOINTS was not set when this test was built (CI starts an etcd)"
)]
async fn a_silo_cut_off_from_etcd_stops_serving_before_its_grains_move() {
    let etcd = config("fenced");
    let proxy = Proxy::start().await;
    let network = InProcessNetwork::new();
    let storage = Arc::new(MemoryStorage::new());
    let a = etcd_node(&network, &storage, &through(&proxy, etcd.clone()), 1).await;
    let b = etcd_node(&network, &storage, &etcd, 2).await;
    nodes_see(&[&a, &b], 2).await;
    // A grain homed on a (the default placement hashes grains over the
    // silos: try keys until one lands there).
    let mut homed = None;
    for candidate in 0..64u64 {
        a.grain::<Counter>(candidate).call(Add(1)).await.unwrap();
        if a.silo()
            .is_active_named("counter", &GrainKey::U64(candidate))
        {
            homed = Some(candidate);
            break;
        }
    }
    let key = homed.expect("a grain homed on a");
    // a is cut off from etcd, silently.
    proxy.hold();
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.members().len() != 1 {
        assert!(Instant::now() < deadline, "b never dropped a");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // By the time b sees a gone, a has stopped serving and let its
    // activation go: the grain is never active on both.
    assert!(a.is_stopped(), "a still serves without its lease");
    assert!(!a.silo().is_active_named("counter", &GrainKey::U64(key)));
    assert_eq!(b.grain::<Counter>(key).call(Add(10)).await, Ok(11));
    assert!(a.grain::<Counter>(key).call(Add(100)).await.is_err());
    assert!(!a.silo().is_active_named("counter", &GrainKey::U64(key)));
    b.leave().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(granary_etcd),
    ignore = "GRANARY_ETCD_ENDPOINTS was not set when this test was built (CI starts an etcd)"
)]
async fn a_cancelled_join_leaves_no_member_behind_and_a_failed_start_frees_the_silo() {
    let etcd = config("cancelled");
    let observer = EtcdMembership::join(etcd.clone(), secret(), silo(200), SiloLoad::default())
        .await
        .unwrap();
    let mut cancelled = Vec::new();
    for step in 0..60u64 {
        let id = SiloId::new(format!("10.0.1.{step}:7000"), 1);
        let join = EtcdMembership::join(etcd.clone(), secret(), id.clone(), SiloLoad::default());
        match tokio::time::timeout(Duration::from_micros(step * 300), join).await {
            Ok(joined) => joined.unwrap().leave().await.unwrap(),
            Err(_) => cancelled.push(id),
        }
    }
    assert!(!cancelled.is_empty());
    tokio::time::sleep(etcd.ttl * 2).await;
    view_becomes(&observer, &[silo(200)]).await;
    observer.leave().await.unwrap();

    // A node whose start fails leaves its silo free for the next one.
    let silo = Silo::builder()
        .register::<Counter>("counter")
        .message::<Counter, Add>("add")
        .build()
        .unwrap();
    let network = InProcessNetwork::new();
    let mut unreachable = EtcdConfig::new("unreachable", vec!["http://127.0.0.1:1".into()]);
    unreachable.timeout = Duration::from_secs(1);
    assert!(
        start_on_etcd(&network, silo.clone(), "retry-silo:7000", unreachable)
            .await
            .is_err()
    );
    let node = start_on_etcd(&network, silo, "retry-silo:7000", etcd)
        .await
        .expect("the silo is free again");
    node.leave().await.unwrap();
}

/// Activations alive of each `Slow` grain, across the test's silos.
static SLOW_ALIVE: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, i64>>> =
    std::sync::LazyLock::new(Default::default);

fn slow_alive(ctx: &granary_actors::GrainContext, change: i64) -> i64 {
    let mut alive = SLOW_ALIVE.lock().unwrap();
    let count = alive.entry(ctx.id().to_string()).or_default();
    *count += change;
    *count
}

/// A grain whose `on_deactivate` takes a while (it writes its state).
struct Slow;

impl granary_actors::Grain for Slow {
    fn new(_: &GrainKey) -> Slow {
        Slow
    }

    async fn on_activate(
        &mut self,
        ctx: &mut granary_actors::GrainContext,
    ) -> Result<(), granary_actors::ActivationError> {
        slow_alive(ctx, 1);
        Ok(())
    }

    async fn on_deactivate(&mut self, ctx: &mut granary_actors::GrainContext) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        slow_alive(ctx, -1);
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Alive;

impl granary_actors::Message for Alive {
    type Reply = i64;
}

impl granary_actors::Handler<Alive> for Slow {
    async fn handle(&mut self, _: Alive, ctx: &mut granary_actors::GrainContext) -> i64 {
        slow_alive(ctx, 0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(granary_etcd),
    ignore = "GRANARY_ETCD_ENDPOINTS was not set when this test was built (CI starts an etcd)"
)]
async fn a_leave_waits_for_its_activations_to_end_before_others_may_start_them() {
    let etcd = config("leave");
    let network = InProcessNetwork::new();
    let mut nodes = Vec::new();
    for n in 1..=2 {
        let silo = Silo::builder()
            .register::<Slow>("slow")
            .message::<Slow, Alive>("alive")
            .build()
            .unwrap();
        nodes.push(
            start_on_etcd(&network, silo, &format!("slow-silo-{n}:7000"), etcd.clone())
                .await
                .unwrap(),
        );
    }
    let (a, b) = (&nodes[0], &nodes[1]);
    nodes_see(&[a, b], 2).await;
    let mut homed = None;
    for key in 0..64u64 {
        a.grain::<Slow>(key).call(Alive).await.unwrap();
        if a.silo().is_active_named("slow", &GrainKey::U64(key)) {
            homed = Some(key);
            break;
        }
    }
    let key = homed.expect("a grain homed on a");
    a.leave().await.unwrap();
    assert!(
        !a.silo().is_active_named("slow", &GrainKey::U64(key)),
        "leave returned while its activation still ran"
    );
    assert_eq!(
        b.grain::<Slow>(key).call(Alive).await,
        Ok(1),
        "one activation alive"
    );
    b.leave().await.unwrap();
}

/// Records written by a client of etcd without the cluster's secret (etcd
/// rule 7): a fake silo record, plain or signed with another secret, is in
/// no view; a silo's own record overwritten with junk leaves it in the
/// watched view (until the view is next read afresh); a forged directory
/// entry, lease-less, is taken as absent and replaced by the real
/// registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(granary_etcd),
    ignore = "GRANARY_ETCD_ENDPOINTS was not set when this test was built (CI starts an etcd)"
)]
async fn records_without_the_secret_are_neither_members_nor_homes() {
    let config = config("forged");
    let a = EtcdMembership::join(config.clone(), secret(), silo(1), SiloLoad::default())
        .await
        .unwrap();
    view_becomes(&a, &[silo(1)]).await;
    let mut raw = etcd_client::Client::connect(config.endpoints.clone(), None)
        .await
        .expect("a plain etcd client");
    let silos = format!("{}/{}/silos/", config.prefix, config.cluster);
    // A fake silo, lease-less, in plain JSON as records were once kept.
    raw.put(
        format!("{silos}10.0.0.9:7000#1"),
        r#"{"silo":{"address":"10.0.0.9:7000","incarnation":1},"load":{"activations":0,"devices":[]}}"#,
        None,
    )
    .await
    .expect("written");
    // A silo with another secret.
    let stranger = ClusterSecret::new([0xe9; 32]).unwrap();
    let other = EtcdMembership::join(config.clone(), stranger, silo(2), SiloLoad::default())
        .await
        .unwrap();
    // a's own record overwritten with junk.
    raw.put(format!("{silos}{}", silo(1)), "junk", None)
        .await
        .expect("written");
    tokio::time::sleep(Duration::from_millis(500)).await;
    view_becomes(&a, &[silo(1)]).await;
    // The stranger cannot read a's record either.
    view_becomes(&other, &[silo(2)]).await;

    // A forged directory entry, lease-less, naming a silo that is not
    // there: taken as absent, deleted, and the real registration wins.
    let directory = a.directory();
    let grain = GrainId {
        type_name: "counter".into(),
        key: GrainKey::U64(7),
    };
    let mut key = format!("{}/{}/grains/", config.prefix, config.cluster).into_bytes();
    for byte in postcard::to_allocvec(&grain).unwrap() {
        key.extend_from_slice(format!("{byte:02x}").as_bytes());
    }
    let forged = r#"{"silo":{"address":"10.0.0.9:7000","incarnation":1},"activation":1}"#;
    raw.put(key.clone(), forged, None).await.expect("written");
    assert_eq!(directory.lookup(&grain).await.unwrap(), None);
    raw.put(key.clone(), forged, None).await.expect("written");
    let home = directory.register(&grain, 5).await.unwrap();
    assert_eq!(home.silo, silo(1));
    assert_eq!(directory.lookup(&grain).await.unwrap(), Some(home.clone()));
    // The real entry copied off its lease (to outlive its silo): it no
    // longer verifies, and goes.
    let real = raw.get(key.clone(), None).await.expect("read");
    let sealed = real.kvs()[0].value().to_vec();
    raw.put(key.clone(), sealed, None).await.expect("written");
    assert_eq!(directory.lookup(&grain).await.unwrap(), None);
    // A forged entry attached to a lease (the forger's own): refused with
    // an error and left alone, since a silo whose secret were the wrong
    // one must not delete a live silo's entry.
    let lease = raw.lease_grant(30, None).await.expect("a lease").id();
    raw.put(
        key.clone(),
        forged,
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("written");
    assert!(matches!(
        directory.register(&grain, 6).await,
        Err(EtcdError::BadRecord(_))
    ));
    assert_eq!(
        raw.get(key.clone(), None).await.expect("read").kvs().len(),
        1
    );
    raw.lease_revoke(lease).await.expect("revoked");
    a.leave().await.unwrap();
    other.leave().await.unwrap();
}

/// A grain moves between silos whose directory is etcd: the source gives
/// its entry to the target with a revision compare, sealed on the
/// target's lease; the grain carries its state and buffer; and the entry
/// then goes with the target's lease (killed, the grain starts afresh on
/// a live silo from what it persisted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(granary_etcd),
    ignore = "GRANARY_ETCD_ENDPOINTS was not set when this test was built (CI starts an etcd)"
)]
async fn a_grain_moves_on_etcd_and_its_entry_goes_with_the_target_lease() {
    use common::tensor::{Cluster, Inspect, Step, Tensor, cpu_bridge, expected};
    use granary_actors::migration::MigrationTarget;
    let etcd = config("migration");
    let network = InProcessNetwork::new();
    let cluster = Cluster::new(0);
    let mut nodes = Vec::new();
    for n in 1..=3u16 {
        let silo = cluster.silo(n, cpu_bridge(64));
        nodes.push(
            start_on_etcd(&network, silo, &format!("etcd-silo-{n}:7000"), etcd.clone())
                .await
                .unwrap(),
        );
    }
    nodes_see(&nodes.iter().collect::<Vec<_>>(), 3).await;
    let grain = nodes[0].grain::<Tensor>(7);
    for seq in 1..=3 {
        grain.call(Step { sender: 1, seq }).await.unwrap().unwrap();
    }
    let (_, _, on) = grain.call(Inspect).await.unwrap();
    let to = usize::from(on) % 3;
    let moved = grain
        .migrate(MigrationTarget::Silo(nodes[to].id().address.clone()))
        .await
        .unwrap();
    assert_eq!(moved.to, nodes[to].id().to_string());
    let (steps, bytes, now_on) = nodes[(to + 1) % 3]
        .grain::<Tensor>(7)
        .call(Inspect)
        .await
        .unwrap();
    assert_eq!((steps, usize::from(now_on)), (3, to + 1));
    assert!(bytes == expected(7, 3));
    assert_eq!(grain.call(Step { sender: 1, seq: 4 }).await.unwrap(), Ok(4));
    // The entry is the target's: its lease takes it when the target dies.
    network.isolate(&nodes[to].id().address);
    nodes[to].kill().await.unwrap();
    let survivors: Vec<&ClusterNode> = (0..3).filter(|i| *i != to).map(|i| &nodes[i]).collect();
    nodes_see(&survivors, 2).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let (steps, _, after) = loop {
        match survivors[0].grain::<Tensor>(7).call(Inspect).await {
            Ok(found) => break found,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(err) => panic!("the grain did not start again: {err}"),
        }
    };
    assert!(steps >= 3, "from what it persisted: {steps}");
    assert_ne!(usize::from(after), to + 1, "on a live silo");
    cluster.census.check_one_at_a_time();
    for node in survivors {
        node.leave().await.unwrap();
    }
}
