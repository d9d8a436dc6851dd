//! The `granary` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use granary::demo::{self, DemoConfig};
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

#[derive(Subcommand)]
enum Command {
    /// List the devices this node's backends find, with their memory.
    Devices,
    /// Drive the request ring under load and print throughput and latency.
    Demo {
        /// Producer threads.
        #[arg(long, default_value_t = DemoConfig::default().producers)]
        producers: u32,
        /// Messages per producer.
        #[arg(long, default_value_t = DemoConfig::default().messages_per_producer)]
        messages: u64,
        /// Payload bytes per message (at least 24).
        #[arg(long, default_value_t = DemoConfig::default().payload)]
        payload: u32,
        /// Ring capacity (a power of two).
        #[arg(long, default_value_t = DemoConfig::default().capacity)]
        capacity: u32,
        /// Hide the progress bar.
        #[arg(long)]
        no_progress: bool,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Devices => {
            // The CPU backend is always present; OpenCL where a runtime is
            // installed. CUDA arrives with its own issue.
            let mut devices = vec![granary::kernels::host_device()];
            let opencl = granary::kernels::opencl::OpenClBackend::discover();
            match &opencl {
                Ok(backend) => devices.extend(backend.devices()),
                Err(err) => println!("OpenCL backend unavailable: {err}"),
            }
            println!("{} device(s):", devices.len());
            for device in &devices {
                println!("  {device}");
            }
            ExitCode::SUCCESS
        }
        Command::Demo {
            producers,
            messages,
            payload,
            capacity,
            no_progress,
        } => {
            let config = DemoConfig {
                producers,
                messages_per_producer: messages,
                payload,
                capacity,
            };
            let total = u64::from(producers).saturating_mul(messages);
            let bar = if no_progress {
                ProgressBar::hidden()
            } else {
                ProgressBar::new(total)
            };
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} messages, eta {eta}",
            ) {
                bar.set_style(style);
            }
            println!(
                "granary demo: {producers} producer threads → MPSC ring ({capacity} slots) → 1 consumer, {total} messages of {payload} B"
            );
            let result = demo::run(config, |received| bar.set_position(received));
            bar.finish_and_clear();
            match result {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("granary demo: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
