//! Frames and the handshake (`cluster/src/wire.rs`,
//! `cluster/src/connection.rs`): arbitrary bytes decoded as one frame's
//! body, and fed as a peer's whole stream to an accepting silo and to a
//! connecting one. Every input ends in a decoded frame, a typed error, or
//! a refused handshake: no panic, and no connection for a peer without
//! the proofs. The first byte picks which.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use granary_actors::Silo;
use granary_cluster::{AnyPeer, ClusterSecret, ConnectionConfig, SiloId, accept, connect, wire};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime")
    })
}

fn secret() -> ClusterSecret {
    ClusterSecret::new([0xc5; 32]).expect("32 non-text bytes are a secret")
}

/// Feeds `stream` to `side` (accepting or connecting), then ends it.
fn handshake(stream: &[u8], accepting: bool) {
    let stream = stream.to_vec();
    runtime().block_on(async move {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let silo = Arc::new(Silo::builder().build().expect("an empty silo"));
        let config = ConnectionConfig {
            handshake_timeout: Duration::from_millis(200),
            ..ConnectionConfig::default()
        };
        let (a, b) = (SiloId::new("a:1", 1), SiloId::new("b:1", 1));
        let key = secret();
        let feeding = async move {
            let _ = far.write_all(&stream).await;
            let _ = far.shutdown().await;
            // Held until the side under test is done with it.
            far
        };
        let outcome = if accepting {
            let (outcome, _far) = tokio::join!(
                accept(Box::new(near), a, "fuzz", &key, &AnyPeer, silo, config),
                feeding
            );
            outcome
        } else {
            let (outcome, _far) = tokio::join!(
                connect(Box::new(near), a, &b, "fuzz", &key, silo, config),
                feeding
            );
            outcome
        };
        // Nothing without the proofs gets a connection (the proofs are
        // HMACs under a secret the input does not hold).
        assert!(
            outcome.is_err(),
            "a handshake from arbitrary bytes succeeded"
        );
    });
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((0, body)) => {
            if let Ok((header, payload)) = wire::decode(bytes::Bytes::copy_from_slice(body)) {
                // A frame that decodes encodes again.
                let again = wire::encode(&header, &payload).expect("a decoded frame encodes");
                let (back, rest) = wire::decode(again).expect("an encoded frame decodes");
                assert_eq!(back, header);
                assert_eq!(rest, payload);
            }
        }
        Some((1, stream)) => handshake(stream, true),
        Some((_, stream)) => handshake(stream, false),
        None => {}
    }
});
