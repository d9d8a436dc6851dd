#![allow(dead_code)] // each test binary uses what it needs

// Loopback ports for tests that must name a port before anything binds it:
// a gossip seed list, a node file for a child process.
//
// Rules:
// 1. Ports come from outside the kernel's ephemeral range (read from
//    `/proc/sys/net/ipv4/ip_local_port_range`; 32768-60999 where it cannot
//    be read): below it from 10000 when there are at least 1000 ports
//    there, else above it. So no `bind(0)` anywhere on the machine (an
//    attacker socket in
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

/// The lowest port a window starts at (rule 1).
const LOW: u32 = 10_000;

/// The window (start, exclusive end) outside the ephemeral range.
fn window() -> (u32, u32) {
    let range: Vec<u32> = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .map(|range| {
            range
                .split_whitespace()
                .filter_map(|port| port.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let (first, last) = match range[..] {
        [first, last] if first <= last => (first, last),
        _ => (32_768, 60_999),
    };
    if first >= LOW + 1_000 {
        (LOW, first)
    } else {
        // The range starts low: the ports above it. Where it reaches
        // 65535 there is no port outside it; the last one is used, and
        // rule 3's check is all that is left.
        (last.saturating_add(1).min(65_535), 65_536)
    }
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
    let (start, end) = window();
    let span = end - start;
    for _ in 0..span {
        let port = (start + next.fetch_add(1, Ordering::Relaxed) % span) as u16;
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        if TcpListener::bind(address).is_ok() && UdpSocket::bind(address).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {start}..{end}")
}

/// `count` distinct free loopback ports.
pub fn free_ports(count: usize) -> Vec<u16> {
    (0..count).map(|_| free_port()).collect()
}
