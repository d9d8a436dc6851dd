//! Reminders belong to the cluster (rule 8 of the protocol in
//! `node/mod.rs`): which silo fires a grain's reminders, and telling it
//! when they change elsewhere.
//!
//! 1. A grain's reminders are owned by one live silo: the rendezvous
//!    choice for the grain among the silos of the view that host its type
//!    (so never an external client), the same hashing as the directory.
//!    A fenced or stopped silo owns none.
//! 2. Every view change makes each silo rescan the shared reminder table,
//!    keeping the rows it owns in the new view: ownership moves with the
//!    view. `granary-actors`' reminder rules say what that guarantees
//!    (each due time fires once in steady state, at most once more around
//!    a move).
//! 3. A reminder registered or removed on a silo that does not own it is
//!    announced to its owner as a request to the reserved grain type
//!    [`REMINDERS`] (the grain's id in the payload); the owner re-reads
//!    that grain's rows. A lost announcement is made good by the owner's
//!    periodic rescan.

use std::sync::Weak;
use std::sync::atomic::Ordering;

use futures_util::future::BoxFuture;
use granary_actors::GrainId;
use granary_actors::ReminderPlacement;
use granary_actors::dispatch::encode;

use super::{ClusterNode, Inner};
use crate::SiloId;
use crate::membership::Member;
use crate::placement::{grain_key_hash, rendezvous};

/// The reserved grain type of reminder announcements (rule 3).
pub(super) const REMINDERS: &str = "$reminders";

/// The owner of `grain`'s reminders in `view` (rule 1).
pub(super) fn owner<'v>(grain: &GrainId, view: &'v [Member]) -> Option<&'v SiloId> {
    let hash = grain_key_hash(grain);
    let hosting = |member: &&Member| member.load.grain_types.contains(&grain.type_name);
    view.iter()
        .filter(hosting)
        .map(|member| &member.silo)
        .max_by_key(|silo| (rendezvous(hash, silo), *silo))
}

/// The node's answer to "which silo fires which reminders" (rules 1 and 3).
pub(super) struct NodeReminders(pub(super) Weak<Inner>);

impl ReminderPlacement for NodeReminders {
    fn owns(&self, grain: &GrainId) -> bool {
        let Some(inner) = self.0.upgrade() else {
            return false;
        };
        if inner.stopped.load(Ordering::Acquire) || inner.fence.is_fenced() {
            return false;
        }
        let view = inner.view.load();
        owner(grain, &view).is_some_and(|owner| inner.is_me(owner))
    }

    fn notify_owner(&self, grain: &GrainId) -> BoxFuture<'static, ()> {
        let inner = self.0.upgrade();
        let grain = grain.clone();
        Box::pin(async move {
            let Some(inner) = inner else { return };
            let Some(owner) = owner(&grain, &inner.view()).cloned() else {
                return;
            };
            if inner.is_me(&owner) {
                if let Err(err) = inner.silo.reminders_changed(&grain).await {
                    tracing::debug!(%grain, error = %err, "re-reading a grain's reminders failed");
                }
                return;
            }
            let Ok(payload) = encode(&grain) else { return };
            let node = ClusterNode {
                inner: inner.clone(),
            };
            match node.connection(&owner).await {
                Ok(connection) => {
                    if let Err(err) = connection
                        .call(REMINDERS, &grain.key, "changed", &payload)
                        .await
                    {
                        tracing::debug!(%grain, %owner, error = %err, "a reminder announcement was lost; the owner's rescan finds it");
                    }
                }
                Err(err) => {
                    tracing::debug!(%grain, %owner, error = %err, "a reminder announcement was lost; the owner's rescan finds it");
                }
            }
        })
    }
}
