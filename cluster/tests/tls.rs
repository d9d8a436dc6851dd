//! Mutual TLS between silos (`tls/mod.rs`), on TCP over loopback: a member
//! with a certificate of the cluster's CA connects and calls; a peer with
//! a certificate of another CA, an expired one, none at all, or speaking
//! plaintext is refused, and nothing it sent is handled.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use granary_actors::GrainKey;
use granary_cluster::tls::certs::{CertAuthority, NodeCert};
use granary_cluster::tls::{TlsFiles, TlsIdentity, TlsStats, TlsTransport};
use granary_cluster::{
    AnyPeer, ClusterSecret, ConnectionConfig, Inbound, InboundRequest, RemoteError, SiloId,
    TcpTransport, Transport, accept, connect,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLUSTER: &str = "tls-test";

fn secret() -> ClusterSecret {
    ClusterSecret::new([0xf1; 32]).expect("32 non-text bytes are a secret")
}

/// Counts the requests it handles and answers each with its count.
#[derive(Default)]
struct Counting(AtomicU64);

impl Inbound for Counting {
    fn request(
        &self,
        _: &SiloId,
        _: InboundRequest,
    ) -> BoxFuture<'static, Result<Vec<u8>, RemoteError>> {
        let count = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move { Ok(count.to_le_bytes().to_vec()) })
    }
}

fn identity(ca: &CertAuthority, node: &NodeCert) -> TlsIdentity {
    TlsIdentity::from_pem(
        ca.cert_pem().as_bytes(),
        node.cert_pem.as_bytes(),
        node.key_pem.as_bytes(),
    )
    .expect("a valid identity")
}

fn tls(identity: TlsIdentity) -> TlsTransport {
    TlsTransport::new(Arc::new(TcpTransport), identity, Duration::from_secs(2))
}

/// A silo serving over TLS on loopback: its address, what it handled, its
/// TLS counts, and how many streams reached the cluster's handshake.
struct Served {
    address: String,
    handled: Arc<Counting>,
    stats: Arc<TlsStats>,
    streams: Arc<AtomicU64>,
}

async fn serve(transport: TlsTransport) -> Served {
    let mut listener = transport
        .bind("127.0.0.1:0".into())
        .await
        .expect("a listener");
    let address = listener.local_address();
    let handled = Arc::new(Counting::default());
    let streams = Arc::new(AtomicU64::new(0));
    let (inbound, counted) = (handled.clone(), streams.clone());
    let id = SiloId::new(address.clone(), 1);
    tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((io, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let accepted = accept(
                io,
                id.clone(),
                CLUSTER,
                &secret(),
                &AnyPeer,
                inbound.clone(),
                ConnectionConfig::default(),
            )
            .await;
            if let Ok(connection) = accepted {
                open.push(connection);
            }
        }
    });
    Served {
        address,
        handled,
        stats: transport.stats(),
        streams,
    }
}

/// Connects over `transport` and makes one call; the error if any step
/// fails.
async fn call(transport: &dyn Transport, address: &str) -> Result<u64, String> {
    let io = transport
        .connect(address.to_string())
        .await
        .map_err(|err| err.to_string())?;
    let connection = connect(
        io,
        SiloId::new("b:1", 1),
        &SiloId::new(address, 1),
        CLUSTER,
        &secret(),
        Arc::new(Counting::default()),
        ConnectionConfig {
            handshake_timeout: Duration::from_secs(2),
            ..ConnectionConfig::default()
        },
    )
    .await
    .map_err(|err| err.to_string())?;
    let reply = connection
        .call("g", &GrainKey::U64(1), "m", &[])
        .await
        .map_err(|err| err.to_string())?;
    let bytes: [u8; 8] = reply[..]
        .try_into()
        .map_err(|_| "a short reply".to_string())?;
    Ok(u64::from_le_bytes(bytes))
}

/// Waits for `served`'s TLS refusals to reach `refused`.
async fn refused(served: &Served, refused: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while served.stats.refused() < refused {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} refusals, {refused} expected",
            served.stats.refused()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_member_of_the_clusters_ca_gets_through() {
    let ca = CertAuthority::generate().expect("a CA");
    let server = ca.issue(&["127.0.0.1".into()]).expect("a node certificate");
    let served = serve(tls(identity(&ca, &server))).await;

    // A member: its certificate is the cluster CA's.
    let member = ca.issue(&["127.0.0.1".into()]).expect("a node certificate");
    let member = tls(identity(&ca, &member));
    assert_eq!(call(&member, &served.address).await, Ok(1));
    assert_eq!(served.streams.load(Ordering::SeqCst), 1);

    // A certificate of another CA (trusting this cluster's CA, so that it
    // would accept the silo).
    let other_ca = CertAuthority::generate().expect("another CA");
    let stranger = other_ca
        .issue(&["127.0.0.1".into()])
        .expect("a certificate");
    let stranger = tls(identity(&ca, &stranger));
    assert!(call(&stranger, &served.address).await.is_err());
    refused(&served, 1).await;

    // An expired certificate of this CA.
    let day = Duration::from_secs(24 * 3600);
    let now = SystemTime::now();
    let expired = ca
        .issue_valid(&["127.0.0.1".into()], now - 30 * day, now - day)
        .expect("an expired certificate");
    let expired = tls(identity(&ca, &expired));
    assert!(call(&expired, &served.address).await.is_err());
    refused(&served, 2).await;

    // Plaintext: the cluster's own handshake, no TLS.
    assert!(call(&TcpTransport, &served.address).await.is_err());
    refused(&served, 3).await;

    // A TLS client with no certificate at all.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca_cert in
        <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::pem_slice_iter(
            ca.cert_pem().as_bytes(),
        )
    {
        roots.add(ca_cert.expect("the CA's PEM")).expect("a root");
    }
    let anonymous = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&served.address)
        .await
        .expect("a TCP connection");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("a name");
    // The client may finish its side before the silo refuses it; either
    // way nothing it writes is answered.
    if let Ok(mut stream) = tokio_rustls::TlsConnector::from(Arc::new(anonymous))
        .connect(name, tcp)
        .await
    {
        let _ = stream.write_all(b"\0\0\0\x10anything at all!").await;
        let mut buffer = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await;
        assert!(
            !matches!(read, Ok(Ok(n)) if n > 0),
            "the silo answered a client with no certificate"
        );
    }
    refused(&served, 4).await;

    // Nothing any of them sent reached the cluster's handshake, let alone
    // a grain; the member still calls.
    assert_eq!(served.streams.load(Ordering::SeqCst), 1);
    assert_eq!(served.handled.0.load(Ordering::SeqCst), 1);
    assert_eq!(call(&member, &served.address).await, Ok(2));
}

/// The connecting silo checks that the certificate names the address it
/// dialled: a certificate of the cluster's CA for another host is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_host_is_refused_by_the_dialler() {
    let ca = CertAuthority::generate().expect("a CA");
    let elsewhere = ca.issue(&["10.9.9.9".into()]).expect("a certificate");
    let served = serve(tls(identity(&ca, &elsewhere))).await;
    let member = ca.issue(&["127.0.0.1".into()]).expect("a certificate");
    let outcome = call(&tls(identity(&ca, &member)), &served.address).await;
    assert!(outcome.is_err(), "{outcome:?}");
    assert_eq!(served.streams.load(Ordering::SeqCst), 0);
}

/// Identities load from files; a key others may read is refused, and
/// files that are not what they should be say which and why.
#[test]
fn identities_load_from_files_and_refuse_a_readable_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("a folder");
    let ca = CertAuthority::generate().expect("a CA");
    let node = ca.issue(&["127.0.0.1".into()]).expect("a certificate");
    let files = TlsFiles {
        ca: dir.path().join("ca.pem"),
        cert: dir.path().join("node.pem"),
        key: dir.path().join("node-key.pem"),
    };
    std::fs::write(&files.ca, ca.cert_pem()).unwrap();
    std::fs::write(&files.cert, &node.cert_pem).unwrap();
    std::fs::write(&files.key, &node.key_pem).unwrap();
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = TlsIdentity::load(&files).expect_err("a readable key");
    assert!(err.to_string().contains("chmod 600"), "{err}");
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    TlsIdentity::load(&files).expect("the identity loads");
    std::fs::write(&files.cert, "not a certificate").unwrap();
    let err = TlsIdentity::load(&files).expect_err("no certificate");
    assert!(err.to_string().contains("node.pem"), "{err}");
}

/// Silent TCP connections from one host take at most 16 handshake slots;
/// beyond them each is closed at once (counted busy), and once they are
/// gone a member connects as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_from_one_host_take_a_bounded_share() {
    let ca = CertAuthority::generate().expect("a CA");
    let server = ca.issue(&["127.0.0.1".into()]).expect("a certificate");
    let served = serve(tls(identity(&ca, &server))).await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(
            tokio::net::TcpStream::connect(&served.address)
                .await
                .expect("a TCP connection"),
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while served.stats.busy() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} closed as busy, 4 expected",
            served.stats.busy()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(served.stats.busy(), 4);
    drop(silent);
    let member = ca.issue(&["127.0.0.1".into()]).expect("a certificate");
    let member = tls(identity(&ca, &member));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match call(&member, &served.address).await {
            Ok(_) => break,
            Err(err) => {
                assert!(tokio::time::Instant::now() < deadline, "{err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
