//! Migration across silos: a grain's activation moves from its home here
//! (the source) to another silo (the target) with its in-memory state and
//! the bytes of its resident buffers, as a routing change. The actors
//! side (departure between turns, arrival from a dehydrated state) is
//! `granary_actors::migration`; this is where the grain goes, and the
//! directory's switch.
//!
//! # Rules
//!
//! 1. **Room first.** The source asks the target to reserve room before
//!    anything stops: the target must host the type, be below its
//!    activation limit, not be leaving, and promise the device memory the
//!    type declares (rule 5 of `node/mod.rs`, as a first call's promise
//!    does, but counting the device's room, `DeviceLoad::room`: requests'
//!    working memory comes back, and the arrival's buffers wait for it).
//!    One reservation per grain, at most 64 from one peer; it holds
//!    until the state arrives, is released, or expires after
//!    four call timeouts. A move to any silo (`MigrationTarget::Any`)
//!    asks up to three hosts of the type in turn, from the placement's
//!    picks. For a type that declares device memory, those with room for
//!    it (by their published load) go first, then the hosts placement
//!    passed over that have room, most room first, then its picks
//!    without (placement counts only the memory free now, and a
//!    fallback none; a placement that refuses for a reason other than
//!    memory is not overruled). A move to a named device of the target
//!    (`MigrationTarget::Device`) takes the promise on that device alone
//!    (the same checks: the type's needs, its room less what is
//!    promised there, its high water mark), and the buffers the arrival
//!    makes through `DeviceQuotas` while its hooks run (`rehydrate`,
//!    `on_activate`) are made there (`quotas.rs` rule 3: the grain is
//!    pinned to it meanwhile).
//! 2. **Calls wait, then follow.** The source marks the home moving: calls
//!    that reach it now (from references here, whose lease is ended, and
//!    from other silos) wait for the outcome and then go where the grain
//!    lives (`Moved`, or on here if it stayed). The calls already admitted
//!    finish first (the home's pins drain, bounded by the call timeout);
//!    then the activation departs between two turns, running what its
//!    mailbox held. Each sender's calls keep their order: a call waits
//!    until the one before it was answered, here or at the new home.
//! 3. **The state travels; the target makes the activation.** The
//!    dehydrated state goes to the target part by part, in chunks below
//!    the frame limit (each chunk taken once, and the state only whole).
//!    The target makes the activation (`rehydrate`, then `on_activate`),
//!    registers nothing, answers its activation's address, and holds the
//!    activation, running nothing, until the verdict (rule 4).
//! 4. **The source gives its entry away.** Only the silo a directory entry
//!    names may move it (`DirectoryRequest::Switch`, a compare from its
//!    own activation to the target's, asked again until its answer
//!    arrives: it changes nothing the second time). A moving home is not
//!    re-registered after a view change (`home.rs`); a switch that finds
//!    no entry (the owner changed) registers the home with the new owner
//!    first. Once the entry names the target, the source tells it to take
//!    messages and lets its own grain go; if the entry still names the
//!    source, it tells the target to discard its activation and goes on;
//!    if it names a third silo, the grain's home is not here any more and
//!    the source deactivates. The target answers the word to take
//!    messages once it has settled (registered, below, and serving, or
//!    discarded, below), within the source's wait, and says which: a move
//!    that returns `Ok` leaves a grain that serves at the target and may
//!    move again at once. If no
//!    answer to the switch comes within the call timeout,
//!    the source renumbers its entry with a compare from the activation
//!    it switched from, so that a switch still on its way is refused, and
//!    what then stands decides. A target told to take messages first
//!    registers its activation with the entry's owner as it is now (the
//!    owner may have changed since the switch), asked again after each
//!    pause of node rule 3's rounds while it answers `Retry`, for as long
//!    as a view's homes may re-register (calls wait meanwhile), and again
//!    with a newer owner if the view changes while it registers (node
//!    rule 3, `Inner::follow_owner`). Each try waits for its answer until a
//!    window past the last start, a follow round until a window past the
//!    last start or the followed view's pass deadline, whichever is later,
//!    and neither past a pause (at least 50 ms) before the verdict's answer
//!    goes back (the target answers a tenth of the request's time, at least
//!    50 ms and at most half, before the source stops waiting), so a call
//!    timeout shorter than rule 3's re-registration cuts the tries short; a
//!    follow round out of time counts as a refusal. An arrival the entry
//!    names that the target could not take in (it stopped or was fenced,
//!    the owner never took its registration or named another activation,
//!    or the view's pass deadline passed while it followed a new owner)
//!    is discarded, and if it settled in time, the source's move returns
//!    `MigrationError::Discarded` (the grain lives nowhere until its next
//!    call); a target that settles later (the first try always waits a
//!    window), or had no verdict, reports nothing, and the move returns as
//!    moved. A target that hears
//!    nothing (the source died, or its word was lost) asks the directory
//!    once the source has left the view, or after four call timeouts
//!    (longer than the source's switch and renumbering): it takes messages
//!    only if the entry names it, and otherwise ends its activation
//!    without `on_deactivate`. So the entry decides, and only one silo
//!    acts on it: never two activations. The grain is left with none (and
//!    starts afresh on its next call, from what `dehydrate` persisted)
//!    only when the source dies before its switch, when the target dies
//!    between answering and taking messages or discards the arrival
//!    (`MigrationError::Discarded`), or when the directory cannot be
//!    reached for whole call timeouts (the source ends its activation:
//!    `MigrationError::Unknown`).
//! 5. **Asking from anywhere.** `GrainRef::migrate` on any silo reaches
//!    the grain's home (this silo's, or the one the directory names), and
//!    the home runs the move. A grain with no activation is not moved.
//! 6. **A graceful leave moves GPU grains first.** `ClusterNode::leave`
//!    first marks the node draining: it becomes home to no new grain
//!    (`NoRoom`, so callers place elsewhere) and reserves room for no
//!    grain moving in. Then every home here whose type is migratable and
//!    declares device memory moves as to any silo (rule 1), a few at
//!    a time, each to its verdict (every step of a move is bounded by the
//!    call timeout), and moves already under way, out or in, reach theirs
//!    (for at most four call timeouts after its last batch of moves); a
//!    grain whose arrival here is confirmed meanwhile moves on in turn,
//!    as does one whose own move out failed. Only then does the node stop
//!    serving, and the rest deactivate as before (writing their state). A
//!    GPU grain that could not move deactivates too (each is tried up to
//!    three times, again only after `Busy` or `NotActive`).
//! 7. **Between the devices of this node.** A move to a device of the
//!    silo the grain is on (`MigrationTarget::Device` naming it, or no
//!    silo) is no routing change: the activation stays, and its resident
//!    buffers move. The home must be here and not moving, the device must
//!    exist, keep resident buffers and suit the type's needs, and the
//!    grain must hold buffers on another device: refused before anything
//!    stops otherwise. Then the
//!    activation pauses between two turns (`granary_actors::migration`
//!    rule 6: calls that arrive meanwhile wait in its mailbox, in order),
//!    every buffer it made through `DeviceQuotas` moves to the device
//!    (`quotas.rs` rule 4: the device's room first, device to device
//!    where the backend offers it, all or none), and the activation goes
//!    on with the same object. The pause and the move together are
//!    bounded by the call timeout: past it the move is dropped (`Busy`; a
//!    pause not yet taken never is, and the buffers stay where they
//!    were).
//!    Nothing is dehydrated, and the directory is not touched.
//!
//! Requests travel as the reserved grain type [`MIGRATION`]: `move` (rule
//! 5), `reserve` and `release` (rule 1), `layout`, `stage/...` and
//! `arrive` (rule 3), `verdict` (rule 4), each answered with a
//! `Result<_, MigrationError>`; all but `move` and `reserve` are taken
//! only from the silo that reserved.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use granary_actors::dispatch::{decode, encode};
use granary_actors::migration::{Dehydrated, Migrated, MigrationError, MigrationTarget};
use granary_actors::{GrainId, GrainKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::directory_client::{DirectoryReply, DirectoryRequest};
use super::home::Promise;
use super::quotas::DeviceMoveError;
use super::router::deadline_after;
use super::{ClusterNode, Inner};
use crate::SiloId;
use crate::connection::InboundRequest;
use crate::directory::ActivationAddress;
use crate::membership::{DeviceLoad, Member};
use crate::placement::{PlacementError, PlacementRequest};
use crate::wire::RemoteError;
use granary_gpu::{RelocateError, ResidentError};

/// The reserved grain type of migration requests.
pub(super) const MIGRATION: &str = "$migration";

/// The most bytes one dehydrated state may have (rule 3).
pub(super) const MAX_STATE: u64 = 4 << 30;

/// Chunks of the state in flight at once (rule 3).
const STAGE_AT_ONCE: usize = 4;

/// The silos a move to any silo asks, at most, in turn (rule 1).
const MOVE_CANDIDATES: usize = 3;

/// Reservations one peer may hold here at once (rule 1).
const MAX_RESERVATIONS_PER_PEER: usize = 64;

/// Grains moving off a leaving silo at once (rule 6).
const DRAIN_AT_ONCE: usize = 8;

/// How many times an arrival follows its entry's owner before it takes
/// messages (rule 4, node rule 3), when the view keeps changing.
const SETTLE_FOLLOWS: u32 = 3;

/// How many times a leave tries to move one GPU grain (rule 6): again
/// only after a refusal that may pass (`Busy`, `NotActive`).
const DRAIN_TRIES: u32 = 3;

/// Whether `name` names `silo`: its id as written, or its address.
fn names(silo: &SiloId, name: &str) -> bool {
    silo.to_string() == name || silo.address == name
}

fn no_reservation() -> MigrationError {
    MigrationError::Unsupported {
        reason: "no reservation for this state (it expired, or was released)".into(),
    }
}

/// An arrival waiting for its source's verdict (rule 4): where to tell
/// it, and where it says it has settled (taking messages, or discarded).
pub(super) struct AwaitingVerdict {
    grain: GrainId,
    /// The verdict, and when its answer goes back to the source at the
    /// latest.
    tell: tokio::sync::oneshot::Sender<(bool, Instant)>,
    settled: watch::Receiver<MoveState>,
}

/// An arrival the verdict (or the directory) decided on (rule 4).
struct Settling {
    grain: GrainId,
    generation: u64,
    /// Its activation here.
    address: ActivationAddress,
    /// Whether the entry names it.
    confirmed: bool,
    /// When the answer to the source's verdict goes back at the latest, if
    /// a verdict came.
    answer_by: Option<Instant>,
}

/// Where a moving grain is, for the calls that wait on it (rule 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum MoveState {
    /// Still deciding.
    Moving,
    /// It lives on this silo now.
    Moved(SiloId),
    /// It lives here (it stayed, or it arrived).
    Here,
    /// It arrived and was discarded, for the reason given: it lives
    /// nowhere until its next call (rule 4).
    Discarded(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct MoveRequest {
    grain: GrainId,
    target: MigrationTarget,
}

#[derive(Debug, Serialize, Deserialize)]
struct Reserve {
    grain: GrainId,
    ticket: u64,
    /// The device named, if any (rule 1).
    device: Option<u32>,
}

/// The parts of a state on its way, by name and length (rule 3); their
/// bytes follow in `stage/{ticket}/{part}/{offset}` requests whose
/// payload is the chunk itself.
#[derive(Debug, Serialize, Deserialize)]
struct Layout {
    ticket: u64,
    parts: Vec<(String, u64)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Release {
    ticket: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Arrive {
    grain: GrainId,
    ticket: u64,
    /// The source's activation, which the switch compares with.
    from: ActivationAddress,
}

/// The target's activation, made and waiting for the switch (rule 3),
/// and the lease its entry goes with (etcd; 0 under gossip).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Arrived {
    address: ActivationAddress,
    lease: i64,
}

/// The source's word on an arrival (rule 4): confirm it (the entry names
/// it) or discard it.
#[derive(Debug, Serialize, Deserialize)]
struct VerdictRequest {
    ticket: u64,
    confirm: bool,
}

/// Room a target holds for a grain on its way (rule 1).
pub(super) struct Reservation {
    grain: GrainId,
    _promise: Promise,
    /// The device the arrival's buffers are made on, if one was named.
    device: Option<usize>,
    /// The state's parts as they arrive, once their layout is known.
    parts: Option<Vec<(String, Vec<u8>)>>,
    /// The chunks staged, by part: their offsets and ends (a chunk over
    /// one staged before is refused).
    staged: std::collections::HashMap<u64, std::collections::BTreeMap<u64, u64>>,
    received: u64,
    total: u64,
}

impl Reservation {
    /// Whether every byte of the layout has arrived.
    fn whole(&self) -> bool {
        self.parts.is_some() && self.received == self.total
    }
}

/// What the source's switch came to (rule 4).
enum Outcome {
    /// The entry names the target.
    Moved,
    /// The entry still names this silo: the grain stays here, running.
    Stayed(MigrationError),
    /// The entry names another silo: the grain's home is not here.
    Lost,
    /// Neither could be learnt: the activation here ends.
    Unknown(String),
}

impl Inner {
    /// `GrainRef::migrate`, wherever the grain lives (rule 5).
    pub(super) async fn migrate(
        self: &Arc<Self>,
        grain: &GrainId,
        target: MigrationTarget,
    ) -> Result<Migrated, MigrationError> {
        if !self.home_side.is_migratable(&grain.type_name) {
            return Err(MigrationError::NotMigratable {
                type_name: grain.type_name.clone(),
            });
        }
        let node = ClusterNode {
            inner: self.clone(),
        };
        let settle_by = deadline_after(self.handoff.saturating_mul(4));
        loop {
            if self.stopped.load(Ordering::Acquire) {
                return Err(MigrationError::ShutDown);
            }
            if self
                .homes
                .get(grain)
                .is_some_and(|home| home.owner.is_some())
            {
                return self.migrate_here_detached(grain, &target).await;
            }
            let unavailable = |reason: String| MigrationError::Unavailable {
                grain: grain.clone(),
                reason,
            };
            match node
                .directory(DirectoryRequest::Lookup(grain.clone()))
                .await
            {
                Ok(DirectoryReply::Home(home)) if self.is_me(&home.silo) => {
                    return self.migrate_here_detached(grain, &target).await;
                }
                Ok(DirectoryReply::Home(home)) if self.is_live(&home.silo) => {
                    let request = MoveRequest {
                        grain: grain.clone(),
                        target,
                    };
                    return self
                        .migration_call::<_, Migrated>(&home.silo, "move", &request)
                        .await
                        .unwrap_or_else(|reason| Err(unavailable(reason)));
                }
                Ok(DirectoryReply::Home(_) | DirectoryReply::Unknown) => {
                    return Err(MigrationError::NotActive {
                        grain: grain.clone(),
                    });
                }
                Ok(DirectoryReply::Retry) if Instant::now() < settle_by => {
                    tokio::time::sleep(self.handoff / 8).await;
                }
                Ok(DirectoryReply::Retry) => {
                    return Err(unavailable("the directory did not settle".into()));
                }
                Err(err) => return Err(unavailable(err.to_string())),
            }
        }
    }

    /// [`Inner::migrate_here`] on a task of its own: a move that has begun
    /// runs to its verdict even if the caller stops waiting (a departure
    /// dropped after the switch would leave two activations).
    pub(super) async fn migrate_here_detached(
        self: &Arc<Self>,
        grain: &GrainId,
        target: &MigrationTarget,
    ) -> Result<Migrated, MigrationError> {
        let (inner, grain, target) = (self.clone(), grain.clone(), target.clone());
        tokio::spawn(async move { inner.migrate_here(&grain, &target).await })
            .await
            .unwrap_or(Err(MigrationError::ShutDown))
    }

    /// Moves `grain`, whose home is here, to `target` (rules 1 to 4). A
    /// caller that may stop waiting calls it on a task of its own
    /// ([`Inner::migrate_here_detached`]).
    pub(super) async fn migrate_here(
        self: &Arc<Self>,
        grain: &GrainId,
        target: &MigrationTarget,
    ) -> Result<Migrated, MigrationError> {
        let started = Instant::now();
        let not_active = || MigrationError::NotActive {
            grain: grain.clone(),
        };
        if self.stopped.load(Ordering::Acquire) || self.fence.is_fenced() {
            return Err(MigrationError::ShutDown);
        }
        let generation = match self.homes.get(grain) {
            Some(home) if home.moving.is_some() => {
                return Err(MigrationError::Busy {
                    grain: grain.clone(),
                });
            }
            Some(home) if home.owner.is_some() && !home.leaving => home.generation,
            _ => return Err(not_active()),
        };
        if !self.silo.is_active_named(&grain.type_name, &grain.key) {
            return Err(not_active());
        }
        if let MigrationTarget::Device { silo, device } = target {
            if silo.as_deref().is_none_or(|name| names(&self.id(), name)) {
                return self
                    .move_between_devices(grain, generation, *device, started)
                    .await;
            }
        }
        // Rule 1: room at the target first.
        let (to, ticket) = self.reserve_at(grain, target).await.inspect_err(|_| {
            self.stats.migration_failed();
        })?;
        // Rule 2: calls wait from now on; those admitted finish first.
        let (moving, moving_signal) = watch::channel(MoveState::Moving);
        let activation = match self.homes.get_mut(grain) {
            Some(mut home)
                if home.generation == generation
                    && home.owner.is_some()
                    && !home.leaving
                    && home.moving.is_none() =>
            {
                home.moving = Some(moving_signal);
                home.end_lease();
                home.activation
            }
            _ => {
                self.release_at(&to, ticket);
                return Err(not_active());
            }
        };
        let stay = |err: MigrationError| {
            let stale = match self.homes.get_mut(grain) {
                Some(mut home) if home.generation == generation => {
                    home.moving = None;
                    // Node rule 3: a view's pass that began while it moved
                    // passed over it.
                    self.entry_owner(grain, &self.view()) != home.owner
                }
                _ => false,
            };
            if stale {
                self.follow_later(grain, generation);
            }
            let _ = moving.send(MoveState::Here);
            self.release_at(&to, ticket);
            self.stats.migration_failed();
            err
        };
        let settle_by = deadline_after(self.config.connection.call_timeout);
        loop {
            match self
                .homes
                .get(grain)
                .map(|home| (home.generation == generation, home.in_flight))
            {
                Some((true, 0)) => break,
                Some((true, _)) if Instant::now() < settle_by => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Some((true, _)) => {
                    return Err(stay(MigrationError::Busy {
                        grain: grain.clone(),
                    }));
                }
                // The home went meanwhile (a view change gave it to
                // another silo): nothing to move from here.
                _ => return Err(stay(not_active())),
            }
        }
        let mut departure = match self.home_side.depart(grain).await {
            Ok(departure) => departure,
            Err(err) => return Err(stay(err)),
        };
        let state = departure.take_state().unwrap_or_default();
        let bytes = state.len_bytes();
        let from = ActivationAddress {
            silo: self.id(),
            activation,
        };
        // Rule 3: the state travels, and the target makes the activation.
        let arrived = match self.send_state(&to, ticket, grain, &from, state).await {
            Ok(Ok(arrived)) if arrived.address.silo == to => arrived,
            // Refused: the target holds nothing.
            Ok(Err(err)) => {
                departure.abort();
                return Err(stay(err));
            }
            // Unreachable (or answering for another silo): it discards
            // what it may have made, told so or once its wait ends.
            Ok(Ok(_)) | Err(_) => {
                self.send_verdict(&to, ticket, false);
                departure.abort();
                return Err(stay(MigrationError::Unavailable {
                    grain: grain.clone(),
                    reason: format!("the target {to} did not take the state"),
                }));
            }
        };
        // Rule 4: this silo gives its entry to the target's activation.
        let outcome = self.switch(grain, generation, &from, &arrived).await;
        match &outcome {
            Outcome::Moved => tracing::trace!(%grain, %to, "the entry names the target"),
            Outcome::Stayed(err) => tracing::debug!(%grain, error = %err, "the grain stays"),
            Outcome::Lost => tracing::warn!(%grain, "the entry named another silo during a move"),
            Outcome::Unknown(why) => {
                tracing::warn!(%grain, %why, "whether the grain moved is unknown; its activation here ends")
            }
        }
        match outcome {
            Outcome::Moved => {
                // The target takes messages once told; told or not, it
                // finds the entry naming it when its wait ends. Its answer
                // comes once it has settled, and says if it discarded the
                // grain.
                let verdict = self
                    .migration_call::<_, ()>(
                        &to,
                        "verdict",
                        &VerdictRequest {
                            ticket,
                            confirm: true,
                        },
                    )
                    .await;
                self.remove_home_of(grain, generation);
                self.remember(grain, to.clone());
                let _ = moving.send(MoveState::Moved(to.clone()));
                departure.commit().await;
                if let Ok(Err(err @ MigrationError::Discarded { .. })) = verdict {
                    self.stats.migration_failed();
                    tracing::warn!(%grain, %to, error = %err, "the target discarded a grain that moved to it");
                    return Err(err);
                }
                let took = started.elapsed();
                self.stats.migrated(took, bytes);
                self.note_moved(grain);
                tracing::debug!(%grain, %to, bytes, ?took, "migrated");
                Ok(Migrated {
                    from: self.id().to_string(),
                    to: to.to_string(),
                    bytes,
                    took,
                })
            }
            Outcome::Stayed(err) => {
                self.send_verdict(&to, ticket, false);
                departure.abort();
                let err = stay(err);
                // A home lost meanwhile (a view change gave the grain to
                // another silo) lets its activation go.
                if self
                    .homes
                    .get(grain)
                    .is_none_or(|home| home.generation != generation)
                {
                    self.release(grain);
                }
                Err(err)
            }
            Outcome::Lost => {
                self.send_verdict(&to, ticket, false);
                departure.abort();
                let err = stay(MigrationError::Conflict {
                    grain: grain.clone(),
                });
                // Not its home any more: the activation deactivates.
                self.remove_home_of(grain, generation);
                self.release(grain);
                Err(err)
            }
            Outcome::Unknown(reason) => {
                // The target decides by the entry once its wait ends; this
                // silo ends its activation, so at most one can serve.
                self.remove_home_of(grain, generation);
                let _ = moving.send(MoveState::Here);
                departure.commit().await;
                self.stats.migration_failed();
                Err(MigrationError::Unknown {
                    grain: grain.clone(),
                    reason,
                })
            }
        }
    }

    /// Rule 7: moves the resident buffers of `grain`, whose home is here,
    /// to this node's device `device`; the activation stays.
    async fn move_between_devices(
        self: &Arc<Self>,
        grain: &GrainId,
        generation: u64,
        device: u32,
        started: Instant,
    ) -> Result<Migrated, MigrationError> {
        let moved = self.relocate_here(grain, generation, device as usize).await;
        let moved = moved.inspect_err(|_| self.stats.migration_failed())?;
        let took = started.elapsed();
        self.stats.migrated(took, moved.bytes);
        self.note_moved(grain);
        tracing::debug!(%grain, device, bytes = moved.bytes, direct = moved.direct, ?took, "moved between devices");
        let here = self.id().to_string();
        Ok(Migrated {
            from: here.clone(),
            to: here,
            bytes: moved.bytes,
            took,
        })
    }

    /// Rule 7's steps: checks, the pause, and the buffers' move, bounded
    /// by the call timeout.
    async fn relocate_here(
        self: &Arc<Self>,
        grain: &GrainId,
        generation: u64,
        device: usize,
    ) -> Result<granary_gpu::Relocated, MigrationError> {
        let no_target = |reason: String| MigrationError::NoTarget {
            grain: grain.clone(),
            reason,
        };
        let Some(quotas) = self.quotas.clone() else {
            return Err(no_target(format!("{} has no GPU bridge", self.id())));
        };
        // What can be refused without pausing the grain.
        let devices = self.load().devices;
        let Some(target) = devices
            .get(device)
            .filter(|_| quotas.keeps_resident(device))
        else {
            return Err(no_target(format!(
                "{} has no device {device} that keeps resident buffers",
                self.id()
            )));
        };
        if self
            .needs
            .get(&grain.type_name)
            .is_some_and(|needs| !needs.suits(target))
        {
            return Err(no_target(format!(
                "device {device} is not of the backend, or has not the compute units, its type needs"
            )));
        }
        match quotas.device_of(grain) {
            None => {
                return Err(no_target(format!(
                    "it holds no device memory on {} to move",
                    self.id()
                )));
            }
            Some(on) if on == device => {
                return Err(MigrationError::AlreadyThere {
                    grain: grain.clone(),
                });
            }
            Some(_) => {}
        }
        // The pause and the move, bounded together: a pause still queued
        // when the bound passes is never taken (its answer finds no one),
        // and a relocation dropped before its switch leaves every buffer
        // where it was (`granary_gpu`'s `resident.rs` rule 5).
        let moved = tokio::time::timeout(self.config.connection.call_timeout, async {
            let paused = self.home_side.pause(grain).await?;
            // Checked again with the grain paused: a move away may have
            // begun meanwhile (its departure then waits behind the pause),
            // or the home gone.
            match self.homes.get(grain) {
                Some(home)
                    if home.generation == generation && home.moving.is_none() && !home.leaving => {}
                Some(home) if home.generation == generation => {
                    return Err(MigrationError::Busy {
                        grain: grain.clone(),
                    });
                }
                _ => {
                    return Err(MigrationError::NotActive {
                        grain: grain.clone(),
                    });
                }
            }
            let moved = quotas.relocate(grain, device).await;
            drop(paused);
            Ok(moved)
        })
        .await;
        match moved {
            Ok(Ok(Ok(moved))) => Ok(moved),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(MigrationError::Busy {
                grain: grain.clone(),
            }),
            Ok(Ok(Err(DeviceMoveError::NothingHeld))) => Err(no_target(format!(
                "it holds no device memory on {} to move",
                self.id()
            ))),
            Ok(Ok(Err(DeviceMoveError::Relocate(err)))) => Err(match err {
                RelocateError::AlreadyThere { .. } => MigrationError::AlreadyThere {
                    grain: grain.clone(),
                },
                RelocateError::NoSuchDevice { .. } => {
                    no_target(format!("{} has no device {device}", self.id()))
                }
                RelocateError::Unlike { .. } => no_target(format!(
                    "device {device} does not meet what its buffers were made for, or keeps none"
                )),
                RelocateError::Resident(ResidentError::NoDevice { bytes }) => {
                    no_target(format!("device {device} has no room for its {bytes} bytes"))
                }
                RelocateError::Resident(ResidentError::ShutDown) => MigrationError::ShutDown,
                err => MigrationError::Unavailable {
                    grain: grain.clone(),
                    reason: err.to_string(),
                },
            }),
        }
    }

    /// Rule 1: reserves room for `grain` at the silo `target` names, or at
    /// the first of the candidates (`candidates`) that has it.
    async fn reserve_at(
        self: &Arc<Self>,
        grain: &GrainId,
        target: &MigrationTarget,
    ) -> Result<(SiloId, u64), MigrationError> {
        let mut last = None;
        for candidate in self.candidates(grain, target)? {
            let ticket = self.next_activation.fetch_add(1, Ordering::Relaxed);
            let request = Reserve {
                grain: grain.clone(),
                ticket,
                device: match target {
                    MigrationTarget::Device { device, .. } => Some(*device),
                    _ => None,
                },
            };
            match self
                .migration_call::<_, ()>(&candidate, "reserve", &request)
                .await
            {
                Ok(Ok(())) => return Ok((candidate, ticket)),
                Ok(Err(err)) => last = Some(err),
                Err(reason) => {
                    last = Some(MigrationError::Unavailable {
                        grain: grain.clone(),
                        reason,
                    })
                }
            }
            // A named silo is the only candidate.
            if matches!(
                target,
                MigrationTarget::Silo(_) | MigrationTarget::Device { .. }
            ) {
                break;
            }
        }
        Err(last.unwrap_or_else(|| MigrationError::NoTarget {
            grain: grain.clone(),
            reason: "no other silo hosts its type".into(),
        }))
    }

    /// The silos `grain` may move to, best first: the one `target` names,
    /// or up to three among the others that host its type, from the
    /// placement's picks, ordered by room for it (rule 1).
    fn candidates(
        &self,
        grain: &GrainId,
        target: &MigrationTarget,
    ) -> Result<Vec<SiloId>, MigrationError> {
        let view = self.view();
        let mut hosts: Vec<_> = view
            .iter()
            .filter(|member| {
                !self.is_me(&member.silo) && member.load.grain_types.contains(&grain.type_name)
            })
            .cloned()
            .collect();
        let named = match target {
            MigrationTarget::Silo(name) => Some(name),
            MigrationTarget::Device { silo, .. } => silo.as_ref(),
            _ => None,
        };
        match named {
            Some(name) => {
                let named = |silo: &SiloId| names(silo, name);
                if named(&self.id()) {
                    return Err(MigrationError::AlreadyThere {
                        grain: grain.clone(),
                    });
                }
                match hosts.iter().find(|member| named(&member.silo)) {
                    Some(member) => Ok(vec![member.silo.clone()]),
                    None => Err(MigrationError::NoTarget {
                        grain: grain.clone(),
                        reason: format!("{name} is not a member that hosts {}", grain.type_name),
                    }),
                }
            }
            _ => {
                if hosts.is_empty() {
                    return Err(MigrationError::NoTarget {
                        grain: grain.clone(),
                        reason: "no other silo hosts its type".into(),
                    });
                }
                let me = self.id();
                let needs = self.needs.get(&grain.type_name);
                let others = hosts.clone();
                let mut picks = Vec::new();
                let mut refused = None;
                while picks.len() < MOVE_CANDIDATES && !hosts.is_empty() {
                    let request = PlacementRequest {
                        grain,
                        caller: &me,
                        needs,
                    };
                    match self.placement.place(&request, &hosts) {
                        Ok(pick) => {
                            let before = hosts.len();
                            hosts.retain(|member| member.silo != pick);
                            let among = hosts.len() < before;
                            if among || !picks.contains(&pick) {
                                picks.push(pick);
                            }
                            // A strategy that picks outside the hosts it
                            // was given is asked no more.
                            if !among {
                                break;
                            }
                        }
                        Err(err) => {
                            refused = Some(err);
                            break;
                        }
                    }
                }
                // Rule 1: a target promises by room, and placement
                // counts only the memory free now (and its fallback
                // none). For a type that declares device memory, unless
                // placement refused for another reason: first its picks
                // with room for the grain, then the other hosts with
                // room, most first, then its picks without.
                let room_counted = needs.filter(|needs| needs.device_memory > 0).filter(|_| {
                    matches!(refused, None | Some(PlacementError::NoDeviceFits { .. }))
                });
                if let Some(needs) = room_counted {
                    let room = |member: &Member| {
                        member
                            .load
                            .devices
                            .iter()
                            .filter(|device| needs.suits(device))
                            .map(DeviceLoad::room)
                            .max()
                            .filter(|room| *room >= needs.device_memory)
                    };
                    let has_room = |silo: &SiloId| {
                        others
                            .iter()
                            .find(|member| &member.silo == silo)
                            .and_then(room)
                            .is_some()
                    };
                    let (with, without): (Vec<_>, Vec<_>) = picks.into_iter().partition(has_room);
                    let mut roomy: Vec<_> = hosts
                        .iter()
                        .filter_map(|member| Some((room(member)?, member.silo.clone())))
                        .collect();
                    roomy.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
                    picks = with
                        .into_iter()
                        .chain(roomy.into_iter().map(|(_, silo)| silo))
                        .chain(without)
                        .take(MOVE_CANDIDATES)
                        .collect();
                }
                if picks.is_empty() {
                    let refused = refused.map_or_else(String::new, |err| format!(": {err}"));
                    let room = if room_counted.is_some() {
                        ", and none has that room once its requests end"
                    } else {
                        ""
                    };
                    return Err(MigrationError::NoTarget {
                        grain: grain.clone(),
                        reason: format!(
                            "no other silo that hosts its type takes it{refused}{room}"
                        ),
                    });
                }
                Ok(picks)
            }
        }
    }

    /// Rule 3: sends `state`'s layout to `to`, then its parts in chunks
    /// (the chunk is the request's payload: no copy here), then asks it to
    /// arrive. The outer error: the target could not be reached.
    async fn send_state(
        self: &Arc<Self>,
        to: &SiloId,
        ticket: u64,
        grain: &GrainId,
        from: &ActivationAddress,
        state: Dehydrated,
    ) -> Result<Result<Arrived, MigrationError>, String> {
        let parts: Vec<(&str, &[u8])> = state.parts().collect();
        let layout = Layout {
            ticket,
            parts: parts
                .iter()
                .map(|(name, bytes)| (name.to_string(), bytes.len() as u64))
                .collect(),
        };
        if let Err(err) = self.migration_call::<_, ()>(to, "layout", &layout).await? {
            return Ok(Err(err));
        }
        // 1 MiB, four in flight (within half a frame, so the request's
        // header fits beside it): on loopback a 64 MiB state staged in
        // 1 MiB chunks took 42-45 ms, in 8 MiB chunks 62-66 ms (the
        // writer and the reader overlap better; `BENCHMARKS.md`).
        let chunk = (self.config.connection.max_frame / 2).clamp(64 << 10, 1 << 20);
        let chunks: Vec<(usize, usize)> = parts
            .iter()
            .enumerate()
            .flat_map(|(part, (_, bytes))| {
                (0..bytes.len())
                    .step_by(chunk)
                    .map(move |offset| (part, offset))
            })
            .collect();
        let staged: Result<(), Result<MigrationError, String>> = futures_util::stream::iter(chunks)
            .map(|(part, offset)| {
                let bytes = parts[part].1;
                let end = (offset + chunk).min(bytes.len());
                let message = format!("stage/{ticket}/{part}/{offset}");
                async move {
                    match self
                        .migration_call_raw::<()>(to, &message, &bytes[offset..end])
                        .await
                    {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(err)) => Err(Ok(err)),
                        Err(reason) => Err(Err(reason)),
                    }
                }
            })
            .buffer_unordered(STAGE_AT_ONCE)
            .try_collect()
            .await;
        match staged {
            Ok(()) => {}
            Err(Ok(err)) => return Ok(Err(err)),
            Err(Err(reason)) => return Err(reason),
        }
        drop(parts);
        drop(state);
        let arrive = Arrive {
            grain: grain.clone(),
            ticket,
            from: from.clone(),
        };
        self.migration_call(to, "arrive", &arrive).await
    }

    /// Rule 4: moves this silo's entry for `grain` from `from` to the
    /// target's activation, with a compare; the switch is asked again (it
    /// changes nothing the second time) until its answer arrives or the
    /// call timeout passes, and then the entry is renumbered (rule 4) so
    /// that a switch still on its way is refused.
    async fn switch(
        self: &Arc<Self>,
        grain: &GrainId,
        generation: u64,
        from: &ActivationAddress,
        arrived: &Arrived,
    ) -> Outcome {
        let node = ClusterNode {
            inner: self.clone(),
        };
        let give_up = deadline_after(self.config.connection.call_timeout);
        let mut last = String::new();
        let mut sent = false;
        loop {
            // A node that stopped decides nothing more. If no switch went
            // out, the grain stays (and deactivates with the node).
            if self.stopped.load(Ordering::Acquire) {
                return match sent {
                    false => Outcome::Stayed(MigrationError::ShutDown),
                    true => Outcome::Unknown(format!("this silo stopped; {last}")),
                };
            }
            sent = true;
            let request = DirectoryRequest::Switch {
                grain: grain.clone(),
                from: from.clone(),
                to: arrived.address.clone(),
                to_lease: arrived.lease,
            };
            match node.directory(request).await {
                Ok(DirectoryReply::Home(home)) if home == arrived.address => return Outcome::Moved,
                // Under etcd: the compare lost a race with a write that
                // left the entry as it was; asked again.
                Ok(DirectoryReply::Home(home)) if home == *from => {
                    last = "the switch lost a race".into();
                }
                Ok(DirectoryReply::Home(_)) => return Outcome::Lost,
                // No entry: its owner changed (the old one died) and this
                // home, not re-registered while it moves, is not there
                // yet. It registers with the new owner, then switches.
                Ok(DirectoryReply::Unknown) => {
                    last = "the entry was not found".into();
                    let register = DirectoryRequest::Register {
                        grain: grain.clone(),
                        home: from.clone(),
                        existing: true,
                    };
                    match node.directory(register).await {
                        Ok(DirectoryReply::Home(home)) if home == *from => continue,
                        Ok(DirectoryReply::Home(_)) => return Outcome::Lost,
                        _ => {}
                    }
                }
                Ok(DirectoryReply::Retry) => last = "the directory was settling".into(),
                Err(err) => last = err.to_string(),
            }
            if Instant::now() >= give_up {
                return self.renumber(grain, generation, from, arrived, last).await;
            }
            tokio::time::sleep(self.handoff / 8).await;
        }
    }

    /// Rule 4: the switch's answer did not come. The entry is renumbered
    /// with a compare from `from`, so a switch still on its way is refused
    /// once this succeeds; whatever then stands decides.
    async fn renumber(
        self: &Arc<Self>,
        grain: &GrainId,
        generation: u64,
        from: &ActivationAddress,
        arrived: &Arrived,
        why: String,
    ) -> Outcome {
        let node = ClusterNode {
            inner: self.clone(),
        };
        let renumbered = ActivationAddress {
            silo: self.id(),
            activation: self.next_activation.fetch_add(1, Ordering::Relaxed),
        };
        let give_up = deadline_after(self.config.connection.call_timeout);
        while !self.stopped.load(Ordering::Acquire) {
            let request = DirectoryRequest::Switch {
                grain: grain.clone(),
                from: from.clone(),
                to: renumbered.clone(),
                to_lease: self.lease_id(),
            };
            match node.directory(request).await {
                Ok(DirectoryReply::Home(home)) if home == renumbered => {
                    if let Some(mut entry) = self.homes.get_mut(grain) {
                        if entry.generation == generation {
                            entry.activation = renumbered.activation;
                        }
                    }
                    return Outcome::Stayed(MigrationError::Unavailable {
                        grain: grain.clone(),
                        reason: why,
                    });
                }
                Ok(DirectoryReply::Home(home)) if home == arrived.address => return Outcome::Moved,
                Ok(DirectoryReply::Home(home)) if home != *from => return Outcome::Lost,
                _ if Instant::now() < give_up => tokio::time::sleep(self.handoff / 8).await,
                _ => break,
            }
        }
        Outcome::Unknown(format!("{why}; the entry could not be settled"))
    }

    /// Forgets this silo's home of `grain` if it is still `generation`.
    fn remove_home_of(&self, grain: &GrainId, generation: u64) {
        if let Some((_, home)) = self
            .homes
            .remove_if(grain, |_, home| home.generation == generation)
        {
            home.end_lease();
        }
    }

    /// Lets go of a reservation at `to`, in the background (rule 1).
    fn release_at(self: &Arc<Self>, to: &SiloId, ticket: u64) {
        let (inner, to) = (self.clone(), to.clone());
        tokio::spawn(async move {
            let _ = inner
                .migration_call::<_, ()>(&to, "release", &Release { ticket })
                .await;
        });
    }

    /// Sends migration request `message` to `to`; the outer error: it
    /// could not be reached or did not answer in the wire form.
    async fn migration_call<T: Serialize, R: DeserializeOwned>(
        self: &Arc<Self>,
        to: &SiloId,
        message: &str,
        body: &T,
    ) -> Result<Result<R, MigrationError>, String> {
        let payload = encode(body).map_err(|err| err.to_string())?;
        self.migration_call_raw(to, message, &payload).await
    }

    /// [`Inner::migration_call`] with the payload as it is.
    async fn migration_call_raw<R: DeserializeOwned>(
        self: &Arc<Self>,
        to: &SiloId,
        message: &str,
        payload: &[u8],
    ) -> Result<Result<R, MigrationError>, String> {
        let node = ClusterNode {
            inner: self.clone(),
        };
        let connection = node.connection(to).await.map_err(|err| err.to_string())?;
        let reply = connection
            .call(MIGRATION, &GrainKey::U64(0), message, payload)
            .await
            .map_err(|err| format!("{err:?}"))?;
        decode(&reply).map_err(|err| err.to_string())
    }

    /// Answers a migration request from silo `from`.
    pub(super) async fn answer_migration(
        self: &Arc<Self>,
        from: &SiloId,
        request: &InboundRequest,
    ) -> Result<Vec<u8>, RemoteError> {
        fn read<T: DeserializeOwned>(payload: &[u8]) -> Result<T, RemoteError> {
            decode(payload).map_err(|err| RemoteError::BadPayload(err.to_string()))
        }
        fn answer<T: Serialize>(
            result: &Result<T, MigrationError>,
        ) -> Result<Vec<u8>, RemoteError> {
            encode(result).map_err(|err| RemoteError::Other(err.to_string()))
        }
        match request.message.as_str() {
            "move" => {
                let asked: MoveRequest = read(&request.payload)?;
                answer(
                    &self
                        .migrate_here_detached(&asked.grain, &asked.target)
                        .await,
                )
            }
            "reserve" => {
                let asked: Reserve = read(&request.payload)?;
                answer(&self.reserve(from, asked))
            }
            "layout" => {
                let asked: Layout = read(&request.payload)?;
                answer(&self.layout(from, asked))
            }
            staging if staging.starts_with("stage/") => {
                let mut fields = staging["stage/".len()..].split('/');
                let mut field = || {
                    fields
                        .next()
                        .and_then(|field| field.parse::<u64>().ok())
                        .ok_or_else(|| RemoteError::BadPayload(format!("{staging:?}")))
                };
                let (ticket, part, offset) = (field()?, field()?, field()?);
                answer(&self.stage(from, ticket, part, offset, &request.payload))
            }
            "verdict" => {
                let asked: VerdictRequest = read(&request.payload)?;
                let Some((_, awaiting)) = self.arrivals.remove(&(from.clone(), asked.ticket))
                else {
                    return answer(&Ok(()));
                };
                let mut settled = awaiting.settled;
                // The request's time left counts from the source's send:
                // a tenth of it (at least 50 ms) is kept for the answer's
                // way back.
                let time_left = request.time_left_now();
                let answer_in = time_left.saturating_sub(
                    (time_left / 10)
                        .max(Duration::from_millis(50))
                        .min(time_left / 2),
                );
                let answer_by = deadline_after(answer_in);
                let _ = awaiting.tell.send((asked.confirm, answer_by));
                // Answered once the arrival has settled (registered and
                // taking messages, or discarded), within the source's
                // wait: a move that returns has a grain that serves, and
                // may be moved again at once, or the source learns that
                // the grain it gave away was discarded.
                let discarded = match tokio::time::timeout(
                    answer_in,
                    settled.wait_for(|state| *state != MoveState::Moving),
                )
                .await
                {
                    Ok(Ok(state)) => match &*state {
                        MoveState::Discarded(reason) => Some(reason.clone()),
                        _ => None,
                    },
                    _ => None,
                };
                match discarded {
                    Some(reason) if asked.confirm => {
                        answer::<()>(&Err(MigrationError::Discarded {
                            grain: awaiting.grain,
                            reason,
                        }))
                    }
                    _ => answer(&Ok(())),
                }
            }
            "release" => {
                let asked: Release = read(&request.payload)?;
                self.reservations.remove(&(from.clone(), asked.ticket));
                answer(&Ok(()))
            }
            "arrive" => {
                let asked: Arrive = read(&request.payload)?;
                if asked.from.silo != *from {
                    return Err(RemoteError::Forbidden(format!(
                        "{from} may not move a grain from {}",
                        asked.from.silo
                    )));
                }
                // On a task of its own: an arrival that has begun switches
                // (or not) even if the source stops waiting for it.
                let (inner, from) = (self.clone(), from.clone());
                let arrived = tokio::spawn(async move { inner.arrive(&from, asked).await })
                    .await
                    .unwrap_or(Err(MigrationError::ShutDown));
                answer(&arrived)
            }
            other => Err(RemoteError::UnknownMessage {
                grain_type: MIGRATION.to_string(),
                message: other.to_string(),
            }),
        }
    }

    /// Rule 1 at the target.
    fn reserve(self: &Arc<Self>, from: &SiloId, asked: Reserve) -> Result<(), MigrationError> {
        let grain = asked.grain;
        if self.stopped.load(Ordering::Acquire) || self.fence.is_fenced() {
            return Err(MigrationError::ShutDown);
        }
        let no_target = |reason: &str| MigrationError::NoTarget {
            grain: grain.clone(),
            reason: format!("{}: {reason}", self.id()),
        };
        if !self.hosts.contains(&grain.type_name) || !self.home_side.is_migratable(&grain.type_name)
        {
            return Err(no_target("it does not host the type as migratable"));
        }
        if self.draining.load(Ordering::Acquire) {
            return Err(no_target("it is leaving the cluster"));
        }
        // One reservation per grain, and a bounded number per peer: a
        // peer cannot hold every device promise here.
        if self.homes.contains_key(&grain)
            || self
                .reservations
                .iter()
                .any(|held| held.value().grain == grain)
        {
            return Err(MigrationError::Busy { grain });
        }
        let from_peer = self
            .reservations
            .iter()
            .filter(|held| held.key().0 == *from)
            .count();
        if from_peer >= MAX_RESERVATIONS_PER_PEER {
            return Err(no_target(
                "it holds as many reservations from this silo as it takes",
            ));
        }
        if self.silo.at_activation_limit() {
            return Err(no_target("it holds its activation limit"));
        }
        let device = asked.device.map(|device| device as usize);
        if let Some(named) = device {
            if !self
                .quotas
                .as_ref()
                .is_some_and(|quotas| quotas.keeps_resident(named))
            {
                return Err(no_target(&format!(
                    "it has no device {named} that keeps resident buffers"
                )));
            }
        }
        let promise = self.promise_on(&grain.type_name, device).map_err(|_| {
            no_target(&match device {
                Some(named) => format!(
                    "device {named} has no room for the type's declared memory, or does not \
                     meet its needs"
                ),
                None => "no device has room for the type's declared memory".into(),
            })
        })?;
        let key = (from.clone(), asked.ticket);
        self.reservations.insert(
            key.clone(),
            Reservation {
                grain,
                _promise: promise,
                device,
                parts: None,
                staged: std::collections::HashMap::new(),
                received: 0,
                total: 0,
            },
        );
        let inner = Arc::downgrade(self);
        let expires = self.config.connection.call_timeout.saturating_mul(4);
        tokio::spawn(async move {
            tokio::time::sleep(expires).await;
            if let Some(inner) = inner.upgrade() {
                inner.reservations.remove(&key);
            }
        });
        Ok(())
    }

    /// Rule 3 at the target: the state's layout; its parts are made here,
    /// to be filled by [`Inner::stage`].
    fn layout(&self, from: &SiloId, layout: Layout) -> Result<(), MigrationError> {
        let Some(mut reservation) = self.reservations.get_mut(&(from.clone(), layout.ticket))
        else {
            return Err(no_reservation());
        };
        let total = layout
            .parts
            .iter()
            .try_fold(0u64, |total, (_, len)| total.checked_add(*len))
            .filter(|total| *total <= MAX_STATE);
        let (Some(total), None) = (total, &reservation.parts) else {
            return Err(MigrationError::Hook {
                grain: reservation.grain.clone(),
                reason: format!(
                    "a dehydrated state of more than {MAX_STATE} bytes, or laid out twice"
                ),
            });
        };
        reservation.total = total;
        reservation.parts = Some(
            layout
                .parts
                .into_iter()
                .map(|(name, len)| (name, vec![0; len as usize]))
                .collect(),
        );
        Ok(())
    }

    /// Rule 3 at the target: one chunk of part `part` at `offset`.
    fn stage(
        &self,
        from: &SiloId,
        ticket: u64,
        part: u64,
        offset: u64,
        bytes: &[u8],
    ) -> Result<(), MigrationError> {
        let Some(mut reservation) = self.reservations.get_mut(&(from.clone(), ticket)) else {
            return Err(no_reservation());
        };
        let reservation = &mut *reservation;
        let place = reservation.parts.as_mut().and_then(|parts| {
            let (_, target) = parts.get_mut(usize::try_from(part).ok()?)?;
            let start = usize::try_from(offset).ok()?;
            let end = start.checked_add(bytes.len())?;
            target.get_mut(start..end)
        });
        // A chunk may not overlap one already staged: the bytes received
        // then count each byte of the layout once.
        let end = offset.saturating_add(bytes.len() as u64);
        let staged = reservation.staged.entry(part).or_default();
        let overlaps = staged
            .range(..end)
            .next_back()
            .is_some_and(|(_, staged_end)| *staged_end > offset);
        let Some(place) = place.filter(|_| !overlaps) else {
            return Err(MigrationError::Hook {
                grain: reservation.grain.clone(),
                reason: "a chunk outside its state's layout, or over one staged before".into(),
            });
        };
        place.copy_from_slice(bytes);
        staged.insert(offset, end);
        reservation.received += bytes.len() as u64;
        Ok(())
    }

    /// Rule 3 at the target: makes the activation, which waits for the
    /// source's verdict (rule 4) on a task of its own.
    async fn arrive(
        self: &Arc<Self>,
        from: &SiloId,
        asked: Arrive,
    ) -> Result<Arrived, MigrationError> {
        let grain = asked.grain;
        if self.stopped.load(Ordering::Acquire)
            || self.fence.is_fenced()
            || self.draining.load(Ordering::Acquire)
        {
            return Err(MigrationError::ShutDown);
        }
        let Some((_, mut reservation)) = self
            .reservations
            .remove_if(&(from.clone(), asked.ticket), |_, reservation| {
                reservation.grain == grain
            })
        else {
            return Err(no_reservation());
        };
        let whole = reservation.whole();
        let (Some(parts), true) = (reservation.parts.take(), whole) else {
            return Err(MigrationError::Hook {
                grain,
                reason: "the dehydrated state did not arrive whole".into(),
            });
        };
        let state = Dehydrated::from_parts(parts);
        // Calls that find the grain here before the switch wait (rule 2).
        let (arrived, arrived_signal) = watch::channel(MoveState::Moving);
        let generation = self.next_activation.fetch_add(1, Ordering::Relaxed);
        match self.homes.entry(grain.clone()) {
            dashmap::Entry::Occupied(_) => return Err(MigrationError::Busy { grain }),
            dashmap::Entry::Vacant(vacant) => {
                vacant.insert(super::home::Home::arriving(generation, arrived_signal));
            }
        }
        // Rule 1: the buffers of a move to a named device are made there.
        let pinned = reservation
            .device
            .zip(self.quotas.as_ref())
            .map(|(device, quotas)| quotas.pin(&grain, device));
        let arrived_here = self.home_side.arrive(&grain, state).await;
        drop(pinned);
        let arrival = match arrived_here {
            Ok(arrival) => arrival,
            Err(err) => {
                tracing::debug!(%grain, error = %err, "an arriving grain did not start");
                self.remove_home_of(&grain, generation);
                let _ = arrived.send(MoveState::Here);
                return Err(err);
            }
        };
        // Stopped or fenced while the hooks ran: this silo takes nothing in.
        if self.stopped.load(Ordering::Acquire) || self.fence.is_fenced() {
            drop(arrival);
            self.remove_home_of(&grain, generation);
            let _ = arrived.send(MoveState::Here);
            return Err(MigrationError::ShutDown);
        }
        // The activation holds its own device memory now.
        drop(reservation);
        let address = ActivationAddress {
            silo: self.id(),
            activation: self.next_activation.fetch_add(1, Ordering::Relaxed),
        };
        let (tell, told) = tokio::sync::oneshot::channel();
        let settled = arrived.subscribe();
        self.arrivals.insert(
            (from.clone(), asked.ticket),
            AwaitingVerdict {
                grain: grain.clone(),
                tell,
                settled,
            },
        );
        let (inner, source, ticket) = (self.clone(), from.clone(), asked.ticket);
        let waiting = address.clone();
        tokio::spawn(async move {
            let (confirmed, answer_by) = inner.await_verdict(&grain, &source, &waiting, told).await;
            inner.arrivals.remove(&(source, ticket));
            let settling = Settling {
                grain,
                generation,
                address: waiting,
                confirmed,
                answer_by,
            };
            inner.settle_arrival(settling, arrival, arrived).await;
        });
        Ok(Arrived {
            address,
            lease: self.lease_id(),
        })
    }

    /// Rule 4 at the target: the source's verdict, or, if none comes
    /// (the source died, or its word was lost), the directory's: whether
    /// the entry names `address` once the source has left the view or
    /// four call timeouts have passed (longer than the source's switch).
    /// With the source's verdict, when its answer goes back at the latest.
    async fn await_verdict(
        self: &Arc<Self>,
        grain: &GrainId,
        source: &SiloId,
        address: &ActivationAddress,
        mut told: tokio::sync::oneshot::Receiver<(bool, Instant)>,
    ) -> (bool, Option<Instant>) {
        // Longer than the source's switch can take (its attempts, then its
        // renumbering, each bounded by the call timeout).
        let give_up = deadline_after(self.config.connection.call_timeout.saturating_mul(4));
        let mut every = tokio::time::interval((self.handoff / 8).max(Duration::from_millis(1)));
        loop {
            tokio::select! {
                verdict = &mut told => match verdict {
                    Ok((confirm, answer_by)) => return (confirm, Some(answer_by)),
                    Err(_) => break,
                },
                _ = every.tick() => {
                    if !self.is_live(source)
                        || Instant::now() >= give_up
                        || self.stopped.load(Ordering::Acquire)
                    {
                        break;
                    }
                }
            }
        }
        if self.stopped.load(Ordering::Acquire) {
            return (false, None);
        }
        let node = ClusterNode {
            inner: self.clone(),
        };
        // The directory may be settling after the source's death: asked
        // for a while.
        let settle_by = deadline_after(self.handoff.saturating_mul(4));
        loop {
            match node
                .directory(DirectoryRequest::Lookup(grain.clone()))
                .await
            {
                Ok(DirectoryReply::Home(home)) => return (home == *address, None),
                Ok(DirectoryReply::Unknown) => return (false, None),
                _ if Instant::now() < settle_by => tokio::time::sleep(self.handoff / 8).await,
                _ => return (false, None),
            }
        }
    }

    /// Rule 4 at the target: a confirmed arrival registers with the
    /// entry's owner now (the owner may have changed since the switch,
    /// and a home that was arriving re-registered nowhere), follows a
    /// newer owner (node rule 3, up to `SETTLE_FOLLOWS` rounds), and takes
    /// messages as the grain's home here if the entry names it (a newer
    /// owner that refused it, or a view still changing after the last
    /// round, leaves it recorded with the owner it registered with, and
    /// it re-registers on its own: `Inner::follow_later`, unless the
    /// view's pass deadline has passed); otherwise (an owner that never
    /// took it or names another silo, a deadline passed, or the node
    /// stopped, fenced, or lost the home meanwhile) it ends without
    /// `on_deactivate`, and the verdict's answer says so.
    async fn settle_arrival(
        self: &Arc<Self>,
        settling: Settling,
        arrival: granary_actors::migration::Arrival,
        arrived: watch::Sender<MoveState>,
    ) {
        let Settling {
            grain,
            generation,
            address,
            confirmed,
            answer_by,
        } = settling;
        let usable =
            |inner: &Inner| !inner.stopped.load(Ordering::Acquire) && !inner.fence.is_fenced();
        // Why it is discarded, if it is.
        let mut why = if confirmed {
            "the node stopped or was fenced"
        } else {
            "the source kept it"
        };
        // The source learns of a discard only if the arrival settles by
        // `settle_by`: its wait for the verdict's answer (`answer_by`),
        // less a pause (at least 50 ms). The registration's tries start
        // until `register_by`: then, or as long as a view's homes may
        // re-register, whichever comes first. Each try waits for its
        // answer until a window past `register_by` (as a pass's does), a
        // follow round until a window past it or past the followed view's
        // pass deadline, whichever is later, and neither past `settle_by`.
        let window = self.handoff.max(Duration::from_millis(20));
        let margin = self.reregister_pause().max(Duration::from_millis(50));
        let settle_by = answer_by.map(|by| by.checked_sub(margin).unwrap_or(by));
        let register_by = settle_by.map_or(deadline_after(self.reregister_for()), |by| {
            by.min(deadline_after(self.reregister_for()))
        });
        let follow_by = || {
            let after = self
                .current_pass_deadline()
                .map_or(register_by, |(_, deadline)| deadline.max(register_by));
            let by = after.checked_add(window).unwrap_or(after);
            settle_by.map_or(by, |settle_by| settle_by.min(by))
        };
        let registered = if confirmed && usable(self) {
            let node = ClusterNode {
                inner: self.clone(),
            };
            let register = DirectoryRequest::Register {
                grain: grain.clone(),
                home: address.clone(),
                existing: true,
            };
            // An owner that has not learnt of a view change yet, or does
            // not see this silo yet, answers `Retry`: asked again after
            // each pause of node rule 3's rounds, for as long as a view's
            // homes may re-register (calls wait meanwhile: it is moving).
            let mut first = true;
            loop {
                // To the owner recorded below.
                let owner = self.entry_owner(&grain, &self.view());
                let now = Instant::now();
                // As a pass's try: its answer is waited for until a window
                // past `register_by`; but not past `settle_by` (the first
                // try at least a window).
                let mut try_for = register_by
                    .saturating_duration_since(now)
                    .saturating_add(window);
                if let Some(by) = settle_by {
                    try_for = try_for.min(by.saturating_duration_since(now));
                }
                if std::mem::take(&mut first) {
                    try_for = try_for.max(window);
                }
                let reply = tokio::time::timeout(
                    try_for,
                    node.directory_at(owner.as_ref(), register.clone()),
                )
                .await
                .unwrap_or(Ok(DirectoryReply::Retry));
                match reply {
                    Ok(DirectoryReply::Home(home)) if home == address => break Some(owner),
                    Ok(DirectoryReply::Home(_)) => {
                        why = "the entry's owner names another activation";
                        break None;
                    }
                    _ if !usable(self) => break None,
                    _ => {}
                }
                // No try starts after `register_by`.
                let now = Instant::now();
                if now < register_by {
                    tokio::time::sleep(self.reregister_pause().min(register_by - now)).await;
                }
                if Instant::now() >= register_by {
                    why = "the entry's owner did not take its registration in time";
                    break None;
                }
            }
        } else {
            None
        };
        let (serving, stale) = match registered.filter(|_| usable(self)) {
            Some(owner) => {
                // Still moving (calls wait) until it takes messages below.
                let recorded = match self.homes.get_mut(&grain) {
                    Some(mut home) if home.generation == generation => {
                        home.owner = owner.clone();
                        home.activation = address.activation;
                        true
                    }
                    _ => false,
                };
                // Node rule 3 (`home.rs`, `follow_owner`): a view's pass
                // passes over this home while it moves, so it follows its
                // owner itself, and stops moving (takes messages) under
                // the home's lock only if the view read there agrees with
                // the owner recorded: a pass that starts after that sees a
                // home no longer moving, and one that started before it
                // swapped in the view read there (then it follows again).
                // A refusal, or a view that keeps changing, leaves it
                // recorded with the owner it registered with; it then
                // re-registers on its own (`follow_later`), or, past the
                // view's pass deadline, is discarded.
                let mut owner = owner;
                let mut serving = false;
                // Serving recorded with an owner the view may not name.
                let mut stale = false;
                let given_up = "its home here was given up meanwhile";
                for round in 1..=SETTLE_FOLLOWS {
                    if !recorded {
                        why = given_up;
                        break;
                    }
                    let follow = self.follow_owner(&grain, generation, address.activation, owner);
                    // Out of time: taken for a refusal.
                    let followed = tokio::time::timeout(
                        follow_by().saturating_duration_since(Instant::now()),
                        follow,
                    )
                    .await
                    .unwrap_or(Err(RemoteError::Retry));
                    let refused = match followed {
                        Err(RemoteError::Moved(_)) => {
                            why = "the entry's new owner names another silo";
                            break;
                        }
                        Err(err) => {
                            tracing::debug!(%grain, error = %err, "an arrival did not follow its entry's new owner");
                            true
                        }
                        Ok(()) => false,
                    };
                    if !usable(self) {
                        break;
                    }
                    // Still this home (it may have been given up or
                    // replaced while it followed).
                    let Some(mut home) = self
                        .homes
                        .get_mut(&grain)
                        .filter(|home| home.generation == generation)
                    else {
                        why = given_up;
                        break;
                    };
                    let agreed = self.entry_owner(&grain, &self.view()) == home.owner;
                    if agreed || refused || round == SETTLE_FOLLOWS {
                        // Past the view's deadline, another silo may have
                        // claimed the grain from the owner it could not
                        // register with: `follow_later` would give it up
                        // at once, after the source heard it serves.
                        if !agreed && self.past_pass_deadline() {
                            why = "the entry's new owner did not take its registration before \
                                   the view's deadline";
                            break;
                        }
                        home.moving = None;
                        serving = true;
                        stale = !agreed;
                        break;
                    }
                    owner = home.owner.clone();
                }
                (serving, stale)
            }
            None => (false, false),
        };
        let settled = if serving {
            // Calls made here go here now, whatever the cache said before.
            self.remember(&grain, address.silo.clone());
            self.note_moved(&grain);
            arrival.confirm();
            if stale {
                // No view's pass saw it moving: it re-registers on its own.
                self.follow_later(&grain, generation);
            }
            tracing::debug!(%grain, "a grain arrived");
            MoveState::Here
        } else {
            drop(arrival);
            self.remove_home_of(&grain, generation);
            if confirmed {
                tracing::warn!(%grain, why, "an arriving grain the entry names was discarded");
            } else {
                tracing::debug!(%grain, "an arriving grain was discarded");
            }
            MoveState::Discarded(why.to_string())
        };
        let _ = arrived.send(settled);
    }

    /// This silo's etcd lease, what an entry moved here goes with (0 under
    /// gossip).
    fn lease_id(&self) -> i64 {
        match &self.directory {
            super::directory_client::DirectoryBackend::Partitioned => 0,
            #[cfg(feature = "etcd")]
            super::directory_client::DirectoryBackend::Etcd(etcd) => etcd.lease(),
        }
    }

    /// Tells the target `to` the verdict on the arrival of `ticket`, in
    /// the background.
    fn send_verdict(self: &Arc<Self>, to: &SiloId, ticket: u64, confirm: bool) {
        let (inner, to) = (self.clone(), to.clone());
        tokio::spawn(async move {
            let _ = inner
                .migration_call::<_, ()>(&to, "verdict", &VerdictRequest { ticket, confirm })
                .await;
        });
    }

    /// Rule 6: moves every home here whose type is migratable and declares
    /// device memory to another silo, a few at a time; what could not move
    /// is logged (it deactivates with the rest). Moves under way, out or
    /// in, reach their verdicts first where they can (for at most four call
    /// timeouts after the last batch): a grain whose arrival here is
    /// confirmed meanwhile, or whose own move out failed, is moved on by
    /// the next batch. A grain is tried at most `DRAIN_TRIES` times, again
    /// only after `Busy` or `NotActive` (another move held it, or its
    /// departure had not ended) while its home stays here; it stops once
    /// the node is stopped or fenced.
    pub(super) async fn migrate_gpu_homes(self: &Arc<Self>) {
        let mut tries: HashMap<GrainId, u32> = HashMap::new();
        let (mut moved, mut count) = (0usize, 0usize);
        let mut wait_until = deadline_after(self.config.connection.call_timeout.saturating_mul(4));
        while !self.stopped.load(Ordering::Acquire) && !self.fence.is_fenced() {
            // Confirmed and not moving: an arriving home has no owner yet,
            // and a moving one is another move's.
            let batch: Vec<GrainId> = self
                .homes
                .iter()
                .filter(|home| {
                    let grain = home.key();
                    home.owner.is_some()
                        && home.moving.is_none()
                        && tries.get(grain).is_none_or(|&tried| tried < DRAIN_TRIES)
                        && self.home_side.is_migratable(&grain.type_name)
                        && self.gpu_bytes(&grain.type_name).is_some()
                })
                .map(|home| home.key().clone())
                .collect();
            if batch.is_empty() {
                // Moves begun otherwise (a grain's own, or one arriving
                // here) reach their verdicts before the node stops, for a
                // while.
                let under_way = self.homes.iter().any(|home| home.moving.is_some());
                if !under_way || Instant::now() >= wait_until {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            let first = batch
                .iter()
                .filter(|grain| !tries.contains_key(*grain))
                .count();
            count += first;
            let outcomes: Vec<(GrainId, Result<Migrated, MigrationError>)> =
                futures_util::stream::iter(batch)
                    .map(|grain| async move {
                        let outcome = self
                            .migrate_here_detached(&grain, &MigrationTarget::Any)
                            .await;
                        (grain, outcome)
                    })
                    .buffer_unordered(DRAIN_AT_ONCE)
                    .collect()
                    .await;
            let mut again = false;
            for (grain, outcome) in outcomes {
                let tried = tries.entry(grain.clone()).or_default();
                match outcome {
                    Ok(_) => {
                        moved += 1;
                        *tried = DRAIN_TRIES;
                    }
                    Err(MigrationError::Busy { .. } | MigrationError::NotActive { .. })
                        if *tried + 1 < DRAIN_TRIES =>
                    {
                        *tried += 1;
                        again = true;
                    }
                    Err(err) => {
                        *tried = DRAIN_TRIES;
                        tracing::warn!(%grain, error = %err, "a GPU grain did not move off a leaving silo");
                    }
                }
            }
            if again {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            wait_until = deadline_after(self.config.connection.call_timeout.saturating_mul(4));
        }
        if count > 0 {
            tracing::info!(moved, of = count, "GPU grains moved off the leaving silo");
        }
    }

    /// Rule 2: waits until a moving grain's outcome is known, at most the
    /// call timeout; where it went, if it left.
    pub(super) async fn wait_for_move(
        &self,
        mut moving: watch::Receiver<MoveState>,
    ) -> Result<Option<SiloId>, RemoteError> {
        let wait = self.config.connection.call_timeout;
        match tokio::time::timeout(wait, moving.wait_for(|state| *state != MoveState::Moving)).await
        {
            Ok(Ok(state)) => Ok(match &*state {
                MoveState::Moved(to) => Some(to.clone()),
                _ => None,
            }),
            // The move's sender went without a verdict (its task ended
            // abnormally): the caller asks again.
            Ok(Err(_)) => Err(RemoteError::Retry),
            Err(_) => Err(RemoteError::Retry),
        }
    }
}
