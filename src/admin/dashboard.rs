//! The live dashboard (admin rule 7): `GET /` serves one self-contained
//! page, and `GET /dashboard.json` what it draws.
//!
//! 1. **Whole cluster.** The page shows every silo of this node's view,
//!    built from the loads the silos gossip ([`ClusterView`]): state, age,
//!    activations by grain type, devices with their memory. Nothing asks
//!    another silo's admin endpoint.
//! 2. **History.** While the endpoint runs, a sampler takes the view every
//!    [`SAMPLE_EVERY`] and keeps the last [`HISTORY`] of samples: for each
//!    silo, its kernel requests per second and their mean round trip
//!    between the last two loads it published (from the counters and
//!    latency sums of its devices, over the time between the loads' own
//!    stamps, not the sampler's step: a sample may see no new load from a
//!    silo, or several). A silo with no new load gets no point, and its
//!    interval runs on; one whose stamp went back starts a new interval.
//!    So a page opened now still shows the last minutes.
//! 3. **Events.** The sampler compares each view with the one before and
//!    notes which silos joined and which left (the most recent
//!    [`EVENTS`]). A silo that leaves and comes back as a new incarnation
//!    is one event of each.
//! 4. **Self-contained.** The page is one HTML file compiled into the
//!    binary, its script and styles inline; the charts are SVG polylines
//!    drawn by that script (no charting library: two line charts do not
//!    need one), so the page fetches nothing but `/dashboard.json` from the
//!    node that served it, every [`SAMPLE_EVERY`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::cluster::{self, ClusterView, SiloView};
use super::{AdminSources, Shared};

/// How often the sampler takes the view, and the page refreshes (rule 2).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// How much history the sampler keeps (rule 2).
pub const HISTORY: Duration = Duration::from_secs(600);

/// How many membership events the sampler keeps (rule 3).
pub const EVENTS: usize = 50;

/// The page (rule 4).
const PAGE: &str = include_str!("dashboard.html");

/// What the page draws: the view now, the history and the events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dashboard {
    /// The cluster now.
    pub view: ClusterView,
    /// The samples, oldest first (rule 2).
    pub history: Vec<Sample>,
    /// Membership events, oldest first (rule 3).
    pub events: Vec<Event>,
}

/// One sample of the kernel traffic (rule 2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Each silo's traffic over the interval before.
    pub silos: Vec<SiloTraffic>,
}

/// A silo's kernel traffic over one sampling interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiloTraffic {
    /// `address#incarnation`.
    pub silo: String,
    /// Kernel requests finished per second, over all its devices.
    pub requests_per_second: f64,
    /// Their mean round trip, in milliseconds (`None` with no request).
    pub mean_round_trip_ms: Option<f64>,
}

/// A silo joining or leaving the view (rule 3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When the sampler noticed, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `address#incarnation`.
    pub silo: String,
    /// `"joined"`, `"left"`, or `"present"` for the silos in the first
    /// view the sampler took.
    pub kind: String,
}

/// The sampler's state (rules 2 and 3).
#[derive(Default)]
pub(super) struct History {
    samples: VecDeque<Sample>,
    events: VecDeque<Event>,
    /// Each silo's totals at the last sample (rule 2).
    last: Option<Totals>,
}

/// A silo's kernel traffic so far, as its load said, and when it took it.
#[derive(Debug, Clone, Copy)]
struct Traffic {
    requests: u64,
    latency_ns: u64,
    published_ms: u64,
}

/// Each silo's traffic by name; `None` for one with nothing to plot.
type Totals = HashMap<String, Option<Traffic>>;

/// The name a silo goes by on the page.
fn name(silo: &SiloView) -> String {
    format!("{}#{}", silo.address, silo.incarnation)
}

impl History {
    /// Takes one sample of `view` at `at_ms` (rules 2 and 3).
    pub(super) fn sample(&mut self, view: &ClusterView, at_ms: u64) {
        let mut totals: Totals = view
            .silos
            .iter()
            .map(|silo| {
                // A member that lends no device (a client), or whose load
                // does not say when it was taken, has no traffic to plot.
                let traffic = (!silo.devices.is_empty() && silo.published_ms > 0).then(|| {
                    silo.devices.iter().fold(
                        Traffic {
                            requests: 0,
                            latency_ns: 0,
                            published_ms: silo.published_ms,
                        },
                        |sum, device| Traffic {
                            requests: sum.requests.saturating_add(device.processed),
                            latency_ns: sum.latency_ns.saturating_add(device.latency_sum_ns),
                            ..sum
                        },
                    )
                });
                (name(silo), traffic)
            })
            .collect();
        let Some(last) = &self.last else {
            let mut present: Vec<String> = totals.keys().cloned().collect();
            present.sort();
            for silo in &present {
                self.event(at_ms, silo, "present");
            }
            self.last = Some(totals);
            return;
        };
        let mut joined: Vec<String> = totals
            .keys()
            .filter(|silo| !last.contains_key(*silo))
            .cloned()
            .collect();
        let mut left: Vec<String> = last
            .keys()
            .filter(|silo| !totals.contains_key(*silo))
            .cloned()
            .collect();
        joined.sort();
        left.sort();
        let mut silos = Vec::new();
        for (silo, now) in totals.iter_mut() {
            // A silo new since the last sample, or one that lends devices
            // only from now on, has no interval yet.
            let (Some(was), Some(current)) = (last.get(silo).copied().flatten(), *now) else {
                continue;
            };
            // Rates divide by the time between the two loads as the silo
            // took them, not by the sampler's step: no load may have
            // arrived since the last sample, or two. With none, the older
            // load stays the start of the next interval.
            // A stamp that went back (the silo's clock stepped) starts a new
            // interval from this load.
            let elapsed_ms = match current.published_ms.checked_sub(was.published_ms) {
                Some(0) => {
                    *now = Some(was);
                    continue;
                }
                Some(elapsed_ms) => elapsed_ms,
                None => continue,
            };
            let done = current.requests.saturating_sub(was.requests);
            let took = current.latency_ns.saturating_sub(was.latency_ns);
            silos.push(SiloTraffic {
                silo: silo.clone(),
                requests_per_second: done as f64 * 1000.0 / elapsed_ms as f64,
                mean_round_trip_ms: (done > 0).then(|| took as f64 / done as f64 / 1e6),
            });
        }
        silos.sort_by(|a, b| a.silo.cmp(&b.silo));
        for silo in &left {
            self.event(at_ms, silo, "left");
        }
        for silo in &joined {
            self.event(at_ms, silo, "joined");
        }
        self.samples.push_back(Sample { at_ms, silos });
        let keep = (HISTORY.as_millis() / SAMPLE_EVERY.as_millis()) as usize;
        while self.samples.len() > keep {
            self.samples.pop_front();
        }
        self.last = Some(totals);
    }

    fn event(&mut self, at_ms: u64, silo: &str, kind: &str) {
        self.events.push_back(Event {
            at_ms,
            silo: silo.to_string(),
            kind: kind.to_string(),
        });
        while self.events.len() > EVENTS {
            self.events.pop_front();
        }
    }
}

/// Starts the sampler (rule 2); it ends when the returned task is aborted.
pub(super) fn start_sampler(
    sources: AdminSources,
    history: Arc<Mutex<History>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(SAMPLE_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let view = cluster::view(&sources);
            history
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .sample(&view, granary_cluster::unix_ms());
        }
    })
}

/// `GET /` (rule 4).
pub(super) async fn page() -> axum::response::Html<&'static str> {
    axum::response::Html(PAGE)
}

/// `GET /dashboard.json`.
pub(super) async fn data(
    axum::extract::State(shared): axum::extract::State<Shared>,
) -> axum::Json<Dashboard> {
    let view = cluster::view(&shared.sources);
    let history = shared
        .history
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    axum::Json(Dashboard {
        view,
        history: history.samples.iter().cloned().collect(),
        events: history.events.iter().cloned().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn silo(address: &str, processed: u64, latency_sum_ns: u64, published_ms: u64) -> SiloView {
        SiloView {
            address: address.into(),
            incarnation: 1,
            this: false,
            state: "active".into(),
            age_seconds: Some(5),
            activations: 0,
            activations_by_type: Default::default(),
            grain_types: Vec::new(),
            devices: vec![granary_cluster::DeviceLoad {
                processed,
                latency_sum_ns,
                ..Default::default()
            }],
            published_ms,
        }
    }

    fn view(silos: Vec<SiloView>) -> ClusterView {
        ClusterView {
            silo: None,
            fenced: false,
            draining: false,
            silos,
        }
    }

    #[test]
    fn samples_give_rates_and_mean_round_trips_and_note_membership() {
        let mut history = History::default();
        history.sample(
            &view(vec![silo("a", 100, 0, 9_500), silo("b", 0, 0, 9_600)]),
            10_000,
        );
        assert!(history.samples.is_empty(), "the first view has no interval");
        // a's load was taken 2 s after the one before: 200 requests, 400 ms.
        history.sample(
            &view(vec![
                silo("a", 300, 400_000_000, 11_500),
                silo("c", 50, 0, 11_000),
            ]),
            12_000,
        );
        let sample = &history.samples[0];
        assert_eq!(sample.silos.len(), 1, "c has no interval yet: {sample:?}");
        assert_eq!(sample.silos[0].silo, "a#1");
        assert_eq!(sample.silos[0].requests_per_second, 100.0);
        assert_eq!(sample.silos[0].mean_round_trip_ms, Some(2.0));
        let events: Vec<(&str, &str)> = history
            .events
            .iter()
            .map(|event| (event.silo.as_str(), event.kind.as_str()))
            .collect();
        assert_eq!(
            events,
            [
                ("a#1", "present"),
                ("b#1", "present"),
                ("b#1", "left"),
                ("c#1", "joined")
            ]
        );
        // No new load from a since: no point, and its interval runs on
        // from the load before.
        history.sample(
            &view(vec![
                silo("a", 300, 400_000_000, 11_500),
                silo("c", 50, 0, 11_000),
            ]),
            14_000,
        );
        assert!(history.samples[1].silos.iter().all(|t| t.silo != "a#1"));
        history.sample(
            &view(vec![
                silo("a", 400, 500_000_000, 14_500),
                silo("c", 90, 0, 13_000),
            ]),
            16_000,
        );
        let last = &history.samples[2].silos;
        assert_eq!(last[0].silo, "a#1");
        assert!((last[0].requests_per_second - 100.0 / 3.0).abs() < 1e-9);
        assert_eq!(last[0].mean_round_trip_ms, Some(1.0));
        assert_eq!(last[1].silo, "c#1");
        assert_eq!(last[1].requests_per_second, 20.0);
        assert_eq!(last[1].mean_round_trip_ms, Some(0.0));
        // a's clock steps back: no point, and its next interval starts at
        // the load with the earlier stamp.
        history.sample(&view(vec![silo("a", 500, 600_000_000, 12_000)]), 18_000);
        assert!(history.samples[3].silos.is_empty());
        history.sample(&view(vec![silo("a", 600, 700_000_000, 13_000)]), 20_000);
        assert_eq!(history.samples[4].silos[0].requests_per_second, 100.0);
    }
}
