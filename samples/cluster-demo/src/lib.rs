//! The multi-node sample, run by the `granary` CLI: `granary node` (a silo
//! from a TOML file) and `granary demo --nodes N` (silos as separate
//! processes of the same executable, GPU grains placed by free device
//! memory, each ledger notifying an auditor grain on another silo, one
//! silo killed while load runs, and every grain's persisted state checked
//! afterwards).
//!
//! # The sample grain
//!
//! A [`Ledger`] keeps a resident buffer on its silo's device (reserved in
//! the bridge's broker, so placement elsewhere sees less free memory) and a
//! persisted `(applied, total)`. `Apply { seq, amount }` runs a SAXPY on
//! the resident buffer and adds `amount` if `seq` is the next one: a call
//! retried after its silo died is applied once, so the final totals show
//! whether anything acknowledged was lost.
//!
//! Each `Apply` is also a grain-to-grain call across silos: the ledger
//! notifies its [`Auditor`] (ledger `k`'s is auditor `k % AUDITORS`) with
//! `ctx.grain::<Auditor>(k % AUDITORS).call(Note { … })` before it answers,
//! through the same `GrainRef` the demo itself uses. [`DemoPlacement`]
//! places an auditor on a silo other than the one whose ledger first
//! calls it, so notifications usually cross silos. The auditor persists,
//! per ledger, how many distinct steps it was notified of (a retried step
//! is counted once). A `call` rather than a `tell`: a tell is acknowledged
//! once the auditor's mailbox has taken the note, before its state is
//! written, so a silo killed in between would lose an acknowledged note;
//! the call's answer comes after the write.
//!
//! # The demo
//!
//! 1. Writes one TOML config per silo (each with its own device memory
//!    limit on the CPU backend) and a shared SQLite file for grain state,
//!    and starts `granary node --config …` for each.
//! 2. Joins the cluster itself as a client (`NodeBuilder::client`: it
//!    hosts no grain) and drives `grains` ledgers, each with one caller
//!    sending `calls` sequential `Apply`s; a call that fails is retried
//!    until it succeeds.
//! 3. Halfway, kills (SIGKILL) the silo that hosts the most ledgers.
//! 4. Prints where ledgers lived before and after, latency and
//!    throughput, how many notifications were acknowledged and how many
//!    crossed silos; checks every ledger's persisted total and every
//!    auditor's persisted counts; and takes a census of each live silo's
//!    activations (an [`Inspector`] grain placed on each silo answers with
//!    its `live_activations()` and which ledgers and auditors are active
//!    there), so that a grain active on two silos is caught.
//!
//! With `GRANARY_DEMO_DEBUG` set, the demo also prints its view of the
//! cluster every second and every failed call it retries.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use granary_actors::{
    ActivationError, Grain, GrainContext, GrainKey, Handler, Message, PersistentState, Silo,
    StorageProvider,
};
use granary_cluster::{
    ClusterNode, ClusterSecret, GpuAware, GpuNeeds, HashPlacement, Member, NodeConfig,
    PlacementError, PlacementRequest, PlacementStrategy, SiloId, TcpTransport,
};
use granary_gpu::{ExecuteError, GpuBridge, Output, Part, Requirements, ResidentBuffer};
use granary_kernels::BackendKind;
use granary_kernels::shipped::{self, f32_bytes};
use serde::{Deserialize, Serialize};

/// Bytes of device memory each ledger keeps resident.
pub const LEDGER_DEVICE_BYTES: u64 = 4 << 20;

/// A ledger's persisted state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerState {
    /// The last sequence number applied.
    pub applied: u64,
    /// The sum of the amounts applied.
    pub total: u64,
}

/// The sample GPU grain (see the module docs).
pub struct Ledger {
    /// Its number (ledgers are keyed by number).
    key: Option<u64>,
    state: Option<PersistentState<LedgerState>>,
    bridge: Option<Arc<GpuBridge>>,
    buffer: Option<ResidentBuffer>,
}

impl Grain for Ledger {
    fn new(key: &GrainKey) -> Ledger {
        Ledger {
            key: match key {
                GrainKey::U64(key) => Some(*key),
                _ => None,
            },
            state: None,
            bridge: None,
            buffer: None,
        }
    }

    async fn on_activate(&mut self, ctx: &mut GrainContext) -> Result<(), ActivationError> {
        let bridge = ctx
            .service::<GpuBridge>()
            .ok_or_else(|| ActivationError("no GPU bridge on this silo".into()))?;
        let devices = ctx
            .service::<LedgerDevices>()
            .map_or_else(Requirements::default, |devices| devices.0);
        let buffer = bridge
            .allocate_resident(LEDGER_DEVICE_BYTES as usize, &devices)
            .await
            .map_err(|err| ActivationError(err.to_string()))?;
        self.state = Some(ctx.load_state::<LedgerState>().await?);
        self.buffer = Some(buffer);
        self.bridge = Some(bridge);
        Ok(())
    }

    async fn on_deactivate(&mut self, _: &mut GrainContext) {
        self.buffer = None;
    }
}

/// Applies `amount` as step `seq` (once).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Apply {
    /// The step: applied only if it is the next one.
    pub seq: u64,
    /// What it adds.
    pub amount: u64,
}

impl Message for Apply {
    type Reply = Result<Applied, String>;
}

/// A ledger's answer to [`Apply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Its state after the step.
    pub state: LedgerState,
    /// The auditor's acknowledgement of this step, when the step is the
    /// ledger's last one (a step applied now, or a retry of it).
    pub notified: Option<Notified>,
}

/// Where a notification went: the ledger's silo and its auditor's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notified {
    /// The address of the silo the ledger ran on.
    pub ledger_silo: String,
    /// The address of the silo the auditor ran on.
    pub auditor_silo: String,
}

impl Notified {
    /// Whether the notification went from one silo to another.
    pub fn crossed(&self) -> bool {
        self.ledger_silo != self.auditor_silo
    }
}

impl Handler<Apply> for Ledger {
    async fn handle(&mut self, apply: Apply, ctx: &mut GrainContext) -> Result<Applied, String> {
        let (Some(key), Some(state), Some(bridge), Some(buffer)) =
            (self.key, &mut self.state, &self.bridge, &self.buffer)
        else {
            return Err("the ledger is not active (or not keyed by number)".into());
        };
        if apply.seq == state.get().applied + 1 {
            // The GPU work: y = a·y + y over the resident buffer, in place.
            let scalar = f32_bytes(&[0.5]);
            let parts = [
                Part::Host(&scalar),
                Part::Resident(buffer),
                Part::Resident(buffer),
            ];
            bridge
                .execute_resident("saxpy", &parts, Output::Into(buffer))
                .await
                .map_err(|err: ExecuteError| err.to_string())?;
            let next = LedgerState {
                applied: apply.seq,
                total: state.get().total + apply.amount,
            };
            *state.get_mut() = next;
            state.write().await.map_err(|err| err.to_string())?;
        }
        let state = *state.get();
        if state.applied != apply.seq {
            return Ok(Applied {
                state,
                notified: None,
            });
        }
        // The grain-to-grain call: answered once the auditor (usually on
        // another silo) has persisted the note. A step retried after a
        // failure notifies again; the auditor counts each step once.
        let ledger_silo = here(ctx)?;
        let receipt = ctx
            .grain::<Auditor>(auditor_of(key))
            .call(Note {
                ledger: key,
                seq: apply.seq,
            })
            .await
            .map_err(|err| format!("notifying auditor {}: {err}", auditor_of(key)))??;
        Ok(Applied {
            state,
            notified: Some(Notified {
                ledger_silo,
                auditor_silo: receipt.auditor_silo,
            }),
        })
    }
}

/// Reads a ledger's state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Read;

impl Message for Read {
    type Reply = LedgerState;
}

impl Handler<Read> for Ledger {
    async fn handle(&mut self, _: Read, _: &mut GrainContext) -> LedgerState {
        self.state
            .as_ref()
            .map(|state| *state.get())
            .unwrap_or_default()
    }
}

/// How many auditors the ledgers share: ledger `k` notifies auditor
/// `k % AUDITORS`.
pub const AUDITORS: u64 = 4;

/// The auditor ledger `ledger` notifies.
pub fn auditor_of(ledger: u64) -> u64 {
    ledger % AUDITORS
}

/// The address of the silo a grain runs on, known once its node has
/// started (a silo service that [`start_node`] fills in).
#[derive(Debug, Default)]
pub struct Here(std::sync::OnceLock<String>);

impl Here {
    /// The silo's address, once its node has started.
    pub fn address(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

/// The address of the silo `ctx`'s grain runs on.
fn here(ctx: &GrainContext) -> Result<String, String> {
    ctx.service::<Here>()
        .and_then(|here| here.address().map(str::to_string))
        .ok_or_else(|| "this silo's address is not known yet".to_string())
}

/// What an auditor knows of one ledger.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Distinct steps notified.
    pub notes: u64,
    /// The highest step notified.
    pub last_seq: u64,
}

/// An auditor's persisted state: per ledger, what it was notified of.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditState {
    /// Per ledger key.
    pub ledgers: std::collections::BTreeMap<u64, AuditEntry>,
}

/// The grain ledgers notify (see the module docs): it needs no device,
/// so any silo that hosts the type may hold it.
pub struct Auditor {
    state: Option<PersistentState<AuditState>>,
}

impl Grain for Auditor {
    fn new(_: &GrainKey) -> Auditor {
        Auditor { state: None }
    }

    async fn on_activate(&mut self, ctx: &mut GrainContext) -> Result<(), ActivationError> {
        self.state = Some(ctx.load_state::<AuditState>().await?);
        Ok(())
    }
}

/// Tells an auditor that ledger `ledger` applied step `seq`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Note {
    /// The ledger's key.
    pub ledger: u64,
    /// The step it applied.
    pub seq: u64,
}

/// An auditor's answer to a [`Note`], once persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The address of the silo the auditor runs on.
    pub auditor_silo: String,
}

impl Message for Note {
    type Reply = Result<Receipt, String>;
}

impl Handler<Note> for Auditor {
    async fn handle(&mut self, note: Note, ctx: &mut GrainContext) -> Result<Receipt, String> {
        let auditor_silo = here(ctx)?;
        let Some(state) = &mut self.state else {
            return Err("the auditor is not active".into());
        };
        let entry = state
            .get()
            .ledgers
            .get(&note.ledger)
            .copied()
            .unwrap_or_default();
        // A step seen before (a retried Apply) is not counted again.
        if note.seq > entry.last_seq {
            state.get_mut().ledgers.insert(
                note.ledger,
                AuditEntry {
                    notes: entry.notes + 1,
                    last_seq: note.seq,
                },
            );
            state.write().await.map_err(|err| err.to_string())?;
        }
        Ok(Receipt { auditor_silo })
    }
}

/// Reads an auditor's state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Audit;

impl Message for Audit {
    type Reply = AuditState;
}

impl Handler<Audit> for Auditor {
    async fn handle(&mut self, _: Audit, _: &mut GrainContext) -> AuditState {
        self.state
            .as_ref()
            .map(|state| state.get().clone())
            .unwrap_or_default()
    }
}

/// A grain that answers for the silo it runs on: [`DemoPlacement`] puts
/// the inspector keyed by a silo's address on that silo.
pub struct Inspector;

impl Grain for Inspector {
    fn new(_: &GrainKey) -> Inspector {
        Inspector
    }
}

/// Asks an inspector which ledgers (keys `0..ledgers`) and auditors (keys
/// `0..auditors`) are active on its silo.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Inspect {
    /// Ledger keys to look for.
    pub ledgers: u64,
    /// Auditor keys to look for.
    pub auditors: u64,
}

/// One silo's activations, as its inspector saw them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiloActivity {
    /// The silo's address.
    pub silo: String,
    /// Its `live_activations()` (the inspector's own included).
    pub live: u64,
    /// The ledgers active there.
    pub ledgers: Vec<u64>,
    /// The auditors active there.
    pub auditors: Vec<u64>,
}

impl Message for Inspect {
    type Reply = Result<SiloActivity, String>;
}

impl Handler<Inspect> for Inspector {
    async fn handle(
        &mut self,
        inspect: Inspect,
        ctx: &mut GrainContext,
    ) -> Result<SiloActivity, String> {
        let silo = ctx.silo();
        let active = |grain_type: &str, keys: u64| -> Vec<u64> {
            (0..keys)
                .filter(|key| silo.is_active_named(grain_type, &GrainKey::U64(*key)))
                .collect()
        };
        Ok(SiloActivity {
            silo: here(ctx)?,
            live: silo.live_activations(),
            ledgers: active(LEDGER, inspect.ledgers),
            auditors: active(AUDITOR, inspect.auditors),
        })
    }
}

/// The ledger's registered name.
pub const LEDGER: &str = "ledger";
/// The auditor's registered name.
pub const AUDITOR: &str = "auditor";
/// The inspector's registered name.
pub const INSPECTOR: &str = "inspector";

/// The demo's placement: ledgers by free device memory
/// ([`GpuAware::strict`]); an auditor on a silo other than the caller's
/// (the silo whose ledger first calls it), by rendezvous hash among the
/// others, so that notifications usually cross silos; the inspector keyed
/// by a silo's address on that silo.
#[derive(Debug)]
pub struct DemoPlacement {
    ledgers: GpuAware,
}

impl Default for DemoPlacement {
    fn default() -> DemoPlacement {
        DemoPlacement {
            ledgers: GpuAware::strict(),
        }
    }
}

impl PlacementStrategy for DemoPlacement {
    fn place(
        &self,
        request: &PlacementRequest<'_>,
        members: &[Member],
    ) -> Result<SiloId, PlacementError> {
        match request.grain.type_name.as_str() {
            AUDITOR => {
                let others: Vec<Member> = members
                    .iter()
                    .filter(|member| member.silo != *request.caller)
                    .cloned()
                    .collect();
                if others.is_empty() {
                    HashPlacement.place(request, members)
                } else {
                    HashPlacement.place(request, &others)
                }
            }
            INSPECTOR => match &request.grain.key {
                GrainKey::Str(address) => members
                    .iter()
                    .find(|member| member.silo.address == *address)
                    .map(|member| member.silo.clone())
                    .ok_or(PlacementError::NoSilos),
                _ => Err(PlacementError::NoSilos),
            },
            _ => self.ledgers.place(request, members),
        }
    }
}

/// The silo every node runs: the ledger, the auditor and the inspector
/// with their messages, by name; `here` is filled in with the silo's
/// address once its node has started.
pub fn silo(
    storage: Arc<dyn StorageProvider>,
    bridge: Option<Arc<GpuBridge>>,
    ledger_devices: LedgerDevices,
    here: Arc<Here>,
) -> Result<Silo, String> {
    let mut builder = Silo::builder()
        .register::<Ledger>(LEDGER)
        .message::<Ledger, Apply>("apply")
        .message::<Ledger, Read>("read")
        .register::<Auditor>(AUDITOR)
        .message::<Auditor, Note>("note")
        .message::<Auditor, Audit>("audit")
        .register::<Inspector>(INSPECTOR)
        .message::<Inspector, Inspect>("inspect")
        .storage(storage)
        .service(Arc::new(ledger_devices))
        .service(here);
    if let Some(bridge) = bridge {
        builder = builder.service(bridge);
    }
    builder.build().map_err(|err| err.to_string())
}

/// Where a node keeps grain state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// A node's TOML configuration (`granary node --config FILE`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// The cluster's name.
    pub cluster: String,
    /// The cluster's secret (at least 16 bytes).
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
}

/// The demo's grace before a silent silo is declared dead, in
/// milliseconds (the default is 4000).
const DEMO_DEATH_GRACE_MS: u64 = 500;

/// Where a node finds etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdFile {
    /// etcd's client endpoints (`http://10.0.0.9:2379`).
    pub endpoints: Vec<String>,
    /// Seconds a silo that stops answering stays in the view (default 6).
    pub ttl_secs: Option<u64>,
}

/// The devices a node offers grains.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesFile {
    /// Which backend's devices: `cpu` (the default), `opencl` or `cuda`.
    /// With `opencl` or `cuda` the CPU stays as the fallback for requests,
    /// and ledgers are placed on that backend's devices only.
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
}

impl DeviceBackend {
    /// The bridge's name for it.
    pub fn kind(self) -> BackendKind {
        match self {
            DeviceBackend::Cpu => BackendKind::Cpu,
            DeviceBackend::OpenCl => BackendKind::OpenCl,
            DeviceBackend::Cuda => BackendKind::Cuda,
        }
    }
}

/// The devices a ledger may live on: the node's configured backend.
#[derive(Debug, Clone, Copy)]
pub struct LedgerDevices(pub Requirements);

/// Why a node could not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRunError(pub String);

impl fmt::Display for NodeRunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for NodeRunError {}

impl NodeFile {
    /// Reads and checks the TOML file at `path`.
    pub fn load(path: &Path) -> Result<NodeFile, NodeRunError> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| NodeRunError(format!("{}: {err}", path.display())))?;
        toml::from_str(&text).map_err(|err| NodeRunError(format!("{}: {err}", path.display())))
    }
}

async fn open_storage(file: &StorageFile) -> Result<Arc<dyn StorageProvider>, NodeRunError> {
    let fail = |err: granary_actors::StorageError| NodeRunError(format!("storage: {err}"));
    Ok(match file {
        StorageFile::Memory => Arc::new(granary_actors::MemoryStorage::new()),
        StorageFile::Redb { path } => {
            Arc::new(granary_actors::RedbStorage::open(path).map_err(fail)?)
        }
        StorageFile::Sqlite { path } => {
            Arc::new(granary_actors::SqliteStorage::open(path).map_err(fail)?)
        }
        StorageFile::Postgres { url } => Arc::new(
            granary_actors::PostgresStorage::connect(url)
                .await
                .map_err(fail)?,
        ),
    })
}

/// Starts the node `file` describes; returns once it has joined.
pub async fn start_node(file: &NodeFile) -> Result<ClusterNode, NodeRunError> {
    let secret = ClusterSecret::new(file.secret.as_bytes().to_vec())
        .map_err(|err| NodeRunError(err.to_string()))?;
    let storage = open_storage(&file.storage).await?;
    let backend = file.devices.backend;
    let bridge = if file.devices.none {
        None
    } else {
        let mut builder = GpuBridge::builder().kernels(shipped::ALL);
        builder = match backend {
            DeviceBackend::Cpu => builder,
            DeviceBackend::OpenCl => builder.backend(Arc::new(
                granary_kernels::opencl::OpenClBackend::discover()
                    .map_err(|err| NodeRunError(format!("devices: OpenCL: {err}")))?,
            )),
            DeviceBackend::Cuda => builder.backend(Arc::new(
                granary_kernels::cuda::CudaBackend::discover()
                    .map_err(|err| NodeRunError(format!("devices: CUDA: {err}")))?,
            )),
        };
        if let Some(mib) = file.devices.memory_mib {
            let bytes = mib
                .checked_mul(1 << 20)
                .ok_or_else(|| NodeRunError(format!("devices: memory_mib {mib} is too large")))?;
            builder = builder.device_memory_limit(bytes);
        }
        Some(Arc::new(
            builder
                .build()
                .map_err(|err| NodeRunError(format!("bridge: {err}")))?,
        ))
    };
    let ledger_devices = LedgerDevices(Requirements {
        backend: Some(backend.kind()),
        ..Requirements::default()
    });
    let here = Arc::new(Here::default());
    let silo = silo(storage, bridge.clone(), ledger_devices, here.clone()).map_err(NodeRunError)?;
    let mut config = NodeConfig::new(
        file.cluster.clone(),
        secret,
        file.listen.clone(),
        file.gossip,
        file.seeds.clone(),
    );
    if let Some(ms) = file.gossip_interval_ms {
        config.gossip_interval = Duration::from_millis(ms.max(1));
    }
    if let Some(phi) = file.phi_threshold {
        config.phi_threshold = phi;
    }
    if let Some(ms) = file.death_grace_ms {
        config.death_grace = Duration::from_millis(ms);
    }
    config.load_interval = config.gossip_interval;
    let mut builder = ClusterNode::builder(silo, config)
        .transport(Arc::new(TcpTransport))
        .placement(Arc::new(DemoPlacement::default()))
        .needs(
            LEDGER,
            GpuNeeds {
                device_memory: LEDGER_DEVICE_BYTES,
                backend: Some(format!("{:?}", backend.kind())),
                ..GpuNeeds::default()
            },
        );
    if file.devices.none {
        builder = builder.client();
    }
    let node = match &file.etcd {
        None => builder
            .start(&chitchat::transport::UdpTransport)
            .await
            .map_err(|err| NodeRunError(err.to_string()))?,
        Some(etcd) => start_with_etcd(builder, &file.cluster, etcd).await?,
    };
    // Grains answer with it from now on (until then they say it is not
    // known yet, and their callers retry).
    let _ = here.0.set(node.id().address.clone());
    Ok(node)
}

#[cfg(feature = "etcd")]
async fn start_with_etcd(
    builder: granary_cluster::NodeBuilder,
    cluster: &str,
    etcd: &EtcdFile,
) -> Result<ClusterNode, NodeRunError> {
    let mut config = granary_cluster::etcd::EtcdConfig::new(cluster, etcd.endpoints.clone());
    if let Some(secs) = etcd.ttl_secs {
        config.ttl = Duration::from_secs(secs);
    }
    builder
        .start_with_etcd(config)
        .await
        .map_err(|err| NodeRunError(err.to_string()))
}

#[cfg(not(feature = "etcd"))]
async fn start_with_etcd(
    _: granary_cluster::NodeBuilder,
    _: &str,
    _: &EtcdFile,
) -> Result<ClusterNode, NodeRunError> {
    Err(NodeRunError(
        "etcd: this granary was built without the etcd feature \
         (cargo build --release --features etcd; it needs protoc)"
            .into(),
    ))
}

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

/// What a multi-node demo measured.
#[derive(Debug, Clone)]
pub struct ClusterDemoReport {
    /// The silos, with their device memory (MiB).
    pub silos: Vec<(String, u64)>,
    /// Ledgers per silo address before the kill.
    pub before: Vec<(String, usize)>,
    /// Ledgers per silo address at the end.
    pub after: Vec<(String, usize)>,
    /// The silo killed.
    pub killed: String,
    /// Calls acknowledged.
    pub calls: u64,
    /// Calls that failed and were retried.
    pub retried: u64,
    /// Median and 99th percentile latency of acknowledged calls.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Wall time of the load.
    pub elapsed: Duration,
    /// Ledgers whose persisted total was not what was acknowledged.
    pub lost: Vec<String>,
    /// Notifications (ledger → auditor calls) acknowledged: one per
    /// acknowledged `Apply`.
    pub notified: u64,
    /// Of those, the ones whose ledger and auditor ran on different silos.
    pub crossed: u64,
    /// Auditors whose persisted counts miss an acknowledged notification.
    pub audit_lost: Vec<String>,
    /// Each live silo's activations at the end (the census), this
    /// process's own (a client: none) last.
    pub census: Vec<SiloActivity>,
    /// Ledgers and auditors active on more than one silo, and silos the
    /// census could not reach.
    pub duplicates: Vec<String>,
}

impl ClusterDemoReport {
    /// Whether every check held: no ledger or auditor state lost, no
    /// grain active on two silos.
    pub fn passed(&self) -> bool {
        self.lost.is_empty() && self.audit_lost.is_empty() && self.duplicates.is_empty()
    }
}

impl fmt::Display for ClusterDemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "silos (device memory):")?;
        for (silo, mib) in &self.silos {
            writeln!(f, "  {silo}  {mib} MiB")?;
        }
        writeln!(f, "ledgers per silo, placed by free device memory:")?;
        let after: std::collections::HashMap<&str, usize> =
            self.after.iter().map(|(s, n)| (s.as_str(), *n)).collect();
        for (silo, before) in &self.before {
            let mark = if *silo == self.killed {
                "  (killed)"
            } else {
                ""
            };
            writeln!(
                f,
                "  {silo}  before {before:>3}  after {:>3}{mark}",
                after.get(silo.as_str()).copied().unwrap_or(0)
            )?;
        }
        let throughput = self.calls as f64 / self.elapsed.as_secs_f64().max(1e-9);
        writeln!(
            f,
            "calls: {} acknowledged, {} retried after failures; p50 {:?}, p99 {:?}; {:.0} calls/s",
            self.calls, self.retried, self.p50, self.p99, throughput
        )?;
        writeln!(
            f,
            "grain-to-grain calls (ledger -> auditor, {AUDITORS} auditors): {} notifications acknowledged, {} crossed silos",
            self.notified, self.crossed
        )?;
        if self.lost.is_empty() {
            writeln!(
                f,
                "persisted state: every ledger holds every acknowledged call"
            )?;
        } else {
            writeln!(f, "persisted state LOST for: {}", self.lost.join(", "))?;
        }
        if self.audit_lost.is_empty() {
            writeln!(
                f,
                "audited state: every auditor counts every acknowledged notification"
            )?;
        } else {
            writeln!(f, "audited state LOST for: {}", self.audit_lost.join(", "))?;
        }
        writeln!(f, "activations at the end, per live silo:")?;
        for silo in &self.census {
            writeln!(
                f,
                "  {}  live {:>3}: {:>3} ledgers, {:>2} auditors",
                silo.silo,
                silo.live,
                silo.ledgers.len(),
                silo.auditors.len()
            )?;
        }
        let total =
            |count: fn(&SiloActivity) -> usize| -> usize { self.census.iter().map(count).sum() };
        writeln!(
            f,
            "  cluster-wide: {} live, {} ledgers, {} auditors (and one inspector per silo)",
            self.census.iter().map(|silo| silo.live).sum::<u64>(),
            total(|silo| silo.ledgers.len()),
            total(|silo| silo.auditors.len())
        )?;
        if self.duplicates.is_empty() {
            writeln!(f, "single activation: no grain is active on two silos")
        } else {
            writeln!(
                f,
                "single activation BROKEN: {}",
                self.duplicates.join(", ")
            )
        }
    }
}

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

/// Runs the multi-node demo (see the module docs); `progress` gets the
/// number of calls acknowledged so far.
pub async fn run_cluster_demo(
    config: ClusterDemoConfig,
    progress: impl Fn(u64) + Send + Sync + 'static,
) -> Result<ClusterDemoReport, NodeRunError> {
    if config.nodes < 2 || config.grains == 0 || config.calls < 2 {
        return Err(NodeRunError(
            "the demo needs at least 2 nodes, 1 grain and 2 calls".into(),
        ));
    }
    let dir = std::env::temp_dir().join(format!("granary-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| NodeRunError(err.to_string()))?;
    let storage = StorageFile::Sqlite {
        path: dir.join("grains.sqlite"),
    };
    let secret = "granary demo cluster secret".to_string();
    // Under etcd, a cluster name of this run's own: keys of an earlier run
    // (its leases expiring) are not this cluster's.
    let cluster = match &config.etcd {
        Some(_) => format!("demo-{}", std::process::id()),
        None => "demo".to_string(),
    };
    let etcd = config.etcd.as_ref().map(|endpoints| EtcdFile {
        endpoints: endpoints.clone(),
        ttl_secs: Some(2),
    });
    let exe = std::env::current_exe().map_err(|err| NodeRunError(err.to_string()))?;
    let mut gossip_seed = None;
    let mut children = Children(Vec::new());
    let mut silos = Vec::new();
    for n in 0..config.nodes {
        let (tcp, udp) = free_ports()?;
        let gossip: SocketAddr = SocketAddr::from(([127, 0, 0, 1], udp));
        let seed = *gossip_seed.get_or_insert(gossip);
        // Different memory per silo, so placement has a choice to make.
        let memory = 128 + 64 * u64::from((n * 2 + 1) % config.nodes);
        let file = NodeFile {
            cluster: cluster.clone(),
            secret: secret.clone(),
            listen: format!("127.0.0.1:{tcp}"),
            gossip,
            seeds: vec![seed.to_string()],
            gossip_interval_ms: Some(100),
            phi_threshold: None,
            // The demo kills a silo on purpose: fail over within a second
            // or two rather than the default grace's six.
            death_grace_ms: Some(DEMO_DEATH_GRACE_MS),
            storage: storage.clone(),
            devices: DevicesFile {
                backend: config.backend,
                memory_mib: Some(memory),
                none: false,
            },
            etcd: etcd.clone(),
        };
        let path = dir.join(format!("node-{n}.toml"));
        let text = toml::to_string(&file).map_err(|err| NodeRunError(err.to_string()))?;
        std::fs::write(&path, text).map_err(|err| NodeRunError(err.to_string()))?;
        let log = std::fs::File::create(dir.join(format!("node-{n}.log")))
            .map_err(|err| NodeRunError(format!("node {n}'s log: {err}")))?;
        let child = std::process::Command::new(&exe)
            .arg("node")
            .arg("--config")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|err| NodeRunError(format!("starting node {n}: {err}")))?;
        children.0.push((child, file.listen.clone()));
        silos.push((file.listen.clone(), memory));
    }
    // This process joins too, with no devices: it routes, hosts no ledger.
    let (_, udp) = free_ports()?;
    let me = NodeFile {
        cluster: cluster.clone(),
        secret,
        listen: "127.0.0.1:0".into(),
        gossip: SocketAddr::from(([127, 0, 0, 1], udp)),
        seeds: vec![gossip_seed.map(|seed| seed.to_string()).unwrap_or_default()],
        gossip_interval_ms: Some(100),
        phi_threshold: None,
        death_grace_ms: Some(DEMO_DEATH_GRACE_MS),
        storage: storage.clone(),
        devices: DevicesFile {
            none: true,
            ..DevicesFile::default()
        },
        etcd: etcd.clone(),
    };
    let node = start_node(&me).await?;
    // Wait for every silo, with its devices.
    let expected = config.nodes as usize + 1;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let members = node.members();
        let with_devices = members
            .iter()
            .filter(|m| !m.load.devices.is_empty())
            .count();
        if members.len() == expected && with_devices == config.nodes as usize {
            break;
        }
        if Instant::now() > deadline {
            return Err(NodeRunError(format!(
                "the cluster did not form: {} of {expected} silos seen, {with_devices} of {} \
                 with devices; the silos' logs are in {}",
                members.len(),
                config.nodes,
                dir.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

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
                for seq in 1..=u64::from(calls) {
                    if seq == u64::from(calls / 2) + 1 {
                        halfway.wait().await;
                    }
                    let apply = Apply { seq, amount: seq };
                    loop {
                        let sent = Instant::now();
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
                latencies
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
    if let Some((child, _)) = children.0.iter_mut().find(|(_, listen)| *listen == killed) {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut latencies = Vec::new();
    for driver in drivers {
        latencies.extend(
            driver
                .await
                .map_err(|err| NodeRunError(format!("a caller failed: {err}")))?,
        );
    }
    let elapsed = started.elapsed();
    // Every ledger must hold every acknowledged call: the sum 1..=calls.
    let want = u64::from(config.calls) * (u64::from(config.calls) + 1) / 2;
    let mut lost = Vec::new();
    for grain in 0..config.grains {
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
                for ledger in (0..u64::from(config.grains)).filter(|l| auditor_of(*l) == auditor) {
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
    drop(children);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

/// Each live silo's activations, asked of the inspector placed on it, and
/// this process's own; with the ledgers and auditors active on more than
/// one silo (and silos that did not answer).
async fn census(
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

/// Runs a node until Ctrl-C, then leaves gracefully.
pub async fn run_node(file: NodeFile) -> Result<(), NodeRunError> {
    let node = start_node(&file).await?;
    println!(
        "granary node: {} in cluster {:?}, gossip on {}",
        node.id(),
        file.cluster,
        file.gossip
    );
    // Runs until Ctrl-C, or until the node stops by itself (under etcd,
    // when it lost its lease: a restart rejoins as a new incarnation).
    let stopped = async {
        while !node.is_stopped() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        interrupted = tokio::signal::ctrl_c() => {
            interrupted.map_err(|err| NodeRunError(format!("waiting for Ctrl-C: {err}")))?;
        }
        () = stopped => {
            return Err(NodeRunError(
                "the node stopped serving: it lost its etcd lease; restart it to rejoin".into(),
            ));
        }
    }
    node.leave()
        .await
        .map_err(|err| NodeRunError(err.to_string()))
}
