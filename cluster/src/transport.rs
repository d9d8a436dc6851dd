//! Byte streams between silos: TCP, and an in-process network for
//! deterministic tests.
//!
//! A [`Transport`] connects to an address and listens on one, and hands
//! back plain byte streams; framing, the handshake and multiplexing sit on
//! top (`connection.rs`), the same for every transport. So the in-process
//! network exercises the real codec: everything still travels as
//! serialised frames, only the socket is a [`tokio::io::duplex`] pipe.
//!
//! The in-process network can also cut the link between two silos (as
//! chitchat's test transport does): the streams between them fail at once
//! in both directions, and new connections between them are refused until
//! the link is healed. A silo can be cut from everyone, which is how tests
//! kill one.

use std::collections::{HashMap, HashSet};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::mpsc;

/// A byte stream to another silo.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// Accepts connections on one address.
pub trait Listener: Send + 'static {
    /// The next connection, with the address it came from.
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(BoxIo, String)>>;

    /// The address this listener is bound to (with the port chosen, if
    /// port 0 was asked for).
    fn local_address(&self) -> String;
}

/// Connects to silos and listens for them.
pub trait Transport: Send + Sync + 'static {
    /// A stream to the silo listening on `address`.
    fn connect(&self, address: String) -> BoxFuture<'static, io::Result<BoxIo>>;

    /// Listens on `address`.
    fn bind(&self, address: String) -> BoxFuture<'static, io::Result<Box<dyn Listener>>>;
}

/// TCP, with Nagle's algorithm off (frames are flushed whole).
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpTransport;

struct TcpListener(tokio::net::TcpListener);

impl Listener for TcpListener {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(BoxIo, String)>> {
        Box::pin(async move {
            let (stream, peer) = self.0.accept().await?;
            stream.set_nodelay(true)?;
            Ok((Box::new(stream) as BoxIo, peer.to_string()))
        })
    }

    fn local_address(&self) -> String {
        self.0
            .local_addr()
            .map(|address| address.to_string())
            .unwrap_or_default()
    }
}

impl Transport for TcpTransport {
    fn connect(&self, address: String) -> BoxFuture<'static, io::Result<BoxIo>> {
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(address).await?;
            stream.set_nodelay(true)?;
            Ok(Box::new(stream) as BoxIo)
        })
    }

    fn bind(&self, address: String) -> BoxFuture<'static, io::Result<Box<dyn Listener>>> {
        Box::pin(async move {
            let listener = tokio::net::TcpListener::bind(address).await?;
            Ok(Box::new(TcpListener(listener)) as Box<dyn Listener>)
        })
    }
}

/// Bytes an in-process pipe buffers each way.
const PIPE_BYTES: usize = 256 << 10;

/// The shared state of one in-process link: cut once, for good.
#[derive(Default)]
struct Switch {
    cut: AtomicBool,
    /// One per end and direction.
    wakers: [AtomicWaker; 4],
}

impl Switch {
    fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        for waker in &self.wakers {
            waker.wake();
        }
    }
}

/// One end of an in-process link.
struct End {
    pipe: DuplexStream,
    switch: Arc<Switch>,
    /// Which of the switch's wakers are this end's: `[read, write]`.
    wakers: [usize; 2],
}

fn cut_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "the link was cut")
}

impl End {
    /// Registers for the cut before looking, so a cut is never missed.
    fn check(&self, cx: &mut Context<'_>, which: usize) -> io::Result<()> {
        self.switch.wakers[self.wakers[which]].register(cx.waker());
        if self.switch.cut.load(Ordering::Acquire) {
            Err(cut_error())
        } else {
            Ok(())
        }
    }
}

impl AsyncRead for End {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx, 0)?;
        Pin::new(&mut self.pipe).poll_read(cx, buf)
    }
}

impl AsyncWrite for End {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx, 1)?;
        Pin::new(&mut self.pipe).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx, 1)?;
        Pin::new(&mut self.pipe).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.pipe).poll_shutdown(cx)
    }
}

/// The two addresses of a link, in a fixed order.
fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

#[derive(Default)]
struct Network {
    listeners: HashMap<String, mpsc::UnboundedSender<(BoxIo, String)>>,
    /// Live links, by the pair they join.
    links: HashMap<(String, String), Vec<Arc<Switch>>>,
    /// Pairs that may not connect.
    cut: HashSet<(String, String)>,
    /// Silos cut from everyone.
    isolated: HashSet<String>,
    /// For port 0.
    next_port: u32,
}

/// An in-process network of silos (see the module docs). Cheap to clone;
/// every clone is the same network.
#[derive(Clone, Default)]
pub struct InProcessNetwork {
    network: Arc<Mutex<Network>>,
}

impl std::fmt::Debug for InProcessNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let network = self.lock();
        f.debug_struct("InProcessNetwork")
            .field("listening", &network.listeners.keys().collect::<Vec<_>>())
            .field("cut", &network.cut)
            .field("isolated", &network.isolated)
            .finish()
    }
}

impl InProcessNetwork {
    /// An empty network.
    pub fn new() -> InProcessNetwork {
        InProcessNetwork::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Network> {
        self.network.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The transport of the silo at `local`: its connections come from that
    /// address.
    pub fn transport(&self, local: &str) -> InProcessTransport {
        InProcessTransport {
            network: self.clone(),
            local: local.to_string(),
        }
    }

    /// Cuts every link between `a` and `b` and refuses new ones until
    /// [`InProcessNetwork::heal`].
    pub fn cut(&self, a: &str, b: &str) {
        let key = pair(a, b);
        let mut network = self.lock();
        network.cut.insert(key.clone());
        let switches = network.links.remove(&key).unwrap_or_default();
        drop(network);
        switches.iter().for_each(|switch| switch.cut());
    }

    /// Lets `a` and `b` connect again (existing links stay cut).
    pub fn heal(&self, a: &str, b: &str) {
        self.lock().cut.remove(&pair(a, b));
    }

    /// Cuts `silo` from everyone, as if it died; it also stops accepting.
    pub fn isolate(&self, silo: &str) {
        let mut network = self.lock();
        network.isolated.insert(silo.to_string());
        network.listeners.remove(silo);
        let keys: Vec<_> = network
            .links
            .keys()
            .filter(|(a, b)| a == silo || b == silo)
            .cloned()
            .collect();
        let switches: Vec<_> = keys
            .iter()
            .filter_map(|key| network.links.remove(key))
            .flatten()
            .collect();
        drop(network);
        switches.iter().for_each(|switch| switch.cut());
    }

    /// Lets an isolated `silo` connect and listen again.
    pub fn rejoin(&self, silo: &str) {
        self.lock().isolated.remove(silo);
    }

    fn connect(&self, from: &str, to: &str) -> io::Result<BoxIo> {
        let key = pair(from, to);
        let mut network = self.lock();
        if network.cut.contains(&key)
            || network.isolated.contains(from)
            || network.isolated.contains(to)
        {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("the link {from} - {to} is cut"),
            ));
        }
        let Some(listener) = network.listeners.get(to).cloned() else {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("nothing listens on {to}"),
            ));
        };
        let (near, far) = tokio::io::duplex(PIPE_BYTES);
        let switch = Arc::new(Switch::default());
        let near = End {
            pipe: near,
            switch: switch.clone(),
            wakers: [0, 1],
        };
        let far = End {
            pipe: far,
            switch: switch.clone(),
            wakers: [2, 3],
        };
        listener
            .send((Box::new(far), from.to_string()))
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("{to} stopped listening"),
                )
            })?;
        network.links.entry(key).or_default().push(switch);
        Ok(Box::new(near))
    }

    fn bind(&self, address: &str) -> io::Result<InProcessListener> {
        let mut network = self.lock();
        let address = match address.strip_suffix(":0") {
            Some(host) => {
                network.next_port += 1;
                format!("{host}:{}", 40_000 + network.next_port)
            }
            None => address.to_string(),
        };
        if network.isolated.contains(&address) {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!("{address} is isolated"),
            ));
        }
        if network
            .listeners
            .get(&address)
            .is_some_and(|listener| !listener.is_closed())
        {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{address} is taken"),
            ));
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        network.listeners.insert(address.clone(), sender);
        Ok(InProcessListener { address, receiver })
    }
}

/// One silo's side of an [`InProcessNetwork`].
#[derive(Debug, Clone)]
pub struct InProcessTransport {
    network: InProcessNetwork,
    local: String,
}

struct InProcessListener {
    address: String,
    receiver: mpsc::UnboundedReceiver<(BoxIo, String)>,
}

impl Listener for InProcessListener {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(BoxIo, String)>> {
        Box::pin(async move {
            self.receiver.recv().await.ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotConnected, "the listener was closed")
            })
        })
    }

    fn local_address(&self) -> String {
        self.address.clone()
    }
}

impl Transport for InProcessTransport {
    fn connect(&self, address: String) -> BoxFuture<'static, io::Result<BoxIo>> {
        let connected = self.network.connect(&self.local, &address);
        Box::pin(async move { connected })
    }

    fn bind(&self, address: String) -> BoxFuture<'static, io::Result<Box<dyn Listener>>> {
        let bound = self
            .network
            .bind(&address)
            .map(|listener| Box::new(listener) as Box<dyn Listener>);
        Box::pin(async move { bound })
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn bytes_flow_until_the_link_is_cut_and_it_is_refused_until_healed() {
        let network = InProcessNetwork::new();
        let mut listener = network.transport("b:1").bind("b:1".into()).await.unwrap();
        let a = network.transport("a:1");
        let mut near = a.connect("b:1".into()).await.unwrap();
        let (mut far, from) = listener.accept().await.unwrap();
        assert_eq!(from, "a:1");
        near.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");

        // A reader blocked on the far end sees the cut.
        let reading = tokio::spawn(async move {
            let mut byte = [0u8; 1];
            far.read(&mut byte).await
        });
        tokio::task::yield_now().await;
        network.cut("b:1", "a:1");
        let read = reading.await.unwrap();
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
        assert!(near.write_all(b"x").await.is_err());
        assert_eq!(
            a.connect("b:1".into()).await.err().map(|err| err.kind()),
            Some(io::ErrorKind::ConnectionRefused)
        );
        network.heal("a:1", "b:1");
        assert!(a.connect("b:1".into()).await.is_ok());
    }

    #[tokio::test]
    async fn an_isolated_silo_neither_connects_nor_listens() {
        let network = InProcessNetwork::new();
        let _b = network.transport("b:1").bind("b:1".into()).await.unwrap();
        let _c = network.transport("c:1").bind("c:1".into()).await.unwrap();
        network.isolate("b:1");
        assert!(
            network
                .transport("a:1")
                .connect("b:1".into())
                .await
                .is_err()
        );
        assert!(
            network
                .transport("b:1")
                .connect("c:1".into())
                .await
                .is_err()
        );
        assert!(network.transport("b:1").bind("b:1".into()).await.is_err());
        network.rejoin("b:1");
        let _b = network.transport("b:1").bind("b:1".into()).await.unwrap();
        assert!(network.transport("a:1").connect("b:1".into()).await.is_ok());
    }

    #[tokio::test]
    async fn port_zero_gets_a_fresh_port_and_an_address_is_taken_once() {
        let network = InProcessNetwork::new();
        let t = network.transport("x");
        let one = t.bind("h:0".into()).await.unwrap();
        let two = t.bind("h:0".into()).await.unwrap();
        assert_ne!(one.local_address(), two.local_address());
        assert_eq!(
            t.bind(one.local_address())
                .await
                .err()
                .map(|err| err.kind()),
            Some(io::ErrorKind::AddrInUse)
        );
    }
}
