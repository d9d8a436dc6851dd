//! One authenticated, multiplexed connection between two silos.
//!
//! # Protocol
//!
//! 1. **Handshake first** (`auth.rs`): `Hello`, `Challenge`, `Proof`, all
//!    within `handshake_timeout`. A peer of another cluster, with a wrong
//!    proof, or that sends anything else first is refused: the connection
//!    closes and nothing it sent is handled. Before it proves anything,
//!    the acceptor refuses a peer claiming the acceptor's own id or one
//!    its [`Admission`] does not let in (a silo outside its view), and the
//!    connector refuses an acceptor that is not the silo it dialled.
//! 2. **Both ways.** Either silo may send requests; each side numbers its
//!    own, and a response carries its request's number. Any number of
//!    requests may be in flight (pipelining); responses come back in any
//!    order. A request carries how its sender waits (a call, a read, or a
//!    tell, which is answered with its admission at the grain's mailbox),
//!    its call chain, and the time its sender still waits.
//! 3. **One writer.** Frames to send queue in a bounded channel; one task
//!    writes every frame that is waiting, then flushes once, so a burst of
//!    small requests costs one system call, not one each.
//! 4. **Bounded work.** At most `max_inbound` requests from the peer are
//!    under way at once, each until its answer is queued. Past that, a
//!    request is answered `Overloaded` at once, the answer queued without
//!    a task of its own; when the outgoing queue has no room for it (the
//!    peer does not read its answers), the refusal is dropped and the
//!    caller's own deadline ends its wait. The reader never stops: the
//!    answers to this silo's own calls on the connection still get
//!    through. However many requests a peer sends, the tasks and memory
//!    spent on them stay bounded.
//! 5. **Failure is fast.** A frame longer than `max_frame`, a frame that
//!    does not decode, a handshake frame after the handshake, an I/O error
//!    or the peer closing: the connection closes, every call waiting on it
//!    fails at once with [`CallFailure::SiloUnavailable`], and later calls
//!    fail the same way without waiting. Nothing else is affected. A call
//!    that gets no response fails with [`CallFailure::Timeout`] after
//!    `call_timeout` (or its own time left, if shorter); one with less than
//!    a millisecond left fails so at once, and is not sent. Closing drops this side of
//!    the stream at once, even while the writer waits on a peer that reads
//!    nothing, and with it every frame still queued.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use granary_actors::{GrainKey, TraceId};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::SiloId;
use crate::auth::{self, ClusterSecret, Role};
use crate::transport::BoxIo;
use crate::wire::{self, FrameError, Header, Kind, Outcome, RemoteError};

/// How a connection behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionConfig {
    /// The longest frame body read or written (default 16 MiB).
    pub max_frame: usize,
    /// How long the handshake may take (default 5 s).
    pub handshake_timeout: Duration,
    /// How long a call waits for its response (default 30 s).
    pub call_timeout: Duration,
    /// Frames waiting to be written, at least 1 (default 4096); a sender
    /// waits for room.
    pub outgoing_frames: usize,
    /// Requests from the peer running at once, at least 1 (default 4096).
    pub max_inbound: usize,
}

impl Default for ConnectionConfig {
    fn default() -> ConnectionConfig {
        ConnectionConfig {
            max_frame: wire::DEFAULT_MAX_FRAME,
            handshake_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(30),
            outgoing_frames: 4096,
            max_inbound: 4096,
        }
    }
}

/// What a silo does with the requests that reach it over a connection.
pub trait Inbound: Send + Sync + 'static {
    /// Handles one request from `from`; the reply is in its wire form (for
    /// a one-way message, empty and not sent).
    fn request(
        &self,
        from: &SiloId,
        request: InboundRequest,
    ) -> BoxFuture<'static, Result<Vec<u8>, RemoteError>>;
}

/// Who an acceptor lets in (rule 1), asked with the id a connecting peer
/// claims before the acceptor proves anything to it.
pub trait Admission: Send + Sync + 'static {
    /// Whether `peer` may connect. It may wait (for the view to catch up
    /// with a silo that just joined), within the handshake's timeout.
    fn admit(&self, peer: &SiloId) -> BoxFuture<'static, bool>;
}

/// Admits every peer but the acceptor itself: for connections outside a
/// cluster node (tests, benches), where there is no view to check.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnyPeer;

impl Admission for AnyPeer {
    fn admit(&self, _peer: &SiloId) -> BoxFuture<'static, bool> {
        Box::pin(async { true })
    }
}

/// A request as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundRequest {
    /// The grain type's registered name.
    pub grain_type: String,
    /// The grain's key.
    pub key: GrainKey,
    /// The message's registered name.
    pub message: String,
    /// The message in its wire form.
    pub payload: Bytes,
    /// How the sender waits (a tell is answered with its admission).
    pub kind: Kind,
    /// The sender's call chain (0: none).
    pub chain: u64,
    /// How long the sender still waited when the request arrived.
    pub time_left: Duration,
    /// When the request arrived: the sender's deadline is `received +
    /// time_left`, however long the request then waits here.
    pub received: std::time::Instant,
}

impl InboundRequest {
    /// How long the sender still waits now.
    pub fn time_left_now(&self) -> Duration {
        self.time_left.saturating_sub(self.received.elapsed())
    }
}

/// A request to send: a grain, a message in its wire form, and how the
/// sender waits.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// The grain type's registered name.
    pub grain_type: &'a str,
    /// The grain's key.
    pub key: &'a GrainKey,
    /// The message's registered name.
    pub message: &'a str,
    /// The message in its wire form.
    pub payload: &'a [u8],
    /// How the sender waits.
    pub kind: Kind,
    /// The sender's call chain (0: none).
    pub chain: u64,
    /// How long the sender waits, at most; the connection's
    /// `call_timeout` bounds it too.
    pub time_left: Duration,
}

/// A silo served on a connection directly (no cluster node) handles
/// requests by name in the sender's chain and until its deadline
/// (`Silo::receive`).
impl Inbound for granary_actors::Silo {
    fn request(
        &self,
        _from: &SiloId,
        request: InboundRequest,
    ) -> BoxFuture<'static, Result<Vec<u8>, RemoteError>> {
        let silo = self.clone();
        Box::pin(async move {
            let time_left = request.time_left_now();
            silo.receive(granary_actors::route::InboundRequest {
                grain_type: &request.grain_type,
                key: request.key,
                message: &request.message,
                payload: &request.payload,
                kind: request.kind,
                chain: request.chain,
                time_left,
            })
            .await
            .map_err(RemoteError::from)
        })
    }
}

/// Why a connection could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectError {
    /// The transport failed (refused, reset, unreachable).
    Io(String),
    /// The handshake did not finish within `handshake_timeout`.
    Timeout,
    /// The peer belongs to another cluster.
    WrongCluster {
        /// The cluster the peer named.
        theirs: String,
    },
    /// A proof did not verify: the peer does not hold the cluster's secret
    /// (or refused ours).
    Unauthenticated,
    /// The silo that answered is not the one dialled (rule 1): nothing was
    /// proved to it.
    UnexpectedPeer {
        /// The silo dialled.
        expected: SiloId,
        /// The silo that answered.
        found: SiloId,
    },
    /// The connecting peer claimed the acceptor's own id (rule 1).
    OwnId,
    /// The acceptor's view does not admit the connecting peer (rule 1).
    NotAdmitted {
        /// The id it claimed.
        peer: SiloId,
    },
    /// The peer broke the handshake's protocol.
    Protocol(String),
    /// The peer speaks another version of the wire protocol (`wire.rs`,
    /// rule 4).
    Version {
        /// This build's version.
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Io(why) => write!(f, "connection failed: {why}"),
            ConnectError::Timeout => write!(f, "the handshake timed out"),
            ConnectError::WrongCluster { theirs } => {
                write!(f, "the peer belongs to cluster {theirs:?}")
            }
            ConnectError::Unauthenticated => {
                write!(f, "the peer could not prove it holds the cluster secret")
            }
            ConnectError::UnexpectedPeer { expected, found } => {
                write!(f, "dialled {expected}, but {found} answered")
            }
            ConnectError::OwnId => write!(f, "the peer claimed this silo's own id"),
            ConnectError::NotAdmitted { peer } => {
                write!(f, "{peer} is not in this silo's view")
            }
            ConnectError::Protocol(why) => write!(f, "handshake protocol error: {why}"),
            ConnectError::Version { ours, theirs } => write!(
                f,
                "the peer speaks wire protocol version {theirs}, this silo {ours}"
            ),
        }
    }
}

impl std::error::Error for ConnectError {}

impl From<io::Error> for ConnectError {
    fn from(err: io::Error) -> ConnectError {
        ConnectError::Io(err.to_string())
    }
}

/// Why a call over a connection failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallFailure {
    /// The connection to the silo is closed or closed while waiting
    /// (rule 5): the silo may be dead.
    SiloUnavailable {
        /// The silo.
        silo: SiloId,
        /// Why the connection closed.
        reason: String,
    },
    /// The remote silo answered with a failure.
    Remote(RemoteError),
    /// No response within the call timeout.
    Timeout {
        /// The silo.
        silo: SiloId,
        /// The timeout.
        after: Duration,
    },
    /// The request is longer than a frame may be.
    TooLarge {
        /// The frame's length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl std::fmt::Display for CallFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallFailure::SiloUnavailable { silo, reason } => {
                write!(f, "silo {silo} is unavailable: {reason}")
            }
            CallFailure::Remote(err) => write!(f, "the remote silo failed the call: {err}"),
            CallFailure::Timeout { silo, after } => {
                write!(f, "no answer from silo {silo} within {after:?}")
            }
            CallFailure::TooLarge { len, max } => {
                write!(
                    f,
                    "a request of {len} bytes exceeds the {max}-byte frame limit"
                )
            }
        }
    }
}

impl std::error::Error for CallFailure {}

type Reply = oneshot::Sender<Result<Bytes, CallFailure>>;

struct Shared {
    peer: SiloId,
    config: ConnectionConfig,
    outgoing: mpsc::Sender<Bytes>,
    /// Calls waiting for their response, by request number.
    pending: Mutex<HashMap<u64, Reply>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    reason: Mutex<Option<String>>,
    /// Stops the reader and the writer.
    stop: CancellationToken,
}

impl Shared {
    fn unavailable(&self) -> CallFailure {
        CallFailure::SiloUnavailable {
            silo: self.peer.clone(),
            reason: self
                .reason
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
                .unwrap_or_else(|| "the connection is closed".into()),
        }
    }

    /// Rule 5: closes once, and fails every waiting call.
    fn close(&self, reason: String) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::debug!(peer = %self.peer, %reason, "connection closed");
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
        self.stop.cancel();
        let pending =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        let failure = self.unavailable();
        for (_, reply) in pending {
            let _ = reply.send(Err(failure.clone()));
        }
    }

    fn take_pending(&self, id: u64) -> Option<Reply> {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id)
    }
}

/// An open connection to one silo. Cheap to clone; every clone is the same
/// connection. It closes when asked, on failure (rule 5), or when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
    _last: Arc<CloseOnDrop>,
}

/// Closes the connection when the last handle goes.
struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close("closed by this silo".into());
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.shared.peer)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Connection {
    /// The silo at the other end, as it proved itself.
    pub fn peer(&self) -> &SiloId {
        &self.shared.peer
    }

    /// Whether the connection is closed (rule 5).
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Closes the connection; waiting calls fail with `SiloUnavailable`.
    pub fn close(&self) {
        self.shared.close("closed by this silo".into());
    }

    /// Resolves once the connection is closed.
    pub async fn closed(&self) {
        self.shared.stop.cancelled().await;
    }

    /// Calls grain `grain_type`/`key` on the peer with the message
    /// registered as `message`, in its wire form, and returns the reply in
    /// its wire form: a call outside any chain, waiting at most the
    /// connection's `call_timeout`.
    pub async fn call(
        &self,
        grain_type: &str,
        key: &GrainKey,
        message: &str,
        payload: &[u8],
    ) -> Result<Bytes, CallFailure> {
        self.send(Outgoing {
            grain_type,
            key,
            message,
            payload,
            kind: Kind::Call,
            chain: 0,
            time_left: self.shared.config.call_timeout,
        })
        .await
    }

    /// Sends a one-way message and returns once the peer has admitted it
    /// (its grain's mailbox took it), or with why not.
    pub async fn tell(
        &self,
        grain_type: &str,
        key: &GrainKey,
        message: &str,
        payload: &[u8],
    ) -> Result<(), CallFailure> {
        self.send(Outgoing {
            grain_type,
            key,
            message,
            payload,
            kind: Kind::Tell,
            chain: 0,
            time_left: self.shared.config.call_timeout,
        })
        .await
        .map(drop)
    }

    /// Sends `request` and waits for its answer (a tell's: its admission),
    /// at most its `time_left` and the connection's `call_timeout`.
    pub async fn send(&self, request: Outgoing<'_>) -> Result<Bytes, CallFailure> {
        let shared = &self.shared;
        if self.is_closed() {
            return Err(shared.unavailable());
        }
        let wait = request.time_left.min(shared.config.call_timeout);
        if wait < MIN_TIME_LEFT {
            // The sender has stopped waiting, or will before any answer
            // could come: nothing goes out. (A frame queued anyway would
            // still be handled there: a home registered, a grain
            // activated, a tell run.)
            return Err(CallFailure::Timeout {
                silo: shared.peer.clone(),
                after: wait,
            });
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = request_frame(shared, id, &request, wait)?;
        let (reply, answer) = oneshot::channel();
        shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, reply);
        // Closed before the insert: `close` set the flag before draining,
        // so it is seen here (rule 5).
        if self.is_closed() {
            shared.take_pending(id);
            return Err(shared.unavailable());
        }
        /// Forgets the call if its caller gives up.
        struct Forget<'a>(&'a Shared, u64);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.take_pending(self.1);
            }
        }
        let _forget = Forget(shared, id);
        // The request's span carries its trace (`granary_actors::trace`
        // rule 2): the same `trace` the handling silo's spans show.
        let span = tracing::debug_span!(
            "granary.remote_call",
            trace = %TraceId(request.chain),
            grain_type = request.grain_type,
            message = request.message,
            to = %shared.peer,
        );
        // The timeout covers waiting for room in the queue too (rule 5).
        let sent_and_answered = async {
            if shared.outgoing.send(frame).await.is_err() {
                return Err(shared.unavailable());
            }
            answer.await.unwrap_or_else(|_| Err(shared.unavailable()))
        }
        .instrument(span);
        match tokio::time::timeout(wait, sent_and_answered).await {
            Ok(result) => result,
            Err(_) => Err(CallFailure::Timeout {
                silo: shared.peer.clone(),
                after: wait,
            }),
        }
    }
}

fn request_frame(
    shared: &Shared,
    id: u64,
    request: &Outgoing<'_>,
    wait: Duration,
) -> Result<Bytes, CallFailure> {
    let header = Header::Request {
        id,
        grain_type: request.grain_type.to_string(),
        key: request.key.clone(),
        message: request.message.to_string(),
        kind: request.kind,
        chain: request.chain,
        time_left_us: u64::try_from(wait.as_micros()).unwrap_or(u64::MAX),
    };
    let payload = request.payload;
    let header = wire::EncodedHeader::new(&header).map_err(|err| {
        CallFailure::Remote(RemoteError::Other(format!(
            "the request did not encode: {err}"
        )))
    })?;
    // Refused before the payload is copied into a frame.
    let len = header.frame_len(payload);
    if len > shared.config.max_frame {
        return Err(CallFailure::TooLarge {
            len,
            max: shared.config.max_frame,
        });
    }
    Ok(header.frame(payload))
}

type Reader = FramedRead<ReadHalf<BoxIo>, LengthDelimitedCodec>;
type Writer = FramedWrite<WriteHalf<BoxIo>, LengthDelimitedCodec>;

/// The longest frame read before the peer has proved itself.
const HANDSHAKE_MAX_FRAME: usize = 1024;

fn framed(io: BoxIo, _config: &ConnectionConfig) -> (Reader, Writer) {
    let codec = || {
        LengthDelimitedCodec::builder()
            .max_frame_length(HANDSHAKE_MAX_FRAME)
            .new_codec()
    };
    let (read, write) = tokio::io::split(io);
    (
        FramedRead::new(read, codec()),
        FramedWrite::new(write, codec()),
    )
}

/// The next handshake frame.
async fn next_header(reader: &mut Reader) -> Result<Header, ConnectError> {
    match reader.next().await {
        Some(Ok(body)) => {
            let body = body.freeze();
            // A peer of another version: refused by number (wire rule 4),
            // whether or not the rest of its header reads.
            if let Some(theirs) = wire::protocol_of(&body) {
                if theirs != wire::PROTOCOL {
                    return Err(ConnectError::Version {
                        ours: wire::PROTOCOL,
                        theirs,
                    });
                }
            }
            wire::decode(body)
                .map(|(header, _)| header)
                .map_err(|err| ConnectError::Protocol(err.to_string()))
        }
        Some(Err(err)) => Err(ConnectError::Io(err.to_string())),
        None => Err(ConnectError::Io("the peer closed the connection".into())),
    }
}

async fn send_header(writer: &mut Writer, header: &Header) -> Result<(), ConnectError> {
    let frame = wire::encode(header, &[]).map_err(|err| ConnectError::Protocol(err.to_string()))?;
    writer.send(frame).await?;
    Ok(())
}

/// Opens a connection over `io` to `expected`, proving both sides hold
/// `secret` (rule 1); a silo other than `expected` that answers is sent no
/// proof.
pub async fn connect(
    io: BoxIo,
    local: SiloId,
    expected: &SiloId,
    cluster: &str,
    secret: &ClusterSecret,
    inbound: Arc<dyn Inbound>,
    config: ConnectionConfig,
) -> Result<Connection, ConnectError> {
    let (mut reader, mut writer) = framed(io, &config);
    let handshake = async {
        let ours = auth::nonce()?;
        send_header(
            &mut writer,
            &Header::Hello {
                protocol: wire::PROTOCOL,
                cluster: cluster.to_string(),
                silo: local.clone(),
                nonce: ours,
            },
        )
        .await?;
        // `next_header` refused a challenge of another version.
        let Header::Challenge {
            protocol: _,
            silo: peer,
            nonce: theirs,
            proof,
        } = next_header(&mut reader).await?
        else {
            return Err(ConnectError::Protocol("expected a challenge".into()));
        };
        // Handshake rule 3: the silo dialled, or no proof at all.
        if &peer != expected {
            return Err(ConnectError::UnexpectedPeer {
                expected: expected.clone(),
                found: peer,
            });
        }
        if !secret.verify(
            Role::Acceptor,
            cluster,
            [&ours, &theirs],
            [&local, &peer],
            &proof,
        ) {
            return Err(ConnectError::Unauthenticated);
        }
        let proof = secret.proof(Role::Connector, cluster, [&theirs, &ours], [&local, &peer]);
        send_header(&mut writer, &Header::Proof { proof }).await?;
        Ok(peer)
    };
    let peer = tokio::time::timeout(config.handshake_timeout, handshake)
        .await
        .map_err(|_| ConnectError::Timeout)??;
    Ok(start(peer, reader, writer, inbound, config))
}

/// Accepts a connection over `io` from a silo that connected, proving both
/// sides hold `secret` (rule 1) once `admission` lets the peer in.
pub async fn accept(
    io: BoxIo,
    local: SiloId,
    cluster: &str,
    secret: &ClusterSecret,
    admission: &dyn Admission,
    inbound: Arc<dyn Inbound>,
    config: ConnectionConfig,
) -> Result<Connection, ConnectError> {
    let (mut reader, mut writer) = framed(io, &config);
    let handshake = async {
        // `next_header` refused a hello of another version.
        let Header::Hello {
            protocol: _,
            cluster: theirs_cluster,
            silo: peer,
            nonce: theirs,
        } = next_header(&mut reader).await?
        else {
            return Err(ConnectError::Protocol("expected a hello".into()));
        };
        if theirs_cluster != cluster {
            return Err(ConnectError::WrongCluster {
                theirs: theirs_cluster,
            });
        }
        // Handshake rule 2: refused before anything is proved.
        if peer.address == local.address {
            return Err(ConnectError::OwnId);
        }
        if !admission.admit(&peer).await {
            return Err(ConnectError::NotAdmitted { peer });
        }
        let ours = auth::nonce()?;
        let proof = secret.proof(Role::Acceptor, cluster, [&theirs, &ours], [&peer, &local]);
        send_header(
            &mut writer,
            &Header::Challenge {
                protocol: wire::PROTOCOL,
                silo: local.clone(),
                nonce: ours,
                proof,
            },
        )
        .await?;
        let Header::Proof { proof } = next_header(&mut reader).await? else {
            return Err(ConnectError::Protocol("expected a proof".into()));
        };
        if !secret.verify(
            Role::Connector,
            cluster,
            [&ours, &theirs],
            [&peer, &local],
            &proof,
        ) {
            return Err(ConnectError::Unauthenticated);
        }
        Ok(peer)
    };
    let peer = tokio::time::timeout(config.handshake_timeout, handshake)
        .await
        .map_err(|_| ConnectError::Timeout)??;
    Ok(start(peer, reader, writer, inbound, config))
}

/// Starts the reader and the writer of an authenticated connection.
fn start(
    peer: SiloId,
    mut reader: Reader,
    mut writer: Writer,
    inbound: Arc<dyn Inbound>,
    config: ConnectionConfig,
) -> Connection {
    reader.decoder_mut().set_max_frame_length(config.max_frame);
    writer.encoder_mut().set_max_frame_length(config.max_frame);
    let (outgoing, frames) = mpsc::channel(config.outgoing_frames.max(1));
    let shared = Arc::new(Shared {
        peer,
        config,
        outgoing,
        pending: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
        closed: AtomicBool::new(false),
        reason: Mutex::new(None),
        stop: CancellationToken::new(),
    });
    tokio::spawn(write_frames(shared.clone(), writer, frames));
    // The reader holds the shared state weakly through its sender side
    // only: a connection whose handles are all gone closes (CloseOnDrop).
    tokio::spawn(read_frames(shared.clone(), reader, inbound));
    Connection {
        _last: Arc::new(CloseOnDrop(shared.clone())),
        shared,
    }
}

/// The least time left worth sending a request with (rule 5): less is no
/// time for an answer to come back, and the timer would fire only after
/// the frame was queued.
const MIN_TIME_LEFT: Duration = Duration::from_millis(1);

/// Most frames written before one flush.
const WRITE_BATCH: usize = 256;

/// How long a closing writer tries to tell the peer the stream ends.
const CLOSE_GRACE: Duration = Duration::from_millis(100);

/// Rule 3. A close (rule 5) stops the writer even while it waits on a
/// peer that reads nothing: its half of the stream, and the frames still
/// queued, are dropped then, not kept for as long as the peer stalls.
async fn write_frames(shared: Arc<Shared>, mut writer: Writer, mut frames: mpsc::Receiver<Bytes>) {
    let writing = async {
        loop {
            let Some(first) = frames.recv().await else {
                return Ok(());
            };
            writer.feed(first).await?;
            for _ in 1..WRITE_BATCH {
                match frames.try_recv() {
                    Ok(frame) => writer.feed(frame).await?,
                    Err(_) => break,
                }
            }
            SinkExt::<Bytes>::flush(&mut writer).await?;
        }
    };
    let outcome: io::Result<()> = tokio::select! {
        biased;
        _ = shared.stop.cancelled() => Ok(()),
        outcome = writing => outcome,
    };
    if let Err(err) = outcome {
        shared.close(format!("writing failed: {err}"));
    }
    // Best effort, and bounded: tell the peer the stream ends.
    let _ = tokio::time::timeout(CLOSE_GRACE, SinkExt::<Bytes>::close(&mut writer)).await;
}

/// Reads frames until the connection closes (rules 2, 4 and 5).
async fn read_frames(shared: Arc<Shared>, mut reader: Reader, inbound: Arc<dyn Inbound>) {
    let running = Arc::new(Semaphore::new(shared.config.max_inbound.max(1)));
    let reason = loop {
        let next = tokio::select! {
            _ = shared.stop.cancelled() => return,
            next = reader.next() => next,
        };
        let body = match next {
            Some(Ok(body)) => body.freeze(),
            Some(Err(err)) => break format!("reading failed: {err}"),
            None => break "the peer closed the connection".to_string(),
        };
        match wire::decode(body) {
            Ok((
                Header::Request {
                    id,
                    grain_type,
                    key,
                    message,
                    kind,
                    chain,
                    time_left_us,
                },
                payload,
            )) => {
                // Rule 4: past the bound, refuse the request without a
                // task and keep reading: responses to our own calls must
                // get through. A refusal that finds no room is dropped.
                let Ok(permit) = running.clone().try_acquire_owned() else {
                    let refusal =
                        response_frame(&shared, id, Outcome::Failed(RemoteError::Overloaded), &[]);
                    if let Some(refusal) = refusal {
                        match shared.outgoing.try_send(refusal) {
                            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                            Err(mpsc::error::TrySendError::Closed(_)) => {
                                break "the connection's writer stopped".to_string();
                            }
                        }
                    }
                    continue;
                };
                let span = tracing::debug_span!(
                    "granary.remote_request",
                    trace = %TraceId(chain),
                    grain_type = %grain_type,
                    message = %message,
                    from = %shared.peer,
                );
                let request = InboundRequest {
                    grain_type,
                    key,
                    message,
                    payload,
                    kind,
                    chain,
                    time_left: Duration::from_micros(time_left_us),
                    received: std::time::Instant::now(),
                };
                let handled = inbound.request(&shared.peer, request).instrument(span);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let result = handled.await;
                    let (outcome, payload) = match result {
                        Ok(reply) => (Outcome::Ok, reply),
                        Err(err) => (Outcome::Failed(err), Vec::new()),
                    };
                    // Rule 4: the request counts until its answer is
                    // queued, so answers waiting for room are bounded too.
                    respond(&shared, id, outcome, &payload).await;
                    drop(permit);
                });
            }
            Ok((Header::Response { id, outcome }, payload)) => {
                if let Some(reply) = shared.take_pending(id) {
                    let _ = reply.send(match outcome {
                        Outcome::Ok => Ok(payload),
                        Outcome::Failed(err) => Err(CallFailure::Remote(err)),
                    });
                }
            }
            Ok((other, _)) => {
                break format!("a handshake frame after the handshake: {other:?}");
            }
            Err(FrameError::Truncated { len }) => {
                break format!("a truncated frame of {len} bytes");
            }
            Err(err) => break err.to_string(),
        }
    };
    shared.close(reason);
}

/// Sends the response to request `id`; one too long for a frame is sent
/// as a failure instead.
async fn respond(shared: &Shared, id: u64, outcome: Outcome, payload: &[u8]) {
    if let Some(frame) = response_frame(shared, id, outcome, payload) {
        let _ = shared.outgoing.send(frame).await;
    }
}

/// The frame answering request `id` (a failure in place of a reply too long
/// for a frame); `None` if not even that encodes.
fn response_frame(shared: &Shared, id: u64, outcome: Outcome, payload: &[u8]) -> Option<Bytes> {
    let header = Header::Response { id, outcome };
    let frame = match wire::encode(&header, payload) {
        Ok(frame) if frame.len() <= shared.config.max_frame => frame,
        Ok(frame) => {
            let failed = Header::Response {
                id,
                outcome: Outcome::Failed(RemoteError::Other(format!(
                    "a reply of {} bytes exceeds the {}-byte frame limit",
                    frame.len(),
                    shared.config.max_frame
                ))),
            };
            wire::encode(&failed, &[]).ok()?
        }
        Err(_) => return None,
    };
    Some(frame)
}
