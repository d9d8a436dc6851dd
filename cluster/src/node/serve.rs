//! A node serving: the silo claimed for it (its activation-end listener,
//! rule 6 of the protocol in `node/mod.rs`), the tasks that accept
//! connections, follow the view (rules 3 and 4) and publish load
//! (rule 5), requests arriving over connections, and leaving, being
//! killed, losing the etcd lease or failing to come back after a fence
//! (`incarnation.rs`), after which it serves nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::future::BoxFuture;
use granary_actors::dispatch::{decode, encode};
use granary_actors::migration::{Migrated, MigrationError, MigrationTarget};
use granary_actors::observers::{Observed, ObserverUnreachable};
use granary_actors::route::{Delivered, HomeSide, Outbound, Router};
use granary_actors::{CallError, GrainId, Silo};

use super::directory_client::{DIRECTORY, DirectoryBackend, DirectoryRequest};
use super::peers::Provider;
use super::{ClusterNode, Inner, NodeBuilder, NodeError};
use crate::SiloId;
use crate::connection::{self, Connection, Inbound, InboundRequest};
use crate::directory::{LocationCache, Partition};
use crate::membership::{Member, MembershipError, SiloLoad};

/// Handshakes under way at most (node rule 10): a connection beyond them
/// closes at once.
const MAX_HANDSHAKES: usize = 256;
/// Handshakes not finished yet from one host (rule 10), so that one host's
/// silent connections cannot take every slot.
const MAX_HANDSHAKES_PER_SOURCE: usize = 16;
/// Connections accepted from one peer kept open at once (rule 10): a peer
/// opens one, and another while a rejoin or a race replaces it.
const MAX_CONNECTIONS_PER_PEER: usize = 4;

/// How long the accept loop waits after a failed accept, at first and at
/// most (node rule 10).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How often a load that only restamps its time is published anyway
/// (node rule 5), so that readers can tell an idle silo from a silent one.
const LOAD_REFRESH: Duration = Duration::from_secs(10);
use crate::wire::RemoteError;

impl ClusterNode {
    /// Leaves the cluster gracefully: the grains here that keep device
    /// memory and can migrate move to other silos with their state
    /// (`migration.rs` rule 6), then the node stops serving, the other
    /// activations deactivate (writing their state), gossip says so, and
    /// its connections close.
    pub async fn leave(&self) -> Result<(), MembershipError> {
        self.inner.draining.store(true, Ordering::Release);
        self.inner.migrate_gpu_homes().await;
        // Serve nothing more, and let every activation here go (writing its
        // state) before the others may place its grains elsewhere.
        self.inner.stopped.store(true, Ordering::Release);
        self.deactivate_homes().await;
        let membership = self.inner.membership.lock().await.take();
        let left = match membership {
            Some(membership) => membership.leave().await,
            None => Ok(()),
        };
        self.stop_serving().await;
        left
    }

    /// Whether this node has stopped serving: it left, was killed, (under
    /// etcd) lost its lease, or could not come back as a new incarnation
    /// after a fence (rule 7). A stopped node never serves again; a silo
    /// process rejoins as a new node (a new incarnation).
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::Acquire) || !self.inner.holds_lease()
    }

    /// Stops at once, as a crash looks to the others: gossip stops (the
    /// failure detector notices), connections close, nothing is handed
    /// over.
    pub async fn kill(&self) -> Result<(), MembershipError> {
        let membership = self.inner.membership.lock().await.take();
        self.stop_serving().await;
        match membership {
            Some(membership) => membership.stop().await,
            None => Ok(()),
        }
    }

    pub(super) async fn stop_serving(&self) {
        self.inner.stopped.store(true, Ordering::Release);
        // References stop skipping the router, which refuses from now on.
        self.inner.end_leases();
        self.inner.stop_tasks();
        self.inner.close_connections().await;
    }
}

impl Inner {
    /// Closes every connection, opened or accepted.
    pub(super) async fn close_connections(&self) {
        self.open.clear();
        let slots: Vec<_> = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, slot)| slot)
            .collect();
        for slot in slots {
            if let Some(connection) = slot.lock().await.connection.take() {
                connection.close();
            }
        }
        for connection in self.accepted.lock().await.drain(..) {
            connection.close();
        }
    }
}

/// Requests arriving over connections: directory operations and calls.
pub(super) struct NodeInbound(pub(super) Weak<Inner>);

impl Inbound for NodeInbound {
    fn request(
        &self,
        from: &SiloId,
        request: InboundRequest,
    ) -> BoxFuture<'static, Result<Vec<u8>, RemoteError>> {
        let inner = self.0.upgrade();
        let from = from.clone();
        Box::pin(async move {
            let Some(inner) = inner.filter(|inner| !inner.stopped.load(Ordering::Acquire)) else {
                return Err(RemoteError::ShutDown);
            };
            if request.grain_type == DIRECTORY {
                let asked: DirectoryRequest = decode(&request.payload)
                    .map_err(|err| RemoteError::BadPayload(err.to_string()))?;
                super::directory_service::authorize(&from, &asked)
                    .map_err(RemoteError::Forbidden)?;
                return encode(&inner.answer_directory(asked))
                    .map_err(|err| RemoteError::Other(err.to_string()));
            }
            // A grain moving in or out (`migration.rs`).
            if request.grain_type == super::migration::MIGRATION {
                return inner.answer_migration(&from, &request).await;
            }
            // Rule 9: a notification for a subscriber here.
            if request.grain_type == super::observers::OBSERVERS {
                return inner.observed(&request);
            }
            // Rule 8: another silo registered or removed a reminder of a
            // grain whose reminders this silo owns.
            if request.grain_type == super::reminders::REMINDERS {
                let grain: GrainId = decode(&request.payload)
                    .map_err(|err| RemoteError::BadPayload(err.to_string()))?;
                inner
                    .silo
                    .reminders_changed(&grain)
                    .await
                    .map_err(|err| RemoteError::Other(err.to_string()))?;
                return Ok(Vec::new());
            }
            let grain = GrainId {
                type_name: request.grain_type.clone(),
                key: request.key.clone(),
            };
            inner.host(&grain, &request).await
        })
    }
}

/// A silo claimed for one node: its activation-end listener (rule 6) and
/// its router (rule 2), which reach the node once the node exists;
/// dropped with the node (or with a start that failed), it frees the
/// silo: the listener is cleared and the router detached.
pub(super) struct Claim {
    node: Arc<std::sync::OnceLock<Weak<Inner>>>,
    pub(super) home_side: HomeSide,
    _listener: granary_actors::EndedListenerGuard,
}

impl Drop for Claim {
    fn drop(&mut self) {
        // A start that failed frees the silo for another node. A node that
        // served keeps the silo routed to its router, which refuses
        // everything once the node is stopped or gone: the silo's
        // activations are never reachable again without a home.
        if self.node.get().is_none() {
            self.home_side.detach();
        }
    }
}

/// Claims `silo` for one node. Refused while another node has it.
pub(super) fn claim(silo: &Silo) -> Result<Claim, NodeError> {
    let node: Arc<std::sync::OnceLock<Weak<Inner>>> = Arc::default();
    let reaches = node.clone();
    let listener = silo
        .on_activation_ended(Arc::new(move |grain, _| {
            if let Some(inner) = reaches.get().and_then(Weak::upgrade) {
                // A successor that is active already keeps what it noted
                // (`quotas.rs` rule 3).
                if let Some(quotas) = &inner.quotas {
                    quotas.forget(grain);
                }
                inner.shedding.remove(grain);
                inner.maybe_leave(grain);
            }
        }))
        .map_err(|_| NodeError::SiloInUse)?;
    let home_side = silo
        .route_through(Arc::new(NodeRouter { node: node.clone() }))
        .map_err(|_| NodeError::SiloInUse)?;
    Ok(Claim {
        node,
        home_side,
        _listener: listener,
    })
}

/// The silo's router (rule 2 of `route.rs` in `granary-actors`): every
/// message sent through the silo's grain references goes to the node,
/// which finds the grain's home (rule 2 of this protocol).
struct NodeRouter {
    node: Arc<std::sync::OnceLock<Weak<Inner>>>,
}

impl Router for NodeRouter {
    fn dispatch(&self, message: Box<dyn Outbound>) -> BoxFuture<'_, Result<Delivered, CallError>> {
        let inner = self.node.get().and_then(Weak::upgrade);
        Box::pin(async move {
            match inner {
                Some(inner) => inner.route(message).await,
                // Not started yet, or gone.
                None => Err(CallError::ShutDown),
            }
        })
    }

    fn place(&self) -> Option<String> {
        let inner = self.node.get().and_then(Weak::upgrade)?;
        Some(inner.id().to_string())
    }

    fn observe<'a>(
        &'a self,
        place: &'a str,
        endpoint: u64,
        type_name: &'a str,
        payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<Observed, ObserverUnreachable>> {
        let inner = self.node.get().and_then(Weak::upgrade);
        Box::pin(async move {
            match inner.filter(|inner| !inner.stopped.load(Ordering::Acquire)) {
                Some(inner) => {
                    inner
                        .send_observation(place, endpoint, type_name, payload)
                        .await
                }
                None => Err(ObserverUnreachable {
                    place: place.to_string(),
                    reason: "this node has stopped".to_string(),
                }),
            }
        })
    }

    fn migrate<'a>(
        &'a self,
        grain: &'a GrainId,
        target: MigrationTarget,
    ) -> BoxFuture<'a, Result<Migrated, MigrationError>> {
        let inner = self.node.get().and_then(Weak::upgrade);
        Box::pin(async move {
            match inner.filter(|inner| !inner.stopped.load(Ordering::Acquire)) {
                Some(inner) => inner.migrate(grain, target).await,
                None => Err(MigrationError::ShutDown),
            }
        })
    }

    fn is_present(&self, place: &str) -> bool {
        let Some(inner) = self.node.get().and_then(Weak::upgrade) else {
            return false;
        };
        place
            .parse::<SiloId>()
            .is_ok_and(|silo| inner.is_live(&silo))
    }
}

/// What a node is made of, before it serves.
pub(super) struct NodeParts {
    /// The silo, claimed for this node.
    pub(super) ended: Claim,
    pub(super) builder: NodeBuilder,
}

impl NodeParts {
    /// Starts serving on `listener` as `id`, with the view from `membership`.
    pub(super) async fn serve(
        self,
        mut listener: Box<dyn crate::transport::Listener>,
        id: SiloId,
        membership: Provider,
        directory: DirectoryBackend,
        holds_lease: Option<Box<dyn Fn() -> bool + Send + Sync>>,
        death: Duration,
    ) -> Result<ClusterNode, NodeError> {
        // What the node joined with (its first load) is what it hosts.
        let hosts = self.builder.hosts();
        let NodeParts {
            ended,
            builder:
                NodeBuilder {
                    silo,
                    config,
                    bridge,
                    transport,
                    placement,
                    needs,
                    client: _,
                    gossip_stats,
                },
        } = self;
        let handoff = config
            .handoff
            .unwrap_or(config.gossip_interval.saturating_mul(5));
        let first_view = membership.members();
        let membership_view = membership.watch();
        let (view_feed, members) = tokio::sync::watch::channel(first_view.clone());
        let quotas = bridge
            .as_ref()
            .map(|bridge| Arc::new(super::quotas::DeviceQuotas::new(bridge.clone(), &needs)));
        if let Some(quotas) = &quotas {
            silo.provide(quotas.clone());
        }
        let inner = Arc::new(Inner {
            me: arc_swap::ArcSwap::from_pointee(id.clone()),
            quotas,
            silo,
            bridge,
            transport,
            view: arc_swap::ArcSwap::from_pointee(first_view),
            view_changed: Mutex::new(Instant::now()),
            members,
            view_feed,
            feeding: Mutex::new(None),
            holding: AtomicU64::new(0),
            membership: tokio::sync::Mutex::new(Some(membership)),
            directory,
            handoff,
            partition: Partition::new(),
            cache: LocationCache::new(),
            homes: DashMap::new(),
            promised: Mutex::new(HashMap::new()),
            reservations: DashMap::new(),
            arrivals: DashMap::new(),
            given_up: AtomicU64::new(0),
            stopped: std::sync::atomic::AtomicBool::new(false),
            draining: std::sync::atomic::AtomicBool::new(false),
            moved_at: DashMap::new(),
            local_refused: DashMap::new(),
            away_refused: DashMap::new(),
            rebalance_round: AtomicU64::new(0),
            shedding: DashMap::new(),
            fence: super::fence::Fence::new(),
            lease_epoch: AtomicU64::new(0),
            holds_lease,
            home_side: ended.home_side.clone(),
            claim: Mutex::new(None),
            connections: Mutex::new(HashMap::new()),
            open: DashMap::new(),
            accepted: tokio::sync::Mutex::new(Vec::new()),
            placement,
            needs,
            hosts,
            next_activation: AtomicU64::new(1),
            tasks: Mutex::new(Vec::new()),
            reregistering: Mutex::new(None),
            view_epoch: AtomicU64::new(0),
            pass_deadline: Mutex::new(None),
            following: DashMap::new(),
            stats: super::stats::NodeStats::default(),
            started_ms: crate::membership::unix_ms(),
            gossip_stats,
            config,
        });
        let weak = Arc::downgrade(&inner);
        // Rule 6: an activation that ends may give up its home.
        let _ = ended.node.set(weak.clone());
        // Rule 8: reminders are fired by their owner in the view.
        inner
            .silo
            .set_reminder_placement(Arc::new(super::reminders::NodeReminders(weak.clone())));
        *inner.claim.lock().unwrap_or_else(PoisonError::into_inner) = Some(ended);
        let accepting = tokio::spawn({
            let weak = weak.clone();
            // Handshakes not finished yet, bounded: a flood of silent
            // connections takes at most this many sockets for
            // `handshake_timeout`; beyond it a connection closes at once.
            let handshaking = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
            let per_source = Arc::new(crate::slots::Sources::new(MAX_HANDSHAKES_PER_SOURCE));
            async move {
                let mut backoff = ACCEPT_BACKOFF_MIN;
                loop {
                    let accepted = listener.accept().await;
                    let Some(inner) = weak.upgrade() else { return };
                    if inner.stopped.load(Ordering::Acquire) {
                        return;
                    }
                    // An accept that failed (out of file descriptors, a
                    // connection reset before it was taken) ends nothing:
                    // the node waits a little, longer while it keeps
                    // failing, and accepts again.
                    let (io, from) = match accepted {
                        Ok((io, from)) => {
                            backoff = ACCEPT_BACKOFF_MIN;
                            (io, from)
                        }
                        // The listener itself is gone (the in-process
                        // network's, closed): nothing more will come.
                        Err(err) if err.kind() == std::io::ErrorKind::NotConnected => {
                            tracing::debug!(error = %err, "the listener closed");
                            return;
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, retry_in = ?backoff, "accepting a connection failed");
                            drop(inner);
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                            continue;
                        }
                    };
                    let Ok(permit) = handshaking.clone().try_acquire_owned() else {
                        tracing::debug!("too many handshakes under way; a connection is closed");
                        drop(io);
                        continue;
                    };
                    let Some(from_source) = crate::slots::Sources::enter(&per_source, &from) else {
                        tracing::debug!(%from, "too many handshakes under way from one host; a connection is closed");
                        drop(io);
                        continue;
                    };
                    let weak = weak.clone();
                    tokio::spawn(async move {
                        let _permits = (permit, from_source);
                        // The identity the handshake presents: a connection
                        // that finished under an incarnation since left
                        // behind (rule 7) is closed, not kept.
                        let me = inner.id();
                        let admission = super::admission::ViewAdmission {
                            members: inner.members.clone(),
                            wait: inner.config.connection.handshake_timeout / 2,
                        };
                        let accepted = connection::accept(
                            io,
                            me.clone(),
                            &inner.config.cluster,
                            &inner.config.secret,
                            &admission,
                            Arc::new(NodeInbound(weak)),
                            inner.config.connection,
                        )
                        .await;
                        match accepted {
                            Ok(connection)
                                if !inner.is_me(&me) || inner.stopped.load(Ordering::Acquire) =>
                            {
                                connection.close();
                            }
                            Ok(connection) => {
                                let peer = connection.peer().clone();
                                // An open connection of our own stays the
                                // one we call on; this one serves the peer.
                                let slot = inner
                                    .connections
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .entry(peer.clone())
                                    .or_default()
                                    .clone();
                                // Busy: we are connecting to it ourselves.
                                if let Ok(mut slot) = slot.try_lock() {
                                    if slot.connection.as_ref().is_none_or(Connection::is_closed) {
                                        slot.connection = Some(connection.clone());
                                        inner.open.insert(peer.clone(), connection.clone());
                                    }
                                }
                                let mut accepted = inner.accepted.lock().await;
                                accepted.retain(|kept| !kept.is_closed());
                                // A rejoin or stop that came between the
                                // check above and now either drains this
                                // list after us or is seen here (it changes
                                // the identity or sets `stopped` before it
                                // takes the list's lock).
                                if !inner.is_me(&me) || inner.stopped.load(Ordering::Acquire) {
                                    connection.close();
                                } else {
                                    accepted.push(connection);
                                    // At most a few from one peer: the
                                    // oldest beyond them close.
                                    let mut from_peer =
                                        accepted.iter().filter(|kept| kept.peer() == &peer).count();
                                    for kept in accepted.iter() {
                                        if from_peer <= MAX_CONNECTIONS_PER_PEER {
                                            break;
                                        }
                                        if kept.peer() == &peer {
                                            kept.close();
                                            from_peer -= 1;
                                        }
                                    }
                                    accepted.retain(|kept| !kept.is_closed());
                                }
                            }
                            Err(err) => tracing::debug!(error = %err, "a connection was refused"),
                        }
                    });
                }
            }
        });
        super::incarnation::feed(&inner, membership_view, id, None);
        let mut views = inner.members.clone();
        let watching = tokio::spawn({
            let weak = weak.clone();
            async move {
                while views.changed().await.is_ok() {
                    let after = Arc::new(views.borrow_and_update().clone());
                    let Some(inner) = weak.upgrade() else { return };
                    let silos = |view: &[Member]| -> Vec<SiloId> {
                        view.iter().map(|member| member.silo.clone()).collect()
                    };
                    // Rule 3: the hand-over window starts before anyone
                    // can see the new view here (`answer_directory` reads
                    // the view first), so no owner answers in it unsettled;
                    // the epoch moves on, so the last view's re-registration
                    // changes no home from now on.
                    let changed = (silos(&inner.view()) != silos(&after)).then(|| {
                        inner.view_epoch.fetch_add(1, Ordering::SeqCst);
                        inner.restart_handoff()
                    });
                    let before = inner.view.swap(after.clone());
                    if let Some(changed_at) = changed {
                        inner.on_view_change(&before, &after, changed_at).await;
                    }
                }
            }
        });
        let publishing = tokio::spawn({
            let weak = weak.clone();
            let every = inner.config.load_interval.max(Duration::from_millis(10));
            async move {
                let mut ticks = tokio::time::interval(every);
                // The last load published, stamped out, and when: a load
                // that only restamps its time is published again only
                // every `LOAD_REFRESH` (an idle cluster stays quiet in
                // etcd and in gossip).
                let mut last: Option<(SiloLoad, std::time::Instant)> = None;
                loop {
                    ticks.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    let load = inner.load();
                    let unstamped = SiloLoad {
                        published_ms: 0,
                        ..load.clone()
                    };
                    if last
                        .as_ref()
                        .is_some_and(|(was, at)| *was == unstamped && at.elapsed() < LOAD_REFRESH)
                    {
                        continue;
                    }
                    if let Some(membership) = inner.membership.lock().await.as_mut() {
                        membership.publish_load(&load).await;
                    }
                    last = Some((unstamped, std::time::Instant::now()));
                }
            }
        });
        let stamping = super::fence::start(&inner, death);
        inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend([accepting, watching, publishing, stamping]);
        if let Some(rebalancing) = super::rebalance::start(&inner) {
            inner
                .tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(rebalancing);
        }
        if inner.holds_lease.is_some() {
            // Etcd rule 6: a silo that lost its lease stops serving and
            // lets its activations go.
            let weak = Arc::downgrade(&inner);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let Some(inner) = weak.upgrade() else { return };
                    if inner.stopped.load(Ordering::Acquire) {
                        return;
                    }
                    if !inner.holds_lease() {
                        tracing::error!(silo = %inner.id(), "lost the etcd lease: this node stops serving");
                        let node = ClusterNode { inner };
                        node.inner.stopped.store(true, Ordering::Release);
                        node.deactivate_homes().await;
                        if let Some(membership) = node.inner.membership.lock().await.take() {
                            let _ = membership.stop().await;
                        }
                        node.stop_serving().await;
                        return;
                    }
                }
            });
        }
        Ok(ClusterNode { inner })
    }
}
