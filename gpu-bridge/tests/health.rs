//! Kernel health (bridge rule 8): heartbeat age, probes, hangs and
//! relaunches, driven by the CPU backend's test hooks.

mod common;

use std::time::{Duration, Instant};

use common::{f32s, from_f32s};
use granary_gpu::{BridgeConfig, ExecuteError, GpuBridge, ProbeAnswer, StopMode};
use granary_kernels::{CpuBackend, shipped};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_kernel_fails_its_probe_until_it_is_relaunched() {
    let cpu = CpuBackend::new();
    let hooks = cpu.hooks().clone();
    let bridge = GpuBridge::builder()
        .cpu_backend(cpu)
        .kernel(shipped::DOUBLE)
        .config(BridgeConfig {
            // Long enough that a loaded machine does not trip it by accident.
            hang_timeout: Duration::from_secs(2),
            ..BridgeConfig::default()
        })
        .build()
        .expect("a bridge");
    // Nothing launched yet: nothing to list or probe.
    assert!(bridge.kernel_health().is_empty());
    assert!(bridge.probe(Duration::from_secs(1)).await.is_empty());
    assert_eq!(
        from_f32s(
            &bridge
                .execute("double", &f32s(&[1.5]))
                .await
                .expect("the first request launches the kernel and is answered")
        ),
        [3.0]
    );

    // Idle: the first request's slot is back (its permit returns with the
    // drained batch, just after its answer).
    let deadline = Instant::now() + Duration::from_secs(10);
    while bridge.kernel_health()[0].in_flight != 0 {
        assert!(
            Instant::now() < deadline,
            "the first request's slot stayed taken"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // A healthy kernel: beating, answering probes, which are not counted.
    let probes = bridge.probe(Duration::from_secs(5)).await;
    assert_eq!(probes.len(), 1);
    assert!(
        matches!(probes[0].answered, Ok(ProbeAnswer::Answered(_))),
        "an idle kernel is sent a probe: {probes:?}"
    );
    let health = &probes[0].health;
    assert_eq!(health.kernel, "double");
    assert!(
        health.since_heartbeat < Duration::from_secs(1),
        "{health:?}"
    );
    assert_eq!(
        (health.hangs, health.relaunches, health.failed),
        (0, 0, false)
    );
    // The probe's slot is given back just after its answer (the
    // completion thread returns a drained batch's permits at once).
    let deadline = Instant::now() + Duration::from_secs(10);
    while bridge.kernel_health()[0].in_flight != 0 {
        assert!(Instant::now() < deadline, "the probe's slot stayed taken");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(bridge.devices()[0].2.processed, 1, "a probe was counted");

    // The next request hangs, holding its kernel with no heartbeat.
    hooks.hang_after(0, Duration::from_secs(20));
    let hung = {
        let bridge = bridge.clone();
        tokio::spawn(async move { bridge.execute("double", &f32s(&[2.0])).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while bridge.kernel_health()[0].since_heartbeat < Duration::from_millis(500) {
        assert!(
            Instant::now() < deadline,
            "the kernel never stopped beating"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let during = bridge.probe(Duration::from_millis(300)).await;
    assert!(
        during[0].answered.is_err(),
        "a hung kernel answered: {during:?}"
    );
    let health = &during[0].health;
    assert!(health.in_flight >= 1, "{health:?}");
    assert!(health.ring_occupancy() > 0.0);

    // The bridge fails the hung request and relaunches the kernel.
    let answer = hung.await.expect("the request's task");
    assert!(
        matches!(answer, Err(ExecuteError::DeviceHung { .. })),
        "{answer:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = &bridge.kernel_health()[0];
        if health.relaunches == 1 {
            assert_eq!(health.hangs, 1);
            assert!(!health.failed);
            break;
        }
        assert!(Instant::now() < deadline, "never relaunched: {health:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = bridge.probe(Duration::from_secs(5)).await;
    assert!(after[0].answered.is_ok(), "{after:?}");
    assert!(after[0].health.since_heartbeat < Duration::from_secs(1));
    assert_eq!(
        from_f32s(
            &bridge
                .execute("double", &f32s(&[4.0]))
                .await
                .expect("the relaunched kernel answers")
        ),
        [8.0]
    );
    bridge.shutdown(StopMode::Abandon).await;
}
