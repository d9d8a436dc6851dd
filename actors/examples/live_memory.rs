//! Where a live activation's memory goes: fills a new silo with tiny
//! grains (the `live_grains` bench's: an 8-byte counter, mailbox capacity
//! 16, 64 callers, one call each) three times in one process, and prints
//! for each fill, per live activation:
//!
//! - the resident set's growth (`/proc/self/statm`), the figure the
//!   `live_grains` bench reports;
//! - the allocator's counters (glibc's `mallinfo2`): bytes in use
//!   (`uordblks`), free in the arena (`fordblks`), and in blocks of their
//!   own (`hblkhd`: the directory's tables while they are that large);
//! - the blocks still allocated at the end of the fill, by requested size
//!   (a counting allocator around the system one), those that most
//!   activations hold.
//!
//! The first fill is a fresh process's; the later ones reuse what the
//! earlier fills freed (after `malloc_trim`), as the bench's repeated
//! fills do.
//!
//! ```text
//! cargo run --release -p granary-actors --example live_memory -- 1000000
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

use granary_actors::{Grain, GrainContext, GrainKey, Handler, Message, Silo, SiloConfig};

/// Live blocks by requested size (the last counts every size above it).
static LIVE: [AtomicI64; 4097] = [const { AtomicI64::new(0) }; 4097];

fn count(size: usize, by: i64) {
    LIVE[size.min(LIVE.len() - 1)].fetch_add(by, Relaxed);
}

/// The system allocator, counting live blocks by size.
struct Counting;

// SAFETY: every call goes to `System` with the caller's own arguments; the
// counting touches atomics only.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), 1);
        // SAFETY: forwarded as received (the caller's contract).
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(layout.size(), -1);
        // SAFETY: forwarded as received (the caller's contract).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(layout.size(), -1);
        count(new_size, 1);
        // SAFETY: forwarded as received (the caller's contract).
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// An 8-byte grain, as the bench's.
struct Counter(u64);

impl Grain for Counter {
    fn new(_: &GrainKey) -> Counter {
        Counter(0)
    }
}

/// Adds to the counter.
struct Add(u64);

impl Message for Add {
    type Reply = u64;
}

impl Handler<Add> for Counter {
    async fn handle(&mut self, Add(n): Add, _: &mut GrainContext) -> u64 {
        self.0 += n;
        self.0
    }
}

fn resident_bytes() -> i64 {
    // SAFETY: `sysconf` only reads a system value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64;
    let page = if page > 0 { page } else { 4096 };
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<i64>().ok())
        .map_or(0, |pages| pages * page)
}

/// glibc's counters: in use, free in the arena, in blocks of their own.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap() -> [i64; 3] {
    // SAFETY: `mallinfo2` only reads the allocator's counters.
    let info = unsafe { libc::mallinfo2() };
    [info.uordblks, info.fordblks, info.hblkhd].map(|n| n as i64)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap() -> [i64; 3] {
    [0; 3]
}

fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` releases free pages only; nothing points there.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn live_blocks() -> Vec<i64> {
    LIVE.iter().map(|n| n.load(Relaxed)).collect()
}

async fn fill(live: u64) -> Result<(), Box<dyn std::error::Error>> {
    trim();
    let (resident, heap_before, blocks) = (resident_bytes(), heap(), live_blocks());
    let silo = Silo::builder()
        .register::<Counter>("counter")
        .config(SiloConfig {
            mailbox_capacity: 16,
            idle_timeout: std::time::Duration::from_secs(3600),
            ..SiloConfig::default()
        })
        .build()?;
    let callers: Vec<_> = (0..64)
        .map(|caller| {
            let silo = silo.clone();
            tokio::spawn(async move {
                let mut key = caller;
                while key < live {
                    silo.grain::<Counter>(key).call(Add(1)).await?;
                    key += 64;
                }
                Ok::<_, granary_actors::CallError>(())
            })
        })
        .collect();
    for caller in callers {
        caller.await??;
    }
    let per = |bytes: i64| bytes as f64 / live as f64;
    let (grown, heap_after) = (resident_bytes() - resident, heap());
    let [used, free, own] = [0, 1, 2].map(|i| per(heap_after[i] - heap_before[i]));
    println!(
        "  resident {:.0} B; heap in use {used:.0} B, free in the arena {free:.0} B, \
         in blocks of their own {own:.0} B",
        per(grown)
    );
    let held: Vec<String> = blocks
        .iter()
        .zip(live_blocks())
        .enumerate()
        .map(|(size, (before, after))| (size, after - before))
        .filter(|(_, held)| *held as f64 >= live as f64 * 0.5)
        .map(|(size, held)| format!("{size} B × {:.2}", per(held)))
        .collect();
    println!("  blocks held, by requested size: {}", held.join(", "));
    silo.shutdown().await;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let live: u64 = match std::env::args().nth(1) {
        Some(live) => live.parse()?,
        None => 100_000,
    };
    if live == 0 {
        return Err("the number of live activations must be at least 1".into());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for round in 1..=3 {
        println!("fill {round} of {live} live activations, per activation:");
        runtime.block_on(fill(live))?;
    }
    Ok(())
}
