//! Operating a cluster of real `granary node` processes on loopback: a
//! node drained by SIGTERM under load.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use granary::cluster_demo::{Apply, DemoGrains, Ledger, Read};
use granary::node_file::{AdminFile, DevicesFile, NodeFile, StorageFile, start_node};

const SECRET: &str = "operations test cluster secret";
const LEDGERS: u64 = 24;

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

fn free_tcp() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free TCP port")
}

fn free_udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|socket| socket.local_addr())
        .expect("a free UDP port")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_node_under_load_and_no_acknowledged_write_is_lost() {
    let temp = tempfile::tempdir().expect("a directory");
    let dir = temp.path();
    let storage = dir.join("grains.sqlite");
    let cluster = format!("operations-{}", std::process::id());
    let seed = free_udp();
    let mut nodes = Nodes(Vec::new());
    let mut admins = Vec::new();
    for n in 0..3 {
        let gossip = if n == 0 { seed } else { free_udp() };
        let mut file = node_file(&cluster, &storage, seed, gossip);
        let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp())
            .parse()
            .expect("an address");
        file.admin = Some(AdminFile {
            listen: admin,
            token: None,
        });
        let path = dir.join(format!("node-{n}.toml"));
        std::fs::write(&path, file.to_toml().expect("TOML")).expect("written");
        let log = std::fs::File::create(dir.join(format!("node-{n}.log"))).expect("a log");
        let child = Command::new(env!("CARGO_BIN_EXE_granary"))
            .arg("node")
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the node starts");
        nodes.0.push(child);
        admins.push(admin);
    }
    // This process joins as a client: it routes, hosts nothing.
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
    while client.members().len() < 4
        || client
            .members()
            .iter()
            .filter(|member| !member.load.grain_types.is_empty())
            .count()
            < 3
    {
        assert!(Instant::now() < deadline, "the cluster never formed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for admin in &admins {
        let deadline = Instant::now() + Duration::from_secs(30);
        while support::get(*admin, "/health/ready", None)
            .await
            .map(|answer| answer.0)
            != Some(200)
        {
            assert!(Instant::now() < deadline, "{admin} never ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

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
    drop(nodes);
}

#[test]
fn a_drain_past_its_grace_ends_the_run_with_an_error() {
    let temp = tempfile::tempdir().expect("a directory");
    let dir = temp.path();
    let seed = free_udp();
    let mut file = node_file("grace", &dir.join("grains.sqlite"), seed, seed);
    file.drain_grace_secs = Some(0);
    let path = dir.join("node.toml");
    std::fs::write(&path, file.to_toml().expect("TOML")).expect("written");
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
