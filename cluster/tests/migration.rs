//! Grains that move between silos with their in-memory state and their
//! resident buffers (`node/migration.rs`, `granary_actors::migration`),
//! over the in-process network, on the CPU backend with a device memory
//! limit per silo:
//! - under load: 100 grains, each with a 1 MiB resident buffer, on silos of
//!   two CPU devices each with its own memory limit, each moved
//!   once while 10 000 calls are in flight from 20 senders: every call is
//!   answered once and in order per sender, every buffer and counter
//!   arrives intact, and the device memory reserved across the cluster
//!   returns to 100 MiB; and the same with every grain moved to the other
//!   device of its silo (`node/migration.rs` rule 7), where the same
//!   activations go on with their buffers moved;
//! - to a named device: every buffer a grain holds moves to the other
//!   device of its silo, all or none; to a device of another silo, its
//!   arrival's buffers are made there; a device that is not there or has
//!   no room is refused, typed, and the grain stays;
//! - a target whose device memory is lent to requests' working memory
//!   takes the grain, named or asked by a move to any silo, which strict
//!   placement (counting the memory free now) would pass over, and which
//!   is asked before the hosts a hash fallback picks that have no room; a first
//!   call is refused such memory (its activation would wait for it) and
//!   served once it is free;
//! - what is refused, with a typed error: a type not registered as
//!   migratable, a grain with no activation, a silo that is not a member,
//!   the silo it is on already, a target with no room;
//! - crashes: the target killed after the copy and before the switch (the
//!   grain stays at the source, with its state); the source killed after
//!   the copy and before its switch (the target discards its activation
//!   once the source has left the view, and the grain starts afresh from
//!   what `dehydrate` persisted); never two activations;
//! - a graceful leave moves the silo's GPU grains away with their state,
//!   one that arrives as the silo starts to leave included;
//! - the rebalancer: two silos at 95% of their device memory and a third
//!   that joins empty end within 20 points of each other while every
//!   grain is called, and no grain moves twice;
//! - past high water on one device of a silo, the rebalancer moves grains
//!   to its other device, the same activations going on;
//! - pressure: past high water, new GPU grains go to a silo below it, a
//!   grain asking for more than it declared gets the quota's typed error
//!   and nothing is evicted for it, and with nowhere to move, the grains
//!   idle longest are deactivated.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::tensor::*;
use granary_actors::migration::{MigrationError, MigrationTarget};
use granary_actors::{CallError, GrainKey};
use granary_cluster::rebalance::{Reason, RebalanceConfig};
use granary_cluster::{ClusterNode, DeviceQuotas};
use granary_gpu::{Requirements, ResidentBuffer};
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_grains_move_under_ten_thousand_calls_and_lose_nothing() {
    let cluster = Cluster::new(47_100);
    // Two CPU devices per silo, each with its own memory limit.
    let nodes = [
        cluster.node_on(1, cpu_bridge_devices(128, 2)).await,
        cluster.node_on(2, cpu_bridge_devices(128, 2)).await,
        cluster.node_on(3, cpu_bridge_devices(128, 2)).await,
    ];
    // A silo holding two buffers or more holds them on both its devices.
    moves_under_load(&cluster, &nodes, 100, 20, 10_000, true, Moves::AcrossSilos).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_grains_move_between_the_devices_of_their_nodes_under_ten_thousand_calls() {
    let cluster = Cluster::new(47_150);
    let nodes = [
        cluster.node_on(1, cpu_bridge_devices(128, 2)).await,
        cluster.node_on(2, cpu_bridge_devices(128, 2)).await,
        cluster.node_on(3, cpu_bridge_devices(128, 2)).await,
    ];
    moves_under_load(
        &cluster,
        &nodes,
        100,
        20,
        10_000,
        true,
        Moves::BetweenDevices,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_whose_memory_is_lent_to_requests_takes_the_grain_once_they_end() {
    lent_memory_move(47_950, |two| MigrationTarget::Silo(two.to_string())).await;
}

/// A move to any silo asks a host whose memory is lent to requests, though
/// strict placement, counting the memory free now, passes it over (rule 1
/// of `node/migration.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_to_any_silo_asks_one_whose_memory_is_lent_to_requests() {
    lent_memory_move(47_975, |_| MigrationTarget::Any).await;
}

/// Under placement that falls back to the hash (the default's shape), a
/// move to any silo asks a host whose memory is lent to requests before
/// the hosts the fallback picks, whose memory is kept (rule 1 of
/// `node/migration.rs`): the grain here is one whose three hash picks
/// leave that host out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_to_any_silo_asks_a_host_with_room_before_the_fallbacks_picks() {
    let mut cluster = Cluster::new(48_050);
    cluster.placement = Arc::new(granary_cluster::GpuAware::with_fallback(Box::new(
        granary_cluster::HashPlacement,
    )));
    let one = cluster.node(1, 64).await;
    let two = cluster.node_on(2, one_tensor_bridge()).await;
    // Three silos with room for one tensor, each holding one's worth.
    let full = [
        cluster.node(3, 1).await,
        cluster.node(4, 1).await,
        cluster.node(5, 1).await,
    ];
    let mut kept = Vec::new();
    for node in &full {
        kept.push(ballast_on(node, 0, BUFFER).await);
    }
    converged(
        &[
            &one.node,
            &two.node,
            &full[0].node,
            &full[1].node,
            &full[2].node,
        ],
        5,
    )
    .await;
    let working = two
        .bridge
        .broker()
        .reserve(granary_gpu::DeviceId(0), BUFFER as u64)
        .unwrap();
    // Silo 1 sees silo 2's memory lent out and the others' kept.
    let seen = |node: &ClusterNode| {
        let members = node.members();
        let device = |n: u16| {
            members
                .iter()
                .find(|member| member.silo.to_string().starts_with(&format!("silo-{n}:")))
                .and_then(|member| member.load.devices.first().cloned())
        };
        device(2).is_some_and(|d| d.free_memory == 0 && d.room() == BUFFER as u64)
            && (3..=5).all(|n| device(n).is_some_and(|d| d.free_memory == 0 && d.room() == 0))
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !seen(&one.node) {
        assert!(Instant::now() < deadline, "silo 1 never saw the loads");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A grain whose three picks by hash, among the other hosts, are the
    // full silos.
    let others: Vec<_> = one
        .node
        .members()
        .into_iter()
        .filter(|member| member.silo != one.node.id())
        .collect();
    let two_id = two.node.id();
    let key = (1..1_000u64)
        .find(|key| {
            let grain = granary_actors::GrainId {
                type_name: "tensor".into(),
                key: GrainKey::U64(*key),
            };
            let mut hosts = others.clone();
            let me = one.node.id();
            for _ in 0..3 {
                let request = granary_cluster::PlacementRequest {
                    grain: &grain,
                    caller: &me,
                    needs: None,
                };
                let pick = granary_cluster::PlacementStrategy::place(
                    &granary_cluster::HashPlacement,
                    &request,
                    &hosts,
                )
                .unwrap();
                if pick == two_id {
                    return false;
                }
                hosts.retain(|member| member.silo != pick);
            }
            true
        })
        .expect("a grain the hash places away from silo 2");
    // Placed on silo 1, the only silo with its memory free.
    let grain = one.node.grain::<Tensor>(key);
    assert_eq!(grain.call(Step { sender: 1, seq: 1 }).await.unwrap(), Ok(1));
    assert_eq!(grain.call(Inspect).await.unwrap().2, 1);
    *cluster.gate.armed.lock().unwrap() = true;
    let mut moving = tokio::spawn({
        let grain = grain.clone();
        async move { grain.migrate(MigrationTarget::Any).await }
    });
    tokio::select! {
        _ = cluster.gate.reached.notified() => {}
        ended = &mut moving => panic!("the move ended before its arrival: {ended:?}"),
        _ = tokio::time::sleep(Duration::from_secs(10)) => panic!("no arrival in 10 s"),
    }
    arrive_on_two(&cluster, moving, working, &grain, key).await;
}

/// Opens the gate a held arrival waits at, gives the lent memory back
/// 100 ms later (the arrival's buffer usually waits for it), and checks
/// the move ended with the grain on silo 2, its state whole.
async fn arrive_on_two(
    cluster: &Cluster,
    moving: tokio::task::JoinHandle<Result<granary_actors::migration::Migrated, MigrationError>>,
    working: granary_gpu::Reservation,
    grain: &granary_actors::GrainRef<Tensor>,
    key: u64,
) {
    *cluster.gate.armed.lock().unwrap() = false;
    cluster.gate.open.notify_one();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(working);
    let moved = tokio::time::timeout(Duration::from_secs(30), moving)
        .await
        .expect("the move ended")
        .unwrap();
    assert!(moved.is_ok(), "{moved:?}");
    let (steps, bytes, on) = grain.call(Inspect).await.unwrap();
    assert_eq!((steps, on), (1, 2));
    assert!(bytes == expected(key, 1));
}

async fn lent_memory_move(base: u16, target: impl Fn(&granary_cluster::SiloId) -> MigrationTarget) {
    let cluster = Cluster::new(base);
    let one = cluster.node(1, 64).await;
    // Room for one tensor, all of it lent to a request's working memory
    // when the move asks: memory that comes back, which the arrival's
    // buffer waits for (the bridge's `resident.rs` rule 1, here up to
    // 30 s), so the target promises it (rule 1 of `node/migration.rs`).
    let two = cluster.node_on(2, one_tensor_bridge()).await;
    converged(&[&one.node, &two.node], 2).await;
    let grain = one.node.grain::<Tensor>(1);
    assert_eq!(grain.call(Step { sender: 1, seq: 1 }).await.unwrap(), Ok(1));
    assert_eq!(grain.call(Inspect).await.unwrap().2, 1);
    let working = two
        .bridge
        .broker()
        .reserve(granary_gpu::DeviceId(0), BUFFER as u64)
        .unwrap();
    // Silo 1 sees the request's memory in use before it asks, as
    // placement would.
    let lent =
        |node: &ClusterNode| {
            node.members().iter().any(|member| {
                member.silo == two.node.id()
                    && member.load.devices.first().is_some_and(|device| {
                        device.free_memory == 0 && device.room() == BUFFER as u64
                    })
            })
        };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !lent(&one.node) {
        assert!(
            Instant::now() < deadline,
            "silo 1 never saw the lent memory"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The arrival is held in `rehydrate`, before it makes its buffer:
    // reaching it means the target promised the memory while the request
    // held it all (a refusal ends the move first, and is shown). Then the
    // arrival goes on to make its buffer, and the request ends 100 ms
    // later: the buffer usually waits for it.
    *cluster.gate.armed.lock().unwrap() = true;
    let mut moving = tokio::spawn({
        let (grain, to) = (grain.clone(), target(&two.node.id()));
        async move { grain.migrate(to).await }
    });
    tokio::select! {
        _ = cluster.gate.reached.notified() => {}
        ended = &mut moving => panic!("the move ended before its arrival: {ended:?}"),
        _ = tokio::time::sleep(Duration::from_secs(10)) => panic!("no arrival in 10 s"),
    }
    arrive_on_two(&cluster, moving, working, &grain, 1).await;
    // Memory kept there (a resident buffer, not a request's) is refused
    // as before: a second tensor cannot follow.
    let other = one.node.grain::<Tensor>(2);
    assert_eq!(other.call(Step { sender: 1, seq: 1 }).await.unwrap(), Ok(1));
    match other.migrate(target(&two.node.id())).await {
        Err(MigrationError::NoTarget { reason, .. }) => {
            assert!(reason.contains("room"), "{reason}")
        }
        other => panic!("a full target: {other:?}"),
    }
}

/// A bridge with room for one tensor, whose buffers wait up to 30 s for
/// device memory lent to requests.
fn one_tensor_bridge() -> Arc<granary_gpu::GpuBridge> {
    let bridge = granary_gpu::GpuBridge::builder()
        .cpu_backend(granary_kernels::CpuBackend::with_device(
            granary_kernels::DeviceInfo {
                total_memory: BUFFER as u64,
                free_memory: BUFFER as u64,
                ..granary_kernels::host_device()
            },
        ))
        .config(granary_gpu::BridgeConfig {
            overload_timeout: Duration::from_secs(30),
            ..granary_gpu::BridgeConfig::default()
        })
        .build()
        .unwrap();
    Arc::new(bridge)
}

/// A first call is promised only memory free now (node rule 5), not
/// memory lent to requests as a move is: its activation would wait for
/// it, and then fail its call, where a refusal lets the caller place the
/// grain elsewhere. Placement here always picks the caller, so only the
/// promise refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_call_is_refused_memory_lent_to_requests_and_placed_once_it_is_free() {
    let mut cluster = Cluster::new(47_990);
    cluster.placement = Arc::new(granary_cluster::PreferLocal);
    let one = cluster.node_on(1, one_tensor_bridge()).await;
    converged(&[&one.node], 1).await;
    let working = one
        .bridge
        .broker()
        .reserve(granary_gpu::DeviceId(0), BUFFER as u64)
        .unwrap();
    let grain = one.node.grain::<Tensor>(1);
    // The activation's buffer would wait 30 s for the lent memory: a
    // refusal comes at once.
    match tokio::time::timeout(
        Duration::from_secs(10),
        grain.call(Step { sender: 1, seq: 1 }),
    )
    .await
    {
        Ok(Err(CallError::Overloaded { .. })) => {}
        other => panic!("a first call promised lent memory: {other:?}"),
    }
    drop(working);
    assert_eq!(grain.call(Step { sender: 1, seq: 1 }).await.unwrap(), Ok(1));
    assert_eq!(grain.call(Inspect).await.unwrap().2, 1);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grain_moves_to_a_named_device_with_every_buffer_it_holds() {
    let mut cluster = Cluster::new(47_250);
    // Room for a tensor and a second buffer of 1 MiB.
    cluster.declared = 2 * BUFFER as u64;
    // Two devices per silo: silo 1's of 8 MiB each, silo 2's of 2 MiB.
    let one = cluster.node_on(1, cpu_bridge_devices(8, 2)).await;
    let two = cluster.node_on(2, cpu_bridge_devices(2, 2)).await;
    converged(&[&one.node, &two.node], 2).await;
    let here = |node: &ClusterNode| node.id().to_string();
    let kept = |node: &Node, device: usize| node.bridge.devices()[device].2.kept;
    let grain = one.node.grain::<Tensor>(1);
    assert_eq!(grain.call(Step { sender: 1, seq: 1 }).await.unwrap(), Ok(1));
    assert_eq!(grain.call(Grow(BUFFER)).await.unwrap(), Ok(()));
    let (device, activation) = grain.call(Where).await.unwrap();
    let from = device.expect("a buffer");
    let to = 1 - from;
    assert_eq!(
        kept(&one, from),
        2 * BUFFER as u64,
        "both buffers on one device"
    );
    // Refused, typed, with the grain where it was: the device it is on, a
    // device the silo does not have, and a device with no room (ballast
    // fills it).
    let device_of = |device: u32| MigrationTarget::Device { silo: None, device };
    assert!(matches!(
        grain.migrate(device_of(from as u32)).await,
        Err(MigrationError::AlreadyThere { .. })
    ));
    match grain.migrate(device_of(2)).await {
        Err(MigrationError::NoTarget { reason, .. }) => {
            assert!(reason.contains("no device 2"), "{reason}")
        }
        other => panic!("a device the silo does not have: {other:?}"),
    }
    let ballast = ballast_on(&one, to, 7 * BUFFER).await;
    match grain.migrate(device_of(to as u32)).await {
        Err(MigrationError::NoTarget { reason, .. }) => {
            assert!(reason.contains("room"), "{reason}")
        }
        other => panic!("a device with no room: {other:?}"),
    }
    assert_eq!(grain.call(Where).await.unwrap(), (Some(from), activation));
    assert_eq!(kept(&one, from), 2 * BUFFER as u64, "nothing moved");
    drop(ballast);
    // Asked from the other silo, naming the grain's: both buffers move to
    // the other device, bit for bit, and the activation stays.
    let moved = two
        .node
        .grain::<Tensor>(1)
        .migrate(MigrationTarget::Device {
            silo: Some(here(&one.node)),
            device: to as u32,
        })
        .await
        .unwrap();
    assert_eq!(
        (moved.from.as_str(), moved.to.as_str()),
        (here(&one.node).as_str(), here(&one.node).as_str())
    );
    assert_eq!(moved.bytes, 2 * BUFFER as u64);
    assert_eq!(grain.call(Where).await.unwrap(), (Some(to), activation));
    assert_eq!((kept(&one, from), kept(&one, to)), (0, 2 * BUFFER as u64));
    assert_eq!(grain.call(Step { sender: 1, seq: 2 }).await.unwrap(), Ok(2));
    let (steps, bytes, on) = grain.call(Inspect).await.unwrap();
    assert_eq!((steps, on), (2, 1));
    assert!(bytes == expected(1, 2));
    // To a named device of another silo: the grain moves there, and its
    // buffers are made on that device. Its Grow buffer stays behind (the
    // tensor carries only its own), so it fits a 2 MiB device.
    let moved = grain
        .migrate(MigrationTarget::Device {
            silo: Some(here(&two.node)),
            device: 1,
        })
        .await
        .unwrap();
    assert_eq!(moved.to, here(&two.node));
    let (device, arrived) = grain.call(Where).await.unwrap();
    assert_eq!(device, Some(1));
    assert_ne!(arrived, activation);
    assert_eq!((kept(&two, 0), kept(&two, 1)), (0, BUFFER as u64));
    let (steps, bytes, on) = grain.call(Inspect).await.unwrap();
    assert_eq!((steps, on), (2, 2));
    assert!(bytes == expected(1, 2));
    // A named device elsewhere with no room: refused, and the grain stays.
    let other = one.node.grain::<Tensor>(2);
    assert_eq!(other.call(Step { sender: 1, seq: 1 }).await.unwrap(), Ok(1));
    assert!(other.call(Where).await.unwrap().0.is_some(), "a buffer");
    let full = ballast_on(&two, 0, 2 * BUFFER).await;
    match other
        .migrate(MigrationTarget::Device {
            silo: Some(here(&two.node)),
            device: 0,
        })
        .await
    {
        Err(MigrationError::NoTarget { reason, .. }) => {
            assert!(reason.contains("device 0"), "{reason}")
        }
        other => panic!("a named device with no room: {other:?}"),
    }
    drop(full);
    assert_eq!(other.call(Step { sender: 1, seq: 2 }).await.unwrap(), Ok(2));
    cluster.census.check_one_at_a_time();
}

/// Three silos of 64 MiB each, once their views agree.
async fn three_silos(base: u16) -> (Cluster, Vec<Node>) {
    let cluster = Cluster::new(base);
    let nodes = vec![
        cluster.node(1, 64).await,
        cluster.node(2, 64).await,
        cluster.node(3, 64).await,
    ];
    let all: Vec<&ClusterNode> = nodes.iter().map(|n| &n.node).collect();
    converged(&all, 3).await;
    (cluster, nodes)
}

/// Makes grain `key` active on silo `on`, with three steps all taken by
/// the activation there, then moves it to silo `to`, asked from silo
/// `asker`, with the gate armed: returns once the state has reached `to`,
/// whose `rehydrate` holds it until the gate opens, with the move's
/// outcome (the silo it went to) to come.
async fn hold_a_move(
    cluster: &Cluster,
    nodes: &[Node],
    key: u64,
    on: u16,
    to: u16,
    asker: u16,
) -> tokio::task::JoinHandle<Result<String, MigrationError>> {
    let silo = |n: u16| &nodes[usize::from(n) - 1].node;
    let grain = silo(on).grain::<Tensor>(key);
    let (_, _, found_on) = grain.call(Inspect).await.unwrap();
    if found_on != on {
        // Placement picked another silo: move it first.
        grain
            .migrate(MigrationTarget::Silo(format!("silo-{on}:7000")))
            .await
            .unwrap();
    }
    for seq in 1..=3 {
        grain.call(Step { sender: 1, seq }).await.unwrap().unwrap();
    }
    *cluster.gate.armed.lock().unwrap() = true;
    let asker = silo(asker).clone();
    let moving = tokio::spawn(async move {
        asker
            .grain::<Tensor>(key)
            .migrate(MigrationTarget::Silo(format!("silo-{to}:7000")))
            .await
            .map(|moved| moved.to)
    });
    tokio::time::timeout(Duration::from_secs(10), cluster.gate.reached.notified())
        .await
        .expect("the state reached the target");
    moving
}

/// Moves grain 5 from silo 1 to silo 2 with the gate armed, and kills
/// `victim` (1: the source; 2: the target) once the state has reached
/// the target and before its switch. The census lists one activation of
/// the grain until the crash.
async fn crash_during_a_move(
    victim: u16,
    base: u16,
) -> (Cluster, Vec<Node>, Result<String, MigrationError>) {
    let (cluster, nodes) = three_silos(base).await;
    let moving = hold_a_move(&cluster, &nodes, 5, 1, 2, 3).await;
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
    let (cluster, nodes) = three_silos(47_500).await;
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

/// A grain arriving at a silo as it starts to leave: the arrival, past
/// the draining check already, is confirmed while the silo drains, and
/// the leave moves the grain on with its state. (The leave used to list
/// its GPU grains once, before the arrival had an owner, and let the
/// grain go with the rest: its buffer was lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grain_arriving_at_a_leaving_silo_moves_on_with_its_state() {
    let (cluster, nodes) = three_silos(47_550).await;
    let key = 7;
    // The grain moves from silo 2 to silo 1 and is held in its
    // `rehydrate` there.
    let moving = hold_a_move(&cluster, &nodes, key, 2, 1, 2).await;
    // Silo 1 starts to leave, finding no GPU grain of its own to move.
    let before = nodes[0].node.stats().migrations.count;
    let leaving = nodes[0].node.clone();
    let leave = tokio::spawn(async move { leaving.leave().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!leave.is_finished(), "the leave waits for the arrival");
    *cluster.gate.armed.lock().unwrap() = false;
    cluster.gate.open.notify_one();
    let outcome = tokio::time::timeout(Duration::from_secs(30), moving)
        .await
        .expect("the move ended")
        .unwrap();
    let to = outcome.expect("the move to silo 1");
    assert!(to.starts_with("silo-1:7000#"), "moved to {to}");
    tokio::time::timeout(Duration::from_secs(60), leave)
        .await
        .expect("the leave ended")
        .unwrap()
        .expect("silo 1 left");
    assert_eq!(
        nodes[0].node.stats().migrations.count - before,
        1,
        "the arrival moved on"
    );
    let (steps, bytes, on) = reach(&nodes[2].node.grain::<Tensor>(key)).await;
    assert_eq!(steps, 3, "the grain kept its in-memory state");
    assert!(on == 2 || on == 3, "the grain is on silo {on}");
    assert!(bytes == expected(key, 3), "the grain's buffer differs");
    cluster.census.check_one_at_a_time();
}

const MIB: u64 = 1 << 20;

/// A rebalancer deciding every 200 ms, with the default marks (90% high
/// water, 10 points of hysteresis, 15 of margin, 60 s cool-down) and
/// `shed_idle` as given.
fn rebalancing(shed_idle: Duration) -> RebalanceConfig {
    RebalanceConfig {
        interval: Duration::from_millis(200),
        shed_idle,
        ..RebalanceConfig::default()
    }
}

/// Device memory `node` uses now and has in all, in bytes.
fn fill(node: &Node) -> (u64, u64) {
    node.bridge
        .devices()
        .into_iter()
        .fold((0, 0), |(used, total), (_, info, stats)| {
            (
                used + info.total_memory - stats.available,
                total + info.total_memory,
            )
        })
}

/// Memory kept on `node`'s device by something other than a grain, so that
/// it holds `mib` MiB in all.
async fn ballast_to(node: &Node, mib: u64, kept: &mut Vec<ResidentBuffer>) {
    let (used, _) = fill(node);
    if used < mib * MIB {
        let buffer = node
            .bridge
            .allocate_resident((mib * MIB - used) as usize, &Requirements::default())
            .await
            .unwrap();
        kept.push(buffer);
    }
}

/// Memory kept on `node`'s device `device` by something other than a
/// grain (no quota, no grain to move), `bytes` of it.
async fn ballast_on(node: &Node, device: usize, bytes: usize) -> ResidentBuffer {
    node.bridge
        .allocate_resident_within_on(
            &granary_gpu::ResidentQuota::new(u64::MAX),
            granary_gpu::DeviceId(device),
            bytes,
            &Requirements::default(),
        )
        .await
        .unwrap()
}

/// Every silo's used fraction of its device memory, in points.
fn points(nodes: &[&Node]) -> Vec<f64> {
    nodes
        .iter()
        .map(|node| {
            let (used, total) = fill(node);
            100.0 * used as f64 / total as f64
        })
        .collect()
}

fn spread(points: &[f64]) -> f64 {
    points.iter().cloned().fold(f64::MIN, f64::max)
        - points.iter().cloned().fold(f64::MAX, f64::min)
}

/// One sender per grain, stepping it in order until told to stop: every
/// call must be answered `Ok`. Returns the calls made.
fn keep_calling(
    node: &ClusterNode,
    keys: std::ops::Range<u64>,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    keys.map(|key| {
        let grain = node.grain::<Tensor>(key);
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut seq = 0;
            while !stop.load(Ordering::Acquire) {
                seq += 1;
                match grain
                    .call(Step {
                        sender: 1_000 + key,
                        seq,
                    })
                    .await
                {
                    Ok(Ok(_)) => {}
                    other => panic!("grain {key}'s step {seq} failed: {other:?}"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seq
        })
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silo_that_joins_takes_grains_from_two_full_ones_and_nothing_moves_twice() {
    let mut cluster = Cluster::new(47_600);
    cluster.rebalance = Some(rebalancing(Duration::from_secs(3_600)));
    let first = [cluster.node(1, 20).await, cluster.node(2, 20).await];
    converged(&[&first[0].node, &first[1].node], 2).await;
    // 32 tensors of 1 MiB over two silos of 20 MiB (activated one at a
    // time: first calls made together are promised memory conservatively,
    // rule 5 of `node/mod.rs`), then every one called throughout.
    for key in 0..32u64 {
        first[0]
            .node
            .grain::<Tensor>(key)
            .call(Inspect)
            .await
            .unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders = keep_calling(&first[0].node, 0..32, &stop);
    // Something other than grains fills both to 95% (19 of 20 MiB): past
    // high water, with nowhere to go. While one is filled and the other
    // not yet, the full one's rebalancer may move a grain to the other,
    // and that move may land after the other's fill: the silo it lands
    // on is filled again from scratch. Done once both read 95% five
    // times in a row, 100 ms apart, with no move ended between (at 95%
    // neither takes a grain, so none starts; one under way for longer
    // than that could still land later, which the checks below allow:
    // they need the third silo to take grains, not exactly 95% here).
    let mut ballast: [Vec<ResidentBuffer>; 2] = Default::default();
    let tried = |nodes: &[&Node]| -> u64 {
        nodes
            .iter()
            .map(|node| {
                let stats = node.node.stats();
                stats.migrations.count + stats.migrations_failed
            })
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut steady, mut last) = (0, u64::MAX);
    while steady < 5 {
        assert!(
            Instant::now() < deadline,
            "the first two silos did not settle at 95%: {:?}",
            points(&[&first[0], &first[1]])
        );
        for (node, kept) in first.iter().zip(ballast.iter_mut()) {
            if fill(node).0 > 19 * MIB {
                kept.clear();
            }
            ballast_to(node, 19, kept).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = tried(&[&first[0], &first[1]]);
        steady = if points(&[&first[0], &first[1]]) == [95.0, 95.0] && now == last {
            steady + 1
        } else {
            0
        };
        last = now;
    }
    let moved_before: u64 = first
        .iter()
        .map(|node| node.node.stats().migrations.count)
        .sum();

    // A third silo joins with 20 MiB free.
    let third = cluster.node(3, 20).await;
    let all = [&first[0], &first[1], &third];
    converged(&[&first[0].node, &first[1].node, &third.node], 3).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while spread(&points(&all)) >= 20.0 {
        assert!(
            Instant::now() < deadline,
            "the spread stayed at {:?}",
            points(&all)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("spread closed: {:?}", points(&all));
    // It settles: a second of rounds (five on each silo) in which nothing
    // moves, or tries to, comes within 15 s.
    let moves = || -> u64 {
        all.iter()
            .map(|node| {
                let stats = node.node.stats();
                stats.migrations.count + stats.migrations_failed
            })
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut settled = moves();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(1) {
        assert!(
            Instant::now() < deadline,
            "grains kept moving: {:?}",
            points(&all)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = moves();
        if now != settled {
            settled = now;
            quiet_since = Instant::now();
        }
    }
    assert!(spread(&points(&all)) < 20.0, "{:?}", points(&all));
    let moved_after: u64 = all
        .iter()
        .map(|node| node.node.stats().migrations.count)
        .sum();
    assert!(moved_after > moved_before, "the third silo took grains");
    let reasons: Vec<_> = all
        .iter()
        .flat_map(|node| node.node.stats().rebalance)
        .filter(|count| count.done > 0)
        .map(|count| count.reason)
        .collect();
    assert!(reasons.contains(&Reason::HighWater), "{reasons:?}");
    assert!(
        first.iter().all(|node| fill(node).0 <= 18 * MIB),
        "{:?}",
        points(&all)
    );

    stop.store(true, Ordering::Release);
    let mut calls = 0;
    for sender in senders {
        calls += sender.await.unwrap();
    }
    assert!(calls > 32, "calls went on throughout: {calls}");
    // No grain moved twice within the cool-down (the whole test is shorter).
    for (key, arrivals) in cluster.census.arrivals.lock().unwrap().iter() {
        assert!(
            arrivals.len() <= 1,
            "grain {key} moved {} times",
            arrivals.len()
        );
    }
    cluster.census.check_one_at_a_time();
    // Every buffer is what its steps made it.
    for key in 0..32 {
        let (steps, bytes, _) = reach(&third.node.grain::<Tensor>(key)).await;
        assert!(
            bytes == expected(key, steps),
            "grain {key}'s buffer differs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_high_water_new_gpu_grains_go_elsewhere_and_a_grain_gets_no_more_than_it_declared() {
    let mut cluster = Cluster::new(47_700);
    cluster.rebalance = Some(rebalancing(Duration::from_secs(3_600)));
    let nodes = [cluster.node(1, 100).await, cluster.node(2, 4).await];
    // Silo 1 holds 91 MiB for something else: past high water, yet with
    // more free (9 MiB) than silo 2 (4 MiB), so placement picks it first.
    let mut ballast = Vec::new();
    ballast_to(&nodes[0], 91, &mut ballast).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while nodes[1].node.members().iter().all(|member| {
        member.silo != nodes[0].node.id()
            || member.load.devices.iter().all(|d| d.free_memory > 9 * MIB)
    }) || nodes[0].node.members().len() < 2
    {
        assert!(Instant::now() < deadline, "silo 1's load was not seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // New GPU grains go to silo 2 while it has room below its own mark...
    for key in 0..3u64 {
        let (_, _, on) = nodes[0]
            .node
            .grain::<Tensor>(key)
            .call(Inspect)
            .await
            .unwrap();
        assert_eq!(on, 2, "tensor {key} went to the silo past high water");
    }
    // ...and nowhere once none has.
    let refused = nodes[0].node.grain::<Tensor>(3).call(Inspect).await;
    assert!(
        matches!(refused, Err(CallError::Overloaded { .. })),
        "{refused:?}"
    );

    // A tensor asking for more than the 1 MiB it declared is refused with
    // the quota's error, though silo 2 has 1 MiB free.
    let used_before = fill(&nodes[1]).0;
    let reserved_before = reserved(&[&nodes[1]]);
    for (key, asked) in [(0u64, 4096u64), (1, 1)] {
        let grown = nodes[0]
            .node
            .grain::<Tensor>(key)
            .call(Grow(asked as usize))
            .await
            .unwrap();
        assert_eq!(
            grown,
            Err(GrowRefused::OverQuota {
                asked,
                held: BUFFER as u64,
                limit: BUFFER as u64,
            })
        );
    }
    let quotas = nodes[1].node.silo().service::<DeviceQuotas>().unwrap();
    assert_eq!(quotas.declared("tensor"), BUFFER as u64);
    // Nothing was evicted to make room: every tensor is where it was, with
    // its buffer, and the device holds what it held.
    assert_eq!(fill(&nodes[1]).0, used_before);
    assert_eq!(reserved(&[&nodes[1]]), reserved_before);
    assert_eq!(nodes[1].node.silo().live_activations(), 3);
    for key in 0..3u64 {
        let (steps, bytes, on) = nodes[0]
            .node
            .grain::<Tensor>(key)
            .call(Inspect)
            .await
            .unwrap();
        assert_eq!(on, 2);
        assert!(
            bytes == expected(key, steps),
            "tensor {key}'s buffer changed"
        );
    }
    assert!(
        nodes.iter().all(|node| node
            .node
            .stats()
            .rebalance
            .iter()
            .all(|count| count.done == 0)),
        "the rebalancer did something"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nowhere_to_move_pressure_deactivates_the_grains_idle_longest() {
    let mut cluster = Cluster::new(47_800);
    cluster.rebalance = Some(rebalancing(Duration::from_millis(500)));
    let node = cluster.node(1, 20).await;
    converged(&[&node.node], 1).await;
    for key in 0..16u64 {
        node.node.grain::<Tensor>(key).call(Inspect).await.unwrap();
    }
    // Tensors 8 to 15 stay busy; 0 to 7 go idle.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders = keep_calling(&node.node, 8..16, &stop);
    let mut ballast = Vec::new();
    ballast_to(&node, 19, &mut ballast).await;
    // 95% down to 80%: three tensors go.
    let deadline = Instant::now() + Duration::from_secs(20);
    while fill(&node).0 > 16 * MIB {
        assert!(
            Instant::now() < deadline,
            "nothing was shed: {:?}",
            points(&[&node])
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Release);
    for sender in senders {
        sender.await.unwrap();
    }
    let active = |key: u64| {
        node.node
            .silo()
            .is_active_named("tensor", &GrainKey::U64(key))
    };
    let shed: Vec<u64> = (0..16).filter(|key| !active(*key)).collect();
    assert_eq!(shed.len(), 3, "{shed:?}");
    assert!(
        shed.iter().all(|key| *key < 8),
        "a busy tensor was shed: {shed:?}"
    );
    let pressure = node
        .node
        .stats()
        .rebalance
        .into_iter()
        .find(|count| count.reason == Reason::Pressure)
        .unwrap();
    assert_eq!(pressure.done, 3);
    // A shed tensor comes back on its next call.
    let (_, bytes, _) = node
        .node
        .grain::<Tensor>(shed[0])
        .call(Inspect)
        .await
        .unwrap();
    assert!(
        bytes == initial(shed[0]),
        "tensor {} came back afresh",
        shed[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_high_water_the_rebalancer_moves_grains_to_another_device_of_the_silo() {
    let mut cluster = Cluster::new(47_900);
    cluster.rebalance = Some(rebalancing(Duration::from_secs(3_600)));
    // One silo of two 20 MiB devices.
    let node = cluster.node_on(1, cpu_bridge_devices(20, 2)).await;
    converged(&[&node.node], 1).await;
    let kept = |device: usize| node.bridge.devices()[device].2.kept;
    // Device 1 full of something else while 18 tensors are made: they all
    // go to device 0 (90%, as far as a new GPU grain may fill it); a MiB
    // of something else there takes it to 95%; then device 1 is emptied.
    let ballast = ballast_on(&node, 1, (20 * MIB) as usize).await;
    let mut activations = Vec::new();
    for key in 0..18u64 {
        node.node.grain::<Tensor>(key).call(Inspect).await.unwrap();
        activations.push(node.node.grain::<Tensor>(key).call(Where).await.unwrap().1);
    }
    let _unmovable = ballast_on(&node, 0, MIB as usize).await;
    assert_eq!(kept(0), 19 * MIB);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders = keep_calling(&node.node, 0..18, &stop);
    drop(ballast);
    // Device 0 comes down to the fill limit (16 MiB) by moves to device 1.
    let deadline = Instant::now() + Duration::from_secs(30);
    while kept(0) > 16 * MIB {
        assert!(
            Instant::now() < deadline,
            "device 0 still keeps {} MiB",
            kept(0) / MIB
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Release);
    for sender in senders {
        assert!(sender.await.unwrap() > 0);
    }
    assert_eq!(kept(0) + kept(1), 19 * MIB, "nothing shed, nothing lost");
    // One move per grain now on device 1, each a high-water decision
    // carried out (counted once its move returns: waited for).
    let counted = || {
        let stats = node.node.stats();
        let done = stats
            .rebalance
            .iter()
            .filter(|d| d.reason == Reason::HighWater)
            .map(|d| d.done)
            .sum::<u64>();
        (stats.migrations.count, done)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while counted() != (kept(1) / MIB, kept(1) / MIB) {
        assert!(Instant::now() < deadline, "counted {:?}", counted());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The same activations serve, each on one device, with its state.
    cluster.census.check_one_at_a_time();
    for key in 0..18u64 {
        let (steps, bytes, _) = node.node.grain::<Tensor>(key).call(Inspect).await.unwrap();
        assert!(bytes == expected(key, steps), "grain {key}'s buffer");
        let (_, activation) = node.node.grain::<Tensor>(key).call(Where).await.unwrap();
        assert_eq!(
            activation, activations[key as usize],
            "grain {key} was activated again"
        );
    }
    assert!(
        cluster.census.arrivals.lock().unwrap().is_empty(),
        "no grain left its silo"
    );
}
