//! What a backend reports about each device it finds.

use std::fmt;

/// Which backend drives a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendKind {
    /// A host thread runs the kernel loop.
    Cpu,
    /// OpenCL, through opencl3.
    OpenCl,
    /// CUDA, through cudarc.
    Cuda,
    /// Vulkan, Metal or DX12, through wgpu.
    Wgpu,
}

impl BackendKind {
    /// Whether the backend runs persistent kernels: a kernel that stays on
    /// the device and drains the request ring itself. The wgpu backend
    /// does not (WGSL gives a spinning shader no forward-progress guarantee
    /// and the host no coherent memory it could poll): a host thread drains
    /// the ring into one dispatch per micro-batch.
    pub const fn runs_persistent_kernels(self) -> bool {
        match self {
            BackendKind::Cpu | BackendKind::OpenCl | BackendKind::Cuda => true,
            BackendKind::Wgpu => false,
        }
    }
}

/// What kind of processor a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// A CPU (the CPU backend, or an OpenCL CPU device such as POCL's).
    Cpu,
    /// A GPU.
    Gpu,
    /// Anything else an API reports (an FPGA, a DSP).
    Accelerator,
}

/// One device, as discovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The backend that found it.
    pub backend: BackendKind,
    /// Index among that backend's devices, from 0.
    pub index: u32,
    /// The name the platform reports.
    pub name: String,
    /// Processor kind.
    pub kind: DeviceKind,
    /// Compute units (cores, SMs, work-group slots), at least 1.
    pub compute_units: u32,
    /// Memory the device has, in bytes.
    pub total_memory: u64,
    /// Memory free when discovered, in bytes, at most `total_memory`.
    pub free_memory: u64,
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?}#{} {} ({:?}, {} compute units, {} MiB free of {} MiB)",
            self.backend,
            self.index,
            self.name,
            self.kind,
            self.compute_units,
            self.free_memory >> 20,
            self.total_memory >> 20
        )
    }
}

/// The CPU backend's one device: this host. Memory figures come from
/// `/proc/meminfo` (`MemTotal`, `MemAvailable`); where that file is missing
/// or unreadable both are reported as 0, which the broker treats as a device
/// with no memory to reserve.
pub fn host_device() -> DeviceInfo {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let (total, available) = parse_meminfo(&meminfo);
    DeviceInfo {
        backend: BackendKind::Cpu,
        index: 0,
        name: host_cpu_name(),
        kind: DeviceKind::Cpu,
        compute_units: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        total_memory: total,
        free_memory: available.min(total),
    }
}

/// `(MemTotal, MemAvailable)` in bytes from the text of `/proc/meminfo`;
/// 0 for a field that is missing or malformed.
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse::<u64>().ok())
            .map_or(0, |kib| kib.saturating_mul(1024))
    };
    (field("MemTotal"), field("MemAvailable"))
}

fn host_cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| format!("host CPU ({})", std::env::consts::ARCH))
}
