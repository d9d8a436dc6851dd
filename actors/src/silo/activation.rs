//! The activation side: the task that runs one activation of a grain
//! (`run_activation`), its turns, and the mailbox it keeps in its
//! `GrainContext`. Rules 3, 5, 6, 7, 8 and 10 of the silo's protocol
//! (`silo/mod.rs`).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use futures_util::FutureExt;
use futures_util::future::Either;
use tokio::sync::watch;
use tracing::Instrument;

use super::envelope::{Envelope, InChain, MAX_READ_BATCH, ReadTurn, Turn};
use super::registry::{Entry, GrainType};
use super::stats::{ActivationCounts, FailureReason, TypeStats};
use super::{ActivationEnd, Silo};
use crate::grain::{Grain, GrainContext};
use crate::key::GrainKey;
use crate::mailbox;
use crate::migration::{Arriving, Dehydrated, MigrationError, Verdict};

/// An activation's mailbox, kept in its `GrainContext` so that a turn
/// waiting in `GrainContext::call` can take reentrant messages from it.
pub(crate) struct Mailbox<G> {
    pub(super) receiver: mailbox::Receiver<Envelope<G>>,
    /// For the activation's own timers; closing `receiver` refuses them.
    pub(super) sender: mailbox::Sender<Envelope<G>>,
    /// Messages taken from the mailbox in one go, oldest first; they run
    /// before anything else. Only for single activations: a stateless
    /// worker takes one message at a time, so that a busy worker's messages
    /// stay in its mailbox where `choose` sees them (rule 9).
    pub(super) batch: std::collections::VecDeque<Envelope<G>>,
    /// Whether the activation takes its mailbox's messages in batches.
    batches: bool,
    /// Messages of other chains that arrived during a reentrant wait, in
    /// arrival order; they run after `batch` (which arrived before them)
    /// and before anything newer. Made with the first one: most
    /// activations never wait reentrantly, and each keeps its mailbox for
    /// as long as it lives.
    #[expect(
        clippy::box_collection,
        reason = "one pointer in place instead of an empty collection's three words: the point is the room kept per live activation"
    )]
    deferred: Option<Box<std::collections::VecDeque<Envelope<G>>>>,
}

/// The activation's end of its mailbox as its context keeps it: `Sync`, as
/// a context shared across an `.await` must be, with no lock, since it is
/// only ever reached through `&mut` (`GrainContext::mailbox`).
pub(crate) type HeldMailbox<G> = sync_wrapper::SyncWrapper<Mailbox<G>>;

/// The mailbox behind a `&mut`.
pub(super) fn exclusive<G>(mailbox: &mut Box<HeldMailbox<G>>) -> &mut Mailbox<G> {
    mailbox.get_mut()
}

impl<G: Grain> Mailbox<G> {
    /// The next message for a new turn, if one is already queued.
    fn try_next(&mut self) -> Option<Envelope<G>> {
        if let Some(envelope) = self.taken() {
            return Some(envelope);
        }
        if self.batches {
            self.receiver.try_recv_all(&mut self.batch);
            self.batch.pop_front()
        } else {
            self.receiver.try_recv()
        }
    }

    /// Whether a message was already taken from the mailbox.
    fn has_taken(&self) -> bool {
        !self.batch.is_empty() || self.deferred_len() > 0
    }

    /// The next message already taken from the mailbox, if any.
    fn taken(&mut self) -> Option<Envelope<G>> {
        self.batch
            .pop_front()
            .or_else(|| self.deferred.as_mut()?.pop_front())
    }

    /// How many messages a reentrant wait set aside.
    pub(super) fn deferred_len(&self) -> usize {
        self.deferred.as_ref().map_or(0, |deferred| deferred.len())
    }

    /// Sets `envelope` aside during a reentrant wait, to run after the
    /// current turn.
    pub(super) fn defer(&mut self, envelope: Envelope<G>) {
        self.deferred
            .get_or_insert_with(Box::default)
            .push_back(envelope);
    }

    /// The next message for a new turn, or registers to be woken for one,
    /// taking the mailbox's lock once. `None`: closed and drained.
    fn poll_next(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Envelope<G>>> {
        if let Some(envelope) = self.taken() {
            return std::task::Poll::Ready(Some(envelope));
        }
        let next = if self.batches {
            self.receiver
                .poll_recv_all(cx, &mut self.batch)
                .map(|_| self.batch.pop_front())
        } else {
            self.receiver.poll_recv(cx)
        };
        if next.is_pending() && self.deferred_len() == 0 {
            // Idle: the set-aside list goes, as the batch's room went back
            // to the queue (`mailbox.rs` rule 9).
            self.deferred = None;
        }
        next
    }

    /// The next message for a new turn.
    async fn next(&mut self) -> Option<Envelope<G>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Puts back the message `try_next` returned last, first in line.
    fn put_back(&mut self, envelope: Envelope<G>) {
        self.batch.push_front(envelope);
    }
}

/// What an activation arriving from another silo starts from
/// (`migration.rs` rule 4): the dehydrated state, and where it answers
/// once its hooks ran.
pub(super) struct Seed {
    pub(super) state: Dehydrated,
    pub(super) ready: tokio::sync::oneshot::Sender<Arriving>,
}

/// What an activation starts from, boxed: an async function keeps its
/// arguments beside the locals made from them for as long as it runs, so
/// one pointer in, not the arguments, is what the task carries.
pub(super) struct Start<G> {
    pub(super) grain_type: Arc<GrainType<G>>,
    pub(super) key: GrainKey,
    pub(super) worker: usize,
    pub(super) receiver: mailbox::Receiver<Envelope<G>>,
    pub(super) sender: mailbox::Sender<Envelope<G>>,
    pub(super) given_up: u64,
    pub(super) live: super::registry::LiveActivation,
    pub(super) seed: Option<Box<Seed>>,
}

/// The value out of its box, the box freed now (moving fields out of a
/// `Box` in place would keep it until the function ends).
#[allow(clippy::boxed_local)] // the box is the point: see `Start`
fn unbox<T>(boxed: Box<T>) -> T {
    *boxed
}

/// What an activation keeps, made from what it starts from.
struct Prepared<G> {
    grain_type: Arc<GrainType<G>>,
    /// Its place among the type's workers.
    worker: usize,
    /// Its place in the live count (rule 14).
    live: super::registry::LiveActivation,
    /// The end of its mailbox where it stamps its activity (`collector.rs`
    /// rule 2); a stateless worker also holds one of its slots while it
    /// runs a turn, so that `choose` sees it busy (rule 9).
    own: mailbox::Sender<Envelope<G>>,
    /// An arrival's seed (`migration.rs` rule 4).
    seed: Option<Box<Seed>>,
    /// Its context, which holds the key, the silo, the mailbox and the
    /// count of homes given up when it was made (rule 13: those given up
    /// before are none of its business, a later give-up stops it;
    /// stateless workers are never homes).
    ctx: GrainContext,
}

/// [`Prepared`] from `start`.
fn prepare<G: Grain>(start: Start<G>) -> Prepared<G> {
    let Start {
        grain_type,
        key,
        worker,
        receiver,
        sender,
        given_up,
        live,
        seed,
    } = start;
    let mut ctx = GrainContext::new(grain_type.name.clone(), key, live.silo().clone());
    ctx.set_given_up((!grain_type.stateless).then_some(given_up));
    let own = sender.clone();
    ctx.put_mailbox(Box::new(sync_wrapper::SyncWrapper::new(Mailbox {
        receiver,
        sender,
        batch: std::collections::VecDeque::new(),
        batches: grain_type.workers <= 1,
        deferred: None,
    })));
    Prepared {
        grain_type,
        worker,
        live,
        own,
        seed,
        ctx,
    }
}

/// The activation's grain: activated, arrived from another silo, or `None`
/// (its messages are then dropped). An activation whose messages were
/// accepted before the silo began to shut down starts, and rule 5 runs
/// them; one that starts after `shutdown` returned does not: its messages
/// fail, and no grain code runs after `shutdown` returned. An activation
/// made before a give-up whose task first runs after it does not even
/// start.
async fn begin<G: Grain>(
    grain_type: &GrainType<G>,
    ctx: &mut GrainContext,
    seed: Option<Box<Seed>>,
) -> Option<G> {
    if ctx.silo().inner.stopped.load(Ordering::Acquire) || ctx.abandoned() {
        return None;
    }
    match seed {
        // `migration.rs` rule 4: an arrival rehydrates, activates, then
        // runs nothing until its switch is confirmed; one that fails or is
        // not confirmed ends without `on_deactivate`. Boxed, here and for
        // departures, pauses and read batches: an activation's task is as
        // large as the largest thing it awaits, for as long as it lives,
        // and these are the large ones.
        Some(seed) => Box::pin(arrive(grain_type, ctx, *seed)).await,
        None => activate::<G>(ctx).await,
    }
}

/// A grain's activation: rules 3, 5, 6 and 7; an arrival and a departure
/// (`migration.rs` rules 2 to 4).
pub(super) async fn run_activation<G: Grain>(start: Box<Start<G>>) {
    // An async function's state keeps a room for every local that lives
    // across two of its waits, each its own, for as long as the function
    // runs. So the activation's state is made by a plain function, the
    // grain by a function of its own (what only the start needs goes
    // with them), and the loops below take care that a message is never
    // borrowed where it waits, and that each wait's locals live across
    // that wait alone.
    let Prepared {
        grain_type,
        worker,
        live,
        own,
        seed,
        mut ctx,
    } = prepare(unbox(start));
    let mut grain = begin(&grain_type, &mut ctx, seed).await;
    // `collector.rs` rule 2: busy from its making until now.
    own.set_activity(live.silo().sweep_number());
    // Messages run, added to the type's count now and then; one turn in so
    // many timed (`stats.rs` rules 2 and 3).
    let mut counts = ActivationCounts::new();
    // Idleness is the collector's to find (`collector.rs`): an idle
    // activation waits on its mailbox alone, and keeps no timer. What
    // ended the loop is its value, so that it takes no room while the loop
    // waits.
    let exit = if grain.is_none() {
        Exit::Ended
    } else {
        loop {
            // The flag, not the token: checking a token takes a lock.
            if live.silo().inner.shutting_down.load(Ordering::Acquire) || ctx.abandoned() {
                break Exit::Ended;
            }
            // The mailbox and what came out of it in a block of their own:
            // neither keeps room in the task while a turn runs (the
            // envelope is moved whole, never borrowed, into whatever waits
            // with it).
            let envelope = {
                let Some(mut mailbox) = ctx.take_mailbox::<G>() else {
                    break Exit::Ended;
                };
                // `None`: idle or shutting down. A message already taken
                // from the mailbox (a busy grain's common case) runs
                // without building the select below: the shutdown flag was
                // checked above, and a busy grain is not idle.
                let next = if exclusive(&mut mailbox).has_taken() {
                    // Taking a batch spends none of tokio's cooperative
                    // budget, and a mailbox refilled from other threads
                    // could keep this task from ever yielding: spend one
                    // unit per turn, as `recv` would.
                    // Taken after the wait, not before: a message held
                    // across it would take its room in the task for good.
                    tokio::task::consume_budget().await;
                    exclusive(&mut mailbox).taken()
                } else {
                    // About to wait: what this activation ran is counted
                    // now (`stats.rs` rule 2).
                    counts.flush(&grain_type.stats);
                    let ctx = &ctx;
                    std::future::poll_fn(|cx| {
                        use std::task::Poll;
                        if let Poll::Ready(next) = exclusive(&mut mailbox).poll_next(cx) {
                            return Poll::Ready(next);
                        }
                        // Registered to be woken: a shutdown that starts
                        // now wakes this task, and one that started earlier
                        // is seen here.
                        if ctx.silo().inner.shutting_down.load(Ordering::Acquire) || ctx.abandoned()
                        {
                            return Poll::Ready(None);
                        }
                        Poll::Pending
                    })
                    .await
                };
                ctx.put_mailbox(mailbox);
                match next {
                    Some(envelope) => envelope,
                    // Idle, shutting down, or (never: the directory holds
                    // a sender) closed.
                    None => break Exit::Ended,
                }
            };
            // Matched on its turn without binding anything before a guard
            // or across a wait, so that the envelope is never borrowed nor
            // left half moved where something waits.
            match envelope.turn {
                Turn::Deactivate => break Exit::Ended,
                // `collector.rs` rule 3: collected if still idle since the
                // sweep that chose it, else kept.
                Turn::Collect(collecting) => {
                    // A message waiting behind the collect is work to do.
                    let waiting = ctx.take_mailbox::<G>().map(|mut mailbox| {
                        let inbox = exclusive(&mut mailbox);
                        let waiting = inbox.has_taken() || !inbox.receiver.is_empty();
                        ctx.put_mailbox(mailbox);
                        waiting
                    });
                    if own.activity() < collecting.sweep && waiting == Some(false) {
                        break Exit::Collected(collecting.shed);
                    }
                }
                // Rule 13: taken after a give-up (an idle activation woken
                // by a message that waited through a stall): not run, nor
                // moved, nor paused.
                _ if ctx.abandoned() => break Exit::Unrun(Box::new(envelope)),
                // `migration.rs` rule 2: between turns, never in one.
                Turn::Migrate(_) => {
                    // Busy while it departs (`collector.rs` rules 2 and 7).
                    own.set_activity(own.activity() | super::collector::BUSY);
                    let departing = depart(&grain_type, worker, &mut grain, &mut ctx, envelope);
                    match Box::pin(departing).await {
                        Departed::Ends { moved, gone } => break Exit::Departed { moved, gone },
                        // The move kept the grain busy: not idle now.
                        Departed::Stayed => own.set_activity(live.silo().sweep_number()),
                    }
                }
                // `migration.rs` rule 6: between turns, nothing runs until
                // the pause is dropped. Boxed: see `begin`.
                Turn::Pause(_) => Box::pin(pause(envelope, &own, live.silo())).await,
                _ => {
                    let keeps_alive = envelope.keeps_alive;
                    // `collector.rs` rule 2: busy from the turn's start.
                    let stamp = own.activity();
                    own.set_activity(stamp | super::collector::BUSY);
                    // Rule 9: a stateless worker running a turn holds a slot.
                    let busy = (grain_type.workers > 1)
                        .then(|| own.try_reserve())
                        .flatten();
                    let timed = counts.sample_next().then(std::time::Instant::now);
                    let ran = turn(&mut grain, envelope, &mut ctx, &grain_type.stats).await;
                    // A turn that ran nothing (an expired message) is no
                    // sample.
                    if let Some(started) = timed.filter(|_| ran > 0) {
                        grain_type.stats.record_turn(started.elapsed());
                    }
                    counts.ran(ran, &grain_type.stats);
                    drop(busy);
                    own.set_activity(if keeps_alive {
                        live.silo().sweep_number()
                    } else {
                        stamp
                    });
                    if grain.is_none() {
                        break Exit::Ended;
                    }
                }
            }
        }
    };
    // Counted as ending until it is gone (`collector.rs` rule 4), before
    // the shedding collect that ended it, if one did, stops counting.
    let ending = super::collector::Ending::new(live.silo());
    let (migrated, leaving, unrun) = match exit {
        Exit::Ended => (false, None, None),
        Exit::Collected(shed) => {
            drop(shed);
            (false, None, None)
        }
        Exit::Departed { moved, gone } => (moved, Some(gone), None),
        Exit::Unrun(envelope) => (false, None, Some(envelope)),
    };
    // Rule 5: no new messages; run the ones already queued. Timers end
    // with the activation.
    ctx.cancel_timers();
    let gone = leaving.unwrap_or_else(|| {
        let (gone, gone_signal) = watch::channel(false);
        set_slot(
            &grain_type,
            ctx.key(),
            worker,
            Entry::Deactivating(Box::new(gone_signal)),
        );
        gone
    });
    if let Some(mut mailbox) = ctx.take_mailbox::<G>() {
        exclusive(&mut mailbox).receiver.close();
        ctx.put_mailbox(mailbox);
    }
    // Boxed: the drain's turn and `on_deactivate` wait once each, and
    // would otherwise take their room in the task for its whole life.
    let end = Box::pin(finish(
        &grain_type,
        grain,
        &mut ctx,
        counts,
        unrun,
        migrated,
    ))
    .await;
    // Its place in the live count first (rule 14): a caller woken by the
    // freed slot finds room for the next activation; then its place among
    // those ending.
    // Rule 5: the activation-local values go before the slot is freed,
    // so that the next activation's `on_activate` never overlaps them.
    ctx.drop_locals();
    let silo = live.silo().clone();
    drop(live);
    drop(ending);
    let key = ctx.key();
    if let Some(mut slots) = grain_type.directory.get_mut(key) {
        if let Some(slot) = slots.get_mut(worker) {
            *slot = None;
        }
    }
    grain_type
        .directory
        .remove_if(key, |_, slots| slots.iter().all(Option::is_none));
    // The next activation's references are leased afresh (rule 12).
    if silo.is_routed_now() {
        grain_type.leased.remove(key);
    }
    let _ = gone.send(true);
    tracing::debug!(grain = %ctx.identity(), "deactivated");
    // What else the context holds goes before the listener hears of the
    // activation's end; its identity is made only if one listens.
    let listened = |silo: &Silo| {
        silo.inner
            .ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|(_, listener)| listener.clone())
    };
    let id = listened(&silo).map(|_| ctx.new_id());
    drop(ctx);
    if let (Some(listener), Some(id)) = (listened(&silo), id) {
        listener(&id, end);
    }
}

/// Why an activation's loop ended, and what its ending needs from it.
enum Exit<G> {
    /// Told to deactivate, shutting down, given up, a failed grain, or a
    /// closed mailbox.
    Ended,
    /// The idle collector's collect ended it (`collector.rs` rule 3); a
    /// shedding one carries its token, counted as being shed until the
    /// activation counts as ending (rule 4).
    Collected(Option<super::collector::Shed>),
    /// A departure ended it (`migration.rs` rule 3): the grain left
    /// (`moved`) or failed for good on the way; its entry is marked
    /// deactivating with `gone`'s signal.
    Departed {
        moved: bool,
        gone: watch::Sender<bool>,
    },
    /// A message taken after a give-up, not run (rule 13; boxed: rare).
    Unrun(Box<Envelope<G>>),
}

/// The end of an activation whose mailbox is closed (rule 5): the messages
/// already queued (and `unrun`, first) run or fail, then `on_deactivate`
/// if there is a grain (none if it failed, or left: `migrated`), and the
/// timers end. Returns how the activation ended.
async fn finish<G: Grain>(
    grain_type: &GrainType<G>,
    mut grain: Option<G>,
    ctx: &mut GrainContext,
    mut counts: ActivationCounts,
    mut unrun: Option<Box<Envelope<G>>>,
    migrated: bool,
) -> ActivationEnd {
    loop {
        // As in the loop above: what comes out of the mailbox is never
        // borrowed, and only the turn holds it while it runs.
        let envelope = match unrun.take() {
            Some(envelope) => *envelope,
            None => {
                let Some(mut mailbox) = ctx.take_mailbox::<G>() else {
                    break;
                };
                let next = exclusive(&mut mailbox).next().await;
                ctx.put_mailbox(mailbox);
                let Some(envelope) = next else { break };
                envelope
            }
        };
        if ctx.abandoned() {
            // Rule 13: not run; dropping it fails its call.
            if !matches!(
                envelope.turn,
                Turn::Deactivate | Turn::Collect(_) | Turn::Migrate(_) | Turn::Pause(_)
            ) {
                ctx.silo()
                    .inner
                    .dropped_with_homes
                    .fetch_add(1, Ordering::Relaxed);
                grain_type.stats.failed(FailureReason::DroppedWithHome);
            }
            drop(envelope);
            continue;
        }
        match grain {
            Some(_) => {
                let ran = turn(&mut grain, envelope, ctx, &grain_type.stats).await;
                counts.ran(ran, &grain_type.stats);
            }
            // Failed activation (or one that left, `migration.rs` rule 3:
            // its mailbox was closed and drained before): dropping the
            // envelope fails its call, counted per message.
            None => {
                if !matches!(
                    envelope.turn,
                    Turn::Deactivate | Turn::Collect(_) | Turn::Migrate(_) | Turn::Pause(_)
                ) {
                    grain_type.stats.failed(FailureReason::ActivationFailed);
                }
                drop(envelope);
            }
        }
    }
    // What the drain ran is counted before `on_deactivate` (which may
    // take long).
    counts.flush(&grain_type.stats);
    let end = if migrated {
        ActivationEnd::Migrated
    } else if grain.is_some() {
        ActivationEnd::Deactivated
    } else {
        ActivationEnd::ActivationFailed
    };
    if let Some(mut grain) = grain {
        let chain = hook_chain(ctx);
        if in_chain(
            chain,
            AssertUnwindSafe(grain.on_deactivate(ctx)).catch_unwind(),
        )
        .await
        .is_err()
        {
            tracing::warn!(grain = %ctx.identity(), "on_deactivate panicked");
        }
    }
    // Timers registered by the last turns or by on_deactivate end too.
    ctx.cancel_timers();
    counts.flush(&grain_type.stats);
    grain_type.stats.activation_ended();
    end
}

/// `migration.rs` rule 4: a new object for the context's grain made from
/// `seed`:
/// `Grain::new`, `rehydrate`, then `on_activate`; answers, and waits for
/// the switch's confirmation. `None` if a hook failed or the switch did
/// not happen: the object is dropped unwritten.
async fn arrive<G: Grain>(
    grain_type: &GrainType<G>,
    ctx: &mut GrainContext,
    seed: Seed,
) -> Option<G> {
    let id = ctx.new_id();
    let failed = |reason: String| MigrationError::Hook {
        grain: id.clone(),
        reason,
    };
    let made = match grain_type.migration.get() {
        None => Err(MigrationError::NotMigratable {
            type_name: grain_type.name.to_string(),
        }),
        Some(hooks) => match std::panic::catch_unwind(AssertUnwindSafe(|| G::new(&id.key))) {
            Err(_) => Err(failed("Grain::new panicked".into())),
            Ok(mut grain) => {
                let chain = hook_chain(ctx);
                let rehydrated = AssertUnwindSafe((hooks.rehydrate)(&mut grain, ctx, seed.state));
                match in_chain(chain, rehydrated.catch_unwind()).await {
                    Ok(Ok(())) => match in_chain(
                        hook_chain(ctx),
                        AssertUnwindSafe(grain.on_activate(ctx)).catch_unwind(),
                    )
                    .await
                    {
                        Ok(Ok(())) => Ok(grain),
                        Ok(Err(err)) => Err(failed(format!("on_activate failed: {err}"))),
                        Err(_) => Err(failed("on_activate panicked".into())),
                    },
                    Ok(Err(err)) => Err(failed(format!("rehydrate failed: {err}"))),
                    Err(_) => Err(failed("rehydrate panicked".into())),
                }
            }
        },
    };
    let grain = match made {
        Ok(grain) => grain,
        Err(err) => {
            tracing::warn!(grain = %ctx.identity(), error = %err, "an arriving activation failed");
            let _ = seed.ready.send(Err(err));
            return None;
        }
    };
    let (confirm, confirmed) = tokio::sync::oneshot::channel();
    if seed.ready.send(Ok(confirm)).is_err() {
        return None;
    }
    let confirmed = tokio::select! {
        confirmed = confirmed => confirmed.unwrap_or(false),
        _ = ctx.silo().inner.shutdown.cancelled() => false,
    };
    confirmed.then_some(grain)
}

/// `migration.rs` rule 6: answers the pause `envelope` asks for, and runs
/// nothing until it is dropped (or the silo shuts down). A pause is not
/// activity, nor idleness: the grain is not collected while paused, and
/// stays as idle as it was (`collector.rs` rule 2).
async fn pause<G>(envelope: Envelope<G>, own: &mailbox::Sender<Envelope<G>>, silo: &Silo) {
    // The loop hands over only a pause's envelope, whole: taking the reply
    // out there would leave the loop a half-moved message across this
    // wait, with a room of its own in the task. Anything else is no pause.
    let Turn::Pause(reply) = envelope.turn else {
        return;
    };
    let stamp = own.activity();
    let paused_at = silo.sweep_number();
    own.set_activity(stamp | super::collector::BUSY);
    let (resume, resumed) = tokio::sync::oneshot::channel::<()>();
    if reply
        .send(Ok(crate::migration::Paused::new(resume)))
        .is_ok()
    {
        tokio::select! {
            _ = resumed => {}
            _ = silo.inner.shutdown.cancelled() => {}
        }
    }
    // The sweeps the pause lasted are not idleness.
    let now = silo.sweep_number();
    own.set_activity(stamp.saturating_add(now.saturating_sub(paused_at)).min(now));
}

/// How a departure ended (`migration.rs` rule 3).
enum Departed {
    /// The grain stays: its mailbox is open again, and the activation goes
    /// on.
    Stayed,
    /// The activation ends: its grain left (`moved`), or failed for good
    /// on the way. Its entry is still marked deactivating with `gone`'s
    /// signal, and its mailbox closed.
    Ends {
        moved: bool,
        gone: watch::Sender<bool>,
    },
}

/// `migration.rs` rules 2 and 3: the activation leaves for another silo,
/// as `envelope` asks. Its entry is marked deactivating and its mailbox
/// closed, what was queued runs, the grain dehydrates and its state goes
/// out through the envelope's reply; then the verdict.
async fn depart<G: Grain>(
    grain_type: &GrainType<G>,
    worker: usize,
    grain: &mut Option<G>,
    ctx: &mut GrainContext,
    envelope: Envelope<G>,
) -> Departed {
    // The loop hands over only a move's envelope, whole (see `pause`);
    // anything else is no move, and keeps the grain.
    let Turn::Migrate(reply) = envelope.turn else {
        return Departed::Stayed;
    };
    let Some(hooks) = grain_type.migration.get() else {
        let _ = reply.send(Err(MigrationError::NotMigratable {
            type_name: grain_type.name.to_string(),
        }));
        return Departed::Stayed;
    };
    // New messages wait for the verdict, as for a deactivation (rule 5).
    let (gone, gone_signal) = watch::channel(false);
    set_slot(
        grain_type,
        ctx.key(),
        worker,
        Entry::Deactivating(Box::new(gone_signal)),
    );
    if let Some(mut mailbox) = ctx.take_mailbox::<G>() {
        exclusive(&mut mailbox).receiver.close();
        ctx.put_mailbox(mailbox);
    }
    // What was queued before the close runs here, first; a deactivation
    // asked meanwhile is kept for a move that does not happen. After a
    // give-up (rule 13) nothing more runs: the activation ends as that
    // rule says.
    let mut deactivate = false;
    loop {
        if ctx.abandoned() {
            break;
        }
        let Some(mut mailbox) = ctx.take_mailbox::<G>() else {
            break;
        };
        let next = exclusive(&mut mailbox).next().await;
        ctx.put_mailbox(mailbox);
        let Some(envelope) = next else { break };
        match envelope.turn {
            Turn::Deactivate => deactivate = true,
            // Leaving anyway.
            Turn::Collect(_) => {}
            Turn::Migrate(other) => {
                let _ = other.send(Err(MigrationError::Busy {
                    grain: ctx.new_id(),
                }));
            }
            // Leaving: refused, as a second move is.
            Turn::Pause(other) => {
                let _ = other.send(Err(MigrationError::Busy {
                    grain: ctx.new_id(),
                }));
            }
            turn => {
                let envelope = Envelope { turn, ..envelope };
                let ran = self::turn(grain, envelope, ctx, &grain_type.stats).await;
                grain_type.stats.add_messages(ran);
            }
        }
        if grain.is_none() {
            break;
        }
    }
    let departing = match grain.as_mut() {
        _ if ctx.abandoned() => Err(MigrationError::ShutDown),
        None => Err(MigrationError::Hook {
            grain: ctx.new_id(),
            reason: "the grain failed before it could leave".into(),
        }),
        Some(object) => {
            let mut state = Dehydrated::new();
            let chain = hook_chain(ctx);
            match in_chain(
                chain,
                AssertUnwindSafe((hooks.dehydrate)(object, ctx, &mut state)).catch_unwind(),
            )
            .await
            {
                Ok(Ok(())) => Ok(state),
                Ok(Err(err)) => Err(MigrationError::Hook {
                    grain: ctx.new_id(),
                    reason: format!("dehydrate failed: {err}"),
                }),
                Err(_) => {
                    // As a panicking handler (rule 6): the object may be
                    // half-changed, so the activation is reset.
                    tracing::warn!(grain = %ctx.identity(), "dehydrate panicked; resetting the activation");
                    grain_type.stats.failed(FailureReason::Panicked);
                    *grain = None;
                    // The old object's timers go with it; the new one
                    // registers its own in `on_activate`.
                    ctx.cancel_timers();
                    *grain = activate::<G>(ctx).await;
                    Err(MigrationError::Hook {
                        grain: ctx.new_id(),
                        reason: "dehydrate panicked".into(),
                    })
                }
            }
        }
    };
    let verdict = match departing {
        Ok(state) => {
            let (verdict, decided) = tokio::sync::oneshot::channel();
            match reply.send(Ok((state, verdict))) {
                // A silo shutting down does not wait for a router that
                // never decides: the grain stays (and shuts down with it).
                Ok(()) => tokio::select! {
                    decided = decided => decided.unwrap_or(Verdict::Abort),
                    _ = ctx.silo().inner.shutdown.cancelled() => Verdict::Abort,
                },
                Err(_) => Verdict::Abort,
            }
        }
        Err(err) => {
            let _ = reply.send(Err(err));
            Verdict::Abort
        }
    };
    match verdict {
        Verdict::Commit(dropped) => {
            // Rule 3: no `on_deactivate`; what the grain held goes now.
            *grain = None;
            ctx.cancel_timers();
            let _ = dropped.send(());
            Departed::Ends { moved: true, gone }
        }
        // A grain asked to deactivate meanwhile, or abandoned, ends here as
        // rule 5 or 13 says, with its mailbox still closed.
        Verdict::Abort if deactivate || ctx.abandoned() => Departed::Ends { moved: false, gone },
        Verdict::Abort => {
            let reopened = grain.is_some()
                && ctx.take_mailbox::<G>().is_some_and(|mut mailbox| {
                    let open = exclusive(&mut mailbox);
                    open.receiver.reopen();
                    let sender = open.sender.clone();
                    set_slot(grain_type, ctx.key(), worker, Entry::Active(sender));
                    ctx.put_mailbox(mailbox);
                    true
                });
            if !reopened {
                return Departed::Ends { moved: false, gone };
            }
            // Waiting senders find the open mailbox.
            let _ = gone.send(true);
            Departed::Stayed
        }
    }
}

/// Sets `key`'s slot `worker` in the directory, if the key is there.
fn set_slot<G>(grain_type: &GrainType<G>, key: &GrainKey, worker: usize, entry: Entry<G>) {
    if let Some(mut slots) = grain_type.directory.get_mut(key) {
        if let Some(slot) = slots.get_mut(worker) {
            *slot = Some(entry);
        }
    }
}

/// Rule 7 for a lifecycle hook (`on_activate`, `on_deactivate`,
/// `rehydrate`, `dehydrate`): it runs in a fresh call chain of its own,
/// set on the context here, so that a call it makes lends the grain under
/// that chain, and only messages of that call's chain run on it meanwhile.
/// Without it, a hook ran in chain 0 (before the first turn), which every
/// hook of every grain shared, or in the chain of the activation's last
/// turn, which a late message of that call still carries.
fn hook_chain(ctx: &mut GrainContext) -> u64 {
    let chain = super::envelope::fresh_chain();
    ctx.set_chain(chain);
    chain
}

/// Runs `future` with `chain` as the running chain (`InChain`), as a turn
/// runs: a plain `GrainRef::call` it makes joins the chain too.
async fn in_chain<F: std::future::Future>(chain: u64, future: F) -> F::Output {
    let future = std::pin::pin!(future);
    InChain { chain, future }.await
}

/// A new object for the context's grain, activated; `None` if
/// `on_activate` failed (the messages it then drops are counted, one by
/// one).
async fn activate<G: Grain>(ctx: &mut GrainContext) -> Option<G> {
    let Ok(mut grain) = std::panic::catch_unwind(AssertUnwindSafe(|| G::new(ctx.key()))) else {
        tracing::warn!(grain = %ctx.identity(), "Grain::new panicked");
        return None;
    };
    let chain = hook_chain(ctx);
    match in_chain(
        chain,
        AssertUnwindSafe(grain.on_activate(ctx)).catch_unwind(),
    )
    .await
    {
        Ok(Ok(())) => Some(grain),
        Ok(Err(err)) => {
            tracing::warn!(grain = %ctx.identity(), error = %err, "activation failed");
            None
        }
        Err(_) => {
            tracing::warn!(grain = %ctx.identity(), "on_activate panicked");
            None
        }
    }
}

/// One turn (rule 3): what `envelope` asks of the grain, run to its end;
/// a panic resets the activation (rule 6), leaving `grain` `None` if the
/// reset failed. Returns how many messages ran (a read batch runs
/// several), counting failures in `stats`. A plain function that answers
/// the cheap cases at once and returns a future only for the turns that
/// run: the task that awaits it carries that future for its whole life, so
/// what the future holds is only what a running turn needs, and the grain
/// itself stays where the activation keeps it (the future borrows it).
fn turn<'a, G: Grain>(
    grain: &'a mut Option<G>,
    envelope: Envelope<G>,
    ctx: &'a mut GrainContext,
    stats: &'a TypeStats,
) -> impl std::future::Future<Output = u64> + 'a {
    enum Run<G: Grain> {
        Done,
        Write(super::envelope::WriteTurn<G>, u64),
        Read(u64, ReadTurn<G>),
    }
    let run = match grain {
        None => Run::Done,
        // Rule 11: the sender gave up before the turn started; dropping the
        // envelope drops its reply.
        Some(_) if envelope.expired() => {
            stats.failed(FailureReason::Expired);
            Run::Done
        }
        Some(_) => match envelope.turn {
            Turn::Write(write) => Run::Write(write, envelope.chain),
            Turn::Read(read) => Run::Read(envelope.chain, read),
            // Already deactivating (rule 5), or kept by a turn since the
            // collector's sweep (`collector.rs` rule 3).
            Turn::Deactivate | Turn::Collect(_) => Run::Done,
            // Deactivating, or leaving already: nothing to move, nothing to
            // pause.
            Turn::Migrate(reply) => {
                let _ = reply.send(Err(MigrationError::NotActive {
                    grain: ctx.new_id(),
                }));
                Run::Done
            }
            Turn::Pause(reply) => {
                let _ = reply.send(Err(MigrationError::NotActive {
                    grain: ctx.new_id(),
                }));
                Run::Done
            }
        },
    };
    async move {
        match run {
            Run::Done => 0,
            Run::Read(chain, read) => match grain {
                Some(object) => Box::pin(read_batch(object, (chain, read), ctx, stats)).await,
                // Cannot happen: a read or write run is made only for a
                // grain that is there, and nothing else holds it meanwhile.
                None => 0,
            },
            Run::Write(write, chain) => {
                // Cannot happen, as above.
                let Some(object) = grain.as_mut() else {
                    return 0;
                };
                ctx.set_chain(chain);
                // A disabled span is not entered on every poll (`trace`
                // rule 3). The span goes into the future it instruments,
                // inside this block, so the turn holds it once (a local
                // span would keep its room across the await).
                let turn = {
                    let span = turn_span(ctx, chain);
                    let turn = InChain {
                        chain,
                        future: AssertUnwindSafe(write(object, ctx)).catch_unwind(),
                    };
                    if span.is_disabled() {
                        Either::Left(turn)
                    } else {
                        Either::Right(turn.instrument(span))
                    }
                };
                if turn.await.is_err() {
                    tracing::warn!(grain = %ctx.identity(), "a handler panicked; resetting the activation");
                    stats.failed(FailureReason::Panicked);
                    *grain = None;
                    // The old object's timers go with it; the new one
                    // registers its own in `on_activate`.
                    ctx.cancel_timers();
                    *grain = Box::pin(activate::<G>(ctx)).await;
                }
                1
            }
        }
    }
}

/// A turn's span (`trace` rule 2): disabled, and free, unless a subscriber
/// wants debug spans from this crate.
fn turn_span(ctx: &GrainContext, chain: u64) -> tracing::Span {
    tracing::debug_span!(
        "granary.turn",
        grain = %ctx.identity(),
        trace = %crate::trace::TraceId(chain)
    )
}

/// Rule 10: `first` and the reads queued right behind it run together on
/// a shared borrow of the grain. The first write in the queue stops the
/// batch and runs after it. A panicking read fails only its own call: it
/// could not change the grain.
async fn read_batch<G: Grain>(
    grain: &G,
    first: (u64, ReadTurn<G>),
    ctx: &mut GrainContext,
    stats: &TypeStats,
) -> u64 {
    let mut reads = vec![first];
    if let Some(mut mailbox) = ctx.take_mailbox::<G>() {
        let open = exclusive(&mut mailbox);
        while reads.len() < MAX_READ_BATCH {
            match open.try_next() {
                // Rule 11: a read whose sender gave up is dropped.
                Some(envelope) if envelope.expired() => stats.failed(FailureReason::Expired),
                Some(Envelope {
                    chain,
                    turn: Turn::Read(read),
                    ..
                }) => reads.push((chain, read)),
                Some(other) => {
                    open.put_back(other);
                    break;
                }
                None => break,
            }
        }
        ctx.put_mailbox(mailbox);
    }
    let ctx: &GrainContext = ctx;
    let ran = reads.len() as u64;
    let running = reads.into_iter().map(|(chain, read)| {
        let turn = InChain {
            chain,
            future: AssertUnwindSafe(read(grain, ctx)).catch_unwind(),
        };
        let span = turn_span(ctx, chain);
        if span.is_disabled() {
            futures_util::future::Either::Left(turn)
        } else {
            futures_util::future::Either::Right(turn.instrument(span))
        }
    });
    let panicked = futures_util::future::join_all(running)
        .await
        .iter()
        .filter(|outcome| outcome.is_err())
        .count();
    if panicked > 0 {
        tracing::warn!(grain = %ctx.identity(), panicked, "read-only handlers panicked");
        for _ in 0..panicked {
            stats.failed(FailureReason::Panicked);
        }
    }
    ran
}

#[cfg(all(test, target_pointer_width = "64"))]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn size_of_return<A, R>(_f: impl FnOnce(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Eight bytes of state, as the bench's counter.
    struct Tiny(#[allow(dead_code)] u64);

    impl Grain for Tiny {
        fn new(_: &GrainKey) -> Tiny {
            Tiny(0)
        }
    }

    /// `mailbox.rs` rule 9 on the activation's end: once it waits for a
    /// message, its batch's room has gone back to the queue and the
    /// set-aside list is gone, and messages come through as before.
    #[test]
    fn an_idle_activation_end_keeps_one_buffer() {
        let (sender, receiver) = mailbox::channel::<Envelope<Tiny>>(
            4,
            mailbox::Sweeper::new(std::time::Duration::from_millis(5)),
        );
        let envelope = |chain| Envelope {
            chain,
            keeps_alive: false,
            expires: None,
            turn: Turn::Deactivate,
        };
        let mut mailbox = Mailbox {
            receiver,
            sender: sender.clone(),
            batch: std::collections::VecDeque::new(),
            batches: true,
            deferred: None,
        };
        for chain in 1..=3 {
            assert!(sender.try_send(envelope(chain)).is_ok());
        }
        assert_eq!(mailbox.try_next().map(|next| next.chain), Some(1));
        mailbox.defer(envelope(4));
        assert!(mailbox.batch.capacity() > 1 && mailbox.deferred.is_some());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut order = Vec::new();
        while let std::task::Poll::Ready(Some(next)) = mailbox.poll_next(&mut cx) {
            order.push(next.chain);
        }
        assert_eq!(order, [2, 3, 4]);
        // The burst's room went back to the queue.
        assert_eq!(mailbox.batch.capacity(), 0);
        assert!(mailbox.receiver.queue_capacity() >= 3);
        assert!(mailbox.deferred.is_none());
        for chain in 5..7 {
            assert!(sender.try_send(envelope(chain)).is_ok());
            assert!(matches!(
                mailbox.poll_next(&mut cx),
                std::task::Poll::Ready(Some(Envelope { chain: taken, .. })) if taken == chain
            ));
            assert!(mailbox.poll_next(&mut cx).is_pending());
            // The buffer went back to the queue.
            assert_eq!(mailbox.batch.capacity(), 0);
            assert!(mailbox.receiver.queue_capacity() >= 3);
        }
    }

    /// Every live activation keeps its task, its context and its directory
    /// slot for as long as it lives (`BENCHMARKS.md`, issue 18): a change
    /// that grows them should be seen. tokio's task cell adds 112 bytes to
    /// the activation's state (header, scheduler, id, stage, the tracker's
    /// token, trailer) and is aligned to 128, so a state of at most 400
    /// bytes is a 512-byte cell.
    #[test]
    fn an_activation_keeps_a_small_state() {
        let state = size_of_return(run_activation::<Tiny>);
        assert!(
            state <= 400,
            "run_activation's state is {state} bytes, more than 400: tokio's cell grows from 512 to 640"
        );
        let held = std::mem::size_of::<HeldMailbox<Tiny>>();
        assert!(
            held <= 72,
            "the activation's end of its mailbox is {held} bytes, more than 72"
        );
        let ctx = std::mem::size_of::<GrainContext>();
        assert!(ctx <= 112, "GrainContext is {ctx} bytes, more than 112");
        assert_eq!(
            std::mem::size_of::<super::super::registry::Slots<Tiny>>(),
            std::mem::size_of::<Option<Entry<Tiny>>>(),
            "a key's slots take more room than one slot"
        );
        assert_eq!(
            std::mem::size_of::<Option<Entry<Tiny>>>(),
            2 * std::mem::size_of::<usize>(),
            "a slot takes more than a pointer and its tag"
        );
    }
}
