//! The envelope of a gossip datagram: a MAC under the cluster's gossip key
//! and a replay window (`sealed/mod.rs`, rules 1 and 2). No I/O: the
//! clock is an argument.
//!
//! A datagram is `"GRG1" | session | counter | sent_ms | to | payload |
//! tag`, the integers u64 little-endian, `to` the address it was sent to
//! (16 bytes of IPv6, an IPv4 address mapped, and a u16 port), the tag
//! HMAC-SHA-256 under the gossip key over the cluster's name, the header
//! and the payload. A datagram captured on its way to one silo is
//! therefore refused by every other.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use crate::auth::{ClusterSecret, Purpose};

const MAGIC: [u8; 4] = *b"GRG1";
const HEADER: usize = 4 + 8 + 8 + 8 + 18;
const TAG: usize = 32;
/// Bytes the envelope adds to a payload.
pub(crate) const OVERHEAD: usize = HEADER + TAG;
/// Counters below a session's highest that the window remembers.
const WINDOW: u64 = 64;

/// Seals the datagrams of one socket: one random session, a counter that
/// only grows.
pub(crate) struct Sealer {
    secret: ClusterSecret,
    cluster: String,
    session: u64,
    counter: u64,
}

impl Sealer {
    pub(crate) fn new(secret: ClusterSecret, cluster: String, session: u64) -> Sealer {
        Sealer {
            secret,
            cluster,
            session,
            counter: 0,
        }
    }

    /// `payload` sealed for `to`, stamped `now_ms`.
    pub(crate) fn seal(&mut self, payload: &[u8], now_ms: u64, to: SocketAddr) -> Vec<u8> {
        let mut out = Vec::with_capacity(payload.len() + OVERHEAD);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.session.to_le_bytes());
        out.extend_from_slice(&self.counter.to_le_bytes());
        out.extend_from_slice(&now_ms.to_le_bytes());
        out.extend_from_slice(&address_bytes(to));
        self.counter = self.counter.wrapping_add(1);
        let tag = self
            .secret
            .tag(Purpose::Gossip, &self.cluster, &[&out[..HEADER], payload]);
        out.extend_from_slice(payload);
        out.extend_from_slice(&tag);
        out
    }
}

/// `address` as 18 bytes: IPv6 (IPv4 mapped), then the port.
fn address_bytes(address: SocketAddr) -> [u8; 18] {
    let ip = match address.ip() {
        IpAddr::V4(ip) => ip.to_ipv6_mapped(),
        IpAddr::V6(ip) => ip,
    };
    let mut out = [0u8; 18];
    out[..16].copy_from_slice(&ip.octets());
    out[16..].copy_from_slice(&address.port().to_le_bytes());
    out
}

/// Why a datagram was dropped before chitchat saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejected {
    /// Too short, or not an envelope at all (plain chitchat, junk).
    Unsealed,
    /// The tag does not verify: no secret, another cluster, altered.
    Forged,
    /// Sent more than the freshness bound ago, or that far ahead.
    Stale,
    /// Its counter was seen already, or is below the window.
    Replayed,
    /// It was sealed for another address than this socket's.
    Misdirected,
    /// Too many live sessions to track another.
    TooManySessions,
}

/// One session's replay window.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// The highest counter accepted.
    top: u64,
    /// Bit `i`: counter `top - i` was accepted.
    seen: u64,
    /// The newest send time accepted, for forgetting the session.
    newest_ms: u64,
}

/// Opens the datagrams a socket receives.
pub(crate) struct Opener {
    secret: ClusterSecret,
    cluster: String,
    /// How far a datagram's send time may be from now.
    fresh_ms: u64,
    max_sessions: usize,
    sessions: HashMap<u64, Window>,
}

impl Opener {
    pub(crate) fn new(
        secret: ClusterSecret,
        cluster: String,
        fresh_ms: u64,
        max_sessions: usize,
    ) -> Opener {
        Opener {
            secret,
            cluster,
            fresh_ms,
            max_sessions,
            sessions: HashMap::new(),
        }
    }

    /// The payload of `datagram`, if it is sealed under this cluster's
    /// key for `me`, fresh at `now_ms`, and not seen before. A socket bound
    /// to an unspecified address takes datagrams sealed for any address of
    /// its port.
    pub(crate) fn open<'a>(
        &mut self,
        datagram: &'a [u8],
        now_ms: u64,
        me: SocketAddr,
    ) -> Result<&'a [u8], Rejected> {
        if datagram.len() < OVERHEAD || datagram[..4] != MAGIC {
            return Err(Rejected::Unsealed);
        }
        let (sealed, tag) = datagram.split_at(datagram.len() - TAG);
        let (header, payload) = sealed.split_at(HEADER);
        if !self
            .secret
            .verify_tag(Purpose::Gossip, &self.cluster, &[header, payload], tag)
        {
            return Err(Rejected::Forged);
        }
        let field = |at: usize| {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&header[at..at + 8]);
            u64::from_le_bytes(raw)
        };
        let (session, counter, sent_ms) = (field(4), field(12), field(20));
        let to = &header[28..HEADER];
        let mine = if me.ip().is_unspecified() {
            to[16..] == me.port().to_le_bytes()
        } else {
            *to == address_bytes(me)
        };
        if !mine {
            return Err(Rejected::Misdirected);
        }
        if sent_ms.abs_diff(now_ms) > self.fresh_ms {
            return Err(Rejected::Stale);
        }
        if !self.sessions.contains_key(&session) {
            self.forget_stale(now_ms);
            if self.sessions.len() >= self.max_sessions {
                return Err(Rejected::TooManySessions);
            }
            self.sessions.insert(
                session,
                Window {
                    top: counter,
                    seen: 1,
                    newest_ms: sent_ms,
                },
            );
            return Ok(payload);
        }
        let window = self
            .sessions
            .get_mut(&session)
            .ok_or(Rejected::TooManySessions)?;
        if counter > window.top {
            let shift = counter - window.top;
            window.seen = if shift >= WINDOW {
                1
            } else {
                (window.seen << shift) | 1
            };
            window.top = counter;
        } else {
            let below = window.top - counter;
            if below >= WINDOW || window.seen & (1 << below) != 0 {
                return Err(Rejected::Replayed);
            }
            window.seen |= 1 << below;
        }
        window.newest_ms = window.newest_ms.max(sent_ms);
        Ok(payload)
    }

    /// Forgets sessions whose newest datagram is past the freshness bound:
    /// any datagram of theirs not yet seen is stale too, so forgetting
    /// them lets nothing be replayed.
    fn forget_stale(&mut self, now_ms: u64) {
        let fresh_ms = self.fresh_ms;
        self.sessions
            .retain(|_, window| window.newest_ms.saturating_add(fresh_ms) >= now_ms);
    }

    /// Sessions tracked now.
    #[cfg(test)]
    fn sessions(&self) -> usize {
        self.sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> ClusterSecret {
        ClusterSecret::new([byte; 32]).expect("32 non-text bytes are a secret")
    }

    const ME: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)), 7100);

    fn opener() -> Opener {
        Opener::new(secret(0x81), "c".into(), 30_000, 3)
    }

    #[test]
    fn only_the_clusters_own_fresh_unseen_datagrams_open() {
        let mut sealer = Sealer::new(secret(0x81), "c".into(), 1);
        let mut opener = opener();
        let now = 1_000_000;
        let first = sealer.seal(b"hello", now, ME);
        assert_eq!(opener.open(&first, now, ME), Ok(&b"hello"[..]));
        assert_eq!(opener.open(&first, now, ME), Err(Rejected::Replayed));
        // Another secret, another cluster's name, a changed byte.
        let mut stranger = Sealer::new(secret(0x82), "c".into(), 2);
        assert_eq!(
            opener.open(&stranger.seal(b"x", now, ME), now, ME),
            Err(Rejected::Forged)
        );
        let mut other = Sealer::new(secret(0x81), "d".into(), 3);
        assert_eq!(
            opener.open(&other.seal(b"x", now, ME), now, ME),
            Err(Rejected::Forged)
        );
        let mut altered = sealer.seal(b"hello", now, ME);
        altered[HEADER] ^= 1;
        assert_eq!(opener.open(&altered, now, ME), Err(Rejected::Forged));
        assert_eq!(
            opener.open(b"plain chitchat", now, ME),
            Err(Rejected::Unsealed)
        );
        // Sealed for another silo: refused here, whatever its counter.
        let elsewhere = SocketAddr::from(([10, 0, 0, 2], 7100));
        assert_eq!(
            opener.open(&sealer.seal(b"x", now, elsewhere), now, ME),
            Err(Rejected::Misdirected)
        );
        // Bound to 0.0.0.0: any address of its port.
        let any = SocketAddr::from(([0, 0, 0, 0], 7100));
        assert!(opener.open(&sealer.seal(b"y", now, ME), now, any).is_ok());
        // Too old or too far ahead.
        assert_eq!(
            opener.open(&sealer.seal(b"x", now - 30_001, ME), now, ME),
            Err(Rejected::Stale)
        );
        assert_eq!(
            opener.open(&sealer.seal(b"x", now + 30_001, ME), now, ME),
            Err(Rejected::Stale)
        );
    }

    #[test]
    fn the_window_takes_reordered_datagrams_once_and_refuses_ones_below_it() {
        let mut sealer = Sealer::new(secret(0x81), "c".into(), 9);
        let mut opener = opener();
        let now = 5_000_000;
        let sent: Vec<Vec<u8>> = (0..100).map(|_| sealer.seal(b"m", now, ME)).collect();
        // Newest first, then the rest out of order.
        assert!(opener.open(&sent[70], now, ME).is_ok());
        for i in [69, 10, 7, 60, 8] {
            let expected = if 70 - i >= WINDOW as usize {
                Err(Rejected::Replayed)
            } else {
                Ok(&b"m"[..])
            };
            assert_eq!(opener.open(&sent[i], now, ME), expected, "counter {i}");
        }
        assert_eq!(opener.open(&sent[60], now, ME), Err(Rejected::Replayed));
        assert!(opener.open(&sent[99], now, ME).is_ok());
        assert_eq!(opener.open(&sent[69], now, ME), Err(Rejected::Replayed));
    }

    #[test]
    fn sessions_are_bounded_and_stale_ones_forgotten() {
        let mut opener = opener();
        let now = 9_000_000;
        for session in 0..3 {
            let mut sealer = Sealer::new(secret(0x81), "c".into(), session);
            assert!(opener.open(&sealer.seal(b"m", now, ME), now, ME).is_ok());
        }
        let mut fourth = Sealer::new(secret(0x81), "c".into(), 3);
        assert_eq!(
            opener.open(&fourth.seal(b"m", now, ME), now, ME),
            Err(Rejected::TooManySessions)
        );
        // Once the three are past freshness, they are forgotten.
        let later = now + 30_001;
        assert!(
            opener
                .open(&fourth.seal(b"m", later, ME), later, ME)
                .is_ok()
        );
        assert_eq!(opener.sessions(), 1);
    }
}
