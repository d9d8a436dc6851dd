//! Migration: an activation leaves one silo with its in-memory state and
//! carries on as an activation on another, without running
//! `on_deactivate` or losing a call. Orleans' `IGrainMigrationParticipant`
//! is the model. This module is the actors side; where a grain goes, and
//! the directory's switch, are the router's (`route.rs`, and the cluster's
//! `node/migration.rs`).
//!
//! # Rules
//!
//! 1. **Who moves.** A grain type moves only if it implements
//!    [`Migratable`] and is registered as such
//!    (`SiloBuilder::migratable`, or `migratable` in `#[derive(GrainType)]`).
//!    Its `dehydrate` writes what the next activation needs into a
//!    [`Dehydrated`] (in-memory state by name; a GPU grain exports its
//!    resident buffers' bytes there); its `rehydrate` takes it back on a
//!    new object, before `on_activate` (as Orleans orders them), so that
//!    `on_activate` can skip what arrived. Persisted state travels with
//!    its ETag through [`Dehydrated::put_state`], which writes it first:
//!    the next activation carries on from what storage holds without
//!    reading it again.
//! 2. **Departure, between turns.** [`HomeSide::depart`] queues a request
//!    in the activation's mailbox; the activation takes it between two
//!    turns, never in the middle of one. It marks its directory entry
//!    deactivating and closes its mailbox (new messages wait, as in rule 5
//!    of `silo/mod.rs`), runs what was already queued, then dehydrates and
//!    hands the state out in a [`Departure`]. It then waits, running
//!    nothing, for the verdict.
//! 3. **Verdict.** [`Departure::commit`]: the activation drops its grain
//!    (freeing what it held, device memory included) without
//!    `on_deactivate`, its timers end, and it ends as
//!    [`ActivationEnd::Migrated`](crate::ActivationEnd::Migrated);
//!    `commit` returns once the grain is dropped. [`Departure::abort`]
//!    (or dropping the departure, or the silo shutting down): the
//!    activation reopens its mailbox and goes on with the same object (and
//!    its timers: a tick that fell in the departure waits for it), and the
//!    messages that waited are delivered to it, each sender's in the order
//!    it sent them. A dehydrate that fails or panics is an abort before
//!    anything left. A deactivation asked during the departure, or a
//!    give-up of every home (rule 13 of `silo/mod.rs`), ends an aborted
//!    activation as those rules say instead.
//!
//!    The actors side only holds calls while the verdict is pending. Once
//!    a departure commits, the entry is gone, and a local sender that was
//!    waiting would start a new activation here: a router that moves
//!    grains keeps calls from reaching the grain here from the departure
//!    on, and sends them where it lives (the cluster's node does:
//!    `node/migration.rs` rule 2).
//! 4. **Arrival.** [`HomeSide::arrive`] makes an activation from a
//!    dehydrated state: `Grain::new`, `rehydrate`, then `on_activate`. It is
//!    refused if the grain is active here already, or at the silo's
//!    activation limit; a hook that fails ends the new activation without
//!    `on_deactivate`. Until [`Arrival::confirm`] the new activation runs
//!    nothing; an arrival dropped unconfirmed ends it without
//!    `on_deactivate` (the switch failed and the grain stays where it was).
//! 5. **From a turn.** [`GrainContext::migrate`](crate::GrainContext::migrate)
//!    asks the router to move the grain once the running turn has ended;
//!    the turn goes on, and the move happens after it (rule 2).
//! 6. **Pause, between turns.** [`HomeSide::pause`] queues a request in
//!    the activation's mailbox, as a departure does; the activation takes
//!    it between two turns and answers with a [`Paused`], then runs
//!    nothing (no message, no timer tick) until that is dropped or the
//!    silo shuts down. Messages that arrive meanwhile wait in its mailbox,
//!    each sender's in order, and run after it (the mailbox stays open:
//!    timer ticks queue up like messages, and senders wait once it is
//!    full). A pause is not activity: the grain is as idle after it as
//!    before. The grain object and its entry stay as they are: this is
//!    for a router that moves what the grain holds outside its object,
//!    its resident buffers between the devices of one node (the
//!    cluster's `node/migration.rs` rule 7), and that drops the pause
//!    within a bounded time. A pause is refused with `NotActive` if the
//!    activation is deactivating or gone, and with `Busy` if it is leaving
//!    for another silo or its mailbox stays full for a call timeout.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::grain::{Grain, GrainContext};
use crate::key::GrainId;
use crate::storage::PersistentState;

/// A grain type whose activations can move to another silo with their
/// in-memory state (rule 1).
///
/// ```
/// use granary_actors::migration::{Dehydrated, HookError, Migratable};
/// use granary_actors::{Grain, GrainContext, GrainKey};
///
/// struct Session {
///     seen: Vec<String>,
/// }
/// impl Grain for Session {
///     fn new(_: &GrainKey) -> Session {
///         Session { seen: Vec::new() }
///     }
/// }
/// impl Migratable for Session {
///     async fn dehydrate(
///         &mut self,
///         _: &mut GrainContext,
///         into: &mut Dehydrated,
///     ) -> Result<(), HookError> {
///         into.put("seen", &self.seen)
///     }
///     async fn rehydrate(&mut self, _: &mut GrainContext, from: Dehydrated) -> Result<(), HookError> {
///         self.seen = from.get("seen")?;
///         Ok(())
///     }
/// }
/// ```
pub trait Migratable: Grain {
    /// On the silo it leaves, after its last turn there: writes what the
    /// next activation needs into `into`. An error keeps the grain where
    /// it is, running (rule 3).
    fn dehydrate(
        &mut self,
        ctx: &mut GrainContext,
        into: &mut Dehydrated,
    ) -> impl Future<Output = Result<(), HookError>> + Send;

    /// On the silo it reaches, on a new object before `on_activate`:
    /// takes the state back from `from` (`on_activate` then sees what
    /// arrived, and need not load it). An error ends the new activation,
    /// and the grain stays where it was (rule 4).
    fn rehydrate(
        &mut self,
        ctx: &mut GrainContext,
        from: Dehydrated,
    ) -> impl Future<Output = Result<(), HookError>> + Send;
}

/// Why a migration hook failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookError(pub String);

impl fmt::Display for HookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HookError {}

impl From<String> for HookError {
    fn from(reason: String) -> HookError {
        HookError(reason)
    }
}

impl From<&str> for HookError {
    fn from(reason: &str) -> HookError {
        HookError(reason.to_string())
    }
}

impl From<crate::StorageError> for HookError {
    fn from(err: crate::StorageError) -> HookError {
        HookError(err.to_string())
    }
}

/// A grain's in-memory state on its way to its next activation: named
/// parts, each a value in the wire form or raw bytes (rule 1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dehydrated {
    parts: BTreeMap<String, serde_bytes::ByteBuf>,
}

impl Dehydrated {
    /// An empty state.
    pub fn new() -> Dehydrated {
        Dehydrated::default()
    }

    /// Keeps `value` as part `name`, replacing one of that name.
    pub fn put<T: Serialize>(&mut self, name: &str, value: &T) -> Result<(), HookError> {
        let bytes = crate::dispatch::encode(value).map_err(|err| HookError(err.to_string()))?;
        self.parts
            .insert(name.to_string(), serde_bytes::ByteBuf::from(bytes));
        Ok(())
    }

    /// Part `name`, put with [`Dehydrated::put`]; an error if there is
    /// none or it is not a `T`.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<T, HookError> {
        crate::dispatch::decode(self.bytes(name)?).map_err(|err| HookError(err.to_string()))
    }

    /// Keeps `bytes` as part `name` (a resident buffer's contents, say).
    pub fn put_bytes(&mut self, name: &str, bytes: Vec<u8>) {
        self.parts
            .insert(name.to_string(), serde_bytes::ByteBuf::from(bytes));
    }

    /// Part `name`'s bytes; an error if there is none.
    pub fn bytes(&self, name: &str) -> Result<&[u8], HookError> {
        self.parts
            .get(name)
            .map(|part| part.as_slice())
            .ok_or_else(|| HookError(format!("the dehydrated state has no part {name:?}")))
    }

    /// Takes part `name`'s bytes out, leaving none; an error if there is
    /// none.
    pub fn take_bytes(&mut self, name: &str) -> Result<Vec<u8>, HookError> {
        self.parts
            .remove(name)
            .map(serde_bytes::ByteBuf::into_vec)
            .ok_or_else(|| HookError(format!("the dehydrated state has no part {name:?}")))
    }

    /// Writes `state` (with its ETag, as [`PersistentState::write`] does)
    /// and keeps it as part `name`, value and ETag: the next activation
    /// takes it back with [`Dehydrated::get_state`] and writes on from
    /// that ETag without reading storage (rule 1).
    pub async fn put_state<T: Serialize + DeserializeOwned + Default>(
        &mut self,
        name: &str,
        state: &mut PersistentState<T>,
    ) -> Result<(), HookError> {
        state.write().await?;
        self.put(name, &(state.etag(), state.get()))
    }

    /// The persisted state kept as part `name` by
    /// [`Dehydrated::put_state`], bound to this grain and its silo's
    /// storage, at the ETag it was written with.
    pub fn get_state<T: Serialize + DeserializeOwned + Default>(
        &self,
        name: &str,
        ctx: &GrainContext,
    ) -> Result<PersistentState<T>, HookError> {
        let (etag, value): (Option<crate::ETag>, T) = self.get(name)?;
        Ok(PersistentState::resumed(
            value,
            etag,
            ctx.new_id(),
            ctx.silo().storage(),
        ))
    }

    /// The parts' names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.parts.keys().map(String::as_str)
    }

    /// Each part's name and bytes, in name order: what a router sends,
    /// part by part, without encoding the whole state again.
    pub fn parts(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.parts
            .iter()
            .map(|(name, bytes)| (name.as_str(), bytes.as_slice()))
    }

    /// A state made of `parts` (as [`Dehydrated::parts`] gave them), taking
    /// the bytes without copying them; a later part replaces an earlier
    /// one of the same name.
    pub fn from_parts(parts: impl IntoIterator<Item = (String, Vec<u8>)>) -> Dehydrated {
        Dehydrated {
            parts: parts
                .into_iter()
                .map(|(name, bytes)| (name, serde_bytes::ByteBuf::from(bytes)))
                .collect(),
        }
    }

    /// The bytes of every part, together.
    pub fn len_bytes(&self) -> u64 {
        self.parts.values().map(|part| part.len() as u64).sum()
    }
}

/// Where a grain should go.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MigrationTarget {
    /// Wherever the router's placement picks, other than where it is; in
    /// a cluster, for a grain that declares device memory, its picks with
    /// room for the grain first, then the hosts it passed over that have
    /// room, then its picks without (`cluster/src/node/migration.rs` rule
    /// 1).
    Any,
    /// The silo of this name (a cluster silo's address, as
    /// `Router::place` gives it).
    Silo(String),
    /// Device `device` (its index among the bridge's devices, as
    /// `GpuBridge::devices` lists them) of the silo named, or of the silo
    /// the grain is on when `silo` is `None`. On the silo it is on, the
    /// activation stays and its resident buffers move between the node's
    /// devices (the cluster's `node/migration.rs` rule 7); on another, it
    /// moves there and its buffers are made on that device.
    Device {
        /// The silo, or `None` for the one the grain is on.
        silo: Option<String>,
        /// The device's index.
        device: u32,
    },
}

impl fmt::Display for MigrationTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationTarget::Any => f.write_str("any silo"),
            MigrationTarget::Silo(silo) => write!(f, "silo {silo}"),
            MigrationTarget::Device {
                silo: Some(silo),
                device,
            } => write!(f, "device {device} of silo {silo}"),
            MigrationTarget::Device { silo: None, device } => {
                write!(f, "device {device} of the silo it is on")
            }
        }
    }
}

/// A migration done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migrated {
    /// The silo it left.
    pub from: String,
    /// The silo it lives on now (the same silo after a move between its
    /// devices).
    pub to: String,
    /// The bytes of its dehydrated state, or of the resident buffers that
    /// moved between the devices of its silo.
    pub bytes: u64,
    /// From the request at the grain's home to the home letting go.
    pub took: Duration,
}

/// Why a migration did not happen. In every case but
/// [`MigrationError::Unknown`] and [`MigrationError::Discarded`] the grain
/// is where it was, running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MigrationError {
    /// The grain type is not registered as migratable (rule 1).
    NotMigratable {
        /// The grain type.
        type_name: String,
    },
    /// The grain has no activation to move.
    NotActive {
        /// The grain.
        grain: GrainId,
    },
    /// No silo could take it: none other hosts the type, the one named
    /// is not a member or does not host it, or it has no room (device
    /// memory or activations); or the device named is not there, has no
    /// room, or the grain holds no device memory to move to it.
    NoTarget {
        /// The grain.
        grain: GrainId,
        /// Why.
        reason: String,
    },
    /// The grain is already on the silo (or device) named.
    AlreadyThere {
        /// The grain.
        grain: GrainId,
    },
    /// The grain is moving already, has an activation on the target
    /// already, or calls to it did not settle in time.
    Busy {
        /// The grain.
        grain: GrainId,
    },
    /// The grain's `dehydrate` or the new activation's `on_activate` or
    /// `rehydrate` failed.
    Hook {
        /// The grain.
        grain: GrainId,
        /// Which hook, and its error.
        reason: String,
    },
    /// The grain's directory entry changed during the move (the grain was
    /// placed elsewhere meanwhile): nothing moved.
    Conflict {
        /// The grain.
        grain: GrainId,
    },
    /// The silo cannot move grains: it has no router that does, or its
    /// directory cannot switch an entry.
    Unsupported {
        /// Why.
        reason: String,
    },
    /// The target or the directory could not be reached, and the move
    /// was abandoned before the switch.
    Unavailable {
        /// The grain.
        grain: GrainId,
        /// What went wrong.
        reason: String,
    },
    /// Whether the switch happened could not be learnt. The old
    /// activation ended without `on_deactivate` (its state as written in
    /// `dehydrate`) and its entry was removed if it still named it, so the
    /// grain has at most one activation: the new one, or none until its
    /// next call.
    Unknown {
        /// The grain.
        grain: GrainId,
        /// What went wrong.
        reason: String,
    },
    /// The silo is shutting down.
    ShutDown,
    /// The directory's entry names the target, but the target could not
    /// take the grain in: it stopped or was fenced, or the entry's owner
    /// did not take its registration in time, or named another. The old
    /// activation ended without `on_deactivate` and the new one was
    /// discarded, so the grain has no activation at the source or the
    /// target: its next call starts it from its persisted state (what
    /// `dehydrate` carried, resident buffers included, is lost), unless
    /// the entry named an activation elsewhere.
    Discarded {
        /// The grain.
        grain: GrainId,
        /// Why the target discarded it.
        reason: String,
    },
}

impl fmt::Display for MigrationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationError::NotMigratable { type_name } => {
                write!(f, "grain type {type_name} is not registered as migratable")
            }
            MigrationError::NotActive { grain } => write!(f, "{grain} has no activation to move"),
            MigrationError::NoTarget { grain, reason } => {
                write!(f, "no silo can take {grain}: {reason}")
            }
            MigrationError::AlreadyThere { grain } => {
                write!(f, "{grain} is on that silo already")
            }
            MigrationError::Busy { grain } => {
                write!(f, "{grain} is moving already, or its calls did not settle")
            }
            MigrationError::Hook { grain, reason } => {
                write!(f, "migrating {grain}: {reason}")
            }
            MigrationError::Conflict { grain } => {
                write!(f, "the directory entry of {grain} changed during its move")
            }
            MigrationError::Unsupported { reason } => write!(f, "no migration: {reason}"),
            MigrationError::Unavailable { grain, reason } => {
                write!(f, "migrating {grain}: {reason}; it stays where it was")
            }
            MigrationError::Unknown { grain, reason } => write!(
                f,
                "migrating {grain}: {reason}; whether it moved is unknown, and its old \
                 activation ended"
            ),
            MigrationError::ShutDown => write!(f, "the silo is shutting down"),
            MigrationError::Discarded { grain, reason } => write!(
                f,
                "{grain} moved but its target discarded it ({reason}); it has no activation \
                 until its next call"
            ),
        }
    }
}

impl std::error::Error for MigrationError {}

/// A grain type's hooks, type-erased for its registry entry (rule 1).
pub(crate) struct Hooks<G> {
    pub(crate) dehydrate: for<'a> fn(
        &'a mut G,
        &'a mut GrainContext,
        &'a mut Dehydrated,
    ) -> BoxFuture<'a, Result<(), HookError>>,
    pub(crate) rehydrate: for<'a> fn(
        &'a mut G,
        &'a mut GrainContext,
        Dehydrated,
    ) -> BoxFuture<'a, Result<(), HookError>>,
}

impl<G: Migratable> Hooks<G> {
    pub(crate) fn of() -> Hooks<G> {
        Hooks {
            dehydrate: |grain, ctx, into| Box::pin(grain.dehydrate(ctx, into)),
            rehydrate: |grain, ctx, from| Box::pin(grain.rehydrate(ctx, from)),
        }
    }
}

/// What the activation's departure asks for (rule 3).
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Drop the grain and end; answer once it is dropped.
    Commit(oneshot::Sender<()>),
    /// Reopen and go on.
    Abort,
}

/// What a departing activation hands out (rule 2).
pub(crate) type Departing = Result<(Dehydrated, oneshot::Sender<Verdict>), MigrationError>;

/// A dehydrated activation waiting for its verdict (rules 2 and 3).
/// Dropped undecided, it aborts.
#[derive(Debug)]
pub struct Departure {
    state: Option<Dehydrated>,
    verdict: Option<oneshot::Sender<Verdict>>,
}

impl Departure {
    pub(crate) fn new(state: Dehydrated, verdict: oneshot::Sender<Verdict>) -> Departure {
        Departure {
            state: Some(state),
            verdict: Some(verdict),
        }
    }

    /// The dehydrated state, to send to the target; taken once.
    pub fn take_state(&mut self) -> Option<Dehydrated> {
        self.state.take()
    }

    /// The grain lives elsewhere now: the activation drops it and ends
    /// (rule 3). Returns once the grain is dropped.
    pub async fn commit(mut self) {
        if let Some(verdict) = self.verdict.take() {
            let (dropped, done) = oneshot::channel();
            if verdict.send(Verdict::Commit(dropped)).is_ok() {
                let _ = done.await;
            }
        }
    }

    /// The grain stays: the activation goes on (rule 3).
    pub fn abort(mut self) {
        if let Some(verdict) = self.verdict.take() {
            let _ = verdict.send(Verdict::Abort);
        }
    }
}

impl Drop for Departure {
    fn drop(&mut self) {
        if let Some(verdict) = self.verdict.take() {
            let _ = verdict.send(Verdict::Abort);
        }
    }
}

/// What an arriving activation answers once its hooks ran (rule 4).
pub(crate) type Arriving = Result<oneshot::Sender<bool>, MigrationError>;

/// A new activation made from a dehydrated state, running nothing until
/// confirmed (rule 4). Dropped unconfirmed, it ends without
/// `on_deactivate`.
#[derive(Debug)]
pub struct Arrival {
    confirm: Option<oneshot::Sender<bool>>,
}

impl Arrival {
    pub(crate) fn new(confirm: oneshot::Sender<bool>) -> Arrival {
        Arrival {
            confirm: Some(confirm),
        }
    }

    /// The switch happened: the activation takes its messages.
    pub fn confirm(mut self) {
        if let Some(confirm) = self.confirm.take() {
            let _ = confirm.send(true);
        }
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        if let Some(confirm) = self.confirm.take() {
            let _ = confirm.send(false);
        }
    }
}

/// An activation paused between two turns (rule 6): it runs nothing
/// until this is dropped.
#[derive(Debug)]
#[must_use = "the activation resumes as soon as its pause is dropped"]
pub struct Paused {
    _resume: oneshot::Sender<()>,
}

impl Paused {
    pub(crate) fn new(resume: oneshot::Sender<()>) -> Paused {
        Paused { _resume: resume }
    }
}

/// Pauses a grain by type name (rule 6), for `HomeSide::pause`.
pub(crate) type Pause = std::sync::Arc<
    dyn Fn(&crate::Silo, crate::GrainKey) -> BoxFuture<'static, Result<Paused, MigrationError>>
        + Send
        + Sync,
>;

/// What the silo keeps for each migratable type: its grains' departure,
/// arrival and pause, by type name.
#[derive(Clone)]
pub(crate) struct Migrant {
    pub(crate) depart: Depart,
    pub(crate) arrive: Arrive,
    pub(crate) pause: Pause,
}

/// Departs a grain by type name (rule 2), for `HomeSide::depart`.
pub(crate) type Depart = std::sync::Arc<
    dyn Fn(&crate::Silo, crate::GrainKey) -> BoxFuture<'static, Result<Departure, MigrationError>>
        + Send
        + Sync,
>;

/// Makes an arriving activation by type name (rule 4), for
/// `HomeSide::arrive`.
pub(crate) type Arrive = std::sync::Arc<
    dyn Fn(
            &crate::Silo,
            crate::GrainKey,
            Dehydrated,
        ) -> BoxFuture<'static, Result<Arrival, MigrationError>>
        + Send
        + Sync,
>;
