//! The sample service end to end: start the binary, call it over HTTP;
//! stop it with a signal.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

/// The running service; killed when dropped.
struct Service {
    child: Child,
    address: String,
    /// Its standard output after the first line, until taken.
    output: Option<BufReader<std::process::ChildStdout>>,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Service {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpu-service"))
        .arg("127.0.0.1:0")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut output = BufReader::new(child.stdout.take().unwrap());
    output.read_line(&mut line).unwrap();
    let address = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();
    Service {
        child,
        address,
        output: Some(output),
    }
}

/// One HTTP/1.1 request; returns the status code and the body.
fn request(address: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Ctrl-C and SIGTERM stop the service gracefully: it says so, drains
/// the silo and the bridge, and exits with success.
#[cfg(unix)]
#[test]
fn a_signal_stops_the_service_after_draining_its_silo_and_bridge() {
    for signal in ["-INT", "-TERM"] {
        let mut service = start();
        let (status, body) = request(&service.address, "POST", "/double/carol", "[1]");
        assert_eq!((status, body.as_str()), (200, "[2.0]"));
        let sent = Command::new("kill")
            .args([signal, &service.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        // Read on a thread of its own, so that a service that never stops
        // fails the test (and is killed as `service` drops) rather than
        // hanging it.
        let mut output = service.output.take().unwrap();
        let (said, reading) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = output.read_to_string(&mut text);
            let _ = said.send(text);
        });
        let said = reading
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{signal}: the service did not stop in 60 s"));
        let status = service.child.wait().unwrap();
        assert!(status.success(), "{signal}: {status:?}, said {said:?}");
        assert!(
            said.contains("stopping: no new connections"),
            "{signal}: {said:?}"
        );
        assert!(
            said.contains("stopped: the silo and the GPU bridge drained"),
            "{signal}: {said:?}"
        );
    }
}

#[test]
fn the_service_answers_with_its_gpu_grain_over_http() {
    let service = start();
    let (status, body) = request(&service.address, "POST", "/double/alice", "[1, 2.5, -4]");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "[2.0,5.0,-8.0]");
    request(&service.address, "POST", "/double/alice", "[0]");
    let (status, body) = request(&service.address, "GET", "/stats/alice", "");
    assert_eq!((status, body.as_str()), (200, "2"));
    // Bad input: a clear 400 or 422, and the service keeps serving.
    let (status, _) = request(&service.address, "POST", "/double/alice", "not json");
    assert_eq!(status, 400);
    let (status, body) = request(&service.address, "POST", "/double/alice", "[]");
    assert_eq!(status, 422, "{body}");
    // Past f32's range, in or out: never a 200 with `null` for a number.
    let (status, body) = request(&service.address, "POST", "/double/alice", "[1e39]");
    assert_eq!(status, 400, "{body}");
    let (status, body) = request(&service.address, "POST", "/double/alice", "[3e38]");
    assert_eq!(status, 422, "{body}");
    let (status, _) = request(&service.address, "POST", "/double/bob", "[3]");
    assert_eq!(status, 200);
}
