//! Node rule 3 for homes that no view's pass re-registers: a call's
//! registration or a migration's arrival across a view change
//! (`follow_owner`), one refused or still following (`follow_later`), a
//! move that stays after the view changed, and an arrival its owner does
//! not take (migration rule 4: discarded, and the move says so).

use granary_actors::migration::{Migrated, MigrationError, MigrationTarget};

use super::*;

/// The owner of a grain's entry in the view its home silo has, as a test
/// scripts it: answers lookups (no entry) at once and takes a switch; of
/// the registrations `of` proposes, holds each until the test lets it
/// through (if `holds`), then refuses it (`Retry`) while `refusals` last,
/// and takes it after; takes every other registration at once.
struct FakeOwner {
    of: SiloId,
    holds: bool,
    refusals: AtomicUsize,
    reached: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl FakeOwner {
    fn new(of: &SiloId, holds: bool, refusals: usize) -> Arc<FakeOwner> {
        Arc::new(FakeOwner {
            of: of.clone(),
            holds,
            refusals: AtomicUsize::new(refusals),
            reached: tokio::sync::Notify::new(),
            release: tokio::sync::Notify::new(),
        })
    }

    /// Holds `of`'s registrations, then takes them.
    fn holding(of: &SiloId) -> Arc<FakeOwner> {
        FakeOwner::new(of, true, 0)
    }

    /// Holds `of`'s registrations, then refuses them.
    fn holding_then_refusing(of: &SiloId) -> Arc<FakeOwner> {
        FakeOwner::new(of, true, usize::MAX)
    }

    /// Refuses the first `refusals` of `of`'s registrations at once.
    fn refusing(of: &SiloId, refusals: usize) -> Arc<FakeOwner> {
        FakeOwner::new(of, false, refusals)
    }

    /// Stands in for the silo at `at` on `network` until dropped.
    async fn serve(self: &Arc<FakeOwner>, network: &InProcessNetwork, at: &SiloId) -> Aborting {
        let inbound: Arc<dyn Inbound> = Arc::new(self.clone());
        Aborting(fake_silo(network, at, Some(inbound), Arc::default()).await)
    }
}

impl Inbound for Arc<FakeOwner> {
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
                DirectoryRequest::Register { home, .. } if home.silo == owner.of => {
                    if owner.holds {
                        owner.reached.notify_one();
                        owner.release.notified().await;
                    }
                    let refused = owner
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
                DirectoryRequest::Register { home, .. } => DirectoryReply::Home(home),
                DirectoryRequest::Switch { to, .. } => DirectoryReply::Home(to),
                _ => DirectoryReply::Retry,
            };
            encode(&reply).map_err(|err| RemoteError::Other(err.to_string()))
        })
    }
}

/// Aborts a task when dropped.
struct Aborting(tokio::task::JoinHandle<()>);

impl Drop for Aborting {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Waits until a fake silo has reached what `notify` says, at most ten
/// seconds, failing with `what` otherwise.
async fn reached(notify: &tokio::sync::Notify, what: &str) {
    tokio::time::timeout(Duration::from_secs(10), notify.notified())
        .await
        .unwrap_or_else(|_| panic!("{what} never came"));
}

/// Starts moving grain `key` from `from` to silo `to` (asked at `from`),
/// on a task of its own.
fn start_move(
    from: &ClusterNode,
    key: u64,
    to: &SiloId,
) -> tokio::task::JoinHandle<Result<Migrated, MigrationError>> {
    let (from, to) = (from.clone(), to.address.clone());
    tokio::spawn(async move {
        from.grain::<Tally>(key)
            .migrate(MigrationTarget::Silo(to))
            .await
    })
}

/// What the move started by `start_move` returned, waiting at most thirty
/// seconds.
async fn outcome_of(
    moving: tokio::task::JoinHandle<Result<Migrated, MigrationError>>,
) -> Result<Migrated, MigrationError> {
    tokio::time::timeout(Duration::from_secs(30), moving)
        .await
        .expect("the move ended")
        .expect("the move's task")
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
    let gate = FakeOwner::holding(&a);
    let _x = gate.serve(&network, &x).await;
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
    reached(&gate.reached, "the registration reached x").await;
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
    let network = InProcessNetwork::new();
    let [a, b, x, y] = silos(["a", "b", "x", "y"]);
    let (before, after) = (view(&[&a, &b, &x]), view(&[&a, &b, &x, &y]));
    let keys = moving(&before, &x, &after, &y, 1);
    let gate = FakeOwner::holding(&b);
    let _x = gate.serve(&network, &x).await;
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

    let moving = start_move(na, keys[0], &b);
    reached(&gate.reached, "the arrival's registration reached x").await;
    take_in(nb, &views[1], after).await;
    gate.release.notify_one();
    let moved = outcome_of(moving).await;
    moved.expect("the move");
    assert_eq!(registered(nb, &ny, &keys), 1, "registered with y");
    bump_each(&ny, &keys, 2).await;
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

/// A grain moves from a to b; b registers its arrival with the entry's
/// owner, x, and while x holds the registration, y joins b's view and owns
/// the entry from then on. y itself has not learnt of the view (it owns
/// nothing in the one it has), so it refuses the arrival's follow, and the
/// arrival serves recorded with x. Returns once the move has returned.
async fn an_arrival_refused_by_y(network: &InProcessNetwork) -> Refused {
    let [a, b, x, y] = silos(["a", "b", "x", "y"]);
    let (before, after) = (view(&[&a, &b, &x]), view(&[&a, &b, &x, &y]));
    let keys = moving(&before, &x, &after, &y, 1);
    let gate = FakeOwner::holding(&b);
    let held = gate.serve(network, &x).await;
    let (nodes, views) = start_all(network, &[&a, &b], &before).await;
    let [na, nb] = &nodes[..] else {
        unreachable!("two nodes")
    };
    let y_follows = Arc::new(watch::Sender::new(before));
    let ny = start(network, &y.address, &y_follows).await;
    bump_each(na, &keys, 1).await;

    let moving = start_move(na, keys[0], &b);
    reached(&gate.reached, "the arrival's registration reached x").await;
    let changed = Instant::now();
    take_in(nb, &views[1], after.clone()).await;
    gate.release.notify_one();
    let moved = outcome_of(moving).await;
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

/// Moves a grain whose entry x owns from a to b, with `owner` standing in
/// for x, failing unless the move ends `within`; what the move returned,
/// how long it took, the nodes a and b, and the grain's key.
async fn move_owned_by(
    network: &InProcessNetwork,
    owner: &Arc<FakeOwner>,
    within: Duration,
) -> (
    Result<Migrated, MigrationError>,
    Duration,
    [ClusterNode; 2],
    u64,
) {
    let [a, b, x] = silos(["a", "b", "x"]);
    let everyone = view(&[&a, &b, &x]);
    let key = moving(&everyone, &x, &everyone, &x, 1)[0];
    let _x = owner.serve(network, &x).await;
    let (nodes, _views) = start_all(network, &[&a, &b], &everyone).await;
    let [na, nb] = &nodes[..] else {
        unreachable!("two nodes")
    };
    bump_each(na, &[key], 1).await;
    let started = Instant::now();
    let moved = tokio::time::timeout(within, start_move(na, key, &b))
        .await
        .expect("the move ended in time")
        .expect("the move's task");
    (moved, started.elapsed(), [na.clone(), nb.clone()], key)
}

/// An arrival whose entry's owner refuses its registration three times (it
/// does not see the target yet, say) registers when asked again after a
/// pause, as a view's homes do, and serves with its state. (A single
/// refusal used to discard it while the move reported success: its state
/// was lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arrival_its_owner_refuses_at_first_registers_when_asked_again() {
    let network = InProcessNetwork::new();
    let owner = FakeOwner::refusing(&silos(["b"])[0], 3);
    let (moved, _, [_, nb], key) = move_owned_by(&network, &owner, Duration::from_secs(30)).await;
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
    let network = InProcessNetwork::new();
    let owner = FakeOwner::refusing(&silos(["b"])[0], usize::MAX);
    let (moved, took, [na, nb], key) =
        move_owned_by(&network, &owner, Duration::from_secs(30)).await;
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
    let network = InProcessNetwork::new();
    let [a, b, x, y] = silos(["a", "b", "x", "y"]);
    let (before, after) = (view(&[&a, &b, &x]), view(&[&a, &b, &x, &y]));
    let key = moving(&before, &x, &after, &y, 1)[0];
    let _x = FakeOwner::holding(&b).serve(&network, &x).await;
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

    let moving = start_move(&na, key, &b);
    reached(&target.reached, "the state reached b").await;
    take_in(&na, &followed, after).await;
    target.release.notify_one();
    let moved = outcome_of(moving).await;
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
    follow_held_past_the_deadline(true).await;
}

/// As above, with y never answering the follow: its rounds end a window
/// after b's tries would (not after the call timeout, thirty seconds), so
/// b discards the arrival within the source's wait, and the move says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arrival_whose_follow_is_never_answered_is_discarded_within_the_sources_wait() {
    follow_held_past_the_deadline(false).await;
}

/// The two tests above: y refuses the follow past b's deadline (`refuses`)
/// or never answers it.
async fn follow_held_past_the_deadline(refuses: bool) {
    let network = InProcessNetwork::new();
    let [a, b, x, y] = silos(["a", "b", "x", "y"]);
    let (before, after) = (view(&[&a, &b, &x]), view(&[&a, &b, &x, &y]));
    let key = moving(&before, &x, &after, &y, 1)[0];
    let first = FakeOwner::holding(&b);
    let _x = first.serve(&network, &x).await;
    let follow = FakeOwner::holding_then_refusing(&b);
    let _y = follow.serve(&network, &y).await;
    let (nodes, views) = start_all(&network, &[&a, &b], &before).await;
    let [na, nb] = &nodes[..] else {
        unreachable!("two nodes")
    };
    bump_each(na, &[key], 1).await;

    let moving = start_move(na, key, &b);
    reached(&first.reached, "the arrival's registration reached x").await;
    take_in(nb, &views[1], after).await;
    let (_, deadline) = nb
        .inner
        .current_pass_deadline()
        .expect("b's pass for the view started");
    first.release.notify_one();
    reached(&follow.reached, "the arrival's follow reached y").await;
    if refuses {
        // Past b's deadline for the view.
        tokio::time::sleep((deadline + HANDOFF / 4).saturating_duration_since(Instant::now()))
            .await;
        follow.release.notify_one();
    }
    let moved = tokio::time::timeout(Duration::from_secs(10), moving)
        .await
        .expect("the move ended within ten seconds")
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
    let network = InProcessNetwork::new();
    let owner = FakeOwner::holding(&silos(["b"])[0]);
    let (moved, took, _, _) = move_owned_by(&network, &owner, Duration::from_secs(20)).await;
    assert!(
        matches!(moved, Err(MigrationError::Discarded { .. })),
        "the move returned {moved:?}"
    );
    assert!(took >= HANDOFF * 3, "after {took:?}");
}

/// As above, with a call timeout of two seconds, shorter than the three
/// windows (of 800 ms) that a view's homes may take to re-register and
/// wait for a last answer: b's tries end before the source stops waiting
/// for its answer to the verdict, so the discard is still reported. (They
/// ran until the source's wait ended, and the move reported success.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arrival_is_discarded_within_a_short_call_timeout() {
    let network = InProcessNetwork::new();
    let [a, b, x] = silos(["a", "b", "x"]);
    let everyone = view(&[&a, &b, &x]);
    let key = moving(&everyone, &x, &everyone, &x, 1)[0];
    let _x = FakeOwner::holding(&b).serve(&network, &x).await;
    let handoff = Duration::from_millis(800);
    let mut nodes = Vec::new();
    for silo in [&a, &b] {
        let followed = Arc::new(watch::Sender::new(everyone.clone()));
        let node = start_configured(&network, &silo.address, &followed, |config| {
            config.handoff = Some(handoff);
            config.connection.call_timeout = Duration::from_secs(2);
        })
        .await;
        nodes.push((node, followed));
    }
    tokio::time::sleep(handoff + Duration::from_millis(50)).await;
    let na = &nodes[0].0;
    bump_each(na, &[key], 1).await;
    let moved = tokio::time::timeout(Duration::from_secs(20), start_move(na, key, &b))
        .await
        .expect("the move ended")
        .expect("the move's task");
    assert!(
        matches!(moved, Err(MigrationError::Discarded { .. })),
        "the move returned {moved:?}"
    );
}
