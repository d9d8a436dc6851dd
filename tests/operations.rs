//! Operating a cluster of real `granary node` processes on loopback, as
//! `cargo test --test operations` runs it:
//!
//! - a node drained by SIGTERM under load loses no acknowledged write, and
//!   one whose drain outlasts its grace exits with an error;
//! - the metrics scrape serves every family an operator needs, the admin
//!   token guards every path, and the Grafana dashboard in
//!   `samples/deploy/` queries only names a node serves;
//! - a persistent kernel that hangs (the CPU backend's test hook, armed
//!   through `GRANARY_TEST_KERNEL_HANG`) makes its node unready until the
//!   bridge has relaunched it, and its JSON log (`--log-format json`)
//!   reports the hang with its fields;
//! - a node out of file descriptors under a flood of silent connections
//!   accepts again once it is over;
//! - the dashboard, rendered by a headless Chromium, shows the cluster and
//!   follows it when a node dies. Where no Chromium and chromedriver are
//!   installed, that test reports as ignored and says why.
//!
//! The tests run under `libtest-mimic` (`harness = false`), which decides
//! at run time whether the browser is there.

#[path = "operations/browser.rs"]
mod browser;
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use granary::cluster::ClusterNode;
use granary::cluster_demo::{Apply, DemoGrains, Inspect, Inspector, Ledger, Read};
use granary::node_file::{
    AdminFile, DevicesFile, NodeFile, StorageFile, TEST_KERNEL_HANG, start_node,
};
use libtest_mimic::{Arguments, Failed, Trial};

const SECRET: &str = "c3d07e19a84b62f5e1093dd7a6452b8c0f9e31d4b7a8265c90e1f3ab46d7c128";
const LEDGERS: u64 = 24;
const TOKEN: &str = "operations-admin-token";

fn main() {
    let mut args = Arguments::from_args();
    // One at a time unless asked otherwise: each test runs its own
    // processes against timing bounds, and CI has two cores.
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    let browser = browser::available();
    if let Err(why) = &browser {
        eprintln!("browser: SKIPPED: the dashboard test is reported as ignored: {why}");
    }
    let trials = vec![
        trial(
            "sigterm_drains_a_node_under_load_and_no_acknowledged_write_is_lost",
            || on_tokio(sigterm_drains_a_node_under_load_and_no_acknowledged_write_is_lost()),
        ),
        trial(
            "a_drain_past_its_grace_ends_the_run_with_an_error",
            a_drain_past_its_grace_ends_the_run_with_an_error,
        ),
        trial(
            "the_scrape_serves_every_family_and_the_token_guards_every_path",
            || on_tokio(the_scrape_serves_every_family_and_the_token_guards_every_path()),
        ),
        trial(
            "a_flood_of_silent_connections_does_not_stop_a_silo_accepting",
            || on_tokio(a_flood_of_silent_connections_does_not_stop_a_silo_accepting()),
        ),
        trial(
            "a_hung_kernel_makes_its_node_unready_until_it_is_relaunched",
            || on_tokio(a_hung_kernel_makes_its_node_unready_until_it_is_relaunched()),
        ),
        trial("the_dashboard_shows_the_cluster_in_a_browser", move || {
            // Run with --include-ignored where there is no browser: fails,
            // saying why, rather than passing without running.
            let (chromium, driver) = browser::available()
                .unwrap_or_else(|why| panic!("no browser to run the dashboard test: {why}"));
            on_tokio(the_dashboard_shows_the_cluster_in_a_browser(
                chromium, driver,
            ));
        })
        .with_ignored_flag(browser.is_err()),
    ];
    libtest_mimic::run(&args, trials).exit();
}

/// A test whose body panics to fail (libtest-mimic reports the panic).
fn trial(name: &'static str, body: impl FnOnce() + Send + 'static) -> Trial {
    Trial::test(name, move || {
        body();
        Ok::<(), Failed>(())
    })
}

/// Runs an async test body on a two-worker tokio runtime.
fn on_tokio(body: impl std::future::Future<Output = ()>) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime for the test")
        .block_on(body);
}

/// Kills the processes left when dropped, whatever happens.
struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[path = "../build-support/test_ports.rs"]
mod test_ports;

/// A loopback port for a child node's listener (`build-support/test_ports.rs`).
fn free_tcp() -> u16 {
    test_ports::free_port()
}

/// A loopback address for a child node's gossip.
fn free_udp() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], test_ports::free_port()))
}

fn node_file(cluster: &str, storage: &Path, seed: SocketAddr, gossip: SocketAddr) -> NodeFile {
    NodeFile {
        cluster: cluster.into(),
        secret: SECRET.into(),
        listen: format!("127.0.0.1:{}", free_tcp()),
        gossip,
        seeds: vec![seed.to_string()],
        gossip_interval_ms: Some(100),
        phi_threshold: None,
        death_grace_ms: Some(1500),
        storage: StorageFile::Sqlite {
            path: storage.to_path_buf(),
        },
        devices: DevicesFile {
            memory_mib: Some(128),
            ..DevicesFile::default()
        },
        etcd: None,
        admin: None,
        drain_grace_secs: Some(20),
        limits: None,
        tls: None,
        rebalance: None,
    }
}

/// `count` `granary node` processes with admin endpoints on loopback, one
/// SQLite file between them, and this process joined as a client that
/// hosts nothing.
struct Cluster {
    /// Declared first: the processes are killed before the directory goes.
    nodes: Nodes,
    client: ClusterNode,
    admins: Vec<SocketAddr>,
    /// Each node's silo address (`listen`).
    silos: Vec<String>,
    token: Option<&'static str>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts the nodes (node `n` with the environment `env` names for it,
    /// each with at most `nofile` open files if given, logging in JSON
    /// unless `text_log`) and waits until every one has joined and is
    /// ready.
    async fn start(
        name: &str,
        count: usize,
        token: Option<&'static str>,
        env: &[(usize, &str, &str)],
        nofile: Option<u64>,
        text_log: bool,
    ) -> Cluster {
        let dir = tempfile::tempdir().expect("a directory");
        let storage = dir.path().join("grains.sqlite");
        let cluster = format!("{name}-{}", std::process::id());
        let seed = free_udp();
        let mut nodes = Nodes(Vec::new());
        let mut admins = Vec::new();
        let mut silos = Vec::new();
        for n in 0..count {
            let gossip = if n == 0 { seed } else { free_udp() };
            let mut file = node_file(&cluster, &storage, seed, gossip);
            let admin: SocketAddr = ([127, 0, 0, 1], free_tcp()).into();
            file.admin = Some(AdminFile {
                listen: admin,
                token: token.map(str::to_string),
            });
            let path = dir.path().join(format!("node-{n}.toml"));
            file.save(&path).expect("written");
            let log =
                std::fs::File::create(dir.path().join(format!("node-{n}.log"))).expect("a log");
            let mut command = match nofile {
                Some(limit) => {
                    let mut command = Command::new("prlimit");
                    command
                        .arg(format!("--nofile={limit}:{limit}"))
                        .arg(env!("CARGO_BIN_EXE_granary"));
                    command
                }
                None => Command::new(env!("CARGO_BIN_EXE_granary")),
            };
            command
                .arg("node")
                .arg("--config")
                .arg(&path)
                .arg("--log-format")
                .arg(if text_log { "text" } else { "json" })
                .stdout(Stdio::null())
                .stderr(log);
            for (_, key, value) in env.iter().filter(|(node, _, _)| *node == n) {
                command.env(key, value);
            }
            nodes.0.push(command.spawn().expect("the node starts"));
            admins.push(admin);
            silos.push(file.listen.clone());
        }
        let mut me = node_file(&cluster, &storage, seed, free_udp());
        me.listen = "127.0.0.1:0".into();
        me.devices = DevicesFile {
            none: true,
            ..DevicesFile::default()
        };
        let client = start_node(&me, &DemoGrains::default())
            .await
            .expect("the client joins");
        let deadline = Instant::now() + Duration::from_secs(60);
        while client.members().len() < count + 1
            || client
                .members()
                .iter()
                .filter(|member| !member.load.grain_types.is_empty())
                .count()
                < count
        {
            assert!(Instant::now() < deadline, "the cluster never formed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let cluster = Cluster {
            nodes,
            client,
            admins,
            silos,
            token,
            dir,
        };
        for admin in &cluster.admins {
            let deadline = Instant::now() + Duration::from_secs(30);
            while cluster.get(*admin, "/health/ready").await.0 != 200 {
                assert!(Instant::now() < deadline, "{admin} never ready");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        cluster
    }

    /// A GET of the admin endpoint `admin`, with the cluster's token;
    /// status 0 if nothing answers.
    async fn get(&self, admin: SocketAddr, path: &str) -> (u16, String, String) {
        support::get(admin, path, self.token)
            .await
            .unwrap_or_default()
    }

    /// A node's log so far, for failure messages.
    fn log(&self, n: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node-{n}.log"))).unwrap_or_default()
    }
}

/// Sends SIGTERM to `child`.
fn terminate(child: &Child) {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -TERM failed");
}

/// Waits for `child` to exit, at most `within`.
fn exit_within(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("the child's status") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the node did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Drives load on every node: each ledger of `keys` applies a few steps
/// (device memory, storage, grain-to-grain calls) and each node's
/// inspector sends a request through its bridge's ring path.
async fn drive(cluster: &Cluster, keys: std::ops::Range<u64>, steps: u64) {
    for key in keys {
        for seq in 1..=steps {
            let applied = cluster
                .client
                .grain::<Ledger>(key)
                .call(Apply { seq, amount: 1 })
                .await;
            assert!(
                matches!(applied, Ok(Ok(_))),
                "ledger {key} step {seq}: {applied:?}"
            );
        }
    }
    for silo in &cluster.silos {
        inspect(cluster, silo)
            .await
            .unwrap_or_else(|err| panic!("inspecting {silo}: {err}"));
    }
}

/// One ring-path round trip on `silo`, through its inspector.
async fn inspect(cluster: &Cluster, silo: &str) -> Result<u64, String> {
    let activity = cluster
        .client
        .grain::<Inspector>(silo)
        .call(Inspect {
            ledgers: 0,
            auditors: 0,
        })
        .await
        .map_err(|err| err.to_string())??;
    activity
        .ring_round_trip_us
        .ok_or_else(|| format!("{silo} has no bridge"))
}

/// The families an exposition declares (`# TYPE` lines), and each sample's
/// value by its full series name (`name{labels}`).
fn parse(text: &str) -> (Vec<String>, HashMap<String, f64>) {
    let mut families = Vec::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            if let Some(name) = declared.split(' ').next() {
                families.push(name.to_string());
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let (series, value) = line.rsplit_once(' ').expect("a sample line: series value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("a sample value: {line}"));
            samples.insert(series.to_string(), value);
        }
    }
    (families, samples)
}

/// The value of the first sample whose series starts with `prefix` and
/// contains every one of `labels`.
fn value(samples: &HashMap<String, f64>, prefix: &str, labels: &[&str]) -> Option<f64> {
    samples
        .iter()
        .find(|(series, _)| {
            series.starts_with(prefix) && labels.iter().all(|label| series.contains(label))
        })
        .map(|(_, value)| *value)
}

async fn the_scrape_serves_every_family_and_the_token_guards_every_path() {
    let cluster = Cluster::start("scrape", 2, Some(TOKEN), &[], None, false).await;
    drive(&cluster, 0..6, 3).await;
    let admin = cluster.admins[0];

    // The token guards every path, and a refusal reveals nothing.
    for path in [
        "/metrics",
        "/health/ready",
        "/cluster",
        "/",
        "/no-such-path",
    ] {
        for token in [None, Some("wrong-token")] {
            let (status, head, body) = support::get(admin, path, token).await.expect("an answer");
            assert_eq!(status, 401, "{path} with {token:?}: {head}");
            assert!(body.is_empty(), "{path}: a refusal has no body: {body}");
            let head = head.to_ascii_lowercase();
            assert!(
                head.contains("www-authenticate: bearer")
                    && head.contains("www-authenticate: basic"),
                "{head}"
            );
        }
    }
    // A browser's Basic credentials carry the token as their password.
    use base64::Engine;
    let basic = |password: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("operator:{password}"))
        )
    };
    for (credentials, expected) in [(basic(TOKEN), 200), (basic("wrong-token"), 401)] {
        let answer = support::exchange(
            admin,
            "GET",
            "/health/live",
            &[("Authorization", &credentials)],
            "",
        )
        .await
        .expect("an answer");
        assert_eq!(answer.0, expected, "{credentials}: {}", answer.1);
    }

    let (status, _, text) = cluster.get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let (families, samples) = parse(&text);
    let required = [
        // Per grain type.
        "granary_grain_messages_total",
        "granary_grain_failures_total",
        "granary_grain_turn_seconds",
        "granary_grain_activations",
        "granary_grain_activations_started_total",
        "granary_grain_activations_ended_total",
        "granary_grain_mailbox_depth",
        // Per device and persistent kernel.
        "granary_device_memory_total_bytes",
        "granary_device_memory_reserved_bytes",
        "granary_device_memory_free_bytes",
        "granary_device_queue_depth",
        "granary_device_requests_total",
        "granary_device_request_failures_total",
        "granary_device_fallbacks_total",
        "granary_kernel_heartbeat_age_seconds",
        "granary_kernel_ring_occupancy_ratio",
        "granary_kernel_hangs_total",
        "granary_kernel_relaunches_total",
        "granary_kernel_failed",
        "granary_gpu_request_seconds",
        // The cluster.
        "granary_cluster_members",
        "granary_cluster_directory_entries",
        "granary_cluster_homes",
        "granary_cluster_redirects_total",
        "granary_cluster_remote_call_seconds",
        "granary_migration_seconds",
        "granary_migrations_failed_total",
        "granary_rebalance_decisions_total",
        "granary_migrated_bytes_total",
        // Storage and reminders.
        "granary_storage_operations_total",
        "granary_storage_operation_seconds",
        "granary_reminders_due_total",
        "granary_reminders_fired_total",
    ];
    let missing: Vec<&str> = required
        .iter()
        .copied()
        .filter(|name| !families.iter().any(|family| family == name))
        .collect();
    assert!(missing.is_empty(), "families missing: {missing:?}\n{text}");
    // Every family once; every sample belongs to a declared family.
    let mut unique = families.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), families.len(), "a family declared twice");
    for series in samples.keys() {
        let name = series.split('{').next().unwrap_or_default();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| families.iter().any(|family| family == base))
            .unwrap_or(name);
        assert!(
            families.iter().any(|family| family == base),
            "{series} has no # TYPE"
        );
        assert!(
            base.starts_with("granary_"),
            "{series}: not a granary_ name"
        );
        assert!(
            !series.contains("key=") && !series.contains("grain_key="),
            "{series}: a grain key as a label"
        );
    }
    // What the load did shows.
    let ledger = [r#"grain_type="ledger""#];
    assert!(value(&samples, "granary_grain_messages_total", &ledger) >= Some(1.0));
    assert!(value(&samples, "granary_grain_turn_seconds_count", &ledger) >= Some(1.0));
    let double = [r#"kernel="double""#];
    let age = value(&samples, "granary_kernel_heartbeat_age_seconds", &double)
        .expect("the double kernel's heartbeat");
    assert!(age < 1.0, "a running kernel's heartbeat is {age} s old");
    assert_eq!(
        value(&samples, "granary_kernel_hangs_total", &double),
        Some(0.0)
    );
    assert!(value(&samples, "granary_gpu_request_seconds_count", &double) >= Some(1.0));
    assert_eq!(value(&samples, "granary_cluster_members", &[]), Some(3.0));
    // Some node wrote state (placement decides which).
    let mut writes = 0.0;
    for admin in &cluster.admins {
        let (_, _, text) = cluster.get(*admin, "/metrics").await;
        writes += value(
            &parse(&text).1,
            "granary_storage_operations_total",
            &[r#"op="write""#, r#"outcome="done""#],
        )
        .unwrap_or_default();
    }
    assert!(writes >= 1.0, "no state was written");

    // The Grafana dashboard queries only families a node serves.
    let grafana = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/samples/deploy/grafana/granary.json"
    ))
    .expect("the Grafana dashboard");
    let grafana: serde_json::Value = serde_json::from_str(&grafana).expect("JSON");
    let queried = metric_names(&exprs(&grafana).join("\n"));
    assert!(queried.len() > 10, "{queried:?}");
    let unserved: Vec<&String> = queried
        .iter()
        .filter(|name| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            !families
                .iter()
                .any(|family| family == base || family == *name)
        })
        .collect();
    assert!(
        unserved.is_empty(),
        "the Grafana dashboard queries names no node serves: {unserved:?}"
    );
    cluster.client.leave().await.expect("the client leaves");
}

/// Every query (`expr`) in a Grafana dashboard.
fn exprs(value: &serde_json::Value) -> Vec<String> {
    match value {
        serde_json::Value::Object(map) => map
            .iter()
            .flat_map(|(key, value)| match (key.as_str(), value) {
                ("expr", serde_json::Value::String(expr)) => vec![expr.clone()],
                _ => exprs(value),
            })
            .collect(),
        serde_json::Value::Array(values) => values.iter().flat_map(exprs).collect(),
        _ => Vec::new(),
    }
}

/// Every `granary_...` name in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("granary_"))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Issue 15, finding 4: a node whose accept failed (out of file
/// descriptors) stopped accepting for good. Here a node limited to 200
/// open files takes 2,000 silent connections; once they are gone, a silo
/// that never connected to it before reaches it (cluster node rule 10).
async fn a_flood_of_silent_connections_does_not_stop_a_silo_accepting() {
    const SILENT: usize = 2000;
    // This process holds the silent connections: its own limit must allow
    // them (root, as in CI, may raise it; so may most users' hard limits).
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let hard: u64 = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(4))
        .and_then(|hard| hard.parse().ok())
        .unwrap_or(u64::MAX);
    let soft = hard.min(16_384);
    assert!(
        soft > SILENT as u64 + 500,
        "this test needs {} open files, the hard limit is {hard}",
        SILENT + 500
    );
    let raised = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={soft}:{hard}"))
        .status()
        .expect("prlimit runs");
    assert!(
        raised.success(),
        "prlimit could not raise the open-file limit"
    );

    let cluster = Cluster::start("flood", 1, None, &[], Some(200), true).await;
    let silo = cluster.silos[0].clone();
    // All at once, each given 3 s (once the node's backlog is full, the
    // rest wait for it), from 128 loopback addresses: the node takes at
    // most 16 handshakes from one host, so from one address the flood
    // would be closed as it came and never reach the node's file limit.
    let target: std::net::SocketAddr = silo.parse().expect("a socket address");
    let connecting = (0..SILENT).map(|n| {
        let source = std::net::SocketAddr::from(([127, 0, 0, 2 + (n % 128) as u8], 0));
        tokio::time::timeout(Duration::from_secs(3), async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(source)?;
            socket.connect(target).await
        })
    });
    let silent: Vec<tokio::net::TcpStream> = futures_util::future::join_all(connecting)
        .await
        .into_iter()
        .filter_map(|connected| connected.ok()?.ok())
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let opened = silent.len();
    drop(silent);
    // The node ran out of descriptors (so the flood reached what it was
    // meant to) and kept serving.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match inspect(&cluster, &silo).await {
            Ok(_) => break,
            Err(err) => {
                assert!(
                    Instant::now() < deadline,
                    "no silo reaches the node after {opened} silent connections: {err}\n{}",
                    cluster.log(0)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    eprintln!("flood: {opened} of {SILENT} silent connections established; the node accepts again");
    assert!(
        cluster.log(0).contains("accepting a connection failed"),
        "the node never ran out of descriptors ({opened} connections opened):\n{}",
        cluster.log(0)
    );
    // Its log, in text, goes to a file, not a terminal: no colour codes.
    assert!(!cluster.log(0).contains('\u{1b}'), "{}", cluster.log(0));
    cluster.client.leave().await.expect("the client leaves");
}

async fn a_hung_kernel_makes_its_node_unready_until_it_is_relaunched() {
    // Node 0's CPU kernels let 8 requests pass (inspections or probes),
    // then hold the next one without a heartbeat for longer than the
    // bridge waits (its hang timeout, 2 s).
    let cluster = Cluster::start(
        "hang",
        1,
        None,
        &[(0, TEST_KERNEL_HANG, "8:60000")],
        None,
        false,
    )
    .await;
    let (admin, silo) = (cluster.admins[0], cluster.silos[0].clone());
    inspect(&cluster, &silo)
        .await
        .expect("the ring path answers");
    // Ready while the kernel answers its probes (themselves requests that
    // count toward the hang).
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.get(admin, "/health/ready").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "never ready with its kernel launched"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Keep the ring path busy, so the hang comes whether a probe or an
    // inspection takes it.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (client, silo, stop) = (cluster.client.clone(), silo.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let _ = client
                    .grain::<Inspector>(silo.as_str())
                    .call(Inspect {
                        ledgers: 0,
                        auditors: 0,
                    })
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // Ready, then unready because the kernel does not answer its probe,
    // then ready again once the bridge relaunched it.
    let mut seen = vec![true];
    let mut unready_detail = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _, body) = cluster.get(admin, "/health/ready").await;
        let report: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let kernels = report["checks"]
            .as_array()
            .and_then(|checks| checks.iter().find(|check| check["name"] == "kernels"))
            .cloned()
            .unwrap_or_default();
        let ok = status == 200;
        if seen.last() != Some(&ok) {
            seen.push(ok);
            if !ok {
                assert_eq!(kernels["ok"], false, "unready for another reason: {body}");
                unready_detail = kernels["detail"].as_str().unwrap_or_default().to_string();
            }
        }
        if seen == [true, false, true] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readiness went {seen:?}, not ready → unready → ready\n{}",
            cluster.log(0)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        unready_detail.contains("double"),
        "the check names the kernel: {unready_detail}"
    );
    stop.store(true, Ordering::Release);
    traffic.await.expect("the traffic task");
    // The metrics tell the same story.
    let (_, _, text) = cluster.get(admin, "/metrics").await;
    let (_, samples) = parse(&text);
    let double = [r#"kernel="double""#];
    assert_eq!(
        value(&samples, "granary_kernel_hangs_total", &double),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&samples, "granary_kernel_relaunches_total", &double),
        Some(1.0)
    );
    assert_eq!(value(&samples, "granary_kernel_failed", &double), Some(0.0));
    inspect(&cluster, &silo)
        .await
        .expect("the relaunched kernel answers");
    // The node logs in JSON (`--log-format json`): every line an object,
    // the hang among them with its fields.
    let log = cluster.log(0);
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"))
        })
        .collect();
    assert!(
        lines.iter().any(|line| {
            line["level"] == "WARN"
                && line["fields"]["kernel"] == "double"
                && line["fields"]["message"]
                    .as_str()
                    .is_some_and(|message| message.contains("heartbeat stopped"))
        }),
        "no JSON line reports the hang:\n{log}"
    );
    cluster.client.leave().await.expect("the client leaves");
}

async fn the_dashboard_shows_the_cluster_in_a_browser(
    chromium: std::path::PathBuf,
    driver: std::path::PathBuf,
) {
    let mut cluster = Cluster::start("dashboard", 3, None, &[], None, false).await;
    drive(&cluster, 0..9, 2).await;
    let profile = cluster.dir.path().join("chromium-profile");
    let browser = browser::Browser::start(&chromium, &driver, &profile).await;
    browser
        .open(&format!("http://{}/", cluster.admins[0]))
        .await;
    // Read from the rendered page: what an operator sees.
    let shown = r##"
        const text = id => document.getElementById(id).textContent;
        const reserved = [...document.querySelectorAll(".device .bar .seg.reserved")]
            .filter(seg => Number(seg.dataset.bytes) > 0 && parseFloat(seg.style.width) > 0);
        return {
            silos: text("silo-count"),
            rows: document.querySelectorAll("#silos tr.silo").length,
            activations: Number(text("activation-count")),
            ledgers: Number(document.querySelector('#grain-types tr[data-grain-type="ledger"] .activations')?.textContent ?? 0),
            bars: document.querySelectorAll(".device .bar").length,
            reserved: reserved.length,
            lines: document.querySelectorAll("#throughput polyline.series").length,
            peak: Number(document.getElementById("throughput").dataset.peak || 0),
            left: [...document.querySelectorAll("#events li.event-left")].map(li => li.dataset.silo),
            refreshes: Number(document.body.dataset.refreshes || 0),
            error: text("error"),
        };
    "##;
    let deadline = Instant::now() + Duration::from_secs(30);
    let before = loop {
        let page = browser.run(shown).await;
        if page["silos"] == "3"
            && page["rows"] == 3
            && page["activations"].as_f64() > Some(0.0)
            && page["ledgers"].as_f64() > Some(0.0)
            && page["bars"].as_u64() >= Some(3)
            && page["reserved"].as_u64() >= Some(1)
            && page["lines"].as_u64() >= Some(1)
            && page["peak"].as_f64() > Some(0.0)
        {
            break page;
        }
        if Instant::now() >= deadline {
            let view = cluster.get(cluster.admins[0], "/cluster").await.2;
            panic!("the page shows {page}; the view is {view}");
        }
        // Throughput is a rate between two loads a silo published: traffic
        // that all fell before the sampler's first look shows as none, so
        // some flows while the page is watched (a ring-path request on
        // each silo).
        if page["peak"].as_f64() <= Some(0.0) {
            for silo in &cluster.silos {
                let _ = inspect(&cluster, silo).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR"));
    browser
        .screenshot(&shots.join("dashboard-3-silos.png"))
        .await;

    // Kill node 2: the same page, refreshing itself, shows 2 silos once
    // the failure detector has declared it dead.
    let killed = cluster.silos[2].clone();
    cluster.nodes.0[2].kill().expect("the node is killed");
    let _ = cluster.nodes.0[2].wait();
    let killed_at = Instant::now();
    let detection = Duration::from_secs(20);
    let after = loop {
        let page = browser.run(shown).await;
        if page["silos"] == "2" && page["rows"] == 2 {
            break page;
        }
        assert!(
            killed_at.elapsed() < detection,
            "still shows {page} {:?} after the kill",
            killed_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "dashboard: 3 silos shown ({before}); 2 shown {:?} after the kill",
        killed_at.elapsed()
    );
    assert!(
        after["refreshes"].as_u64() > before["refreshes"].as_u64(),
        "the page refreshed itself"
    );
    // The event list says which one left (the sampler notes it within
    // one more sample).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = browser.run(shown).await;
        let left = page["left"].as_array().cloned().unwrap_or_default();
        if left
            .iter()
            .any(|silo| silo.as_str().is_some_and(|silo| silo.starts_with(&killed)))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no event says {killed} left: {page}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    browser
        .screenshot(&shots.join("dashboard-2-silos.png"))
        .await;
    drop(browser);
    cluster.client.leave().await.expect("the client leaves");
}

async fn sigterm_drains_a_node_under_load_and_no_acknowledged_write_is_lost() {
    let mut cluster = Cluster::start("drain", 3, None, &[], None, false).await;
    let (client, admins) = (&cluster.client, &cluster.admins);
    let nodes = &mut cluster.nodes;

    // Load: each ledger applies steps in order, retrying a step until it is
    // acknowledged. Every failure must come back fast and typed.
    let acked: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    let slowest_failure: Arc<Mutex<Duration>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..LEDGERS)
        .map(|key| {
            let (client, acked, slowest, stop) = (
                client.clone(),
                acked.clone(),
                slowest_failure.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut seq = 1;
                while !stop.load(Ordering::Acquire) {
                    let started = Instant::now();
                    match client
                        .grain::<Ledger>(key)
                        .call(Apply { seq, amount: 1 })
                        .await
                    {
                        Ok(Ok(applied)) if applied.state.applied == seq => {
                            acked.lock().expect("not poisoned").insert(key, seq);
                            seq += 1;
                        }
                        _ => {
                            let took = started.elapsed();
                            {
                                let mut slowest = slowest.lock().expect("not poisoned");
                                *slowest = (*slowest).max(took);
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            })
        })
        .collect();
    let total = |acked: &Mutex<HashMap<u64, u64>>| -> u64 {
        acked.lock().expect("not poisoned").values().sum()
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = total(&acked);
    assert!(before > 0, "no step was acknowledged before the drain");

    // SIGTERM node 1: unready first, then gone, exiting 0.
    let drained = admins[1];
    terminate(&nodes.0[1]);
    // Whether each answer said the node drains (its `not_draining` check
    // failed), until the endpoint is gone.
    let mut answers = Vec::new();
    loop {
        match support::get(drained, "/health/ready", None).await {
            Some((status, _, body)) => {
                let report: serde_json::Value = serde_json::from_str(&body).expect("JSON");
                let draining = report["checks"].as_array().is_some_and(|checks| {
                    checks
                        .iter()
                        .any(|check| check["name"] == "not_draining" && check["ok"] == false)
                });
                assert!(!draining || status == 503, "draining yet ready: {body}");
                answers.push(draining);
            }
            None => break,
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        if answers.len() > 4000 {
            break;
        }
    }
    // Answers before the process has handled the signal may not say so
    // yet; from the first that does, every one does.
    let unready = answers.iter().position(|draining| *draining);
    assert!(
        unready.is_some(),
        "never said it drains before exiting: {answers:?}"
    );
    assert!(
        answers[unready.unwrap_or_default()..]
            .iter()
            .all(|draining| *draining),
        "stopped draining: {answers:?}"
    );
    let status = exit_within(&mut nodes.0[1], Duration::from_secs(25));
    assert!(status.success(), "the drained node exited with {status}");

    // The others keep serving every ledger.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = total(&acked);
    stop.store(true, Ordering::Release);
    for task in load {
        task.await.expect("a load task");
    }
    assert!(during > before, "no step was acknowledged after the drain");

    // Every acknowledged step is in the stored state.
    let acked = acked.lock().expect("not poisoned").clone();
    for key in 0..LEDGERS {
        let deadline = Instant::now() + Duration::from_secs(20);
        let state = loop {
            match client.grain::<Ledger>(key).call(Read).await {
                Ok(state) => break state,
                Err(err) => {
                    assert!(Instant::now() < deadline, "ledger {key} unreadable: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let acknowledged = acked.get(&key).copied().unwrap_or_default();
        assert!(
            state.applied >= acknowledged,
            "ledger {key}: stored step {}, acknowledged {acknowledged}",
            state.applied
        );
    }
    let slowest = *slowest_failure.lock().expect("not poisoned");
    assert!(
        slowest < Duration::from_secs(5),
        "a failed call took {slowest:?}: failures must come back fast"
    );
    client.leave().await.expect("the client leaves");
}

fn a_drain_past_its_grace_ends_the_run_with_an_error() {
    let temp = tempfile::tempdir().expect("a directory");
    let dir = temp.path();
    let seed = free_udp();
    let mut file = node_file("grace", &dir.join("grains.sqlite"), seed, seed);
    file.drain_grace_secs = Some(0);
    let path = dir.join("node.toml");
    file.save(&path).expect("written");
    let child = Command::new(env!("CARGO_BIN_EXE_granary"))
        .arg("node")
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the node starts");
    let mut nodes = Nodes(vec![child]);
    // Started once it has said so.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut said = String::new();
    {
        use std::io::BufRead;
        let stdout = nodes.0[0].stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        while !said.contains("granary node:") {
            assert!(Instant::now() < deadline, "the node never started");
            match lines.next() {
                Some(Ok(line)) => said.push_str(&line),
                _ => break,
            }
        }
        // Its output is closed from here on: the node must not mind.
    }
    terminate(&nodes.0[0]);
    let status = exit_within(&mut nodes.0[0], Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(1),
        "a drain past its grace is a failure"
    );
    let mut stderr = String::new();
    if let Some(mut pipe) = nodes.0[0].stderr.take() {
        use std::io::Read;
        let _ = pipe.read_to_string(&mut stderr);
    }
    assert!(stderr.contains("did not finish within"), "{stderr}");
    drop(nodes);
}
