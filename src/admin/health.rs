//! The health probes (admin rule 4): each runs its checks, answers 200 if
//! every one passed and 503 otherwise, with a JSON body naming each check,
//! whether it passed, and why not.
//!
//! 1. **live**: the process's runtime answers (the handler ran). A node
//!    that stopped serving for good (it left, was killed, lost its etcd
//!    lease or could not come back after a stall) is not live either: it
//!    must be restarted.
//! 2. **startup**: the node has joined its cluster (it is in its own view)
//!    or, with no cluster, the silo is built.
//! 3. **ready**: started, not draining (a node asked to stop is unready
//!    from the first moment, before it leaves), not fenced after a stall,
//!    its storage answers a read within the probe timeout, and every
//!    persistent kernel its GPU bridge has launched answers within
//!    `KERNEL_PROBE_TIMEOUT` (`GpuBridge::probe`: an idle kernel answers a
//!    probe request, a busy one's heartbeat moves): a kernel that hangs
//!    makes the node unready, within about a second, until the bridge has
//!    relaunched it (and a cached answer has expired). A node with no
//!    bridge has no `kernels` check.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use granary_gpu::ProbeAnswer;

use super::{AdminSources, Cached, KERNEL_PROBE_TIMEOUT, PROBE_TIMEOUT, Shared};

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Probe {
    /// `/health/live` (rule 1).
    Live,
    /// `/health/startup` (rule 2).
    Startup,
    /// `/health/ready` (rule 3).
    Ready,
}

/// One check of a probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// Whether it passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// A probe's answer: its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbeReport {
    /// Which probe.
    pub probe: Probe,
    /// `"pass"` or `"fail"`.
    pub status: &'static str,
    /// Every check, in order.
    pub checks: Vec<Check>,
}

impl ProbeReport {
    fn of(probe: Probe, checks: Vec<Check>) -> ProbeReport {
        let passed = checks.iter().all(|check| check.ok);
        ProbeReport {
            probe,
            status: if passed { "pass" } else { "fail" },
            checks,
        }
    }

    fn passed(&self) -> bool {
        self.status == "pass"
    }
}

impl IntoResponse for ProbeReport {
    fn into_response(self) -> Response {
        let status = if self.passed() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, Json(self)).into_response()
    }
}

/// Rule 1: a node that drains has stopped serving on purpose, and stays
/// live until it exits.
fn serving(sources: &AdminSources) -> Check {
    let draining = sources.draining.load(std::sync::atomic::Ordering::Acquire);
    match &sources.node {
        Some(_) if draining => Check {
            name: "serving",
            ok: true,
            detail: "draining: it exits once drained".into(),
        },
        Some(node) if node.is_stopped() => Check {
            name: "serving",
            ok: false,
            detail: "the node stopped serving for good (it left, was killed, lost its etcd \
                     lease or could not come back after a stall): restart it"
                .into(),
        },
        _ => Check {
            name: "serving",
            ok: true,
            detail: "the runtime answers".into(),
        },
    }
}

/// Rule 2.
fn joined(sources: &AdminSources) -> Check {
    match &sources.node {
        Some(node) => {
            let me = node.id();
            let members = node.members();
            let ok = members.iter().any(|member| member.silo == me);
            Check {
                name: "joined",
                ok,
                detail: if ok {
                    format!("{me} is in its view of {} silo(s)", members.len())
                } else {
                    format!("{me} is not in its own view yet")
                },
            }
        }
        None => Check {
            name: "joined",
            ok: true,
            detail: "a lone silo: nothing to join".into(),
        },
    }
}

pub(super) async fn live(State(shared): State<Shared>) -> ProbeReport {
    ProbeReport::of(Probe::Live, vec![serving(&shared.sources)])
}

pub(super) async fn startup(State(shared): State<Shared>) -> ProbeReport {
    ProbeReport::of(Probe::Startup, vec![joined(&shared.sources)])
}

pub(super) async fn ready(State(shared): State<Shared>) -> ProbeReport {
    let sources = &shared.sources;
    let draining = sources.draining.load(std::sync::atomic::Ordering::Acquire);
    let mut checks = vec![
        serving(sources),
        joined(sources),
        Check {
            name: "not_draining",
            ok: !draining,
            detail: if draining {
                "draining: leaving the cluster, finishing calls and writing state".into()
            } else {
                "taking traffic".into()
            },
        },
    ];
    if let Some(node) = &sources.node {
        let fenced = node.is_fenced();
        checks.push(Check {
            name: "not_fenced",
            ok: !fenced,
            detail: if fenced {
                "fenced after a stall: giving every home up and coming back as a new incarnation"
                    .into()
            } else {
                "serving its homes".into()
            },
        });
    }
    let silo = sources.silo.clone();
    let storage = cached(&shared.storage_probe, super::PROBE_CACHE, async move {
        silo.storage_reachable()
            .await
            .map(|()| "answered a read".to_string())
            .map_err(|err| err.to_string())
    });
    let kernels = sources.bridge.clone().map(|bridge| {
        cached(&shared.kernel_probe, super::KERNEL_PROBE_CACHE, async move {
            let probes = bridge.probe(KERNEL_PROBE_TIMEOUT).await;
            let silent: Vec<String> = probes
                .iter()
                .filter_map(|probe| {
                    let why = probe.answered.as_ref().err()?;
                    let health = &probe.health;
                    Some(format!(
                        "{} on {:?} device {}: {why} (heartbeat {:.1} s ago)",
                        health.kernel,
                        health.backend,
                        health.device_index,
                        health.since_heartbeat.as_secs_f64()
                    ))
                })
                .collect();
            if silent.is_empty() {
                let busy = probes
                    .iter()
                    .filter(|probe| matches!(probe.answered, Ok(ProbeAnswer::Busy { .. })))
                    .count();
                Ok(format!(
                    "{} idle persistent kernel(s) answered a probe; {busy} busy one(s) answered by their heartbeat",
                    probes.len() - busy
                ))
            } else {
                Err(silent.join("; "))
            }
        })
    });
    let (storage, kernels) = tokio::join!(tokio::time::timeout(PROBE_TIMEOUT, storage), async {
        match kernels {
            Some(kernels) => Some(tokio::time::timeout(PROBE_TIMEOUT, kernels).await),
            None => None,
        }
    });
    checks.push(dependency("storage", storage));
    if let Some(kernels) = kernels {
        checks.push(dependency("kernels", kernels));
    }
    ProbeReport::of(Probe::Ready, checks)
}

/// The check a dependency probe's answer makes.
fn dependency(
    name: &'static str,
    answer: Result<Result<String, String>, tokio::time::error::Elapsed>,
) -> Check {
    match answer {
        Ok(Ok(detail)) => Check {
            name,
            ok: true,
            detail,
        },
        Ok(Err(detail)) => Check {
            name,
            ok: false,
            detail,
        },
        Err(_) => Check {
            name,
            ok: false,
            detail: format!("no answer within {PROBE_TIMEOUT:?}"),
        },
    }
}

/// A dependency probe (admin rule 5): one at a time, its answer kept for
/// `keep`. A probe that gives up waiting leaves the probing running; the
/// next probe waits for it rather than starting another.
async fn cached(
    slot: &std::sync::Arc<tokio::sync::Mutex<Option<Cached>>>,
    keep: std::time::Duration,
    probe: impl std::future::Future<Output = Result<String, String>> + Send + 'static,
) -> Result<String, String> {
    let mut last = slot.clone().lock_owned().await;
    if let Some((at, answer)) = last.as_ref() {
        if at.elapsed() < keep {
            return answer.clone();
        }
    }
    // The probing runs in a task of its own, holding the lock: a probe
    // that stops waiting does not cancel it, and the next probe waits for
    // it.
    let probing = tokio::spawn(async move {
        let answer = probe.await;
        *last = Some((std::time::Instant::now(), answer.clone()));
        answer
    });
    probing
        .await
        .unwrap_or_else(|err| Err(format!("the probe failed: {err}")))
}
