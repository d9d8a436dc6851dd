//! Sample: cluster nodes started from TOML node files, hosting grains of
//! your own, with the `granary` library (`granary::node_file`, what
//! `granary node` runs with the cluster demo's grains).
//!
//! ```text
//! cluster-demo                  two nodes in this process, from node files
//!                               written here; a few calls to counters
//!                               from each, wherever the counters live
//! cluster-demo --config FILE    one node from FILE, hosting the counters,
//!                               until Ctrl-C
//! ```
//!
//! The grains a node hosts are not in its file: the program passes them.
//! Here that is [`counters`], a function that hosts the [`Counter`] grain
//! on the node's silo, in one line: the grain type declares its name and
//! the messages it takes from other silos with `#[derive(GrainType)]`.
//! The file gives the rest (addresses, secret, storage, devices, gossip or
//! etcd).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use granary::actors::{
    ActivationError, CallError, Grain, GrainContext, GrainKey, GrainType, Handler, Message,
    PersistentState, SiloBuilder,
};
use granary::cluster::{ClusterNode, ClusterSecret, MembershipError};
use granary::node_file::{self, NodeDevices, NodeFile, NodeRunError};
use serde::{Deserialize, Serialize};

/// A counter with persisted state, keyed by name: hosted as `"counter"`,
/// taking [`Add`] from other silos (so that a call reaches a counter whose
/// home is another silo).
#[derive(GrainType)]
#[grain(crate = granary::actors, name = "counter", messages(Add))]
pub struct Counter {
    state: Option<PersistentState<Tally>>,
}

/// A counter's persisted state: its total, and the last [`Add`] applied
/// from each caller.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tally {
    total: u64,
    last: BTreeMap<String, u64>,
}

impl Grain for Counter {
    fn new(_: &GrainKey) -> Counter {
        Counter { state: None }
    }

    async fn on_activate(&mut self, ctx: &mut GrainContext) -> Result<(), ActivationError> {
        self.state = Some(ctx.load_state::<Tally>().await?);
        Ok(())
    }
}

/// Adds `by` to a counter, once per `caller` and `seq` (a caller numbers
/// its adds 1, 2, 3, ...): an add retried after its answer was lost (a
/// timeout, a connection cut) is not counted twice. Answers the total once
/// persisted. The counter keeps each caller's highest `seq`, so a caller
/// sends one add at a time to a counter (as this sample's do); an add
/// whose `seq` is not above the last one is taken as a retry. Each caller
/// name stays in the counter's state: callers whose names come and go
/// (a node's id per run) would want the entries pruned.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(crate = granary::actors, name = "add", reply = Result<u64, String>)]
pub struct Add {
    /// What to add.
    pub by: u64,
    /// Who adds: a name no other caller uses (here the node's id).
    pub caller: String,
    /// This caller's number for this add, from 1, one more each time.
    pub seq: u64,
}

impl Handler<Add> for Counter {
    async fn handle(&mut self, add: Add, _: &mut GrainContext) -> Result<u64, String> {
        let Some(state) = &mut self.state else {
            return Err("the counter is not active".into());
        };
        let before = state.get().clone();
        let last = before.last.get(&add.caller).copied().unwrap_or(0);
        if add.seq <= last {
            // Applied already: the caller retried.
            return Ok(before.total);
        }
        let Some(total) = before.total.checked_add(add.by) else {
            return Err(format!(
                "{} + {} overflows the counter",
                before.total, add.by
            ));
        };
        let tally = state.get_mut();
        tally.total = total;
        tally.last.insert(add.caller, add.seq);
        if let Err(err) = state.write().await {
            // Reported as failed, so not counted: a later write must not
            // store it.
            *state.get_mut() = before;
            return Err(err.to_string());
        }
        Ok(total)
    }
}

/// What these nodes host: the counter, with its message by name.
pub fn counters(silo: SiloBuilder, _: &NodeDevices) -> SiloBuilder {
    silo.host::<Counter>()
}

/// Why the sample failed.
#[derive(Debug)]
enum SampleError {
    /// A node could not start or run.
    Node(NodeRunError),
    /// No free local port for gossip.
    Port(std::io::Error),
    /// The two nodes did not see each other in time.
    NotFormed(usize),
    /// A call failed, after retries.
    Call(String, CallError),
    /// A counter refused a call.
    Counter(String, String),
    /// A counter's total is not the sum of what was added.
    Total(String, u64),
    /// A node could not leave the cluster.
    Leave(MembershipError),
}

impl fmt::Display for SampleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SampleError::Node(err) => write!(f, "{err}"),
            SampleError::Port(err) => write!(f, "no free port: {err}"),
            SampleError::NotFormed(seen) => {
                write!(f, "the cluster did not form: {seen} of 2 nodes seen")
            }
            SampleError::Call(key, err) => write!(f, "calling counter {key}: {err}"),
            SampleError::Counter(key, err) => write!(f, "counter {key}: {err}"),
            SampleError::Total(key, total) => {
                write!(f, "counter {key} holds {total}, not 3")
            }
            SampleError::Leave(err) => write!(f, "leaving: {err}"),
        }
    }
}

impl From<NodeRunError> for SampleError {
    fn from(err: NodeRunError) -> SampleError {
        SampleError::Node(err)
    }
}

/// A node file for a node on loopback that gossips on `gossip` and joins
/// through `seed`: the text a real deployment keeps in a file.
fn node_file(gossip: SocketAddr, seed: SocketAddr, secret: &str) -> Result<NodeFile, NodeRunError> {
    NodeFile::from_toml(&format!(
        r#"
cluster = "sample"
secret = "{secret}"
listen = "127.0.0.1:0"
gossip = "{gossip}"
seeds = ["{seed}"]
gossip_interval_ms = 100
storage = {{ kind = "memory" }}
devices = {{ backend = "cpu", memory_mib = 64 }}
"#
    ))
}

/// Two distinct free local UDP ports: both sockets are held until both
/// are known, so the system cannot hand out one port twice.
fn free_gossip_addresses() -> Result<(SocketAddr, SocketAddr), SampleError> {
    let bind = || std::net::UdpSocket::bind("127.0.0.1:0").map_err(SampleError::Port);
    let (a, b) = (bind()?, bind()?);
    Ok((
        a.local_addr().map_err(SampleError::Port)?,
        b.local_addr().map_err(SampleError::Port)?,
    ))
}

/// Adds `by` to counter `key` through `node` as its add number `seq`,
/// retrying while the cluster settles (a call may fail while a view change
/// is handed over, perhaps after it ran: the counter applies it once).
async fn add(node: &ClusterNode, key: &str, by: u64, seq: u64) -> Result<u64, SampleError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let add = Add {
        by,
        caller: node.id().to_string(),
        seq,
    };
    loop {
        match node.grain::<Counter>(key).call(add.clone()).await {
            Ok(Ok(total)) => return Ok(total),
            Ok(Err(err)) => return Err(SampleError::Counter(key.to_string(), err)),
            Err(err) if Instant::now() > deadline => {
                return Err(SampleError::Call(key.to_string(), err));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Two nodes in this process, from node files; each adds to every
/// counter, and the counters' totals and homes are printed.
async fn two_nodes() -> Result<(), SampleError> {
    let (gossip_a, gossip_b) = free_gossip_addresses()?;
    // The two silos' secret, of this run only (`granary secret` prints one
    // for a real cluster's files).
    let secret = ClusterSecret::generate_hex().map_err(|err| NodeRunError(err.to_string()))?;
    let a = node_file::start_node(&node_file(gossip_a, gossip_a, &secret)?, &counters).await?;
    let b = node_file::start_node(&node_file(gossip_b, gossip_a, &secret)?, &counters).await?;
    println!("nodes: {} and {}", a.id(), b.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.members().len() < 2 || b.members().len() < 2 {
        if Instant::now() > deadline {
            return Err(SampleError::NotFormed(
                a.members().len().min(b.members().len()),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for key in ["apples", "pears", "plums", "figs"] {
        add(&a, key, 1, 1).await?;
        let total = add(&b, key, 2, 1).await?;
        if total != 3 {
            return Err(SampleError::Total(key.to_string(), total));
        }
        // The same add again, as a retry after a lost answer would send
        // it: applied once.
        let again = add(&b, key, 2, 1).await?;
        if again != 3 {
            return Err(SampleError::Total(key.to_string(), again));
        }
        let home = b
            .location(Counter::NAME, GrainKey::from(key))
            .map_or_else(|| "unknown".to_string(), |home| home.to_string());
        println!(
            "counter {key}: total {total} after a call from each node and one retried; lives on {home}"
        );
    }
    println!(
        "homes: {} on {}, {} on {}",
        a.homes(),
        a.id(),
        b.homes(),
        b.id()
    );
    b.leave().await.map_err(SampleError::Leave)?;
    a.leave().await.map_err(SampleError::Leave)?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match args.as_slice() {
        [] => None,
        [flag, path] if flag == "--config" => Some(PathBuf::from(path)),
        _ => {
            eprintln!("usage: cluster-demo [--config FILE]");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cluster-demo: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = match config {
        None => runtime.block_on(two_nodes()),
        Some(path) => NodeFile::load(&path)
            .map_err(SampleError::Node)
            .and_then(|file| {
                runtime
                    .block_on(node_file::run_node(file, &counters))
                    .map_err(SampleError::Node)
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cluster-demo: {err}");
            ExitCode::FAILURE
        }
    }
}
