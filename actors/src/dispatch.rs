//! Messages addressed by name, as they arrive from another silo.
//!
//! 1. **Names.** A grain type is registered under a stable name
//!    (`SiloBuilder::register`); each message it takes from the network is
//!    registered under a stable name of its own, per grain type
//!    (`SiloBuilder::message`). Names, not Rust types, travel, so silos
//!    built from different binaries agree on them.
//! 2. **Wire form.** A message and its reply travel as postcard bytes
//!    ([`encode`], [`decode`]); the key as a [`GrainKey`].
//! 3. **Dispatch.** [`Silo::call_named`] decodes the message, calls the
//!    grain as a local `GrainRef::call` would (activation on demand, turns,
//!    timeouts) and encodes the reply; [`Silo::tell_named`] delivers
//!    without a reply. On a routed silo both go where the grain lives
//!    (`route.rs`); a request that the router brings here is dispatched on
//!    the local path in the sender's call chain, until its deadline.
//!    Read-only messages (`SiloBuilder::read_message`) have names of
//!    their own kind: a read travels as a read.
//! 4. **Errors.** An unknown grain type or message name, bytes that do not
//!    decode, and the call's own failures are a typed [`DispatchError`];
//!    nothing panics and the silo keeps serving.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::error::CallError;
use crate::grain::{Handler, Message, ReadHandler};
use crate::key::{GrainId, GrainKey};
use crate::route::InboundRequest;
pub(crate) use crate::route::Kind;
use crate::silo::Silo;

/// `value` in the wire form (rule 2).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, DispatchError> {
    postcard::to_allocvec(value).map_err(|err| DispatchError::BadPayload {
        what: std::any::type_name::<T>().to_string(),
        reason: err.to_string(),
    })
}

/// A `T` from the wire form (rule 2).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DispatchError> {
    postcard::from_bytes(bytes).map_err(|err| DispatchError::BadPayload {
        what: std::any::type_name::<T>().to_string(),
        reason: err.to_string(),
    })
}

/// Why a message addressed by name was not handled (rule 4).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DispatchError {
    /// No grain type is registered under this name.
    UnknownGrainType(String),
    /// The grain type takes no message registered under this name.
    UnknownMessage {
        /// The grain type's name.
        grain_type: String,
        /// The message name.
        message: String,
    },
    /// Bytes that are not a valid `what` in the wire form, or a value that
    /// could not be put in it.
    BadPayload {
        /// The Rust type expected.
        what: String,
        /// The decoder's complaint.
        reason: String,
    },
    /// The call itself failed.
    Call(CallError),
}

impl fmt::Display for DispatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DispatchError::UnknownGrainType(name) => {
                write!(f, "no grain type is registered under {name:?}")
            }
            DispatchError::UnknownMessage {
                grain_type,
                message,
            } => write!(
                f,
                "grain type {grain_type:?} takes no message registered as {message:?}"
            ),
            DispatchError::BadPayload { what, reason } => {
                write!(f, "bytes that are not a valid {what}: {reason}")
            }
            DispatchError::Call(err) => write!(f, "{err}"),
        }
    }
}

impl std::error::Error for DispatchError {}

impl From<CallError> for DispatchError {
    fn from(err: CallError) -> DispatchError {
        DispatchError::Call(err)
    }
}

/// One message as the silo's dispatch sees it: what arrived, in which
/// chain, and until when its sender waits.
pub(crate) struct Inbound<'a> {
    pub(crate) key: GrainKey,
    pub(crate) payload: &'a [u8],
    pub(crate) kind: Kind,
    pub(crate) chain: u64,
    /// When the sender stops waiting.
    pub(crate) deadline: Instant,
    /// Set for messages from other silos: a turn not started by then is
    /// not run (`silo/mod.rs`, rule 11).
    pub(crate) expires: Option<Instant>,
}

/// Decodes, delivers on the local typed path (never routed) and, for a
/// call or a read, encodes the reply of one message type of one grain
/// type.
pub(crate) type Handle = Arc<
    dyn Fn(&Silo, Inbound<'_>) -> BoxFuture<'static, Result<Vec<u8>, DispatchError>> + Send + Sync,
>;

/// The handle for message `M` of grain type `G`, taken as a write (a call
/// or a tell).
pub(crate) fn handle<G, M>() -> Handle
where
    G: Handler<M>,
    M: Message + DeserializeOwned,
    M::Reply: Serialize,
{
    Arc::new(|silo: &Silo, inbound: Inbound<'_>| {
        let decoded = decode::<M>(inbound.payload);
        let grain = silo.grain::<G>(inbound.key);
        let (kind, chain, deadline, expires) = (
            inbound.kind,
            inbound.chain,
            inbound.deadline,
            inbound.expires,
        );
        Box::pin(async move {
            let message = decoded?;
            match kind {
                Kind::Tell => {
                    grain
                        .tell_here(message, chain, expires, deadline.into())
                        .await?;
                    Ok(Vec::new())
                }
                Kind::Call | Kind::Read => encode(
                    &grain
                        .call_here(message, chain, expires, deadline.into())
                        .await?,
                ),
            }
        })
    })
}

/// The handle for read-only message `M` of grain type `G` (rule 10 of
/// `silo/mod.rs`).
pub(crate) fn read_handle<G, M>() -> Handle
where
    G: ReadHandler<M>,
    M: Message + DeserializeOwned,
    M::Reply: Serialize,
{
    Arc::new(|silo: &Silo, inbound: Inbound<'_>| {
        let decoded = decode::<M>(inbound.payload);
        let grain = silo.grain::<G>(inbound.key);
        let (chain, deadline, expires) = (inbound.chain, inbound.deadline, inbound.expires);
        Box::pin(async move {
            let message = decoded?;
            encode(
                &grain
                    .read_here(message, chain, expires, deadline.into())
                    .await?,
            )
        })
    })
}

/// How a sender puts message type `M` of one grain type in the wire form,
/// and reads its reply back: what a grain reference needs to send `M` to
/// a home on another silo (`route.rs`, rule 4).
#[derive(Clone)]
pub(crate) struct Codec {
    /// The message's registered name.
    pub(crate) name: Arc<str>,
    /// The message (an `M` behind `dyn Any`) in its wire form.
    pub(crate) encode: fn(&dyn Any) -> Result<Vec<u8>, DispatchError>,
    /// A reply from its wire form, as an `M::Reply` behind `dyn Any`.
    pub(crate) decode_reply: DecodeReply,
}

/// Reads a reply from its wire form, as a value behind `dyn Any`.
pub(crate) type DecodeReply = fn(&[u8]) -> Result<Box<dyn Any + Send>, DispatchError>;

/// The codec of message `M` under `name`.
pub(crate) fn codec<M>(name: &str) -> Codec
where
    M: Message + Serialize,
    M::Reply: DeserializeOwned,
{
    Codec {
        name: Arc::from(name),
        encode: |message| match message.downcast_ref::<M>() {
            Some(message) => encode(message),
            None => Err(DispatchError::BadPayload {
                what: std::any::type_name::<M>().to_string(),
                reason: "a value of another type".into(),
            }),
        },
        decode_reply: |bytes| {
            decode::<M::Reply>(bytes).map(|reply| Box::new(reply) as Box<dyn Any + Send>)
        },
    }
}

/// Deactivates one grain of a type (`GrainRef::deactivate`).
pub(crate) type Deactivate =
    Arc<dyn Fn(&Silo, GrainKey) -> BoxFuture<'static, Result<(), CallError>> + Send + Sync>;

/// The deactivator of grain type `G`.
pub(crate) fn deactivator<G: crate::grain::Grain>() -> Deactivate {
    Arc::new(|silo: &Silo, key: GrainKey| {
        let grain = silo.grain::<G>(key);
        Box::pin(async move { grain.deactivate().await })
    })
}

/// Whether a grain of a type is active on a silo (`GrainRef::is_active`).
pub(crate) type IsActive = Arc<dyn Fn(&Silo, GrainKey) -> bool + Send + Sync>;

/// The activity check of grain type `G`.
pub(crate) fn activity<G: crate::grain::Grain>() -> IsActive {
    Arc::new(|silo: &Silo, key: GrainKey| silo.grain::<G>(key).is_active())
}

/// The names a silo dispatches on (rule 1).
#[derive(Default)]
pub(crate) struct Registry {
    /// By grain type name, then message name: calls and tells.
    pub(crate) handles: HashMap<String, HashMap<String, Handle>>,
    /// By grain type name, then message name: read-only messages.
    pub(crate) read_handles: HashMap<String, HashMap<String, Handle>>,
    /// The codec of `(G, M)`, for senders (a write).
    pub(crate) codecs: HashMap<(TypeId, TypeId), Codec>,
    /// The codec of `(G, M)` sent as a read.
    pub(crate) read_codecs: HashMap<(TypeId, TypeId), Codec>,
    /// The name of each registered grain type.
    pub(crate) type_names: HashMap<TypeId, String>,
    /// Deactivates a grain, by type name.
    pub(crate) deactivators: HashMap<String, Deactivate>,
    /// The stateless worker types, by name: never routed.
    pub(crate) stateless: std::collections::HashSet<String>,
    /// Whether a grain is active here, by type name.
    pub(crate) activity: HashMap<String, IsActive>,
    /// Migratable types, by name: how an activation leaves and arrives
    /// (`migration.rs` rules 2 and 4).
    pub(crate) migrants: HashMap<String, crate::migration::Migrant>,
}

impl Silo {
    /// Calls grain `grain_type`/`key` with the message registered as
    /// `message`, given in the wire form, and returns the reply in the wire
    /// form (rule 3). On a routed silo the call goes where the grain lives
    /// (`route.rs`).
    pub async fn call_named(
        &self,
        grain_type: &str,
        key: GrainKey,
        message: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, DispatchError> {
        self.send_named(grain_type, key, message, payload, Kind::Call)
            .await
    }

    /// Delivers the message registered as `message` to grain
    /// `grain_type`/`key` without waiting for its handling (rule 3); on a
    /// routed silo, to wherever the grain lives.
    pub async fn tell_named(
        &self,
        grain_type: &str,
        key: GrainKey,
        message: &str,
        payload: &[u8],
    ) -> Result<(), DispatchError> {
        self.send_named(grain_type, key, message, payload, Kind::Tell)
            .await
            .map(drop)
    }

    async fn send_named(
        &self,
        grain_type: &str,
        key: GrainKey,
        message: &str,
        payload: &[u8],
        kind: Kind,
    ) -> Result<Vec<u8>, DispatchError> {
        // Unknown names are refused here, before anything is routed.
        let handle = self.named_handle(grain_type, message, kind)?;
        let router = match self.router() {
            Some(router) if !self.is_stateless_named(grain_type) => Some(router),
            _ => None,
        };
        let chain = crate::silo::current_chain();
        let deadline = crate::silo::deadline_after(self.call_timeout());
        match router {
            Some(router) => {
                crate::route::send_named(
                    router.as_ref(),
                    self,
                    GrainId {
                        type_name: grain_type.to_string(),
                        key,
                    },
                    message,
                    payload,
                    kind,
                    chain,
                    deadline,
                )
                .await
            }
            None => {
                handle(
                    self,
                    Inbound {
                        key,
                        payload,
                        kind,
                        chain,
                        deadline,
                        expires: None,
                    },
                )
                .await
            }
        }
    }

    /// Refuses a grain type or message name this silo does not know (for
    /// `kind`: reads have names of their own), as `call_named` would.
    pub fn check_named(
        &self,
        grain_type: &str,
        message: &str,
        kind: Kind,
    ) -> Result<(), DispatchError> {
        self.named_handle(grain_type, message, kind).map(drop)
    }

    /// Handles a request that the router found is for this silo (`route.rs`,
    /// rule 5), on the local path.
    pub(crate) async fn dispatch_here(
        &self,
        request: InboundRequest<'_>,
    ) -> Result<Vec<u8>, DispatchError> {
        let handle = self.named_handle(request.grain_type, request.message, request.kind)?;
        let deadline = crate::silo::deadline_after(request.time_left);
        // A sender outside any chain (0) gets one of its own here.
        let chain = match request.chain {
            0 => crate::silo::fresh_chain(),
            chain => chain,
        };
        let expires = match request.kind {
            Kind::Tell => None,
            Kind::Call | Kind::Read => Some(deadline),
        };
        handle(
            self,
            Inbound {
                key: request.key,
                payload: request.payload,
                kind: request.kind,
                chain,
                deadline,
                expires,
            },
        )
        .await
    }

    /// Whether grain `grain_type`/`key` is active on this silo now
    /// (`GrainRef::is_active`); an unknown type has no activations.
    pub fn is_active_named(&self, grain_type: &str, key: &GrainKey) -> bool {
        self.registry()
            .activity
            .get(grain_type)
            .is_some_and(|active| active(self, key.clone()))
    }

    /// Deactivates grain `grain_type`/`key` if it is active here (see
    /// `GrainRef::deactivate`).
    pub async fn deactivate_named(
        &self,
        grain_type: &str,
        key: GrainKey,
    ) -> Result<(), DispatchError> {
        let deactivate = self
            .registry()
            .deactivators
            .get(grain_type)
            .cloned()
            .ok_or_else(|| DispatchError::UnknownGrainType(grain_type.to_string()))?;
        deactivate(self, key).await.map_err(DispatchError::Call)
    }

    /// The name message type `M` of grain type `G` is registered under, if
    /// it is.
    pub fn message_name<G: Handler<M>, M: Message>(&self) -> Option<&str> {
        self.registry()
            .codecs
            .get(&(TypeId::of::<G>(), TypeId::of::<M>()))
            .map(|codec| &*codec.name)
    }

    fn named_handle(
        &self,
        grain_type: &str,
        message: &str,
        kind: Kind,
    ) -> Result<Handle, DispatchError> {
        let by_type = match kind {
            Kind::Call | Kind::Tell => &self.registry().handles,
            Kind::Read => &self.registry().read_handles,
        };
        if !self.registry().handles.contains_key(grain_type) {
            return Err(DispatchError::UnknownGrainType(grain_type.to_string()));
        }
        let messages = by_type
            .get(grain_type)
            .ok_or_else(|| DispatchError::UnknownMessage {
                grain_type: grain_type.to_string(),
                message: message.to_string(),
            })?;
        messages
            .get(message)
            .cloned()
            .ok_or_else(|| DispatchError::UnknownMessage {
                grain_type: grain_type.to_string(),
                message: message.to_string(),
            })
    }
}
