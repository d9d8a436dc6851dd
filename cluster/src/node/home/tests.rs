//! Rule 3 with views that change one silo at a time: a test drives each
//! node's membership itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use granary_actors::{Grain, GrainContext, GrainId, GrainKey, Handler, Message, Silo};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::membership::{Member, MembershipError, SiloLoad};
use crate::placement::PreferLocal;
use crate::provider::{MembershipProvider, RejoinError};
use crate::transport::InProcessNetwork;
use crate::{ClusterNode, ClusterSecret, NodeConfig, SiloId, directory};

/// A count kept in memory only: a new activation starts again from 0, so
/// a reply shows whether the activation that answered is the first.
struct Tally(u64);

impl Grain for Tally {
    fn new(_: &GrainKey) -> Tally {
        Tally(0)
    }
}

#[derive(Serialize, Deserialize)]
struct Bump;

impl Message for Bump {
    type Reply = u64;
}

impl Handler<Bump> for Tally {
    async fn handle(&mut self, _: Bump, _: &mut GrainContext) -> u64 {
        self.0 += 1;
        self.0
    }
}

/// A membership whose view the test sets.
struct Scripted {
    silo: SiloId,
    view: Arc<watch::Sender<Vec<Member>>>,
}

impl MembershipProvider for Scripted {
    fn members(&self) -> Vec<Member> {
        self.view.borrow().clone()
    }

    fn watch(&self) -> watch::Receiver<Vec<Member>> {
        self.view.subscribe()
    }

    fn publish_load<'a>(&'a mut self, _: &'a SiloLoad) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    fn leave(self: Box<Self>) -> BoxFuture<'static, Result<(), MembershipError>> {
        Box::pin(async { Ok(()) })
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), MembershipError>> {
        Box::pin(async { Ok(()) })
    }

    fn silo(&self) -> SiloId {
        self.silo.clone()
    }

    fn rejoin(
        self: Box<Self>,
    ) -> BoxFuture<'static, Result<Box<dyn MembershipProvider>, RejoinError>> {
        Box::pin(async move { Err(RejoinError::Unsupported(self)) })
    }
}

const TYPE: &str = "tally";
const HANDOFF: Duration = Duration::from_millis(400);

fn member(silo: &SiloId) -> Member {
    Member {
        silo: silo.clone(),
        gossip: None,
        load: SiloLoad {
            grain_types: vec![TYPE.to_string()],
            ..SiloLoad::default()
        },
    }
}

/// The view of `silos`, sorted as a provider's is.
fn view(silos: &[&SiloId]) -> Vec<Member> {
    let mut view: Vec<Member> = silos.iter().map(|silo| member(silo)).collect();
    view.sort_by(|a, b| a.silo.cmp(&b.silo));
    view
}

fn grain(key: u64) -> GrainId {
    GrainId {
        type_name: TYPE.into(),
        key: GrainKey::U64(key),
    }
}

/// Starts the silo listening at `address`, whose view `view` holds.
async fn start(
    network: &InProcessNetwork,
    address: &str,
    view: &Arc<watch::Sender<Vec<Member>>>,
) -> ClusterNode {
    let silo = Silo::builder()
        .register::<Tally>(TYPE)
        .message::<Tally, Bump>("bump")
        .build()
        .expect("a silo");
    let mut config = NodeConfig::new(
        "home-tests",
        ClusterSecret::new([0x92; 32]).expect("a secret"),
        address,
        "127.0.0.1:1".parse().expect("an address"),
        Vec::new(),
    );
    config.incarnation = 1;
    config.handoff = Some(HANDOFF);
    let view = view.clone();
    ClusterNode::builder(silo, config)
        .transport(Arc::new(network.transport(address)))
        .placement(Arc::new(PreferLocal))
        .start_with_provider(move |silo| Box::new(Scripted { silo, view }))
        .await
        .expect("the node starts")
}

/// A home's new owner learns that the old owner died after the home's silo
/// does: later than the four tries, an eighth of the hand-over window
/// apart, that re-registration used to make, but within the window rule 3
/// allows. The home keeps re-registering until the owner knows, and the
/// grain's activation lives on. (The home used to give up after its fourth
/// `Retry` and deactivate a healthy grain.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_outlasts_a_new_owner_that_learns_of_a_death_late() {
    let network = InProcessNetwork::new();
    let [a, b, c] =
        ["silo-a:7000", "silo-b:7000", "silo-c:7000"].map(|address| SiloId::new(address, 1));
    let everyone = view(&[&a, &b, &c]);
    let survivors = view(&[&a, &c]);
    // A grain owned by b while it lives and by c once it is gone.
    let key = (0..10_000u64)
        .find(|&key| {
            directory::owner(&grain(key), &everyone) == Some(&b)
                && directory::owner(&grain(key), &survivors) == Some(&c)
        })
        .expect("a key");
    let views = [(); 3].map(|()| Arc::new(watch::Sender::new(everyone.clone())));
    let na = start(&network, &a.address, &views[0]).await;
    let nb = start(&network, &b.address, &views[1]).await;
    let nc = start(&network, &c.address, &views[2]).await;
    // Past the hand-over window every node opened with.
    tokio::time::sleep(HANDOFF + Duration::from_millis(50)).await;

    // a becomes the grain's home, registered with b.
    let reference = na.grain::<Tally>(key);
    assert_eq!(reference.call(Bump).await.expect("the first call"), 1);
    assert_eq!(na.homes(), 1);

    // b dies; a learns of it at once, c three quarters of a window later.
    nb.kill().await.expect("b stops");
    views[0].send_replace(survivors.clone());
    tokio::time::sleep(HANDOFF * 3 / 4).await;
    views[2].send_replace(survivors.clone());

    // a's home registered with c and kept its activation.
    let owner = || {
        na.inner
            .homes
            .get(&grain(key))
            .and_then(|home| home.owner.clone())
    };
    let deadline = Instant::now() + HANDOFF * 4;
    while owner() != Some(c.clone()) {
        assert!(
            Instant::now() < deadline,
            "a never re-registered with c: home {:?}",
            owner()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let entry = nc.inner.partition.lookup(&grain(key));
    assert_eq!(entry.map(|home| home.silo), Some(a.clone()));
    assert_eq!(na.homes(), 1);
    assert_eq!(reference.call(Bump).await.expect("a call from a"), 2);
    let from_c = nc.grain::<Tally>(key).call(Bump).await;
    assert_eq!(from_c.expect("a call from c"), 3);
    assert_eq!(
        na.silo().activations_started() + nc.silo().activations_started(),
        1,
        "one activation in all"
    );
}

/// A new owner that learns of the death later than rule 3 allows (twice
/// the hand-over window after the home's silo): the home gives up once
/// that bound has passed, since the owner may by then have let another
/// silo claim the grain, and the next call activates the grain afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_gives_up_when_its_new_owner_learns_too_late() {
    let network = InProcessNetwork::new();
    let [a, b, c] =
        ["silo-a:7000", "silo-b:7000", "silo-c:7000"].map(|address| SiloId::new(address, 1));
    let everyone = view(&[&a, &b, &c]);
    let survivors = view(&[&a, &c]);
    let key = (0..10_000u64)
        .find(|&key| {
            directory::owner(&grain(key), &everyone) == Some(&b)
                && directory::owner(&grain(key), &survivors) == Some(&c)
        })
        .expect("a key");
    let views = [(); 3].map(|()| Arc::new(watch::Sender::new(everyone.clone())));
    let na = start(&network, &a.address, &views[0]).await;
    let nb = start(&network, &b.address, &views[1]).await;
    let _nc = start(&network, &c.address, &views[2]).await;
    tokio::time::sleep(HANDOFF + Duration::from_millis(50)).await;
    let reference = na.grain::<Tally>(key);
    assert_eq!(reference.call(Bump).await.expect("the first call"), 1);

    nb.kill().await.expect("b stops");
    let died = Instant::now();
    views[0].send_replace(survivors.clone());
    // The home is given up at twice the window (and not before).
    let deadline = died + HANDOFF * 4;
    while na.homes() != 0 {
        assert!(
            Instant::now() < deadline,
            "a kept a home it could not re-register"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let given_up_after = died.elapsed();
    assert!(
        given_up_after >= HANDOFF * 2,
        "given up after {given_up_after:?}"
    );
    views[2].send_replace(survivors.clone());
    // The next call starts a new activation: the old one was let go.
    let deadline = Instant::now() + HANDOFF * 8;
    loop {
        match reference.call(Bump).await {
            Ok(count) => {
                assert_eq!(count, 1, "a new activation");
                break;
            }
            Err(err) => {
                assert!(Instant::now() < deadline, "no call got through: {err}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Forty homes move to a new owner that does not know of the change yet,
/// more than re-registration runs at once; then that owner dies too. The
/// second view is taken at once, not after the first pass gives up (which
/// ran in the view task before, and would have let every activation go):
/// every home registers with its silo, now the owner of everything, and
/// keeps its activation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_view_replaces_a_reregistration_still_retrying() {
    let network = InProcessNetwork::new();
    let [a, b, c] =
        ["silo-a:7000", "silo-b:7000", "silo-c:7000"].map(|address| SiloId::new(address, 1));
    let everyone = view(&[&a, &b, &c]);
    let survivors = view(&[&a, &c]);
    let alone = view(&[&a]);
    let keys: Vec<u64> = (0..100_000u64)
        .filter(|&key| {
            directory::owner(&grain(key), &everyone) == Some(&b)
                && directory::owner(&grain(key), &survivors) == Some(&c)
        })
        .take(40)
        .collect();
    assert_eq!(keys.len(), 40);
    let views = [(); 3].map(|()| Arc::new(watch::Sender::new(everyone.clone())));
    let na = start(&network, &a.address, &views[0]).await;
    let nb = start(&network, &b.address, &views[1]).await;
    let nc = start(&network, &c.address, &views[2]).await;
    tokio::time::sleep(HANDOFF + Duration::from_millis(50)).await;
    for &key in &keys {
        assert_eq!(
            na.grain::<Tally>(key)
                .call(Bump)
                .await
                .expect("a first call"),
            1
        );
    }
    assert_eq!(na.homes(), 40);

    // b dies; c, which would own the homes now, does not know it.
    nb.kill().await.expect("b stops");
    views[0].send_replace(survivors);
    tokio::time::sleep(HANDOFF / 4).await;
    // Then c dies too, and a is alone: it owns every entry.
    nc.kill().await.expect("c stops");
    let alone_at = Instant::now();
    views[0].send_replace(alone);
    let registered = || {
        keys.iter()
            .filter(|&&key| {
                na.inner.partition.lookup(&grain(key)).map(|home| home.silo) == Some(a.clone())
                    && na
                        .inner
                        .homes
                        .get(&grain(key))
                        .and_then(|home| home.owner.clone())
                        == Some(a.clone())
            })
            .count()
    };
    while registered() != keys.len() {
        assert!(
            alone_at.elapsed() < HANDOFF,
            "{} of 40 homes registered with a {:?} after it was alone",
            registered(),
            alone_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Past the first pass's deadline: nothing let go.
    tokio::time::sleep(HANDOFF * 2).await;
    assert_eq!(na.homes(), 40);
    for &key in &keys {
        assert_eq!(
            na.grain::<Tally>(key)
                .call(Bump)
                .await
                .expect("a second call"),
            2
        );
    }
    assert_eq!(na.silo().activations_started(), 40);
}

/// Forty homes move to an owner that never learns of the change, four to
/// one that learns at once. The prompt owner's homes register within the
/// window (a late owner holds up no other owner's homes); the late
/// owner's are given up at twice the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_owner_holds_up_no_other_owners_homes() {
    let network = InProcessNetwork::new();
    let [a, b, c, d] = ["silo-a:7000", "silo-b:7000", "silo-c:7000", "silo-d:7000"]
        .map(|address| SiloId::new(address, 1));
    let everyone = view(&[&a, &b, &c, &d]);
    let survivors = view(&[&a, &c, &d]);
    let moving_to = |owner: &SiloId, count: usize| -> Vec<u64> {
        (0..100_000u64)
            .filter(|&key| {
                directory::owner(&grain(key), &everyone) == Some(&b)
                    && directory::owner(&grain(key), &survivors) == Some(owner)
            })
            .take(count)
            .collect()
    };
    let (late, prompt) = (moving_to(&c, 40), moving_to(&d, 4));
    assert_eq!((late.len(), prompt.len()), (40, 4));
    let views = [(); 4].map(|()| Arc::new(watch::Sender::new(everyone.clone())));
    let na = start(&network, &a.address, &views[0]).await;
    let nb = start(&network, &b.address, &views[1]).await;
    let _nc = start(&network, &c.address, &views[2]).await;
    let nd = start(&network, &d.address, &views[3]).await;
    tokio::time::sleep(HANDOFF + Duration::from_millis(50)).await;
    for &key in late.iter().chain(&prompt) {
        assert_eq!(
            na.grain::<Tally>(key)
                .call(Bump)
                .await
                .expect("a first call"),
            1
        );
    }

    nb.kill().await.expect("b stops");
    let died = Instant::now();
    views[0].send_replace(survivors.clone());
    views[3].send_replace(survivors);
    let registered_with_d = || {
        prompt
            .iter()
            .filter(|&&key| {
                nd.inner.partition.lookup(&grain(key)).map(|home| home.silo) == Some(a.clone())
                    && na
                        .inner
                        .homes
                        .get(&grain(key))
                        .and_then(|home| home.owner.clone())
                        == Some(d.clone())
            })
            .count()
    };
    while registered_with_d() != prompt.len() {
        assert!(
            died.elapsed() < HANDOFF,
            "{} of {} homes registered with d after {:?}",
            registered_with_d(),
            prompt.len(),
            died.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // c never learns: its homes go at twice the window, d's stay.
    while na.homes() != prompt.len() {
        assert!(died.elapsed() < HANDOFF * 4, "{} homes left", na.homes());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(died.elapsed() >= HANDOFF * 2);
    for &key in &prompt {
        assert_eq!(
            na.grain::<Tally>(key)
                .call(Bump)
                .await
                .expect("a second call"),
            2
        );
    }
}

/// Six hundred homes move to an owner that takes connections and never
/// answers (a silo whose runtime stands still): no try outlasts the give-up
/// time, so every home is given up at twice the window, not after rounds
/// of cut-off tries, 32 at a time, that outlast it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn homes_whose_owner_never_answers_go_at_twice_the_window() {
    use crate::transport::Transport;

    let network = InProcessNetwork::new();
    let [a, b, c] =
        ["silo-a:7000", "silo-b:7000", "silo-c:7000"].map(|address| SiloId::new(address, 1));
    let everyone = view(&[&a, &b, &c]);
    let survivors = view(&[&a, &c]);
    let keys: Vec<u64> = (0..100_000u64)
        .filter(|&key| {
            directory::owner(&grain(key), &everyone) == Some(&b)
                && directory::owner(&grain(key), &survivors) == Some(&c)
        })
        .take(600)
        .collect();
    assert_eq!(keys.len(), 600);
    // c: a listener that accepts and then says nothing.
    let mut silent = network
        .transport(&c.address)
        .bind(c.address.clone())
        .await
        .expect("c's address");
    let held = tokio::spawn(async move {
        let mut streams = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            streams.push(stream);
        }
    });
    let views = [(); 2].map(|()| Arc::new(watch::Sender::new(everyone.clone())));
    let na = start(&network, &a.address, &views[0]).await;
    let nb = start(&network, &b.address, &views[1]).await;
    tokio::time::sleep(HANDOFF + Duration::from_millis(50)).await;
    for &key in &keys {
        assert_eq!(
            na.grain::<Tally>(key)
                .call(Bump)
                .await
                .expect("a first call"),
            1
        );
    }

    nb.kill().await.expect("b stops");
    let died = Instant::now();
    views[0].send_replace(survivors);
    while na.homes() != 0 {
        assert!(
            died.elapsed() < HANDOFF * 11 / 4,
            "{} homes left after {:?}",
            na.homes(),
            died.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        died.elapsed() >= HANDOFF * 2,
        "given up after {:?}",
        died.elapsed()
    );
    held.abort();
}
