//! `granary status`: the cluster view (`GET /cluster`) of a node's admin
//! endpoint, fetched and printed as a table.

use std::fmt;
use std::fmt::Write;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;

use super::ClusterView;

/// How long `granary status` waits for the endpoint.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the view could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StatusError {
    /// The URL is not `http://host:port` (with an optional path prefix).
    BadUrl(String),
    /// The endpoint could not be reached, or did not answer in time.
    Unreachable(String),
    /// The endpoint refused the token (401).
    Unauthorized,
    /// The token cannot travel in a header (it holds control characters
    /// or spaces).
    BadToken,
    /// The endpoint answered something else than a cluster view.
    BadAnswer(String),
}

impl fmt::Display for StatusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatusError::BadUrl(why) => write!(f, "bad admin URL: {why}"),
            StatusError::Unreachable(why) => write!(f, "the admin endpoint did not answer: {why}"),
            StatusError::Unauthorized => {
                f.write_str("the admin endpoint refused the request: pass its --token")
            }
            StatusError::BadToken => {
                f.write_str("the token must be visible ASCII: it travels in a header")
            }
            StatusError::BadAnswer(why) => write!(f, "unexpected answer: {why}"),
        }
    }
}

impl std::error::Error for StatusError {}

/// Fetches `GET {admin}/cluster`, with `token` as the bearer token.
pub async fn fetch_cluster(admin: &str, token: Option<&str>) -> Result<ClusterView, StatusError> {
    let uri: hyper::Uri = format!("{}/cluster", admin.trim_end_matches('/'))
        .parse()
        .map_err(|err: hyper::http::uri::InvalidUri| StatusError::BadUrl(err.to_string()))?;
    if uri.scheme_str() != Some("http") {
        return Err(StatusError::BadUrl(format!(
            "{admin}: only http:// (the endpoint serves plain HTTP, on loopback by default)"
        )));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| StatusError::BadUrl(format!("{admin}: no host")))?
        .clone();
    if authority.as_str().contains('@') {
        return Err(StatusError::BadUrl(format!(
            "{admin}: no user or password in the URL (the endpoint takes a bearer token)"
        )));
    }
    // `[::1]` is written with brackets; the socket wants the address.
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = authority.port_u16().unwrap_or(80);
    // The request line takes the path (origin form), not the whole URL.
    let path = uri
        .path_and_query()
        .map_or("/cluster", |path| path.as_str())
        .to_string();
    if let Some(token) = token {
        if token.is_empty() || !token.bytes().all(|byte| byte.is_ascii_graphic()) {
            return Err(StatusError::BadToken);
        }
    }
    let fetch = async {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|err| StatusError::Unreachable(format!("{authority}: {err}")))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|err| StatusError::Unreachable(err.to_string()))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request =
            hyper::Request::get(path.as_str()).header(hyper::header::HOST, authority.as_str());
        if let Some(token) = token {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|err| StatusError::BadUrl(err.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|err| StatusError::Unreachable(err.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| StatusError::Unreachable(err.to_string()))?
            .to_bytes();
        if status == hyper::StatusCode::UNAUTHORIZED {
            return Err(StatusError::Unauthorized);
        }
        if !status.is_success() {
            return Err(StatusError::BadAnswer(format!("HTTP {status}")));
        }
        serde_json::from_slice::<ClusterView>(&body)
            .map_err(|err| StatusError::BadAnswer(err.to_string()))
    };
    tokio::time::timeout(STATUS_TIMEOUT, fetch)
        .await
        .map_err(|_| StatusError::Unreachable(format!("no answer within {STATUS_TIMEOUT:?}")))?
}

/// The view as a table: one row per silo.
pub fn table(view: &ClusterView) -> String {
    let mib = |bytes: u64| bytes / (1 << 20);
    let rows: Vec<[String; 7]> = view
        .silos
        .iter()
        .map(|silo| {
            let devices = if silo.devices.is_empty() {
                "-".to_string()
            } else {
                silo.devices
                    .iter()
                    .map(|device| {
                        format!(
                            "{} {}/{} MiB free ({} reserved), queue {}",
                            device.backend,
                            mib(device.free_memory),
                            mib(device.total_memory),
                            mib(device.reserved_memory),
                            device.queue_depth
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            [
                format!("{}{}", silo.address, if silo.this { " (this)" } else { "" }),
                silo.incarnation.to_string(),
                silo.state.clone(),
                silo.age_seconds
                    .map_or_else(|| "-".to_string(), |age| format!("{age}s")),
                silo.activations.to_string(),
                if silo.grain_types.is_empty() {
                    "client".to_string()
                } else {
                    silo.grain_types
                        .iter()
                        .map(|grain_type| {
                            let live = silo
                                .activations_by_type
                                .get(grain_type)
                                .copied()
                                .unwrap_or_default();
                            format!("{grain_type}={live}")
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                },
                devices,
            ]
        })
        .collect();
    let header = [
        "SILO",
        "INCARNATION",
        "STATE",
        "AGE",
        "ACTIVATIONS",
        "BY GRAIN TYPE",
        "DEVICES",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[&str]| {
        for (n, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if n + 1 == cells.len() {
                let _ = writeln!(out, "{cell}");
            } else {
                let _ = write!(out, "{cell:<width$}  ");
            }
        }
    };
    line(&mut out, &header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&mut out, &cells);
    }
    let state = match (view.fenced, view.draining) {
        (true, _) => " (fenced after a stall)",
        (_, true) => " (draining)",
        _ => "",
    };
    let _ = writeln!(
        out,
        "{} silo(s), seen from {}{state}",
        view.silos.len(),
        view.silo.as_deref().unwrap_or("a lone silo")
    );
    out
}
