//! Moving a grain with a 64 MiB resident buffer from one silo to another
//! on loopback, against the way without migration, in one criterion run;
//! and what calls to a grain pay while it moves.
//!
//! ```text
//! cargo bench -p granary-cluster --bench migration
//! ```
//!
//! Two cluster nodes in this process, each with a CPU device of 1 GiB,
//! over TCP on 127.0.0.1 (the default transport), and one grain type,
//! `model`, whose activation keeps a 64 MiB resident buffer:
//! - `move_64mib/migrate`: `GrainRef::migrate` to the other silo. The
//!   buffer is exported (device to host), travels in chunks, and is
//!   imported on the other device; the directory entry switches; the
//!   source's buffer is freed. Timed until `migrate` returns.
//! - `move_64mib/through_{memory,redb}`: the peer, what a grain does
//!   without migration: deactivate (its `on_deactivate` exports the buffer
//!   and writes it as the grain's persisted state), then the next call
//!   activates it again, and its `on_activate` reads the state and imports
//!   it. Timed from the deactivation to that call's reply (the wait for
//!   the old home to be given up included, which the call would otherwise
//!   spend retrying). The call comes
//!   from the same silo, so the grain comes back there (prefer-local):
//!   the storage round trip is the cost wherever it lands, and the
//!   migration's network hop is left out of the peer, in its favour. In
//!   `MemoryStorage` (no disk: the cheapest storage there is) and in
//!   `RedbStorage` on disk (the embedded default).
//!
//! - `move_64mib/between_devices`: the same grain on a third node, alone,
//!   whose CPU backend has two devices of 1 GiB each: `GrainRef::migrate`
//!   to the other device of its silo (`MigrationTarget::Device`). The
//!   activation pauses between turns, the buffer is copied device to
//!   device (on the CPU backend one memcpy between the two devices'
//!   memory) and the old one freed; nothing is dehydrated or routed.
//!   Reported beside the others: there is no peer that does this.
//!
//! Every node declares the type's 64 MiB (`NodeBuilder::needs`), and the
//! grain allocates through the node's `DeviceQuotas`, as a GPU grain does
//! (since issue 16's second session: earlier runs allocated through the
//! bridge directly, with nothing declared).
//!
//! Then, outside criterion, the calls' side: 8 tasks, four on each silo,
//! call the grain back to back for 3 s, once with no migration and once
//! while the grain moves back and forth between the two; the p50, p99,
//! p99.9 and max of their latencies are printed beside the moves'
//! median.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use granary_actors::migration::{Dehydrated, HookError, Migratable, MigrationTarget};
use granary_actors::storage::{MemoryStorage, PersistentState, RedbStorage, StorageProvider};
use granary_actors::{ActivationError, Grain, GrainContext, GrainKey, Handler, Message, Silo};
use granary_cluster::{
    ClusterNode, ClusterSecret, DeviceQuotas, GpuNeeds, NodeConfig, PreferLocal,
};
use granary_gpu::{GpuBridge, ResidentBuffer};
use granary_kernels::{CpuBackend, DeviceInfo, host_device};
use serde::{Deserialize, Serialize};

const BUFFER: usize = 64 << 20;

/// The buffer as persisted state, for the peer (one copy through serde).
#[derive(Default, Serialize, Deserialize)]
struct Blob(#[serde(with = "serde_bytes")] Vec<u8>);

struct Model {
    buffer: Option<ResidentBuffer>,
    state: Option<PersistentState<Blob>>,
}

impl Grain for Model {
    fn new(_: &GrainKey) -> Model {
        Model {
            buffer: None,
            state: None,
        }
    }

    async fn on_activate(&mut self, ctx: &mut GrainContext) -> Result<(), ActivationError> {
        // Arrived by migration: the buffer came with it.
        if self.buffer.is_some() {
            return Ok(());
        }
        let mut state = ctx.load_state::<Blob>().await?;
        let buffer = allocate(ctx).await.map_err(ActivationError)?;
        let stored = std::mem::take(&mut state.get_mut().0);
        if !stored.is_empty() {
            buffer
                .import(stored)
                .await
                .map_err(|err| ActivationError(err.to_string()))?;
        }
        self.buffer = Some(buffer);
        self.state = Some(state);
        Ok(())
    }

    async fn on_deactivate(&mut self, _: &mut GrainContext) {
        let (Some(buffer), Some(state)) = (self.buffer.take(), &mut self.state) else {
            return;
        };
        if let Ok(bytes) = buffer.export().await {
            state.get_mut().0 = bytes;
            if let Err(err) = state.write().await {
                eprintln!("the buffer was not written: {err}");
            }
            state.get_mut().0 = Vec::new();
        }
    }
}

async fn allocate(ctx: &GrainContext) -> Result<ResidentBuffer, String> {
    let quotas = ctx.service::<DeviceQuotas>().ok_or("no device quotas")?;
    quotas
        .allocate(ctx, BUFFER, &granary_gpu::Requirements::default())
        .await
        .map_err(|err| err.to_string())
}

impl Migratable for Model {
    async fn dehydrate(
        &mut self,
        _: &mut GrainContext,
        into: &mut Dehydrated,
    ) -> Result<(), HookError> {
        let buffer = self.buffer.as_ref().ok_or("no buffer")?;
        DeviceQuotas::put_resident(into, "buffer", buffer).await
    }

    async fn rehydrate(
        &mut self,
        ctx: &mut GrainContext,
        mut from: Dehydrated,
    ) -> Result<(), HookError> {
        let quotas = ctx.service::<DeviceQuotas>().ok_or("no device quotas")?;
        let need = granary_gpu::Requirements::default();
        self.buffer = Some(
            quotas
                .take_resident(ctx, &mut from, "buffer", &need)
                .await?,
        );
        self.state = Some(ctx.load_state::<Blob>().await?);
        Ok(())
    }
}

/// A small call: the buffer's length.
#[derive(Serialize, Deserialize)]
struct Touch;
impl Message for Touch {
    type Reply = usize;
}
impl Handler<Touch> for Model {
    async fn handle(&mut self, _: Touch, _: &mut GrainContext) -> usize {
        self.buffer.as_ref().map_or(0, ResidentBuffer::len)
    }
}

/// The device index of the grain's buffer.
#[derive(Serialize, Deserialize)]
struct Device;
impl Message for Device {
    type Reply = u32;
}
impl Handler<Device> for Model {
    async fn handle(&mut self, _: Device, _: &mut GrainContext) -> u32 {
        self.buffer
            .as_ref()
            .map_or(0, |buffer| buffer.device().0 as u32)
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

fn secret() -> ClusterSecret {
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(29).wrapping_add(3);
    }
    ClusterSecret::new(bytes).expect("a secret")
}

/// Two nodes over TCP on loopback sharing `storage`, gossip ports from
/// `base`, each with a CPU device of 1 GiB.
async fn pair(storage: Arc<dyn StorageProvider>, base: u16) -> [ClusterNode; 2] {
    let gossip = chitchat::transport::ChannelTransport::default();
    let mut nodes = Vec::new();
    for n in [1u16, 2] {
        nodes.push(node(storage.clone(), base, n, 1, &gossip).await);
    }
    while nodes.iter().any(|node| node.members().len() != 2) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = nodes.pop().expect("two nodes");
    let first = nodes.pop().expect("two nodes");
    [first, second]
}

/// Node `n` over TCP on loopback, gossip ports from `base`, its CPU
/// backend with `devices` devices of 1 GiB each.
async fn node(
    storage: Arc<dyn StorageProvider>,
    base: u16,
    n: u16,
    devices: usize,
    gossip: &chitchat::transport::ChannelTransport,
) -> ClusterNode {
    let device = DeviceInfo {
        total_memory: 1 << 30,
        free_memory: 1 << 30,
        ..host_device()
    };
    let bridge = Arc::new(
        GpuBridge::builder()
            .cpu_backend(CpuBackend::with_devices(vec![device; devices]))
            .build()
            .expect("a bridge"),
    );
    let silo = Silo::builder()
        .register::<Model>("model")
        .message::<Model, Touch>("touch")
        .message::<Model, Device>("device")
        .migratable::<Model>()
        .service(bridge)
        .storage(storage.clone())
        .build()
        .expect("a silo");
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], base + n));
    let mut config = NodeConfig::new(
        "bench",
        secret(),
        "127.0.0.1:0",
        address,
        vec![format!("127.0.0.1:{}", base + 1)],
    );
    config.gossip_interval = Duration::from_millis(50);
    let needs = GpuNeeds {
        device_memory: BUFFER as u64,
        ..GpuNeeds::default()
    };
    ClusterNode::builder(silo, config)
        .placement(Arc::new(PreferLocal))
        .needs("model", needs)
        .start(gossip.clone())
        .await
        .expect("a node")
}

/// Moves grain `key`, active on `node`, to the other of its silo's two
/// devices.
async fn between_devices(node: &ClusterNode, key: u64) -> Duration {
    let grain = node.grain::<Model>(key);
    let device = grain.call(Device).await.expect("a device");
    let started = Instant::now();
    grain
        .migrate(MigrationTarget::Device {
            silo: None,
            device: 1 - device,
        })
        .await
        .expect("the grain moves between devices");
    started.elapsed()
}

/// Moves grain `key` from `nodes[from]` to the other by migration.
async fn migrate(nodes: &[ClusterNode; 2], key: u64, from: usize) -> Duration {
    let to = nodes[1 - from].id().to_string();
    let started = Instant::now();
    nodes[from]
        .grain::<Model>(key)
        .migrate(MigrationTarget::Silo(to))
        .await
        .expect("the grain moves");
    started.elapsed()
}

/// Reloads grain `key`, active on `node`, through storage: deactivate,
/// then the next call activates it again.
async fn through_storage(node: &ClusterNode, key: u64) -> Duration {
    let started = Instant::now();
    let grain = node.grain::<Model>(key);
    grain.deactivate().await.expect("deactivated");
    // Until its activation is gone (`on_deactivate` has written the
    // buffer) and its home given up (so the next call places it afresh,
    // rather than waiting out the home's removal).
    while grain.is_active() || node.homes() > 0 {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let len = grain.call(Touch).await.expect("activated again");
    assert_eq!(len, BUFFER);
    assert!(grain.is_active(), "the grain came back on its silo");
    started.elapsed()
}

fn moves(c: &mut Criterion) {
    let runtime = runtime();
    let dir = tempfile::tempdir().expect("a directory");
    let redb: Arc<dyn StorageProvider> =
        Arc::new(RedbStorage::open(dir.path().join("bench.redb")).expect("redb"));
    let memory: Arc<dyn StorageProvider> = Arc::new(MemoryStorage::new());
    let (clusters, two_devices) = runtime.block_on(async {
        let on_memory = pair(memory, 44_100).await;
        let on_redb = pair(redb, 44_200).await;
        let gossip = chitchat::transport::ChannelTransport::default();
        let two_devices = node(Arc::new(MemoryStorage::new()), 44_300, 1, 2, &gossip).await;
        for node in [&on_memory[0], &on_redb[0], &two_devices] {
            assert_eq!(node.grain::<Model>(1).call(Touch).await.unwrap(), BUFFER);
        }
        ([on_memory, on_redb], two_devices)
    });
    let mut group = c.benchmark_group("move_64mib");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(20));
    // Each iteration moves the grain one way; the next moves it back.
    let at = std::sync::atomic::AtomicUsize::new(0);
    group.bench_function("migrate", |b| {
        b.to_async(&runtime).iter_custom(|iterations| {
            let (nodes, at) = (&clusters[0], &at);
            async move {
                let mut from = at.load(std::sync::atomic::Ordering::Relaxed);
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    total += migrate(nodes, 1, from).await;
                    from = 1 - from;
                }
                at.store(from, std::sync::atomic::Ordering::Relaxed);
                total
            }
        })
    });
    for (name, index) in [("through_memory", 0usize), ("through_redb", 1)] {
        // Where the grain is now.
        let node = clusters[index]
            .iter()
            .find(|node| node.grain::<Model>(1).is_active())
            .expect("the grain is active on one silo");
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter_custom(|iterations| async move {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    total += through_storage(node, 1).await;
                }
                total
            })
        });
    }
    group.bench_function("between_devices", |b| {
        b.to_async(&runtime).iter_custom(|iterations| {
            let node = &two_devices;
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    total += between_devices(node, 1).await;
                }
                total
            }
        })
    });
    group.finish();
    runtime.block_on(calls_during_moves(&clusters[0]));
}

/// What calls pay while their grain moves: p50 and p99 of 8 callers'
/// latencies for 3 s, without moves and with the grain moving back and
/// forth, printed.
async fn calls_during_moves(nodes: &[ClusterNode; 2]) {
    let key = 2;
    nodes[0].grain::<Model>(key).call(Touch).await.unwrap();
    let mut report = Vec::new();
    for moving in [false, true] {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let callers: Vec<_> = (0..8)
            .map(|i| {
                let (node, stop) = (nodes[i % 2].clone(), stop.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let started = Instant::now();
                        node.grain::<Model>(key).call(Touch).await.expect("a reply");
                        latencies.push(started.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        let mut took = Vec::new();
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            if moving {
                let from = usize::from(!nodes[0].grain::<Model>(key).is_active());
                took.push(migrate(nodes, key, from).await);
            } else {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut latencies: Vec<Duration> = Vec::new();
        for caller in callers {
            latencies.extend(caller.await.expect("a caller"));
        }
        latencies.sort();
        took.sort();
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
        let quantiles = [at(0.5), at(0.99), at(0.999), at(1.0)];
        report.push((moving, latencies.len(), quantiles, took));
    }
    for (moving, calls, [p50, p99, p999, max], took) in report {
        let name = if moving { "moving" } else { "still" };
        print!(
            "calls_during_moves/{name}: {calls} calls, p50 {p50:?}, p99 {p99:?}, \
             p99.9 {p999:?}, max {max:?}"
        );
        if moving {
            print!(
                "; {} moves, median {:?}",
                took.len(),
                took.get(took.len() / 2).copied().unwrap_or_default()
            );
        }
        println!();
    }
}

criterion_group!(benches, moves);
criterion_main!(benches);
