//! Resource exhaustion, as `cargo test --test exhaustion` runs it: each
//! attack gets a typed error, the process's resident memory (RSS, from
//! `/proc/self/status`) stays bounded, and the node keeps serving a grain
//! it already held.
//!
//! - a flood of first calls to 1,000,000 distinct grains under
//!   `activation_limit` (`CallError::Overloaded` past it);
//! - a mailbox flood: 20,000 callers at one slow grain
//!   (`CallError::Timeout` for those that cannot get in);
//! - an oversized message to another silo (`CallError::TooLarge`, never
//!   sent) and an oversized kernel input (`ExecuteError::TooLarge`);
//! - a storage provider that stops answering (`StorageError::Timeout`
//!   after `storage_timeout`, failing the calls that needed it).
//!
//! The tests run one at a time (`libtest-mimic`, one thread unless asked
//! otherwise), since each measures the RSS of the whole process; each
//! prints its figures.

#[path = "../build-support/test_ports.rs"]
mod test_ports;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use granary::actors::{
    ActivationError, CallError, ETag, Grain, GrainContext, GrainId, GrainKey, Handler, Message,
    Silo, SiloConfig, StorageError, StorageProvider, StoredState,
};
use libtest_mimic::{Arguments, Failed, Trial};

fn main() {
    let mut args = Arguments::from_args();
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    let trials = vec![
        trial(
            "a_million_first_calls_stay_under_the_activation_limit",
            a_million_first_calls_stay_under_the_activation_limit,
        ),
        trial(
            "a_mailbox_flood_times_out_callers_and_the_silo_serves_on",
            a_mailbox_flood_times_out_callers_and_the_silo_serves_on,
        ),
        trial(
            "oversized_messages_and_kernel_inputs_and_a_full_remote_node_are_refused",
            oversized_messages_and_kernel_inputs_and_a_full_remote_node_are_refused,
        ),
        trial(
            "storage_that_stops_answering_fails_calls_within_its_timeout",
            storage_that_stops_answering_fails_calls_within_its_timeout,
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}

/// A test whose async body panics to fail, on a two-worker runtime.
fn trial<F>(name: &'static str, body: fn() -> F) -> Trial
where
    F: std::future::Future<Output = ()> + 'static,
{
    Trial::test(name, move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|err| Failed::from(format!("a runtime: {err}")))?;
        runtime.block_on(body());
        Ok(())
    })
}

/// A field of `/proc/self/status` in bytes (Linux): `VmRSS`, the resident
/// memory now, or `VmHWM`, its peak since the last [`reset_peak`].
fn status(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status (Linux)");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

/// The resident memory now, after the peak is reset to it: what
/// [`peak`] is measured against.
fn reset_peak() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5")
        .expect("resetting the peak RSS (/proc/self/clear_refs, Linux 4.0 or later)");
    status("VmRSS")
}

/// The peak resident memory since [`reset_peak`].
fn peak() -> u64 {
    status("VmHWM")
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A grain with nothing in it but a count of its calls.
struct Cell(u64);

impl Grain for Cell {
    fn new(_: &GrainKey) -> Cell {
        Cell(0)
    }
}

struct Ping;
impl Message for Ping {
    type Reply = u64;
}
impl Handler<Ping> for Cell {
    async fn handle(&mut self, _: Ping, _: &mut GrainContext) -> u64 {
        self.0 += 1;
        self.0
    }
}

/// A turn that takes `0`.
struct Nap(Duration);
impl Message for Nap {
    type Reply = ();
}
impl Handler<Nap> for Cell {
    async fn handle(&mut self, Nap(d): Nap, _: &mut GrainContext) {
        tokio::time::sleep(d).await;
    }
}

/// What every attack is measured by: the memory the process held when it
/// began, and a grain the silo already held, called every 20 ms throughout
/// (it must answer each time, within `SLOWEST`).
struct Watch {
    before: u64,
    stop: Arc<AtomicBool>,
    probe: tokio::task::JoinHandle<Duration>,
}

/// The slowest the held grain may answer while an attack runs.
const SLOWEST: Duration = Duration::from_secs(5);

impl Watch {
    /// Activates the held grain, resets the peak RSS and starts calling.
    async fn start(silo: &Silo) -> Watch {
        let steady = silo.grain::<Cell>("steady");
        steady.call(Ping).await.expect("the first call");
        let before = reset_peak();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let probe = tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !stopped.load(Ordering::Relaxed) {
                let began = Instant::now();
                steady
                    .call(Ping)
                    .await
                    .expect("the grain the silo already held answers throughout");
                worst = worst.max(began.elapsed());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            worst
        });
        Watch {
            before,
            stop,
            probe,
        }
    }

    /// The peak RSS since `start`, and the held grain's slowest answer.
    async fn finish(self) -> (u64, Duration) {
        let peak = peak();
        self.stop.store(true, Ordering::Relaxed);
        let worst = self.probe.await.expect("the probe");
        assert!(worst < SLOWEST, "the held grain answered once in {worst:?}");
        (peak, worst)
    }
}

async fn a_million_first_calls_stay_under_the_activation_limit() {
    const GRAINS: u64 = 1_000_000;
    const LIMIT: u64 = 20_000;
    const CALLERS: u64 = 64;
    let silo = Silo::builder()
        .register::<Cell>("cell")
        .config(SiloConfig {
            activation_limit: Some(LIMIT),
            max_activations: Some(LIMIT / 2),
            ..SiloConfig::default()
        })
        .build()
        .expect("the silo builds");
    let watch = Watch::start(&silo).await;
    let before = watch.before;
    let stop = Arc::new(AtomicBool::new(false));
    // The most activations seen alive, sampled every millisecond.
    let most = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (silo, most, stop) = (silo.clone(), most.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                most.fetch_max(silo.live_activations(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let (ok, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let began = Instant::now();
    let callers: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let (silo, ok, refused) = (silo.clone(), ok.clone(), refused.clone());
            tokio::spawn(async move {
                for n in (caller..GRAINS).step_by(CALLERS as usize) {
                    match silo.grain::<Cell>(n).call(Ping).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(CallError::Overloaded { grain }) => {
                            assert_eq!(grain.key, GrainKey::U64(n));
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(other) => panic!("grain {n}: {other}"),
                    };
                    // A refusal answers without waiting for anything: a
                    // caller that looped on refusals without yielding would
                    // hold its worker thread, which requests arriving from
                    // the network, each a task of its own, do not.
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.expect("a caller");
    }
    let took = began.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (peak, worst) = watch.finish().await;
    sampler.await.expect("the sampler");
    let (ok, refused) = (ok.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
    let most = most.load(Ordering::Relaxed);
    println!(
        "exhaustion: {GRAINS} first calls in {took:.1?}: {ok} activated, {refused} refused \
         (Overloaded); at most {most} activations alive (limit {LIMIT}); RSS {:.0} MiB before, \
         peak {:.0} MiB (+{:.0} MiB); the held grain's slowest answer {worst:.1?}",
        mib(before),
        mib(peak),
        mib(peak.saturating_sub(before)),
    );
    assert_eq!(ok + refused, GRAINS);
    assert!(refused > 0, "the flood never reached the limit");
    assert!(
        most <= LIMIT,
        "{most} activations alive, over the limit {LIMIT}"
    );
    // Memory is that of the activations the limit lets live, and of the
    // refused calls in flight: bounded, whatever the flood's size.
    assert!(
        peak.saturating_sub(before) < 256 << 20,
        "RSS grew by {:.0} MiB",
        mib(peak.saturating_sub(before))
    );
    // Idle activations are shed below the limit; new grains start again.
    let shed = Instant::now();
    while silo.live_activations() >= LIMIT {
        assert!(shed.elapsed() < Duration::from_secs(10), "nothing was shed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    silo.grain::<Cell>(GRAINS + 1)
        .call(Ping)
        .await
        .expect("a new grain once the flood is over");
    silo.shutdown().await;
    drop(silo);
    // The peer, in the same run (after, since freed memory stays with the
    // process): a silo with no hard limit (shedding above
    // `max_activations` only, once a second) under 100,000 first calls,
    // to show what each activation costs without the bound.
    const PEER_GRAINS: u64 = 100_000;
    let peer = Silo::builder()
        .register::<Cell>("cell")
        .configure(|config| config.max_activations = Some(LIMIT / 2))
        .build()
        .expect("the peer silo builds");
    let peer_before = reset_peak();
    let peer_began = Instant::now();
    let floods: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let peer = peer.clone();
            tokio::spawn(async move {
                for n in (caller..PEER_GRAINS).step_by(CALLERS as usize) {
                    peer.grain::<Cell>(n)
                        .call(Ping)
                        .await
                        .expect("no limit to refuse it");
                }
            })
        })
        .collect();
    for flood in floods {
        flood.await.expect("a peer caller");
    }
    let (peer_took, peer_live) = (peer_began.elapsed(), peer.live_activations());
    let peer_grew = status("VmHWM").saturating_sub(peer_before);
    peer.shutdown().await;
    drop(peer);
    println!(
        "exhaustion: the peer, no activation_limit: {PEER_GRAINS} first calls in {peer_took:.1?}, \
         {peer_live} activations alive at the end, peak RSS +{:.0} MiB ({:.1} KiB an activation)",
        mib(peer_grew),
        peer_grew as f64 / 1024.0 / PEER_GRAINS as f64,
    );
}

async fn a_mailbox_flood_times_out_callers_and_the_silo_serves_on() {
    const CALLERS: usize = 20_000;
    let timeout = Duration::from_millis(500);
    let silo = Silo::builder()
        .register::<Cell>("cell")
        .config(SiloConfig {
            mailbox_capacity: 64,
            call_timeout: timeout,
            ..SiloConfig::default()
        })
        .build()
        .expect("the silo builds");
    let watch = Watch::start(&silo).await;
    let before = watch.before;
    let began = Instant::now();
    let victim = silo.grain::<Cell>("victim");
    let calls: Vec<_> = (0..CALLERS)
        .map(|_| {
            let victim = victim.clone();
            tokio::spawn(async move { victim.call(Nap(Duration::from_millis(5))).await })
        })
        .collect();
    let (mut ok, mut timed_out) = (0u64, 0u64);
    for call in calls {
        match call.await.expect("a caller") {
            Ok(()) => ok += 1,
            Err(CallError::Timeout { after, .. }) => {
                assert_eq!(after, timeout);
                timed_out += 1;
            }
            Err(other) => panic!("a flooding call: {other}"),
        }
    }
    let took = began.elapsed();
    let (peak, worst) = watch.finish().await;
    println!(
        "exhaustion: {CALLERS} callers at one grain (mailbox 64, turns of 5 ms, timeout \
         {timeout:?}): {ok} answered, {timed_out} timed out, all in {took:.1?}; RSS {:.0} MiB \
         before, peak {:.0} MiB (+{:.0} MiB); the held grain's slowest answer {worst:.1?}",
        mib(before),
        mib(peak),
        mib(peak.saturating_sub(before)),
    );
    assert!(
        timed_out > 0 && ok > 0,
        "{ok} answered, {timed_out} timed out"
    );
    // Every caller had its answer within about its timeout (a sweep tick
    // late at most), not after the whole queue drained (20,000 turns of
    // 5 ms: 100 s). The bound leaves room for a loaded machine.
    assert!(took < Duration::from_secs(30), "the flood took {took:?}");
    assert!(peak.saturating_sub(before) < 128 << 20);
    // The victim answers again once the flood has passed, after at most
    // the turns it had already taken in (rule 4 of the silo: twice its
    // mailbox capacity), whose callers gave up: a local caller's message
    // carries no deadline (rule 11), so those still run.
    let after = Instant::now();
    let answered = loop {
        match victim.call(Ping).await {
            Ok(_) => break after.elapsed(),
            Err(CallError::Timeout { .. }) => {
                assert!(
                    after.elapsed() < Duration::from_secs(10),
                    "the flooded grain did not answer again"
                );
            }
            Err(other) => panic!("the flooded grain: {other}"),
        }
    };
    println!("exhaustion: the flooded grain answered again {answered:.1?} after the flood");
    silo.shutdown().await;
}

async fn oversized_messages_and_kernel_inputs_and_a_full_remote_node_are_refused() {
    use granary::cluster_demo::{Counter, DemoGrains, Get};
    use granary::gpu::{ExecuteError, GpuBridge};
    use granary::kernels::shipped;
    use granary::node_file::{DevicesFile, LimitsFile, NodeFile, StorageFile, start_node};

    /// Each silo node's activation limit.
    const LIMIT: u64 = 4;

    // Three nodes in this process: a client and two silos that host
    // counters, each with room for `LIMIT` activations.
    // Ports no `bind(0)` can take before the nodes bind them
    // (`build-support/test_ports.rs`); free for TCP and UDP alike.
    let free = |_kind: &str| std::net::SocketAddr::from(([127, 0, 0, 1], test_ports::free_port()));
    let seed = free("udp");
    let file = |listen: String, gossip, none, limits| NodeFile {
        cluster: "exhaustion".into(),
        secret: "9a1c3e5f7b2d4f6a8c0e2a4c6e8a0c2e4a6c8e0a2c4e6a8c0e2a4c6e8a0c2e4a".into(),
        listen,
        gossip,
        seeds: vec![seed.to_string()],
        gossip_interval_ms: Some(100),
        phi_threshold: None,
        death_grace_ms: None,
        storage: StorageFile::Memory,
        devices: DevicesFile {
            none,
            ..DevicesFile::default()
        },
        etcd: None,
        admin: None,
        drain_grace_secs: None,
        limits,
        tls: None,
        rebalance: None,
    };
    let mut silos = Vec::new();
    for gossip in [seed, free("udp")] {
        let limits = LimitsFile {
            activation_limit: Some(LIMIT),
            ..LimitsFile::default()
        };
        silos.push(
            start_node(
                &file(free("tcp").to_string(), gossip, false, Some(limits)),
                &DemoGrains::default(),
            )
            .await
            .expect("a silo node starts"),
        );
    }
    let client = start_node(
        &file("127.0.0.1:0".into(), free("udp"), true, None),
        &DemoGrains::default(),
    )
    .await
    .expect("the client node starts");
    let joined = Instant::now();
    while client.members().len() < 3 || silos.iter().any(|silo| silo.members().len() < 3) {
        assert!(
            joined.elapsed() < Duration::from_secs(20),
            "the nodes did not join"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counter = client.grain::<Counter>(1u64);
    counter
        .call(Get)
        .await
        .expect("a counter answers")
        .expect("its count");

    // A named message of 64 MiB: more than a frame may hold. The router
    // owns one copy of what it routes; it is refused before a second, the
    // frame, is made.
    let payload = vec![7u8; 64 << 20];
    let before = reset_peak();
    let refused = client
        .silo()
        .call_named("counter", GrainKey::U64(1), "get", &payload)
        .await;
    let message_peak = peak().saturating_sub(before);
    drop(payload);
    assert!(
        matches!(
            &refused,
            Err(granary::actors::DispatchError::Call(CallError::TooLarge { len, max, .. }))
                if *len > 64 << 20 && *max < *len
        ),
        "{refused:?}"
    );
    counter
        .call(Get)
        .await
        .expect("still serving")
        .expect("its count");

    // A kernel input larger than the kernel's batch shape: refused before
    // anything is copied toward a device.
    let bridge = GpuBridge::builder()
        .kernels(shipped::ALL)
        .build()
        .expect("the CPU bridge");
    let input = vec![1u8; 256 << 20];
    let before = reset_peak();
    let began = Instant::now();
    let too_large = bridge.execute("double", &input).await;
    let took = began.elapsed();
    let input_peak = peak().saturating_sub(before);
    drop(input);
    println!(
        "exhaustion: a 64 MiB named message to another silo: {refused:?}, the peak RSS {:.1} MiB \
         above its caller's own buffer; a 256 MiB kernel input refused in {took:.1?} ({too_large:?}), \
         the peak {:.1} MiB above its caller's buffer",
        mib(message_peak),
        mib(input_peak),
    );
    assert!(
        matches!(too_large, Err(ExecuteError::TooLarge { len, .. }) if len == 256 << 20),
        "{too_large:?}"
    );
    // The message once (the router's own), the kernel input never.
    assert!(
        message_peak < (64 + 16) << 20,
        "{:.0} MiB",
        mib(message_peak)
    );
    assert!(input_peak < 16 << 20, "{:.0} MiB", mib(input_peak));
    let ok = bridge
        .execute("double", &shipped::f32_bytes(&[1.0, 2.0]))
        .await
        .expect("the bridge still serves");
    assert_eq!(ok.len(), 8);

    // Each silo's own limit, `limits` in its node file: a first call that
    // finds one silo full is placed on the other, and one that finds both
    // full is refused, typed, on the calling node.
    let mut key = 2u64;
    let refused = loop {
        match client.grain::<Counter>(key).call(Get).await {
            Ok(_) => {
                assert!(
                    key <= 2 * LIMIT,
                    "{key} counters activated past the silos' limits of {LIMIT} each"
                );
                key += 1;
            }
            Err(err) => break err,
        }
    };
    let held: Vec<u64> = silos
        .iter()
        .map(|silo| silo.silo().live_activations())
        .collect();
    println!(
        "exhaustion: counters held by two silos with an activation limit of {LIMIT} each: \
         {held:?}; counter {key}: {refused}"
    );
    assert_eq!(
        key,
        2 * LIMIT + 1,
        "a counter was refused while a silo had room"
    );
    assert_eq!(held, [LIMIT, LIMIT]);
    assert!(
        matches!(&refused, CallError::Overloaded { grain } if grain.key == GrainKey::U64(key)),
        "{refused:?}"
    );
    counter
        .call(Get)
        .await
        .expect("a held counter still serves")
        .expect("its count");
    let _ = client.leave().await;
    for silo in &silos {
        let _ = silo.leave().await;
    }
}

/// Storage whose every operation waits forever, counting those started.
#[derive(Default)]
struct Unanswering {
    started: AtomicU64,
}

impl StorageProvider for Unanswering {
    fn read<'a>(
        &'a self,
        _: &'a GrainId,
    ) -> BoxFuture<'a, Result<Option<StoredState>, StorageError>> {
        self.started.fetch_add(1, Ordering::Relaxed);
        Box::pin(std::future::pending())
    }

    fn write<'a>(
        &'a self,
        _: &'a GrainId,
        _: &'a [u8],
        _: Option<ETag>,
    ) -> BoxFuture<'a, Result<ETag, StorageError>> {
        self.started.fetch_add(1, Ordering::Relaxed);
        Box::pin(std::future::pending())
    }

    fn clear<'a>(
        &'a self,
        _: &'a GrainId,
        _: Option<ETag>,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        self.started.fetch_add(1, Ordering::Relaxed);
        Box::pin(std::future::pending())
    }
}

/// A grain that loads its state when it activates.
struct Stored;

impl Grain for Stored {
    fn new(_: &GrainKey) -> Stored {
        Stored
    }

    async fn on_activate(&mut self, ctx: &mut GrainContext) -> Result<(), ActivationError> {
        ctx.load_state::<u64>().await?;
        Ok(())
    }
}

impl Handler<Ping> for Stored {
    async fn handle(&mut self, _: Ping, _: &mut GrainContext) -> u64 {
        1
    }
}

async fn storage_that_stops_answering_fails_calls_within_its_timeout() {
    const GRAINS: u64 = 10_000;
    let storage_timeout = Duration::from_millis(300);
    let storage = Arc::new(Unanswering::default());
    let silo = Silo::builder()
        .register::<Cell>("cell")
        .register::<Stored>("stored")
        .storage(storage.clone())
        .config(SiloConfig {
            storage_timeout,
            ..SiloConfig::default()
        })
        .build()
        .expect("the silo builds");
    let watch = Watch::start(&silo).await;
    let before = watch.before;
    let began = Instant::now();
    let calls: Vec<_> = (0..GRAINS)
        .map(|n| {
            let grain = silo.grain::<Stored>(n);
            tokio::spawn(async move { grain.call(Ping).await })
        })
        .collect();
    let mut failed = 0u64;
    for call in calls {
        match call.await.expect("a caller") {
            Err(CallError::TurnFailed { .. }) => failed += 1,
            other => panic!("a call whose activation needs storage: {other:?}"),
        }
    }
    let took = began.elapsed();
    let (peak, worst) = watch.finish().await;
    let settle = Instant::now();
    while silo.live_activations() > 1 {
        assert!(
            settle.elapsed() < Duration::from_secs(5),
            "failed activations stayed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = silo.storage_stats();
    let read_failures = stats.ops.first().map_or(0, |read| read.failed);
    println!(
        "exhaustion: {GRAINS} activations on storage that never answers (timeout \
         {storage_timeout:?}): {failed} calls failed with TurnFailed, all in {took:.1?}; {} reads \
         started, {read_failures} counted failed; RSS {:.0} MiB before, peak {:.0} MiB \
         (+{:.0} MiB); the held grain's slowest answer {worst:.1?}",
        storage.started.load(Ordering::Relaxed),
        mib(before),
        mib(peak),
        mib(peak.saturating_sub(before)),
    );
    assert_eq!(failed, GRAINS);
    assert_eq!(read_failures, GRAINS);
    // Each waited its storage timeout, all at once: not one after another
    // (10,000 × 300 ms: 50 minutes). The bound leaves room for a loaded
    // machine.
    assert!(took < Duration::from_secs(15), "the calls took {took:?}");
    assert!(peak.saturating_sub(before) < 128 << 20);
    silo.shutdown().await;
}
