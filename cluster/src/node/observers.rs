//! Observers across silos (rule 9 of the protocol in `node/mod.rs`): the
//! node carries a grain's notifications to subscribers on other silos
//! (rule 7 of `route.rs` in `granary-actors`).
//!
//! 1. A silo's place in observer references is its [`SiloId`] written
//!    out (`address#incarnation`): a silo that restarts is a new
//!    incarnation, so a reference to a subscriber of its previous life
//!    never reaches the new one.
//! 2. A notification travels as a request to the reserved grain type
//!    [`OBSERVERS`], keyed by the endpoint's number, under the
//!    subscriber's Rust type name; the answer is what became of it
//!    ([`Observed`]), encoded.
//! 3. A place that names no silo of the view is unreachable at once,
//!    without a connection: the grain's side drops the subscriber once it
//!    has been so for its expiry. A silo of the view that does not answer
//!    is unreachable too, after the connection's call timeout at most.

use std::str::FromStr;
use std::sync::Arc;

use granary_actors::GrainKey;
use granary_actors::dispatch::{decode, encode};
use granary_actors::observers::{Observed, ObserverUnreachable};

use super::{ClusterNode, Inner};
use crate::SiloId;
use crate::connection::InboundRequest;
use crate::wire::RemoteError;

/// The reserved grain type of notifications (rule 2).
pub(super) const OBSERVERS: &str = "$observers";

impl Inner {
    /// Sends a notification to subscriber `endpoint` on the silo `place`
    /// names (rules 2 and 3).
    pub(super) async fn send_observation(
        self: &Arc<Inner>,
        place: &str,
        endpoint: u64,
        type_name: &str,
        payload: Vec<u8>,
    ) -> Result<Observed, ObserverUnreachable> {
        let unreachable = |reason: String| ObserverUnreachable {
            place: place.to_string(),
            reason,
        };
        let silo = SiloId::from_str(place).map_err(|err| unreachable(err.to_string()))?;
        if self.is_me(&silo) {
            return Ok(self.home_side.observe(endpoint, type_name, &payload));
        }
        if !self.is_live(&silo) {
            return Err(unreachable("not a member of the view".to_string()));
        }
        let node = ClusterNode {
            inner: self.clone(),
        };
        let connection = node
            .connection(&silo)
            .await
            .map_err(|err| unreachable(err.to_string()))?;
        let answer = connection
            .call(OBSERVERS, &GrainKey::U64(endpoint), type_name, &payload)
            .await
            .map_err(|err| unreachable(super::router::from_failure(err).to_string()))?;
        decode(&answer).map_err(|err| unreachable(format!("an answer that does not decode: {err}")))
    }

    /// Delivers a notification that arrived for a subscriber here (rule 2).
    pub(super) fn observed(&self, request: &InboundRequest) -> Result<Vec<u8>, RemoteError> {
        let GrainKey::U64(endpoint) = request.key else {
            return Err(RemoteError::BadPayload(format!(
                "an endpoint is numbered, not {:?}",
                request.key
            )));
        };
        let observed = self
            .home_side
            .observe(endpoint, &request.message, &request.payload);
        encode(&observed).map_err(|err| RemoteError::Other(err.to_string()))
    }
}
