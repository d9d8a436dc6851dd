//! A grain notifies its subscribers: every subscriber sees every result in
//! order, a slow one misses (counted) without holding anyone back, and a
//! dropped one is unsubscribed. Subscribers made with `Silo::observe` are
//! added by reference: on the grain's own silo on the typed path; one whose
//! silo cannot be reached is dropped after its expiry, and counted.

use std::time::Duration;

use granary_actors::{
    AddObserverError, Grain, GrainContext, GrainKey, Handler, Message, ObserverRef, Observers,
    Silo, Subscription,
};

struct Sensor {
    readings: Observers<u32>,
}

impl Grain for Sensor {
    fn new(_: &GrainKey) -> Sensor {
        Sensor {
            readings: Observers::with_expiry(4, Duration::from_millis(300)),
        }
    }
}

/// Adds a subscriber by reference.
struct Watch(ObserverRef<u32>);
impl Message for Watch {
    type Reply = Result<(), AddObserverError>;
}
impl Handler<Watch> for Sensor {
    async fn handle(
        &mut self,
        Watch(observer): Watch,
        ctx: &mut GrainContext,
    ) -> Result<(), AddObserverError> {
        self.readings.add(ctx.silo(), observer)
    }
}

/// The subscribers that have not gone, and those dropped as unreachable.
struct Count;
impl Message for Count {
    type Reply = (usize, u64);
}
impl Handler<Count> for Sensor {
    async fn handle(&mut self, _: Count, _: &mut GrainContext) -> (usize, u64) {
        (self.readings.len(), self.readings.expired())
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

fn sensor_silo() -> Silo {
    Silo::builder()
        .register::<Sensor>("sensor")
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_added_by_reference_on_the_same_silo_sees_every_value_in_order() {
    let silo = sensor_silo();
    let sensor = silo.grain::<Sensor>("s");
    let (observer, mut subscription) = silo.observe::<u32>(16);
    assert_eq!(observer.place(), silo.observer_place());
    sensor.call(Watch(observer.clone())).await.unwrap().unwrap();
    // Adding it again changes nothing.
    sensor.call(Watch(observer.clone())).await.unwrap().unwrap();
    assert_eq!(sensor.call(Count).await.unwrap(), (1, 0));
    for value in 0..10 {
        assert_eq!(sensor.call(Publish(value)).await.unwrap(), 1);
    }
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.push(subscription.next().await.unwrap());
    }
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    // Dropping the subscription removes the endpoint: the grain drops the
    // subscriber at its next notification, and a late add is refused.
    drop(subscription);
    assert_eq!(sensor.call(Publish(10)).await.unwrap(), 0);
    assert_eq!(sensor.call(Count).await.unwrap(), (0, 0));
    assert_eq!(
        sensor.call(Watch(observer)).await.unwrap(),
        Err(AddObserverError::Gone)
    );
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_of_another_type_is_refused() {
    let silo = sensor_silo();
    let (words, _subscription) = silo.observe::<String>(4);
    // The reference travels as bytes, so its type is only a claim: read it
    // back as a reference to `u32` subscribers.
    let bytes = postcard::to_allocvec(&words).unwrap();
    let claimed: ObserverRef<u32> = postcard::from_bytes(&bytes).unwrap();
    let refused = silo
        .grain::<Sensor>("s")
        .call(Watch(claimed))
        .await
        .unwrap();
    assert!(
        matches!(refused, Err(AddObserverError::WrongType { .. })),
        "{refused:?}"
    );
    silo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_whose_silo_cannot_be_reached_is_dropped_after_its_expiry_and_counted() {
    // Two silos in no cluster: neither can reach the other's endpoints.
    let here = sensor_silo();
    let there = sensor_silo();
    let (observer, mut subscription) = there.observe::<u32>(4);
    assert_ne!(observer.place(), here.observer_place());
    let sensor = here.grain::<Sensor>("s");
    sensor.call(Watch(observer)).await.unwrap().unwrap();
    assert_eq!(sensor.call(Count).await.unwrap(), (1, 0));
    // Queued for delivery, which fails; without further notifications the
    // delivery task drops the subscriber once the 300 ms expiry has passed.
    assert_eq!(sensor.call(Publish(1)).await.unwrap(), 1);
    let started = std::time::Instant::now();
    loop {
        let (live, expired) = sensor.call(Count).await.unwrap();
        if live == 0 {
            assert_eq!(expired, 1);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the unreachable subscriber was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(subscription.try_next(), None);
    here.shutdown().await;
    there.shutdown().await;
}

/// Routes every grain message here, and carries notifications to one other
/// silo's home side; its first `fail` notifications are lost on the way.
struct TwoSilos {
    place: &'static str,
    other: std::sync::OnceLock<granary_actors::route::HomeSide>,
    fail: std::sync::atomic::AtomicU64,
}

impl granary_actors::route::Router for TwoSilos {
    fn dispatch(
        &self,
        message: Box<dyn granary_actors::route::Outbound>,
    ) -> futures_util::future::BoxFuture<
        '_,
        Result<granary_actors::route::Delivered, granary_actors::CallError>,
    > {
        Box::pin(async move {
            message.deliver_here(None).await?;
            Ok(granary_actors::route::Delivered::Here)
        })
    }

    fn place(&self) -> Option<String> {
        Some(self.place.to_string())
    }

    fn observe<'a>(
        &'a self,
        place: &'a str,
        endpoint: u64,
        type_name: &'a str,
        payload: Vec<u8>,
    ) -> futures_util::future::BoxFuture<
        'a,
        Result<granary_actors::observers::Observed, granary_actors::observers::ObserverUnreachable>,
    > {
        Box::pin(async move {
            let failing = self
                .fail
                .fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |left| left.checked_sub(1),
                )
                .is_ok();
            match self.other.get() {
                Some(other) if !failing => Ok(other.observe(endpoint, type_name, &payload)),
                _ => Err(granary_actors::observers::ObserverUnreachable {
                    place: place.to_string(),
                    reason: "lost on the way (test)".to_string(),
                }),
            }
        })
    }

    fn is_present(&self, _: &str) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_whose_silo_answers_again_is_kept_though_a_notification_was_lost() {
    use std::sync::Arc;
    let here = sensor_silo();
    let there = sensor_silo();
    let router_here = Arc::new(TwoSilos {
        place: "here",
        other: std::sync::OnceLock::new(),
        fail: std::sync::atomic::AtomicU64::new(1),
    });
    let router_there = Arc::new(TwoSilos {
        place: "there",
        other: std::sync::OnceLock::new(),
        fail: std::sync::atomic::AtomicU64::new(0),
    });
    let _here_side = here.route_through(router_here.clone()).unwrap();
    let there_side = there.route_through(router_there).unwrap();
    assert!(router_here.other.set(there_side).is_ok());
    let (observer, mut subscription) = there.observe::<u32>(4);
    assert_eq!(observer.place(), "there");
    let sensor = here.grain::<Sensor>("s");
    sensor.call(Watch(observer)).await.unwrap().unwrap();
    // The first notification is lost: the unreachable clock starts. Nothing
    // more is notified, but the subscriber's silo answers the idle probes,
    // so the 300 ms expiry passes without dropping it.
    assert_eq!(sensor.call(Publish(1)).await.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(sensor.call(Count).await.unwrap(), (1, 0));
    assert_eq!(sensor.call(Publish(2)).await.unwrap(), 1);
    let next = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .unwrap();
    assert_eq!(next, Some(2));
    here.shutdown().await;
    there.shutdown().await;
}
