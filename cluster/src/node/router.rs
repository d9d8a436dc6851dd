//! The calling side: the silo's router sends each message to its grain's
//! home, on the typed path when that is this silo and by name otherwise,
//! following `Moved`, `Retry` and `NoRoom` (rules 2 to 5 of the protocol
//! in `node/mod.rs`); [`ClusterCallError`] for `call_named`.

use std::time::{Duration, Instant};

use std::sync::Arc;
use std::sync::atomic::Ordering;

use granary_actors::route::{Delivered, Kind, Outbound};
use granary_actors::{CallError, DispatchError, GrainId, GrainKey, GrainRef};

use super::directory_client::{DIRECTORY, DirectoryBackend, DirectoryReply, DirectoryRequest};
use super::{ClusterNode, Inner};
use crate::SiloId;
use crate::connection::{CallFailure, Outgoing};
use crate::directory::ActivationAddress;
use crate::membership::Member;
use crate::placement::PlacementRequest;
use crate::wire::RemoteError;

/// Hops a call may take (moved, retried) before it gives up.
const MAX_HOPS: usize = 8;

/// Why a call through the cluster failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClusterCallError {
    /// The grain type or message is not registered by name on this silo.
    NotRegistered(String),
    /// The silo hosting the grain is unavailable (rule 4).
    SiloUnavailable {
        /// The silo.
        silo: SiloId,
        /// Why.
        reason: String,
    },
    /// No silo to place the grain on.
    Placement(crate::placement::PlacementError),
    /// The call failed where it ran, or on the way.
    Remote(RemoteError),
    /// No answer within the call timeout.
    Timeout(String),
    /// The message or its reply did not encode or decode.
    Payload(String),
    /// The request, encoded, is longer than a frame may be (the
    /// connection's `max_frame`): not sent.
    TooLarge {
        /// The frame's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The message failed on this silo, as a local call does (it timed
    /// out waiting for room or for its turn, its turn failed, or the silo
    /// is shutting down).
    Local(CallError),
}

impl std::fmt::Display for ClusterCallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterCallError::NotRegistered(what) => write!(f, "not registered by name: {what}"),
            ClusterCallError::SiloUnavailable { silo, reason } => {
                write!(f, "silo {silo} is unavailable: {reason}")
            }
            ClusterCallError::Placement(err) => write!(f, "{err}"),
            ClusterCallError::Remote(err) => write!(f, "{err}"),
            ClusterCallError::Timeout(why) => write!(f, "timed out: {why}"),
            ClusterCallError::Payload(why) => write!(f, "{why}"),
            ClusterCallError::TooLarge { len, max } => {
                write!(
                    f,
                    "a request of {len} bytes exceeds the {max}-byte frame limit"
                )
            }
            ClusterCallError::Local(err) => write!(f, "{err}"),
        }
    }
}

impl std::error::Error for ClusterCallError {}

pub(super) fn from_failure(failure: CallFailure) -> ClusterCallError {
    match failure {
        CallFailure::SiloUnavailable { silo, reason } => {
            ClusterCallError::SiloUnavailable { silo, reason }
        }
        CallFailure::Remote(err) => ClusterCallError::Remote(err),
        CallFailure::Timeout { silo, after } => {
            ClusterCallError::Timeout(format!("no answer from {silo} within {after:?}"))
        }
        CallFailure::TooLarge { len, max } => ClusterCallError::TooLarge { len, max },
    }
}

impl ClusterNode {
    /// A reference to grain `G` with `key`: the silo's own [`GrainRef`],
    /// which on a clustered silo reaches the grain wherever it lives (rule
    /// 2), the same type that handlers get from `ctx.grain`.
    pub fn grain<G: granary_actors::Grain>(&self, key: impl Into<GrainKey>) -> GrainRef<G> {
        self.inner.silo.grain(key)
    }

    /// Calls grain `grain_type`/`key` with message `message` in its wire
    /// form, wherever it lives (rule 2), and answers the reply in its wire
    /// form. A failure on the way keeps its kind: the home's silo
    /// unavailable (`SiloUnavailable`), no silo to place the grain on
    /// (`Placement`), a failure where it ran (`Remote`), no answer in time
    /// (`Timeout`), or a local one (`Local`). It waits at most the silo's
    /// `call_timeout`, as [`Silo::call_named`](granary_actors::Silo::call_named)
    /// does, and for a grain on another silo also at most the connection's
    /// (`ConnectionConfig::call_timeout`).
    pub async fn call_named(
        &self,
        grain_type: &str,
        key: GrainKey,
        message: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, ClusterCallError> {
        let not_registered = |err: DispatchError| match err {
            DispatchError::UnknownGrainType(_) | DispatchError::UnknownMessage { .. } => {
                ClusterCallError::NotRegistered(err.to_string())
            }
            DispatchError::BadPayload { .. } => ClusterCallError::Payload(err.to_string()),
            DispatchError::Call(err) => ClusterCallError::Local(err),
            other => ClusterCallError::Remote(RemoteError::from(other)),
        };
        if grain_type == DIRECTORY {
            return Err(ClusterCallError::NotRegistered(grain_type.to_string()));
        }
        let silo = &self.inner.silo;
        silo.check_named(grain_type, message, Kind::Call)
            .map_err(not_registered)?;
        // Stateless workers are local to each silo (route.rs, rule 6).
        if silo.is_stateless_named(grain_type) {
            return silo
                .call_named(grain_type, key, message, payload)
                .await
                .map_err(not_registered);
        }
        let (named, mut answer) = granary_actors::route::named_outbound(
            &self.inner.home_side,
            GrainId {
                type_name: grain_type.to_string(),
                key,
            },
            message,
            payload,
            Kind::Call,
            granary_actors::route::current_chain(),
            // Saturating: a timeout too long to represent waits a year.
            tokio::time::Instant::from_std(deadline_after(
                silo.call_timeout()
                    .min(self.inner.config.connection.call_timeout),
            )),
        );
        match self.inner.route_raw(named).await? {
            Delivered::Here => match answer.try_recv() {
                Ok(reply) => reply.map_err(not_registered),
                Err(_) => Err(ClusterCallError::Local(CallError::ShutDown)),
            },
            Delivered::Elsewhere(bytes) => Ok(bytes),
        }
    }
}

impl Inner {
    /// Delivers `message` at its grain's home (rule 2): on this silo on the
    /// typed path, once this silo is the grain's home; elsewhere by name,
    /// following `Moved`, `Retry` and `NoRoom`.
    pub(super) async fn route(
        self: &Arc<Self>,
        message: Box<dyn Outbound>,
    ) -> Result<Delivered, CallError> {
        let started = Instant::now();
        let grain = message.grain().clone();
        self.route_raw(message)
            .await
            .map_err(|err| call_error(err, &grain, started.elapsed()))
    }

    /// [`Inner::route`], with a failure on the way as the cluster saw it.
    pub(super) async fn route_raw(
        self: &Arc<Self>,
        message: Box<dyn Outbound>,
    ) -> Result<Delivered, ClusterCallError> {
        let grain = message.grain().clone();
        let node = ClusterNode {
            inner: self.clone(),
        };
        let mut message = Some(message);
        // The wire form, made once, the first time it is needed.
        let mut encoded: Option<std::sync::Arc<Vec<u8>>> = None;
        // Moves and silos found gone count as hops; waits for a directory
        // that is settling (rule 3) are bounded by time instead.
        let mut hops = 0;
        let settle_by = deadline_after(self.handoff.saturating_mul(4));
        let mut last = None;
        // Silos that had no room for the grain in this call (rule 5).
        let mut full: Vec<SiloId> = Vec::new();
        while hops < MAX_HOPS {
            if self.stopped.load(Ordering::Acquire) {
                return Err(ClusterCallError::Local(CallError::ShutDown));
            }
            let mut sent = false;
            let (target, cached) = match node.home_of(&grain, &full).await {
                Ok(found) => found,
                // The entry's owner is settling, or leaving (it drains:
                // its entries move to their next owner when it is gone).
                Err(err @ ClusterCallError::Remote(RemoteError::Retry | RemoteError::ShutDown))
                    if Instant::now() < settle_by =>
                {
                    self.stats.redirected(match err {
                        ClusterCallError::Remote(RemoteError::ShutDown) => {
                            super::stats::Redirect::ShutDown
                        }
                        _ => super::stats::Redirect::Retry,
                    });
                    last = Some(err);
                    tokio::time::sleep(self.handoff / 8).await;
                    continue;
                }
                Err(err) => return Err(err),
            };
            let outcome = if self.is_me(&target) {
                match self.admit(&grain).await {
                    Ok(admitted) => {
                        let Some(message) = message.take() else {
                            return Err(ClusterCallError::Local(CallError::ShutDown));
                        };
                        // Rule 2, on the typed path: the home stays pinned
                        // until the local silo has answered. A confirmed
                        // home's lease lets the reference skip this next
                        // time, while it holds.
                        let lease = admitted.lease.clone();
                        let delivered = message.deliver_here(lease).await;
                        drop(admitted);
                        delivered.map_err(ClusterCallError::Local)?;
                        if !cached {
                            self.remember(&grain, target);
                        }
                        return Ok(Delivered::Here);
                    }
                    Err(err) => Err(ClusterCallError::Remote(err)),
                }
            } else {
                // What goes on the wire, taken out before any wait (the
                // message itself stays here, in case the home is here
                // after a move).
                let (name, kind, chain, deadline) = {
                    let Some(outbound) = message.as_ref() else {
                        return Err(ClusterCallError::Local(CallError::ShutDown));
                    };
                    if encoded.is_none() {
                        encoded = Some(outbound.encode().map_err(ClusterCallError::Local)?);
                    }
                    let name = outbound.message_name().map_err(ClusterCallError::Local)?;
                    (
                        name.to_string(),
                        outbound.kind(),
                        outbound.chain(),
                        outbound.deadline(),
                    )
                };
                let payload = encoded.as_deref().map_or(&[][..], Vec::as_slice);
                match node.connection(&target).await {
                    Ok(connection) => {
                        sent = true;
                        let started = std::time::Instant::now();
                        let answered = connection
                            .send(Outgoing {
                                grain_type: &grain.type_name,
                                key: &grain.key,
                                message: &name,
                                payload,
                                kind,
                                chain,
                                time_left: deadline
                                    .saturating_duration_since(tokio::time::Instant::now()),
                            })
                            .await
                            .map(|reply| reply.to_vec())
                            .map_err(from_failure);
                        // Timed when the other silo answered (a reply or
                        // a refusal), not when the connection failed.
                        if matches!(answered, Ok(_) | Err(ClusterCallError::Remote(_))) {
                            self.stats.remote_call(started.elapsed());
                        }
                        answered
                    }
                    Err(err) => Err(err),
                }
            };
            if let Err(ClusterCallError::Remote(answer)) = &outcome {
                let redirect = match answer {
                    RemoteError::Moved(_) => Some(super::stats::Redirect::Moved),
                    RemoteError::Retry => Some(super::stats::Redirect::Retry),
                    RemoteError::NoRoom => Some(super::stats::Redirect::NoRoom),
                    RemoteError::Overloaded => Some(super::stats::Redirect::Overloaded),
                    RemoteError::ShutDown => Some(super::stats::Redirect::ShutDown),
                    _ => None,
                };
                if let Some(redirect) = redirect {
                    self.stats.redirected(redirect);
                }
            }
            match outcome {
                Ok(reply) => {
                    if !cached {
                        self.remember(&grain, target);
                    }
                    return Ok(Delivered::Elsewhere(reply));
                }
                Err(ClusterCallError::Remote(RemoteError::NoRoom)) => {
                    // Its published load was stale: place elsewhere. Only
                    // this grain's location is forgotten: the silo is
                    // alive, and its other grains still live there.
                    hops += 1;
                    self.cache.invalidate(
                        &grain,
                        &ActivationAddress {
                            silo: target.clone(),
                            activation: 0,
                        },
                    );
                    full.push(target);
                    last = Some(ClusterCallError::Remote(RemoteError::NoRoom));
                }
                Err(ClusterCallError::Remote(RemoteError::Moved(home))) => {
                    hops += 1;
                    self.remember(&grain, home.clone());
                    // What the caller sees if this was the last hop: not
                    // an older refusal.
                    last = Some(ClusterCallError::Remote(RemoteError::Moved(home)));
                }
                Err(
                    err @ ClusterCallError::Remote(
                        RemoteError::Retry | RemoteError::Overloaded | RemoteError::ShutDown,
                    ),
                ) => {
                    if Instant::now() >= settle_by {
                        return Err(err);
                    }
                    if matches!(
                        err,
                        ClusterCallError::Remote(RemoteError::Retry | RemoteError::ShutDown)
                    ) {
                        // The home is in flux (settling, given up by rule
                        // 6, or its silo leaving, which hands its grains
                        // over): ask the directory again next time.
                        self.cache.invalidate(
                            &grain,
                            &ActivationAddress {
                                silo: target.clone(),
                                activation: 0,
                            },
                        );
                    }
                    last = Some(err);
                    tokio::time::sleep(self.handoff / 8).await;
                }
                Err(err @ ClusterCallError::SiloUnavailable { .. }) => {
                    self.cache.forget_silo(&target);
                    // In the view still: the call fails fast (rule 4); gone
                    // from it: the grain is placed elsewhere.
                    // A call that went out may have run: never send it
                    // again (at most once).
                    if sent || self.is_live(&target) {
                        return Err(err);
                    }
                    hops += 1;
                    last = Some(err);
                }
                Err(other) => return Err(other),
            }
        }
        Err(last
            .unwrap_or_else(|| ClusterCallError::Timeout("the grain's home did not settle".into())))
    }

    /// Remembers that `grain` lives on `silo`.
    pub(super) fn remember(&self, grain: &GrainId, silo: SiloId) {
        self.cache.insert(
            grain.clone(),
            ActivationAddress {
                silo,
                activation: 0,
            },
        );
    }
}

/// What a grain reference's caller sees of a failure on the way to, or
/// at, the grain's home.
fn call_error(err: ClusterCallError, grain: &GrainId, waited: Duration) -> CallError {
    let unavailable = |reason: String| CallError::Unavailable {
        grain: grain.clone(),
        reason,
    };
    match err {
        ClusterCallError::Local(err) => err,
        // The call's last hop (of `MAX_HOPS`: moves followed, silos
        // full or gone) was a move followed.
        ClusterCallError::Remote(RemoteError::Moved(silo)) => unavailable(format!(
            "the grain's home kept changing under the call until it ran out of hops \
             ({MAX_HOPS}); the grain was last on {silo}"
        )),
        ClusterCallError::Remote(RemoteError::TurnFailed(_)) => CallError::TurnFailed {
            grain: grain.clone(),
        },
        // The home's silo is shutting down and the grain had not moved on
        // in time: the caller may try again (reminders do).
        ClusterCallError::Remote(RemoteError::ShutDown) => CallError::ShutDown,
        // Still refused when the call stopped retrying (a silo at its
        // inbound limit, or one that reached its activation limit between
        // admitting the call and activating), or no silo that hosts the
        // type had room for the grain.
        ClusterCallError::Remote(RemoteError::Overloaded | RemoteError::NoRoom) => {
            CallError::Overloaded {
                grain: grain.clone(),
            }
        }
        ClusterCallError::TooLarge { len, max } => CallError::TooLarge {
            grain: grain.clone(),
            len,
            max,
        },
        ClusterCallError::Remote(RemoteError::Timeout(_)) | ClusterCallError::Timeout(_) => {
            CallError::Timeout {
                grain: grain.clone(),
                after: waited,
            }
        }
        other => unavailable(other.to_string()),
    }
}

impl ClusterNode {
    /// The silo to send a call for `grain` to (rule 2), and whether it
    /// came from the location cache.
    async fn home_of(
        &self,
        grain: &GrainId,
        full: &[SiloId],
    ) -> Result<(SiloId, bool), ClusterCallError> {
        let inner = &self.inner;
        if let Some(home) = inner.cache.get(grain) {
            if inner.is_live(&home.silo) {
                return Ok((home.silo, true));
            }
        }
        match self
            .directory(DirectoryRequest::Lookup(grain.clone()))
            .await?
        {
            DirectoryReply::Home(home) if inner.is_live(&home.silo) => {
                return Ok((home.silo, false));
            }
            // In etcd an entry outlives no silo: one this view lacks is a
            // silo the view has not caught up with.
            DirectoryReply::Home(_)
                if !matches!(inner.directory, DirectoryBackend::Partitioned) =>
            {
                return Err(ClusterCallError::Remote(RemoteError::Retry));
            }
            DirectoryReply::Retry => return Err(ClusterCallError::Remote(RemoteError::Retry)),
            DirectoryReply::Home(_) | DirectoryReply::Unknown => {}
        }
        // Only silos that host the grain's type (rule 2); one whose load
        // has not arrived yet is not a candidate until it has.
        let all = inner.view();
        let view: Vec<Member> = all
            .iter()
            .filter(|member| {
                !full.contains(&member.silo) && member.load.grain_types.contains(&grain.type_name)
            })
            .cloned()
            .collect();
        // Every silo that hosts the type had no room (rule 5): the call is
        // refused, rather than retried against silos that are full.
        let hosts: Vec<&Member> = all
            .iter()
            .filter(|member| member.load.grain_types.contains(&grain.type_name))
            .collect();
        if view.is_empty()
            && !hosts.is_empty()
            && hosts.iter().all(|member| full.contains(&member.silo))
        {
            return Err(ClusterCallError::Remote(RemoteError::NoRoom));
        }
        if view.is_empty() && all.iter().any(|member| !full.contains(&member.silo)) {
            // Silos are there, but none says it hosts the type yet (a load
            // on its way) or at all: ask again while the cluster settles.
            return Err(ClusterCallError::Remote(RemoteError::Retry));
        }
        let request = PlacementRequest {
            grain,
            caller: &inner.id(),
            needs: inner.needs.get(&grain.type_name),
        };
        inner
            .placement
            .place(&request, &view)
            .map(|silo| (silo, false))
            .map_err(ClusterCallError::Placement)
    }
}

/// `wait` from now, or as far as the clock goes (a huge configured
/// hand-over window must not overflow).
pub(super) fn deadline_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

#[cfg(test)]
mod tests {
    use super::*;
    use granary_actors::GrainKey;

    #[test]
    fn a_call_out_of_hops_says_so_and_where_the_grain_was_last() {
        let grain = GrainId {
            type_name: "ledger".into(),
            key: GrainKey::U64(7),
        };
        let last = SiloId::new("10.0.0.9:7000", 3);
        match call_error(
            ClusterCallError::Remote(RemoteError::Moved(last.clone())),
            &grain,
            Duration::from_millis(5),
        ) {
            CallError::Unavailable { reason, .. } => {
                assert!(reason.contains("ran out of hops"), "{reason}");
                assert!(reason.contains(&last.to_string()), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}
