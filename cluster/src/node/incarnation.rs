//! Coming back as a new incarnation after a fence (rule 7 of the protocol
//! in `node/mod.rs`, rule 5 of `fence.rs`), and the view the node follows.
//!
//! 1. **The view the node follows** is fed from the membership provider's
//!    by one task: each view the provider publishes is passed on
//!    unchanged, except while held (rule 3).
//! 2. **Rejoining.** A silo whose activations have all ended after a
//!    fence asks its provider to take part again as a new incarnation of
//!    the same address (provider rule 4). With the fence still up, and the
//!    membership held so that neither leaving nor load publishing runs
//!    meanwhile, it then drops every directory entry it owns, takes the
//!    new identity, closes every connection (peers that still call the
//!    old incarnation find another silo answering in its place, and go
//!    back to the directory), and starts the hand-over window (rule 3 of
//!    `node/mod.rs`): an entry it lacks is answered `Retry` until its
//!    peers, seeing the old incarnation replaced by the new one in their
//!    views, have re-registered the homes whose entries it now owns. It is
//!    a silo joining the cluster, with nothing of its past life.
//! 3. **Holding the view.** The new gossip knows no peer until it has
//!    heard from one; a view of this silo alone would make it owner of
//!    every entry and every reminder. So until the new membership lists
//!    every peer of the view it had (by address), or for as long as peers
//!    take to declare a silent silo dead (by then a peer it has not heard
//!    from would be gone from any view), or for a hand-over window after
//!    the first peer is heard (gossip with one live peer carries the whole
//!    membership, so a peer still missing then died while this silo stood
//!    still), the node follows the view it had,
//!    with its old incarnation replaced by the new one. Meanwhile its peers
//!    may not know the new incarnation yet, so it answers `Retry` for an
//!    entry it lacks, and the hand-over window starts again when the hold
//!    ends.
//! 4. **When it cannot.** A provider that cannot rejoin, or a new
//!    incarnation that cannot start, leaves the silo with no safe way back:
//!    it stops serving for good, as a silo that lost its etcd lease does
//!    (Orleans' silos declared dead shut themselves down).

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::watch;

use super::{ClusterNode, Inner};
use crate::SiloId;
use crate::membership::Member;
use crate::provider::RejoinError;

/// How a rejoin ended (rules 2 and 4).
pub(super) enum Rejoined {
    /// The silo serves as this new incarnation.
    As(SiloId),
    /// The node stopped, or had already left or been killed.
    Stopped,
}

/// A view held while a new incarnation's gossip has not heard its peers
/// yet (rule 3): the view to follow meanwhile, until when at the latest,
/// how long to wait for the rest once one peer is heard, and what to run
/// when it is let go.
pub(super) struct Held {
    pub(super) view: Vec<Member>,
    pub(super) until: Instant,
    pub(super) rest_within: Duration,
    pub(super) released: Box<dyn FnOnce() + Send>,
}

/// Starts feeding the node's view from `from` (rule 1), holding `held`
/// (rule 3). Replaces the task feeding it before, if any.
pub(super) fn feed(
    inner: &Inner,
    from: watch::Receiver<Vec<Member>>,
    me: SiloId,
    held: Option<Held>,
) {
    let mut feeding = inner.feeding.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(before) = feeding.take() {
        before.abort();
    }
    *feeding = Some(tokio::spawn(run_feed(
        from,
        inner.view_feed.clone(),
        me,
        held,
    )));
}

async fn run_feed(
    mut from: watch::Receiver<Vec<Member>>,
    to: watch::Sender<Vec<Member>>,
    me: SiloId,
    held: Option<Held>,
) {
    if let Some(held) = held {
        pass_on(&to, held.view.clone());
        // Every peer of the held view, by address (a peer may itself have
        // come back as a new incarnation meanwhile).
        let peers: Vec<&str> = held
            .view
            .iter()
            .map(|member| member.silo.address.as_str())
            .filter(|address| *address != me.address)
            .collect();
        // Gossip with one live peer carries the whole membership: a peer
        // still unheard `rest_within` after the first was heard is taken
        // for one that died while this silo stood still.
        let mut until = held.until;
        loop {
            let (heard_all, heard_any) = {
                let view = from.borrow_and_update();
                let heard = |peer: &&str| view.iter().any(|member| member.silo.address == *peer);
                (peers.iter().all(heard), peers.iter().any(heard))
            };
            if heard_all {
                break;
            }
            if heard_any {
                until = until.min(Instant::now() + held.rest_within);
            }
            tokio::select! {
                changed = from.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(until) => break,
            }
        }
        pass_on(&to, from.borrow_and_update().clone());
        (held.released)();
    }
    loop {
        let view = from.borrow_and_update().clone();
        pass_on(&to, view);
        if from.changed().await.is_err() {
            return;
        }
    }
}

fn pass_on(to: &watch::Sender<Vec<Member>>, view: Vec<Member>) {
    to.send_if_modified(|now| {
        if *now == view {
            false
        } else {
            *now = view;
            true
        }
    });
}

/// `view` with the silo `old` replaced by `new` (same load), sorted by id
/// as every view is (rule 3).
fn renamed(view: &[Member], old: &SiloId, new: &SiloId) -> Vec<Member> {
    let mut renamed: Vec<Member> = view
        .iter()
        .map(|member| {
            let mut member = member.clone();
            if &member.silo == old {
                member.silo = new.clone();
            }
            member
        })
        .collect();
    // A view of gossip always lists the silo itself; in case it did not.
    if !renamed.iter().any(|member| &member.silo == new) {
        renamed.push(Member {
            silo: new.clone(),
            gossip: None,
            load: Default::default(),
        });
    }
    renamed.sort_by(|a, b| a.silo.cmp(&b.silo));
    renamed
}

/// Rules 2 and 4: the silo, fenced and with every activation ended, comes
/// back as a new incarnation, or stops.
pub(super) async fn rejoin(node: &ClusterNode) -> Rejoined {
    let inner = &node.inner;
    // Held across the rejoin: leaving, killing and load publishing wait.
    let mut membership = inner.membership.lock().await;
    let Some(provider) = membership.take() else {
        return Rejoined::Stopped;
    };
    if inner.stopped.load(Ordering::Acquire) {
        *membership = Some(provider);
        return Rejoined::Stopped;
    }
    let old = inner.id();
    let provider = match provider.rejoin().await {
        Ok(provider) => provider,
        Err(err) => {
            if let RejoinError::Unsupported(provider) = err {
                tracing::error!(silo = %old, "the membership provider cannot rejoin as a new incarnation: this node stops serving");
                *membership = Some(provider);
            } else {
                tracing::error!(silo = %old, error = %err, "this node stops serving");
            }
            let stopping = membership.take();
            drop(membership);
            node.inner.stopped.store(true, Ordering::Release);
            if let Some(provider) = stopping {
                let _ = provider.stop().await;
            }
            node.stop_serving().await;
            return Rejoined::Stopped;
        }
    };
    let new = provider.silo();
    // Rule 2: a silo joining, with nothing of its past life.
    let dropped = inner.partition.clear();
    inner.me.store(Arc::new(new.clone()));
    inner.close_connections().await;
    let hold = super::fence::gossip_death(&inner.config).max(Duration::from_millis(1));
    let now = Instant::now();
    // The hold is named by the incarnation it is for (never 0): a hold
    // let go late, after a later rejoin started its own, clears nothing.
    let hold_id = new.incarnation.max(1);
    inner.holding.store(hold_id, Ordering::Release);
    let weak = Arc::downgrade(inner);
    let held = Held {
        view: renamed(&inner.view(), &old, &new),
        until: now
            .checked_add(hold)
            .unwrap_or(now + Duration::from_secs(3600)),
        rest_within: inner.handoff,
        released: Box::new(move || {
            if let Some(inner) = weak.upgrade() {
                inner.restart_handoff();
                let _ =
                    inner
                        .holding
                        .compare_exchange(hold_id, 0, Ordering::AcqRel, Ordering::Acquire);
            }
        }),
    };
    feed(inner, provider.watch(), new.clone(), Some(held));
    inner.restart_handoff();
    *membership = Some(provider);
    tracing::info!(silo = %new, before = %old, dropped, "came back as a new incarnation");
    Rejoined::As(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(address: &str, incarnation: u64) -> Member {
        Member {
            silo: SiloId::new(address, incarnation),
            gossip: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 7000))),
            load: Default::default(),
        }
    }

    #[test]
    fn a_renamed_view_replaces_the_old_incarnation_and_stays_sorted() {
        let view = vec![member("a:1", 5), member("b:1", 1), member("c:1", 2)];
        let renamed = renamed(&view, &SiloId::new("b:1", 1), &SiloId::new("b:1", 9));
        let silos: Vec<_> = renamed.iter().map(|m| m.silo.to_string()).collect();
        assert_eq!(silos, ["a:1#5", "b:1#9", "c:1#2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_held_view_stays_until_every_peer_is_heard_or_the_hold_ends() {
        let me = SiloId::new("b:1", 9);
        let held = vec![member("a:1", 5), member("b:1", 9)];
        let (provider, from) = watch::channel(vec![member("b:1", 9)]);
        let (to, mut view) = watch::channel(Vec::new());
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn(run_feed(
            from.clone(),
            to.clone(),
            me.clone(),
            Some(hold(&held, &released)),
        ));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(*view.borrow_and_update(), held, "held while alone");
        // Not every peer heard yet: still held.
        provider.send_replace(vec![member("b:1", 9), member("c:1", 2)]);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(*view.borrow_and_update(), held, "held until a:1 is heard");
        assert!(!released.load(Ordering::SeqCst));
        // Every peer heard: the provider's view from then on.
        let heard = vec![member("a:1", 5), member("b:1", 9), member("c:1", 2)];
        provider.send_replace(heard.clone());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(*view.borrow_and_update(), heard);
        assert!(released.load(Ordering::SeqCst), "the hold was let go");
        task.abort();

        // One peer of two heard: the other is waited for `rest_within`
        // (1 s here), not the whole hold.
        let held3 = vec![member("a:1", 5), member("b:1", 9), member("d:1", 4)];
        let (provider, from) = watch::channel(vec![member("b:1", 9)]);
        let (to, mut view) = watch::channel(Vec::new());
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn(run_feed(
            from,
            to,
            me.clone(),
            Some(hold(&held3, &released)),
        ));
        tokio::time::sleep(Duration::from_millis(10)).await;
        let partial = vec![member("a:1", 5), member("b:1", 9)];
        provider.send_replace(partial.clone());
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(*view.borrow_and_update(), held3, "still waiting for d:1");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(*view.borrow_and_update(), partial, "d:1 taken for dead");
        assert!(released.load(Ordering::SeqCst));
        task.abort();

        // Alone past the hold: the provider's view, even if alone.
        let (to, mut view) = watch::channel(Vec::new());
        let (_provider, from) = watch::channel(vec![member("b:1", 9)]);
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn(run_feed(from, to, me, Some(hold(&held, &released))));
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(*view.borrow_and_update(), held);
        assert!(!released.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(*view.borrow_and_update(), vec![member("b:1", 9)]);
        assert!(released.load(Ordering::SeqCst), "the hold ended");
        task.abort();
    }

    fn hold(view: &[Member], released: &Arc<std::sync::atomic::AtomicBool>) -> Held {
        let released = released.clone();
        Held {
            view: view.to_vec(),
            until: Instant::now() + Duration::from_secs(5),
            rest_within: Duration::from_secs(1),
            released: Box::new(move || released.store(true, Ordering::SeqCst)),
        }
    }
}
