//! A grain notifies its subscribers: every subscriber sees every result in
//! order, a slow one misses (counted) without holding anyone back, and a
//! dropped one is unsubscribed.

use granary_actors::{
    Grain, GrainContext, GrainKey, Handler, Message, Observers, Silo, Subscription,
};

struct Sensor {
    readings: Observers<u32>,
}

impl Grain for Sensor {
    fn new(_: &GrainKey) -> Sensor {
        Sensor {
            readings: Observers::new(4),
        }
    }
}

struct Subscribe;
impl Message for Subscribe {
    type Reply = Subscription<u32>;
}
impl Handler<Subscribe> for Sensor {
    async fn handle(&mut self, _: Subscribe, _: &mut GrainContext) -> Subscription<u32> {
        self.readings.subscribe()
    }
}

/// Publishes a reading; answers how many subscribers it reached.
struct Publish(u32);
impl Message for Publish {
    type Reply = usize;
}
impl Handler<Publish> for Sensor {
    async fn handle(&mut self, Publish(value): Publish, _: &mut GrainContext) -> usize {
        self.readings.notify(&value)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_see_results_in_order_and_a_slow_one_holds_no_one_back() {
    let silo = Silo::builder()
        .register::<Sensor>("sensor")
        .build()
        .unwrap();
    let sensor = silo.grain::<Sensor>("s");
    let mut fast = sensor.call(Subscribe).await.unwrap();
    let mut slow = sensor.call(Subscribe).await.unwrap();
    let dropped = sensor.call(Subscribe).await.unwrap();
    drop(dropped);
    let mut reached = Vec::new();
    let mut seen = Vec::new();
    for value in 0..10 {
        reached.push(sensor.call(Publish(value)).await.unwrap());
        // The fast reader keeps up: it reads each value before the next is
        // published (waiting for it, not for a while), while the slow one
        // never reads.
        seen.push(fast.next().await.unwrap());
    }
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    assert_eq!(fast.missed(), 0);
    // The dropped subscriber is gone after the first notification; the slow
    // one (never reading, 4 slots) was skipped once full.
    assert_eq!(reached[0], 2);
    assert_eq!(slow.missed(), 6);
    let mut buffered = Vec::new();
    while let Some(value) = slow.try_next() {
        buffered.push(value);
    }
    assert_eq!(buffered, [0, 1, 2, 3]);
    silo.shutdown().await;
    // The grain is gone: its subscriptions end.
    assert_eq!(slow.next().await, None);
}
