//! Call-chain reentrancy: A → B → A completes when A calls through
//! `GrainContext::call`, which lends A to its own call chain while it
//! waits. Messages of other chains wait their turn.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use granary_actors::{
    CallError, Grain, GrainContext, GrainKey, Handler, Message, Silo, SiloConfig,
};
use tokio::sync::watch;

/// A node with a value; `Relay` walks a path of nodes and sums values.
struct Node {
    value: u64,
    /// Messages handled, in order, for the ordering test.
    seen: Vec<&'static str>,
}

impl Grain for Node {
    fn new(key: &GrainKey) -> Node {
        let value = match key {
            GrainKey::U64(key) => *key,
            _ => 0,
        };
        Node {
            value,
            seen: Vec::new(),
        }
    }
}

/// Where a relay's path ends, it holds until the test opens the gate.
#[derive(Clone)]
struct Hold {
    arrived: Arc<AtomicBool>,
    open: watch::Receiver<bool>,
}

fn hold() -> (Hold, watch::Sender<bool>) {
    let (open, gate) = watch::channel(false);
    let hold = Hold {
        arrived: Arc::default(),
        open: gate,
    };
    (hold, open)
}

/// Waits until `check` holds (bounded only so that a broken runtime fails
/// rather than hangs).
async fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "never {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Polls `future` once. A call polled once is in the grain's mailbox when
/// the grain is active and its mailbox has room: sending does not wait
/// then.
async fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *future).poll(cx))).await
}

/// Visit the nodes in `path` in turn; answers the sum of their values and
/// this node's. `lend` chooses `GrainContext::call` (reentrant) or a plain
/// `GrainRef::call`.
struct Relay {
    path: Vec<u64>,
    lend: bool,
    hold: Option<Hold>,
}

impl Message for Relay {
    type Reply = Result<u64, CallError>;
}

impl Handler<Relay> for Node {
    async fn handle(&mut self, relay: Relay, ctx: &mut GrainContext) -> Result<u64, CallError> {
        self.seen.push("relay");
        let Some((&next, rest)) = relay.path.split_first() else {
            // The end of the path takes its time.
            if let Some(mut hold) = relay.hold {
                hold.arrived.store(true, Ordering::SeqCst);
                let _ = hold.open.wait_for(|open| *open).await;
            }
            return Ok(self.value);
        };
        let target = ctx.silo().grain::<Node>(next);
        let onward = Relay {
            path: rest.to_vec(),
            lend: relay.lend,
            hold: relay.hold,
        };
        let below = if relay.lend {
            ctx.call(self, &target, onward).await??
        } else {
            target.call(onward).await??
        };
        Ok(below + self.value)
    }
}

struct Seen;
impl Message for Seen {
    type Reply = Vec<&'static str>;
}
impl Handler<Seen> for Node {
    async fn handle(&mut self, _: Seen, _: &mut GrainContext) -> Vec<&'static str> {
        self.seen.push("seen");
        self.seen.clone()
    }
}

fn silo(call_timeout: Duration) -> Silo {
    Silo::builder()
        .register::<Node>("node")
        .config(SiloConfig {
            call_timeout,
            ..SiloConfig::default()
        })
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calls_b_calls_a_completes() {
    let silo = silo(Duration::from_secs(5));
    let a = silo.grain::<Node>(1u64);
    let relay = Relay {
        path: vec![2, 1],
        lend: true,
        hold: None,
    };
    // A (1) → B (2) → A (1): 1 + 2 + 1.
    assert_eq!(a.call(relay).await.unwrap(), Ok(4));
    // Longer chains that come back more than once: A → B → C → A → B.
    let relay = Relay {
        path: vec![2, 3, 1, 2],
        lend: true,
        hold: None,
    };
    assert_eq!(a.call(relay).await.unwrap(), Ok(1 + 2 + 3 + 1 + 2));
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_chains_wait_for_the_turn_and_keep_their_order() {
    let silo = silo(Duration::from_secs(30));
    let a = silo.grain::<Node>(1u64);
    // A's turn waits on B, which holds until the gate opens; meanwhile
    // another caller sends A a relay and then asks what A has seen: both
    // wait for A's turn, in order.
    let (hold, open) = hold();
    let chain = {
        let (a, hold) = (a.clone(), hold.clone());
        tokio::spawn(async move {
            a.call(Relay {
                path: vec![2],
                lend: true,
                hold: Some(hold),
            })
            .await
        })
    };
    until("A's turn reached B", || hold.arrived.load(Ordering::SeqCst)).await;
    let mut other = Box::pin(a.call(Relay {
        path: vec![],
        lend: true,
        hold: None,
    }));
    let mut seen = Box::pin(a.call(Seen));
    // Each is in A's mailbox once polled: the relay, then the question.
    assert!(poll_once(&mut other).await.is_pending());
    assert!(poll_once(&mut seen).await.is_pending());
    // A while for a runtime that wrongly lets another chain in during A's
    // turn to do so (a correct one cannot fail here, however slow).
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        poll_once(&mut other).await.is_pending(),
        "the other chain's message waited for A's turn"
    );
    open.send_replace(true);
    assert_eq!(chain.await.unwrap().unwrap(), Ok(3));
    assert_eq!(other.await.unwrap(), Ok(1));
    // A finished its own chain's relay before the others ran.
    assert_eq!(seen.await.unwrap(), ["relay", "relay", "seen"]);
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_call_back_into_a_busy_grain_times_out_instead_of_hanging() {
    // Without lending, A's turn holds A while B calls back: the documented
    // outcome is a timeout, never a hang.
    let silo = silo(Duration::from_millis(200));
    let a = silo.grain::<Node>(1u64);
    let outcome = a
        .call(Relay {
            path: vec![2, 1],
            lend: false,
            hold: None,
        })
        .await;
    assert!(
        matches!(
            outcome,
            Err(CallError::Timeout { .. }) | Ok(Err(CallError::Timeout { .. }))
        ),
        "{outcome:?}"
    );
    // The silo keeps serving once the stuck calls have timed out.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(silo.grain::<Node>(5u64).call(Seen).await.unwrap(), ["seen"]);
    silo.shutdown().await;
}

// A message of the lending turn's own chain that was already queued when
// the turn started (taken from the mailbox with the rest of its batch)
// runs during the turn's reentrant wait, as one arriving later does. Found
// in review: the batch had hidden it from the wait.
mod queued_before_the_wait {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use granary_actors::{Grain, GrainContext, GrainKey, Handler, Message, Silo};
    use tokio::sync::watch;

    struct Gate {
        open: bool,
        /// What the last `WaitOpen` found.
        waited: Option<bool>,
    }
    impl Grain for Gate {
        fn new(_: &GrainKey) -> Gate {
            Gate {
                open: false,
                waited: None,
            }
        }
    }

    /// Waits, in reentrant calls, for `Open`; gives up after 10 s (a
    /// correct runtime runs `Open` during the first wait).
    struct WaitOpen;
    impl Message for WaitOpen {
        type Reply = ();
    }
    impl Handler<WaitOpen> for Gate {
        async fn handle(&mut self, _: WaitOpen, ctx: &mut GrainContext) {
            let pinger = ctx.silo().grain::<Gate>("pinger");
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.open && Instant::now() < deadline {
                ctx.call(self, &pinger, Nap(Duration::from_millis(5)))
                    .await
                    .unwrap();
            }
            self.waited = Some(self.open);
        }
    }

    struct Open;
    impl Message for Open {
        type Reply = ();
    }
    impl Handler<Open> for Gate {
        async fn handle(&mut self, _: Open, _: &mut GrainContext) {
            self.open = true;
        }
    }

    struct Waited;
    impl Message for Waited {
        type Reply = Option<bool>;
    }
    impl Handler<Waited> for Gate {
        async fn handle(&mut self, _: Waited, _: &mut GrainContext) -> Option<bool> {
            self.waited
        }
    }

    struct Nap(Duration);
    impl Message for Nap {
        type Reply = ();
    }
    impl Handler<Nap> for Gate {
        async fn handle(&mut self, Nap(d): Nap, _: &mut GrainContext) {
            tokio::time::sleep(d).await;
        }
    }

    /// Holds the grain until `open` turns true; `started` says it began.
    struct Hold {
        started: Arc<AtomicBool>,
        open: watch::Receiver<bool>,
    }
    impl Message for Hold {
        type Reply = ();
    }
    impl Handler<Hold> for Gate {
        async fn handle(&mut self, mut hold: Hold, _: &mut GrainContext) {
            hold.started.store(true, Ordering::SeqCst);
            let _ = hold.open.wait_for(|open| *open).await;
        }
    }

    /// One turn of the driver sends both messages, so they share its
    /// chain; it answers once `a`'s mailbox has taken both.
    struct Both;
    impl Message for Both {
        type Reply = ();
    }
    impl Handler<Both> for Gate {
        async fn handle(&mut self, _: Both, ctx: &mut GrainContext) {
            let a = ctx.silo().grain::<Gate>("a");
            a.tell(WaitOpen).await.unwrap();
            a.tell(Open).await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_of_the_lending_chain_queued_before_the_wait_runs_during_it() {
        let silo = Silo::builder().register::<Gate>("gate").build().unwrap();
        let a = silo.grain::<Gate>("a");
        // Keep `a` busy so that both messages are queued when it next looks.
        let started = Arc::new(AtomicBool::new(false));
        let (open, gate) = watch::channel(false);
        let busy = {
            let (a, started) = (a.clone(), started.clone());
            tokio::spawn(async move {
                a.call(Hold {
                    started,
                    open: gate,
                })
                .await
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !started.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the holding turn never started");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        silo.grain::<Gate>("driver").call(Both).await.unwrap();
        open.send_replace(true);
        busy.await.unwrap().unwrap();
        // Asked from another chain: answered once WaitOpen's turn is over.
        assert_eq!(
            a.call(Waited).await.unwrap(),
            Some(true),
            "Open (same chain, queued) never ran during WaitOpen's reentrant waits"
        );
        silo.shutdown().await;
    }
}
