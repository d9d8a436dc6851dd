//! Where the demo's grains go.

use granary_actors::GrainKey;
use granary_cluster::{
    GpuAware, HashPlacement, Member, PlacementError, PlacementRequest, PlacementStrategy, SiloId,
};

use super::counter::COUNTER;
use super::grains::{AUDITOR, INSPECTOR};

/// The demo's placement: ledgers by free device memory
/// ([`GpuAware::strict`]); an auditor on a silo other than the caller's
/// (the silo whose ledger first calls it), by rendezvous hash among the
/// others, so that notifications usually cross silos; the inspector keyed
/// by a silo's address on that silo; a counter by rendezvous hash.
#[derive(Debug)]
pub struct DemoPlacement {
    ledgers: GpuAware,
}

impl Default for DemoPlacement {
    fn default() -> DemoPlacement {
        DemoPlacement {
            ledgers: GpuAware::strict(),
        }
    }
}

impl PlacementStrategy for DemoPlacement {
    fn place(
        &self,
        request: &PlacementRequest<'_>,
        members: &[Member],
    ) -> Result<SiloId, PlacementError> {
        match request.grain.type_name.as_str() {
            AUDITOR => {
                let others: Vec<Member> = members
                    .iter()
                    .filter(|member| member.silo != *request.caller)
                    .cloned()
                    .collect();
                if others.is_empty() {
                    HashPlacement.place(request, members)
                } else {
                    HashPlacement.place(request, &others)
                }
            }
            INSPECTOR => match &request.grain.key {
                GrainKey::Str(address) => members
                    .iter()
                    .find(|member| member.silo.address == *address)
                    .map(|member| member.silo.clone())
                    .ok_or(PlacementError::NoSilos),
                _ => Err(PlacementError::NoSilos),
            },
            COUNTER => HashPlacement.place(request, members),
            _ => self.ledgers.place(request, members),
        }
    }
}
