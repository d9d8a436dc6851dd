//! Building a silo: `SiloConfig` (the settings behind rules 4 and 5 of the
//! silo's protocol, `silo/mod.rs`) and `SiloBuilder`, which registers grain
//! types by stable name (stateless workers: rule 9), reminders, messages by
//! name, services and storage, and builds the silo.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use dashmap::DashMap;
use tokio_util::task::TaskTracker;

use super::registry::{Entry, GrainType};
use super::{Silo, SiloInner};
use crate::error::SiloError;
use crate::grain::{Grain, Handler, Message, NamedMessage, ReadHandler, Service, service_key};
use crate::mailbox;
use crate::storage::{MemoryStorage, StorageProvider};

/// The longest grain type name, in bytes: a cluster's directory refuses
/// longer ones, so a grain type with one could not be called from another
/// silo.
pub const MAX_GRAIN_TYPE_NAME: usize = 256;

/// Why `name` cannot name a grain type, if it cannot: it is empty, longer
/// than [`MAX_GRAIN_TYPE_NAME`], or in a namespace the runtime keeps for
/// itself: `$` (the readiness probe's `$health` record, and the cluster's
/// own services, `$directory`, `$migration`, `$observers` and
/// `$reminders`, to which a request for such a type would go instead of
/// the grain) and `granary.` (records such as the legacy reminder record,
/// `granary.reminders`, which a grain of that name would share).
/// `#[derive(GrainType)]` refuses the same names when the crate compiles.
pub fn grain_type_name_error(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("a grain type name is empty".into())
    } else if name.len() > MAX_GRAIN_TYPE_NAME {
        Some(format!(
            "a grain type name of {} bytes; at most {MAX_GRAIN_TYPE_NAME}",
            name.len()
        ))
    } else if name.starts_with('$') || name.starts_with("granary.") {
        Some(format!(
            "grain type name {name:?}: names starting with `$` or `granary.` are the runtime's own"
        ))
    } else {
        None
    }
}

/// How a silo is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiloConfig {
    /// Messages an activation's mailbox holds, from 1 to `u32::MAX`
    /// (default 1024): the mailbox counts its slots in a `u32`.
    pub mailbox_capacity: usize,
    /// How long a call waits for its answer (default 30 s).
    pub call_timeout: Duration,
    /// How long an activation may sit idle before it is deactivated
    /// (default 15 minutes).
    pub idle_timeout: Duration,
    /// Memory pressure, as a number of activations: while more are alive,
    /// activations idle through at least one of the idle collector's
    /// periods (a quarter of `idle_timeout`, at most a second) are
    /// deactivated early (default: no limit).
    pub max_activations: Option<u64>,
    /// The most activations the silo holds at once (default: no limit): a
    /// call that would start one more is refused with
    /// [`CallError::Overloaded`](crate::CallError::Overloaded), its message
    /// not handled, while the activations already there serve on. Set it
    /// above `max_activations`, so that idle activations are shed before
    /// calls are refused.
    pub activation_limit: Option<u64>,
    /// How long a grain state operation (read, write, clear), or an
    /// operation on one reminder row (six times as long for a whole-table
    /// read or a batch), may wait for the storage provider before it fails
    /// with
    /// [`StorageError::Timeout`](crate::StorageError::Timeout) (default
    /// 10 s): a storage server that stops answering fails calls rather than
    /// holding their activations (or reminder rounds, or a shutdown)
    /// forever.
    pub storage_timeout: Duration,
}

impl Default for SiloConfig {
    fn default() -> SiloConfig {
        SiloConfig {
            mailbox_capacity: 1024,
            call_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(15 * 60),
            max_activations: None,
            activation_limit: None,
            storage_timeout: Duration::from_secs(10),
        }
    }
}

/// Builds a [`Silo`]: grain types under stable names, the messages that
/// may travel between silos, services, storage and settings. Mistakes in
/// registration are refused by `build`, not at the first call.
///
/// A grain type declares its name and the messages it accepts by name
/// once, with `#[derive(GrainType)]` and `#[derive(Message)]`, and
/// [`host`](SiloBuilder::host) registers it in one line: the documented
/// way. [`register`](SiloBuilder::register),
/// [`message`](SiloBuilder::message) and
/// [`read_message`](SiloBuilder::read_message) are the explicit form, for
/// types that do not implement [`GrainType`](crate::GrainType).
///
/// ```
/// use std::sync::Arc;
/// use granary_actors::{
///     Grain, GrainContext, GrainKey, GrainType, Handler, MemoryStorage, Message, Silo,
///     SiloConfig, SiloError,
/// };
/// use serde::{Deserialize, Serialize};
///
/// #[derive(GrainType)]
/// #[grain(name = "account", messages(Deposit))]
/// struct Account(i64);
/// impl Grain for Account {
///     fn new(_: &GrainKey) -> Account {
///         Account(0)
///     }
/// }
/// #[derive(Message, Serialize, Deserialize)]
/// #[message(reply = i64, name = "deposit")]
/// struct Deposit(i64);
/// impl Handler<Deposit> for Account {
///     async fn handle(&mut self, Deposit(n): Deposit, _: &mut GrainContext) -> i64 {
///         self.0 += n;
///         self.0
///     }
/// }
///
/// let silo = Silo::builder()
///     .host::<Account>() // "account", taking "deposit" from other silos
///     .storage(Arc::new(MemoryStorage::new()))
///     .config(SiloConfig::default())
///     .build()?;
/// assert_eq!(silo.grain_type_name::<Account>(), Some("account"));
///
/// // The explicit form registers the same names; a name registered twice
/// // is refused when the silo is built.
/// let twice = Silo::builder()
///     .register::<Account>("account")
///     .message::<Account, Deposit>("deposit")
///     .message::<Account, Deposit>("deposit")
///     .build();
/// assert!(matches!(twice, Err(SiloError::DuplicateMessage { .. })));
/// # Ok::<(), SiloError>(())
/// ```
pub struct SiloBuilder {
    types: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
    names: HashMap<String, TypeId>,
    /// A name registered twice, reported by `build`.
    duplicate: Option<String>,
    /// An invalid registration, reported by `build`.
    invalid: Option<String>,
    /// Remindable grain types, by registered name.
    remindable: HashMap<String, crate::reminders::Dispatch>,
    /// How often the reminder service rescans the table.
    reminder_rescan: Duration,
    services: HashMap<TypeId, Service>,
    storage: Arc<dyn StorageProvider>,
    config: SiloConfig,
    /// Per registered type, wakes its activations (for `shutdown`).
    wake_activations: Vec<Box<dyn Fn() + Send + Sync>>,
    /// Per grain type, its statistics now (`stats.rs`).
    type_stats: Vec<Box<dyn Fn() -> super::stats::GrainTypeStats + Send + Sync>>,
    /// Per grain type, what the idle collector sweeps (`collector.rs`).
    collected: Vec<Arc<dyn super::collector::Collect>>,
    /// Grain types and messages by name, for dispatch from the network.
    registry: crate::dispatch::Registry,
    /// A message name registered twice for one grain type, reported by
    /// `build`.
    duplicate_message: Option<(String, String)>,
}

impl fmt::Debug for SiloBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiloBuilder")
            .field("grain_types", &self.names.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Default for SiloBuilder {
    fn default() -> SiloBuilder {
        SiloBuilder::new()
    }
}

impl SiloBuilder {
    /// A silo with no grain types, in-memory storage and default settings.
    pub fn new() -> SiloBuilder {
        SiloBuilder {
            types: HashMap::new(),
            names: HashMap::new(),
            duplicate: None,
            invalid: None,
            remindable: HashMap::new(),
            reminder_rescan: crate::reminders::DEFAULT_RESCAN,
            services: HashMap::new(),
            storage: Arc::new(MemoryStorage::new()),
            config: SiloConfig::default(),
            wake_activations: Vec::new(),
            type_stats: Vec::new(),
            collected: Vec::new(),
            registry: crate::dispatch::Registry::default(),
            duplicate_message: None,
        }
    }

    /// Registers grain type `G` as it declares itself ([`GrainType`]):
    /// under its stable name, as a stateless worker if it is one, with the
    /// messages and reads it accepts by name, and as remindable if it is.
    /// The documented way to register a grain type: one line per type, no
    /// name written twice, every message checked when the crate compiles
    /// (see `#[derive(GrainType)]`). What only the whole silo can see, a
    /// name taken by two grain types or a type hosted twice, is refused by
    /// [`SiloBuilder::build`].
    ///
    /// [`GrainType`]: crate::GrainType
    ///
    /// ```
    /// use granary_actors::{
    ///     Grain, GrainContext, GrainKey, GrainType, Handler, Message, Silo, SiloError,
    /// };
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(GrainType)]
    /// #[grain(name = "account", messages(Deposit))]
    /// struct Account(i64);
    /// impl Grain for Account {
    ///     fn new(_: &GrainKey) -> Account {
    ///         Account(0)
    ///     }
    /// }
    ///
    /// #[derive(Message, Serialize, Deserialize)]
    /// #[message(reply = i64, name = "deposit")]
    /// struct Deposit(i64);
    /// impl Handler<Deposit> for Account {
    ///     async fn handle(&mut self, Deposit(n): Deposit, _: &mut GrainContext) -> i64 {
    ///         self.0 += n;
    ///         self.0
    ///     }
    /// }
    ///
    /// #[derive(GrainType)]
    /// #[grain(name = "thumbnailer", stateless(max_workers = 4))]
    /// struct Thumbnailer;
    /// impl Grain for Thumbnailer {
    ///     fn new(_: &GrainKey) -> Thumbnailer {
    ///         Thumbnailer
    ///     }
    /// }
    ///
    /// let silo = Silo::builder().host::<Account>().host::<Thumbnailer>().build()?;
    /// assert_eq!(silo.message_name::<Account, Deposit>(), Some("deposit"));
    ///
    /// // A type hosted twice is refused when the silo is built.
    /// let twice = Silo::builder().host::<Account>().host::<Account>().build();
    /// assert!(matches!(twice, Err(SiloError::DuplicateName(name)) if name == "account"));
    /// # Ok::<(), SiloError>(())
    /// ```
    pub fn host<G: crate::GrainType>(self) -> SiloBuilder {
        let builder = match G::STATELESS {
            Some(max_workers) => self.register_stateless::<G>(G::NAME, max_workers),
            None => self.register::<G>(G::NAME),
        };
        G::accepts(Registration {
            builder,
            grain: PhantomData,
        })
        .builder
    }

    /// Registers grain type `G` under the stable `name`: the explicit form
    /// of [`SiloBuilder::host`], for a type that does not implement
    /// [`GrainType`](crate::GrainType).
    pub fn register<G: Grain>(self, name: &str) -> SiloBuilder {
        self.register_with_workers::<G>(name, 1, false)
    }

    /// Registers `G` as a stateless worker under `name`: each key may have
    /// up to `max_workers` activations at once, and a message goes to an
    /// idle one, or starts another, or else queues where there is most
    /// room (rule 9). For throughput-bound grains without state.
    pub fn register_stateless<G: Grain>(self, name: &str, max_workers: usize) -> SiloBuilder {
        if max_workers == 0 {
            let mut builder = self;
            builder
                .invalid
                .get_or_insert_with(|| format!("{name}: max_workers is 0"));
            return builder;
        }
        self.register_with_workers::<G>(name, max_workers, true)
    }

    fn register_with_workers<G: Grain>(
        mut self,
        name: &str,
        workers: usize,
        stateless: bool,
    ) -> SiloBuilder {
        if let Some(why) = grain_type_name_error(name) {
            self.invalid.get_or_insert(why);
        }
        if self.types.contains_key(&TypeId::of::<G>()) {
            self.invalid.get_or_insert_with(|| {
                format!(
                    "{} is registered under two names",
                    std::any::type_name::<G>()
                )
            });
        }
        if self
            .names
            .insert(name.to_string(), TypeId::of::<G>())
            .is_some()
        {
            self.duplicate.get_or_insert_with(|| name.to_string());
        }
        let registered: Arc<GrainType<G>> = Arc::new(GrainType {
            name: name.into(),
            directory: DashMap::new(),
            workers,
            stateless,
            leased: DashMap::new(),
            stats: super::stats::TypeStats::default(),
            migration: std::sync::OnceLock::new(),
        });
        if stateless {
            self.registry.stateless.insert(name.to_string());
        }
        self.registry.handles.entry(name.to_string()).or_default();
        self.registry
            .type_names
            .insert(TypeId::of::<G>(), name.to_string());
        self.registry
            .deactivators
            .insert(name.to_string(), crate::dispatch::deactivator::<G>());
        self.registry
            .activity
            .insert(name.to_string(), crate::dispatch::activity::<G>());
        self.collected.push(registered.clone());
        let counted = registered.clone();
        self.type_stats.push(Box::new(move || counted.stats_now()));
        let directory = registered.clone();
        self.wake_activations.push(Box::new(move || {
            for slots in directory.directory.iter() {
                for slot in slots.iter() {
                    if let Some(Entry::Active(sender)) = slot {
                        sender.wake_receiver();
                    }
                }
            }
        }));
        self.types.insert(TypeId::of::<G>(), registered);
        self
    }

    /// Lets grain type `G`, already registered, move to another silo with
    /// its in-memory state (`migration.rs`): `GrainRef::migrate`,
    /// `GrainContext::migrate`, and a cluster's rebalancing and drain. A
    /// stateless worker never moves (it is local to each silo), and is
    /// refused by [`SiloBuilder::build`].
    pub fn migratable<G: crate::migration::Migratable>(mut self) -> SiloBuilder {
        let registered = self
            .types
            .get(&TypeId::of::<G>())
            .and_then(|registered| registered.clone().downcast::<GrainType<G>>().ok());
        let Some(registered) = registered else {
            self.invalid.get_or_insert_with(|| {
                format!(
                    "{} is made migratable before it is registered",
                    std::any::type_name::<G>()
                )
            });
            return self;
        };
        if registered.stateless {
            self.invalid.get_or_insert_with(|| {
                format!(
                    "{}: a stateless worker cannot be migratable",
                    registered.name
                )
            });
            return self;
        }
        let _ = registered.migration.set(crate::migration::Hooks::of());
        let depart: crate::migration::Depart = Arc::new(|silo: &Silo, key| {
            let silo = silo.clone();
            Box::pin(async move { silo.depart::<G>(key).await })
        });
        let arrive: crate::migration::Arrive = Arc::new(|silo: &Silo, key, state| {
            let silo = silo.clone();
            Box::pin(async move { silo.arrive::<G>(key, state).await })
        });
        let pause: crate::migration::Pause = Arc::new(|silo: &Silo, key| {
            let silo = silo.clone();
            Box::pin(async move { silo.pause::<G>(key).await })
        });
        self.registry.migrants.insert(
            registered.name.to_string(),
            crate::migration::Migrant {
                depart,
                arrive,
                pause,
            },
        );
        self
    }

    /// Lets grain type `G`, already registered, hold reminders: it handles
    /// [`ReminderFired`](crate::ReminderFired), and the silo runs a
    /// reminder service that fires them, across restarts (see
    /// `reminders.rs`). `ReminderFired` is registered as `G`'s message
    /// [`REMINDER_FIRED`](crate::REMINDER_FIRED), so it reaches a grain
    /// whose home is another silo. A silo with remindable types must be
    /// built inside a tokio runtime, over storage that keeps a reminder
    /// table.
    pub fn remindable<G: Handler<crate::reminders::ReminderFired>>(mut self) -> SiloBuilder {
        match self
            .names
            .iter()
            .find(|(_, id)| **id == TypeId::of::<G>())
            .map(|(name, _)| name.clone())
        {
            Some(name) => {
                if self
                    .remindable
                    .insert(name, crate::reminders::dispatcher::<G>())
                    .is_none()
                {
                    return self.message::<G, crate::reminders::ReminderFired>(
                        crate::reminders::REMINDER_FIRED,
                    );
                }
            }
            None => {
                self.invalid.get_or_insert_with(|| {
                    format!(
                        "{} is made remindable before it is registered",
                        std::any::type_name::<G>()
                    )
                });
            }
        }
        self
    }

    /// Sets how often the reminder service rereads the whole reminder
    /// table and keeps the rows this silo owns: a safety net for a lost
    /// `ReminderPlacement::notify_owner` (rule 2 of `reminders.rs`). More
    /// than zero; the default is 30 s.
    pub fn reminder_rescan(mut self, every: Duration) -> SiloBuilder {
        self.reminder_rescan = every;
        self
    }

    /// Registers message type `M` of grain type `G`, already registered,
    /// under the stable `name` (the explicit form of what
    /// [`Registration::message`] does for a hosted type): a message that arrives by name (from
    /// another silo, through `Silo::call_named`) is decoded from the wire
    /// form and handled as a local call would be, and a grain reference on
    /// a routed silo sends `M` under this name to a home on another silo
    /// (see `dispatch.rs` and `route.rs`). Names are per grain type.
    pub fn message<G, M>(self, name: &str) -> SiloBuilder
    where
        G: Handler<M>,
        M: Message + serde::Serialize + serde::de::DeserializeOwned,
        M::Reply: serde::Serialize + serde::de::DeserializeOwned,
    {
        self.add_message::<G, M>(
            name,
            crate::dispatch::handle::<G, M>(),
            crate::dispatch::Kind::Call,
        )
    }

    /// Registers read-only message type `M` of grain type `G` (handled by
    /// `ReadHandler::handle_read`, interleaved with other reads) under the
    /// stable `name`, as [`SiloBuilder::message`] does for writes: a read
    /// travels between silos as a read.
    pub fn read_message<G, M>(self, name: &str) -> SiloBuilder
    where
        G: crate::grain::ReadHandler<M>,
        M: Message + serde::Serialize + serde::de::DeserializeOwned,
        M::Reply: serde::Serialize + serde::de::DeserializeOwned,
    {
        self.add_message::<G, M>(
            name,
            crate::dispatch::read_handle::<G, M>(),
            crate::dispatch::Kind::Read,
        )
    }

    fn add_message<G, M>(
        mut self,
        name: &str,
        handle: crate::dispatch::Handle,
        kind: crate::dispatch::Kind,
    ) -> SiloBuilder
    where
        G: Grain,
        M: Message + serde::Serialize,
        M::Reply: serde::de::DeserializeOwned,
    {
        let Some(grain_type) = self.registry.type_names.get(&TypeId::of::<G>()).cloned() else {
            self.invalid.get_or_insert_with(|| {
                format!(
                    "message {name:?} is registered for {} before the grain type is",
                    std::any::type_name::<G>()
                )
            });
            return self;
        };
        let (handles, codecs) = match kind {
            crate::dispatch::Kind::Read => (
                &mut self.registry.read_handles,
                &mut self.registry.read_codecs,
            ),
            crate::dispatch::Kind::Call | crate::dispatch::Kind::Tell => {
                (&mut self.registry.handles, &mut self.registry.codecs)
            }
        };
        let messages = handles.entry(grain_type.clone()).or_default();
        if messages.insert(name.to_string(), handle).is_some() {
            self.duplicate_message
                .get_or_insert_with(|| (grain_type, name.to_string()));
        }
        codecs.insert(
            (TypeId::of::<G>(), TypeId::of::<M>()),
            crate::dispatch::codec::<M>(name),
        );
        self
    }

    /// Registers a service that grains reach with
    /// `GrainContext::service::<S>()` (the GPU bridge, for example). The
    /// silo shares it: keep a clone of the `Arc` to use it outside grains.
    pub fn service<S: Send + Sync + 'static>(mut self, service: Arc<S>) -> SiloBuilder {
        self.services.insert(service_key::<S>(), service);
        self
    }

    /// Sets the storage provider for grain state.
    pub fn storage(mut self, storage: Arc<dyn StorageProvider>) -> SiloBuilder {
        self.storage = storage;
        self
    }

    /// Changes the silo's settings in place, keeping those not touched
    /// (what [`config`](Self::config) replaces whole).
    pub fn configure(mut self, change: impl FnOnce(&mut SiloConfig)) -> SiloBuilder {
        change(&mut self.config);
        self
    }

    /// Sets the configuration.
    pub fn config(mut self, config: SiloConfig) -> SiloBuilder {
        self.config = config;
        self
    }

    /// Builds the silo. Nothing is activated yet.
    pub fn build(self) -> Result<Silo, SiloError> {
        if let Some(duplicate) = self.duplicate {
            return Err(SiloError::DuplicateName(duplicate));
        }
        if let Some((grain_type, message)) = self.duplicate_message {
            return Err(SiloError::DuplicateMessage {
                grain_type,
                message,
            });
        }
        if let Some(invalid) = self.invalid {
            return Err(SiloError::InvalidConfig(invalid));
        }
        if self.config.mailbox_capacity == 0 {
            return Err(SiloError::InvalidConfig("mailbox_capacity is 0".into()));
        }
        if u32::try_from(self.config.mailbox_capacity).is_err() {
            return Err(SiloError::InvalidConfig(format!(
                "mailbox_capacity is {}; at most {}",
                self.config.mailbox_capacity,
                u32::MAX
            )));
        }
        if self.reminder_rescan.is_zero() {
            return Err(SiloError::InvalidConfig("reminder_rescan is 0".into()));
        }
        if self.config.storage_timeout.is_zero() {
            return Err(SiloError::InvalidConfig("storage_timeout is 0".into()));
        }
        match (self.config.activation_limit, self.config.max_activations) {
            (Some(0), _) => {
                return Err(SiloError::InvalidConfig("activation_limit is 0".into()));
            }
            (Some(limit), Some(shed)) if limit < shed => {
                return Err(SiloError::InvalidConfig(format!(
                    "activation_limit {limit} is below max_activations {shed}: idle \
                     activations would never be shed before calls are refused"
                )));
            }
            _ => {}
        }
        let shutdown = tokio_util::sync::CancellationToken::new();
        // Every state operation counted (`storage/counted.rs`).
        let storage = Arc::new(crate::storage::CountedStorage::new(
            self.storage,
            self.config.storage_timeout,
        ));
        let reminders = Arc::new(crate::reminders::Reminders::new(
            self.remindable,
            storage.clone(),
            self.reminder_rescan,
        ));
        if !reminders.is_empty() && storage.reminder_table().is_none() {
            return Err(SiloError::InvalidConfig(format!(
                "grain types {:?} are remindable, but the storage provider keeps no reminder table \
                 (StorageProvider::reminder_table)",
                reminders.remindable_types()
            )));
        }
        let runtime = if reminders.is_empty() {
            None
        } else {
            Some(tokio::runtime::Handle::try_current().map_err(|_| {
                SiloError::InvalidConfig(
                    "a silo with remindable grains must be built inside a tokio runtime".into(),
                )
            })?)
        };
        let silo = Silo {
            inner: Arc::new(SiloInner {
                types: self.types,
                services: self.services,
                storage,
                config: self.config,
                tasks: TaskTracker::new(),
                shutdown,
                shutting_down: AtomicBool::new(false),
                stopped: AtomicBool::new(false),
                wake_activations: self.wake_activations,
                type_stats: self.type_stats,
                registry: self.registry,
                activations: AtomicU64::new(0),
                live: AtomicU64::new(0),
                sweeper: mailbox::Sweeper::new(mailbox::Sweeper::tick_for(
                    self.config.call_timeout,
                )),
                reminders: reminders.clone(),
                router: arc_swap::ArcSwapOption::empty(),
                routed: AtomicBool::new(false),
                ended: std::sync::Mutex::new(None),
                listeners_set: AtomicU64::new(0),
                observers: crate::observers::Endpoints::new(),
                homes_given_up: AtomicU64::new(0),
                dropped_with_homes: AtomicU64::new(0),
                provided: std::sync::RwLock::new(HashMap::new()),
                collected: self.collected,
                sweep: AtomicU64::new(0),
                collecting: AtomicBool::new(false),
                shedding: Arc::new(AtomicU64::new(0)),
                ending: AtomicU64::new(0),
            }),
        };
        if let Some(runtime) = runtime {
            // The service holds the silo weakly: a silo dropped without a
            // shutdown does not live on for its reminders. Its firing
            // rounds are tracked with the activations, so a shutdown waits
            // for their writes.
            let weak = Arc::downgrade(&silo.inner);
            let stop = silo.inner.shutdown.clone();
            let rounds = silo.inner.tasks.clone();
            let service = async move {
                let Some(inner) = weak.upgrade() else { return };
                let reminders = inner.reminders.clone();
                drop(inner);
                reminders.run(weak, stop, rounds).await;
            };
            runtime.spawn(silo.inner.tasks.track_future(service));
        }
        Ok(silo)
    }
}

/// The messages a hosted grain type `G` accepts by name, registered from
/// [`GrainType::accepts`](crate::GrainType::accepts) (which
/// `#[derive(GrainType)]` writes). Each method's bounds are the checks:
/// a message `G` does not handle, one without a [`NamedMessage`] name, or
/// one that does not serialise with its reply does not compile.
pub struct Registration<G> {
    builder: SiloBuilder,
    grain: PhantomData<fn() -> G>,
}

impl<G> fmt::Debug for Registration<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("grain_type", &std::any::type_name::<G>())
            .finish_non_exhaustive()
    }
}

impl<G: Grain> Registration<G> {
    /// `G` accepts message `M` by its name, [`NamedMessage::NAME`], as
    /// [`SiloBuilder::message`] registers it: from another silo, through
    /// `Silo::call_named`, and sent under that name by a grain reference
    /// whose grain lives on another silo.
    pub fn message<M>(mut self) -> Registration<G>
    where
        G: Handler<M>,
        M: NamedMessage + serde::Serialize + serde::de::DeserializeOwned,
        M::Reply: serde::Serialize + serde::de::DeserializeOwned,
    {
        self.builder = self.builder.message::<G, M>(M::NAME);
        self
    }

    /// `G` accepts read-only message `M` by its name, as
    /// [`SiloBuilder::read_message`] registers it: a read travels between
    /// silos as a read.
    pub fn read<M>(mut self) -> Registration<G>
    where
        G: ReadHandler<M>,
        M: NamedMessage + serde::Serialize + serde::de::DeserializeOwned,
        M::Reply: serde::Serialize + serde::de::DeserializeOwned,
    {
        self.builder = self.builder.read_message::<G, M>(M::NAME);
        self
    }

    /// `G` moves between silos with its state, as
    /// [`SiloBuilder::migratable`] makes it.
    pub fn migratable(mut self) -> Registration<G>
    where
        G: crate::migration::Migratable,
    {
        self.builder = self.builder.migratable::<G>();
        self
    }

    /// `G` holds reminders, as [`SiloBuilder::remindable`] makes it.
    pub fn remindable(mut self) -> Registration<G>
    where
        G: Handler<crate::reminders::ReminderFired>,
    {
        self.builder = self.builder.remindable::<G>();
        self
    }
}
