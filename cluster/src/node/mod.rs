//! A silo in a cluster: its grains reachable from every silo.
//!
//! # Protocol
//!
//! 1. **Home.** A grain's activation lives on its *home* silo. The home is
//!    recorded in the directory: the entry owned by the silo that
//!    rendezvous hashing picks for the grain from the membership view
//!    (`directory.rs`).
//! 2. **Calling.** A call goes to the home the caller has cached, else the
//!    one the directory's owner names, else the silo the placement
//!    strategy picks among those that host the grain's type (each silo
//!    publishes the types it hosts; an external client hosts none, and a
//!    silo asked to become home to a type it does not host answers
//!    `NoRoom`). A silo that receives a call for a grain it is not
//!    home to registers itself with the owner first: if it wins, it
//!    becomes the home and handles the call (its local silo activates the
//!    grain on demand); if not, it answers `Moved(home)` and the caller
//!    goes there, remembering it. So a grain is handled by at most one
//!    silo among those that agree on the view.
//! 3. **Ownership moves** when the view changes. Each silo then registers
//!    its homes with their new owners, and a silo that loses one stops
//!    taking calls for it and deactivates its activation (which writes its
//!    state; ETags refuse a stale write). A new owner answers `Retry` for a grain it has
//!    no entry for during `handoff` after a view change, so that homes are
//!    re-registered before anyone else can claim them. This holds as long
//!    as every silo learns of a view change within `handoff` (several
//!    gossip rounds by default). A new owner that has not learnt of the
//!    change yet answers `Retry` too (the grain is not its own in the view
//!    it has), so a home tries again, in rounds with a pause of
//!    `handoff / 8` (at least 5 ms) after each, until twice `handoff` after this silo
//!    learnt of the change (at least 160 ms): by then its owner has known
//!    of the change for `handoff` and may have let another silo claim the
//!    grain, so no try starts after it, and a home that has not
//!    re-registered is given up. A try already sent waits for its answer
//!    until a window later (at least 20 ms): the owner's answer stands
//!    whatever it is, and a slow owner is not taken for a silent one; the
//!    homes of that owner still owed are given up when its tries end, up
//!    to a window (at least 20 ms) after the deadline.
//!    Each owner's homes are tried on their own, a few at a time, so a
//!    late or silent owner holds up no other owner's homes; each home
//!    registers with the owner of the view it re-registers for, and
//!    records that owner. The homes
//!    re-register beside the task that follows the view, and a later
//!    change's re-registration replaces the earlier one's as soon as the
//!    change is seen (one replaced changes no home). The window starts
//!    before the new view is swapped in, so an owner never answers in a
//!    new view unsettled. A home still registering, for a call or as a
//!    migration's arrival (`migration.rs` rule 4), is not confirmed or is
//!    moving, so no view's pass re-registers it: it registers with the
//!    owner of the view it read, records it, reads the view again and, if
//!    the owner changed meanwhile, registers with the new one (existing)
//!    before the call runs or the arrival takes messages, up to two more
//!    times (a call is then told `Retry`); a pass that starts after the
//!    record sees it. An arrival stops moving (and takes messages) under
//!    its home's lock only if the view read there agrees with its
//!    recorded owner, and follows again otherwise, so a pass either sees
//!    it settled or ran on a view it has read; after a refusal (a round
//!    out of time is one), or three rounds, it takes messages recorded
//!    with the owner it registered with, unless the current view's pass
//!    deadline has passed (then it is discarded: `migration.rs` rule 4).
//!    A home left recorded so (by a call or an arrival), and one whose
//!    move out stayed after the view changed, re-registers beside them as
//!    a pass would (`follow_later`, one task per home): after each pause,
//!    with the owner of the view it reads then, until the deadline of the
//!    current view's pass, and is given up if not registered by then (a
//!    pass likewise keeps a home registered beside it); a later view
//!    change, or one whose pass has not started, leaves it to that view's
//!    pass. Connections to silos gone from the view are closed beside the
//!    view task, which does not wait for a connect in progress to them.
//! 4. **Failure.** A silo that leaves the view loses its homes: the
//!    owners drop its entries, the next call places the grain elsewhere,
//!    and the grain starts from its persisted state there. Connections to
//!    it are closed, so calls in flight fail at once with
//!    `SiloUnavailable`; a call to a silo that no longer answers fails with
//!    `Timeout` at the call timeout, never hangs. Callers that need a peer
//!    while a connect to it is under way wait for that one attempt and
//!    share its failure (`peers.rs`), so each waits about one handshake
//!    timeout, not one per caller queued before it.
//! 5. **Load.** Every `load_interval` the node publishes its activation
//!    count and, if it has a GPU bridge, each device's free memory, queue
//!    depth and capabilities, for placement elsewhere (and what operators
//!    see: activations by type, request counters, state, stamped with the
//!    time it was taken). A load that differs from the last one published
//!    only in its time stamp is published again only after
//!    `LOAD_REFRESH`, so an idle cluster stays quiet. Published load may
//!    be stale, so a silo never becomes home to a grain whose declared
//!    device needs do not fit it now (nor, with a rebalancer, that would
//!    take a device past its high water mark: rule 12), nor to any new
//!    grain while it holds
//!    its activation limit (rule 14 of the silo; a first call that reaches
//!    the limit after it was admitted is answered the same way): it answers
//!    `NoRoom`, and the caller places the grain elsewhere. A call every
//!    silo hosting the type refused is `CallError::Overloaded`. Memory is promised to a grain from that
//!    check until the call that activates it returns, so that first calls
//!    arriving together do not all count the same free bytes. A first
//!    call's check counts the device's free memory, less what is
//!    promised: refused, the caller places the grain where its buffers
//!    need not wait. A migration's reservation counts room instead
//!    (`migration.rs` rule 1).
//! 6. **Giving a home up.** A call arriving here pins the grain's home
//!    from before it registers until the local silo has answered it
//!    (creating the home unconfirmed if there is none). When the grain's
//!    activation here ends (idle, deactivated, or its `on_activate`
//!    failed) and no call pins the home, the silo marks it leaving
//!    (calls get `Retry`), asks the owner to remove the entry if it still
//!    holds this silo's activation number, and forgets the home. The next
//!    call places the grain afresh, where it fits now; a caller told
//!    `Retry` asks the directory again, while one that still has the old
//!    home cached sends its call there, and that silo becomes home again
//!    if the grain fits (rule 5). An unconfirmed home whose entry may name
//!    this silo anyway (a registration whose answer was lost, or a full
//!    device answering `NoRoom` to a grain the entry sends here) removes
//!    any entry naming this silo when it goes. A node that has left, was
//!    killed, lost its etcd lease or could not come back after a fence
//!    (rule 7) serves nothing and connects to no one.
//! 7. **Fencing after a stall.** A silo whose runtime stood still for 60%
//!    of the soonest its peers could declare it dead fences itself from a
//!    watchdog thread, before anyone can place its grains elsewhere: it
//!    refuses to become home to anything (`Retry`), answers no directory
//!    request, ends its home leases and gives every home up (what was
//!    queued is dropped unrun); once it runs again, it waits for every
//!    activation it held to end, then comes back as a new incarnation of
//!    its address, with none of the directory entries it owned: peers
//!    re-register their homes with it as with any silo that joins
//!    (`fence.rs`, `incarnation.rs`). So once its fence lifts, it holds no
//!    activation of a grain that moved, and no entry that went stale while
//!    it was taken for dead.
//! 8. **Reminders** are fired by one silo per grain: the rendezvous choice
//!    among the silos of the view that host the grain's type; each silo
//!    rescans the shared reminder table after every view change, and a
//!    reminder registered elsewhere is announced to its owner
//!    (`reminders.rs`).
//!
//! 9. **Observers** on other silos are reached through the node: a
//!    notification travels to the silo an observer reference names, as a
//!    request to a reserved grain type; a reference to a silo that is not
//!    in the view reaches no one, and the grain drops that subscriber once
//!    its expiry has passed (`observers.rs`).
//! 10. **Accepting** never ends while the node serves: an accept that
//!     fails (out of file descriptors, a connection reset before it was
//!     taken) is retried after a wait that doubles while it keeps failing
//!     (10 ms to 1 s). At most 256 handshakes run at once, at most 16 from
//!     one host; a connection beyond them closes at once, so silent
//!     connections hold at most that many sockets for `handshake_timeout`
//!     and one host's cannot take every slot. Only a listener that is gone
//!     (the in-process network's, closed) ends the loop. A peer is let in
//!     only if the view holds it at the incarnation it claims (one not
//!     seen yet is waited for, up to half the handshake's timeout), before
//!     this silo proves anything to it (`admission.rs`). At most 4
//!     connections accepted from one peer stay open; a fifth closes the
//!     oldest. Directory requests are authorised against the peer that
//!     sent them: a silo registers and unregisters only homes of its own,
//!     and gives away (a migration's switch) only entries naming it, and
//!     names past their bounds are refused (`directory_service.rs`).
//!
//! 11. **Migration.** A home moves to another silo only as
//!     `migration.rs` says: the target reserves room as rule 5 would for a
//!     first call, calls to the moving home wait and then follow it, and
//!     the source gives its directory entry to the target's activation
//!     with a compare on its own activation number (only the silo an
//!     entry names may move it), so that rule 2's "at most one silo"
//!     holds through the move and through a crash on either side.
//! 12. **Rebalancing.** A node with a rebalancer (`NodeConfig::rebalance`)
//!     moves its GPU grains by rule 11 as `crate::rebalance` decides from
//!     the gossiped load, and under device-memory pressure deactivates
//!     idle ones (`rebalance.rs`); with one, rule 5 also refuses a new GPU
//!     grain that would take a device past the high water mark. Each
//!     grain's resident buffers allocated through `DeviceQuotas` are held
//!     to what its type declares (`quotas.rs`).
//!
//! Directory operations travel as ordinary requests to the reserved grain
//! type `$directory` on the same connections as grain calls.
//!
//! The parts: `config` holds the node's settings and why a start fails;
//! `builder` binds, joins through gossip or etcd and hands over to
//! `serve`, which runs the tasks that accept connections, follow the view
//! and publish load, and stops them when the node leaves, is killed,
//! loses its etcd lease or cannot come back after a fence;
//! `peers` keeps the connection to each peer (rule 4), the membership
//! provider and the load it publishes (rule 5); `router` is the calling
//! side (rule 2); `directory_client` sends directory requests and
//! `directory_service` answers those for entries this silo owns (rules 1
//! to 3); `home` is the serving side of rules 2, 3, 5 and 6; `fence` and
//! `incarnation` keep rule 7 (`incarnation` also feeds the node the view
//! it follows), `reminders` and `observers` rules 8 and 9, `admission`
//! lets only silos of the view connect (rule 10), `migration` moves homes
//! (rule 11), `rebalance` runs the rebalancer's rounds and `quotas` holds
//! grains to their declared memory (rule 12).

mod admission;
mod builder;
mod config;
mod directory_client;
mod directory_service;
mod fence;
mod home;
mod incarnation;
mod migration;
mod observers;
mod peers;
mod quotas;
mod rebalance;
mod reminders;
mod router;
mod serve;
mod stats;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use granary_actors::{GrainId, GrainKey, Silo};
use granary_gpu::GpuBridge;

use crate::SiloId;
use crate::connection::Connection;
use crate::directory::{self, LocationCache, Partition};
use crate::membership::Member;
use crate::placement::{GpuNeeds, PlacementStrategy};
use crate::transport::Transport;

pub use builder::NodeBuilder;
pub use config::{MAX_PHI, NodeConfig, NodeError};
pub use quotas::DeviceQuotas;
pub use router::ClusterCallError;
pub use stats::{ClusterStats, REMOTE_SECONDS_BOUNDS, RebalanceCount, Redirect};

use directory_client::DirectoryBackend;
use home::Home;
use peers::Provider;
use serve::Claim;

struct Inner {
    /// This silo's identity; replaced when it comes back as a new
    /// incarnation after a fence (rule 7, `incarnation.rs`).
    me: arc_swap::ArcSwap<SiloId>,
    config: NodeConfig,
    silo: Silo,
    bridge: Option<Arc<GpuBridge>>,
    transport: Arc<dyn Transport>,
    /// Taken out when the node leaves or stops.
    membership: tokio::sync::Mutex<Option<Provider>>,
    /// Where directory entries live.
    directory: DirectoryBackend,
    /// The view the node follows, as it changes: the membership's, fed by
    /// `feeding` (held across a rejoin: `incarnation.rs`).
    members: tokio::sync::watch::Receiver<Vec<Member>>,
    view_feed: tokio::sync::watch::Sender<Vec<Member>>,
    feeding: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// While a new incarnation follows the view it had, its peers not all
    /// heard yet, the hold's number (else 0): an entry it lacks is
    /// answered `Retry` (`incarnation.rs` rule 3).
    holding: AtomicU64,
    /// The view, as last seen by the view task.
    view: arc_swap::ArcSwap<Vec<Member>>,
    /// When the view last changed (rule 3).
    view_changed: Mutex<Instant>,
    handoff: Duration,
    /// Directory entries this silo owns.
    partition: Partition,
    /// Homes learned.
    cache: LocationCache,
    /// Grains this silo is home to (rules 2, 3 and 6).
    homes: DashMap<GrainId, Home>,
    /// Device memory promised to grains becoming home here whose
    /// activations have not reserved theirs yet (rule 5), in bytes.
    promised: Mutex<HashMap<usize, u64>>,
    /// Room held here for grains moving in, by the silo moving each and
    /// its ticket (`migration.rs` rule 1).
    reservations: DashMap<(SiloId, u64), migration::Reservation>,
    /// Grains arrived here and waiting for their source's verdict, by
    /// source and ticket (`migration.rs` rule 4).
    arrivals: DashMap<(SiloId, u64), migration::AwaitingVerdict>,
    /// Homes given up under rule 6.
    given_up: AtomicU64,
    /// Set when the node leaves, is killed, loses its etcd lease or cannot
    /// come back after a fence (rule 7): it serves nothing and connects to
    /// no one after that.
    stopped: std::sync::atomic::AtomicBool,
    /// Set when a graceful leave begins (`migration.rs` rule 6): the node
    /// becomes home to no new grain, and takes none moving in, while its
    /// GPU grains move away.
    draining: std::sync::atomic::AtomicBool,
    /// When each grain last moved, away or here (`rebalance.rs` rule 6):
    /// the rebalancer leaves it be for the cool-down.
    moved_at: DashMap<GrainId, Instant>,
    /// When a move of each grain between this silo's devices last failed
    /// (`rebalance.rs` rule 6): for the cool-down, the rebalancer moves it
    /// only away.
    local_refused: DashMap<GrainId, Instant>,
    /// The rebalancer round in which a move of each grain to another silo
    /// last failed (`node/rebalance.rs` rule 6): for a few rounds, it does
    /// not move that grain away and tries its other grains.
    away_refused: DashMap<GrainId, u64>,
    /// The number of the rebalancer's round under way (or last run),
    /// counted from 1 (`node/rebalance.rs` rule 6).
    rebalance_round: AtomicU64,
    /// Grains the rebalancer asked to deactivate, with the device and bytes
    /// they hold and until when they count as leaving: removed when their
    /// activation ends (`rebalance.rs` rule 4).
    shedding: DashMap<GrainId, rebalance::Shedding>,
    /// Fencing after a stall (rule 7, `fence.rs`).
    fence: fence::Fence,
    /// Advanced each time every home lease is ended (a view change, a
    /// stop, a fence): a lease granted across an advance is ended too.
    lease_epoch: AtomicU64,
    /// Under etcd, whether the silo still holds its lease (etcd rule 6):
    /// once it does not, others may have activated its grains, so it
    /// serves nothing more.
    holds_lease: Option<Box<dyn Fn() -> bool + Send + Sync>>,
    /// Where requests from other silos reach the local activations,
    /// without routing (rule 2).
    home_side: granary_actors::route::HomeSide,
    /// The silo's claim for this node, held as long as the node lives.
    claim: Mutex<Option<Claim>>,
    /// Open connections, by peer: the one calls go out on. The map's lock
    /// is never held across an await; a peer's slot is, only while
    /// connecting to that peer.
    connections: Mutex<HashMap<SiloId, Arc<tokio::sync::Mutex<peers::PeerSlot>>>>,
    /// The connection calls go out on, by peer, for the common case: read
    /// without the slots' locks. Kept with the slots: set when a slot gets
    /// a connection, removed when the peer leaves the view.
    open: DashMap<SiloId, Connection>,
    /// Connections peers opened, kept open for their calls (when both
    /// sides connect at once, each uses its own for its calls).
    accepted: tokio::sync::Mutex<Vec<Connection>>,
    placement: Arc<dyn PlacementStrategy>,
    /// Device needs by grain type name.
    needs: HashMap<String, GpuNeeds>,
    /// Each grain's device-memory quota, on a silo with a GPU bridge
    /// (`quotas.rs`).
    quotas: Option<Arc<quotas::DeviceQuotas>>,
    /// The grain types this silo hosts, published with its load (none for
    /// an external client).
    hosts: Vec<String>,
    next_activation: AtomicU64,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The homes' re-registration after the last view change (rule 3):
    /// run beside the view task, not in it, so that a later view is
    /// followed at once; aborted when the next one starts.
    reregistering: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Counts the view changes (rule 3): a re-registration for a view
    /// since replaced changes no home.
    view_epoch: AtomicU64,
    /// The view whose re-registration started last, and its deadline
    /// (rule 3): what a home that no pass re-registers follows until
    /// (`follow_later`).
    pass_deadline: Mutex<Option<(u64, Instant)>>,
    /// The homes following their owner beside the pass, each with its
    /// generation and view (`follow_later`): one task each.
    following: DashMap<GrainId, (u64, u64)>,
    /// Its calls to other silos, counted (`stats.rs`).
    stats: stats::NodeStats,
    /// When the node started, in milliseconds since the Unix epoch
    /// (published with its load).
    started_ms: u64,
    /// What its sealed gossip counts, if the builder was told.
    gossip_stats: Option<Arc<crate::sealed::GossipStats>>,
}

/// A silo in a cluster. Cheap to clone.
///
/// ```
/// use std::sync::Arc;
/// use granary_actors::{Grain, GrainContext, GrainKey, GrainType, Handler, Message, Silo};
/// use granary_cluster::{gossip::ChannelTransport, ClusterNode, ClusterSecret, InProcessNetwork, NodeConfig};
/// use serde::{Deserialize, Serialize};
///
/// /// Hosted as "counter", taking "add" from other silos.
/// #[derive(GrainType)]
/// #[grain(name = "counter", messages(Add))]
/// struct Counter(u64);
/// impl Grain for Counter {
///     fn new(_: &GrainKey) -> Counter {
///         Counter(0)
///     }
/// }
/// #[derive(Message, Serialize, Deserialize)]
/// #[message(name = "add", reply = u64)]
/// struct Add(u64);
/// impl Handler<Add> for Counter {
///     async fn handle(&mut self, Add(n): Add, _: &mut GrainContext) -> u64 {
///         self.0 += n;
///         self.0
///     }
/// }
///
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// // Two silos in this process, over an in-process network (TCP and UDP
/// // gossip in production: `TcpTransport`, `gossip::SealedUdpTransport`).
/// let network = InProcessNetwork::new();
/// let gossip = ChannelTransport::default();
/// let secret = ClusterSecret::from_hex(&ClusterSecret::generate_hex()?)?;
/// let mut nodes = Vec::new();
/// for n in 1..=2u16 {
///     let silo = Silo::builder().host::<Counter>().build()?;
///     let listen = format!("silo-{n}:7000");
///     let address = std::net::SocketAddr::from(([127, 0, 0, 1], 47_000 + n));
///     let seed = "127.0.0.1:47001".to_string();
///     let config = NodeConfig::new("docs", secret.clone(), listen.clone(), address, vec![seed]);
///     let node = ClusterNode::builder(silo, config)
///         .transport(Arc::new(network.transport(&listen)))
///         .start(gossip.clone())
///         .await?;
///     nodes.push(node);
/// }
/// while nodes.iter().any(|node| node.members().len() < 2) {
///     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
/// }
/// // The same grain from either silo: one activation, wherever it lives.
/// assert_eq!(nodes[0].grain::<Counter>(7u64).call(Add(1)).await?, 1);
/// assert_eq!(nodes[1].grain::<Counter>(7u64).call(Add(1)).await?, 2);
/// assert_eq!(nodes[0].homes() + nodes[1].homes(), 1);
/// for node in &nodes {
///     node.leave().await?;
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct ClusterNode {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("id", &self.inner.id())
            .field("homes", &self.homes())
            .finish_non_exhaustive()
    }
}

impl ClusterNode {
    /// A builder for a node hosting `silo`'s grains, over TCP, placing new
    /// activations with GPU-aware placement, and grains that need no
    /// device (or fit none) by rendezvous hash. The node publishes the
    /// devices of the silo's GPU bridge, if the silo serves one
    /// ([`SiloBuilder::service`](granary_actors::SiloBuilder::service)):
    /// the bridge is handed over once, to the silo.
    pub fn builder(silo: Silo, config: NodeConfig) -> NodeBuilder {
        NodeBuilder {
            bridge: silo.service::<GpuBridge>(),
            silo,
            config,
            transport: Arc::new(crate::TcpTransport),
            placement: Arc::new(crate::placement::GpuAware::with_fallback(Box::new(
                crate::placement::HashPlacement,
            ))),
            needs: HashMap::new(),
            client: false,
            gossip_stats: None,
        }
    }

    /// This silo's identity. It changes when the silo comes back as a new
    /// incarnation after a stall that may have been taken for a death
    /// (rule 7).
    pub fn id(&self) -> SiloId {
        self.inner.id()
    }

    /// The local silo.
    pub fn silo(&self) -> &Silo {
        &self.inner.silo
    }

    /// What the node's sealed gossip counted, if its builder was given
    /// the stats ([`NodeBuilder::gossip_stats`]).
    pub fn gossip_counts(&self) -> Option<crate::gossip::GossipCounts> {
        self.inner.gossip_stats.as_ref().map(|stats| stats.counts())
    }

    /// The live members, as this silo sees them.
    pub fn members(&self) -> Vec<Member> {
        self.inner.members.borrow().clone()
    }

    /// Grains this silo is home to now.
    pub fn homes(&self) -> usize {
        self.inner
            .homes
            .iter()
            .filter(|home| home.owner.is_some() && !home.leaving)
            .count()
    }

    /// This node's calls to other silos, counted: their latency, and the
    /// answers that sent them elsewhere or later (`Moved`, `Retry`,
    /// `NoRoom`, ...).
    pub fn stats(&self) -> ClusterStats {
        self.inner.stats.snapshot()
    }

    /// Directory entries this silo owns now (rule 1; none under etcd,
    /// which keeps them all).
    pub fn directory_entries(&self) -> usize {
        self.inner.partition.len()
    }

    /// Homes this silo has given up since it started because their
    /// activations ended (rule 6).
    pub fn homes_given_up(&self) -> u64 {
        self.inner.given_up.load(Ordering::Relaxed)
    }

    /// Whether the silo is fenced now: after its runtime stood still long
    /// enough to be taken for dead, it serves no home until every
    /// activation it held has ended and it has come back as a new
    /// incarnation (rule 7).
    pub fn is_fenced(&self) -> bool {
        self.inner.fence.is_fenced()
    }

    /// How many times the silo has fenced itself since it started.
    pub fn fences(&self) -> u64 {
        self.inner.fence.count()
    }

    /// Where this silo last found grain `grain_type`/`key` living.
    pub fn location(&self, grain_type: &str, key: GrainKey) -> Option<SiloId> {
        let grain = GrainId {
            type_name: grain_type.to_string(),
            key,
        };
        self.inner.cache.get(&grain).map(|home| home.silo)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A node dropped without leaving: no reference keeps skipping its
        // (now refusing) router.
        for home in self.homes.iter() {
            home.end_lease();
        }
        self.stop_feeding();
    }
}

impl Inner {
    /// This silo's identity now.
    fn id(&self) -> SiloId {
        SiloId::clone(&self.me.load())
    }

    /// Whether `silo` is this silo, as it is now.
    fn is_me(&self, silo: &SiloId) -> bool {
        **self.me.load() == *silo
    }

    /// Starts the hand-over window (rule 3) now; returns when.
    fn restart_handoff(&self) -> Instant {
        let now = Instant::now();
        *self
            .view_changed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = now;
        now
    }

    fn view(&self) -> Arc<Vec<Member>> {
        self.view.load_full()
    }

    /// Who keeps `grain`'s directory entry in `view`: its owner among the
    /// silos, or etcd (one name for every entry, which view changes never
    /// move).
    fn entry_owner(&self, grain: &GrainId, view: &[Member]) -> Option<SiloId> {
        match &self.directory {
            DirectoryBackend::Partitioned => directory::owner(grain, view).cloned(),
            #[cfg(feature = "etcd")]
            DirectoryBackend::Etcd(_) => Some(SiloId::new("etcd", 0)),
        }
    }

    /// Whether this silo may serve: always under gossip; under etcd while
    /// it holds its lease.
    fn holds_lease(&self) -> bool {
        self.holds_lease.as_ref().is_none_or(|holds| holds())
    }

    fn is_live(&self, silo: &SiloId) -> bool {
        self.view.load().iter().any(|member| &member.silo == silo)
    }

    /// Stops the task feeding the node its view.
    fn stop_feeding(&self) {
        let feeding = self
            .feeding
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(feeding) = feeding {
            feeding.abort();
        }
    }

    fn stop_tasks(&self) {
        self.stop_feeding();
        if let Some(pass) = self
            .reregistering
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            pass.abort();
        }
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            task.abort();
        }
    }
}
