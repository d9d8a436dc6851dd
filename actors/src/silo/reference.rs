//! Grain references: `GrainRef` (call, read, tell, deactivate) and
//! `Silo::grain`, which makes one. Delivery to an activation's mailbox,
//! through full mailboxes and deactivations: rules 4 and 5 of the silo's
//! protocol (`silo/mod.rs`), and the caller's side of rules 7 and 10.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Silo;
use super::envelope::{Deadline, Envelope, Turn, current_chain, deadline_after, fresh_chain};
use super::registry::{Entry, GrainType};
use crate::dispatch::{Codec, DispatchError};
use crate::error::CallError;
use crate::grain::{Grain, Handler, Message};
use crate::key::{GrainId, GrainKey};
use crate::mailbox::{self, SendError, TrySendError};
use crate::route::{Delivered, HomeLease, Kind, Outbound, Router};

/// A reference to a grain: cheap to clone, valid whether or not the grain
/// is active. The same type on a lone silo and on a cluster node's silo,
/// where it reaches the grain wherever it lives (rule 12).
///
/// ```
/// use granary_actors::{
///     Grain, GrainContext, GrainKey, GrainType, Handler, Message, ReadHandler, Silo,
/// };
///
/// #[derive(GrainType)]
/// #[grain(name = "counter")]
/// struct Counter(u64);
/// impl Grain for Counter {
///     fn new(_: &GrainKey) -> Counter {
///         Counter(0)
///     }
/// }
/// #[derive(Message)]
/// #[message(reply = u64)]
/// struct Add(u64);
/// impl Handler<Add> for Counter {
///     async fn handle(&mut self, Add(n): Add, _: &mut GrainContext) -> u64 {
///         self.0 += n;
///         self.0
///     }
/// }
/// #[derive(Message)]
/// #[message(reply = u64)]
/// struct Get;
/// impl ReadHandler<Get> for Counter {
///     async fn handle_read(&self, _: Get, _: &GrainContext) -> u64 {
///         self.0
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let silo = Silo::builder().host::<Counter>().build()?;
/// let counter = silo.grain::<Counter>("apples");
/// assert_eq!(counter.call(Add(2)).await?, 2); // activated by its first message
/// counter.tell(Add(3)).await?; // returns once the mailbox took it
/// assert_eq!(counter.read(Get).await?, 5); // reads interleave with each other
/// silo.shutdown().await;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct GrainRef<G> {
    pub(super) silo: Silo,
    key: GrainKey,
    /// The grain type's directory, looked up once; `None` if `G` is not
    /// registered.
    registered: Option<Arc<GrainType<G>>>,
    /// What this reference and its clones (and, on a routed silo, later
    /// references to a grain leased here) remember between messages.
    cache: Arc<RefCache<G>>,
    _grain: PhantomData<fn() -> G>,
}

/// A reference's memory, shared by its clones and, once the router has
/// leased the grain's home here to it, by references made later for the
/// grain on this silo (`GrainType::leased`, rule 12).
pub(super) struct RefCache<G> {
    /// The mailbox of the activation this reference delivered to last.
    last: mailbox::SenderCache<Envelope<G>>,
    /// On a routed silo, the router's lease on the grain's home here
    /// (`route.rs`, rule 3).
    lease: arc_swap::ArcSwapOption<HomeLease>,
}

impl<G> Clone for GrainRef<G> {
    fn clone(&self) -> GrainRef<G> {
        GrainRef {
            silo: self.silo.clone(),
            key: self.key.clone(),
            registered: self.registered.clone(),
            cache: self.cache.clone(),
            _grain: PhantomData,
        }
    }
}

impl<G> fmt::Debug for GrainRef<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrainRef")
            .field("type", &std::any::type_name::<G>())
            .field("key", &self.key)
            .finish()
    }
}

impl<G: Grain> GrainRef<G> {
    /// The grain's key.
    pub fn key(&self) -> &GrainKey {
        &self.key
    }

    /// Sends `message` and waits for the reply, at most the silo's call
    /// timeout. Dropping the future cancels the wait (the message may
    /// still run). On a routed silo the message goes to the grain's home,
    /// wherever it is (rule 12); a call to another silo's home also waits
    /// at most the cluster connection's own call timeout (30 s by
    /// default), so a silo whose turns may run longer raises both.
    pub async fn call<M: Message>(&self, message: M) -> Result<M::Reply, CallError>
    where
        G: Handler<M>,
    {
        let grain_type = self.registered()?;
        let mut deadline = Deadline::after(self.silo.inner.config.call_timeout);
        let given_up = self.silo.homes_given_up();
        let answer = if self.silo.is_routed_now() {
            let chain = current_chain();
            match self.leased(message, chain, write_turn::<G, M>) {
                // In the open mailbox of the grain's home here: wait below.
                Ok(answer) => answer,
                // Boxed, so that the lone silo's future stays as small as
                // it was.
                Err(message) => {
                    return Box::pin(self.route_or_here(
                        Kind::Call,
                        chain,
                        message,
                        |target, message, chain, deadline| async move {
                            target.call_here(message, chain, None, deadline).await
                        },
                    ))
                    .await;
                }
            }
        } else {
            let (reply, answer) = oneshot::channel();
            let envelope = Envelope::<G> {
                chain: current_chain(),
                keeps_alive: true,
                expires: None,
                turn: write_turn::<G, M>(message, reply),
            };
            self.deliver(grain_type, envelope, &mut deadline).await?;
            answer
        };
        self.reply(grain_type, answer, &mut deadline, given_up, true)
            .await
    }

    /// [`GrainRef::call`] on the local path, never routed: in `chain`,
    /// until `deadline`, and not run if its turn has not started by
    /// `expires` (rule 11).
    pub(crate) async fn call_here<M: Message>(
        &self,
        message: M,
        chain: u64,
        expires: Option<Instant>,
        deadline: Deadline,
    ) -> Result<M::Reply, CallError>
    where
        G: Handler<M>,
    {
        let (reply, answer) = oneshot::channel();
        let turn = write_turn::<G, M>(message, reply);
        self.ask(turn, answer, chain, expires, deadline).await
    }

    /// Delivers `turn`, which answers on `answer`, and waits for the
    /// answer: the shared body of [`GrainRef::call`] and [`GrainRef::read`].
    async fn ask<R>(
        &self,
        turn: Turn<G>,
        answer: oneshot::Receiver<R>,
        chain: u64,
        expires: Option<Instant>,
        mut deadline: Deadline,
    ) -> Result<R, CallError> {
        let grain_type = self.registered()?;
        let envelope = Envelope::<G> {
            chain,
            keeps_alive: true,
            expires,
            turn,
        };
        let given_up = self.silo.homes_given_up();
        self.deliver(grain_type, envelope, &mut deadline).await?;
        self.reply(
            grain_type,
            answer,
            &mut deadline,
            given_up,
            expires.is_none(),
        )
        .await
    }

    /// Waits for the answer to a delivered call, until `deadline`.
    /// `given_up` is the silo's count of homes given up when the message
    /// was delivered: an answer dropped since the count moved is a message
    /// the silo dropped with its home (rule 13).
    async fn reply<R>(
        &self,
        grain_type: &GrainType<G>,
        mut answer: oneshot::Receiver<R>,
        deadline: &mut Deadline,
        given_up: u64,
        counted: bool,
    ) -> Result<R, CallError> {
        // Fast path: give the activation a chance to run first, and take the
        // answer without arming a timer if it is already there.
        tokio::task::yield_now().await;
        let answer = match answer.try_recv() {
            Ok(reply) => return Ok(reply),
            Err(oneshot::error::TryRecvError::Closed) => {
                return Err(self.dropped(grain_type, given_up));
            }
            Err(oneshot::error::TryRecvError::Empty) => answer,
        };
        match tokio::time::timeout_at(deadline.get(), answer).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(self.dropped(grain_type, given_up)),
            // A message whose deadline travels with it (a remote sender's,
            // rule 11) is counted as expired by the activation instead,
            // once: not here too.
            Err(_) if counted => Err(grain_type.timed_out(&self.key, deadline.timeout())),
            Err(_) => Err(CallError::Timeout {
                grain: self.id(grain_type),
                after: deadline.timeout(),
            }),
        }
    }

    /// Why a delivered message's answer was dropped unanswered: its turn
    /// failed (rules 6 and 11), or the silo gave every home up since it was
    /// delivered (rule 13): most likely it was still queued and did not
    /// run, but the turn running at the give-up may have failed too, so
    /// the caller is told `Unavailable`, not that it may send it again.
    fn dropped(&self, grain_type: &GrainType<G>, given_up: u64) -> CallError {
        let grain = self.id(grain_type);
        if self.silo.homes_given_up() != given_up {
            CallError::Unavailable {
                grain,
                reason: "the silo gave the grain's home up (it fenced itself) before the \
                         message was answered; a message still queued then did not run"
                    .to_string(),
            }
        } else {
            CallError::TurnFailed { grain }
        }
    }

    /// Sends a read-only `message` and waits for the reply, as
    /// [`GrainRef::call`] does. Reads queued together run interleaved on a
    /// shared borrow of the grain (rule 10); writes never overlap them.
    pub async fn read<M: Message>(&self, message: M) -> Result<M::Reply, CallError>
    where
        G: crate::grain::ReadHandler<M>,
    {
        if self.silo.is_routed_now() {
            let chain = current_chain();
            let timeout = self.silo.inner.config.call_timeout;
            let given_up = self.silo.homes_given_up();
            return match self.leased(message, chain, read_turn::<G, M>) {
                Ok(answer) => {
                    self.answer(answer, Deadline::after(timeout), given_up)
                        .await
                }
                Err(message) => {
                    Box::pin(self.route_or_here(
                        Kind::Read,
                        chain,
                        message,
                        |target, message, chain, deadline| async move {
                            target.read_here(message, chain, None, deadline).await
                        },
                    ))
                    .await
                }
            };
        }
        let timeout = self.silo.inner.config.call_timeout;
        self.read_here(message, current_chain(), None, Deadline::after(timeout))
            .await
    }

    /// [`GrainRef::read`] on the local path (see [`GrainRef::call_here`]).
    pub(crate) async fn read_here<M: Message>(
        &self,
        message: M,
        chain: u64,
        expires: Option<Instant>,
        deadline: Deadline,
    ) -> Result<M::Reply, CallError>
    where
        G: crate::grain::ReadHandler<M>,
    {
        let (reply, answer) = oneshot::channel();
        let turn = read_turn::<G, M>(message, reply);
        self.ask(turn, answer, chain, expires, deadline).await
    }

    /// Sends `message` without waiting for its handling: returns once the
    /// grain's mailbox has taken it (waiting at most the call timeout for
    /// room). On a routed silo, once the home's mailbox has taken it: a
    /// home that cannot be reached is an error, never a silent loss.
    pub async fn tell<M: Message>(&self, message: M) -> Result<(), CallError>
    where
        G: Handler<M>,
    {
        if self.silo.is_routed_now() {
            let chain = current_chain();
            return match self.leased(message, chain, tell_turn::<G, M>) {
                // Queued in the open mailbox: admitted.
                Ok(_) => Ok(()),
                Err(message) => {
                    Box::pin(self.route_or_here(
                        Kind::Tell,
                        chain,
                        message,
                        |target, message, chain, deadline| async move {
                            target.tell_here(message, chain, None, deadline).await
                        },
                    ))
                    .await
                }
            };
        }
        let timeout = self.silo.inner.config.call_timeout;
        self.tell_here(message, current_chain(), None, Deadline::after(timeout))
            .await
    }

    /// [`GrainRef::tell`] on the local path (see [`GrainRef::call_here`]).
    pub(crate) async fn tell_here<M: Message>(
        &self,
        message: M,
        chain: u64,
        expires: Option<Instant>,
        mut deadline: Deadline,
    ) -> Result<(), CallError>
    where
        G: Handler<M>,
    {
        let grain_type = self.registered()?;
        let envelope = Envelope::<G> {
            chain,
            keeps_alive: true,
            expires,
            turn: Turn::Write(Box::new(move |grain, ctx| {
                Box::pin(async move {
                    let _ = grain.handle(message, ctx).await;
                })
            })),
        };
        self.deliver(grain_type, envelope, &mut deadline).await
    }

    /// Rule 12's fast path (`route.rs`, rule 3): while this reference holds
    /// a valid lease on the grain's home here, the message goes straight
    /// into the activation's open mailbox, if it has room; the envelope is
    /// built only then. Otherwise the message comes back, for the router.
    /// Never starts an activation.
    fn leased<R: Send + 'static, M>(
        &self,
        message: M,
        chain: u64,
        turn: impl FnOnce(M, oneshot::Sender<R>) -> Turn<G>,
    ) -> Result<oneshot::Receiver<R>, M> {
        let lease = self.cache.lease.load();
        if !lease.as_ref().is_some_and(|lease| lease.is_valid()) {
            return Err(message);
        }
        let (reply, answer) = oneshot::channel();
        let mut parts = Some((message, reply, turn));
        let sent = self.cache.last.try_send_with(|| {
            let (message, reply, turn) = parts.take()?;
            Some(Envelope {
                chain,
                keeps_alive: true,
                expires: None,
                turn: turn(message, reply),
            })
        });
        match parts {
            Some((message, _, _)) if !sent => Err(message),
            _ => Ok(answer),
        }
    }

    /// Waits for the answer of a message the fast path delivered.
    async fn answer<R>(
        &self,
        answer: oneshot::Receiver<R>,
        mut deadline: Deadline,
        given_up: u64,
    ) -> Result<R, CallError> {
        let grain_type = self.registered()?;
        self.reply(grain_type, answer, &mut deadline, given_up, true)
            .await
    }

    /// Rule 12 past the fast path: through the router, or on the local
    /// path (`here`) where the type is never routed (a stateless worker).
    async fn route_or_here<M, R, L, F>(
        &self,
        kind: Kind,
        chain: u64,
        message: M,
        here: L,
    ) -> Result<R, CallError>
    where
        M: Message,
        R: Send + 'static,
        L: FnOnce(GrainRef<G>, M, u64, Deadline) -> F + Send + 'static,
        F: std::future::Future<Output = Result<R, CallError>> + Send + 'static,
    {
        match self.router() {
            Some(router) => self.send_routed(&router, kind, chain, message, here).await,
            None => {
                let timeout = self.silo.inner.config.call_timeout;
                here(self.clone(), message, chain, Deadline::after(timeout)).await
            }
        }
    }

    /// The router this reference's messages go through: the silo's, unless
    /// the grain type is a stateless worker (rule 12), or `G` is not
    /// registered (the local path reports that).
    pub(super) fn router(&self) -> Option<Arc<dyn Router>> {
        match &self.registered {
            Some(grain_type) if !grain_type.stateless => self.silo.router(),
            _ => None,
        }
    }

    /// Sends `message` through `router` (rule 12): `here` is the local
    /// delivery the router runs when the home is this silo.
    pub(super) async fn send_routed<M, R, L, F>(
        &self,
        router: &Arc<dyn Router>,
        kind: Kind,
        chain: u64,
        message: M,
        here: L,
    ) -> Result<R, CallError>
    where
        M: Message,
        R: Send + 'static,
        L: FnOnce(GrainRef<G>, M, u64, Deadline) -> F + Send + 'static,
        F: std::future::Future<Output = Result<R, CallError>> + Send + 'static,
    {
        let (outbound, reply, codec) = self.outbound(kind, message, chain, here)?;
        let deadline = outbound.deadline;
        let grain = outbound.grain.clone();
        let timeout = self.silo.inner.config.call_timeout;
        let delivered = tokio::time::timeout_at(deadline, router.dispatch(Box::new(outbound)))
            .await
            .map_err(|_| match self.registered() {
                Ok(grain_type) => grain_type.timed_out(&self.key, timeout),
                Err(_) => CallError::Timeout {
                    grain: grain.clone(),
                    after: timeout,
                },
            })??;
        routed_reply(delivered, reply, codec, kind, &grain)
    }

    /// The routed form of `message` (rule 12): the router's view of it, the
    /// receiver of its local reply, and its codec, if it has one.
    #[allow(clippy::type_complexity)]
    pub(super) fn outbound<M, R, L, F>(
        &self,
        kind: Kind,
        message: M,
        chain: u64,
        here: L,
    ) -> Result<(Routed<G, M, R, L>, oneshot::Receiver<R>, Option<Codec>), CallError>
    where
        M: Message,
        R: Send + 'static,
        L: FnOnce(GrainRef<G>, M, u64, Deadline) -> F + Send + 'static,
        F: std::future::Future<Output = Result<R, CallError>> + Send + 'static,
    {
        let grain_type = self.registered()?;
        let codecs = match kind {
            Kind::Call | Kind::Tell => &self.silo.registry().codecs,
            Kind::Read => &self.silo.registry().read_codecs,
        };
        let codec = codecs
            .get(&(std::any::TypeId::of::<G>(), std::any::TypeId::of::<M>()))
            .cloned();
        let (reply, answer) = oneshot::channel();
        let timeout = self.silo.inner.config.call_timeout;
        Ok((
            Routed {
                target: self.clone(),
                grain: self.id(grain_type),
                kind,
                chain,
                deadline: deadline_after(timeout),
                timeout,
                codec: codec.clone(),
                message,
                reply,
                here,
            },
            answer,
            codec,
        ))
    }

    /// Moves the grain's activation, wherever it lives, to `target` with
    /// its in-memory state (`migration.rs`): between two of its turns,
    /// without `on_deactivate`, and, through a cluster node's router,
    /// without losing a call (calls that arrive meanwhile wait, then go to
    /// its new home). Returns once the grain lives there. The type must be
    /// registered as migratable, and the silo be part of a cluster; a grain
    /// with no activation has nothing to move
    /// ([`MigrationError::NotActive`]).
    ///
    /// [`MigrationError::NotActive`]: crate::migration::MigrationError::NotActive
    pub async fn migrate(
        &self,
        target: crate::migration::MigrationTarget,
    ) -> Result<crate::migration::Migrated, crate::migration::MigrationError> {
        use crate::migration::MigrationError;
        let grain_type = self
            .registered()
            .map_err(|_| MigrationError::NotMigratable {
                type_name: std::any::type_name::<G>().to_string(),
            })?;
        if grain_type.migration.get().is_none() {
            return Err(MigrationError::NotMigratable {
                type_name: grain_type.name.to_string(),
            });
        }
        match self.router() {
            Some(router) => router.migrate(&self.id(grain_type), target).await,
            None => Err(MigrationError::Unsupported {
                reason: "a silo outside a cluster has nowhere to move a grain".into(),
            }),
        }
    }

    /// Deactivates the grain's activation (each of a stateless worker's),
    /// if it has one: it runs what its mailbox already holds, then
    /// `on_deactivate` (rule 5); the next message activates it again.
    /// Returns once the request is queued. Never starts an activation: the
    /// request goes to the mailboxes found open, and one closed meanwhile
    /// (its activation already ending) needs none. On a silo shutting
    /// down, `CallError::ShutDown` (the shutdown deactivates everything).
    pub async fn deactivate(&self) -> Result<(), CallError> {
        let grain_type = self.registered()?;
        // As every delivery: a silo shutting down deactivates everything
        // itself.
        if self.silo.inner.shutting_down.load(Ordering::Acquire) {
            return Err(CallError::ShutDown);
        }
        let active: Vec<_> = grain_type
            .directory
            .get(&self.key)
            .map(|slots| {
                slots
                    .iter()
                    .filter_map(|slot| match slot {
                        Some(Entry::Active(sender)) if !sender.is_closed() => Some(sender.clone()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let deadline = deadline_after(self.silo.inner.config.call_timeout);
        for mailbox in active {
            let envelope = Envelope::<G> {
                chain: fresh_chain(),
                keeps_alive: false,
                expires: None,
                turn: Turn::Deactivate,
            };
            match mailbox.send(envelope, deadline).await {
                Ok(()) | Err(SendError::Closed(_)) => {}
                Err(SendError::Timeout) => {
                    return Err(
                        grain_type.timed_out(&self.key, self.silo.inner.config.call_timeout)
                    );
                }
            }
        }
        Ok(())
    }

    /// Whether this silo holds an activation of the grain now (starting,
    /// running or deactivating). A grain type that is not registered has
    /// none.
    pub fn is_active(&self) -> bool {
        self.registered
            .as_ref()
            .is_some_and(|grain_type| grain_type.directory.contains_key(&self.key))
    }

    pub(super) fn registered(&self) -> Result<&Arc<GrainType<G>>, CallError> {
        self.registered.as_ref().ok_or(CallError::NotRegistered {
            type_name: std::any::type_name::<G>(),
        })
    }

    pub(super) fn id(&self, grain_type: &GrainType<G>) -> GrainId {
        GrainId {
            type_name: grain_type.name.to_string(),
            key: self.key.clone(),
        }
    }

    /// Puts `envelope` in the grain's mailbox, activating it if needed; a
    /// mailbox closed by deactivation hands the envelope back, and it goes
    /// to the next activation (rule 5), unless the silo gave every home up
    /// since this delivery began (rule 13): then the caller is told
    /// `Unavailable`, and no activation starts here for it. (A delivery
    /// that began after the give-up was routed here after it: it may start
    /// the next activation.)
    pub(super) async fn deliver(
        &self,
        grain_type: &Arc<GrainType<G>>,
        mut envelope: Envelope<G>,
        deadline: &mut Deadline,
    ) -> Result<(), CallError> {
        let given_up = self.silo.homes_given_up();
        // Rule 13: a home given up since this delivery began (a sender
        // handed back by the mailbox its closing activation dropped the
        // queue of) is no longer this silo's to make again.
        let gone_since = |grain_type: &GrainType<G>| {
            (!grain_type.stateless && self.silo.homes_given_up() != given_up).then(|| {
                CallError::Unavailable {
                    grain: self.id(grain_type),
                    reason: "the silo gave the grain's home up (it fenced itself) while the \
                             message waited to be delivered; it did not run"
                        .to_string(),
                }
            })
        };
        // Fast paths, for a single activation with room in its mailbox: the
        // mailbox this reference delivered to last, if still open (no
        // lookup); else the directory, where the send happens under the
        // shared lock so no sender is cloned. Neither reads a clock. A
        // full mailbox is waited on right away, without another lookup.
        let mut full = None;
        if grain_type.workers <= 1 && !self.silo.inner.shutting_down.load(Ordering::Acquire) {
            envelope = match self.cache.last.try_send(envelope) {
                Ok(()) => return Ok(()),
                Err((returned, mailbox)) => {
                    full = mailbox;
                    returned
                }
            };
            if full.is_none() {
                if let Some(slots) = grain_type.directory.get(&self.key) {
                    if let Some(Some(Entry::Active(sender))) = slots.first() {
                        envelope = match sender.try_send(envelope) {
                            Ok(()) => {
                                self.cache.last.set(sender);
                                return Ok(());
                            }
                            Err(TrySendError::Full(returned)) => {
                                self.cache.last.set(sender);
                                full = Some(sender.clone());
                                returned
                            }
                            Err(TrySendError::Closed(returned)) => returned,
                        };
                    }
                }
            }
        }
        loop {
            let mailbox = match full.take() {
                Some(mailbox) => mailbox,
                None => {
                    let mailbox = self
                        .silo
                        .mailbox(grain_type, &self.key, deadline.get())
                        .await?;
                    if grain_type.workers <= 1 {
                        self.cache.last.set(&mailbox);
                    }
                    // Room in the mailbox: no timer needed.
                    envelope = match mailbox.try_send(envelope) {
                        Ok(()) => return Ok(()),
                        Err(TrySendError::Closed(returned)) => {
                            if let Some(gone) = gone_since(grain_type) {
                                return Err(gone);
                            }
                            // The activation is deactivating or died: give
                            // it a moment, and respect the deadline.
                            if Instant::now() >= deadline.get() {
                                return Err(grain_type
                                    .timed_out(&self.key, self.silo.inner.config.call_timeout));
                            }
                            tokio::task::yield_now().await;
                            envelope = returned;
                            continue;
                        }
                        Err(TrySendError::Full(returned)) => returned,
                    };
                    mailbox
                }
            };
            // The mailbox times the wait out itself, without a timer per
            // waiting sender (see `mailbox.rs`).
            match mailbox.send(envelope, deadline.get()).await {
                Ok(()) => return Ok(()),
                // Closed while waiting (deactivated): the next turn of the
                // loop finds the next activation (rule 5).
                Err(SendError::Closed(returned)) => {
                    if let Some(gone) = gone_since(grain_type) {
                        return Err(gone);
                    }
                    envelope = returned;
                }
                Err(SendError::Timeout) => {
                    return Err(
                        grain_type.timed_out(&self.key, self.silo.inner.config.call_timeout)
                    );
                }
            }
        }
    }
}

impl Silo {
    /// A reference to the grain of type `G` with `key`. It always exists:
    /// the first message activates it.
    pub fn grain<G: Grain>(&self, key: impl Into<GrainKey>) -> GrainRef<G> {
        let key = key.into();
        let registered = self.grain_type::<G>().ok();
        // On a routed silo, a new reference to a grain homed here starts
        // from the cache of the last one the router leased the home to
        // (rule 12); a lone silo pays one load for this.
        let leased = if self.is_routed_now() {
            registered
                .as_ref()
                .and_then(|grain_type| grain_type.leased.get(&key).map(|cache| cache.clone()))
        } else {
            None
        };
        GrainRef {
            silo: self.clone(),
            key,
            registered,
            cache: leased.unwrap_or_else(|| {
                Arc::new(RefCache {
                    last: mailbox::SenderCache::new(),
                    lease: arc_swap::ArcSwapOption::empty(),
                })
            }),
            _grain: PhantomData,
        }
    }
}

/// A message on its way through the router (rule 12): what the router
/// sees of it ([`Outbound`]), and the local delivery it runs when the home
/// is this silo.
pub(super) struct Routed<G, M, R, L> {
    /// A reference that delivers on the local path.
    target: GrainRef<G>,
    grain: GrainId,
    kind: Kind,
    chain: u64,
    pub(super) deadline: Instant,
    timeout: Duration,
    codec: Option<Codec>,
    message: M,
    /// Where the local delivery puts its reply.
    reply: oneshot::Sender<R>,
    here: L,
}

impl<G, M, R, L> Routed<G, M, R, L> {
    /// How the message travels: its registered name and wire form;
    /// `NotRoutable`, naming its Rust type, if it has no name (rule 4 of
    /// `route.rs`).
    fn codec(&self) -> Result<&Codec, CallError> {
        self.codec.as_ref().ok_or_else(|| CallError::NotRoutable {
            grain: self.grain.clone(),
            message: std::any::type_name::<M>(),
        })
    }
}

impl<G, M, R, L, F> Outbound for Routed<G, M, R, L>
where
    G: Grain,
    M: Message,
    R: Send + 'static,
    L: FnOnce(GrainRef<G>, M, u64, Deadline) -> F + Send + 'static,
    F: std::future::Future<Output = Result<R, CallError>> + Send + 'static,
{
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
        Ok(&self.codec()?.name)
    }

    fn encode(&self) -> Result<Arc<Vec<u8>>, CallError> {
        let codec = self.codec()?;
        (codec.encode)(&self.message)
            .map(Arc::new)
            .map_err(|err: DispatchError| CallError::Unavailable {
                grain: self.grain.clone(),
                reason: format!("the message has no wire form: {err}"),
            })
    }

    fn deliver_here(
        self: Box<Self>,
        lease: Option<Arc<HomeLease>>,
    ) -> BoxFuture<'static, Result<(), CallError>> {
        // The sending reference (and its clones, and references made later
        // for the grain on this silo) may skip the router while the lease
        // holds (`route.rs`, rule 3).
        if lease.is_some() {
            if let Some(grain_type) = self.target.registered.as_ref() {
                grain_type
                    .leased
                    .insert(self.target.key.clone(), self.target.cache.clone());
            }
        }
        self.target.cache.lease.store(lease);
        let Routed {
            target,
            chain,
            deadline,
            timeout,
            message,
            reply,
            here,
            ..
        } = *self;
        Box::pin(async move {
            let answer = here(target, message, chain, Deadline::at(deadline, timeout)).await?;
            let _ = reply.send(answer);
            Ok(())
        })
    }
}

/// The reply of a routed message: the local delivery's, or the remote
/// home's decoded.
pub(super) fn routed_reply<R: Send + 'static>(
    delivered: Delivered,
    mut reply: oneshot::Receiver<R>,
    codec: Option<Codec>,
    kind: Kind,
    grain: &GrainId,
) -> Result<R, CallError> {
    match delivered {
        Delivered::Here => reply.try_recv().map_err(|_| CallError::TurnFailed {
            grain: grain.clone(),
        }),
        Delivered::Elsewhere(bytes) => {
            let decoded: Box<dyn std::any::Any + Send> = match (kind, codec) {
                // A tell's acknowledgement carries no reply: `R` is `()`.
                (Kind::Tell, _) => Box::new(()),
                (_, Some(codec)) => {
                    (codec.decode_reply)(&bytes).map_err(|err| CallError::Unavailable {
                        grain: grain.clone(),
                        reason: format!("the reply did not decode: {err}"),
                    })?
                }
                (_, None) => {
                    return Err(CallError::Unavailable {
                        grain: grain.clone(),
                        reason: "the reply has no wire form".into(),
                    });
                }
            };
            decoded
                .downcast::<R>()
                .map(|reply| *reply)
                .map_err(|_| CallError::Unavailable {
                    grain: grain.clone(),
                    reason: "the reply decoded to another type".into(),
                })
        }
    }
}

/// A call's turn: `message` handled with `&mut` access, its reply sent on
/// `reply` (rule 3).
fn write_turn<G: Handler<M>, M: Message>(message: M, reply: oneshot::Sender<M::Reply>) -> Turn<G> {
    Turn::Write(Box::new(move |grain, ctx| {
        Box::pin(async move {
            let _ = reply.send(grain.handle(message, ctx).await);
        })
    }))
}

/// A read's turn (rule 10).
fn read_turn<G, M>(message: M, reply: oneshot::Sender<M::Reply>) -> Turn<G>
where
    G: crate::grain::ReadHandler<M>,
    M: Message,
{
    Turn::Read(Box::new(move |grain, ctx| {
        Box::pin(async move {
            let _ = reply.send(grain.handle_read(message, ctx).await);
        })
    }))
}

/// A tell's turn: handled, its reply dropped.
fn tell_turn<G: Handler<M>, M: Message>(message: M, _: oneshot::Sender<()>) -> Turn<G> {
    Turn::Write(Box::new(move |grain, ctx| {
        Box::pin(async move {
            let _ = grain.handle(message, ctx).await;
        })
    }))
}
