//! What a grain is: the [`Grain`] trait, its messages, and the context a
//! turn runs with.

use std::any::{Any, TypeId};
use std::future::Future;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ActivationError;
use crate::key::{GrainId, GrainKey};
use crate::silo::{Mailbox, Silo};
use crate::storage::{PersistentState, StorageError};

/// A virtual actor: it always exists, and the silo activates it on its
/// first message.
///
/// Grains are `Sync` because read-only turns share a borrow of the grain
/// across their await points (`ReadHandler`); a grain that needs interior
/// mutability uses the `std::sync` kinds.
pub trait Grain: Send + Sync + Sized + 'static {
    /// A fresh in-memory object for a new activation of the grain `key`.
    fn new(key: &GrainKey) -> Self;

    /// Runs once per activation, before the first message: load state here.
    /// An error fails the messages that triggered the activation.
    fn on_activate(
        &mut self,
        ctx: &mut GrainContext,
    ) -> impl Future<Output = Result<(), ActivationError>> + Send {
        let _ = ctx;
        async { Ok(()) }
    }

    /// Runs once when the activation ends (idle, or silo shutdown), after
    /// its last turn: write state here.
    fn on_deactivate(&mut self, ctx: &mut GrainContext) -> impl Future<Output = ()> + Send {
        let _ = ctx;
        async {}
    }
}

/// A message a grain handles, with the type of its reply.
pub trait Message: Send + 'static {
    /// What the handler answers.
    type Reply: Send + 'static;
}

/// `G` handles messages of type `M`, one turn at a time.
pub trait Handler<M: Message>: Grain {
    /// Handles one message. Turns of one activation never overlap.
    fn handle(
        &mut self,
        message: M,
        ctx: &mut GrainContext,
    ) -> impl Future<Output = M::Reply> + Send;
}

/// `G` answers messages of type `M` without changing itself: such reads
/// may run interleaved with each other (never with a [`Handler`] turn).
/// Send them with `GrainRef::read`.
pub trait ReadHandler<M: Message>: Grain {
    /// Handles one read-only message.
    fn handle_read(&self, message: M, ctx: &GrainContext) -> impl Future<Output = M::Reply> + Send;
}

/// What a turn can reach: its grain's identity, the silo (to call other
/// grains), persistent state, and the silo's services.
pub struct GrainContext {
    id: GrainId,
    silo: Silo,
    /// The call chain of the turn running now.
    chain: u64,
    /// The activation's `Mailbox<G>`, type-erased; taken out while the
    /// activation or a reentrant wait receives from it. The mutex makes it
    /// `Sync`, as a context shared across an `.await` must be; it is only
    /// ever reached through `&mut`, so it is never locked.
    mailbox: Option<Box<dyn Any + Send + Sync>>,
    /// Cancels this activation's timers (rule 8 of `silo/mod.rs`).
    timers: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for GrainContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrainContext")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl GrainContext {
    pub(crate) fn new(id: GrainId, silo: Silo) -> GrainContext {
        GrainContext {
            id,
            silo,
            chain: 0,
            mailbox: None,
            timers: tokio_util::sync::CancellationToken::new(),
        }
    }

    pub(crate) fn timers(&self) -> &tokio_util::sync::CancellationToken {
        &self.timers
    }

    /// Stops every timer of the activation; later ones start afresh.
    pub(crate) fn cancel_timers(&mut self) {
        self.timers.cancel();
        self.timers = tokio_util::sync::CancellationToken::new();
    }

    pub(crate) fn chain(&self) -> u64 {
        self.chain
    }

    pub(crate) fn set_chain(&mut self, chain: u64) {
        self.chain = chain;
    }

    /// Takes the activation's mailbox out, if it is a `Mailbox<G>` and in
    /// place; a mailbox of another type stays where it is.
    pub(crate) fn take_mailbox<G: Grain>(&mut self) -> Option<Box<Mutex<Mailbox<G>>>> {
        match self.mailbox.take()?.downcast::<Mutex<Mailbox<G>>>() {
            Ok(mailbox) => Some(mailbox),
            Err(other) => {
                self.mailbox = Some(other);
                None
            }
        }
    }

    pub(crate) fn put_mailbox<G: Grain>(&mut self, mailbox: Box<Mutex<Mailbox<G>>>) {
        self.mailbox = Some(mailbox);
    }

    /// This grain's identity.
    pub fn id(&self) -> &GrainId {
        &self.id
    }

    /// The silo this activation runs on.
    pub fn silo(&self) -> &Silo {
        &self.silo
    }

    /// A reference to the grain of type `G` with `key`, as
    /// [`Silo::grain`] gives: on a clustered silo it reaches the grain
    /// wherever it lives, and calls made with it from this turn join the
    /// turn's call chain.
    pub fn grain<G: Grain>(&self, key: impl Into<GrainKey>) -> crate::GrainRef<G> {
        self.silo.grain(key)
    }

    /// Loads this grain's state of type `T` from the silo's storage.
    pub async fn load_state<T: Serialize + DeserializeOwned + Default>(
        &self,
    ) -> Result<PersistentState<T>, StorageError> {
        PersistentState::load(self.silo.storage(), self.id.clone()).await
    }

    /// The silo service of type `S` (for example the GPU bridge), if one
    /// was registered when the silo was built.
    pub fn service<S: Send + Sync + 'static>(&self) -> Option<Arc<S>> {
        self.silo.service::<S>()
    }
}

/// A type-erased silo service.
pub(crate) type Service = Arc<dyn Any + Send + Sync>;

/// The key a service is stored under.
pub(crate) fn service_key<S: 'static>() -> TypeId {
    TypeId::of::<S>()
}
