//! Rule 3 with views that change one silo at a time: a test drives each
//! node's membership itself.

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
    config.handoff = Some(handoff);
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

/// The owner of a grain's entry in the view its home silo has: answers
/// lookups (no entry) at once, takes a switch, holds each registration
/// proposed by `held` until the test lets it through, then takes it (or,
/// `refusing`, answers `Retry`), and takes other registrations at once.
struct HoldsRegistrations {
    held: SiloId,
    refusing: bool,
    reached: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl HoldsRegistrations {
    fn of(held: &SiloId) -> Arc<HoldsRegistrations> {
        Arc::new(HoldsRegistrations {
            held: held.clone(),
            refusing: false,
            reached: tokio::sync::Notify::new(),
            release: tokio::sync::Notify::new(),
        })
    }

    /// Holds `held`'s registrations, then refuses them.
    fn refusing(held: &SiloId) -> Arc<HoldsRegistrations> {
        Arc::new(HoldsRegistrations {
            refusing: true,
            ..Arc::into_inner(HoldsRegistrations::of(held)).expect("one owner")
        })
    }
}

impl Inbound for Arc<HoldsRegistrations> {
    fn request(
        &self,
        _: &SiloId,
        request: InboundRequest,
    ) -> BoxFuture<'static, Result<Vec<u8>, RemoteError>> {
        use granary_actors::dispatch::{decode, encode};

        let gate = self.clone();
        Box::pin(async move {
            let asked: DirectoryRequest =
                decode(&request.payload).map_err(|err| RemoteError::BadPayload(err.to_string()))?;
            let reply = match asked {
                DirectoryRequest::Lookup(_) => DirectoryReply::Unknown,
                DirectoryRequest::Register { home, .. } => {
                    if home.silo == gate.held {
                        gate.reached.notify_one();
                        gate.release.notified().await;
                        if gate.refusing {
                            return encode(&DirectoryReply::Retry)
                                .map_err(|err| RemoteError::Other(err.to_string()));
                        }
                    }
                    DirectoryReply::Home(home)
                }
                DirectoryRequest::Switch { to, .. } => DirectoryReply::Home(to),
                _ => DirectoryReply::Retry,
            };
            encode(&reply).map_err(|err| RemoteError::Other(err.to_string()))
        })
    }
}

/// A grain's first call registers its home with the entry's owner, x;
/// while x holds the registration, y joins the view of the home's silo and
/// owns the entry from then on. The view's re-registration passes over
/// the home (not confirmed yet), so the call registers it again with y
/// before it returns. (It used to record x and stop: y, which had no
/// entry, would have let another silo claim the grain.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_registering_across_a_view_change_registers_with_the_new_owner() {
    let network = InProcessNetwork::new();
    let [a, x, y] = silos(["a", "x", "y"]);
    let (before, after) = (view(&[&a, &x]), view(&[&a, &x, &y]));
    let keys = moving(&before, &x, &after, &y, 1);
    let gate = HoldsRegistrations::of(&a);
    let inbound: Arc<dyn Inbound> = Arc::new(gate.clone());
    let held = fake_silo(&network, &x, Some(inbound), Arc::default()).await;
    let followed = Arc::new(watch::Sender::new(before));
    let na = start(&network, &a.address, &followed).await;
    let ny = start(
        &network,
        &y.address,
        &Arc::new(watch::Sender::new(after.clone())),
    )
    .await;
    tokio::time::sleep(HANDOFF + Duration::from_millis(50)).await;

    let calling = {
        let (na, key) = (na.clone(), keys[0]);
        tokio::spawn(async move { na.grain::<Tally>(key).call(Bump).await })
    };
    tokio::time::timeout(Duration::from_secs(10), gate.reached.notified())
        .await
        .expect("the registration reached x");
    // a takes the new view in, and its re-registration pass (which finds
    // no confirmed home) has ended before x answers.
    take_in(&na, &followed, after).await;
    gate.release.notify_one();
    let count = calling.await.expect("the call's task").expect("the call");
    assert_eq!(count, 1);
    assert_eq!(registered(&na, &ny, &keys), 1, "registered with y");
    bump_each(&ny, &keys, 2).await;
    assert_eq!(
        na.silo().activations_started() + ny.silo().activations_started(),
        1,
        "one activation in all"
    );
    held.abort();
}

/// Sends `view` to `node`'s membership, and waits until the node has
/// taken it in and its re-registration pass for it has ended.
async fn take_in(node: &ClusterNode, followed: &watch::Sender<Vec<Member>>, view: Vec<Member>) {
    let pass = || {
        let pass = node.inner.reregistering.lock().expect("the pass's lock");
        pass.as_ref().map(|pass| (pass.id(), pass.is_finished()))
    };
    let before = pass().map(|(id, _)| id);
    let silos = view.len();
    followed.send_replace(view);
    until(
        Instant::now() + Duration::from_secs(5),
        || format!("{} never took the view in", node.id()),
        || {
            node.inner.view().len() == silos
                && pass().is_some_and(|(id, done)| Some(id) != before && done)
        },
    )
    .await;
}

/// A grain moves from a to b; b registers its arrival with the entry's
/// owner, x, and while x holds the registration, y joins b's view and
/// owns the entry from then on. The arrival, moving (so no view's pass
/// re-registers it), follows the owner before it takes messages, and the
/// move returns once it has: y's entry names b, and a call from y reaches
/// the activation that arrived, its count intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arrival_registering_across_a_view_change_registers_with_the_new_owner() {
    use granary_actors::migration::MigrationTarget;

    let network = InProcessNetwork::new();
    let [a, b, x, y] = silos(["a", "b", "x", "y"]);
    let (before, after) = (view(&[&a, &b, &x]), view(&[&a, &b, &x, &y]));
    let keys = moving(&before, &x, &after, &y, 1);
    let gate = HoldsRegistrations::of(&b);
    let inbound: Arc<dyn Inbound> = Arc::new(gate.clone());
    let held = fake_silo(&network, &x, Some(inbound), Arc::default()).await;
    let (nodes, views) = start_all(&network, &[&a, &b], &before).await;
    let [na, nb] = &nodes[..] else {
        unreachable!("two nodes")
    };
    let ny = start(
        &network,
        &y.address,
        &Arc::new(watch::Sender::new(after.clone())),
    )
    .await;
    tokio::time::sleep(HANDOFF + Duration::from_millis(50)).await;
    bump_each(na, &keys, 1).await;

    let moving = {
        let (na, key, to) = (na.clone(), keys[0], b.address.clone());
        tokio::spawn(async move {
            na.grain::<Tally>(key)
                .migrate(MigrationTarget::Silo(to))
                .await
        })
    };
    tokio::time::timeout(Duration::from_secs(10), gate.reached.notified())
        .await
        .expect("the arrival's registration reached x");
    take_in(nb, &views[1], after).await;
    gate.release.notify_one();
    let moved = tokio::time::timeout(Duration::from_secs(30), moving)
        .await
        .expect("the move ended")
        .expect("the move's task");
    moved.expect("the move");
    assert_eq!(registered(nb, &ny, &keys), 1, "registered with y");
    bump_each(&ny, &keys, 2).await;
    held.abort();
}

/// What `an_arrival_refused_by_y` leaves: the nodes, the grain's key, y's
/// view (without y), and when b took in the view in which y owns the
/// grain's entry.
struct Refused {
    nb: ClusterNode,
    ny: ClusterNode,
    key: u64,
    y_follows: Arc<watch::Sender<Vec<Member>>>,
    after: Vec<Member>,
    changed: Instant,
    _held: Aborting,
}

/// Aborts a task when dropped.
struct Aborting(tokio::task::JoinHandle<()>);

impl Drop for Aborting {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A grain moves from a to b; b registers its arrival with the entry's
/// owner, x, and while x holds the registration, y joins b's view and owns
/// the entry from then on. y itself has not learnt of the view (it owns
/// nothing in the one it has), so it refuses the arrival's follow, and the
/// arrival serves recorded with x. Returns once the move has returned.
async fn an_arrival_refused_by_y(network: &InProcessNetwork) -> Refused {
    use granary_actors::migration::MigrationTarget;

    let [a, b, x, y] = silos(["a", "b", "x", "y"]);
    let (before, after) = (view(&[&a, &b, &x]), view(&[&a, &b, &x, &y]));
    let keys = moving(&before, &x, &after, &y, 1);
    let gate = HoldsRegistrations::of(&b);
    let inbound: Arc<dyn Inbound> = Arc::new(gate.clone());
    let held = Aborting(fake_silo(network, &x, Some(inbound), Arc::default()).await);
    let (nodes, views) = start_all(network, &[&a, &b], &before).await;
    let [na, nb] = &nodes[..] else {
        unreachable!("two nodes")
    };
    let y_follows = Arc::new(watch::Sender::new(before));
    let ny = start(network, &y.address, &y_follows).await;
    bump_each(na, &keys, 1).await;

    let moving = {
        let (na, key, to) = (na.clone(), keys[0], b.address.clone());
        tokio::spawn(async move {
            na.grain::<Tally>(key)
                .migrate(MigrationTarget::Silo(to))
                .await
        })
    };
    tokio::time::timeout(Duration::from_secs(10), gate.reached.notified())
        .await
        .expect("the arrival's registration reached x");
    let changed = Instant::now();
    take_in(nb, &views[1], after.clone()).await;
    gate.release.notify_one();
    let moved = tokio::time::timeout(Duration::from_secs(30), moving)
        .await
        .expect("the move ended")
        .expect("the move's task");
    moved.expect("the move");
    // Serving, recorded with x; y, which refuses, has no entry.
    let recorded = nb
        .inner
        .homes
        .get(&grain(keys[0]))
        .and_then(|home| home.owner.clone());
    assert_eq!(recorded, Some(x), "the arrival's recorded owner");
    assert!(ny.inner.partition.lookup(&grain(keys[0])).is_none());
    Refused {
        nb: nb.clone(),
        ny,
        key: keys[0],
        y_follows,
        after,
        changed,
        _held: held,
    }
}

/// The arrival whose new owner refused it (`an_arrival_refused_by_y`)
/// re-registers on its own once that owner learns of the view, with no
/// call to prompt it: y's entry names b, and a call from y reaches the
/// activation that arrived, its count intact. (The arrival used to stay
/// recorded with x until its next call: y, with no entry, would have let
/// another silo claim the grain.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arrival_refused_by_its_new_owner_registers_once_the_owner_learns() {
    let network = InProcessNetwork::new();
    let refused = an_arrival_refused_by_y(&network).await;
    let keys = [refused.key];
    assert_eq!(registered(&refused.nb, &refused.ny, &keys), 0);
    refused.y_follows.send_replace(refused.after.clone());
    // Before b would give the home up: twice the window after its view
    // changed, which was after `changed`. A home not registered by then is
    // one b gave up, not a slow test.
    let (nb, ny) = (&refused.nb, &refused.ny);
    until(
        refused.changed + HANDOFF * 2,
        || "the arrival never registered with y".into(),
        || registered(nb, ny, &keys) == 1,
    )
    .await;
    bump_each(ny, &keys, 2).await;
    assert_eq!(nb.homes(), 1);
}

/// The arrival whose new owner refused it (`an_arrival_refused_by_y`),
/// an owner that never learns of the view: it is given up at twice the
/// window after b's view changed, as a view's pass gives up a home it
/// could not re-register (y may by then let another silo claim it), and
/// its activation is let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arrival_whose_new_owner_never_learns_is_given_up_at_twice_the_window() {
    let network = InProcessNetwork::new();
    let refused = an_arrival_refused_by_y(&network).await;
    let nb = &refused.nb;
    until(
        refused.changed + HANDOFF * 4,
        || format!("{} homes left at b", nb.homes()),
        || nb.homes() == 0,
    )
    .await;
    let given_up_after = refused.changed.elapsed();
    assert!(
        given_up_after >= HANDOFF * 2,
        "given up after {given_up_after:?}"
    );
    let key = GrainKey::U64(refused.key);
    until(
        Instant::now() + HANDOFF * 2,
        || "the arrived activation lived on".into(),
        || !nb.silo().is_active_named(TYPE, &key),
    )
    .await;
}

/// The owner of a grain's entry: answers lookups (no entry) at once, takes
/// a switch, refuses (`Retry`) the first `refusals` registrations proposed
/// by `of` and takes every other registration.
struct RefusesRegistrations {
    of: SiloId,
    refusals: AtomicUsize,
}

impl Inbound for Arc<RefusesRegistrations> {
    fn request(
        &self,
        _: &SiloId,
        request: InboundRequest,
    ) -> BoxFuture<'static, Result<Vec<u8>, RemoteError>> {
        use granary_actors::dispatch::{decode, encode};

        let owner = self.clone();
        Box::pin(async move {
            let asked: DirectoryRequest =
                decode(&request.payload).map_err(|err| RemoteError::BadPayload(err.to_string()))?;
            let reply = match asked {
                DirectoryRequest::Lookup(_) => DirectoryReply::Unknown,
                DirectoryRequest::Register { home, .. } => {
                    let refused = home.silo == owner.of
                        && owner
                            .refusals
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                                left.checked_sub(1)
                            })
                            .is_ok();
                    if refused {
                        DirectoryReply::Retry
                    } else {
                        DirectoryReply::Home(home)
                    }
                }
                DirectoryRequest::Switch { to, .. } => DirectoryReply::Home(to),
                _ => DirectoryReply::Retry,
            };
            encode(&reply).map_err(|err| RemoteError::Other(err.to_string()))
        })
    }
}

/// Moves a grain whose entry x owns from a to b, x refusing `refusals` of
/// b's registrations; what the move returned, how long it took, and the
/// nodes a and b.
async fn move_refused_by_x(
    network: &InProcessNetwork,
    refusals: usize,
) -> (
    Result<granary_actors::migration::Migrated, granary_actors::migration::MigrationError>,
    Duration,
    [ClusterNode; 2],
    u64,
    Arc<RefusesRegistrations>,
    Aborting,
) {
    use granary_actors::migration::MigrationTarget;

    let [a, b, x] = silos(["a", "b", "x"]);
    let everyone = view(&[&a, &b, &x]);
    let key = moving(&everyone, &x, &everyone, &x, 1)[0];
    let owner = Arc::new(RefusesRegistrations {
        of: b.clone(),
        refusals: AtomicUsize::new(refusals),
    });
    let inbound: Arc<dyn Inbound> = Arc::new(owner.clone());
    let held = Aborting(fake_silo(network, &x, Some(inbound), Arc::default()).await);
    let (nodes, _views) = start_all(network, &[&a, &b], &everyone).await;
    let [na, nb] = &nodes[..] else {
        unreachable!("two nodes")
    };
    bump_each(na, &[key], 1).await;
    let started = Instant::now();
    let moved = tokio::time::timeout(
        Duration::from_secs(30),
        na.grain::<Tally>(key)
            .migrate(MigrationTarget::Silo(b.address.clone())),
    )
    .await
    .expect("the move ended");
    let took = started.elapsed();
    (moved, took, [na.clone(), nb.clone()], key, owner, held)
}

/// An arrival whose entry's owner refuses its registration three times (it
/// does not see the target yet, say) registers when asked again after a
/// pause, as a view's homes do, and serves with its state. (A single
/// refusal used to discard it while the move reported success: its state
/// was lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arrival_its_owner_refuses_at_first_registers_when_asked_again() {
    let network = InProcessNetwork::new();
    let (moved, _, [_, nb], key, owner, _held) = move_refused_by_x(&network, 3).await;
    moved.expect("the move");
    assert_eq!(owner.refusals.load(Ordering::SeqCst), 0, "three refusals");
    bump_each(&nb, &[key], 2).await;
}

/// An arrival whose entry's owner never takes its registration is
/// discarded once a view's homes would have stopped trying (twice the
/// window), and the move says so: the grain lives nowhere, and its moved
/// state is lost. (The move used to report success.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_whose_arrival_its_owner_never_takes_says_it_was_discarded() {
    use granary_actors::migration::MigrationError;

    let network = InProcessNetwork::new();
    let (moved, took, [na, nb], key, _owner, _held) = move_refused_by_x(&network, usize::MAX).await;
    match moved {
        Err(MigrationError::Discarded { grain, reason }) => {
            assert_eq!(grain, self::grain(key));
            assert!(reason.contains("did not take"), "{reason}");
        }
        other => panic!("the move returned {other:?}"),
    }
    assert!(took >= HANDOFF * 2, "discarded after {took:?}");
    let key = GrainKey::U64(key);
    until(
        Instant::now() + HANDOFF * 2,
        || "an activation lived on".into(),
        || !na.silo().is_active_named(TYPE, &key) && !nb.silo().is_active_named(TYPE, &key),
    )
    .await;
    assert_eq!(nb.homes(), 0);
}

/// A stand-in for a move's target: takes every migration request at once
/// but `arrive`, which it holds until the test lets it through and then
/// refuses (the grain's `rehydrate` failed, as it says).
struct HoldsArrivals {
    grain: GrainId,
    reached: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl Inbound for Arc<HoldsArrivals> {
    fn request(
        &self,
        _: &SiloId,
        request: InboundRequest,
    ) -> BoxFuture<'static, Result<Vec<u8>, RemoteError>> {
        use granary_actors::dispatch::encode;
        use granary_actors::migration::MigrationError;

        let target = self.clone();
        Box::pin(async move {
            let answer: Result<(), MigrationError> = if request.message == "arrive" {
                target.reached.notify_one();
                target.release.notified().await;
                Err(MigrationError::Hook {
                    grain: target.grain.clone(),
                    reason: "rehydrate failed".into(),
                })
            } else {
                Ok(())
            };
            encode(&answer).map_err(|err| RemoteError::Other(err.to_string()))
        })
    }
}

/// A grain on a, registered with x, moves to b; while b holds its arrival,
/// y joins a's view and owns the entry from then on. a's re-registration
/// pass passes over the moving home; then b refuses the arrival and the
/// grain stays on a. The home, recorded with x, registers with y on its
/// own, with no call to prompt it. (It used to stay recorded with x until
/// its next call: y, with no entry, would have let another silo claim the
/// grain.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_that_stays_after_the_view_changed_registers_with_the_new_owner() {
    use granary_actors::migration::{MigrationError, MigrationTarget};

    let network = InProcessNetwork::new();
    let [a, b, x, y] = silos(["a", "b", "x", "y"]);
    let (before, after) = (view(&[&a, &b, &x]), view(&[&a, &b, &x, &y]));
    let key = moving(&before, &x, &after, &y, 1)[0];
    let owner: Arc<dyn Inbound> = Arc::new(HoldsRegistrations::of(&b));
    let _x = Aborting(fake_silo(&network, &x, Some(owner), Arc::default()).await);
    let target = Arc::new(HoldsArrivals {
        grain: grain(key),
        reached: tokio::sync::Notify::new(),
        release: tokio::sync::Notify::new(),
    });
    let inbound: Arc<dyn Inbound> = Arc::new(target.clone());
    let _b = Aborting(fake_silo(&network, &b, Some(inbound), Arc::default()).await);
    let followed = Arc::new(watch::Sender::new(before));
    let na = start(&network, &a.address, &followed).await;
    let ny = start(
        &network,
        &y.address,
        &Arc::new(watch::Sender::new(after.clone())),
    )
    .await;
    tokio::time::sleep(HANDOFF + Duration::from_millis(50)).await;
    bump_each(&na, &[key], 1).await;

    let moving = {
        let (na, to) = (na.clone(), b.address.clone());
        tokio::spawn(async move {
            na.grain::<Tally>(key)
                .migrate(MigrationTarget::Silo(to))
                .await
        })
    };
    tokio::time::timeout(Duration::from_secs(10), target.reached.notified())
        .await
        .expect("the state reached b");
    take_in(&na, &followed, after).await;
    target.release.notify_one();
    let moved = tokio::time::timeout(Duration::from_secs(30), moving)
        .await
        .expect("the move ended")
        .expect("the move's task");
    assert!(
        matches!(moved, Err(MigrationError::Hook { .. })),
        "the move returned {moved:?}"
    );
    until(
        Instant::now() + HANDOFF,
        || "the home never registered with y".into(),
        || registered(&na, &ny, &[key]) == 1,
    )
    .await;
    bump_each(&ny, &[key], 2).await;
    assert_eq!(
        ny.silo().activations_started(),
        0,
        "served by a's activation"
    );
}

/// A grain moves from a to b. b registers its arrival with x, which holds
/// it while y joins b's view and owns the entry from then on; then b's
/// follow to y is held past b's deadline for that view (twice the window)
/// and refused. Another silo may have claimed the grain from y by then, so
/// b discards the arrival instead of serving it, and the move says so.
/// (b used to serve it, tell the source it had, and give it up at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arrival_still_following_at_the_views_deadline_is_discarded() {
    use granary_actors::migration::{MigrationError, MigrationTarget};

    let network = InProcessNetwork::new();
    let [a, b, x, y] = silos(["a", "b", "x", "y"]);
    let (before, after) = (view(&[&a, &b, &x]), view(&[&a, &b, &x, &y]));
    let key = moving(&before, &x, &after, &y, 1)[0];
    let first = HoldsRegistrations::of(&b);
    let inbound: Arc<dyn Inbound> = Arc::new(first.clone());
    let _x = Aborting(fake_silo(&network, &x, Some(inbound), Arc::default()).await);
    let follow = HoldsRegistrations::refusing(&b);
    let inbound: Arc<dyn Inbound> = Arc::new(follow.clone());
    let _y = Aborting(fake_silo(&network, &y, Some(inbound), Arc::default()).await);
    let (nodes, views) = start_all(&network, &[&a, &b], &before).await;
    let [na, nb] = &nodes[..] else {
        unreachable!("two nodes")
    };
    bump_each(na, &[key], 1).await;

    let moving = {
        let (na, to) = (na.clone(), b.address.clone());
        tokio::spawn(async move {
            na.grain::<Tally>(key)
                .migrate(MigrationTarget::Silo(to))
                .await
        })
    };
    tokio::time::timeout(Duration::from_secs(10), first.reached.notified())
        .await
        .expect("the arrival's registration reached x");
    let changed = Instant::now();
    take_in(nb, &views[1], after).await;
    first.release.notify_one();
    tokio::time::timeout(Duration::from_secs(10), follow.reached.notified())
        .await
        .expect("the arrival's follow reached y");
    tokio::time::sleep(
        (changed + HANDOFF * 2 + HANDOFF / 4).saturating_duration_since(Instant::now()),
    )
    .await;
    follow.release.notify_one();
    let moved = tokio::time::timeout(Duration::from_secs(30), moving)
        .await
        .expect("the move ended")
        .expect("the move's task");
    match moved {
        Err(MigrationError::Discarded { reason, .. }) => {
            assert!(reason.contains("deadline"), "{reason}");
        }
        other => panic!("the move returned {other:?}"),
    }
    assert_eq!(nb.homes(), 0);
}

/// A grain moves from a to b; x, the entry's owner, never answers b's
/// registration. b's try waits until a window past twice the window, not
/// for the whole call timeout (thirty seconds), so b discards the arrival
/// within the source's wait for its answer, and the move says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arrival_whose_owner_never_answers_is_discarded_within_the_sources_wait() {
    use granary_actors::migration::{MigrationError, MigrationTarget};

    let network = InProcessNetwork::new();
    let [a, b, x] = silos(["a", "b", "x"]);
    let everyone = view(&[&a, &b, &x]);
    let key = moving(&everyone, &x, &everyone, &x, 1)[0];
    let owner: Arc<dyn Inbound> = Arc::new(HoldsRegistrations::of(&b));
    let _x = Aborting(fake_silo(&network, &x, Some(owner), Arc::default()).await);
    let (nodes, _views) = start_all(&network, &[&a, &b], &everyone).await;
    let [na, _nb] = &nodes[..] else {
        unreachable!("two nodes")
    };
    bump_each(na, &[key], 1).await;
    let started = Instant::now();
    let moved = tokio::time::timeout(
        Duration::from_secs(20),
        na.grain::<Tally>(key)
            .migrate(MigrationTarget::Silo(b.address.clone())),
    )
    .await
    .expect("the move ended before the call timeout");
    assert!(
        matches!(moved, Err(MigrationError::Discarded { .. })),
        "the move returned {moved:?}"
    );
    assert!(
        started.elapsed() >= HANDOFF * 3,
        "after {:?}",
        started.elapsed()
    );
}
