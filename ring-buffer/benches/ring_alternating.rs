//! The ring benchmarks' ratios, measured by alternation.
//!
//! On a shared VM the speed of cross-core traffic drifts by several times
//! over minutes, so two criterion benchmarks run one after the other can see
//! different machines. This harness runs the same workloads as `ring.rs`,
//! alternating granary and its peer in short trials, and reports each side's
//! median time per message and the median of the per-trial ratios.
//!
//! ```text
//! cargo bench -p granary-ring --bench ring_alternating
//! ```

use std::time::Duration;

mod common;
use common::*;

const TRIALS: usize = 15;
const MESSAGES: u64 = 1 << 20;

fn per_message(elapsed: Duration, messages: u64) -> f64 {
    elapsed.as_nanos() as f64 / messages as f64
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn compare(
    name: &str,
    granary: &dyn Fn(u64) -> Duration,
    peer_name: &str,
    peer: &dyn Fn(u64) -> Duration,
) {
    // One untimed round of each warms caches and page tables.
    granary(MESSAGES / 8);
    peer(MESSAGES / 8);
    let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for trial in 0..TRIALS {
        // Alternate which side goes first, so drift favours neither.
        let (g, p) = if trial % 2 == 0 {
            let g = per_message(granary(MESSAGES), MESSAGES);
            (g, per_message(peer(MESSAGES), MESSAGES))
        } else {
            let p = per_message(peer(MESSAGES), MESSAGES);
            (per_message(granary(MESSAGES), MESSAGES), p)
        };
        ours.push(g);
        theirs.push(p);
        ratios.push(p / g);
    }
    println!(
        "| {name} | {:.1} ns | {peer_name} | {:.1} ns | {:.2}× ({:.2}–{:.2}) |",
        median(&mut ours),
        median(&mut theirs),
        median(&mut ratios),
        ratios[0],
        ratios[ratios.len() - 1],
    );
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        return; // `cargo test --benches` asks for the list; there is none.
    }
    println!("| benchmark | granary | peer | peer time | ratio, median (min–max) |");
    println!("|---|---|---|---|---|");
    compare("spsc_8B", &|n| granary_u64(n, 1), "rtrb u64", &|n| {
        rtrb_spsc(n, |i| i)
    });
    compare(
        "spsc_8B",
        &|n| granary_u64(n, 1),
        "rtrb 64-byte record",
        &|n| rtrb_spsc(n, record),
    );
    compare("spsc_8B", &|n| granary_u64(n, 1), "ArrayQueue u64", &|n| {
        array_queue(n, 1, |i| i)
    });
    compare(
        "mpsc_2p_8B",
        &|n| granary_u64(n, 2),
        "ArrayQueue u64",
        &|n| array_queue(n, 2, |i| i),
    );
    compare(
        "mpsc_2p_8B",
        &|n| granary_u64(n, 2),
        "ArrayQueue 64-byte record",
        &|n| array_queue(n, 2, record),
    );
    compare(
        "batch_32 reserve+commit",
        &|n| granary_groups_of_32(n, true),
        "32 single pushes",
        &|n| granary_groups_of_32(n, false),
    );
}
