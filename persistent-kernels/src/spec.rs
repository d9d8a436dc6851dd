//! What a kernel is: id, version, request and response shapes, and
//! implementations.

use std::fmt;

/// The element type of a request or response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElementType {
    /// Unsigned bytes.
    U8,
    /// 32-bit unsigned integers.
    U32,
    /// 32-bit signed integers.
    I32,
    /// 32-bit floats.
    F32,
    /// 64-bit floats.
    F64,
}

impl ElementType {
    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            ElementType::U8 => 1,
            ElementType::U32 | ElementType::I32 | ElementType::F32 => 4,
            ElementType::F64 => 8,
        }
    }
}

/// How many elements a request or response holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Count {
    /// Exactly this many.
    Exactly(u32),
    /// From `min` to `max` elements, in steps of `multiple` (at least 1):
    /// vector add takes two vectors, so an even count.
    Between {
        /// Fewest elements.
        min: u32,
        /// Most elements.
        max: u32,
        /// The count is a multiple of this.
        multiple: u32,
    },
}

/// The shape of a request or response: element type and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Element type.
    pub element: ElementType,
    /// Element count.
    pub count: Count,
}

/// A byte length that does not fit a [`Shape`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShapeError {
    /// The length given.
    pub len: usize,
    /// The shape it was checked against.
    pub shape: Shape,
}

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let element = self.shape.element;
        match self.shape.count {
            Count::Exactly(n) => write!(
                f,
                "{} bytes is not {n} elements of {element:?} ({} bytes)",
                self.len,
                n as usize * element.size()
            ),
            Count::Between { min, max, multiple } => write!(
                f,
                "{} bytes is not {min}..={max} elements of {element:?} in steps of {multiple}",
                self.len
            ),
        }
    }
}

impl std::error::Error for ShapeError {}

impl Shape {
    /// A shape of exactly `count` elements.
    pub const fn exactly(element: ElementType, count: u32) -> Shape {
        Shape {
            element,
            count: Count::Exactly(count),
        }
    }

    /// A shape of `min..=max` elements in steps of `multiple`.
    pub const fn between(element: ElementType, min: u32, max: u32, multiple: u32) -> Shape {
        Shape {
            element,
            count: Count::Between { min, max, multiple },
        }
    }

    /// The largest byte length the shape allows.
    pub const fn max_bytes(&self) -> usize {
        let count = match self.count {
            Count::Exactly(n) => n,
            Count::Between { max, .. } => max,
        };
        count as usize * self.element.size()
    }

    /// [`Shape::max_bytes`] as a ring's payload limit: a shape too large
    /// for a `u32` asks for `u32::MAX` bytes, which a ring refuses with a
    /// typed error, where truncating would make a small ring for it.
    pub(crate) fn ring_payload(&self) -> u32 {
        u32::try_from(self.max_bytes()).unwrap_or(u32::MAX)
    }

    /// The element count of `len` bytes, if the shape allows it.
    pub fn check(&self, len: usize) -> Result<usize, ShapeError> {
        let error = ShapeError { len, shape: *self };
        let size = self.element.size();
        if len % size != 0 {
            return Err(error);
        }
        let count = len / size;
        let fits = match self.count {
            Count::Exactly(n) => count == n as usize,
            Count::Between { min, max, multiple } => {
                (min as usize..=max as usize).contains(&count)
                    && count % (multiple.max(1) as usize) == 0
            }
        };
        if fits { Ok(count) } else { Err(error) }
    }
}

/// The outcome a response carries in its slot's status word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    /// The response holds the result.
    Ok = 0,
    /// The request's length does not fit the kernel's request shape.
    BadLength = 1,
    /// The request's contents are invalid for the kernel (for example a
    /// non-finite scale factor).
    BadInput = 2,
    /// The kernel failed while processing (a CPU implementation panicked,
    /// or a device reported a fault).
    Fault = 3,
    /// The kernel has no implementation on this backend.
    Unsupported = 4,
}

impl Status {
    /// The status for a slot's status word, or `None` for an unknown code.
    pub fn from_code(code: u32) -> Option<Status> {
        Some(match code {
            0 => Status::Ok,
            1 => Status::BadLength,
            2 => Status::BadInput,
            3 => Status::Fault,
            4 => Status::Unsupported,
            _ => return None,
        })
    }

    /// The slot status word for this status.
    pub const fn code(self) -> u32 {
        self as u32
    }
}

/// A CPU implementation: reads `request`, writes the response into
/// `response` and returns how many bytes it wrote. The request has already
/// been checked against the request shape (or the batch shape), and
/// `response` holds at least [`KernelSpec::output_len`] bytes.
pub type CpuFn = fn(request: &[u8], response: &mut [u8]) -> Result<usize, Status>;

/// The response length of a request, in bytes, or the status that
/// rejects it (for example matrix dimensions that do not match the data).
/// Called after the shape check; the batch path sizes its output buffer
/// with it and the bridge routes on it.
pub type OutputLenFn = fn(request: &[u8]) -> Result<usize, Status>;

/// A kernel's WGSL, for the wgpu backend: `granary_process` (one ring
/// request of a micro-batch) and `granary_element` (one output word of the
/// batch path); the contract is in `device/prelude.wgsl`.
#[derive(Debug, Clone, Copy)]
pub struct Wgsl {
    /// The source.
    pub source: &'static str,
    /// How many times the batch path dispatches `granary_batch` over a
    /// valid request, at least 1. A kernel whose invocations loop longer
    /// than [`WGSL_CHUNK`] iterations (a long sum) takes one pass per chunk
    /// and carries its partial results in the response between passes:
    /// lavapipe ends an invocation's loops after 65535 iterations in all.
    pub passes: fn(request: &[u8]) -> u32,
}

/// The most loop iterations one invocation of a WGSL batch pass runs
/// (`GRANARY_CHUNK` in `device/prelude.wgsl`).
pub const WGSL_CHUNK: u32 = 32768;

/// One pass, for kernels whose invocations never loop long.
pub fn one_pass(_: &[u8]) -> u32 {
    1
}

/// One kernel.
///
/// Device sources define two entry points:
/// - `granary_process(request, request_len, response, response_max,
///   &response_len) -> status`, a device function that the persistent
///   template calls once per ring request;
/// - `granary_batch(request, request_len, response, response_len)`, a
///   kernel launched over one work-item per output element for the
///   launch-per-batch path.
///
/// Both see the status codes of `device/prelude.h`
/// ([`DEVICE_PRELUDE`](crate::DEVICE_PRELUDE)). WGSL sources define the
/// same two operations as functions the wgpu backend's entry points call
/// (`device/prelude.wgsl`).
#[derive(Debug, Clone, Copy)]
pub struct KernelSpec {
    /// Stable id, used to register and call the kernel.
    pub id: &'static str,
    /// Version; bumped when the kernel's semantics change.
    pub version: u32,
    /// What a ring request holds: at most one ring slot.
    pub request: Shape,
    /// What a ring response holds.
    pub response: Shape,
    /// What a batch-path request holds: inputs too large for a ring slot.
    pub batch_request: Shape,
    /// The response length of a valid request.
    pub output_len: OutputLenFn,
    /// OpenCL C source with `granary_process` and `granary_batch`.
    pub opencl_c: Option<&'static str>,
    /// CUDA C source with the same two entry points.
    pub cuda_c: Option<&'static str>,
    /// WGSL for the wgpu backend.
    pub wgsl: Option<Wgsl>,
    /// The CPU implementation.
    pub cpu: Option<CpuFn>,
}

impl KernelSpec {
    /// Whether `request` goes through a ring slot: it fits the ring request
    /// shape and its response fits the ring response shape.
    pub fn fits_ring(&self, request: &[u8]) -> bool {
        self.request.check(request.len()).is_ok()
            && (self.output_len)(request).is_ok_and(|len| len <= self.response.max_bytes())
    }
}
