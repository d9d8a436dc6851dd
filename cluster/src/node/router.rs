//! The calling side: a call finds the grain's home and goes there,
//! following `Moved`, `Retry` and `NoRoom` (rules 2 to 5 of the
//! protocol in `node/mod.rs`); [`ClusterRef`] and [`ClusterCallError`].

use std::time::{Duration, Instant};

use bytes::Bytes;
use granary_actors::dispatch::{decode, encode};
use granary_actors::{GrainId, GrainKey, Handler, Message};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::ClusterNode;
use super::directory_client::{DIRECTORY, DirectoryBackend, DirectoryReply, DirectoryRequest};
use crate::SiloId;
use crate::connection::CallFailure;
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
        CallFailure::TooLarge { len, max } => {
            ClusterCallError::Payload(format!("a request of {len} bytes exceeds {max}"))
        }
    }
}

impl ClusterNode {
    /// A reference to grain `G` with `key`, callable from this silo
    /// wherever the grain lives.
    pub fn grain<G: granary_actors::Grain>(&self, key: impl Into<GrainKey>) -> ClusterRef<G> {
        ClusterRef {
            node: self.clone(),
            key: key.into(),
            _grain: std::marker::PhantomData,
        }
    }

    /// Calls grain `grain_type`/`key` with message `message` in its wire
    /// form, wherever it lives (rule 2).
    pub async fn call_named(
        &self,
        grain_type: &str,
        key: GrainKey,
        message: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, ClusterCallError> {
        if grain_type == DIRECTORY {
            return Err(ClusterCallError::NotRegistered(grain_type.to_string()));
        }
        let grain = GrainId {
            type_name: grain_type.to_string(),
            key,
        };
        let inner = &self.inner;
        // Moves and silos found gone count as hops; waits for a directory
        // that is settling (rule 3) are bounded by time instead.
        let mut hops = 0;
        let settle_by = deadline_after(inner.handoff.saturating_mul(4));
        let mut last = None;
        // Silos that had no room for the grain in this call (rule 5).
        let mut full: Vec<SiloId> = Vec::new();
        while hops < MAX_HOPS {
            let mut sent = false;
            let (target, cached) = match self.home_of(&grain, &full).await {
                Ok(found) => found,
                Err(err @ ClusterCallError::Remote(RemoteError::Retry))
                    if Instant::now() < settle_by =>
                {
                    last = Some(err);
                    tokio::time::sleep(inner.handoff / 8).await;
                    continue;
                }
                Err(err) => return Err(err),
            };
            let outcome = if target == inner.id {
                inner
                    .host(&grain, message, Bytes::copy_from_slice(payload), false)
                    .await
                    .map_err(ClusterCallError::Remote)
            } else {
                match self.connection(&target).await {
                    Ok(connection) => {
                        sent = true;
                        connection
                            .call(grain_type, &grain.key, message, payload)
                            .await
                            .map(|reply| reply.to_vec())
                            .map_err(from_failure)
                    }
                    Err(err) => Err(err),
                }
            };
            match outcome {
                Ok(reply) => {
                    if !cached {
                        inner.cache.insert(
                            grain.clone(),
                            ActivationAddress {
                                silo: target,
                                activation: 0,
                            },
                        );
                    }
                    return Ok(reply);
                }
                Err(ClusterCallError::Remote(RemoteError::NoRoom)) => {
                    // Its published load was stale: place elsewhere. Only
                    // this grain's location is forgotten: the silo is
                    // alive, and its other grains still live there.
                    hops += 1;
                    inner.cache.invalidate(
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
                    inner.cache.insert(
                        grain.clone(),
                        ActivationAddress {
                            silo: home,
                            activation: 0,
                        },
                    );
                }
                Err(
                    err @ ClusterCallError::Remote(RemoteError::Retry | RemoteError::Overloaded),
                ) => {
                    if Instant::now() >= settle_by {
                        return Err(err);
                    }
                    if matches!(err, ClusterCallError::Remote(RemoteError::Retry)) {
                        // The home is in flux (settling, or given up by
                        // rule 6): ask the directory again next time.
                        inner.cache.invalidate(
                            &grain,
                            &ActivationAddress {
                                silo: target.clone(),
                                activation: 0,
                            },
                        );
                    }
                    last = Some(err);
                    tokio::time::sleep(inner.handoff / 8).await;
                }
                Err(err @ ClusterCallError::SiloUnavailable { .. }) => {
                    inner.cache.forget_silo(&target);
                    // In the view still: the call fails fast (rule 4); gone
                    // from it: the grain is placed elsewhere.
                    // A call that went out may have run: never send it
                    // again (at most once).
                    if sent || inner.is_live(&target) {
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
        let view: Vec<Member> = inner
            .view()
            .iter()
            .filter(|member| !full.contains(&member.silo))
            .cloned()
            .collect();
        let request = PlacementRequest {
            grain,
            caller: &inner.id,
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

/// A reference to grain `G`, callable from this silo wherever it lives.
pub struct ClusterRef<G> {
    node: ClusterNode,
    key: GrainKey,
    _grain: std::marker::PhantomData<fn() -> G>,
}

impl<G> Clone for ClusterRef<G> {
    fn clone(&self) -> ClusterRef<G> {
        ClusterRef {
            node: self.node.clone(),
            key: self.key.clone(),
            _grain: std::marker::PhantomData,
        }
    }
}

impl<G: granary_actors::Grain> ClusterRef<G> {
    /// Sends `message` to the grain wherever it lives and waits for the
    /// reply. The grain type and the message must be registered by name.
    pub async fn call<M>(&self, message: M) -> Result<M::Reply, ClusterCallError>
    where
        G: Handler<M>,
        M: Message + Serialize,
        M::Reply: DeserializeOwned,
    {
        let silo = &self.node.inner.silo;
        let grain_type = silo
            .grain_type_name::<G>()
            .ok_or_else(|| ClusterCallError::NotRegistered(std::any::type_name::<G>().into()))?
            .to_string();
        let name = silo
            .message_name::<G, M>()
            .ok_or_else(|| ClusterCallError::NotRegistered(std::any::type_name::<M>().into()))?
            .to_string();
        let payload = encode(&message).map_err(|err| ClusterCallError::Payload(err.to_string()))?;
        let reply = self
            .node
            .call_named(&grain_type, self.key.clone(), &name, &payload)
            .await?;
        decode(&reply).map_err(|err| ClusterCallError::Payload(err.to_string()))
    }
}
