//! What the fuzz targets drive (`tests/fuzz`): the gossip reader, its
//! writer and rule 3's checks, and the envelope, on arbitrary bytes.

use std::net::SocketAddr;

use super::envelope::{Opener, Sealer};
use super::{Guard, MAX_DELTA_BYTES, Verdict, inspect};
use crate::auth::ClusterSecret;

/// Reads `bytes` as a chitchat message. One that parses is checked by
/// rule 3 and written again with every other node delta: that must read
/// back as the same message with those nodes, whatever the bytes were.
pub fn gossip(bytes: &[u8]) {
    let Ok(message) = inspect::parse(bytes, MAX_DELTA_BYTES) else {
        return;
    };
    let mut guard = Guard {
        cluster: "fuzz".into(),
        listen: SocketAddr::from(([127, 0, 0, 1], 7100)),
        local: None,
        tracked: Default::default(),
    };
    if let Verdict::Without(keep) = guard.check(&message) {
        assert_eq!(keep.len(), message.delta.len());
    }
    let shorter = inspect::with_nodes(bytes, &message, |index| index % 2 == 0);
    let again = match inspect::parse(&shorter, MAX_DELTA_BYTES) {
        Ok(again) => again,
        Err(err) => panic!("a message written again does not read back: {err:?}"),
    };
    let kept: Vec<_> = message.delta.iter().step_by(2).cloned().collect();
    assert_eq!(again.kind, message.kind);
    assert_eq!(again.cluster, message.cluster);
    assert_eq!(again.digest, message.digest);
    assert_eq!(again.delta, kept);
}

/// Opens `bytes` as a sealed datagram, and seals and opens its tail:
/// nothing arbitrary bytes do may panic, and a sealed payload opens once.
pub fn envelope(bytes: &[u8]) {
    let Ok(secret) = ClusterSecret::new([0xa5; 32]) else {
        return;
    };
    let me = SocketAddr::from(([10, 0, 0, 1], 7100));
    let now = 1_700_000_000_000;
    let mut opener = Opener::new(secret.clone(), "fuzz".into(), 30_000, 8);
    let _ = opener.open(bytes, now, me);
    let mut sealer = Sealer::new(secret, "fuzz".into(), 1);
    let sealed = sealer.seal(bytes, now, me);
    assert_eq!(opener.open(&sealed, now, me), Ok(bytes));
    assert!(opener.open(&sealed, now, me).is_err());
}
