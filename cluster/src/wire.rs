//! Frames on the wire.
//!
//! # Layout
//!
//! 1. A frame is length-delimited (tokio-util's codec: a 4-byte big-endian
//!    length, then the body), and no body exceeds the connection's
//!    `max_frame` (default 16 MiB). A longer length prefix closes the
//!    connection before any of the body is read.
//! 2. A body is `[header length: u32 LE][header][payload]`. The header is a
//!    [`Header`] in postcard; the payload is raw bytes: message and reply
//!    bodies (already in their own wire form) and tensors are never
//!    re-encoded by serde.
//! 3. A body whose header length overruns it, or whose header does not
//!    decode, is a [`FrameError`]: the connection that read it closes, and
//!    nothing else does.
//! 4. **Versions.** The first header each side sends ([`Header::Hello`],
//!    [`Header::Challenge`]) starts with the wire protocol's version,
//!    [`PROTOCOL`]. A later version keeps these two variants first, in
//!    this order, and keeps the version their first field, so a silo
//!    reads a peer's version ([`protocol_of`]) even when it cannot read the
//!    rest, and refuses a peer of another version by number
//!    (`ConnectError::Version`) rather than with a decoding error.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use granary_actors::GrainKey;
pub use granary_actors::route::Kind;
use serde::{Deserialize, Serialize};

use crate::SiloId;

/// The version of the wire protocol this build speaks (rule 4). Version 2:
/// the handshake's proofs cover the cluster's name under a derived key,
/// and [`RemoteError::Forbidden`].
pub const PROTOCOL: u32 = 2;

/// The default bound on a frame's body.
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

/// Bytes of a nonce or a proof in the handshake.
pub const PROOF_LEN: usize = 32;

/// What a frame says (rule 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Header {
    /// The connecting silo: who it is, and a challenge for the acceptor.
    Hello {
        /// The wire protocol's version it speaks (rule 4): always first.
        protocol: u32,
        /// The cluster it believes it joins.
        cluster: String,
        /// The connecting silo.
        silo: SiloId,
        /// A fresh random challenge.
        nonce: [u8; PROOF_LEN],
    },
    /// The accepting silo: who it is, its proof of the secret, and its own
    /// challenge.
    Challenge {
        /// The wire protocol's version it speaks (rule 4): always first.
        protocol: u32,
        /// The accepting silo.
        silo: SiloId,
        /// A fresh random challenge.
        nonce: [u8; PROOF_LEN],
        /// The acceptor's proof (see `auth.rs`).
        proof: [u8; PROOF_LEN],
    },
    /// The connecting silo's proof of the secret.
    Proof {
        /// The connector's proof (see `auth.rs`).
        proof: [u8; PROOF_LEN],
    },
    /// A message for a grain; the payload is the message in its wire form.
    Request {
        /// Unique among this sender's requests in flight on the connection.
        id: u64,
        /// The grain type's registered name.
        grain_type: String,
        /// The grain's key.
        key: GrainKey,
        /// The message's registered name.
        message: String,
        /// How the sender waits: a call or a read is answered with the
        /// reply, a tell with its admission at the home.
        kind: Kind,
        /// The sender's call chain (0: none), so that a call back to a
        /// grain waiting in that chain runs at once (reentrancy across
        /// silos).
        chain: u64,
        /// How long the sender still waits, in microseconds; a turn not
        /// started by then is not run.
        time_left_us: u64,
    },
    /// The answer to request `id`; on success the payload is the reply in
    /// its wire form.
    Response {
        /// The request's id.
        id: u64,
        /// How the request ended.
        outcome: Outcome,
    },
}

/// How a request ended at the silo that handled it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Handled; the payload is the reply.
    Ok,
    /// Not handled, or handled without an answer.
    Failed(RemoteError),
}

/// A failure at the remote silo, as it travels back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteError {
    /// No grain type registered under this name there.
    UnknownGrainType(String),
    /// The grain type takes no message of this name there.
    UnknownMessage {
        /// The grain type's name.
        grain_type: String,
        /// The message name.
        message: String,
    },
    /// The message's bytes did not decode there.
    BadPayload(String),
    /// The grain did not answer within the remote call timeout.
    Timeout(String),
    /// The grain's turn failed (it panicked or could not activate).
    TurnFailed(String),
    /// The remote silo is shutting down.
    ShutDown,
    /// The grain's activation is on another silo (the directory says so):
    /// send it there.
    Moved(crate::SiloId),
    /// The directory cannot decide yet (its owner took over the entry a
    /// moment ago); retry shortly.
    Retry,
    /// The silo has no room for the grain (its published load was
    /// stale): no device where it fits, or it holds its activation limit.
    /// Place the grain elsewhere.
    NoRoom,
    /// Anything else, described.
    Other(String),
    /// The remote silo has `max_inbound` requests from this one running,
    /// or holds its `activation_limit` and would have had to start an
    /// activation: not handled; retry shortly.
    Overloaded,
    /// The remote silo refused the request from this sender: a directory
    /// operation naming another silo, or names past their bounds.
    Forbidden(String),
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RemoteError::UnknownGrainType(name) => write!(f, "unknown grain type {name:?}"),
            RemoteError::UnknownMessage {
                grain_type,
                message,
            } => write!(f, "grain type {grain_type:?} takes no message {message:?}"),
            RemoteError::BadPayload(why) => write!(f, "the message did not decode: {why}"),
            RemoteError::Timeout(why) => write!(f, "timed out: {why}"),
            RemoteError::TurnFailed(why) => write!(f, "the turn failed: {why}"),
            RemoteError::ShutDown => write!(f, "the silo is shutting down"),
            RemoteError::Moved(silo) => write!(f, "the grain's activation is on {silo}"),
            RemoteError::Retry => write!(f, "the directory is taking over the entry; retry"),
            RemoteError::NoRoom => write!(f, "the silo has no room for the grain"),
            RemoteError::Other(why) => write!(f, "{why}"),
            RemoteError::Overloaded => write!(f, "the silo is overloaded; retry"),
            RemoteError::Forbidden(why) => write!(f, "refused: {why}"),
        }
    }
}

impl From<granary_actors::DispatchError> for RemoteError {
    fn from(err: granary_actors::DispatchError) -> RemoteError {
        use granary_actors::{CallError, DispatchError};
        match err {
            DispatchError::UnknownGrainType(name) => RemoteError::UnknownGrainType(name),
            DispatchError::UnknownMessage {
                grain_type,
                message,
            } => RemoteError::UnknownMessage {
                grain_type,
                message,
            },
            DispatchError::BadPayload { what, reason } => {
                RemoteError::BadPayload(format!("{what}: {reason}"))
            }
            DispatchError::Call(CallError::ShutDown) => RemoteError::ShutDown,
            DispatchError::Call(err @ CallError::Timeout { .. }) => {
                RemoteError::Timeout(err.to_string())
            }
            DispatchError::Call(err @ CallError::TurnFailed { .. }) => {
                RemoteError::TurnFailed(err.to_string())
            }
            // A first call past this silo's activation limit: the caller
            // places the grain on another silo, as for a full device.
            DispatchError::Call(CallError::Overloaded { .. }) => RemoteError::NoRoom,
            other => RemoteError::Other(other.to_string()),
        }
    }
}

/// Why a frame's body is not a frame (rule 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than its header length field, or the header overruns it.
    Truncated {
        /// The body's length.
        len: usize,
    },
    /// The header is not a [`Header`] (or could not be written as one).
    BadHeader(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Truncated { len } => {
                write!(f, "a frame of {len} bytes is shorter than its header says")
            }
            FrameError::BadHeader(why) => write!(f, "a frame header that does not decode: {why}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// A frame's body: `header` and then `payload` (rule 2).
pub fn encode(header: &Header, payload: &[u8]) -> Result<Bytes, FrameError> {
    Ok(EncodedHeader::new(header)?.frame(payload))
}

/// A header encoded, before its frame is built: what the frame's length
/// will be is known without copying the payload.
pub struct EncodedHeader(Vec<u8>);

impl EncodedHeader {
    /// Encodes `header`.
    pub fn new(header: &Header) -> Result<EncodedHeader, FrameError> {
        let header =
            postcard::to_allocvec(header).map_err(|err| FrameError::BadHeader(err.to_string()))?;
        if u32::try_from(header.len()).is_err() {
            return Err(FrameError::BadHeader(format!(
                "a header of {} bytes",
                header.len()
            )));
        }
        Ok(EncodedHeader(header))
    }

    /// The length of the frame with `payload`.
    pub fn frame_len(&self, payload: &[u8]) -> usize {
        4 + self.0.len() + payload.len()
    }

    /// The frame's body: this header and then `payload` (rule 2).
    pub fn frame(&self, payload: &[u8]) -> Bytes {
        let mut body = BytesMut::with_capacity(self.frame_len(payload));
        // Checked to fit in `new`.
        body.put_u32_le(self.0.len() as u32);
        body.put_slice(&self.0);
        body.put_slice(payload);
        body.freeze()
    }
}

/// A frame's header and payload, the payload sharing `body`'s memory.
pub fn decode(mut body: Bytes) -> Result<(Header, Bytes), FrameError> {
    let len = body.len();
    if len < 4 {
        return Err(FrameError::Truncated { len });
    }
    let header_len = body.get_u32_le() as usize;
    if header_len > body.len() {
        return Err(FrameError::Truncated { len });
    }
    let header_bytes = body.split_to(header_len);
    let header = postcard::from_bytes(&header_bytes)
        .map_err(|err| FrameError::BadHeader(err.to_string()))?;
    Ok((header, body))
}

/// The protocol version a handshake body announces (rule 4): that of a
/// `Hello` or a `Challenge`, read from the front of its header, even when
/// the rest of the header is of a layout this build cannot read. `None`
/// for a body that is not a handshake header.
pub fn protocol_of(body: &[u8]) -> Option<u32> {
    let header_len = u32::from_le_bytes(body.get(..4)?.try_into().ok()?) as usize;
    let header = body.get(4..header_len.checked_add(4)?)?;
    // The variant's index, then the first field: both varints.
    let ((variant, protocol), _) = postcard::take_from_bytes::<(u32, u32)>(header).ok()?;
    (variant <= 1).then_some(protocol)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_round_trips_with_its_payload_untouched() {
        let header = Header::Request {
            id: 7,
            grain_type: "account".into(),
            key: GrainKey::Compound(3, "eu".into()),
            message: "deposit".into(),
            kind: Kind::Call,
            chain: 0x1234_5678_9abc_def0,
            time_left_us: 2_500_000,
        };
        let payload: Vec<u8> = (0..=255).collect();
        let (back, body) = decode(encode(&header, &payload).unwrap()).unwrap();
        assert_eq!(back, header);
        assert_eq!(&body[..], &payload[..]);
    }

    #[test]
    fn broken_bodies_are_typed_errors() {
        assert_eq!(
            decode(Bytes::from_static(&[1, 0])),
            Err(FrameError::Truncated { len: 2 })
        );
        assert_eq!(
            decode(Bytes::from_static(&[9, 0, 0, 0, 1])),
            Err(FrameError::Truncated { len: 5 })
        );
        assert!(matches!(
            decode(Bytes::from_static(&[2, 0, 0, 0, 200, 200])),
            Err(FrameError::BadHeader(_))
        ));
    }
}
