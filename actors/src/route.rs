//! The routing seam: where a grain reference's messages go when the silo
//! is part of something larger (a cluster), without `granary-actors`
//! knowing what that is.
//!
//! # Rules
//!
//! 1. **Alone, no router.** A silo built on its own has no [`Router`]: a
//!    [`GrainRef`](crate::GrainRef) delivers to the local activation on the
//!    typed path, and the seam costs it one atomic load per message (plus
//!    one for the count of homes given up, rule 13 of `silo/mod.rs`, per
//!    call and per turn).
//! 2. **One router at a time.** A cluster node installs its router with
//!    [`Silo::route_through`] before it serves (refused while another is
//!    installed; a node that fails to start takes its router back with
//!    [`HomeSide::detach`]); from then on every
//!    message sent through a `GrainRef` of this silo (from outside grains,
//!    from a handler, and the reentrant `GrainContext::call`), and every
//!    [`Silo::call_named`]/[`Silo::tell_named`], goes to
//!    [`Router::dispatch`]. Installing returns the [`HomeSide`]: the only
//!    way to reach the local activations without routing, kept by the
//!    router for what arrives from other silos ([`Silo::receive`], for a
//!    silo served on a connection directly, routes too). So, on a
//!    clustered silo, no public API activates a grain here without the
//!    router having made this silo the grain's home.
//! 3. **Here: the typed path.** When the router finds the grain's home is
//!    this silo, it calls [`Outbound::deliver_here`]: the message goes to
//!    the local activation as the Rust value it is, with no encoding and
//!    no hop, and the router's guard on the home (whatever it needs to
//!    keep the home here) lives until the local call has answered. The
//!    router may hand the reference a [`HomeLease`]: while it holds, the
//!    reference's next messages go straight into the activation's open
//!    mailbox without the router, and so do those of references made
//!    later for the grain on this silo (`Silo::grain` starts them from
//!    the leased reference's cache, until the activation ends). Only an open mailbox: a reference never
//!    starts an activation on its own, so every activation still begins
//!    through the router.
//! 4. **Elsewhere: by name.** When the home is another silo, the router
//!    sends [`Outbound::encode`]'s bytes under [`Outbound::message_name`]
//!    with the call chain, the time left before the caller's deadline, and
//!    the [`Kind`]; the reply comes back as bytes, and the reference
//!    decodes them. A message type with no registered name cannot travel:
//!    [`CallError::NotRoutable`], before anything is sent.
//! 5. **What arrives.** The router hands a request from another silo to
//!    [`HomeSide::dispatch`] once it has made this silo the grain's home. It
//!    joins the chain it carries (so reentrancy works across silos), and a
//!    turn that has not started by its deadline is not run: the caller has
//!    given up (see `silo/mod.rs`, rule 11).
//! 6. **Stateless workers** are never routed: they are local to each silo
//!    by design and never in a directory.
//! 7. **Observers.** A router names its silo ([`Router::place`]) in the
//!    observer references the silo hands out, carries notifications to
//!    the silo a reference names ([`Router::observe`]), where they arrive
//!    at [`HomeSide::observe`], and says whether that silo is still a
//!    member ([`Router::is_present`]); see `observers/mod.rs`.
//! 8. **Migration.** `GrainRef::migrate` and `GrainContext::migrate` ask
//!    the router ([`Router::migrate`]) to move a grain; the router moves
//!    the activation where it lives with [`HomeSide::depart`] and makes
//!    it on the target with [`HomeSide::arrive`] (`migration.rs`). A silo
//!    alone has nowhere to move a grain: `MigrationError::Unsupported`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use crate::dispatch::DispatchError;
use crate::error::CallError;
use crate::key::{GrainId, GrainKey};
use crate::migration::{
    Arrival, Dehydrated, Departure, Migrated, MigrationError, MigrationTarget, Paused,
};
use crate::observers::{Observed, ObserverUnreachable};
use crate::silo::Silo;

/// The call chain a message sent now belongs to (rule 5): the running
/// turn's, inside a handler, or a fresh one. For a router's own messages
/// given by name, so that they keep reentrancy as a reference's do.
pub fn current_chain() -> u64 {
    crate::silo::current_chain()
}

/// How the sender waits (rule 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    /// A request with a reply (`GrainRef::call`).
    Call,
    /// A one-way message whose admission is acknowledged (`GrainRef::tell`).
    Tell,
    /// A read-only request, interleaved with other reads (`GrainRef::read`).
    Read,
}

/// Where a message went (rule 3 or 4).
#[derive(Debug)]
pub enum Delivered {
    /// Handled on this silo on the typed path: the reference has its reply
    /// (or, for a tell, its admission) already.
    Here,
    /// Handled on another silo: the reply in its wire form (empty for a
    /// tell).
    Elsewhere(Vec<u8>),
}

/// A message on its way out of a grain reference, seen by the router.
/// One value per message; `deliver_here` consumes it.
pub trait Outbound: Send {
    /// The grain it is for.
    fn grain(&self) -> &GrainId;
    /// How the sender waits.
    fn kind(&self) -> Kind;
    /// The call chain it belongs to (rule 5).
    fn chain(&self) -> u64;
    /// When the sender stops waiting.
    fn deadline(&self) -> Instant;
    /// The message's registered name (rule 4); `NotRoutable`, naming its
    /// Rust type, if it has none.
    fn message_name(&self) -> Result<&str, CallError>;
    /// The message in its wire form (rule 4), shared rather than copied
    /// where it is already bytes (a message sent by name); `NotRoutable`
    /// if it has no registered name.
    fn encode(&self) -> Result<Arc<Vec<u8>>, CallError>;
    /// Delivers to the local activation on the typed path (rule 3) and
    /// completes when the local call has answered (a tell: when its
    /// admission has). `lease`, if the router gives one, lets the sending
    /// reference deliver its next messages without the router while it
    /// holds.
    fn deliver_here(
        self: Box<Self>,
        lease: Option<Arc<HomeLease>>,
    ) -> BoxFuture<'static, Result<(), CallError>>;
}

/// A router's promise that a grain's home is this silo, while it stays
/// valid (rule 3): a reference that holds a valid lease delivers straight
/// into the grain's open mailbox on the typed path, without asking the
/// router, and asks again once the lease is invalidated (the home moves,
/// is given up, or the view changes) or the mailbox is closed or full.
#[derive(Debug)]
pub struct HomeLease {
    valid: AtomicBool,
}

impl HomeLease {
    /// A valid lease.
    pub fn new() -> Arc<HomeLease> {
        Arc::new(HomeLease {
            valid: AtomicBool::new(true),
        })
    }

    /// A lease that has already ended: what a home holds before the router
    /// grants it a valid one.
    pub fn ended() -> Arc<HomeLease> {
        Arc::new(HomeLease {
            valid: AtomicBool::new(false),
        })
    }

    /// Ends the lease: references holding it ask the router again.
    pub fn invalidate(&self) {
        self.valid.store(false, Ordering::Release);
    }

    /// Whether the lease still holds.
    pub fn is_valid(&self) -> bool {
        self.valid.load(Ordering::Acquire)
    }
}

/// Decides where each grain's messages are handled (rule 2).
pub trait Router: Send + Sync + 'static {
    /// Delivers `message` to its grain's home: here through
    /// [`Outbound::deliver_here`], or elsewhere by name.
    fn dispatch(&self, message: Box<dyn Outbound>) -> BoxFuture<'_, Result<Delivered, CallError>>;

    /// This silo's name among its peers, for the observer references it
    /// hands out (rule 7); `None` (the default) keeps the silo's own name,
    /// which no other silo can reach.
    fn place(&self) -> Option<String> {
        None
    }

    /// Sends a notification in its wire form to subscriber `endpoint` on
    /// the silo named `place`, and answers what became of it there
    /// (rule 7). The default reaches no one.
    fn observe<'a>(
        &'a self,
        place: &'a str,
        endpoint: u64,
        type_name: &'a str,
        payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<Observed, ObserverUnreachable>> {
        let _ = (endpoint, type_name, payload);
        Box::pin(async move {
            Err(ObserverUnreachable {
                place: place.to_string(),
                reason: "this router carries no notifications".to_string(),
            })
        })
    }

    /// Whether the silo named `place` is still a member of what this
    /// router reaches (rule 7). The default knows of none.
    fn is_present(&self, place: &str) -> bool {
        let _ = place;
        false
    }

    /// Moves `grain`'s activation, wherever it is, to `target` with its
    /// in-memory state (rule 8, `migration.rs`). The default moves
    /// nothing.
    fn migrate<'a>(
        &'a self,
        grain: &'a GrainId,
        target: MigrationTarget,
    ) -> BoxFuture<'a, Result<Migrated, MigrationError>> {
        let _ = (grain, target);
        Box::pin(async {
            Err(MigrationError::Unsupported {
                reason: "this silo's router moves no grains".into(),
            })
        })
    }
}

/// A request from another silo, for a grain this silo is home to (rule 5).
#[derive(Debug, Clone)]
pub struct InboundRequest<'a> {
    /// The grain type's registered name.
    pub grain_type: &'a str,
    /// The grain's key.
    pub key: GrainKey,
    /// The message's registered name.
    pub message: &'a str,
    /// The message in its wire form.
    pub payload: &'a [u8],
    /// How the sender waits.
    pub kind: Kind,
    /// The sender's call chain.
    pub chain: u64,
    /// How long the sender still waits.
    pub time_left: Duration,
}

/// The router a silo has installed (rule 2).
pub(crate) struct Installed {
    pub(crate) router: Arc<dyn Router>,
}

/// The local side of a routed silo: the only way to reach its activations
/// without going through the router (rule 2). Cheap to clone.
#[derive(Clone)]
pub struct HomeSide {
    silo: Silo,
    installed: Arc<Installed>,
}

impl fmt::Debug for HomeSide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HomeSide").finish_non_exhaustive()
    }
}

impl HomeSide {
    /// The silo.
    pub fn silo(&self) -> &Silo {
        &self.silo
    }

    /// Handles `request` here (rule 5): decodes the message, delivers it to
    /// the local activation in the sender's chain, and answers the reply in
    /// its wire form (nothing for a tell, once the mailbox took it).
    pub async fn dispatch(&self, request: InboundRequest<'_>) -> Result<Vec<u8>, DispatchError> {
        self.silo.dispatch_here(request).await
    }

    /// Gives every home on this silo up at once (rule 13 of
    /// `silo/mod.rs`): each activation of a routed type stops after the
    /// turn it is in and drops what is queued, without running it. For a
    /// router that learns the silo may have been taken for dead; safe to
    /// call from any thread, also while the silo's runtime is stalled.
    pub fn give_up_homes(&self) {
        self.silo.give_up_homes();
    }

    /// Whether grain type `grain_type` is registered here as migratable
    /// (rule 8).
    pub fn is_migratable(&self, grain_type: &str) -> bool {
        self.silo.registry().migrants.contains_key(grain_type)
    }

    /// Asks `grain`'s activation here to leave (rule 8, `migration.rs` rule
    /// 2): it dehydrates between turns, and waits for the verdict given
    /// through the [`Departure`]. Before committing, the router must keep
    /// calls from reaching the grain here (`migration.rs` rule 3): once the
    /// activation is gone, a local delivery would start a new one.
    pub async fn depart(&self, grain: &GrainId) -> Result<Departure, MigrationError> {
        let depart = self.migrant(&grain.type_name)?.depart;
        depart(&self.silo, grain.key.clone()).await
    }

    /// Makes `grain`'s activation here from `state` (rule 8, `migration.rs`
    /// rule 4); it takes messages once the [`Arrival`] is confirmed.
    pub async fn arrive(
        &self,
        grain: &GrainId,
        state: Dehydrated,
    ) -> Result<Arrival, MigrationError> {
        let arrive = self.migrant(&grain.type_name)?.arrive;
        arrive(&self.silo, grain.key.clone(), state).await
    }

    /// Pauses `grain`'s activation here between two turns (rule 8,
    /// `migration.rs` rule 6): it runs nothing until the [`Paused`] is
    /// dropped, and messages wait in its mailbox meanwhile. Never
    /// activates the grain.
    pub async fn pause(&self, grain: &GrainId) -> Result<Paused, MigrationError> {
        let pause = self.migrant(&grain.type_name)?.pause;
        pause(&self.silo, grain.key.clone()).await
    }

    fn migrant(&self, grain_type: &str) -> Result<crate::migration::Migrant, MigrationError> {
        self.silo
            .registry()
            .migrants
            .get(grain_type)
            .cloned()
            .ok_or_else(|| MigrationError::NotMigratable {
                type_name: grain_type.to_string(),
            })
    }

    /// Uninstalls this side's router, if it is still the silo's: for a
    /// cluster node that failed to start, so that the silo can serve
    /// another. A node that ran keeps its silo routed (to its stopped
    /// router, which refuses everything) for the silo's whole life.
    pub fn detach(&self) {
        self.silo.clear_router(&self.installed);
    }
}

/// Why a router could not be installed.
pub enum RouteThroughError {
    /// The silo already has one (rule 2); the rejected router comes back.
    AlreadyRouted(Arc<dyn Router>),
}

impl fmt::Debug for RouteThroughError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteThroughError::AlreadyRouted(_) => f.write_str("AlreadyRouted"),
        }
    }
}

impl fmt::Display for RouteThroughError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteThroughError::AlreadyRouted(_) => {
                write!(f, "the silo already routes through another router")
            }
        }
    }
}

impl std::error::Error for RouteThroughError {}

impl Silo {
    /// Routes every message of this silo's grain references through
    /// `router` from now on (rule 2), and returns the local side the router
    /// delivers to. Refused while another router is installed.
    pub fn route_through(&self, router: Arc<dyn Router>) -> Result<HomeSide, RouteThroughError> {
        let installed = Arc::new(Installed { router });
        if !self.set_router(&installed) {
            return Err(RouteThroughError::AlreadyRouted(installed.router.clone()));
        }
        Ok(HomeSide {
            silo: self.clone(),
            installed,
        })
    }

    /// Whether a router is installed (rule 2).
    pub fn is_routed(&self) -> bool {
        self.router().is_some()
    }

    /// Handles a request that arrived from another silo outside any
    /// router's `HomeSide` (a silo served directly on a connection): on a
    /// silo without a router, on the local path in the sender's chain and
    /// until its deadline; on a routed silo, through the router, which
    /// delivers it at the grain's home.
    pub async fn receive(&self, request: InboundRequest<'_>) -> Result<Vec<u8>, DispatchError> {
        match self.router() {
            Some(router) if !self.is_stateless_named(request.grain_type) => {
                // Refuse unknown names before routing.
                self.check_named(request.grain_type, request.message, request.kind)?;
                let deadline = crate::silo::deadline_after(request.time_left);
                send_named(
                    router.as_ref(),
                    self,
                    GrainId {
                        type_name: request.grain_type.to_string(),
                        key: request.key,
                    },
                    request.message,
                    request.payload,
                    request.kind,
                    request.chain,
                    deadline,
                )
                .await
            }
            _ => self.dispatch_here(request).await,
        }
    }
}

/// A message given by name and in its wire form, on its way through the
/// router (`Silo::call_named` and `tell_named` on a routed silo).
struct Named {
    silo: Silo,
    grain: GrainId,
    message: String,
    payload: Arc<Vec<u8>>,
    kind: Kind,
    chain: u64,
    deadline: Instant,
    reply: tokio::sync::oneshot::Sender<Result<Vec<u8>, DispatchError>>,
}

impl Outbound for Named {
    fn grain(&self) -> &GrainId {
        &self.grain
    }

    fn kind(&self) -> Kind {
        self.kind
    }

    fn chain(&self) -> u64 {
        self.chain
    }

    fn deadline(&self) -> Instant {
        self.deadline
    }

    fn message_name(&self) -> Result<&str, CallError> {
        Ok(&self.message)
    }

    fn encode(&self) -> Result<Arc<Vec<u8>>, CallError> {
        Ok(self.payload.clone())
    }

    fn deliver_here(
        self: Box<Self>,
        _lease: Option<Arc<HomeLease>>,
    ) -> BoxFuture<'static, Result<(), CallError>> {
        Box::pin(async move {
            let time_left = self.deadline.saturating_duration_since(Instant::now());
            let outcome = self
                .silo
                .dispatch_here(InboundRequest {
                    grain_type: &self.grain.type_name,
                    key: self.grain.key.clone(),
                    message: &self.message,
                    payload: &self.payload,
                    kind: self.kind,
                    chain: self.chain,
                    time_left,
                })
                .await;
            let _ = self.reply.send(outcome);
            Ok(())
        })
    }
}

/// A message given by name and in its wire form, as an [`Outbound`] a
/// router routes itself (a cluster node's own calls by name): delivered
/// here, it is dispatched to the local activation by name and its outcome
/// comes back on the returned receiver; elsewhere, the router sends its
/// bytes.
#[allow(clippy::type_complexity)]
pub fn named_outbound(
    home: &HomeSide,
    grain: GrainId,
    message: &str,
    payload: &[u8],
    kind: Kind,
    chain: u64,
    deadline: Instant,
) -> (
    Box<dyn Outbound>,
    tokio::sync::oneshot::Receiver<Result<Vec<u8>, DispatchError>>,
) {
    named(&home.silo, grain, message, payload, kind, chain, deadline)
}

/// The [`Named`] outbound of a message on `silo`, and where its local
/// outcome comes back.
#[allow(clippy::type_complexity)]
fn named(
    silo: &Silo,
    grain: GrainId,
    message: &str,
    payload: &[u8],
    kind: Kind,
    chain: u64,
    deadline: Instant,
) -> (
    Box<dyn Outbound>,
    tokio::sync::oneshot::Receiver<Result<Vec<u8>, DispatchError>>,
) {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let named = Named {
        silo: silo.clone(),
        grain,
        message: message.to_string(),
        // The one copy: the router owns what it routes.
        payload: Arc::new(payload.to_vec()),
        kind,
        chain,
        deadline,
        reply,
    };
    (Box::new(named), answer)
}

/// Sends a message given by name through `router` and answers its reply
/// in the wire form.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn send_named(
    router: &dyn Router,
    silo: &Silo,
    grain: GrainId,
    message: &str,
    payload: &[u8],
    kind: Kind,
    chain: u64,
    deadline: Instant,
) -> Result<Vec<u8>, DispatchError> {
    let (outbound, mut answer) =
        named(silo, grain.clone(), message, payload, kind, chain, deadline);
    let delivered = tokio::time::timeout_at(deadline, router.dispatch(outbound))
        .await
        .map_err(|_| CallError::Timeout {
            grain: grain.clone(),
            after: silo.call_timeout(),
        })??;
    match delivered {
        Delivered::Here => answer
            .try_recv()
            .map_err(|_| DispatchError::Call(CallError::TurnFailed { grain }))?,
        Delivered::Elsewhere(bytes) => Ok(bytes),
    }
}
