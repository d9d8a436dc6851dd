//! The mailbox under stress: senders parked while the runtime that swept
//! them goes away, constant deactivation with cached references and
//! abandoned sends, and shutdowns racing with idle activations and parked
//! senders. Each found a defect in review.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use granary_actors::{
    CallError, Grain, GrainContext, GrainKey, Handler, Message, Silo, SiloConfig,
};
use tokio::time::Instant;

#[derive(Default)]
struct Log(Mutex<HashMap<u64, Vec<u64>>>);

struct Rec {
    log: Option<Arc<Log>>,
}
impl Grain for Rec {
    fn new(_: &GrainKey) -> Rec {
        Rec { log: None }
    }
    async fn on_activate(
        &mut self,
        ctx: &mut GrainContext,
    ) -> Result<(), granary_actors::ActivationError> {
        self.log = ctx.service::<Log>();
        Ok(())
    }
}
struct Note(u64, u64);
impl Message for Note {
    type Reply = ();
}
impl Handler<Note> for Rec {
    async fn handle(&mut self, Note(s, n): Note, _: &mut GrainContext) {
        if let Some(log) = &self.log {
            log.0.lock().unwrap().entry(s).or_default().push(n);
        }
    }
}
struct Nap(Duration);
impl Message for Nap {
    type Reply = ();
}
impl Handler<Nap> for Rec {
    async fn handle(&mut self, Nap(d): Nap, _: &mut GrainContext) {
        tokio::time::sleep(d).await;
    }
}

/// A [`Nap`] that says when its turn has begun.
struct Busy(Arc<AtomicBool>, Duration);
impl Message for Busy {
    type Reply = ();
}
impl Handler<Busy> for Rec {
    async fn handle(&mut self, Busy(started, d): Busy, _: &mut GrainContext) {
        started.store(true, Ordering::SeqCst);
        tokio::time::sleep(d).await;
    }
}

fn silo(config: SiloConfig, log: Arc<Log>) -> Silo {
    Silo::builder()
        .register::<Rec>("rec")
        .service(log)
        .config(config)
        .build()
        .unwrap()
}

/// The sweeper runs on the runtime of the first sender that parks; when
/// that runtime goes away, the next parked sender starts another.
#[test]
fn a_parked_sender_times_out_after_another_runtime_parked_first() {
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let silo = silo(
        SiloConfig {
            mailbox_capacity: 1,
            call_timeout: Duration::from_millis(300),
            ..SiloConfig::default()
        },
        Arc::default(),
    );
    let grain = silo.grain::<Rec>("k");
    main.block_on(async {
        // A ten-second turn under way (told, so it runs however late it
        // starts), then one message in the one slot: nothing parked on this
        // runtime yet.
        let started = Arc::new(AtomicBool::new(false));
        let turn = Busy(started.clone(), Duration::from_secs(10));
        grain.tell(turn).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !started.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the busy turn never started");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        grain.tell(Nap(Duration::ZERO)).await.unwrap(); // fills the one slot
    });
    // A short-lived runtime (sync code calling into the silo) parks a
    // sender and gives up; the runtime then goes away.
    {
        let side = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        side.block_on(async {
            let _ =
                tokio::time::timeout(Duration::from_millis(25), grain.tell(Nap(Duration::ZERO)))
                    .await;
        });
    }
    // Room comes only when the ten-second turn ends: a sender that nothing
    // times out waits that long, well past the 3 s bound here. One that
    // times out waits at least the call timeout; the 3 s leave a loaded
    // machine room above it.
    let outcome = main.block_on(async {
        let started = Instant::now();
        let sent =
            tokio::time::timeout(Duration::from_secs(3), grain.tell(Nap(Duration::ZERO))).await;
        (sent, started.elapsed())
    });
    assert!(
        matches!(outcome.0, Ok(Err(CallError::Timeout { .. })))
            && outcome.1 >= Duration::from_millis(300),
        "a sender waiting for room must time out after the call timeout (300 ms); got {:?} after {:?}",
        outcome.0.map(|r| r.map_err(|e| e.to_string())),
        outcome.1
    );
}

/// Churn: a tiny mailbox, constant deactivation, many senders with cached
/// references, some sends abandoned: per-sender order, and exactly once for
/// every send that returned `Ok` (a `tell` accepted just before shutdown
/// included).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn churn_keeps_order_and_loses_nothing() {
    for round in 0..10 {
        let log = Arc::new(Log::default());
        let silo = silo(
            SiloConfig {
                mailbox_capacity: 2,
                call_timeout: Duration::from_millis(2000),
                idle_timeout: Duration::from_millis(1),
                max_activations: Some(0),
                ..SiloConfig::default()
            },
            log.clone(),
        );
        let mut tasks = Vec::new();
        for s in 0..40u64 {
            let grain = silo.grain::<Rec>(format!("k{}", s % 3));
            tasks.push(tokio::spawn(async move {
                let mut ok = Vec::new();
                let mut maybe = Vec::new();
                for n in 0..300u64 {
                    if n % 7 == 3 {
                        match tokio::time::timeout(
                            Duration::from_micros(50),
                            grain.tell(Note(s, n)),
                        )
                        .await
                        {
                            Ok(Ok(())) => ok.push(n),
                            Ok(Err(e)) => panic!("tell failed: {e}"),
                            Err(_) => maybe.push(n),
                        }
                    } else if n % 5 == 0 {
                        grain.call(Note(s, n)).await.unwrap();
                        ok.push(n);
                    } else {
                        grain.tell(Note(s, n)).await.unwrap();
                        ok.push(n);
                    }
                    if n % 10 == 0 {
                        tokio::time::sleep(Duration::from_millis(1 + (n % 3))).await;
                    }
                }
                (s, ok, maybe)
            }));
        }
        let mut expected = Vec::new();
        for t in tasks {
            expected.push(t.await.unwrap());
        }
        silo.shutdown().await;
        let log = log.0.lock().unwrap();
        for (s, ok, maybe) in expected {
            let got = log.get(&s).cloned().unwrap_or_default();
            assert!(
                got.windows(2).all(|w| w[0] < w[1]),
                "round {round} sender {s}: out of order or duplicated: {got:?}"
            );
            for n in &ok {
                assert!(got.contains(n), "round {round} sender {s}: lost {n}");
            }
            for n in &got {
                assert!(
                    ok.contains(n) || maybe.contains(n),
                    "round {round}: phantom {n}"
                );
            }
        }
    }
}

/// Shutdown while activations go idle and new ones start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_never_sleeps_through() {
    for round in 0..100 {
        let silo = silo(SiloConfig::default(), Arc::default());
        let mut senders = Vec::new();
        for s in 0..8u64 {
            let grain = silo.grain::<Rec>(format!("k{s}"));
            senders.push(tokio::spawn(async move {
                for n in 0..20 {
                    if grain.tell(Note(s, n)).await.is_err() {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
            }));
        }
        tokio::time::sleep(Duration::from_micros(200 * (round % 5))).await;
        let done = tokio::time::timeout(Duration::from_secs(3), silo.shutdown()).await;
        assert!(
            done.is_ok(),
            "round {round}: shutdown hung, live {}",
            silo.live_activations()
        );
        for s in senders {
            s.await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_with_parked_senders_ends_promptly() {
    for round in 0..20 {
        let silo = silo(
            SiloConfig {
                mailbox_capacity: 1,
                call_timeout: Duration::from_secs(20),
                ..SiloConfig::default()
            },
            Arc::default(),
        );
        let mut senders = Vec::new();
        for s in 0..50u64 {
            let grain = silo.grain::<Rec>(format!("k{}", s % 2));
            senders.push(tokio::spawn(async move {
                for _ in 0..1000 {
                    match grain.tell(Nap(Duration::from_micros(200))).await {
                        Ok(()) => {}
                        Err(CallError::ShutDown) => return,
                        Err(e) => panic!("{e}"),
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(5 + round % 7)).await;
        let started = Instant::now();
        let done = tokio::time::timeout(Duration::from_secs(5), silo.shutdown()).await;
        assert!(done.is_ok(), "round {round}: shutdown hung");
        for s in senders {
            tokio::time::timeout(Duration::from_secs(5), s)
                .await
                .expect("sender hung")
                .unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
