//! Who is in the cluster, alive, and how loaded: gossip with chitchat.
//!
//! # Rules
//!
//! 1. **Identity.** A silo gossips as chitchat node `address` with
//!    generation `incarnation` (its [`SiloId`]); a silo that restarts comes
//!    back with a greater incarnation ([`Membership::rejoin`] does so
//!    without restarting the process), and the view keeps only the newest
//!    incarnation of an address.
//! 2. **Joining** needs only seed addresses: chitchat gossips every
//!    `gossip_interval` with a few peers and the seeds.
//! 3. **Failure detection** is chitchat's phi-accrual detector over
//!    heartbeats: a silo whose heartbeats stop is suspected once phi (its
//!    silence over the mean interval between its heartbeats, about one
//!    `gossip_interval`) passes `phi_threshold`. A suspected silo stays in
//!    the view for `death_grace` more, and leaves it only if it stays
//!    silent that long; one heard from again in time was never gone. So a
//!    silo is declared dead after about `phi_threshold × gossip_interval +
//!    death_grace` of silence (1.6 s + 4 s with a node's defaults): a
//!    shorter time fails over sooner and takes a stalled silo (a blocked
//!    runtime, a GC-like pause, a slow disk) for dead more often. Both
//!    ends of a stall see it: the stalled silo, once it runs again, finds
//!    every peer silent for as long, and the same grace keeps its view.
//! 4. **Load** travels as node state: the silo's activation count and, per
//!    device, free memory, queue depth and capabilities
//!    ([`SiloLoad`]), published with [`Membership::publish_load`].
//! 5. **Leaving** gracefully marks the silo `leaving` and gossips that for
//!    a few intervals before stopping: peers drop it at once, without
//!    waiting for the failure detector.
//! 6. **Signed state.** A silo's status and load travel as one value
//!    tagged with the cluster secret's member-state key over the cluster's
//!    name, its id and incarnation (HMAC-SHA-256). A node whose value is
//!    missing or does not verify is not in the view: no silo counts it,
//!    places grains on it, or (connections need the secret too) talks to
//!    it. Over [`crate::gossip::SealedUdpTransport`] every datagram is
//!    sealed too, so a host without the secret is not heard at all
//!    (`sealed/mod.rs`); the signed state is what holds against a silo that
//!    has the secret, and over transports that seal nothing. chitchat's
//!    heartbeats say nothing signed, so the signed state also carries a
//!    beat that the silo advances every few of its own gossip rounds (and
//!    how often it does): a silo whose signed beat has not advanced for
//!    `BEATS_MISSED` of its beats leaves the view whatever chitchat's
//!    detector says, and a silo that left keeps its last beat on record
//!    for `dead_grace_period`, so heartbeats forged on and off do not bring
//!    it back.
//! 7. **The view** ([`Membership::members`], [`Membership::watch`]) lists
//!    live silos, this one included, sorted by id, each with its last load.
//!    It changes when a silo joins, leaves, dies or publishes new load.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat::transport::Transport as GossipTransport;
use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::SiloId;
use crate::auth::{ClusterSecret, Purpose};

/// The node-state key of a silo's signed state: `<hex tag>:<json State>`.
const STATE: &str = "granary.state";

/// The member-state key of the cluster's secret and the cluster's name:
/// what signs and checks a silo's state (rule 6).
#[derive(Clone)]
struct Signer {
    secret: ClusterSecret,
    cluster: String,
}

/// What a silo says about itself (rules 4 to 6).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    /// Leaving gracefully (rule 5).
    leaving: bool,
    load: SiloLoad,
    /// Advances every `BEAT_EVERY` gossip rounds (rule 6).
    beat: u64,
    /// How often this silo advances its beat, in milliseconds: silos may
    /// gossip at different rates, so each is judged by its own.
    beat_every_ms: u64,
}

/// Gossip rounds between two signed beats.
const BEAT_EVERY: u32 = 2;
/// Beats a silo may miss before it leaves the view (rule 6).
const BEATS_MISSED: u32 = 10;

/// One device of a silo, as the cluster sees it (rule 4). Fields added
/// after the first release default when a silo of an older release leaves
/// them out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceLoad {
    /// The backend (`Cpu`, `OpenCl`, `Cuda`, `Wgpu`).
    pub backend: String,
    /// The device's name.
    pub name: String,
    /// Device memory in all, in bytes.
    pub total_memory: u64,
    /// Device memory not reserved, in bytes.
    pub free_memory: u64,
    /// Requests running or queued on it.
    pub queue_depth: u64,
    /// Its compute units (SMs, OpenCL compute units, cores).
    pub compute_units: u32,
    /// Device memory reserved for grains and requests now, in bytes (the
    /// rest of `total_memory - free_memory` is not lent to Granary).
    #[serde(default)]
    pub reserved_memory: u64,
    /// Of `reserved_memory`, the bytes kept across requests (grains'
    /// resident buffers); the rest is requests' working memory.
    #[serde(default)]
    pub kept_memory: u64,
    /// Requests it finished successfully since the silo started.
    #[serde(default)]
    pub processed: u64,
    /// Requests that failed on it since the silo started.
    #[serde(default)]
    pub failed: u64,
    /// The latencies of its successful requests added up, in
    /// nanoseconds: with `processed`, the mean round trip between two
    /// loads.
    #[serde(default)]
    pub latency_sum_ns: u64,
}

/// A silo's load (rule 4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiloLoad {
    /// Grain activations alive on it.
    pub activations: u64,
    /// Its devices.
    pub devices: Vec<DeviceLoad>,
    /// The grain types it hosts (placement picks only silos that host a
    /// grain's type; an external client hosts none).
    #[serde(default)]
    pub grain_types: Vec<String>,
    /// Live activations by grain type (those with none left out; at most
    /// [`MAX_LOAD_GRAIN_TYPES`], the largest).
    #[serde(default)]
    pub activations_by_type: std::collections::BTreeMap<String, u64>,
    /// When the silo started, in milliseconds since the Unix epoch (0 if
    /// unknown).
    #[serde(default)]
    pub started_ms: u64,
    /// Whether it is leaving: it refuses new calls and lets its activations
    /// go before it leaves the view.
    #[serde(default)]
    pub leaving: bool,
    /// Whether it is fenced after a stall (it gives its homes up and comes
    /// back as a new incarnation).
    #[serde(default)]
    pub fenced: bool,
    /// When the silo took this load, in milliseconds since the Unix epoch
    /// by its clock (0 if unknown): rates from two loads divide by the
    /// time between them.
    #[serde(default)]
    pub published_ms: u64,
}

impl DeviceLoad {
    /// Device memory in use but for requests' working memory: what grains
    /// keep and what is not lent to Granary. What the rebalancer weighs
    /// (working memory comes and goes with each request).
    pub fn settled_memory(&self) -> u64 {
        let working = self.reserved_memory.saturating_sub(self.kept_memory);
        self.total_memory
            .saturating_sub(self.free_memory)
            .saturating_sub(working)
    }

    /// Device memory neither settled nor lent out for good: free memory
    /// and requests' working memory, which comes back (the bridge's
    /// `resident.rs` rule 1: a resident buffer waits for it). What an
    /// arriving grain's buffers may take (`node/migration.rs` rule 1); a
    /// first call counts free memory only (placement rule 1).
    pub fn room(&self) -> u64 {
        self.total_memory.saturating_sub(self.settled_memory())
    }

    /// Every device of `bridge`, as a silo publishes them.
    pub fn of_bridge(bridge: &granary_gpu::GpuBridge) -> Vec<DeviceLoad> {
        bridge
            .devices()
            .into_iter()
            .map(|(_, info, stats)| DeviceLoad {
                backend: format!("{:?}", info.backend),
                name: info.name,
                total_memory: info.total_memory,
                free_memory: stats.available,
                queue_depth: stats.queue_depth,
                compute_units: info.compute_units,
                reserved_memory: stats.reserved,
                kept_memory: stats.kept,
                processed: stats.processed,
                failed: stats.failed,
                latency_sum_ns: u64::try_from(stats.latency_total.as_nanos()).unwrap_or(u64::MAX),
            })
            .collect()
    }
}

/// Milliseconds since the Unix epoch by this host's clock (0 before it):
/// the time a load is stamped with.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// The most grain types a load lists in `activations_by_type` (those with
/// the most activations), so that a silo hosting many types keeps its
/// gossiped state small.
pub const MAX_LOAD_GRAIN_TYPES: usize = 64;

/// A live silo in the view (rule 7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its identity.
    pub silo: SiloId,
    /// Where it gossips (chitchat membership; `None` under etcd).
    pub gossip: Option<SocketAddr>,
    /// Its last published load (default until it publishes).
    pub load: SiloLoad,
}

/// How a silo gossips.
#[derive(Debug, Clone, PartialEq)]
pub struct GossipConfig {
    /// The cluster's name; silos of other clusters are ignored.
    pub cluster: String,
    /// This silo.
    pub silo: SiloId,
    /// Where this silo gossips (UDP).
    pub gossip_address: SocketAddr,
    /// Gossip addresses to join through (any live member will do).
    pub seeds: Vec<String>,
    /// How often to gossip (default 500 ms).
    pub gossip_interval: Duration,
    /// Phi above which a silo is suspected (default 8, chitchat's): its
    /// silence over the mean interval between its heartbeats (rule 3).
    pub phi_threshold: f64,
    /// How long a suspected silo stays in the view before it is declared
    /// dead, unless it is heard from again (rule 3; default 4 s).
    pub death_grace: Duration,
    /// How long a dead silo's state is kept before it is forgotten
    /// (default 1 hour).
    pub dead_grace_period: Duration,
    /// The load this silo joins with (rule 4), so that its first entry in
    /// every view already says what it hosts (default: nothing yet).
    pub load: SiloLoad,
}

impl GossipConfig {
    /// Gossip for `silo` on `gossip_address`, joining through `seeds`,
    /// with the defaults.
    pub fn new(
        cluster: impl Into<String>,
        silo: SiloId,
        gossip_address: SocketAddr,
        seeds: Vec<String>,
    ) -> GossipConfig {
        GossipConfig {
            cluster: cluster.into(),
            silo,
            gossip_address,
            seeds,
            gossip_interval: Duration::from_millis(500),
            phi_threshold: 8.0,
            death_grace: Duration::from_secs(4),
            dead_grace_period: Duration::from_secs(3600),
            load: SiloLoad::default(),
        }
    }
}

/// Why gossip could not start or stop.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MembershipError {
    /// The gossip socket could not be opened, or chitchat failed to start.
    Start(String),
    /// The gossip server failed while stopping.
    Stop(String),
}

impl std::fmt::Display for MembershipError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MembershipError::Start(why) => write!(f, "gossip could not start: {why}"),
            MembershipError::Stop(why) => write!(f, "gossip did not stop cleanly: {why}"),
        }
    }
}

impl std::error::Error for MembershipError {}

/// This silo's membership: its gossip and its view of the cluster.
pub struct Membership {
    handle: ChitchatHandle,
    secret: ClusterSecret,
    /// What this silo says about itself, signed and published whole.
    state: Arc<tokio::sync::Mutex<State>>,
    /// Advances the signed beat (rule 6).
    beater: tokio::task::JoinHandle<()>,
    view: watch::Receiver<Vec<Member>>,
    gossip_interval: Duration,
    /// Turns chitchat's live set into the view.
    follower: tokio::task::JoinHandle<()>,
    /// What it joined with, for [`Membership::rejoin`].
    config: GossipConfig,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("members", &*self.view.borrow())
            .finish_non_exhaustive()
    }
}

impl Membership {
    /// Starts gossiping over `transport` (chitchat's UDP transport, or its
    /// in-process channel transport in tests) and joins through the seeds
    /// (rule 2).
    pub async fn join(
        config: GossipConfig,
        secret: ClusterSecret,
        transport: &dyn GossipTransport,
    ) -> Result<Membership, MembershipError> {
        let gossip_interval = config.gossip_interval.max(Duration::from_millis(1));
        let joined = config.clone();
        let chitchat_config = ChitchatConfig {
            chitchat_id: ChitchatId::new(
                config.silo.address.clone(),
                config.silo.incarnation,
                config.gossip_address,
            ),
            cluster_id: config.cluster.clone(),
            gossip_interval,
            listen_addr: config.gossip_address,
            seed_nodes: config.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: config.phi_threshold,
                sampling_window_size: 1000,
                // Heartbeats come every gossip round or so: a silo heard
                // from once starts from that, not chitchat's 5 s default.
                max_interval: gossip_interval * 20,
                initial_interval: gossip_interval * 2,
                dead_node_grace_period: config.dead_grace_period,
            },
            marked_for_deletion_grace_period: config.dead_grace_period,
            catchup_callback: None,
            extra_liveness_predicate: None,
        };
        let beat = gossip_interval * BEAT_EVERY;
        let state = State {
            beat_every_ms: beat.as_millis().max(1) as u64,
            load: config.load.clone(),
            ..State::default()
        };
        let signer = Signer {
            secret: secret.clone(),
            cluster: config.cluster.clone(),
        };
        let value = signed(&signer, &chitchat_config.chitchat_id, &state)
            .ok_or_else(|| MembershipError::Start("the state did not serialise".into()))?;
        let handle =
            chitchat::spawn_chitchat(chitchat_config, vec![(STATE.to_string(), value)], transport)
                .await
                .map_err(|err| MembershipError::Start(err.to_string()))?;
        let live = handle
            .with_chitchat(|chitchat| chitchat.live_nodes_watcher())
            .await;
        let (publish, view) = watch::channel(Vec::new());
        let follower = tokio::spawn(follow(
            live,
            publish,
            signer.clone(),
            beat,
            config.death_grace,
            config.dead_grace_period,
        ));
        let state = Arc::new(tokio::sync::Mutex::new(state));
        let beater = tokio::spawn(advance_beat(
            handle.chitchat(),
            handle.chitchat_id().clone(),
            state.clone(),
            signer,
            beat,
        ));
        Ok(Membership {
            handle,
            secret,
            state,
            beater,
            view,
            gossip_interval,
            follower,
            config: joined,
        })
    }

    /// Stops gossiping as this incarnation and joins again as a new one of
    /// the same address (rule 1): the clock in milliseconds, or one more
    /// than the current incarnation if that is greater. It gossips over
    /// `transport` with the load last published, and peers see the old
    /// incarnation replaced by the new one ([`Membership::silo`] names
    /// it). The old gossip is stopped even if the new one cannot start.
    pub async fn rejoin(
        self,
        transport: &dyn GossipTransport,
    ) -> Result<Membership, MembershipError> {
        let mut config = self.config.clone();
        let clock = unix_ms();
        let incarnation = clock.max(config.silo.incarnation.saturating_add(1));
        config.silo = SiloId::new(config.silo.address.clone(), incarnation);
        config.load = self.state.lock().await.load.clone();
        let secret = self.secret.clone();
        self.stop().await?;
        Membership::join(config, secret, transport).await
    }

    /// Publishes `change` of this silo's state, signed (rule 6).
    async fn publish(&self, change: impl FnOnce(&mut State)) {
        let mut state = self.state.lock().await;
        change(&mut state);
        let signer = Signer {
            secret: self.secret.clone(),
            cluster: self.config.cluster.clone(),
        };
        let Some(value) = signed(&signer, self.handle.chitchat_id(), &state) else {
            return;
        };
        self.handle
            .with_chitchat(|chitchat| chitchat.self_node_state().set(STATE, &value))
            .await;
    }

    /// The live silos now, this one included (rule 7).
    pub fn members(&self) -> Vec<Member> {
        self.view.borrow().clone()
    }

    /// The view, as it changes.
    pub fn watch(&self) -> watch::Receiver<Vec<Member>> {
        self.view.clone()
    }

    /// This silo's identity.
    pub fn silo(&self) -> SiloId {
        let id = self.handle.chitchat_id();
        SiloId::new(id.node_id.clone(), id.generation_id)
    }

    /// Publishes this silo's load to the cluster (rule 4).
    pub async fn publish_load(&self, load: &SiloLoad) {
        self.publish(|state| state.load = load.clone()).await;
    }

    /// Leaves gracefully (rule 5): peers drop this silo from their views
    /// at once, then gossip stops.
    pub async fn leave(self) -> Result<(), MembershipError> {
        self.publish(|state| state.leaving = true).await;
        tokio::time::sleep(self.gossip_interval * 4).await;
        self.stop().await
    }

    /// Stops gossiping at once, as a crash would look to peers (they find
    /// out through the failure detector).
    pub async fn stop(self) -> Result<(), MembershipError> {
        self.follower.abort();
        self.beater.abort();
        self.handle
            .shutdown()
            .await
            .map_err(|err| MembershipError::Stop(err.to_string()))
    }
}

/// Keeps the view up to date with chitchat's live set (rules 3 and 7).
async fn follow(
    mut live: watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
    publish: watch::Sender<Vec<Member>>,
    signer: Signer,
    own_beat: Duration,
    death_grace: Duration,
    remember: Duration,
) {
    // Each node's last signed beat and when it was first seen (rule 6).
    let mut beats: std::collections::HashMap<ChitchatId, (u64, Instant)> =
        std::collections::HashMap::new();
    // Rule 3: the silos counted live last time, and those that have since
    // fallen silent, with their last state and since when.
    let mut counted: std::collections::HashMap<ChitchatId, State> =
        std::collections::HashMap::new();
    let mut suspects = Suspects::default();
    let mut recheck = tokio::time::interval(own_beat);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = Instant::now();
        let signed = signed_states(&live.borrow_and_update(), &signer);
        // A node that falls out of chitchat's live set keeps its last beat
        // for `remember`: if forged heartbeats bring it back with the same
        // signed beat, it is still stale (rule 6), not new.
        beats.retain(|id, (_, since)| {
            signed.iter().any(|(known, _)| known == id) || now.duration_since(*since) < remember
        });
        let fresh: Vec<(ChitchatId, State)> = signed
            .into_iter()
            .filter(|(id, state)| {
                let (beat, since) = beats.entry(id.clone()).or_insert((state.beat, now));
                if state.beat > *beat {
                    *beat = state.beat;
                    *since = now;
                }
                let stale_after =
                    Duration::from_millis(state.beat_every_ms.max(1)).saturating_mul(BEATS_MISSED);
                now.duration_since(*since) < stale_after
            })
            .collect();
        let suspected = suspects.update(&mut counted, &fresh, now, death_grace);
        let members = view_of(fresh.into_iter().chain(suspected));
        publish.send_if_modified(|view| {
            if *view == members {
                false
            } else {
                *view = members;
                true
            }
        });
        tokio::select! {
            changed = live.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = recheck.tick() => {}
        }
    }
}

/// Silos that fell silent and are within their grace (rule 3).
#[derive(Default)]
struct Suspects {
    /// Each suspect's last state, and when it was first found silent.
    silent: std::collections::HashMap<ChitchatId, (State, Instant)>,
}

impl Suspects {
    /// Moves the silos of `counted` missing from `fresh` to the suspects
    /// (a silo that said it is leaving goes at once: rule 5), forgets
    /// suspects heard from again or past their grace, sets `counted` to
    /// `fresh`, and returns the suspects still within their grace.
    fn update(
        &mut self,
        counted: &mut std::collections::HashMap<ChitchatId, State>,
        fresh: &[(ChitchatId, State)],
        now: Instant,
        grace: Duration,
    ) -> Vec<(ChitchatId, State)> {
        let heard = |id: &ChitchatId| fresh.iter().any(|(known, _)| known == id);
        for (id, state) in counted.drain() {
            if !state.leaving && !heard(&id) {
                self.silent.entry(id).or_insert((state, now));
            }
        }
        counted.extend(fresh.iter().cloned());
        self.silent
            .retain(|id, (_, since)| !heard(id) && now.duration_since(*since) < grace);
        self.silent
            .iter()
            .map(|(id, (state, _))| (id.clone(), state.clone()))
            .collect()
    }
}

/// Republishes this silo's signed state with its beat advanced, every
/// `every` (rule 6).
async fn advance_beat(
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    id: ChitchatId,
    state: Arc<tokio::sync::Mutex<State>>,
    signer: Signer,
    every: Duration,
) {
    let mut ticks = tokio::time::interval(every);
    loop {
        ticks.tick().await;
        let mut state = state.lock().await;
        state.beat += 1;
        if let Some(value) = signed(&signer, &id, &state) {
            chitchat.lock().await.self_node_state().set(STATE, &value);
        }
    }
}

/// The value of [`STATE`] for `state` of node `id`: the tag in hex, a
/// colon, the JSON.
fn signed(signer: &Signer, id: &ChitchatId, state: &State) -> Option<String> {
    let json = serde_json::to_string(state).ok()?;
    let tag = signer.secret.tag(
        Purpose::MemberState,
        &signer.cluster,
        &[&covered(id, &json)],
    );
    let hex: String = tag.iter().map(|byte| format!("{byte:02x}")).collect();
    Some(format!("{hex}:{json}"))
}

/// What a state's tag covers: the node's id, incarnation and gossip
/// address, length-prefixed, then the JSON.
fn covered(id: &ChitchatId, json: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(json.len() + 64);
    for part in [
        id.node_id.as_bytes(),
        id.gossip_advertise_addr.to_string().as_bytes(),
    ] {
        bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
        bytes.extend_from_slice(part);
    }
    bytes.extend_from_slice(&id.generation_id.to_le_bytes());
    bytes.extend_from_slice(json.as_bytes());
    bytes
}

/// The state node `id` published, if its tag verifies (rule 6).
fn verified(signer: &Signer, id: &ChitchatId, value: &str) -> Option<State> {
    let (hex, json) = value.split_once(':')?;
    if hex.len() != 64 {
        return None;
    }
    let tag = (0..32)
        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    if !signer.secret.verify_tag(
        Purpose::MemberState,
        &signer.cluster,
        &[&covered(id, json)],
        &tag,
    ) {
        return None;
    }
    serde_json::from_str(json).ok()
}

/// The live nodes whose state verifies (rule 6).
fn signed_states(
    live: &BTreeMap<ChitchatId, NodeState>,
    signer: &Signer,
) -> Vec<(ChitchatId, State)> {
    live.iter()
        .filter_map(|(id, node)| {
            let state = node
                .get(STATE)
                .and_then(|value| verified(signer, id, value))?;
            Some((id.clone(), state))
        })
        .collect()
}

/// Rules 1 and 5: the newest incarnation of each address, without silos
/// that are leaving; sorted by id.
fn view_of(signed: impl IntoIterator<Item = (ChitchatId, State)>) -> Vec<Member> {
    let mut newest: BTreeMap<String, Member> = BTreeMap::new();
    for (id, state) in signed {
        if state.leaving {
            continue;
        }
        let member = Member {
            silo: SiloId::new(id.node_id.clone(), id.generation_id),
            gossip: Some(id.gossip_advertise_addr),
            load: state.load,
        };
        match newest.get(id.node_id.as_str()) {
            Some(known) if known.silo.incarnation >= id.generation_id => {}
            _ => {
                newest.insert(id.node_id.clone(), member);
            }
        }
    }
    newest.into_values().collect()
}
