//! The silo: registered grain types, their activations, and grain
//! references.
//!
//! # Activation protocol
//!
//! 1. **Directory.** Each registered grain type has a directory from key to
//!    entry: `Active` (the activation's mailbox sender) or `Deactivating`
//!    (a signal that fires when the old activation is gone, or when a
//!    departure, rule 15, did not happen and the mailbox is open again).
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
//! 5. **Deactivation** (idle for `idle_timeout`, idle for one sweep period
//!    while the silo holds more than `max_activations`, both found by the
//!    silo's idle collector, `collector.rs`, whose stamps `Silo::idle_for`
//!    reads; `GrainRef::deactivate`; or silo shutdown): the
//!    activation marks its entry `Deactivating`, closes its mailbox, runs
//!    the messages already in it, runs `on_deactivate`, drops its
//!    activation-local values, removes the entry and fires the signal. A sender whose message is refused by the closed
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
//!    resets the activation. A lifecycle hook (`on_activate`,
//!    `on_deactivate`, `rehydrate`, `dehydrate`) runs in a fresh chain of
//!    its own, as a turn would (`activation.rs`, `hook_chain`).
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
//! 11. **Deadlines from other silos.** A message that arrives from another
//!     silo carries the time its sender still waits. A turn that has not
//!     started by then is not run: its envelope is dropped, which fails
//!     the call on this side, and the sender has already timed out on its
//!     own. A local sender's messages carry no deadline (a caller that
//!     gives up drops its wait; the message may still run).
//! 12. **Routing.** On a silo with a router (`route.rs`), every message
//!     sent through a `GrainRef` goes to the router, which delivers it on
//!     the typed path of rules 1 to 10 when the grain's home is this silo,
//!     or sends it by name to the home elsewhere. Stateless workers (rule
//!     9) are never routed.
//! 13. **Giving every home up.** A router that learns this silo may have
//!     been taken for dead (`HomeSide::give_up_homes`) makes every
//!     activation of a routed type that exists then (the count of
//!     give-ups is read when an activation is made) stop: after the turn
//!     it is in, it runs nothing more, drops every message still queued
//!     or taken but not started (a call's caller gets
//!     `CallError::Unavailable`; an admitted tell is lost; every dropped
//!     message is counted in `Silo::dropped_with_homes`), runs
//!     `on_deactivate` and ends. A state write there is refused by its
//!     ETag if the grain's next activation has written since; if it has
//!     not, the write lands, and the next activation's own write is the
//!     one refused (a `Conflict`), until it reads the state again. Unlike rule 5, nothing queued runs:
//!     another silo may already be the grain's home. Nor does a message
//!     whose delivery began before the give-up start a new activation: a
//!     sender that waited for room, or was handed its message back by the
//!     closing mailbox, gets `CallError::Unavailable` (`GrainRef::deliver`;
//!     one whose delivery began after it was routed here since, and may
//!     start the next activation). A
//!     caller whose
//!     message was delivered before a give-up and whose answer never came
//!     gets `Unavailable` rather than `TurnFailed` (the turn that was
//!     running then may have failed instead: the caller cannot tell).
//! 14. **A hard limit on activations.** With `SiloConfig::activation_limit`
//!     set, a live activation is counted (reserved) before it is made,
//!     under the directory's lock for its key, and only while fewer than
//!     the limit are live; otherwise the call that would have made it
//!     fails with `CallError::Overloaded`, its message unhandled, and no
//!     entry is left behind. The count falls when an activation's task
//!     ends, so the silo never holds more than the limit, however many
//!     distinct grains are called at once. Messages to grains already
//!     active are not affected, nor those to a stateless worker key with a
//!     busy activation: they queue on its roomiest worker instead of
//!     starting another. (`max_activations`, rule 5, sheds idle
//!     activations below the limit; this rule bounds them.)
//! 15. **Migration.** An activation of a migratable type leaves for
//!     another silo only between turns, as rule 5 deactivates (its entry
//!     marked deactivating, its mailbox closed, what was queued run), but
//!     it dehydrates instead of running `on_deactivate`, and goes on with
//!     the same object if the move does not happen; an arrival is made
//!     from the dehydrated state and runs nothing until its router
//!     confirms it. The rules are `migration.rs`'s.
//!
//! Submodules: `envelope` (turns, envelopes, call chains, deadlines),
//! `registry` (the per-type directory: rules 1, 2, 9 and 14), `activation`
//! (the activation task, its turns and mailbox: rules 3, 5 to 8, 10 and 15),
//! `reference` (`GrainRef`: delivery, rules 4 and 5), `context`
//! (`GrainContext::call`, timers, reminders) and `builder` (`SiloBuilder`,
//! `SiloConfig`).

mod activation;
mod builder;
mod collector;
mod context;
mod envelope;
mod reference;
mod registry;
pub(crate) mod stats;

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};

use tokio_util::task::TaskTracker;

pub(crate) use activation::HeldMailbox;
pub use builder::{
    MAX_GRAIN_TYPE_NAME, Registration, SiloBuilder, SiloConfig, grain_type_name_error,
};
pub use context::Timer;
pub(crate) use envelope::{
    current_chain, deadline_after, fresh_chain, random_start as random_u64, running_chain,
};
pub use reference::GrainRef;
pub use stats::{FailureReason, GrainTypeStats, TURN_SECONDS_BOUNDS};

use crate::grain::{Grain, Service, service_key};
use crate::key::{GrainId, GrainKey};
use crate::mailbox;
use crate::storage::StorageProvider;

pub(crate) struct SiloInner {
    types: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
    services: HashMap<TypeId, Service>,
    storage: Arc<crate::storage::CountedStorage>,
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
    /// Per grain type, its statistics now (`stats.rs`).
    type_stats: Vec<Box<dyn Fn() -> stats::GrainTypeStats + Send + Sync>>,
    /// Grain types and messages by name.
    registry: crate::dispatch::Registry,
    activations: AtomicU64,
    live: AtomicU64,
    /// Times out senders waiting on full mailboxes.
    sweeper: Arc<mailbox::Sweeper>,
    pub(crate) reminders: Arc<crate::reminders::Reminders>,
    /// Where grain references' messages go, once a cluster installs it
    /// (rule 12; `route.rs`).
    router: arc_swap::ArcSwapOption<crate::route::Installed>,
    /// Whether `router` holds one: read on every message, so a lone silo
    /// pays one load for the seam.
    routed: AtomicBool,
    /// Told of every activation that ends (a cluster node's), with the
    /// number of the guard that set it.
    ended: std::sync::Mutex<Option<(u64, EndedListener)>>,
    /// Numbers the listeners set.
    listeners_set: AtomicU64,
    /// Endpoints of this silo's subscribers (`observers/endpoint.rs`).
    observers: crate::observers::Endpoints,
    /// Times the router gave every home up (rule 13): an activation that
    /// sees it move stops and drops what is queued.
    homes_given_up: AtomicU64,
    /// Messages dropped unrun with a home given up (rule 13).
    dropped_with_homes: AtomicU64,
    /// Services a layer above provided after the silo was built
    /// ([`Silo::provide`]), looked up after `services`.
    provided: std::sync::RwLock<HashMap<TypeId, Service>>,
    /// Per grain type, what the idle collector sweeps (`collector.rs`).
    collected: Vec<Arc<dyn collector::Collect>>,
    /// The idle collector's sweep number (`collector.rs` rule 1).
    sweep: AtomicU64,
    /// Whether the idle collector's thread runs (`collector.rs` rule 1).
    collecting: AtomicBool,
    /// Shedding collects not yet taken (`collector.rs` rule 4).
    shedding: Arc<AtomicU64>,
    /// Activations between leaving their loop and gone (`collector.rs`
    /// rule 4).
    ending: AtomicU64,
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
#[non_exhaustive]
pub enum ActivationEnd {
    /// It deactivated (idle, on request, under memory pressure, or at
    /// shutdown) after `on_deactivate`.
    Deactivated,
    /// Its `on_activate` failed (or the silo had stopped): it handled
    /// nothing, and the messages that waited for it failed. An arrival
    /// from another silo whose hooks failed or whose switch did not happen
    /// ends so too (`migration.rs` rule 4).
    ActivationFailed,
    /// It left for another silo with its state (`migration.rs` rule 3),
    /// without `on_deactivate`.
    Migrated,
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

impl Silo {
    pub(crate) fn from_inner(inner: Arc<SiloInner>) -> Silo {
        Silo { inner }
    }

    pub(crate) fn downgrade(&self) -> std::sync::Weak<SiloInner> {
        Arc::downgrade(&self.inner)
    }

    /// Times every home here was given up (rule 13).
    pub(crate) fn homes_given_up(&self) -> u64 {
        self.inner.homes_given_up.load(Ordering::Relaxed)
    }

    /// Messages that were dropped unrun, still queued in an activation,
    /// when its router gave every home on this silo up (rule 13): their
    /// callers were told (`CallError::Unavailable`); tells among them were
    /// lost, and are counted here.
    pub fn dropped_with_homes(&self) -> u64 {
        self.inner.dropped_with_homes.load(Ordering::Relaxed)
    }

    /// Rule 13: every activation of a routed type stops after the turn it
    /// is in, and drops its queued messages. Wakes idle ones.
    pub(crate) fn give_up_homes(&self) {
        self.inner.homes_given_up.fetch_add(1, Ordering::AcqRel);
        for wake in &self.inner.wake_activations {
            wake();
        }
    }

    pub(crate) fn endpoints(&self) -> &crate::observers::Endpoints {
        &self.inner.observers
    }

    /// A builder.
    pub fn builder() -> SiloBuilder {
        SiloBuilder::new()
    }

    /// How long a call waits for its answer (`SiloConfig::call_timeout`).
    pub fn call_timeout(&self) -> std::time::Duration {
        self.inner.config.call_timeout
    }

    /// Whether grain type `name` is registered as a stateless worker: local
    /// to each silo, never routed (rules 9 and 12).
    pub fn is_stateless_named(&self, name: &str) -> bool {
        self.inner.registry.stateless.contains(name)
    }

    /// Whether a router is installed now (rule 12); the lone silo's check.
    pub(crate) fn is_routed_now(&self) -> bool {
        self.inner.routed.load(Ordering::Acquire)
    }

    /// The router, if one is installed (rule 12).
    pub(crate) fn router(&self) -> Option<Arc<dyn crate::route::Router>> {
        self.inner
            .router
            .load()
            .as_ref()
            .map(|installed| installed.router.clone())
    }

    /// Installs `router` (rule 12), unless one is installed already.
    pub(crate) fn set_router(&self, router: &Arc<crate::route::Installed>) -> bool {
        let previous = self
            .inner
            .router
            .compare_and_swap(&None::<Arc<crate::route::Installed>>, Some(router.clone()));
        let installed = previous.is_none();
        if installed {
            self.inner.routed.store(true, Ordering::Release);
        }
        installed
    }

    /// Removes `router` if it is the one installed (rule 12).
    pub(crate) fn clear_router(&self, router: &Arc<crate::route::Installed>) {
        let current = self.inner.router.load_full();
        if current
            .as_ref()
            .is_some_and(|installed| Arc::ptr_eq(installed, router))
        {
            let previous = self.inner.router.compare_and_swap(&current, None);
            if previous
                .as_ref()
                .is_some_and(|installed| Arc::ptr_eq(installed, router))
            {
                self.inner.routed.store(false, Ordering::SeqCst);
                // A router installed between the swap and the flag's store
                // keeps the flag set.
                if self.inner.router.load().is_some() {
                    self.inner.routed.store(true, Ordering::SeqCst);
                }
            }
        }
    }

    pub(crate) fn registry(&self) -> &crate::dispatch::Registry {
        &self.inner.registry
    }

    /// The names of the grain types this silo hosts and routes: every
    /// registered type but stateless workers (rule 12), sorted.
    pub fn routed_grain_types(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .registry
            .type_names
            .values()
            .filter(|name| !self.inner.registry.stateless.contains(*name))
            .cloned()
            .collect();
        names.sort();
        names
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

    /// Each registered grain type's statistics now, in registration order:
    /// messages run, failures by reason, activations started, ended and
    /// alive, messages queued, and sampled turn times (`stats.rs`).
    pub fn grain_type_stats(&self) -> Vec<GrainTypeStats> {
        self.inner.type_stats.iter().map(|stats| stats()).collect()
    }

    /// The silo's reminders, counted: owned now, due, fired and failed.
    pub fn reminder_stats(&self) -> crate::reminders::ReminderStats {
        self.inner.reminders.stats()
    }

    /// The silo's storage operations, counted: done, conflicts (stale
    /// ETags) and failures, and latency, per operation.
    pub fn storage_stats(&self) -> crate::storage::StorageStats {
        self.inner.storage.stats()
    }

    /// Whether the silo's storage answers: one read of a reserved grain
    /// (`$health`/0, never written), as a readiness probe uses it.
    pub async fn storage_reachable(&self) -> Result<(), crate::storage::StorageError> {
        let probe = GrainId {
            type_name: "$health".to_string(),
            key: GrainKey::U64(0),
        };
        self.inner
            .storage
            .uncounted()
            .read(&probe)
            .await
            .map(|_| ())
    }

    /// Activations alive now.
    pub fn live_activations(&self) -> u64 {
        self.inner.live.load(Ordering::Relaxed)
    }

    /// Senders waiting now for room in a full mailbox of this silo's
    /// activations (their `SiloConfig::mailbox_capacity` reached): calls,
    /// tells and reads, and timer ticks. The silo's backpressure. Each
    /// leaves the count as its message is queued, as it times out or is
    /// dropped, or as the activation closes.
    pub fn senders_waiting(&self) -> u64 {
        self.inner.sweeper.waiting() as u64
    }

    /// Whether the silo holds its `activation_limit` of activations now,
    /// so that a new one would be refused (rule 14). A router asks before
    /// making this silo a grain's home, to place the grain elsewhere.
    pub fn at_activation_limit(&self) -> bool {
        self.inner
            .config
            .activation_limit
            .is_some_and(|limit| self.live_activations() >= limit)
    }

    /// Calls `listener` each time an activation ends, after its entry is
    /// gone (a message sent from inside the listener starts a new one)
    /// and what it kept (`GrainContext::activation_local`) is dropped.
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

    /// The reminder service (`reminders.rs`, where the silo's reminder
    /// methods are).
    pub(crate) fn reminder_service(&self) -> &Arc<crate::reminders::Reminders> {
        &self.inner.reminders
    }

    pub(crate) fn storage(&self) -> Arc<dyn StorageProvider> {
        self.inner.storage.clone()
    }

    /// The service of type `S` registered with [`SiloBuilder::service`]
    /// (the GPU bridge, for example) or provided later with
    /// [`Silo::provide`], if there is one: what grains reach with
    /// `GrainContext::service::<S>()`.
    pub fn service<S: Send + Sync + 'static>(&self) -> Option<Arc<S>> {
        let key = service_key::<S>();
        let service = match self.inner.services.get(&key) {
            Some(service) => service.clone(),
            None => self
                .inner
                .provided
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&key)?
                .clone(),
        };
        service.downcast::<S>().ok()
    }

    /// Makes `service` reachable from grains with
    /// `GrainContext::service::<S>()` after the silo was built: how a layer
    /// above the silo (a cluster node's device quotas) hands grains what
    /// only it knows. A service of the same type registered with
    /// [`SiloBuilder::service`] comes first; one provided earlier is
    /// replaced. Activations that looked the service up before keep what
    /// they found.
    pub fn provide<S: Send + Sync + 'static>(&self, service: Arc<S>) {
        self.inner
            .provided
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(service_key::<S>(), service);
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
}
