//! Silos prove to each other that they hold the cluster's secret.
//!
//! # The secret and its keys
//!
//! 1. **32 random bytes.** A cluster secret is exactly [`SECRET_LEN`]
//!    bytes, written as 64 hexadecimal digits in a node's file
//!    (`granary secret` prints a fresh one). A value whose every byte is
//!    printable text is refused as a passphrase: a proof over a guessable
//!    secret could be attacked offline by anyone who records one.
//! 2. **One key per purpose.** The secret is never used as a key itself:
//!    HKDF-SHA-256 derives one key for the connection handshake, one for
//!    gossip datagrams, one for the signed member state and one for etcd
//!    records ([`Purpose`]). A tag made for one purpose never verifies for
//!    another.
//! 3. **The cluster name is in every MAC**, length-prefixed: two clusters
//!    that share a secret by mistake still cannot speak to each other.
//!
//! # Handshake
//!
//! 1. The connecting silo sends `Hello` with a fresh 32-byte nonce `nc`
//!    and the id it claims.
//! 2. The accepting silo refuses a claimed id equal to its own and one its
//!    view does not admit (`connection.rs`, rule 1), before it proves
//!    anything. It then answers `Challenge` with its own nonce `na` and
//!    `HMAC(k_handshake, "granary accept" | cluster | nc | na | connector |
//!    acceptor)`.
//! 3. The connector first checks that the acceptor is the silo it meant to
//!    reach (its address and incarnation), and only then checks the proof
//!    and sends `Proof` with `HMAC(k_handshake, "granary connect" |
//!    cluster | na | nc | connector | acceptor)`. So a silo that is dialled
//!    by mistake, or an attacker in its place, cannot relay the handshake
//!    to a third silo and log in there as the dialler: the dialler sends no
//!    proof to a silo it did not mean to reach.
//! 4. The acceptor checks it. Only then does either side send or accept
//!    anything else; a wrong proof, or any other frame first, closes the
//!    connection.
//!
//! Each side's proof covers the other's fresh nonce, so a recorded
//! handshake cannot be replayed; the labels differ, so one side's proof is
//! never the other's; proofs are compared in constant time. The secret
//! authenticates, it does not encrypt: run the cluster on a private
//! network, or under TLS.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::SiloId;
use crate::wire::PROOF_LEN;

/// Bytes a cluster secret has (rule 1).
pub const SECRET_LEN: usize = 32;

/// What a derived key is for (rule 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The connection handshake's proofs.
    Handshake,
    /// The envelope of each gossip datagram.
    Gossip,
    /// A silo's signed state inside gossip.
    MemberState,
    /// Records kept in etcd.
    EtcdRecord,
}

impl Purpose {
    const ALL: [Purpose; 4] = [
        Purpose::Handshake,
        Purpose::Gossip,
        Purpose::MemberState,
        Purpose::EtcdRecord,
    ];

    fn info(self) -> &'static [u8] {
        match self {
            Purpose::Handshake => b"granary handshake key v2",
            Purpose::Gossip => b"granary gossip key v1",
            Purpose::MemberState => b"granary member state key v1",
            Purpose::EtcdRecord => b"granary etcd record key v1",
        }
    }
}

// A purpose's key is `ClusterSecret::keys[purpose as usize]`: `ALL` lists
// the purposes in their order of declaration (checked when this compiles).
const _: () = {
    let mut i = 0;
    while i < Purpose::ALL.len() {
        assert!(Purpose::ALL[i] as usize == i);
        i += 1;
    }
};

/// HKDF's salt: fixed, so every silo derives the same keys from the
/// secret.
const SALT: &[u8] = b"granary cluster secret";

/// The secret every silo of a cluster holds, as one HMAC per purpose keyed
/// with the keys derived from it. Its `Debug` shows no byte of it.
#[derive(Clone)]
pub struct ClusterSecret {
    /// Keyed once each, in [`Purpose::ALL`]'s order; cloned for each tag.
    keys: [Hmac<Sha256>; 4],
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterSecret({SECRET_LEN} bytes)")
    }
}

/// Why a value is not a cluster secret (rule 1).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BadSecret {
    /// It has another length than [`SECRET_LEN`] bytes.
    Length {
        /// Its length.
        len: usize,
    },
    /// Every byte of it is printable text: a passphrase, not random bytes.
    Passphrase,
    /// Its text is not 64 hexadecimal digits.
    NotHex,
    /// The system's random source failed (generating a secret).
    Random(String),
}

impl std::fmt::Display for BadSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadSecret::Length { len } => write!(
                f,
                "a cluster secret of {len} bytes; it must be {SECRET_LEN} random bytes \
                 (64 hexadecimal digits; `granary secret` prints one)"
            ),
            BadSecret::Passphrase => write!(
                f,
                "the cluster secret is printable text, a passphrase: it must be \
                 {SECRET_LEN} random bytes (`granary secret` prints one)"
            ),
            BadSecret::NotHex => write!(
                f,
                "the cluster secret must be written as {} hexadecimal digits \
                 (`granary secret` prints one)",
                SECRET_LEN * 2
            ),
            BadSecret::Random(why) => write!(f, "no random bytes for a secret: {why}"),
        }
    }
}

impl std::error::Error for BadSecret {}

impl ClusterSecret {
    /// The secret `bytes`: exactly [`SECRET_LEN`] of them, not all
    /// printable (rule 1).
    pub fn new(bytes: impl AsRef<[u8]>) -> Result<ClusterSecret, BadSecret> {
        let bytes = bytes.as_ref();
        if bytes.len() != SECRET_LEN {
            return Err(BadSecret::Length { len: bytes.len() });
        }
        if bytes.iter().all(|byte| (0x20..0x7f).contains(byte)) {
            return Err(BadSecret::Passphrase);
        }
        let hkdf = hkdf::Hkdf::<Sha256>::new(Some(SALT), bytes);
        let key = |purpose: Purpose| -> Result<Hmac<Sha256>, BadSecret> {
            let mut okm = [0u8; 32];
            hkdf.expand(purpose.info(), &mut okm)
                .map_err(|_| BadSecret::Length { len: bytes.len() })?;
            // HMAC takes keys of every length; the error exists for other
            // MACs.
            Hmac::<Sha256>::new_from_slice(&okm).map_err(|_| BadSecret::Length { len: bytes.len() })
        };
        Ok(ClusterSecret {
            keys: [
                key(Purpose::ALL[0])?,
                key(Purpose::ALL[1])?,
                key(Purpose::ALL[2])?,
                key(Purpose::ALL[3])?,
            ],
        })
    }

    /// The secret written as 64 hexadecimal digits (surrounding blanks
    /// ignored).
    pub fn from_hex(text: &str) -> Result<ClusterSecret, BadSecret> {
        let text = text.trim();
        if !text.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return Err(BadSecret::NotHex);
        }
        if text.len() != SECRET_LEN * 2 {
            return Err(BadSecret::Length {
                len: text.len() / 2,
            });
        }
        let mut bytes = [0u8; SECRET_LEN];
        for (byte, pair) in bytes.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
            let digits = std::str::from_utf8(pair).map_err(|_| BadSecret::NotHex)?;
            *byte = u8::from_str_radix(digits, 16).map_err(|_| BadSecret::NotHex)?;
        }
        ClusterSecret::new(bytes)
    }

    /// A fresh secret from the system's random source, as 64 hexadecimal
    /// digits for a node's file.
    pub fn generate_hex() -> Result<String, BadSecret> {
        loop {
            let mut bytes = [0u8; SECRET_LEN];
            getrandom::fill(&mut bytes).map_err(|err| BadSecret::Random(err.to_string()))?;
            // About one draw in 10^14 is all printable; draw again.
            if ClusterSecret::new(bytes).is_ok() {
                return Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect());
            }
        }
    }

    fn mac(&self, purpose: Purpose, cluster: &str) -> Hmac<Sha256> {
        // `keys` is in `Purpose::ALL`'s order, the order of declaration.
        let mut mac = self.keys[purpose as usize].clone();
        // Rule 3.
        mac.update(&(cluster.len() as u64).to_le_bytes());
        mac.update(cluster.as_bytes());
        mac
    }

    fn keyed(
        &self,
        role: Role,
        cluster: &str,
        nonces: [&[u8; PROOF_LEN]; 2],
        ids: [&SiloId; 2],
    ) -> Hmac<Sha256> {
        let mut mac = self.mac(Purpose::Handshake, cluster);
        mac.update(role.label());
        for nonce in nonces {
            mac.update(nonce);
        }
        for id in ids {
            // Length-prefixed, so no two pairs of ids read the same.
            let address = id.address.as_bytes();
            mac.update(&(address.len() as u64).to_le_bytes());
            mac.update(address);
            mac.update(&id.incarnation.to_le_bytes());
        }
        mac
    }

    /// The proof `role` sends (handshake rules 2 and 3): over the cluster's
    /// name, the two nonces (the acceptor's proof takes the connector's
    /// first) and the two silos (connector, then acceptor).
    pub fn proof(
        &self,
        role: Role,
        cluster: &str,
        nonces: [&[u8; PROOF_LEN]; 2],
        ids: [&SiloId; 2],
    ) -> [u8; PROOF_LEN] {
        self.keyed(role, cluster, nonces, ids)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `proof` is `role`'s, compared in constant time.
    pub fn verify(
        &self,
        role: Role,
        cluster: &str,
        nonces: [&[u8; PROOF_LEN]; 2],
        ids: [&SiloId; 2],
        proof: &[u8; PROOF_LEN],
    ) -> bool {
        self.keyed(role, cluster, nonces, ids)
            .verify_slice(proof)
            .is_ok()
    }

    /// A tag over `parts` under `purpose`'s key for `cluster`, each part
    /// length-prefixed (so no two lists of parts read the same).
    pub fn tag(&self, purpose: Purpose, cluster: &str, parts: &[&[u8]]) -> [u8; PROOF_LEN] {
        self.tagged(purpose, cluster, parts)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `tag` is [`ClusterSecret::tag`] of the same arguments,
    /// compared in constant time.
    pub fn verify_tag(&self, purpose: Purpose, cluster: &str, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.tagged(purpose, cluster, parts)
            .verify_slice(tag)
            .is_ok()
    }

    fn tagged(&self, purpose: Purpose, cluster: &str, parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = self.mac(purpose, cluster);
        for part in parts {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac
    }
}

/// Which side of the handshake a proof is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The silo that accepted the connection.
    Acceptor,
    /// The silo that opened it.
    Connector,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Acceptor => b"granary accept",
            Role::Connector => b"granary connect",
        }
    }
}

/// A fresh random nonce.
pub fn nonce() -> std::io::Result<[u8; PROOF_LEN]> {
    let mut nonce = [0u8; PROOF_LEN];
    getrandom::fill(&mut nonce).map_err(|err| std::io::Error::other(err.to_string()))?;
    Ok(nonce)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (SiloId, SiloId) {
        (
            SiloId::new("10.0.0.1:7000", 1),
            SiloId::new("10.0.0.2:7000", 1),
        )
    }

    fn secret(seed: u8) -> ClusterSecret {
        let mut bytes = [0u8; SECRET_LEN];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = seed.wrapping_mul(31).wrapping_add(i as u8 * 8);
        }
        ClusterSecret::new(bytes).expect("bytes that are not all text are a secret")
    }

    #[test]
    fn a_proof_verifies_only_with_the_same_secret_cluster_nonces_ids_and_role() {
        let (secret, other) = (secret(1), secret(2));
        let (a, b) = ids();
        let (n1, n2) = ([1u8; PROOF_LEN], [2u8; PROOF_LEN]);
        let proof = secret.proof(Role::Acceptor, "c", [&n1, &n2], [&a, &b]);
        assert!(secret.verify(Role::Acceptor, "c", [&n1, &n2], [&a, &b], &proof));
        assert!(!other.verify(Role::Acceptor, "c", [&n1, &n2], [&a, &b], &proof));
        assert!(!secret.verify(Role::Acceptor, "d", [&n1, &n2], [&a, &b], &proof));
        assert!(!secret.verify(Role::Connector, "c", [&n1, &n2], [&a, &b], &proof));
        assert!(!secret.verify(Role::Acceptor, "c", [&n2, &n1], [&a, &b], &proof));
        assert!(!secret.verify(Role::Acceptor, "c", [&n1, &n2], [&b, &a], &proof));
        let reborn = SiloId::new("10.0.0.1:7000", 2);
        assert!(!secret.verify(Role::Acceptor, "c", [&n1, &n2], [&reborn, &b], &proof));
    }

    #[test]
    fn tags_are_per_purpose_and_per_cluster_and_length_prefixed() {
        let (one, two) = (secret(1), secret(2));
        let parts: [&[u8]; 2] = [b"ab", b"c"];
        let tag = one.tag(Purpose::Gossip, "c", &parts);
        assert!(one.verify_tag(Purpose::Gossip, "c", &parts, &tag));
        assert!(!one.verify_tag(Purpose::MemberState, "c", &parts, &tag));
        assert!(!one.verify_tag(Purpose::Gossip, "d", &parts, &tag));
        assert!(!one.verify_tag(Purpose::Gossip, "c", &[b"a", b"bc"], &tag));
        assert!(!two.verify_tag(Purpose::Gossip, "c", &parts, &tag));
    }

    #[test]
    fn only_32_random_bytes_make_a_secret_and_it_is_never_printed() {
        assert_eq!(
            ClusterSecret::new(*b"short").unwrap_err(),
            BadSecret::Length { len: 5 }
        );
        assert_eq!(
            ClusterSecret::new(*b"a passphrase of thirty-two bytes").unwrap_err(),
            BadSecret::Passphrase
        );
        assert_eq!(
            ClusterSecret::from_hex("zz").unwrap_err(),
            BadSecret::NotHex
        );
        assert_eq!(
            ClusterSecret::from_hex("00ff").unwrap_err(),
            BadSecret::Length { len: 2 }
        );
        let text = ClusterSecret::generate_hex().expect("the system has randomness");
        assert_eq!(text.len(), 64);
        let secret = ClusterSecret::from_hex(&format!("  {text}\n"))
            .expect("a generated secret reads back, blanks around it ignored");
        assert_eq!(format!("{secret:?}"), "ClusterSecret(32 bytes)");
        assert_ne!(
            text,
            ClusterSecret::generate_hex().expect("the system has randomness")
        );
        // The same digits, upper case, are the same secret.
        let upper = ClusterSecret::from_hex(&text.to_uppercase()).expect("upper-case digits read");
        let tag = secret.tag(Purpose::Gossip, "c", &[b"x"]);
        assert!(upper.verify_tag(Purpose::Gossip, "c", &[b"x"], &tag));
        let draw = || nonce().expect("the system has randomness");
        assert_ne!(draw(), draw());
    }
}
