//! A TCP relay in the harness, between the silos and a server outside
//! their namespaces (PostgreSQL, etcd): the silos reach the server only
//! through it, and it holds every chunk it forwards for the delay it is set
//! to: latency on each chunk, with chunks in flight overlapping as on a
//! real link. This machine's kernel has no netem qdisc, so delay is
//! injected here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Relay {
    pub address: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Listens on `at` and forwards each connection to `server`.
    pub async fn start(at: SocketAddr, server: SocketAddr) -> std::io::Result<Relay> {
        let listener = TcpListener::bind(at).await?;
        let address = listener.local_addr()?;
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = delay_ms.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let delay = delay.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(server).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        _ = pump(client_read, server_write, delay.clone()) => {}
                        _ = pump(server_read, client_write, delay) => {}
                    }
                });
            }
        });
        Ok(Relay {
            address,
            delay_ms,
            task,
        })
    }

    /// Holds every chunk for `delay` from now on (zero: none).
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards what `from` sends to `to`, each chunk `delay_ms` after it was
/// read: latency, not a narrower pipe (chunks in flight overlap).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_ms: Arc<AtomicU64>,
) {
    let (chunks, mut due) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(256);
    let writer = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    let reader = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let delay = Duration::from_millis(delay_ms.load(Ordering::Relaxed));
            let at = tokio::time::Instant::now() + delay;
            if chunks.send((at, buffer[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    // The reader ends first on end of stream; what it queued is still
    // written before the connection closes.
    tokio::join!(reader, writer);
}
