//! The directory service: answers directory requests for the entries
//! this silo owns, with the hand-over window after a view change
//! (rules 1 to 3 and 6 of the protocol in `node/mod.rs`).

use std::sync::PoisonError;

use granary_actors::GrainKey;

use super::Inner;
use super::directory_client::{DirectoryReply, DirectoryRequest};
use crate::SiloId;
use crate::directory::{self, ActivationAddress};

/// The longest grain type name a directory entry takes, in bytes.
pub(super) const MAX_DIRECTORY_TYPE: usize = granary_actors::MAX_GRAIN_TYPE_NAME;
/// The longest string in a grain key a directory entry takes, in bytes.
pub(super) const MAX_DIRECTORY_KEY: usize = 4096;

/// Whether silo `from` may ask `request` (rule 1): a silo registers and
/// unregisters only homes of its own, and a grain's names stay within
/// bounds ([`within_bounds`]). Refused, the reason.
pub(super) fn authorize(from: &SiloId, request: &DirectoryRequest) -> Result<(), String> {
    let home = match request {
        DirectoryRequest::Register { home, .. } => Some(&home.silo),
        DirectoryRequest::Unregister { home, .. } => Some(home),
        // Only the silo an entry names gives it away.
        DirectoryRequest::Switch { from, .. } => Some(&from.silo),
        DirectoryRequest::Lookup(_) => None,
    };
    if let Some(home) = home.filter(|home| *home != from) {
        return Err(format!(
            "{from} may not change the entry of a home on {home}"
        ));
    }
    within_bounds(request)
}

/// Whether `request`'s grain names are within [`MAX_DIRECTORY_TYPE`] and
/// [`MAX_DIRECTORY_KEY`]: checked for every request, the owner local or
/// not, so a grain whose key is too long fails the same way wherever its
/// entry lives.
pub(super) fn within_bounds(request: &DirectoryRequest) -> Result<(), String> {
    let grain = request.grain();
    if grain.type_name.len() > MAX_DIRECTORY_TYPE {
        return Err(format!(
            "a grain type name of {} bytes; at most {MAX_DIRECTORY_TYPE}",
            grain.type_name.len()
        ));
    }
    let key = match &grain.key {
        GrainKey::Str(text) | GrainKey::Compound(_, text) => text.len(),
        GrainKey::U64(_) | GrainKey::Uuid(_) => 0,
    };
    if key > MAX_DIRECTORY_KEY {
        return Err(format!(
            "a grain key of {key} bytes; at most {MAX_DIRECTORY_KEY}"
        ));
    }
    Ok(())
}

impl Inner {
    /// Answers a directory request for an entry this silo owns (rules 2
    /// and 3).
    pub(super) fn answer_directory(&self, request: DirectoryRequest) -> DirectoryReply {
        // Rule 7: a fenced silo's entries may be stale (it may have been
        // taken for dead); it answers nothing until it has come back as a
        // new incarnation, owning none.
        if self.fence.is_fenced() {
            return DirectoryReply::Retry;
        }
        // The view before the window: a view change starts the window
        // before it swaps the view in (`serve.rs`), so a new view is never
        // read with the window before it.
        let view = self.view();
        // Rule 3, and a new incarnation whose peers may not know it yet
        // (`incarnation.rs` rule 3).
        let settling = self
            .view_changed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
            < self.handoff
            || self.holding.load(std::sync::atomic::Ordering::Acquire) != 0;
        let grain = request.grain();
        if !directory::owner(grain, &view).is_some_and(|owner| self.is_me(owner)) {
            return DirectoryReply::Retry;
        }
        match request {
            DirectoryRequest::Lookup(grain) => match self.partition.lookup(&grain) {
                Some(home) => DirectoryReply::Home(home),
                None if settling => DirectoryReply::Retry,
                None => DirectoryReply::Unknown,
            },
            DirectoryRequest::Register {
                grain,
                home,
                existing,
            } => {
                // A home from before the view changed may not have
                // re-registered yet: only it may claim the grain now.
                if settling && !existing && self.partition.lookup(&grain).is_none() {
                    return DirectoryReply::Retry;
                }
                // A proposer this silo does not see yet would be taken for
                // a dead one by the next registration.
                if !view.iter().any(|member| member.silo == home.silo) {
                    return DirectoryReply::Retry;
                }
                DirectoryReply::Home(self.partition.register(&grain, home, |silo| {
                    view.iter().any(|member| &member.silo == silo)
                }))
            }
            DirectoryRequest::Switch {
                grain, from, to, ..
            } => {
                // The silo it moves to must be one this owner sees.
                if !view.iter().any(|member| member.silo == to.silo) {
                    return DirectoryReply::Retry;
                }
                match self.partition.switch(&grain, &from, to) {
                    Some(home) => DirectoryReply::Home(home),
                    None => DirectoryReply::Unknown,
                }
            }
            DirectoryRequest::Unregister {
                grain,
                home,
                activation,
            } => {
                match activation {
                    Some(activation) => {
                        self.partition.unregister(
                            &grain,
                            &ActivationAddress {
                                silo: home,
                                activation,
                            },
                        );
                    }
                    None => {
                        self.partition.unregister_silo(&grain, &home);
                    }
                }
                match self.partition.lookup(&grain) {
                    Some(other) => DirectoryReply::Home(other),
                    None => DirectoryReply::Unknown,
                }
            }
        }
    }
}
