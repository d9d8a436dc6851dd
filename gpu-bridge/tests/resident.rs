//! Resident buffers through the bridge: reserved in the broker while they
//! live, released after their memory, batches over resident parts with only
//! host parts crossing, and misuse typed. The OpenCL half runs on POCL in
//! CI; the CUDA backend's part of the contract is in
//! `persistent-kernels/tests/cuda.rs`.

mod common;

use common::gate;

use std::sync::Arc;
use std::time::Duration;

use common::{f32s, from_f32s};
use granary_gpu::{
    BridgeConfig, DeviceId, ExecuteError, GpuBridge, Output, Part, RelocateError, Requirements,
    ResidentError, ResidentQuota, StopMode,
};
use granary_kernels::shipped;
use granary_kernels::{Backend, BackendKind, CpuBackend, DeviceInfo, host_device};

/// A CPU device with `free` bytes, so the broker's figures are exact.
fn cpu_bridge(free: u64) -> GpuBridge {
    let device = DeviceInfo {
        total_memory: free,
        free_memory: free,
        ..host_device()
    };
    GpuBridge::builder()
        .kernels(shipped::ALL)
        .cpu_backend(CpuBackend::with_device(device))
        .config(BridgeConfig {
            overload_timeout: Duration::from_millis(200),
            ..BridgeConfig::default()
        })
        .build()
        .unwrap()
}

fn reserved(bridge: &GpuBridge) -> u64 {
    let (id, _, _) = bridge.devices()[0];
    bridge.broker().stats(id).unwrap().reserved
}

/// Of what is reserved, what resident buffers keep.
fn kept(bridge: &GpuBridge) -> u64 {
    let (id, _, _) = bridge.devices()[0];
    bridge.broker().stats(id).unwrap().kept
}

/// Waits until every job the bridge started has ended (the broker's queue
/// depth is zero: a job counts as ended only after it has let go of its
/// buffers and reservations), then checks what is still reserved. The bound
/// only keeps a broken bridge from hanging the test; nothing waits for a
/// fixed time.
async fn settles_at(bridge: &GpuBridge, bytes: u64) {
    let (id, _, _) = bridge.devices()[0];
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while bridge.broker().stats(id).unwrap().queue_depth > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "jobs still running after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(reserved(bridge), bytes);
}

/// Three rounds of `y = a·y + y` with the data resident, as a resident
/// grain does; returns the buffer's contents.
async fn saxpy_rounds(bridge: &GpuBridge, start: &[f32]) -> Vec<f32> {
    let buffer = bridge
        .allocate_resident(start.len() * 4, &Requirements::default())
        .await
        .unwrap();
    buffer.write(0, &f32s(start)).await.unwrap();
    for a in [0.5f32, -1.25, 3.0] {
        let scalar = f32s(&[a]);
        let returned = bridge
            .execute_resident(
                "saxpy",
                &[
                    Part::Host(&scalar),
                    Part::Resident(&buffer),
                    Part::Resident(&buffer),
                ],
                Output::Into(&buffer),
            )
            .await
            .unwrap();
        assert!(returned.is_empty());
    }
    from_f32s(&buffer.read(0, start.len() * 4).await.unwrap())
}

fn expected_rounds(start: &[f32]) -> Vec<f32> {
    let mut y = start.to_vec();
    for a in [0.5f32, -1.25, 3.0] {
        for v in &mut y {
            *v = a * *v + *v;
        }
    }
    y
}

async fn a_resident_buffer_is_reserved_while_it_lives_and_released_after() {
    let bridge = cpu_bridge(1 << 20);
    assert_eq!(reserved(&bridge), 0);
    let buffer = bridge
        .allocate_resident(4000, &Requirements::default())
        .await
        .unwrap();
    assert_eq!(buffer.len(), 4000);
    assert_eq!(buffer.backend(), BackendKind::Cpu);
    assert_eq!(reserved(&bridge), 4000);
    assert_eq!(kept(&bridge), 4000, "kept across requests");
    // A request's working memory is reserved, not kept.
    let (id, _, _) = bridge.devices()[0];
    let working = bridge.broker().reserve(id, 1000).unwrap();
    assert_eq!((reserved(&bridge), kept(&bridge)), (5000, 4000));
    drop(working);
    assert_eq!(buffer.read(0, 8).await.unwrap(), vec![0; 8], "zeroed");
    let copy = buffer.clone();
    drop(buffer);
    assert_eq!(reserved(&bridge), 4000, "a clone keeps it");
    drop(copy);
    settles_at(&bridge, 0).await;
    assert_eq!(kept(&bridge), 0);
}

async fn a_buffer_waits_for_working_memory_to_drain_but_not_for_kept_memory() {
    // A long overload timeout: the wait below ends by the drain, and the
    // refusal at the end must come without it.
    let device = DeviceInfo {
        total_memory: 1 << 20,
        free_memory: 1 << 20,
        ..host_device()
    };
    let bridge = Arc::new(
        GpuBridge::builder()
            .cpu_backend(CpuBackend::with_device(device))
            .config(BridgeConfig {
                overload_timeout: Duration::from_secs(60),
                ..BridgeConfig::default()
            })
            .build()
            .unwrap(),
    );
    let (id, _, _) = bridge.devices()[0];
    // Working memory holds the whole device: the buffer waits for it.
    let working = bridge.broker().reserve(id, 1 << 20).unwrap();
    let waiting = tokio::spawn({
        let bridge = bridge.clone();
        async move {
            bridge
                .allocate_resident(4000, &Requirements::default())
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        !waiting.is_finished(),
        "it waits while working memory holds the room"
    );
    drop(working);
    let buffer = waiting
        .await
        .unwrap()
        .expect("room once the request's memory drained");
    assert_eq!(kept(&bridge), 4000);
    // Kept memory holds the rest: nothing will drain, so it is refused at
    // once, not after the minute.
    let rest = bridge
        .allocate_resident((1 << 20) - 4000, &Requirements::default())
        .await
        .unwrap();
    let asked = std::time::Instant::now();
    assert_eq!(
        bridge
            .allocate_resident(1, &Requirements::default())
            .await
            .unwrap_err(),
        ResidentError::NoDevice { bytes: 1 }
    );
    assert!(asked.elapsed() < Duration::from_secs(30));
    drop((buffer, rest));
    settles_at(&bridge, 0).await;
}

async fn a_quota_refuses_a_buffer_past_it_before_the_device_is_touched() {
    let bridge = cpu_bridge(1 << 20);
    let quota = ResidentQuota::new(6000);
    let first = bridge
        .allocate_resident_within(&quota, 4000, &Requirements::default())
        .await
        .unwrap();
    assert_eq!((quota.held(), reserved(&bridge)), (4000, 4000));
    // The device has room; the quota has not.
    assert_eq!(
        bridge
            .allocate_resident_within(&quota, 4000, &Requirements::default())
            .await
            .unwrap_err(),
        ResidentError::OverQuota {
            asked: 4000,
            held: 4000,
            limit: 6000
        }
    );
    assert_eq!(reserved(&bridge), 4000, "nothing reserved for the refusal");
    // A buffer the device cannot hold gives its charge back.
    let roomy = ResidentQuota::new(u64::MAX);
    let too_big = bridge
        .allocate_resident_within(&roomy, 2 << 20, &Requirements::default())
        .await;
    assert!(
        matches!(too_big, Err(ResidentError::NoDevice { .. })),
        "{too_big:?}"
    );
    assert_eq!(roomy.held(), 0);
    let second = bridge
        .allocate_resident_within(&quota, 2000, &Requirements::default())
        .await
        .unwrap();
    assert_eq!(quota.held(), 6000);
    drop(first);
    settles_at(&bridge, 2000).await;
    assert_eq!(quota.held(), 2000, "the charge goes with the buffer");
    drop(second);
    settles_at(&bridge, 0).await;
    assert_eq!(quota.held(), 0);
}

async fn batches_over_resident_parts_match_the_cpu() {
    let bridge = cpu_bridge(64 << 20);
    let start: Vec<f32> = (0..5000).map(|i| i as f32 * 0.25 - 300.0).collect();
    assert_eq!(saxpy_rounds(&bridge, &start).await, expected_rounds(&start));

    let (n, k, m) = (20usize, 30usize, 10usize);
    let a: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 - 3.0).collect();
    let b: Vec<f32> = (0..k * m).map(|i| (i % 5) as f32 * 0.5).collect();
    let a_buffer = bridge
        .allocate_resident(a.len() * 4, &Requirements::default())
        .await
        .unwrap();
    let b_buffer = bridge
        .allocate_resident(b.len() * 4, &Requirements::default())
        .await
        .unwrap();
    a_buffer.write(0, &f32s(&a)).await.unwrap();
    b_buffer.write(0, &f32s(&b)).await.unwrap();
    let dims = f32s(&[n as f32, k as f32, m as f32]);
    let product = bridge
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
        .unwrap();
    let whole = shipped::matmul_request(n, k, m, &a, &b).unwrap();
    // The CPU backend directly: through the bridge this small request
    // would take the ring path, whose kernel keeps its rings reserved.
    let expected = CpuBackend::new()
        .run_batch(0, &shipped::MATMUL, &whole)
        .unwrap();
    assert_eq!(product, expected);
    // Only the buffers stay reserved once the batches are done.
    drop((a_buffer, b_buffer));
    settles_at(&bridge, 0).await;
}

async fn misuse_is_typed_and_the_bridge_keeps_serving() {
    let bridge = cpu_bridge(1 << 20);
    let none = Requirements::default();
    match bridge.allocate_resident(2 << 20, &none).await {
        Err(ResidentError::NoDevice { bytes }) => assert_eq!(bytes, 2 << 20),
        other => panic!("a buffer larger than the device: {other:?}"),
    }
    let gpu_only = Requirements {
        backend: Some(BackendKind::Cuda),
        ..Requirements::default()
    };
    assert!(matches!(
        bridge.allocate_resident(16, &gpu_only).await,
        Err(ResidentError::NoDevice { .. })
    ));
    let buffer = bridge.allocate_resident(400, &none).await.unwrap();
    assert_eq!(
        buffer.write(390, &[0; 20]).await,
        Err(ResidentError::OutOfRange {
            offset: 390,
            len: 20,
            buffer: 400
        })
    );
    assert!(matches!(
        buffer.read(usize::MAX, 2).await,
        Err(ResidentError::OutOfRange { .. })
    ));
    let scalar = f32s(&[2.0]);
    let short = bridge.allocate_resident(396, &none).await.unwrap();
    let parts = [
        Part::Host(&scalar),
        Part::Resident(&buffer),
        Part::Resident(&buffer),
    ];
    assert!(matches!(
        bridge
            .execute_resident("saxpy", &parts, Output::Into(&short))
            .await,
        Err(ExecuteError::WrongBuffer { .. })
    ));
    assert!(matches!(
        bridge
            .execute_resident("saxpy", &[Part::Host(&scalar)], Output::Host)
            .await,
        Err(ExecuteError::WrongBuffer { .. })
    ));
    let nan = f32s(&[f32::NAN]);
    assert!(matches!(
        bridge
            .execute_resident(
                "saxpy",
                &[
                    Part::Host(&nan),
                    Part::Resident(&buffer),
                    Part::Resident(&buffer)
                ],
                Output::Into(&buffer),
            )
            .await,
        Err(ExecuteError::Rejected { .. })
    ));
    assert!(matches!(
        bridge
            .execute_resident("no_such_kernel", &parts, Output::Host)
            .await,
        Err(ExecuteError::UnknownKernel(_))
    ));
    // Still serving, and the failed batches released what they reserved.
    bridge
        .execute_resident("saxpy", &parts, Output::Into(&buffer))
        .await
        .unwrap();
    settles_at(&bridge, 796).await;
    bridge.shutdown(StopMode::Drain).await;
    assert_eq!(
        bridge.allocate_resident(4, &none).await.unwrap_err(),
        ResidentError::ShutDown
    );
    assert!(matches!(
        bridge
            .execute_resident("saxpy", &parts, Output::Into(&buffer))
            .await,
        Err(ExecuteError::ShutDown)
    ));
}

async fn a_caller_that_gives_up_never_frees_memory_under_the_job() {
    let bridge = cpu_bridge(256 << 20);
    let buffer = bridge
        .allocate_resident(16 << 20, &Requirements::default())
        .await
        .unwrap();
    let scalar = f32s(&[1.5]);
    let parts = [
        Part::Host(&scalar),
        Part::Resident(&buffer),
        Part::Resident(&buffer),
    ];
    for _ in 0..5 {
        let call = bridge.execute_resident("saxpy", &parts, Output::Host);
        // Give up almost at once: the job, if started, runs to its end and
        // holds the buffer and its own reservation until then.
        let _ = tokio::time::timeout(Duration::from_micros(50), call).await;
    }
    drop(buffer);
    settles_at(&bridge, 0).await;
}

async fn on_opencl_the_buffer_lives_on_the_device() {
    let opencl = granary_kernels::opencl::OpenClBackend::discover()
        .expect("an OpenCL runtime was found at build time");
    let bridge = GpuBridge::builder()
        .backend(Arc::new(opencl))
        .kernels(shipped::ALL)
        .build()
        .unwrap();
    let start: Vec<f32> = (0..3000).map(|i| (i % 100) as f32 * 0.125).collect();
    let buffer = bridge
        .allocate_resident(4, &Requirements::default())
        .await
        .unwrap();
    assert_eq!(buffer.backend(), BackendKind::OpenCl, "a primary device");
    assert_eq!(saxpy_rounds(&bridge, &start).await, expected_rounds(&start));
    // A buffer on the CPU fallback device and one on OpenCL do not mix.
    let cpu_only = Requirements {
        backend: Some(BackendKind::Cpu),
        ..Requirements::default()
    };
    let on_cpu = bridge.allocate_resident(4, &cpu_only).await.unwrap();
    assert_eq!(on_cpu.backend(), BackendKind::Cpu);
    let scalar = f32s(&[1.0]);
    assert!(matches!(
        bridge
            .execute_resident(
                "saxpy",
                &[
                    Part::Host(&scalar),
                    Part::Resident(&buffer),
                    Part::Resident(&on_cpu)
                ],
                Output::Host,
            )
            .await,
        Err(ExecuteError::WrongBuffer { .. })
    ));
}

async fn a_device_memory_limit_caps_what_each_device_lends() {
    let bridge = GpuBridge::builder()
        .kernels(shipped::ALL)
        .cpu_backend(CpuBackend::with_device(DeviceInfo {
            total_memory: 64 << 20,
            free_memory: 48 << 20,
            ..host_device()
        }))
        .device_memory_limit(1 << 20)
        .build()
        .unwrap();
    let (_, info, stats) = bridge.devices().remove(0);
    assert_eq!((info.total_memory, info.free_memory), (1 << 20, 1 << 20));
    assert_eq!(stats.available, 1 << 20);
    assert!(matches!(
        bridge
            .allocate_resident((1 << 20) + 1, &Requirements::default())
            .await,
        Err(ResidentError::NoDevice { .. })
    ));
    let whole = bridge
        .allocate_resident(1 << 20, &Requirements::default())
        .await
        .unwrap();
    assert_eq!(reserved(&bridge), 1 << 20);
    drop(whole);
    settles_at(&bridge, 0).await;
    // A limit above what the device has changes nothing.
    let roomy = GpuBridge::builder()
        .cpu_backend(CpuBackend::with_device(DeviceInfo {
            total_memory: 64 << 20,
            free_memory: 48 << 20,
            ..host_device()
        }))
        .device_memory_limit(1 << 40)
        .build()
        .unwrap();
    let (_, info, _) = roomy.devices().remove(0);
    assert_eq!((info.total_memory, info.free_memory), (64 << 20, 48 << 20));
}

async fn a_buffer_from_another_bridge_is_refused_even_on_the_same_device_number() {
    // Both bridges' CPU device is their device 0.
    let (ours, theirs) = (cpu_bridge(1 << 20), cpu_bridge(1 << 20));
    let mine = ours
        .allocate_resident(16, &Requirements::default())
        .await
        .unwrap();
    let foreign = theirs
        .allocate_resident(16, &Requirements::default())
        .await
        .unwrap();
    let scalar = f32s(&[2.0]);
    for (parts, output) in [
        (
            [
                Part::Host(&scalar),
                Part::Resident(&foreign),
                Part::Resident(&mine),
            ],
            Output::Host,
        ),
        (
            [
                Part::Host(&scalar),
                Part::Resident(&mine),
                Part::Resident(&mine),
            ],
            Output::Into(&foreign),
        ),
    ] {
        match ours.execute_resident("saxpy", &parts, output).await {
            Err(ExecuteError::WrongBuffer { reason, .. }) => {
                assert!(reason.contains("another bridge"), "{reason}")
            }
            other => panic!("a foreign buffer: {other:?}"),
        }
    }
    // The bridge keeps serving its own buffers.
    let returned = ours
        .execute_resident(
            "saxpy",
            &[
                Part::Host(&scalar),
                Part::Resident(&mine),
                Part::Resident(&mine),
            ],
            Output::Host,
        )
        .await
        .unwrap();
    assert_eq!(returned.len(), 16);
}

/// A CPU backend with two devices of `free` bytes each: a node with two
/// GPUs, each with its own memory.
fn two_device_bridge(free: u64) -> GpuBridge {
    let device = DeviceInfo {
        total_memory: free,
        free_memory: free,
        ..host_device()
    };
    GpuBridge::builder()
        .kernels(shipped::ALL)
        .cpu_backend(CpuBackend::with_devices(vec![device; 2]))
        .build()
        .unwrap()
}

fn kept_on(bridge: &GpuBridge, device: DeviceId) -> u64 {
    bridge.broker().stats(device).unwrap().kept
}

async fn a_buffer_moves_between_two_devices_with_its_bytes_charge_and_clones() {
    let bridge = two_device_bridge(1 << 20);
    let (zero, one) = (DeviceId(0), DeviceId(1));
    let quota = ResidentQuota::new(64 << 10);
    let buffer = bridge
        .allocate_resident_within_on(&quota, zero, 64 << 10, &Requirements::default())
        .await
        .unwrap();
    let bytes: Vec<u8> = (0..64 << 10).map(|i| (i * 7 + 3) as u8).collect();
    buffer.import(bytes.clone()).await.unwrap();
    let clone = buffer.clone();
    let weak = buffer.downgrade();
    let moved = bridge.relocate(&buffer, one).await.unwrap();
    assert_eq!(moved.bytes, 64 << 10);
    assert!(moved.direct, "the CPU backend copies between its devices");
    // Every handle follows; the old device's memory is free, the new
    // device keeps it, and the holder is charged once throughout.
    assert_eq!(clone.device(), one);
    assert!(weak.upgrade().unwrap().same_buffer(&buffer));
    assert_eq!(clone.export().await.unwrap(), bytes);
    assert_eq!(
        (kept_on(&bridge, zero), kept_on(&bridge, one)),
        (0, 64 << 10)
    );
    assert_eq!(quota.held(), 64 << 10);
    // It works where it is now, and moves back.
    let scalar = f32s(&[1.0]);
    let doubled = bridge
        .execute_resident(
            "saxpy",
            &[
                Part::Host(&scalar),
                Part::Resident(&buffer),
                Part::Resident(&clone),
            ],
            Output::Host,
        )
        .await
        .unwrap();
    assert_eq!(doubled.len(), 64 << 10);
    bridge.relocate(&clone, zero).await.unwrap();
    assert_eq!(buffer.export().await.unwrap(), bytes);
    assert_eq!(
        (kept_on(&bridge, zero), kept_on(&bridge, one)),
        (64 << 10, 0)
    );
    drop((buffer, clone));
    assert!(weak.upgrade().is_none());
    assert_eq!((kept_on(&bridge, zero), kept_on(&bridge, one)), (0, 0));
    assert_eq!(quota.held(), 0);
}

async fn a_refused_move_is_typed_and_leaves_the_buffer_where_it_was() {
    let bridge = two_device_bridge(1 << 20);
    let (zero, one) = (DeviceId(0), DeviceId(1));
    let buffer = bridge
        .allocate_resident(512 << 10, &Requirements::default())
        .await
        .unwrap();
    let here = buffer.device();
    let there = if here == zero { one } else { zero };
    buffer.write(0, &[9; 16]).await.unwrap();
    assert_eq!(
        bridge.relocate(&buffer, here).await,
        Err(RelocateError::AlreadyThere { device: here })
    );
    assert_eq!(
        bridge.relocate(&buffer, DeviceId(2)).await,
        Err(RelocateError::NoSuchDevice {
            device: DeviceId(2)
        })
    );
    // The other device has no room for it.
    let ballast = bridge
        .allocate_resident_within_on(
            &ResidentQuota::new(u64::MAX),
            there,
            768 << 10,
            &Requirements::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        bridge.relocate(&buffer, there).await,
        Err(RelocateError::Resident(ResidentError::NoDevice {
            bytes: 512 << 10
        }))
    );
    // Another bridge's buffer is not this bridge's to move.
    let other = two_device_bridge(1 << 20);
    let foreign = other
        .allocate_resident(16, &Requirements::default())
        .await
        .unwrap();
    assert_eq!(
        bridge.relocate(&foreign, there).await,
        Err(RelocateError::Foreign)
    );
    assert_eq!(buffer.device(), here);
    assert_eq!(buffer.read(0, 16).await.unwrap(), vec![9; 16]);
    assert_eq!(kept_on(&bridge, here), 512 << 10);
    assert_eq!(kept_on(&bridge, there), 768 << 10);
    drop(ballast);
    bridge.relocate(&buffer, there).await.unwrap();
    assert_eq!(buffer.read(0, 16).await.unwrap(), vec![9; 16]);
}

/// Several buffers move together or not at all: with room for one of two
/// on the target, neither moves and nothing is freed; a device that does
/// not meet what a buffer was made for is refused.
async fn buffers_moved_together_move_all_or_none() {
    let bridge = two_device_bridge(1 << 20);
    let (zero, one) = (DeviceId(0), DeviceId(1));
    let quota = ResidentQuota::new(u64::MAX);
    let mut held = Vec::new();
    for fill in [1u8, 2] {
        let buffer = bridge
            .allocate_resident_within_on(&quota, zero, 384 << 10, &Requirements::default())
            .await
            .unwrap();
        buffer.write(0, &[fill; 8]).await.unwrap();
        held.push(buffer);
    }
    let ballast = bridge
        .allocate_resident_within_on(&quota, one, 512 << 10, &Requirements::default())
        .await
        .unwrap();
    assert_eq!(
        bridge.relocate_all(&held, one).await,
        Err(RelocateError::Resident(ResidentError::NoDevice {
            bytes: 768 << 10
        }))
    );
    for (buffer, fill) in held.iter().zip([1u8, 2]) {
        assert_eq!(buffer.device(), zero);
        assert_eq!(buffer.read(0, 8).await.unwrap(), vec![fill; 8]);
    }
    assert_eq!(
        (kept_on(&bridge, zero), kept_on(&bridge, one)),
        (768 << 10, 512 << 10)
    );
    drop(ballast);
    // The same buffer twice is one buffer.
    let twice = [held[0].clone(), held[1].clone(), held[0].clone()];
    let moved = bridge.relocate_all(&twice, one).await.unwrap();
    assert_eq!(moved.bytes, 768 << 10);
    assert!(held.iter().all(|buffer| buffer.device() == one));
    // A buffer made to need 4 compute units does not move to a device of
    // 2; one made to need nothing does.
    let unlike = GpuBridge::builder()
        .cpu_backend(CpuBackend::with_devices(vec![
            DeviceInfo {
                total_memory: 1 << 20,
                free_memory: 1 << 20,
                compute_units: 8,
                ..host_device()
            },
            DeviceInfo {
                total_memory: 1 << 20,
                free_memory: 1 << 20,
                compute_units: 2,
                ..host_device()
            },
        ]))
        .build()
        .unwrap();
    let wide = Requirements {
        min_compute_units: 4,
        ..Requirements::default()
    };
    let needs_four = unlike.allocate_resident(16, &wide).await.unwrap();
    assert_eq!(needs_four.device(), zero);
    assert_eq!(
        unlike.relocate(&needs_four, one).await,
        Err(RelocateError::Unlike { device: one })
    );
    let any = unlike
        .allocate_resident_within_on(&quota, zero, 16, &Requirements::default())
        .await
        .unwrap();
    unlike.relocate(&any, one).await.unwrap();
    assert_eq!(any.device(), one);
}

/// Writes from many tasks race moves back and forth: a move waits for
/// every write under way and every write after it reaches the new
/// memory, so none is lost.
async fn no_write_is_lost_to_a_move_under_way() {
    let bridge = Arc::new(two_device_bridge(1 << 20));
    let buffer = bridge
        .allocate_resident(64 << 10, &Requirements::default())
        .await
        .unwrap();
    let writers: Vec<_> = (0..8u8)
        .map(|writer| {
            let buffer = buffer.clone();
            tokio::spawn(async move {
                for n in 0..200usize {
                    let at = (writer as usize * 200 + n) * 4;
                    buffer.write(at, &[writer + 1; 4]).await.unwrap();
                }
            })
        })
        .collect();
    let mover = {
        let (bridge, buffer) = (bridge.clone(), buffer.clone());
        tokio::spawn(async move {
            let mut moves = 0;
            for _ in 0..50 {
                let to = DeviceId(1 - buffer.device().0);
                bridge.relocate(&buffer, to).await.unwrap();
                moves += 1;
                tokio::task::yield_now().await;
            }
            moves
        })
    };
    for writer in writers {
        writer.await.unwrap();
    }
    assert_eq!(mover.await.unwrap(), 50);
    let bytes = buffer.export().await.unwrap();
    for writer in 0..8u8 {
        for n in 0..200usize {
            let at = (writer as usize * 200 + n) * 4;
            assert_eq!(
                bytes[at..at + 4],
                [writer + 1; 4],
                "writer {writer}, write {n}"
            );
        }
    }
    assert_eq!(
        kept_on(&bridge, DeviceId(0)) + kept_on(&bridge, DeviceId(1)),
        64 << 10
    );
}

async fn on_opencl_a_buffer_moves_to_the_cpu_device_through_the_host() {
    let opencl = granary_kernels::opencl::OpenClBackend::discover()
        .expect("an OpenCL runtime was found at build time");
    let bridge = GpuBridge::builder()
        .backend(Arc::new(opencl))
        .kernels(shipped::ALL)
        .build()
        .unwrap();
    let buffer = bridge
        .allocate_resident(256 << 10, &Requirements::default())
        .await
        .unwrap();
    assert_eq!(buffer.backend(), BackendKind::OpenCl);
    let on_opencl = buffer.device();
    let bytes: Vec<u8> = (0..256 << 10).map(|i| (i % 251) as u8).collect();
    buffer.import(bytes.clone()).await.unwrap();
    let cpu = bridge
        .devices()
        .into_iter()
        .find(|(_, info, _)| info.backend == BackendKind::Cpu)
        .map(|(id, _, _)| id)
        .expect("the CPU fallback device");
    let moved = bridge.relocate(&buffer, cpu).await.unwrap();
    assert!(!moved.direct, "two backends: through the host");
    assert_eq!(buffer.backend(), BackendKind::Cpu);
    assert_eq!(buffer.export().await.unwrap(), bytes);
    bridge.relocate(&buffer, on_opencl).await.unwrap();
    assert_eq!(buffer.backend(), BackendKind::OpenCl);
    assert_eq!(buffer.export().await.unwrap(), bytes);
}

fn main() {
    gate::run(vec![
        gate::test(
            "a_resident_buffer_is_reserved_while_it_lives_and_released_after",
            || common::on_tokio(a_resident_buffer_is_reserved_while_it_lives_and_released_after),
        ),
        gate::test(
            "a_buffer_waits_for_working_memory_to_drain_but_not_for_kept_memory",
            || common::on_tokio(a_buffer_waits_for_working_memory_to_drain_but_not_for_kept_memory),
        ),
        gate::test(
            "a_quota_refuses_a_buffer_past_it_before_the_device_is_touched",
            || common::on_tokio(a_quota_refuses_a_buffer_past_it_before_the_device_is_touched),
        ),
        gate::test("batches_over_resident_parts_match_the_cpu", || {
            common::on_tokio(batches_over_resident_parts_match_the_cpu)
        }),
        gate::test("misuse_is_typed_and_the_bridge_keeps_serving", || {
            common::on_tokio(misuse_is_typed_and_the_bridge_keeps_serving)
        }),
        gate::test(
            "a_caller_that_gives_up_never_frees_memory_under_the_job",
            || common::on_tokio(a_caller_that_gives_up_never_frees_memory_under_the_job),
        ),
        gate::opencl("on_opencl_the_buffer_lives_on_the_device", || {
            common::on_tokio(on_opencl_the_buffer_lives_on_the_device)
        }),
        gate::test("a_device_memory_limit_caps_what_each_device_lends", || {
            common::on_tokio(a_device_memory_limit_caps_what_each_device_lends)
        }),
        gate::test(
            "a_buffer_from_another_bridge_is_refused_even_on_the_same_device_number",
            || {
                common::on_tokio(
                    a_buffer_from_another_bridge_is_refused_even_on_the_same_device_number,
                )
            },
        ),
        gate::test(
            "a_buffer_moves_between_two_devices_with_its_bytes_charge_and_clones",
            || {
                common::on_tokio(
                    a_buffer_moves_between_two_devices_with_its_bytes_charge_and_clones,
                )
            },
        ),
        gate::test(
            "a_refused_move_is_typed_and_leaves_the_buffer_where_it_was",
            || common::on_tokio(a_refused_move_is_typed_and_leaves_the_buffer_where_it_was),
        ),
        gate::test("buffers_moved_together_move_all_or_none", || {
            common::on_tokio(buffers_moved_together_move_all_or_none)
        }),
        gate::test("no_write_is_lost_to_a_move_under_way", || {
            common::on_tokio(no_write_is_lost_to_a_move_under_way)
        }),
        gate::opencl(
            "on_opencl_a_buffer_moves_to_the_cpu_device_through_the_host",
            || common::on_tokio(on_opencl_a_buffer_moves_to_the_cpu_device_through_the_host),
        ),
    ]);
}
