//! The subscriber's side (rules 2, 3 and 5 of `observers/mod.rs`): the
//! endpoints a silo keeps for its subscribers, the serialisable
//! [`ObserverRef`] to one, and what becomes of a notification that
//! arrives for one.

use std::any::Any;
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use dashmap::DashMap;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{AddObserverError, Subscription};
use crate::route::HomeSide;
use crate::silo::{Silo, SiloInner};

/// A serialisable reference to one subscriber: its silo's place and its
/// endpoint there (rule 2). Send it to a grain in a message; the grain
/// keeps it with [`Observers::add`](super::Observers::add).
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct ObserverRef<T> {
    place: String,
    endpoint: u64,
    /// The Rust type the endpoint takes (rule 5).
    type_name: String,
    #[serde(skip)]
    _values: PhantomData<fn(T) -> T>,
}

impl<T> ObserverRef<T> {
    /// The subscriber's silo, as its router names it (or, on a silo
    /// outside any cluster, a name of its own).
    pub fn place(&self) -> &str {
        &self.place
    }

    /// The endpoint's number on that silo.
    pub fn endpoint(&self) -> u64 {
        self.endpoint
    }

    /// The Rust type the subscriber takes.
    pub fn type_name(&self) -> &str {
        &self.type_name
    }
}

impl<T> Clone for ObserverRef<T> {
    fn clone(&self) -> ObserverRef<T> {
        ObserverRef {
            place: self.place.clone(),
            endpoint: self.endpoint,
            type_name: self.type_name.clone(),
            _values: PhantomData,
        }
    }
}

impl<T> PartialEq for ObserverRef<T> {
    fn eq(&self, other: &ObserverRef<T>) -> bool {
        self.place == other.place && self.endpoint == other.endpoint
    }
}

impl<T> Eq for ObserverRef<T> {}

impl<T> fmt::Debug for ObserverRef<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObserverRef")
            .field("place", &self.place)
            .field("endpoint", &self.endpoint)
            .field("type_name", &self.type_name)
            .finish()
    }
}

/// What became of one notification at its subscriber's silo (rules 4
/// and 5): the answer that silo sends back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Observed {
    /// Put in the subscriber's channel.
    Delivered,
    /// The subscriber's channel was full: skipped, counted in its
    /// `Subscription::missed`.
    Full,
    /// No such subscriber there (its subscription was dropped, or it was
    /// made by an earlier start of that silo), or it takes another type.
    Gone,
}

/// A notification could not reach its subscriber's silo (rule 6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObserverUnreachable {
    /// The subscriber's silo.
    pub place: String,
    /// Why.
    pub reason: String,
}

impl fmt::Display for ObserverUnreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "silo {} is unreachable: {}", self.place, self.reason)
    }
}

impl std::error::Error for ObserverUnreachable {}

/// One subscriber's endpoint on its silo.
struct Endpoint {
    type_name: &'static str,
    /// The subscriber's channel and its count of misses, as a
    /// `LocalEnd<T>`, for a grain on this silo (rule 3).
    typed: Box<dyn Any + Send + Sync>,
    /// Decodes a notification from another silo and delivers it (rule 4).
    from_wire: FromWire,
}

/// Decodes a notification in its wire form and delivers it.
type FromWire = Box<dyn Fn(&[u8]) -> Observed + Send + Sync>;

struct LocalEnd<T> {
    sender: mpsc::Sender<T>,
    missed: Arc<AtomicU64>,
}

/// What a probe's type name starts with (rule 6): it asks whether a
/// subscriber is there without notifying it.
pub(crate) const PROBE: &str = "$probe:";

/// The endpoints a silo keeps for its subscribers.
pub(crate) struct Endpoints {
    /// This silo's place while no router names it.
    own_place: String,
    /// Numbers endpoints from a random start, so that a silo that restarts
    /// under the same place does not reuse its predecessor's numbers.
    next: AtomicU64,
    table: DashMap<u64, Endpoint>,
}

impl Endpoints {
    pub(crate) fn new() -> Endpoints {
        let start = crate::silo::random_u64();
        Endpoints {
            own_place: format!("silo-{start:016x}"),
            next: AtomicU64::new(start),
            table: DashMap::new(),
        }
    }

    /// Delivers a notification in its wire form to endpoint `number`; a
    /// probe (its type name prefixed with [`PROBE`]) only asks whether the
    /// endpoint is there, and delivers nothing.
    pub(crate) fn deliver(&self, number: u64, type_name: &str, payload: &[u8]) -> Observed {
        let (probe, type_name) = match type_name.strip_prefix(PROBE) {
            Some(type_name) => (true, type_name),
            None => (false, type_name),
        };
        match self.table.get(&number) {
            Some(endpoint) if endpoint.type_name == type_name => {
                if probe {
                    Observed::Delivered
                } else {
                    (endpoint.from_wire)(payload)
                }
            }
            _ => Observed::Gone,
        }
    }
}

/// Removes its endpoint from the silo when the subscription that holds it
/// is dropped (rule 2).
pub struct EndpointGuard {
    silo: Weak<SiloInner>,
    number: u64,
}

impl fmt::Debug for EndpointGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointGuard")
            .field("number", &self.number)
            .finish_non_exhaustive()
    }
}

impl Drop for EndpointGuard {
    fn drop(&mut self) {
        if let Some(silo) = self.silo.upgrade() {
            Silo::from_inner(silo)
                .endpoints()
                .table
                .remove(&self.number);
        }
    }
}

impl Silo {
    /// Makes a subscriber on this silo (rule 2): its subscription, and a
    /// serialisable reference to hand to a grain anywhere in the cluster,
    /// which keeps it with [`Observers::add`](super::Observers::add).
    /// The subscription holds up to `capacity` unread notifications (at
    /// least 1); dropping it ends the subscription. On a clustered silo,
    /// make references once the node has started: the reference names the
    /// silo as its router does.
    pub fn observe<T>(&self, capacity: usize) -> (ObserverRef<T>, Subscription<T>)
    where
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        let missed = Arc::new(AtomicU64::new(0));
        let endpoints = self.endpoints();
        let number = endpoints.next.fetch_add(1, Ordering::Relaxed);
        let (wire_sender, wire_missed) = (sender.clone(), missed.clone());
        let from_wire = move |payload: &[u8]| match postcard::from_bytes::<T>(payload) {
            Ok(value) => match wire_sender.try_send(value) {
                Ok(()) => Observed::Delivered,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    wire_missed.fetch_add(1, Ordering::Relaxed);
                    Observed::Full
                }
                Err(mpsc::error::TrySendError::Closed(_)) => Observed::Gone,
            },
            Err(err) => {
                tracing::debug!(endpoint = number, error = %err, "a notification did not decode");
                Observed::Gone
            }
        };
        endpoints.table.insert(
            number,
            Endpoint {
                type_name: std::any::type_name::<T>(),
                typed: Box::new(LocalEnd {
                    sender,
                    missed: missed.clone(),
                }),
                from_wire: Box::new(from_wire),
            },
        );
        let reference = ObserverRef {
            place: self.observer_place(),
            endpoint: number,
            type_name: std::any::type_name::<T>().to_string(),
            _values: PhantomData,
        };
        let subscription = Subscription {
            receiver,
            missed,
            _endpoint: Some(EndpointGuard {
                silo: self.downgrade(),
                number,
            }),
        };
        (reference, subscription)
    }

    /// This silo's place in observer references: as its router names it,
    /// or a name of its own outside a cluster.
    pub fn observer_place(&self) -> String {
        self.router()
            .and_then(|router| router.place())
            .unwrap_or_else(|| self.endpoints().own_place.clone())
    }

    /// Whether `place` is this silo (rule 3).
    pub(crate) fn is_observer_place_here(&self, place: &str) -> bool {
        place == self.endpoints().own_place
            || self
                .router()
                .and_then(|router| router.place())
                .is_some_and(|here| here == place)
    }

    /// The channel of endpoint `observer` on this silo (rule 3).
    pub(crate) fn local_endpoint<T: Send + 'static>(
        &self,
        observer: &ObserverRef<T>,
    ) -> Result<(mpsc::Sender<T>, Arc<AtomicU64>), AddObserverError> {
        let endpoint = self
            .endpoints()
            .table
            .get(&observer.endpoint)
            .ok_or(AddObserverError::Gone)?;
        match endpoint.typed.downcast_ref::<LocalEnd<T>>() {
            Some(end) => Ok((end.sender.clone(), end.missed.clone())),
            None => Err(AddObserverError::WrongType {
                expected: std::any::type_name::<T>(),
                found: endpoint.type_name.to_string(),
            }),
        }
    }

    /// Sends a notification in its wire form to its subscriber (rule 4):
    /// here directly, elsewhere through the router.
    pub(crate) async fn send_observation(
        &self,
        place: &str,
        endpoint: u64,
        type_name: &str,
        payload: Vec<u8>,
    ) -> Result<Observed, ObserverUnreachable> {
        if self.is_observer_place_here(place) {
            return Ok(self.endpoints().deliver(endpoint, type_name, &payload));
        }
        match self.router() {
            Some(router) => router.observe(place, endpoint, type_name, payload).await,
            None => Err(ObserverUnreachable {
                place: place.to_string(),
                reason: "this silo is in no cluster".to_string(),
            }),
        }
    }

    /// Whether the silo at `place` is still a member, as far as this
    /// silo's router knows (rule 6).
    pub(crate) fn is_observer_place_present(&self, place: &str) -> bool {
        self.is_observer_place_here(place)
            || self.router().is_some_and(|router| router.is_present(place))
    }
}

impl HomeSide {
    /// Delivers a notification that arrived from another silo to endpoint
    /// `endpoint` here (rules 4 and 5), and says what became of it.
    pub fn observe(&self, endpoint: u64, type_name: &str, payload: &[u8]) -> Observed {
        self.silo()
            .endpoints()
            .deliver(endpoint, type_name, payload)
    }
}
