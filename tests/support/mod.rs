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
    let bearer = token.map(|token| format!("Bearer {token}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|value| ("Authorization", value.as_str()))
        .collect();
    exchange(address, method, path, &headers, "").await
}

/// One HTTP/1.1 request with `headers` and `body` (sent as JSON when not
/// empty): the status code, the head, the body; `None` if nothing
/// answers. The connection closes after the answer.
pub async fn exchange(
    address: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String, String)> {
    // Bounded: a server that stops answering fails the test, not CI's
    // time limit.
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        exchange_unbounded(address, method, path, headers, body),
    )
    .await
    .ok()
    .flatten()
}

async fn exchange_unbounded(
    address: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String, String)> {
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    request.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    stream.write_all(request.as_bytes()).await.ok()?;
    // Read the head, then the body: `Content-Length` bytes if the answer
    // says how many (a server may keep the connection open regardless),
    // else up to the end of the stream.
    let mut answer = Vec::new();
    let mut chunk = [0u8; 8192];
    let (head, rest) = loop {
        if let Some(end) = answer.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&answer[..end]).into_owned();
            break (head, answer[end + 4..].to_vec());
        }
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        answer.extend_from_slice(&chunk[..read]);
    };
    let length = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    let mut body = rest;
    match length {
        Some(length) => {
            while body.len() < length {
                let read = stream.read(&mut chunk).await.ok()?;
                if read == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..read]);
            }
        }
        None => {
            stream.read_to_end(&mut body).await.ok()?;
        }
    }
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, head, String::from_utf8_lossy(&body).into_owned()))
}
