//! What a turn can do through its `GrainContext` beyond `grain.rs`: the
//! reentrant `GrainContext::call` (rule 7 of the silo's protocol,
//! `silo/mod.rs`), timers (rule 8), and reminders.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::oneshot;

use super::GrainRef;
use super::activation::{HeldMailbox, exclusive};
use super::envelope::{Deadline, Envelope, Turn, current_chain, deadline_after};
use super::reference::routed_reply;
use crate::error::CallError;
use crate::grain::{Grain, GrainContext, Handler, Message};
use crate::mailbox::SendError;
use crate::route::Kind;

/// A mailbox taken out of its context for a reentrant wait; put back when
/// dropped.
struct LentMailbox<'c, G: Grain> {
    ctx: &'c mut GrainContext,
    mailbox: Option<Box<HeldMailbox<G>>>,
}

impl<G: Grain> Drop for LentMailbox<'_, G> {
    fn drop(&mut self) {
        if let Some(mailbox) = self.mailbox.take() {
            self.ctx.put_mailbox(mailbox);
        }
    }
}

impl GrainContext {
    /// Calls `target` from a turn of `this` grain and waits for the reply,
    /// lending `this` meanwhile: a message of the same call chain that
    /// reaches `this` grain while it waits (a call back from `target`, or
    /// from further down the chain) runs on it at once, so A → B → A
    /// completes instead of deadlocking (rule 7). Messages of other chains
    /// wait until the current turn ends, in arrival order.
    ///
    /// A plain `GrainRef::call` from a handler joins the chain too, but
    /// does not lend the grain: a call back into it then waits for the
    /// current turn, and times out.
    pub async fn call<G, T, M>(
        &mut self,
        this: &mut G,
        target: &GrainRef<T>,
        message: M,
    ) -> Result<M::Reply, CallError>
    where
        G: Grain,
        T: Handler<M>,
        M: Message,
    {
        let chain = self.chain();
        let grain_type = target.registered()?;
        let timeout = target.silo.inner.config.call_timeout;
        // What the wait below names and counts if it times out.
        let callee = Callee {
            grain: target.id(grain_type),
            timeout,
            stats: &grain_type.stats,
        };
        // On a routed silo the call goes to the grain's home, wherever it
        // is (rule 12); it carries this turn's chain, so a call back from
        // another silo runs on the lent grain too.
        if let Some(router) = target.router() {
            let (outbound, reply, codec) = target.outbound(
                Kind::Call,
                message,
                chain,
                |target, message, chain, deadline| async move {
                    target.call_here(message, chain, None, deadline).await
                },
            )?;
            let deadline = outbound.deadline;
            let answer_grain = callee.grain.clone();
            let answer = async move {
                let delivered = router.dispatch(Box::new(outbound)).await?;
                routed_reply(delivered, reply, codec, Kind::Call, &answer_grain)
            };
            return self.lend_until(this, chain, answer, deadline, callee).await;
        }
        let deadline = deadline_after(timeout);
        let (reply, answer) = oneshot::channel();
        let envelope = Envelope::<T> {
            chain,
            keeps_alive: true,
            expires: None,
            turn: Turn::Write(Box::new(move |grain, ctx| {
                Box::pin(async move {
                    let _ = reply.send(grain.handle(message, ctx).await);
                })
            })),
        };
        target
            .deliver(grain_type, envelope, &mut Deadline::at(deadline, timeout))
            .await?;
        let failed = callee.grain.clone();
        let answer = async move {
            answer
                .await
                .map_err(|_| CallError::TurnFailed { grain: failed })
        };
        self.lend_until(this, chain, answer, deadline, callee).await
    }

    /// Waits for `answer` until `deadline`, lending `this` to the messages
    /// of `chain` that reach it meanwhile (rule 7).
    async fn lend_until<G, R>(
        &mut self,
        this: &mut G,
        chain: u64,
        answer: impl std::future::Future<Output = Result<R, CallError>>,
        deadline: tokio::time::Instant,
        callee: Callee<'_>,
    ) -> Result<R, CallError>
    where
        G: Grain,
    {
        enum Event<G, R> {
            Answer(Result<R, CallError>),
            Message(Option<Envelope<G>>),
            Timeout,
        }
        let mut answer = std::pin::pin!(answer);
        let capacity = self.silo().inner.config.mailbox_capacity;
        // The lent grain's type, for its statistics (`stats.rs`): messages
        // run and failures here count as they do in a turn of their own.
        // Looked up only when something is counted.
        let silo = self.silo().clone();
        let count = |record: &dyn Fn(&super::stats::TypeStats)| {
            if let Ok(grain_type) = silo.grain_type::<G>() {
                record(&grain_type.stats);
            }
        };
        loop {
            // Outside an activation of `G` there is nothing to lend. The
            // guard puts the mailbox back even if this future is dropped
            // mid-wait (a caller's timeout).
            let mailbox = self.take_mailbox::<G>();
            let mut lent = LentMailbox {
                ctx: &mut *self,
                mailbox,
            };
            // Set-aside messages count against the mailbox's bound: past
            // it, the wait stops receiving, and senders wait (rule 4).
            let receiving = lent.mailbox.as_mut().map(exclusive).is_some_and(|mailbox| {
                (!mailbox.receiver.is_closed() || !mailbox.receiver.is_empty())
                    && mailbox.deferred_len() < capacity
            });
            // A message of this chain already taken from the mailbox into
            // the batch runs now, as it would had it stayed in the mailbox.
            let early = lent.mailbox.as_mut().map(exclusive).and_then(|mailbox| {
                let at = mailbox
                    .batch
                    .iter()
                    .position(|queued| queued.chain == chain)?;
                mailbox.batch.remove(at)
            });
            let event = if let Some(envelope) = early {
                Event::Message(Some(envelope))
            } else {
                tokio::select! {
                    answer = &mut answer => Event::Answer(answer),
                    next = async {
                        match lent.mailbox.as_mut() {
                            Some(mailbox) => exclusive(mailbox).receiver.recv().await,
                            None => std::future::pending().await,
                        }
                    }, if receiving => Event::Message(next),
                    _ = tokio::time::sleep_until(deadline) => Event::Timeout,
                }
            };
            // A message of another chain waits for the current turn.
            let event = match event {
                Event::Message(Some(envelope))
                    if envelope.chain != chain
                        || matches!(
                            envelope.turn,
                            Turn::Deactivate | Turn::Collect(_) | Turn::Migrate(_) | Turn::Pause(_)
                        ) =>
                {
                    if let Some(mailbox) = lent.mailbox.as_mut() {
                        exclusive(mailbox).defer(envelope);
                    }
                    Event::Message(None)
                }
                other => other,
            };
            drop(lent);
            match event {
                Event::Answer(answer) => return answer,
                // Counted here, once (`stats.rs` rule 4): a timeout the
                // answer itself carries was counted where it happened.
                Event::Timeout => {
                    callee.stats.failed(super::stats::FailureReason::Timeout);
                    return Err(CallError::Timeout {
                        grain: callee.grain,
                        after: callee.timeout,
                    });
                }
                // Rule 11: a sender from another silo gave up before this
                // reentrant turn could start.
                Event::Message(Some(envelope)) if envelope.expired() => {
                    count(&|stats| stats.failed(super::stats::FailureReason::Expired));
                }
                // Rule 13: every home was given up while this turn waited;
                // a message of its chain is dropped unrun, as the queued
                // ones are.
                Event::Message(Some(envelope)) if self.abandoned() => {
                    self.silo()
                        .inner
                        .dropped_with_homes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    count(&|stats| stats.failed(super::stats::FailureReason::DroppedWithHome));
                    drop(envelope);
                }
                // A reentrant turn on the lent grain.
                Event::Message(Some(envelope)) => {
                    match envelope.turn {
                        Turn::Write(write) => {
                            write(this, self).await;
                            count(&|stats| stats.add_messages(1));
                        }
                        // A panicking read fails only its own call (rule 10).
                        Turn::Read(read) => {
                            let read = AssertUnwindSafe(read(this, self)).catch_unwind().await;
                            count(&|stats| {
                                stats.add_messages(1);
                                if read.is_err() {
                                    stats.failed(super::stats::FailureReason::Panicked);
                                }
                            });
                        }
                        // Set aside above: they wait for the turn.
                        Turn::Deactivate | Turn::Collect(_) | Turn::Migrate(_) | Turn::Pause(_) => {
                        }
                    }
                    self.set_chain(chain);
                }
                Event::Message(None) => {}
            }
        }
    }
}

/// The grain a reentrant call waits for: its name, how long the call
/// waits, and its type's statistics (a timeout is counted there).
struct Callee<'a> {
    grain: crate::key::GrainId,
    timeout: std::time::Duration,
    stats: &'a super::stats::TypeStats,
}

/// A timer registered with [`GrainContext::register_timer`]; it stops when
/// cancelled or when its activation ends.
#[derive(Debug, Clone)]
pub struct Timer {
    cancel: tokio_util::sync::CancellationToken,
}

impl Timer {
    /// Stops the timer; a tick already in the mailbox still runs.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }
}

impl GrainContext {
    /// Registers a timer on this activation (rule 8): after `due`, and then
    /// every `period` if one is given, the grain receives `tick()` as a
    /// message of its own, handled in a turn like any other. The grain type
    /// `G` is the caller's own (`Self` in a handler).
    pub fn register_timer<G, M>(
        &mut self,
        due: Duration,
        period: Option<Duration>,
        tick: impl Fn() -> M + Send + 'static,
    ) -> Result<Timer, CallError>
    where
        G: Handler<M>,
        M: Message,
    {
        let Some(mut mailbox) = self.take_mailbox::<G>() else {
            return Err(CallError::NotRegistered {
                type_name: std::any::type_name::<G>(),
            });
        };
        let sender = exclusive(&mut mailbox).sender.clone();
        self.put_mailbox(mailbox);
        let cancel = self.timers().child_token();
        let timer = Timer {
            cancel: cancel.clone(),
        };
        tokio::spawn(async move {
            let mut wait = due;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                let message = tick();
                let envelope = Envelope::<G> {
                    chain: current_chain(),
                    keeps_alive: false,
                    expires: None,
                    turn: Turn::Write(Box::new(move |grain, ctx| {
                        Box::pin(async move {
                            let _ = grain.handle(message, ctx).await;
                        })
                    })),
                };
                // A closed mailbox: the activation is ending (its timers are
                // cancelled first), or leaving for another silo: the tick
                // waits for the verdict, and goes in if the grain stays
                // (`migration.rs` rule 3); the timer ends with a grain that
                // leaves.
                let mut envelope = envelope;
                let sent = loop {
                    let sent = tokio::select! {
                        _ = cancel.cancelled() => return,
                        sent = sender.send(envelope, deadline_after(Duration::MAX)) => sent,
                    };
                    match sent {
                        Err(SendError::Closed(returned)) if !cancel.is_cancelled() => {
                            envelope = returned;
                            tokio::select! {
                                _ = cancel.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_millis(1)) => {}
                            }
                        }
                        sent => break sent,
                    }
                };
                match (sent, period) {
                    (Ok(()), Some(period)) => wait = period,
                    _ => return,
                }
            }
        });
        Ok(timer)
    }
}

impl GrainContext {
    /// Registers (or replaces) this grain's reminder `name`: it first fires
    /// after `due`, then every `period` (at least 1 ms), whether or not the
    /// grain is active, and across silo restarts. The grain's type must be
    /// registered with `SiloBuilder::remindable`.
    pub async fn register_reminder(
        &self,
        name: &str,
        due: Duration,
        period: Duration,
    ) -> Result<(), crate::reminders::ReminderError> {
        let reminders = self.silo().inner.reminders.clone();
        reminders.register(&self.new_id(), name, due, period).await
    }

    /// Removes this grain's reminder `name`; returns whether it existed.
    pub async fn unregister_reminder(
        &self,
        name: &str,
    ) -> Result<bool, crate::reminders::ReminderError> {
        let reminders = self.silo().inner.reminders.clone();
        reminders.unregister(&self.new_id(), name).await
    }
}
