//! GPU grains. Grains reach their silo's GPU bridge through the grain
//! context (the bridge is a silo service; granary-actors knows nothing of
//! GPUs). Three kinds, as the samples: a latency-bound grain on a
//! persistent kernel (`Doubler`), a compute grain on the batch path
//! (`Matrices`), and a grain that keeps a buffer resident on its device,
//! reserved in the broker while it is active (`Resident`).

use std::sync::Arc;

use granary::actors::{ActivationError, Grain, GrainContext, GrainKey, Handler, Message, Silo};
use granary::gpu::{ExecuteError, GpuBridge, Output, Part, StopMode};
use granary::kernels::shipped::{self, bytes_f32, f32_bytes};

/// Doubles vectors through the bridge's persistent `double` kernel.
struct Doubler {
    bridge: Option<Arc<GpuBridge>>,
    served: u64,
}

impl Grain for Doubler {
    fn new(_: &GrainKey) -> Doubler {
        Doubler {
            bridge: None,
            served: 0,
        }
    }

    async fn on_activate(&mut self, ctx: &mut GrainContext) -> Result<(), ActivationError> {
        let bridge = ctx
            .service::<GpuBridge>()
            .ok_or_else(|| ActivationError("no GPU bridge on this silo".into()))?;
        self.bridge = Some(bridge);
        Ok(())
    }
}

struct Double(Vec<f32>);
impl Message for Double {
    type Reply = Result<Vec<f32>, ExecuteError>;
}
impl Handler<Double> for Doubler {
    async fn handle(
        &mut self,
        Double(values): Double,
        _: &mut GrainContext,
    ) -> Result<Vec<f32>, ExecuteError> {
        let bridge = self.bridge.as_ref().ok_or(ExecuteError::ShutDown)?;
        let output = bridge.execute("double", &f32_bytes(&values)).await?;
        self.served += 1;
        Ok(bytes_f32(&output))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_grains_send_compute_through_the_silo_bridge() {
    let bridge = Arc::new(GpuBridge::builder().kernels(shipped::ALL).build().unwrap());
    let silo = Silo::builder()
        .register::<Doubler>("doubler")
        .service(bridge.clone())
        .build()
        .unwrap();
    let calls: Vec<_> = (0..200u64)
        .map(|key| {
            let grain = silo.grain::<Doubler>(key % 50);
            tokio::spawn(async move { (key, grain.call(Double(vec![key as f32, 0.5])).await) })
        })
        .collect();
    for call in calls {
        let (key, reply) = call.await.unwrap();
        assert_eq!(reply.unwrap().unwrap(), vec![2.0 * key as f32, 1.0]);
    }
    assert_eq!(silo.activations_started(), 50);
    // Bad input reaches the grain as the bridge's typed error.
    let bad = silo
        .grain::<Doubler>(1u64)
        .call(Double(Vec::new()))
        .await
        .unwrap();
    assert!(matches!(bad, Err(ExecuteError::WrongShape { .. })));
    silo.shutdown().await;
    bridge.shutdown(StopMode::Drain).await;
}

#[tokio::test]
async fn a_silo_without_the_bridge_fails_activation_clearly() {
    let silo = Silo::builder()
        .register::<Doubler>("doubler")
        .build()
        .unwrap();
    assert!(matches!(
        silo.grain::<Doubler>(1u64).call(Double(vec![1.0])).await,
        Err(granary::actors::CallError::TurnFailed { .. })
    ));
    silo.shutdown().await;
}

/// Keeps a vector resident on its device across calls: the buffer is
/// allocated through the bridge when the grain activates (its memory
/// reserved in the broker) and freed when it deactivates (the reservation
/// released). Each call sends one scalar to the device and reads back one
/// element; the vector never crosses the bus again.
struct Resident {
    bridge: Option<Arc<GpuBridge>>,
    buffer: Option<granary::gpu::ResidentBuffer>,
}

/// Elements the resident buffer holds.
const RESIDENT: usize = 100_000;

impl Grain for Resident {
    fn new(_: &GrainKey) -> Resident {
        Resident {
            bridge: None,
            buffer: None,
        }
    }

    async fn on_activate(&mut self, ctx: &mut GrainContext) -> Result<(), ActivationError> {
        let bridge = ctx
            .service::<GpuBridge>()
            .ok_or_else(|| ActivationError("no GPU bridge on this silo".into()))?;
        let buffer = bridge
            .allocate_resident(RESIDENT * 4, &granary::gpu::Requirements::default())
            .await
            .map_err(|err| ActivationError(err.to_string()))?;
        buffer
            .write(0, &f32_bytes(&vec![1.0; RESIDENT]))
            .await
            .map_err(|err| ActivationError(err.to_string()))?;
        self.buffer = Some(buffer);
        self.bridge = Some(bridge);
        Ok(())
    }

    async fn on_deactivate(&mut self, _: &mut GrainContext) {
        // The device memory goes, and its reservation with it.
        self.buffer = None;
    }
}

/// `buffer = a·buffer + buffer` on the device (SAXPY in place); answers
/// the first and last elements.
struct Grow(f32);
impl Message for Grow {
    type Reply = Result<(f32, f32), ExecuteError>;
}
impl Handler<Grow> for Resident {
    async fn handle(
        &mut self,
        Grow(a): Grow,
        _: &mut GrainContext,
    ) -> Result<(f32, f32), ExecuteError> {
        let (Some(bridge), Some(buffer)) = (&self.bridge, &self.buffer) else {
            return Err(ExecuteError::ShutDown);
        };
        let scalar = f32_bytes(&[a]);
        bridge
            .execute_resident(
                "saxpy",
                &[
                    Part::Host(&scalar),
                    Part::Resident(buffer),
                    Part::Resident(buffer),
                ],
                Output::Into(buffer),
            )
            .await?;
        let read = |offset| async move {
            buffer
                .read(offset, 4)
                .await
                .map(|bytes| bytes_f32(&bytes)[0])
        };
        let failed = |err: granary::gpu::ResidentError| ExecuteError::DeviceFailed {
            kernel: "saxpy",
            backend: buffer.backend(),
            reason: err.to_string(),
        };
        let first = read(0).await.map_err(failed)?;
        let last = read((RESIDENT - 1) * 4).await.map_err(failed)?;
        Ok((first, last))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resident_buffer_is_reserved_while_active_and_released_on_deactivation() {
    let bridge = Arc::new(GpuBridge::builder().kernels(shipped::ALL).build().unwrap());
    let silo = Silo::builder()
        .register::<Resident>("resident")
        .service(bridge.clone())
        .config(granary::actors::SiloConfig {
            idle_timeout: std::time::Duration::from_millis(200),
            ..Default::default()
        })
        .build()
        .unwrap();
    let device = bridge.devices()[0].0;
    let reserved = || bridge.broker().stats(device).unwrap().reserved;
    let grain = silo.grain::<Resident>("v");
    // The buffer lives across calls: 1 → 3 → 9, every element.
    assert_eq!(grain.call(Grow(2.0)).await.unwrap().unwrap(), (3.0, 3.0));
    assert_eq!(grain.call(Grow(2.0)).await.unwrap().unwrap(), (9.0, 9.0));
    // Reserved: the buffer (the batches' temporaries are released).
    let while_active = reserved();
    assert_eq!(while_active, (RESIDENT * 4) as u64);
    // Idle, it is deactivated; then every job that used the buffer has
    // ended (the broker's queue depth drops to zero only once a job has
    // let go of its buffers and reservations). Bounded only so that a
    // broken runtime fails rather than hangs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while silo.live_activations() > 0 || bridge.broker().stats(device).unwrap().queue_depth > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "still active, or its jobs still running, after 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(
        while_active - reserved(),
        (RESIDENT * 4) as u64,
        "the buffer's reservation was released"
    );
    assert_eq!(reserved(), 0);
    // A new activation starts from a fresh buffer.
    assert_eq!(grain.call(Grow(2.0)).await.unwrap().unwrap(), (3.0, 3.0));
    silo.shutdown().await;
    bridge.shutdown(StopMode::Drain).await;
}

/// Multiplies matrices on the bridge's batch path (inputs too large for a
/// ring slot), keeping the last product.
struct Matrices {
    bridge: Option<Arc<GpuBridge>>,
    last: Vec<f32>,
}

impl Grain for Matrices {
    fn new(_: &GrainKey) -> Matrices {
        Matrices {
            bridge: None,
            last: Vec::new(),
        }
    }

    async fn on_activate(&mut self, ctx: &mut GrainContext) -> Result<(), ActivationError> {
        self.bridge = Some(
            ctx.service::<GpuBridge>()
                .ok_or_else(|| ActivationError("no GPU bridge on this silo".into()))?,
        );
        Ok(())
    }
}

/// `A·B` for square `n×n` matrices.
struct Multiply {
    n: usize,
    a: Vec<f32>,
    b: Vec<f32>,
}
impl Message for Multiply {
    type Reply = Result<Vec<f32>, ExecuteError>;
}
impl Handler<Multiply> for Matrices {
    async fn handle(
        &mut self,
        m: Multiply,
        _: &mut GrainContext,
    ) -> Result<Vec<f32>, ExecuteError> {
        let bridge = self.bridge.as_ref().ok_or(ExecuteError::ShutDown)?;
        let request =
            shipped::matmul_request(m.n, m.n, m.n, &m.a, &m.b).ok_or(ExecuteError::Rejected {
                kernel: "matmul",
                status: granary::kernels::Status::BadLength,
            })?;
        self.last = bytes_f32(&bridge.execute("matmul", &request).await?);
        Ok(self.last.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compute_grain_multiplies_matrices_on_the_batch_path() {
    let bridge = Arc::new(GpuBridge::builder().kernels(shipped::ALL).build().unwrap());
    let silo = Silo::builder()
        .register::<Matrices>("matrices")
        .service(bridge.clone())
        .build()
        .unwrap();
    let n = 96;
    let identity: Vec<f32> = (0..n * n)
        .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
        .collect();
    let a: Vec<f32> = (0..n * n).map(|i| (i % 17) as f32).collect();
    let grain = silo.grain::<Matrices>("m");
    let product = grain
        .call(Multiply {
            n,
            a: a.clone(),
            b: identity,
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(product, a, "A·I = A");
    // Mismatched sizes are a typed error from the grain.
    assert!(matches!(
        grain
            .call(Multiply {
                n,
                a: vec![1.0],
                b: vec![1.0]
            })
            .await
            .unwrap(),
        Err(ExecuteError::Rejected { .. })
    ));
    silo.shutdown().await;
    bridge.shutdown(StopMode::Drain).await;
}
