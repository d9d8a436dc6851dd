//! Who a node lets connect: silos of its view (rule 10, `connection.rs`
//! rule 1).
//!
//! 1. A peer is admitted when the view holds its address at the
//!    incarnation it claims.
//! 2. A peer whose address the view holds at a newer incarnation is
//!    refused at once: it is an incarnation left behind.
//! 3. A peer the view does not hold yet (a silo that just joined, whose
//!    gossip has not reached this one) is waited for, at most `wait`, and
//!    refused if it does not appear; its caller retries on its next call.

use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use crate::SiloId;
use crate::connection::Admission;
use crate::membership::Member;

/// Admits the silos of a node's view.
pub(super) struct ViewAdmission {
    pub(super) members: watch::Receiver<Vec<Member>>,
    pub(super) wait: Duration,
}

/// Rules 1 and 2: `Some` when the view decides, `None` while it does not
/// know the peer yet. A view may hold two incarnations of one address for
/// a while (etcd's, until the old one's lease ends): the peer's own
/// incarnation among them admits it.
fn decided(view: &[Member], peer: &SiloId) -> Option<bool> {
    let mut newer = false;
    for member in view
        .iter()
        .filter(|member| member.silo.address == peer.address)
    {
        if member.silo.incarnation == peer.incarnation {
            return Some(true);
        }
        newer |= member.silo.incarnation > peer.incarnation;
    }
    newer.then_some(false)
}

impl Admission for ViewAdmission {
    fn admit(&self, peer: &SiloId) -> BoxFuture<'static, bool> {
        let mut members = self.members.clone();
        let peer = peer.clone();
        let wait = self.wait;
        Box::pin(async move {
            // Rule 3.
            let waited = tokio::time::timeout(wait, async {
                loop {
                    if let Some(answer) = decided(&members.borrow_and_update(), &peer) {
                        return answer;
                    }
                    if members.changed().await.is_err() {
                        return false;
                    }
                }
            });
            waited.await.unwrap_or(false)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(address: &str, incarnation: u64) -> Member {
        Member {
            silo: SiloId::new(address, incarnation),
            gossip: None,
            load: Default::default(),
        }
    }

    #[tokio::test]
    async fn the_view_decides_and_an_unknown_peer_is_waited_for() {
        let (publish, members) = watch::channel(vec![member("a", 5)]);
        let admission = ViewAdmission {
            members,
            wait: Duration::from_millis(200),
        };
        assert!(admission.admit(&SiloId::new("a", 5)).await);
        // An incarnation left behind.
        assert!(!admission.admit(&SiloId::new("a", 4)).await);
        // Two incarnations of one address in the view (etcd's, for a
        // while): each is admitted, the older one first in the list.
        publish.send_modify(|view| view.insert(0, member("a", 3)));
        assert!(admission.admit(&SiloId::new("a", 5)).await);
        assert!(admission.admit(&SiloId::new("a", 3)).await);
        publish.send_modify(|view| {
            view.remove(0);
        });
        // Never appears.
        let started = std::time::Instant::now();
        assert!(!admission.admit(&SiloId::new("b", 1)).await);
        assert!(started.elapsed() >= Duration::from_millis(200));
        // Appears while it is waited for.
        let waiting = admission.admit(&SiloId::new("b", 1));
        publish.send_modify(|view| view.push(member("b", 1)));
        assert!(waiting.await);
        // A newer incarnation than the view knows, until the view catches up.
        let waiting = admission.admit(&SiloId::new("a", 6));
        publish.send_modify(|view| view[0] = member("a", 6));
        assert!(waiting.await);
    }
}
