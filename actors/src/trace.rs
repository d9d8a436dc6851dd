//! Trace context: which request a turn, a call or a log line belongs to.
//!
//! 1. **A trace is a call chain.** Every call starts a chain (a random
//!    64-bit id, `silo/envelope.rs`) or joins the chain of the turn that
//!    makes it, and a chain travels with every message: in the envelope to
//!    a local activation, in the request header to another silo (the
//!    cluster's `Header::Request`), and from there into the turns and the
//!    calls it causes. So one chain names one request's whole tree of
//!    turns, across silos: its [`TraceId`].
//! 2. **Spans.** Each turn runs in a `granary.turn` span (debug level)
//!    with fields `grain` and `trace`; the cluster adds `granary.remote_call`
//!    (on the caller) and `granary.remote_request` (on the silo that
//!    handles it), each with the same `trace`. Events a handler logs
//!    inherit its turn's span, so a subscriber that prints span fields
//!    (`tracing-subscriber`'s fmt, in text or JSON) shows every line of a
//!    request, on every silo, under one `trace` value.
//! 3. **Cost.** A span whose level is filtered out costs a check of its
//!    callsite's cached interest; nothing is allocated or formatted, and
//!    a turn does not enter a disabled span on each poll.

use std::fmt;

/// A request's trace id: the call chain it belongs to (rule 1), shown as
/// 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub u64);

impl TraceId {
    /// The trace of the turn running on this thread, if a turn is.
    pub fn current() -> Option<TraceId> {
        crate::silo::running_chain().map(TraceId)
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}
