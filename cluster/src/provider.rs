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
//! 4. `rejoin` stops taking part as this incarnation and takes part again
//!    as a new, greater one of the same address: every member sees the
//!    old incarnation leave and the new one join, and the returned
//!    provider's `silo` names it. A provider that cannot (etcd, whose
//!    silo stops for good when its lease is lost) hands itself back
//!    unchanged in [`RejoinError::Unsupported`].

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use crate::SiloId;
use crate::membership::{Member, MembershipError, SiloLoad};

/// Why a provider did not come back as a new incarnation (rule 4).
#[non_exhaustive]
pub enum RejoinError {
    /// This provider cannot rejoin; here it is, still taking part as
    /// before.
    Unsupported(Box<dyn MembershipProvider>),
    /// It stopped taking part as the old incarnation, but the new one
    /// could not start.
    Failed(MembershipError),
}

impl std::fmt::Debug for RejoinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RejoinError::Unsupported(_) => f.write_str("Unsupported(..)"),
            RejoinError::Failed(err) => f.debug_tuple("Failed").field(err).finish(),
        }
    }
}

impl std::fmt::Display for RejoinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RejoinError::Unsupported(_) => {
                f.write_str("this membership provider cannot rejoin as a new incarnation")
            }
            RejoinError::Failed(err) => write!(f, "rejoining as a new incarnation failed: {err}"),
        }
    }
}

impl std::error::Error for RejoinError {}

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
    /// This silo's identity, as the provider takes part (rule 4).
    fn silo(&self) -> SiloId;
    /// Takes part again as a new incarnation (rule 4); a provider that
    /// cannot hands itself back in [`RejoinError::Unsupported`].
    fn rejoin(
        self: Box<Self>,
    ) -> BoxFuture<'static, Result<Box<dyn MembershipProvider>, RejoinError>>;
}

/// Gossip membership that keeps its transport, so that it can rejoin as
/// a new incarnation (rule 4): what a node joined through gossip holds.
pub struct GossipProvider {
    membership: crate::membership::Membership,
    transport: std::sync::Arc<dyn chitchat::transport::Transport>,
}

impl GossipProvider {
    /// The provider over `membership`, which gossips over `transport`.
    pub fn new(
        membership: crate::membership::Membership,
        transport: std::sync::Arc<dyn chitchat::transport::Transport>,
    ) -> GossipProvider {
        GossipProvider {
            membership,
            transport,
        }
    }
}

impl MembershipProvider for GossipProvider {
    fn members(&self) -> Vec<Member> {
        self.membership.members()
    }

    fn watch(&self) -> watch::Receiver<Vec<Member>> {
        self.membership.watch()
    }

    fn publish_load<'a>(&'a mut self, load: &'a SiloLoad) -> BoxFuture<'a, ()> {
        Box::pin(self.membership.publish_load(load))
    }

    fn leave(self: Box<Self>) -> BoxFuture<'static, Result<(), MembershipError>> {
        Box::pin(self.membership.leave())
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), MembershipError>> {
        Box::pin(self.membership.stop())
    }

    fn silo(&self) -> SiloId {
        self.membership.silo()
    }

    fn rejoin(
        self: Box<Self>,
    ) -> BoxFuture<'static, Result<Box<dyn MembershipProvider>, RejoinError>> {
        Box::pin(async move {
            let GossipProvider {
                membership,
                transport,
            } = *self;
            let membership = membership
                .rejoin(transport.as_ref())
                .await
                .map_err(RejoinError::Failed)?;
            let provider: Box<dyn MembershipProvider> = Box::new(GossipProvider {
                membership,
                transport,
            });
            Ok(provider)
        })
    }
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

    fn silo(&self) -> SiloId {
        crate::membership::Membership::silo(self)
    }

    /// Gossip without its transport cannot open a new socket: a node
    /// joins through [`GossipProvider`], which can.
    fn rejoin(
        self: Box<Self>,
    ) -> BoxFuture<'static, Result<Box<dyn MembershipProvider>, RejoinError>> {
        Box::pin(async move { Err(RejoinError::Unsupported(self)) })
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

    fn silo(&self) -> SiloId {
        self.membership.silo().clone()
    }

    /// A silo that lost its lease stops for good (etcd rule 6); one that
    /// holds it is not taken for dead, so it never needs to rejoin.
    fn rejoin(
        self: Box<Self>,
    ) -> BoxFuture<'static, Result<Box<dyn MembershipProvider>, RejoinError>> {
        Box::pin(async move { Err(RejoinError::Unsupported(self)) })
    }
}
