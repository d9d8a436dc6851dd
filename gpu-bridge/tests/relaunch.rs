//! A hung kernel whose relaunch fails at first: the bridge routes around
//! the device (to the CPU fallback) and retries the relaunch until the
//! device serves again.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{STALL, STALL_ON, f32s, from_f32s};
use granary_gpu::{BridgeConfig, ExecuteError, GpuBridge, StopMode};
use granary_kernels::{
    Backend, BackendError, BackendKind, CpuBackend, DeviceInfo, KernelConfig, KernelSpec,
    PersistentKernel,
};

/// A "device" backend running on the CPU whose second launch fails as if
/// its compute units were still held by the hung kernel.
struct SecondLaunchFails {
    cpu: CpuBackend,
    launches: AtomicU32,
}

impl Backend for SecondLaunchFails {
    fn kind(&self) -> BackendKind {
        BackendKind::OpenCl
    }
    fn devices(&self) -> Vec<DeviceInfo> {
        self.cpu
            .devices()
            .into_iter()
            .map(|info| DeviceInfo {
                backend: BackendKind::OpenCl,
                ..info
            })
            .collect()
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
        if self.launches.fetch_add(1, Ordering::SeqCst) == 1 {
            return Err(BackendError::NoCapacity(
                "still held by the hung kernel".into(),
            ));
        }
        self.cpu.launch(device, spec, config)
    }
    fn run_batch(
        &self,
        device: usize,
        spec: &KernelSpec,
        input: &[u8],
    ) -> Result<Vec<u8>, BackendError> {
        self.cpu.run_batch(device, spec, input)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_relaunch_routes_around_the_device_and_is_retried() {
    let flaky = Arc::new(SecondLaunchFails {
        cpu: CpuBackend::new(),
        launches: AtomicU32::new(0),
    });
    // STALL with a "device source", so the flaky backend serves it.
    let spec = KernelSpec {
        opencl_c: Some("/* served by the CPU behind the test backend */"),
        ..STALL
    };
    let bridge = GpuBridge::builder()
        .backend(flaky.clone())
        .kernel(spec)
        .config(BridgeConfig {
            hang_timeout: Duration::from_millis(300),
            ..BridgeConfig::default()
        })
        .build()
        .unwrap();
    let processed = |bridge: &GpuBridge| -> (u64, u64) {
        let devices = bridge.devices();
        (devices[0].2.processed, devices[1].2.processed)
    };
    let call = |value: f32| {
        let bridge = bridge.clone();
        async move { bridge.execute("stall", &f32s(&[value])).await }
    };
    assert_eq!(from_f32s(&call(1.0).await.unwrap()), [1.0]);
    assert_eq!(processed(&bridge), (1, 0));
    // The kernel hangs; its relaunch fails.
    assert!(matches!(
        call(STALL_ON).await,
        Err(ExecuteError::DeviceHung { .. })
    ));
    // The relaunch follows the failed requests' answers.
    launched(&flaky, 2).await;
    // Meanwhile requests go to the CPU fallback (unless the retry, every
    // 250 ms, has already brought the device back).
    assert_eq!(from_f32s(&call(2.0).await.unwrap()), [2.0]);
    let (device, fallback) = processed(&bridge);
    assert_eq!(device + fallback, 2);
    // The retry relaunches it, and the device serves again. The launch is
    // counted as it begins; the bridge routes to the device only once it
    // has returned, so a call made in between still goes to the fallback.
    launched(&flaky, 3).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut calls = 0;
    loop {
        assert_eq!(from_f32s(&call(3.0).await.unwrap()), [3.0]);
        calls += 1;
        if processed(&bridge).0 > device {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the device never served again"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(processed(&bridge), (device + 1, fallback + calls - 1));
    bridge.shutdown(StopMode::Abandon).await;
}

/// Waits until the backend has seen `count` launches; the bound only keeps
/// a broken retry from hanging the test.
async fn launched(flaky: &SecondLaunchFails, count: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while flaky.launches.load(Ordering::SeqCst) < count {
        assert!(
            std::time::Instant::now() < deadline,
            "launches: {}",
            flaky.launches.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(flaky.launches.load(Ordering::SeqCst), count);
}
