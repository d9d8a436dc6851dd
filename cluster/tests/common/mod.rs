//! What the cluster tests share: a persisted counter grain and free ports.
#![allow(dead_code)]

use granary_actors::storage::PersistentState;
use granary_actors::{ActivationError, Grain, GrainContext, GrainKey, Handler, Message};
use serde::{Deserialize, Serialize};

/// A counter whose value is persisted after every change.
pub struct Counter {
    pub state: Option<PersistentState<u64>>,
}

impl Grain for Counter {
    fn new(_: &GrainKey) -> Counter {
        Counter { state: None }
    }

    async fn on_activate(&mut self, ctx: &mut GrainContext) -> Result<(), ActivationError> {
        self.state = Some(ctx.load_state::<u64>().await?);
        Ok(())
    }
}

impl Counter {
    /// Adds `n`, writes the state, and answers the new value.
    pub async fn add(&mut self, n: u64) -> u64 {
        let Some(state) = &mut self.state else {
            return 0;
        };
        *state.get_mut() += n;
        let _ = state.write().await;
        *state.get()
    }
}

#[derive(Serialize, Deserialize)]
pub struct Add(pub u64);

impl Message for Add {
    type Reply = u64;
}

impl Handler<Add> for Counter {
    async fn handle(&mut self, Add(n): Add, _: &mut GrainContext) -> u64 {
        self.add(n).await
    }
}

/// `count` UDP ports on loopback the OS had free, so parallel runs do not
/// collide.
/// `test`'s own etcd configuration at `endpoints` (comma-separated): a
/// cluster name no other run uses, so runs never see each other's keys,
/// and a 2 s ttl.
#[cfg(feature = "etcd")]
pub fn etcd_config(test: &str, endpoints: &str) -> granary_cluster::etcd::EtcdConfig {
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).expect("randomness");
    let mut config = granary_cluster::etcd::EtcdConfig::new(
        format!("{test}-{}", u64::from_le_bytes(nonce)),
        endpoints.split(',').map(str::to_string).collect(),
    );
    config.ttl = std::time::Duration::from_secs(2);
    config
}

#[path = "../../../build-support/test_ports.rs"]
mod test_ports;

/// `count` distinct loopback ports, free for UDP and TCP
/// (`build-support/test_ports.rs`).
pub fn free_udp_ports(count: usize) -> Vec<u16> {
    test_ports::free_ports(count)
}
pub mod tensor;
