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
    /// Activations alive on it, as it last published.
    pub activations: u64,
    /// The grain types it hosts (none for an external client).
    pub grain_types: Vec<String>,
    /// Its devices, as it last published.
    pub devices: Vec<granary_cluster::DeviceLoad>,
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
                        address: member.silo.address,
                        incarnation: member.silo.incarnation,
                        activations: member.load.activations,
                        grain_types: member.load.grain_types,
                        devices: member.load.devices,
                    })
                    .collect(),
            }
        }
        None => ClusterView {
            silo: None,
            fenced: false,
            draining,
            silos: vec![SiloView {
                address: "this silo".into(),
                incarnation: 0,
                this: true,
                activations: sources.silo.live_activations(),
                grain_types: sources
                    .silo
                    .grain_type_stats()
                    .into_iter()
                    .map(|stats| stats.grain_type)
                    .collect(),
                devices: Vec::new(),
            }],
        },
    }
}
