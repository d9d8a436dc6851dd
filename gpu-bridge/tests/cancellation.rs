//! Callers that give up (a timeout drops their future) leave nothing
//! behind: no orphaned kernel, no memory released under a running batch.
//! One test in its own binary, since it counts the process's threads.

mod common;

use std::time::Duration;

use common::{f32s, from_f32s};
use granary_gpu::{GpuBridge, StopMode};
use granary_kernels::{ElementType, KernelSpec, Shape, Status, shipped};

/// Bridge completion threads alive in this process (Linux), by name.
fn bridge_threads() -> Option<usize> {
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    Some(
        tasks
            .flatten()
            .filter(|task| {
                std::fs::read_to_string(task.path().join("comm"))
                    .is_ok_and(|name| name.starts_with("granary-bridge"))
            })
            .count(),
    )
}

/// A batch kernel that takes 400 ms: `double` on the batch path, slowly.
const SLOW_BATCH: KernelSpec = KernelSpec {
    id: "slow_batch",
    request: Shape::exactly(ElementType::F32, 1),
    response: Shape::exactly(ElementType::F32, 1),
    batch_request: Shape::between(ElementType::F32, 2, 1 << 20, 1),
    opencl_c: None,
    cuda_c: None,
    wgsl: None,
    cpu: Some(slow_double),
    ..shipped::DOUBLE
};

fn slow_double(request: &[u8], response: &mut [u8]) -> Result<usize, Status> {
    std::thread::sleep(Duration::from_millis(400));
    let doubled = f32s(
        &from_f32s(request)
            .iter()
            .map(|x| 2.0 * x)
            .collect::<Vec<_>>(),
    );
    response[..doubled.len()].copy_from_slice(&doubled);
    Ok(doubled.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_give_up_leave_nothing_behind() {
    // 1. First calls cancelled while their kernel launches: one instance is
    //    made, not one per cancelled call, and shutdown stops it.
    let bridge = GpuBridge::builder()
        .kernels([shipped::DOUBLE, SLOW_BATCH])
        .build()
        .unwrap();
    let broker = bridge.broker().clone();
    let cpu = bridge.devices()[0].0;
    // The first is cancelled while its kernel launches; later ones may
    // already be answered within their one poll.
    for _ in 0..5 {
        let _ = tokio::time::timeout(Duration::ZERO, bridge.execute("double", &f32s(&[1.0]))).await;
    }
    assert_eq!(
        from_f32s(&bridge.execute("double", &f32s(&[1.0])).await.unwrap()),
        [2.0]
    );
    let one_instance = broker.stats(cpu).unwrap().reserved;
    let reference = GpuBridge::builder()
        .kernel(shipped::DOUBLE)
        .build()
        .unwrap();
    reference.execute("double", &f32s(&[1.0])).await.unwrap();
    let reference_cpu = reference.devices()[0].0;
    assert_eq!(
        one_instance,
        reference.broker().stats(reference_cpu).unwrap().reserved,
        "exactly one kernel's rings are reserved"
    );
    reference.shutdown(StopMode::Drain).await;

    // 2. A batch call cancelled while it runs: its memory stays reserved
    //    and its request counted in flight until the backend is done.
    let input = f32s(&[3.0, 4.0]);
    let cancelled = tokio::time::timeout(
        Duration::from_millis(100),
        bridge.execute("slow_batch", &input),
    )
    .await;
    assert!(cancelled.is_err());
    let during = broker.stats(cpu).unwrap();
    assert!(during.reserved > one_instance, "still reserved: {during:?}");
    assert_eq!(during.queue_depth, 1);
    // The job ends (its queue depth drops to zero only once it has let go
    // of its memory); bounded only so that a job that never ends fails
    // rather than hangs.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while broker.stats(cpu).unwrap().queue_depth > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the cancelled batch never ended"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let after = broker.stats(cpu).unwrap();
    assert_eq!(
        after.reserved, one_instance,
        "released once done: {after:?}"
    );
    assert_eq!((after.queue_depth, after.failed), (0, 0));

    // 3. Shutdown stops every kernel thread.
    bridge.shutdown(StopMode::Drain).await;
    // Shutdown has joined every thread; Linux clears a thread's join futex
    // a moment before it removes the thread from /proc, so the count is
    // given a while to settle (CI once saw 1 right after the join; a
    // loaded machine may take a while to run the exiting thread).
    let settled = std::time::Instant::now() + Duration::from_secs(5);
    while bridge_threads().is_some_and(|threads| threads > 0) && std::time::Instant::now() < settled
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    if let Some(threads) = bridge_threads() {
        assert_eq!(threads, 0, "no completion thread outlives the shutdown");
    }
}
