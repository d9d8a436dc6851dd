//! The bridge benchmarks' figures, measured by alternation.
//!
//! On this shared VM the same criterion benchmark has measured 0.5 and 1.9
//! million requests per second in two runs minutes apart. This harness runs
//! the workloads of `bridge.rs` in short trials, alternating the two sides
//! of each comparison, and prints each side's median and the median of the
//! per-trial ratios with their range.
//!
//! ```text
//! cargo bench -p granary-gpu --bench bridge_alternating
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use granary_gpu::{BridgeConfig, GpuBridge, StopMode};
use granary_kernels::shipped::DOUBLE;
use granary_kernels::{Backend, CpuBackend};

mod common;
use common::{cpu_bridge, fan_out, request, runtime};

const TRIALS: usize = 15;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Alternates `a` and `b`, and prints both medians and the median of the
/// per-trial ratios with their range: `a / b` for figures where higher is
/// better (throughput), `b / a` for times. Either way, above 1× `a` wins.
fn compare(
    name: &str,
    unit: &str,
    higher_is_better: bool,
    a: &mut dyn FnMut() -> f64,
    b_name: &str,
    b: &mut dyn FnMut() -> f64,
) {
    a();
    b();
    let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for trial in 0..TRIALS {
        let (x, y) = if trial % 2 == 0 {
            let x = a();
            (x, b())
        } else {
            let y = b();
            (a(), y)
        };
        ours.push(x);
        theirs.push(y);
        ratios.push(if higher_is_better { x / y } else { y / x });
    }
    let (low, high) = (
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratios.iter().copied().fold(0.0, f64::max),
    );
    println!(
        "| {name} | {:.3} {unit} | {b_name} | {:.3} {unit} | {:.2}× ({low:.2}–{high:.2}) |",
        median(&mut ours),
        median(&mut theirs),
        median(&mut ratios),
    );
}

/// Requests per second, in millions, of `tasks` tasks sending `per_task`
/// requests each.
fn throughput(
    rt: &tokio::runtime::Runtime,
    bridge: &GpuBridge,
    tasks: usize,
    per_task: usize,
) -> f64 {
    let elapsed = rt.block_on(fan_out(bridge, tasks, per_task));
    (tasks * per_task) as f64 / elapsed.as_secs_f64() / 1e6
}

/// The median round trip, in microseconds, of `count` requests from one
/// task, one after another.
fn round_trip(rt: &tokio::runtime::Runtime, count: usize, call: impl AsyncFn() -> Vec<u8>) -> f64 {
    rt.block_on(async {
        let mut times = Vec::with_capacity(count);
        for _ in 0..count {
            let started = Instant::now();
            black_box(call().await);
            times.push(started.elapsed().as_secs_f64() * 1e6);
        }
        median(&mut times)
    })
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let rt = runtime();
    println!("| comparison | a | b | b's figure | a ÷ b, median (min–max) |");
    println!("|---|---|---|---|---|");

    let unbatched = cpu_bridge(1);
    rt.block_on(unbatched.execute("double", &request()))
        .unwrap();
    for micro_batch in [4, 16, 64] {
        let batched = cpu_bridge(micro_batch);
        rt.block_on(batched.execute("double", &request())).unwrap();
        compare(
            &format!("throughput, 256 tasks × 64, micro_batch {micro_batch}"),
            "M req/s",
            true,
            &mut || throughput(&rt, &batched, 256, 64),
            "micro_batch 1",
            &mut || throughput(&rt, &unbatched, 256, 64),
        );
        rt.block_on(batched.shutdown(StopMode::Drain));
    }
    rt.block_on(unbatched.shutdown(StopMode::Drain));

    // One request at a time from one task, with the default configuration.
    let batched = cpu_bridge(BridgeConfig::default().micro_batch);
    let payload = request();
    let cpu = Arc::new(CpuBackend::new());
    compare(
        "round trip p50, bridge.execute",
        "µs",
        false,
        &mut || {
            round_trip(&rt, 2000, async || {
                batched.execute("double", &payload).await.unwrap()
            })
        },
        "spawn_blocking per request",
        &mut || {
            round_trip(&rt, 2000, async || {
                let (cpu, payload) = (cpu.clone(), payload.clone());
                tokio::task::spawn_blocking(move || cpu.run_batch(0, &DOUBLE, &payload))
                    .await
                    .unwrap()
                    .unwrap()
            })
        },
    );
    rt.block_on(batched.shutdown(StopMode::Drain));
}
