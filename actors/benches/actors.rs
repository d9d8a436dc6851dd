//! Granary's actor runtime against actix and ractor, same workloads, one
//! criterion run.
//!
//! ```text
//! cargo bench -p granary-actors --bench actors
//! ```
//!
//! Every system runs on one thread (a tokio current-thread runtime for
//! granary and ractor, an actix `System` for actix), so the comparison is
//! of the runtimes' own costs, not of scheduling across cores.
//!
//! - `ask/*`: one request-response at a time to a counter that adds and
//!   answers: granary `GrainRef::call`, actix `Addr::send`, ractor `call!`,
//!   and `tokio_channels`, the floor under any actor on tokio: a task that
//!   owns the counter, fed by an unbounded `mpsc` channel, answering on a
//!   `oneshot` (no supervision, no timeout, no identity: only the two
//!   channels and the two task wakes every ask needs).
//! - `ask_concurrent/*`: 100 callers, each with an actor of its own, make
//!   100 calls each, one at a time, all at once on the one thread: the
//!   throughput of request-response when callers are tasks (the runtime
//!   always has another caller to run, as in a busy service); the same
//!   four systems.
//! - `fan_in/*`: 1000 senders each send 100 one-way messages to one
//!   counter (granary `tell`, actix `do_send`, ractor `cast`), then one ask
//!   confirms all 100 000 arrived; throughput is messages per second.
//! - `activate/granary`: one call to each of 1000 new grains (activation
//!   plus first turn); throughput is activations per second.
//! - `live_grains/granary/{100000,1000000}`: 64 callers fill a new silo
//!   (mailbox capacity 16, no idle deactivation) with that many live tiny
//!   grains, one call each; throughput is the activation rate of the last
//!   tenth, with nine tenths already live. The resident memory and heap
//!   each live (idle) activation costs are printed beside it: their growth
//!   over the fill divided by the grains (the allocator's free memory is
//!   given back to the system before each fill, so that the growth is the
//!   fill's own), and the resident growth once the allocator's free memory
//!   is given back after the fill too.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

mod granary_side {
    use granary_actors::{Grain, GrainContext, GrainKey, Handler, Message, Silo, SiloConfig};

    pub struct Counter(u64);
    impl Grain for Counter {
        fn new(_: &GrainKey) -> Counter {
            Counter(0)
        }
    }
    pub struct Add(pub u64);
    impl Message for Add {
        type Reply = u64;
    }
    impl Handler<Add> for Counter {
        async fn handle(&mut self, Add(n): Add, _: &mut GrainContext) -> u64 {
            self.0 += n;
            self.0
        }
    }

    /// For the live-grains fill: small mailboxes, no idle deactivation
    /// while it runs.
    pub fn live_silo() -> Silo {
        Silo::builder()
            .register::<Counter>("counter")
            .config(SiloConfig {
                mailbox_capacity: 16,
                idle_timeout: std::time::Duration::from_secs(3600),
                ..SiloConfig::default()
            })
            .build()
            .expect("a silo")
    }

    pub fn silo() -> Silo {
        Silo::builder()
            .register::<Counter>("counter")
            .config(SiloConfig {
                mailbox_capacity: 4096,
                ..SiloConfig::default()
            })
            .build()
            .expect("a silo")
    }
}

/// The floor: a counter task on two tokio channels.
mod tokio_side {
    use tokio::sync::{mpsc, oneshot};

    pub type Counter = mpsc::UnboundedSender<(u64, oneshot::Sender<u64>)>;

    /// Spawns the counter's task on the current runtime.
    pub fn spawn() -> Counter {
        let (sender, mut receiver) = mpsc::unbounded_channel::<(u64, oneshot::Sender<u64>)>();
        tokio::spawn(async move {
            let mut total = 0u64;
            while let Some((n, reply)) = receiver.recv().await {
                total += n;
                let _ = reply.send(total);
            }
        });
        sender
    }

    /// One ask.
    pub async fn add(counter: &Counter, n: u64) -> u64 {
        let (reply, answer) = oneshot::channel();
        counter.send((n, reply)).expect("the counter runs");
        answer.await.expect("an answer")
    }
}

mod actix_side {
    use actix::{Actor, Context, Handler, Message};

    pub struct Counter(pub u64);
    impl Actor for Counter {
        type Context = Context<Self>;
    }
    pub struct Add(pub u64);
    impl Message for Add {
        type Result = u64;
    }
    impl Handler<Add> for Counter {
        type Result = u64;
        fn handle(&mut self, Add(n): Add, _: &mut Context<Self>) -> u64 {
            self.0 += n;
            self.0
        }
    }
}

mod ractor_side {
    use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

    pub struct Counter;
    pub enum Msg {
        Add(u64),
        AddAndRead(u64, RpcReplyPort<u64>),
    }
    impl Actor for Counter {
        type Msg = Msg;
        type State = u64;
        type Arguments = ();
        async fn pre_start(&self, _: ActorRef<Msg>, _: ()) -> Result<u64, ActorProcessingErr> {
            Ok(0)
        }
        async fn handle(
            &self,
            _: ActorRef<Msg>,
            message: Msg,
            state: &mut u64,
        ) -> Result<(), ActorProcessingErr> {
            match message {
                Msg::Add(n) => *state += n,
                Msg::AddAndRead(n, reply) => {
                    *state += n;
                    let _ = reply.send(*state);
                }
            }
            Ok(())
        }
    }
}

fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

fn ask(c: &mut Criterion) {
    let mut group = c.benchmark_group("ask");
    let rt = tokio_runtime();

    let silo = granary_side::silo();
    let counter = silo.grain::<granary_side::Counter>("bench");
    group.bench_function("granary", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(counter.call(granary_side::Add(1)).await.unwrap()) })
    });
    rt.block_on(silo.shutdown());

    let (actor, handle) = rt
        .block_on(ractor::Actor::spawn(None, ractor_side::Counter, ()))
        .expect("a ractor actor");
    group.bench_function("ractor", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(ractor::call!(actor, ractor_side::Msg::AddAndRead, 1).expect("an answer"))
        })
    });
    actor.stop(None);
    let _ = rt.block_on(handle);

    let counter = rt.block_on(async { tokio_side::spawn() });
    group.bench_function("tokio_channels", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(tokio_side::add(&counter, 1).await) })
    });
    drop(counter);

    group.bench_function("actix", |b| {
        b.iter_custom(|iterations| {
            actix_rt::System::new().block_on(async move {
                use actix::Actor;
                let addr = actix_side::Counter(0).start();
                let started = Instant::now();
                for _ in 0..iterations {
                    black_box(addr.send(actix_side::Add(1)).await.expect("an answer"));
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

const CALLERS: u64 = 100;
const CALLS: u64 = 100;

/// `iterations` times, one tokio task per counter running `calls` on it
/// (its `CALLS` asks), all at once on `rt`; returns the wall time.
fn callers_on_tokio<C, F, Fut>(
    rt: &tokio::runtime::Runtime,
    counters: &[C],
    iterations: u64,
    calls: F,
) -> Duration
where
    C: Clone + Send + 'static,
    F: Fn(C) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    rt.block_on(async {
        let started = Instant::now();
        for _ in 0..iterations {
            let callers: Vec<_> = counters
                .iter()
                .map(|counter| tokio::spawn(calls(counter.clone())))
                .collect();
            for caller in callers {
                caller.await.unwrap();
            }
        }
        started.elapsed()
    })
}

fn ask_concurrent(c: &mut Criterion) {
    let mut group = c.benchmark_group("ask_concurrent");
    group.throughput(Throughput::Elements(CALLERS * CALLS));
    group.sample_size(30);
    let rt = tokio_runtime();

    group.bench_function("granary", |b| {
        let silo = granary_side::silo();
        let counters: Vec<_> = (0..CALLERS)
            .map(|key| silo.grain::<granary_side::Counter>(key))
            .collect();
        b.iter_custom(|iterations| {
            callers_on_tokio(&rt, &counters, iterations, |counter| async move {
                for _ in 0..CALLS {
                    black_box(counter.call(granary_side::Add(1)).await.unwrap());
                }
            })
        });
        rt.block_on(silo.shutdown());
    });

    group.bench_function("ractor", |b| {
        let (actors, handles): (Vec<_>, Vec<_>) = (0..CALLERS)
            .map(|_| {
                rt.block_on(ractor::Actor::spawn(None, ractor_side::Counter, ()))
                    .expect("a ractor actor")
            })
            .unzip();
        b.iter_custom(|iterations| {
            callers_on_tokio(&rt, &actors, iterations, |actor| async move {
                for _ in 0..CALLS {
                    black_box(
                        ractor::call!(actor, ractor_side::Msg::AddAndRead, 1).expect("an answer"),
                    );
                }
            })
        });
        for (actor, handle) in actors.into_iter().zip(handles) {
            actor.stop(None);
            let _ = rt.block_on(handle);
        }
    });

    group.bench_function("tokio_channels", |b| {
        let counters: Vec<_> =
            rt.block_on(async { (0..CALLERS).map(|_| tokio_side::spawn()).collect() });
        b.iter_custom(|iterations| {
            callers_on_tokio(&rt, &counters, iterations, |counter| async move {
                for _ in 0..CALLS {
                    black_box(tokio_side::add(&counter, 1).await);
                }
            })
        });
    });

    group.bench_function("actix", |b| {
        b.iter_custom(|iterations| {
            actix_rt::System::new().block_on(async move {
                use actix::Actor;
                let counters: Vec<_> = (0..CALLERS)
                    .map(|_| actix_side::Counter(0).start())
                    .collect();
                let started = Instant::now();
                for _ in 0..iterations {
                    let callers: Vec<_> = counters
                        .iter()
                        .map(|counter| {
                            let counter = counter.clone();
                            actix_rt::spawn(async move {
                                for _ in 0..CALLS {
                                    black_box(
                                        counter.send(actix_side::Add(1)).await.expect("an answer"),
                                    );
                                }
                            })
                        })
                        .collect();
                    for caller in callers {
                        caller.await.unwrap();
                    }
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

const SENDERS: u64 = 1000;
const EACH: u64 = 100;

fn fan_in(c: &mut Criterion) {
    let mut group = c.benchmark_group("fan_in");
    group.throughput(Throughput::Elements(SENDERS * EACH));
    group.sample_size(20);
    let rt = tokio_runtime();

    group.bench_function("granary", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                total += rt.block_on(async {
                    let silo = granary_side::silo();
                    let sink = silo.grain::<granary_side::Counter>("sink");
                    sink.call(granary_side::Add(0)).await.unwrap();
                    let started = Instant::now();
                    let senders: Vec<_> = (0..SENDERS)
                        .map(|_| {
                            let sink = sink.clone();
                            tokio::spawn(async move {
                                for _ in 0..EACH {
                                    sink.tell(granary_side::Add(1)).await.unwrap();
                                }
                            })
                        })
                        .collect();
                    for sender in senders {
                        sender.await.unwrap();
                    }
                    let total = sink.call(granary_side::Add(0)).await.unwrap();
                    assert_eq!(total, SENDERS * EACH);
                    let elapsed = started.elapsed();
                    silo.shutdown().await;
                    elapsed
                });
            }
            total
        })
    });

    group.bench_function("ractor", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                total += rt.block_on(async {
                    let (sink, handle) = ractor::Actor::spawn(None, ractor_side::Counter, ())
                        .await
                        .expect("a ractor actor");
                    let started = Instant::now();
                    let senders: Vec<_> = (0..SENDERS)
                        .map(|_| {
                            let sink = sink.clone();
                            tokio::spawn(async move {
                                for _ in 0..EACH {
                                    sink.cast(ractor_side::Msg::Add(1)).expect("sent");
                                    // As granary's `tell` may, give way.
                                    tokio::task::yield_now().await;
                                }
                            })
                        })
                        .collect();
                    for sender in senders {
                        sender.await.unwrap();
                    }
                    let total =
                        ractor::call!(sink, ractor_side::Msg::AddAndRead, 0).expect("an answer");
                    assert_eq!(total, SENDERS * EACH);
                    let elapsed = started.elapsed();
                    sink.stop(None);
                    let _ = handle.await;
                    elapsed
                });
            }
            total
        })
    });

    group.bench_function("actix", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                total += actix_rt::System::new().block_on(async {
                    use actix::Actor;
                    let sink = actix_side::Counter(0).start();
                    let started = Instant::now();
                    let senders: Vec<_> = (0..SENDERS)
                        .map(|_| {
                            let sink = sink.clone();
                            actix_rt::spawn(async move {
                                for _ in 0..EACH {
                                    sink.do_send(actix_side::Add(1));
                                    actix_rt::task::yield_now().await;
                                }
                            })
                        })
                        .collect();
                    for sender in senders {
                        sender.await.unwrap();
                    }
                    let total = sink.send(actix_side::Add(0)).await.expect("an answer");
                    assert_eq!(total, SENDERS * EACH);
                    started.elapsed()
                });
            }
            total
        })
    });
    group.finish();
}

fn activate(c: &mut Criterion) {
    const GRAINS: u64 = 1000;
    let mut group = c.benchmark_group("activate");
    group.throughput(Throughput::Elements(GRAINS));
    let rt = tokio_runtime();
    group.bench_function("granary", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                total += rt.block_on(async {
                    let silo = granary_side::silo();
                    let started = Instant::now();
                    for key in 0..GRAINS {
                        let grain = silo.grain::<granary_side::Counter>(key);
                        black_box(grain.call(granary_side::Add(1)).await.unwrap());
                    }
                    let elapsed = started.elapsed();
                    silo.shutdown().await;
                    elapsed
                });
            }
            total
        })
    });
    group.finish();
}

/// The process's resident set, in bytes (Linux: `/proc/self/statm`).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Bytes the allocator has handed out and not had back (glibc).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap_in_use() -> Option<u64> {
    // SAFETY: `mallinfo2` only reads the allocator's counters.
    let info = unsafe { libc::mallinfo2() };
    Some((info.uordblks + info.hblkhd) as u64)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap_in_use() -> Option<u64> {
    None
}

/// Gives the allocator's free memory back to the system: before a fill, so
/// that its resident growth is its own, and after it, for the resident
/// figure without what the allocator could give back (glibc; elsewhere a
/// no-op, and that figure repeats the resident one).
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` releases free pages only; nothing points there.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What one fill measured.
struct Fill {
    /// The time the last tenth of the grains took to activate, with nine
    /// tenths already live.
    last_tenth: Duration,
    /// The growth of the resident set over the fill.
    rss: Option<u64>,
    /// The same once the allocator has given back what free memory it can
    /// (`malloc_trim`): whether the resident set beyond the heap is memory
    /// the allocator could return.
    rss_trimmed: Option<u64>,
    /// The growth of the heap in use over the fill.
    heap: Option<u64>,
}

/// Fills a new silo with `live` tiny grains from 64 callers, and shuts it
/// down.
fn fill(rt: &tokio::runtime::Runtime, live: u64) -> Fill {
    const CALLERS: u64 = 64;
    rt.block_on(async {
        trim_heap();
        let rss_before = resident_bytes();
        let heap_before = heap_in_use();
        let silo = granary_side::live_silo();
        let activate = |from: u64, to: u64| {
            let callers: Vec<_> = (0..CALLERS)
                .map(|caller| {
                    let silo = silo.clone();
                    tokio::spawn(async move {
                        let mut key = from + caller;
                        while key < to {
                            let grain = silo.grain::<granary_side::Counter>(key);
                            black_box(grain.call(granary_side::Add(1)).await.unwrap());
                            key += CALLERS;
                        }
                    })
                })
                .collect();
            async move {
                for caller in callers {
                    caller.await.unwrap();
                }
            }
        };
        let tenth = live / 10;
        activate(0, live - tenth).await;
        let started = Instant::now();
        activate(live - tenth, live).await;
        let last_tenth = started.elapsed();
        let grown = |now: Option<u64>, before: Option<u64>| {
            now.zip(before)
                .map(|(now, before)| now.saturating_sub(before))
        };
        let rss = grown(resident_bytes(), rss_before);
        let heap = grown(heap_in_use(), heap_before);
        trim_heap();
        let rss_trimmed = grown(resident_bytes(), rss_before);
        silo.shutdown().await;
        drop(silo);
        Fill {
            last_tenth,
            rss,
            rss_trimmed,
            heap,
        }
    })
}

/// The activation rate with 100k and with 1M tiny grains live (mailbox
/// capacity 16, 64 callers): the rate of the last tenth of a fill. The
/// resident memory and heap each live activation costs are printed beside
/// it.
fn live_grains(c: &mut Criterion) {
    let mut group = c.benchmark_group("live_grains");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(1));
    let rt = tokio_runtime();
    for live in [100_000u64, 1_000_000] {
        group.throughput(Throughput::Elements(live / 10));
        group.measurement_time(Duration::from_secs(1));
        let mut rss = Vec::new();
        let mut rss_trimmed = Vec::new();
        let mut heap = Vec::new();
        group.bench_function(format!("granary/{live}"), |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let fill = fill(&rt, live);
                    total += fill.last_tenth;
                    rss.extend(fill.rss);
                    rss_trimmed.extend(fill.rss_trimmed);
                    heap.extend(fill.heap);
                }
                total
            })
        });
        let per_activation = |values: &mut Vec<u64>| {
            values.sort_unstable();
            values
                .get(values.len() / 2)
                .map_or("unknown".to_string(), |v| {
                    format!("{:.0}", *v as f64 / live as f64)
                })
        };
        println!(
            "live_grains/granary/{live}: bytes per live activation (medians of {} fills): \
             resident {} ({} once the allocator's free memory is given back), heap {}",
            rss.len(),
            per_activation(&mut rss),
            per_activation(&mut rss_trimmed),
            per_activation(&mut heap),
        );
    }
    group.finish();
}

criterion_group!(benches, ask, ask_concurrent, fan_in, activate, live_grains);
criterion_main!(benches);
