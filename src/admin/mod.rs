//! A node's admin endpoint: Prometheus metrics and health probes over HTTP
//! (`granary node` serves it when its file has `[admin]`).
//!
//! # Rules
//!
//! 1. **Binding.** The endpoint listens on loopback unless configured
//!    otherwise; an address that is not loopback needs a bearer token in
//!    the configuration, or the endpoint does not start
//!    ([`AdminError::TokenRequired`]).
//! 2. **Tokens.** With a token set, every request must carry
//!    `Authorization: Bearer <token>`, or HTTP Basic credentials whose
//!    password is the token (any user name): a browser opening the
//!    dashboard asks for them and sends them with the page's own requests.
//!    Any other request is answered 401 with an empty body and the
//!    `Bearer` and `Basic` challenges, whatever its path, so it learns
//!    nothing (not even which paths exist). The token is compared in
//!    constant time.
//! 3. **`GET /metrics`** is the Prometheus text exposition
//!    (`metrics.rs`): per grain type, per device, the cluster, then
//!    whatever the process recorded through the `metrics` facade (the GPU
//!    bridge's own series) when the Prometheus recorder is installed
//!    ([`install_recorder`]). Names take the `granary_` prefix, base units
//!    and `_total` on counters; no label carries a grain key.
//! 4. **Probes** (`health.rs`) answer 200 when they pass and 503 when they
//!    do not, each with a JSON body listing every check and why it failed:
//!    `/health/live` (the process's runtime answers), `/health/startup`
//!    (the node has joined) and `/health/ready` (joined, serving, storage
//!    answering within [`PROBE_TIMEOUT`], every launched persistent kernel
//!    answering within [`KERNEL_PROBE_TIMEOUT`]: an idle one a probe
//!    request, a busy one by its heartbeat).
//! 5. **Scope.** Every answer is built from what the node knows now: a
//!    scrape reads counters and walks the directory maps (holding each
//!    shard's read lock briefly, never waiting on a grain's turn). One
//!    storage read at a time serves the ready probes, its answer kept for
//!    [`PROBE_CACHE`], and one round of kernel checks, kept only for
//!    [`KERNEL_PROBE_CACHE`] (so that a cached answer cannot hide a hang
//!    for long); a probe stops waiting for them after [`PROBE_TIMEOUT`]. A
//!    kernel that hangs makes the node unready within about a second,
//!    until the bridge has relaunched it. Ready depends on the storage: a
//!    shared database
//!    that stops answering makes every node unready at once, as it makes
//!    every node unable to activate grains.
//! 6. **`GET /cluster`** (`cluster.rs`) is the whole cluster as this node
//!    sees it, as JSON ([`ClusterView`]): what `granary status` prints.
//! 7. **`GET /`** (`dashboard.rs`) is the live dashboard, a page that
//!    draws `GET /dashboard.json`: the cluster view, the kernel traffic of
//!    the last minutes and recent membership events, sampled by the
//!    endpoint while it runs.
//! 8. **Limits** (`serve.rs`): at most [`MAX_CONNECTIONS`] connections,
//!    and [`LOOPBACK_CONNECTIONS`] more kept for loopback peers (the
//!    node's own probes); headers within [`HEADER_READ_TIMEOUT`] and
//!    [`MAX_HEADER_BYTES`] (checked before the token, so they bound what a
//!    stranger can send); a connection lives at most
//!    [`CONNECTION_LIFETIME`]; and a stop waits at most [`STOP_GRACE`] for
//!    requests in progress.

mod client;
mod cluster;
mod dashboard;
mod health;
mod metrics;
mod serve;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use granary_actors::Silo;
use granary_cluster::ClusterNode;
use granary_gpu::GpuBridge;
use metrics_exporter_prometheus::PrometheusHandle;

pub use client::{StatusError, fetch_cluster, table};
pub use cluster::{ClusterView, SiloView};
pub use dashboard::{Dashboard, Event, Sample, SiloTraffic};
pub use health::{Check, Probe, ProbeReport};
pub use serve::{
    CONNECTION_LIFETIME, HEADER_READ_TIMEOUT, LOOPBACK_CONNECTIONS, MAX_CONNECTIONS,
    MAX_HEADER_BYTES, STOP_GRACE,
};

/// The longest a probe waits for a dependency (rule 5).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a persistent kernel may take to answer a probe request, or
/// (busy) go without a heartbeat, before the node is unready (rule 4): a
/// hang, or one ring request running this long. Shorter than
/// [`PROBE_TIMEOUT`], so that the probe reports which kernel did not answer
/// rather than timing out.
pub const KERNEL_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a storage probe's answer serves later probes (rule 5).
pub const PROBE_CACHE: Duration = Duration::from_secs(1);

/// How long a round of kernel checks serves later probes (rule 5): long
/// enough for probes that waited on it, far shorter than the time between
/// a hang and the bridge's relaunch.
pub const KERNEL_PROBE_CACHE: Duration = Duration::from_millis(100);

/// How often the Prometheus recorder's histograms are folded (its crate
/// asks for it, else samples pile up between scrapes).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Where the admin endpoint listens, and the token it asks for (rules 1
/// and 2).
#[derive(Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// The address to listen on (loopback unless a token is set).
    pub listen: SocketAddr,
    /// The bearer token every request must carry, if any.
    pub token: Option<String>,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// Why the admin endpoint did not start.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AdminError {
    /// An address that is not loopback, with no token (rule 1).
    TokenRequired {
        /// The address asked for.
        listen: SocketAddr,
    },
    /// A token that is empty, or holds characters a header cannot carry.
    BadToken,
    /// The address could not be bound.
    Bind {
        /// The address asked for.
        listen: SocketAddr,
        /// Why.
        reason: String,
    },
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminError::TokenRequired { listen } => write!(
                f,
                "the admin endpoint on {listen} is not on loopback: set a bearer token \
                 (`token` under `[admin]`) or listen on 127.0.0.1"
            ),
            AdminError::BadToken => f.write_str(
                "the admin token must be non-empty visible ASCII (it travels in a header)",
            ),
            AdminError::Bind { listen, reason } => {
                write!(f, "the admin endpoint cannot listen on {listen}: {reason}")
            }
        }
    }
}

impl std::error::Error for AdminError {}

/// What the endpoint reports on: the silo, and the node, bridge and
/// metrics recorder where there are any.
#[derive(Clone)]
pub struct AdminSources {
    /// The node's silo (grain types, storage).
    pub silo: Silo,
    /// The cluster node, if the silo is in one.
    pub node: Option<ClusterNode>,
    /// The silo's GPU bridge, if it serves one.
    pub bridge: Option<Arc<GpuBridge>>,
    /// The Prometheus recorder's handle, if installed ([`install_recorder`]).
    pub recorder: Option<PrometheusHandle>,
    /// Set when the node begins to drain: from then on it is not ready
    /// (health rule 3), so that traffic moves away before it leaves.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}

impl AdminSources {
    /// The sources of `node`: its silo, the silo's bridge, and the node.
    pub fn of_node(node: &ClusterNode) -> AdminSources {
        AdminSources {
            node: Some(node.clone()),
            ..AdminSources::of_silo(node.silo())
        }
    }

    /// The sources of a lone `silo` (no cluster): the silo and its bridge.
    pub fn of_silo(silo: &Silo) -> AdminSources {
        AdminSources {
            bridge: silo.service::<GpuBridge>(),
            silo: silo.clone(),
            node: None,
            recorder: None,
            draining: Arc::default(),
        }
    }

    /// With the recorder's handle (rule 3).
    pub fn with_recorder(mut self, recorder: Option<PrometheusHandle>) -> AdminSources {
        self.recorder = recorder;
        self
    }
}

/// Installs the Prometheus recorder as the process's `metrics` recorder,
/// so that what the GPU bridge records reaches `/metrics` (rule 3); `None`
/// (with a warning) if another recorder is installed already.
pub fn install_recorder() -> Option<PrometheusHandle> {
    // Histograms as histograms (not summaries), so they add up across
    // nodes: the bridge's request latency, in seconds.
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new().set_buckets_for_metric(
        metrics_exporter_prometheus::Matcher::Full("granary_gpu_request_seconds".into()),
        &[
            1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 1.0,
        ],
    );
    let builder = match builder {
        Ok(builder) => builder,
        Err(err) => {
            tracing::warn!(error = %err, "the Prometheus recorder is not installed");
            return None;
        }
    };
    match builder.install_recorder() {
        Ok(handle) => Some(handle),
        Err(err) => {
            tracing::warn!(error = %err, "the Prometheus recorder is not installed; /metrics shows Granary's own series only");
            None
        }
    }
}

/// State shared by the endpoint's handlers.
#[derive(Clone)]
struct Shared {
    sources: AdminSources,
    /// `Bearer <token>`, if a token is set (rule 2).
    token: Option<Arc<[u8]>>,
    /// The last storage probe's answer, and when (rule 5); held while a
    /// probe reads, so one read runs at a time.
    storage_probe: Arc<tokio::sync::Mutex<Option<Cached>>>,
    /// The same for the kernel probes.
    kernel_probe: Arc<tokio::sync::Mutex<Option<Cached>>>,
    /// What the dashboard's sampler keeps (rule 7).
    history: Arc<std::sync::Mutex<dashboard::History>>,
}

/// A dependency probe's answer (what was found, or why it failed), and
/// when it was taken (rule 5).
type Cached = (std::time::Instant, Result<String, String>);

/// A running admin endpoint; stopped when dropped or [`Admin::stop`]ped.
pub struct Admin {
    address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<()>>,
    /// Folds the recorder's histograms (`UPKEEP_EVERY`), if there is one.
    upkeep: Option<tokio::task::JoinHandle<()>>,
    /// The dashboard's sampler (rule 7).
    sampler: Option<tokio::task::JoinHandle<()>>,
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl AdminConfig {
    /// Rules 1 and 2: the token `config` needs, checked, without starting
    /// anything (a node's file is checked so before the node joins).
    pub fn check(&self) -> Result<(), AdminError> {
        self.expected_token().map(drop)
    }

    fn expected_token(&self) -> Result<Option<Arc<[u8]>>, AdminError> {
        match &self.token {
            Some(token) => {
                if token.is_empty() || !token.bytes().all(|byte| byte.is_ascii_graphic()) {
                    return Err(AdminError::BadToken);
                }
                Ok(Some(Arc::from(token.as_bytes())))
            }
            None if !self.listen.ip().is_loopback() => Err(AdminError::TokenRequired {
                listen: self.listen,
            }),
            None => Ok(None),
        }
    }
}

impl Admin {
    /// Starts the endpoint on `config.listen` for `sources` (rules 1 to 4).
    pub async fn start(config: &AdminConfig, sources: AdminSources) -> Result<Admin, AdminError> {
        let expected = config.expected_token()?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|err| AdminError::Bind {
                listen: config.listen,
                reason: err.to_string(),
            })?;
        let address = listener.local_addr().map_err(|err| AdminError::Bind {
            listen: config.listen,
            reason: err.to_string(),
        })?;
        let upkeep = sources.recorder.clone().map(|recorder| {
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(UPKEEP_EVERY);
                loop {
                    ticks.tick().await;
                    recorder.run_upkeep();
                }
            })
        });
        let shared = Shared {
            sources,
            token: expected,
            storage_probe: Arc::default(),
            kernel_probe: Arc::default(),
            history: Arc::default(),
        };
        let sampler = dashboard::start_sampler(shared.sources.clone(), shared.history.clone());
        let routes = Router::new()
            .route("/", get(dashboard::page))
            .route("/dashboard.json", get(dashboard::data))
            .route("/metrics", get(serve_metrics))
            .route("/health/live", get(health::live))
            .route("/health/startup", get(health::startup))
            .route("/health/ready", get(health::ready))
            .route("/cluster", get(serve_cluster))
            .with_state(shared.clone());
        // Rule 2: the token is checked before routing, so a refused
        // request learns nothing of the routes (not even their methods).
        let app = Router::new()
            .fallback_service(routes)
            .layer(middleware::from_fn_with_state(shared, authorize));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // Rule 8: with the limits `axum::serve` leaves unset.
        let serving = tokio::spawn(serve::serve(listener, app, stopped));
        Ok(Admin {
            address,
            stop: Some(stop),
            serving: Some(serving),
            upkeep,
            sampler: Some(sampler),
        })
    }

    /// Where it listens (the port the system chose, for port 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Stops serving: new connections are refused, requests in progress
    /// finish, and after [`STOP_GRACE`] those that have not are dropped
    /// (rule 8).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(serving) = self.serving.take() {
            let _ = serving.await;
        }
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(upkeep) = self.upkeep.take() {
            upkeep.abort();
        }
        if let Some(sampler) = self.sampler.take() {
            sampler.abort();
        }
    }
}

/// Rule 2: no token, or the right one; anything else is 401 and nothing
/// more.
async fn authorize(State(shared): State<Shared>, request: Request, next: Next) -> Response {
    if let Some(token) = &shared.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes)
            .unwrap_or_default();
        if !authorized(given, token) {
            let mut refused = StatusCode::UNAUTHORIZED.into_response();
            let headers = refused.headers_mut();
            headers.append(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            headers.append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"granary admin\", charset=\"UTF-8\""),
            );
            return refused;
        }
    }
    next.run(request).await
}

/// Whether an `Authorization` header's value carries `token` (rule 2):
/// as a bearer token, or as the password of Basic credentials.
fn authorized(given: &[u8], token: &[u8]) -> bool {
    let Some(space) = given.iter().position(|&byte| byte == b' ') else {
        return false;
    };
    let (scheme, credentials) = (&given[..space], given[space + 1..].trim_ascii());
    if scheme.eq_ignore_ascii_case(b"bearer") {
        return constant_time_eq(credentials, token);
    }
    if scheme.eq_ignore_ascii_case(b"basic") {
        use base64::Engine;
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(credentials) else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|&byte| byte == b':') else {
            return false;
        };
        return constant_time_eq(&decoded[colon + 1..], token);
    }
    false
}

/// Whether `a` and `b` are equal, in time that depends only on their
/// lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |differ, (x, y)| differ | (x ^ y)) == 0
}

/// Rule 6.
async fn serve_cluster(State(shared): State<Shared>) -> axum::Json<ClusterView> {
    axum::Json(cluster::view(&shared.sources))
}

/// Rule 3.
async fn serve_metrics(State(shared): State<Shared>) -> Response {
    let text = metrics::render(&shared.sources);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"Bearer abc", b"Bearer abc"));
        assert!(!constant_time_eq(b"Bearer abd", b"Bearer abc"));
        assert!(!constant_time_eq(b"Bearer ab", b"Bearer abc"));
        assert!(!constant_time_eq(b"", b"Bearer abc"));
    }
}
