//! Where a node's view of the cluster comes from: one trait, so the node
//! holds a provider without knowing which (gossip on chitchat, the
//! embedded default, or etcd behind the `etcd` feature; others may be
//! written against it).
//!
//! 1. `members` is the live view now, this silo included, sorted by id,
//!    each with its last published load; `watch` tells each change.
//! 2. `publish_load` makes this silo's load (activations, devices, the
//!    grain types it hosts) part of its entry in the view. A provider may
//!    skip a load equal to the last it published.
//! 3. `leave` takes the silo out of the view at once, for every member;
//!    `stop` only stops taking part, as a crash would look.

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use crate::membership::{Member, MembershipError, SiloLoad};

/// A source of the cluster's membership (rules 1 to 3).
pub trait MembershipProvider: Send + Sync + 'static {
    /// The live view now (rule 1).
    fn members(&self) -> Vec<Member>;
    /// The view, as it changes (rule 1).
    fn watch(&self) -> watch::Receiver<Vec<Member>>;
    /// Publishes this silo's load (rule 2).
    fn publish_load<'a>(&'a mut self, load: &'a SiloLoad) -> BoxFuture<'a, ()>;
    /// Leaves gracefully (rule 3).
    fn leave(self: Box<Self>) -> BoxFuture<'static, Result<(), MembershipError>>;
    /// Stops at once (rule 3).
    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), MembershipError>>;
}

impl MembershipProvider for crate::membership::Membership {
    fn members(&self) -> Vec<Member> {
        crate::membership::Membership::members(self)
    }

    fn watch(&self) -> watch::Receiver<Vec<Member>> {
        crate::membership::Membership::watch(self)
    }

    fn publish_load<'a>(&'a mut self, load: &'a SiloLoad) -> BoxFuture<'a, ()> {
        Box::pin(crate::membership::Membership::publish_load(self, load))
    }

    fn leave(self: Box<Self>) -> BoxFuture<'static, Result<(), MembershipError>> {
        Box::pin(crate::membership::Membership::leave(*self))
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), MembershipError>> {
        Box::pin(crate::membership::Membership::stop(*self))
    }
}

/// Membership in etcd as a provider: a load is written only when it
/// changed (rule 2).
#[cfg(feature = "etcd")]
pub struct EtcdProvider {
    membership: crate::etcd::EtcdMembership,
    published: Option<SiloLoad>,
}

#[cfg(feature = "etcd")]
impl EtcdProvider {
    /// The provider over `membership`.
    pub fn new(membership: crate::etcd::EtcdMembership) -> EtcdProvider {
        EtcdProvider {
            membership,
            published: None,
        }
    }
}

#[cfg(feature = "etcd")]
impl MembershipProvider for EtcdProvider {
    fn members(&self) -> Vec<Member> {
        self.membership.members()
    }

    fn watch(&self) -> watch::Receiver<Vec<Member>> {
        self.membership.watch()
    }

    fn publish_load<'a>(&'a mut self, load: &'a SiloLoad) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if self.published.as_ref() == Some(load) {
                return;
            }
            match self.membership.publish_load(load.clone()).await {
                Ok(()) => self.published = Some(load.clone()),
                Err(err) => tracing::warn!(error = %err, "publishing load to etcd failed"),
            }
        })
    }

    fn leave(self: Box<Self>) -> BoxFuture<'static, Result<(), MembershipError>> {
        Box::pin(async move {
            self.membership
                .leave()
                .await
                .map_err(|err| MembershipError::Stop(err.to_string()))
        })
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), MembershipError>> {
        self.membership.stop();
        Box::pin(async { Ok(()) })
    }
}
