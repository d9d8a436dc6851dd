//! An idle bridge sleeps: its kernel and completion threads park between
//! their periodic wake-ups instead of spinning.

mod common;

use std::time::Duration;

use common::f32s;
use granary_gpu::{GpuBridge, StopMode};
use granary_kernels::shipped;

/// CPU time this process has used, from `/proc/self/stat` (user + system,
/// in clock ticks of 10 ms); `None` where that file is missing.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_bridge_uses_almost_no_cpu() {
    let Some(_) = cpu_ticks() else {
        eprintln!("skipped: no /proc/self/stat on this system");
        return;
    };
    let bridge = GpuBridge::builder().kernels(shipped::ALL).build().unwrap();
    // Launch two kernels, then leave them idle.
    bridge.execute("double", &f32s(&[1.0])).await.unwrap();
    bridge.execute("dot", &f32s(&[1.0, 2.0])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = cpu_ticks().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks().unwrap() - before;
    // Two seconds hold 200 ticks of one core. Four parked threads waking
    // every millisecond take a few on a quiet machine and 21-23 on this VM
    // when it is slow (measured at the code of fe02448 and later alike); a
    // single spinning thread would take about 200. A quarter of a core
    // separates the two with room on either side.
    eprintln!("idle bridge: {used} ticks of CPU in 2 s");
    assert!(used <= 50, "an idle bridge used {used} ticks in 2 s");
    bridge.shutdown(StopMode::Drain).await;
}
