//! The admin endpoint's HTTP server (rule 8 of `admin/mod.rs`): hyper's
//! HTTP/1.1 connections, each with the limits `axum::serve` leaves unset.
//!
//! 1. **At most [`MAX_CONNECTIONS`] connections**, and
//!    [`LOOPBACK_CONNECTIONS`] more kept for peers on loopback (the node's
//!    own liveness probe, `granary-probe` in the pod). One past them is
//!    closed as it is accepted, before a byte is read (and counted in the
//!    log at debug level): a client that opens thousands cannot take the
//!    process's memory or file descriptors, and strangers that fill every
//!    other slot cannot fail the probes that keep the node alive.
//! 2. **Headers within [`HEADER_READ_TIMEOUT`]** and [`MAX_HEADER_BYTES`]:
//!    a request whose headers come slower, or grow larger, closes its
//!    connection (hyper answers 431 for the size). The timer runs whenever
//!    a connection waits for a request, so an idle keep-alive connection
//!    is closed after it too. Requests carry no body the endpoint reads.
//!    A connection lives at most [`CONNECTION_LIFETIME`], then stops as at
//!    a stop (rule 3): one whose client stopped reading an answer, which
//!    no header timer covers, frees its slot then.
//! 3. **A bounded stop.** Stopping closes the listener, lets each
//!    connection finish the request in progress, and after
//!    [`STOP_GRACE`] drops those that have not (a client that stopped
//!    reading an answer, or one that never sent its headers): a node's
//!    drain never waits on its admin clients.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::task::JoinSet;

/// Rule 1.
pub const MAX_CONNECTIONS: usize = 128;
/// Rule 1.
pub const LOOPBACK_CONNECTIONS: usize = 16;
/// Rule 2.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Rule 2.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Rule 2.
pub const MAX_HEADER_BYTES: usize = 16 << 10;
/// Rule 3.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// Whether a peer at `ip` may take a slot kept for loopback (rule 1): an
/// IPv4 peer on a dual-stack listener arrives as `::ffff:127.0.0.1`.
fn on_loopback(ip: std::net::IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Serves `app` on `listener` until `stop` fires (or its sender is
/// dropped), then stops as rule 3 says.
pub(super) async fn serve(listener: TcpListener, app: Router, stop: oneshot::Receiver<()>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let loopback_slots = Arc::new(Semaphore::new(LOOPBACK_CONNECTIONS));
    let (closing, _) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut stop => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            // The peer gave up before it was accepted: nothing to wait for.
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                continue;
            }
            Err(err) => {
                // Out of file descriptors, most likely: let some close,
                // unless the endpoint stops meanwhile.
                tracing::warn!(error = %err, "the admin endpoint could not accept a connection");
                tokio::select! {
                    biased;
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        // Rule 1: a loopback peer takes a slot kept for it first; past the
        // cap, the connection is closed as it is dropped here.
        let kept = on_loopback(peer.ip())
            .then(|| loopback_slots.clone().try_acquire_owned().ok())
            .flatten();
        let Some(slot) = kept.or_else(|| slots.clone().try_acquire_owned().ok()) else {
            tracing::debug!(%peer, "admin connection refused: every slot is taken");
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let mut closing = closing.subscribe();
        connections.spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_header_size(MAX_HEADER_BYTES);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                // Rule 3: the stop bounds what follows (it aborts this task).
                _ = closing.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
                // Rule 2: its lifetime is over; it may finish what it is
                // doing within `STOP_GRACE`.
                _ = tokio::time::sleep(CONNECTION_LIFETIME) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(STOP_GRACE, connection).await;
                }
            }
        });
    }
    drop(listener);
    // Rule 3.
    let _ = closing.send(true);
    let finished = tokio::time::timeout(STOP_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::debug!(
            left = connections.len(),
            "admin connections dropped unfinished at the stop"
        );
    }
    connections.abort_all();
}

#[cfg(test)]
mod tests {
    use super::on_loopback;

    /// Rule 1: the slots kept for loopback go to loopback peers only,
    /// however they arrive (an IPv4 probe on a dual-stack listener too).
    #[test]
    fn only_loopback_peers_take_the_kept_slots() {
        for (peer, kept) in [
            ("127.0.0.1", true),
            ("127.3.2.1", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("203.0.113.5", false),
            ("::ffff:203.0.113.5", false),
            ("2001:db8::1", false),
        ] {
            let ip: std::net::IpAddr = peer.parse().expect("an address");
            assert_eq!(on_loopback(ip), kept, "{peer}");
        }
    }
}
