//! Chaos on a real network, as `cargo test --test chaos` runs it.
//!
//! Five `granary node` processes, each in a network namespace of its own
//! joined to a bridge by a veth pair (`net.rs`), keep counter grains
//! ([`Counter`]) in PostgreSQL, reached through a relay in the harness
//! (`relay.rs`). The harness joins the cluster as a client node on the
//! bridge, and its clients add to and read the counters, recording every
//! operation (`history.rs`), while faults are injected one after another in
//! an order drawn from a seed (`faults.rs`): a silo cut off, a split into 2
//! and 3, packet loss, delay to storage and etcd, `kill -9`, SIGSTOP for
//! 10 s, a drained restart and a PostgreSQL restart; a fault on one silo
//! strikes the one hosting the most counters at that moment. After each
//! fault heals,
//! the time until every counter answers again is measured. At the end the
//! history is checked: no acknowledged write lost, the counters
//! linearizable, never two activations writing at once.
//!
//! Membership runs over gossip in one trial and over etcd in the other.
//! Both need root, `ip` and `nft`, and a PostgreSQL server on this machine
//! (`GRANARY_POSTGRES_URL`, restartable with `pg_ctlcluster`); the etcd
//! trial needs the `etcd` feature and `GRANARY_ETCD_ENDPOINTS`. Without
//! them a trial reports as ignored and says why. `GRANARY_CHAOS_SEED`
//! replays a run's schedule; `GRANARY_CHAOS_REPORT` names a file each run's
//! report is appended to.

mod faults;
mod history;
mod net;
mod relay;
mod silos;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use granary::actors::GrainKey;
use granary::cluster::ClusterNode;
use granary::cluster_demo::{Add, COUNTER, Counter, DemoGrains, Get};
use granary::node_file::{DevicesFile, EtcdFile, NodeFile, StorageFile, start_node};
use libtest_mimic::{Arguments, Failed, Trial};

use faults::{Injected, Schedule};
use history::{Kind, Op, Outcome};

const SILOS: usize = 5;
const COUNTERS: u64 = 8;
const CLIENTS: u64 = 16;
/// How long a client waits for an answer before it counts the call as
/// failed (for an add: indeterminate).
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long after a fault heals every counter must answer again.
const RECOVERY_BOUND: Duration = Duration::from_secs(30);
const SECRET: &str = "5be0a2c4d18f3e7a96b1c0d4e2f7a85b3c9d1e0f2a4b6c8d7e5f3a1b9c0d2e4f";
const LISTEN_PORT: u16 = 7100;
const GOSSIP_PORT: u16 = 7200;

/// What a run needs from the machine.
#[derive(Clone)]
struct Machine {
    /// `GRANARY_POSTGRES_URL`, and the server's address.
    postgres: (String, SocketAddr),
    /// `pg_ctlcluster`'s version and cluster name for that server.
    postgres_cluster: (String, String),
}

fn main() {
    let mut args = Arguments::from_args();
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    let machine = machine();
    if let Err(why) = &machine {
        eprintln!("chaos: SKIPPED: both chaos trials are reported as ignored: {why}");
    }
    let etcd = machine
        .clone()
        .and_then(|machine| Ok((machine, etcd_server()?)));
    if let (Ok(_), Err(why)) = (&machine, &etcd) {
        eprintln!("chaos: SKIPPED: the etcd trial is reported as ignored: {why}");
    }
    let mut trials = vec![
        Trial::test("checker_passes_a_clean_history", || {
            checked(history::tests::a_clean_history_passes)
        }),
        Trial::test("checker_catches_a_lost_write", || {
            checked(history::tests::a_lost_acknowledged_write_is_caught)
        }),
        Trial::test("checker_catches_stale_and_duplicate_counts", || {
            checked(history::tests::a_stale_read_and_a_duplicate_count_are_caught)
        }),
        Trial::test("checker_catches_two_writers", || {
            checked(history::tests::two_writers_are_caught)
        }),
        Trial::test("schedule_is_reproducible_from_its_seed", || {
            checked(faults::tests::a_seed_gives_the_same_schedule_and_every_kind)
        }),
    ];
    let gossip = machine.clone();
    trials.push(
        Trial::test("chaos_with_gossip_membership", move || {
            let machine = gossip.map_err(|why| Failed::from(format!("cannot run: {why}")))?;
            on_tokio(chaos(machine, None))
        })
        .with_ignored_flag(machine.is_err()),
    );
    let ignored = etcd.is_err();
    trials.push(
        Trial::test("chaos_with_etcd_membership", move || {
            let (machine, etcd) = etcd.map_err(|why| Failed::from(format!("cannot run: {why}")))?;
            on_tokio(chaos(machine, Some(etcd)))
        })
        .with_ignored_flag(ignored),
    );
    libtest_mimic::run(&args, trials).exit();
}

/// A test body that panics to fail.
fn checked(body: fn()) -> Result<(), Failed> {
    std::panic::catch_unwind(body).map_err(|panic| {
        Failed::from(
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the check panicked".into()),
        )
    })
}

fn on_tokio(body: impl std::future::Future<Output = Result<(), String>>) -> Result<(), Failed> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|err| Failed::from(format!("a runtime: {err}")))?
        .block_on(body)
        .map_err(Failed::from)
}

/// Whether this machine can run the chaos trials, and what with.
fn machine() -> Result<Machine, String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().next().map(str::to_string))
        });
    if uid.as_deref() != Some("0") {
        return Err("network namespaces need root".into());
    }
    for tool in ["ip", "nft", "pg_lsclusters", "pg_ctlcluster"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|output| output.status.success());
        if !found {
            return Err(format!("`{tool}` is not installed"));
        }
    }
    let url = std::env::var("GRANARY_POSTGRES_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .ok_or("GRANARY_POSTGRES_URL is not set (CI starts a PostgreSQL server)")?;
    let authority = authority(&url).ok_or_else(|| format!("cannot read host:port in {url}"))?;
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (
            host.to_string(),
            port.parse::<u16>()
                .map_err(|_| format!("the port of {url}"))?,
        ),
        None => (authority.to_string(), 5432),
    };
    let server = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .ok()
        .and_then(|mut addresses| addresses.next())
        .ok_or_else(|| format!("{host} does not resolve"))?;
    // The cluster serving that port, for the restart.
    let clusters = std::process::Command::new("pg_lsclusters")
        .arg("-h")
        .output()
        .map_err(|err| format!("pg_lsclusters: {err}"))?;
    let clusters = String::from_utf8_lossy(&clusters.stdout);
    let cluster = clusters
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| {
            fields.len() > 3 && fields[2] == port.to_string() && fields[3].starts_with("online")
        })
        .map(|fields| (fields[0].to_string(), fields[1].to_string()))
        .ok_or_else(|| {
            format!("no PostgreSQL cluster on this machine serves port {port} (pg_lsclusters)")
        })?;
    Ok(Machine {
        postgres: (url, server),
        postgres_cluster: cluster,
    })
}

/// The `host:port` of a `postgres://[user[:password]@]host[:port][/db][?…]`.
fn authority(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    Some(
        authority
            .rsplit_once('@')
            .map_or(authority, |(_, host)| host),
    )
}

/// The etcd server the etcd trial relays to.
fn etcd_server() -> Result<SocketAddr, String> {
    if !cfg!(feature = "etcd") {
        return Err("built without the `etcd` feature".into());
    }
    let endpoints = std::env::var("GRANARY_ETCD_ENDPOINTS")
        .ok()
        .filter(|e| !e.is_empty())
        .ok_or("GRANARY_ETCD_ENDPOINTS is not set (CI starts an etcd)")?;
    let first = endpoints.split(',').next().unwrap_or_default();
    let address = first
        .strip_prefix("http://")
        .ok_or_else(|| format!("{first}: the trial relays plain http:// etcd only"))?;
    std::net::ToSocketAddrs::to_socket_addrs(address)
        .ok()
        .and_then(|mut addresses| addresses.next())
        .ok_or_else(|| format!("{address} does not resolve"))
}

/// What the clients share.
struct Load {
    started: Instant,
    /// This run's counters are keyed `base + 0 .. base + COUNTERS`: the
    /// database outlives runs.
    base: u64,
    ops: Mutex<Vec<Op>>,
    stop: AtomicBool,
}

impl Load {
    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }
}

/// One client: adds to its counter, and every fourth operation reads it.
async fn client(node: ClusterNode, load: Arc<Load>, n: u64) {
    let grain = n % COUNTERS;
    let counter = node.grain::<Counter>(load.base + grain);
    let mut i = 0u64;
    while !load.stop.load(Ordering::Relaxed) {
        i += 1;
        let kind = if i % 4 == 0 { Kind::Get } else { Kind::Add };
        let invoked_us = load.now_us();
        let outcome = match kind {
            Kind::Add => {
                match tokio::time::timeout(CALL_TIMEOUT, counter.call(Add { amount: 1 })).await {
                    Ok(Ok(Ok(added))) => Outcome::Added {
                        value: added.value,
                        replaced: added.replaced,
                        written: added.written,
                        activation: added.activation,
                    },
                    _ => Outcome::Failed,
                }
            }
            Kind::Get => match tokio::time::timeout(CALL_TIMEOUT, counter.call(Get)).await {
                Ok(Ok(Ok(count))) => Outcome::Read { value: count.value },
                _ => Outcome::Failed,
            },
        };
        let failed = outcome == Outcome::Failed;
        let op = Op {
            grain,
            kind,
            invoked_us,
            completed_us: load.now_us(),
            outcome,
        };
        load.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
        let pause = if failed { 100 } else { 10 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// How long until every counter answers a read, up to `bound`.
async fn until_reachable(node: &ClusterNode, base: u64, bound: Duration) -> Option<Duration> {
    let began = Instant::now();
    let mut pending: Vec<u64> = (0..COUNTERS).collect();
    while began.elapsed() < bound {
        let mut still = Vec::new();
        for &grain in &pending {
            let answer = tokio::time::timeout(
                Duration::from_secs(2),
                node.grain::<Counter>(base + grain).call(Get),
            )
            .await;
            if !matches!(answer, Ok(Ok(Ok(_)))) {
                still.push(grain);
            }
        }
        if still.is_empty() {
            return Some(began.elapsed());
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// The silo hosting the most of this run's counters, as the client last
/// found them (the lowest index among equals).
fn busiest(node: &ClusterNode, net: &net::Net, base: u64) -> usize {
    let mut hosted = [0usize; SILOS];
    for grain in 0..COUNTERS {
        if let Some(silo) = node.location(COUNTER, GrainKey::U64(base + grain)) {
            let listen = |i: usize| SocketAddr::new(net.silo(i).into(), LISTEN_PORT).to_string();
            if let Some(i) = (0..SILOS).find(|&i| listen(i) == silo.address) {
                hosted[i] += 1;
            }
        }
    }
    (0..SILOS).rev().max_by_key(|&i| hosted[i]).unwrap_or(0)
}

/// One run: the cluster, the load, the schedule, the checks.
async fn chaos(machine: Machine, etcd: Option<SocketAddr>) -> Result<(), String> {
    let seed = std::env::var("GRANARY_CHAOS_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |since| since.as_nanos() as u64)
        });
    let membership = if etcd.is_some() { "etcd" } else { "gossip" };
    let schedule = Schedule::draw(seed, SILOS);
    println!("chaos ({membership}): seed {seed} (GRANARY_CHAOS_SEED={seed} replays it)");
    println!("chaos ({membership}): schedule {schedule}");

    let dir = tempfile::Builder::new()
        .prefix("granary-chaos-")
        .tempdir()
        .map_err(|err| format!("a folder: {err}"))?;
    // The silos' logs and files are kept when the run fails, however.
    run(machine, etcd, seed, &schedule, membership, dir.path())
        .await
        .map_err(|failure| {
            format!(
                "{failure} (seed {seed}); the silos' logs are in {}",
                dir.keep().display()
            )
        })
}

/// A silo that stopped serving on purpose (its lease lost, or declared
/// dead while it was paused or cut off) exits; the harness restarts it, as
/// its supervisor would. Any other exit is a crash.
fn supervise(
    silos: &mut [silos::Silo],
    after: &str,
    rejoined: &mut Vec<String>,
    crashes: &mut Vec<String>,
) -> Result<(), String> {
    for (i, silo) in silos.iter_mut().enumerate() {
        if let Some(status) = silo.exited() {
            if silo.stopped_serving() {
                rejoined.push(format!("silo {i} after {after}"));
            } else {
                crashes.push(format!(
                    "silo {i} exited on its own ({status}) after {after}"
                ));
            }
            silo.start()?;
        }
    }
    Ok(())
}

async fn run(
    machine: Machine,
    etcd: Option<SocketAddr>,
    seed: u64,
    schedule: &Schedule,
    membership: &str,
    dir: &std::path::Path,
) -> Result<(), String> {
    let net = tokio::task::block_in_place(|| net::Net::create(SILOS))?;
    let host = net.host();
    let (url, server) = &machine.postgres;
    let postgres = relay::Relay::start(SocketAddr::new(host.into(), 0), *server)
        .await
        .map_err(|err| format!("the PostgreSQL relay: {err}"))?;
    let relayed_url = match authority(url) {
        Some(authority) => url.replacen(authority, &postgres.address.to_string(), 1),
        None => return Err(format!("cannot read host:port in {url}")),
    };
    let etcd_relay = match etcd {
        Some(server) => Some(
            relay::Relay::start(SocketAddr::new(host.into(), 0), server)
                .await
                .map_err(|err| format!("the etcd relay: {err}"))?,
        ),
        None => None,
    };
    let cluster = format!("chaos-{membership}-{}", std::process::id());
    let file = |listen: String, gossip: SocketAddr, devices: DevicesFile| NodeFile {
        cluster: cluster.clone(),
        secret: SECRET.into(),
        listen,
        gossip,
        seeds: (0..SILOS)
            .map(|i| SocketAddr::new(net.silo(i).into(), GOSSIP_PORT).to_string())
            .collect(),
        gossip_interval_ms: Some(100),
        phi_threshold: None,
        death_grace_ms: Some(2000),
        storage: StorageFile::Postgres {
            url: relayed_url.clone(),
        },
        devices,
        etcd: etcd_relay.as_ref().map(|relay| EtcdFile {
            endpoints: vec![format!("http://{}", relay.address)],
            ttl_secs: Some(5),
            ca: None,
            cert: None,
            key: None,
            user: None,
            password: None,
        }),
        admin: None,
        drain_grace_secs: Some(20),
        limits: None,
        tls: None,
        rebalance: None,
    };
    let mut silos = Vec::new();
    for i in 0..SILOS {
        let path = dir.join(format!("silo-{i}.toml"));
        file(
            SocketAddr::new(net.silo(i).into(), LISTEN_PORT).to_string(),
            SocketAddr::new(net.silo(i).into(), GOSSIP_PORT),
            DevicesFile::default(),
        )
        .save(&path)
        .map_err(|err| err.to_string())?;
        let mut silo = silos::Silo::new(&net, i, path, dir);
        silo.start()?;
        silos.push(silo);
    }
    let gossip = std::net::UdpSocket::bind(SocketAddr::new(host.into(), 0))
        .and_then(|socket| socket.local_addr())
        .map_err(|err| format!("a gossip port for the client: {err}"))?;
    let me = file(
        format!("{host}:0"),
        gossip,
        DevicesFile {
            none: true,
            ..DevicesFile::default()
        },
    );
    let node = start_node(&me, &DemoGrains::default())
        .await
        .map_err(|err| format!("the client node: {err}"))?;
    let formed = Instant::now();
    while node.members().len() < SILOS + 1 {
        if formed.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "the cluster did not form: {} of {} members",
                node.members().len(),
                SILOS + 1,
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Counters of this run's own, keyed from the clock.
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
        * 1000;
    until_reachable(&node, base, RECOVERY_BOUND)
        .await
        .ok_or("the counters did not answer before any fault")?;

    let load = Arc::new(Load {
        started: Instant::now(),
        base,
        ops: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    });
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| tokio::spawn(client(node.clone(), load.clone(), n)))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut recoveries: Vec<Injected> = Vec::new();
    let mut crashes = Vec::new();
    let mut rejoined = Vec::new();
    let mut previous = "the start".to_string();
    for drawn in schedule.faults() {
        // A silo that left after the last fault healed is back first, so
        // that this one strikes a running silo.
        supervise(&mut silos, &previous, &mut rejoined, &mut crashes)?;
        let fault = &drawn.aim(busiest(&node, &net, base));
        previous = fault.to_string();
        println!(
            "chaos ({membership}): {:>6.1} s: {fault}",
            load.started.elapsed().as_secs_f64()
        );
        let began_us = load.now_us();
        fault
            .inject(
                &net,
                &mut silos,
                &postgres,
                etcd_relay.as_ref(),
                &machine.postgres_cluster,
            )
            .await?;
        let healed_us = load.now_us();
        let recovered = until_reachable(&node, base, RECOVERY_BOUND).await;
        println!(
            "chaos ({membership}): {:>6.1} s: healed; every counter answered {}",
            load.started.elapsed().as_secs_f64(),
            recovered.map_or("NOT within the bound".to_string(), |d| format!(
                "after {d:.1?}"
            ))
        );
        recoveries.push(Injected {
            fault: fault.clone(),
            began_us,
            healed_us,
            recovered,
        });
        supervise(&mut silos, &previous, &mut rejoined, &mut crashes)?;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    load.stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.await;
    }
    // A silo that stops serving a moment after the last fault (a paused
    // silo notices when resumed) is restarted too; then every member must
    // be back in the view.
    tokio::time::sleep(Duration::from_secs(2)).await;
    supervise(&mut silos, &previous, &mut rejoined, &mut crashes)?;
    let back = Instant::now();
    while node.members().len() < SILOS + 1 && back.elapsed() < RECOVERY_BOUND {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every counter's count, read from storage through the cluster.
    let mut finals = BTreeMap::new();
    for grain in 0..COUNTERS {
        let began = Instant::now();
        while began.elapsed() < RECOVERY_BOUND {
            if let Ok(Ok(Ok(count))) = tokio::time::timeout(
                Duration::from_secs(2),
                node.grain::<Counter>(base + grain).call(Get),
            )
            .await
            {
                finals.insert(grain, count.value);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let ops = std::mem::take(&mut *load.ops.lock().unwrap_or_else(|p| p.into_inner()));
    let summary = history::check(&ops, &finals);
    let members = node.members().len();

    let report = faults::report(
        membership,
        seed,
        load.started.elapsed(),
        &ops,
        &summary,
        &recoveries,
        &crashes,
        &rejoined,
        members,
        SILOS + 1,
    );
    println!("{report}");
    if let Ok(path) = std::env::var("GRANARY_CHAOS_REPORT") {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(report.as_bytes()))
            .map_err(|err| format!("{path}: {err}"))?;
    }
    let _ = node.leave().await;
    let unrecovered = recoveries.iter().filter(|r| r.recovered.is_none()).count();
    if !summary.anomalies.is_empty()
        || unrecovered > 0
        || !crashes.is_empty()
        || members != SILOS + 1
    {
        return Err(format!(
            "{} anomalies, {unrecovered} faults not recovered from within {RECOVERY_BOUND:?}, {} crashes, \
             {members} of {} members at the end",
            summary.anomalies.len(),
            crashes.len(),
            SILOS + 1,
        ));
    }
    Ok(())
}
