#![allow(dead_code)] // each test binary uses what it needs

// Loopback ports for tests that must name a port before anything binds it:
// a gossip seed list, a node file for a child process.
//
// Rules:
// 1. Ports come from below the kernel's ephemeral range (read from
//    `/proc/sys/net/ipv4/ip_local_port_range`, 32768 where it cannot be
//    read), so no `bind(0)` anywhere on the machine (an attacker socket in
//    a test, a client connection, a decoder socket) is handed a port that a
//    test picked and has not bound yet. Picking with `bind(0)` and dropping
//    the socket had exactly that race, and lost it in CI.
// 2. A process-wide counter, started at a random offset, walks that window,
//    so one test binary never gives the same port twice, however many tests
//    run in parallel.
// 3. A port is given only if, when picked, it is free on 127.0.0.1 for both
//    TCP and UDP; taken ones are skipped.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The first port of the window (rule 1).
const LOW: u32 = 10_000;

/// The end (exclusive) of the window: the ephemeral range's first port.
fn window_end() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .filter(|&first| first > LOW + 1_000)
        .unwrap_or(32_768)
}

/// A loopback port free for TCP and UDP, never given before in this
/// process.
pub fn free_port() -> u16 {
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let next = NEXT.get_or_init(|| {
        // The process id and the clock spread processes over the window;
        // where two still meet, rule 3 skips the port the other holds.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.subsec_nanos());
        AtomicU32::new(std::process::id().wrapping_mul(7_919) ^ nanos)
    });
    let end = window_end();
    let span = end - LOW;
    for _ in 0..span {
        let port = (LOW + next.fetch_add(1, Ordering::Relaxed) % span) as u16;
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        if TcpListener::bind(address).is_ok() && UdpSocket::bind(address).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{end}")
}

/// `count` distinct free loopback ports.
pub fn free_ports(count: usize) -> Vec<u16> {
    (0..count).map(|_| free_port()).collect()
}
