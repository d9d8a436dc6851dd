//! The persistent-kernel API every backend serves: a [`Submitter`] feeds a
//! kernel's request ring from any thread, a [`PersistentKernel`] hands back
//! its [`Completion`]s (owned, or lent straight from the response ring as a
//! [`CompletionRef`]), beats a heartbeat and stops in a [`StopMode`].
//!
//! Rules every implementation keeps (the bridge relies on them):
//!
//! 1. **Shape first.** A request is checked against the spec's request
//!    shape before it is enqueued; one that does not fit comes back to its
//!    owner in [`SubmitError::WrongShape`] with nothing enqueued.
//! 2. **Batches in order.** [`Submitter::submit_batch`] claims room for the
//!    whole batch at once and publishes each slot as it is written, so the
//!    kernel takes the batch in order and never waits for its end.
//! 3. **Lent completions.** [`PersistentKernel::complete_each`] lends each
//!    response's bytes in place; its slot in the response ring is released
//!    when the closure returns, so a caller that copies the bytes where they
//!    are wanted allocates nothing per response.
//! 4. **Stops report.** A stop returns the responses not yet taken and the
//!    ids of requests never processed; nothing is dropped silently.

use std::fmt;
use std::time::Duration;

use granary_ring::{Producer, ReserveError, TryPushError};

use crate::spec::{KernelSpec, ShapeError, Status};

/// A request the kernel did not take. The payload comes back.
#[derive(Clone, PartialEq, Eq)]
pub enum SubmitError<P> {
    /// The payload does not fit the kernel's request shape.
    WrongShape(ShapeError, P),
    /// The request ring is full; retry or back off.
    Full(P),
    /// The kernel has been stopped.
    Stopped(P),
}

impl<P> SubmitError<P> {
    /// Takes back the payload.
    pub fn into_inner(self) -> P {
        match self {
            SubmitError::WrongShape(_, payload)
            | SubmitError::Full(payload)
            | SubmitError::Stopped(payload) => payload,
        }
    }
}

impl<P> fmt::Debug for SubmitError<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubmitError::WrongShape(err, _) => f.debug_tuple("WrongShape").field(err).finish(),
            SubmitError::Full(_) => write!(f, "Full(..)"),
            SubmitError::Stopped(_) => write!(f, "Stopped(..)"),
        }
    }
}

impl<P> fmt::Display for SubmitError<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubmitError::WrongShape(err, _) => write!(f, "request does not fit the kernel: {err}"),
            SubmitError::Full(_) => write!(f, "the kernel's request ring is full"),
            SubmitError::Stopped(_) => write!(f, "the kernel has been stopped"),
        }
    }
}

impl<P> std::error::Error for SubmitError<P> {}

/// A response: the request's id, the outcome, and the result bytes (empty
/// unless the status is `Ok`).
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The id the request was submitted with.
    pub request_id: u64,
    /// The outcome. An unknown status code from a device reads as `Fault`.
    pub status: Status,
    /// The response bytes.
    pub payload: Vec<u8>,
}

/// How to stop a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Refuse new requests, answer every submitted one, then exit.
    Drain,
    /// Exit after the request in hand; report the rest as abandoned.
    Abandon,
}

/// What a stop left behind.
#[derive(Debug, Default, PartialEq)]
pub struct StopReport {
    /// Responses that had not been collected yet.
    pub completions: Vec<Completion>,
    /// Ids of requests that were submitted but never processed.
    pub abandoned: Vec<u64>,
    /// Requests the kernel processed over its life.
    pub processed: u64,
    /// Whether the kernel thread died outside a request (a bug: requests
    /// are processed under `catch_unwind`).
    pub thread_panicked: bool,
    /// Whether the kernel had exited when the stop returned. `false` means
    /// it was still running at the deadline (a hung implementation): its
    /// thread or device memory was left to it rather than freed under it.
    pub exited: bool,
}

/// A handle that submits requests; clone one per caller thread.
#[derive(Clone)]
pub struct Submitter {
    spec: KernelSpec,
    requests: Producer,
}

impl Submitter {
    /// A submitter feeding `requests`, checking payloads against `spec`.
    pub(crate) fn new(spec: KernelSpec, requests: Producer) -> Submitter {
        Submitter { spec, requests }
    }

    /// The spec it checks payloads against.
    pub(crate) fn spec(&self) -> &KernelSpec {
        &self.spec
    }

    /// Closes the request ring: no more submissions.
    pub(crate) fn close(&self) {
        self.requests.close();
    }

    /// The kernel's consumer heartbeat on the request ring.
    pub(crate) fn consumer_heartbeat(&self) -> u64 {
        self.requests.consumer_heartbeat()
    }

    /// Submits `payload` tagged with `request_id`. Never blocks.
    pub fn submit<P: AsRef<[u8]>>(
        &self,
        request_id: u64,
        payload: P,
    ) -> Result<(), SubmitError<P>> {
        if let Err(err) = self.spec.request.check(payload.as_ref().len()) {
            return Err(SubmitError::WrongShape(err, payload));
        }
        match self.requests.try_push_with(request_id, payload) {
            Ok(()) => Ok(()),
            Err(TryPushError::Full(payload)) => Err(SubmitError::Full(payload)),
            Err(TryPushError::Closed(payload)) => Err(SubmitError::Stopped(payload)),
            // The ring's slots hold the shape's largest request, so a
            // request that passed the shape check always fits.
            Err(TryPushError::PayloadTooLarge { payload, len, .. }) => {
                Err(SubmitError::WrongShape(
                    ShapeError {
                        len,
                        shape: self.spec.request,
                    },
                    payload,
                ))
            }
        }
    }
}

/// Why a batch was not submitted. Nothing of the batch was enqueued,
/// except as [`BatchSubmitError::Interrupted`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BatchSubmitError {
    /// Request `index` of the batch does not fit the kernel's request shape.
    WrongShape {
        /// Its position in the batch.
        index: usize,
        /// Why.
        error: ShapeError,
    },
    /// The request ring has fewer free slots than the batch has requests.
    Full,
    /// The batch is empty or larger than the ring.
    BadCount(usize),
    /// The kernel has been stopped.
    Stopped,
    /// Writing request `enqueued` into its slot failed after the requests
    /// before it had been enqueued (each slot is published as it is
    /// written); it and the rest were not. The shape check before the
    /// claim makes this unreachable with rings sized from the spec.
    Interrupted {
        /// Requests enqueued, from the start of the batch.
        enqueued: usize,
        /// Why the next one could not be written.
        error: ShapeError,
    },
}

impl fmt::Display for BatchSubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchSubmitError::WrongShape { index, error } => {
                write!(f, "request {index} does not fit the kernel: {error}")
            }
            BatchSubmitError::Full => write!(f, "the kernel's request ring is too full"),
            BatchSubmitError::BadCount(count) => {
                write!(f, "a batch of {count} requests does not fit the ring")
            }
            BatchSubmitError::Stopped => write!(f, "the kernel has been stopped"),
            BatchSubmitError::Interrupted { enqueued, error } => write!(
                f,
                "only the first {enqueued} requests were enqueued; the next failed: {error}"
            ),
        }
    }
}

impl std::error::Error for BatchSubmitError {}

impl Submitter {
    /// Submits every `(request_id, payload)` of `batch` with one claim on
    /// the request ring: all of them or, when the ring lacks room, none.
    /// Never blocks. Each slot is published as soon as it is written, so
    /// the kernel starts on the first while the rest are written. This is
    /// how the bridge micro-batches: one claim for many callers' requests.
    pub fn submit_batch<P: AsRef<[u8]>>(&self, batch: &[(u64, P)]) -> Result<(), BatchSubmitError> {
        for (index, (_, payload)) in batch.iter().enumerate() {
            if let Err(error) = self.spec.request.check(payload.as_ref().len()) {
                return Err(BatchSubmitError::WrongShape { index, error });
            }
        }
        let mut chunk = match self.requests.try_reserve(batch.len()) {
            Ok(chunk) => chunk,
            Err(ReserveError::Full { .. }) => return Err(BatchSubmitError::Full),
            Err(ReserveError::Closed) => return Err(BatchSubmitError::Stopped),
            Err(_) => return Err(BatchSubmitError::BadCount(batch.len())),
        };
        for (index, (request_id, payload)) in batch.iter().enumerate() {
            let error = ShapeError {
                len: payload.as_ref().len(),
                shape: self.spec.request,
            };
            let interrupted = BatchSubmitError::Interrupted {
                enqueued: index,
                error,
            };
            // The ring's slots hold the shape's largest request, and every
            // payload passed the shape check above. Should a write still
            // fail, dropping the chunk publishes the rest as skipped.
            let Some(mut slot) = chunk.slot(index) else {
                return Err(interrupted);
            };
            if slot.write(payload.as_ref()).is_err() {
                return Err(interrupted);
            }
            slot.set_request_id(*request_id);
            // The kernel can start on this request while the next ones are
            // written: one claim, no hold-up.
            chunk.publish_prefix(index + 1);
        }
        chunk.commit();
        Ok(())
    }
}

impl fmt::Debug for Submitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Submitter")
            .field("kernel", &self.spec.id)
            .finish_non_exhaustive()
    }
}

/// A completion copied out of a response slot (shared with the OpenCL
/// backend, which answers on the same kind of ring).
pub(crate) fn completion(message: &granary_ring::Message<'_>) -> Completion {
    Completion {
        request_id: message.request_id(),
        status: Status::from_code(message.status()).unwrap_or(Status::Fault),
        payload: message.payload().to_vec(),
    }
}

/// A response lent from the response ring (rule 3): valid only inside the
/// closure it is given to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompletionRef<'a> {
    /// The id the request was submitted with.
    pub request_id: u64,
    /// The outcome. An unknown status code from a device reads as `Fault`.
    pub status: Status,
    /// The response bytes, in the ring's slot.
    pub payload: &'a [u8],
}

impl CompletionRef<'_> {
    /// An owned copy.
    pub fn to_owned(&self) -> Completion {
        Completion {
            request_id: self.request_id,
            status: self.status,
            payload: self.payload.to_vec(),
        }
    }
}

impl Completion {
    /// The completion, lent.
    pub fn as_ref(&self) -> CompletionRef<'_> {
        CompletionRef {
            request_id: self.request_id,
            status: self.status,
            payload: &self.payload,
        }
    }
}

/// Lends up to `max` ready messages of `responses` to `take`, in ring order
/// (rule 3); returns how many. Shared by the kernels that own their
/// response ring's consumer (the CPU kernel, `HostEnds`).
pub(crate) fn lend_ready(
    responses: &mut granary_ring::Consumer,
    max: usize,
    take: &mut dyn FnMut(CompletionRef<'_>),
) -> usize {
    let mut lent = 0;
    while lent < max {
        let Ok(message) = responses.try_pop() else {
            break;
        };
        take(lend(&message));
        lent += 1;
    }
    lent
}

/// Waits per `wait` up to `timeout` for a message of `responses`, then
/// lends it and up to `max - 1` more that are ready (rule 3); returns how
/// many.
pub(crate) fn lend_waiting(
    responses: &mut granary_ring::Consumer,
    wait: &mut crate::cpu::IdleWait,
    timeout: Duration,
    max: usize,
    take: &mut dyn FnMut(CompletionRef<'_>),
) -> usize {
    if max == 0 {
        return 0;
    }
    {
        let first = responses.pop(wait.policy(), Some(timeout));
        wait.record(first.is_ok());
        match first {
            Ok(message) => take(lend(&message)),
            Err(_) => return 0,
        }
    }
    1 + lend_ready(responses, max - 1, take)
}

/// A response ring message, lent as a [`CompletionRef`].
pub(crate) fn lend<'a>(message: &'a granary_ring::Message<'_>) -> CompletionRef<'a> {
    CompletionRef {
        request_id: message.request_id(),
        status: Status::from_code(message.status()).unwrap_or(Status::Fault),
        payload: message.payload(),
    }
}

/// A running persistent kernel, whatever its backend.
pub trait PersistentKernel: Send {
    /// The kernel's spec.
    fn spec(&self) -> &KernelSpec;

    /// A handle that submits requests from any thread; `None` once stopped.
    fn submitter(&self) -> Option<Submitter>;

    /// Takes one completion if one is ready.
    fn try_complete(&mut self) -> Option<Completion>;

    /// Waits up to `timeout` for one completion.
    fn complete(&mut self, timeout: Duration) -> Option<Completion>;

    /// The kernel loop's heartbeat: it advances while the loop runs, busy or
    /// idle (rule H1), and stands still while the kernel is stuck.
    fn heartbeat(&self) -> u64;

    /// Stops the kernel: no new requests, then either every queued request
    /// is answered ([`StopMode::Drain`]) or the loop exits after the request
    /// in hand ([`StopMode::Abandon`]). Waits at most `timeout` for the
    /// kernel to exit; the report says whether it did.
    fn stop(&mut self, mode: StopMode, timeout: Duration) -> StopReport;

    /// Lends up to `max` ready completions to `take`, in ring order,
    /// without copying their bytes (rule 3). Returns how many it lent.
    fn try_complete_each(&mut self, max: usize, take: &mut dyn FnMut(CompletionRef<'_>)) -> usize {
        let mut lent = 0;
        while lent < max {
            let Some(completion) = self.try_complete() else {
                break;
            };
            take(completion.as_ref());
            lent += 1;
        }
        lent
    }

    /// Waits up to `timeout` for a completion, then lends it and up to
    /// `max - 1` more that are ready to `take` (rule 3). Returns how many it
    /// lent.
    fn complete_each(
        &mut self,
        timeout: Duration,
        max: usize,
        take: &mut dyn FnMut(CompletionRef<'_>),
    ) -> usize {
        if max == 0 {
            return 0;
        }
        let Some(first) = self.complete(timeout) else {
            return 0;
        };
        take(first.as_ref());
        1 + self.try_complete_each(max.saturating_sub(1), take)
    }
}
