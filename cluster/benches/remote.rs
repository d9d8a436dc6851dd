//! A remote call between two silos on loopback against tonic's unary gRPC,
//! same payload, same run.
//!
//! ```text
//! cargo bench -p granary-cluster --bench remote
//! ```
//!
//! - Granary: silo B calls grain `echo`/`k` on silo A over one
//!   authenticated TCP connection (`Connection::call`); A decodes the
//!   message, runs the grain's turn (activation, mailbox, turn) and sends
//!   the reply back. The message is 32 bytes and the reply is the same
//!   bytes.
//! - Granary through `ClusterNode`s (`*/granary_node`): silo B calls the
//!   grain through its reference (`node.grain::<G>(key).call`), as an
//!   application does; on top of
//!   the connection it pays the location cache, the message's encoding and
//!   A's home check (rule 6's pin). A hosts every grain (prefer-local
//!   placement; A calls each first).
//! - tonic: a unary gRPC call over HTTP/2 to a service that returns the
//!   request's 32 bytes (a raw-bytes codec, so no protobuf work on either
//!   side). The service does less than the silo: no grain, no mailbox.
//! - Granary over mutual TLS 1.3 (`*/granary_tls`): the same call on a
//!   connection through `TlsTransport` (rustls, ring), both ends with a
//!   certificate of a CA made for the run; the peer to compare it with is
//!   `*/granary`, in the same run.
//! - The floor (`remote_sequential/tcp_echo`): a bare tokio TCP echo of a
//!   length-prefixed 32-byte frame on the same runtime, one write and one
//!   read at each end and nothing else: the least any request and reply
//!   over loopback costs on this machine.
//!
//! Groups:
//! - `remote_sequential/*`: one call at a time (criterion's time is the
//!   round trip);
//! - `remote_pipelined/*`: 64 tasks each making calls back to back over
//!   the one connection (tonic: one HTTP/2 channel), so up to 64 are in
//!   flight; throughput is calls per second.
//!
//! The runtime has two worker threads (the machine's two cores), shared by
//! both ends of each connection.

use std::hint::black_box;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use granary_actors::dispatch::{decode, encode};
use granary_actors::{Grain, GrainContext, GrainKey, Handler, Message, Silo};
use granary_cluster::tls::certs::CertAuthority;
use granary_cluster::tls::{TlsIdentity, TlsTransport};
use granary_cluster::{
    AnyPeer, ClusterNode, ClusterSecret, Connection, ConnectionConfig, Listener, NodeConfig,
    PreferLocal, SiloId, TcpTransport, Transport, accept, connect,
};
use serde::{Deserialize, Serialize};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

const PAYLOAD: usize = 32;
const TASKS: usize = 64;
const CALLS_PER_TASK: usize = 200;

struct EchoGrain;
impl Grain for EchoGrain {
    fn new(_: &GrainKey) -> EchoGrain {
        EchoGrain
    }
}
#[derive(Serialize, Deserialize)]
struct Echo(Vec<u8>);
impl Message for Echo {
    type Reply = Echo;
}
impl Handler<Echo> for EchoGrain {
    async fn handle(&mut self, echo: Echo, _: &mut GrainContext) -> Echo {
        echo
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Mutual TLS over TCP for both ends, with a CA made for the run and a
/// certificate for 127.0.0.1.
fn tls_transport() -> Arc<dyn Transport> {
    let ca = CertAuthority::generate().expect("a CA");
    let node = ca.issue(&["127.0.0.1".into()]).expect("a certificate");
    let identity = TlsIdentity::from_pem(
        ca.cert_pem().as_bytes(),
        node.cert_pem.as_bytes(),
        node.key_pem.as_bytes(),
    )
    .expect("an identity");
    Arc::new(TlsTransport::new(
        Arc::new(TcpTransport),
        identity,
        Duration::from_secs(5),
    ))
}

/// Silo A serving on loopback, and B's connection to it, over plain TCP.
async fn granary_pair() -> (Connection, Silo, Silo) {
    granary_pair_over(Arc::new(TcpTransport)).await
}

/// Silo A serving on loopback over `transport`, and B's connection to it.
async fn granary_pair_over(transport: Arc<dyn Transport>) -> (Connection, Silo, Silo) {
    let secret = ClusterSecret::new([0x85; 32]).expect("a secret");
    let a = Silo::builder()
        .register::<EchoGrain>("echo")
        .message::<EchoGrain, Echo>("echo")
        .build()
        .expect("silo a");
    let b = Silo::builder()
        .register::<EchoGrain>("echo")
        .build()
        .expect("silo b");
    let mut listener: Box<dyn Listener> = transport
        .bind("127.0.0.1:0".into())
        .await
        .expect("a listener");
    let address = listener.local_address();
    let (serving, secret_a) = (a.clone(), secret.clone());
    let a_id = SiloId::new(address.clone(), 1);
    tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((io, _)) = listener.accept().await {
            if let Ok(connection) = accept(
                io,
                a_id.clone(),
                "bench",
                &secret_a,
                &AnyPeer,
                Arc::new(serving.clone()),
                ConnectionConfig::default(),
            )
            .await
            {
                open.push(connection);
            }
        }
    });
    let io = transport.connect(address.clone()).await.expect("connected");
    let connection = connect(
        io,
        SiloId::new("b", 1),
        &SiloId::new(address, 1),
        "bench",
        &secret,
        Arc::new(b.clone()),
        ConnectionConfig::default(),
    )
    .await
    .expect("a connection");
    (connection, a, b)
}

/// Two nodes on loopback TCP (gossip in-process); A hosts grains
/// `0..grains`. Returns B, which calls them, and A.
async fn node_pair(grains: u64) -> (ClusterNode, ClusterNode) {
    let secret = ClusterSecret::new([0x85; 32]).expect("a secret");
    let gossip = chitchat::transport::ChannelTransport::default();
    let mut nodes = Vec::new();
    for port in [1u16, 2] {
        let silo = Silo::builder()
            .register::<EchoGrain>("echo")
            .message::<EchoGrain, Echo>("echo")
            .build()
            .expect("a silo");
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], 40_000 + port));
        let mut config = NodeConfig::new(
            "bench",
            secret.clone(),
            "127.0.0.1:0",
            address,
            vec!["127.0.0.1:40001".into()],
        );
        config.gossip_interval = Duration::from_millis(50);
        // Fail over fast: a short grace before a silent silo is declared dead.
        config.death_grace = Duration::from_millis(200);
        nodes.push(
            ClusterNode::builder(silo, config)
                .placement(Arc::new(PreferLocal))
                .start(gossip.clone())
                .await
                .expect("a node"),
        );
    }
    while nodes.iter().any(|node| node.members().len() != 2) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (a, b) = (nodes.remove(0), nodes.remove(0));
    for key in 0..grains {
        a.grain::<EchoGrain>(key)
            .call(Echo(vec![7; PAYLOAD]))
            .await
            .expect("placed on a");
    }
    (b, a)
}

async fn node_call(node: &ClusterNode, key: u64) -> usize {
    node.grain::<EchoGrain>(key)
        .call(Echo(vec![7; PAYLOAD]))
        .await
        .expect("a reply")
        .0
        .len()
}

async fn granary_call(connection: &Connection, key: &GrainKey, payload: &[u8]) -> usize {
    let reply = connection
        .call("echo", key, "echo", payload)
        .await
        .expect("a reply");
    decode::<Echo>(&reply).expect("an echo").0.len()
}

/// Raw bytes in and out of gRPC's framing.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

#[derive(Debug, Clone, Copy, Default)]
struct RawEncoder;

#[derive(Debug, Clone, Copy, Default)]
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// `/bench.Echo/Echo`: returns the request's bytes.
#[derive(Debug, Clone, Copy)]
struct EchoService;

impl tonic::server::NamedService for EchoService {
    const NAME: &'static str = "bench.Echo";
}

struct EchoHandler;

impl tonic::server::UnaryService<Bytes> for EchoHandler {
    type Response = Bytes;
    type Future = std::future::Ready<Result<tonic::Response<Bytes>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(request.into_inner())))
    }
}

impl<B> tower_service::Service<http::Request<B>> for EchoService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(grpc.unary(EchoHandler, request).await)
        })
    }
}

type GrpcClient = tonic::client::Grpc<tonic::transport::Channel>;

async fn tonic_pair() -> GrpcClient {
    let incoming =
        tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().expect("an address"))
            .expect("a listener")
            // As Granary's TCP transport does.
            .with_nodelay(Some(true));
    let address = incoming.local_addr().expect("its address");
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(EchoService)
            .serve_with_incoming(incoming)
            .await;
    });
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
        .expect("a uri")
        .connect()
        .await
        .expect("a channel");
    tonic::client::Grpc::new(channel)
}

async fn tonic_call(client: &mut GrpcClient, payload: &Bytes) -> usize {
    client.ready().await.expect("ready");
    let reply = client
        .unary(
            tonic::Request::new(payload.clone()),
            http::uri::PathAndQuery::from_static("/bench.Echo/Echo"),
            RawCodec,
        )
        .await
        .expect("a reply");
    reply.into_inner().len()
}

/// A client connected to a bare echo server on loopback: the floor.
async fn tcp_echo_pair() -> tokio::sync::Mutex<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let address = listener.local_addr().expect("an address");
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("a client");
        stream.set_nodelay(true).expect("nodelay");
        let mut frame = [0u8; 4 + PAYLOAD];
        while stream.read_exact(&mut frame).await.is_ok() {
            if stream.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connected");
    stream.set_nodelay(true).expect("nodelay");
    tokio::sync::Mutex::new(stream)
}

/// One frame there and back.
async fn tcp_echo(stream: &tokio::sync::Mutex<tokio::net::TcpStream>) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = stream.lock().await;
    let mut frame = [7u8; 4 + PAYLOAD];
    frame[..4].copy_from_slice(&(PAYLOAD as u32).to_le_bytes());
    stream.write_all(&frame).await.expect("written");
    stream.read_exact(&mut frame).await.expect("echoed");
    frame.len()
}

fn sequential(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("remote_sequential");
    let (connection, _a, _b) = rt.block_on(granary_pair());
    let key = GrainKey::from("k");
    let payload = encode(&Echo(vec![7; PAYLOAD])).expect("encoded");
    group.bench_function("granary", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(granary_call(&connection, &key, &payload).await) })
    });
    let (over_tls, _a_tls, _b_tls) = rt.block_on(granary_pair_over(tls_transport()));
    group.bench_function("granary_tls", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(granary_call(&over_tls, &key, &payload).await) })
    });
    let (caller, _host) = rt.block_on(node_pair(1));
    group.bench_function("granary_node", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(node_call(&caller, 0).await) })
    });
    let echo = rt.block_on(tcp_echo_pair());
    group.bench_function("tcp_echo", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(tcp_echo(&echo).await) })
    });
    let client = rt.block_on(tonic_pair());
    let bytes = Bytes::from(vec![7u8; PAYLOAD]);
    group.bench_function("tonic", |b| {
        b.to_async(&rt).iter(|| {
            let mut client = client.clone();
            let bytes = bytes.clone();
            async move { black_box(tonic_call(&mut client, &bytes).await) }
        })
    });
    group.finish();
}

/// `iterations` rounds of `TASKS` tasks each making `CALLS_PER_TASK`
/// calls back to back; `task(n)` makes task `n`'s calls.
fn pipelined_rounds<F, Fut>(rt: &tokio::runtime::Runtime, iterations: u64, task: F) -> Duration
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    rt.block_on(async {
        let started = Instant::now();
        for _ in 0..iterations {
            let tasks: Vec<_> = (0..TASKS).map(|n| tokio::spawn(task(n))).collect();
            for task in tasks {
                task.await.expect("a task");
            }
        }
        started.elapsed()
    })
}

fn pipelined(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("remote_pipelined");
    group.throughput(Throughput::Elements((TASKS * CALLS_PER_TASK) as u64));
    group.sample_size(20);
    let (connection, _a, _b) = rt.block_on(granary_pair());
    let payload = Bytes::from(encode(&Echo(vec![7; PAYLOAD])).expect("encoded"));
    group.bench_function("granary", |b| {
        b.iter_custom(|iterations| {
            pipelined_rounds(&rt, iterations, |n| {
                let (connection, payload) = (connection.clone(), payload.clone());
                async move {
                    let key = GrainKey::U64(n as u64);
                    for _ in 0..CALLS_PER_TASK {
                        black_box(granary_call(&connection, &key, &payload).await);
                    }
                }
            })
        })
    });
    let (over_tls, _a_tls, _b_tls) = rt.block_on(granary_pair_over(tls_transport()));
    group.bench_function("granary_tls", |b| {
        b.iter_custom(|iterations| {
            pipelined_rounds(&rt, iterations, |n| {
                let (connection, payload) = (over_tls.clone(), payload.clone());
                async move {
                    let key = GrainKey::U64(n as u64);
                    for _ in 0..CALLS_PER_TASK {
                        black_box(granary_call(&connection, &key, &payload).await);
                    }
                }
            })
        })
    });
    let (caller, _host) = rt.block_on(node_pair(TASKS as u64));
    group.bench_function("granary_node", |b| {
        b.iter_custom(|iterations| {
            pipelined_rounds(&rt, iterations, |n| {
                let caller = caller.clone();
                async move {
                    for _ in 0..CALLS_PER_TASK {
                        black_box(node_call(&caller, n as u64).await);
                    }
                }
            })
        })
    });
    let client = rt.block_on(tonic_pair());
    let bytes = Bytes::from(vec![7u8; PAYLOAD]);
    group.bench_function("tonic", |b| {
        b.iter_custom(|iterations| {
            pipelined_rounds(&rt, iterations, |_| {
                let (mut client, bytes) = (client.clone(), bytes.clone());
                async move {
                    for _ in 0..CALLS_PER_TASK {
                        black_box(tonic_call(&mut client, &bytes).await);
                    }
                }
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = sequential, pipelined
}
criterion_main!(benches);
