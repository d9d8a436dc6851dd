//! Read-only messages interleave with each other, never with writes, and a
//! sender's read and write keep their order.

use std::time::{Duration, Instant};

use granary_actors::{
    CallError, Grain, GrainContext, GrainKey, Handler, Message, ReadHandler, Silo,
};

struct Catalog {
    version: u64,
}

impl Grain for Catalog {
    fn new(_: &GrainKey) -> Catalog {
        Catalog { version: 0 }
    }
}

/// A slow read: waits 100 ms, then answers the version it saw at the start
/// and at the end (equal unless a write overlapped it).
struct Lookup;
impl Message for Lookup {
    type Reply = (u64, u64);
}
impl ReadHandler<Lookup> for Catalog {
    async fn handle_read(&self, _: Lookup, _: &GrainContext) -> (u64, u64) {
        let before = self.version;
        tokio::time::sleep(Duration::from_millis(100)).await;
        (before, self.version)
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
    let started = Instant::now();
    let reads: Vec<_> = (0..8)
        .map(|_| {
            let catalog = catalog.clone();
            tokio::spawn(async move { catalog.read(Lookup).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let write = {
        let catalog = catalog.clone();
        tokio::spawn(async move { catalog.call(Bump).await })
    };
    for read in reads {
        // No write ran in the middle of a read.
        assert_eq!(read.await.unwrap().unwrap(), (1, 1));
    }
    // Eight 100 ms reads interleaved: about 100 ms, not 800.
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(write.await.unwrap().unwrap(), 2);
    // A read sent after a write sees it.
    assert_eq!(catalog.read(Lookup).await.unwrap(), (2, 2));
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
