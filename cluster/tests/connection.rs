//! Connections between silos, over the in-process network and over TCP on
//! loopback: calls both ways, pipelining, the handshake refusing strangers,
//! bad and oversize frames closing only their own connection, and calls
//! failing fast when a link is cut.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use futures_util::{SinkExt, StreamExt};
use granary_actors::dispatch::{decode, encode};
use granary_actors::{Grain, GrainContext, GrainKey, Handler, Message, Silo};
use granary_cluster::auth::{self, Role};
use granary_cluster::wire::{self, Header};
use granary_cluster::{
    AnyPeer, CallFailure, ClusterSecret, ConnectError, Connection, ConnectionConfig,
    InProcessNetwork, Inbound, Listener, RemoteError, SiloId, TcpTransport, Transport, accept,
    connect,
};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

struct Counter(u64);
impl Grain for Counter {
    fn new(_: &GrainKey) -> Counter {
        Counter(0)
    }
}
#[derive(Serialize, Deserialize)]
struct Add(u64);
impl Message for Add {
    type Reply = u64;
}
impl Handler<Add> for Counter {
    async fn handle(&mut self, Add(n): Add, _: &mut GrainContext) -> u64 {
        self.0 += n;
        self.0
    }
}
#[derive(Serialize, Deserialize)]
struct Nap(u64);
impl Message for Nap {
    type Reply = ();
}
impl Handler<Nap> for Counter {
    async fn handle(&mut self, Nap(ms): Nap, _: &mut GrainContext) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

fn silo() -> Silo {
    Silo::builder()
        .register::<Counter>("counter")
        .message::<Counter, Add>("add")
        .message::<Counter, Nap>("nap")
        .build()
        .unwrap()
}

fn secret() -> ClusterSecret {
    ClusterSecret::new([0x11; 32]).unwrap()
}

const CLUSTER: &str = "test";

/// Accepts connections on `listener` for `inbound`, keeping them open.
fn serve(
    mut listener: Box<dyn Listener>,
    local: SiloId,
    secret: ClusterSecret,
    inbound: Arc<dyn Inbound>,
    config: ConnectionConfig,
) -> tokio::sync::mpsc::UnboundedReceiver<Result<Connection, ConnectError>> {
    let (accepted, outcomes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            let (local, secret, inbound, accepted) = (
                local.clone(),
                secret.clone(),
                inbound.clone(),
                accepted.clone(),
            );
            tokio::spawn(async move {
                let _ = accepted
                    .send(accept(io, local, CLUSTER, &secret, &AnyPeer, inbound, config).await);
            });
        }
    });
    outcomes
}

struct Pair {
    /// B's connection to A.
    b_to_a: Connection,
    /// A's side of it.
    a_side: Connection,
    a: Silo,
    b: Silo,
}

async fn pair(transport_a: &dyn Transport, transport_b: &dyn Transport, bind: &str) -> Pair {
    pair_with(transport_a, transport_b, bind, ConnectionConfig::default()).await
}

async fn pair_with(
    transport_a: &dyn Transport,
    transport_b: &dyn Transport,
    bind: &str,
    config: ConnectionConfig,
) -> Pair {
    let (a, b) = (silo(), silo());
    let listener = transport_a.bind(bind.into()).await.unwrap();
    let address = listener.local_address();
    let a_id = SiloId::new(address.clone(), 1);
    let mut accepted = serve(
        listener,
        a_id.clone(),
        secret(),
        Arc::new(a.clone()),
        config,
    );
    let io = transport_b.connect(address.clone()).await.unwrap();
    let b_to_a = connect(
        io,
        SiloId::new("b", 1),
        &a_id,
        CLUSTER,
        &secret(),
        Arc::new(b.clone()),
        config,
    )
    .await
    .unwrap();
    assert_eq!(b_to_a.peer().address, address);
    let a_side = accepted.recv().await.unwrap().unwrap();
    assert_eq!(a_side.peer(), &SiloId::new("b", 1));
    Pair {
        b_to_a,
        a_side,
        a,
        b,
    }
}

async fn add(connection: &Connection, key: &str, n: u64) -> Result<u64, CallFailure> {
    let reply = connection
        .call(
            "counter",
            &GrainKey::from(key),
            "add",
            &encode(&Add(n)).unwrap(),
        )
        .await?;
    Ok(decode::<u64>(&reply).unwrap())
}

async fn calls_go_both_ways_on_one_connection(p: Pair) {
    assert_eq!(add(&p.b_to_a, "x", 2).await.unwrap(), 2);
    assert_eq!(add(&p.b_to_a, "x", 3).await.unwrap(), 5);
    // The grain lives on A: its state is A's.
    assert_eq!(p.a.grain::<Counter>("x").call(Add(0)).await.unwrap(), 5);
    // A calls B over the same connection.
    assert_eq!(add(&p.a_side, "x", 7).await.unwrap(), 7);
    assert_eq!(p.b.grain::<Counter>("x").call(Add(0)).await.unwrap(), 7);
    // A one-way message.
    p.b_to_a
        .tell(
            "counter",
            &GrainKey::from("x"),
            "add",
            &encode(&Add(1)).unwrap(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(p.a.grain::<Counter>("x").call(Add(0)).await.unwrap(), 6);
    // Unknown names come back typed.
    assert_eq!(
        p.b_to_a
            .call("nothing", &GrainKey::from("x"), "add", &[])
            .await
            .unwrap_err(),
        CallFailure::Remote(RemoteError::UnknownGrainType("nothing".into()))
    );
    assert!(matches!(
        p.b_to_a
            .call("counter", &GrainKey::from("x"), "add", &[0xff; 11])
            .await,
        Err(CallFailure::Remote(RemoteError::BadPayload(_)))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_go_both_ways_in_process() {
    let network = InProcessNetwork::new();
    let p = pair(&network.transport("a:1"), &network.transport("b"), "a:1").await;
    calls_go_both_ways_on_one_connection(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_go_both_ways_over_tcp() {
    let p = pair(&TcpTransport, &TcpTransport, "127.0.0.1:0").await;
    calls_go_both_ways_on_one_connection(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pipelined_calls_are_each_answered_once() {
    let p = pair(&TcpTransport, &TcpTransport, "127.0.0.1:0").await;
    let tasks: Vec<_> = (0..50)
        .map(|task| {
            let connection = p.b_to_a.clone();
            tokio::spawn(async move {
                let key = format!("k{task}");
                for expected in 1..=200u64 {
                    assert_eq!(add(&connection, &key, 1).await.unwrap(), expected);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silo_without_the_secret_or_of_another_cluster_is_refused() {
    let network = InProcessNetwork::new();
    let a = silo();
    let listener = network.transport("a:1").bind("a:1".into()).await.unwrap();
    let mut accepted = serve(
        listener,
        SiloId::new("a:1", 1),
        secret(),
        Arc::new(a.clone()),
        ConnectionConfig::default(),
    );
    let stranger = ClusterSecret::new([0xc5; 32]).unwrap();
    let io = network.transport("m").connect("a:1".into()).await.unwrap();
    let refused = connect(
        io,
        SiloId::new("m", 1),
        &SiloId::new("a:1", 1),
        CLUSTER,
        &stranger,
        Arc::new(silo()),
        ConnectionConfig::default(),
    )
    .await
    .unwrap_err();
    // The acceptor proves itself first: the stranger cannot check it.
    assert_eq!(refused, ConnectError::Unauthenticated);
    assert!(accepted.recv().await.unwrap().is_err());

    let io = network.transport("m").connect("a:1".into()).await.unwrap();
    let other_cluster = connect(
        io,
        SiloId::new("m", 1),
        &SiloId::new("a:1", 1),
        "another",
        &secret(),
        Arc::new(silo()),
        ConnectionConfig::default(),
    )
    .await;
    assert!(other_cluster.is_err());
    assert_eq!(
        accepted.recv().await.unwrap().unwrap_err(),
        ConnectError::WrongCluster {
            theirs: "another".into()
        }
    );
    // A peer that answers the challenge with a forged proof.
    let io = network.transport("m").connect("a:1".into()).await.unwrap();
    let mut raw = Framed::new(io, LengthDelimitedCodec::new());
    let nonce = auth::nonce().unwrap();
    let hello = Header::Hello {
        protocol: wire::PROTOCOL,
        cluster: CLUSTER.into(),
        silo: SiloId::new("m", 1),
        nonce,
    };
    raw.send(wire::encode(&hello, &[]).unwrap()).await.unwrap();
    let challenge = raw.next().await.unwrap().unwrap();
    assert!(matches!(
        wire::decode(challenge.freeze()).unwrap().0,
        Header::Challenge { .. }
    ));
    let forged = Header::Proof { proof: [7; 32] };
    raw.send(wire::encode(&forged, &[]).unwrap()).await.unwrap();
    assert_eq!(
        accepted.recv().await.unwrap().unwrap_err(),
        ConnectError::Unauthenticated
    );
    // The acceptor hung up.
    assert!(raw.next().await.is_none_or(|frame| frame.is_err()));
    // A peer of another wire protocol version is refused by number, also
    // when the rest of its hello is of a layout this build cannot read.
    let io = network.transport("m").connect("a:1".into()).await.unwrap();
    let mut raw = Framed::new(io, LengthDelimitedCodec::new());
    let newer = Header::Hello {
        protocol: wire::PROTOCOL + 1,
        cluster: CLUSTER.into(),
        silo: SiloId::new("m", 1),
        nonce: auth::nonce().unwrap(),
    };
    raw.send(wire::encode(&newer, &[]).unwrap()).await.unwrap();
    assert_eq!(
        accepted.recv().await.unwrap().unwrap_err(),
        ConnectError::Version {
            ours: wire::PROTOCOL,
            theirs: wire::PROTOCOL + 1
        }
    );
    let io = network.transport("m").connect("a:1".into()).await.unwrap();
    let mut raw = Framed::new(io, LengthDelimitedCodec::new());
    // Variant 0 (hello), version 7, then bytes of some future layout.
    let header = [0u8, 7, 0xff, 0xff, 0xff];
    let mut body = (header.len() as u32).to_le_bytes().to_vec();
    body.extend_from_slice(&header);
    raw.send(bytes::Bytes::from(body)).await.unwrap();
    assert_eq!(
        accepted.recv().await.unwrap().unwrap_err(),
        ConnectError::Version {
            ours: wire::PROTOCOL,
            theirs: 7
        }
    );
    // And the silo still serves real members.
    let io = network.transport("b").connect("a:1".into()).await.unwrap();
    let member = connect(
        io,
        SiloId::new("b", 1),
        &SiloId::new("a:1", 1),
        CLUSTER,
        &secret(),
        Arc::new(silo()),
        ConnectionConfig::default(),
    )
    .await
    .unwrap();
    assert_eq!(add(&member, "y", 4).await.unwrap(), 4);
}

/// A raw peer that completes the handshake with the secret, then misbehaves.
async fn raw_member(
    transport: &dyn Transport,
    address: &str,
) -> Framed<granary_cluster::transport::BoxIo, LengthDelimitedCodec> {
    let io = transport.connect(address.into()).await.unwrap();
    let mut raw = Framed::new(io, LengthDelimitedCodec::new());
    let me = SiloId::new("raw", 1);
    let ours = auth::nonce().unwrap();
    let hello = Header::Hello {
        protocol: wire::PROTOCOL,
        cluster: CLUSTER.into(),
        silo: me.clone(),
        nonce: ours,
    };
    raw.send(wire::encode(&hello, &[]).unwrap()).await.unwrap();
    let frame = raw.next().await.unwrap().unwrap();
    let Header::Challenge {
        protocol: _,
        silo: peer,
        nonce: theirs,
        proof,
    } = wire::decode(frame.freeze()).unwrap().0
    else {
        panic!("expected a challenge");
    };
    assert!(secret().verify(
        Role::Acceptor,
        CLUSTER,
        [&ours, &theirs],
        [&me, &peer],
        &proof
    ));
    let proof = secret().proof(Role::Connector, CLUSTER, [&theirs, &ours], [&me, &peer]);
    raw.send(wire::encode(&Header::Proof { proof }, &[]).unwrap())
        .await
        .unwrap();
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_or_oversize_frame_closes_that_connection_and_nothing_else() {
    let config = ConnectionConfig {
        max_frame: 64 << 10,
        ..ConnectionConfig::default()
    };
    let p = pair_with(&TcpTransport, &TcpTransport, "127.0.0.1:0", config).await;
    let address = p.b_to_a.peer().address.clone();
    for bad in ["garbage header", "oversize", "handshake again"] {
        let mut raw = raw_member(&TcpTransport, &address).await;
        match bad {
            "garbage header" => {
                let mut body = BytesMut::new();
                body.put_u32_le(3);
                body.put_slice(&[0xfe, 0xfe, 0xfe]);
                raw.send(body.freeze()).await.unwrap();
            }
            "oversize" => {
                // A length prefix past the limit: refused before the body.
                let inner = raw.get_mut();
                use tokio::io::AsyncWriteExt;
                inner.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
                inner.flush().await.unwrap();
            }
            _ => {
                let hello = Header::Hello {
                    protocol: wire::PROTOCOL,
                    cluster: CLUSTER.into(),
                    silo: SiloId::new("raw", 1),
                    nonce: [0; 32],
                };
                raw.send(wire::encode(&hello, &[]).unwrap()).await.unwrap();
            }
        }
        let closed = tokio::time::timeout(Duration::from_secs(5), raw.next()).await;
        assert!(
            matches!(closed, Ok(None | Some(Err(_)))),
            "{bad}: the connection should close"
        );
        // The good connection is untouched.
        assert_eq!(add(&p.b_to_a, bad, 1).await.unwrap(), 1, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_fail_fast_when_the_link_is_cut() {
    let network = InProcessNetwork::new();
    let p = pair(&network.transport("a:1"), &network.transport("b"), "a:1").await;
    let connection = p.b_to_a.clone();
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let outcome = connection
            .call(
                "counter",
                &GrainKey::from("z"),
                "nap",
                &encode(&Nap(10_000)).unwrap(),
            )
            .await;
        (outcome, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    network.cut("a:1", "b");
    let (outcome, took) = waiting.await.unwrap();
    assert!(
        matches!(outcome, Err(CallFailure::SiloUnavailable { .. })),
        "{outcome:?}"
    );
    assert!(took < Duration::from_secs(1), "failed fast: {took:?}");
    assert!(p.b_to_a.is_closed());
    // Later calls fail at once too.
    assert!(matches!(
        add(&p.b_to_a, "z", 1).await,
        Err(CallFailure::SiloUnavailable { .. })
    ));
    tokio::time::timeout(Duration::from_secs(1), p.a_side.closed())
        .await
        .expect("the other side closes too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_grain_times_out_and_a_huge_request_is_refused_before_sending() {
    let config = ConnectionConfig {
        call_timeout: Duration::from_millis(100),
        max_frame: 1 << 20,
        ..ConnectionConfig::default()
    };
    let network = InProcessNetwork::new();
    let p = pair_with(
        &network.transport("a:1"),
        &network.transport("b"),
        "a:1",
        config,
    )
    .await;
    let slow = p
        .b_to_a
        .call(
            "counter",
            &GrainKey::from("s"),
            "nap",
            &encode(&Nap(1000)).unwrap(),
        )
        .await;
    // The deadline travels with the request, so both ends time out: the
    // caller's wait, or the grain's side answering first that it did.
    assert!(
        matches!(
            slow,
            Err(CallFailure::Timeout { .. } | CallFailure::Remote(RemoteError::Timeout(_)))
        ),
        "{slow:?}"
    );
    let huge = vec![0u8; 2 << 20];
    assert!(matches!(
        p.b_to_a
            .call("counter", &GrainKey::from("s"), "add", &huge)
            .await,
        Err(CallFailure::TooLarge { .. })
    ));
    // Still serving.
    assert_eq!(add(&p.b_to_a, "t", 1).await.unwrap(), 1);
}
