//! Rule 3 with views that change one silo at a time: a test drives each
//! node's membership itself. Here, the passes that re-register homes after
//! a view change; `follow.rs`, registrations that race a view change or
//! are refused (calls, arrivals, moves that stay: `follow_owner`,
//! `follow_later`, and a migration's settling).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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

use super::REREGISTER_AT_ONCE;
use crate::connection::{Inbound, InboundRequest};
use crate::node::directory_client::{DirectoryReply, DirectoryRequest};
use crate::wire::RemoteError;

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

impl granary_actors::migration::Migratable for Tally {
    async fn dehydrate(
        &mut self,
        _: &mut GrainContext,
        into: &mut granary_actors::migration::Dehydrated,
    ) -> Result<(), granary_actors::migration::HookError> {
        into.put("count", &self.0)
    }

    async fn rehydrate(
        &mut self,
        _: &mut GrainContext,
        from: granary_actors::migration::Dehydrated,
    ) -> Result<(), granary_actors::migration::HookError> {
        self.0 = from.get("count")?;
        Ok(())
    }
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
const CLUSTER: &str = "home-tests";
const HANDOFF: Duration = Duration::from_millis(400);

fn secret() -> ClusterSecret {
    ClusterSecret::new([0x92; 32]).expect("a secret")
}

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

/// Starts the silo listening at `address`, whose view `view` holds, with
/// a hand-over window of `HANDOFF`.
async fn start(
    network: &InProcessNetwork,
    address: &str,
    view: &Arc<watch::Sender<Vec<Member>>>,
) -> ClusterNode {
    start_with(network, address, view, HANDOFF).await
}

/// `start`, with a hand-over window of `handoff`.
async fn start_with(
    network: &InProcessNetwork,
    address: &str,
    view: &Arc<watch::Sender<Vec<Member>>>,
    handoff: Duration,
) -> ClusterNode {
    start_configured(network, address, view, |config| {
        config.handoff = Some(handoff)
    })
    .await
}

/// `start`, with its configuration changed by `configure` (a hand-over
/// window of `HANDOFF` unless it says otherwise).
async fn start_configured(
    network: &InProcessNetwork,
    address: &str,
    view: &Arc<watch::Sender<Vec<Member>>>,
    configure: impl FnOnce(&mut NodeConfig),
) -> ClusterNode {
    let silo = Silo::builder()
        .register::<Tally>(TYPE)
        .message::<Tally, Bump>("bump")
        .migratable::<Tally>()
        .build()
        .expect("a silo");
    let mut config = NodeConfig::new(
        CLUSTER,
        secret(),
        address,
        "127.0.0.1:1".parse().expect("an address"),
        Vec::new(),
    );
    config.incarnation = 1;
    config.handoff = Some(HANDOFF);
    configure(&mut config);
    let view = view.clone();
    ClusterNode::builder(silo, config)
        .transport(Arc::new(network.transport(address)))
        .placement(Arc::new(PreferLocal))
        .start_with_provider(move |silo| Box::new(Scripted { silo, view }))
        .await
        .expect("the node starts")
}

/// The silos at `names` (addresses `silo-<name>:7000`), first incarnation.
fn silos<const N: usize>(names: [&str; N]) -> [SiloId; N] {
    names.map(|name| SiloId::new(format!("silo-{name}:7000"), 1))
}

/// `count` grain keys whose entry `before` owns in `from` and `after` in
/// `to`.
fn moving(
    from: &[Member],
    before: &SiloId,
    to: &[Member],
    after: &SiloId,
    count: usize,
) -> Vec<u64> {
    let keys: Vec<u64> = (0..100_000u64)
        .filter(|&key| {
            directory::owner(&grain(key), from) == Some(before)
                && directory::owner(&grain(key), to) == Some(after)
        })
        .take(count)
        .collect();
    assert_eq!(keys.len(), count, "keys moving from {before} to {after}");
    keys
}

/// Starts a node for each of `silos`, each following a view of its own,
/// `view` at first; returns them once the window they opened with is over.
async fn start_all(
    network: &InProcessNetwork,
    silos: &[&SiloId],
    view: &[Member],
) -> (Vec<ClusterNode>, Vec<Arc<watch::Sender<Vec<Member>>>>) {
    start_all_with(network, silos, view, HANDOFF).await
}

/// `start_all`, with a hand-over window of `handoff`.
async fn start_all_with(
    network: &InProcessNetwork,
    silos: &[&SiloId],
    view: &[Member],
    handoff: Duration,
) -> (Vec<ClusterNode>, Vec<Arc<watch::Sender<Vec<Member>>>>) {
    let mut nodes = Vec::new();
    let mut views = Vec::new();
    for silo in silos {
        let followed = Arc::new(watch::Sender::new(view.to_vec()));
        nodes.push(start_with(network, &silo.address, &followed, handoff).await);
        views.push(followed);
    }
    tokio::time::sleep(handoff + Duration::from_millis(50)).await;
    (nodes, views)
}

/// Calls each of `keys` from `node`, each answering `expected`.
async fn bump_each(node: &ClusterNode, keys: &[u64], expected: u64) {
    for &key in keys {
        let count = node.grain::<Tally>(key).call(Bump).await;
        assert_eq!(count.expect("a call"), expected, "key {key}");
    }
}

/// How many of `keys` `home`'s silo is home to, registered with `owner`
/// as both see it: the home's recorded owner, and the owner's entry.
fn registered(home: &ClusterNode, owner: &ClusterNode, keys: &[u64]) -> usize {
    let (home_id, owner_id) = (home.id(), owner.id());
    keys.iter()
        .filter(|&&key| {
            let entry = owner.inner.partition.lookup(&grain(key));
            let recorded = home
                .inner
                .homes
                .get(&grain(key))
                .and_then(|home| home.owner.clone());
            entry.map(|entry| entry.silo) == Some(home_id.clone())
                && recorded == Some(owner_id.clone())
        })
        .count()
}

/// Waits until `done` holds, failing with `what` once `deadline` passes.
async fn until(deadline: Instant, what: impl Fn() -> String, done: impl Fn() -> bool) {
    while !done() {
        assert!(Instant::now() < deadline, "{}", what());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
    let [a, b, c] = silos(["a", "b", "c"]);
    let (everyone, survivors) = (view(&[&a, &b, &c]), view(&[&a, &c]));
    // A grain owned by b while it lives and by c once it is gone.
    let keys = moving(&everyone, &b, &survivors, &c, 1);
    let (nodes, views) = start_all(&network, &[&a, &b, &c], &everyone).await;
    let [na, nb, nc] = &nodes[..] else {
        unreachable!("three nodes")
    };
    // a becomes the grain's home, registered with b.
    bump_each(na, &keys, 1).await;
    assert_eq!(na.homes(), 1);

    // b dies; a learns of it at once, c three quarters of a window later.
    nb.kill().await.expect("b stops");
    views[0].send_replace(survivors.clone());
    tokio::time::sleep(HANDOFF * 3 / 4).await;
    views[2].send_replace(survivors);

    // a's home registered with c and kept its activation.
    let deadline = Instant::now() + HANDOFF * 4;
    until(
        deadline,
        || "a never re-registered with c".into(),
        || registered(na, nc, &keys) == 1,
    )
    .await;
    assert_eq!(na.homes(), 1);
    bump_each(na, &keys, 2).await;
    bump_each(nc, &keys, 3).await;
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
    let [a, b, c] = silos(["a", "b", "c"]);
    let (everyone, survivors) = (view(&[&a, &b, &c]), view(&[&a, &c]));
    let keys = moving(&everyone, &b, &survivors, &c, 1);
    let (nodes, views) = start_all(&network, &[&a, &b, &c], &everyone).await;
    let [na, nb, _nc] = &nodes[..] else {
        unreachable!("three nodes")
    };
    bump_each(na, &keys, 1).await;

    nb.kill().await.expect("b stops");
    let died = Instant::now();
    views[0].send_replace(survivors.clone());
    // The home is given up at twice the window (and not before).
    until(
        died + HANDOFF * 4,
        || "a kept a home it could not re-register".into(),
        || na.homes() == 0,
    )
    .await;
    let given_up_after = died.elapsed();
    assert!(
        given_up_after >= HANDOFF * 2,
        "given up after {given_up_after:?}"
    );
    views[2].send_replace(survivors);
    // The next call starts a new activation: the old one was let go.
    let reference = na.grain::<Tally>(keys[0]);
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
    let [a, b, c] = silos(["a", "b", "c"]);
    let (everyone, survivors) = (view(&[&a, &b, &c]), view(&[&a, &c]));
    let keys = moving(&everyone, &b, &survivors, &c, 40);
    let (nodes, views) = start_all(&network, &[&a, &b, &c], &everyone).await;
    let [na, nb, nc] = &nodes[..] else {
        unreachable!("three nodes")
    };
    bump_each(na, &keys, 1).await;
    assert_eq!(na.homes(), 40);

    // b dies; c, which would own the homes now, does not know it.
    nb.kill().await.expect("b stops");
    views[0].send_replace(survivors);
    tokio::time::sleep(HANDOFF / 4).await;
    // Then c dies too, and a is alone: it owns every entry.
    nc.kill().await.expect("c stops");
    let alone_at = Instant::now();
    views[0].send_replace(view(&[&a]));
    let what = || {
        format!(
            "{} of 40 homes registered with a {:?} after it was alone",
            registered(na, na, &keys),
            alone_at.elapsed()
        )
    };
    // Before the first pass's deadline (at most seven quarters of a window
    // from here), with room for a busy machine.
    until(alone_at + HANDOFF * 3 / 2, what, || {
        registered(na, na, &keys) == keys.len()
    })
    .await;
    // Past the first pass's deadline: nothing let go.
    tokio::time::sleep(HANDOFF * 2).await;
    assert_eq!(na.homes(), 40);
    bump_each(na, &keys, 2).await;
    assert_eq!(na.silo().activations_started(), 40);
}

/// Forty homes move to an owner that never learns of the change, four to
/// one that learns at once. The prompt owner's homes register before the
/// late owner's are given up at twice the window (a late owner holds up
/// no other owner's homes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_owner_holds_up_no_other_owners_homes() {
    let network = InProcessNetwork::new();
    let [a, b, c, d] = silos(["a", "b", "c", "d"]);
    let (everyone, survivors) = (view(&[&a, &b, &c, &d]), view(&[&a, &c, &d]));
    let late = moving(&everyone, &b, &survivors, &c, 40);
    let prompt = moving(&everyone, &b, &survivors, &d, 4);
    let (nodes, views) = start_all(&network, &[&a, &b, &c, &d], &everyone).await;
    let [na, nb, _nc, nd] = &nodes[..] else {
        unreachable!("four nodes")
    };
    bump_each(na, &late, 1).await;
    bump_each(na, &prompt, 1).await;

    nb.kill().await.expect("b stops");
    let died = Instant::now();
    views[0].send_replace(survivors.clone());
    views[3].send_replace(survivors);
    let what = || {
        format!(
            "{} of 4 homes registered with d after {:?}",
            registered(na, nd, &prompt),
            died.elapsed()
        )
    };
    // Before the late owner's homes are given up (twice the window), with
    // room for a busy machine.
    until(died + HANDOFF * 3 / 2, what, || {
        registered(na, nd, &prompt) == prompt.len()
    })
    .await;
    // c never learns: its homes go at twice the window, d's stay.
    until(
        died + HANDOFF * 4,
        || format!("{} homes left", na.homes()),
        || na.homes() == prompt.len(),
    )
    .await;
    assert!(died.elapsed() >= HANDOFF * 2);
    bump_each(na, &prompt, 2).await;
}

/// What a silent owner (`silent_owner`) was sent.
#[derive(Default)]
struct Heard {
    connections: AtomicUsize,
    requests: AtomicUsize,
}

/// A stand-in for a silo at `silo` that takes connections: with
/// `inbound`, it completes each connection's handshake and hands it the
/// requests; without, it says nothing at all. Counts the connections in
/// `heard`; runs until aborted.
async fn fake_silo(
    network: &InProcessNetwork,
    silo: &SiloId,
    inbound: Option<Arc<dyn Inbound>>,
    heard: Arc<Heard>,
) -> tokio::task::JoinHandle<()> {
    use crate::connection::{self, AnyPeer, ConnectionConfig};
    use crate::transport::Transport;

    let mut listener = network
        .transport(&silo.address)
        .bind(silo.address.clone())
        .await
        .expect("the fake silo's address");
    let silo = silo.clone();
    tokio::spawn(async move {
        let (mut streams, mut connections) = (Vec::new(), Vec::new());
        while let Ok((io, _)) = listener.accept().await {
            heard.connections.fetch_add(1, Ordering::SeqCst);
            let Some(inbound) = &inbound else {
                streams.push(io);
                continue;
            };
            let accepted = connection::accept(
                io,
                silo.clone(),
                CLUSTER,
                &secret(),
                &AnyPeer,
                inbound.clone(),
                ConnectionConfig::default(),
            )
            .await;
            connections.extend(accepted.ok());
        }
    })
}

/// A silo whose runtime stands still past its acceptor (see `fake_silo`):
/// with `handshakes`, it completes each handshake and then holds every
/// request it is sent, counting them; without, it says nothing at all.
async fn silent_owner(
    network: &InProcessNetwork,
    silo: &SiloId,
    handshakes: bool,
) -> (tokio::task::JoinHandle<()>, Arc<Heard>) {
    struct Holds(Arc<Heard>);

    impl Inbound for Holds {
        fn request(
            &self,
            _: &SiloId,
            _: InboundRequest,
        ) -> BoxFuture<'static, Result<Vec<u8>, RemoteError>> {
            self.0.requests.fetch_add(1, Ordering::SeqCst);
            Box::pin(std::future::pending())
        }
    }

    let heard = Arc::new(Heard::default());
    let inbound = handshakes.then(|| Arc::new(Holds(heard.clone())) as Arc<dyn Inbound>);
    let held = fake_silo(network, silo, inbound, heard.clone()).await;
    (held, heard)
}

/// Six hundred homes move to an owner that never completes a handshake:
/// the connection opened before a round is cut off at twice the window,
/// when no try may start any more, so every home is given up then (and
/// not at three windows, as tries waiting on that handshake would be). A
/// window of a second leaves a busy machine a second between the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn homes_whose_owner_never_completes_a_handshake_go_at_twice_the_window() {
    let window = Duration::from_secs(1);
    let (given_up_after, heard) = homes_given_up_by_a_silent_owner(false, window, window * 3).await;
    assert!(
        given_up_after >= window * 2,
        "given up after {given_up_after:?}"
    );
    assert!(
        heard.connections.load(Ordering::SeqCst) >= 1,
        "the owner was dialled"
    );
}

/// Six hundred homes move to an owner that completes handshakes and then
/// never answers. The first tries, as many as run at once, wait for their
/// answer until a window past twice the window; no other try starts (they
/// would all start after it), so every home is given up at about three
/// windows, not after rounds of tries, 32 at a time, that outlast them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn homes_whose_owner_never_answers_go_at_about_three_windows() {
    let (given_up_after, heard) =
        homes_given_up_by_a_silent_owner(true, HANDOFF, HANDOFF * 5).await;
    assert!(
        given_up_after >= HANDOFF * 3,
        "given up after {given_up_after:?}"
    );
    assert_eq!(
        heard.requests.load(Ordering::SeqCst),
        REREGISTER_AT_ONCE,
        "one round of tries"
    );
}

/// Moves six hundred homes from a silo that dies to a silent owner (see
/// `silent_owner`), with a hand-over window of `handoff`, failing unless
/// they are all given up `within` the death; how long that took, and what
/// the owner heard.
async fn homes_given_up_by_a_silent_owner(
    handshakes: bool,
    handoff: Duration,
    within: Duration,
) -> (Duration, Arc<Heard>) {
    let network = InProcessNetwork::new();
    let [a, b, c] = silos(["a", "b", "c"]);
    let (everyone, survivors) = (view(&[&a, &b, &c]), view(&[&a, &c]));
    let keys = moving(&everyone, &b, &survivors, &c, 600);
    let (held, heard) = silent_owner(&network, &c, handshakes).await;
    let (nodes, views) = start_all_with(&network, &[&a, &b], &everyone, handoff).await;
    let [na, nb] = &nodes[..] else {
        unreachable!("two nodes")
    };
    bump_each(na, &keys, 1).await;

    nb.kill().await.expect("b stops");
    let died = Instant::now();
    views[0].send_replace(survivors);
    let what = || format!("{} homes left after {:?}", na.homes(), died.elapsed());
    until(died + within, what, || na.homes() == 0).await;
    let given_up_after = died.elapsed();
    held.abort();
    (given_up_after, heard)
}

mod follow;
