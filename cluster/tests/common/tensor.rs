//! What the migration tests share: the `Tensor` grain (a resident buffer
//! and in-memory state, migratable), a census of which activation served
//! each grain, a gate that holds an arrival, and a cluster of silos over the
//! in-process network whose bridges are given by the test (CPU devices, or
//! OpenCL under POCL).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chitchat::transport::ChannelTransport;
use granary_actors::migration::{Dehydrated, HookError, Migratable, MigrationTarget};
use granary_actors::storage::{MemoryStorage, PersistentState};
use granary_actors::{
    ActivationError, CallError, Grain, GrainContext, GrainKey, Handler, Message, Silo,
};
use granary_cluster::rebalance::RebalanceConfig;
use granary_cluster::{
    ClusterNode, ClusterSecret, DeviceQuotas, GpuNeeds, InProcessNetwork, NodeConfig,
};
use granary_gpu::{GpuBridge, ResidentBuffer, ResidentError};
use granary_kernels::{CpuBackend, DeviceInfo, host_device};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// Each tensor's resident buffer.
pub const BUFFER: usize = 1 << 20;

/// A bridge whose one device is the CPU backend's, lending `mib` MiB.
pub fn cpu_bridge(mib: u64) -> Arc<GpuBridge> {
    Arc::new(
        GpuBridge::builder()
            .cpu_backend(CpuBackend::with_device(DeviceInfo {
                total_memory: mib << 20,
                free_memory: mib << 20,
                ..host_device()
            }))
            .build()
            .unwrap(),
    )
}

/// A bridge whose CPU backend has `count` devices, each lending `mib`
/// MiB: a node with several GPUs, each with its own memory.
pub fn cpu_bridge_devices(mib: u64, count: usize) -> Arc<GpuBridge> {
    let device = DeviceInfo {
        total_memory: mib << 20,
        free_memory: mib << 20,
        ..host_device()
    };
    Arc::new(
        GpuBridge::builder()
            .cpu_backend(CpuBackend::with_devices(vec![device; count]))
            .build()
            .unwrap(),
    )
}

/// Which activations handled each grain's steps, in order: an
/// activation that another followed must never handle one again.
#[derive(Default)]
pub struct Census {
    pub next: AtomicU64,
    pub handlers: Mutex<HashMap<u64, Vec<u64>>>,
    /// When each grain arrived from another silo.
    pub arrivals: Mutex<HashMap<u64, Vec<Instant>>>,
}

impl Census {
    pub fn handled(&self, key: u64, activation: u64) {
        let mut handlers = self.handlers.lock().unwrap();
        let list = handlers.entry(key).or_default();
        if list.last() != Some(&activation) {
            list.push(activation);
        }
    }

    /// Panics if any grain's steps went back to an activation that had
    /// been followed by another (two activations serving it at once).
    pub fn check_one_at_a_time(&self) {
        for (key, list) in self.handlers.lock().unwrap().iter() {
            let mut seen = std::collections::HashSet::new();
            for activation in list {
                assert!(
                    seen.insert(activation),
                    "grain {key} was served by two activations at once: {list:?}"
                );
            }
        }
    }
}

/// Holds an arriving activation in `rehydrate` while armed, before it
/// makes its buffer: a test kills a silo then, or changes what the
/// target's device holds.
#[derive(Default)]
pub struct Gate {
    pub armed: Mutex<bool>,
    pub reached: Notify,
    pub open: Notify,
}

pub struct SiloNumber(pub u16);

/// A grain with a resident buffer and in-memory state only: a counter and
/// the last sequence number seen from each sender.
pub struct Tensor {
    key: u64,
    buffer: Option<ResidentBuffer>,
    /// The step count as last persisted: written when the grain leaves,
    /// and carried with its ETag.
    state: Option<PersistentState<u64>>,
    steps: u64,
    last: BTreeMap<u64, u64>,
    pub census: Option<Arc<Census>>,
    /// This activation's number.
    activation: u64,
    /// Buffers it grew (`Grow`).
    extra: Vec<ResidentBuffer>,
}

impl Grain for Tensor {
    fn new(key: &GrainKey) -> Tensor {
        Tensor {
            key: match key {
                GrainKey::U64(key) => *key,
                _ => u64::MAX,
            },
            buffer: None,
            state: None,
            steps: 0,
            last: BTreeMap::new(),
            census: None,
            activation: 0,
            extra: Vec::new(),
        }
    }

    async fn on_activate(&mut self, ctx: &mut GrainContext) -> Result<(), ActivationError> {
        // A grain that arrived has its buffer and state already.
        if self.buffer.is_none() {
            let buffer = allocate(ctx).await.map_err(ActivationError)?;
            buffer
                .import(initial(self.key))
                .await
                .map_err(|err| ActivationError(err.to_string()))?;
            self.buffer = Some(buffer);
        }
        if self.state.is_none() {
            let state = ctx.load_state::<u64>().await?;
            self.steps = *state.get();
            self.state = Some(state);
        }
        let census = ctx.service::<Census>().expect("a census");
        self.activation = census.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.census = Some(census);
        Ok(())
    }

    async fn on_deactivate(&mut self, _: &mut GrainContext) {
        self.buffer = None;
    }
}

/// A resident buffer of `bytes` for a tensor on the silo's device,
/// charged to its quota (what its type declares).
pub async fn allocate_bytes(
    ctx: &GrainContext,
    bytes: usize,
) -> Result<ResidentBuffer, ResidentError> {
    let quotas = ctx
        .service::<DeviceQuotas>()
        .expect("a node with a bridge provides device quotas");
    quotas
        .allocate(ctx, bytes, &granary_gpu::Requirements::default())
        .await
}

/// A tensor's resident buffer.
pub async fn allocate(ctx: &GrainContext) -> Result<ResidentBuffer, String> {
    allocate_bytes(ctx, BUFFER)
        .await
        .map_err(|err| err.to_string())
}

impl Migratable for Tensor {
    async fn dehydrate(
        &mut self,
        _: &mut GrainContext,
        into: &mut Dehydrated,
    ) -> Result<(), HookError> {
        let state = self.state.as_mut().ok_or("no state")?;
        *state.get_mut() = self.steps;
        into.put_state("state", state).await?;
        into.put("steps", &self.steps)?;
        into.put("last", &self.last)?;
        let buffer = self.buffer.as_ref().ok_or("no buffer")?;
        DeviceQuotas::put_resident(into, "buffer", buffer).await
    }

    async fn rehydrate(
        &mut self,
        ctx: &mut GrainContext,
        mut from: Dehydrated,
    ) -> Result<(), HookError> {
        if let Some(gate) = ctx.service::<Gate>() {
            if *gate.armed.lock().unwrap() {
                gate.reached.notify_one();
                gate.open.notified().await;
            }
        }
        if let Some(census) = ctx.service::<Census>() {
            let mut arrivals = census.arrivals.lock().unwrap();
            arrivals.entry(self.key).or_default().push(Instant::now());
        }
        self.steps = from.get("steps")?;
        self.last = from.get("last")?;
        self.state = Some(from.get_state("state", ctx)?);
        let quotas = ctx.service::<DeviceQuotas>().ok_or("no device quotas")?;
        let need = granary_gpu::Requirements::default();
        self.buffer = Some(
            quotas
                .take_resident(ctx, &mut from, "buffer", &need)
                .await?,
        );
        Ok(())
    }
}

/// The buffer a tensor starts with.
pub fn initial(key: u64) -> Vec<u8> {
    let mut buffer = vec![(key as u8) ^ 0x5a; BUFFER];
    buffer[..8].copy_from_slice(&key.to_le_bytes());
    buffer
}

/// The buffer after `steps` steps.
pub fn expected(key: u64, steps: u64) -> Vec<u8> {
    let mut buffer = initial(key);
    for n in 1..=steps {
        let at = step_offset(n);
        buffer[at..at + 8].copy_from_slice(&n.to_le_bytes());
    }
    buffer
}

pub fn step_offset(n: u64) -> usize {
    8 + (n as usize * 8 * 97) % (BUFFER - 16)
}

/// One step from `sender`, its `seq`-th: answered with the grain's step
/// count, or why it was out of order.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Step {
    pub sender: u64,
    pub seq: u64,
}
impl Message for Step {
    type Reply = Result<u64, String>;
}
impl Handler<Step> for Tensor {
    async fn handle(&mut self, step: Step, _: &mut GrainContext) -> Result<u64, String> {
        let last = self.last.entry(step.sender).or_default();
        if step.seq != *last + 1 {
            return Err(format!(
                "tensor {}: sender {} sent {} after {}",
                self.key, step.sender, step.seq, last
            ));
        }
        *last = step.seq;
        if let Some(census) = &self.census {
            census.handled(self.key, self.activation);
        }
        self.steps += 1;
        let n = self.steps;
        let buffer = self.buffer.as_ref().ok_or("no buffer")?;
        buffer
            .write(step_offset(n), &n.to_le_bytes())
            .await
            .map_err(|err| err.to_string())?;
        Ok(n)
    }
}

/// The grain's step count, its buffer, and its silo's number; the step
/// count is persisted on the way, from the ETag the state carried (a
/// stale one would fail the write).
#[derive(Serialize, Deserialize)]
pub struct Inspect;
impl Message for Inspect {
    type Reply = (u64, Vec<u8>, u16);
}
impl Handler<Inspect> for Tensor {
    async fn handle(&mut self, _: Inspect, ctx: &mut GrainContext) -> (u64, Vec<u8>, u16) {
        let bytes = match &self.buffer {
            Some(buffer) => buffer.export().await.unwrap_or_default(),
            None => Vec::new(),
        };
        if let Some(state) = &mut self.state {
            *state.get_mut() = self.steps;
            state.write().await.expect("the state's ETag is current");
        }
        let here = ctx.service::<SiloNumber>().map_or(0, |n| n.0);
        (self.steps, bytes, here)
    }
}

/// The device index of a tensor's buffers, and this activation's number.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Where;
impl Message for Where {
    type Reply = (Option<usize>, u64);
}
impl Handler<Where> for Tensor {
    async fn handle(&mut self, _: Where, _: &mut GrainContext) -> (Option<usize>, u64) {
        let devices: Vec<usize> = self
            .buffer
            .iter()
            .chain(&self.extra)
            .map(|buffer| buffer.device().0)
            .collect();
        let device = devices.first().copied();
        assert!(
            devices.iter().all(|d| Some(*d) == device),
            "a grain's buffers on two devices: {devices:?}"
        );
        (device, self.activation)
    }
}

/// Asks a tensor to keep another resident buffer of this many bytes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Grow(pub usize);

/// Why a [`Grow`] was refused: the quota's figures, or another reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GrowRefused {
    OverQuota { asked: u64, held: u64, limit: u64 },
    Other(String),
}

impl Message for Grow {
    type Reply = Result<(), GrowRefused>;
}
impl Handler<Grow> for Tensor {
    async fn handle(
        &mut self,
        Grow(bytes): Grow,
        ctx: &mut GrainContext,
    ) -> Result<(), GrowRefused> {
        match allocate_bytes(ctx, bytes).await {
            Ok(extra) => {
                self.extra.push(extra);
                Ok(())
            }
            Err(ResidentError::OverQuota { asked, held, limit }) => {
                Err(GrowRefused::OverQuota { asked, held, limit })
            }
            Err(other) => Err(GrowRefused::Other(other.to_string())),
        }
    }
}

/// Not migratable.
pub struct Plain;
impl Grain for Plain {
    fn new(_: &GrainKey) -> Plain {
        Plain
    }
}
#[derive(Serialize, Deserialize)]
pub struct Ping;
impl Message for Ping {
    type Reply = ();
}
impl Handler<Ping> for Plain {
    async fn handle(&mut self, _: Ping, _: &mut GrainContext) {}
}

pub fn secret() -> ClusterSecret {
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    ClusterSecret::new(bytes).unwrap()
}

pub fn gossip(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub struct Cluster {
    /// The rebalancer of the nodes made from now on.
    pub rebalance: Option<RebalanceConfig>,
    /// The device memory a tensor declares, on the nodes made from now on.
    pub declared: u64,
    pub network: InProcessNetwork,
    pub gossip: ChannelTransport,
    pub storage: Arc<MemoryStorage>,
    pub census: Arc<Census>,
    pub gate: Arc<Gate>,
    /// The placement of the nodes made from now on (strict GPU-aware
    /// unless a test says otherwise).
    pub placement: Arc<dyn granary_cluster::PlacementStrategy>,
    pub base: u16,
}

pub struct Node {
    pub node: ClusterNode,
    pub bridge: Arc<GpuBridge>,
}

impl Cluster {
    pub fn new(base: u16) -> Cluster {
        Cluster {
            rebalance: None,
            declared: BUFFER as u64,
            network: InProcessNetwork::new(),
            gossip: ChannelTransport::default(),
            storage: Arc::new(MemoryStorage::new()),
            census: Arc::new(Census::default()),
            gate: Arc::new(Gate::default()),
            placement: Arc::new(granary_cluster::GpuAware::strict()),
            base,
        }
    }

    /// Silo `n`, with a CPU device of `mib` MiB.
    pub async fn node(&self, n: u16, mib: u64) -> Node {
        self.node_on(n, cpu_bridge(mib)).await
    }

    /// The silo of node `n`, hosting tensors, serving `bridge`, the
    /// census and the gate to them.
    pub fn silo(&self, n: u16, bridge: Arc<GpuBridge>) -> Silo {
        Silo::builder()
            .register::<Tensor>("tensor")
            .message::<Tensor, Step>("step")
            .message::<Tensor, Inspect>("inspect")
            .message::<Tensor, Grow>("grow")
            .message::<Tensor, Where>("where")
            .migratable::<Tensor>()
            .register::<Plain>("plain")
            .message::<Plain, Ping>("ping")
            .service(bridge)
            .service(self.census.clone())
            .service(self.gate.clone())
            .service(Arc::new(SiloNumber(n)))
            .storage(self.storage.clone())
            .build()
            .unwrap()
    }

    /// Silo `n`, serving `bridge` to its grains.
    pub async fn node_on(&self, n: u16, bridge: Arc<GpuBridge>) -> Node {
        let silo = self.silo(n, bridge.clone());
        let listen = format!("silo-{n}:7000");
        let mut config = NodeConfig::new(
            "migration",
            secret(),
            &listen,
            gossip(self.base + n),
            vec![gossip(self.base + 1).to_string()],
        );
        config.gossip_interval = Duration::from_millis(50);
        // Room for a loaded machine running debug builds: a stall this
        // short is not taken for a death (nor fenced against).
        config.death_grace = Duration::from_secs(1);
        config.load_interval = Duration::from_millis(50);
        config.rebalance = self.rebalance.clone();
        let needs = GpuNeeds {
            device_memory: self.declared,
            ..GpuNeeds::default()
        };
        let node = ClusterNode::builder(silo, config)
            .transport(Arc::new(self.network.transport(&listen)))
            .needs("tensor", needs)
            .placement(self.placement.clone())
            .start(self.gossip.clone())
            .await
            .unwrap();
        Node { node, bridge }
    }
}

/// Waits until every node sees `count` members, each with its devices.
pub async fn converged(nodes: &[&ClusterNode], count: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while nodes.iter().any(|node| {
        let members = node.members();
        members.len() != count || members.iter().any(|m| m.load.devices.is_empty())
    }) {
        assert!(Instant::now() < deadline, "views did not converge");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Bytes reserved on the devices of `nodes`, together.
pub fn reserved(nodes: &[&Node]) -> u64 {
    nodes
        .iter()
        .flat_map(|node| node.bridge.devices())
        .map(|(_, _, stats)| stats.reserved)
        .sum()
}

/// `grain`'s step count, buffer and silo, asked until the view has
/// settled after a kill (at most 15 s).
pub async fn reach(grain: &granary_actors::GrainRef<Tensor>) -> (u64, Vec<u8>, u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match grain.call(Inspect).await {
            Ok(found) => return found,
            Err(CallError::Unavailable { .. } | CallError::Timeout { .. })
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("the grain is unreachable: {err}"),
        }
    }
}

/// Where [`moves_under_load`] moves each grain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moves {
    /// To another silo, wherever placement picks.
    AcrossSilos,
    /// To the other device of its silo (every silo has two): the
    /// activation stays.
    BetweenDevices,
}

/// `grains` tensors spread over `nodes`, each moved once (`how`: to
/// another silo, or to the other device of its own) while `senders` send
/// `calls` steps in all, one at a time each: every call is answered once
/// and in order per sender, every buffer and step count arrives intact,
/// one activation serves each grain at a time, and the device memory
/// reserved returns to one buffer per grain.
pub async fn moves_under_load(
    cluster: &Cluster,
    nodes: &[Node; 3],
    grains: u64,
    sender_count: u64,
    calls: u64,
    every_device: bool,
    how: Moves,
) {
    let all: Vec<&ClusterNode> = nodes.iter().map(|n| &n.node).collect();
    converged(&all, 3).await;
    // Every grain active (one step from sender 0), spread by placement.
    for key in 0..grains {
        let step = Step { sender: 0, seq: 1 };
        let node = &nodes[key as usize % 3].node;
        assert_eq!(node.grain::<Tensor>(key).call(step).await.unwrap(), Ok(1));
    }
    let before = reserved(&nodes.iter().collect::<Vec<_>>());
    assert_eq!(before, grains * BUFFER as u64, "one buffer per grain");
    if every_device {
        // Placement picks the silos (some may hold one grain, or none); a
        // silo that holds at least as many buffers as it has devices holds
        // them on every one of its devices (each goes to the device with
        // the most room).
        for node in nodes {
            let devices = node.bridge.devices();
            let held: u64 = devices.iter().map(|(_, _, stats)| stats.kept).sum();
            let holding = devices
                .iter()
                .filter(|(_, _, stats)| stats.kept > 0)
                .count();
            assert!(
                held < devices.len() as u64 * BUFFER as u64 || holding == devices.len(),
                "a device holds no buffer: {devices:?}"
            );
        }
    }
    // Where each grain is before the moves: its device, and its
    // activation.
    let mut placed = Vec::new();
    for key in 0..grains {
        placed.push(
            nodes[0]
                .node
                .grain::<Tensor>(key)
                .call(Where)
                .await
                .unwrap(),
        );
    }
    // The senders, each sending its calls to the grains in turn, one at a
    // time, from silos in turn; meanwhile every grain moves once.
    let per_sender = calls / sender_count;
    let answered = Arc::new(AtomicU64::new(0));
    let senders: Vec<_> = (1..=sender_count)
        .map(|sender| {
            let node = nodes[sender as usize % 3].node.clone();
            let answered = answered.clone();
            tokio::spawn(async move {
                let mut seq: HashMap<u64, u64> = HashMap::new();
                for i in 0..per_sender {
                    let key = (sender * 7 + i) % grains;
                    let next = seq.entry(key).or_default();
                    *next += 1;
                    let step = Step { sender, seq: *next };
                    match node.grain::<Tensor>(key).call(step).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(order)) => panic!("out of order: {order}"),
                        Err(err) => panic!("sender {sender}, call {i} to {key}: {err}"),
                    }
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut moves = Vec::new();
    for key in 0..grains {
        let node = nodes[(key as usize + 1) % 3].node.clone();
        let target = match how {
            Moves::AcrossSilos => MigrationTarget::Any,
            Moves::BetweenDevices => MigrationTarget::Device {
                silo: None,
                device: 1 - placed[key as usize].0.expect("a buffer") as u32,
            },
        };
        moves.push(tokio::spawn(async move {
            node.grain::<Tensor>(key).migrate(target).await
        }));
        if key % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let mut took = Vec::new();
    for (key, moved) in moves.into_iter().enumerate() {
        let moved = moved.await.unwrap();
        let moved = moved.unwrap_or_else(|err| panic!("grain {key} did not move: {err}"));
        match how {
            Moves::AcrossSilos => {
                assert_ne!(moved.from, moved.to);
                assert!(moved.bytes >= BUFFER as u64);
            }
            Moves::BetweenDevices => {
                assert_eq!(moved.from, moved.to);
                assert_eq!(moved.bytes, BUFFER as u64, "the buffer, and nothing else");
            }
        }
        took.push(moved.took);
    }
    for sender in senders {
        sender.await.unwrap();
    }
    assert_eq!(answered.load(Ordering::Relaxed), per_sender * sender_count);
    // Every grain's state: sender 0's step, then every step sent to it.
    let mut steps_sent: HashMap<u64, u64> = HashMap::new();
    for sender in 1..=sender_count {
        for i in 0..per_sender {
            *steps_sent.entry((sender * 7 + i) % grains).or_default() += 1;
        }
    }
    for key in 0..grains {
        let (steps, bytes, _) = nodes[0]
            .node
            .grain::<Tensor>(key)
            .call(Inspect)
            .await
            .unwrap();
        let want = 1 + steps_sent.get(&key).copied().unwrap_or(0);
        assert_eq!(steps, want, "grain {key}'s step count");
        assert!(
            bytes == expected(key, steps),
            "grain {key}'s buffer differs"
        );
    }
    cluster.census.check_one_at_a_time();
    if how == Moves::BetweenDevices {
        // The same activations, on the other device.
        for key in 0..grains {
            let (device, activation) = nodes[0]
                .node
                .grain::<Tensor>(key)
                .call(Where)
                .await
                .unwrap();
            let (was, first) = placed[key as usize];
            assert_eq!(activation, first, "grain {key} was activated again");
            assert_eq!(device, was.map(|d| 1 - d), "grain {key}'s device");
        }
    }
    // Accounting: the moved buffers were freed at their sources.
    let deadline = Instant::now() + Duration::from_secs(5);
    while reserved(&nodes.iter().collect::<Vec<_>>()) != before {
        assert!(
            Instant::now() < deadline,
            "device memory reserved: {} bytes, before the moves {before}",
            reserved(&nodes.iter().collect::<Vec<_>>())
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let migrated: u64 = all.iter().map(|n| n.stats().migrations.count).sum();
    assert_eq!(migrated, grains);
    took.sort();
    eprintln!(
        "{grains} moves of 1 MiB under load: median {:?}, slowest {:?}",
        took[took.len() / 2],
        took[took.len() - 1]
    );
}
