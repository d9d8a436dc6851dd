//! The silo: registered grain types, their activations, and grain
//! references.
//!
//! # Activation protocol
//!
//! 1. **Directory.** Each registered grain type has a directory from key to
//!    entry: `Active` (the activation's mailbox sender) or `Deactivating`
//!    (a signal that fires when the old activation is gone).
//! 2. **Activation on demand.** A message for a key with no entry inserts
//!    an `Active` entry and spawns the activation, under the directory's
//!    per-key lock; so concurrent first messages create exactly one
//!    activation.
//! 3. **Turns.** An activation is one task that takes the messages in its
//!    bounded mailbox in arrival order (a single activation takes all that
//!    are queued at once) and runs one handler at a time to completion:
//!    turns never overlap, and messages from one sender run in the order
//!    sent.
//! 4. **Backpressure.** A full mailbox makes senders wait, bounded by the
//!    call timeout (enforced by a silo-wide sweep, so at most one sweep
//!    tick late); memory never grows without bound. A waiting sender's
//!    message waits in the mailbox and takes the next free slot in turn. A
//!    single activation holds at most twice its capacity (the batch it
//!    works through and a full mailbox), three times while a turn lends
//!    the grain (plus the set-aside messages of rule 7); the rules are in
//!    `mailbox.rs`.
//! 5. **Deactivation** (idle for `idle_timeout`, idle for one check while
//!    the silo holds more than `max_activations`, or silo shutdown): the
//!    activation marks its entry `Deactivating`, closes its mailbox, runs
//!    the messages already in it, runs `on_deactivate`, removes the entry
//!    and fires the signal. A sender whose message is refused by the closed
//!    mailbox gets the message back, waits for the signal, and delivers to
//!    a new activation. Nothing is lost, and the old and new activations
//!    never overlap.
//! 6. **Failures.** A handler that panics fails its call with `TurnFailed`;
//!    the activation is reset (a new object, `on_activate` again) and goes
//!    on with the next message. An activation whose `on_activate` fails
//!    fails the messages waiting for it and ends.
//! 7. **Call chains and reentrancy.** Every message carries a call chain:
//!    a call made while a turn runs joins that turn's chain (a thread-local set around each poll of the turn),
//!    any other call starts a new one. A turn that calls another grain
//!    through `GrainContext::call` lends its grain while it waits: a
//!    message of its own chain that reaches the grain then runs at once, on
//!    the lent grain (A → B → A completes); messages of other chains are
//!    set aside and run after the turn, in arrival order. A panic in a
//!    reentrant turn unwinds the turn that lent the grain, and rule 6
//!    resets the activation.
//! 8. **Timers** belong to an activation: a tick is a message the
//!    activation sends itself, run as a turn like any other. Ticks do not
//!    count as activity for idle collection, and a timer ends when its
//!    activation deactivates or resets (its mailbox refuses the tick).
//! 9. **Stateless workers.** A type registered with `register_stateless`
//!    has up to `max_workers` slots per key instead of one. A message goes
//!    to an idle activation (empty mailbox, no turn running: a worker holds
//!    one slot of its own mailbox while it runs a turn), else starts one in
//!    a free slot, else queues in the activation with the most room. Each worker
//!    is an ordinary activation (rules 3 to 8); rule 2's "exactly one"
//!    becomes "at most `max_workers`".
//! 10. **Read-only interleaving.** A message sent with `GrainRef::read` is
//!     handled by `ReadHandler::handle_read`, on `&self`. When a turn would
//!     start with a read, the reads queued right behind it (up to 64) join
//!     it and they run together, interleaved at their await points; the
//!     first write in the queue waits for the batch. A panicking read fails
//!     its own call only.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::error::{CallError, SiloError};
use crate::grain::{Grain, GrainContext, Handler, Message, Service, service_key};
use crate::key::{GrainId, GrainKey};
use crate::mailbox::{self, SendError, TrySendError};
use crate::storage::{MemoryStorage, StorageProvider};

/// Runs a handler on a grain and answers its caller.
enum Turn<G> {
    /// A handler with `&mut` access: runs alone (rule 3).
    Write(WriteTurn<G>),
    /// A read-only handler: may interleave with other reads (rule 10).
    Read(ReadTurn<G>),
    /// Deactivate now (rule 5), after the turns already taken from the
    /// mailbox; sent by `GrainRef::deactivate`.
    Deactivate,
}

/// Most reads one interleaved batch takes (rule 10).
const MAX_READ_BATCH: usize = 64;

/// A message packed for an activation, with the call chain it belongs to
/// (rule 7).
pub(crate) struct Envelope<G> {
    chain: u64,
    /// Whether the message counts as activity for idle collection (a timer
    /// tick does not).
    keeps_alive: bool,
    turn: Turn<G>,
}

thread_local! {
    /// The call chain of the turn being polled on this thread; 0 while
    /// none is (chain ids are never 0: see `fresh_chain`).
    static CHAIN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The chain a new call joins: the current turn's, or a fresh one.
fn current_chain() -> u64 {
    match CHAIN.with(std::cell::Cell::get) {
        0 => fresh_chain(),
        chain => chain,
    }
}

/// A turn's future, polled with its chain as the thread's current chain
/// (rule 7). A thread-local set around each poll, rather than a tokio
/// task-local: the same scoping for a fraction of the cost, which matters
/// at one scope per turn.
struct InChain<F> {
    chain: u64,
    future: F,
}

impl<F: std::future::Future + Unpin> std::future::Future for InChain<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        /// Puts the previous chain back, also if the poll unwinds.
        struct Restore(u64);
        impl Drop for Restore {
            fn drop(&mut self) {
                CHAIN.with(|chain| chain.set(self.0));
            }
        }
        let _restore = Restore(CHAIN.with(|chain| chain.replace(self.chain)));
        std::pin::Pin::new(&mut self.future).poll(cx)
    }
}

/// A chain id no other call has: a per-thread counter in the low 40 bits
/// and the thread's number above, so no shared counter is touched.
fn fresh_chain() -> u64 {
    static NEXT_THREAD: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        /// The next chain of this thread; 0 until its first call.
        static NEXT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    NEXT.with(|next| {
        let chain = match next.get() {
            // Low bits from 1: never 0 (no chain), even once the thread
            // number wraps (after 2^24 threads, when ids may repeat).
            0 => (NEXT_THREAD.fetch_add(1, Ordering::Relaxed) << 40) | 1,
            chain => chain,
        };
        next.set(chain + 1);
        chain
    })
}

/// An activation's mailbox, kept in its `GrainContext` so that a turn
/// waiting in `GrainContext::call` can take reentrant messages from it.
pub(crate) struct Mailbox<G> {
    receiver: mailbox::Receiver<Envelope<G>>,
    /// For the activation's own timers; closing `receiver` refuses them.
    sender: mailbox::Sender<Envelope<G>>,
    /// Messages taken from the mailbox in one go, oldest first; they run
    /// before anything else. Only for single activations: a stateless
    /// worker takes one message at a time, so that a busy worker's messages
    /// stay in its mailbox where `choose` sees them (rule 9).
    batch: std::collections::VecDeque<Envelope<G>>,
    /// Whether the activation takes its mailbox's messages in batches.
    batches: bool,
    /// Messages of other chains that arrived during a reentrant wait, in
    /// arrival order; they run after `batch` (which arrived before them)
    /// and before anything newer.
    deferred: std::collections::VecDeque<Envelope<G>>,
}

/// `timeout` from now; a timeout too long to represent waits a century.
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// A call's deadline, read from the clock only when a wait needs it: the
/// fast paths (room in the mailbox, an answer ready after one yield) read
/// no clock. Once read, it stays: every wait of the call shares it.
struct Deadline {
    timeout: Duration,
    at: Option<Instant>,
}

impl Deadline {
    fn after(timeout: Duration) -> Deadline {
        Deadline { timeout, at: None }
    }

    fn at(at: Instant, timeout: Duration) -> Deadline {
        Deadline {
            timeout,
            at: Some(at),
        }
    }

    fn get(&mut self) -> Instant {
        *self.at.get_or_insert_with(|| deadline_after(self.timeout))
    }
}

/// A mailbox taken out of its context for a reentrant wait; put back when
/// dropped.
struct LentMailbox<'c, G: Grain> {
    ctx: &'c mut GrainContext,
    mailbox: Option<Box<std::sync::Mutex<Mailbox<G>>>>,
}

impl<G: Grain> Drop for LentMailbox<'_, G> {
    fn drop(&mut self) {
        if let Some(mailbox) = self.mailbox.take() {
            self.ctx.put_mailbox(mailbox);
        }
    }
}

/// The mailbox behind a `&mut`: its mutex is never contended (see
/// `GrainContext::mailbox`), and a poisoned one is still consistent.
fn exclusive<G>(mailbox: &mut Box<std::sync::Mutex<Mailbox<G>>>) -> &mut Mailbox<G> {
    mailbox
        .get_mut()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<G: Grain> Mailbox<G> {
    /// The next message for a new turn, if one is already queued.
    fn try_next(&mut self) -> Option<Envelope<G>> {
        if let Some(envelope) = self.batch.pop_front() {
            return Some(envelope);
        }
        if let Some(envelope) = self.deferred.pop_front() {
            return Some(envelope);
        }
        if self.batches {
            self.receiver.try_recv_all(&mut self.batch);
            self.batch.pop_front()
        } else {
            self.receiver.try_recv()
        }
    }

    /// The next message already taken from the mailbox, if any.
    fn taken(&mut self) -> Option<Envelope<G>> {
        self.batch.pop_front().or_else(|| self.deferred.pop_front())
    }

    /// The next message for a new turn, or registers to be woken for one,
    /// taking the mailbox's lock once. `None`: closed and drained.
    fn poll_next(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Envelope<G>>> {
        if let Some(envelope) = self.taken() {
            return std::task::Poll::Ready(Some(envelope));
        }
        if self.batches {
            self.receiver
                .poll_recv_all(cx, &mut self.batch)
                .map(|_| self.batch.pop_front())
        } else {
            self.receiver.poll_recv(cx)
        }
    }

    /// The next message for a new turn.
    async fn next(&mut self) -> Option<Envelope<G>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Puts back the message `try_next` returned last, first in line.
    fn put_back(&mut self, envelope: Envelope<G>) {
        self.batch.push_front(envelope);
    }
}

/// A directory entry (rule 1).
enum Entry<G> {
    Active(mailbox::Sender<Envelope<G>>),
    Deactivating(watch::Receiver<bool>),
}

/// One registered grain type.
struct GrainType<G> {
    name: String,
    /// Per key, one slot per worker: `workers` slots for a stateless
    /// worker type (rule 9), one otherwise. A key with every slot empty is
    /// removed.
    directory: DashMap<GrainKey, Vec<Option<Entry<G>>>>,
    /// Activations one key may have at once, at least 1.
    workers: usize,
}

/// What a message for a key should do (rules 2 and 9).
enum Choice<G> {
    Use(mailbox::Sender<Envelope<G>>),
    Activate(usize),
    Wait(watch::Receiver<bool>),
}

/// Picks a slot: an idle activation, else a free slot to activate, else the
/// activation with the most room, else (every slot deactivating) the first
/// one to wait for.
fn choose<G>(slots: &[Option<Entry<G>>]) -> Choice<G> {
    let mut roomiest: Option<&mailbox::Sender<Envelope<G>>> = None;
    let mut free = None;
    let mut leaving = None;
    for (index, slot) in slots.iter().enumerate() {
        match slot {
            Some(Entry::Active(sender)) => {
                if sender.capacity() == sender.max_capacity() {
                    return Choice::Use(sender.clone());
                }
                if roomiest.is_none_or(|best| sender.capacity() > best.capacity()) {
                    roomiest = Some(sender);
                }
            }
            None => {
                free.get_or_insert(index);
            }
            Some(Entry::Deactivating(gone)) => {
                leaving.get_or_insert(gone);
            }
        }
    }
    match (free, roomiest, leaving) {
        (Some(index), _, _) => Choice::Activate(index),
        (None, Some(sender), _) => Choice::Use(sender.clone()),
        (None, None, Some(gone)) => Choice::Wait(gone.clone()),
        // No slots at all (a worker count of 0 is refused at build).
        (None, None, None) => Choice::Activate(0),
    }
}

/// How a silo is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiloConfig {
    /// Messages an activation's mailbox holds, at least 1 (default 1024).
    pub mailbox_capacity: usize,
    /// How long a call waits for its answer (default 30 s).
    pub call_timeout: Duration,
    /// How long an activation may sit idle before it is deactivated
    /// (default 15 minutes).
    pub idle_timeout: Duration,
    /// Memory pressure, as a number of activations: while more are alive,
    /// activations idle for at least one idle check (at most a second) are
    /// deactivated early (default: no limit).
    pub max_activations: Option<u64>,
}

impl Default for SiloConfig {
    fn default() -> SiloConfig {
        SiloConfig {
            mailbox_capacity: 1024,
            call_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(15 * 60),
            max_activations: None,
        }
    }
}

pub(crate) struct SiloInner {
    types: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
    services: HashMap<TypeId, Service>,
    storage: Arc<dyn StorageProvider>,
    config: SiloConfig,
    tasks: TaskTracker,
    /// Cancelled when the silo shuts down.
    shutdown: tokio_util::sync::CancellationToken,
    shutting_down: AtomicBool,
    /// Set once `shutdown` has waited for every activation: an activation
    /// that starts later runs no grain code.
    stopped: AtomicBool,
    /// Per grain type, wakes every activation (to see `shutting_down`).
    wake_activations: Vec<Box<dyn Fn() + Send + Sync>>,
    /// Grain types and messages by name.
    registry: crate::dispatch::Registry,
    activations: AtomicU64,
    live: AtomicU64,
    /// Times out senders waiting on full mailboxes.
    sweeper: Arc<mailbox::Sweeper>,
    pub(crate) reminders: Arc<crate::reminders::Reminders>,
    /// Told of every activation that ends (a cluster node's), with the
    /// number of the guard that set it.
    ended: std::sync::Mutex<Option<(u64, EndedListener)>>,
    /// Numbers the listeners set.
    listeners_set: AtomicU64,
}

/// Keeps a silo's activation-end listener set; dropping it clears the
/// listener (`Silo::on_activation_ended`).
#[must_use = "the listener is cleared when the guard is dropped"]
pub struct EndedListenerGuard {
    silo: std::sync::Weak<SiloInner>,
    number: u64,
}

impl fmt::Debug for EndedListenerGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndedListenerGuard")
            .field("number", &self.number)
            .finish_non_exhaustive()
    }
}

impl Drop for EndedListenerGuard {
    fn drop(&mut self) {
        if let Some(silo) = self.silo.upgrade() {
            let mut ended = silo.ended.lock().unwrap_or_else(PoisonError::into_inner);
            if ended
                .as_ref()
                .is_some_and(|(number, _)| *number == self.number)
            {
                *ended = None;
            }
        }
    }
}

/// Told of every activation that ends (`Silo::on_activation_ended`).
pub type EndedListener = Arc<dyn Fn(&GrainId, ActivationEnd) + Send + Sync>;

/// How an activation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationEnd {
    /// It deactivated (idle, on request, under memory pressure, or at
    /// shutdown) after `on_deactivate`.
    Deactivated,
    /// Its `on_activate` failed (or the silo had stopped): it handled
    /// nothing, and the messages that waited for it failed.
    ActivationFailed,
}

/// A node of the runtime. Cheap to clone; every clone is the same silo.
#[derive(Clone)]
pub struct Silo {
    inner: Arc<SiloInner>,
}

impl fmt::Debug for Silo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Silo")
            .field("grain_types", &self.inner.types.len())
            .field("live_activations", &self.live_activations())
            .finish_non_exhaustive()
    }
}

/// Builds a [`Silo`].
pub struct SiloBuilder {
    types: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
    names: HashMap<String, TypeId>,
    /// A name registered twice, reported by `build`.
    duplicate: Option<String>,
    /// An invalid registration, reported by `build`.
    invalid: Option<String>,
    /// Remindable grain types, by registered name.
    remindable: HashMap<String, crate::reminders::Dispatch>,
    services: HashMap<TypeId, Service>,
    storage: Arc<dyn StorageProvider>,
    config: SiloConfig,
    /// Per registered type, wakes its activations (for `shutdown`).
    wake_activations: Vec<Box<dyn Fn() + Send + Sync>>,
    /// Grain types and messages by name, for dispatch from the network.
    registry: crate::dispatch::Registry,
    /// A message name registered twice for one grain type, reported by
    /// `build`.
    duplicate_message: Option<(String, String)>,
}

impl fmt::Debug for SiloBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiloBuilder")
            .field("grain_types", &self.names.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Default for SiloBuilder {
    fn default() -> SiloBuilder {
        SiloBuilder::new()
    }
}

impl SiloBuilder {
    /// A silo with no grain types, in-memory storage and default settings.
    pub fn new() -> SiloBuilder {
        SiloBuilder {
            types: HashMap::new(),
            names: HashMap::new(),
            duplicate: None,
            invalid: None,
            remindable: HashMap::new(),
            services: HashMap::new(),
            storage: Arc::new(MemoryStorage::new()),
            config: SiloConfig::default(),
            wake_activations: Vec::new(),
            registry: crate::dispatch::Registry::default(),
            duplicate_message: None,
        }
    }

    /// Registers grain type `G` under the stable `name`.
    pub fn register<G: Grain>(self, name: &str) -> SiloBuilder {
        self.register_with_workers::<G>(name, 1)
    }

    /// Registers `G` as a stateless worker under `name`: each key may have
    /// up to `max_workers` activations at once, and a message goes to an
    /// idle one, or starts another, or else queues where there is most
    /// room (rule 9). For throughput-bound grains without state.
    pub fn register_stateless<G: Grain>(self, name: &str, max_workers: usize) -> SiloBuilder {
        if max_workers == 0 {
            let mut builder = self;
            builder
                .invalid
                .get_or_insert_with(|| format!("{name}: max_workers is 0"));
            return builder;
        }
        self.register_with_workers::<G>(name, max_workers)
    }

    fn register_with_workers<G: Grain>(mut self, name: &str, workers: usize) -> SiloBuilder {
        if self.types.contains_key(&TypeId::of::<G>()) {
            self.invalid.get_or_insert_with(|| {
                format!(
                    "{} is registered under two names",
                    std::any::type_name::<G>()
                )
            });
        }
        if self
            .names
            .insert(name.to_string(), TypeId::of::<G>())
            .is_some()
        {
            self.duplicate.get_or_insert_with(|| name.to_string());
        }
        let registered: Arc<GrainType<G>> = Arc::new(GrainType {
            name: name.to_string(),
            directory: DashMap::new(),
            workers,
        });
        self.registry.handles.entry(name.to_string()).or_default();
        self.registry
            .type_names
            .insert(TypeId::of::<G>(), name.to_string());
        self.registry
            .deactivators
            .insert(name.to_string(), crate::dispatch::deactivator::<G>());
        self.registry
            .activity
            .insert(name.to_string(), crate::dispatch::activity::<G>());
        let directory = registered.clone();
        self.wake_activations.push(Box::new(move || {
            for slots in directory.directory.iter() {
                for slot in slots.iter() {
                    if let Some(Entry::Active(sender)) = slot {
                        sender.wake_receiver();
                    }
                }
            }
        }));
        self.types.insert(TypeId::of::<G>(), registered);
        self
    }

    /// Lets grain type `G`, already registered, hold reminders: it handles
    /// [`ReminderFired`](crate::ReminderFired), and the silo runs a
    /// reminder service that fires them, across restarts (see
    /// `reminders.rs`). A silo with remindable types must be built inside a
    /// tokio runtime.
    pub fn remindable<G: Handler<crate::reminders::ReminderFired>>(mut self) -> SiloBuilder {
        match self
            .names
            .iter()
            .find(|(_, id)| **id == TypeId::of::<G>())
            .map(|(name, _)| name.clone())
        {
            Some(name) => {
                self.remindable
                    .insert(name, crate::reminders::dispatcher::<G>());
            }
            None => {
                self.invalid.get_or_insert_with(|| {
                    format!(
                        "{} is made remindable before it is registered",
                        std::any::type_name::<G>()
                    )
                });
            }
        }
        self
    }

    /// Registers message type `M` of grain type `G`, already registered,
    /// under the stable `name`: a message that arrives by name (from
    /// another silo, through `Silo::call_named`) is decoded from the wire
    /// form and handled as a local call would be (see `dispatch.rs`).
    /// Names are per grain type.
    pub fn message<G, M>(mut self, name: &str) -> SiloBuilder
    where
        G: Handler<M>,
        M: Message + serde::de::DeserializeOwned,
        M::Reply: serde::Serialize,
    {
        let Some(grain_type) = self.registry.type_names.get(&TypeId::of::<G>()).cloned() else {
            self.invalid.get_or_insert_with(|| {
                format!(
                    "message {name:?} is registered for {} before the grain type is",
                    std::any::type_name::<G>()
                )
            });
            return self;
        };
        let messages = self.registry.handles.entry(grain_type.clone()).or_default();
        if messages
            .insert(name.to_string(), crate::dispatch::handle::<G, M>())
            .is_some()
        {
            self.duplicate_message
                .get_or_insert_with(|| (grain_type, name.to_string()));
        }
        self.registry
            .names
            .insert((TypeId::of::<G>(), TypeId::of::<M>()), name.to_string());
        self
    }

    /// Registers a service that grains reach with
    /// `GrainContext::service::<S>()` (the GPU bridge, for example). The
    /// silo shares it: keep a clone of the `Arc` to use it outside grains.
    pub fn service<S: Send + Sync + 'static>(mut self, service: Arc<S>) -> SiloBuilder {
        self.services.insert(service_key::<S>(), service);
        self
    }

    /// Sets the storage provider for grain state.
    pub fn storage(mut self, storage: Arc<dyn StorageProvider>) -> SiloBuilder {
        self.storage = storage;
        self
    }

    /// Sets the configuration.
    pub fn config(mut self, config: SiloConfig) -> SiloBuilder {
        self.config = config;
        self
    }

    /// Builds the silo. Nothing is activated yet.
    pub fn build(self) -> Result<Silo, SiloError> {
        if let Some(duplicate) = self.duplicate {
            return Err(SiloError::DuplicateName(duplicate));
        }
        if let Some((grain_type, message)) = self.duplicate_message {
            return Err(SiloError::DuplicateMessage {
                grain_type,
                message,
            });
        }
        if let Some(invalid) = self.invalid {
            return Err(SiloError::InvalidConfig(invalid));
        }
        if self.config.mailbox_capacity == 0 {
            return Err(SiloError::InvalidConfig("mailbox_capacity is 0".into()));
        }
        let shutdown = tokio_util::sync::CancellationToken::new();
        let reminders = Arc::new(crate::reminders::Reminders::new(
            self.remindable,
            self.storage.clone(),
        ));
        let runtime = if reminders.is_empty() {
            None
        } else {
            Some(tokio::runtime::Handle::try_current().map_err(|_| {
                SiloError::InvalidConfig(
                    "a silo with remindable grains must be built inside a tokio runtime".into(),
                )
            })?)
        };
        let silo = Silo {
            inner: Arc::new(SiloInner {
                types: self.types,
                services: self.services,
                storage: self.storage,
                config: self.config,
                tasks: TaskTracker::new(),
                shutdown,
                shutting_down: AtomicBool::new(false),
                stopped: AtomicBool::new(false),
                wake_activations: self.wake_activations,
                registry: self.registry,
                activations: AtomicU64::new(0),
                live: AtomicU64::new(0),
                sweeper: mailbox::Sweeper::new(mailbox::Sweeper::tick_for(
                    self.config.call_timeout,
                )),
                reminders: reminders.clone(),
                ended: std::sync::Mutex::new(None),
                listeners_set: AtomicU64::new(0),
            }),
        };
        if let Some(runtime) = runtime {
            // The service holds the silo weakly: a silo dropped without a
            // shutdown does not live on for its reminders.
            let weak = Arc::downgrade(&silo.inner);
            let stop = silo.inner.shutdown.clone();
            let service = async move {
                let Some(inner) = weak.upgrade() else { return };
                let reminders = inner.reminders.clone();
                drop(inner);
                reminders.run(weak, stop).await;
            };
            runtime.spawn(silo.inner.tasks.track_future(service));
        }
        Ok(silo)
    }
}

impl Silo {
    pub(crate) fn from_inner(inner: Arc<SiloInner>) -> Silo {
        Silo { inner }
    }

    /// A builder.
    pub fn builder() -> SiloBuilder {
        SiloBuilder::new()
    }

    /// A reference to the grain of type `G` with `key`. It always exists:
    /// the first message activates it.
    pub fn grain<G: Grain>(&self, key: impl Into<GrainKey>) -> GrainRef<G> {
        GrainRef {
            silo: self.clone(),
            key: key.into(),
            registered: self.grain_type::<G>().ok(),
            last: mailbox::SenderCache::new(),
            _grain: PhantomData,
        }
    }

    pub(crate) fn registry(&self) -> &crate::dispatch::Registry {
        &self.inner.registry
    }

    /// The name grain type `G` is registered under, if it is.
    pub fn grain_type_name<G: Grain>(&self) -> Option<&str> {
        self.inner
            .registry
            .type_names
            .get(&TypeId::of::<G>())
            .map(String::as_str)
    }

    /// Activations started since the silo was built.
    pub fn activations_started(&self) -> u64 {
        self.inner.activations.load(Ordering::Relaxed)
    }

    /// Activations alive now.
    pub fn live_activations(&self) -> u64 {
        self.inner.live.load(Ordering::Relaxed)
    }

    /// Calls `listener` each time an activation ends, after its entry is
    /// gone (a message sent from inside the listener starts a new one).
    /// It runs on the activation's task and must not block. One listener
    /// at a time per silo (a cluster node sets it to release the directory
    /// entries of grains that are no longer active here): while the
    /// returned guard lives, another is refused and comes back.
    pub fn on_activation_ended(
        &self,
        listener: EndedListener,
    ) -> Result<EndedListenerGuard, EndedListener> {
        let mut ended = self
            .inner
            .ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if ended.is_some() {
            return Err(listener);
        }
        let number = self.inner.listeners_set.fetch_add(1, Ordering::Relaxed);
        *ended = Some((number, listener));
        Ok(EndedListenerGuard {
            silo: Arc::downgrade(&self.inner),
            number,
        })
    }

    pub(crate) fn storage(&self) -> Arc<dyn StorageProvider> {
        self.inner.storage.clone()
    }

    pub(crate) fn service<S: Send + Sync + 'static>(&self) -> Option<Arc<S>> {
        self.inner
            .services
            .get(&service_key::<S>())
            .and_then(|service| service.clone().downcast::<S>().ok())
    }

    /// Deactivates every activation gracefully (each finishes the messages
    /// in its mailbox and runs `on_deactivate`, which writes state), then
    /// returns. Later calls fail with `ShutDown`.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Release);
        self.inner.shutdown.cancel();
        // An idle activation sees the flag when woken; one that goes idle
        // after this reads the flag after registering to be woken (see
        // `run_activation`), so none sleeps through the shutdown.
        for wake in &self.inner.wake_activations {
            wake();
        }
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        // An activation spawned by a sender that passed the flag just
        // before it was set may still be starting: it sees `stopped` and
        // runs no grain code, or it started before and is waited for here.
        self.inner.stopped.store(true, Ordering::Release);
        self.inner.tasks.wait().await;
    }

    fn grain_type<G: Grain>(&self) -> Result<Arc<GrainType<G>>, CallError> {
        self.inner
            .types
            .get(&TypeId::of::<G>())
            .and_then(|registered| registered.clone().downcast::<GrainType<G>>().ok())
            .ok_or(CallError::NotRegistered {
                type_name: std::any::type_name::<G>(),
            })
    }

    /// The mailbox of `key`'s activation, activating it if needed (rules 1,
    /// 2 and 5).
    async fn mailbox<G: Grain>(
        &self,
        grain_type: &Arc<GrainType<G>>,
        key: &GrainKey,
        deadline: Instant,
    ) -> Result<mailbox::Sender<Envelope<G>>, CallError> {
        loop {
            if self.inner.shutting_down.load(Ordering::Acquire) {
                return Err(CallError::ShutDown);
            }
            // The common case, an idle activation: a shared lock, no key
            // copy.
            if let Some(slots) = grain_type.directory.get(key) {
                if let Choice::Use(sender) = choose(&slots) {
                    if !sender.is_closed() {
                        return Ok(sender);
                    }
                }
            }
            let mut gone = match grain_type.directory.entry(key.clone()) {
                dashmap::Entry::Occupied(mut entry) => {
                    // An active slot whose mailbox is closed belongs to an
                    // activation that died (rule 5 marks a slot
                    // `Deactivating` before closing): free it.
                    for slot in entry.get_mut().iter_mut() {
                        if matches!(slot, Some(Entry::Active(sender)) if sender.is_closed()) {
                            *slot = None;
                        }
                    }
                    match choose(entry.get()) {
                        Choice::Use(sender) => return Ok(sender),
                        Choice::Wait(gone) => gone,
                        Choice::Activate(worker) => {
                            let sender = self.activate_slot(grain_type, key, worker);
                            if let Some(slot) = entry.get_mut().get_mut(worker) {
                                *slot = Some(Entry::Active(sender.clone()));
                            }
                            return Ok(sender);
                        }
                    }
                }
                dashmap::Entry::Vacant(vacant) => {
                    let sender = self.activate_slot(grain_type, key, 0);
                    let mut slots: Vec<Option<Entry<G>>> =
                        (0..grain_type.workers.max(1)).map(|_| None).collect();
                    slots[0] = Some(Entry::Active(sender.clone()));
                    vacant.insert(slots);
                    return Ok(sender);
                }
            };
            // The old activation is finishing: wait until it is gone, at
            // most until the call's deadline. If it died without saying so
            // (its task was cancelled), clear its slot.
            let waited = tokio::select! {
                waited = tokio::time::timeout_at(deadline, gone.wait_for(|gone| *gone)) => waited,
                _ = self.inner.shutdown.cancelled() => return Err(CallError::ShutDown),
            };
            let Ok(waited) = waited else {
                return Err(CallError::Timeout {
                    grain: GrainId {
                        type_name: grain_type.name.clone(),
                        key: key.clone(),
                    },
                    after: self.inner.config.call_timeout,
                });
            };
            if waited.is_err() {
                if let Some(mut slots) = grain_type.directory.get_mut(key) {
                    for slot in slots.iter_mut() {
                        if matches!(slot, Some(Entry::Deactivating(gone)) if gone.has_changed().is_err())
                        {
                            *slot = None;
                        }
                    }
                }
            }
        }
    }

    /// Starts activation `worker` of `key` (under the directory's lock for
    /// `key`) and returns its mailbox.
    fn activate_slot<G: Grain>(
        &self,
        grain_type: &Arc<GrainType<G>>,
        key: &GrainKey,
        worker: usize,
    ) -> mailbox::Sender<Envelope<G>> {
        let (sender, mailbox) = mailbox::channel(
            self.inner.config.mailbox_capacity,
            self.inner.sweeper.clone(),
        );
        self.spawn_activation(
            grain_type.clone(),
            key.clone(),
            worker,
            mailbox,
            sender.clone(),
        );
        sender
    }

    fn spawn_activation<G: Grain>(
        &self,
        grain_type: Arc<GrainType<G>>,
        key: GrainKey,
        worker: usize,
        mailbox: mailbox::Receiver<Envelope<G>>,
        sender: mailbox::Sender<Envelope<G>>,
    ) {
        self.inner.activations.fetch_add(1, Ordering::Relaxed);
        self.inner.live.fetch_add(1, Ordering::Relaxed);
        let silo = self.clone();
        self.inner.tasks.spawn(async move {
            run_activation(silo.clone(), grain_type, key, worker, mailbox, sender).await;
            silo.inner.live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// A grain's activation: rules 3, 5, 6 and 7.
async fn run_activation<G: Grain>(
    silo: Silo,
    grain_type: Arc<GrainType<G>>,
    key: GrainKey,
    worker: usize,
    receiver: mailbox::Receiver<Envelope<G>>,
    sender: mailbox::Sender<Envelope<G>>,
) {
    let id = GrainId {
        type_name: grain_type.name.clone(),
        key: key.clone(),
    };
    let mut ctx = GrainContext::new(id.clone(), silo.clone());
    // A stateless worker holds one mailbox slot while it runs a turn, so
    // that `choose` sees it busy (rule 9).
    let busy_marker = (grain_type.workers > 1).then(|| sender.clone());
    ctx.put_mailbox(Box::new(std::sync::Mutex::new(Mailbox {
        receiver,
        sender,
        batch: std::collections::VecDeque::new(),
        batches: grain_type.workers <= 1,
        deferred: std::collections::VecDeque::new(),
    })));
    let idle = silo.inner.config.idle_timeout;
    // An activation whose messages were accepted before the silo began to
    // shut down starts, and rule 5 runs them; one that starts after
    // `shutdown` returned does not: its messages fail, and no grain code
    // runs after `shutdown` returned.
    let mut grain = if silo.inner.stopped.load(Ordering::Acquire) {
        None
    } else {
        activate::<G>(&key, &mut ctx).await
    };
    // Idle collection counts messages that keep the grain alive (rule 8).
    // One timer checks for idleness a few times per idle period, rather
    // than a timeout armed for every message.
    // Turns that kept the grain alive, and how long none has: both only
    // looked at when the idle check ticks, so a turn reads no clock.
    let mut activity: u64 = 0;
    let mut seen_activity: u64 = 0;
    let mut idle_for = Duration::ZERO;
    // At most a second apart, so that shedding reacts to memory pressure.
    let check_every = (idle / 4)
        .min(Duration::from_secs(1))
        .max(Duration::from_micros(100));
    let mut idle_check = tokio::time::interval_at(Instant::now() + check_every, check_every);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if grain.is_some() {
        loop {
            // The flag, not the token: checking a token takes a lock.
            if silo.inner.shutting_down.load(Ordering::Acquire) {
                break;
            }
            let Some(mut mailbox) = ctx.take_mailbox::<G>() else {
                break;
            };
            // `None`: idle or shutting down. A message already taken from
            // the mailbox (a busy grain's common case) runs without
            // building the select below: the shutdown flag was checked
            // above, and a busy grain is not idle.
            let queued = exclusive(&mut mailbox).taken();
            let next = if let Some(envelope) = queued {
                // Taking a batch spends none of tokio's cooperative budget,
                // and a mailbox refilled from other threads could keep this
                // task from ever yielding: spend one unit per turn, as
                // `recv` would.
                tokio::task::consume_budget().await;
                Some(Some(envelope))
            } else {
                loop {
                    enum Idle<E> {
                        Next(Option<E>),
                        Stop,
                        Check,
                    }
                    let event = std::future::poll_fn(|cx| {
                        use std::task::Poll;
                        if let Poll::Ready(next) = exclusive(&mut mailbox).poll_next(cx) {
                            return Poll::Ready(Idle::Next(next));
                        }
                        // Registered to be woken: a shutdown that starts now
                        // wakes this task, and one that started earlier is
                        // seen here.
                        if silo.inner.shutting_down.load(Ordering::Acquire) {
                            return Poll::Ready(Idle::Stop);
                        }
                        if idle_check.poll_tick(cx).is_ready() {
                            return Poll::Ready(Idle::Check);
                        }
                        Poll::Pending
                    })
                    .await;
                    match event {
                        Idle::Next(next) => break Some(next),
                        Idle::Stop => break None,
                        Idle::Check => {
                            if activity == seen_activity {
                                idle_for += check_every;
                                let crowded = silo
                                    .inner
                                    .config
                                    .max_activations
                                    .is_some_and(|most| silo.live_activations() > most);
                                if idle_for >= idle || crowded {
                                    break None;
                                }
                            } else {
                                seen_activity = activity;
                                idle_for = Duration::ZERO;
                            }
                        }
                    }
                }
            };
            ctx.put_mailbox(mailbox);
            match next {
                Some(Some(envelope)) if matches!(envelope.turn, Turn::Deactivate) => break,
                Some(Some(envelope)) => {
                    let keeps_alive = envelope.keeps_alive;
                    let busy = busy_marker.as_ref().and_then(|own| own.try_reserve());
                    grain = turn(grain, envelope, &key, &mut ctx).await;
                    drop(busy);
                    if grain.is_none() {
                        break;
                    }
                    if keeps_alive {
                        activity += 1;
                    }
                }
                // Idle, shutting down, or (never: the directory holds a
                // sender) closed.
                Some(None) | None => break,
            }
        }
    }
    // Rule 5: no new messages; run the ones already queued. Timers end
    // with the activation.
    ctx.cancel_timers();
    let (gone, gone_signal) = watch::channel(false);
    if let Some(mut slots) = grain_type.directory.get_mut(&key) {
        if let Some(slot) = slots.get_mut(worker) {
            *slot = Some(Entry::Deactivating(gone_signal));
        }
    }
    if let Some(mut mailbox) = ctx.take_mailbox::<G>() {
        exclusive(&mut mailbox).receiver.close();
        ctx.put_mailbox(mailbox);
    }
    loop {
        let Some(mut mailbox) = ctx.take_mailbox::<G>() else {
            break;
        };
        let next = exclusive(&mut mailbox).next().await;
        ctx.put_mailbox(mailbox);
        let Some(envelope) = next else { break };
        match grain {
            Some(_) => grain = turn(grain, envelope, &key, &mut ctx).await,
            // Failed activation: dropping the envelope fails its call.
            None => drop(envelope),
        }
    }
    let end = if grain.is_some() {
        ActivationEnd::Deactivated
    } else {
        ActivationEnd::ActivationFailed
    };
    if let Some(mut grain) = grain {
        if AssertUnwindSafe(grain.on_deactivate(&mut ctx))
            .catch_unwind()
            .await
            .is_err()
        {
            tracing::warn!(grain = %id, "on_deactivate panicked");
        }
    }
    // Timers registered by the last turns or by on_deactivate end too.
    ctx.cancel_timers();
    if let Some(mut slots) = grain_type.directory.get_mut(&key) {
        if let Some(slot) = slots.get_mut(worker) {
            *slot = None;
        }
    }
    grain_type
        .directory
        .remove_if(&key, |_, slots| slots.iter().all(Option::is_none));
    let _ = gone.send(true);
    tracing::debug!(grain = %id, "deactivated");
    let listener = silo
        .inner
        .ended
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .map(|(_, listener)| listener.clone());
    if let Some(listener) = listener {
        listener(&id, end);
    }
}

/// A new object for `key`, activated; `None` if `on_activate` failed.
async fn activate<G: Grain>(key: &GrainKey, ctx: &mut GrainContext) -> Option<G> {
    let Ok(mut grain) = std::panic::catch_unwind(AssertUnwindSafe(|| G::new(key))) else {
        tracing::warn!(grain = %ctx.id(), "Grain::new panicked");
        return None;
    };
    match AssertUnwindSafe(grain.on_activate(ctx))
        .catch_unwind()
        .await
    {
        Ok(Ok(())) => Some(grain),
        Ok(Err(err)) => {
            tracing::warn!(grain = %ctx.id(), error = %err, "activation failed");
            None
        }
        Err(_) => {
            tracing::warn!(grain = %ctx.id(), "on_activate panicked");
            None
        }
    }
}

/// One turn (rule 3); a panic resets the activation (rule 6).
async fn turn<G: Grain>(
    grain: Option<G>,
    envelope: Envelope<G>,
    key: &GrainKey,
    ctx: &mut GrainContext,
) -> Option<G> {
    let mut grain = grain?;
    let chain = envelope.chain;
    let write = match envelope.turn {
        Turn::Write(write) => write,
        Turn::Read(read) => {
            read_batch(&grain, (chain, read), ctx).await;
            return Some(grain);
        }
        // Already deactivating (rule 5).
        Turn::Deactivate => return Some(grain),
    };
    ctx.set_chain(chain);
    let outcome = InChain {
        chain,
        future: AssertUnwindSafe(write(&mut grain, ctx)).catch_unwind(),
    }
    .await;
    match outcome {
        Ok(()) => Some(grain),
        Err(_) => {
            tracing::warn!(grain = %ctx.id(), "a handler panicked; resetting the activation");
            drop(grain);
            // The old object's timers go with it; the new one registers its
            // own in `on_activate`.
            ctx.cancel_timers();
            activate::<G>(key, ctx).await
        }
    }
}

/// Rule 10: `first` and the reads queued right behind it run together on
/// a shared borrow of the grain. The first write in the queue stops the
/// batch and runs after it. A panicking read fails only its own call: it
/// could not change the grain.
async fn read_batch<G: Grain>(grain: &G, first: (u64, ReadTurn<G>), ctx: &mut GrainContext) {
    let mut reads = vec![first];
    if let Some(mut mailbox) = ctx.take_mailbox::<G>() {
        let open = exclusive(&mut mailbox);
        while reads.len() < MAX_READ_BATCH {
            match open.try_next() {
                Some(Envelope {
                    chain,
                    turn: Turn::Read(read),
                    ..
                }) => reads.push((chain, read)),
                Some(other) => {
                    open.put_back(other);
                    break;
                }
                None => break,
            }
        }
        ctx.put_mailbox(mailbox);
    }
    let ctx: &GrainContext = ctx;
    let running = reads.into_iter().map(|(chain, read)| InChain {
        chain,
        future: AssertUnwindSafe(read(grain, ctx)).catch_unwind(),
    });
    let panicked = futures_util::future::join_all(running)
        .await
        .iter()
        .filter(|outcome| outcome.is_err())
        .count();
    if panicked > 0 {
        tracing::warn!(grain = %ctx.id(), panicked, "read-only handlers panicked");
    }
}

/// A turn with `&mut` access to the grain.
type WriteTurn<G> =
    Box<dyn for<'a> FnOnce(&'a mut G, &'a mut GrainContext) -> BoxFuture<'a, ()> + Send>;

/// A read-only turn.
type ReadTurn<G> = Box<dyn for<'a> FnOnce(&'a G, &'a GrainContext) -> BoxFuture<'a, ()> + Send>;

/// A reference to a grain: cheap to clone, valid whether or not the grain
/// is active.
pub struct GrainRef<G> {
    silo: Silo,
    key: GrainKey,
    /// The grain type's directory, looked up once; `None` if `G` is not
    /// registered.
    registered: Option<Arc<GrainType<G>>>,
    /// The mailbox of the activation this reference delivered to last.
    last: mailbox::SenderCache<Envelope<G>>,
    _grain: PhantomData<fn() -> G>,
}

impl<G> Clone for GrainRef<G> {
    fn clone(&self) -> GrainRef<G> {
        GrainRef {
            silo: self.silo.clone(),
            key: self.key.clone(),
            registered: self.registered.clone(),
            last: self.last.clone(),
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
    /// still run).
    pub async fn call<M: Message>(&self, message: M) -> Result<M::Reply, CallError>
    where
        G: Handler<M>,
    {
        let (reply, answer) = oneshot::channel();
        let turn: Turn<G> = Turn::Write(Box::new(move |grain, ctx| {
            Box::pin(async move {
                let _ = reply.send(grain.handle(message, ctx).await);
            })
        }));
        self.ask(turn, answer).await
    }

    /// Delivers `turn`, which answers on `answer`, and waits for the
    /// answer: the shared body of [`GrainRef::call`] and [`GrainRef::read`].
    async fn ask<R>(&self, turn: Turn<G>, answer: oneshot::Receiver<R>) -> Result<R, CallError> {
        let grain_type = self.registered()?;
        let mut deadline = Deadline::after(self.silo.inner.config.call_timeout);
        let envelope = Envelope::<G> {
            chain: current_chain(),
            keeps_alive: true,
            turn,
        };
        self.deliver(grain_type, envelope, &mut deadline).await?;
        self.reply(grain_type, answer, &mut deadline).await
    }

    /// Waits for the answer to a delivered call, until `deadline`.
    async fn reply<R>(
        &self,
        grain_type: &GrainType<G>,
        mut answer: oneshot::Receiver<R>,
        deadline: &mut Deadline,
    ) -> Result<R, CallError> {
        // Fast path: give the activation a chance to run first, and take the
        // answer without arming a timer if it is already there.
        tokio::task::yield_now().await;
        let answer = match answer.try_recv() {
            Ok(reply) => return Ok(reply),
            Err(oneshot::error::TryRecvError::Closed) => {
                return Err(CallError::TurnFailed {
                    grain: self.id(grain_type),
                });
            }
            Err(oneshot::error::TryRecvError::Empty) => answer,
        };
        match tokio::time::timeout_at(deadline.get(), answer).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(CallError::TurnFailed {
                grain: self.id(grain_type),
            }),
            Err(_) => Err(CallError::Timeout {
                grain: self.id(grain_type),
                after: self.silo.inner.config.call_timeout,
            }),
        }
    }

    /// Sends a read-only `message` and waits for the reply, as
    /// [`GrainRef::call`] does. Reads queued together run interleaved on a
    /// shared borrow of the grain (rule 10); writes never overlap them.
    pub async fn read<M: Message>(&self, message: M) -> Result<M::Reply, CallError>
    where
        G: crate::grain::ReadHandler<M>,
    {
        let (reply, answer) = oneshot::channel();
        let turn: Turn<G> = Turn::Read(Box::new(move |grain, ctx| {
            Box::pin(async move {
                let _ = reply.send(grain.handle_read(message, ctx).await);
            })
        }));
        self.ask(turn, answer).await
    }

    /// Sends `message` without waiting for its handling: returns once the
    /// grain's mailbox has taken it (waiting at most the call timeout for
    /// room).
    pub async fn tell<M: Message>(&self, message: M) -> Result<(), CallError>
    where
        G: Handler<M>,
    {
        let grain_type = self.registered()?;
        let mut deadline = Deadline::after(self.silo.inner.config.call_timeout);
        let envelope = Envelope::<G> {
            chain: current_chain(),
            keeps_alive: true,
            turn: Turn::Write(Box::new(move |grain, ctx| {
                Box::pin(async move {
                    let _ = grain.handle(message, ctx).await;
                })
            })),
        };
        self.deliver(grain_type, envelope, &mut deadline).await
    }

    /// Deactivates the grain's activation, if it has one: it runs what its
    /// mailbox already holds, then `on_deactivate` (rule 5); the next
    /// message activates it again. Returns once the request is queued.
    pub async fn deactivate(&self) -> Result<(), CallError> {
        let grain_type = self.registered()?;
        let active = grain_type.directory.get(&self.key).is_some_and(|slots| {
            slots
                .iter()
                .any(|slot| matches!(slot, Some(Entry::Active(sender)) if !sender.is_closed()))
        });
        if !active {
            return Ok(());
        }
        let envelope = Envelope::<G> {
            chain: fresh_chain(),
            keeps_alive: false,
            turn: Turn::Deactivate,
        };
        let mut deadline = Deadline::after(self.silo.inner.config.call_timeout);
        self.deliver(grain_type, envelope, &mut deadline).await
    }

    /// Whether this silo holds an activation of the grain now (starting,
    /// running or deactivating). A grain type that is not registered has
    /// none.
    pub fn is_active(&self) -> bool {
        self.registered
            .as_ref()
            .is_some_and(|grain_type| grain_type.directory.contains_key(&self.key))
    }

    fn registered(&self) -> Result<&Arc<GrainType<G>>, CallError> {
        self.registered.as_ref().ok_or(CallError::NotRegistered {
            type_name: std::any::type_name::<G>(),
        })
    }

    fn id(&self, grain_type: &GrainType<G>) -> GrainId {
        GrainId {
            type_name: grain_type.name.clone(),
            key: self.key.clone(),
        }
    }

    /// Puts `envelope` in the grain's mailbox, activating it if needed; a
    /// mailbox closed by deactivation hands the envelope back, and it goes
    /// to the next activation (rule 5).
    async fn deliver(
        &self,
        grain_type: &Arc<GrainType<G>>,
        mut envelope: Envelope<G>,
        deadline: &mut Deadline,
    ) -> Result<(), CallError> {
        // Fast paths, for a single activation with room in its mailbox: the
        // mailbox this reference delivered to last, if still open (no
        // lookup); else the directory, where the send happens under the
        // shared lock so no sender is cloned. Neither reads a clock. A
        // full mailbox is waited on right away, without another lookup.
        let mut full = None;
        if grain_type.workers <= 1 && !self.silo.inner.shutting_down.load(Ordering::Acquire) {
            envelope = match self.last.try_send(envelope) {
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
                                self.last.set(sender);
                                return Ok(());
                            }
                            Err(TrySendError::Full(returned)) => {
                                self.last.set(sender);
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
                        self.last.set(&mailbox);
                    }
                    // Room in the mailbox: no timer needed.
                    envelope = match mailbox.try_send(envelope) {
                        Ok(()) => return Ok(()),
                        Err(TrySendError::Closed(returned)) => {
                            // The activation is deactivating or died: give
                            // it a moment, and respect the deadline.
                            if Instant::now() >= deadline.get() {
                                return Err(CallError::Timeout {
                                    grain: self.id(grain_type),
                                    after: self.silo.inner.config.call_timeout,
                                });
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
                Err(SendError::Closed(returned)) => envelope = returned,
                Err(SendError::Timeout) => {
                    return Err(CallError::Timeout {
                        grain: self.id(grain_type),
                        after: self.silo.inner.config.call_timeout,
                    });
                }
            }
        }
    }
}

impl GrainContext {
    /// Calls `target` from a turn of `this` grain and waits for the reply,
    /// lending `this` meanwhile: a message of the same call chain that
    /// reaches `this` grain while it waits (a call back from `target`, or
    /// from further down the chain) runs on it at once, so A → B → A
    /// completes instead of deadlocking (rule 7). Messages of other chains
    /// wait until the current turn ends, in arrival order.
    ///
    /// A plain `GrainRef::call` from a handler joins the chain too, but
    /// does not lend the grain: a call back into it then waits for the
    /// current turn, and times out.
    pub async fn call<G, T, M>(
        &mut self,
        this: &mut G,
        target: &GrainRef<T>,
        message: M,
    ) -> Result<M::Reply, CallError>
    where
        G: Grain,
        T: Handler<M>,
        M: Message,
    {
        let chain = self.chain();
        let grain_type = target.registered()?;
        let timeout = target.silo.inner.config.call_timeout;
        let deadline = deadline_after(timeout);
        let (reply, mut answer) = oneshot::channel();
        let envelope = Envelope::<T> {
            chain,
            keeps_alive: true,
            turn: Turn::Write(Box::new(move |grain, ctx| {
                Box::pin(async move {
                    let _ = reply.send(grain.handle(message, ctx).await);
                })
            })),
        };
        target
            .deliver(grain_type, envelope, &mut Deadline::at(deadline, timeout))
            .await?;
        enum Event<G, R> {
            Answer(Result<R, oneshot::error::RecvError>),
            Message(Option<Envelope<G>>),
            Timeout,
        }
        let capacity = self.silo().inner.config.mailbox_capacity;
        loop {
            // Outside an activation of `G` there is nothing to lend. The
            // guard puts the mailbox back even if this future is dropped
            // mid-wait (a caller's timeout).
            let mailbox = self.take_mailbox::<G>();
            let mut lent = LentMailbox {
                ctx: &mut *self,
                mailbox,
            };
            // Set-aside messages count against the mailbox's bound: past
            // it, the wait stops receiving, and senders wait (rule 4).
            let receiving = lent.mailbox.as_mut().map(exclusive).is_some_and(|mailbox| {
                (!mailbox.receiver.is_closed() || !mailbox.receiver.is_empty())
                    && mailbox.deferred.len() < capacity
            });
            // A message of this chain already taken from the mailbox into
            // the batch runs now, as it would had it stayed in the mailbox.
            let early = lent.mailbox.as_mut().map(exclusive).and_then(|mailbox| {
                let at = mailbox
                    .batch
                    .iter()
                    .position(|queued| queued.chain == chain)?;
                mailbox.batch.remove(at)
            });
            let event = if let Some(envelope) = early {
                Event::Message(Some(envelope))
            } else {
                tokio::select! {
                answer = &mut answer => Event::Answer(answer),
                next = async {
                    match lent.mailbox.as_mut() {
                        Some(mailbox) => exclusive(mailbox).receiver.recv().await,
                        None => std::future::pending().await,
                    }
                }, if receiving => Event::Message(next),
                _ = tokio::time::sleep_until(deadline) => Event::Timeout,
                }
            };
            // A message of another chain waits for the current turn.
            let event = match event {
                Event::Message(Some(envelope))
                    if envelope.chain != chain || matches!(envelope.turn, Turn::Deactivate) =>
                {
                    if let Some(mailbox) = lent.mailbox.as_mut() {
                        exclusive(mailbox).deferred.push_back(envelope);
                    }
                    Event::Message(None)
                }
                other => other,
            };
            drop(lent);
            match event {
                Event::Answer(Ok(reply)) => return Ok(reply),
                Event::Answer(Err(_)) => {
                    return Err(CallError::TurnFailed {
                        grain: target.id(grain_type),
                    });
                }
                Event::Timeout => {
                    return Err(CallError::Timeout {
                        grain: target.id(grain_type),
                        after: timeout,
                    });
                }
                // A reentrant turn on the lent grain.
                Event::Message(Some(envelope)) => {
                    match envelope.turn {
                        Turn::Write(write) => write(this, self).await,
                        // A panicking read fails only its own call (rule 10).
                        Turn::Read(read) => {
                            let _ = AssertUnwindSafe(read(this, self)).catch_unwind().await;
                        }
                        // Set aside above: it waits for the turn.
                        Turn::Deactivate => {}
                    }
                    self.set_chain(chain);
                }
                Event::Message(None) => {}
            }
        }
    }
}

/// A timer registered with [`GrainContext::register_timer`]; it stops when
/// cancelled or when its activation ends.
#[derive(Debug, Clone)]
pub struct Timer {
    cancel: tokio_util::sync::CancellationToken,
}

impl Timer {
    /// Stops the timer; a tick already in the mailbox still runs.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }
}

impl GrainContext {
    /// Registers a timer on this activation (rule 8): after `due`, and then
    /// every `period` if one is given, the grain receives `tick()` as a
    /// message of its own, handled in a turn like any other. The grain type
    /// `G` is the caller's own (`Self` in a handler).
    pub fn register_timer<G, M>(
        &mut self,
        due: Duration,
        period: Option<Duration>,
        tick: impl Fn() -> M + Send + 'static,
    ) -> Result<Timer, CallError>
    where
        G: Handler<M>,
        M: Message,
    {
        let Some(mut mailbox) = self.take_mailbox::<G>() else {
            return Err(CallError::NotRegistered {
                type_name: std::any::type_name::<G>(),
            });
        };
        let sender = exclusive(&mut mailbox).sender.clone();
        self.put_mailbox(mailbox);
        let cancel = self.timers().child_token();
        let timer = Timer {
            cancel: cancel.clone(),
        };
        tokio::spawn(async move {
            let mut wait = due;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                let message = tick();
                let envelope = Envelope::<G> {
                    chain: current_chain(),
                    keeps_alive: false,
                    turn: Turn::Write(Box::new(move |grain, ctx| {
                        Box::pin(async move {
                            let _ = grain.handle(message, ctx).await;
                        })
                    })),
                };
                // A closed mailbox: the activation is ending.
                let sent = tokio::select! {
                    _ = cancel.cancelled() => return,
                    sent = sender.send(envelope, deadline_after(Duration::MAX)) => sent,
                };
                match (sent, period) {
                    (Ok(()), Some(period)) => wait = period,
                    _ => return,
                }
            }
        });
        Ok(timer)
    }
}

impl GrainContext {
    /// Registers (or replaces) this grain's reminder `name`: it first fires
    /// after `due`, then every `period` (at least 1 ms), whether or not the
    /// grain is active, and across silo restarts. The grain's type must be
    /// registered with `SiloBuilder::remindable`.
    pub async fn register_reminder(
        &self,
        name: &str,
        due: Duration,
        period: Duration,
    ) -> Result<(), crate::reminders::ReminderError> {
        let reminders = self.silo().inner.reminders.clone();
        reminders.register(self.id(), name, due, period).await
    }

    /// Removes this grain's reminder `name`; returns whether it existed.
    pub async fn unregister_reminder(
        &self,
        name: &str,
    ) -> Result<bool, crate::reminders::ReminderError> {
        let reminders = self.silo().inner.reminders.clone();
        reminders.unregister(self.id(), name).await
    }
}
