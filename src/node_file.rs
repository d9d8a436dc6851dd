//! A silo of a cluster from a TOML file: what `granary node --config FILE`
//! runs.
//!
//! The file ([`NodeFile`]) says where the node listens and gossips, the
//! cluster's name and secret, the failure detector's settings, where grain
//! state is kept ([`StorageFile`]), which devices the node lends grains
//! ([`DevicesFile`]) and, in a build with the `etcd` feature, the etcd that
//! holds membership and the directory instead of gossip ([`EtcdFile`]).
//!
//! The grains a node hosts are not in the file: the program that starts
//! the node passes them as a [`NodeGrains`], which registers its grain
//! types and messages on the silo and may set the node's placement and its
//! grains' device needs. `granary node` hosts the cluster demo's grains
//! ([`crate::cluster_demo::DemoGrains`]); a program of your own passes its
//! own (`samples/cluster-demo` shows one):
//!
//! ```no_run
//! use granary::actors::{Grain, GrainContext, GrainKey, GrainType, Handler, Message, SiloBuilder};
//! use granary::node_file::{self, NodeDevices, NodeFile, NodeRunError};
//! use serde::{Deserialize, Serialize};
//!
//! /// Hosted as "counter", taking "add" from other silos.
//! #[derive(GrainType)]
//! #[grain(crate = granary::actors, name = "counter", messages(Add))]
//! struct Counter(u64);
//! impl Grain for Counter {
//!     fn new(_: &GrainKey) -> Counter {
//!         Counter(0)
//!     }
//! }
//!
//! #[derive(Message, Serialize, Deserialize)]
//! #[message(crate = granary::actors, name = "add", reply = u64)]
//! struct Add(u64);
//! impl Handler<Add> for Counter {
//!     async fn handle(&mut self, Add(n): Add, _: &mut GrainContext) -> u64 {
//!         self.0 += n;
//!         self.0
//!     }
//! }
//!
//! # async fn run() -> Result<(), NodeRunError> {
//! let file = NodeFile::load("node.toml".as_ref())?;
//! let grains = |silo: SiloBuilder, _: &NodeDevices| silo.host::<Counter>();
//! node_file::run_node(file, &grains).await
//! # }
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use granary_actors::{Silo, SiloBuilder, StorageProvider};
use granary_cluster::tls::{TlsFiles, TlsIdentity, TlsTransport};
use granary_cluster::{
    ClusterNode, ClusterSecret, GpuNeeds, NodeBuilder, NodeConfig, TcpTransport,
};
use granary_gpu::{GpuBridge, Requirements};
use granary_kernels::BackendKind;
use granary_kernels::shipped;
use serde::{Deserialize, Serialize};

/// A node's TOML configuration (`granary node --config FILE`). Its `Debug`
/// hides the cluster secret, the admin token and the database URL.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// The cluster's name.
    pub cluster: String,
    /// The cluster's secret: 32 random bytes as 64 hexadecimal digits
    /// (`granary secret` prints one).
    pub secret: String,
    /// Where to listen for other silos.
    pub listen: String,
    /// Where to gossip (UDP).
    pub gossip: SocketAddr,
    /// Gossip addresses to join through.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// How often to gossip, in milliseconds (default 200).
    #[serde(default)]
    pub gossip_interval_ms: Option<u64>,
    /// Phi above which a silent silo is suspected: about how many gossip
    /// intervals of silence that takes (default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phi_threshold: Option<f64>,
    /// How long a suspected silo stays in the view before it is declared
    /// dead, in milliseconds (default 4000). A silo is declared dead after
    /// about `phi_threshold × gossip_interval_ms + death_grace_ms` of
    /// silence: lower is faster failover and more false deaths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub death_grace_ms: Option<u64>,
    /// Where grain state is kept.
    pub storage: StorageFile,
    /// The devices this node offers.
    #[serde(default)]
    pub devices: DevicesFile,
    /// Membership and the grain directory in etcd instead of gossip (the
    /// `etcd` build feature); `gossip` and `seeds` are then not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdFile>,
    /// The admin endpoint: Prometheus metrics and health probes over HTTP
    /// (`crate::admin`); none unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminFile>,
    /// How long a node asked to stop (SIGTERM, SIGINT) may take to drain,
    /// in seconds (default 30): past it, the run ends with an error. Zero
    /// gives a drain no time at all: every stop ends that way, with no
    /// graceful leave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_grace_secs: Option<u64>,
    /// Bounds on what the silo holds ([`LimitsFile`]); the runtime's
    /// defaults without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsFile>,
    /// Mutual TLS between silos (`granary_cluster::tls`); plaintext
    /// connections (authenticated, not encrypted) without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFile>,
    /// The rebalancer and device-memory pressure
    /// (`granary_cluster::rebalance`). Without it, grains move only when
    /// asked to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<RebalanceFile>,
}

/// The rebalancer's settings (`rebalance = { … }`): the
/// [`RebalanceConfig`](granary_cluster::rebalance::RebalanceConfig)
/// settings of those names, each absent one its default. Refused at start:
/// fractions outside 0 to 1, a hysteresis above the high water mark, a
/// zero interval or `moves_per_round`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebalanceFile {
    /// How often the silo decides, in milliseconds (default 5000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// The fraction of a device's memory past which the silo moves or
    /// sheds GPU grains and takes no new one (default 0.9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_water: Option<f64>,
    /// How far below `high_water` a shedding silo goes, and a move may
    /// fill a target (default 0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hysteresis: Option<f64>,
    /// How far above the emptiest silo a silo may be before it spreads its
    /// grains (default 0.15).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin: Option<f64>,
    /// Requests waiting on a device that count as a long queue (default
    /// 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<u64>,
    /// Rounds in a row a queue must stay long (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_rounds: Option<u32>,
    /// The most moves a silo starts in one round (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moves_per_round: Option<usize>,
    /// How long a grain that moved stays put, in seconds (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cool_down_secs: Option<u64>,
    /// How long a grain must have been idle before pressure deactivates
    /// it, in seconds (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shed_idle_secs: Option<u64>,
}

impl RebalanceFile {
    /// The settings the file gives, the defaults for the rest.
    pub fn config(&self) -> granary_cluster::rebalance::RebalanceConfig {
        let mut config = granary_cluster::rebalance::RebalanceConfig::default();
        if let Some(ms) = self.interval_ms {
            config.interval = Duration::from_millis(ms);
        }
        if let Some(high_water) = self.high_water {
            config.high_water = high_water;
        }
        if let Some(hysteresis) = self.hysteresis {
            config.hysteresis = hysteresis;
        }
        if let Some(margin) = self.margin {
            config.margin = margin;
        }
        if let Some(depth) = self.queue_depth {
            config.queue_depth = depth;
        }
        if let Some(rounds) = self.queue_rounds {
            config.queue_rounds = rounds;
        }
        if let Some(moves) = self.moves_per_round {
            config.moves_per_round = moves;
        }
        if let Some(secs) = self.cool_down_secs {
            config.cool_down = Duration::from_secs(secs);
        }
        if let Some(secs) = self.shed_idle_secs {
            config.shed_idle = Duration::from_secs(secs);
        }
        config
    }
}

/// Bounds on a node's silo (`limits = { … }`): the
/// [`SiloConfig`](granary_actors::SiloConfig) settings of those names; one
/// absent keeps what the node's grains registered (the runtime's default,
/// unless they set it). Refused at start: a zero `storage_timeout_ms` or
/// `activation_limit`, and an `activation_limit` below `max_activations`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// While more activations than this are alive, idle ones are
    /// deactivated early (default: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_activations: Option<u64>,
    /// The most activations alive at once: a call that would start one
    /// more is refused with `Overloaded` (default: no limit). Set it above
    /// `max_activations`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_limit: Option<u64>,
    /// How long a grain state operation may wait for storage, in
    /// milliseconds (default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_timeout_ms: Option<u64>,
}

impl LimitsFile {
    /// Sets what the file gives, leaving every other setting as the
    /// node's grains registered it.
    fn apply(&self, config: &mut granary_actors::SiloConfig) {
        if let Some(most) = self.max_activations {
            config.max_activations = Some(most);
        }
        if let Some(limit) = self.activation_limit {
            config.activation_limit = Some(limit);
        }
        if let Some(ms) = self.storage_timeout_ms {
            config.storage_timeout = Duration::from_millis(ms);
        }
    }
}

/// A node's TLS files, PEM (`granary cert` makes them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// The cluster CA's certificate: the only one trusted.
    pub ca: PathBuf,
    /// This node's certificate, naming the IP address of its `listen`
    /// (peers dial the address it binds).
    pub cert: PathBuf,
    /// This node's private key (mode 0600).
    pub key: PathBuf,
}

impl fmt::Debug for NodeFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeFile")
            .field("cluster", &self.cluster)
            .field("secret", &"<hidden>")
            .field("listen", &self.listen)
            .field("gossip", &self.gossip)
            .field("seeds", &self.seeds)
            .field("gossip_interval_ms", &self.gossip_interval_ms)
            .field("phi_threshold", &self.phi_threshold)
            .field("death_grace_ms", &self.death_grace_ms)
            .field("storage", &self.storage)
            .field("devices", &self.devices)
            .field("etcd", &self.etcd)
            .field("admin", &self.admin)
            .field("drain_grace_secs", &self.drain_grace_secs)
            .field("limits", &self.limits)
            .field("tls", &self.tls)
            .field("rebalance", &self.rebalance)
            .finish()
    }
}

/// Where a node serves its admin endpoint (`crate::admin`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// The address (`127.0.0.1:9100`); one that is not loopback needs a
    /// token.
    pub listen: SocketAddr,
    /// The bearer token every request must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl fmt::Debug for AdminFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminFile")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl AdminFile {
    /// The endpoint's configuration.
    pub fn config(&self) -> crate::admin::AdminConfig {
        crate::admin::AdminConfig {
            listen: self.listen,
            token: self.token.clone(),
        }
    }
}

/// Where a node keeps grain state.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StorageFile {
    /// In memory: lost with the process.
    Memory,
    /// An embedded redb file (one process per file).
    Redb {
        /// The file.
        path: PathBuf,
    },
    /// A SQLite file, shared by the processes of one machine.
    Sqlite {
        /// The file.
        path: PathBuf,
    },
    /// A PostgreSQL server.
    Postgres {
        /// Its connection string.
        url: String,
    },
}

/// A PostgreSQL URL holds its password: `Debug` shows none of it.
impl fmt::Debug for StorageFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageFile::Memory => f.write_str("Memory"),
            StorageFile::Redb { path } => f.debug_struct("Redb").field("path", path).finish(),
            StorageFile::Sqlite { path } => f.debug_struct("Sqlite").field("path", path).finish(),
            StorageFile::Postgres { .. } => f
                .debug_struct("Postgres")
                .field("url", &"<hidden>")
                .finish(),
        }
    }
}

/// Where a node finds etcd, and how it proves itself to it. Its `Debug`
/// hides the password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdFile {
    /// etcd's client endpoints (`http://10.0.0.9:2379`; `https://` with
    /// `ca`).
    pub endpoints: Vec<String>,
    /// Seconds a silo that stops answering stays in the view (default 6).
    pub ttl_secs: Option<u64>,
    /// The CA that signed etcd's certificate: TLS to etcd (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// This node's certificate and key for etcd's client-certificate
    /// authentication (PEM; the key mode 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// See `cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// A user of etcd's authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// That user's password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

impl fmt::Debug for EtcdFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdFile")
            .field("endpoints", &self.endpoints)
            .field("ttl_secs", &self.ttl_secs)
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// The devices a node offers grains.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesFile {
    /// Which backend's devices: `cpu` (the default), `opencl`, `cuda` or
    /// `wgpu` (Vulkan, Metal or DX12; no persistent kernels, one dispatch
    /// per micro-batch of ring requests). With a device backend the CPU
    /// stays as the fallback for requests;
    /// grains whose device needs name the node's backend
    /// ([`NodeDevices::needs`]) are placed on that backend's devices only.
    #[serde(default)]
    pub backend: DeviceBackend,
    /// The most memory this node lends on each device, in MiB (default:
    /// what the device has free). Silos that share a device each take a
    /// share. `cpu_memory_mib` is the older name.
    #[serde(alias = "cpu_memory_mib")]
    pub memory_mib: Option<u64>,
    /// Offer no devices at all: the node only routes (it joins as a
    /// client, `NodeBuilder::client`, and hosts no grain).
    #[serde(default)]
    pub none: bool,
}

/// A node's device backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceBackend {
    /// The CPU backend: a thread runs each kernel loop.
    #[default]
    Cpu,
    /// OpenCL devices (a runtime must be installed).
    #[value(name = "opencl")]
    OpenCl,
    /// CUDA GPUs (a driver, NVRTC and a GPU must be present).
    Cuda,
    /// Vulkan, Metal or DX12 adapters through wgpu (a Vulkan driver such as
    /// Mesa's lavapipe on Linux). They run no persistent kernel: ring
    /// requests go out one dispatch per micro-batch.
    Wgpu,
}

impl DeviceBackend {
    /// The bridge's name for it.
    pub fn kind(self) -> BackendKind {
        match self {
            DeviceBackend::Cpu => BackendKind::Cpu,
            DeviceBackend::OpenCl => BackendKind::OpenCl,
            DeviceBackend::Cuda => BackendKind::Cuda,
            DeviceBackend::Wgpu => BackendKind::Wgpu,
        }
    }
}

/// Why a node could not start or run: the file, its storage, its devices,
/// the cluster, or the node stopping by itself; the message names which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRunError(pub String);

impl fmt::Display for NodeRunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for NodeRunError {}

impl NodeFile {
    /// Reads and checks the TOML file at `path`. The file holds the
    /// cluster's secret: one that others than its owner may read or write
    /// (any group or other permission bit) is refused, as ssh refuses such
    /// a private key.
    pub fn load(path: &Path) -> Result<NodeFile, NodeRunError> {
        check_private(path)
            .map_err(|why| NodeRunError(format!("{why} (it holds the cluster secret)")))?;
        let text = std::fs::read_to_string(path)
            .map_err(|err| NodeRunError(format!("{}: {err}", path.display())))?;
        NodeFile::from_toml(&text).map_err(|err| NodeRunError(format!("{}: {err}", path.display())))
    }

    /// Writes the file as TOML to `path`, readable and writable by its
    /// owner only (what [`NodeFile::load`] asks of it).
    pub fn save(&self, path: &Path) -> Result<(), NodeRunError> {
        write_private(path, &self.to_toml()?)
            .map_err(|err| NodeRunError(format!("{}: {err}", path.display())))
    }

    /// Reads and checks a node's configuration from TOML text. An error
    /// names the line and column and what is wrong there, never the line
    /// itself: it may hold the admin token, the cluster secret or a
    /// database password.
    pub fn from_toml(text: &str) -> Result<NodeFile, NodeRunError> {
        let file: NodeFile = toml::from_str(text).map_err(|err| toml_error(text, &err))?;
        file.check()?;
        Ok(file)
    }

    /// The checks of values the node would take and then misbehave on,
    /// made when a file is read and again when a node starts from one
    /// (which may have been built in code).
    pub fn check(&self) -> Result<(), NodeRunError> {
        // A threshold that is not a positive number would suspect every
        // silo or none (a fuzz target found NaN read as a threshold); one
        // past `MAX_PHI` times the gossip interval is no duration.
        if let Some(phi) = self.phi_threshold {
            if !(phi.is_finite() && phi > 0.0 && phi <= granary_cluster::MAX_PHI) {
                return Err(NodeRunError(format!(
                    "phi_threshold = {phi}: a positive number, at most {} (8.0 by default)",
                    granary_cluster::MAX_PHI
                )));
            }
        }
        // Admin rules 1 and 2, before the node joins a cluster it would
        // leave again at once.
        if let Some(admin) = &self.admin {
            admin
                .config()
                .check()
                .map_err(|err| NodeRunError(format!("admin: {err}")))?;
        }
        // A zero interval would gossip without pause (it was once taken
        // for 1 ms: a thousand rounds a second).
        if self.gossip_interval_ms == Some(0) {
            return Err(NodeRunError(
                "gossip_interval_ms = 0: more than zero (200 by default)".into(),
            ));
        }
        Ok(())
    }

    /// The file as TOML text (what [`NodeFile::from_toml`] reads back).
    pub fn to_toml(&self) -> Result<String, NodeRunError> {
        toml::to_string(self).map_err(|err| NodeRunError(err.to_string()))
    }
}

/// What a node's file gave it in devices: told to [`NodeGrains`], so that
/// grains can be pointed at the node's backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeDevices {
    /// The backend the file names (the CPU by default).
    pub backend: DeviceBackend,
    /// Whether the node lends devices at all: `false` for a node whose file
    /// says `devices = { none = true }`, which joins as a client, serves
    /// no GPU bridge and hosts no grain.
    pub offered: bool,
}

impl NodeDevices {
    /// Bridge requirements for the node's backend: what a grain passes
    /// when it allocates or runs on a device, so that it uses the backend
    /// the file names rather than the CPU fallback.
    pub fn requirements(&self) -> Requirements {
        Requirements {
            backend: Some(self.backend.kind()),
            ..Requirements::default()
        }
    }

    /// Placement needs of a grain that keeps `device_memory` bytes on a
    /// device of the node's backend (for [`NodeBuilder::needs`]).
    pub fn needs(&self, device_memory: u64) -> GpuNeeds {
        GpuNeeds {
            device_memory,
            backend: Some(format!("{:?}", self.backend.kind())),
            ..GpuNeeds::default()
        }
    }
}

/// The grains a node hosts, and how the cluster treats them: what a
/// program passes to [`start_node`] and [`run_node`] besides the file.
///
/// A function `Fn(SiloBuilder, &NodeDevices) -> SiloBuilder` is one: it
/// registers the grain types and their messages (`silo.host::<G>()` for
/// each `#[derive(GrainType)]`), and nothing else.
pub trait NodeGrains: Send + Sync {
    /// Registers the grain types this node hosts (a client node registers
    /// them too, for their message names), their messages, and any silo
    /// services they need. The node then sets the file's storage and, where
    /// the node lends devices, serves its GPU bridge to grains
    /// (`ctx.service::<GpuBridge>()`).
    fn register(&self, silo: SiloBuilder, devices: &NodeDevices) -> SiloBuilder;

    /// Sets the node's placement and its grains' device needs (by default
    /// nothing: `ClusterNode::builder`'s GPU-aware placement with a
    /// rendezvous-hash fallback, and no needs).
    fn configure(&self, node: NodeBuilder, devices: &NodeDevices) -> NodeBuilder {
        let _ = devices;
        node
    }

    /// Told once the node has joined the cluster (by default nothing).
    fn started(&self, node: &ClusterNode) {
        let _ = node;
    }
}

impl<F> NodeGrains for F
where
    F: Fn(SiloBuilder, &NodeDevices) -> SiloBuilder + Send + Sync,
{
    fn register(&self, silo: SiloBuilder, devices: &NodeDevices) -> SiloBuilder {
        self(silo, devices)
    }
}

/// A TOML error without the snippet of the file that `toml` prints with it
/// (the line may carry a secret): its message, line and column. A value of
/// the wrong type or range is not quoted either: serde's message would
/// (`invalid type: string "postgres://user:password@…"`, an unquoted
/// token read as an integer).
fn toml_error(text: &str, err: &toml::de::Error) -> NodeRunError {
    let message = err.message();
    let message = match message.split_once(", expected ") {
        Some((found, expected))
            if found.starts_with("invalid type") || found.starts_with("invalid value") =>
        {
            // "invalid type: string \"…\"": the kind of value stays.
            let (kind, value) = found.split_once(": ").unwrap_or((found, ""));
            let of = value.split([' ', '`', '"']).next().unwrap_or("");
            format!("{kind} ({of} not shown: it may be a secret), expected {expected}")
        }
        // A variant's name is shown when it is short and plain (`tpu`),
        // not when it could be a secret put in the wrong place.
        Some((found, expected)) if found.starts_with("unknown variant") => {
            let name = found
                .trim_start_matches("unknown variant")
                .trim()
                .trim_matches('`');
            let plain = name.len() <= 16
                && name
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-');
            if plain {
                message.to_string()
            } else {
                format!("unknown variant (not shown: it may be a secret), expected {expected}")
            }
        }
        _ => message.to_string(),
    };
    match err.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            NodeRunError(format!("TOML line {line}, column {column}: {message}"))
        }
        None => NodeRunError(format!("TOML: {message}")),
    }
}

/// `open` on a blocking thread, its failure as the node's.
async fn blocking<T: Send + 'static>(
    open: impl FnOnce() -> Result<T, granary_actors::StorageError> + Send + 'static,
) -> Result<T, NodeRunError> {
    tokio::task::spawn_blocking(open)
        .await
        .map_err(|err| NodeRunError(format!("storage: opening it failed: {err}")))?
        .map_err(|err| NodeRunError(format!("storage: {err}")))
}

async fn open_storage(file: &StorageFile) -> Result<Arc<dyn StorageProvider>, NodeRunError> {
    let fail = |err: granary_actors::StorageError| NodeRunError(format!("storage: {err}"));
    Ok(match file {
        StorageFile::Memory => Arc::new(granary_actors::MemoryStorage::new()),
        // Opening is file I/O, a redb repair after a crash, or SQLite's
        // retries while another process holds the file (up to seconds):
        // on a blocking thread, not a runtime worker.
        StorageFile::Redb { path } => {
            let path = path.clone();
            Arc::new(blocking(move || granary_actors::RedbStorage::open(path)).await?)
        }
        StorageFile::Sqlite { path } => {
            let path = path.clone();
            Arc::new(blocking(move || granary_actors::SqliteStorage::open(path)).await?)
        }
        StorageFile::Postgres { url } => Arc::new(
            granary_actors::PostgresStorage::connect(url)
                .await
                .map_err(fail)?,
        ),
    })
}

/// The GPU bridge the file's devices describe (with the shipped kernels),
/// or `None` for a node that lends none.
fn open_bridge(devices: &DevicesFile) -> Result<Option<Arc<GpuBridge>>, NodeRunError> {
    if devices.none {
        return Ok(None);
    }
    let mut builder = GpuBridge::builder().kernels(shipped::ALL);
    if let Some(hang) = test_kernel_hang()? {
        let cpu = granary_kernels::CpuBackend::new();
        cpu.hooks().hang_after(hang.0, hang.1);
        builder = builder.cpu_backend(cpu);
    }
    builder = match devices.backend {
        DeviceBackend::Cpu => builder,
        DeviceBackend::OpenCl => builder.backend(Arc::new(
            granary_kernels::opencl::OpenClBackend::discover()
                .map_err(|err| NodeRunError(format!("devices: OpenCL: {err}")))?,
        )),
        DeviceBackend::Cuda => builder.backend(Arc::new(
            granary_kernels::cuda::CudaBackend::discover()
                .map_err(|err| NodeRunError(format!("devices: CUDA: {err}")))?,
        )),
        DeviceBackend::Wgpu => builder.backend(Arc::new(
            granary_kernels::wgpu::WgpuBackend::discover()
                .map_err(|err| NodeRunError(format!("devices: wgpu: {err}")))?,
        )),
    };
    if let Some(mib) = devices.memory_mib {
        let bytes = mib
            .checked_mul(1 << 20)
            .ok_or_else(|| NodeRunError(format!("devices: memory_mib {mib} is too large")))?;
        builder = builder.device_memory_limit(bytes);
    }
    Ok(Some(Arc::new(
        builder
            .build()
            .map_err(|err| NodeRunError(format!("bridge: {err}")))?,
    )))
}

/// The environment variable that arms a hang in the CPU backend's kernels
/// (`granary_kernels::hooks`): `AFTER:MILLIS` lets `AFTER` requests pass,
/// then holds the next one for `MILLIS` milliseconds without a heartbeat.
/// For tests of the probes and the bridge's recovery with real processes.
pub const TEST_KERNEL_HANG: &str = "GRANARY_TEST_KERNEL_HANG";

/// The hang [`TEST_KERNEL_HANG`] asks for, if it is set.
fn test_kernel_hang() -> Result<Option<(u64, Duration)>, NodeRunError> {
    let Some(value) = std::env::var_os(TEST_KERNEL_HANG) else {
        return Ok(None);
    };
    let bad = || {
        NodeRunError(format!(
            "{TEST_KERNEL_HANG}={value:?}: expected AFTER:MILLIS, two whole numbers"
        ))
    };
    let text = value.to_str().ok_or_else(bad)?;
    let (after, millis) = text.split_once(':').ok_or_else(bad)?;
    let after = after.trim().parse().map_err(|_| bad())?;
    let millis = millis.trim().parse().map_err(|_| bad())?;
    tracing::warn!(
        after,
        millis,
        "{TEST_KERNEL_HANG} arms a kernel hang (a test hook)"
    );
    Ok(Some((after, Duration::from_millis(millis))))
}

/// Refuses a file holding a secret (a key) that others than its owner may
/// read or write (`granary_cluster::tls::others_may_access`).
pub(crate) fn check_private(path: &Path) -> Result<(), String> {
    match granary_cluster::tls::others_may_access(path) {
        Ok(None) => Ok(()),
        Ok(Some(mode)) => Err(format!(
            "{}: a secret others may read or write (mode {mode:04o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        )),
        Err(err) => Err(format!("{}: {err}", path.display())),
    }
}

/// Writes `text` to `path` with mode 0600 (on Unix): a node file holds the
/// cluster's secret. The text goes to a new file of that mode in the same
/// folder, which then takes `path`'s name: no reader of an earlier file
/// there, and no link planted at `path`, sees the new text.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    // tempfile creates it exclusively, mode 0600.
    let mut file = tempfile::NamedTempFile::new_in(folder)?;
    file.write_all(text.as_bytes())?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|err| err.error)?;
    Ok(())
}

/// The node's settings from the file: addresses, seeds and the failure
/// detector (load is published as often as the node gossips).
fn node_config(file: &NodeFile) -> Result<NodeConfig, NodeRunError> {
    let secret =
        ClusterSecret::from_hex(&file.secret).map_err(|err| NodeRunError(err.to_string()))?;
    // A silo is known to its peers by the addresses it binds: 0.0.0.0
    // (or ::) would be told to them as is, and reach no one.
    let unspecified = |what: &str, address: &str| {
        NodeRunError(format!(
            "{what} = {address:?}: a silo is known to its peers by the address it binds, \
             so it must be this host's own address, not an unspecified one"
        ))
    };
    if file
        .listen
        .parse::<SocketAddr>()
        .is_ok_and(|address| address.ip().is_unspecified())
    {
        return Err(unspecified("listen", &file.listen));
    }
    if file.gossip.ip().is_unspecified() && file.etcd.is_none() {
        return Err(unspecified("gossip", &file.gossip.to_string()));
    }
    let mut config = NodeConfig::new(
        file.cluster.clone(),
        secret,
        file.listen.clone(),
        file.gossip,
        file.seeds.clone(),
    );
    // `from_toml` checked it; a file built in code is checked here.
    file.check()?;
    if let Some(ms) = file.gossip_interval_ms {
        config.gossip_interval = Duration::from_millis(ms);
    }
    if let Some(phi) = file.phi_threshold {
        config.phi_threshold = phi;
    }
    if let Some(ms) = file.death_grace_ms {
        config.death_grace = Duration::from_millis(ms);
    }
    config.load_interval = config.gossip_interval;
    if let Some(rebalance) = &file.rebalance {
        let rebalance = rebalance.config();
        rebalance
            .validate()
            .map_err(|why| NodeRunError(format!("rebalance: {why}")))?;
        config.rebalance = Some(rebalance);
    }
    Ok(config)
}

/// Starts the node `file` describes, hosting `grains`; returns once it has
/// joined (through gossip, or etcd where the file names one).
///
/// The silo gets the grains' registrations, the file's storage and, unless
/// the file says `devices = { none = true }`, a GPU bridge with the shipped
/// kernels on the file's backend, lending at most `memory_mib` per device;
/// a node with no devices joins as a client. The node listens over TCP.
pub async fn start_node(
    file: &NodeFile,
    grains: &dyn NodeGrains,
) -> Result<ClusterNode, NodeRunError> {
    let config = node_config(file)?;
    // Gossip sealed with the cluster's secret (`granary_cluster::gossip`).
    let gossip = granary_cluster::gossip::SealedUdpTransport::new(
        config.secret.clone(),
        file.cluster.clone(),
    );
    let storage = open_storage(&file.storage).await?;
    let bridge = open_bridge(&file.devices)?;
    let devices = NodeDevices {
        backend: file.devices.backend,
        offered: !file.devices.none,
    };
    let mut silo = grains.register(Silo::builder(), &devices).storage(storage);
    if let Some(limits) = &file.limits {
        silo = silo.configure(|config| limits.apply(config));
    }
    if let Some(bridge) = bridge {
        silo = silo.service(bridge);
    }
    let silo = silo
        .build()
        .map_err(|err| NodeRunError(format!("silo: {err}")))?;
    let transport: Arc<dyn granary_cluster::Transport> = match &file.tls {
        None => Arc::new(TcpTransport),
        Some(tls) => {
            let identity = TlsIdentity::load(&TlsFiles {
                ca: tls.ca.clone(),
                cert: tls.cert.clone(),
                key: tls.key.clone(),
            })
            .map_err(|err| NodeRunError(format!("tls: {err}")))?;
            // Peers dial the address this node binds and check that its
            // certificate names it: a certificate they would refuse is
            // found here.
            if let Ok(listen) = file.listen.parse::<SocketAddr>() {
                let read = |path: &Path| {
                    std::fs::read(path)
                        .map_err(|err| NodeRunError(format!("tls: {}: {err}", path.display())))
                };
                let host = listen.ip().to_string();
                granary_cluster::tls::verify_issued(&read(&tls.ca)?, &read(&tls.cert)?, &host)
                    .map_err(|why| {
                        NodeRunError(format!(
                            "tls: {} is not valid for {host}, the address peers dial this node \
                             at ({why}); make one with `granary cert {host}`",
                            tls.cert.display()
                        ))
                    })?;
            }
            Arc::new(TlsTransport::new(
                Arc::new(TcpTransport),
                identity,
                config.connection.handshake_timeout,
            ))
        }
    };
    let mut builder = grains.configure(
        ClusterNode::builder(silo, config)
            .transport(transport)
            .gossip_stats(gossip.stats()),
        &devices,
    );
    if file.devices.none {
        builder = builder.client();
    }
    let node = match &file.etcd {
        None => builder
            .start(gossip)
            .await
            .map_err(|err| NodeRunError(err.to_string()))?,
        Some(etcd) => start_with_etcd(builder, &file.cluster, etcd).await?,
    };
    grains.started(&node);
    Ok(node)
}

#[cfg(feature = "etcd")]
async fn start_with_etcd(
    builder: NodeBuilder,
    cluster: &str,
    etcd: &EtcdFile,
) -> Result<ClusterNode, NodeRunError> {
    let mut config = granary_cluster::etcd::EtcdConfig::new(cluster, etcd.endpoints.clone());
    if let Some(secs) = etcd.ttl_secs {
        config.ttl = Duration::from_secs(secs);
    }
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map_err(|err| NodeRunError(format!("etcd: {}: {err}", path.display())))
    };
    config.tls = match (&etcd.ca, &etcd.cert, &etcd.key) {
        (None, None, None) => None,
        (Some(ca), None, None) => Some(granary_cluster::etcd::EtcdTls {
            ca_pem: read(ca)?,
            identity: None,
            domain: None,
        }),
        (Some(ca), Some(cert), Some(key)) => {
            check_private(key).map_err(|why| NodeRunError(format!("etcd: {why}")))?;
            Some(granary_cluster::etcd::EtcdTls {
                ca_pem: read(ca)?,
                identity: Some((read(cert)?, read(key)?)),
                domain: None,
            })
        }
        _ => {
            return Err(NodeRunError(
                "etcd: `cert` and `key` go together, and with `ca`".into(),
            ));
        }
    };
    config.user = match (&etcd.user, &etcd.password) {
        (None, None) => None,
        (Some(name), Some(password)) => Some(granary_cluster::etcd::EtcdUser {
            name: name.clone(),
            password: password.clone(),
        }),
        _ => {
            return Err(NodeRunError(
                "etcd: `user` and `password` go together".into(),
            ));
        }
    };
    builder
        .start_with_etcd(config)
        .await
        .map_err(|err| NodeRunError(err.to_string()))
}

#[cfg(not(feature = "etcd"))]
async fn start_with_etcd(
    _: NodeBuilder,
    _: &str,
    _: &EtcdFile,
) -> Result<ClusterNode, NodeRunError> {
    Err(NodeRunError(
        "etcd: this granary was built without the etcd feature \
         (cargo build --release --features etcd; it needs protoc)"
            .into(),
    ))
}

/// How long a node drains by default before it gives up (seconds).
pub const DEFAULT_DRAIN_GRACE_SECS: u64 = 30;

/// Runs the node `file` describes, hosting `grains`, until SIGTERM or
/// SIGINT (Ctrl-C), then drains ([`drain`]) within the file's
/// `drain_grace_secs`; a second signal ends the run at once, with an error.
/// Under etcd, a node that loses its lease stops serving by itself: that
/// ends the run with an error (a restart rejoins as a new incarnation).
pub async fn run_node(file: NodeFile, grains: &dyn NodeGrains) -> Result<(), NodeRunError> {
    let mut signals = Signals::new()?;
    // Installed before the node starts, so that what the bridge records
    // from its first request on reaches `/metrics`.
    let recorder = file
        .admin
        .as_ref()
        .and_then(|_| crate::admin::install_recorder());
    // A signal while the node starts (its storage or etcd may take long
    // to answer) ends the run rather than waiting for the start.
    let node = tokio::select! {
        started = start_node(&file, grains) => started?,
        signal = signals.next() => {
            signal?;
            return Err(NodeRunError("a signal came while the node was starting".into()));
        }
    };
    say(format_args!(
        "granary node: {} in cluster {:?}, gossip on {}",
        node.id(),
        file.cluster,
        file.gossip
    ));
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let admin = match &file.admin {
        Some(admin) => {
            let mut sources = crate::admin::AdminSources::of_node(&node).with_recorder(recorder);
            sources.draining = draining.clone();
            let started = crate::admin::Admin::start(&admin.config(), sources).await;
            match started {
                Ok(admin) => {
                    say(format_args!(
                        "granary node: admin endpoint on http://{}",
                        admin.address()
                    ));
                    Some(admin)
                }
                Err(err) => {
                    let _ = node.leave().await;
                    return Err(NodeRunError(format!("admin: {err}")));
                }
            }
        }
        None => None,
    };
    let stopped = async {
        while !node.is_stopped() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        signal = signals.next() => {
            signal?;
        }
        () = stopped => {
            return Err(NodeRunError(
                "the node stopped serving: it lost its etcd lease, or could not gossip again \
                 as a new incarnation after a stall (see the log); restart it to rejoin"
                    .into(),
            ));
        }
    }
    let grace = Duration::from_secs(file.drain_grace_secs.unwrap_or(DEFAULT_DRAIN_GRACE_SECS));
    say(format_args!(
        "granary node: draining, at most {grace:?} (a second signal ends it now)"
    ));
    draining.store(true, std::sync::atomic::Ordering::Release);
    let drained = tokio::select! {
        drained = tokio::time::timeout(grace, drain(&node)) => match drained {
            Ok(drained) => drained,
            Err(_) => Err(NodeRunError(format!("the drain did not finish within {grace:?}"))),
        },
        _ = signals.next() => Err(NodeRunError("a second signal: stopped without draining".into())),
    };
    // Drained: the endpoint finishes what it serves. Otherwise (a second
    // signal, the grace spent) it is dropped, not waited for.
    if let Some(admin) = admin {
        if drained.is_ok() {
            admin.stop().await;
        }
    }
    if drained.is_ok() {
        say(format_args!("granary node: drained"));
    }
    drained
}

/// Drains `node`, in order ([`ClusterNode::leave`], then the silo and the
/// bridge): its migratable GPU grains move to other silos with their
/// state, then the node refuses new calls (a caller is told it is
/// shutting down, and asks the directory again), every activation finishes
/// the messages it had taken and writes its state as it deactivates, and
/// only then does the node leave the membership, so that no peer places
/// one of its grains elsewhere while it is still active here; then the
/// silo shuts down and the GPU bridge's kernels drain (every request they
/// took is answered).
pub async fn drain(node: &ClusterNode) -> Result<(), NodeRunError> {
    let left = node.leave().await;
    node.silo().shutdown().await;
    if let Some(bridge) = node.silo().service::<GpuBridge>() {
        bridge.shutdown(granary_kernels::StopMode::Drain).await;
    }
    left.map_err(|err| NodeRunError(format!("leaving the cluster: {err}")))
}

/// A line on standard output; a closed or full output (a supervisor that
/// stopped reading) is not a reason to stop serving.
fn say(line: fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// SIGTERM and SIGINT, as one stream.
pub(crate) struct Signals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn new() -> Result<Signals, NodeRunError> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind| {
                signal(kind).map_err(|err| NodeRunError(format!("listening for signals: {err}")))
            };
            Ok(Signals {
                terminate: listen(SignalKind::terminate())?,
                interrupt: listen(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// The next SIGTERM or SIGINT.
    pub(crate) async fn next(&mut self) -> Result<(), NodeRunError> {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.terminate.recv() => Ok(()),
                _ = self.interrupt.recv() => Ok(()),
            }
        }
        #[cfg(not(unix))]
        tokio::signal::ctrl_c()
            .await
            .map_err(|err| NodeRunError(format!("waiting for Ctrl-C: {err}")))
    }
}
