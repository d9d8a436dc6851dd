//! The `granary` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use granary::cluster_demo::{self, ClusterDemoConfig, DemoGrains};
use granary::demo::{self, DemoConfig};
use granary::node_file::{self, DeviceBackend, NodeFile};
use granary::ring_demo::{self, RingDemoConfig};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "granary",
    version,
    about = "Virtual actors whose compute goes to GPUs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How `granary node` writes its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// List the devices this node's backends find, with their memory.
    Devices,
    /// Send small requests, fan-outs of small requests and batch requests
    /// from many grains through the GPU bridge on every backend present,
    /// and print latency and throughput.
    Demo {
        /// Concurrent callers.
        #[arg(long, default_value_t = DemoConfig::default().callers, conflicts_with = "nodes")]
        callers: u32,
        /// Requests per backend.
        #[arg(long, default_value_t = DemoConfig::default().requests, conflicts_with = "nodes")]
        requests: u64,
        /// `f32` elements per small request (1..=1024).
        #[arg(long, default_value_t = DemoConfig::default().small_elements, conflicts_with = "nodes")]
        small_elements: u32,
        /// One batch request every this many requests per caller (0: none).
        #[arg(long, default_value_t = DemoConfig::default().batch_every, conflicts_with = "nodes")]
        batch_every: u64,
        /// Elements per operand of each batch vector add.
        #[arg(long, default_value_t = DemoConfig::default().batch_elements, conflicts_with = "nodes")]
        batch_elements: u32,
        /// One fan-out call (a batch of small inferences, one group on the
        /// ring) every this many requests per caller (0: none).
        #[arg(long, default_value_t = DemoConfig::default().fan_out_every, conflicts_with = "nodes")]
        fan_out_every: u64,
        /// Small requests per fan-out call (2..=1024).
        #[arg(long, default_value_t = DemoConfig::default().fan_out, conflicts_with = "nodes")]
        fan_out: u32,
        /// Grains the requests are spread over (default 1000; with
        /// `--nodes`, 48).
        #[arg(long)]
        grains: Option<u32>,
        /// Run the multi-node demo instead: this many silo processes on
        /// loopback, GPU grains placed by free memory, one silo killed
        /// midway, every grain's persisted state checked.
        #[arg(long)]
        nodes: Option<u32>,
        /// Sequential calls per grain in the multi-node demo.
        #[arg(long, default_value_t = ClusterDemoConfig::default().calls, requires = "nodes")]
        calls: u32,
        /// The silos' device backend in the multi-node demo; each silo
        /// takes its own share of the device's memory.
        #[arg(long, value_enum, default_value_t = DeviceBackend::Cpu, requires = "nodes")]
        backend: DeviceBackend,
        /// Run the multi-node demo's membership and directory on etcd at
        /// these endpoints (comma-separated; a build with `--features
        /// etcd`).
        #[arg(long, value_delimiter = ',', requires = "nodes")]
        etcd: Option<Vec<String>>,
        /// Run the rebalancer's demo with `--nodes`: every silo but the
        /// last filled to the high water mark with ledgers, then the last
        /// one joins empty and takes ledgers, with their state, until used
        /// device memory is within 20 points across silos.
        #[arg(long, requires = "nodes", conflicts_with_all = ["grains", "calls"])]
        rebalance: bool,
        /// Hide the progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Run a silo of a cluster from a TOML file: listen address, gossip
    /// address and seeds, the cluster's name and secret, storage, devices.
    Node {
        /// The configuration file.
        #[arg(long)]
        config: std::path::PathBuf,
        /// How log lines are written on standard error: `text` for people,
        /// `json` (one object per line, with the fields of every span it
        /// falls in, `trace` included) for a log pipeline.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Print the cluster as a node's admin endpoint sees it: every silo,
    /// its activations, grain types and devices.
    Status {
        /// The node's admin endpoint (`http://127.0.0.1:9100`).
        #[arg(long)]
        admin: String,
        /// The endpoint's bearer token, if it asks for one (default: the
        /// `GRANARY_ADMIN_TOKEN` environment variable).
        #[arg(long, env = "GRANARY_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Print a fresh cluster secret: 32 random bytes as 64 hexadecimal
    /// digits, for the `secret` of every node file of one cluster.
    Secret,
    /// Make a development CA (or use the one in the folder) and a
    /// certificate for each node, for the `tls` section of its file.
    Cert {
        /// The folder for `ca.pem`, `ca-key.pem` and each node's
        /// `NAME.pem` and `NAME-key.pem`.
        #[arg(long, default_value = "certs")]
        dir: std::path::PathBuf,
        /// Each node's IP address, as in its `listen` (`10.0.0.5`): peers
        /// dial the address a silo binds.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Drive the request ring alone under load and print throughput and
    /// latency.
    RingDemo {
        /// Producer threads.
        #[arg(long, default_value_t = RingDemoConfig::default().producers)]
        producers: u32,
        /// Messages per producer.
        #[arg(long, default_value_t = RingDemoConfig::default().messages_per_producer)]
        messages: u64,
        /// Payload bytes per message (at least 24).
        #[arg(long, default_value_t = RingDemoConfig::default().payload)]
        payload: u32,
        /// Ring capacity (a power of two).
        #[arg(long, default_value_t = RingDemoConfig::default().capacity)]
        capacity: u32,
        /// Hide the progress bar.
        #[arg(long)]
        no_progress: bool,
    },
}

/// A multi-threaded tokio runtime, or `None` after saying why not.
fn runtime(command: &str) -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .inspect_err(|err| eprintln!("{command}: cannot start the runtime: {err}"))
        .ok()
}

fn progress_bar(total: u64, hidden: bool, unit: &str) -> ProgressBar {
    let bar = if hidden {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{{spinner}} [{{elapsed_precise}}] {{wide_bar}} {{human_pos}}/{{human_len}} {unit}, eta {{eta}}"
    )) {
        bar.set_style(style);
    }
    bar
}

/// Prints a multi-node demo's report, or why it could not run; success
/// only if it ran and `passed` says its checks held.
fn reported<R: std::fmt::Display>(
    result: Result<R, granary::node_file::NodeRunError>,
    passed: impl Fn(&R) -> bool,
) -> ExitCode {
    match result {
        Ok(report) => {
            print!("{report}");
            if passed(&report) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("granary demo: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `n` as an English ordinal: 1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st.
fn ordinal(n: u64) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Devices => {
            // The CPU backend is always present; OpenCL where a runtime is
            // installed; CUDA where a driver, NVRTC and a GPU are; wgpu
            // where a Vulkan, Metal or DX12 adapter opens.
            let mut devices = vec![(granary::kernels::host_device(), None)];
            match granary::kernels::opencl::OpenClBackend::discover() {
                Ok(backend) => devices.extend(backend.devices().into_iter().map(|d| (d, None))),
                Err(err) => println!("{err}"),
            }
            match granary::kernels::cuda::CudaBackend::discover() {
                Ok(backend) => devices.extend(backend.devices().into_iter().map(|d| (d, None))),
                Err(err) => println!("{err}"),
            }
            match granary::kernels::wgpu::WgpuBackend::discover() {
                Ok(backend) => {
                    for skipped in backend.skipped() {
                        println!("wgpu: an adapter was skipped: {skipped}");
                    }
                    devices.extend(
                        backend
                            .adapters()
                            .into_iter()
                            .map(|adapter| (adapter.info.clone(), Some(adapter))),
                    );
                }
                Err(err) => println!("{err}"),
            }
            println!("{} device(s):", devices.len());
            for (device, adapter) in &devices {
                println!("  {device}");
                if let Some(adapter) = adapter {
                    println!(
                        "    {} {} (driver {}), storage bindings up to {} MiB, memory {}",
                        adapter.api,
                        adapter.device_type,
                        adapter.driver,
                        adapter.max_storage_binding >> 20,
                        match adapter.memory {
                            granary::kernels::wgpu::MemorySource::Reported => {
                                "as the driver reports it"
                            }
                            granary::kernels::wgpu::MemorySource::HostShare => {
                                "a configured share of the host's (the driver reports none)"
                            }
                        }
                    );
                }
                if device.backend.runs_persistent_kernels() {
                    println!(
                        "    runs persistent kernels: a kernel loop that stays running drains the ring"
                    );
                } else {
                    println!(
                        "    runs no persistent kernel: a host thread drains the ring into one \
                         dispatch per micro-batch"
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Command::Cert { dir, names } => match granary::certs::write_certs(&dir, &names) {
            Ok(files) => {
                if files.new_ca {
                    println!(
                        "a new CA: {} (its key beside it: keep it off the nodes)",
                        files.ca.display()
                    );
                } else {
                    println!("the CA in {}", files.ca.display());
                }
                for (name, tls) in &files.nodes {
                    println!(
                        "{name}: tls = {{ ca = {:?}, cert = {:?}, key = {:?} }}",
                        tls.ca.display().to_string(),
                        tls.cert.display().to_string(),
                        tls.key.display().to_string()
                    );
                }
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("granary cert: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Secret => match granary::cluster::ClusterSecret::generate_hex() {
            Ok(secret) => {
                println!("{secret}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("granary secret: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Status { admin, token } => {
            let Some(runtime) = runtime("granary status") else {
                return ExitCode::FAILURE;
            };
            match runtime.block_on(granary::admin::fetch_cluster(&admin, token.as_deref())) {
                Ok(view) => {
                    // A closed output (`granary status | head -1`) is not
                    // an error worth a panic.
                    use std::io::Write;
                    let _ = write!(std::io::stdout(), "{}", granary::admin::table(&view));
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    use std::io::Write;
                    let _ = writeln!(std::io::stderr(), "granary status: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Node { config, log_format } => {
            let file = match NodeFile::load(&config) {
                Ok(file) => file,
                Err(err) => {
                    eprintln!("granary node: {err}");
                    return ExitCode::FAILURE;
                }
            };
            let Some(runtime) = runtime("granary node") else {
                return ExitCode::FAILURE;
            };
            // The node's warnings and errors (a fence, a lost lease, a
            // drain that outlived an activation) on standard error;
            // `RUST_LOG` sets the level (default `info`). Colours only on
            // a terminal, and not there with `NO_COLOR` set: a log file
            // (the demo's silos write theirs to one) or a collector gets
            // plain text.
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let logs = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(
                    std::io::IsTerminal::is_terminal(&std::io::stderr())
                        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty()),
                )
                .with_writer(std::io::stderr);
            let _ = match log_format {
                LogFormat::Text => logs.try_init(),
                LogFormat::Json => logs
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .try_init(),
            };
            // A node hosts the multi-node demo's grains: `granary demo
            // --nodes N` runs its silos this way.
            let ran = runtime.block_on(node_file::run_node(file, &DemoGrains::default()));
            // What is still running (a second signal, a spent grace) is
            // not waited for long.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            match ran {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    use std::io::Write;
                    let _ = writeln!(std::io::stderr(), "granary node: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo {
            nodes: Some(nodes),
            rebalance: true,
            backend,
            etcd,
            ..
        } => {
            let Some(runtime) = runtime("granary demo") else {
                return ExitCode::FAILURE;
            };
            println!(
                "granary demo --nodes {nodes} --rebalance: {} silo processes on loopback with \
                 {} MiB of {backend:?} device memory each, filled with ledgers ({} MiB resident \
                 each) to the high water mark (90%, less a step's working memory) and kept busy; then silo {nodes} joins empty \
                 and the rebalancer moves ledgers to it, with their state. Device memory settled \
                 on each silo (ledgers' buffers), as gossip shows it:",
                nodes.saturating_sub(1),
                cluster_demo::REBALANCE_SILO_MIB,
                cluster_demo::LEDGER_DEVICE_BYTES >> 20,
            );
            let config = cluster_demo::RebalanceDemoConfig {
                nodes,
                backend,
                etcd,
            };
            let result = runtime.block_on(cluster_demo::run_rebalance_demo(config, |line| {
                println!("{line}")
            }));
            reported(result, cluster_demo::RebalanceDemoReport::passed)
        }
        Command::Demo {
            nodes: Some(nodes),
            grains,
            calls,
            backend,
            etcd,
            no_progress,
            ..
        } => {
            let grains = grains.unwrap_or(ClusterDemoConfig::default().grains);
            let config = ClusterDemoConfig {
                nodes,
                grains,
                calls,
                backend,
                etcd,
            };
            let Some(runtime) = runtime("granary demo") else {
                return ExitCode::FAILURE;
            };
            let total = u64::from(grains).saturating_mul(u64::from(calls));
            let bar = progress_bar(total, no_progress, "calls");
            println!(
                "granary demo --nodes {nodes}: {nodes} silo processes on loopback (membership on {}, \
                 silo links over mutual TLS with a CA made for the run), {grains} GPU grains ({} MiB resident each on the {backend:?} backend, placed by free \
                 device memory), {calls} calls each, each call notifying an auditor grain on another silo; \
                 the busiest silo is killed halfway",
                if config.etcd.is_some() {
                    "etcd"
                } else {
                    "gossip"
                },
                cluster_demo::LEDGER_DEVICE_BYTES >> 20
            );
            let shown = bar.clone();
            let result = runtime.block_on(cluster_demo::run_cluster_demo(config, move |done| {
                shown.set_position(done)
            }));
            bar.finish_and_clear();
            reported(result, cluster_demo::ClusterDemoReport::passed)
        }
        Command::Demo {
            callers,
            requests,
            small_elements,
            batch_every,
            batch_elements,
            grains,
            fan_out_every,
            fan_out,
            no_progress,
            ..
        } => {
            let grains = grains.unwrap_or(DemoConfig::default().grains);
            let config = DemoConfig {
                callers,
                requests,
                small_elements,
                batch_every,
                batch_elements,
                grains,
                fan_out_every,
                fan_out,
            };
            let Some(runtime) = runtime("granary demo") else {
                return ExitCode::FAILURE;
            };
            let (backends, skipped) = demo::backends();
            let total = requests.saturating_mul(backends.len() as u64);
            let bar = progress_bar(total, no_progress, "requests");
            let batches = match batch_every {
                0 => "no batch-path requests".to_string(),
                n => format!(
                    "every {} a {batch_elements}-element vector add on the batch path",
                    ordinal(n)
                ),
            };
            let fan_outs = match fan_out_every {
                0 => "no fan-outs".to_string(),
                n => format!(
                    "every {} a fan-out of {fan_out} doubles as one group on the ring",
                    ordinal(n)
                ),
            };
            println!(
                "granary demo: {callers} callers × {requests} requests per backend, through {grains} grains \
                 to the GPU bridge ({small_elements}-element doubles on the ring path; {batches}, \
                 {fan_outs}), on {}",
                backends
                    .iter()
                    .map(|b| format!("{:?}", b.kind()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let shown = bar.clone();
            let result = runtime.block_on(demo::run(config, backends, skipped, move |done| {
                shown.set_position(done)
            }));
            bar.finish_and_clear();
            match result {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("granary demo: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::RingDemo {
            producers,
            messages,
            payload,
            capacity,
            no_progress,
        } => {
            let config = RingDemoConfig {
                producers,
                messages_per_producer: messages,
                payload,
                capacity,
            };
            let total = u64::from(producers).saturating_mul(messages);
            let bar = progress_bar(total, no_progress, "messages");
            println!(
                "granary ring-demo: {producers} producer threads → MPSC ring ({capacity} slots) → 1 consumer, {total} messages of {payload} B"
            );
            let result = ring_demo::run(config, |received| bar.set_position(received));
            bar.finish_and_clear();
            match result {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("granary ring-demo: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ordinal;

    #[test]
    fn ordinals_take_the_suffix_english_gives_them() {
        let cases = [
            (1, "1st"),
            (2, "2nd"),
            (3, "3rd"),
            (4, "4th"),
            (11, "11th"),
            (12, "12th"),
            (13, "13th"),
            (21, "21st"),
            (100, "100th"),
            (101, "101st"),
            (111, "111th"),
            (2_000, "2000th"),
        ];
        for (n, expected) in cases {
            assert_eq!(ordinal(n), expected);
        }
    }
}
