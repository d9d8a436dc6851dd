//! The bridge on the CUDA backend, on a real GPU: every shipped kernel
//! against the CPU on both paths, 100 sequential requests with their p50,
//! 8 concurrent callers × 100k requests with nothing lost, bad input, and
//! shutdown with requests in flight.
//!
//! Built without a GPU and run where one is (`scripts/gpu-check.sh`): the
//! binary decides when it runs, and where CUDA is unavailable every test is
//! reported as ignored with the reason printed, never as passed.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{f32s, from_f32s};
use granary_gpu::{
    BridgeConfig, ExecuteError, FallbackPolicy, GpuBridge, Output, Part, Requirements,
    ResidentError, StopMode,
};
use granary_kernels::cuda::CudaBackend;
use granary_kernels::{BackendKind, ElementType, KernelSpec, Shape, Status, shipped};
use libtest_mimic::{Arguments, Failed, Trial};

type Outcome = Result<(), Failed>;
type Test = fn(&Arc<CudaBackend>) -> Outcome;

fn fail(why: impl std::fmt::Display) -> Failed {
    Failed::from(why.to_string())
}

fn main() {
    let args = Arguments::from_args();
    if std::env::var_os("GRANARY_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("GRANARY_LOG"))
            .with_writer(std::io::stderr)
            .init();
    }
    let backend = match CudaBackend::discover() {
        Ok(backend) => Some(Arc::new(backend)),
        Err(err) => {
            eprintln!("bridge_cuda: SKIPPED: every CUDA test is ignored: {err}");
            None
        }
    };
    let tests: Vec<(&str, Test)> = vec![
        (
            "every_shipped_kernel_matches_the_cpu",
            every_kernel_matches_the_cpu,
        ),
        ("one_hundred_sequential_doubles", one_hundred_sequential),
        (
            "eight_callers_times_100k_lose_nothing",
            eight_callers_lose_nothing,
        ),
        (
            "bad_input_is_typed_and_the_bridge_keeps_serving",
            bad_input_is_typed,
        ),
        ("shutdown_with_requests_in_flight", shutdown_in_flight),
        (
            "resident_buffers_live_on_the_gpu_and_are_reserved",
            resident_buffers_on_the_gpu,
        ),
        (
            "a_memory_limit_caps_what_the_gpu_lends",
            a_memory_limit_caps_the_gpu,
        ),
        // Last: it leaves a block spinning on the GPU for good.
        (
            "a_hung_kernel_fails_its_requests_and_is_relaunched",
            a_hung_kernel_is_relaunched,
        ),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, test)| {
            let backend = backend.clone();
            let ignored = backend.is_none();
            Trial::test(name, move || match &backend {
                Some(backend) => test(backend),
                None => Ok(()),
            })
            .with_ignored_flag(ignored)
        })
        .collect();
    let mut args = args;
    args.test_threads = Some(1);
    libtest_mimic::run(&args, trials).exit();
}

/// A bridge whose only device is the GPU: no CPU fallback, so a request
/// the GPU did not answer fails the test.
fn bridge(backend: &Arc<CudaBackend>, config: BridgeConfig) -> GpuBridge {
    GpuBridge::builder()
        .backend(backend.clone())
        .kernels(shipped::ALL)
        .config(BridgeConfig {
            fallback: FallbackPolicy::Fail,
            ..config
        })
        .build()
        .expect("a bridge over the CUDA backend")
}

/// `execute` with a deadline: a request the GPU never answers fails the
/// test instead of hanging it.
async fn execute(bridge: &GpuBridge, kernel: &str, input: &[u8]) -> Result<Vec<u8>, Failed> {
    match tokio::time::timeout(Duration::from_secs(30), bridge.execute(kernel, input)).await {
        Ok(outcome) => outcome.map_err(fail),
        Err(_) => Err(fail(format!(
            "{kernel} on {} bytes: no answer in 30 s; devices: {:?}",
            input.len(),
            bridge.devices()
        ))),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(8)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Requests the GPU answered (the bridge's first device).
fn gpu_processed(bridge: &GpuBridge) -> u64 {
    let (_, info, stats) = bridge.devices().remove(0);
    assert_eq!(info.backend, BackendKind::Cuda);
    stats.processed
}

fn every_kernel_matches_the_cpu(backend: &Arc<CudaBackend>) -> Outcome {
    runtime().block_on(async {
        let gpu = bridge(backend, BridgeConfig::default());
        let cpu = GpuBridge::builder()
            .kernels(shipped::ALL)
            .build()
            .map_err(fail)?;
        let inputs = common::device::shipped_inputs();
        for (count, (kernel, input)) in inputs.iter().enumerate() {
            let on_gpu = execute(&gpu, kernel, input).await?;
            let on_cpu = cpu.execute(kernel, input).await.map_err(fail)?;
            if on_gpu != on_cpu {
                return Err(fail(format!(
                    "{kernel} on {} bytes differs from the CPU",
                    input.len()
                )));
            }
            if gpu_processed(&gpu) != count as u64 + 1 {
                return Err(fail(format!("{kernel} was not answered by the GPU")));
            }
        }
        gpu.shutdown(StopMode::Drain).await;
        cpu.shutdown(StopMode::Drain).await;
        Ok(())
    })
}

fn one_hundred_sequential(backend: &Arc<CudaBackend>) -> Outcome {
    runtime().block_on(async {
        let bridge = bridge(backend, BridgeConfig::default());
        // The first request builds and launches the kernel.
        bridge
            .execute("double", &f32s(&[0.0]))
            .await
            .map_err(fail)?;
        let mut times = Vec::with_capacity(100);
        for i in 0..100 {
            let input = [i as f32, 3.25, -7.0];
            let started = Instant::now();
            let output = bridge
                .execute("double", &f32s(&input))
                .await
                .map_err(fail)?;
            times.push(started.elapsed());
            if from_f32s(&output) != input.map(|x| 2.0 * x) {
                return Err(fail(format!("request {i} answered {output:?}")));
            }
        }
        times.sort();
        eprintln!(
            "  bridge, 100 sequential doubles on CUDA: p50 {:.2} us, p99 {:.2} us",
            times[50].as_secs_f64() * 1e6,
            times[99].as_secs_f64() * 1e6
        );
        bridge.shutdown(StopMode::Drain).await;
        Ok(())
    })
}

fn eight_callers_lose_nothing(backend: &Arc<CudaBackend>) -> Outcome {
    runtime().block_on(async {
        let bridge = bridge(backend, BridgeConfig::default());
        let started = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(120),
            common::double_from_concurrent_callers(&bridge, 8, 100_000),
        )
        .await
        .map_err(|_| {
            fail(format!(
                "not done in 120 s; devices: {:?}",
                bridge.devices()
            ))
        })?;
        let elapsed = started.elapsed();
        let processed = gpu_processed(&bridge);
        eprintln!(
            "  bridge, 8 callers x 100k doubles on CUDA: {processed} answered in {:.2} s",
            elapsed.as_secs_f64()
        );
        if processed != 800_000 {
            return Err(fail(format!("the GPU answered {processed} of 800000")));
        }
        bridge.shutdown(StopMode::Drain).await;
        Ok(())
    })
}

fn bad_input_is_typed(backend: &Arc<CudaBackend>) -> Outcome {
    runtime().block_on(async {
        let bridge = bridge(backend, BridgeConfig::default());
        // Rejected by the kernel on the device (matmul's dimensions).
        let bad_dims = f32s(&[1.5, 1.0, 1.0, 2.0, 3.0]);
        match tokio::time::timeout(Duration::from_secs(30), bridge.execute("matmul", &bad_dims))
            .await
            .map_err(|_| fail("no answer in 30 s"))?
        {
            Err(ExecuteError::Rejected {
                kernel: "matmul", ..
            }) => {}
            other => return Err(fail(format!("bad dimensions gave {other:?}"))),
        }
        // Wrong shape, unknown kernel: refused before any device.
        if !matches!(
            bridge.execute("double", &[1, 2, 3]).await,
            Err(ExecuteError::WrongShape { .. })
        ) {
            return Err(fail("a 3-byte double was not refused"));
        }
        if !matches!(
            bridge.execute("nope", &[]).await,
            Err(ExecuteError::UnknownKernel(_))
        ) {
            return Err(fail("an unknown kernel was not refused"));
        }
        let good = shipped::matmul_request(1, 1, 1, &[3.0], &[4.0])
            .ok_or_else(|| fail("a matmul request"))?;
        let answer = execute(&bridge, "matmul", &good).await?;
        if from_f32s(&answer) != [12.0] {
            return Err(fail("the kernel stopped serving after bad input"));
        }
        bridge.shutdown(StopMode::Drain).await;
        Ok(())
    })
}

fn shutdown_in_flight(backend: &Arc<CudaBackend>) -> Outcome {
    runtime().block_on(async {
        for mode in [StopMode::Drain, StopMode::Abandon] {
            let bridge = bridge(backend, BridgeConfig::default());
            execute(&bridge, "double", &f32s(&[0.0])).await?;
            let calls: Vec<_> = (0..20_000)
                .map(|i| {
                    let bridge = bridge.clone();
                    tokio::spawn(async move { bridge.execute("double", &f32s(&[i as f32; 256])).await })
                })
                .collect();
            // A few scheduler turns: some requests are in the ring, some
            // answered, some not yet submitted when the shutdown begins.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            let started = Instant::now();
            tokio::time::timeout(Duration::from_secs(60), bridge.shutdown(mode))
                .await
                .map_err(|_| fail(format!("shutdown {mode:?} took over 60 s")))?;
            let took = started.elapsed();
            let (mut answered, mut refused) = (0, 0);
            for (i, call) in calls.into_iter().enumerate() {
                match call.await.map_err(fail)? {
                    Ok(output) if from_f32s(&output) == vec![2.0 * i as f32; 256] => answered += 1,
                    Ok(_) => return Err(fail(format!("request {i} answered wrongly"))),
                    Err(ExecuteError::ShutDown) => refused += 1,
                    Err(other) => return Err(fail(format!("request {i}: {other:?}"))),
                }
            }
            eprintln!("  shutdown {mode:?} in {took:?}: {answered} answered, {refused} refused with ShutDown");
            if bridge.execute("double", &f32s(&[1.0])).await != Err(ExecuteError::ShutDown) {
                return Err(fail("a request after shutdown was not refused"));
            }
        }
        Ok(())
    })
}

/// Echoes one `f32`, except 42, on which the thread spins for good: a
/// device kernel that stops making progress, which no host code can stop.
const STALL: KernelSpec = KernelSpec {
    id: "stall",
    version: 1,
    request: Shape::exactly(ElementType::F32, 1),
    response: Shape::exactly(ElementType::F32, 1),
    batch_request: Shape::exactly(ElementType::F32, 1),
    output_len: |_| Ok(4),
    opencl_c: None,
    cuda_c: Some(
        r#"
__device__ unsigned int granary_process(const unsigned char* request, unsigned int request_len,
                                        unsigned char* response, unsigned int response_max,
                                        unsigned int* response_len) {
    if (request_len != 4u || response_max < 4u) return GRANARY_STATUS_BAD_LENGTH;
    volatile const float* watched = (volatile const float*)request;
    while (*watched == 42.0f) __nanosleep(1000);
    *(float*)response = *watched;
    *response_len = 4u;
    return GRANARY_STATUS_OK;
}
extern "C" __global__ void granary_batch(const unsigned char* request, unsigned int request_len,
                                         unsigned char* response, unsigned int response_len) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *(float*)response = *(const float*)request;
}
"#,
    ),
    wgsl: None,
    cpu: Some(echo),
};

fn echo(request: &[u8], response: &mut [u8]) -> Result<usize, Status> {
    response[..4].copy_from_slice(&request[..4]);
    Ok(4)
}

fn a_hung_kernel_is_relaunched(backend: &Arc<CudaBackend>) -> Outcome {
    runtime().block_on(async {
        let bridge = GpuBridge::builder()
            .backend(backend.clone())
            .kernel(STALL)
            .config(BridgeConfig {
                fallback: FallbackPolicy::Fail,
                hang_timeout: Duration::from_secs(1),
                ..BridgeConfig::default()
            })
            .build()
            .map_err(fail)?;
        if from_f32s(&execute(&bridge, "stall", &f32s(&[1.0])).await?) != [1.0] {
            return Err(fail("the stall kernel does not echo"));
        }
        let stalled = {
            let bridge = bridge.clone();
            tokio::spawn(async move { bridge.execute("stall", &f32s(&[42.0])).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let queued = {
            let bridge = bridge.clone();
            tokio::spawn(async move { bridge.execute("stall", &f32s(&[2.0])).await })
        };
        let started = Instant::now();
        for call in [stalled, queued] {
            match tokio::time::timeout(Duration::from_secs(30), call).await {
                Ok(Ok(Err(ExecuteError::DeviceHung {
                    kernel: "stall", ..
                }))) => {}
                other => return Err(fail(format!("expected DeviceHung, got {other:?}"))),
            }
        }
        let detected = started.elapsed();
        // The relaunched kernel, on another SM, answers; the hung block
        // keeps its SM and its memory (leaked, not freed under it).
        let answer = execute(&bridge, "stall", &f32s(&[3.0])).await?;
        eprintln!("  hang detected in {detected:?}; the relaunched kernel answered");
        if from_f32s(&answer) != [3.0] {
            return Err(fail(format!("after the relaunch: {answer:?}")));
        }
        tokio::time::timeout(Duration::from_secs(60), bridge.shutdown(StopMode::Drain))
            .await
            .map_err(|_| fail("shutdown took over 60 s"))?;
        Ok(())
    })
}

/// Bytes the broker holds reserved on the GPU (the bridge's first device).
fn gpu_reserved(bridge: &GpuBridge) -> u64 {
    bridge.devices().remove(0).2.reserved
}

/// Waits (briefly) for the GPU's reservations to come down to `bytes`: a
/// buffer's memory is freed, and its bytes released, by a blocking job.
async fn gpu_settles_at(bridge: &GpuBridge, bytes: u64) -> Outcome {
    for _ in 0..400 {
        if gpu_reserved(bridge) == bytes {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err(fail(format!(
        "the GPU still has {} bytes reserved, expected {bytes}",
        gpu_reserved(bridge)
    )))
}

/// A resident grain's life on the GPU: a 32 MiB vector allocated on the
/// device and reserved in the broker, updated in place by SAXPY rounds
/// where only the scalar crosses the bus, read back and checked against
/// the CPU, a matmul over two resident operands, a buffer of another
/// device refused, and every byte released after the buffers are dropped.
fn resident_buffers_on_the_gpu(backend: &Arc<CudaBackend>) -> Outcome {
    runtime().block_on(async {
        let gpu = bridge(backend, BridgeConfig::default());
        let elements = 8usize << 20;
        let start: Vec<f32> = (0..elements).map(|i| (i % 1000) as f32 * 0.125).collect();
        let vector = gpu
            .allocate_resident(elements * 4, &Requirements::default())
            .await
            .map_err(fail)?;
        if vector.backend() != BackendKind::Cuda {
            return Err(fail(format!("allocated on {:?}", vector.backend())));
        }
        if gpu_reserved(&gpu) != (elements * 4) as u64 {
            return Err(fail("the vector is not reserved in the broker"));
        }
        vector.write(0, &f32s(&start)).await.map_err(fail)?;
        let mut expected = start.clone();
        for a in [0.5f32, -1.25, 3.0] {
            let scalar = f32s(&[a]);
            let parts = [
                Part::Host(&scalar),
                Part::Resident(&vector),
                Part::Resident(&vector),
            ];
            let returned = gpu
                .execute_resident("saxpy", &parts, Output::Into(&vector))
                .await
                .map_err(fail)?;
            if !returned.is_empty() {
                return Err(fail("an update into a buffer returned bytes"));
            }
            for y in &mut expected {
                *y = a * *y + *y;
            }
        }
        let got = from_f32s(&vector.read(0, elements * 4).await.map_err(fail)?);
        if got != expected {
            let first = got.iter().zip(&expected).position(|(g, e)| g != e);
            return Err(fail(format!(
                "SAXPY rounds differ from the CPU at {first:?}"
            )));
        }

        let (n, k, m) = (128usize, 96usize, 64usize);
        let a: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let b: Vec<f32> = (0..k * m).map(|i| (i % 5) as f32 * 0.5).collect();
        let a_buffer = gpu
            .allocate_resident(a.len() * 4, &Requirements::default())
            .await
            .map_err(fail)?;
        let b_buffer = gpu
            .allocate_resident(b.len() * 4, &Requirements::default())
            .await
            .map_err(fail)?;
        a_buffer.write(0, &f32s(&a)).await.map_err(fail)?;
        b_buffer.write(0, &f32s(&b)).await.map_err(fail)?;
        let dims = f32s(&[n as f32, k as f32, m as f32]);
        let product = gpu
            .execute_resident(
                "matmul",
                &[
                    Part::Host(&dims),
                    Part::Resident(&a_buffer),
                    Part::Resident(&b_buffer),
                ],
                Output::Host,
            )
            .await
            .map_err(fail)?;
        let whole =
            shipped::matmul_request(n, k, m, &a, &b).ok_or_else(|| fail("a matmul request"))?;
        let cpu = GpuBridge::builder()
            .kernels(shipped::ALL)
            .build()
            .map_err(fail)?;
        let expected = cpu.execute("matmul", &whole).await.map_err(fail)?;
        if product != expected {
            return Err(fail("matmul over resident operands differs from the CPU"));
        }

        // A buffer from another bridge's device does not mix with these.
        let elsewhere = cpu
            .allocate_resident(4, &Requirements::default())
            .await
            .map_err(fail)?;
        let scalar = f32s(&[1.0]);
        match gpu
            .execute_resident(
                "saxpy",
                &[
                    Part::Host(&scalar),
                    Part::Resident(&elsewhere),
                    Part::Resident(&vector),
                ],
                Output::Host,
            )
            .await
        {
            Err(ExecuteError::WrongBuffer { .. }) => {}
            other => return Err(fail(format!("a foreign buffer: {other:?}"))),
        }
        drop((vector, a_buffer, b_buffer, elsewhere));
        gpu_settles_at(&gpu, 0).await?;
        gpu.shutdown(StopMode::Drain).await;
        cpu.shutdown(StopMode::Drain).await;
        Ok(())
    })
}

/// `device_memory_limit` caps the GPU's share: a silo sharing the GPU
/// lends no more than its share, and a request beyond it is refused with
/// a typed error while the bridge keeps serving.
fn a_memory_limit_caps_the_gpu(backend: &Arc<CudaBackend>) -> Outcome {
    runtime().block_on(async {
        let share = 64u64 << 20;
        let gpu = GpuBridge::builder()
            .backend(backend.clone())
            .kernels(shipped::ALL)
            .device_memory_limit(share)
            .config(BridgeConfig {
                fallback: FallbackPolicy::Fail,
                ..BridgeConfig::default()
            })
            .build()
            .map_err(fail)?;
        let (_, info, stats) = gpu.devices().remove(0);
        if info.total_memory != share || stats.available != share {
            return Err(fail(format!(
                "the GPU reports {} total, {} available; the share is {share}",
                info.total_memory, stats.available
            )));
        }
        let gpu_only = Requirements {
            backend: Some(BackendKind::Cuda),
            ..Requirements::default()
        };
        match gpu.allocate_resident(share as usize + 1, &gpu_only).await {
            Err(ResidentError::NoDevice { .. }) => {}
            other => return Err(fail(format!("beyond the share: {other:?}"))),
        }
        let within = gpu
            .allocate_resident(share as usize, &gpu_only)
            .await
            .map_err(fail)?;
        drop(within);
        gpu_settles_at(&gpu, 0).await?;
        let doubled = execute(&gpu, "double", &f32s(&[1.5])).await?;
        if from_f32s(&doubled) != [3.0] {
            return Err(fail("the bridge stopped serving"));
        }
        gpu.shutdown(StopMode::Drain).await;
        Ok(())
    })
}
