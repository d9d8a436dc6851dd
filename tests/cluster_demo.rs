//! `granary demo --nodes 3` and `granary node` end to end: three silo
//! processes on loopback, GPU grains placed by free device memory, each
//! notifying an auditor grain on another silo, the busiest silo killed
//! halfway, every grain's persisted state intact and no grain active on two
//! silos;
//! the same on etcd (a build with the `etcd` feature and an etcd in
//! `GRANARY_ETCD_ENDPOINTS`); `granary demo --nodes 3 --rebalance`, whose
//! third silo joins empty and takes ledgers until used device memory is
//! within 20 points, none moving twice and nothing lost; and a node
//! configuration that is wrong, refused with a clear message; and a
//! demo stopped by SIGTERM or killed outright, which leaves no silo
//! running.

use std::process::Command;

/// Runs the three-silo demo (12 ledgers × 10 calls) with `extra`
/// arguments, checks that it lost nothing, and returns what it printed.
fn three_silo_demo(extra: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_granary"))
        .args([
            "demo",
            "--nodes",
            "3",
            "--grains",
            "12",
            "--calls",
            "10",
            "--no-progress",
        ])
        .args(extra)
        .output()
        .expect("the demo ran");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("every ledger holds every acknowledged call"),
        "{stdout}"
    );
    assert!(stdout.contains("(killed)"), "{stdout}");
    assert!(stdout.contains("120 acknowledged"), "{stdout}");
    // Grain-to-grain calls: one notification per acknowledged call, some
    // of them across silos, every one in its auditor's persisted count.
    let (notified, crossed) = notifications(&stdout);
    assert_eq!(notified, 120, "{stdout}");
    assert!(crossed > 0 && crossed <= notified, "{stdout}");
    assert!(
        stdout.contains("every auditor counts every acknowledged notification"),
        "{stdout}"
    );
    // The census: each ledger and auditor on at most one silo, none on the
    // demo's own client node.
    assert!(
        stdout.contains("single activation: no grain is active on two silos"),
        "{stdout}"
    );
    let (ledgers, auditors) = cluster_wide(&stdout);
    assert!(ledgers <= 12 && auditors <= 4, "{stdout}");
    let client = stdout
        .lines()
        .find(|line| line.contains("(this client)"))
        .unwrap_or_else(|| panic!("no client line: {stdout}"));
    assert!(
        client.contains("live   0:   0 ledgers,  0 auditors"),
        "{stdout}"
    );
    stdout
}

/// The numbers before `word` in `line`, in order.
fn numbers_before(line: &str, word: &str) -> Vec<u64> {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .filter(|pair| pair[1].trim_end_matches(',') == word)
        .filter_map(|pair| pair[0].parse().ok())
        .collect()
}

/// The demo's grain-to-grain line: (notifications acknowledged, crossed).
fn notifications(stdout: &str) -> (u64, u64) {
    let line = stdout
        .lines()
        .find(|line| line.starts_with("grain-to-grain calls"))
        .unwrap_or_else(|| panic!("no grain-to-grain line: {stdout}"));
    let notified = numbers_before(line, "notifications");
    let crossed = numbers_before(line, "crossed");
    assert_eq!((notified.len(), crossed.len()), (1, 1), "{line}");
    (notified[0], crossed[0])
}

/// The census's cluster-wide line: (ledgers active, auditors active).
fn cluster_wide(stdout: &str) -> (u64, u64) {
    let line = stdout
        .lines()
        .find(|line| line.trim_start().starts_with("cluster-wide:"))
        .unwrap_or_else(|| panic!("no cluster-wide line: {stdout}"));
    let ledgers = numbers_before(line, "ledgers");
    let auditors = numbers_before(line, "auditors");
    assert_eq!((ledgers.len(), auditors.len()), (1, 1), "{line}");
    (ledgers[0], auditors[0])
}

#[test]
fn three_silo_processes_lose_a_silo_and_no_state() {
    let stdout = three_silo_demo(&[]);
    assert!(stdout.contains("membership on gossip"), "{stdout}");
    assert!(stdout.contains("over mutual TLS"), "{stdout}");
}

#[test]
fn the_rebalance_demo_spreads_ledgers_to_a_silo_that_joins_and_loses_nothing() {
    // The silos log their rebalancers' rounds and moves, which a failure
    // shows (the run's folder is kept only then).
    let output = Command::new(env!("CARGO_BIN_EXE_granary"))
        .args(["demo", "--nodes", "3", "--rebalance"])
        .env(
            "RUST_LOG",
            "info,granary_cluster::node::rebalance=debug,granary_cluster::node::migration=debug",
        )
        .output()
        .expect("the demo ran");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}\n{}",
        kept_logs(&stderr)
    );
    // The table: silo 3 absent until it joins, then holding ledgers.
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<&str>>())
        .filter(|row| row.len() == 6 && row[1] == "s")
        .collect();
    assert!(rows.iter().any(|row| row[4] == "-"), "{stdout}");
    let last = rows.last().unwrap_or_else(|| panic!("no table: {stdout}"));
    let points: Vec<f64> = last[2..5]
        .iter()
        .map(|cell| cell.trim_end_matches('%').parse().unwrap())
        .collect();
    assert!(points[2] > 0.0, "silo 3 took nothing: {stdout}");
    let spread = points.iter().cloned().fold(f64::MIN, f64::max)
        - points.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread < 20.0, "{stdout}");
    assert!(stdout.contains("none twice: true"), "{stdout}");
    assert!(
        stdout.contains("every acknowledged step is in its ledger's persisted total"),
        "{stdout}"
    );
    assert!(
        stdout.contains("census: no grain active on two silos"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("PASS"), "{stdout}");
}

#[cfg(feature = "etcd")]
#[test]
#[cfg_attr(
    not(granary_etcd),
    ignore = "GRANARY_ETCD_ENDPOINTS was not set when this test was built (CI starts an etcd)"
)]
fn three_silo_processes_on_etcd_lose_a_silo_and_no_state() {
    let endpoints = option_env!("GRANARY_ETCD_ENDPOINTS").unwrap_or_default();
    let stdout = three_silo_demo(&["--etcd", endpoints]);
    assert!(stdout.contains("membership on etcd"), "{stdout}");
}

/// The silos' logs of a failed demo run, from the folder its `stderr`
/// says it kept (a failed check: "kept in DIR"; an error: "are in DIR",
/// maybe inside parentheses): each node's last 300 lines.
fn kept_logs(stderr: &str) -> String {
    let Some(dir) = stderr.lines().find_map(|line| {
        ["the silos' logs are kept in ", "the silos' logs are in "]
            .iter()
            .find_map(|phrase| line.rsplit_once(phrase).map(|(_, dir)| dir))
    }) else {
        return String::new();
    };
    let dir = dir.trim().trim_end_matches(')');
    let mut shown = String::new();
    for node in 0..8 {
        let path = std::path::Path::new(dir).join(format!("node-{node}.log"));
        let Ok(log) = std::fs::read(&path) else {
            continue;
        };
        let log = String::from_utf8_lossy(&log);
        let lines: Vec<&str> = log.lines().collect();
        shown.push_str(&format!("--- {} (last 300 lines)\n", path.display()));
        for line in &lines[lines.len().saturating_sub(300)..] {
            shown.push_str(line);
            shown.push('\n');
        }
    }
    shown
}

/// The processes whose parent is `pid` and that have not exited (a zombie
/// has exited; its new parent may not have reaped it yet).
#[cfg(target_os = "linux")]
fn live_children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|stat| {
                // After the command's name in parentheses: its state, then
                // its parent.
                let after = stat.rsplit_once(')').map_or("", |(_, after)| after);
                let mut fields = after.split_whitespace();
                let state = fields.next();
                let parent = fields.next().and_then(|parent| parent.parse::<u32>().ok());
                parent == Some(pid) && state != Some("Z")
            })
        })
        .collect()
}

/// Whether process `pid` is gone or has exited (a zombie).
#[cfg(target_os = "linux")]
fn ended(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit_once(')')
            .and_then(|(_, after)| after.split_whitespace().next())
            == Some("Z")
    })
}

/// A demo and its silos, all killed (SIGKILL) when dropped: a failed
/// check leaves nothing running.
#[cfg(target_os = "linux")]
struct Running {
    demo: Option<std::process::Child>,
    silos: Vec<u32>,
}

#[cfg(target_os = "linux")]
impl Drop for Running {
    fn drop(&mut self) {
        if let Some(demo) = &mut self.demo {
            let _ = demo.kill();
            let _ = demo.wait();
        }
        for silo in &self.silos {
            // Still a demo's silo: a process id freed by an ended silo may
            // be another process's by now.
            let a_silo = std::fs::read(format!("/proc/{silo}/cmdline"))
                .is_ok_and(|line| String::from_utf8_lossy(&line).contains("granary-demo-"));
            if !ended(*silo) && a_silo {
                let _ = Command::new("kill")
                    .args(["-KILL", &silo.to_string()])
                    .status();
            }
        }
    }
}

/// Starts a three-silo demo long enough to be stopped, its folder made
/// under `tmp`, and waits until its three silo processes run.
#[cfg(target_os = "linux")]
fn demo_with_three_silos(tmp: &std::path::Path) -> Running {
    use std::time::{Duration, Instant};
    let mut demo = Command::new(env!("CARGO_BIN_EXE_granary"))
        .args([
            "demo",
            "--nodes",
            "3",
            "--grains",
            "12",
            "--calls",
            "1000000",
            "--no-progress",
        ])
        .env("TMPDIR", tmp)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the demo started");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let silos = live_children(demo.id());
        if silos.len() == 3 {
            return Running {
                demo: Some(demo),
                silos,
            };
        }
        if Instant::now() > deadline || demo.try_wait().ok().flatten().is_some() {
            // The silos seen so far are killed as this panics.
            let _seen = Running {
                demo: None,
                silos: silos.clone(),
            };
            let _ = demo.kill();
            let output = demo.wait_with_output().expect("the demo ended");
            panic!(
                "three silos did not start in 60 s ({:?} seen); stderr:\n{}",
                silos,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `granary demo --nodes 3` stopped by SIGTERM stops its silos, removes
/// its folder and says so; killed outright (SIGKILL, where nothing of it
/// runs), its silos die with it (their parent-death signal).
#[cfg(target_os = "linux")]
#[test]
fn a_demo_stopped_by_a_signal_leaves_no_silo_running() {
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let wait_ended = |pids: &[u32], what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pids.iter().all(|pid| ended(*pid)) {
            assert!(
                Instant::now() < deadline,
                "{what}: silos {pids:?} still run"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut running = demo_with_three_silos(tmp.path());
    let folders = || -> Vec<_> {
        std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|entry| entry.ok())
            .filter(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with("granary-demo-")
            })
            .map(|entry| entry.path())
            .collect()
    };
    assert_eq!(folders().len(), 1, "the demo's folder");
    let demo = running.demo.take().unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = demo.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("interrupted by a signal"), "{stderr}");
    wait_ended(&running.silos, "after SIGTERM");
    assert!(folders().is_empty(), "the folder stays: {:?}", folders());

    let mut running = demo_with_three_silos(tmp.path());
    if let Some(demo) = &mut running.demo {
        demo.kill().unwrap();
        let _ = demo.wait();
    }
    wait_ended(&running.silos, "after SIGKILL");
}

/// A node file's fields before its `extra` lines.
const NODE_FILE: &str = "cluster = \"c\"\nsecret = \"5f2a9c41e07bd3386a11f04c9be2d57003e8a6b1c94f2d0e7ab36c5d18f09e42\"\nlisten = \"127.0.0.1:0\"\ngossip = \"127.0.0.1:0\"\nstorage = { kind = \"memory\" }\n";

/// Runs `granary node` on the file `name` in `dir` (written from `text`
/// unless `None`), expects it to fail, and returns what it printed.
fn refused_node(dir: &std::path::Path, name: &str, text: Option<&str>) -> String {
    refused_node_with(dir, name, text, &[])
}

/// [`refused_node`] with extra environment for the node's process.
fn refused_node_with(
    dir: &std::path::Path,
    name: &str,
    text: Option<&str>,
    env: &[(&str, &str)],
) -> String {
    let path = dir.join(name);
    if let Some(text) = text {
        granary::node_file::write_private(&path, text).unwrap();
    }
    let output = Command::new(env!("CARGO_BIN_EXE_granary"))
        .args(["node", "--config"])
        .arg(&path)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(!output.status.success(), "{name} was accepted");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_node_with_a_bad_configuration_says_what_is_wrong() {
    let dir = std::env::temp_dir().join(format!("granary-node-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let with = |extra: &str| format!("{NODE_FILE}{extra}");
    let cases = [
        ("missing.toml", None, "missing.toml"),
        (
            "unknown-key.toml",
            Some(with("colour = \"blue\"\n")),
            "colour",
        ),
        (
            "short-secret.toml",
            Some(NODE_FILE.replace(
                "5f2a9c41e07bd3386a11f04c9be2d57003e8a6b1c94f2d0e7ab36c5d18f09e42",
                "0123456789abcdef",
            )),
            "a cluster secret of 8 bytes",
        ),
        (
            "passphrase-secret.toml",
            Some(NODE_FILE.replace(
                "5f2a9c41e07bd3386a11f04c9be2d57003e8a6b1c94f2d0e7ab36c5d18f09e42",
                // A passphrase written in hex is still a passphrase.
                "612070617373706872617365206f66207468697274792d74776f206279746573",
            )),
            "passphrase",
        ),
        (
            "unspecified-listen.toml",
            Some(NODE_FILE.replace("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:7000\"")),
            "not an unspecified one",
        ),
        (
            "nan-phi.toml",
            Some(with("phi_threshold = nan\n")),
            "phi_threshold = NaN",
        ),
        (
            "unknown-backend.toml",
            Some(with("devices = { backend = \"tpu\" }\n")),
            "tpu",
        ),
        (
            "rebalance-high-water.toml",
            Some(with("rebalance = { high_water = 1.5 }\n")),
            "rebalance: high_water must be between 0 and 1, not 1.5",
        ),
        (
            "rebalance-unknown.toml",
            Some(with("rebalance = { highwater = 0.8 }\n")),
            "highwater",
        ),
        (
            "oversized-share.toml",
            Some(with("devices = { memory_mib = 18446744073709551615 }\n")),
            "too large",
        ),
    ];
    for (name, text, expected) in cases {
        let stderr = refused_node(&dir, name, text.as_deref());
        assert!(stderr.contains(expected), "{name}: {stderr}");
    }
    // A certificate for another address than the one the node listens on
    // would be refused by every peer: the node says so when it starts.
    {
        let certs = granary::certs::write_certs(&dir.join("certs"), &["10.9.9.9".into()])
            .expect("certificates");
        let tls = &certs.nodes[0].1;
        let text = with(&format!(
            "tls = {{ ca = {:?}, cert = {:?}, key = {:?} }}\n",
            tls.ca.display().to_string(),
            tls.cert.display().to_string(),
            tls.key.display().to_string()
        ));
        let stderr = refused_node(&dir, "tls-elsewhere.toml", Some(&text));
        assert!(
            stderr.contains("is not valid for 127.0.0.1")
                && stderr.contains("granary cert 127.0.0.1"),
            "{stderr}"
        );
    }
    // A file others may read is refused before it is read.
    {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("readable.toml");
        std::fs::write(&path, NODE_FILE).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let stderr = refused_node(&dir, "readable.toml", None);
        assert!(stderr.contains("chmod 600"), "{stderr}");
    }
    // Without the etcd feature, an [etcd] section says how to get it.
    #[cfg(not(feature = "etcd"))]
    {
        let text = with("etcd = { endpoints = [\"http://127.0.0.1:2379\"] }\n");
        let stderr = refused_node(&dir, "etcd.toml", Some(&text));
        assert!(stderr.contains("--features etcd"), "{stderr}");
    }
    // A backend this machine lacks is named in the error (where CUDA is
    // present, the node would start: nothing to check then).
    if let Err(why) = granary::kernels::cuda::CudaBackend::discover() {
        let text = with("devices = { backend = \"cuda\" }\n");
        let stderr = refused_node(&dir, "cuda.toml", Some(&text));
        assert!(
            stderr.contains("devices: CUDA:"),
            "no CUDA here ({why}): {stderr}"
        );
    }
    // wgpu with the Vulkan driver hidden (on Linux wgpu has no other API):
    // the node refuses to start and names wgpu, on every machine.
    #[cfg(target_os = "linux")]
    {
        let text = with("devices = { backend = \"wgpu\" }\n");
        let hidden = "/nonexistent/granary-no-vulkan.json";
        let stderr = refused_node_with(
            &dir,
            "wgpu.toml",
            Some(&text),
            &[("VK_DRIVER_FILES", hidden), ("VK_ICD_FILENAMES", hidden)],
        );
        assert!(stderr.contains("devices: wgpu:"), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
