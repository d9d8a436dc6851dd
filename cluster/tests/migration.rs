//! Grains that move between silos with their in-memory state and their
//! resident buffers (`node/migration.rs`, `granary_actors::migration`),
//! over the in-process network, on the CPU backend with a device memory
//! limit per silo:
//! - under load: 100 grains, each with a 1 MiB resident buffer, each moved
//!   once while 10 000 calls are in flight from 20 senders: every call is
//!   answered once and in order per sender, every buffer and counter
//!   arrives intact, and the device memory reserved across the cluster
//!   returns to 100 MiB;
//! - what is refused, with a typed error: a type not registered as
//!   migratable, a grain with no activation, a silo that is not a member,
//!   the silo it is on already, a target with no room;
//! - crashes: the target killed after the copy and before the switch (the
//!   grain stays at the source, with its state); the source killed after
//!   the copy and before its switch (the target discards its activation
//!   once the source has left the view, and the grain starts afresh from
//!   what `dehydrate` persisted); never two activations;
//! - a graceful leave moves the silo's GPU grains away with their state.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chitchat::transport::ChannelTransport;
use granary_actors::migration::{
    Dehydrated, HookError, Migratable, MigrationError, MigrationTarget,
};
use granary_actors::storage::{MemoryStorage, PersistentState};
use granary_actors::{
    ActivationError, CallError, Grain, GrainContext, GrainKey, Handler, Message, Silo,
};
use granary_cluster::{ClusterNode, ClusterSecret, GpuNeeds, InProcessNetwork, NodeConfig};
use granary_gpu::{GpuBridge, ResidentBuffer};
use granary_kernels::{CpuBackend, DeviceInfo, host_device};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// Each tensor's resident buffer.
const BUFFER: usize = 1 << 20;

/// Which activations handled each grain's steps, in order: an
/// activation that another followed must never handle one again.
#[derive(Default)]
struct Census {
    next: AtomicU64,
    handlers: Mutex<HashMap<u64, Vec<u64>>>,
}

impl Census {
    fn handled(&self, key: u64, activation: u64) {
        let mut handlers = self.handlers.lock().unwrap();
        let list = handlers.entry(key).or_default();
        if list.last() != Some(&activation) {
            list.push(activation);
        }
    }

    /// Panics if any grain's steps went back to an activation that had
    /// been followed by another (two activations serving it at once).
    fn check_one_at_a_time(&self) {
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

/// Holds an arriving activation in `rehydrate` while armed: a test kills
/// a silo then.
#[derive(Default)]
struct Gate {
    armed: Mutex<bool>,
    reached: Notify,
    open: Notify,
}

struct SiloNumber(u16);

/// A grain with a resident buffer and in-memory state only: a counter and
/// the last sequence number seen from each sender.
struct Tensor {
    key: u64,
    buffer: Option<ResidentBuffer>,
    /// The step count as last persisted: written when the grain leaves,
    /// and carried with its ETag.
    state: Option<PersistentState<u64>>,
    steps: u64,
    last: BTreeMap<u64, u64>,
    census: Option<Arc<Census>>,
    /// This activation's number.
    activation: u64,
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

/// A resident buffer for a tensor on the silo's device.
async fn allocate(ctx: &GrainContext) -> Result<ResidentBuffer, String> {
    let bridge = ctx.service::<GpuBridge>().ok_or("no bridge")?;
    bridge
        .allocate_resident(BUFFER, &granary_gpu::Requirements::default())
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
        into.put_bytes(
            "buffer",
            buffer.export().await.map_err(|err| err.to_string())?,
        );
        Ok(())
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
        self.steps = from.get("steps")?;
        self.last = from.get("last")?;
        self.state = Some(from.get_state("state", ctx)?);
        let buffer = allocate(ctx).await?;
        buffer
            .import(from.take_bytes("buffer")?)
            .await
            .map_err(|err| err.to_string())?;
        self.buffer = Some(buffer);
        Ok(())
    }
}

/// The buffer a tensor starts with.
fn initial(key: u64) -> Vec<u8> {
    let mut buffer = vec![(key as u8) ^ 0x5a; BUFFER];
    buffer[..8].copy_from_slice(&key.to_le_bytes());
    buffer
}

/// The buffer after `steps` steps.
fn expected(key: u64, steps: u64) -> Vec<u8> {
    let mut buffer = initial(key);
    for n in 1..=steps {
        let at = step_offset(n);
        buffer[at..at + 8].copy_from_slice(&n.to_le_bytes());
    }
    buffer
}

fn step_offset(n: u64) -> usize {
    8 + (n as usize * 8 * 97) % (BUFFER - 16)
}

/// One step from `sender`, its `seq`-th: answered with the grain's step
/// count, or why it was out of order.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Step {
    sender: u64,
    seq: u64,
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
struct Inspect;
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

/// Not migratable.
struct Plain;
impl Grain for Plain {
    fn new(_: &GrainKey) -> Plain {
        Plain
    }
}
#[derive(Serialize, Deserialize)]
struct Ping;
impl Message for Ping {
    type Reply = ();
}
impl Handler<Ping> for Plain {
    async fn handle(&mut self, _: Ping, _: &mut GrainContext) {}
}

fn secret() -> ClusterSecret {
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    ClusterSecret::new(bytes).unwrap()
}

fn gossip(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

struct Cluster {
    network: InProcessNetwork,
    gossip: ChannelTransport,
    storage: Arc<MemoryStorage>,
    census: Arc<Census>,
    gate: Arc<Gate>,
    base: u16,
}

struct Node {
    node: ClusterNode,
    bridge: Arc<GpuBridge>,
}

impl Cluster {
    fn new(base: u16) -> Cluster {
        Cluster {
            network: InProcessNetwork::new(),
            gossip: ChannelTransport::default(),
            storage: Arc::new(MemoryStorage::new()),
            census: Arc::new(Census::default()),
            gate: Arc::new(Gate::default()),
            base,
        }
    }

    /// Silo `n`, with a CPU device of `mib` MiB.
    async fn node(&self, n: u16, mib: u64) -> Node {
        let bridge = Arc::new(
            GpuBridge::builder()
                .cpu_backend(CpuBackend::with_device(DeviceInfo {
                    total_memory: mib << 20,
                    free_memory: mib << 20,
                    ..host_device()
                }))
                .build()
                .unwrap(),
        );
        let silo = Silo::builder()
            .register::<Tensor>("tensor")
            .message::<Tensor, Step>("step")
            .message::<Tensor, Inspect>("inspect")
            .migratable::<Tensor>()
            .register::<Plain>("plain")
            .message::<Plain, Ping>("ping")
            .service(bridge.clone())
            .service(self.census.clone())
            .service(self.gate.clone())
            .service(Arc::new(SiloNumber(n)))
            .storage(self.storage.clone())
            .build()
            .unwrap();
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
        let needs = GpuNeeds {
            device_memory: BUFFER as u64,
            ..GpuNeeds::default()
        };
        let node = ClusterNode::builder(silo, config)
            .transport(Arc::new(self.network.transport(&listen)))
            .needs("tensor", needs)
            .placement(Arc::new(granary_cluster::GpuAware::strict()))
            .start(self.gossip.clone())
            .await
            .unwrap();
        Node { node, bridge }
    }
}

/// Waits until every node sees `count` members, each with its devices.
async fn converged(nodes: &[&ClusterNode], count: usize) {
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
fn reserved(nodes: &[&Node]) -> u64 {
    nodes
        .iter()
        .flat_map(|node| node.bridge.devices())
        .map(|(_, _, stats)| stats.reserved)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_grains_move_under_ten_thousand_calls_and_lose_nothing() {
    let cluster = Cluster::new(47_100);
    let nodes = [
        cluster.node(1, 256).await,
        cluster.node(2, 256).await,
        cluster.node(3, 256).await,
    ];
    let all: Vec<&ClusterNode> = nodes.iter().map(|n| &n.node).collect();
    converged(&all, 3).await;
    const GRAINS: u64 = 100;
    const SENDERS: u64 = 20;
    const CALLS: u64 = 10_000;
    // Every grain active (one step from sender 0), spread by placement.
    for key in 0..GRAINS {
        let step = Step { sender: 0, seq: 1 };
        let node = &nodes[key as usize % 3].node;
        assert_eq!(node.grain::<Tensor>(key).call(step).await.unwrap(), Ok(1));
    }
    let before = reserved(&nodes.iter().collect::<Vec<_>>());
    assert_eq!(before, GRAINS * BUFFER as u64, "one buffer per grain");
    // 20 senders, each sending its calls to the grains in turn, one at a
    // time, from silos in turn; meanwhile every grain moves once.
    let answered = Arc::new(AtomicU64::new(0));
    let senders: Vec<_> = (1..=SENDERS)
        .map(|sender| {
            let node = nodes[sender as usize % 3].node.clone();
            let answered = answered.clone();
            tokio::spawn(async move {
                let mut seq: HashMap<u64, u64> = HashMap::new();
                for i in 0..CALLS / SENDERS {
                    let key = (sender * 7 + i) % GRAINS;
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
    for key in 0..GRAINS {
        let node = nodes[(key as usize + 1) % 3].node.clone();
        moves.push(tokio::spawn(async move {
            node.grain::<Tensor>(key)
                .migrate(MigrationTarget::Any)
                .await
        }));
        if key % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let mut took = Vec::new();
    for (key, moved) in moves.into_iter().enumerate() {
        let moved = moved.await.unwrap();
        let moved = moved.unwrap_or_else(|err| panic!("grain {key} did not move: {err}"));
        assert_ne!(moved.from, moved.to);
        assert!(moved.bytes >= BUFFER as u64);
        took.push(moved.took);
    }
    for sender in senders {
        sender.await.unwrap();
    }
    assert_eq!(answered.load(Ordering::Relaxed), CALLS);
    // Every grain's state: sender 0's step, then every step sent to it.
    let mut steps_sent: HashMap<u64, u64> = HashMap::new();
    for sender in 1..=SENDERS {
        for i in 0..CALLS / SENDERS {
            *steps_sent.entry((sender * 7 + i) % GRAINS).or_default() += 1;
        }
    }
    for key in 0..GRAINS {
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
    assert_eq!(migrated, GRAINS);
    took.sort();
    eprintln!(
        "100 moves of 1 MiB under load: median {:?}, slowest {:?}",
        took[took.len() / 2],
        took[took.len() - 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_typed_and_leave_the_grain_serving() {
    let cluster = Cluster::new(47_200);
    let one = cluster.node(1, 64).await;
    // Room for one tensor only.
    let two = cluster.node(2, 1).await;
    converged(&[&one.node, &two.node], 2).await;
    let here = |node: &ClusterNode| node.id().to_string();
    // Not registered as migratable.
    one.node.grain::<Plain>(1).call(Ping).await.unwrap();
    assert!(matches!(
        one.node
            .grain::<Plain>(1)
            .migrate(MigrationTarget::Any)
            .await,
        Err(MigrationError::NotMigratable { .. })
    ));
    // No activation anywhere.
    assert!(matches!(
        one.node
            .grain::<Tensor>(99)
            .migrate(MigrationTarget::Any)
            .await,
        Err(MigrationError::NotActive { .. })
    ));
    // Active on silo 1 (asked there first: strict placement picks the
    // most free memory).
    let grain = one.node.grain::<Tensor>(1);
    assert_eq!(grain.call(Step { sender: 1, seq: 1 }).await.unwrap(), Ok(1));
    let (_, _, on) = grain.call(Inspect).await.unwrap();
    assert_eq!(on, 1);
    assert!(matches!(
        grain
            .migrate(MigrationTarget::Silo("silo-9:7000".into()))
            .await,
        Err(MigrationError::NoTarget { .. })
    ));
    assert!(matches!(
        grain.migrate(MigrationTarget::Silo(here(&one.node))).await,
        Err(MigrationError::AlreadyThere { .. })
    ));
    // The grain still serves, with its state, after every refusal.
    assert_eq!(grain.call(Step { sender: 1, seq: 2 }).await.unwrap(), Ok(2));
    // And it moves when asked by the address alone.
    let moved = two
        .node
        .grain::<Tensor>(1)
        .migrate(MigrationTarget::Silo("silo-2:7000".into()))
        .await
        .unwrap();
    assert_eq!(moved.to, here(&two.node));
    let (steps, bytes, on) = grain.call(Inspect).await.unwrap();
    assert_eq!((steps, on), (2, 2));
    assert!(bytes == expected(1, 2));
    // Silo 2 is full now: a second tensor cannot follow it there.
    let other = one.node.grain::<Tensor>(3);
    assert_eq!(other.call(Step { sender: 1, seq: 1 }).await.unwrap(), Ok(1));
    match other.migrate(MigrationTarget::Silo(here(&two.node))).await {
        Err(MigrationError::NoTarget { reason, .. }) => {
            assert!(reason.contains("room"), "{reason}")
        }
        other => panic!("a full target: {other:?}"),
    }
    assert_eq!(other.call(Step { sender: 1, seq: 2 }).await.unwrap(), Ok(2));
}

/// `grain`'s step count, buffer and silo, asked until the view has
/// settled after a kill (at most 15 s).
async fn reach(grain: &granary_actors::GrainRef<Tensor>) -> (u64, Vec<u8>, u16) {
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

/// Moves grain `key` from silo 1 to silo 2 with the gate armed, and kills
/// `victim` (1: the source; 2: the target) once the state has reached
/// the target and before its switch.
async fn crash_during_a_move(
    victim: u16,
    base: u16,
) -> (Cluster, Vec<Node>, Result<String, MigrationError>) {
    let cluster = Cluster::new(base);
    let nodes = vec![
        cluster.node(1, 64).await,
        cluster.node(2, 64).await,
        cluster.node(3, 64).await,
    ];
    let all: Vec<&ClusterNode> = nodes.iter().map(|n| &n.node).collect();
    converged(&all, 3).await;
    let key = 5;
    // Active on silo 1, with three steps.
    let grain = nodes[0].node.grain::<Tensor>(key);
    for seq in 1..=3 {
        grain.call(Step { sender: 1, seq }).await.unwrap().unwrap();
    }
    let (_, _, on) = grain.call(Inspect).await.unwrap();
    if on != 1 {
        // Placement picked another silo: move it to silo 1 first.
        nodes[0]
            .node
            .grain::<Tensor>(key)
            .migrate(MigrationTarget::Silo("silo-1:7000".into()))
            .await
            .unwrap();
    }
    *cluster.gate.armed.lock().unwrap() = true;
    let asker = nodes[2].node.clone();
    let moving = tokio::spawn(async move {
        asker
            .grain::<Tensor>(key)
            .migrate(MigrationTarget::Silo("silo-2:7000".into()))
            .await
            .map(|moved| moved.to)
    });
    tokio::time::timeout(Duration::from_secs(10), cluster.gate.reached.notified())
        .await
        .expect("the state reached the target");
    nodes[usize::from(victim) - 1].node.kill().await.unwrap();
    *cluster.gate.armed.lock().unwrap() = false;
    cluster.gate.open.notify_one();
    let outcome = tokio::time::timeout(Duration::from_secs(30), moving)
        .await
        .expect("the move ended")
        .unwrap();
    (cluster, nodes, outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_killed_before_the_switch_leaves_the_grain_at_its_source() {
    let (cluster, nodes, outcome) = crash_during_a_move(2, 47_300).await;
    assert!(
        outcome.is_err(),
        "the move cannot have happened: {outcome:?}"
    );
    // Silo 1 still holds it, with its state; silo 3 reaches it there once
    // the view has settled (a call whose entry's owner died fails fast
    // until the view drops it).
    let grain = nodes[2].node.grain::<Tensor>(5);
    let (steps, bytes, on) = reach(&grain).await;
    assert_eq!((steps, on), (3, 1));
    assert!(bytes == expected(5, 3));
    assert_eq!(grain.call(Step { sender: 1, seq: 4 }).await.unwrap(), Ok(4));
    // The killed target's activation never took a message.
    assert_eq!(cluster.census.handlers.lock().unwrap()[&5].len(), 1);
    cluster.census.check_one_at_a_time();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_killed_before_the_switch_leaves_one_activation_from_the_persisted_state() {
    let (cluster, nodes, outcome) = crash_during_a_move(1, 47_400).await;
    assert!(
        outcome.is_err(),
        "the source died before its switch: {outcome:?}"
    );
    // The target held its activation until the source left the view, then
    // found the entry not naming it and discarded it. The grain starts
    // afresh on its next call, from what `dehydrate` persisted (the step
    // count); the device buffer went with the source.
    let grain = nodes[2].node.grain::<Tensor>(5);
    let (steps, bytes, on) = reach(&grain).await;
    assert_eq!(steps, 3, "the state dehydrate persisted");
    assert!(on == 2 || on == 3, "on a live silo: {on}");
    assert!(bytes == initial(5), "the buffer starts afresh");
    assert_eq!(grain.call(Step { sender: 2, seq: 1 }).await.unwrap(), Ok(4));
    cluster.census.check_one_at_a_time();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_silo_moves_its_gpu_grains_away_with_their_state() {
    let cluster = Cluster::new(47_500);
    let nodes = [
        cluster.node(1, 64).await,
        cluster.node(2, 64).await,
        cluster.node(3, 64).await,
    ];
    let all: Vec<&ClusterNode> = nodes.iter().map(|n| &n.node).collect();
    converged(&all, 3).await;
    // Ten tensors on silo 1, each with a few steps of in-memory state.
    for key in 0..10u64 {
        let grain = nodes[0].node.grain::<Tensor>(key);
        for seq in 1..=key + 1 {
            grain.call(Step { sender: 1, seq }).await.unwrap().unwrap();
        }
        let (_, _, on) = grain.call(Inspect).await.unwrap();
        if on != 1 {
            grain
                .migrate(MigrationTarget::Silo("silo-1:7000".into()))
                .await
                .unwrap();
        }
    }
    let before = nodes[0].node.stats().migrations.count;
    nodes[0].node.leave().await.unwrap();
    assert_eq!(
        nodes[0].node.stats().migrations.count - before,
        10,
        "every GPU grain moved off the leaving silo"
    );
    for key in 0..10u64 {
        let grain = nodes[2].node.grain::<Tensor>(key);
        let (steps, bytes, on) = reach(&grain).await;
        assert_eq!(steps, key + 1, "grain {key} kept its in-memory state");
        assert!(on == 2 || on == 3, "grain {key} is on silo {on}");
        assert!(
            bytes == expected(key, steps),
            "grain {key}'s buffer differs"
        );
    }
    cluster.census.check_one_at_a_time();
}
