//! The counter the chaos suite (`tests/chaos`) drives: a persisted count
//! whose every answer says which activation gave it and which stored
//! versions it read and wrote, so that a history of calls shows whether two
//! activations accepted writes at once.
//!
//! # Rules
//!
//! 1. Storage is the truth. [`Add`] is a read-modify-write of the stored
//!    state under its ETag: it is acknowledged only once the write with the
//!    ETag this activation last read or wrote has succeeded.
//! 2. An activation whose write fails is fenced: the failure may be a
//!    conflict (another activation wrote since) or a write whose outcome is
//!    unknown (the storage server went away mid-write), and either way its
//!    ETag may be stale. It restores the state it had, accepts no write
//!    again, and asks its silo to deactivate it; the next call makes a new
//!    activation that reads the stored state afresh.
//! 3. [`Get`] reads the stored state rather than the activation's copy, so
//!    an activation that another has superseded (a split cluster can hold
//!    two for a while) never answers with a stale count. Finding a version
//!    other than its own fences the activation too (rule 2).

use std::sync::atomic::{AtomicU64, Ordering};

use granary_actors::{
    ActivationError, Grain, GrainContext, GrainKey, GrainType, Handler, Message, PersistentState,
};
use serde::{Deserialize, Serialize};

/// The name [`Counter`] is hosted under.
pub const COUNTER: &str = "counter";

/// A counter's persisted state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterState {
    /// The count.
    pub value: u64,
}

/// The persisted counter (see the module docs), hosted as `"counter"`,
/// taking [`Add`] and [`Get`] from other silos.
#[derive(GrainType)]
#[grain(name = "counter", messages(Add, Get))]
pub struct Counter {
    key: GrainKey,
    state: Option<PersistentState<CounterState>>,
    /// This activation's name, unique across processes and restarts.
    activation: String,
    /// Set once a write failed or another writer was seen (rule 2).
    fenced: bool,
}

/// Activations made by this process so far.
static ACTIVATIONS: AtomicU64 = AtomicU64::new(0);

impl Grain for Counter {
    fn new(key: &GrainKey) -> Counter {
        Counter {
            key: key.clone(),
            state: None,
            activation: String::new(),
            fenced: false,
        }
    }

    async fn on_activate(&mut self, ctx: &mut GrainContext) -> Result<(), ActivationError> {
        self.state = Some(ctx.load_state::<CounterState>().await?);
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos());
        self.activation = format!(
            "{}.{}.{since_epoch}",
            std::process::id(),
            ACTIVATIONS.fetch_add(1, Ordering::Relaxed)
        );
        Ok(())
    }
}

impl Counter {
    /// Rule 2: no more writes here; the silo deactivates this activation
    /// once it has run what its mailbox holds.
    fn fence(&mut self, ctx: &GrainContext) {
        if self.fenced {
            return;
        }
        self.fenced = true;
        let reference = ctx.silo().grain::<Counter>(self.key.clone());
        tokio::spawn(async move {
            if let Err(err) = reference.deactivate().await {
                tracing::debug!(error = %err, "a fenced counter could not ask to be deactivated");
            }
        });
    }
}

/// Adds `amount` to the count.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Message)]
#[message(name = "add", reply = Result<Added, String>)]
pub struct Add {
    /// What it adds.
    pub amount: u64,
}

/// A counter's answer to [`Add`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Added {
    /// The count after this add.
    pub value: u64,
    /// The stored version the add replaced (`None`: nothing was stored).
    pub replaced: Option<u64>,
    /// The stored version it wrote.
    pub written: u64,
    /// The activation that wrote it.
    pub activation: String,
}

impl Handler<Add> for Counter {
    async fn handle(&mut self, add: Add, ctx: &mut GrainContext) -> Result<Added, String> {
        if self.fenced {
            return Err(format!(
                "activation {} is fenced and deactivating",
                self.activation
            ));
        }
        let Some(state) = &mut self.state else {
            return Err("the counter is not active".into());
        };
        let before = *state.get();
        let replaced = state.etag();
        let value = before
            .value
            .checked_add(add.amount)
            .ok_or_else(|| format!("adding {} overflows the count", add.amount))?;
        state.get_mut().value = value;
        match state.write().await {
            Ok(()) => Ok(Added {
                value,
                replaced,
                written: state.etag().unwrap_or_default(),
                activation: self.activation.clone(),
            }),
            Err(err) => {
                *state.get_mut() = before;
                self.fence(ctx);
                Err(format!("the write failed, its outcome unknown: {err}"))
            }
        }
    }
}

/// Reads the stored count (rule 3).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Message)]
#[message(name = "get", reply = Result<Count, String>)]
pub struct Get;

/// A counter's answer to [`Get`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    /// The stored count.
    pub value: u64,
    /// Its stored version (`None`: nothing stored yet).
    pub version: Option<u64>,
    /// The activation that read it.
    pub activation: String,
}

impl Handler<Get> for Counter {
    async fn handle(&mut self, _: Get, ctx: &mut GrainContext) -> Result<Count, String> {
        let stored = ctx
            .load_state::<CounterState>()
            .await
            .map_err(|err| format!("reading the stored count: {err}"))?;
        if self.state.as_ref().map(PersistentState::etag) != Some(stored.etag()) {
            self.fence(ctx);
        }
        Ok(Count {
            value: stored.get().value,
            version: stored.etag(),
            activation: self.activation.clone(),
        })
    }
}
