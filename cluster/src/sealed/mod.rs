//! Gossip that only the cluster can speak: chitchat over UDP, each
//! datagram sealed with a MAC under the cluster's secret, opened and
//! checked before chitchat sees it.
//!
//! chitchat trusts every datagram that decodes: one forged delta at a
//! version near `u64::MAX` for a silo's own state evicts it for good (its
//! next update overflows), and forged heartbeats bring a dead silo back.
//! [`SealedUdpTransport`] is a chitchat [`Transport`] that closes both.
//!
//! # Rules
//!
//! 1. **Sealed.** Every datagram sent carries a MAC (HMAC-SHA-256 under
//!    the cluster secret's gossip key, `auth.rs` rule 2) over the cluster's
//!    name, a header and chitchat's bytes (`envelope.rs`). A datagram whose
//!    MAC does not verify is dropped and counted: a host without the
//!    secret, or of another cluster, can neither add, alter, evict nor
//!    revive a silo, at any version.
//! 2. **Fresh, once, and for this silo.** The header holds a random
//!    session per socket, a counter, the send time and the address the
//!    datagram was sent to. A datagram sent more than [`FRESH`] from the
//!    receiver's clock, whose counter its session's 64-wide window has
//!    seen, or sealed for another address is dropped: a recorded datagram
//!    cannot be replayed to its silo, nor sent on to another. (Silo clocks
//!    must agree within that bound.)
//! 3. **Checked.** An opened datagram is read (`inspect.rs`). The whole
//!    of it is dropped if a Syn names another cluster, or if its digest
//!    names more than [`MAX_NODES`] nodes, a name over [`MAX_NAME`] bytes,
//!    or a version or heartbeat at or above [`MAX_VERSION`]. One node's
//!    part of its delta is left out (the rest goes on) if it is about this
//!    silo itself (its own state is its own to write), names over
//!    [`MAX_NAME`] bytes, reaches [`MAX_VERSION`], or moves the node's
//!    versions more than [`MAX_JUMP`] past the highest this socket
//!    accepted for it in the last [`TRACK_FOR`]. This silo's own node is
//!    the one its first datagram sent names at its gossip address, fixed
//!    for the socket's life. These checks keep chitchat from overflowing
//!    and a silo's datagrams under the UDP limit whoever sends them; they
//!    do not make the view safe from a silo that holds the secret, which
//!    can still write any node's state within them (`docs/security.md`).
//! 4. **Handed over whole.** chitchat keeps its decoder private, so a
//!    checked payload reaches it through chitchat's own UDP socket, bound
//!    to a loopback port: this socket forwards the payload from a loopback
//!    socket of its own and returns what chitchat's socket decodes from
//!    that source, with the sender's real address. One payload is in
//!    flight at a time, queued before the wait begins, so each decoded
//!    message is matched to its sender; a datagram from any other source
//!    there is ignored and does not lengthen the wait. A payload not
//!    decoded within [`DECODE_WAIT`] is counted and given up, and the
//!    forwarding socket is replaced, so that it cannot be matched to a
//!    later sender if it comes after all. A wait cancelled by chitchat
//!    resumes on its next receive. A local failure on loopback is counted,
//!    never returned: chitchat stops gossiping for good on an error.
//! 5. **Under the UDP limit.** chitchat fills a datagram up to 65 507
//!    bytes; with the envelope, one that would pass the limit has its
//!    delta's last nodes left out (a delta may leave nodes out: the peer
//!    asks again next round) and is counted.

mod envelope;
#[cfg(fuzzing)]
pub(crate) mod fuzz;
pub(crate) mod inspect;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatMessage, Serializable};

use crate::auth::ClusterSecret;
use envelope::{Opener, Rejected, Sealer};
use inspect::{Message, NodeId};

/// How far a datagram's send time may be from the receiver's clock
/// (rule 2).
pub const FRESH: Duration = Duration::from_secs(30);
/// Nodes a digest or a delta may name (rule 3).
pub const MAX_NODES: usize = 1024;
/// Bytes of a node's name or a key (rule 3).
pub const MAX_NAME: usize = 255;
/// Versions and heartbeats stay below this (rule 3): 2^48, far from
/// overflow, and years of updates away.
pub const MAX_VERSION: u64 = 1 << 48;
/// How far one delta may move a known node's versions (rule 3): more than
/// a silo publishes in weeks.
pub const MAX_JUMP: u64 = 1 << 24;
/// How long a node's highest version is remembered for rule 3 (chitchat
/// forgets a dead node after an hour by default).
pub const TRACK_FOR: Duration = Duration::from_secs(3600);
/// The most bytes a UDP datagram carries.
const MAX_DATAGRAM: usize = 65_507;
/// The most sessions an opener tracks (rule 2).
const MAX_SESSIONS: usize = 4096;
/// The most nodes whose versions are tracked (rule 3).
const MAX_TRACKED: usize = 4 * MAX_NODES;
/// The most bytes a delta decompresses to.
const MAX_DELTA_BYTES: usize = 4 << 20;
/// How long chitchat's loopback socket may take to hand back a payload
/// already queued to it (rule 4).
pub const DECODE_WAIT: Duration = Duration::from_secs(1);

/// What a sealed gossip socket did, counted since its transport was made.
#[derive(Debug, Default)]
pub struct GossipStats {
    sent: AtomicU64,
    accepted: AtomicU64,
    unsealed: AtomicU64,
    forged: AtomicU64,
    stale: AtomicU64,
    replayed: AtomicU64,
    sessions_full: AtomicU64,
    malformed: AtomicU64,
    refused: AtomicU64,
    misdirected: AtomicU64,
    nodes_left_out: AtomicU64,
    trimmed: AtomicU64,
    too_long: AtomicU64,
    undecoded: AtomicU64,
    strays: AtomicU64,
    loopback_errors: AtomicU64,
}

/// A snapshot of [`GossipStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GossipCounts {
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams opened, checked and handed to chitchat.
    pub accepted: u64,
    /// Dropped: not sealed at all (plain chitchat, junk).
    pub unsealed: u64,
    /// Dropped: a MAC that does not verify (rule 1).
    pub forged: u64,
    /// Dropped: sent too long ago or ahead (rule 2).
    pub stale: u64,
    /// Dropped: seen already (rule 2).
    pub replayed: u64,
    /// Dropped: too many sessions to track (rule 2).
    pub sessions_full: u64,
    /// Dropped: sealed, but not a chitchat message.
    pub malformed: u64,
    /// Dropped whole: sealed, but past a bound of rule 3.
    pub refused: u64,
    /// Dropped: sealed for another address (rule 2).
    pub misdirected: u64,
    /// Node deltas left out of datagrams that went on (rule 3).
    pub nodes_left_out: u64,
    /// Sent with nodes left out, to stay under the UDP limit (rule 5).
    pub trimmed: u64,
    /// Not sent: too long even with every node left out (rule 5).
    pub too_long: u64,
    /// Checked but not decoded by chitchat in time (rule 4).
    pub undecoded: u64,
    /// Datagrams on the loopback decoder from anyone else (rule 4).
    pub strays: u64,
    /// Local failures handing a payload over on loopback (rule 4).
    pub loopback_errors: u64,
}

impl GossipCounts {
    /// Every datagram dropped on receipt, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.unsealed
            + self.forged
            + self.stale
            + self.replayed
            + self.sessions_full
            + self.malformed
            + self.refused
            + self.misdirected
    }
}

impl GossipStats {
    /// The counts now.
    pub fn counts(&self) -> GossipCounts {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        GossipCounts {
            sent: load(&self.sent),
            accepted: load(&self.accepted),
            unsealed: load(&self.unsealed),
            forged: load(&self.forged),
            stale: load(&self.stale),
            replayed: load(&self.replayed),
            sessions_full: load(&self.sessions_full),
            malformed: load(&self.malformed),
            refused: load(&self.refused),
            misdirected: load(&self.misdirected),
            nodes_left_out: load(&self.nodes_left_out),
            trimmed: load(&self.trimmed),
            too_long: load(&self.too_long),
            undecoded: load(&self.undecoded),
            strays: load(&self.strays),
            loopback_errors: load(&self.loopback_errors),
        }
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// chitchat's UDP transport with every datagram sealed and checked (the
/// module's rules). Give it to [`crate::Membership::join`] or
/// [`crate::NodeBuilder::start`] in place of chitchat's `UdpTransport`.
#[derive(Clone)]
pub struct SealedUdpTransport {
    secret: ClusterSecret,
    cluster: String,
    stats: Arc<GossipStats>,
}

impl std::fmt::Debug for SealedUdpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedUdpTransport")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl SealedUdpTransport {
    /// Gossip sealed with `secret` for `cluster`.
    pub fn new(secret: ClusterSecret, cluster: impl Into<String>) -> SealedUdpTransport {
        SealedUdpTransport {
            secret,
            cluster: cluster.into(),
            stats: Arc::new(GossipStats::default()),
        }
    }

    /// What the sockets it opened did.
    pub fn stats(&self) -> Arc<GossipStats> {
        self.stats.clone()
    }
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    crate::membership::unix_ms()
}

#[async_trait]
impl Transport for SealedUdpTransport {
    async fn open(&self, listen: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let outer = tokio::net::UdpSocket::bind(listen).await?;
        let (decoder, decoder_address) = open_decoder().await?;
        let feeder = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let feeder_address = feeder.local_addr()?;
        let mut session = [0u8; 8];
        getrandom::fill(&mut session).map_err(|err| anyhow::anyhow!("no random session: {err}"))?;
        Ok(Box::new(SealedSocket {
            outer,
            decoder,
            decoder_address,
            feeder,
            feeder_address,
            sealer: Sealer::new(
                self.secret.clone(),
                self.cluster.clone(),
                u64::from_le_bytes(session),
            ),
            opener: Opener::new(
                self.secret.clone(),
                self.cluster.clone(),
                FRESH.as_millis() as u64,
                MAX_SESSIONS,
            ),
            guard: Guard {
                cluster: self.cluster.clone(),
                listen,
                local: None,
                tracked: HashMap::new(),
            },
            pending: None,
            buffer: vec![0u8; 1 << 16].into_boxed_slice(),
            stats: self.stats.clone(),
        }))
    }
}

/// chitchat's UDP socket on a free loopback port (rule 4). chitchat's
/// socket cannot say which port it bound, so a port is found free first;
/// if another process takes it in between, another is tried.
async fn open_decoder() -> anyhow::Result<(chitchat::transport::UdpSocket, SocketAddr)> {
    let mut last = None;
    for _ in 0..16 {
        let address = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?;
        match chitchat::transport::UdpSocket::open(address).await {
            Ok(socket) => return Ok((socket, address)),
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no loopback port for gossip decoding")))
}

/// Rule 3's checks, and what they remember.
struct Guard {
    cluster: String,
    listen: SocketAddr,
    /// This silo as chitchat names it: learned from its first datagram
    /// sent, then fixed.
    local: Option<NodeId>,
    /// Each node's highest version accepted, and when.
    tracked: HashMap<NodeId, (u64, Instant)>,
}

/// What rule 3 makes of a message.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// It goes on as it is.
    Whole,
    /// It goes on with only these node deltas (by index).
    Without(Vec<bool>),
    /// It is dropped.
    Refused,
}

impl Guard {
    /// Learns this silo's own node from the first message it sends that
    /// names its gossip address: before this silo has sent anything, no
    /// peer has a delta to send it, so nothing but its own state is in
    /// that digest. Never changed afterwards (rule 3).
    fn learn(&mut self, sent: &Message) {
        if self.local.is_some() {
            return;
        }
        self.local = sent
            .digest
            .iter()
            .filter(|entry| entry.node.gossip == self.listen)
            .map(|entry| entry.node.clone())
            .max_by_key(|node| node.generation);
    }

    /// Whether `node` is this silo (before it is known: any node with this
    /// silo's gossip address).
    fn is_local(&self, node: &NodeId) -> bool {
        match &self.local {
            Some(local) => local == node,
            None => node.gossip == self.listen,
        }
    }

    /// Rule 3: what may reach chitchat of `message`; remembers the
    /// versions of the node deltas that go on.
    fn check(&mut self, message: &Message) -> Verdict {
        if message
            .cluster
            .as_ref()
            .is_some_and(|cluster| *cluster != self.cluster)
        {
            return Verdict::Refused;
        }
        if message.digest.len() > MAX_NODES || message.delta.len() > MAX_NODES {
            return Verdict::Refused;
        }
        let digest_ok = message.digest.iter().all(|entry| {
            entry.node.name.len() <= MAX_NAME
                && entry.heartbeat < MAX_VERSION
                && entry.max_version < MAX_VERSION
                && entry.last_gc < MAX_VERSION
        });
        if !digest_ok {
            return Verdict::Refused;
        }
        let now = Instant::now();
        let keep: Vec<bool> = message
            .delta
            .iter()
            .map(|node| {
                let known = self
                    .tracked
                    .get(&node.node)
                    .filter(|(_, since)| now.duration_since(*since) < TRACK_FOR)
                    .map(|(known, _)| *known);
                node.node.name.len() <= MAX_NAME
                    && !self.is_local(&node.node)
                    && node.highest_version() < MAX_VERSION
                    && node.values.iter().all(|value| value.key.len() <= MAX_NAME)
                    && known.is_none_or(|known| {
                        node.highest_version() <= known.saturating_add(MAX_JUMP)
                    })
            })
            .collect();
        for (node, _) in message.delta.iter().zip(&keep).filter(|(_, kept)| **kept) {
            let highest = node.highest_version();
            let entry = self.tracked.entry(node.node.clone()).or_insert((0, now));
            if now.duration_since(entry.1) >= TRACK_FOR {
                *entry = (0, now);
            }
            *entry = (entry.0.max(highest), now);
        }
        if self.tracked.len() > MAX_TRACKED {
            self.tracked
                .retain(|_, (_, since)| now.duration_since(*since) < TRACK_FOR);
            // Still full: forget the longest unheard half.
            if self.tracked.len() > MAX_TRACKED {
                let mut ages: Vec<Instant> =
                    self.tracked.values().map(|(_, since)| *since).collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                self.tracked.retain(|_, (_, since)| *since > cut);
            }
        }
        if keep.iter().all(|kept| *kept) {
            Verdict::Whole
        } else {
            Verdict::Without(keep)
        }
    }
}

/// One sealed gossip socket (the module's rules).
struct SealedSocket {
    outer: tokio::net::UdpSocket,
    decoder: chitchat::transport::UdpSocket,
    decoder_address: SocketAddr,
    /// Replaced after a payload it sent was given up (rule 4).
    feeder: tokio::net::UdpSocket,
    feeder_address: SocketAddr,
    sealer: Sealer,
    opener: Opener,
    guard: Guard,
    /// The sender of the payload handed to the decoder and not yet
    /// decoded, and until when it is waited for (rule 4).
    pending: Option<(SocketAddr, tokio::time::Instant)>,
    buffer: Box<[u8]>,
    stats: Arc<GossipStats>,
}

#[async_trait]
impl Socket for SealedSocket {
    async fn send(&mut self, to: SocketAddr, message: ChitchatMessage) -> anyhow::Result<()> {
        let mut payload = message.serialize_to_vec();
        let parsed = inspect::parse(&payload, MAX_DELTA_BYTES).ok();
        if let Some(parsed) = &parsed {
            self.guard.learn(parsed);
        }
        // Rule 5.
        if payload.len() + envelope::OVERHEAD > MAX_DATAGRAM {
            let Some(parsed) = parsed.filter(|parsed| !parsed.delta.is_empty()) else {
                GossipStats::count(&self.stats.too_long);
                return Ok(());
            };
            let mut keep = parsed.delta.len();
            loop {
                keep -= 1;
                let shorter = inspect::with_fewer_nodes(&payload, &parsed, keep);
                if shorter.len() + envelope::OVERHEAD <= MAX_DATAGRAM {
                    payload = shorter;
                    GossipStats::count(&self.stats.trimmed);
                    break;
                }
                if keep == 0 {
                    GossipStats::count(&self.stats.too_long);
                    return Ok(());
                }
            }
        }
        let sealed = self.sealer.seal(&payload, now_ms(), to);
        self.outer.send_to(&sealed, to).await?;
        GossipStats::count(&self.stats.sent);
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            // Rule 4: a payload handed over is decoded before the next.
            if let Some((from, until)) = self.pending {
                match tokio::time::timeout_at(until, self.decoder.recv()).await {
                    Ok(Ok((source, message))) if source == self.feeder_address => {
                        self.pending = None;
                        GossipStats::count(&self.stats.accepted);
                        return Ok((from, message));
                    }
                    // Someone else on this machine wrote to the loopback
                    // port: not ours, ignored; the wait keeps its end.
                    Ok(Ok(_)) => {
                        GossipStats::count(&self.stats.strays);
                        continue;
                    }
                    Ok(Err(err)) => {
                        GossipStats::count(&self.stats.loopback_errors);
                        tracing::warn!(error = %err, "gossip decoding on loopback failed");
                        self.give_up().await;
                        continue;
                    }
                    Err(_) => {
                        GossipStats::count(&self.stats.undecoded);
                        self.give_up().await;
                        continue;
                    }
                }
            }
            let (len, from) = self.outer.recv_from(&mut self.buffer).await?;
            let datagram = &self.buffer[..len];
            let payload = match self.opener.open(datagram, now_ms(), self.guard.listen) {
                Ok(payload) => payload,
                Err(rejected) => {
                    let counter = match rejected {
                        Rejected::Unsealed => &self.stats.unsealed,
                        Rejected::Forged => &self.stats.forged,
                        Rejected::Stale => &self.stats.stale,
                        Rejected::Replayed => &self.stats.replayed,
                        Rejected::Misdirected => &self.stats.misdirected,
                        Rejected::TooManySessions => &self.stats.sessions_full,
                    };
                    GossipStats::count(counter);
                    tracing::debug!(%from, ?rejected, "a gossip datagram was dropped");
                    continue;
                }
            };
            let Ok(message) = inspect::parse(payload, MAX_DELTA_BYTES) else {
                GossipStats::count(&self.stats.malformed);
                continue;
            };
            let rewritten;
            let payload = match self.guard.check(&message) {
                Verdict::Whole => payload,
                Verdict::Without(keep) => {
                    let left_out = keep.iter().filter(|kept| !**kept).count();
                    self.stats
                        .nodes_left_out
                        .fetch_add(left_out as u64, Ordering::Relaxed);
                    tracing::warn!(%from, left_out, "node deltas past their bounds were left out of a sealed gossip datagram");
                    rewritten = inspect::with_nodes(payload, &message, |index| {
                        keep.get(index).copied().unwrap_or(false)
                    });
                    &rewritten[..]
                }
                Verdict::Refused => {
                    GossipStats::count(&self.stats.refused);
                    tracing::warn!(%from, "a sealed gossip datagram past its bounds was dropped");
                    continue;
                }
            };
            match self.feeder.send_to(payload, self.decoder_address).await {
                Ok(_) => {
                    self.pending = Some((from, tokio::time::Instant::now() + DECODE_WAIT));
                }
                Err(err) => {
                    GossipStats::count(&self.stats.loopback_errors);
                    tracing::warn!(error = %err, "handing a gossip datagram over on loopback failed");
                }
            }
        }
    }
}

impl SealedSocket {
    /// Gives the pending payload up and replaces the forwarding socket, so
    /// that the payload, if it is decoded after all, comes from a source
    /// no longer matched (rule 4).
    async fn give_up(&mut self) {
        self.pending = None;
        match tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await {
            Ok(feeder) => match feeder.local_addr() {
                Ok(address) => {
                    self.feeder = feeder;
                    self.feeder_address = address;
                }
                Err(err) => {
                    GossipStats::count(&self.stats.loopback_errors);
                    tracing::warn!(error = %err, "a new loopback socket for gossip has no address");
                }
            },
            Err(err) => {
                GossipStats::count(&self.stats.loopback_errors);
                tracing::warn!(error = %err, "no new loopback socket for gossip");
            }
        }
    }
}
