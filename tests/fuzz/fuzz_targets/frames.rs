//! Frames and the handshake (`cluster/src/wire.rs`,
//! `cluster/src/connection.rs`): arbitrary bytes decoded as one frame's
//! body; fed as a peer's whole stream to an accepting silo and to a
//! connecting one; and sent by a peer that completed the handshake with
//! the secret, to reach the reader of an open connection and the requests
//! it hands the silo. Every input ends in a decoded frame, a typed error,
//! a refused handshake, or a connection that closes: no panic, and no
//! connection for a peer without the proofs. The first byte picks which.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use granary_actors::Silo;
use granary_cluster::auth::{self, Role};
use granary_cluster::wire::Header;
use granary_cluster::{AnyPeer, ClusterSecret, ConnectionConfig, SiloId, accept, connect, wire};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

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

/// Completes the handshake as a member, then sends `stream` as the rest of
/// the connection and ends it: the acceptor's connection reads it, hands
/// what decodes to the silo, and closes.
fn after_handshake(stream: &[u8]) {
    let stream = stream.to_vec();
    runtime().block_on(async move {
        let (near, far) = tokio::io::duplex(1 << 20);
        let silo = Arc::new(Silo::builder().build().expect("an empty silo"));
        let config = ConnectionConfig {
            handshake_timeout: Duration::from_millis(200),
            call_timeout: Duration::from_millis(200),
            ..ConnectionConfig::default()
        };
        let (me, acceptor) = (SiloId::new("m:1", 1), SiloId::new("a:1", 1));
        let key = secret();
        let peer = async {
            let mut framed = Framed::new(far, LengthDelimitedCodec::new());
            let ours = auth::nonce().expect("a nonce");
            let hello = Header::Hello {
                protocol: wire::PROTOCOL,
                cluster: "fuzz".into(),
                silo: me.clone(),
                nonce: ours,
            };
            framed
                .send(wire::encode(&hello, &[]).expect("encodes"))
                .await
                .expect("sent");
            let frame = framed.next().await.expect("a challenge").expect("read");
            let Ok((Header::Challenge { nonce: theirs, .. }, _)) = wire::decode(frame.freeze())
            else {
                panic!("expected a challenge");
            };
            let proof = key.proof(Role::Connector, "fuzz", [&theirs, &ours], [&me, &acceptor]);
            framed
                .send(wire::encode(&Header::Proof { proof }, &[]).expect("encodes"))
                .await
                .expect("sent");
            let mut far = framed.into_inner();
            let _ = far.write_all(&stream).await;
            let _ = far.shutdown().await;
            far
        };
        let accepting = accept(
            Box::new(near),
            acceptor.clone(),
            "fuzz",
            &key,
            &AnyPeer,
            silo,
            config,
        );
        let (accepted, _far) = tokio::join!(accepting, peer);
        let connection = accepted.expect("a member's handshake succeeds");
        // The stream ended (or went bad): the connection closes, in time.
        tokio::time::timeout(Duration::from_secs(60), connection.closed())
            .await
            .expect("the connection closes once the stream ends");
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
        Some((2, stream)) => handshake(stream, false),
        Some((_, stream)) => after_handshake(stream),
        None => {}
    }
});
