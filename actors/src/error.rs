//! What the runtime's operations fail with.

use std::fmt;
use std::time::Duration;

use crate::key::GrainId;

/// Why a call (request and response) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallError {
    /// The grain type was not registered on the silo.
    NotRegistered {
        /// The grain type's Rust name.
        type_name: &'static str,
    },
    /// No answer within the call timeout (the mailbox stayed full, or the
    /// turn took too long).
    Timeout {
        /// The grain.
        grain: GrainId,
        /// The timeout.
        after: Duration,
    },
    /// The turn failed without answering: its handler panicked, or the
    /// activation could not start. The activation was reset; the silo keeps
    /// serving.
    TurnFailed {
        /// The grain.
        grain: GrainId,
    },
    /// The silo is shutting down.
    ShutDown,
    /// The grain lives on another silo, and the message's type has no
    /// registered name, so it cannot travel there
    /// (`SiloBuilder::message`, `SiloBuilder::read_message`).
    NotRoutable {
        /// The grain.
        grain: GrainId,
        /// The message's Rust type.
        message: &'static str,
    },
    /// The grain's home could not be reached or settled, or refused the
    /// message (a silo that does not know its name, bytes that do not
    /// decode): the message was not handled, or its outcome is unknown.
    Unavailable {
        /// The grain.
        grain: GrainId,
        /// What went wrong.
        reason: String,
    },
    /// No room for the call, which was not handled: the grain had no
    /// activation and its silo holds its `activation_limit` of them (in a
    /// cluster: every silo that hosts the type was full, of activations or
    /// of device memory), or the silo had as many requests from this one
    /// running as it takes. Retry later.
    Overloaded {
        /// The grain.
        grain: GrainId,
    },
    /// The message, encoded for another silo, is longer than a frame may
    /// be: it was not sent.
    TooLarge {
        /// The grain.
        grain: GrainId,
        /// The encoded request's length in bytes.
        len: usize,
        /// The most a frame may hold.
        max: usize,
    },
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::NotRegistered { type_name } => {
                write!(f, "grain type {type_name} is not registered on this silo")
            }
            CallError::Timeout { grain, after } => {
                write!(f, "call to {grain} timed out after {after:?}")
            }
            CallError::TurnFailed { grain } => write!(
                f,
                "{grain} failed while handling the call (panicked or could not activate)"
            ),
            CallError::ShutDown => write!(f, "the silo is shutting down"),
            CallError::NotRoutable { grain, message } => write!(
                f,
                "{grain} lives on another silo and message type {message} has no registered name to travel under"
            ),
            CallError::Unavailable { grain, reason } => {
                write!(f, "{grain} could not be reached: {reason}")
            }
            CallError::TooLarge { grain, len, max } => write!(
                f,
                "a message to {grain} of {len} bytes exceeds the {max}-byte frame limit; not sent"
            ),
            CallError::Overloaded { grain } => write!(
                f,
                "{grain}: no room for the call (activation limit, device memory or inbound limit); not handled, retry later"
            ),
        }
    }
}

impl std::error::Error for CallError {}

/// Why an activation could not start (returned by `Grain::on_activate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivationError(pub String);

impl fmt::Display for ActivationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "activation failed: {}", self.0)
    }
}

impl std::error::Error for ActivationError {}

impl From<crate::storage::StorageError> for ActivationError {
    fn from(err: crate::storage::StorageError) -> ActivationError {
        ActivationError(err.to_string())
    }
}

/// Why a silo could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SiloError {
    /// Two grain types were registered under one name.
    DuplicateName(String),
    /// A configuration value is out of range.
    InvalidConfig(String),
    /// Two message types of one grain type were registered under one name.
    DuplicateMessage {
        /// The grain type's name.
        grain_type: String,
        /// The message name.
        message: String,
    },
}

impl fmt::Display for SiloError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SiloError::DuplicateName(name) => write!(f, "grain name {name:?} is registered twice"),
            SiloError::InvalidConfig(why) => write!(f, "invalid silo configuration: {why}"),
            SiloError::DuplicateMessage {
                grain_type,
                message,
            } => write!(
                f,
                "message name {message:?} is registered twice for grain type {grain_type:?}"
            ),
        }
    }
}

impl std::error::Error for SiloError {}
