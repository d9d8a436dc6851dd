//! What a grain is: the [`Grain`] trait, its messages, and the context a
//! turn runs with.

use std::any::{Any, TypeId};
use std::future::Future;
use std::num::NonZeroU64;
use std::sync::{Arc, OnceLock};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ActivationError;
use crate::key::{GrainId, GrainKey};
use crate::silo::{HeldMailbox, Silo};
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
///
/// Derive it: `#[derive(Message)]` with `#[message(reply = T)]` (the
/// reply defaults to `()`) implements this trait and [`NamedMessage`].
pub trait Message: Send + 'static {
    /// What the handler answers.
    type Reply: Send + 'static;
}

/// A message with a stable name: the name it travels under between silos
/// when a grain type accepts it by name ([`GrainType`]). Names, not Rust
/// types, cross the network, so silos built from different binaries agree
/// on them; names are per grain type.
///
/// `#[derive(Message)]` implements it: the name is the type's identifier,
/// or `#[message(name = "...")]`.
///
/// ```
/// use granary_actors::{Message, NamedMessage};
///
/// #[derive(Message)]
/// #[message(reply = u64, name = "add")]
/// struct Add(u64);
///
/// #[derive(Message)]
/// struct Reset;
///
/// assert_eq!(Add::NAME, "add");
/// assert_eq!(Reset::NAME, "Reset");
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` has no stable message name",
    label = "not a `NamedMessage`",
    note = "derive it: `#[derive(Message)]`, with `#[message(name = \"...\")]` to choose the name"
)]
pub trait NamedMessage: Message {
    /// The stable name, unique among the messages of each grain type that
    /// accepts this one.
    const NAME: &'static str;
}

/// A grain type that registers itself: its stable name, how it is
/// activated, and the messages it accepts by name from other silos.
/// [`SiloBuilder::host`](crate::SiloBuilder::host) registers all of it in
/// one line.
///
/// Derive it: `#[derive(GrainType)]` with `#[grain(name = "ledger",
/// messages(Apply), reads(Balance), remindable, migratable)]` (or
/// `stateless(max_workers = 8)` for a stateless worker). What the derive
/// lists is checked when the crate compiles: each message must be handled
/// (`Handler`, or `ReadHandler` for reads), be a [`NamedMessage`] and
/// serialise with its reply, and no two messages (or two reads) of the type
/// may share a name; a read may share a write's name, as they are
/// dispatched apart. The name is the grain type's identity in storage
/// (state and reminders are kept under it) and on the wire: give it with
/// `name = "..."` rather than leave it to the Rust identifier, which a
/// rename would change.
///
/// ```
/// use granary_actors::{Grain, GrainContext, GrainKey, GrainType, Handler, Message, Silo};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(GrainType)]
/// #[grain(name = "counter", messages(Add))]
/// struct Counter(u64);
/// impl Grain for Counter {
///     fn new(_: &GrainKey) -> Counter {
///         Counter(0)
///     }
/// }
///
/// #[derive(Message, Serialize, Deserialize)]
/// #[message(reply = u64, name = "add")]
/// struct Add(u64);
/// impl Handler<Add> for Counter {
///     async fn handle(&mut self, Add(n): Add, _: &mut GrainContext) -> u64 {
///         self.0 += n;
///         self.0
///     }
/// }
///
/// let silo = Silo::builder().host::<Counter>().build()?;
/// assert_eq!(Counter::NAME, "counter");
/// assert_eq!(silo.grain_type_name::<Counter>(), Some("counter"));
/// assert_eq!(silo.message_name::<Counter, Add>(), Some("add"));
/// # Ok::<(), granary_actors::SiloError>(())
/// ```
///
/// By hand, for a generic grain (one implementation per instantiation,
/// each under a name of its own):
///
/// ```
/// use granary_actors::{Grain, GrainKey, GrainType, Registration, Silo};
///
/// struct Cache<T>(Option<T>);
/// impl<T: Send + Sync + 'static> Grain for Cache<T> {
///     fn new(_: &GrainKey) -> Cache<T> {
///         Cache(None)
///     }
/// }
/// impl GrainType for Cache<String> {
///     const NAME: &'static str = "cache.string";
///     fn accepts(registration: Registration<Self>) -> Registration<Self> {
///         registration
///     }
/// }
///
/// let silo = Silo::builder().host::<Cache<String>>().build()?;
/// assert_eq!(silo.grain_type_name::<Cache<String>>(), Some("cache.string"));
/// # Ok::<(), granary_actors::SiloError>(())
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not declare its grain type name and messages",
    label = "not a `GrainType`",
    note = "derive it: `#[derive(GrainType)]` with `#[grain(name = \"...\", messages(...))]`, \
            or register it explicitly with `SiloBuilder::register`"
)]
pub trait GrainType: Grain {
    /// The grain type's stable name: what silos and cluster nodes know it
    /// by, unique in the silo.
    const NAME: &'static str;

    /// `Some(max_workers)` for a stateless worker, with up to that many
    /// activations per key (rule 9 of `silo/mod.rs`); `None`, the default,
    /// for a grain with one activation per key.
    const STATELESS: Option<usize> = None;

    /// Registers the messages this grain type accepts by name, its reads,
    /// and whether it is remindable, through `registration`'s typed
    /// methods.
    fn accepts(registration: crate::Registration<Self>) -> crate::Registration<Self>;
}

/// `G` handles messages of type `M`, one turn at a time.
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not handle `{M}`",
    label = "no `impl Handler<{M}> for {Self}`",
    note = "a grain accepts the messages it implements `Handler` for (read-only ones: `ReadHandler`, \
            listed under `reads(...)`)"
)]
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
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not handle `{M}` as a read",
    label = "no `impl ReadHandler<{M}> for {Self}`",
    note = "`reads(...)` lists read-only messages, handled by `ReadHandler`; \
            messages handled by `Handler` go under `messages(...)`"
)]
pub trait ReadHandler<M: Message>: Grain {
    /// Handles one read-only message.
    fn handle_read(&self, message: M, ctx: &GrainContext) -> impl Future<Output = M::Reply> + Send;
}

/// What a turn can reach: its grain's identity, the silo (to call other
/// grains), persistent state, and the silo's services.
pub struct GrainContext {
    /// The key: with `type_name`, the grain's identity, kept apart so that
    /// an activation makes no `GrainId` (and no copy of its type's name)
    /// unless something asks for one ([`GrainContext::id`]).
    key: GrainKey,
    /// The name the type is registered under, shared with its
    /// registration.
    type_name: Arc<str>,
    silo: Silo,
    /// The call chain of the turn running now.
    chain: u64,
    /// The activation's `Mailbox<G>`, type-erased; taken out while the
    /// activation or a reentrant wait receives from it. Kept in a
    /// `SyncWrapper` (`HeldMailbox`), which makes it `Sync`, as a context
    /// shared across an `.await` must be, with no lock: it is only ever
    /// reached through `&mut`.
    mailbox: Option<Box<dyn Any + Send + Sync>>,
    /// Cancels this activation's timers (rule 8 of `silo/mod.rs`); made
    /// with the first timer, so that an activation without timers pays
    /// for no token.
    timers: Option<tokio_util::sync::CancellationToken>,
    /// The silo's count of homes given up when this activation was made,
    /// plus one (so that `None` takes no room of its own); `None` for a
    /// stateless worker, never a home (rule 13).
    given_up: Option<NonZeroU64>,
    /// What most activations never ask for, boxed and made on first use:
    /// every activation's task carries its context for its whole life.
    extras: OnceLock<Box<Extras>>,
}

/// The part of a context made on first use.
#[derive(Default)]
struct Extras {
    /// The identity as a `GrainId`, made the first time it is asked for.
    id: OnceLock<GrainId>,
    /// Values kept for this activation's life
    /// ([`GrainContext::activation_local`]). A list, not a map: an
    /// activation keeps a few at most.
    locals: std::sync::Mutex<Locals>,
}

/// An activation's kept values, by type.
type Locals = Vec<(TypeId, Arc<dyn Any + Send + Sync>)>;

/// `n + 1`, as the context keeps a count of homes given up (saturating: a
/// silo never gives its homes up `u64::MAX` times).
fn plus_one(n: u64) -> NonZeroU64 {
    NonZeroU64::MIN.saturating_add(n)
}

impl std::fmt::Debug for GrainContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrainContext")
            .field("type_name", &self.type_name)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Timers end with their activation however it ends (its task returning,
/// or dropped unpolled with its runtime): a timer waiting on a closed
/// mailbox for a departure's verdict stops then.
impl Drop for GrainContext {
    fn drop(&mut self) {
        self.cancel_timers();
    }
}

impl GrainContext {
    pub(crate) fn new(type_name: Arc<str>, key: GrainKey, silo: Silo) -> GrainContext {
        GrainContext {
            key,
            type_name,
            silo,
            chain: 0,
            mailbox: None,
            timers: None,
            given_up: None,
            extras: OnceLock::new(),
        }
    }

    fn extras(&self) -> &Extras {
        self.extras.get_or_init(Box::default)
    }

    /// Drops the activation-local values this context keeps: before the
    /// activation's slot is freed, so that the next activation of the
    /// grain never overlaps them (rule 5 of `silo/mod.rs`).
    pub(crate) fn drop_locals(&mut self) {
        if let Some(extras) = self.extras.get_mut() {
            let locals = extras
                .locals
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            drop(std::mem::take(locals));
        }
    }

    /// The value of type `T` kept for this activation, made with `init` on
    /// first use: what a service keeps per activation rather than per
    /// grain (a cluster node's device quota), dropped when the activation
    /// ends, however it ends, before the next activation of the grain can
    /// start (unless a clone of the `Arc` is kept elsewhere). A reset after a panic keeps it. `init` runs
    /// outside the map's lock (it may ask for other values); the first
    /// value stored wins.
    pub fn activation_local<T: Send + Sync + 'static>(&self, init: impl FnOnce() -> T) -> Arc<T> {
        let key = std::any::TypeId::of::<T>();
        let locals = || {
            self.extras()
                .locals
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        let found = |locals: &Locals| {
            locals
                .iter()
                .find(|(id, _)| *id == key)
                .and_then(|(_, local)| local.clone().downcast::<T>().ok())
        };
        if let Some(local) = found(&locals()) {
            return local;
        }
        let made = Arc::new(init());
        let mut locals = locals();
        if let Some(local) = found(&locals) {
            return local;
        }
        locals.push((key, made.clone()));
        made
    }

    /// Records the count of homes given up when the activation was made
    /// (rule 13 of `silo/mod.rs`); a stateless worker records none.
    pub(crate) fn set_given_up(&mut self, given_up: Option<u64>) {
        self.given_up = given_up.map(plus_one);
    }

    /// Whether the silo gave every home up since this activation was made
    /// (rule 13 of `silo/mod.rs`): it runs nothing more.
    pub(crate) fn abandoned(&self) -> bool {
        self.given_up
            .is_some_and(|given_up| plus_one(self.silo.homes_given_up()) != given_up)
    }

    pub(crate) fn timers(&mut self) -> &tokio_util::sync::CancellationToken {
        self.timers
            .get_or_insert_with(tokio_util::sync::CancellationToken::new)
    }

    /// Stops every timer of the activation; later ones start afresh.
    pub(crate) fn cancel_timers(&mut self) {
        if let Some(timers) = self.timers.take() {
            timers.cancel();
        }
    }

    pub(crate) fn chain(&self) -> u64 {
        self.chain
    }

    pub(crate) fn set_chain(&mut self, chain: u64) {
        self.chain = chain;
    }

    /// Takes the activation's mailbox out, if it is a `Mailbox<G>` and in
    /// place; a mailbox of another type stays where it is.
    pub(crate) fn take_mailbox<G: Grain>(&mut self) -> Option<Box<HeldMailbox<G>>> {
        match self.mailbox.take()?.downcast::<HeldMailbox<G>>() {
            Ok(mailbox) => Some(mailbox),
            Err(other) => {
                self.mailbox = Some(other);
                None
            }
        }
    }

    pub(crate) fn put_mailbox<G: Grain>(&mut self, mailbox: Box<HeldMailbox<G>>) {
        self.mailbox = Some(mailbox);
    }

    /// This grain's identity, made the first time it is asked for (an
    /// activation keeps its key and its type's shared name, not a copy of
    /// the name): [`GrainContext::key`] and [`GrainContext::type_name`]
    /// read the same without making it.
    pub fn id(&self) -> &GrainId {
        self.extras().id.get_or_init(|| self.new_id())
    }

    /// A new `GrainId` of this grain, for a caller that keeps its own.
    pub(crate) fn new_id(&self) -> GrainId {
        self.extras
            .get()
            .and_then(|extras| extras.id.get())
            .cloned()
            .unwrap_or_else(|| GrainId {
                type_name: String::from(&*self.type_name),
                key: self.key.clone(),
            })
    }

    /// This grain's key.
    pub fn key(&self) -> &GrainKey {
        &self.key
    }

    /// The name this grain's type is registered under.
    pub fn type_name(&self) -> &str {
        &self.type_name
    }

    /// This grain's identity as [`GrainId`] shows it (`type/key`), for a
    /// log line, without making a `GrainId`.
    pub(crate) fn identity(&self) -> impl std::fmt::Display + '_ {
        crate::key::IdentityDisplay(&self.type_name, &self.key)
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
        PersistentState::load(self.silo.storage(), self.new_id()).await
    }

    /// Moves this grain to `target` with its in-memory state once the
    /// running turn has ended (`migration.rs` rule 5), as
    /// `GrainRef::migrate` does; the turn goes on meanwhile, and the move's
    /// outcome is logged, not returned. Only on a silo in a cluster, for a
    /// type registered as migratable (elsewhere, or outside a tokio
    /// runtime, nothing moves, and that is logged).
    pub fn migrate(&self, target: crate::migration::MigrationTarget) {
        let (silo, grain) = (self.silo.clone(), self.new_id());
        let Some(router) = silo.router() else {
            tracing::warn!(%grain, "a grain asked to migrate on a silo outside a cluster");
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(%grain, "a grain asked to migrate outside a tokio runtime");
            return;
        };
        runtime.spawn(async move {
            match router.migrate(&grain, target).await {
                Ok(moved) => tracing::debug!(%grain, to = %moved.to, "the grain moved"),
                Err(err) => tracing::warn!(%grain, error = %err, "the grain did not move"),
            }
        });
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
