//! The serving side of a grain's home: a call arriving here registers
//! the home and runs on the local silo (rule 2), homes re-register or
//! go when the view changes (rule 3; connections to silos gone close,
//! rule 4), device memory is promised to a grain becoming home (rule 5),
//! and a home whose activation ended is given up (rule 6): the rules
//! of the protocol in `node/mod.rs`.

use std::collections::{HashMap, HashSet};

use futures_util::StreamExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use granary_actors::GrainId;
use granary_actors::route::HomeLease;

use super::directory_client::{DirectoryReply, DirectoryRequest};
use super::router::deadline_after;
use super::{ClusterNode, Inner};
use crate::SiloId;
use crate::connection::InboundRequest;
use crate::directory::ActivationAddress;
use crate::membership::Member;
use crate::wire::RemoteError;

/// A grain this silo is home to, or is becoming home to.
#[derive(Debug, Clone)]
pub(super) struct Home {
    /// The owner of its directory entry it registered with; `None` while
    /// no registration has been confirmed (rule 6).
    pub(super) owner: Option<SiloId>,
    /// The activation number the entry holds (unregistering names it).
    pub(super) activation: u64,
    /// Calls pinning the home: from before their registration until the
    /// local silo has answered them. While any is, the activation may be
    /// starting, so the home is kept (rule 6).
    pub(super) in_flight: u32,
    /// The entry may name this silo although no registration was
    /// confirmed (a registration whose answer was lost, or an entry found
    /// when the device was full): removed when the home is (rule 6).
    maybe_registered: bool,
    /// Its activation ended and its entry is being removed: calls are
    /// answered `Retry` until it is gone (rule 6).
    pub(super) leaving: bool,
    /// Tells this home from a later one for the same grain, so that a pin
    /// taken on a home that was since removed never counts against its
    /// successor.
    pub(super) generation: u64,
    /// Handed to the grain references that reached the home here once it
    /// is confirmed: while valid they deliver into its open mailbox without
    /// the router. Invalidated whenever the home stops being confirmed
    /// with its entry's current owner: removed, leaving, or a view change.
    lease: Arc<HomeLease>,
    /// While the grain moves away or arrives (`migration.rs`): calls
    /// wait for the move's outcome, then go where the grain lives.
    pub(super) moving: Option<tokio::sync::watch::Receiver<super::migration::MoveState>>,
}

impl Home {
    /// The home of a grain arriving from another silo (`migration.rs` rule
    /// 3): unconfirmed, and calls wait on `moving` until its switch.
    pub(super) fn arriving(
        generation: u64,
        moving: tokio::sync::watch::Receiver<super::migration::MoveState>,
    ) -> Home {
        Home {
            owner: None,
            activation: 0,
            in_flight: 0,
            maybe_registered: false,
            leaving: false,
            generation,
            lease: HomeLease::ended(),
            moving: Some(moving),
        }
    }

    /// Ends the lease handed out for this home.
    pub(super) fn end_lease(&self) {
        self.lease.invalidate();
    }
}

impl ClusterNode {
    /// Forgets every home and deactivates its activation here, waiting
    /// until each has ended (its queued messages run and `on_deactivate`
    /// wrote its state), for at most the connection's call timeout.
    pub(super) async fn deactivate_homes(&self) {
        self.deactivate_homes_within(Some(self.inner.config.connection.call_timeout))
            .await;
    }

    /// As [`ClusterNode::deactivate_homes`], waiting at most `bound` for
    /// the activations to end, or (`None`) until they have, warning every
    /// call timeout (a fence that lifted while one still ran could run it
    /// beside the grain's new home; rule 7).
    pub(super) async fn deactivate_homes_within(&self, bound: Option<Duration>) {
        let warn_every = self.inner.config.connection.call_timeout;
        let give_up = bound.map(deadline_after);
        let mut warn_at = deadline_after(warn_every);
        // The caller stopped (or fenced) the node first, so no new call
        // gets past `admit`; a call already past it holds its pin until
        // the local silo answered it, and may be starting an activation:
        // wait for those, so that every activation started is deactivated.
        self.inner.end_leases();
        while self.inner.homes.iter().any(|home| home.in_flight > 0) {
            if give_up.is_some_and(|at| Instant::now() >= at) {
                tracing::warn!("calls pinning homes outlived their node's leave");
                break;
            }
            if Instant::now() >= warn_at {
                tracing::warn!("calls pinning homes are still running; waiting for them");
                warn_at = deadline_after(warn_every);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut homes: Vec<GrainId> = Vec::new();
        self.inner.homes.retain(|grain, home| {
            home.end_lease();
            homes.push(grain.clone());
            false
        });
        let silo = &self.inner.silo;
        futures_util::future::join_all(homes.into_iter().map(|grain| async move {
            // Queued only: the activation ends later.
            if let Err(err) = silo
                .deactivate_named(&grain.type_name, grain.key.clone())
                .await
            {
                tracing::debug!(error = %err, "an activation did not deactivate");
            }
            let mut warn_at = deadline_after(warn_every);
            while silo.is_active_named(&grain.type_name, &grain.key) {
                if give_up.is_some_and(|at| Instant::now() >= at) {
                    tracing::warn!(%grain, "an activation outlived its node's leave");
                    return;
                }
                if Instant::now() >= warn_at {
                    tracing::warn!(%grain, "an activation is still running; waiting for it to end");
                    warn_at = deadline_after(warn_every);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }))
        .await;
    }
}

/// How many times a home just registered registers again when the view
/// keeps changing under it (rule 3: `follow_owner`), before giving up.
const FOLLOW_REGISTRATIONS: u32 = 2;

/// Homes re-registered at once with one owner after a view change (rule
/// 3).
const REREGISTER_AT_ONCE: usize = 32;

/// The least window a re-registration's try waits past `give_up_at`
/// (rule 3), whatever the window: a round trip's worth. Pauses between
/// rounds are at least a quarter of it, and the time in which tries may
/// start at least eight times it.
const REREGISTER_FLOOR: Duration = Duration::from_millis(20);

/// A home to re-register after a view change (rule 3).
#[derive(Clone)]
struct Reregistering {
    grain: GrainId,
    /// This silo and the activation number the entry holds.
    proposed: ActivationAddress,
    /// The home's generation: a later home for the grain is not this one.
    generation: u64,
}

impl Reregistering {
    /// Whether `current` is this home still, not leaving (its entry is
    /// being removed: rule 6) and not moving (its migration registers it).
    fn is_this(&self, current: &Home) -> bool {
        current.generation == self.generation && !current.leaving && current.moving.is_none()
    }
}

impl Inner {
    /// Handles a request for `grain` that arrived from another silo (rule
    /// 2): makes this silo its home, then dispatches it to the local
    /// activation in the sender's chain, until its deadline.
    pub(super) async fn host(
        self: &Arc<Self>,
        grain: &GrainId,
        request: &InboundRequest,
    ) -> Result<Vec<u8>, RemoteError> {
        // A name this silo does not know is refused before the grain is
        // made a home here (a peer built from another binary).
        self.silo
            .check_named(&grain.type_name, &request.message, request.kind)
            .map_err(RemoteError::from)?;
        let _admitted = self.admit(grain).await?;
        self.home_side
            .dispatch(granary_actors::route::InboundRequest {
                grain_type: &grain.type_name,
                key: grain.key.clone(),
                message: &request.message,
                payload: &request.payload,
                kind: request.kind,
                chain: request.chain,
                // Counted from when the request arrived: a registration on
                // the way does not extend the sender's deadline.
                time_left: request.time_left_now(),
            })
            .await
            // A message dropped with a home given up (rule 7) reaches the
            // caller as `Unavailable`: it may have run (the turn that was
            // running then finishes), so it is not retried for the caller.
            .map_err(RemoteError::from)
    }

    /// Makes this silo `grain`'s home for one message (rules 2, 5 and 6):
    /// pins the home, promises device memory to a grain becoming home, and
    /// registers it with its entry's owner. The home stays pinned until
    /// the returned guard is dropped, once the local silo has answered.
    pub(super) async fn admit(self: &Arc<Self>, grain: &GrainId) -> Result<Admitted, RemoteError> {
        // Leases handed out from here on are checked against this.
        let epoch = self.lease_epoch.load(Ordering::SeqCst);
        if self.stopped.load(Ordering::Acquire) || !self.holds_lease() {
            return Err(RemoteError::ShutDown);
        }
        // Rule 7: a fenced silo becomes home to nothing; the caller asks
        // the directory again.
        if self.fence.is_fenced() {
            return Err(RemoteError::Retry);
        }
        // Rule 2: a type this silo does not host (an external client hosts
        // none) is placed elsewhere.
        if !self.hosts.contains(&grain.type_name) {
            return Err(RemoteError::NoRoom);
        }
        // Rule 6: the home is pinned from before its registration until
        // the local silo has answered, so it is never given up while this
        // call may be registering it or starting its activation. A grain
        // that is moving is waited for (`migration.rs` rule 2).
        let (registered_with, pin) = loop {
            // Bound first: the map's guard must not live across the wait.
            let moving = self.homes.get(grain).and_then(|home| home.moving.clone());
            if let Some(moving) = moving {
                if let Some(moved) = self.wait_for_move(moving).await? {
                    return Err(RemoteError::Moved(moved));
                }
            }
            match self.pin(grain) {
                Err(RemoteError::Retry)
                    if self
                        .homes
                        .get(grain)
                        .is_some_and(|home| home.moving.is_some()) => {}
                pinned => break pinned?,
            }
        };
        // Rule 5: never become home to a grain whose device needs do not
        // fit here now (placement decided on load that may be stale); the
        // memory is promised until the call that activates it returns.
        let promise = match registered_with {
            // The silo's activation limit (rule 14 of the silo) is room
            // too: a new home here would be refused its activation. A
            // draining silo has room for nothing new (`migration.rs` rule
            // 6): the caller places the grain elsewhere.
            None if self.silo.at_activation_limit() || self.draining.load(Ordering::Acquire) => {
                pin.suspect_entry();
                return Err(RemoteError::NoRoom);
            }
            None => match self.promise(&grain.type_name) {
                Ok(promise) => Some(promise),
                Err(no_room) => {
                    // An entry naming this silo may be left from before;
                    // it would send every caller back here.
                    pin.suspect_entry();
                    return Err(no_room);
                }
            },
            Some(_) => None,
        };
        // Read after the wait for a move above, which may be long; the
        // registration goes to the owner recorded.
        let owner = self.entry_owner(grain, &self.view());
        if registered_with.is_none() || registered_with != owner {
            let node = ClusterNode {
                inner: self.clone(),
            };
            let proposed = ActivationAddress {
                silo: self.id(),
                activation: self.next_activation.fetch_add(1, Ordering::Relaxed),
            };
            match node
                .directory_at(
                    owner.as_ref(),
                    DirectoryRequest::Register {
                        grain: grain.clone(),
                        home: proposed,
                        existing: registered_with.is_some(),
                    },
                )
                .await
            {
                Ok(DirectoryReply::Home(home)) if self.is_me(&home.silo) => {
                    match self.homes.get_mut(grain) {
                        Some(mut entry) if entry.generation == pin.generation => {
                            entry.owner = owner.clone();
                            entry.activation = home.activation;
                            entry.maybe_registered = false;
                        }
                        // The home was lost or replaced meanwhile: ask
                        // again rather than serve without it.
                        _ => return Err(RemoteError::Retry),
                    }
                    // A refusal leaves the home recorded with the owner it
                    // registered with: it re-registers on its own
                    // (`follow_later`), the caller's next try registers it
                    // again (that owner is not the view's), and a fresh
                    // home no call pins any more is let go with its pin.
                    match self
                        .follow_owner(grain, pin.generation, home.activation, owner)
                        .await
                    {
                        Ok(()) => {}
                        Err(RemoteError::Moved(to)) => {
                            // Lost to another silo meanwhile.
                            self.remove_this_home(grain, |home| home.generation == pin.generation);
                            return Err(RemoteError::Moved(to));
                        }
                        Err(err) => {
                            // A home this call leaves behind (kept by its
                            // activation or another call) re-registers on
                            // its own.
                            self.follow_later(grain, pin.generation);
                            return Err(err);
                        }
                    }
                }
                Ok(DirectoryReply::Home(home)) => {
                    // Lost: stop serving it, and let its activation here
                    // (if it was home before) go.
                    if registered_with.is_some() && self.remove_home(grain) {
                        self.release(grain);
                    }
                    return Err(RemoteError::Moved(home.silo));
                }
                Ok(DirectoryReply::Retry | DirectoryReply::Unknown) => {
                    return Err(RemoteError::Retry);
                }
                Err(err) => {
                    // The registration may have been made and its answer
                    // lost.
                    pin.suspect_entry();
                    return Err(RemoteError::Other(err.to_string()));
                }
            }
        }
        // A leave may have begun while this call registered: it must not
        // start an activation the leave would not wait for.
        if self.stopped.load(Ordering::Acquire) || !self.holds_lease() {
            return Err(RemoteError::ShutDown);
        }
        if self.fence.is_fenced() {
            return Err(RemoteError::Retry);
        }
        // The home is confirmed with its entry's owner now: references may
        // skip the router while that holds. A lease ended since is renewed
        // here, under the entry's lock; then the node's state is checked
        // again, so that a stop, a fence or a view change that ended leases
        // meanwhile ends this one too (either `end_leases` sees the new
        // lease, or this check sees what it did first).
        let lease = self.homes.get_mut(grain).and_then(|mut home| {
            if home.generation != pin.generation || home.owner.is_none() || home.leaving {
                return None;
            }
            if !home.lease.is_valid() {
                home.lease = HomeLease::new();
            }
            Some(home.lease.clone())
        });
        if let Some(lease) = &lease {
            if self.lease_epoch.load(Ordering::SeqCst) != epoch
                || self.stopped.load(Ordering::SeqCst)
                || self.fence.is_fenced()
                || !self.holds_lease()
            {
                lease.invalidate();
            }
        }
        Ok(Admitted {
            _pin: pin,
            _promise: promise,
            lease,
        })
    }

    /// Ends every lease handed out (a view change, or the node stopping);
    /// a home confirmed again hands out a new one.
    pub(super) fn end_leases(&self) {
        self.lease_epoch.fetch_add(1, Ordering::SeqCst);
        for home in self.homes.iter() {
            home.end_lease();
        }
    }

    /// Rule 3 for a home just registered with `owner` and recorded (by a
    /// call, or by an arrival: `migration.rs` rule 4). A view's
    /// re-registration passes over a home not confirmed yet or moving, so
    /// if the entry's owner changed while it registered, it registers
    /// again here (existing) with the owner of the view it reads after
    /// each record, until the two agree, at most `FOLLOW_REGISTRATIONS`
    /// times (then `Retry`). For a call's home, a pass that starts after a
    /// record sees it (both take the home's shard lock), and one that
    /// began before was started by the swap this read sees; an arrival,
    /// which passes skip while it moves, checks the view again when it
    /// stops moving (`settle_arrival`). `Moved`: the new owner names
    /// another silo (nothing here is removed; the caller lets go).
    pub(super) async fn follow_owner(
        self: &Arc<Self>,
        grain: &GrainId,
        generation: u64,
        activation: u64,
        mut owner: Option<SiloId>,
    ) -> Result<(), RemoteError> {
        for tries in 0..=FOLLOW_REGISTRATIONS {
            let now = self.entry_owner(grain, &self.view());
            if now == owner {
                return Ok(());
            }
            if tries == FOLLOW_REGISTRATIONS {
                return Err(RemoteError::Retry);
            }
            let node = ClusterNode {
                inner: self.clone(),
            };
            let reply = node
                .directory_at(
                    now.as_ref(),
                    DirectoryRequest::Register {
                        grain: grain.clone(),
                        home: ActivationAddress {
                            silo: self.id(),
                            activation,
                        },
                        existing: true,
                    },
                )
                .await;
            match reply {
                Ok(DirectoryReply::Home(home)) if self.is_me(&home.silo) => {
                    match self.homes.get_mut(grain) {
                        Some(mut entry) if entry.generation == generation => {
                            entry.owner = now.clone();
                            entry.activation = home.activation;
                        }
                        _ => return Err(RemoteError::Retry),
                    }
                    owner = now;
                }
                Ok(DirectoryReply::Home(home)) => return Err(RemoteError::Moved(home.silo)),
                Ok(DirectoryReply::Retry | DirectoryReply::Unknown) => {
                    return Err(RemoteError::Retry);
                }
                Err(err) => return Err(RemoteError::Other(err.to_string())),
            }
        }
        Err(RemoteError::Retry)
    }

    /// Removes `grain`'s home if `this_home` picks it, ending its lease,
    /// and releases the grain's activation here.
    fn remove_this_home(&self, grain: &GrainId, this_home: impl Fn(&Home) -> bool) {
        if let Some((_, home)) = self.homes.remove_if(grain, |_, home| this_home(home)) {
            home.end_lease();
            self.release(grain);
        }
    }

    /// Removes `grain`'s home, ending its lease; whether there was one.
    pub(super) fn remove_home(&self, grain: &GrainId) -> bool {
        match self.homes.remove(grain) {
            Some((_, home)) => {
                home.end_lease();
                true
            }
            None => false,
        }
    }

    /// Pins `grain`'s home here for one call (rule 6), creating it
    /// unconfirmed if there is none; returns the owner it is registered
    /// with, if confirmed. A leaving home is not pinned: `Retry`.
    fn pin(self: &Arc<Self>, grain: &GrainId) -> Result<(Option<SiloId>, InFlight), RemoteError> {
        // The common case, a home already here: no key to clone.
        let found = self.homes.get_mut(grain).map(|mut home| {
            if home.leaving || home.moving.is_some() {
                return Err(RemoteError::Retry);
            }
            home.in_flight += 1;
            Ok((home.owner.clone(), home.generation))
        });
        let (registered_with, generation) = match found {
            Some(found) => found?,
            None => self.pin_new(grain)?,
        };
        Ok((
            registered_with,
            InFlight {
                inner: self.clone(),
                grain: grain.clone(),
                generation,
            },
        ))
    }

    /// [`Inner::pin`] where no home was found: one is made unconfirmed,
    /// unless another call made one meanwhile.
    fn pin_new(self: &Arc<Self>, grain: &GrainId) -> Result<(Option<SiloId>, u64), RemoteError> {
        match self.homes.entry(grain.clone()) {
            dashmap::Entry::Occupied(entry)
                if entry.get().leaving || entry.get().moving.is_some() =>
            {
                Err(RemoteError::Retry)
            }
            dashmap::Entry::Occupied(mut entry) => {
                let home = entry.get_mut();
                home.in_flight += 1;
                Ok((home.owner.clone(), home.generation))
            }
            dashmap::Entry::Vacant(entry) => {
                let generation = self.next_activation.fetch_add(1, Ordering::Relaxed);
                entry.insert(Home {
                    owner: None,
                    activation: 0,
                    in_flight: 1,
                    maybe_registered: false,
                    leaving: false,
                    generation,
                    lease: HomeLease::ended(),
                    moving: None,
                });
                Ok((None, generation))
            }
        }
    }

    /// Rule 6: `grain`'s activation here ended, or a call to it returned.
    /// With no call pinning the home and no activation left, the home is
    /// given up: its directory entry is removed (if one may name this
    /// silo), and the next call places the grain afresh.
    pub(super) fn maybe_leave(self: &Arc<Self>, grain: &GrainId) {
        let unregister = {
            let Some(mut home) = self.homes.get_mut(grain) else {
                return;
            };
            // A home that is moving is the migration's to settle.
            if home.leaving
                || home.in_flight > 0
                || home.moving.is_some()
                || self.silo.is_active_named(&grain.type_name, &grain.key)
            {
                return;
            }
            let unregister = match (&home.owner, home.maybe_registered) {
                (Some(_), _) => Some(Some(home.activation)),
                (None, true) => Some(None),
                // Never registered: nothing names this silo.
                (None, false) => None,
            };
            if unregister.is_some() {
                home.leaving = true;
                home.end_lease();
            }
            unregister.map(|activation| (activation, home.generation))
        };
        let Some((activation, generation)) = unregister else {
            if let Some((_, home)) = self.homes.remove_if(grain, |_, home| {
                home.owner.is_none()
                    && home.in_flight == 0
                    && !home.leaving
                    && home.moving.is_none()
            }) {
                home.end_lease();
            }
            return;
        };
        let node = ClusterNode {
            inner: self.clone(),
        };
        let grain = grain.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.remove_home(&grain);
            return;
        };
        // The entry names this silo as it is now; once it comes back as a
        // new incarnation (rule 7), peers drop whatever names the old one,
        // and an unregister under the new name could remove the new one's
        // entry.
        let me = self.id();
        runtime.spawn(async move {
            let inner = &node.inner;
            // The owner may change on the way: ask whoever owns the entry
            // now, for a while. An entry left behind names this silo and
            // only this silo acts on it: it becomes home again, or, full,
            // removes it (rule 5).
            let settle_by = deadline_after(inner.handoff.saturating_mul(4));
            while !inner.stopped.load(Ordering::Acquire) && inner.is_me(&me) {
                let request = DirectoryRequest::Unregister {
                    grain: grain.clone(),
                    home: me.clone(),
                    activation,
                };
                match node.directory(request).await {
                    Ok(DirectoryReply::Home(_) | DirectoryReply::Unknown) => break,
                    Ok(DirectoryReply::Retry) | Err(_) if Instant::now() < settle_by => {
                        tokio::time::sleep(inner.handoff / 8).await;
                    }
                    Ok(DirectoryReply::Retry) | Err(_) => break,
                }
            }
            if inner
                .homes
                .remove_if(&grain, |_, home| {
                    home.leaving && home.generation == generation
                })
                .is_some()
            {
                inner.given_up.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    /// Promises the device memory a new grain of `grain_type` declares on
    /// the device here with the most memory free now beyond what is
    /// promised already, if one has it free now (rule 5), and with a
    /// rebalancer, if it stays below the high water mark (`rebalance.rs`
    /// rule 7); a type that declares none always fits. A first call's
    /// promise: refused (`NoRoom`), the caller places the grain on another
    /// silo, where its buffers need not wait.
    pub(super) fn promise(self: &Arc<Self>, grain_type: &str) -> Result<Promise, RemoteError> {
        self.promise_within(grain_type, None, Counted::FreeNow)
    }

    /// A migration's promise (`migration.rs` rule 1): [`Inner::promise`]
    /// on device `only` alone, if given (a move to a named device), with
    /// the device's room (`DeviceLoad::room`) counted instead of its free
    /// memory: requests' working memory comes back, and the arrival's
    /// buffers wait for it (the bridge's `resident.rs` rule 1), while a
    /// move the target refuses goes nowhere. Of the devices with room, the
    /// one with the most memory free now, then the most room. `NoRoom` if
    /// the node has no such device.
    pub(super) fn promise_on(
        self: &Arc<Self>,
        grain_type: &str,
        only: Option<usize>,
    ) -> Result<Promise, RemoteError> {
        self.promise_within(grain_type, only, Counted::Room)
    }

    /// Rule 5's promise, on device `only` if given, counting memory as
    /// `counted` says.
    fn promise_within(
        self: &Arc<Self>,
        grain_type: &str,
        only: Option<usize>,
        counted: Counted,
    ) -> Result<Promise, RemoteError> {
        let Some(needs) = self.needs.get(grain_type) else {
            if only.is_some_and(|device| device >= self.load().devices.len()) {
                return Err(RemoteError::NoRoom);
            }
            return Ok(Promise {
                inner: self.clone(),
                device: 0,
                bytes: 0,
            });
        };
        // Read under the lock that releases promises, so that a promise
        // dropped after its activation reserved is never missed.
        let mut promised = self.promised.lock().unwrap_or_else(PoisonError::into_inner);
        let devices = self.load().devices;
        let chosen = devices
            .into_iter()
            .enumerate()
            .filter(|(index, _)| only.is_none_or(|only| only == *index))
            .filter_map(|(index, device)| {
                let already = promised.get(&index).copied().unwrap_or(0);
                // `rebalance.rs` rule 7: past high water (what is settled
                // on the device, what is promised, and this grain), a GPU
                // grain goes elsewhere.
                let used_after = device
                    .settled_memory()
                    .saturating_add(already)
                    .saturating_add(needs.device_memory);
                // What is not promised yet: of its free memory, or for a
                // migration of its room (`DeviceLoad::room`: requests'
                // working memory comes back). Of those that fit, the one
                // with the most memory free now is chosen (its buffers
                // wait the least), then for a migration the one with the
                // most room.
                let room = device.room().saturating_sub(already);
                let free_now = device.free_memory.saturating_sub(already);
                // A first call's tie goes to the lowest index, as before
                // room was counted at all.
                let (counts, then) = match counted {
                    Counted::FreeNow => (free_now, 0),
                    Counted::Room => (room, room),
                };
                let fits = counts >= needs.device_memory;
                let under_pressure = needs.device_memory > 0
                    && self.config.rebalance.as_ref().is_some_and(|rebalance| {
                        rebalance.past_high_water(used_after, device.total_memory)
                    });
                (needs.suits(&device) && fits && !under_pressure)
                    .then_some((index, (free_now, then)))
            })
            .max_by_key(|(index, rank)| (*rank, std::cmp::Reverse(*index)));
        let Some((device, _)) = chosen else {
            return Err(RemoteError::NoRoom);
        };
        *promised.entry(device).or_default() += needs.device_memory;
        Ok(Promise {
            inner: self.clone(),
            device,
            bytes: needs.device_memory,
        })
    }

    /// Rule 3 and 4: the view changed from `before` to `after`; its
    /// hand-over window started at `changed_at`.
    pub(super) async fn on_view_change(
        self: &Arc<Self>,
        before: &[Member],
        after: &[Member],
        changed_at: Instant,
    ) {
        // Every home must be confirmed again with its entry's owner in the
        // new view before a reference may skip the router for it.
        self.end_leases();
        // Before anything here can wait: the last view's pass stops now.
        self.start_reregistering(after, changed_at);
        // Rule 8: reminder ownership moves with the view.
        let silo = self.silo.clone();
        tokio::spawn(async move {
            if let Err(err) = silo.rescan_reminders().await {
                tracing::warn!(error = %err, "rescanning reminders after a view change failed");
            }
        });
        let live: HashSet<&SiloId> = after.iter().map(|member| &member.silo).collect();
        let gone: Vec<SiloId> = before
            .iter()
            .filter(|member| !live.contains(&member.silo))
            .map(|member| member.silo.clone())
            .collect();
        for silo in &gone {
            self.partition.forget_silo(silo);
            self.cache.forget_silo(silo);
            self.open.remove(silo);
            let slot = self
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(silo);
            if let Some(slot) = slot {
                // A connect in progress holds the slot for up to the
                // handshake timeout: closed once it ends, beside the view
                // task, which goes on to the next view meanwhile.
                tokio::spawn(async move {
                    if let Some(connection) = slot.lock().await.connection.take() {
                        connection.close();
                    }
                });
            }
            self.accepted.lock().await.retain(|connection| {
                if connection.peer() == silo {
                    connection.close();
                    false
                } else {
                    true
                }
            });
        }
    }

    /// Re-registers the homes whose entry changed owner in `after`, whose
    /// hand-over window started at `changed_at` (rule 3), beside the view
    /// task, in place of the last view's pass, which is stopped. A stopped
    /// node starts none (`stop_tasks` takes the pass under the same lock,
    /// after `stopped` is set).
    fn start_reregistering(self: &Arc<Self>, after: &[Member], changed_at: Instant) {
        let epoch = self.view_epoch.load(Ordering::SeqCst);
        let give_up_at = changed_at
            .checked_add(self.reregister_for())
            .unwrap_or_else(|| deadline_after(self.reregister_for()));
        let mut reregistering = self
            .reregistering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(previous) = reregistering.take() {
            previous.abort();
        }
        // What `follow_later` follows until, from now on.
        *self
            .pass_deadline
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((epoch, give_up_at));
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        let inner = self.clone();
        let view = after.to_vec();
        *reregistering = Some(tokio::spawn(async move {
            inner.reregister_homes(&view, epoch, give_up_at).await;
        }));
    }

    /// How long after a view change its homes may re-register: twice the
    /// window (rule 3), and at least eight tries' floor, so that a window
    /// too short for a round trip still gives each home its tries.
    pub(super) fn reregister_for(&self) -> Duration {
        self.handoff
            .saturating_mul(2)
            .max(REREGISTER_FLOOR.saturating_mul(8))
    }

    /// The pause after each round of re-registration's tries (rule 3):
    /// an eighth of the window, and at least a quarter of the floor.
    pub(super) fn reregister_pause(&self) -> Duration {
        (self.handoff / 8).max(REREGISTER_FLOOR / 4)
    }

    /// Whether the view of `epoch` is still the one followed: a pass for
    /// an earlier view changes no home (its abort may come a poll late).
    fn still_current(&self, epoch: u64) -> bool {
        self.view_epoch.load(Ordering::SeqCst) == epoch
    }

    /// Re-registers, with its entry's owner in `view`, every confirmed
    /// home here that is not leaving or moving and whose entry changed
    /// owner (rule 3): tries start until `give_up_at`, and a try sent by
    /// then waits for its answer until a window past it. Each owner's homes are tried
    /// on their own (a silent owner holds up no other's), a few at a time
    /// each (so up to `REREGISTER_AT_ONCE` requests per owner at once).
    async fn reregister_homes(self: &Arc<Self>, view: &[Member], epoch: u64, give_up_at: Instant) {
        let me = self.id();
        // Not registered yet (its first call registers it), leaving (its
        // entry is being removed), or moving (its migration registers it
        // if the switch finds the owner changed, and `follow_later` if it
        // stays: `migration.rs` rule 4): not re-registered. Taken out
        // first, so that no owner is hashed under the map's locks.
        let confirmed: Vec<(GrainId, SiloId, u64, u64)> = self
            .homes
            .iter()
            .filter(|entry| !entry.leaving && entry.moving.is_none())
            .filter_map(|entry| {
                let owner = entry.owner.clone()?;
                Some((
                    entry.key().clone(),
                    owner,
                    entry.activation,
                    entry.generation,
                ))
            })
            .collect();
        let mut by_owner: HashMap<SiloId, Vec<Reregistering>> = HashMap::new();
        for (grain, current, activation, generation) in confirmed {
            let Some(new) = self.entry_owner(&grain, view) else {
                continue;
            };
            if current == new {
                continue;
            }
            by_owner.entry(new).or_default().push(Reregistering {
                grain,
                proposed: ActivationAddress {
                    silo: me.clone(),
                    activation,
                },
                generation,
            });
        }
        let node = ClusterNode {
            inner: self.clone(),
        };
        let node = &node;
        futures_util::future::join_all(
            by_owner
                .into_iter()
                .map(|(owner, homes)| self.reregister_with(node, owner, homes, epoch, give_up_at)),
        )
        .await;
    }

    /// Rule 3 for the homes whose entry `owner` holds in the new view:
    /// rounds, each trying every home still owed once (a few at a time,
    /// none started after `give_up_at`, each waiting for its answer until
    /// a window past it), with a pause of `handoff / 8` after each, until
    /// `give_up_at`, twice the window after this silo learnt of the change.
    /// The owner may learn of it up to `handoff` later (until then it
    /// answers `Retry`, owning nothing), and then refuses other claims for
    /// `handoff`; a home not re-registered by then is given up (its
    /// activation let go) when its round ends, since another silo may
    /// claim the grain: at `give_up_at`, or up to a window after it while
    /// a try still waits for its answer (one slow answer holds the round's
    /// other homes that long). A home whose turn comes after `give_up_at`
    /// is given up untried. The connection to the owner is opened before
    /// each round, bounded by `give_up_at`, so that the round's tries do
    /// not each wait for the same handshake.
    async fn reregister_with(
        self: &Arc<Self>,
        node: &ClusterNode,
        owner: SiloId,
        mut pending: Vec<Reregistering>,
        epoch: u64,
        give_up_at: Instant,
    ) {
        let owner = &owner;
        loop {
            if !self.is_me(owner) {
                // A failed connect is tried again by the round's requests
                // (each bounded) and by the next round.
                let _ = tokio::time::timeout(
                    give_up_at.saturating_duration_since(Instant::now()),
                    node.connection(owner),
                )
                .await;
            }
            pending = futures_util::stream::iter(pending)
                .map(|home| self.try_reregister(node, owner, home, epoch, give_up_at))
                .buffer_unordered(REREGISTER_AT_ONCE)
                .filter_map(std::future::ready)
                .collect()
                .await;
            if pending.is_empty() || !self.still_current(epoch) || self.fence.is_fenced() {
                return;
            }
            let now = Instant::now();
            if now >= give_up_at
                || self.stopped.load(Ordering::Acquire)
                || !pending
                    .first()
                    .is_some_and(|home| self.is_me(&home.proposed.silo))
            {
                for home in &pending {
                    // Not one registered with `owner` meanwhile (by a call,
                    // or beside the pass: `follow_later`).
                    self.give_up_unless_with(home, epoch, owner);
                }
                return;
            }
            let pause = self.reregister_pause();
            tokio::time::sleep(pause.min(give_up_at - now)).await;
        }
    }

    /// Gives `home` up (its activation let go) if it is still the home it
    /// was, not leaving or moving, and its view is still followed (checked
    /// under the home's lock).
    fn give_up_reregistering(&self, home: &Reregistering, epoch: u64) {
        self.remove_this_home(&home.grain, |current| {
            home.is_this(current) && self.still_current(epoch)
        });
    }

    /// [`Inner::give_up_reregistering`] unless the home is registered with
    /// `owner` by now (checked under the home's lock): a call, a pass or a
    /// follow may have registered it with that owner meanwhile.
    fn give_up_unless_with(&self, home: &Reregistering, epoch: u64, owner: &SiloId) {
        self.remove_this_home(&home.grain, |current| {
            home.is_this(current)
                && self.still_current(epoch)
                && current.owner.as_ref() != Some(owner)
        });
    }

    /// Rule 3 for a home of generation `generation` recorded with an owner
    /// the view may no longer name, that no pass of the current view may
    /// re-register: its follow was refused (that owner had not learnt of
    /// the view yet), or the view kept changing through the follow's
    /// rounds (`follow_owner`), or it stopped moving (a move that stayed,
    /// or an arrival: passes skip a moving home). It re-registers beside
    /// its caller as a pass would, with the owner of the view it reads
    /// each time, until the deadline of the current view's pass; not
    /// registered with that owner by then, it is given up. It stops once
    /// the view changes again (that view's pass, started after the home was
    /// recorded, re-registers it), or the home is no longer this one or is
    /// leaving; while it moves it waits. A view whose pass has not started
    /// yet needs none of this: that pass will see the home. One task per
    /// home and view.
    pub(super) fn follow_later(self: &Arc<Self>, grain: &GrainId, generation: u64) {
        let Some((epoch, give_up_at)) = self.current_pass_deadline() else {
            return;
        };
        let Some(activation) = self
            .homes
            .get(grain)
            .filter(|home| home.generation == generation && home.owner.is_some())
            .map(|home| home.activation)
        else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let task = (generation, epoch);
        match self.following.entry(grain.clone()) {
            dashmap::Entry::Occupied(entry) if *entry.get() == task => return,
            dashmap::Entry::Occupied(mut entry) => {
                entry.insert(task);
            }
            dashmap::Entry::Vacant(entry) => {
                entry.insert(task);
            }
        }
        let home = Reregistering {
            grain: grain.clone(),
            proposed: ActivationAddress {
                silo: self.id(),
                activation,
            },
            generation,
        };
        let inner = self.clone();
        runtime.spawn(async move {
            inner.follow_until(home.clone(), epoch, give_up_at).await;
            inner
                .following
                .remove_if(&home.grain, |_, current| *current == task);
        });
    }

    /// The current view's epoch and its pass's deadline, once that pass
    /// has started (rule 3).
    pub(super) fn current_pass_deadline(&self) -> Option<(u64, Instant)> {
        let epoch = self.view_epoch.load(Ordering::SeqCst);
        let started = *self
            .pass_deadline
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        started.filter(|(pass_epoch, _)| *pass_epoch == epoch)
    }

    /// Whether the current view's pass has started and its deadline has
    /// passed: a home that registers with that view's owner only now may
    /// have been claimed elsewhere meanwhile (rule 3).
    pub(super) fn past_pass_deadline(&self) -> bool {
        self.current_pass_deadline()
            .is_some_and(|(_, give_up_at)| Instant::now() >= give_up_at)
    }

    /// The task of [`Inner::follow_later`]: after each pause of a pass's
    /// rounds, tries `home` once with the owner its entry has in the view
    /// read then (`try_reregister`), until the home is recorded with it.
    async fn follow_until(
        self: &Arc<Self>,
        mut home: Reregistering,
        epoch: u64,
        give_up_at: Instant,
    ) {
        let node = ClusterNode {
            inner: self.clone(),
        };
        let pause = self.reregister_pause();
        // Waits for a move out that outlasts the deadline.
        let mut waits_left = 4u32;
        loop {
            tokio::time::sleep(pause.min(give_up_at.saturating_duration_since(Instant::now())))
                .await;
            if !self.still_current(epoch)
                || self.fence.is_fenced()
                || self.stopped.load(Ordering::Acquire)
                || !self.is_me(&home.proposed.silo)
            {
                return;
            }
            let found = self
                .homes
                .get(&home.grain)
                .filter(|current| current.generation == home.generation && !current.leaving)
                .map(|current| (current.owner.clone(), current.moving.clone()));
            let recorded = match found {
                None => return,
                // A move out is under way: it ends with the home gone, or
                // back here (then followed on, or given up past the
                // deadline). Past it, waited for (each wait bounded, as is
                // every step of a move).
                Some((_, Some(mut moving))) => {
                    if Instant::now() >= give_up_at {
                        if waits_left == 0 {
                            return;
                        }
                        waits_left -= 1;
                        let _ = tokio::time::timeout(
                            self.config.connection.call_timeout,
                            moving.wait_for(|state| *state != super::migration::MoveState::Moving),
                        )
                        .await;
                    }
                    continue;
                }
                Some((recorded, None)) => recorded,
            };
            // Hashed outside the map's locks.
            let wanted = self.entry_owner(&home.grain, &self.view());
            if recorded == wanted {
                return;
            }
            let Some(owner) = wanted.clone() else {
                return;
            };
            if Instant::now() >= give_up_at {
                // A call or a pass that registered it with the view's
                // owner meanwhile keeps it.
                self.give_up_unless_with(&home, epoch, &owner);
                return;
            }
            // `None`: recorded with `owner`, no longer this home, or given
            // up; the next round's checks tell which.
            if let Some(again) = self
                .try_reregister(&node, &owner, home.clone(), epoch, give_up_at)
                .await
            {
                home = again;
            }
        }
    }

    /// One try of `home`'s re-registration with `owner`; the home back if
    /// it is to be tried again (the owner answered anything but a home,
    /// `Retry` in practice, the request failed, nothing came by a window
    /// past `give_up_at`, or `give_up_at` had passed and it was not tried).
    async fn try_reregister(
        self: &Arc<Self>,
        node: &ClusterNode,
        owner: &SiloId,
        home: Reregistering,
        epoch: u64,
        give_up_at: Instant,
    ) -> Option<Reregistering> {
        // Only this home is updated or let go: not a later one for the
        // same grain (after a rejoin, rule 7, the home here may be new),
        // and not one given up, leaving or moving meanwhile (a fence gives
        // every home up).
        let live = self
            .homes
            .get(&home.grain)
            .is_some_and(|current| home.is_this(&current));
        if !live || !self.still_current(epoch) || self.fence.is_fenced() {
            return None;
        }
        // No try starts after `give_up_at`. One started before it may wait
        // a window past it for its answer, which stands whatever it is
        // (the owner decides): a slow owner under load is not taken for a
        // silent one.
        let now = Instant::now();
        if now >= give_up_at {
            return Some(home);
        }
        let try_for = (give_up_at - now).saturating_add(self.handoff.max(REREGISTER_FLOOR));
        let reply = tokio::time::timeout(
            try_for,
            node.directory_at(
                Some(owner),
                DirectoryRequest::Register {
                    grain: home.grain.clone(),
                    home: home.proposed.clone(),
                    existing: true,
                },
            ),
        )
        .await
        .unwrap_or(Ok(DirectoryReply::Retry));
        match reply {
            Ok(DirectoryReply::Home(address)) if address.silo == home.proposed.silo => {
                if let Some(mut current) = self.homes.get_mut(&home.grain) {
                    // Checked under the entry's lock: a pass whose view was
                    // replaced records no owner.
                    if home.is_this(&current) && self.still_current(epoch) {
                        current.owner = Some(owner.clone());
                        current.activation = address.activation;
                    }
                }
                None
            }
            Ok(DirectoryReply::Home(_)) => {
                self.give_up_reregistering(&home, epoch);
                None
            }
            _ => Some(home),
        }
    }

    /// Deactivates this silo's activation of `grain`, which it is no
    /// longer home to: the activation runs what it already holds, writes
    /// its state, and frees its resources (a resident buffer's device
    /// memory, say).
    pub(super) fn release(&self, grain: &GrainId) {
        tracing::debug!(%grain, "a home lost to another silo lets its activation go");
        let silo = self.silo.clone();
        let (grain_type, key) = (grain.type_name.clone(), grain.key.clone());
        tokio::spawn(async move {
            if let Err(err) = silo.deactivate_named(&grain_type, key).await {
                tracing::debug!(%grain_type, error = %err, "a lost home's activation did not deactivate");
            }
        });
    }
}

/// A call to the local silo counted in its home's `in_flight` (rule 6).
/// This silo is a grain's home for one message (rule 6), with the device
/// memory promised to it if it is becoming home (rule 5), until dropped.
pub(super) struct Admitted {
    _pin: InFlight,
    _promise: Option<Promise>,
    /// The home's lease, if it is confirmed.
    pub(super) lease: Option<Arc<HomeLease>>,
}

struct InFlight {
    inner: Arc<Inner>,
    grain: GrainId,
    /// The pinned home's generation.
    generation: u64,
}

impl InFlight {
    /// The directory may hold an entry naming this silo for the grain
    /// although its home here is not confirmed: remove it when the home
    /// goes (rule 6).
    fn suspect_entry(&self) {
        if let Some(mut home) = self.inner.homes.get_mut(&self.grain) {
            if home.owner.is_none() && home.generation == self.generation {
                home.maybe_registered = true;
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let last = match self.inner.homes.get_mut(&self.grain) {
            Some(mut home) if home.generation == self.generation => {
                home.in_flight = home.in_flight.saturating_sub(1);
                home.in_flight == 0
            }
            // Removed or replaced: whoever removed it saw to its entry.
            _ => false,
        };
        if last {
            self.inner.maybe_leave(&self.grain);
        }
    }
}

/// What a promise counts as a device's memory (rule 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    /// Its free memory: a first call, which the caller can place
    /// elsewhere.
    FreeNow,
    /// Its room, lent working memory included: a migration's arrival.
    Room,
}

/// Device memory promised to a grain becoming home here (rule 5).
pub(super) struct Promise {
    inner: Arc<Inner>,
    /// The device's position in this silo's load.
    device: usize,
    bytes: u64,
}

impl Drop for Promise {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let mut promised = self
                .inner
                .promised
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(bytes) = promised.get_mut(&self.device) {
                *bytes = bytes.saturating_sub(self.bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests;
