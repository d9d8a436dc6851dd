//! How a bridge is set up.

use std::time::Duration;

use granary_kernels::{KernelConfig, WaitPolicy};

/// What happens when a device kernel fails to build, or its device fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FallbackPolicy {
    /// Run the request on the CPU backend, if the kernel has a CPU
    /// implementation; each fallback is logged and counted.
    #[default]
    Cpu,
    /// Fail the request with the device's error.
    Fail,
}

/// The bridge's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BridgeConfig {
    /// Each persistent kernel's settings. `kernel.capacity` (a power of two,
    /// `2..=2^20`) is also the most requests in flight per kernel and
    /// device: a call waits for one of those slots.
    pub kernel: KernelConfig,
    /// Most requests one ring claim carries (`1..=capacity`, default 16).
    /// Requests that arrive together go into the ring together; 1 turns
    /// micro-batching off.
    pub micro_batch: usize,
    /// How long a call waits for a slot before failing with `Overloaded`
    /// (default 1 s). Waiting needs tokio's time driver, which
    /// `#[tokio::main]` enables.
    pub overload_timeout: Duration,
    /// How long a kernel's heartbeat may stand still while requests are
    /// pending before they fail with `DeviceHung` and the kernel is
    /// relaunched (default 2 s).
    pub hang_timeout: Duration,
    /// How long a shutdown waits for each kernel to exit (default 5 s).
    pub stop_timeout: Duration,
    /// What to do when a device cannot run a kernel.
    pub fallback: FallbackPolicy,
    /// The longest a call spins for its ring answer before its task parks
    /// (default 50 µs; zero never spins). A call spins only while few
    /// requests are in flight on its kernel, and only for a few times the
    /// kernel's average round trip (`bridge/instance.rs` rule 8).
    pub spin: Duration,
}

impl Default for BridgeConfig {
    fn default() -> BridgeConfig {
        BridgeConfig {
            // One compute unit stays free on every device for batch kernels,
            // which could not run beside spinning persistent ones.
            kernel: KernelConfig {
                keep_free_compute_units: 1,
                // Patient before parking: a parked kernel or completion
                // thread costs a futex wake-up per request (measured: the
                // round trip's p50 went from 8.9 µs to the figure in
                // BENCHMARKS.md). Yielding gives the core away to any
                // runnable thread, so waiting this way starves no one.
                policy: WaitPolicy {
                    spins: 256,
                    yields: 512,
                    ..WaitPolicy::default()
                },
                ..KernelConfig::default()
            },
            micro_batch: 16,
            overload_timeout: Duration::from_secs(1),
            hang_timeout: Duration::from_secs(2),
            stop_timeout: Duration::from_secs(5),
            fallback: FallbackPolicy::Cpu,
            spin: Duration::from_micros(50),
        }
    }
}

impl BridgeConfig {
    /// Checks every range documented above.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let capacity = self.kernel.capacity;
        if !capacity.is_power_of_two() || !(2..=1 << 20).contains(&capacity) {
            return Err(format!(
                "kernel.capacity {capacity} is not a power of two in 2..=2^20"
            ));
        }
        if self.micro_batch == 0 || self.micro_batch > capacity as usize {
            return Err(format!(
                "micro_batch {} is not in 1..={capacity}",
                self.micro_batch
            ));
        }
        if self.hang_timeout.is_zero() {
            return Err("hang_timeout is zero".into());
        }
        Ok(())
    }
}
