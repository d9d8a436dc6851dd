//! The demo's run: silo processes started from node files, the load, the
//! kill, and the checks afterwards.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use granary_actors::GrainKey;
use granary_cluster::{ClusterNode, ClusterSecret};

use super::DemoGrains;
use super::grains::{
    AUDITOR, AUDITORS, Apply, Audit, Auditor, Inspect, Inspector, LEDGER, Ledger, Read,
    SiloActivity, auditor_of,
};
use super::rebalance::STEP_DEADLINE;
use super::report::ClusterDemoReport;
use crate::node_file::{
    DeviceBackend, DevicesFile, EtcdFile, NodeFile, NodeRunError, RebalanceFile, Signals,
    StorageFile, TlsFile, start_node,
};

/// How a multi-node demo runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterDemoConfig {
    /// Silo processes (at least 2: one is killed).
    pub nodes: u32,
    /// Ledgers driven.
    pub grains: u32,
    /// Sequential calls per ledger.
    pub calls: u32,
    /// The silos' device backend.
    pub backend: DeviceBackend,
    /// etcd endpoints: membership and the directory in etcd instead of
    /// gossip (a build with the `etcd` feature).
    pub etcd: Option<Vec<String>>,
}

impl Default for ClusterDemoConfig {
    fn default() -> ClusterDemoConfig {
        ClusterDemoConfig {
            nodes: 3,
            grains: 48,
            calls: 40,
            backend: DeviceBackend::Cpu,
            etcd: None,
        }
    }
}

/// The demo's grace before a silent silo is declared dead, in
/// milliseconds (the default is 4000).
const DEMO_DEATH_GRACE_MS: u64 = 500;

/// A free local port for TCP and one for UDP.
fn free_ports() -> Result<(u16, u16), NodeRunError> {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(|err| NodeRunError(format!("no free port: {err}")))?;
    let udp = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|socket| socket.local_addr())
        .map_err(|err| NodeRunError(format!("no free port: {err}")))?;
    Ok((tcp.port(), udp.port()))
}

/// Has the silo `command` starts killed (SIGKILL) when this process ends
/// by any means, SIGKILL included, where [`Children`]'s drop cannot run.
/// Linux ties the parent-death signal to the thread that forks; the demo
/// starts its silos from the thread that runs it (`block_on`'s), which
/// lives as long as the run.
fn die_with_parent(command: &mut std::process::Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before `exec`. It
        // calls only async-signal-safe functions (`prctl`, `getppid`,
        // `_exit`), allocates nothing (an OS error is a code), and reads
        // only the integer it captured by value.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before the signal was asked for.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// Kills the child processes when dropped, whatever happens.
struct Children(Vec<(std::process::Child, String)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (child, _) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A demo cluster on loopback: its folder (node files, the SQLite file
/// of grain state, the CA, the silos' logs), its secret, and the silo
/// processes it started, killed when it is dropped.
pub(super) struct DemoCluster {
    dir: std::path::PathBuf,
    cluster: String,
    secret: String,
    tls: TlsFile,
    storage: StorageFile,
    etcd: Option<EtcdFile>,
    exe: std::path::PathBuf,
    seed: Option<SocketAddr>,
    /// Every node's grace before a silent silo is declared dead (`None`:
    /// the default).
    death_grace_ms: Option<u64>,
    children: Children,
    /// Each silo's address and device memory in MiB, in start order.
    pub(super) silos: Vec<(String, u64)>,
}

impl DemoCluster {
    /// A fresh folder only this user may enter (its node files hold the
    /// run's secret; kept, with the silos' logs, if the run fails), a
    /// secret and a CA of this run's own: every silo talks to every other
    /// over mutual TLS, each with a certificate for 127.0.0.1.
    pub(super) fn new(
        etcd: Option<&Vec<String>>,
        death_grace_ms: Option<u64>,
    ) -> Result<DemoCluster, NodeRunError> {
        let dir = tempfile::Builder::new()
            .prefix("granary-demo-")
            .tempdir()
            .map_err(|err| NodeRunError(format!("the demo's folder: {err}")))?
            .keep();
        let storage = StorageFile::Sqlite {
            path: dir.join("grains.sqlite"),
        };
        let secret = ClusterSecret::generate_hex().map_err(|err| NodeRunError(err.to_string()))?;
        let certs = crate::certs::write_certs(&dir.join("certs"), &["127.0.0.1".to_string()])?;
        let tls = certs
            .nodes
            .first()
            .map(|(_, tls)| tls.clone())
            .ok_or_else(|| NodeRunError("no certificate was made".into()))?;
        // Under etcd, a cluster name of this run's own: keys of an earlier
        // run (its leases expiring) are not this cluster's.
        let cluster = match etcd {
            Some(_) => format!("demo-{}", std::process::id()),
            None => "demo".to_string(),
        };
        let etcd = etcd.map(|endpoints| EtcdFile {
            endpoints: endpoints.clone(),
            ttl_secs: Some(2),
            ca: None,
            cert: None,
            key: None,
            user: None,
            password: None,
        });
        Ok(DemoCluster {
            dir,
            cluster,
            secret,
            tls,
            storage,
            etcd,
            exe: std::env::current_exe().map_err(|err| NodeRunError(err.to_string()))?,
            seed: None,
            death_grace_ms,
            children: Children(Vec::new()),
            silos: Vec::new(),
        })
    }

    /// The folder, for messages that point at the silos' logs.
    pub(super) fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// A node file of this cluster on fresh loopback ports, hosting
    /// `devices`; the first one made is every later one's seed.
    fn file(
        &mut self,
        devices: DevicesFile,
        listen: Option<String>,
    ) -> Result<NodeFile, NodeRunError> {
        let (tcp, udp) = free_ports()?;
        let gossip = SocketAddr::from(([127, 0, 0, 1], udp));
        let seed = *self.seed.get_or_insert(gossip);
        Ok(NodeFile {
            cluster: self.cluster.clone(),
            secret: self.secret.clone(),
            listen: listen.unwrap_or_else(|| format!("127.0.0.1:{tcp}")),
            gossip,
            seeds: vec![seed.to_string()],
            gossip_interval_ms: Some(100),
            phi_threshold: None,
            death_grace_ms: self.death_grace_ms,
            storage: self.storage.clone(),
            devices,
            etcd: self.etcd.clone(),
            admin: None,
            drain_grace_secs: None,
            limits: None,
            tls: Some(self.tls.clone()),
            rebalance: None,
        })
    }

    /// Starts `granary node` for a silo lending `memory` MiB of `backend`,
    /// with `rebalance` if given; returns its address.
    pub(super) fn start_silo(
        &mut self,
        backend: DeviceBackend,
        memory: u64,
        rebalance: Option<RebalanceFile>,
    ) -> Result<String, NodeRunError> {
        let n = self.silos.len();
        let mut file = self.file(
            DevicesFile {
                backend,
                memory_mib: Some(memory),
                none: false,
            },
            None,
        )?;
        file.rebalance = rebalance;
        let path = self.dir.join(format!("node-{n}.toml"));
        file.save(&path)?;
        let log = std::fs::File::create(self.dir.join(format!("node-{n}.log")))
            .map_err(|err| NodeRunError(format!("node {n}'s log: {err}")))?;
        let mut command = std::process::Command::new(&self.exe);
        command
            .arg("node")
            .arg("--config")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(log);
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .map_err(|err| NodeRunError(format!("starting node {n}: {err}")))?;
        self.children.0.push((child, file.listen.clone()));
        self.silos.push((file.listen.clone(), memory));
        Ok(file.listen)
    }

    /// Joins this process to the cluster, with no devices: it routes and
    /// hosts no ledger.
    pub(super) async fn join(&mut self) -> Result<ClusterNode, NodeRunError> {
        let devices = DevicesFile {
            none: true,
            ..DevicesFile::default()
        };
        let me = self.file(devices, Some("127.0.0.1:0".into()))?;
        start_node(&me, &DemoGrains::default()).await
    }

    /// Waits until `node` sees every silo started so far, each with its
    /// devices, and itself.
    pub(super) async fn formed(&self, node: &ClusterNode) -> Result<(), NodeRunError> {
        let silos = self.silos.len();
        let expected = silos + 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let members = node.members();
            let with_devices = members
                .iter()
                .filter(|m| !m.load.devices.is_empty())
                .count();
            if members.len() == expected && with_devices == silos {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(NodeRunError(format!(
                    "the cluster did not form: {} of {expected} silos seen, {with_devices} of \
                     {silos} with devices; the silos' logs are in {}",
                    members.len(),
                    self.dir.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills (SIGKILL) the silo at `listen`.
    pub(super) fn kill(&mut self, listen: &str) {
        if let Some((child, _)) = self.children.0.iter_mut().find(|(_, at)| at == listen) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Finishes the run: removes the folder if every check `passed`, else
    /// keeps it and says where, for the silos' logs.
    fn finish_if(self, passed: bool) {
        if passed {
            if let Err(err) = self.finish() {
                eprintln!("granary demo: the demo's folder {err}");
            }
        } else {
            eprintln!(
                "granary demo: the silos' logs are kept in {}",
                self.dir().display()
            );
        }
    }

    /// Stops every silo and removes the folder; says where it is if it
    /// could not be removed.
    fn finish(self) -> Result<(), String> {
        let dir = self.dir.clone();
        drop(self);
        std::fs::remove_dir_all(&dir)
            .map_err(|err| format!("{} could not be removed: {err}", dir.display()))
    }

    /// Runs `demo` on this cluster until it ends or a signal comes: a
    /// report that `passed` removes the folder, one that did not or an
    /// error keeps it (the silos' logs), and a signal stops every silo and
    /// removes the folder (`interrupted`).
    pub(super) async fn run<R>(
        mut self,
        signals: &mut Signals,
        demo: impl AsyncFnOnce(&mut DemoCluster) -> Result<R, NodeRunError>,
        passed: impl FnOnce(&R) -> bool,
    ) -> Result<R, NodeRunError> {
        let report = tokio::select! {
            report = demo(&mut self) => Some(report),
            () = interrupted(signals) => None,
        };
        let Some(report) = report else {
            return Err(self.interrupted());
        };
        let report = report?;
        self.finish_if(passed(&report));
        Ok(report)
    }

    /// Ends a run that a signal interrupted: every silo stopped and the
    /// folder removed, as after a run that passed.
    fn interrupted(self) -> NodeRunError {
        NodeRunError(match self.finish() {
            Ok(()) => {
                "interrupted by a signal: every silo was stopped and the demo's folder removed"
                    .into()
            }
            Err(err) => {
                format!("interrupted by a signal: every silo was stopped; the folder {err}")
            }
        })
    }
}

/// The next SIGTERM or SIGINT; never, if they cannot be listened for.
async fn interrupted(signals: &mut Signals) {
    if signals.next().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Runs the multi-node demo (see the module docs); `progress` gets the
/// number of calls acknowledged so far. Drive it from a thread that
/// outlives the run (`Runtime::block_on`'s caller): on Linux its silos
/// die with that thread (the module docs).
pub async fn run_cluster_demo(
    config: ClusterDemoConfig,
    progress: impl Fn(u64) + Send + Sync + 'static,
) -> Result<ClusterDemoReport, NodeRunError> {
    if config.nodes < 2 || config.grains == 0 || config.calls < 2 {
        return Err(NodeRunError(
            "the demo needs at least 2 nodes, 1 grain and 2 calls".into(),
        ));
    }
    let mut signals = Signals::new()?;
    // The demo kills a silo on purpose: fail over within a second or two
    // rather than the default grace's six.
    let cluster = DemoCluster::new(config.etcd.as_ref(), Some(DEMO_DEATH_GRACE_MS))?;
    cluster
        .run(
            &mut signals,
            async move |cluster: &mut DemoCluster| demo(cluster, config, progress).await,
            ClusterDemoReport::passed,
        )
        .await
}

/// The demo on `cluster` once it is made: its silos, the load, the kill
/// and the checks.
async fn demo(
    cluster: &mut DemoCluster,
    config: ClusterDemoConfig,
    progress: impl Fn(u64) + Send + Sync + 'static,
) -> Result<ClusterDemoReport, NodeRunError> {
    // A failure from here on names the folder it leaves, with the silos'
    // logs.
    let kept = |dir: &std::path::Path| {
        let dir = dir.display().to_string();
        move |err: NodeRunError| NodeRunError(format!("{} (the silos' logs are in {dir})", err.0))
    };
    for n in 0..config.nodes {
        // Different memory per silo (128, 192, 256 MiB, ... in a rotated
        // order), so placement has a choice to make.
        let memory = 128 + 64 * u64::from((n + 1) % config.nodes);
        cluster
            .start_silo(config.backend, memory, None)
            .map_err(kept(cluster.dir()))?;
    }
    let node = cluster.join().await.map_err(kept(cluster.dir()))?;
    cluster.formed(&node).await.map_err(kept(cluster.dir()))?;
    let silos = cluster.silos.clone();

    if std::env::var_os("GRANARY_DEMO_DEBUG").is_some() {
        let watched = node.clone();
        tokio::spawn(async move {
            loop {
                let members: Vec<String> = watched
                    .members()
                    .iter()
                    .map(|m| m.silo.to_string())
                    .collect();
                eprintln!("view: {members:?}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let progress = Arc::new(progress);
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let retried = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let notified = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let crossed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let halfway = Arc::new(tokio::sync::Barrier::new(config.grains as usize + 1));
    let started = Instant::now();
    let drivers: Vec<_> = (0..config.grains)
        .map(|grain| {
            let (node, progress, done, retried, halfway) = (
                node.clone(),
                progress.clone(),
                done.clone(),
                retried.clone(),
                halfway.clone(),
            );
            let (notified, crossed) = (notified.clone(), crossed.clone());
            let calls = config.calls;
            tokio::spawn(async move {
                let ledger = node.grain::<Ledger>(u64::from(grain));
                let mut latencies = Vec::with_capacity(calls as usize);
                let half = u64::from(calls / 2) + 1;
                for seq in 1..=u64::from(calls) {
                    if seq == half {
                        halfway.wait().await;
                    }
                    let apply = Apply { seq, amount: seq };
                    // From the first try: a call retried through the
                    // failover took all of it.
                    let sent = Instant::now();
                    loop {
                        match ledger.call(apply).await {
                            Ok(Ok(applied)) if applied.state.applied >= seq => {
                                latencies.push(sent.elapsed());
                                if let Some(notice) = applied.notified {
                                    notified.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    if notice.crossed() {
                                        crossed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    }
                                }
                                break;
                            }
                            // A step unanswered for this long is lost, and
                            // said so (a ledger no survivor has room for),
                            // rather than retried forever. A caller that
                            // gives up before halfway still arrives there:
                            // the barrier counts every one.
                            other if sent.elapsed() > STEP_DEADLINE => {
                                if seq < half {
                                    halfway.wait().await;
                                }
                                let lost = format!(
                                    "ledger {grain}: step {seq} not acknowledged in \
                                     {STEP_DEADLINE:?}: {other:?}"
                                );
                                return (latencies, Some(lost));
                            }
                            other => {
                                if std::env::var_os("GRANARY_DEMO_DEBUG").is_some() {
                                    eprintln!("ledger {grain} seq {seq}: {other:?}");
                                }
                                retried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                    let now = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    progress(now);
                }
                (latencies, None)
            })
        })
        .collect();
    // Halfway: every ledger is placed; kill the silo hosting the most.
    halfway.wait().await;
    let before = placement(&node, config.grains, &silos);
    let killed = before
        .iter()
        .max_by_key(|(_, count)| *count)
        .map(|(silo, _)| silo.clone())
        .unwrap_or_default();
    cluster.kill(&killed);
    let mut latencies = Vec::new();
    let mut lost = Vec::new();
    // The ledgers whose callers gave up on a step, reported once, as that.
    let mut gave_up = std::collections::HashSet::new();
    for (grain, driver) in (0..config.grains).zip(drivers) {
        let (answered, unacknowledged) = driver
            .await
            .map_err(|err| NodeRunError(format!("a caller failed: {err}")))
            .map_err(kept(cluster.dir()))?;
        latencies.extend(answered);
        if let Some(step) = unacknowledged {
            lost.push(step);
            gave_up.insert(u64::from(grain));
        }
    }
    let elapsed = started.elapsed();
    // Every ledger must hold every acknowledged call: the sum 1..=calls.
    let want = u64::from(config.calls) * (u64::from(config.calls) + 1) / 2;
    for grain in (0..config.grains).filter(|grain| !gave_up.contains(&u64::from(*grain))) {
        match node.grain::<Ledger>(u64::from(grain)).call(Read).await {
            Ok(state) if state.total == want && state.applied == u64::from(config.calls) => {}
            Ok(state) => lost.push(format!("ledger {grain}: {state:?}")),
            Err(err) => lost.push(format!("ledger {grain}: {err}")),
        }
    }
    // Every auditor must count every step of each of its ledgers: each
    // was acknowledged (the ledger answers only after its auditor did).
    let auditors = AUDITORS.min(u64::from(config.grains));
    let mut audit_lost = Vec::new();
    for auditor in 0..auditors {
        match node.grain::<Auditor>(auditor).call(Audit).await {
            Ok(audit) => {
                for ledger in (0..u64::from(config.grains))
                    .filter(|l| auditor_of(*l) == auditor && !gave_up.contains(l))
                {
                    let entry = audit.ledgers.get(&ledger).copied().unwrap_or_default();
                    let calls = u64::from(config.calls);
                    if entry.notes != calls || entry.last_seq != calls {
                        audit_lost.push(format!("auditor {auditor}, ledger {ledger}: {entry:?}"));
                    }
                }
            }
            Err(err) => audit_lost.push(format!("auditor {auditor}: {err}")),
        }
    }
    // Where each ledger answered that last read from.
    let after = placement(&node, config.grains, &silos);
    let (census, duplicates) = census(&node, &silos, &killed, config.grains, auditors).await;
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    let report = ClusterDemoReport {
        silos,
        before,
        after,
        killed,
        calls: latencies.len() as u64,
        retried: retried.load(std::sync::atomic::Ordering::Relaxed),
        p50: at(0.5),
        p99: at(0.99),
        elapsed,
        lost,
        notified: notified.load(std::sync::atomic::Ordering::Relaxed),
        crossed: crossed.load(std::sync::atomic::Ordering::Relaxed),
        audit_lost,
        census,
        duplicates,
    };
    let _ = node.leave().await;
    Ok(report)
}

/// Each live silo's activations, asked of the inspector placed on it, and
/// this process's own; with the ledgers and auditors active on more than
/// one silo (and silos that did not answer).
pub(super) async fn census(
    node: &ClusterNode,
    silos: &[(String, u64)],
    killed: &str,
    ledgers: u32,
    auditors: u64,
) -> (Vec<SiloActivity>, Vec<String>) {
    let inspect = Inspect {
        ledgers: u64::from(ledgers),
        auditors,
    };
    let mut census = Vec::new();
    let mut problems = Vec::new();
    for (silo, _) in silos.iter().filter(|(silo, _)| silo != killed) {
        match node.grain::<Inspector>(silo.as_str()).call(inspect).await {
            Ok(Ok(activity)) => census.push(activity),
            Ok(Err(err)) => problems.push(format!("census of {silo}: {err}")),
            Err(err) => problems.push(format!("census of {silo}: {err}")),
        }
    }
    census.push(SiloActivity {
        silo: format!("{} (this client)", node.id().address),
        live: node.silo().live_activations(),
        ledgers: (0..u64::from(ledgers))
            .filter(|key| node.silo().is_active_named(LEDGER, &GrainKey::U64(*key)))
            .collect(),
        auditors: (0..auditors)
            .filter(|key| node.silo().is_active_named(AUDITOR, &GrainKey::U64(*key)))
            .collect(),
        ring_round_trip_us: None,
    });
    for (grain_type, keys, of) in [
        (
            LEDGER,
            u64::from(ledgers),
            (|silo: &SiloActivity| &silo.ledgers) as fn(&SiloActivity) -> &Vec<u64>,
        ),
        (AUDITOR, auditors, |silo: &SiloActivity| &silo.auditors),
    ] {
        for key in 0..keys {
            let homes: Vec<&str> = census
                .iter()
                .filter(|silo| of(silo).contains(&key))
                .map(|silo| silo.silo.as_str())
                .collect();
            if homes.len() > 1 {
                problems.push(format!("{grain_type} {key} on {}", homes.join(" and ")));
            }
        }
    }
    (census, problems)
}

/// Ledgers per silo, from where this node last found each.
fn placement(node: &ClusterNode, grains: u32, silos: &[(String, u64)]) -> Vec<(String, usize)> {
    silos
        .iter()
        .map(|(silo, _)| {
            let count = (0..grains)
                .filter(|grain| {
                    node.location(LEDGER, GrainKey::U64(u64::from(*grain)))
                        .is_some_and(|home| home.address == *silo)
                })
                .count();
            (silo.clone(), count)
        })
        .collect()
}
