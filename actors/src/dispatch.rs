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
//!    without a reply.
//! 4. **Errors.** An unknown grain type or message name, bytes that do not
//!    decode, and the call's own failures are a typed [`DispatchError`];
//!    nothing panics and the silo keeps serving.

use std::any::TypeId;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::CallError;
use crate::grain::{Handler, Message};
use crate::key::GrainKey;
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

/// Whether the sender waits for the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Call,
    Tell,
}

/// Decodes, delivers and (for a call) encodes the reply of one message
/// type of one grain type.
pub(crate) type Handle = Arc<
    dyn Fn(&Silo, GrainKey, &[u8], Mode) -> BoxFuture<'static, Result<Vec<u8>, DispatchError>>
        + Send
        + Sync,
>;

/// The handle for message `M` of grain type `G`.
pub(crate) fn handle<G, M>() -> Handle
where
    G: Handler<M>,
    M: Message + DeserializeOwned,
    M::Reply: Serialize,
{
    Arc::new(|silo: &Silo, key: GrainKey, payload: &[u8], mode: Mode| {
        let decoded = decode::<M>(payload);
        let grain = silo.grain::<G>(key);
        Box::pin(async move {
            let message = decoded?;
            match mode {
                Mode::Call => encode(&grain.call(message).await?),
                Mode::Tell => {
                    grain.tell(message).await?;
                    Ok(Vec::new())
                }
            }
        })
    })
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
    /// By grain type name, then message name.
    pub(crate) handles: HashMap<String, HashMap<String, Handle>>,
    /// The message name of `(G, M)`, for senders.
    pub(crate) names: HashMap<(TypeId, TypeId), String>,
    /// The name of each registered grain type.
    pub(crate) type_names: HashMap<TypeId, String>,
    /// Deactivates a grain, by type name.
    pub(crate) deactivators: HashMap<String, Deactivate>,
    /// Whether a grain is active here, by type name.
    pub(crate) activity: HashMap<String, IsActive>,
}

impl Silo {
    /// Calls grain `grain_type`/`key` with the message registered as
    /// `message`, given in the wire form, and returns the reply in the wire
    /// form (rule 3).
    pub async fn call_named(
        &self,
        grain_type: &str,
        key: GrainKey,
        message: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, DispatchError> {
        let handle = self.named_handle(grain_type, message)?;
        handle(self, key, payload, Mode::Call).await
    }

    /// Delivers the message registered as `message` to grain
    /// `grain_type`/`key` without waiting for its handling (rule 3).
    pub async fn tell_named(
        &self,
        grain_type: &str,
        key: GrainKey,
        message: &str,
        payload: &[u8],
    ) -> Result<(), DispatchError> {
        let handle = self.named_handle(grain_type, message)?;
        handle(self, key, payload, Mode::Tell).await.map(drop)
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
            .names
            .get(&(TypeId::of::<G>(), TypeId::of::<M>()))
            .map(String::as_str)
    }

    fn named_handle(&self, grain_type: &str, message: &str) -> Result<Handle, DispatchError> {
        let messages = self
            .registry()
            .handles
            .get(grain_type)
            .ok_or_else(|| DispatchError::UnknownGrainType(grain_type.to_string()))?;
        messages
            .get(message)
            .cloned()
            .ok_or_else(|| DispatchError::UnknownMessage {
                grain_type: grain_type.to_string(),
                message: message.to_string(),
            })
    }
}
