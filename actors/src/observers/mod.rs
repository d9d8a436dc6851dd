//! Observers: a grain notifies its subscribers, for example with a stream
//! of results, wherever in the cluster they are.
//!
//! # Rules
//!
//! 1. **One bounded channel per subscriber.** A slow subscriber never
//!    slows the grain or the others: a notification that finds a
//!    subscriber's channel full is skipped for that subscriber and counted
//!    in its [`Subscription::missed`]. Notifications reach each subscriber
//!    in the order the grain sent them.
//! 2. **Two ways to subscribe.** A handler may hand out a
//!    [`Subscription`] itself ([`Observers::subscribe`]): the subscriber
//!    is on the grain's silo. Or the subscriber makes an endpoint on its
//!    own silo with [`Silo::observe`](crate::Silo::observe), which returns
//!    the [`Subscription`] and an [`ObserverRef`]: a serialisable
//!    reference to it (its silo's place and the endpoint's number), which
//!    it sends to the grain in a message, and the grain keeps with
//!    [`Observers::add`]. Dropping a subscription unsubscribes: its
//!    endpoint goes.
//! 3. **Here: the typed path.** An `ObserverRef` whose place is the
//!    grain's own silo is resolved when it is added: notifications go
//!    into the subscriber's channel as Rust values, with no encoding.
//! 4. **Elsewhere: in order, through the router.** For a subscriber on
//!    another silo, the grain's `Observers` keeps a bounded queue (of the
//!    same capacity) and a task that sends its notifications one at a
//!    time, encoded, through the silo's router (`route.rs`) to the
//!    subscriber's silo, which answers what became of each
//!    ([`Observed`]). A full queue skips the notification for that
//!    subscriber, counted in [`Observers::skipped`].
//! 5. **Gone at once.** A subscriber its silo no longer knows (the
//!    subscription was dropped) or whose type differs is dropped at the
//!    next notification. (In a cluster, a silo that restarted is a new
//!    incarnation under another place: a subscriber of its previous life
//!    is unreachable, rule 6.)
//! 6. **Dropped after a bounded time.** A subscriber whose silo cannot be
//!    reached is dropped once it has been unreachable for the `expiry`
//!    given to [`Observers::with_expiry`] (10 s by default), and counted in
//!    [`Observers::expired`]: unreachable from the first notification that
//!    could not be delivered (which may itself take up to the call timeout
//!    to fail), or from when the router first says the silo is no longer a
//!    member. While nothing is notified, the task asks the router every
//!    quarter of `expiry` (at most every second, at least every 10 ms)
//!    whether the subscriber's silo is still a member, so a subscriber
//!    whose silo died is dropped within the time the cluster takes to
//!    declare that death plus `expiry`, with or without notifications.
//!    Only an answer from the subscriber's silo clears the clock: a
//!    delivered notification, or, while the clock runs and nothing is
//!    notified, a probe that asks that silo whether the subscriber is
//!    there (and delivers nothing). A silo that was
//!    falsely declared dead and comes back keeps its place: a subscriber
//!    on it that was dropped meanwhile receives nothing more, though its
//!    subscription stays open, and must subscribe again (rule 7).
//! 7. **What a subscriber does not see.** A remote subscriber is not told
//!    that the grain's activation ended (its subscription stays open); as
//!    with Orleans observers, a subscriber that must not miss a
//!    deactivation subscribes again periodically. [`Observers::add`] is
//!    idempotent per endpoint.

mod endpoint;
mod remote;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

pub(crate) use endpoint::Endpoints;
pub use endpoint::{EndpointGuard, Observed, ObserverRef, ObserverUnreachable};

use crate::silo::Silo;

/// A subscriber's place and endpoint number (rule 2).
type Endpoint = (String, u64);

/// How long a subscriber may stay unreachable before it is dropped, by
/// default (rule 6).
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(10);

enum Subscriber<T> {
    /// On the grain's silo (rules 2 and 3).
    Local {
        sender: mpsc::Sender<T>,
        missed: Arc<AtomicU64>,
    },
    /// On another silo (rule 4).
    Remote {
        queue: mpsc::Sender<T>,
        state: Arc<remote::RemoteState>,
    },
}

impl<T> Subscriber<T> {
    /// Whether the subscriber has gone (rules 5 and 6): its channel or its
    /// delivery task's queue closed, or its task ended.
    fn is_gone(&self) -> bool {
        match self {
            Subscriber::Local { sender, .. } => sender.is_closed(),
            Subscriber::Remote { queue, state } => state.is_gone() || queue.is_closed(),
        }
    }

    /// Whether it went because its silo stayed unreachable (rule 6).
    fn has_expired(&self) -> bool {
        matches!(self, Subscriber::Remote { state, .. } if state.has_expired())
    }
}

/// A grain's subscribers.
pub struct Observers<T> {
    /// Each subscriber, with its place and endpoint if it was added by
    /// reference.
    subscribers: Vec<(Option<Endpoint>, Subscriber<T>)>,
    /// Notifications each subscriber may hold unread, at least 1.
    capacity: usize,
    expiry: Duration,
    /// Subscribers dropped for being unreachable, already pruned.
    expired: u64,
    /// Notifications skipped because a remote subscriber's queue was full.
    skipped: u64,
}

impl<T> fmt::Debug for Observers<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observers")
            .field("subscribers", &self.subscribers.len())
            .field("capacity", &self.capacity)
            .field("expiry", &self.expiry)
            .finish()
    }
}

/// Why [`Observers::add`] refused a subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddObserverError {
    /// The reference names an endpoint on this silo that no longer exists
    /// (its subscription was dropped) (rule 5).
    Gone,
    /// The endpoint on this silo takes notifications of another type.
    WrongType {
        /// The type the grain notifies.
        expected: &'static str,
        /// The type the endpoint takes.
        found: String,
    },
    /// The subscriber is on another silo, and this was called outside a
    /// tokio runtime, where its delivery task cannot run (rule 4).
    NoRuntime,
}

impl fmt::Display for AddObserverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddObserverError::Gone => write!(f, "the subscriber is gone"),
            AddObserverError::WrongType { expected, found } => write!(
                f,
                "the subscriber takes {found}, but the grain notifies {expected}"
            ),
            AddObserverError::NoRuntime => write!(
                f,
                "a subscriber on another silo is added from outside a tokio runtime"
            ),
        }
    }
}

impl std::error::Error for AddObserverError {}

impl<T: Clone + Send + 'static> Observers<T> {
    /// No subscribers yet; each will hold up to `capacity` unread
    /// notifications (at least 1). Unreachable subscribers go after
    /// [`DEFAULT_EXPIRY`].
    pub fn new(capacity: usize) -> Observers<T> {
        Observers::with_expiry(capacity, DEFAULT_EXPIRY)
    }

    /// As [`Observers::new`], with subscribers dropped once unreachable
    /// for `expiry` (rule 6).
    pub fn with_expiry(capacity: usize, expiry: Duration) -> Observers<T> {
        Observers {
            subscribers: Vec::new(),
            capacity: capacity.max(1),
            expiry,
            expired: 0,
            skipped: 0,
        }
    }

    /// A new subscriber on this silo; it sees every notification from now
    /// on.
    pub fn subscribe(&mut self) -> Subscription<T> {
        let (sender, receiver) = mpsc::channel(self.capacity);
        let missed = Arc::new(AtomicU64::new(0));
        self.subscribers.push((
            None,
            Subscriber::Local {
                sender,
                missed: missed.clone(),
            },
        ));
        Subscription {
            receiver,
            missed,
            _endpoint: None,
        }
    }

    /// Adds the subscriber `observer` refers to, wherever it is (rules 2
    /// to 4); it sees every notification from now on. Adding one that is
    /// already here changes nothing. `silo` is the grain's silo
    /// (`GrainContext::silo`).
    pub fn add(&mut self, silo: &Silo, observer: ObserverRef<T>) -> Result<(), AddObserverError>
    where
        T: Serialize,
    {
        let key = (observer.place().to_string(), observer.endpoint());
        self.prune();
        if self
            .subscribers
            .iter()
            .any(|(known, _)| known.as_ref() == Some(&key))
        {
            return Ok(());
        }
        let subscriber = if silo.is_observer_place_here(observer.place()) {
            let (sender, missed) = silo.local_endpoint::<T>(&observer)?;
            Subscriber::Local { sender, missed }
        } else {
            let runtime =
                tokio::runtime::Handle::try_current().map_err(|_| AddObserverError::NoRuntime)?;
            let (queue, state) =
                remote::spawn(&runtime, silo, observer, self.capacity, self.expiry);
            Subscriber::Remote { queue, state }
        };
        self.subscribers.push((Some(key), subscriber));
        Ok(())
    }

    /// Removes the subscriber `observer` refers to; whether it was here.
    pub fn remove(&mut self, observer: &ObserverRef<T>) -> bool {
        // An expired subscriber stays counted once removed.
        self.prune();
        let key = (observer.place().to_string(), observer.endpoint());
        let before = self.subscribers.len();
        self.subscribers
            .retain(|(known, _)| known.as_ref() != Some(&key));
        self.subscribers.len() != before
    }

    /// Sends `value` to every subscriber, dropping those that have gone
    /// (rules 5 and 6). Returns how many it reached: put in the channel of
    /// a subscriber on this silo, or in the queue to one elsewhere.
    pub fn notify(&mut self, value: &T) -> usize {
        let mut reached = 0;
        let mut expired = 0;
        let mut skipped = 0;
        self.subscribers.retain(|(_, subscriber)| match subscriber {
            Subscriber::Local { sender, missed } => match sender.try_send(value.clone()) {
                Ok(()) => {
                    reached += 1;
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    missed.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            },
            Subscriber::Remote { queue, state } => {
                if state.is_gone() {
                    expired += u64::from(state.has_expired());
                    return false;
                }
                match queue.try_send(value.clone()) {
                    Ok(()) => {
                        reached += 1;
                        true
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        skipped += 1;
                        true
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        expired += u64::from(state.has_expired());
                        false
                    }
                }
            }
        });
        self.expired += expired;
        self.skipped += skipped;
        reached
    }

    /// Forgets the subscribers that have gone (rules 5 and 6) without
    /// notifying anyone.
    pub fn prune(&mut self) {
        let mut expired = 0;
        self.subscribers.retain(|(_, subscriber)| {
            let gone = subscriber.is_gone();
            expired += u64::from(gone && subscriber.has_expired());
            !gone
        });
        self.expired += expired;
    }

    /// Subscribers that have not gone.
    pub fn len(&self) -> usize {
        self.subscribers
            .iter()
            .filter(|(_, subscriber)| !subscriber.is_gone())
            .count()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Subscribers dropped because their silo stayed unreachable for the
    /// expiry (rule 6), since these observers were made.
    pub fn expired(&self) -> u64 {
        self.expired
            + self
                .subscribers
                .iter()
                .filter(|(_, subscriber)| subscriber.is_gone() && subscriber.has_expired())
                .count() as u64
    }

    /// Notifications skipped because the queue to a subscriber on another
    /// silo was full (rule 4).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }
}

/// One subscriber's end: notifications in the order the grain sent them.
pub struct Subscription<T> {
    receiver: mpsc::Receiver<T>,
    missed: Arc<AtomicU64>,
    /// Removes the endpoint of an observed subscription when dropped.
    _endpoint: Option<EndpointGuard>,
}

impl<T> fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("missed", &self.missed())
            .finish_non_exhaustive()
    }
}

impl<T> Subscription<T> {
    /// The next notification; `None` once every sender is gone (for a
    /// subscription handed out by [`Observers::subscribe`], when the
    /// grain's observer list is gone) and everything was read. An
    /// observed subscription (`Silo::observe`) stays open while it lives
    /// (rule 7).
    pub async fn next(&mut self) -> Option<T> {
        self.receiver.recv().await
    }

    /// The next notification if one is waiting.
    pub fn try_next(&mut self) -> Option<T> {
        self.receiver.try_recv().ok()
    }

    /// Notifications skipped because this subscriber's channel was full.
    pub fn missed(&self) -> u64 {
        self.missed.load(Ordering::Relaxed)
    }
}
