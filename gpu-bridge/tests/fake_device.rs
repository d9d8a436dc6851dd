//! Bridge behaviour against a fake GPU (the CPU backend behind a device
//! of a chosen size, with gates): a batch that waits for a busy device, a
//! shutdown that meets a launch under way, a quota charge held while an
//! abandoned allocation runs. Apart from `fallback_and_metrics`, whose one
//! test must be alone with the process-wide metrics recorder.

mod common;

use std::sync::Arc;

use common::{f32s, from_f32s};
use granary_gpu::{BridgeConfig, ExecuteError, FallbackPolicy, GpuBridge, StopMode};
use granary_kernels::shipped;
use granary_kernels::{
    Backend, BackendError, BackendKind, DeviceInfo, DeviceKind, KernelConfig, KernelSpec,
    PersistentKernel,
};

/// A "GPU" of `memory` bytes that runs everything on the CPU backend. It
/// can hold its kernel launches or its resident allocations at a gate
/// (`entered` says one waits there), and records its kernels' stops.
struct FakeGpu {
    cpu: granary_kernels::CpuBackend,
    memory: u64,
    gate_launches: bool,
    gate_allocations: bool,
    entered: Arc<std::sync::atomic::AtomicBool>,
    gate: Arc<std::sync::atomic::AtomicBool>,
    stopped: Arc<std::sync::Mutex<Option<StopMode>>>,
}

const SMALL_GPU_BYTES: u64 = 1 << 20;

impl FakeGpu {
    fn new(memory: u64) -> FakeGpu {
        FakeGpu {
            cpu: granary_kernels::CpuBackend::new(),
            memory,
            gate_launches: false,
            gate_allocations: false,
            entered: Arc::default(),
            gate: Arc::default(),
            stopped: Arc::default(),
        }
    }

    /// Waits at the gate, if `gated`.
    fn pass(&self, gated: bool) {
        use std::sync::atomic::Ordering;
        if !gated {
            return;
        }
        self.entered.store(true, Ordering::SeqCst);
        while !self.gate.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// Opens a gate however a test ends: a failed assertion must not leave a
/// gated blocking call (and the runtime's shutdown) waiting forever.
struct Opens(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Opens {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A kernel that records how it was stopped.
struct Watched {
    inner: Box<dyn PersistentKernel>,
    stopped: Arc<std::sync::Mutex<Option<StopMode>>>,
}

impl PersistentKernel for Watched {
    fn spec(&self) -> &KernelSpec {
        self.inner.spec()
    }
    fn submitter(&self) -> Option<granary_kernels::Submitter> {
        self.inner.submitter()
    }
    fn try_complete(&mut self) -> Option<granary_kernels::Completion> {
        self.inner.try_complete()
    }
    fn complete(&mut self, timeout: std::time::Duration) -> Option<granary_kernels::Completion> {
        self.inner.complete(timeout)
    }
    fn heartbeat(&self) -> u64 {
        self.inner.heartbeat()
    }
    fn stop(
        &mut self,
        mode: granary_kernels::StopMode,
        timeout: std::time::Duration,
    ) -> granary_kernels::StopReport {
        *self.stopped.lock().unwrap() = Some(mode);
        self.inner.stop(mode, timeout)
    }
}

impl Backend for FakeGpu {
    fn kind(&self) -> BackendKind {
        BackendKind::OpenCl
    }
    fn devices(&self) -> Vec<DeviceInfo> {
        vec![DeviceInfo {
            backend: BackendKind::OpenCl,
            index: 0,
            name: "fake".into(),
            kind: DeviceKind::Gpu,
            compute_units: 8,
            total_memory: self.memory,
            free_memory: self.memory,
        }]
    }
    fn prepare(&self, device: usize, spec: &KernelSpec) -> Result<(), BackendError> {
        self.cpu.prepare(device, spec)
    }
    fn launch(
        &self,
        device: usize,
        spec: KernelSpec,
        config: &KernelConfig,
    ) -> Result<Box<dyn PersistentKernel>, BackendError> {
        self.pass(self.gate_launches);
        Ok(Box::new(Watched {
            inner: self.cpu.launch(device, spec, config)?,
            stopped: self.stopped.clone(),
        }))
    }
    fn run_batch(
        &self,
        device: usize,
        spec: &KernelSpec,
        input: &[u8],
    ) -> Result<Vec<u8>, BackendError> {
        self.cpu.run_batch(device, spec, input)
    }
    fn alloc_resident(
        &self,
        device: usize,
        len: usize,
    ) -> Result<Box<dyn granary_kernels::DeviceBuffer>, BackendError> {
        self.pass(self.gate_allocations);
        self.cpu.alloc_resident(device, len)
    }
}

fn small_gpu_bridge(fallback: FallbackPolicy) -> GpuBridge {
    GpuBridge::builder()
        .backend(Arc::new(FakeGpu::new(SMALL_GPU_BYTES)))
        .kernels(shipped::ALL)
        .config(BridgeConfig {
            fallback,
            overload_timeout: std::time::Duration::from_secs(10),
            ..BridgeConfig::default()
        })
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waits_for_a_busy_device_and_only_a_too_large_one_falls_back() {
    for fallback in [FallbackPolicy::Fail, FallbackPolicy::Cpu] {
        let bridge = small_gpu_bridge(fallback);
        let (gpu, ..) = bridge
            .devices()
            .into_iter()
            .find(|(_, info, _)| info.kind == DeviceKind::Gpu)
            .unwrap();
        // Nearly all of the device lent out for 50 ms: a batch of 32 KiB
        // (in and out) waits for it, on the device, not elsewhere.
        let held = bridge
            .broker()
            .reserve(gpu, SMALL_GPU_BYTES - 1024)
            .unwrap();
        let release = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            drop(held);
        });
        let input = vec![1.5f32; 4096];
        let answer = bridge.execute("double", &f32s(&input)).await;
        assert_eq!(
            from_f32s(&answer.unwrap()),
            vec![3.0f32; 4096],
            "{fallback:?}"
        );
        assert_eq!(bridge.fallbacks(), 0, "{fallback:?}");
        release.await.unwrap();
        // Memory kept (resident buffers, rings) does not come back when
        // batches end: with all but 16 KiB of the device kept, a batch of
        // 32 KiB is refused or falls back at once, not after the 10 s
        // overload timeout.
        let kept = bridge
            .broker()
            .reserve_kept(gpu, SMALL_GPU_BYTES - (16 << 10))
            .unwrap();
        let started = std::time::Instant::now();
        match (fallback, bridge.execute("double", &f32s(&input)).await) {
            (FallbackPolicy::Fail, Err(ExecuteError::NoDevice { .. })) => {}
            (FallbackPolicy::Cpu, Ok(answer)) => {
                assert_eq!(from_f32s(&answer), vec![3.0f32; 4096]);
                assert_eq!(bridge.fallbacks(), 1);
            }
            (fallback, other) => panic!("{fallback:?}: {other:?}"),
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        drop(kept);
        // 2 MiB in and out can never fit the device: refused or run on
        // the CPU (counted), as the policy says.
        let large = f32s(&vec![1.0f32; 1 << 18]);
        match (fallback, bridge.execute("double", &large).await) {
            (FallbackPolicy::Fail, Err(ExecuteError::NoDevice { .. })) => {}
            (FallbackPolicy::Cpu, Ok(answer)) => {
                assert_eq!(answer.len(), large.len());
                assert_eq!(bridge.fallbacks(), 2);
            }
            (fallback, other) => panic!("{fallback:?}: {other:?}"),
        }
        bridge.shutdown(StopMode::Abandon).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_stops_a_kernel_whose_first_launch_was_under_way() {
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    // The only caller gives up while the kernel's first launch runs; the
    // launch goes on, on its own task. A shutdown then must wait for it and
    // stop what it launched, not leave it running; one that gives up
    // waiting (past `stop_timeout`) leaves the launch to stop its kernel
    // itself once it ends, in the shutdown's mode.
    for (gives_up, mode) in [(false, StopMode::Abandon), (true, StopMode::Drain)] {
        let fake = FakeGpu {
            gate_launches: true,
            ..FakeGpu::new(1 << 30)
        };
        let (entered, gate, stopped) = (
            fake.entered.clone(),
            fake.gate.clone(),
            fake.stopped.clone(),
        );
        let _opens = Opens(gate.clone());
        // No fallback: the call must wait for this device's launch.
        let bridge = GpuBridge::builder()
            .config(BridgeConfig {
                fallback: FallbackPolicy::Fail,
                stop_timeout: if gives_up {
                    Duration::from_millis(50)
                } else {
                    Duration::from_secs(10)
                },
                ..BridgeConfig::default()
            })
            .backend(Arc::new(fake))
            .kernels(shipped::ALL)
            .build()
            .unwrap();
        let caller = tokio::spawn({
            let bridge = bridge.clone();
            async move { bridge.execute("double", &f32s(&[1.0])).await }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !entered.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the device was never asked"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        caller.abort();
        let shutting = tokio::spawn({
            let bridge = bridge.clone();
            async move { bridge.shutdown(mode).await }
        });
        if gives_up {
            shutting.await.unwrap();
            gate.store(true, Ordering::SeqCst);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while stopped.lock().unwrap().is_none() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the launched kernel runs on"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            gate.store(true, Ordering::SeqCst);
            shutting.await.unwrap();
        }
        assert_eq!(
            *stopped.lock().unwrap(),
            Some(mode),
            "stopped in the shutdown's mode"
        );
        assert!(matches!(
            bridge.execute("double", &f32s(&[1.0])).await,
            Err(ExecuteError::ShutDown)
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_stays_charged_until_an_abandoned_allocation_ends() {
    use std::sync::atomic::Ordering;
    // The caller stops waiting while the device allocates; the allocation
    // goes on, and the holder's charge must stay until it has ended and
    // its memory is freed, or the holder could have twice its quota live.
    let fake = FakeGpu {
        gate_allocations: true,
        ..FakeGpu::new(SMALL_GPU_BYTES)
    };
    let (entered, gate) = (fake.entered.clone(), fake.gate.clone());
    let _opens = Opens(gate.clone());
    let bridge = GpuBridge::builder()
        .backend(Arc::new(fake))
        .kernels(shipped::ALL)
        .build()
        .unwrap();
    let quota = granary_gpu::ResidentQuota::new(64 << 10);
    let need = granary_gpu::Requirements {
        backend: Some(BackendKind::OpenCl),
        ..granary_gpu::Requirements::default()
    };
    let allocating = tokio::spawn({
        let (bridge, quota) = (bridge.clone(), quota.clone());
        async move {
            bridge
                .allocate_resident_within(&quota, 64 << 10, &need)
                .await
                .map(drop)
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !entered.load(Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "the device was never asked"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    allocating.abort();
    let _ = allocating.await;
    assert_eq!(quota.held(), 64 << 10, "given back while still allocating");
    assert!(matches!(
        bridge.allocate_resident_within(&quota, 1, &need).await,
        Err(granary_gpu::ResidentError::OverQuota { .. })
    ));
    gate.store(true, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while quota.held() != 0 {
        assert!(std::time::Instant::now() < deadline, "never given back");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    bridge.shutdown(StopMode::Abandon).await;
}

/// Room for a kernel's rings (about 8 MiB at the default capacity).
const RINGS_GPU_BYTES: u64 = 64 << 20;

/// A bridge over a `FakeGpu` with room for a kernel's rings, built with
/// `config`, and all but 1 KiB of that device lent out as working memory
/// (held until the reservation drops): a first launch cannot reserve its
/// rings until it does.
fn busy_gpu(config: BridgeConfig) -> (GpuBridge, granary_gpu::Reservation) {
    let bridge = GpuBridge::builder()
        .backend(Arc::new(FakeGpu::new(RINGS_GPU_BYTES)))
        .kernels(shipped::ALL)
        .config(config)
        .build()
        .unwrap();
    let (gpu, ..) = bridge
        .devices()
        .into_iter()
        .find(|(_, info, _)| info.kind == DeviceKind::Gpu)
        .unwrap();
    let held = bridge
        .broker()
        .reserve(gpu, RINGS_GPU_BYTES - 1024)
        .unwrap();
    (bridge, held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_launch_waits_for_memory_batches_hold_and_a_busy_one_is_not_remembered() {
    use std::time::Duration;
    // No fallback: a small request must run on the device's persistent
    // kernel, whose first launch reserves its rings there. Working memory
    // lent out for longer than the overload timeout: the launch waits for
    // it, then these calls fail `Overloaded` (as a batch would), and the
    // device is not remembered as failed. Each waits about the timeout
    // from its own start, not once more for every caller whose launch ran
    // out of time before it (eight in a row would take 2.4 s).
    let (bridge, held) = busy_gpu(BridgeConfig {
        fallback: FallbackPolicy::Fail,
        overload_timeout: Duration::from_millis(300),
        ..BridgeConfig::default()
    });
    let started = std::time::Instant::now();
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let bridge = bridge.clone();
            tokio::spawn(async move { bridge.execute("double", &f32s(&[1.0])).await })
        })
        .collect();
    for caller in callers {
        match caller.await.unwrap() {
            Err(ExecuteError::Overloaded { kernel, waited }) => {
                assert_eq!(kernel, "double");
                assert!(waited >= Duration::from_millis(300), "{waited:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_millis(1500), "{waited:?}");
    // The memory comes back: the next request launches the kernel.
    drop(held);
    assert_eq!(
        from_f32s(&bridge.execute("double", &f32s(&[1.0])).await.unwrap()),
        vec![2.0f32]
    );
    bridge.shutdown(StopMode::Abandon).await;

    // Memory that comes back within the overload timeout is waited for:
    // the first request is answered by the device's kernel.
    let (bridge, held) = busy_gpu(BridgeConfig {
        fallback: FallbackPolicy::Fail,
        overload_timeout: Duration::from_secs(10),
        ..BridgeConfig::default()
    });
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(held);
    });
    assert_eq!(
        from_f32s(&bridge.execute("double", &f32s(&[4.0])).await.unwrap()),
        vec![8.0f32]
    );
    release.await.unwrap();
    assert_eq!(bridge.fallbacks(), 0);
    bridge.shutdown(StopMode::Abandon).await;

    // With a CPU fallback, a device still busy after the wait sends the
    // call to the CPU (counted), within the one wait.
    let (bridge, held) = busy_gpu(BridgeConfig {
        fallback: FallbackPolicy::Cpu,
        overload_timeout: Duration::from_millis(300),
        ..BridgeConfig::default()
    });
    let started = std::time::Instant::now();
    assert_eq!(
        from_f32s(&bridge.execute("double", &f32s(&[5.0])).await.unwrap()),
        vec![10.0f32]
    );
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_millis(1500), "{waited:?}");
    assert_eq!(bridge.fallbacks(), 1);
    drop(held);
    bridge.shutdown(StopMode::Abandon).await;
}

/// Waits until `count` first launches and batches wait for device memory
/// on `bridge`, for at most 10 s.
async fn waiting_for_memory(bridge: &GpuBridge, count: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while bridge.waiting_for_memory() != count {
        assert!(
            std::time::Instant::now() < deadline,
            "{} launches and batches wait for memory, not {count}",
            bridge.waiting_for_memory()
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_ends_a_first_launch_and_a_batch_that_wait_for_memory_unless_it_drains() {
    use std::time::Duration;
    // The launch (a one-float request) and the batch (32 KiB in and out)
    // would wait 10 s for memory; an abandoning shutdown does not wait for
    // them that long, and their callers are told the bridge shut down.
    let (bridge, held) = busy_gpu(BridgeConfig {
        fallback: FallbackPolicy::Fail,
        overload_timeout: Duration::from_secs(10),
        stop_timeout: Duration::from_secs(10),
        ..BridgeConfig::default()
    });
    let callers = [vec![1.0f32], vec![1.0f32; 4096]].map(|input| {
        let bridge = bridge.clone();
        tokio::spawn(async move { bridge.execute("double", &f32s(&input)).await })
    });
    waiting_for_memory(&bridge, 2).await;
    let started = std::time::Instant::now();
    bridge.shutdown(StopMode::Abandon).await;
    for caller in callers {
        let answer = tokio::time::timeout(Duration::from_secs(5), caller)
            .await
            .expect("a caller still waited for memory 5 s after the shutdown")
            .unwrap();
        assert!(matches!(answer, Err(ExecuteError::ShutDown)), "{answer:?}");
    }
    assert_eq!(bridge.waiting_for_memory(), 0);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop(held);

    // A draining shutdown answers every request already accepted: a batch
    // waiting for memory waits on, and runs once the memory comes back.
    let (bridge, held) = busy_gpu(BridgeConfig {
        fallback: FallbackPolicy::Fail,
        overload_timeout: Duration::from_secs(10),
        ..BridgeConfig::default()
    });
    let batch = tokio::spawn({
        let bridge = bridge.clone();
        async move { bridge.execute("double", &f32s(&[1.0f32; 4096])).await }
    });
    waiting_for_memory(&bridge, 1).await;
    bridge.shutdown(StopMode::Drain).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !batch.is_finished() && bridge.waiting_for_memory() == 1,
        "the batch ended at a draining shutdown"
    );
    drop(held);
    let answer = tokio::time::timeout(Duration::from_secs(5), batch)
        .await
        .expect("the batch still waited 5 s after its memory came back")
        .unwrap();
    assert_eq!(from_f32s(&answer.unwrap()), vec![2.0f32; 4096]);
    assert_eq!(bridge.waiting_for_memory(), 0);
}
