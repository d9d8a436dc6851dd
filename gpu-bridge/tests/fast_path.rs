//! The bridge's fast path on the CPU backend: typed kernels, `execute_many`
//! groups, answers taken from their slots, spinning callers that serve the
//! response ring themselves (`bridge/slots.rs`, `bridge/instance.rs` rules
//! 8–10).

mod common;

use std::time::{Duration, Instant};

use common::{SLOW, f32s, from_f32s};
use granary_gpu::shipped::{Dot, Double, VectorAdd};
use granary_gpu::{BridgeConfig, ExecuteError, GpuBridge, StopMode};
use granary_kernels::{ElementType, KernelConfig, KernelSpec, Shape, Status, shipped};

fn bridge() -> GpuBridge {
    GpuBridge::builder()
        .kernels(shipped::ALL)
        .build()
        .expect("a CPU bridge")
}

/// Doubles one `f32`, and rejects a negative one as bad input: a kernel
/// that refuses some requests of a group by their contents.
const PICKY: KernelSpec = KernelSpec {
    id: "picky",
    version: 1,
    request: Shape::exactly(ElementType::F32, 1),
    response: Shape::exactly(ElementType::F32, 1),
    batch_request: Shape::exactly(ElementType::F32, 1),
    output_len: |_| Ok(4),
    opencl_c: None,
    cuda_c: None,
    wgsl: None,
    cpu: Some(picky),
};

fn picky(request: &[u8], response: &mut [u8]) -> Result<usize, Status> {
    let value = from_f32s(request)[0];
    if value < 0.0 {
        return Err(Status::BadInput);
    }
    response[..4].copy_from_slice(&(2.0 * value).to_le_bytes());
    Ok(4)
}

/// Waits (on the bridge's own counters, with a deadline) until no request
/// holds a slot.
async fn until_no_slot_is_held(bridge: &GpuBridge) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while bridge.kernel_health().iter().any(|h| h.in_flight > 0) {
        assert!(
            Instant::now() < deadline,
            "slots still held: {:?}",
            bridge.kernel_health()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_calls_answer_as_the_byte_api_for_every_shipped_kernel() {
    let bridge = bridge();
    // Ring-sized and batch-sized inputs of all five kernels.
    for (kernel, input) in common::device::shipped_inputs() {
        let expected = bridge.execute(kernel, &input).await.unwrap();
        let typed = bridge.kernel_named::<f32, f32>(kernel).unwrap();
        let elements = from_f32s(&input);
        assert_eq!(
            f32s(&typed.call(&elements).await.unwrap()),
            expected,
            "{kernel}"
        );
        let mut output = vec![f32::NAN; expected.len() / 4 + 3];
        let written = typed.call_into(&elements, &mut output).await.unwrap();
        assert_eq!(written, expected.len() / 4, "{kernel}");
        assert_eq!(f32s(&output[..written]), expected, "{kernel}");
        assert!(
            output[written..].iter().all(|x| x.is_nan()),
            "{kernel} wrote past its answer"
        );
    }
    // The marker types reach the same kernels.
    let double = bridge.kernel::<Double>().unwrap();
    assert_eq!(double.call(&[1.5, -2.0]).await.unwrap(), [3.0, -4.0]);
    let dot = bridge.kernel::<Dot>().unwrap();
    assert_eq!(dot.call(&[1.0, 2.0, 3.0, 4.0]).await.unwrap(), [11.0]);
    let add = bridge.kernel::<VectorAdd>().unwrap();
    let answers = add
        .call_many(&[[1.0f32, 2.0, 10.0, 20.0], [3.0, 4.0, 30.0, 40.0]])
        .await;
    assert_eq!(answers[0].as_deref().unwrap(), [11.0, 22.0]);
    assert_eq!(answers[1].as_deref().unwrap(), [33.0, 44.0]);
    bridge.shutdown(StopMode::Drain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_handle_is_checked_once_and_bad_calls_fail_typed() {
    let bridge = bridge();
    assert!(matches!(
        bridge.kernel_named::<u32, f32>("double"),
        Err(ExecuteError::WrongElement {
            kernel: "double",
            side: "request",
            expected: ElementType::F32,
            given: ElementType::U32,
        })
    ));
    assert!(matches!(
        bridge.kernel_named::<f32, f64>("dot"),
        Err(ExecuteError::WrongElement {
            side: "response",
            ..
        })
    ));
    assert!(matches!(
        bridge.kernel_named::<f32, f32>("nope"),
        Err(ExecuteError::UnknownKernel(_))
    ));
    let without = GpuBridge::builder().kernel(shipped::DOT).build().unwrap();
    assert!(matches!(
        without.kernel::<Double>(),
        Err(ExecuteError::UnknownKernel(_))
    ));

    let double = bridge.kernel::<Double>().unwrap();
    // An answer too large for the caller's buffer is refused, typed.
    let mut small = [0.0f32; 1];
    assert!(matches!(
        double.call_into(&[1.0, 2.0, 3.0, 4.0], &mut small).await,
        Err(ExecuteError::OutputTooSmall {
            kernel: "double",
            needed: 4,
            capacity: 1,
        })
    ));
    // A length the kernel does not take, and an empty one.
    let vector_add = bridge.kernel::<VectorAdd>().unwrap();
    assert!(matches!(
        vector_add.call(&[1.0, 2.0, 3.0]).await,
        Err(ExecuteError::WrongShape { .. })
    ));
    assert!(matches!(
        double.call(&[]).await,
        Err(ExecuteError::WrongShape { .. })
    ));
    // A group whose answers overflow the buffer: the first fits, the
    // second does not, the third (failed) takes no room.
    let mut four = [0.0f32; 4];
    let placed = double
        .call_many_into(&[vec![1.0, 2.0, 3.0], vec![4.0, 5.0], vec![]], &mut four)
        .await;
    assert_eq!(placed[0].clone().unwrap(), 0..3);
    assert!(matches!(
        placed[1],
        Err(ExecuteError::OutputTooSmall {
            needed: 2,
            capacity: 1,
            ..
        })
    ));
    assert!(matches!(placed[2], Err(ExecuteError::WrongShape { .. })));
    assert_eq!(four[..3], [2.0, 4.0, 6.0]);
    // Answers go back to back in input order whatever their route: a
    // batch-path input first, then ring ones, one of which does not fit
    // (it takes no room; the next one does).
    let big: Vec<f32> = (0..100_000).map(|i| i as f32).collect();
    let mut output = vec![0.0f32; 100_000 + 2];
    let placed = double
        .call_many_into(
            &[big.clone(), vec![1.0], vec![5.0, 6.0], vec![7.0]],
            &mut output,
        )
        .await;
    assert_eq!(placed[0].clone().unwrap(), 0..100_000);
    assert_eq!(placed[1].clone().unwrap(), 100_000..100_001);
    assert!(matches!(
        placed[2],
        Err(ExecuteError::OutputTooSmall {
            needed: 2,
            capacity: 1,
            ..
        })
    ));
    assert_eq!(placed[3].clone().unwrap(), 100_001..100_002);
    assert_eq!(output[..3], [0.0, 2.0, 4.0]);
    assert_eq!(output[100_000..], [2.0, 14.0]);
    // Nothing leaked and the bridge serves on.
    until_no_slot_is_held(&bridge).await;
    assert_eq!(double.call(&[8.0]).await.unwrap(), [16.0]);
    bridge.shutdown(StopMode::Drain).await;
    assert!(matches!(
        double.call(&[8.0]).await,
        Err(ExecuteError::ShutDown)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_answers_in_order_and_each_request_fails_alone() {
    let bridge = GpuBridge::builder().kernel(PICKY).build().unwrap();
    // Every seventh is rejected by the kernel, every eleventh never reaches
    // it (three bytes, not an element).
    let inputs: Vec<Vec<u8>> = (0..500)
        .map(|i| match i {
            i if i % 11 == 5 => vec![1, 2, 3],
            i if i % 7 == 3 => f32s(&[-(i as f32)]),
            i => f32s(&[i as f32]),
        })
        .collect();
    let results = bridge.execute_many("picky", &inputs).await;
    assert_eq!(results.len(), inputs.len());
    for (i, result) in results.iter().enumerate() {
        match i {
            i if i % 11 == 5 => {
                assert!(
                    matches!(result, Err(ExecuteError::WrongShape { .. })),
                    "{i}"
                )
            }
            i if i % 7 == 3 => assert!(
                matches!(
                    result,
                    Err(ExecuteError::Rejected {
                        status: Status::BadInput,
                        ..
                    })
                ),
                "{i}: {result:?}"
            ),
            i => assert_eq!(from_f32s(result.as_ref().unwrap()), [2.0 * i as f32]),
        }
    }
    let device = bridge.devices().pop().unwrap().2;
    // Refused before the ring: never counted on the device.
    let refused = (0..500).filter(|i| i % 11 == 5).count() as u64;
    let rejected = (0..500).filter(|i| i % 11 != 5 && i % 7 == 3).count() as u64;
    assert_eq!(device.failed, rejected);
    assert_eq!(device.processed, 500 - refused - rejected);
    assert_eq!(device.queue_depth, 0);
    bridge.shutdown(StopMode::Drain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_group_gives_every_slot_back() {
    let capacity = 64;
    let bridge = GpuBridge::builder()
        .kernel(SLOW)
        .config(BridgeConfig {
            kernel: KernelConfig {
                capacity,
                ..BridgeConfig::default().kernel
            },
            ..BridgeConfig::default()
        })
        .build()
        .unwrap();
    // The kernel is launched first, so the group below goes straight in.
    assert!(bridge.execute("slow", &f32s(&[0.0])).await.is_ok());
    // Forty requests of 10 ms each: the group is dropped once all forty
    // hold slots, with most of them still queued in the kernel.
    let inputs: Vec<Vec<u8>> = (0..40).map(|_| f32s(&[10.0])).collect();
    {
        let group = bridge.execute_many("slow", &inputs);
        tokio::pin!(group);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            tokio::select! {
                _ = &mut group => panic!("the group finished before it was dropped"),
                _ = tokio::time::sleep(Duration::from_millis(1)) => {}
            }
            if bridge.kernel_health()[0].in_flight == 40 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the group never sent its requests"
            );
        }
    }
    // Their answers land in the dropped group and free its slots.
    until_no_slot_is_held(&bridge).await;
    let device = bridge.devices().pop().unwrap().2;
    assert_eq!((device.processed, device.queue_depth), (41, 0));
    // Every slot is free again: a group as large as the ring goes through.
    let full: Vec<Vec<u8>> = (0..capacity).map(|_| f32s(&[0.0])).collect();
    let results = bridge.execute_many("slow", &full).await;
    assert_eq!(results.answered(), capacity as usize);
    bridge.shutdown(StopMode::Drain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_call_gives_its_slot_back_whether_or_not_its_answer_landed() {
    let bridge = GpuBridge::builder().kernel(SLOW).build().unwrap();
    let slow = bridge.kernel_named::<f32, f32>("slow").unwrap();
    for millis in [0.0, 1.0, 5.0, 20.0] {
        for give_up in [0, 1, 3, 10] {
            let _ =
                tokio::time::timeout(Duration::from_millis(give_up), slow.call(&[millis])).await;
        }
    }
    until_no_slot_is_held(&bridge).await;
    assert_eq!(slow.call(&[0.0]).await.unwrap(), [0.0]);
    bridge.shutdown(StopMode::Drain).await;
}

/// Eight tasks, 100k requests each, every one unique to its task and
/// turn, through every entry point at once (single calls that spin or
/// park, groups, typed and byte calls): every answer is its own request's,
/// none is lost, none comes twice, and the counters add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_tasks_times_100k_requests_lose_nothing() {
    const TASKS: u32 = 8;
    const EACH: u32 = 100_000;
    const GROUP: u32 = 64;
    let bridge = bridge();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let bridge = bridge.clone();
            tokio::spawn(async move {
                let double = bridge.kernel::<Double>().unwrap();
                let mut sent = 0u32;
                let mut turn = 0u32;
                while sent < EACH {
                    let value = |i: u32| (task * EACH + i) as f32;
                    match (task + turn) % 4 {
                        // A group, byte API.
                        0 => {
                            let count = GROUP.min(EACH - sent);
                            let inputs: Vec<Vec<u8>> =
                                (sent..sent + count).map(|i| f32s(&[value(i)])).collect();
                            let answers = bridge.execute_many("double", &inputs).await;
                            for (i, answer) in (sent..).zip(&answers) {
                                assert_eq!(from_f32s(answer.unwrap()), [2.0 * value(i)]);
                            }
                            sent += count;
                        }
                        // A group, typed, into one buffer.
                        1 => {
                            let count = GROUP.min(EACH - sent);
                            let inputs: Vec<[f32; 1]> =
                                (sent..sent + count).map(|i| [value(i)]).collect();
                            let mut output = vec![0.0f32; count as usize];
                            let placed = double.call_many_into(&inputs, &mut output).await;
                            for (n, range) in placed.into_iter().enumerate() {
                                assert_eq!(range.unwrap(), n..n + 1);
                            }
                            for (i, answer) in (sent..).zip(&output) {
                                assert_eq!(*answer, 2.0 * value(i));
                            }
                            sent += count;
                        }
                        // Single calls, byte and typed.
                        _ => {
                            for i in sent..(sent + 16).min(EACH) {
                                if i % 2 == 0 {
                                    let answer = bridge.execute("double", &f32s(&[value(i)])).await;
                                    assert_eq!(from_f32s(&answer.unwrap()), [2.0 * value(i)]);
                                } else {
                                    assert_eq!(
                                        double.call(&[value(i)]).await.unwrap(),
                                        [2.0 * value(i)]
                                    );
                                }
                            }
                            sent = (sent + 16).min(EACH);
                        }
                    }
                    turn += 1;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    until_no_slot_is_held(&bridge).await;
    let device = bridge.devices().pop().unwrap().2;
    assert_eq!(
        (device.processed, device.failed, device.queue_depth),
        (u64::from(TASKS * EACH), 0, 0)
    );
    bridge.shutdown(StopMode::Drain).await;
}

/// `double`'s version 2, which triples: registered beside version 1.
const DOUBLE_V2: KernelSpec = KernelSpec {
    version: 2,
    opencl_c: None,
    cuda_c: None,
    wgsl: None,
    cpu: Some(triple),
    ..shipped::DOUBLE
};

fn triple(request: &[u8], response: &mut [u8]) -> Result<usize, Status> {
    let tripled: Vec<f32> = from_f32s(request).iter().map(|x| 3.0 * x).collect();
    response[..request.len()].copy_from_slice(&f32s(&tripled));
    Ok(request.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_versions_of_a_kernel_serve_side_by_side() {
    // Registered newest first: "latest" is by version, not by order.
    let bridge = GpuBridge::builder()
        .kernel(DOUBLE_V2)
        .kernel(shipped::DOUBLE)
        .build()
        .unwrap();
    assert_eq!(bridge.versions("double"), [1, 2]);
    assert!(bridge.versions("nope").is_empty());
    let input = f32s(&[1.0, 2.0]);
    assert_eq!(
        from_f32s(&bridge.execute("double", &input).await.unwrap()),
        [3.0, 6.0]
    );
    assert_eq!(
        from_f32s(&bridge.execute_version("double", 1, &input).await.unwrap()),
        [2.0, 4.0]
    );
    assert_eq!(
        from_f32s(&bridge.execute_version("double", 2, &input).await.unwrap()),
        [3.0, 6.0]
    );
    match bridge.execute_version("double", 3, &input).await {
        Err(ExecuteError::UnknownVersion {
            kernel: "double",
            version: 3,
            registered,
        }) => assert_eq!(registered, [1, 2]),
        other => panic!("expected UnknownVersion, got {other:?}"),
    }
    assert!(matches!(
        bridge.execute_version("nope", 1, &input).await,
        Err(ExecuteError::UnknownKernel(_))
    ));
    // A marker type names its own version; a name takes the latest.
    let v1 = bridge.kernel::<Double>().unwrap();
    assert_eq!(v1.spec().version, 1);
    assert_eq!(v1.call(&[1.0]).await.unwrap(), [2.0]);
    let latest = bridge.kernel_named::<f32, f32>("double").unwrap();
    assert_eq!(latest.call(&[1.0]).await.unwrap(), [3.0]);
    let v2 = bridge.kernel_version::<f32, f32>("double", 2).unwrap();
    assert_eq!(
        v2.call_many(&[[1.0f32], [2.0]]).await[1]
            .as_deref()
            .unwrap(),
        [6.0]
    );
    // Groups take the latest too, and each version has its own kernel.
    let answers = bridge
        .execute_many("double", std::slice::from_ref(&input))
        .await;
    assert_eq!(from_f32s(answers.get(0).unwrap().unwrap()), [3.0, 6.0]);
    assert_eq!(
        bridge.kernel_health().len(),
        2,
        "one persistent kernel per version"
    );
    // The same id and version twice is refused.
    assert_eq!(
        GpuBridge::builder()
            .kernel(shipped::DOUBLE)
            .kernel(DOUBLE_V2)
            .kernel(shipped::DOUBLE)
            .build()
            .unwrap_err(),
        granary_gpu::BuildError::DuplicateKernel {
            id: "double",
            version: 1
        }
    );
    bridge.shutdown(StopMode::Drain).await;
}

/// A group as large as the ring gets its slots while single calls keep
/// some of them busy at every moment: it gathers them as they come free
/// instead of waiting for the whole table to be free at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_as_large_as_the_ring_is_not_starved_by_single_calls() {
    let capacity = 16;
    let bridge = GpuBridge::builder()
        .kernel(shipped::DOUBLE)
        .config(BridgeConfig {
            kernel: KernelConfig {
                capacity,
                ..BridgeConfig::default().kernel
            },
            overload_timeout: Duration::from_secs(10),
            ..BridgeConfig::default()
        })
        .build()
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let singles: Vec<_> = (0..4)
        .map(|_| {
            let (bridge, stop) = (bridge.clone(), stop.clone());
            tokio::spawn(async move {
                let double = bridge.kernel::<Double>().unwrap();
                let mut calls = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    assert_eq!(double.call(&[1.0]).await.unwrap(), [2.0]);
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    // The singles are under way before the groups go.
    while bridge
        .kernel_health()
        .first()
        .is_none_or(|h| h.in_flight == 0)
    {
        tokio::task::yield_now().await;
    }
    let inputs: Vec<Vec<u8>> = (0..capacity).map(|i| f32s(&[i as f32])).collect();
    for _ in 0..20 {
        let answers = bridge.execute_many("double", &inputs).await;
        for (i, answer) in answers.iter().enumerate() {
            assert_eq!(from_f32s(answer.unwrap()), [2.0 * i as f32]);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for single in singles {
        assert!(single.await.unwrap() > 0);
    }
    bridge.shutdown(StopMode::Drain).await;
}
