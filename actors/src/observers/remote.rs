//! The grain's side of a subscriber on another silo (rules 4 to 6 of
//! `observers/mod.rs`): a bounded queue and the task that sends its
//! notifications in order, and drops the subscriber once it has gone or
//! stayed unreachable past its expiry.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Observed, ObserverRef};
use crate::silo::Silo;

/// What the grain's `Observers` sees of its delivery task.
#[derive(Debug, Default)]
pub(super) struct RemoteState {
    /// The task has ended for good: the subscriber is dropped at the next
    /// notification or prune.
    gone: AtomicBool,
    /// It ended because the subscriber's silo stayed unreachable (rule 6).
    expired: AtomicBool,
}

impl RemoteState {
    pub(super) fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    pub(super) fn has_expired(&self) -> bool {
        self.expired.load(Ordering::Acquire)
    }

    fn end(&self, expired: bool) {
        self.expired.store(expired, Ordering::Release);
        self.gone.store(true, Ordering::Release);
    }
}

/// Ends the state however the task ends (its silo gone, its runtime shut
/// down, a panic), so that the grain's `Observers` never keeps a subscriber
/// no task serves.
struct EndOnDrop(Arc<RemoteState>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        if !self.0.is_gone() {
            self.0.end(false);
        }
    }
}

/// How often an idle task checks its subscriber's silo, at most.
const LONGEST_CHECK: Duration = Duration::from_secs(1);
/// And at least.
const SHORTEST_CHECK: Duration = Duration::from_millis(10);

/// Starts the delivery task of `observer` on `runtime`: it holds the silo
/// weakly, and ends when the queue's sender (the grain's `Observers`) is
/// dropped, or when the subscriber goes (rules 5 and 6).
pub(super) fn spawn<T: Serialize + Send + 'static>(
    runtime: &tokio::runtime::Handle,
    silo: &Silo,
    observer: ObserverRef<T>,
    capacity: usize,
    expiry: Duration,
) -> (mpsc::Sender<T>, Arc<RemoteState>) {
    let (queue, receiver) = mpsc::channel(capacity.max(1));
    let state = Arc::new(RemoteState::default());
    runtime.spawn(deliver(
        silo.clone(),
        observer,
        receiver,
        state.clone(),
        expiry,
    ));
    (queue, state)
}

async fn deliver<T: Serialize>(
    silo: Silo,
    observer: ObserverRef<T>,
    mut queue: mpsc::Receiver<T>,
    state: Arc<RemoteState>,
    expiry: Duration,
) {
    let _end = EndOnDrop(state.clone());
    let silo = silo.downgrade();
    let check_every = (expiry / 4).clamp(SHORTEST_CHECK, LONGEST_CHECK);
    // Since when the subscriber's silo has been unreachable, if it is.
    let mut unreachable_since: Option<Instant> = None;
    loop {
        let next = tokio::time::timeout(check_every, queue.recv()).await;
        let Some(silo) = silo.upgrade().map(Silo::from_inner) else {
            return;
        };
        // `Some(true)`: a notification was delivered; `Some(false)`: the
        // subscriber's silo could not be reached; `None`: no news.
        let reachable = match next {
            // The grain's observers are gone.
            Ok(None) => return,
            Ok(Some(value)) => {
                let payload = match postcard::to_allocvec(&value) {
                    Ok(payload) => payload,
                    Err(err) => {
                        // The type never encodes: no later value will.
                        tracing::warn!(
                            type_name = observer.type_name(),
                            error = %err,
                            "a notification does not encode; its subscriber is dropped"
                        );
                        state.end(false);
                        return;
                    }
                };
                match silo
                    .send_observation(
                        observer.place(),
                        observer.endpoint(),
                        observer.type_name(),
                        payload,
                    )
                    .await
                {
                    Ok(Observed::Delivered | Observed::Full) => Some(true),
                    Ok(Observed::Gone) => {
                        state.end(false);
                        return;
                    }
                    Err(unreachable) => {
                        tracing::debug!(error = %unreachable, "a notification was not delivered");
                        Some(false)
                    }
                }
            }
            // Idle: a silo that has left the view is unreachable. While the
            // clock runs for one still in it, a probe asks the subscriber's
            // silo whether the subscriber is there: only an answer clears
            // the clock (a silo cut off but still in the view expires).
            Err(_) if !silo.is_observer_place_present(observer.place()) => Some(false),
            Err(_) if unreachable_since.is_some() => {
                let probe = format!("{}{}", super::endpoint::PROBE, observer.type_name());
                match silo
                    .send_observation(observer.place(), observer.endpoint(), &probe, Vec::new())
                    .await
                {
                    Ok(Observed::Delivered | Observed::Full) => Some(true),
                    Ok(Observed::Gone) => {
                        state.end(false);
                        return;
                    }
                    Err(_) => Some(false),
                }
            }
            Err(_) => None,
        };
        if reachable == Some(true) {
            unreachable_since = None;
        } else if reachable == Some(false) || unreachable_since.is_some() {
            let since = *unreachable_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= expiry {
                tracing::debug!(
                    place = observer.place(),
                    endpoint = observer.endpoint(),
                    ?expiry,
                    "a subscriber stayed unreachable and is dropped"
                );
                state.end(true);
                return;
            }
        }
    }
}
