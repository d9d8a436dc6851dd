//! Timers belong to their activation: ticks run as turns, do not keep the
//! grain alive, and stop with the activation or when cancelled.

use std::time::{Duration, Instant};

use granary_actors::{Grain, GrainContext, GrainKey, Handler, Message, Silo, SiloConfig, Timer};

struct Ticker {
    ticks: u32,
    timer: Option<Timer>,
}

impl Grain for Ticker {
    fn new(_: &GrainKey) -> Ticker {
        Ticker {
            ticks: 0,
            timer: None,
        }
    }
}

struct Tick;
impl Message for Tick {
    type Reply = ();
}
impl Handler<Tick> for Ticker {
    async fn handle(&mut self, _: Tick, _: &mut GrainContext) {
        self.ticks += 1;
    }
}

/// Starts a timer every `period`, or stops it (`None`).
struct Every(Option<Duration>);
impl Message for Every {
    type Reply = ();
}
impl Handler<Every> for Ticker {
    async fn handle(&mut self, Every(period): Every, ctx: &mut GrainContext) {
        if let Some(timer) = self.timer.take() {
            timer.cancel();
        }
        if let Some(period) = period {
            let timer = ctx
                .register_timer::<Ticker, Tick>(period, Some(period), || Tick)
                .expect("registered");
            self.timer = Some(timer);
        }
    }
}

struct Ticks;
impl Message for Ticks {
    type Reply = u32;
}
impl Handler<Ticks> for Ticker {
    async fn handle(&mut self, _: Ticks, _: &mut GrainContext) -> u32 {
        self.ticks
    }
}

fn silo(idle_timeout: Duration) -> Silo {
    Silo::builder()
        .register::<Ticker>("ticker")
        .config(SiloConfig {
            idle_timeout,
            ..SiloConfig::default()
        })
        .build()
        .unwrap()
}

/// Bounds the waits below only so that a broken runtime fails rather than
/// hangs.
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_ticks_until_cancelled() {
    let silo = silo(Duration::from_secs(60));
    let ticker = silo.grain::<Ticker>("t");
    let started = Instant::now();
    ticker
        .call(Every(Some(Duration::from_millis(50))))
        .await
        .unwrap();
    // It keeps ticking: wait for a few ticks, however slowly a loaded
    // machine runs them.
    let ticked = loop {
        let ticked = ticker.call(Ticks).await.unwrap();
        if ticked >= 4 {
            break ticked;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{ticked} ticks in {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Never faster than its period (load can only make it slower).
    let elapsed = started.elapsed();
    assert!(
        u128::from(ticked) <= elapsed.as_millis() / 50,
        "{ticked} ticks in {elapsed:?} at 50 ms"
    );
    ticker.call(Every(None)).await.unwrap();
    let stopped = ticker.call(Ticks).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        ticker.call(Ticks).await.unwrap() <= stopped + 1,
        "cancelled"
    );
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_do_not_keep_a_grain_alive_and_die_with_it() {
    let silo = silo(Duration::from_millis(200));
    let ticker = silo.grain::<Ticker>("t");
    ticker
        .call(Every(Some(Duration::from_millis(20))))
        .await
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while silo.live_activations() > 0 {
        assert!(
            Instant::now() < deadline,
            "not deactivated: its timer kept it alive"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A tick of the old timer would come within a few periods: give it the
    // chance to (wrongly) bring the grain back.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(silo.live_activations(), 0, "deactivated despite its timer");
    assert_eq!(silo.activations_started(), 1, "no tick reactivated it");
    // A new activation starts with no timer and no ticks.
    assert_eq!(ticker.call(Ticks).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(ticker.call(Ticks).await.unwrap(), 0);
    silo.shutdown().await;
}
