//! Mutual TLS 1.3 between silos: a [`Transport`] that wraps another
//! (rustls, with ring's cryptography).
//!
//! # Rules
//!
//! 1. **TLS 1.3 only, both ways.** Each silo presents a certificate chain
//!    signed by the cluster's CA, and each verifies the other's against
//!    that CA alone: no system roots, no anonymous client. A peer with a
//!    certificate of another CA, an expired one, none at all, or that
//!    speaks plaintext fails the TLS handshake and is closed. No session
//!    is resumed: every connection checks its peer's certificate.
//! 2. **The name dialled.** The connecting silo checks that the acceptor's
//!    certificate names the host of the address it dialled, so one node's
//!    certificate does not serve for another's address. A silo is known
//!    by the address its listener bound, an IP address, so a node's
//!    certificate names that IP. (The acceptor takes any certificate of
//!    the CA from the connecting side: which silo it is, the cluster's own
//!    handshake says.)
//! 3. **Nothing before the handshake.** On the accepting side each TLS
//!    handshake runs in a task of its own, within `handshake_timeout`, at
//!    most [`MAX_TLS_HANDSHAKES`] at once (beyond them a connection closes
//!    at once), at most [`MAX_TLS_HANDSHAKES_PER_SOURCE`] from one source
//!    address, so that one host's silent connections cannot take every
//!    slot; only streams whose handshake completed come out of the
//!    listener. A peer refused at TLS reaches nothing of the node: not the
//!    cluster-secret handshake, not a request. Refusals are counted
//!    ([`TlsStats`]).
//! 4. **Inside, the cluster's own handshake still runs** (`auth.rs`): TLS
//!    says the peer holds a certificate of the cluster's CA and encrypts
//!    and authenticates every frame; the secret's handshake says which
//!    silo it is.
//! 5. **The accept loop survives.** An accept of the wrapped listener that
//!    fails is passed on (the node waits and accepts again, `node/mod.rs`
//!    rule 10); this listener's own loop waits too, 10 ms doubling to 1 s,
//!    so that a listener out of file descriptors does not spin.
//! 6. **Reads are buffered** below TLS (`READ_BUFFER`): rustls asks the
//!    socket for 4 KiB at a time; a buffer under it turns a burst of
//!    records into one system call.

pub mod certs;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::sync::{Semaphore, mpsc};

use crate::transport::{BoxIo, Listener, Transport};

/// TLS handshakes a listener runs at once (rule 3).
pub const MAX_TLS_HANDSHAKES: usize = 256;
/// TLS handshakes a listener runs at once from one source address
/// (rule 3).
pub const MAX_TLS_HANDSHAKES_PER_SOURCE: usize = 16;
/// Completed connections a listener holds for the node to take.
const READY: usize = 64;
/// Bytes read from the socket at once under TLS (rule 6): rustls reads
/// 4 KiB at a time, so a burst of small frames took a system call per
/// 4 KiB; with this buffer one read takes the burst (pipelined calls went
/// from 65% of plaintext throughput to 92–102%, `BENCHMARKS.md`).
const READ_BUFFER: usize = 64 << 10;

/// Where a node's TLS files are (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster's CA certificate.
    pub ca: PathBuf,
    /// This node's certificate (its chain, leaf first).
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// Why TLS could not be set up.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A file holds no certificate.
    NoCertificate(PathBuf),
    /// The key file holds no private key, or one that does not parse.
    BadKey(PathBuf),
    /// The key file may be read or written by others than its owner.
    KeyReadable {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// rustls refused the configuration (a key that does not match the
    /// certificate, a CA it cannot use).
    Config(String),
    /// Making certificates failed (`certs`).
    Generate(String),
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::Read { path, why } => write!(f, "{}: {why}", path.display()),
            TlsError::NoCertificate(path) => {
                write!(f, "{}: no PEM certificate in it", path.display())
            }
            TlsError::BadKey(path) => write!(f, "{}: no PEM private key in it", path.display()),
            TlsError::KeyReadable { path, mode } => write!(
                f,
                "{}: a private key others may read or write (mode {mode:04o}); run `chmod 600 {}`",
                path.display(),
                path.display()
            ),
            TlsError::Config(why) => write!(f, "TLS: {why}"),
            TlsError::Generate(why) => write!(f, "making certificates: {why}"),
        }
    }
}

impl std::error::Error for TlsError {}

/// What TLS listeners refused or timed out, counted.
#[derive(Debug, Default)]
pub struct TlsStats {
    accepted: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
    busy: AtomicU64,
}

impl TlsStats {
    /// Handshakes completed on the accepting side.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Handshakes that failed on the accepting side (rule 1).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Handshakes that did not finish in time (rule 3).
    pub fn timed_out(&self) -> u64 {
        self.timed_out.load(Ordering::Relaxed)
    }

    /// Connections closed at once, past [`MAX_TLS_HANDSHAKES`] (rule 3).
    pub fn busy(&self) -> u64 {
        self.busy.load(Ordering::Relaxed)
    }
}

/// A node's TLS identity: its certificate and key, and the CA it trusts,
/// as rustls configurations for both sides.
#[derive(Clone)]
pub struct TlsIdentity {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity").finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|err| TlsError::Read {
        path: path.to_path_buf(),
        why: err.to_string(),
    })
}

impl TlsIdentity {
    /// Loads `files` (PEM). The key file must be its owner's alone (mode
    /// 0600 or stricter), as the node file must.
    pub fn load(files: &TlsFiles) -> Result<TlsIdentity, TlsError> {
        let readable = others_may_access(&files.key).map_err(|err| TlsError::Read {
            path: files.key.clone(),
            why: err.to_string(),
        })?;
        if let Some(mode) = readable {
            return Err(TlsError::KeyReadable {
                path: files.key.clone(),
                mode,
            });
        }
        let (ca, cert, key) = (read(&files.ca)?, read(&files.cert)?, read(&files.key)?);
        TlsIdentity::build(&ca, &cert, &key, [&files.ca, &files.cert, &files.key])
    }

    /// The identity from PEM text: the CA's certificate, this node's
    /// chain, this node's key.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<TlsIdentity, TlsError> {
        TlsIdentity::build(
            ca,
            cert,
            key,
            [Path::new("<ca>"), Path::new("<cert>"), Path::new("<key>")],
        )
    }

    /// `from_pem`, errors naming `paths` (CA, certificate, key).
    fn build(
        ca: &[u8],
        cert: &[u8],
        key: &[u8],
        paths: [&Path; 3],
    ) -> Result<TlsIdentity, TlsError> {
        let [ca_path, cert_path, key_path] = paths.map(Path::to_path_buf);
        let mut roots = RootCertStore::empty();
        let mut cas = 0;
        for ca in CertificateDer::pem_slice_iter(ca) {
            let ca = ca.map_err(|_| TlsError::NoCertificate(ca_path.clone()))?;
            roots
                .add(ca)
                .map_err(|err| TlsError::Config(format!("the CA certificate: {err}")))?;
            cas += 1;
        }
        if cas == 0 {
            return Err(TlsError::NoCertificate(ca_path));
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .map_err(|_| TlsError::NoCertificate(cert_path.clone()))?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate(cert_path));
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|_| TlsError::BadKey(key_path))?;
        let roots = Arc::new(roots);
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|err| TlsError::Config(err.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|err| TlsError::Config(err.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|err| TlsError::Config(format!("this node's certificate and key: {err}")))?;
        // Rule 1: every connection checks its peer's certificate afresh; a
        // resumed session would skip the check (a certificate since
        // expired would still get in).
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|err| TlsError::Config(err.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|err| TlsError::Config(format!("this node's certificate and key: {err}")))?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(TlsIdentity {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// ring's cryptography for rustls. rustls marks it deprecated because ring
/// has no post-quantum key exchange (X25519MLKEM768 is aws-lc-rs's); ring
/// builds with a C compiler alone, where aws-lc-rs needs a much larger C
/// build. Key exchange is X25519 or P-256 ECDHE, under TLS 1.3.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether `cert` (PEM), presented for `name`, chains to `ca` (PEM) now
/// (rule 2): what a node checks of its own certificate when it starts, so
/// that a certificate peers would refuse is found there, not by them.
pub fn verify_issued(ca: &[u8], cert: &[u8], name: &str) -> Result<(), String> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca) {
        roots
            .add(ca.map_err(|err| err.to_string())?)
            .map_err(|err| err.to_string())?;
    }
    let leaf = CertificateDer::from_pem_slice(cert).map_err(|err| err.to_string())?;
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|err| err.to_string())?;
    let name = ServerName::try_from(name.to_string()).map_err(|err| err.to_string())?;
    use rustls::client::danger::ServerCertVerifier;
    verifier
        .verify_server_cert(&leaf, &[], &name, &[], rustls::pki_types::UnixTime::now())
        .map(|_| ())
        .map_err(|err| err.to_string())
}

/// Whether `name` (an IP address or a DNS name, no port) is one a
/// certificate can name and TLS can check; the error says why not.
pub fn check_name(name: &str) -> Result<(), String> {
    ServerName::try_from(name.to_string())
        .map(|_| ())
        .map_err(|err| format!("{name:?}: {err}"))
}

/// The permission bits of the file at `path` if anyone but its owner may
/// read or write it (any group or other bit, on Unix), `None` if only its
/// owner may: a file holding a secret (a key, a node file) is refused in
/// the first case, as ssh refuses such a private key.
pub fn others_may_access(path: &Path) -> io::Result<Option<u32>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Ok(Some(mode & 0o7777));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(None)
}

/// The host part of `address` (`host:port`, `[v6]:port`) as a TLS server
/// name (rule 2).
fn server_name(address: &str) -> io::Result<ServerName<'static>> {
    let host = address
        .rsplit_once(':')
        .map(|(host, _)| host)
        .unwrap_or(address);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    // An IPv6 link-local address carries its zone (`fe80::1%2`); a
    // certificate names the address alone.
    let host = host.split('%').next().unwrap_or(host);
    ServerName::try_from(host.to_string()).map_err(|err| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{address}: not a host TLS can check: {err}"),
        )
    })
}

/// Mutual TLS over another transport (the module's rules).
#[derive(Clone)]
pub struct TlsTransport {
    inner: Arc<dyn Transport>,
    identity: TlsIdentity,
    handshake_timeout: Duration,
    stats: Arc<TlsStats>,
}

impl std::fmt::Debug for TlsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTransport")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl TlsTransport {
    /// TLS with `identity` over `inner`; each TLS handshake must finish
    /// within `handshake_timeout`.
    pub fn new(
        inner: Arc<dyn Transport>,
        identity: TlsIdentity,
        handshake_timeout: Duration,
    ) -> TlsTransport {
        TlsTransport {
            inner,
            identity,
            handshake_timeout,
            stats: Arc::new(TlsStats::default()),
        }
    }

    /// What its listeners counted.
    pub fn stats(&self) -> Arc<TlsStats> {
        self.stats.clone()
    }
}

impl Transport for TlsTransport {
    fn connect(&self, address: String) -> BoxFuture<'static, io::Result<BoxIo>> {
        let inner = self.inner.clone();
        let connector = tokio_rustls::TlsConnector::from(self.identity.client.clone());
        let timeout = self.handshake_timeout;
        Box::pin(async move {
            let name = server_name(&address)?;
            let io =
                tokio::io::BufReader::with_capacity(READ_BUFFER, inner.connect(address).await?);
            let stream = tokio::time::timeout(timeout, connector.connect(name, io))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "the TLS handshake timed out")
                })??;
            Ok(Box::new(stream) as BoxIo)
        })
    }

    fn bind(&self, address: String) -> BoxFuture<'static, io::Result<Box<dyn Listener>>> {
        let inner = self.inner.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(self.identity.server.clone());
        let timeout = self.handshake_timeout;
        let stats = self.stats.clone();
        Box::pin(async move {
            let listener = inner.bind(address).await?;
            let local = listener.local_address();
            let (ready, taken) = mpsc::channel(READY);
            let accepting = tokio::spawn(accept_loop(listener, acceptor, timeout, stats, ready));
            Ok(Box::new(TlsListener {
                taken,
                local,
                accepting,
            }) as Box<dyn Listener>)
        })
    }
}

/// A listener whose connections have completed their TLS handshake.
struct TlsListener {
    taken: mpsc::Receiver<io::Result<(BoxIo, String)>>,
    local: String,
    accepting: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl Listener for TlsListener {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(BoxIo, String)>> {
        Box::pin(async move {
            match self.taken.recv().await {
                Some(next) => next,
                None => Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the TLS listener stopped",
                )),
            }
        })
    }

    fn local_address(&self) -> String {
        self.local.clone()
    }
}

/// Accepts from `listener` and runs each TLS handshake in a task of its
/// own (rules 3 and 5).
async fn accept_loop(
    mut listener: Box<dyn Listener>,
    acceptor: tokio_rustls::TlsAcceptor,
    timeout: Duration,
    stats: Arc<TlsStats>,
    ready: mpsc::Sender<io::Result<(BoxIo, String)>>,
) {
    let handshaking = Arc::new(Semaphore::new(MAX_TLS_HANDSHAKES));
    let per_source = Arc::new(crate::slots::Sources::new(MAX_TLS_HANDSHAKES_PER_SOURCE));
    let mut backoff = Duration::from_millis(10);
    loop {
        let (io, from) = match listener.accept().await {
            Ok(accepted) => {
                backoff = Duration::from_millis(10);
                accepted
            }
            Err(err) => {
                let gone = err.kind() == io::ErrorKind::NotConnected;
                if ready.send(Err(err)).await.is_err() || gone {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = handshaking.clone().try_acquire_owned() else {
            stats.busy.fetch_add(1, Ordering::Relaxed);
            drop(io);
            continue;
        };
        let Some(from_source) = crate::slots::Sources::enter(&per_source, &from) else {
            stats.busy.fetch_add(1, Ordering::Relaxed);
            drop(io);
            continue;
        };
        let (acceptor, stats, ready) = (acceptor.clone(), stats.clone(), ready.clone());
        tokio::spawn(async move {
            let _permits = (permit, from_source);
            let io = tokio::io::BufReader::with_capacity(READ_BUFFER, io);
            match tokio::time::timeout(timeout, acceptor.accept(io)).await {
                Ok(Ok(stream)) => {
                    stats.accepted.fetch_add(1, Ordering::Relaxed);
                    let _ = ready.send(Ok((Box::new(stream) as BoxIo, from))).await;
                }
                Ok(Err(err)) => {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%from, error = %err, "a TLS handshake failed");
                }
                Err(_) => {
                    stats.timed_out.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%from, "a TLS handshake timed out");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_dialled_is_the_host_of_the_address() {
        assert_eq!(
            server_name("10.0.0.5:7000").expect("a checkable host"),
            ServerName::try_from("10.0.0.5").expect("a valid name")
        );
        assert_eq!(
            server_name("[::1]:7000").expect("a checkable host"),
            ServerName::try_from("::1").expect("a valid name")
        );
        assert_eq!(
            server_name("silo-1.granary:7000").expect("a checkable host"),
            ServerName::try_from("silo-1.granary").expect("a valid name")
        );
        assert!(server_name("bad name:7000").is_err());
        assert_eq!(
            server_name("[fe80::1%2]:7000").expect("a checkable host"),
            ServerName::try_from("fe80::1").expect("a valid name")
        );
    }
}
