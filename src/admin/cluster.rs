//! `GET /cluster` (admin rule 6): the whole cluster as this node sees it,
//! as JSON: every silo of its view with the load it last published
//! (activations, hosted grain types, devices and their memory), and this
//! node's own state. The view and the loads travel with membership, so
//! answering asks no other silo.

use serde::{Deserialize, Serialize};

use super::AdminSources;

/// The cluster, as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The node answering (`address#incarnation`), or `None` for a lone
    /// silo.
    pub silo: Option<String>,
    /// Whether the node answering is fenced after a stall.
    pub fenced: bool,
    /// Whether the node answering is draining.
    pub draining: bool,
    /// Every silo of its view, sorted by id.
    pub silos: Vec<SiloView>,
}

/// One silo of the view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiloView {
    /// Where it listens.
    pub address: String,
    /// Which start of that address.
    pub incarnation: u64,
    /// Whether it is the node answering.
    pub this: bool,
    /// `"active"`, `"leaving"` (it refuses new calls and lets its
    /// activations go before it leaves the view) or `"fenced"` (after a
    /// stall), as it last published.
    pub state: String,
    /// Seconds since it started, if it published when.
    pub age_seconds: Option<u64>,
    /// Activations alive on it, as it last published.
    pub activations: u64,
    /// Its live activations by grain type.
    #[serde(default)]
    pub activations_by_type: std::collections::BTreeMap<String, u64>,
    /// The grain types it hosts (none for an external client).
    pub grain_types: Vec<String>,
    /// Its devices, as it last published.
    pub devices: Vec<granary_cluster::DeviceLoad>,
    /// When it took the load shown, in milliseconds since the Unix epoch
    /// by its clock (0 if unknown).
    #[serde(default)]
    pub published_ms: u64,
}

/// The view of `sources` (a lone silo lists itself alone).
pub(super) fn view(sources: &AdminSources) -> ClusterView {
    let draining = sources.draining.load(std::sync::atomic::Ordering::Acquire);
    match &sources.node {
        Some(node) => {
            let me = node.id();
            ClusterView {
                silo: Some(me.to_string()),
                fenced: node.is_fenced(),
                draining,
                silos: node
                    .members()
                    .into_iter()
                    .map(|member| SiloView {
                        this: member.silo == me,
                        state: state(&member.load).into(),
                        age_seconds: age(member.load.started_ms),
                        address: member.silo.address,
                        incarnation: member.silo.incarnation,
                        activations: member.load.activations,
                        activations_by_type: member.load.activations_by_type,
                        grain_types: member.load.grain_types,
                        devices: member.load.devices,
                        published_ms: member.load.published_ms,
                    })
                    .collect(),
            }
        }
        None => ClusterView {
            silo: None,
            fenced: false,
            draining,
            silos: vec![lone(sources, draining)],
        },
    }
}

/// A lone silo's view of itself, from its own counters (every grain type
/// with live activations: no gossip to keep small).
fn lone(sources: &AdminSources, draining: bool) -> SiloView {
    let stats = sources.silo.grain_type_stats();
    SiloView {
        address: "this silo".into(),
        incarnation: 0,
        this: true,
        state: if draining { "leaving" } else { "active" }.into(),
        age_seconds: None,
        activations: sources.silo.live_activations(),
        activations_by_type: stats
            .iter()
            .filter(|stats| stats.live_activations > 0)
            .map(|stats| (stats.grain_type.clone(), stats.live_activations))
            .collect(),
        grain_types: stats.into_iter().map(|stats| stats.grain_type).collect(),
        devices: sources
            .bridge
            .iter()
            .flat_map(|bridge| granary_cluster::DeviceLoad::of_bridge(bridge))
            .collect(),
        published_ms: granary_cluster::unix_ms(),
    }
}

/// A silo's state, as its load says.
fn state(load: &granary_cluster::SiloLoad) -> &'static str {
    if load.fenced {
        "fenced"
    } else if load.leaving {
        "leaving"
    } else {
        "active"
    }
}

/// Seconds since `started_ms` (Unix milliseconds), if known.
fn age(started_ms: u64) -> Option<u64> {
    if started_ms == 0 {
        return None;
    }
    Some(granary_cluster::unix_ms().saturating_sub(started_ms) / 1000)
}
