//! Observers: a grain notifies its subscribers, for example with a stream
//! of results.
//!
//! A grain keeps an [`Observers<T>`] and hands out a [`Subscription<T>`]
//! from a handler (a subscribe message whose reply is the subscription).
//! Each subscriber has its own bounded channel, so a slow subscriber never
//! slows the grain or the others: a notification that finds a
//! subscriber's channel full is skipped for that subscriber and counted in
//! its [`Subscription::missed`]. Dropping a subscription unsubscribes.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

struct Subscriber<T> {
    sender: mpsc::Sender<T>,
    missed: Arc<AtomicU64>,
}

/// A grain's subscribers.
pub struct Observers<T> {
    subscribers: Vec<Subscriber<T>>,
    /// Notifications each subscriber may hold unread, at least 1.
    capacity: usize,
}

impl<T> fmt::Debug for Observers<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observers")
            .field("subscribers", &self.subscribers.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl<T: Clone + Send + 'static> Observers<T> {
    /// No subscribers yet; each will hold up to `capacity` unread
    /// notifications (at least 1).
    pub fn new(capacity: usize) -> Observers<T> {
        Observers {
            subscribers: Vec::new(),
            capacity: capacity.max(1),
        }
    }

    /// A new subscriber; it sees every notification from now on.
    pub fn subscribe(&mut self) -> Subscription<T> {
        let (sender, receiver) = mpsc::channel(self.capacity);
        let missed = Arc::new(AtomicU64::new(0));
        self.subscribers.push(Subscriber {
            sender,
            missed: missed.clone(),
        });
        Subscription { receiver, missed }
    }

    /// Sends `value` to every subscriber, dropping those that have gone.
    /// Returns how many it reached.
    pub fn notify(&mut self, value: &T) -> usize {
        let mut reached = 0;
        self.subscribers.retain(
            |subscriber| match subscriber.sender.try_send(value.clone()) {
                Ok(()) => {
                    reached += 1;
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    subscriber.missed.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            },
        );
        reached
    }

    /// Subscribers now (after the last `notify` dropped those gone).
    pub fn len(&self) -> usize {
        self.subscribers.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.subscribers.is_empty()
    }
}

/// One subscriber's end: notifications in the order the grain sent them.
pub struct Subscription<T> {
    receiver: mpsc::Receiver<T>,
    missed: Arc<AtomicU64>,
}

impl<T> fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("missed", &self.missed())
            .finish_non_exhaustive()
    }
}

impl<T> Subscription<T> {
    /// The next notification; `None` once the grain's observer list is
    /// gone (its activation ended) and everything was read.
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
