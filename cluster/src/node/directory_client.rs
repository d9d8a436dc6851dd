//! Directory requests and where they go: to the silo that owns the
//! grain's entry (rule 1 of the protocol in `node/mod.rs`), as the
//! reserved grain type `$directory`, or to etcd; the requests and
//! replies of rules 2, 3 and 6.

use granary_actors::dispatch::{decode, encode};
use granary_actors::{GrainId, GrainKey};
use serde::{Deserialize, Serialize};

use super::ClusterNode;
use super::router::{ClusterCallError, from_failure};
use crate::SiloId;
use crate::directory::{self, ActivationAddress};
#[cfg(feature = "etcd")]
use crate::wire::RemoteError;

/// The reserved grain type of directory requests.
pub(super) const DIRECTORY: &str = "$directory";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) enum DirectoryRequest {
    /// Registers a home; `existing` for a home re-registering after a view
    /// change (rule 3).
    Register {
        grain: GrainId,
        home: ActivationAddress,
        existing: bool,
    },
    Lookup(GrainId),
    /// Removes the grain's entry if it names `home` and, if given,
    /// `activation` (rule 6).
    Unregister {
        grain: GrainId,
        home: SiloId,
        activation: Option<u64>,
    },
    /// Moves the grain's entry from `from` to `to` if it names `from`: a
    /// migration's switch, asked by the silo the entry names
    /// (`migration.rs` rule 4). `to_lease` is the target's etcd lease (0
    /// under gossip): the entry goes with it. Answers the entry afterwards.
    Switch {
        grain: GrainId,
        from: ActivationAddress,
        to: ActivationAddress,
        to_lease: i64,
    },
}

impl DirectoryRequest {
    /// The grain the request is about.
    pub(super) fn grain(&self) -> &GrainId {
        match self {
            DirectoryRequest::Register { grain, .. }
            | DirectoryRequest::Lookup(grain)
            | DirectoryRequest::Unregister { grain, .. }
            | DirectoryRequest::Switch { grain, .. } => grain,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) enum DirectoryReply {
    /// The home that stands.
    Home(ActivationAddress),
    /// No entry.
    Unknown,
    /// Within the hand-over window (rule 3).
    Retry,
}

/// Where directory entries live.
pub(super) enum DirectoryBackend {
    /// Partitioned over the live silos (rules 1 to 3).
    Partitioned,
    /// In etcd: one entry per grain, first registration wins, entries go
    /// with their silo's lease; nothing moves when the view changes.
    #[cfg(feature = "etcd")]
    Etcd(Box<crate::etcd::EtcdDirectory>),
}

impl ClusterNode {
    /// Sends a directory request to the grain's entry's owner.
    pub(super) async fn directory(
        &self,
        request: DirectoryRequest,
    ) -> Result<DirectoryReply, ClusterCallError> {
        self.directory_at(None, request).await
    }

    /// Sends a directory request to `owner`, the entry's owner in a view
    /// the caller holds (a registration, a call's or a view's
    /// re-registration, records whom it registered with: `home.rs`), or
    /// else to the owner in the current view.
    pub(super) async fn directory_at(
        &self,
        owner: Option<&SiloId>,
        request: DirectoryRequest,
    ) -> Result<DirectoryReply, ClusterCallError> {
        super::directory_service::within_bounds(&request)
            .map_err(|why| ClusterCallError::Remote(crate::wire::RemoteError::Forbidden(why)))?;
        #[cfg(feature = "etcd")]
        if let DirectoryBackend::Etcd(etcd) = &self.inner.directory {
            let failed = |err: crate::etcd::EtcdError| {
                ClusterCallError::Remote(RemoteError::Other(err.to_string()))
            };
            return match request {
                DirectoryRequest::Register { grain, home, .. } => etcd
                    .register(&grain, home.activation)
                    .await
                    .map(DirectoryReply::Home)
                    .map_err(failed),
                DirectoryRequest::Lookup(grain) => match etcd.lookup(&grain).await {
                    Ok(Some(home)) => Ok(DirectoryReply::Home(home)),
                    Ok(None) => Ok(DirectoryReply::Unknown),
                    Err(err) => Err(failed(err)),
                },
                DirectoryRequest::Unregister {
                    grain, activation, ..
                } => etcd
                    .unregister(&grain, activation)
                    .await
                    .map(|_| DirectoryReply::Unknown)
                    .map_err(failed),
                DirectoryRequest::Switch {
                    grain,
                    from,
                    to,
                    to_lease,
                } => match etcd.switch(&grain, &from, &to, to_lease).await {
                    Ok(Some(home)) => Ok(DirectoryReply::Home(home)),
                    Ok(None) => Ok(DirectoryReply::Unknown),
                    Err(err) => Err(failed(err)),
                },
            };
        }
        let owner = match owner {
            Some(owner) => owner.clone(),
            None => {
                let view = self.inner.view();
                let Some(owner) = directory::owner(request.grain(), &view).cloned() else {
                    return Err(ClusterCallError::Placement(
                        crate::placement::PlacementError::NoSilos,
                    ));
                };
                owner
            }
        };
        if self.inner.is_me(&owner) {
            return Ok(self.inner.answer_directory(request));
        }
        let payload = encode(&request).map_err(|err| ClusterCallError::Payload(err.to_string()))?;
        let connection = self.connection(&owner).await?;
        let reply = connection
            .call(DIRECTORY, &GrainKey::U64(0), "directory", &payload)
            .await
            .map_err(from_failure)?;
        decode(&reply).map_err(|err| ClusterCallError::Payload(err.to_string()))
    }
}
