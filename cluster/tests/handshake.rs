//! The handshake against a relaying attacker and forged identities
//! (`auth.rs`, handshake rules 2 and 3): an attacker that a silo dials by
//! mistake relays the handshake to a third silo, to log in there as the
//! dialler; a peer claims the acceptor's own id, or one outside its view;
//! a proof made for another cluster's name.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use granary_actors::Silo;
use granary_cluster::auth::{self, Role};
use granary_cluster::wire::{self, Header};
use granary_cluster::{
    Admission, AnyPeer, ClusterSecret, ConnectError, ConnectionConfig, SiloId, accept, connect,
};
use tokio::io::DuplexStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

const CLUSTER: &str = "handshake-test";

fn secret() -> ClusterSecret {
    ClusterSecret::new([0xe7; 32]).expect("32 non-text bytes are a secret")
}

fn silo() -> Arc<Silo> {
    Arc::new(Silo::builder().build().expect("an empty silo"))
}

fn config() -> ConnectionConfig {
    ConnectionConfig {
        handshake_timeout: Duration::from_secs(2),
        ..ConnectionConfig::default()
    }
}

type Raw = Framed<DuplexStream, LengthDelimitedCodec>;

fn raw(io: DuplexStream) -> Raw {
    Framed::new(io, LengthDelimitedCodec::new())
}

async fn send(raw: &mut Raw, header: &Header) {
    raw.send(wire::encode(header, &[]).expect("a handshake frame encodes"))
        .await
        .expect("the frame is sent");
}

/// The next handshake frame, or `None` once the other side hung up.
async fn next(raw: &mut Raw) -> Option<Header> {
    match tokio::time::timeout(Duration::from_secs(5), raw.next()).await {
        Ok(Some(Ok(frame))) => Some(wire::decode(frame.freeze()).expect("a frame decodes").0),
        Ok(_) => None,
        Err(_) => panic!("the peer neither answered nor hung up"),
    }
}

fn ids() -> (SiloId, SiloId, SiloId) {
    (
        SiloId::new("a:1", 1),
        SiloId::new("b:1", 1),
        SiloId::new("c:1", 1),
    )
}

/// A dials what it takes for B; the attacker there relays every frame to C
/// and back. A sees C answer in B's place and sends no proof, so C never
/// lets the attacker in as A.
#[tokio::test]
async fn a_relayed_handshake_logs_in_nowhere() {
    let (a, b, c) = ids();
    let (a_near, a_far) = tokio::io::duplex(1 << 16);
    let (c_near, c_far) = tokio::io::duplex(1 << 16);
    let at_c = tokio::spawn({
        let c = c.clone();
        async move {
            accept(
                Box::new(c_far),
                c,
                CLUSTER,
                &secret(),
                &AnyPeer,
                silo(),
                config(),
            )
            .await
        }
    });
    let dialler = tokio::spawn({
        let (a, b) = (a.clone(), b.clone());
        async move {
            connect(
                Box::new(a_near),
                a,
                &b,
                CLUSTER,
                &secret(),
                silo(),
                config(),
            )
            .await
        }
    });
    // The relay: every frame A sends goes to C, every frame C sends to A;
    // it keeps what A sent.
    let (mut from_a, mut to_c) = (raw(a_far), raw(c_near));
    let mut a_sent = Vec::new();
    let hello = next(&mut from_a).await.expect("A says hello");
    a_sent.push(hello.clone());
    send(&mut to_c, &hello).await;
    let challenge = next(&mut to_c).await.expect("C answers the hello");
    send(&mut from_a, &challenge).await;
    while let Some(frame) = next(&mut from_a).await {
        a_sent.push(frame.clone());
        send(&mut to_c, &frame).await;
    }
    drop(to_c);
    let dialled = dialler.await.expect("the dialler ran");
    assert_eq!(
        dialled.err(),
        Some(ConnectError::UnexpectedPeer {
            expected: b,
            found: c
        })
    );
    assert_eq!(a_sent.len(), 1, "A sent no proof: {a_sent:?}");
    assert!(matches!(a_sent[0], Header::Hello { .. }));
    assert!(
        at_c.await.expect("C's accept ran").is_err(),
        "C let the relay in as A"
    );
}

/// A hello that claims the acceptor's own id, or an id its admission
/// refuses, gets no challenge: the acceptor proves nothing to it.
#[tokio::test]
async fn a_hello_with_the_acceptors_own_id_or_one_outside_its_view_is_refused() {
    struct Nobody;
    impl Admission for Nobody {
        fn admit(&self, _: &SiloId) -> futures_util::future::BoxFuture<'static, bool> {
            Box::pin(async { false })
        }
    }
    let (a, _, c) = ids();
    for (claimed, admission, refusal) in [
        (c.clone(), &AnyPeer as &dyn Admission, ConnectError::OwnId),
        // Another incarnation of the acceptor's own address.
        (SiloId::new("c:1", 7), &AnyPeer, ConnectError::OwnId),
        (
            a.clone(),
            &Nobody,
            ConnectError::NotAdmitted { peer: a.clone() },
        ),
    ] {
        let (near, far) = tokio::io::duplex(1 << 16);
        let key = secret();
        let accepting = accept(
            Box::new(far),
            c.clone(),
            CLUSTER,
            &key,
            admission,
            silo(),
            config(),
        );
        let peer = async {
            let mut raw = raw(near);
            send(
                &mut raw,
                &Header::Hello {
                    protocol: wire::PROTOCOL,
                    cluster: CLUSTER.into(),
                    silo: claimed.clone(),
                    nonce: auth::nonce().expect("a nonce"),
                },
            )
            .await;
            raw
        };
        let (accepted, mut raw) = tokio::join!(accepting, peer);
        assert_eq!(accepted.err(), Some(refusal));
        assert!(
            next(&mut raw).await.is_none(),
            "{claimed}: a challenge was sent"
        );
    }
}

/// Proofs cover the cluster's name: with the secret but another name in
/// the MAC, neither side's proof verifies.
#[tokio::test]
async fn a_proof_for_another_cluster_name_fails_both_ways() {
    let (a, _, c) = ids();
    // An acceptor that proves itself over another cluster's name.
    let (near, far) = tokio::io::duplex(1 << 16);
    let key = secret();
    let dialling = connect(
        Box::new(near),
        a.clone(),
        &c,
        CLUSTER,
        &key,
        silo(),
        config(),
    );
    let acceptor = async {
        let mut raw = raw(far);
        let Some(Header::Hello { nonce: theirs, .. }) = next(&mut raw).await else {
            panic!("expected a hello");
        };
        let ours = auth::nonce().expect("a nonce");
        let proof = secret().proof(Role::Acceptor, "other", [&theirs, &ours], [&a, &c]);
        send(
            &mut raw,
            &Header::Challenge {
                protocol: wire::PROTOCOL,
                silo: c.clone(),
                nonce: ours,
                proof,
            },
        )
        .await;
        next(&mut raw).await
    };
    let (dialled, after) = tokio::join!(dialling, acceptor);
    assert_eq!(dialled.err(), Some(ConnectError::Unauthenticated));
    assert!(after.is_none(), "a proof was sent: {after:?}");

    // A connector that proves itself over another cluster's name.
    let (near, far) = tokio::io::duplex(1 << 16);
    let accepting = accept(
        Box::new(far),
        c.clone(),
        CLUSTER,
        &key,
        &AnyPeer,
        silo(),
        config(),
    );
    let connector = async {
        let mut raw = raw(near);
        let ours = auth::nonce().expect("a nonce");
        send(
            &mut raw,
            &Header::Hello {
                protocol: wire::PROTOCOL,
                cluster: CLUSTER.into(),
                silo: a.clone(),
                nonce: ours,
            },
        )
        .await;
        let Some(Header::Challenge { nonce: theirs, .. }) = next(&mut raw).await else {
            panic!("expected a challenge");
        };
        let proof = secret().proof(Role::Connector, "other", [&theirs, &ours], [&a, &c]);
        send(&mut raw, &Header::Proof { proof }).await;
        raw
    };
    let (accepted, _raw) = tokio::join!(accepting, connector);
    assert_eq!(accepted.err(), Some(ConnectError::Unauthenticated));
}
