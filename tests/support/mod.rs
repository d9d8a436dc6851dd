//! What the facade's integration tests share: one HTTP/1.1 GET, for the
//! admin endpoint.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 GET of `path` at `address`, with the bearer `token` if
/// any: the status code, the head, the body; `None` if nothing answers.
pub async fn get(
    address: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Option<(u16, String, String)> {
    request(address, "GET", path, token).await
}

/// One HTTP/1.1 request with `method` and no body, as [`get`].
pub async fn request(
    address: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Option<(u16, String, String)> {
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let authorization = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\n{authorization}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, head.to_string(), body.to_string()))
}
