//! `granary demo`: a mix of small latency-bound requests and large batch
//! requests through the GPU bridge, on every backend present.
//!
//! For each backend, a bridge is built with that backend alone (no CPU
//! fallback, so each row measures the backend it names) and registered as
//! the service of a silo. Concurrent callers ask many `Compute` grains
//! (`grains` keys, activated on demand) to run small `double` requests on
//! the backend's ring path (its persistent kernel, or on wgpu, which has
//! none, one dispatch per micro-batch); every `batch_every`-th request is
//! instead a large `vector_add` that takes the launch-per-batch path, and
//! every `fan_out_every`-th a batch of `fan_out` small inferences that the
//! grain fans out as one group on the ring (`Kernel::call_many`: one await
//! for the lot, its requests written in one claim per ring's capacity, one
//! wake when the last answer lands). The grains send the work through the
//! bridge. Every answer is checked. The report has one row per backend and
//! path: requests, p50, p99 and throughput, measured at the caller (grain
//! call plus compute; a fan-out call's latency is the whole group's).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use granary_actors::{
    ActivationError, Grain, GrainContext, GrainKey, GrainType, Handler, Message, Silo,
};
use granary_gpu::shipped::Double;
use granary_gpu::{BridgeConfig, ExecuteError, FallbackPolicy, GpuBridge, Kernel, StopMode};
use granary_kernels::shipped::{DOUBLE, VECTOR_ADD, bytes_f32, f32_bytes};
use granary_kernels::{Backend, BackendKind};
use hdrhistogram::Histogram;

/// What the demo runs on each backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoConfig {
    /// Concurrent callers, at least 1.
    pub callers: u32,
    /// Requests per backend, at least 1, split across the callers.
    pub requests: u64,
    /// `f32` elements in each small request, `1..=1024`.
    pub small_elements: u32,
    /// Every this many requests (per caller) one is a batch request; 0 for
    /// none.
    pub batch_every: u64,
    /// Elements per operand of each batch `vector_add`, more than 1024 (so
    /// it does not fit a ring slot) and at most 2^24.
    pub batch_elements: u32,
    /// Grains the requests are spread over, at least 1.
    pub grains: u32,
    /// Every this many requests (per caller) one is a fan-out call instead
    /// (a batch request wins where both fall); 0 for none.
    pub fan_out_every: u64,
    /// Small requests one fan-out call carries, `2..=1024`.
    pub fan_out: u32,
}

impl Default for DemoConfig {
    fn default() -> DemoConfig {
        DemoConfig {
            callers: 64,
            requests: 200_000,
            small_elements: 16,
            batch_every: 2_000,
            batch_elements: 1 << 18,
            grains: 1000,
            fan_out_every: 100,
            fan_out: 64,
        }
    }
}

/// Why the demo could not run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DemoError {
    /// A parameter is out of range.
    BadParameter(String),
    /// The bridge could not be built.
    Bridge(String),
    /// A request failed or came back wrong.
    Request(String),
}

impl fmt::Display for DemoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DemoError::BadParameter(why) => write!(f, "bad parameter: {why}"),
            DemoError::Bridge(why) => write!(f, "bridge: {why}"),
            DemoError::Request(why) => write!(f, "request failed: {why}"),
        }
    }
}

impl std::error::Error for DemoError {}

/// What one path on one backend measured.
#[derive(Debug, Clone)]
pub struct PathReport {
    /// The backend.
    pub backend: BackendKind,
    /// `"ring"` (a persistent kernel, or wgpu's micro-batch dispatches),
    /// `"fan-out"` (groups of small requests on the ring, one await each)
    /// or `"batch"` (launch per batch).
    pub path: &'static str,
    /// Requests answered and checked (a fan-out call's each count).
    pub requests: u64,
    /// Wall time of the backend's whole run.
    pub elapsed: Duration,
    /// Per-call latency in nanoseconds (a fan-out call's is its group's).
    pub latency_ns: Histogram<u64>,
}

impl PathReport {
    /// Requests per second over the backend's run.
    pub fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency at `quantile`, in microseconds.
    pub fn latency_us(&self, quantile: f64) -> f64 {
        self.latency_ns.value_at_quantile(quantile) as f64 / 1000.0
    }
}

/// Everything the demo measured.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// The configuration that ran.
    pub config: DemoConfig,
    /// One entry per backend and path, in run order.
    pub paths: Vec<PathReport>,
    /// Backends that were not present, with the reason.
    pub skipped: Skipped,
    /// Grain activations, over every backend's silo.
    pub activations: u64,
    /// Per backend, how long its first requests took (building and
    /// launching its kernels), before the timed run.
    pub warm_ups: Vec<(BackendKind, Duration)>,
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header = ["backend", "path", "requests", "p50", "p99", "throughput"];
        let rows: Vec<[String; 6]> = self
            .paths
            .iter()
            .map(|path| {
                [
                    format!("{:?}", path.backend),
                    path.path.to_string(),
                    path.requests.to_string(),
                    format_us(path.latency_us(0.5)),
                    format_us(path.latency_us(0.99)),
                    format!("{:.0} req/s", path.throughput()),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |f: &mut fmt::Formatter<'_>, cells: &[String]| -> fmt::Result {
            for (cell, width) in cells.iter().zip(widths) {
                write!(f, "| {cell:>width$} ")?;
            }
            writeln!(f, "|")
        };
        line(f, &header.map(String::from))?;
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        line(f, &rule)?;
        for row in &rows {
            line(f, row)?;
        }
        for (backend, took) in &self.warm_ups {
            writeln!(
                f,
                "{backend:?}: first requests, which build and launch the kernels, took {}, before timing",
                format_us(took.as_secs_f64() * 1e6)
            )?;
        }
        for (backend, why) in &self.skipped {
            writeln!(f, "{backend:?}: not run ({why})")?;
        }
        writeln!(
            f,
            "{} grain activations over {} grains per backend",
            self.activations, self.config.grains
        )?;
        Ok(())
    }
}

fn format_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.1} µs")
    }
}

/// The most callers the demo runs.
const MAX_CALLERS: u32 = 4096;

/// The most the callers' batch buffers may hold at once.
const MAX_BATCH_BYTES: u64 = 4 << 30;

impl DemoConfig {
    fn validate(&self) -> Result<(), DemoError> {
        let bad = |why: String| Err(DemoError::BadParameter(why));
        if self.callers == 0 {
            return bad("at least one caller".into());
        }
        if self.callers > MAX_CALLERS {
            return bad(format!(
                "{} callers: at most {MAX_CALLERS} (each is a task with its own buffers)",
                self.callers
            ));
        }
        if self.requests == 0 {
            return bad("at least one request".into());
        }
        if self.grains == 0 {
            return bad("at least one grain".into());
        }
        if !(1..=1024).contains(&self.small_elements) {
            return bad(format!(
                "small requests of {} elements (1..=1024)",
                self.small_elements
            ));
        }
        if self.fan_out_every > 0 && !(2..=1024).contains(&self.fan_out) {
            return bad(format!(
                "fan-out calls of {} requests (2..=1024)",
                self.fan_out
            ));
        }
        if self.batch_every > 0 && !(1025..=1 << 24).contains(&self.batch_elements) {
            return bad(format!(
                "batch requests of {} elements (1025..=2^24)",
                self.batch_elements
            ));
        }
        // Each caller holds its batch's two operands, a copy in flight and
        // the sums: 24 bytes an element.
        let batch_bytes = u64::from(self.callers) * u64::from(self.batch_elements) * 24;
        if self.batch_every > 0 && batch_bytes > MAX_BATCH_BYTES {
            return bad(format!(
                "{} callers with batches of {} elements would hold {} MiB at once; at most {} \
                 MiB (fewer callers or smaller batches)",
                self.callers,
                self.batch_elements,
                batch_bytes >> 20,
                MAX_BATCH_BYTES >> 20
            ));
        }
        Ok(())
    }
}

/// Backends that were not run, with the reason.
pub type Skipped = Vec<(BackendKind, String)>;

/// The backends present on this machine: the CPU always, OpenCL where a
/// runtime is installed, CUDA where a driver, NVRTC and a GPU are, wgpu
/// where a Vulkan, Metal or DX12 adapter opens (otherwise skipped, with the
/// reason).
pub fn backends() -> (Vec<Arc<dyn Backend>>, Skipped) {
    let mut present: Vec<Arc<dyn Backend>> = vec![Arc::new(granary_kernels::CpuBackend::new())];
    let mut skipped = Vec::new();
    match granary_kernels::opencl::OpenClBackend::discover() {
        Ok(opencl) => present.push(Arc::new(opencl)),
        Err(err) => skipped.push((BackendKind::OpenCl, err.to_string())),
    }
    match granary_kernels::cuda::CudaBackend::discover() {
        Ok(cuda) => present.push(Arc::new(cuda)),
        Err(err) => skipped.push((BackendKind::Cuda, err.to_string())),
    }
    match granary_kernels::wgpu::WgpuBackend::discover() {
        Ok(wgpu) => present.push(Arc::new(wgpu)),
        Err(err) => skipped.push((BackendKind::Wgpu, err.to_string())),
    }
    (present, skipped)
}

/// Runs the demo on every backend in `backends`; `progress` gets the
/// number of requests answered so far, across backends.
pub async fn run(
    config: DemoConfig,
    backends: Vec<Arc<dyn Backend>>,
    skipped: Skipped,
    progress: impl Fn(u64) + Send + Sync + 'static,
) -> Result<DemoReport, DemoError> {
    config.validate()?;
    let progress = Arc::new(progress);
    let answered = Arc::new(AtomicU64::new(0));
    let mut paths = Vec::new();
    let mut activations = 0;
    let mut warm_ups = Vec::new();
    for backend in backends {
        let kind = backend.kind();
        let builder = GpuBridge::builder().kernels([DOUBLE, VECTOR_ADD]);
        // The CPU backend alone, or the device backend with no fallback.
        let builder = if kind == BackendKind::Cpu {
            builder
        } else {
            builder.backend(backend)
        };
        let bridge = builder
            .config(BridgeConfig {
                fallback: FallbackPolicy::Fail,
                ..BridgeConfig::default()
            })
            .build()
            .map_err(|err| DemoError::Bridge(err.to_string()))?;
        let silo = Silo::builder()
            .host::<Compute>()
            .service(Arc::new(bridge.clone()))
            .build()
            .map_err(|err| DemoError::Bridge(err.to_string()))?;
        // Builds and launches are paid once, before the clock starts: the
        // table is about requests, not compilers.
        let warm_started = Instant::now();
        let warmed = warm_up(&bridge, config).await;
        warm_ups.push((kind, warm_started.elapsed()));
        let outcome = match warmed {
            Ok(()) => run_backend(&silo, config, &answered, &progress).await,
            Err(err) => Err(err),
        };
        activations += silo.activations_started();
        silo.shutdown().await;
        bridge.shutdown(StopMode::Drain).await;
        let (latencies, elapsed) = outcome?;
        let fan_out = u64::from(config.fan_out);
        for (path, latency_ns, per_call) in [
            ("ring", latencies.ring, 1),
            ("fan-out", latencies.fan_out, fan_out),
            ("batch", latencies.batch, 1),
        ] {
            if latency_ns.is_empty() {
                continue;
            }
            paths.push(PathReport {
                backend: kind,
                path,
                requests: latency_ns.len() * per_call,
                elapsed,
                latency_ns,
            });
        }
    }
    Ok(DemoReport {
        config,
        paths,
        skipped,
        activations,
        warm_ups,
    })
}

/// What one caller, or all of a backend's callers, measured per path.
struct Latencies {
    ring: Histogram<u64>,
    fan_out: Histogram<u64>,
    batch: Histogram<u64>,
}

impl Latencies {
    fn new() -> Latencies {
        Latencies {
            ring: histogram(),
            fan_out: histogram(),
            batch: histogram(),
        }
    }

    fn add(&mut self, other: &Latencies) -> Result<(), DemoError> {
        for (into, from) in [
            (&mut self.ring, &other.ring),
            (&mut self.fan_out, &other.fan_out),
            (&mut self.batch, &other.batch),
        ] {
            into.add(from)
                .map_err(|err| DemoError::Request(err.to_string()))?;
        }
        Ok(())
    }
}

/// One request down each path the run will use, straight to the bridge.
async fn warm_up(bridge: &GpuBridge, config: DemoConfig) -> Result<(), DemoError> {
    let small = f32_bytes(&vec![1.0; config.small_elements as usize]);
    bridge
        .execute("double", &small)
        .await
        .map_err(|err| DemoError::Request(format!("warm-up double: {err}")))?;
    if config.fan_out_every > 0 {
        let group = vec![small.clone(); config.fan_out as usize];
        for answer in &bridge.execute_many("double", &group).await {
            answer.map_err(|err| DemoError::Request(format!("warm-up fan-out: {err}")))?;
        }
    }
    if config.batch_every > 0 {
        let large = f32_bytes(&vec![1.0; 2 * config.batch_elements as usize]);
        bridge
            .execute("vector_add", &large)
            .await
            .map_err(|err| DemoError::Request(format!("warm-up vector_add: {err}")))?;
    }
    Ok(())
}

async fn run_backend(
    silo: &Silo,
    config: DemoConfig,
    answered: &Arc<AtomicU64>,
    progress: &Arc<impl Fn(u64) + Send + Sync + 'static>,
) -> Result<(Latencies, Duration), DemoError> {
    let started = Instant::now();
    let callers: Vec<_> = (0..config.callers)
        .map(|caller| {
            let share = config.requests / u64::from(config.callers)
                + u64::from(u64::from(caller) < config.requests % u64::from(config.callers));
            let (silo, answered, progress) = (silo.clone(), answered.clone(), progress.clone());
            tokio::spawn(async move {
                call_many(&silo, config, caller, share, &answered, &*progress).await
            })
        })
        .collect();
    let mut latencies = Latencies::new();
    for caller in callers {
        let measured = caller
            .await
            .map_err(|err| DemoError::Request(format!("a caller task failed: {err}")))??;
        latencies.add(&measured)?;
    }
    Ok((latencies, started.elapsed()))
}

/// 1 ns to 1 min, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("constant bounds are valid")
}

/// A grain that runs kernels on its silo's GPU bridge, hosted as
/// `"compute"`. Its messages are called on its own silo only, so it
/// accepts none by name.
#[derive(GrainType)]
#[grain(name = "compute")]
struct Compute {
    bridge: Option<Arc<GpuBridge>>,
    /// The `double` kernel, resolved once per activation: its calls look
    /// nothing up by name.
    double: Option<Kernel<f32, f32>>,
}

impl Grain for Compute {
    fn new(_: &GrainKey) -> Compute {
        Compute {
            bridge: None,
            double: None,
        }
    }

    async fn on_activate(&mut self, ctx: &mut GrainContext) -> Result<(), ActivationError> {
        let bridge = ctx
            .service::<GpuBridge>()
            .ok_or_else(|| ActivationError("no GPU bridge on this silo".into()))?;
        self.double = Some(
            bridge
                .kernel::<Double>()
                .map_err(|err| ActivationError(format!("the double kernel: {err}")))?,
        );
        self.bridge = Some(bridge);
        Ok(())
    }
}

/// Doubles every input: a batch of small inferences, fanned out as one
/// group on the ring.
#[derive(Message)]
#[message(reply = Result<Vec<Vec<f32>>, ExecuteError>)]
struct DoubleMany {
    inputs: Vec<Vec<f32>>,
}

impl Handler<DoubleMany> for Compute {
    async fn handle(
        &mut self,
        many: DoubleMany,
        _: &mut GrainContext,
    ) -> Result<Vec<Vec<f32>>, ExecuteError> {
        let double = self.double.as_ref().ok_or(ExecuteError::ShutDown)?;
        double.call_many(&many.inputs).await.into_iter().collect()
    }
}

/// Run `kernel` on `input`.
#[derive(Message)]
#[message(reply = Result<Vec<u8>, ExecuteError>)]
struct Run {
    kernel: &'static str,
    input: Vec<u8>,
}

impl Handler<Run> for Compute {
    async fn handle(&mut self, run: Run, _: &mut GrainContext) -> Result<Vec<u8>, ExecuteError> {
        let bridge = self.bridge.as_ref().ok_or(ExecuteError::ShutDown)?;
        bridge.execute(run.kernel, &run.input).await
    }
}

/// Asks grain `key` to run `kernel` on `input`.
async fn compute(
    silo: &Silo,
    key: u64,
    kernel: &'static str,
    input: Vec<u8>,
) -> Result<Vec<u8>, DemoError> {
    silo.grain::<Compute>(key)
        .call(Run { kernel, input })
        .await
        .map_err(|err| DemoError::Request(err.to_string()))?
        .map_err(|err| DemoError::Request(err.to_string()))
}

async fn call_many(
    silo: &Silo,
    config: DemoConfig,
    caller: u32,
    count: u64,
    answered: &AtomicU64,
    progress: &(impl Fn(u64) + Send + Sync),
) -> Result<Latencies, DemoError> {
    let mut latencies = Latencies::new();
    let batch_elements = config.batch_elements as usize;
    // Made only where batches are sent: with none, `batch_elements` is not
    // checked, and a huge one must not be allocated.
    let batch_input = if config.batch_every > 0 {
        f32_bytes(
            &(0..2 * batch_elements)
                .map(|i| (i % batch_elements) as f32)
                .collect::<Vec<_>>(),
        )
    } else {
        Vec::new()
    };
    for i in 0..count {
        let is_batch = config.batch_every > 0 && i % config.batch_every == config.batch_every - 1;
        let started = Instant::now();
        if is_batch {
            let key = grain_key(caller, i, config.grains);
            let output = compute(silo, key, "vector_add", batch_input.clone()).await?;
            let sums = bytes_f32(&output);
            let checked = sums.len() == batch_elements
                && sums
                    .iter()
                    .enumerate()
                    .all(|(j, sum)| *sum == 2.0 * j as f32);
            if !checked {
                return Err(DemoError::Request("a vector add came back wrong".into()));
            }
            latencies.batch.saturating_record(elapsed_ns(started));
        } else if config.fan_out_every > 0 && i % config.fan_out_every == config.fan_out_every / 2 {
            // A batch of inferences unique to this caller and turn.
            let base = (caller as f32) * 1e4 + (i % 10_000) as f32;
            let inputs: Vec<Vec<f32>> = (0..config.fan_out)
                .map(|member| {
                    (0..config.small_elements)
                        .map(|j| base + (member * config.small_elements + j) as f32 * 0.5)
                        .collect()
                })
                .collect();
            let key = grain_key(caller, i, config.grains);
            let outputs = silo
                .grain::<Compute>(key)
                .call(DoubleMany {
                    inputs: inputs.clone(),
                })
                .await
                .map_err(|err| DemoError::Request(err.to_string()))?
                .map_err(|err| DemoError::Request(err.to_string()))?;
            let checked = outputs.len() == inputs.len()
                && outputs.iter().zip(&inputs).all(|(output, input)| {
                    output.len() == input.len()
                        && output.iter().zip(input).all(|(out, x)| *out == 2.0 * x)
                });
            if !checked {
                return Err(DemoError::Request(format!(
                    "caller {caller} fan-out {i} came back wrong"
                )));
            }
            latencies.fan_out.saturating_record(elapsed_ns(started));
        } else {
            // A request unique to this caller and turn.
            let base = (caller as f32) * 1e4 + (i % 10_000) as f32;
            let values: Vec<f32> = (0..config.small_elements)
                .map(|j| base + j as f32)
                .collect();
            let key = grain_key(caller, i, config.grains);
            let output = compute(silo, key, "double", f32_bytes(&values)).await?;
            let doubled = bytes_f32(&output);
            let checked = doubled.len() == values.len()
                && doubled.iter().zip(&values).all(|(out, x)| *out == 2.0 * x);
            if !checked {
                return Err(DemoError::Request(format!(
                    "caller {caller} request {i} came back wrong"
                )));
            }
            latencies.ring.saturating_record(elapsed_ns(started));
        }
        let done = answered.fetch_add(1, Ordering::Relaxed) + 1;
        if done % 1024 == 0 {
            progress(done);
        }
    }
    Ok(latencies)
}

/// Spreads callers' requests over the grains.
fn grain_key(caller: u32, request: u64, grains: u32) -> u64 {
    (u64::from(caller) * 7919 + request) % u64::from(grains)
}

fn elapsed_ns(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
