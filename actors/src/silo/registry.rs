//! The per-type activation directory: each registered grain type's map
//! from key to activation slots, the choice of a slot for a message, and
//! the start of an activation. Rules 1, 2 and 9 of the silo's protocol
//! (`silo/mod.rs`), and rule 5's wait for a deactivating activation.

use std::any::TypeId;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use dashmap::DashMap;
use tokio::sync::watch;
use tokio::time::Instant;

use super::Silo;
use super::activation::run_activation;
use super::envelope::Envelope;
use crate::error::CallError;
use crate::grain::Grain;
use crate::key::{GrainId, GrainKey};
use crate::mailbox;

/// An activation's place in the silo's live count, taken before it is made
/// (rule 14) and given back when dropped: by the activation before it frees
/// its slot, or with its task however that ends.
pub(super) struct LiveActivation(Silo);

impl LiveActivation {
    /// The silo whose count it is.
    pub(super) fn silo(&self) -> &Silo {
        &self.0
    }
}

impl Drop for LiveActivation {
    fn drop(&mut self) {
        self.0.inner.live.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The call refused at the activation limit (rule 14), counted.
fn overloaded<G>(grain_type: &GrainType<G>, key: &GrainKey) -> CallError {
    grain_type
        .stats
        .failed(super::stats::FailureReason::Overloaded);
    CallError::Overloaded {
        grain: GrainId {
            type_name: grain_type.name.to_string(),
            key: key.clone(),
        },
    }
}

/// The open activation with the most room among `slots`, if any.
fn roomiest<G>(slots: &[Option<Entry<G>>]) -> Option<mailbox::Sender<Envelope<G>>> {
    slots
        .iter()
        .filter_map(|slot| match slot {
            Some(Entry::Active(sender)) if !sender.is_closed() => Some(sender),
            _ => None,
        })
        .max_by_key(|sender| sender.capacity())
        .cloned()
}

/// A directory entry (rule 1). A `Deactivating` entry's signal fires when
/// the activation is gone, or (`migration.rs` rule 3) when a departure did
/// not happen and its mailbox is open again: either way a waiting sender
/// looks at the entry afresh.
///
/// Boxed while deactivating (a moment in an activation's life), so that
/// an entry is one pointer and its tag, and a key's slots two words.
pub(super) enum Entry<G> {
    Active(mailbox::Sender<Envelope<G>>),
    Deactivating(Box<watch::Receiver<bool>>),
}

/// A key's slots in the directory, one per worker, seen as a slice: a
/// single slot (a type with one worker: every type but stateless workers
/// with more) is kept in place, so such a grain costs the directory no
/// allocation of its own. Two words, a slot's room: the directory's table
/// holds one per key, and more than one bucket per live key (hashbrown's
/// load factor: 1.3 buckets a key at 100k live keys, 2.1 at 1M), so each
/// word saved here saves one to two per activation.
pub(super) enum Slots<G> {
    One(Option<Entry<G>>),
    /// A stateless worker type's slots, behind one pointer so that they
    /// fit beside the single slot's tag.
    #[expect(
        clippy::box_collection,
        reason = "one pointer in place of a boxed slice's two words: the directory keeps one `Slots` per live key"
    )]
    Many(Box<Vec<Option<Entry<G>>>>),
}

impl<G> Slots<G> {
    /// `workers` empty slots (at least one), the first one holding `first`.
    pub(super) fn new(workers: usize, first: Entry<G>) -> Slots<G> {
        if workers <= 1 {
            return Slots::One(Some(first));
        }
        Slots::Many(Box::new(
            std::iter::once(Some(first))
                .chain((1..workers).map(|_| None))
                .collect(),
        ))
    }
}

impl<G> std::ops::Deref for Slots<G> {
    type Target = [Option<Entry<G>>];

    fn deref(&self) -> &Self::Target {
        match self {
            Slots::One(slot) => std::slice::from_ref(slot),
            Slots::Many(slots) => slots,
        }
    }
}

impl<G> std::ops::DerefMut for Slots<G> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            Slots::One(slot) => std::slice::from_mut(slot),
            Slots::Many(slots) => slots,
        }
    }
}

/// One registered grain type.
pub(super) struct GrainType<G> {
    pub(super) name: Arc<str>,
    /// Per key, one slot per worker: `workers` slots for a stateless
    /// worker type (rule 9), one otherwise. A key with every slot empty is
    /// removed.
    pub(super) directory: DashMap<GrainKey, Slots<G>>,
    /// Activations one key may have at once, at least 1.
    pub(super) workers: usize,
    /// Registered as a stateless worker: local to each silo, never routed
    /// (rules 9 and 12).
    pub(super) stateless: bool,
    /// On a routed silo, the cache of the last reference the router leased
    /// each home here to (rule 12): a new reference to the grain starts
    /// from it, so it too delivers on the lease's fast path rather than
    /// through the router. Removed when the activation ends (a lease
    /// granted in the same moment may leave an entry behind: harmless,
    /// since a reference delivers on it only while the lease holds and the
    /// mailbox is open).
    pub(super) leased: DashMap<GrainKey, Arc<super::reference::RefCache<G>>>,
    /// What operators' metrics read (`stats.rs`).
    pub(super) stats: super::stats::TypeStats,
    /// The type's migration hooks, once registered as migratable
    /// (`migration.rs` rule 1).
    pub(super) migration: std::sync::OnceLock<crate::migration::Hooks<G>>,
}

impl<G> GrainType<G> {
    /// A call to `key` that waited `after` in vain: counted (`stats.rs`
    /// rule 4) and returned as the caller's error.
    pub(super) fn timed_out(&self, key: &GrainKey, after: std::time::Duration) -> CallError {
        self.stats.failed(super::stats::FailureReason::Timeout);
        CallError::Timeout {
            grain: GrainId {
                type_name: self.name.to_string(),
                key: key.clone(),
            },
            after,
        }
    }

    /// The type's statistics now (`stats.rs` rules 1 and 5): its counters,
    /// and what its directory holds.
    pub(super) fn stats_now(&self) -> super::stats::GrainTypeStats {
        let mut live = 0u64;
        let mut queued = 0u64;
        for slots in self.directory.iter() {
            for slot in slots.iter() {
                if let Some(Entry::Active(sender)) = slot {
                    live += 1;
                    queued += sender.max_capacity().saturating_sub(sender.capacity()) as u64;
                }
            }
        }
        self.stats
            .snapshot(&self.name, self.stateless, live, queued)
    }
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
        (None, None, Some(gone)) => Choice::Wait(watch::Receiver::clone(gone)),
        // No slots at all (a worker count of 0 is refused at build).
        (None, None, None) => Choice::Activate(0),
    }
}

impl Silo {
    pub(super) fn grain_type<G: Grain>(&self) -> Result<Arc<GrainType<G>>, CallError> {
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
    pub(super) async fn mailbox<G: Grain>(
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
                            let Some(live) = self.reserve_activation() else {
                                // At the limit (rule 14): a stateless
                                // worker's busy activations still take
                                // the message; otherwise it is refused,
                                // and an entry left with no slot goes.
                                if let Some(sender) = roomiest(entry.get()) {
                                    return Ok(sender);
                                }
                                if entry.get().iter().all(Option::is_none) {
                                    entry.remove();
                                }
                                return Err(overloaded(grain_type, key));
                            };
                            let sender = self.activate_slot(grain_type, key, worker, live);
                            if let Some(slot) = entry.get_mut().get_mut(worker) {
                                *slot = Some(Entry::Active(sender.clone()));
                            }
                            return Ok(sender);
                        }
                    }
                }
                dashmap::Entry::Vacant(vacant) => {
                    let Some(live) = self.reserve_activation() else {
                        return Err(overloaded(grain_type, key));
                    };
                    let sender = self.activate_slot(grain_type, key, 0, live);
                    vacant.insert(Slots::new(
                        grain_type.workers,
                        Entry::Active(sender.clone()),
                    ));
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
                return Err(grain_type.timed_out(key, self.inner.config.call_timeout));
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

    /// Counts one more live activation, unless the silo holds its
    /// `activation_limit` already (rule 14).
    fn reserve_activation(&self) -> Option<LiveActivation> {
        let limit = self.inner.config.activation_limit.unwrap_or(u64::MAX);
        self.inner
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |live| {
                (live < limit).then_some(live + 1)
            })
            .ok()
            .map(|_| LiveActivation(self.clone()))
    }

    /// Starts activation `worker` of `key` (under the directory's lock for
    /// `key`, with its place in the live count) and returns its mailbox.
    fn activate_slot<G: Grain>(
        &self,
        grain_type: &Arc<GrainType<G>>,
        key: &GrainKey,
        worker: usize,
        live: LiveActivation,
    ) -> mailbox::Sender<Envelope<G>> {
        let (sender, mailbox) = self.new_mailbox();
        self.spawn_activation(
            grain_type.clone(),
            key.clone(),
            worker,
            (mailbox, sender.clone()),
            live,
            None,
        );
        sender
    }

    /// A new activation's mailbox, stamped busy until its grain is
    /// activated (`collector.rs` rule 2) before anyone can see it.
    fn new_mailbox<G: Grain>(
        &self,
    ) -> (mailbox::Sender<Envelope<G>>, mailbox::Receiver<Envelope<G>>) {
        let (sender, receiver) = mailbox::channel(
            self.inner.config.mailbox_capacity,
            self.inner.sweeper.clone(),
        );
        sender.set_activity(self.sweep_number() | super::collector::BUSY);
        (sender, receiver)
    }

    fn spawn_activation<G: Grain>(
        &self,
        grain_type: Arc<GrainType<G>>,
        key: GrainKey,
        worker: usize,
        (mailbox, sender): (mailbox::Receiver<Envelope<G>>, mailbox::Sender<Envelope<G>>),
        live: LiveActivation,
        seed: Option<super::activation::Seed>,
    ) {
        self.inner.activations.fetch_add(1, Ordering::Relaxed);
        grain_type.stats.activation_started();
        // Rule 13: read when the activation is made (under the directory's
        // lock, before any message is queued for it), not when its task
        // first runs: a give-up in between stops it.
        let given_up = self.homes_given_up();
        // `collector.rs` rule 1: swept from now.
        super::collector::ensure_running(self);
        // `live` (which holds the silo) goes with the task however it
        // ends: returning, panicking, or dropped unpolled with its runtime.
        self.inner
            .tasks
            .spawn(run_activation(Box::new(super::activation::Start {
                grain_type,
                key,
                worker,
                receiver: mailbox,
                sender,
                given_up,
                live,
                seed: seed.map(Box::new),
            })));
    }

    /// `G`'s registration and `key`'s identity, if `G` is registered as
    /// migratable (`migration.rs` rule 1).
    fn migratable<G: Grain>(
        &self,
        key: &GrainKey,
    ) -> Result<(Arc<GrainType<G>>, GrainId), crate::migration::MigrationError> {
        let grain_type = self
            .grain_type::<G>()
            .ok()
            .filter(|grain_type| grain_type.migration.get().is_some());
        let Some(grain_type) = grain_type else {
            return Err(crate::migration::MigrationError::NotMigratable {
                type_name: self.grain_type::<G>().map_or_else(
                    |_| std::any::type_name::<G>().to_string(),
                    |t| t.name.to_string(),
                ),
            });
        };
        let id = GrainId {
            type_name: grain_type.name.to_string(),
            key: key.clone(),
        };
        Ok((grain_type, id))
    }

    /// `migration.rs` rule 4: an activation of `key` made from `state`,
    /// once its hooks ran; refused if the key has an activation here, or
    /// at the activation limit (rule 14).
    pub(super) async fn arrive<G: Grain>(
        &self,
        key: GrainKey,
        state: crate::migration::Dehydrated,
    ) -> Result<crate::migration::Arrival, crate::migration::MigrationError> {
        use crate::migration::MigrationError;
        let (grain_type, id) = self.migratable::<G>(&key)?;
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(MigrationError::ShutDown);
        }
        let (ready, answer) = tokio::sync::oneshot::channel();
        match grain_type.directory.entry(key.clone()) {
            dashmap::Entry::Occupied(_) => return Err(MigrationError::Busy { grain: id }),
            dashmap::Entry::Vacant(vacant) => {
                let Some(live) = self.reserve_activation() else {
                    return Err(MigrationError::NoTarget {
                        grain: id,
                        reason: "the silo holds its activation limit".into(),
                    });
                };
                let (sender, mailbox) = self.new_mailbox();
                vacant.insert(Slots::new(
                    grain_type.workers,
                    Entry::Active(sender.clone()),
                ));
                self.spawn_activation(
                    grain_type.clone(),
                    key,
                    0,
                    (mailbox, sender),
                    live,
                    Some(super::activation::Seed { state, ready }),
                );
            }
        }
        match answer.await {
            Ok(Ok(confirm)) => Ok(crate::migration::Arrival::new(confirm)),
            Ok(Err(err)) => Err(err),
            // Ended without answering: the silo stopped, or gave its homes
            // up (rule 13), before the activation started.
            Err(_) if self.inner.shutting_down.load(Ordering::Acquire) => {
                Err(MigrationError::ShutDown)
            }
            Err(_) => Err(MigrationError::Hook {
                grain: id,
                reason: "the arriving activation ended before its hooks ran \
                         (the silo gave its homes up)"
                    .into(),
            }),
        }
    }

    /// `migration.rs` rule 2: asks `key`'s activation here to leave, and
    /// waits for its dehydrated state. Never activates the grain.
    pub(super) async fn depart<G: Grain>(
        &self,
        key: GrainKey,
    ) -> Result<crate::migration::Departure, crate::migration::MigrationError> {
        use crate::migration::MigrationError;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let id = self
            .between_turns::<G>(&key, super::envelope::Turn::Migrate(reply))
            .await?;
        match answer.await {
            Ok(Ok((state, verdict))) => Ok(crate::migration::Departure::new(state, verdict)),
            Ok(Err(err)) => Err(err),
            // Dropped unanswered: the activation ended first.
            Err(_) => Err(MigrationError::NotActive { grain: id }),
        }
    }

    /// `migration.rs` rule 6: pauses `key`'s activation here between two
    /// turns. Never activates the grain.
    pub(super) async fn pause<G: Grain>(
        &self,
        key: GrainKey,
    ) -> Result<crate::migration::Paused, crate::migration::MigrationError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let id = self
            .between_turns::<G>(&key, super::envelope::Turn::Pause(reply))
            .await?;
        match answer.await {
            Ok(answered) => answered,
            // Dropped unanswered: the activation ended first.
            Err(_) => Err(crate::migration::MigrationError::NotActive { grain: id }),
        }
    }

    /// Queues `turn` for `key`'s activation here, a migratable `G`'s, to
    /// be taken between two turns; the grain's id once queued.
    async fn between_turns<G: Grain>(
        &self,
        key: &GrainKey,
        turn: super::envelope::Turn<G>,
    ) -> Result<GrainId, crate::migration::MigrationError> {
        use crate::migration::MigrationError;
        let (grain_type, id) = self.migratable::<G>(key)?;
        let sender = grain_type
            .directory
            .get(key)
            .and_then(|slots| match slots.first() {
                Some(Some(Entry::Active(sender))) if !sender.is_closed() => Some(sender.clone()),
                _ => None,
            });
        let Some(sender) = sender else {
            return Err(MigrationError::NotActive { grain: id });
        };
        let envelope = Envelope {
            chain: super::fresh_chain(),
            keeps_alive: false,
            expires: None,
            turn,
        };
        let deadline = super::deadline_after(self.inner.config.call_timeout);
        match sender.send(envelope, deadline).await {
            Ok(()) => Ok(id),
            // Deactivating meanwhile (or leaving already).
            Err(crate::mailbox::SendError::Closed(_)) => {
                Err(MigrationError::NotActive { grain: id })
            }
            Err(crate::mailbox::SendError::Timeout) => Err(MigrationError::Busy { grain: id }),
        }
    }
}
