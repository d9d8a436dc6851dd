//! The demo's grains: the [`Ledger`] (a GPU grain with persisted state),
//! the [`Auditor`] it notifies, and the [`Inspector`] that answers for its
//! silo; their messages and the services they read.

use std::sync::Arc;

use granary_actors::migration::{Dehydrated, HookError, Migratable};
use granary_actors::{
    ActivationError, Grain, GrainContext, GrainKey, GrainType, Handler, Message, PersistentState,
};
use granary_cluster::DeviceQuotas;
use granary_gpu::{ExecuteError, GpuBridge, Output, Part, Requirements, ResidentBuffer};
use granary_kernels::shipped::f32_bytes;
use serde::{Deserialize, Serialize};

/// Bytes of device memory each ledger keeps resident.
pub const LEDGER_DEVICE_BYTES: u64 = 4 << 20;

/// A ledger's persisted state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerState {
    /// The last sequence number applied.
    pub applied: u64,
    /// The sum of the amounts applied.
    pub total: u64,
}

/// The sample GPU grain (see the module docs), hosted as `"ledger"`
/// ([`LEDGER`]), taking [`Apply`] and [`Read`] from other silos.
///
/// It is migratable: its persisted state (written on the way, with its
/// ETag) and its resident buffer's bytes go with it to another silo, where
/// the buffer is allocated afresh and filled (`granary demo --nodes 3
/// --rebalance` moves ledgers this way).
#[derive(GrainType)]
#[grain(name = "ledger", messages(Apply, Read), migratable)]
pub struct Ledger {
    /// Its number (ledgers are keyed by number).
    key: Option<u64>,
    state: Option<PersistentState<LedgerState>>,
    bridge: Option<Arc<GpuBridge>>,
    buffer: Option<ResidentBuffer>,
    /// Set once a write failed: this activation's ETag may be stale (the
    /// write may have committed), so it takes no more steps and is
    /// deactivating; the next activation reads the stored state afresh.
    fenced: bool,
}

impl Grain for Ledger {
    fn new(key: &GrainKey) -> Ledger {
        Ledger {
            key: match key {
                GrainKey::U64(key) => Some(*key),
                _ => None,
            },
            state: None,
            bridge: None,
            buffer: None,
            fenced: false,
        }
    }

    async fn on_activate(&mut self, ctx: &mut GrainContext) -> Result<(), ActivationError> {
        let bridge = ctx
            .service::<GpuBridge>()
            .ok_or_else(|| ActivationError("no GPU bridge on this silo".into()))?;
        // A ledger that arrived from another silo has both already.
        if self.buffer.is_none() {
            self.buffer = Some(allocate(ctx).await.map_err(ActivationError)?);
        }
        if self.state.is_none() {
            self.state = Some(ctx.load_state::<LedgerState>().await?);
        }
        self.bridge = Some(bridge);
        Ok(())
    }

    async fn on_deactivate(&mut self, _: &mut GrainContext) {
        self.buffer = None;
    }
}

/// A ledger's resident buffer on its silo's device, charged to the quota
/// its type declares ([`LEDGER_DEVICE_BYTES`]) where the silo is a cluster
/// node with devices.
async fn allocate(ctx: &GrainContext) -> Result<ResidentBuffer, String> {
    let devices = ctx
        .service::<LedgerDevices>()
        .map_or_else(Requirements::default, |devices| devices.0);
    let bytes = LEDGER_DEVICE_BYTES as usize;
    let allocated = match ctx.service::<DeviceQuotas>() {
        Some(quotas) => quotas.allocate(ctx, bytes, &devices).await,
        None => {
            let bridge = ctx
                .service::<GpuBridge>()
                .ok_or("no GPU bridge on this silo")?;
            bridge.allocate_resident(bytes, &devices).await
        }
    };
    allocated.map_err(|err| err.to_string())
}

impl Migratable for Ledger {
    async fn dehydrate(
        &mut self,
        ctx: &mut GrainContext,
        into: &mut Dehydrated,
    ) -> Result<(), HookError> {
        if self.fenced {
            return Err(
                "this ledger activation's last write failed; it stays to deactivate".into(),
            );
        }
        let state = self.state.as_mut().ok_or("the ledger is not active")?;
        if let Err(err) = into.put_state("state", state).await {
            // The write may have committed: this activation's ETag may be
            // stale, so it fences itself as `Apply` does, and stays to
            // deactivate.
            self.fenced = true;
            if let GrainKey::U64(key) = ctx.key() {
                let this = ctx.silo().grain::<Ledger>(*key);
                tokio::spawn(async move {
                    if let Err(err) = this.deactivate().await {
                        tracing::debug!(error = %err, "a fenced ledger could not ask to be deactivated");
                    }
                });
            }
            return Err(err);
        }
        let buffer = self.buffer.as_ref().ok_or("the ledger has no buffer")?;
        DeviceQuotas::put_resident(into, "buffer", buffer).await
    }

    async fn rehydrate(
        &mut self,
        ctx: &mut GrainContext,
        mut from: Dehydrated,
    ) -> Result<(), HookError> {
        self.state = Some(from.get_state("state", ctx)?);
        // A ledger moves only between cluster nodes, which have quotas.
        let quotas = ctx
            .service::<DeviceQuotas>()
            .ok_or("no device quotas on this silo")?;
        let devices = ctx
            .service::<LedgerDevices>()
            .map_or_else(Requirements::default, |devices| devices.0);
        self.buffer = Some(
            quotas
                .take_resident(ctx, &mut from, "buffer", &devices)
                .await?,
        );
        Ok(())
    }
}

/// Applies `amount` as step `seq` (once).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Message)]
#[message(name = "apply", reply = Result<Applied, String>)]
pub struct Apply {
    /// The step: applied only if it is the next one.
    pub seq: u64,
    /// What it adds.
    pub amount: u64,
}

/// A ledger's answer to [`Apply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Its state after the step.
    pub state: LedgerState,
    /// The auditor's acknowledgement of this step, when the step is the
    /// ledger's last one (a step applied now, or a retry of it).
    pub notified: Option<Notified>,
}

/// Where a notification went: the ledger's silo and its auditor's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notified {
    /// The address of the silo the ledger ran on.
    pub ledger_silo: String,
    /// The address of the silo the auditor ran on.
    pub auditor_silo: String,
}

impl Notified {
    /// Whether the notification went from one silo to another.
    pub fn crossed(&self) -> bool {
        self.ledger_silo != self.auditor_silo
    }
}

impl Handler<Apply> for Ledger {
    async fn handle(&mut self, apply: Apply, ctx: &mut GrainContext) -> Result<Applied, String> {
        let (Some(key), Some(state), Some(bridge), Some(buffer)) =
            (self.key, &mut self.state, &self.bridge, &self.buffer)
        else {
            return Err("the ledger is not active (or not keyed by number)".into());
        };
        if self.fenced {
            return Err("this ledger activation's last write failed; it is deactivating".into());
        }
        if apply.seq == state.get().applied + 1 {
            // The GPU work: y = a·y + y over the resident buffer, in place.
            let scalar = f32_bytes(&[0.5]);
            let parts = [
                Part::Host(&scalar),
                Part::Resident(buffer),
                Part::Resident(buffer),
            ];
            bridge
                .execute_resident("saxpy", &parts, Output::Into(buffer))
                .await
                .map_err(|err: ExecuteError| err.to_string())?;
            let before = *state.get();
            *state.get_mut() = LedgerState {
                applied: apply.seq,
                total: before.total + apply.amount,
            };
            if let Err(err) = state.write().await {
                // Not stored, or not known to be: the step stays unapplied
                // here rather than answered from a state storage may never
                // have seen, and the activation is fenced, since a write
                // that did commit left its ETag stale. The retry reaches a
                // new activation, which reads what storage holds.
                *state.get_mut() = before;
                self.fenced = true;
                let this = ctx.silo().grain::<Ledger>(key);
                tokio::spawn(async move {
                    if let Err(err) = this.deactivate().await {
                        tracing::debug!(error = %err, "a fenced ledger could not ask to be deactivated");
                    }
                });
                return Err(err.to_string());
            }
        }
        let state = *state.get();
        if state.applied != apply.seq {
            return Ok(Applied {
                state,
                notified: None,
            });
        }
        // The grain-to-grain call: answered once the auditor (usually on
        // another silo) has persisted the note. A step retried after a
        // failure notifies again; the auditor counts each step once.
        let ledger_silo = here(ctx)?;
        let receipt = ctx
            .grain::<Auditor>(auditor_of(key))
            .call(Note {
                ledger: key,
                seq: apply.seq,
            })
            .await
            .map_err(|err| format!("notifying auditor {}: {err}", auditor_of(key)))??;
        Ok(Applied {
            state,
            notified: Some(Notified {
                ledger_silo,
                auditor_silo: receipt.auditor_silo,
            }),
        })
    }
}

/// Reads a ledger's state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Message)]
#[message(name = "read", reply = LedgerState)]
pub struct Read;

impl Handler<Read> for Ledger {
    async fn handle(&mut self, _: Read, _: &mut GrainContext) -> LedgerState {
        self.state
            .as_ref()
            .map(|state| *state.get())
            .unwrap_or_default()
    }
}

/// How many auditors the ledgers share: ledger `k` notifies auditor
/// `k % AUDITORS`.
pub const AUDITORS: u64 = 4;

/// The auditor ledger `ledger` notifies.
pub fn auditor_of(ledger: u64) -> u64 {
    ledger % AUDITORS
}

/// The address of the silo a grain runs on, known once its node has
/// started (a silo service that [`DemoGrains`](super::DemoGrains) fills
/// in when its node has joined).
#[derive(Debug, Default)]
pub struct Here(std::sync::OnceLock<String>);

impl Here {
    /// The silo's address, once its node has started.
    pub fn address(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }

    /// Sets the silo's address; the first one set stays.
    pub(super) fn set(&self, address: String) {
        let _ = self.0.set(address);
    }
}

/// The address of the silo `ctx`'s grain runs on.
fn here(ctx: &GrainContext) -> Result<String, String> {
    ctx.service::<Here>()
        .and_then(|here| here.address().map(str::to_string))
        .ok_or_else(|| "this silo's address is not known yet".to_string())
}

/// What an auditor knows of one ledger.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Distinct steps notified.
    pub notes: u64,
    /// The highest step notified.
    pub last_seq: u64,
}

/// An auditor's persisted state: per ledger, what it was notified of.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditState {
    /// Per ledger key.
    pub ledgers: std::collections::BTreeMap<u64, AuditEntry>,
}

/// The grain ledgers notify (see the module docs): it needs no device,
/// so any silo that hosts the type may hold it. Hosted as `"auditor"`
/// ([`AUDITOR`]), taking [`Note`] and [`Audit`] from other silos.
#[derive(GrainType)]
#[grain(name = "auditor", messages(Note, Audit))]
pub struct Auditor {
    state: Option<PersistentState<AuditState>>,
}

impl Grain for Auditor {
    fn new(_: &GrainKey) -> Auditor {
        Auditor { state: None }
    }

    async fn on_activate(&mut self, ctx: &mut GrainContext) -> Result<(), ActivationError> {
        self.state = Some(ctx.load_state::<AuditState>().await?);
        Ok(())
    }
}

/// Tells an auditor that ledger `ledger` applied step `seq`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Message)]
#[message(name = "note", reply = Result<Receipt, String>)]
pub struct Note {
    /// The ledger's key.
    pub ledger: u64,
    /// The step it applied.
    pub seq: u64,
}

/// An auditor's answer to a [`Note`], once persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The address of the silo the auditor runs on.
    pub auditor_silo: String,
}

impl Handler<Note> for Auditor {
    async fn handle(&mut self, note: Note, ctx: &mut GrainContext) -> Result<Receipt, String> {
        let auditor_silo = here(ctx)?;
        let Some(state) = &mut self.state else {
            return Err("the auditor is not active".into());
        };
        let entry = state
            .get()
            .ledgers
            .get(&note.ledger)
            .copied()
            .unwrap_or_default();
        // A step seen before (a retried Apply) is not counted again.
        if note.seq > entry.last_seq {
            state.get_mut().ledgers.insert(
                note.ledger,
                AuditEntry {
                    notes: entry.notes + 1,
                    last_seq: note.seq,
                },
            );
            state.write().await.map_err(|err| err.to_string())?;
        }
        Ok(Receipt { auditor_silo })
    }
}

/// Reads an auditor's state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Message)]
#[message(name = "audit", reply = AuditState)]
pub struct Audit;

impl Handler<Audit> for Auditor {
    async fn handle(&mut self, _: Audit, _: &mut GrainContext) -> AuditState {
        self.state
            .as_ref()
            .map(|state| state.get().clone())
            .unwrap_or_default()
    }
}

/// A grain that answers for the silo it runs on (its activations, and the
/// round trip of one small request through its GPU bridge's ring path):
/// [`DemoPlacement`](super::DemoPlacement) puts the inspector keyed by a
/// silo's address on that silo. Hosted as `"inspector"` ([`INSPECTOR`]),
/// taking [`Inspect`] from other silos.
#[derive(GrainType)]
#[grain(name = "inspector", messages(Inspect))]
pub struct Inspector;

impl Grain for Inspector {
    fn new(_: &GrainKey) -> Inspector {
        Inspector
    }
}

/// Asks an inspector which ledgers (keys `0..ledgers`) and auditors (keys
/// `0..auditors`) are active on its silo.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Message)]
#[message(name = "inspect", reply = Result<SiloActivity, String>)]
pub struct Inspect {
    /// Ledger keys to look for.
    pub ledgers: u64,
    /// Auditor keys to look for.
    pub auditors: u64,
}

/// One silo's activations, as its inspector saw them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiloActivity {
    /// The silo's address.
    pub silo: String,
    /// Its `live_activations()` (the inspector's own included).
    pub live: u64,
    /// The ledgers active there.
    pub ledgers: Vec<u64>,
    /// The auditors active there.
    pub auditors: Vec<u64>,
    /// The round trip, in microseconds, of one `double` request through
    /// the silo's GPU bridge (a persistent kernel's ring); `None` on a silo
    /// with no bridge.
    #[serde(default)]
    pub ring_round_trip_us: Option<u64>,
}

impl Handler<Inspect> for Inspector {
    async fn handle(
        &mut self,
        inspect: Inspect,
        ctx: &mut GrainContext,
    ) -> Result<SiloActivity, String> {
        let silo = ctx.silo();
        let active = |grain_type: &str, keys: u64| -> Vec<u64> {
            (0..keys)
                .filter(|key| silo.is_active_named(grain_type, &GrainKey::U64(*key)))
                .collect()
        };
        let ring_round_trip_us = match ctx.service::<GpuBridge>() {
            Some(bridge) => {
                let started = std::time::Instant::now();
                let doubled = bridge
                    .execute("double", &f32_bytes(&[1.5]))
                    .await
                    .map_err(|err| format!("the ring path: {err}"))?;
                if granary_kernels::shipped::bytes_f32(&doubled) != [3.0] {
                    return Err("the ring path answered wrongly".into());
                }
                Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX))
            }
            None => None,
        };
        Ok(SiloActivity {
            silo: here(ctx)?,
            live: silo.live_activations(),
            ledgers: active(LEDGER, inspect.ledgers),
            auditors: active(AUDITOR, inspect.auditors),
            ring_round_trip_us,
        })
    }
}

/// The ledger's registered name (`#[grain(name = ...)]` on [`Ledger`]).
pub const LEDGER: &str = Ledger::NAME;
/// The auditor's registered name (`#[grain(name = ...)]` on [`Auditor`]).
pub const AUDITOR: &str = Auditor::NAME;
/// The inspector's registered name (`#[grain(name = ...)]` on
/// [`Inspector`]).
pub const INSPECTOR: &str = Inspector::NAME;

/// The devices a ledger may live on: the node's configured backend.
#[derive(Debug, Clone, Copy)]
pub struct LedgerDevices(pub Requirements);
