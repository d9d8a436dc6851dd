//! Read-only messages interleave with each other, never with writes, and a
//! sender's read and write keep their order.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use granary_actors::{
    CallError, Grain, GrainContext, GrainKey, Handler, Message, ReadHandler, Silo,
};
use tokio::sync::watch;

struct Catalog {
    version: u64,
}

impl Grain for Catalog {
    fn new(_: &GrainKey) -> Catalog {
        Catalog { version: 0 }
    }
}

/// Turns that hold until the test opens the gate, and how many hold now.
#[derive(Clone)]
struct Gate {
    holding: Arc<AtomicUsize>,
    open: watch::Receiver<bool>,
}

impl Gate {
    async fn pass(mut self) {
        self.holding.fetch_add(1, Ordering::SeqCst);
        let _ = self.open.wait_for(|open| *open).await;
        self.holding.fetch_sub(1, Ordering::SeqCst);
    }
}

fn gate() -> (Gate, watch::Sender<bool>) {
    let (open, gate) = watch::channel(false);
    let gate = Gate {
        holding: Arc::default(),
        open: gate,
    };
    (gate, open)
}

/// Waits until `count` turns hold at `gate` (bounded only so that a broken
/// runtime fails rather than hangs).
async fn holding(gate: &Gate, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while gate.holding.load(Ordering::SeqCst) < count {
        assert!(
            Instant::now() < deadline,
            "{} of {count} turns hold at once",
            gate.holding.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Polls `future` once. A call or read polled once is in the grain's
/// mailbox when the grain is active and its mailbox has room: sending does
/// not wait then.
async fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *future).poll(cx))).await
}

/// A read that holds at its gate, then answers the version it saw at the
/// start and at the end (equal unless a write overlapped it).
struct Lookup(Gate);
impl Message for Lookup {
    type Reply = (u64, u64);
}
impl ReadHandler<Lookup> for Catalog {
    async fn handle_read(&self, Lookup(gate): Lookup, _: &GrainContext) -> (u64, u64) {
        let before = self.version;
        gate.pass().await;
        (before, self.version)
    }
}

/// A write that holds the grain at its gate.
struct Block(Gate);
impl Message for Block {
    type Reply = ();
}
impl Handler<Block> for Catalog {
    async fn handle(&mut self, Block(gate): Block, _: &mut GrainContext) {
        gate.pass().await;
    }
}

/// A read that panics.
struct Broken;
impl Message for Broken {
    type Reply = ();
}
impl ReadHandler<Broken> for Catalog {
    async fn handle_read(&self, _: Broken, _: &GrainContext) {
        panic!("a read bug");
    }
}

struct Bump;
impl Message for Bump {
    type Reply = u64;
}
impl Handler<Bump> for Catalog {
    async fn handle(&mut self, _: Bump, _: &mut GrainContext) -> u64 {
        self.version += 1;
        self.version
    }
}

fn silo() -> Silo {
    Silo::builder()
        .register::<Catalog>("catalog")
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_reads_run_together_and_writes_wait_for_them() {
    let silo = silo();
    let catalog = silo.grain::<Catalog>("c");
    catalog.call(Bump).await.unwrap();
    // A write holds the grain, so that eight reads and then a write queue
    // up behind it.
    let (block, unblock) = gate();
    let blocked = {
        let (catalog, block) = (catalog.clone(), block.clone());
        tokio::spawn(async move { catalog.call(Block(block)).await })
    };
    holding(&block, 1).await;
    let (reads_gate, open_reads) = gate();
    let mut reads: Vec<_> = (0..8)
        .map(|_| Box::pin(catalog.read(Lookup(reads_gate.clone()))))
        .collect();
    let mut write = Box::pin(catalog.call(Bump));
    // Each is in the mailbox once polled, in this order.
    for read in &mut reads {
        assert!(poll_once(read).await.is_pending());
    }
    assert!(poll_once(&mut write).await.is_pending());
    unblock.send_replace(true);
    blocked.await.unwrap().unwrap();
    // The eight queued reads run together: all eight hold at once (run one
    // at a time, the second would never start).
    holding(&reads_gate, 8).await;
    // The write waits for them.
    assert!(poll_once(&mut write).await.is_pending());
    open_reads.send_replace(true);
    for read in reads {
        // No write ran in the middle of a read.
        assert_eq!(read.await.unwrap(), (1, 1));
    }
    assert_eq!(write.await.unwrap(), 2);
    // A read sent after a write sees it.
    assert_eq!(catalog.read(Lookup(reads_gate)).await.unwrap(), (2, 2));
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_read_fails_only_its_own_call() {
    let silo = silo();
    let catalog = silo.grain::<Catalog>("c");
    assert_eq!(catalog.call(Bump).await.unwrap(), 1);
    assert!(matches!(
        catalog.read(Broken).await,
        Err(CallError::TurnFailed { .. })
    ));
    // The activation was not reset: its state is intact.
    assert_eq!(catalog.call(Bump).await.unwrap(), 2);
    assert_eq!(silo.activations_started(), 1);
    silo.shutdown().await;
}
