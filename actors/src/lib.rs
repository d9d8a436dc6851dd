//! Granary's virtual actor runtime.
//!
//! A grain has an identity and always exists: a [`Silo`] activates it on
//! its first message, runs its turns one at a time on a tokio task with a
//! bounded mailbox, deactivates it when idle, and restores its persisted
//! state on the next activation. Orleans is the model; the guarantees are
//! written down in `docs/runtime-semantics.md`.
//!
//! ```
//! use granary_actors::{Grain, GrainContext, GrainKey, GrainType, Handler, Message, Silo};
//!
//! #[derive(GrainType)]
//! #[grain(name = "counter")]
//! struct Counter(u64);
//! impl Grain for Counter {
//!     fn new(_: &GrainKey) -> Counter {
//!         Counter(0)
//!     }
//! }
//! #[derive(Message)]
//! #[message(reply = u64)]
//! struct Add(u64);
//! impl Handler<Add> for Counter {
//!     async fn handle(&mut self, Add(n): Add, _: &mut GrainContext) -> u64 {
//!         self.0 += n;
//!         self.0
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let silo = Silo::builder().host::<Counter>().build()?;
//! let counter = silo.grain::<Counter>("alice");
//! assert_eq!(counter.call(Add(2)).await?, 2);
//! assert_eq!(counter.call(Add(3)).await?, 5);
//! silo.shutdown().await;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! A grain type declares its stable name, and the messages it accepts by
//! name from other silos (`messages(...)`, `reads(...)`), once with
//! `#[derive(GrainType)]`; `#[derive(Message)]` names each message. The
//! derives come from `granary-macros` (`actors/macros`) and are checked
//! when the crate compiles.
//!
//! It provides grains, messages and handlers, keys,
//! activation on demand, turns, call-chain reentrancy, read-only
//! interleaving, bounded mailboxes, call timeouts, idle deactivation, panic
//! reset, graceful shutdown, timers, reminders, observers, stateless
//! workers, shedding under memory pressure, silo services, and persistence
//! with ETag concurrency (in memory, redb and PostgreSQL), dispatch of
//! messages addressed by name (`dispatch`), which the cluster uses, and
//! the actors side of migration (`migration`: a grain that moves to
//! another silo with its in-memory state).

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

// The derives name this crate `::granary_actors`, from users' crates and
// from this crate's own code and tests alike.
#[doc(hidden)]
extern crate self as granary_actors;

pub mod dispatch;
mod error;
mod grain;
pub mod histogram;
mod key;
mod loom;
mod mailbox;
pub mod migration;
pub mod observers;
mod reminders;
pub mod route;
mod silo;
pub mod storage;
pub mod trace;

pub use dispatch::DispatchError;
pub use error::{ActivationError, CallError, SiloError};
pub use grain::{Grain, GrainContext, GrainType, Handler, Message, NamedMessage, ReadHandler};
/// `#[derive(GrainType)]`: see [`GrainType`](trait@GrainType).
pub use granary_macros::GrainType;
/// `#[derive(Message)]`: see [`Message`](trait@Message) and
/// [`NamedMessage`].
pub use granary_macros::Message;
pub use key::{GrainId, GrainKey};
pub use observers::{AddObserverError, ObserverRef, Observers, Subscription};
pub use reminders::{
    LoneSilo, REMINDER_FIRED, REMINDERS, ReminderError, ReminderFired, ReminderPlacement,
    ReminderStats,
};
pub use silo::{
    ActivationEnd, EndedListener, EndedListenerGuard, FailureReason, GrainRef, GrainTypeStats,
    MAX_GRAIN_TYPE_NAME, Registration, Silo, SiloBuilder, SiloConfig, TURN_SECONDS_BOUNDS, Timer,
    grain_type_name_error,
};
pub use storage::{
    BatchOutcome, DueUpdate, ETag, MemoryStorage, NewReminder, PersistentState, PostgresStorage,
    RedbStorage, ReminderRow, ReminderTable, STORAGE_SECONDS_BOUNDS, SqliteStorage, StorageError,
    StorageOp, StorageOpStats, StorageProvider, StorageStats, StoredState,
};
pub use trace::TraceId;

/// What the derives' generated code calls; not part of the API.
#[doc(hidden)]
pub mod __private {
    /// Whether `a` and `b` are the same string, in a `const`: the
    /// compile-time check that a grain type's messages have distinct
    /// names.
    pub const fn str_eq(a: &str, b: &str) -> bool {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        true
    }
}
