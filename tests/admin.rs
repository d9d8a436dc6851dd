//! `granary::admin`: a node's metrics and health probes over HTTP, and the
//! bearer token (admin rules 1 to 4), against a node started from a file
//! on loopback, with the CPU backend's devices.

#[path = "../build-support/test_ports.rs"]
mod test_ports;
use std::time::{Duration, Instant};

use granary::actors::{Grain, GrainContext, GrainKey, GrainType, Handler, Message, SiloBuilder};
use granary::admin::{Admin, AdminConfig, AdminError, AdminSources};
use granary::node_file::{NodeDevices, NodeFile, start_node};
use serde::{Deserialize, Serialize};

/// Hosted as "tally".
#[derive(GrainType)]
#[grain(crate = granary::actors, name = "tally", messages(Bump))]
struct Tally(u64);
impl Grain for Tally {
    fn new(_: &GrainKey) -> Tally {
        Tally(0)
    }
}

#[derive(Message, Serialize, Deserialize)]
#[message(crate = granary::actors, name = "bump", reply = u64)]
struct Bump;
impl Handler<Bump> for Tally {
    async fn handle(&mut self, _: Bump, _: &mut GrainContext) -> u64 {
        self.0 += 1;
        self.0
    }
}

fn tallies(silo: SiloBuilder, _: &NodeDevices) -> SiloBuilder {
    silo.host::<Tally>()
}

fn node_file() -> NodeFile {
    // A port no `bind(0)` can take before the node binds it.
    let gossip = std::net::SocketAddr::from(([127, 0, 0, 1], test_ports::free_port()));
    NodeFile::from_toml(&format!(
        "cluster = \"admin-test\"\nsecret = \"5f2a9c41e07bd3386a11f04c9be2d57003e8a6b1c94f2d0e7ab36c5d18f09e42\"\nlisten = \"127.0.0.1:0\"\n\
         gossip = \"{gossip}\"\ngossip_interval_ms = 50\nstorage = {{ kind = \"memory\" }}\n\
         devices = {{ memory_mib = 16 }}\n\
         admin = {{ listen = \"127.0.0.1:0\", token = \"s3cret-token\" }}\n"
    ))
    .expect("a valid file")
}

mod support;

/// One GET that must be answered.
async fn get(
    address: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (u16, String, String) {
    support::get(address, path, token)
        .await
        .unwrap_or_else(|| panic!("no answer from {address}{path}"))
}

/// The value of the sample `line` starts with, in `metrics`.
fn sample(metrics: &str, line: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|found| found.strip_prefix(line)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_probes_are_served_to_the_token_only() {
    let file = node_file();
    let node = start_node(&file, &tallies).await.expect("the node starts");
    let admin_file = file.admin.as_ref().expect("an admin section");
    let sources = AdminSources::of_node(&node);
    let draining = sources.draining.clone();
    let admin = Admin::start(&admin_file.config(), sources)
        .await
        .expect("the endpoint starts");
    let address = admin.address();
    let token = Some("s3cret-token");

    // Rule 2: without the token, or with another, 401 and nothing else,
    // whatever the path.
    for (path, token) in [
        ("/metrics", None),
        ("/health/ready", Some("wrong")),
        ("/no/such/path", None),
    ] {
        let (status, head, body) = get(address, path, token).await;
        assert_eq!(status, 401, "{path}");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{head}"
        );
        assert!(body.is_empty(), "{path}: {body:?}");
    }
    // Nor does another method tell which methods a path takes.
    for path in ["/metrics", "/nope"] {
        let (status, head, body) = support::request(address, "POST", path, None)
            .await
            .expect("an answer");
        assert_eq!(status, 401, "POST {path}");
        assert!(!head.to_ascii_lowercase().contains("allow:"), "{head}");
        assert!(body.is_empty());
    }

    // Calls, then the scrape shows them.
    let deadline = Instant::now() + Duration::from_secs(10);
    for key in 0..4u64 {
        loop {
            match node.grain::<Tally>(key).call(Bump).await {
                Ok(_) => break,
                Err(err) if Instant::now() > deadline => panic!("the call failed: {err}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        for _ in 0..9 {
            node.grain::<Tally>(key).call(Bump).await.expect("a call");
        }
    }
    // An activation adds what it ran to its type's count once it waits
    // for its next message (stats rule 2): right after the last reply it
    // may not have yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, head, metrics) = loop {
        let (status, head, metrics) = get(address, "/metrics", token).await;
        let counted = sample(
            &metrics,
            "granary_grain_messages_total{grain_type=\"tally\"}",
        );
        if counted == Some(40.0) || Instant::now() > deadline {
            break (status, head, metrics);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(status, 200);
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert_eq!(
        sample(
            &metrics,
            "granary_grain_messages_total{grain_type=\"tally\"}"
        ),
        Some(40.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "granary_grain_activations{grain_type=\"tally\"}"),
        Some(4.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "granary_grain_turn_seconds_bucket{grain_type=\"tally\",le=\"+Inf\"}"
        ),
        Some(4.0),
        "the first turn of each activation is timed"
    );
    // No caller waits for mailbox room once the calls above returned.
    assert_eq!(sample(&metrics, "granary_silo_senders_waiting"), Some(0.0));
    assert_eq!(sample(&metrics, "granary_cluster_members"), Some(1.0));
    assert_eq!(sample(&metrics, "granary_cluster_homes"), Some(4.0));
    assert_eq!(sample(&metrics, "granary_cluster_fenced"), Some(0.0));
    // A lone node gossips sealed, with its seed (itself): nothing dropped.
    assert!(
        sample(
            &metrics,
            "granary_gossip_datagrams_total{outcome=\"forged\"}"
        ) == Some(0.0),
        "{metrics}"
    );
    let total = metrics
        .lines()
        .find(|line| line.starts_with("granary_device_memory_total_bytes{"))
        .expect("a device");
    assert!(total.contains("backend=\"Cpu\""), "{total}");
    for family in [
        "granary_grain_failures_total",
        "granary_grain_mailbox_depth",
        "granary_grain_activations_started_total",
        "granary_device_memory_free_bytes",
        "granary_device_memory_reserved_bytes",
        "granary_device_queue_depth",
        "granary_cluster_directory_entries",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {family} ")),
            "{family} missing"
        );
    }
    // No grain key is a label.
    assert!(!metrics.contains("key="), "{metrics}");

    // Rule 4: every probe passes, with a JSON body naming its checks.
    for probe in ["live", "startup", "ready"] {
        let (status, _, body) = get(address, &format!("/health/{probe}"), token).await;
        assert_eq!(status, 200, "{probe}: {body}");
        let report: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(report["probe"], probe);
        assert_eq!(report["status"], "pass");
        assert!(
            report["checks"]
                .as_array()
                .is_some_and(|checks| !checks.is_empty())
        );
    }
    let (_, _, ready) = get(address, "/health/ready", token).await;
    assert!(ready.contains("\"storage\""), "{ready}");
    // The ready probes' reads are not grain state operations: not
    // counted (these grains keep no state, so nothing is).
    let (_, _, metrics) = get(address, "/metrics", token).await;
    assert_eq!(
        sample(
            &metrics,
            "granary_storage_operations_total{op=\"read\",outcome=\"done\"}"
        ),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "granary_storage_operation_seconds_count{op=\"read\"}"
        ),
        Some(0.0)
    );
    assert_eq!(sample(&metrics, "granary_reminders_owned"), Some(0.0));
    assert_eq!(
        sample(
            &metrics,
            "granary_cluster_redirects_total{answer=\"moved\"}"
        ),
        Some(0.0)
    );
    assert!(metrics.contains("# TYPE granary_cluster_remote_call_seconds histogram"));

    // The cluster view, as JSON and as `granary status` prints it.
    let url = format!("http://{address}");
    let view = granary::admin::fetch_cluster(&url, token)
        .await
        .expect("the view");
    assert_eq!(view.silos.len(), 1);
    assert!(view.silos[0].this);
    assert_eq!(view.silo, Some(node.id().to_string()));
    assert_eq!(view.silos[0].grain_types, ["tally"]);
    assert_eq!(
        granary::admin::fetch_cluster(&url, Some("wrong")).await,
        Err(granary::admin::StatusError::Unauthorized)
    );
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_granary"))
        .args(["status", "--admin", &url])
        .env("GRANARY_ADMIN_TOKEN", "s3cret-token")
        .output()
        .await
        .expect("granary status runs");
    let printed = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{printed}");
    assert!(printed.starts_with("SILO"), "{printed}");
    assert!(
        printed.contains(&format!("{} (this)", node.id().address)),
        "{printed}"
    );
    assert!(printed.contains("1 silo(s), seen from"), "{printed}");
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_granary"))
        .args(["status", "--admin", &url])
        .env_remove("GRANARY_ADMIN_TOKEN")
        .output()
        .await
        .expect("granary status runs");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--token"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // A node that drains is not ready, and stays live while it leaves.
    draining.store(true, std::sync::atomic::Ordering::Release);
    let (status, _, body) = get(address, "/health/ready", token).await;
    assert_eq!(status, 503, "{body}");
    node.leave().await.expect("the node leaves");
    let (status, _, body) = get(address, "/health/live", token).await;
    assert_eq!(status, 200, "draining, stopped, yet live: {body}");
    draining.store(false, std::sync::atomic::Ordering::Release);

    // A node that stopped for good (not draining) is neither live nor
    // ready.
    for probe in ["live", "ready"] {
        let (status, _, body) = get(address, &format!("/health/{probe}"), token).await;
        assert_eq!(status, 503, "{probe}: {body}");
        assert!(body.contains("\"fail\""), "{body}");
    }
    admin.stop().await;
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "stopped: nothing listens"
    );
}

#[tokio::test]
async fn an_endpoint_off_loopback_needs_a_token() {
    let silo = granary::actors::Silo::builder().build().expect("a silo");
    let sources = AdminSources::of_silo(&silo);
    let open = AdminConfig {
        listen: "0.0.0.0:0".parse().expect("an address"),
        token: None,
    };
    assert!(matches!(
        Admin::start(&open, sources.clone()).await,
        Err(AdminError::TokenRequired { .. })
    ));
    let blank = AdminConfig {
        listen: "127.0.0.1:0".parse().expect("an address"),
        token: Some("has space".into()),
    };
    assert!(matches!(
        Admin::start(&blank, sources.clone()).await,
        Err(AdminError::BadToken)
    ));
    // On loopback with no token: served, and a lone silo is ready.
    let local = AdminConfig {
        listen: "127.0.0.1:0".parse().expect("an address"),
        token: None,
    };
    let sources_draining = sources.draining.clone();
    let admin = Admin::start(&local, sources).await.expect("starts");
    let (status, _, body) = get(admin.address(), "/health/ready", None).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = get(admin.address(), "/nothing", None).await;
    assert_eq!(status, 404);
    // Draining: not ready from the first moment, still live.
    sources_draining.store(true, std::sync::atomic::Ordering::Release);
    let (status, _, body) = get(admin.address(), "/health/ready", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not_draining"), "{body}");
    let (status, _, _) = get(admin.address(), "/health/live", None).await;
    assert_eq!(status, 200);
    admin.stop().await;
}

#[tokio::test]
async fn granary_status_reaches_an_ipv6_endpoint_and_refuses_bad_urls_and_tokens() {
    let silo = granary::actors::Silo::builder().build().expect("a silo");
    let v6 = AdminConfig {
        listen: "[::1]:0".parse().expect("an address"),
        token: None,
    };
    match Admin::start(&v6, AdminSources::of_silo(&silo)).await {
        Ok(admin) => {
            let url = format!("http://{}", admin.address());
            assert!(url.starts_with("http://[::1]:"), "{url}");
            let view = granary::admin::fetch_cluster(&url, None)
                .await
                .expect("the view over IPv6");
            assert_eq!(view.silos.len(), 1);
            admin.stop().await;
        }
        // A machine without IPv6 loopback: say so; the rest still runs.
        Err(AdminError::Bind { reason, .. }) => {
            eprintln!("SKIPPED the IPv6 part: no [::1] here ({reason})");
        }
        Err(err) => panic!("{err}"),
    }
    use granary::admin::StatusError;
    assert!(matches!(
        granary::admin::fetch_cluster("https://127.0.0.1:1", None).await,
        Err(StatusError::BadUrl(_))
    ));
    assert!(matches!(
        granary::admin::fetch_cluster("http://user:pw@127.0.0.1:1", None).await,
        Err(StatusError::BadUrl(_))
    ));
    assert_eq!(
        granary::admin::fetch_cluster("http://127.0.0.1:1", Some("two words")).await,
        Err(StatusError::BadToken)
    );
}

/// Admin rule 8: the connections a client can hold are bounded. Past
/// `MAX_CONNECTIONS` (and, from loopback as here, the
/// `LOOPBACK_CONNECTIONS` kept for it) a connection is closed as it is
/// accepted; a freed slot serves again at once; the stop does not wait on
/// clients that never finish their request. (In review, `axum::serve` set
/// no limit and no header timeout, and its graceful stop waited for such a
/// client forever, past the node's drain.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connections_a_client_holds_are_bounded_and_cannot_hold_the_stop() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let file = node_file();
    let node = start_node(&file, &tallies).await.expect("the node starts");
    let admin_file = file.admin.as_ref().expect("an admin section");
    let admin = Admin::start(&admin_file.config(), AdminSources::of_node(&node))
        .await
        .expect("the endpoint starts");
    let address = admin.address();
    // Every connection the endpoint takes, each with half a request.
    let mut held = Vec::new();
    for _ in 0..granary::admin::MAX_CONNECTIONS + granary::admin::LOOPBACK_CONNECTIONS {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\n")
            .await
            .unwrap();
        held.push(stream);
    }
    // Accepted, then closed at once: the read ends without an answer.
    let mut extra = tokio::net::TcpStream::connect(address).await.unwrap();
    let _ = extra
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), extra.read_to_end(&mut answer)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a connection past the cap was served: {read:?} {}",
        String::from_utf8_lossy(&answer)
    );
    // One freed: the endpoint serves again, well before the held
    // connections' header timeout would free others.
    drop(held.pop());
    let bound = Instant::now() + Duration::from_secs(2);
    let token = admin_file.config().token;
    loop {
        if let Some((status, _, _)) = support::get(address, "/health/live", token.as_deref()).await
        {
            assert_eq!(status, 200);
            break;
        }
        assert!(Instant::now() < bound, "no answer once a connection freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The stop does not wait for the half-sent requests.
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), admin.stop())
        .await
        .expect("the stop waited on clients that never finish");
    assert!(
        started.elapsed() <= granary::admin::STOP_GRACE + Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    node.leave().await.ok();
}
