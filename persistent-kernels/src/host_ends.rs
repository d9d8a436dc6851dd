//! The host's ends of a device persistent kernel's two rings, shared by the
//! OpenCL and CUDA kernels: submitting, taking completions, the heartbeat
//! (rule H1), closing, and leaking both ends when a kernel will not exit.

use std::time::Duration;

use granary_ring::{Consumer, Producer, WaitPolicy};

use crate::cpu::IdleWait;
use crate::kernel::{
    Completion, CompletionRef, SubmitError, Submitter, completion, lend_ready, lend_waiting,
};
use crate::spec::KernelSpec;

/// The request ring's producer side and the response ring's consumer.
pub(crate) struct HostEnds {
    /// `None` only after [`HostEnds::leak`].
    requests: Option<Submitter>,
    /// As `requests`.
    responses: Option<Consumer>,
    wait: IdleWait,
}

impl HostEnds {
    pub(crate) fn new(
        spec: KernelSpec,
        requests: Producer,
        responses: Consumer,
        policy: WaitPolicy,
    ) -> HostEnds {
        HostEnds {
            requests: Some(Submitter::new(spec, requests)),
            responses: Some(responses),
            wait: IdleWait::new(policy),
        }
    }

    /// A handle that submits from any thread.
    pub(crate) fn submitter(&self) -> Option<Submitter> {
        self.requests.clone()
    }

    /// Submits one request; see [`Submitter::submit`].
    pub(crate) fn submit<P: AsRef<[u8]>>(
        &self,
        request_id: u64,
        payload: P,
    ) -> Result<(), SubmitError<P>> {
        match &self.requests {
            Some(requests) => requests.submit(request_id, payload),
            None => Err(SubmitError::Stopped(payload)),
        }
    }

    /// Sets how [`HostEnds::complete`] waits.
    pub(crate) fn set_wait_policy(&mut self, policy: WaitPolicy) {
        self.wait = IdleWait::new(policy);
    }

    /// Waits up to `timeout` for one completion.
    pub(crate) fn complete(&mut self, timeout: Duration) -> Option<Completion> {
        let responses = self.responses.as_mut()?;
        let done = responses
            .pop(self.wait.policy(), Some(timeout))
            .ok()
            .map(|message| completion(&message));
        self.wait.record(done.is_some());
        done
    }

    /// Lends up to `max` ready completions to `take` (rule 3 of
    /// `kernel.rs`); returns how many.
    pub(crate) fn try_complete_each(
        &mut self,
        max: usize,
        take: &mut dyn FnMut(CompletionRef<'_>),
    ) -> usize {
        match self.responses.as_mut() {
            Some(responses) => lend_ready(responses, max, take),
            None => 0,
        }
    }

    /// Waits up to `timeout` for a completion, then lends it and up to
    /// `max - 1` more that are ready; returns how many.
    pub(crate) fn complete_each(
        &mut self,
        timeout: Duration,
        max: usize,
        take: &mut dyn FnMut(CompletionRef<'_>),
    ) -> usize {
        match self.responses.as_mut() {
            Some(responses) => lend_waiting(responses, &mut self.wait, timeout, max, take),
            None => 0,
        }
    }

    /// Takes one completion if one is ready. A corrupt response (a bad
    /// header from the device: the ring has released it and moved past) is
    /// skipped, so that the ones behind it are still taken, by a stop's
    /// drain too.
    pub(crate) fn try_complete(&mut self) -> Option<Completion> {
        let responses = self.responses.as_mut()?;
        loop {
            match responses.try_pop() {
                Ok(message) => return Some(completion(&message)),
                Err(granary_ring::TryPopError::Corrupt { .. }) => {}
                Err(_) => return None,
            }
        }
    }

    /// Takes every completion that is ready.
    pub(crate) fn drain_into(&mut self, completions: &mut Vec<Completion>) {
        while let Some(completion) = self.try_complete() {
            completions.push(completion);
        }
    }

    /// The kernel's heartbeat (rule H1): the request ring's consumer
    /// heartbeat, which the kernel beats every turn, plus the response
    /// ring's producer heartbeat, which it beats while waiting for room.
    pub(crate) fn heartbeat(&self) -> u64 {
        let requests = self
            .requests
            .as_ref()
            .map_or(0, Submitter::consumer_heartbeat);
        let responses = self
            .responses
            .as_ref()
            .map_or(0, Consumer::producer_heartbeat);
        requests.wrapping_add(responses)
    }

    /// No more requests: the kernel drains what is queued and exits.
    pub(crate) fn close_requests(&self) {
        if let Some(requests) = &self.requests {
            requests.close();
        }
    }

    /// The Abandon signal: the kernel exits without taking more requests.
    pub(crate) fn close_responses(&self) {
        if let Some(responses) = &self.responses {
            responses.close();
        }
    }

    /// Forgets both ends, so the rings' memory is never freed: for a kernel
    /// that did not exit and may still use it.
    pub(crate) fn leak(&mut self) {
        std::mem::forget(self.requests.take());
        std::mem::forget(self.responses.take());
    }
}
