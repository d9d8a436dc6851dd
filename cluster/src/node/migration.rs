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
//!    activation limit, and promise the device memory the type declares
//!    (rule 5 of `node/mod.rs`, the same promise a first call takes). The
//!    reservation holds until the state arrives, is released, or expires
//!    after twice the call timeout.
//! 2. **Calls wait, then follow.** The source marks the home moving: calls
//!    that reach it now (from references here, whose lease is ended, and
//!    from other silos) wait for the outcome and then go where the grain
//!    lives (`Moved`, or on here if it stayed). The calls already admitted
//!    finish first (the home's pins drain, bounded by the call timeout);
//!    then the activation departs between two turns, running what its
//!    mailbox held. Each sender's calls keep their order: a call waits
//!    until the one before it was answered, here or at the new home.
//! 3. **The state travels, then the switch.** The dehydrated state goes to
//!    the target in chunks below the frame limit. The target makes the
//!    activation (`rehydrate`, then `on_activate`), then moves the
//!    directory entry with a compare: from the source's activation to its
//!    own (`DirectoryRequest::Switch`, refused if the entry names anyone
//!    else). Only once the entry names it does the target's activation
//!    take messages; otherwise it ends without `on_deactivate`.
//! 4. **Exactly one activation.** The source lets its grain go only once
//!    the target answered that the entry names it. A target that refuses
//!    (no switch: it holds nothing) leaves the grain running at the
//!    source. When the answer is lost (the target died, or the network
//!    failed), the source settles it through the directory: it renumbers
//!    its own entry with a compare from its activation, so a switch still
//!    on its way is refused; if the entry names the target instead, the
//!    grain moved; if it names neither (or the directory cannot be
//!    reached within the call timeout), the source ends its activation
//!    without `on_deactivate` and the grain has at most one, the target's
//!    or none until its next call. Persisted state was written by the
//!    grain's `dehydrate`, before the switch, with its ETag.
//! 5. **Asking from anywhere.** `GrainRef::migrate` on any silo reaches
//!    the grain's home (this silo's, or the one the directory names), and
//!    the home runs the move. A grain with no activation is not moved.
//! 6. **A graceful leave moves GPU grains first.** `ClusterNode::leave`
//!    first marks the node draining: it becomes home to no new grain
//!    (`NoRoom`, so callers place elsewhere) and reserves room for no
//!    grain moving in. Then every home here whose type is migratable and
//!    declares device memory moves to wherever placement picks, a few at
//!    a time, for at most the call timeout; only then does the node stop
//!    serving, and the rest deactivate as before (writing their state).
//!    A GPU grain that could not move deactivates too.
//!
//! Requests travel as the reserved grain type [`MIGRATION`]: `move` (rule
//! 5), `reserve` and `release` (rule 1), `layout`, `stage/...` and
//! `arrive` (rule 3), each answered with a `Result<_, MigrationError>`;
//! all but `move` and `reserve` are taken only from the silo that
//! reserved.

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
use super::router::deadline_after;
use super::{ClusterNode, Inner};
use crate::SiloId;
use crate::connection::InboundRequest;
use crate::directory::ActivationAddress;
use crate::placement::PlacementRequest;
use crate::wire::RemoteError;

/// The reserved grain type of migration requests.
pub(super) const MIGRATION: &str = "$migration";

/// The most bytes one dehydrated state may have (rule 3).
pub(super) const MAX_STATE: u64 = 4 << 30;

/// Chunks of the state in flight at once (rule 3).
const STAGE_AT_ONCE: usize = 4;

/// Grains moving off a leaving silo at once (rule 6).
const DRAIN_AT_ONCE: usize = 8;

fn no_reservation() -> MigrationError {
    MigrationError::Unsupported {
        reason: "no reservation for this state (it expired, or was released)".into(),
    }
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

/// Room a target holds for a grain on its way (rule 1).
pub(super) struct Reservation {
    grain: GrainId,
    _promise: Promise,
    /// The state's parts as they arrive, once their layout is known.
    parts: Option<Vec<(String, Vec<u8>)>>,
    received: u64,
    total: u64,
}

/// What the source learnt of the target's answer (rule 4).
enum Outcome {
    /// The entry names the target.
    Moved(SiloId),
    /// The grain stays here, running.
    Stayed(MigrationError),
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
    async fn migrate_here_detached(
        self: &Arc<Self>,
        grain: &GrainId,
        target: &MigrationTarget,
    ) -> Result<Migrated, MigrationError> {
        let (inner, grain, target) = (self.clone(), grain.clone(), target.clone());
        tokio::spawn(async move { inner.migrate_here(&grain, &target).await })
            .await
            .unwrap_or(Err(MigrationError::ShutDown))
    }

    /// Moves `grain`, whose home is here, to `target` (rules 1 to 4).
    async fn migrate_here(
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
        // Rule 1: room at the target first.
        let (to, ticket) = self.reserve_at(grain, target).await?;
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
            if let Some(mut home) = self.homes.get_mut(grain) {
                if home.generation == generation {
                    home.moving = None;
                }
            }
            let _ = moving.send(MoveState::Here);
            self.release_at(&to, ticket);
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
        // Rule 3, then rule 4.
        let outcome = match self.send_state(&to, ticket, grain, &from, state).await {
            Ok(Ok(home)) if home.silo == to => Outcome::Moved(to.clone()),
            // Refused before any switch: the target holds nothing.
            Ok(Err(
                err @ (MigrationError::Conflict { .. }
                | MigrationError::Hook { .. }
                | MigrationError::Busy { .. }
                | MigrationError::NoTarget { .. }
                | MigrationError::NotMigratable { .. }
                | MigrationError::ShutDown),
            )) => Outcome::Stayed(err),
            Ok(Ok(_)) => {
                self.settle(grain, &from, &to, "the target named another home")
                    .await
            }
            Ok(Err(err)) => self.settle(grain, &from, &to, &err.to_string()).await,
            Err(reason) => self.settle(grain, &from, &to, &reason).await,
        };
        match &outcome {
            Outcome::Moved(to) => tracing::trace!(%grain, %to, "the target holds the grain"),
            Outcome::Stayed(err) => tracing::debug!(%grain, error = %err, "the grain stays"),
            Outcome::Unknown(why) => {
                tracing::warn!(%grain, %why, "whether the grain moved is unknown; its activation here ends")
            }
        }
        match outcome {
            Outcome::Moved(to) => {
                self.remove_home_of(grain, generation);
                self.remember(grain, to.clone());
                let _ = moving.send(MoveState::Moved(to.clone()));
                departure.commit().await;
                let took = started.elapsed();
                self.stats.migrated(took, bytes);
                tracing::debug!(%grain, %to, bytes, ?took, "migrated");
                Ok(Migrated {
                    from: self.id().to_string(),
                    to: to.to_string(),
                    bytes,
                    took,
                })
            }
            Outcome::Stayed(err) => {
                departure.abort();
                self.stats.migration_failed();
                Err(stay(err))
            }
            Outcome::Unknown(reason) => {
                self.remove_home_of(grain, generation);
                let _ = moving.send(MoveState::Here);
                departure.commit().await;
                self.stats.migration_failed();
                let node = ClusterNode {
                    inner: self.clone(),
                };
                // Best effort: the next call places the grain afresh.
                let _ = node
                    .directory(DirectoryRequest::Unregister {
                        grain: grain.clone(),
                        home: from.silo.clone(),
                        activation: Some(from.activation),
                    })
                    .await;
                Err(MigrationError::Unknown {
                    grain: grain.clone(),
                    reason,
                })
            }
        }
    }

    /// Rule 1: reserves room for `grain` at the silo `target` names, or at
    /// the first of the placement's picks that has it.
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
            if matches!(target, MigrationTarget::Silo(_)) {
                break;
            }
        }
        Err(last.unwrap_or_else(|| MigrationError::NoTarget {
            grain: grain.clone(),
            reason: "no other silo hosts its type".into(),
        }))
    }

    /// The silos `grain` may move to, best first: the one `target` names,
    /// or up to three picks of the placement among the others that host
    /// its type.
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
        match target {
            MigrationTarget::Silo(name) => {
                let named = |silo: &SiloId| silo.to_string() == *name || silo.address == *name;
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
                let me = self.id();
                let mut picks = Vec::new();
                while picks.len() < 3 && !hosts.is_empty() {
                    let request = PlacementRequest {
                        grain,
                        caller: &me,
                        needs: self.needs.get(&grain.type_name),
                    };
                    let Ok(pick) = self.placement.place(&request, &hosts) else {
                        break;
                    };
                    hosts.retain(|member| member.silo != pick);
                    picks.push(pick);
                }
                if picks.is_empty() {
                    return Err(MigrationError::NoTarget {
                        grain: grain.clone(),
                        reason: "no other silo hosts its type".into(),
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
    ) -> Result<Result<ActivationAddress, MigrationError>, String> {
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

    /// Rule 4: the target's answer was lost; the directory decides.
    async fn settle(
        self: &Arc<Self>,
        grain: &GrainId,
        from: &ActivationAddress,
        to: &SiloId,
        why: &str,
    ) -> Outcome {
        let node = ClusterNode {
            inner: self.clone(),
        };
        let renumbered = ActivationAddress {
            silo: self.id(),
            activation: self.next_activation.fetch_add(1, Ordering::Relaxed),
        };
        let give_up = deadline_after(self.config.connection.call_timeout);
        loop {
            // A node that stopped (killed, left, fenced for good) decides
            // nothing more: its activation ends with it.
            if self.stopped.load(Ordering::Acquire) {
                return Outcome::Unknown(format!("{why}; this silo stopped"));
            }
            let request = DirectoryRequest::Switch {
                grain: grain.clone(),
                from: from.clone(),
                to: renumbered.clone(),
                claim_vacant: false,
            };
            match node.directory(request).await {
                Ok(DirectoryReply::Home(home)) if home == renumbered => {
                    if let Some(mut entry) = self.homes.get_mut(grain) {
                        entry.activation = renumbered.activation;
                    }
                    return Outcome::Stayed(MigrationError::Unavailable {
                        grain: grain.clone(),
                        reason: why.to_string(),
                    });
                }
                Ok(DirectoryReply::Home(home)) if home.silo == *to => {
                    return Outcome::Moved(home.silo);
                }
                Ok(DirectoryReply::Home(_)) => {
                    return Outcome::Unknown(format!(
                        "{why}; the directory entry then named neither silo"
                    ));
                }
                // No entry: its owner changed (the old one died) and this
                // home has not re-registered with the new one yet (rule 3
                // of `node/mod.rs`), or it is gone for good; asked again
                // until the call timeout.
                Ok(DirectoryReply::Retry | DirectoryReply::Unknown) | Err(_)
                    if Instant::now() < give_up =>
                {
                    tokio::time::sleep(self.handoff / 8).await;
                }
                Ok(DirectoryReply::Retry | DirectoryReply::Unknown) | Err(_) => {
                    return Outcome::Unknown(format!(
                        "{why}; the directory did not settle the grain's entry"
                    ));
                }
            }
        }
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
        if self.homes.contains_key(&grain) {
            return Err(MigrationError::Busy { grain });
        }
        if self.silo.at_activation_limit() {
            return Err(no_target("it holds its activation limit"));
        }
        let promise = self
            .promise(&grain.type_name)
            .map_err(|_| no_target("no device has room for the type's declared memory"))?;
        let key = (from.clone(), asked.ticket);
        self.reservations.insert(
            key.clone(),
            Reservation {
                grain,
                _promise: promise,
                parts: None,
                received: 0,
                total: 0,
            },
        );
        let inner = Arc::downgrade(self);
        let expires = self.config.connection.call_timeout.saturating_mul(2);
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
        let Some(place) = place else {
            return Err(MigrationError::Hook {
                grain: reservation.grain.clone(),
                reason: "a chunk outside its state's layout".into(),
            });
        };
        place.copy_from_slice(bytes);
        reservation.received += bytes.len() as u64;
        Ok(())
    }

    /// Rule 3 at the target: makes the activation and switches the entry.
    async fn arrive(
        self: &Arc<Self>,
        from: &SiloId,
        asked: Arrive,
    ) -> Result<ActivationAddress, MigrationError> {
        let grain = asked.grain;
        let Some((_, mut reservation)) = self
            .reservations
            .remove_if(&(from.clone(), asked.ticket), |_, reservation| {
                reservation.grain == grain
            })
        else {
            return Err(MigrationError::Unsupported {
                reason: "no reservation for this grain (it expired?)".into(),
            });
        };
        let (Some(parts), true) = (
            reservation.parts.take(),
            reservation.received == reservation.total,
        ) else {
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
        let fail = |err: MigrationError| {
            self.remove_home_of(&grain, generation);
            let _ = arrived.send(MoveState::Here);
            err
        };
        let arrival = match self.home_side.arrive(&grain, state).await {
            Ok(arrival) => arrival,
            Err(err) => {
                tracing::debug!(%grain, error = %err, "an arriving grain did not start");
                return Err(fail(err));
            }
        };
        // The activation holds its own device memory now.
        drop(reservation);
        let to = ActivationAddress {
            silo: self.id(),
            activation: self.next_activation.fetch_add(1, Ordering::Relaxed),
        };
        let node = ClusterNode {
            inner: self.clone(),
        };
        // Patient while the directory settles (a source that died leaves
        // its entries to their next owner), but answering the source
        // before it gives up on this request.
        let settle_by = deadline_after(self.config.connection.call_timeout / 2);
        let switched = loop {
            if self.stopped.load(Ordering::Acquire) {
                break Err(MigrationError::ShutDown);
            }
            let request = DirectoryRequest::Switch {
                grain: grain.clone(),
                from: asked.from.clone(),
                to: to.clone(),
                claim_vacant: true,
            };
            match node.directory(request).await {
                Ok(DirectoryReply::Home(home)) if home == to => break Ok(()),
                Ok(DirectoryReply::Home(_) | DirectoryReply::Unknown) => {
                    break Err(MigrationError::Conflict {
                        grain: grain.clone(),
                    });
                }
                Ok(DirectoryReply::Retry) | Err(_) if Instant::now() < settle_by => {
                    tokio::time::sleep(self.handoff / 8).await;
                }
                Ok(DirectoryReply::Retry) => {
                    break Err(MigrationError::Unavailable {
                        grain: grain.clone(),
                        reason: "the directory did not settle".into(),
                    });
                }
                Err(err) => {
                    break Err(MigrationError::Unavailable {
                        grain: grain.clone(),
                        reason: err.to_string(),
                    });
                }
            }
        };
        if let Err(err) = switched {
            tracing::debug!(%grain, error = %err, "an arriving grain's switch failed");
            drop(arrival);
            return Err(fail(err));
        }
        let owner = self.entry_owner(&grain, &self.view());
        if let Some(mut home) = self.homes.get_mut(&grain) {
            if home.generation == generation {
                home.owner = owner;
                home.activation = to.activation;
                home.moving = None;
            }
        }
        // Calls made here go here now, whatever the cache said before.
        self.remember(&grain, to.silo.clone());
        arrival.confirm();
        let _ = arrived.send(MoveState::Here);
        tracing::debug!(%grain, home = %to.silo, "a grain arrived");
        Ok(to)
    }

    /// Rule 6: moves every home here whose type is migratable and declares
    /// device memory to another silo, a few at a time, for at most the
    /// call timeout; what could not move is logged (it deactivates with
    /// the rest).
    pub(super) async fn migrate_gpu_homes(self: &Arc<Self>) {
        let gpu_grains: Vec<GrainId> = self
            .homes
            .iter()
            .filter(|home| {
                let grain = home.key();
                home.owner.is_some()
                    && self.home_side.is_migratable(&grain.type_name)
                    && self
                        .needs
                        .get(&grain.type_name)
                        .is_some_and(|needs| needs.device_memory > 0)
            })
            .map(|home| home.key().clone())
            .collect();
        if gpu_grains.is_empty() {
            return;
        }
        let count = gpu_grains.len();
        let moving = futures_util::stream::iter(gpu_grains)
            .map(|grain| async move {
                let moved = self.migrate_here_detached(&grain, &MigrationTarget::Any).await;
                if let Err(err) = &moved {
                    tracing::warn!(%grain, error = %err, "a GPU grain did not move off a leaving silo");
                }
                moved.is_ok()
            })
            .buffer_unordered(DRAIN_AT_ONCE)
            .collect::<Vec<bool>>();
        match tokio::time::timeout(self.config.connection.call_timeout, moving).await {
            Ok(moved) => {
                let moved = moved.into_iter().filter(|moved| *moved).count();
                tracing::info!(moved, of = count, "GPU grains moved off the leaving silo");
            }
            Err(_) => tracing::warn!(
                of = count,
                "moving GPU grains off the leaving silo outlasted the call timeout"
            ),
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
            // The move's sender went without a verdict: ask again.
            Ok(Err(_)) => Ok(None),
            Err(_) => Err(RemoteError::Retry),
        }
    }
}
