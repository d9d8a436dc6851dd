//! Typed kernels: a handle resolved once, calls in element types.
//!
//! `bridge.kernel::<Double>()?` (or `bridge.kernel_named::<f32, f32>("double")?`
//! for the latest version, `kernel_version` for a given one) looks the
//! kernel up and checks its element types once; after that a call does no
//! string lookup and no type check.
//!
//! 1. **No intermediate buffers per request.** A call's input is the
//!    caller's slice, seen as bytes (`bytemuck`, no copy), written
//!    straight into a ring slot. A single call's answer is copied from its
//!    slot straight into the caller's buffer (`call_into`: no allocation)
//!    or into one fresh `Vec<O>` (`call`). A group's answers land in the
//!    group's buffer first (`slots.rs` rule 6) and are copied from there
//!    (`call_many_into`: a few allocations per call, none per request;
//!    `call_many`: one `Vec` per answer). Batch-path answers come back in
//!    a buffer of their own and are copied from it.
//! 2. **Same routes as bytes.** Typed calls take the ring path or the batch
//!    path exactly as [`GpuBridge::execute`] does, with the same errors,
//!    plus [`ExecuteError::OutputTooSmall`] when a caller's buffer cannot
//!    hold an answer (the answer is dropped, the slot freed, the bridge
//!    serves on).
//! 3. **Little-endian.** The rings carry little-endian elements; typed
//!    calls reinterpret them in place, so this module exists only on
//!    little-endian targets (every target Granary's backends run on).

use std::marker::PhantomData;
use std::ops::Range;

use bytemuck::Pod;
use granary_kernels::{ElementType, KernelSpec, Status};
use tracing::Instrument;

use super::{ExecuteError, GpuBridge, refused};

/// An element type a kernel's shape can name, as plain old data. Sealed:
/// implemented for exactly the types [`ElementType`] names.
pub trait Element: Pod + Send + Sync + sealed::Sealed {
    /// The shape's name for it.
    const TYPE: ElementType;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for u8 {}
    impl Sealed for u32 {}
    impl Sealed for i32 {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

impl Element for u8 {
    const TYPE: ElementType = ElementType::U8;
}
impl Element for u32 {
    const TYPE: ElementType = ElementType::U32;
}
impl Element for i32 {
    const TYPE: ElementType = ElementType::I32;
}
impl Element for f32 {
    const TYPE: ElementType = ElementType::F32;
}
impl Element for f64 {
    const TYPE: ElementType = ElementType::F64;
}

/// A kernel known by type: its spec and its element types. Implement it
/// on a marker type to call a kernel of your own through
/// [`GpuBridge::kernel`]; the shipped kernels have theirs in
/// [`shipped`](crate::shipped).
pub trait TypedKernel {
    /// The kernel's spec (its id is how the bridge finds it).
    const SPEC: KernelSpec;
    /// Its request elements.
    type Input: Element;
    /// Its response elements.
    type Output: Element;
}

/// A registered kernel, resolved once, called in element types.
pub struct Kernel<I, O> {
    bridge: GpuBridge,
    index: usize,
    spec: KernelSpec,
    types: PhantomData<Types<I, O>>,
}

/// The handle's element types, without owning any (`fn` keeps it `Send`
/// and `Sync` whatever `I` and `O` are).
type Types<I, O> = fn(&[I]) -> Vec<O>;

impl<I, O> Clone for Kernel<I, O> {
    fn clone(&self) -> Kernel<I, O> {
        Kernel {
            bridge: self.bridge.clone(),
            index: self.index,
            spec: self.spec,
            types: PhantomData,
        }
    }
}

impl<I, O> std::fmt::Debug for Kernel<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("id", &self.spec.id)
            .field("input", &std::any::type_name::<I>())
            .field("output", &std::any::type_name::<O>())
            .finish()
    }
}

impl GpuBridge {
    /// The registered kernel `K`, in `K`'s own version, resolved once:
    /// `UnknownKernel` or `UnknownVersion` if it is not registered,
    /// `WrongElement` if its registered spec's element types are not `K`'s.
    pub fn kernel<K: TypedKernel>(&self) -> Result<Kernel<K::Input, K::Output>, ExecuteError> {
        self.kernel_version(K::SPEC.id, K::SPEC.version)
    }

    /// The registered kernel `id` (its latest version), called with input
    /// elements `I` and output elements `O`, resolved once: `UnknownKernel`
    /// if no kernel has that id, `WrongElement` if its shapes name other
    /// element types.
    pub fn kernel_named<I: Element, O: Element>(
        &self,
        id: &str,
    ) -> Result<Kernel<I, O>, ExecuteError> {
        Kernel::resolve(self, self.lookup(id)?)
    }

    /// [`GpuBridge::kernel_named`] for exactly `version`
    /// (`UnknownVersion` if it is not registered).
    pub fn kernel_version<I: Element, O: Element>(
        &self,
        id: &str,
        version: u32,
    ) -> Result<Kernel<I, O>, ExecuteError> {
        Kernel::resolve(self, self.lookup_version(id, version)?)
    }
}

impl<I: Element, O: Element> Kernel<I, O> {
    /// A handle on the kernel at `index`, if its element types are `I`
    /// and `O`.
    fn resolve(
        bridge: &GpuBridge,
        (index, spec): (usize, KernelSpec),
    ) -> Result<Kernel<I, O>, ExecuteError> {
        for (side, expected, given) in [
            ("request", spec.request.element, I::TYPE),
            ("batch request", spec.batch_request.element, I::TYPE),
            ("response", spec.response.element, O::TYPE),
        ] {
            if expected != given {
                return Err(ExecuteError::WrongElement {
                    kernel: spec.id,
                    side,
                    expected,
                    given,
                });
            }
        }
        Ok(Kernel {
            bridge: bridge.clone(),
            index,
            spec,
            types: PhantomData,
        })
    }

    /// The kernel's spec.
    pub fn spec(&self) -> &KernelSpec {
        &self.spec
    }

    /// Runs the kernel on `input` and returns its answer.
    pub async fn call(&self, input: &[I]) -> Result<Vec<O>, ExecuteError> {
        let span = tracing::debug_span!("granary_gpu.call", kernel = self.spec.id);
        let kernel = self.spec.id;
        self.one(input, |answer| {
            to_vec(kernel, answer?).map_err(|err| refused(kernel, err))
        })
        .instrument(span)
        .await
    }

    /// Runs the kernel on `input` and writes its answer into the start of
    /// `output`; returns how many elements it wrote.
    pub async fn call_into(&self, input: &[I], output: &mut [O]) -> Result<usize, ExecuteError> {
        let span = tracing::debug_span!("granary_gpu.call", kernel = self.spec.id);
        let kernel = self.spec.id;
        self.one(input, |answer| {
            copy_into(kernel, answer?, output).map_err(|err| refused(kernel, err))
        })
        .instrument(span)
        .await
    }

    /// Runs the kernel on every input; the answers come back in input
    /// order, each its own `Result` (as
    /// [`GpuBridge::execute_many`]: one group on the ring).
    pub async fn call_many<R: AsRef<[I]>>(
        &self,
        inputs: &[R],
    ) -> Vec<Result<Vec<O>, ExecuteError>> {
        let span = tracing::debug_span!(
            "granary_gpu.call_many",
            kernel = self.spec.id,
            requests = inputs.len()
        );
        let kernel = self.spec.id;
        self.many(inputs, |answer| {
            to_vec(kernel, answer?).map_err(|err| refused(kernel, err))
        })
        .instrument(span)
        .await
    }

    /// Runs the kernel on every input and writes the answers back to back
    /// into `output`, in input order; returns where each one went (a
    /// failed request takes no room). An answer that does not fit what is
    /// left of `output` fails with `OutputTooSmall`.
    pub async fn call_many_into<R: AsRef<[I]>>(
        &self,
        inputs: &[R],
        output: &mut [O],
    ) -> Vec<Result<Range<usize>, ExecuteError>> {
        let span = tracing::debug_span!(
            "granary_gpu.call_many",
            kernel = self.spec.id,
            requests = inputs.len()
        );
        let kernel = self.spec.id;
        let mut at = 0;
        self.many(inputs, |answer| {
            let written = copy_into(kernel, answer?, &mut output[at..])
                .map_err(|err| refused(kernel, err))?;
            let range = at..at + written;
            at += written;
            Ok(range)
        })
        .instrument(span)
        .await
    }

    async fn one<T>(
        &self,
        input: &[I],
        take: impl FnOnce(Result<&[u8], ExecuteError>) -> Result<T, ExecuteError>,
    ) -> Result<T, ExecuteError> {
        if self.bridge.is_shut_down() {
            return Err(refused(self.spec.id, ExecuteError::ShutDown));
        }
        self.bridge
            .run_one(self.index, &self.spec, bytemuck::cast_slice(input), take)
            .await
    }

    async fn many<R: AsRef<[I]>, T>(
        &self,
        inputs: &[R],
        mut take: impl FnMut(Result<&[u8], ExecuteError>) -> Result<T, ExecuteError>,
    ) -> Vec<Result<T, ExecuteError>> {
        if self.bridge.is_shut_down() {
            return inputs
                .iter()
                .map(|_| Err(refused(self.spec.id, ExecuteError::ShutDown)))
                .collect();
        }
        let bytes: Vec<&[u8]> = inputs
            .iter()
            .map(|input| bytemuck::cast_slice(input.as_ref()))
            .collect();
        let mut results = Vec::with_capacity(inputs.len());
        self.bridge
            .run_many(self.index, &self.spec, &bytes, |answer| {
                results.push(take(answer))
            })
            .await;
        results
    }
}

/// An answer's elements, or a fault if its length is not whole elements
/// (the kernel was counted as answering; the caller's failure is counted
/// by the call, with backend `none`).
fn elements<O: Element>(kernel: &'static str, bytes: &[u8]) -> Result<usize, ExecuteError> {
    let size = std::mem::size_of::<O>();
    if bytes.len() % size == 0 {
        Ok(bytes.len() / size)
    } else {
        Err(ExecuteError::KernelFault {
            kernel,
            status: Status::Fault,
        })
    }
}

fn to_vec<O: Element>(kernel: &'static str, bytes: &[u8]) -> Result<Vec<O>, ExecuteError> {
    let mut out = vec![O::zeroed(); elements::<O>(kernel, bytes)?];
    bytemuck::cast_slice_mut::<O, u8>(&mut out).copy_from_slice(bytes);
    Ok(out)
}

fn copy_into<O: Element>(
    kernel: &'static str,
    bytes: &[u8],
    output: &mut [O],
) -> Result<usize, ExecuteError> {
    let count = elements::<O>(kernel, bytes)?;
    let Some(into) = output.get_mut(..count) else {
        return Err(ExecuteError::OutputTooSmall {
            kernel,
            needed: count,
            capacity: output.len(),
        });
    };
    bytemuck::cast_slice_mut::<O, u8>(into).copy_from_slice(bytes);
    Ok(count)
}

/// The shipped kernels (`granary_kernels::shipped`) as types, all `f32` in
/// and out.
pub mod shipped {
    use granary_kernels::KernelSpec;
    use granary_kernels::shipped::{DOT, DOUBLE, MATMUL, SAXPY, VECTOR_ADD};

    use super::TypedKernel;

    macro_rules! shipped {
        ($(#[$doc:meta] $name:ident = $spec:expr;)*) => {$(
            #[$doc]
            #[derive(Debug, Clone, Copy)]
            pub struct $name;

            impl TypedKernel for $name {
                const SPEC: KernelSpec = $spec;
                type Input = f32;
                type Output = f32;
            }
        )*};
    }

    shipped! {
        /// Doubles every element.
        Double = DOUBLE;
        /// Adds two vectors given back to back.
        VectorAdd = VECTOR_ADD;
        /// `a * x + y`: `a`, then `x` and `y` back to back.
        Saxpy = SAXPY;
        /// The dot product of two vectors given back to back.
        Dot = DOT;
        /// A matrix product: the dimensions, then both matrices.
        Matmul = MATMUL;
    }
}
