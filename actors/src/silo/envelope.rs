//! What travels to an activation: a turn (a write, a read, or a request to
//! deactivate) packed in an envelope with the call chain it belongs to; the
//! call-chain scoping of a turn's polls; and a call's deadline, read from the
//! clock only when needed. The pieces of rules 4, 5, 7 and 10 of the silo's
//! protocol (`silo/mod.rs`) that the other submodules share.

use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use crate::grain::GrainContext;

/// Runs a handler on a grain and answers its caller.
pub(super) enum Turn<G> {
    /// A handler with `&mut` access: runs alone (rule 3).
    Write(WriteTurn<G>),
    /// A read-only handler: may interleave with other reads (rule 10).
    Read(ReadTurn<G>),
    /// Deactivate now (rule 5), after the turns already taken from the
    /// mailbox; sent by `GrainRef::deactivate`.
    Deactivate,
    /// Deactivate unless a turn that keeps the grain alive ran since the
    /// idle collector's sweep that chose it, or a message waits
    /// (`collector.rs` rules 3 and 4); sent by the collector.
    Collect(super::collector::Collecting),
    /// Leave for another silo (`migration.rs` rule 2): the activation
    /// dehydrates between turns and answers with its state.
    Migrate(tokio::sync::oneshot::Sender<crate::migration::Departing>),
    /// Run nothing until the pause answered is dropped (`migration.rs`
    /// rule 6): taken between turns.
    Pause(
        tokio::sync::oneshot::Sender<
            Result<crate::migration::Paused, crate::migration::MigrationError>,
        >,
    ),
}

/// Most reads one interleaved batch takes (rule 10).
pub(super) const MAX_READ_BATCH: usize = 64;

/// A message packed for an activation, with the call chain it belongs to
/// (rule 7).
pub(crate) struct Envelope<G> {
    pub(super) chain: u64,
    /// Whether the message counts as activity for idle collection (a timer
    /// tick does not).
    pub(super) keeps_alive: bool,
    /// When the sender stops waiting, if it came from another silo: a turn
    /// not started by then is not run (rule 11). `None` for local senders,
    /// so their turns read no clock.
    pub(super) expires: Option<Instant>,
    pub(super) turn: Turn<G>,
}

impl<G> Envelope<G> {
    /// Whether the sender gave up before the turn started (rule 11).
    pub(super) fn expired(&self) -> bool {
        self.expires.is_some_and(|at| Instant::now() >= at)
    }
}

thread_local! {
    /// The call chain of the turn being polled on this thread; 0 while
    /// none is (chain ids are never 0: see `fresh_chain`).
    static CHAIN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The chain a new call joins: the current turn's, or a fresh one.
pub(crate) fn current_chain() -> u64 {
    match CHAIN.with(std::cell::Cell::get) {
        0 => fresh_chain(),
        chain => chain,
    }
}

/// The chain of the turn being polled on this thread, if any.
pub(crate) fn running_chain() -> Option<u64> {
    match CHAIN.with(std::cell::Cell::get) {
        0 => None,
        chain => Some(chain),
    }
}

/// A turn's future, polled with its chain as the thread's current chain
/// (rule 7). A thread-local set around each poll, rather than a tokio
/// task-local: the same scoping for a fraction of the cost, which matters
/// at one scope per turn.
pub(super) struct InChain<F> {
    pub(super) chain: u64,
    pub(super) future: F,
}

impl<F: std::future::Future + Unpin> std::future::Future for InChain<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        /// Puts the previous chain back, also if the poll unwinds.
        struct Restore(u64);
        impl Drop for Restore {
            fn drop(&mut self) {
                CHAIN.with(|chain| chain.set(self.0));
            }
        }
        let _restore = Restore(CHAIN.with(|chain| chain.replace(self.chain)));
        std::pin::Pin::new(&mut self.future).poll(cx)
    }
}

/// A chain id no other call has, in this process or any other silo's: a
/// per-thread counter that starts at a random point of the 64-bit space,
/// so no shared counter is touched and chains that travel between silos
/// (rule 7) do not collide except with negligible probability.
pub(crate) fn fresh_chain() -> u64 {
    thread_local! {
        /// The next chain of this thread; 0 until its first call.
        static NEXT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    NEXT.with(|next| {
        let chain = match next.get() {
            0 => random_start(),
            chain => chain,
        };
        // Never 0 (no chain), also when the counter wraps.
        next.set(chain.wrapping_add(1).max(1));
        chain
    })
}

/// A random, non-zero 64-bit value: std's per-thread random hash keys,
/// mixed with the clock and the thread's id.
pub(crate) fn random_start() -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    std::thread::current().id().hash(&mut hasher);
    std::time::SystemTime::now().hash(&mut hasher);
    hasher.finish().max(1)
}

/// `timeout` from now; a timeout too long to represent waits a century.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// A call's deadline, read from the clock only when a wait needs it: the
/// fast paths (room in the mailbox, an answer ready after one yield) read
/// no clock. Once read, it stays: every wait of the call shares it.
pub(crate) struct Deadline {
    timeout: Duration,
    at: Option<Instant>,
}

impl Deadline {
    pub(crate) fn after(timeout: Duration) -> Deadline {
        Deadline { timeout, at: None }
    }

    pub(crate) fn at(at: Instant, timeout: Duration) -> Deadline {
        Deadline {
            timeout,
            at: Some(at),
        }
    }

    /// The timeout it was made from (what a `Timeout` error reports).
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(super) fn get(&mut self) -> Instant {
        *self.at.get_or_insert_with(|| deadline_after(self.timeout))
    }
}

/// A turn with `&mut` access to the grain.
pub(super) type WriteTurn<G> =
    Box<dyn for<'a> FnOnce(&'a mut G, &'a mut GrainContext) -> BoxFuture<'a, ()> + Send>;

/// A read-only turn.
pub(super) type ReadTurn<G> =
    Box<dyn for<'a> FnOnce(&'a G, &'a GrainContext) -> BoxFuture<'a, ()> + Send>;

impl From<Instant> for Deadline {
    /// A deadline at `at`, reporting the time left from now as its timeout.
    fn from(at: Instant) -> Deadline {
        Deadline::at(at, at.saturating_duration_since(Instant::now()))
    }
}
