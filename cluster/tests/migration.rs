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

use std::time::Duration;

use common::tensor::*;
use granary_actors::migration::{MigrationError, MigrationTarget};
use granary_cluster::ClusterNode;
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_grains_move_under_ten_thousand_calls_and_lose_nothing() {
    let cluster = Cluster::new(47_100);
    let nodes = [
        cluster.node(1, 256).await,
        cluster.node(2, 256).await,
        cluster.node(3, 256).await,
    ];
    moves_under_load(&cluster, &nodes, 100, 20, 10_000).await;
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
