//! The CPU backend's persistent kernel, end to end through its rings.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use granary_kernels::shipped::{DOT, DOUBLE, SAXPY, VECTOR_ADD};
use granary_kernels::{
    CpuPersistentKernel, ElementType, KernelConfig, KernelSpec, LaunchError, Shape, Status,
    StopMode, SubmitError,
};
use proptest::prelude::*;

const WAIT: Duration = Duration::from_secs(10);

mod common;
use common::{f32s, from_f32s};

fn launch(spec: KernelSpec) -> CpuPersistentKernel {
    CpuPersistentKernel::launch(spec, KernelConfig::default()).unwrap()
}

#[test]
fn one_hundred_sequential_double_requests_are_each_answered_correctly() {
    let mut kernel = launch(DOUBLE);
    for i in 0..100u64 {
        let input = [i as f32, -(i as f32) / 3.0, 0.5];
        kernel.submit(i, f32s(&input)).unwrap();
        let done = kernel.complete(WAIT).expect("a completion within 10 s");
        assert_eq!((done.request_id, done.status), (i, Status::Ok));
        assert_eq!(from_f32s(&done.payload), input.map(|x| 2.0 * x));
    }
    let report = kernel.stop(StopMode::Drain);
    assert_eq!((report.processed, report.abandoned.len()), (100, 0));
    assert!(!report.thread_panicked);
}

#[test]
fn eight_concurrent_callers_ten_thousand_requests_each_nothing_lost_or_mixed() {
    let mut kernel = launch(DOUBLE);
    let callers: Vec<_> = (0..8u64)
        .map(|caller| {
            let submitter = kernel.submitter();
            thread::spawn(move || {
                for n in 0..10_000u64 {
                    let id = caller << 32 | n;
                    let mut payload = f32s(&[id as f32, caller as f32]);
                    loop {
                        match submitter.submit(id, payload) {
                            Ok(()) => break,
                            Err(SubmitError::Full(back)) => {
                                payload = back;
                                thread::yield_now();
                            }
                            Err(err) => panic!("{err}"),
                        }
                    }
                }
            })
        })
        .collect();
    let mut seen = HashMap::new();
    // Bounded only so that a kernel that stops answering fails the test
    // rather than hanging it: 30 s without a single answer, however long
    // the whole run takes on a loaded machine.
    let mut last_answer = Instant::now();
    while seen.len() < 80_000 {
        assert!(
            last_answer.elapsed() < Duration::from_secs(30),
            "only {} answered",
            seen.len()
        );
        if let Some(done) = kernel.complete(Duration::from_millis(10)) {
            last_answer = Instant::now();
            assert_eq!(done.status, Status::Ok);
            let caller = done.request_id >> 32;
            assert_eq!(
                from_f32s(&done.payload),
                [2.0 * done.request_id as f32, 2.0 * caller as f32],
                "answer does not belong to request {:#x}",
                done.request_id
            );
            assert!(
                seen.insert(done.request_id, ()).is_none(),
                "duplicate {:#x}",
                done.request_id
            );
        }
    }
    for caller in callers {
        caller.join().unwrap();
    }
    let report = kernel.stop(StopMode::Drain);
    assert_eq!(report.processed, 80_000);
    assert!(report.completions.is_empty() && report.abandoned.is_empty());
}

#[test]
fn drain_answers_every_request_in_flight() {
    let mut kernel = launch(DOUBLE);
    for i in 0..500u64 {
        kernel.submit(i, f32s(&[i as f32])).unwrap();
    }
    let early = kernel.try_complete().into_iter().count();
    let report = kernel.stop(StopMode::Drain);
    assert!(report.abandoned.is_empty());
    assert_eq!(report.completions.len() + early, 500);
    assert_eq!(report.processed, 500);
}

/// More answers outstanding than the response ring holds: the draining
/// stop takes completions while the loop finishes, so the loop finds room
/// and every request is answered (it waited for room for good before).
#[test]
fn drain_answers_more_requests_than_the_response_ring_holds() {
    let mut kernel = CpuPersistentKernel::launch(
        DOUBLE,
        KernelConfig {
            capacity: 2,
            ..KernelConfig::default()
        },
    )
    .unwrap();
    for id in 0..2u64 {
        kernel.submit(id, f32s(&[id as f32])).unwrap();
    }
    // Both answered, not collected: the response ring is full.
    let deadline = Instant::now() + WAIT;
    while kernel.processed() < 2 {
        assert!(Instant::now() < deadline, "the first two are answered");
        thread::yield_now();
    }
    for id in 2..4u64 {
        kernel.submit(id, f32s(&[id as f32])).unwrap();
    }
    let report = kernel.stop_within(StopMode::Drain, WAIT);
    assert!(report.exited, "the draining stop ends");
    let mut answered: Vec<u64> = report.completions.iter().map(|c| c.request_id).collect();
    answered.sort_unstable();
    assert_eq!(answered, [0, 1, 2, 3]);
    assert!(report.abandoned.is_empty());
}

#[test]
fn abandon_reports_every_unprocessed_request_exactly_once() {
    // A kernel whose first call holds until the test lets it go, so that
    // requests are still queued when it stops however the threads are
    // scheduled.
    static ENTERED: AtomicBool = AtomicBool::new(false);
    static RELEASED: AtomicBool = AtomicBool::new(false);
    fn held_double(request: &[u8], response: &mut [u8]) -> Result<usize, Status> {
        if !ENTERED.swap(true, Ordering::SeqCst) {
            while !RELEASED.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(1));
            }
        }
        (DOUBLE.cpu.unwrap())(request, response)
    }
    let held = KernelSpec {
        id: "held_double",
        cpu: Some(held_double),
        ..DOUBLE
    };
    let kernel = launch(held);
    for i in 0..200u64 {
        kernel.submit(i, f32s(&[1.0])).unwrap();
    }
    // Bounded only so that a broken kernel fails rather than hangs.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ENTERED.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the kernel never took a request");
        thread::sleep(Duration::from_millis(1));
    }
    // The kernel holds request 0. Stop it from another thread, and let the
    // held call go only once the stop flag is set: `stop` sets it before it
    // closes the request ring, so a submit refused as `Stopped` shows it.
    // Submits accepted before that are queued like the rest.
    let submitter = kernel.submitter();
    let stopping = thread::spawn(move || kernel.stop(StopMode::Abandon));
    let mut submitted: Vec<u64> = (0..200).collect();
    loop {
        assert!(Instant::now() < deadline, "the ring never closed");
        let id = 1000 + submitted.len() as u64;
        match submitter.submit(id, f32s(&[1.0])) {
            Ok(()) => submitted.push(id),
            Err(SubmitError::Stopped(_)) => break,
            Err(SubmitError::Full(_)) => {}
            Err(err) => panic!("{err}"),
        }
        thread::sleep(Duration::from_millis(1));
    }
    RELEASED.store(true, Ordering::SeqCst);
    let report = stopping.join().unwrap();
    let mut ids: Vec<u64> = report.completions.iter().map(|c| c.request_id).collect();
    ids.extend(&report.abandoned);
    ids.sort_unstable();
    assert_eq!(ids, submitted, "each request answered or abandoned once");
    // Abandon ran nothing of the queue: the held request was the last.
    assert_eq!(report.processed, 1, "abandon waited for the queue");
    assert_eq!(report.abandoned.len(), submitted.len() - 1);
    assert!(!report.thread_panicked);
}

#[test]
fn bad_requests_get_typed_errors_and_statuses_and_the_kernel_keeps_serving() {
    fn panics(_: &[u8], _: &mut [u8]) -> Result<usize, Status> {
        panic!("kernel bug (expected in this test)");
    }
    let mut kernel = launch(SAXPY);
    // Host-side shape check: not a whole number of f32s.
    match kernel.submit(1, vec![0u8; 7]) {
        Err(SubmitError::WrongShape(err, payload)) => {
            assert_eq!((err.len, payload.len()), (7, 7));
        }
        other => panic!("expected WrongShape, got {other:?}"),
    }
    // Even count: passes the shape, refused by the kernel with a status.
    kernel.submit(2, f32s(&[1.0, 2.0, 3.0, 4.0])).unwrap();
    assert_eq!(
        kernel
            .complete(WAIT)
            .expect("a completion within 10 s")
            .status,
        Status::BadLength
    );
    // Non-finite scale.
    kernel.submit(3, f32s(&[f32::NAN, 1.0, 2.0])).unwrap();
    assert_eq!(
        kernel
            .complete(WAIT)
            .expect("a completion within 10 s")
            .status,
        Status::BadInput
    );
    // And a good one after both.
    kernel.submit(4, f32s(&[2.0, 1.0, 10.0])).unwrap();
    let done = kernel.complete(WAIT).expect("a completion within 10 s");
    assert_eq!(
        (done.request_id, done.status, from_f32s(&done.payload)),
        (4, Status::Ok, vec![12.0])
    );
    drop(kernel);

    let mut kernel = launch(KernelSpec {
        id: "panics",
        cpu: Some(panics),
        ..DOUBLE
    });
    kernel.submit(5, f32s(&[1.0])).unwrap();
    let done = kernel.complete(WAIT).expect("a completion within 10 s");
    assert_eq!(
        (done.request_id, done.status, done.payload.len()),
        (5, Status::Fault, 0)
    );
    kernel.submit(6, f32s(&[1.0])).unwrap();
    assert_eq!(
        kernel
            .complete(WAIT)
            .expect("a completion within 10 s")
            .request_id,
        6,
        "still serving after a panic"
    );
    assert!(!kernel.stop(StopMode::Drain).thread_panicked);
}

#[test]
fn after_stop_submits_fail_and_completions_end() {
    let mut kernel = launch(DOUBLE);
    let submitter = kernel.submitter();
    kernel.submit(1, f32s(&[1.0])).unwrap();
    assert_eq!(
        kernel
            .complete(WAIT)
            .expect("a completion within 10 s")
            .request_id,
        1
    );
    let report = kernel.stop(StopMode::Drain);
    assert_eq!(report.processed, 1);
    assert!(matches!(
        submitter.submit(2, f32s(&[1.0])),
        Err(SubmitError::Stopped(_))
    ));
}

#[test]
fn the_heartbeat_advances_while_idle() {
    let kernel = launch(DOUBLE);
    let first = kernel.heartbeat();
    // Bounded only so that a loop that never beats fails rather than hangs.
    let deadline = Instant::now() + Duration::from_secs(30);
    while kernel.heartbeat() <= first {
        assert!(Instant::now() < deadline, "an idle loop still beats");
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn dropping_a_running_kernel_joins_its_thread() {
    let kernel = launch(DOUBLE);
    for i in 0..100u64 {
        kernel.submit(i, f32s(&[1.0])).unwrap();
    }
    let started = Instant::now();
    drop(kernel);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_spec_without_a_cpu_implementation_is_refused() {
    let spec = KernelSpec {
        id: "device_only",
        cpu: None,
        ..DOUBLE
    };
    assert_eq!(
        CpuPersistentKernel::launch(spec, KernelConfig::default()).unwrap_err(),
        LaunchError::NoCpuImplementation {
            kernel: "device_only"
        }
    );
    let bad_ring = KernelConfig {
        capacity: 3,
        ..KernelConfig::default()
    };
    assert!(matches!(
        CpuPersistentKernel::launch(DOUBLE, bad_ring),
        Err(LaunchError::Ring(_))
    ));
}

#[test]
fn shapes_accept_exactly_what_they_describe() {
    let pairs = Shape::between(ElementType::F32, 2, 8, 2);
    assert_eq!(pairs.check(8), Ok(2));
    assert!(pairs.check(12).is_err(), "3 elements is odd");
    assert!(pairs.check(9).is_err(), "not whole f32s");
    assert!(pairs.check(0).is_err() && pairs.check(40).is_err());
    assert_eq!(Shape::exactly(ElementType::F64, 3).check(24), Ok(3));
    assert_eq!(pairs.max_bytes(), 32);
}

proptest! {
    #[test]
    fn shipped_kernels_match_a_direct_computation(
        x in prop::collection::vec(-1e3f32..1e3, 1..64),
        seed in -1e3f32..1e3,
    ) {
        let y: Vec<f32> = x.iter().map(|v| v * 0.5 + seed).collect();
        let mut out = vec![0u8; 8192];
        let run = |spec: KernelSpec, request: Vec<u8>, out: &mut [u8]| {
            (spec.cpu.unwrap())(&request, out).map(|n| from_f32s(&out[..n]))
        };
        prop_assert_eq!(run(DOUBLE, f32s(&x), &mut out), Ok(x.iter().map(|v| 2.0 * v).collect::<Vec<_>>()));
        let xy = [x.clone(), y.clone()].concat();
        prop_assert_eq!(
            run(VECTOR_ADD, f32s(&xy), &mut out),
            Ok(x.iter().zip(&y).map(|(a, b)| a + b).collect::<Vec<_>>())
        );
        let axy = [vec![seed], x.clone(), y.clone()].concat();
        prop_assert_eq!(
            run(SAXPY, f32s(&axy), &mut out),
            Ok(x.iter().zip(&y).map(|(a, b)| seed * a + b).collect::<Vec<_>>())
        );
        let dot: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        prop_assert_eq!(run(DOT, f32s(&xy), &mut out), Ok(vec![dot]));
    }
}

#[test]
fn abandon_reports_the_request_a_hang_held() {
    // The kernel takes request 7 and holds it (a hang armed through the
    // backend's hooks): an abandoning stop ends the hang and must list 7,
    // whose slot the kernel had already taken from the request ring.
    let backend = granary_kernels::CpuBackend::new();
    backend.hooks().hang_after(0, Duration::from_secs(60));
    let mut kernel =
        granary_kernels::Backend::launch(&backend, 0, DOUBLE, &KernelConfig::default()).unwrap();
    kernel.submitter().unwrap().submit(7, f32s(&[1.0])).unwrap();
    let deadline = Instant::now() + WAIT;
    while backend.hooks().is_armed() {
        assert!(
            Instant::now() < deadline,
            "the kernel never took the request"
        );
        thread::sleep(Duration::from_millis(1));
    }
    let report = kernel.stop(StopMode::Abandon, WAIT);
    assert!(report.exited);
    assert!(report.completions.is_empty());
    assert_eq!(report.abandoned, [7]);
}

#[test]
fn abandon_lists_a_request_published_after_the_stop_began() {
    // A batch whose second look at a payload (after its slots are claimed)
    // waits for the test: the stop closes the ring and the kernel exits
    // while that claim is unpublished. The batch then lands (`Ok`), so
    // the stop must wait for it and list it as abandoned.
    static HELD: AtomicBool = AtomicBool::new(false);
    static RELEASED: AtomicBool = AtomicBool::new(false);
    struct Slow {
        looks: std::cell::Cell<u32>,
        bytes: Vec<u8>,
    }
    impl AsRef<[u8]> for Slow {
        fn as_ref(&self) -> &[u8] {
            let looks = self.looks.get();
            self.looks.set(looks + 1);
            if looks == 1 {
                HELD.store(true, Ordering::SeqCst);
                while !RELEASED.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(1));
                }
            }
            &self.bytes
        }
    }
    let backend = granary_kernels::CpuBackend::new();
    let mut kernel =
        granary_kernels::Backend::launch(&backend, 0, DOUBLE, &KernelConfig::default()).unwrap();
    let submitter = kernel.submitter().unwrap();
    let submitting = thread::spawn(move || {
        let slow = Slow {
            looks: std::cell::Cell::new(0),
            bytes: f32s(&[1.0]),
        };
        submitter.submit_batch(&[(9, slow)]).is_ok()
    });
    let deadline = Instant::now() + WAIT;
    while !HELD.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the batch never claimed its slot"
        );
        thread::sleep(Duration::from_millis(1));
    }
    let stopping = thread::spawn(move || kernel.stop(StopMode::Abandon, WAIT));
    // Long enough for the kernel to see the stop and exit (it polls every
    // millisecond) and for the stop to look at what is left.
    thread::sleep(Duration::from_millis(300));
    RELEASED.store(true, Ordering::SeqCst);
    assert!(submitting.join().unwrap(), "the batch was enqueued");
    let report = stopping.join().unwrap();
    let mut ids: Vec<u64> = report.completions.iter().map(|c| c.request_id).collect();
    ids.extend(&report.abandoned);
    assert_eq!(ids, [9], "answered or listed as abandoned, once");
}

#[test]
fn a_shape_too_large_for_a_ring_is_refused_at_launch() {
    // 2^30 floats is 4 GiB: more than a ring's slot holds. Truncated to 32
    // bits it once made a ring with no room, and the first request
    // panicked the kernel thread.
    let spec = KernelSpec {
        response: Shape::between(ElementType::F32, 1, 1 << 30, 1),
        ..DOUBLE
    };
    match CpuPersistentKernel::launch(spec, KernelConfig::default()) {
        Err(LaunchError::Ring(_)) => {}
        other => panic!("expected a ring error, got {other:?}"),
    }
}
