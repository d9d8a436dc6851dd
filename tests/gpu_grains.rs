//! Grains reach their silo's GPU bridge through the grain context: the
//! bridge is a silo service, and granary-actors knows nothing of GPUs.

use std::sync::Arc;

use granary::actors::{ActivationError, Grain, GrainContext, GrainKey, Handler, Message, Silo};
use granary::gpu::{ExecuteError, GpuBridge, StopMode};
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
