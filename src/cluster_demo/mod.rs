//! The multi-node demo, run by the `granary` CLI: `granary demo --nodes N`
//! (silos as separate processes of the same executable, each a `granary
//! node` hosting this demo's grains ([`DemoGrains`]), GPU grains placed by
//! free device memory, each ledger notifying an auditor grain on another
//! silo, one silo killed while load runs, and every grain's persisted state
//! checked afterwards).
//!
//! Its parts: the grains (`grains.rs`, and the counter the chaos suite
//! drives, `counter.rs`), their placement
//! (`placement.rs`), the run (`run.rs`) and what it reports
//! (`report.rs`). Starting a node from its TOML file is not the demo's:
//! that is [`crate::node_file`], which any program uses with grains of its
//! own.
//!
//! # The demo's grains
//!
//! A [`Ledger`] keeps a resident buffer on its silo's device (reserved in
//! the bridge's broker, so placement elsewhere sees less free memory) and a
//! persisted `(applied, total)`. `Apply { seq, amount }` runs a SAXPY on
//! the resident buffer and adds `amount` if `seq` is the next one: a call
//! retried after its silo died is applied once, so the final totals show
//! whether anything acknowledged was lost.
//!
//! Each `Apply` is also a grain-to-grain call across silos: the ledger
//! notifies its [`Auditor`] (ledger `k`'s is auditor `k % AUDITORS`) with
//! `ctx.grain::<Auditor>(k % AUDITORS).call(Note { … })` before it answers,
//! through the same `GrainRef` the demo itself uses. [`DemoPlacement`]
//! places an auditor on a silo other than the one whose ledger first
//! calls it, so notifications usually cross silos. The auditor persists,
//! per ledger, how many distinct steps it was notified of (a retried step
//! is counted once). A `call` rather than a `tell`: a tell is acknowledged
//! once the auditor's mailbox has taken the note, before its state is
//! written, so a silo killed in between would lose an acknowledged note;
//! the call's answer comes after the write.
//!
//! # The demo
//!
//! 1. Writes one node file per silo
//!    ([`NodeFile`](crate::node_file::NodeFile), each with its own device
//!    memory limit on the chosen backend) and a shared SQLite file for
//!    grain state, and starts `granary node --config …` for each.
//! 2. Joins the cluster itself as a client (`NodeBuilder::client`: it
//!    hosts no grain) and drives `grains` ledgers, each with one caller
//!    sending `calls` sequential `Apply`s; a call that fails is retried
//!    until it succeeds.
//! 3. Halfway, kills (SIGKILL) the silo that hosts the most ledgers.
//! 4. Prints where ledgers lived before and after, latency and
//!    throughput, how many notifications were acknowledged and how many
//!    crossed silos; checks every ledger's persisted total and every
//!    auditor's persisted counts; and takes a census of each live silo's
//!    activations (an [`Inspector`] grain placed on each silo answers with
//!    its `live_activations()` and which ledgers and auditors are active
//!    there), so that a grain active on two silos is caught.
//!
//! `granary demo --nodes N --rebalance` runs the rebalancer's demo instead
//! (`rebalance.rs`): full silos, one that joins empty, ledgers moving to it
//! with their state, and the same checks.
//!
//! Either demo stopped by SIGTERM or SIGINT (Ctrl-C) stops its silos,
//! removes its folder and fails, saying so. Killed outright (SIGKILL),
//! it runs nothing more, but on Linux its silos die with it: each is
//! started with the parent-death signal (`PR_SET_PDEATHSIG`, SIGKILL),
//! which Linux sends when the *thread* that started it ends, so
//! [`run_cluster_demo`] and [`run_rebalance_demo`] must be driven by a
//! thread that outlives the run (`Runtime::block_on`'s caller, as the
//! CLI does, not a task spawned on a pool). The folder stays then, as
//! after a failed run. Elsewhere, silos outlive a killed demo.
//!
//! With `GRANARY_DEMO_DEBUG` set, the demo also prints its view of the
//! cluster every second and every failed call it retries.

mod counter;
mod grains;
mod placement;
mod rebalance;
mod report;
mod run;

use std::sync::Arc;

use granary_actors::SiloBuilder;
use granary_cluster::{ClusterNode, NodeBuilder};

use crate::node_file::{NodeDevices, NodeGrains};

pub use counter::{Add, Added, COUNTER, Count, Counter, CounterState, Get};
pub use grains::{
    AUDITOR, AUDITORS, Applied, Apply, Audit, AuditEntry, AuditState, Auditor, Here, INSPECTOR,
    Inspect, Inspector, LEDGER, LEDGER_DEVICE_BYTES, Ledger, LedgerDevices, LedgerState, Note,
    Notified, Read, Receipt, SiloActivity, auditor_of,
};
pub use placement::DemoPlacement;
pub use rebalance::{
    RebalanceDemoConfig, RebalanceDemoReport, SILO_MIB as REBALANCE_SILO_MIB, SPREAD_GOAL, Sample,
    header, run_rebalance_demo,
};
pub use report::ClusterDemoReport;
pub use run::{ClusterDemoConfig, run_cluster_demo};

/// What a demo node hosts (what `granary node` passes to
/// [`run_node`](crate::node_file::run_node)): the ledger, the auditor, the
/// inspector and the chaos suite's [`Counter`], each hosted as its `#[derive(GrainType)]` declares it
/// (its name, and its messages by name); ledgers on the node's
/// backend ([`LedgerDevices`]), needing [`LEDGER_DEVICE_BYTES`] of its
/// devices; [`DemoPlacement`]; and the silo's address ([`Here`]) for the
/// grains once the node has joined.
///
/// One per node: its [`Here`] is that node's.
#[derive(Debug, Default)]
pub struct DemoGrains {
    here: Arc<Here>,
}

impl NodeGrains for DemoGrains {
    fn register(&self, silo: SiloBuilder, devices: &NodeDevices) -> SiloBuilder {
        silo.host::<Ledger>()
            .host::<Auditor>()
            .host::<Counter>()
            .host::<Inspector>()
            .service(Arc::new(LedgerDevices(devices.requirements())))
            .service(self.here.clone())
    }

    fn configure(&self, node: NodeBuilder, devices: &NodeDevices) -> NodeBuilder {
        node.placement(Arc::new(DemoPlacement::default()))
            .needs(LEDGER, devices.needs(LEDGER_DEVICE_BYTES))
    }

    fn started(&self, node: &ClusterNode) {
        // Grains answer with it from now on (until then they say it is not
        // known yet, and their callers retry).
        self.here.set(node.id().address.clone());
    }
}
