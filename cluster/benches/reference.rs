//! The one grain reference on a clustered silo, against the same call on a
//! lone silo, in one criterion run.
//!
//! ```text
//! cargo bench -p granary-cluster --bench reference
//! ```
//!
//! - `local_call/lone_silo`: `GrainRef::call` on a silo with no cluster
//!   (the typed path alone).
//! - `local_call/clustered_silo`: the same call through the same kind of
//!   reference, on a silo that is a cluster node, to a grain whose home is
//!   that silo (the router finds the home here: no encoding, no hop).
//! - `local_call/clustered_fresh_ref`: as above, with a new reference per
//!   call (`ctx.grain(key)` in a handler makes one each time).
//!
//! Both on one current-thread runtime, as `actors`' `ask` bench runs.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use granary_actors::{Grain, GrainContext, GrainKey, Handler, Message, Silo, SiloConfig};
use granary_cluster::{ClusterNode, ClusterSecret, InProcessNetwork, NodeConfig};
use serde::{Deserialize, Serialize};

struct Counter(u64);
impl Grain for Counter {
    fn new(_: &GrainKey) -> Counter {
        Counter(0)
    }
}

#[derive(Serialize, Deserialize)]
struct Add(u64);
impl Message for Add {
    type Reply = u64;
}
impl Handler<Add> for Counter {
    async fn handle(&mut self, Add(n): Add, _: &mut GrainContext) -> u64 {
        self.0 += n;
        self.0
    }
}

fn silo() -> Silo {
    Silo::builder()
        .register::<Counter>("counter")
        .message::<Counter, Add>("add")
        .config(SiloConfig {
            mailbox_capacity: 4096,
            ..SiloConfig::default()
        })
        .build()
        .expect("a silo")
}

fn local_call(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut group = c.benchmark_group("local_call");

    let lone = silo();
    let counter = lone.grain::<Counter>(7u64);
    group.bench_function("lone_silo", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(counter.call(Add(1)).await.expect("an answer")) })
    });
    rt.block_on(lone.shutdown());

    let node = rt.block_on(async {
        let network = InProcessNetwork::new();
        let gossip = chitchat::transport::ChannelTransport::default();
        let mut config = NodeConfig::new(
            "bench",
            ClusterSecret::new([0x85; 32]).expect("a secret"),
            "silo-1:7000",
            std::net::SocketAddr::from(([127, 0, 0, 1], 41_001)),
            vec![],
        );
        config.gossip_interval = Duration::from_millis(50);
        let node = ClusterNode::builder(silo(), config)
            .transport(Arc::new(network.transport("silo-1:7000")))
            .start(gossip.clone())
            .await
            .expect("a node");
        while node.members().len() != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        node
    });
    let counter = node.grain::<Counter>(7u64);
    rt.block_on(async { counter.call(Add(1)).await.expect("homed here") });
    assert_eq!(node.homes(), 1, "the grain's home is this silo");
    group.bench_function("clustered_silo", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(counter.call(Add(1)).await.expect("an answer")) })
    });
    group.bench_function("clustered_fresh_ref", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                node.grain::<Counter>(7u64)
                    .call(Add(1))
                    .await
                    .expect("an answer"),
            )
        })
    });
    rt.block_on(async {
        let _ = node.leave().await;
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = local_call
}
criterion_main!(benches);
