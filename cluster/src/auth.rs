//! Silos prove to each other that they hold the cluster's secret.
//!
//! # Handshake
//!
//! 1. The connecting silo sends `Hello` with a fresh 32-byte nonce `nc`.
//! 2. The accepting silo answers `Challenge` with its own nonce `na` and
//!    `HMAC(secret, "granary accept" | nc | na | connector | acceptor)`.
//! 3. The connector checks that proof, then sends `Proof` with
//!    `HMAC(secret, "granary connect" | na | nc | connector | acceptor)`.
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

/// Bytes a cluster secret has at least.
pub const MIN_SECRET_LEN: usize = 16;

/// The secret every silo of a cluster holds, as the HMAC keyed with it.
/// Its `Debug` shows no byte of it.
#[derive(Clone)]
pub struct ClusterSecret {
    /// Keyed once; cloned for each tag.
    keyed: Hmac<Sha256>,
    len: usize,
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterSecret({} bytes)", self.len)
    }
}

/// A secret shorter than [`MIN_SECRET_LEN`] bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeakSecret {
    /// Its length.
    pub len: usize,
}

impl std::fmt::Display for WeakSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a cluster secret of {} bytes; at least {MIN_SECRET_LEN} are needed",
            self.len
        )
    }
}

impl std::error::Error for WeakSecret {}

impl ClusterSecret {
    /// The secret `bytes`, at least [`MIN_SECRET_LEN`] of them.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<ClusterSecret, WeakSecret> {
        let bytes = bytes.into();
        let weak = WeakSecret { len: bytes.len() };
        if bytes.len() < MIN_SECRET_LEN {
            return Err(weak);
        }
        // HMAC takes keys of every length; the error exists for other MACs.
        let keyed = Hmac::<Sha256>::new_from_slice(&bytes).map_err(|_| weak)?;
        Ok(ClusterSecret {
            keyed,
            len: bytes.len(),
        })
    }

    fn mac(&self) -> Hmac<Sha256> {
        self.keyed.clone()
    }

    fn keyed(&self, role: Role, nonces: [&[u8; PROOF_LEN]; 2], ids: [&SiloId; 2]) -> Hmac<Sha256> {
        let mut mac = self.mac();
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

    /// The proof `role` sends (rules 2 and 3): over the two nonces (the
    /// acceptor's proof takes the connector's first) and the two silos
    /// (connector, then acceptor).
    pub fn proof(
        &self,
        role: Role,
        nonces: [&[u8; PROOF_LEN]; 2],
        ids: [&SiloId; 2],
    ) -> [u8; PROOF_LEN] {
        self.keyed(role, nonces, ids).finalize().into_bytes().into()
    }

    /// Whether `proof` is `role`'s, compared in constant time.
    pub fn verify(
        &self,
        role: Role,
        nonces: [&[u8; PROOF_LEN]; 2],
        ids: [&SiloId; 2],
        proof: &[u8; PROOF_LEN],
    ) -> bool {
        self.keyed(role, nonces, ids).verify_slice(proof).is_ok()
    }
}

impl ClusterSecret {
    /// A tag over `data` under `label`, for datagrams (gossip) that have no
    /// handshake.
    pub fn tag(&self, label: &[u8], data: &[u8]) -> [u8; PROOF_LEN] {
        let mut mac = self.mac();
        mac.update(label);
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// Whether `tag` is [`ClusterSecret::tag`] of `label` and `data`,
    /// compared in constant time.
    pub fn verify_tag(&self, label: &[u8], data: &[u8], tag: &[u8]) -> bool {
        let mut mac = self.mac();
        mac.update(label);
        mac.update(data);
        mac.verify_slice(tag).is_ok()
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

    #[test]
    fn a_proof_verifies_only_with_the_same_secret_nonces_ids_and_role() {
        let secret = ClusterSecret::new(*b"sixteen byte key").unwrap();
        let other = ClusterSecret::new(*b"sixteen byte kez").unwrap();
        let (a, b) = ids();
        let (n1, n2) = ([1u8; PROOF_LEN], [2u8; PROOF_LEN]);
        let proof = secret.proof(Role::Acceptor, [&n1, &n2], [&a, &b]);
        assert!(secret.verify(Role::Acceptor, [&n1, &n2], [&a, &b], &proof));
        assert!(!other.verify(Role::Acceptor, [&n1, &n2], [&a, &b], &proof));
        assert!(!secret.verify(Role::Connector, [&n1, &n2], [&a, &b], &proof));
        assert!(!secret.verify(Role::Acceptor, [&n2, &n1], [&a, &b], &proof));
        assert!(!secret.verify(Role::Acceptor, [&n1, &n2], [&b, &a], &proof));
        let reborn = SiloId::new("10.0.0.1:7000", 2);
        assert!(!secret.verify(Role::Acceptor, [&n1, &n2], [&reborn, &b], &proof));
    }

    #[test]
    fn short_secrets_are_refused_and_never_printed() {
        assert_eq!(
            ClusterSecret::new(*b"short").unwrap_err(),
            WeakSecret { len: 5 }
        );
        let secret = ClusterSecret::new(*b"a very secret cluster key").unwrap();
        assert_eq!(format!("{secret:?}"), "ClusterSecret(25 bytes)");
        assert_ne!(nonce().unwrap(), nonce().unwrap());
    }
}
