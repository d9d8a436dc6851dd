//! Scenarios every device backend's bridge suite runs (`bridge_opencl.rs`
//! on POCL, `bridge_wgpu.rs` on lavapipe): the same checks, given a way to
//! build a bridge on the backend and the backend's kind.

use std::time::Duration;

use granary_gpu::{BridgeConfig, ExecuteError, GpuBridge, StopMode};
use granary_kernels::{BackendKind, KernelConfig, shipped};

use super::{f32s, from_f32s};

/// Requests the device of `kind` answered.
pub fn processed_on(bridge: &GpuBridge, kind: BackendKind) -> u64 {
    bridge
        .devices()
        .into_iter()
        .filter(|(_, info, _)| info.backend == kind)
        .map(|(_, _, stats)| stats.processed)
        .sum()
}

/// 100 sequential `double` requests, all answered by the device.
pub async fn one_hundred_sequential_doubles(bridge: GpuBridge, kind: BackendKind) {
    for i in 0..100 {
        let input = [i as f32, 3.25, -7.0];
        let output = bridge.execute("double", &f32s(&input)).await.unwrap();
        assert_eq!(from_f32s(&output), input.map(|x| 2.0 * x), "request {i}");
    }
    assert_eq!(
        (
            processed_on(&bridge, kind),
            processed_on(&bridge, BackendKind::Cpu)
        ),
        (100, 0)
    );
    bridge.shutdown(StopMode::Drain).await;
}

/// A request for every shipped kernel on the ring path, then on the batch
/// path (each kernel over 1M-element operands, a 256² product). Every
/// product of two operands is exact in `f32` (halves and quarters of small
/// whole numbers), so a device that fuses multiply-adds answers exactly as
/// one that does not: the answers can be compared with the CPU's to the
/// bit on every backend. Shared with `bridge_cuda.rs`.
pub fn shipped_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let big: Vec<f32> = (0..2 << 20).map(|i| (i % 977) as f32 * 0.5).collect();
    let small_product = shipped::matmul_request(
        2,
        3,
        2,
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        &[7.0, 8.0, 9.0, 10.0, 11.0, 12.0],
    );
    let big_product =
        shipped::matmul_request(256, 256, 256, &vec![0.5; 256 * 256], &vec![0.25; 256 * 256]);
    vec![
        ("double", f32s(&[1.0, -2.5, 1e-7])),
        ("vector_add", f32s(&[1.0, 2.0, 3.0, 4.0])),
        ("saxpy", f32s(&[0.5, 1.0, 2.0, 10.0, 20.0])),
        ("dot", f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])),
        ("matmul", small_product.expect("a valid 2x3 by 3x2 product")),
        ("double", f32s(&big)),
        ("vector_add", f32s(&big)),
        (
            "saxpy",
            f32s(&[[2.0].as_slice(), &big[..1 << 20], &big[1 << 20..]].concat()),
        ),
        ("dot", f32s(&big)),
        ("matmul", big_product.expect("a valid 256² product")),
    ]
}

/// Every shipped kernel through the bridge on the device
/// ([`shipped_inputs`]), byte and typed calls, against the CPU-only bridge;
/// a bridge per kernel and input,
/// since one persistent kernel at a time fits on POCL's two cores.
pub async fn every_shipped_kernel_matches_the_cpu(
    bridge: impl Fn() -> GpuBridge,
    kind: BackendKind,
) {
    let cpu_only = GpuBridge::builder().kernels(shipped::ALL).build().unwrap();
    let inputs = shipped_inputs();
    for (kernel, input) in &inputs {
        let bridge = bridge();
        let on_device = bridge.execute(kernel, input).await.unwrap();
        let on_cpu = cpu_only.execute(kernel, input).await.unwrap();
        assert_eq!(on_device, on_cpu, "{kernel} on {} bytes", input.len());
        assert_eq!(
            processed_on(&bridge, BackendKind::Cpu),
            0,
            "{kernel} did not fall back"
        );
        assert_eq!(processed_on(&bridge, kind), 1);
        // The typed handle on the same device, its answer straight into
        // the caller's buffer.
        let typed = bridge.kernel_named::<f32, f32>(kernel).unwrap();
        let mut output = vec![0.0f32; on_cpu.len() / 4];
        let written = typed
            .call_into(&from_f32s(input), &mut output)
            .await
            .unwrap();
        assert_eq!(f32s(&output[..written]), on_cpu, "typed {kernel}");
        assert_eq!(processed_on(&bridge, kind), 2);
        if *kernel == "matmul" && input.len() < 100 {
            assert_eq!(from_f32s(&on_device), [58.0, 64.0, 139.0, 154.0]);
        }
        bridge.shutdown(StopMode::Drain).await;
    }
    cpu_only.shutdown(StopMode::Drain).await;
}

/// A device-side rejection comes back typed and the kernel keeps serving;
/// a shutdown with requests in flight drains them.
pub async fn bad_input_and_shutdown(bridge: impl Fn(BridgeConfig) -> GpuBridge) {
    let first = bridge(BridgeConfig {
        kernel: KernelConfig {
            capacity: 256,
            ..KernelConfig::default()
        },
        hang_timeout: Duration::from_secs(30),
        ..BridgeConfig::default()
    });
    let bad_dims = f32s(&[1.5, 1.0, 1.0, 2.0, 3.0]);
    assert!(matches!(
        first.execute("matmul", &bad_dims).await,
        Err(ExecuteError::Rejected {
            kernel: "matmul",
            ..
        })
    ));
    let good = shipped::matmul_request(1, 1, 1, &[3.0], &[4.0]).unwrap();
    assert_eq!(
        from_f32s(&first.execute("matmul", &good).await.unwrap()),
        [12.0]
    );
    first.shutdown(StopMode::Drain).await;
    // The kernel is warmed up first, so the requests reach it before the
    // shutdown begins.
    let second = bridge(BridgeConfig {
        hang_timeout: Duration::from_secs(30),
        ..BridgeConfig::default()
    });
    second.execute("double", &f32s(&[0.0])).await.unwrap();
    let calls: Vec<_> = (0..200)
        .map(|i| {
            let bridge = second.clone();
            tokio::spawn(async move { bridge.execute("double", &f32s(&[i as f32; 256])).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    second.shutdown(StopMode::Drain).await;
    let mut answered = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(output) => {
                assert_eq!(output.len(), 1024);
                answered += 1;
            }
            Err(ExecuteError::ShutDown) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(answered > 0);
    assert_eq!(
        second.execute("double", &f32s(&[1.0])).await,
        Err(ExecuteError::ShutDown)
    );
}
