//! Membership and the grain directory kept in etcd: the production
//! alternative to gossip, for clusters that run an etcd (feature `etcd`).
//!
//! # Keys
//!
//! Under `{prefix}/{cluster}/`:
//! - `silos/{address}#{incarnation}`: a silo's record (JSON: its identity,
//!   its load, whether it is leaving), attached to the silo's lease;
//! - `grains/{hex of the grain id}`: a directory entry (JSON
//!   [`ActivationAddress`]), attached to the lease of the silo it names.
//!
//! # Rules
//!
//! 1. **Liveness is a lease.** A silo grants a lease of `ttl` and keeps it
//!    alive every `ttl / 3`. When it stops keeping it alive (a crash, a
//!    partition from etcd, [`EtcdMembership::stop`]), etcd expires the
//!    lease after `ttl` and deletes every key attached to it: the silo's
//!    record and every directory entry naming it. A silo that leaves
//!    revokes its lease: the same, at once.
//! 2. **The view** is every silo record not marked leaving. It is read at
//!    one revision and then watched from the next, so no change between the
//!    read and the watch is missed. A watch that fails or is cancelled
//!    (compaction) reads and watches again.
//! 3. **Incarnations.** A silo that rejoins has a new incarnation, so a new
//!    key: the old record's expiry does not remove the new one.
//! 4. **Registering** is one transaction: if the entry's create revision
//!    is 0 (there is none), put ours; else read it. Only the first
//!    registration creates the key, so exactly one wins whatever each
//!    silo's view, and every other reads the winner. Entries never outlive
//!    their silo (rule 1).
//! 5. **Unregistering** is one transaction: delete the entry if it is still
//!    attached to this silo's lease and, when the caller names one, holds
//!    that activation (a late unregister never removes a newer entry).

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use granary_actors::GrainId;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::SiloId;
use crate::directory::ActivationAddress;
use crate::membership::{Member, SiloLoad};

/// How a silo reaches etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// etcd's client endpoints (`http://10.0.0.9:2379`).
    pub endpoints: Vec<String>,
    /// The key prefix every cluster lives under (default `/granary`).
    pub prefix: String,
    /// The cluster's name; silos of other clusters are not seen.
    pub cluster: String,
    /// How long a silo that stops answering stays in the view, at least
    /// 2 s (etcd counts leases in whole seconds). Default 6 s.
    pub ttl: Duration,
    /// How long connecting and each request may take. Default 5 s.
    pub timeout: Duration,
}

impl EtcdConfig {
    /// A configuration with the defaults for cluster `cluster` at
    /// `endpoints`.
    pub fn new(cluster: impl Into<String>, endpoints: Vec<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: "/granary".into(),
            cluster: cluster.into(),
            ttl: Duration::from_secs(6),
            timeout: Duration::from_secs(5),
        }
    }

    fn validate(&self) -> Result<(), EtcdError> {
        if self.endpoints.is_empty() {
            return Err(EtcdError::InvalidConfig("no endpoints".into()));
        }
        if self.cluster.is_empty() || self.cluster.contains('/') {
            return Err(EtcdError::InvalidConfig(format!(
                "cluster name {:?}: not empty, no '/'",
                self.cluster
            )));
        }
        if self.ttl < Duration::from_secs(2) {
            return Err(EtcdError::InvalidConfig(format!(
                "ttl {:?}: at least 2 s",
                self.ttl
            )));
        }
        if self.timeout.is_zero() {
            return Err(EtcdError::InvalidConfig("a zero timeout".into()));
        }
        Ok(())
    }

    fn silos(&self) -> String {
        format!("{}/{}/silos/", self.prefix, self.cluster)
    }

    fn grains(&self) -> String {
        format!("{}/{}/grains/", self.prefix, self.cluster)
    }
}

/// Why an etcd operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EtcdError {
    /// The configuration is unusable.
    InvalidConfig(String),
    /// etcd could not be reached.
    Connect(String),
    /// A request failed or timed out.
    Request(String),
    /// A key held something this version cannot read.
    BadRecord(String),
}

impl std::fmt::Display for EtcdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EtcdError::InvalidConfig(why) => write!(f, "etcd configuration: {why}"),
            EtcdError::Connect(why) => write!(f, "cannot reach etcd: {why}"),
            EtcdError::Request(why) => write!(f, "etcd request failed: {why}"),
            EtcdError::BadRecord(why) => write!(f, "unreadable etcd record: {why}"),
        }
    }
}

impl std::error::Error for EtcdError {}

fn request(err: etcd_client::Error) -> EtcdError {
    EtcdError::Request(err.to_string())
}

/// A silo's record (rule 2).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SiloRecord {
    silo: SiloId,
    load: SiloLoad,
    leaving: bool,
}

/// One silo's membership in etcd (rules 1 to 3).
pub struct EtcdMembership {
    client: Client,
    config: EtcdConfig,
    silo: SiloId,
    key: String,
    lease: i64,
    view: watch::Receiver<Vec<Member>>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for EtcdMembership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdMembership")
            .field("silo", &self.silo)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl EtcdMembership {
    /// Connects, registers `silo` with `load` under a fresh lease, keeps
    /// the lease alive, and starts watching the view.
    pub async fn join(
        config: EtcdConfig,
        silo: SiloId,
        load: SiloLoad,
    ) -> Result<EtcdMembership, EtcdError> {
        config.validate()?;
        let options = ConnectOptions::new()
            .with_connect_timeout(config.timeout)
            .with_timeout(config.timeout);
        let mut client = tokio::time::timeout(
            config.timeout,
            Client::connect(config.endpoints.clone(), Some(options)),
        )
        .await
        .map_err(|_| EtcdError::Connect(format!("no answer in {:?}", config.timeout)))?
        .map_err(|err| EtcdError::Connect(err.to_string()))?;
        let ttl = i64::try_from(config.ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = client.lease_grant(ttl, None).await.map_err(request)?.id();
        let key = format!("{}{}", config.silos(), silo);
        let record = SiloRecord {
            silo: silo.clone(),
            load,
            leaving: false,
        };
        put_record(&mut client, &key, &record, lease).await?;
        let (keeper, mut answers) = client.lease_keep_alive(lease).await.map_err(request)?;
        let every = config.ttl / 3;
        let keeping = tokio::spawn(async move {
            let mut keeper = keeper;
            loop {
                if let Err(err) = keeper.keep_alive().await {
                    tracing::warn!(error = %err, "etcd lease keep-alive failed");
                }
                match answers.message().await {
                    Ok(Some(answer)) if answer.ttl() > 0 => {}
                    Ok(_) => {
                        // Expired: this silo is out of the view for good
                        // (rule 3: a rejoin is a new incarnation).
                        tracing::error!(lease, "etcd lease expired; this silo left the view");
                        return;
                    }
                    Err(err) => tracing::warn!(error = %err, "etcd lease keep-alive failed"),
                }
                tokio::time::sleep(every).await;
            }
        });
        let (publish, view) = watch::channel(Vec::new());
        let first = read_view(&mut client, &config).await?;
        publish.send_replace(members(&first.1));
        let watching = tokio::spawn(watch_view(client.clone(), config.clone(), first, publish));
        Ok(EtcdMembership {
            client,
            config,
            silo,
            key,
            lease,
            view,
            tasks: vec![keeping, watching],
        })
    }

    /// This silo.
    pub fn silo(&self) -> &SiloId {
        &self.silo
    }

    /// The live members, sorted by identity.
    pub fn members(&self) -> Vec<Member> {
        self.view.borrow().clone()
    }

    /// The view, as it changes.
    pub fn watch(&self) -> watch::Receiver<Vec<Member>> {
        self.view.clone()
    }

    /// Publishes this silo's load.
    pub async fn publish_load(&self, load: SiloLoad) -> Result<(), EtcdError> {
        let record = SiloRecord {
            silo: self.silo.clone(),
            load,
            leaving: false,
        };
        put_record(&mut self.client.clone(), &self.key, &record, self.lease).await
    }

    /// The directory, with entries attached to this silo's lease.
    pub fn directory(&self) -> EtcdDirectory {
        EtcdDirectory {
            client: self.client.clone(),
            config: self.config.clone(),
            silo: self.silo.clone(),
            lease: self.lease,
        }
    }

    /// Leaves: the lease is revoked, so the record and every directory
    /// entry naming this silo go at once (rule 1).
    pub async fn leave(mut self) -> Result<(), EtcdError> {
        self.abort();
        let revoked =
            tokio::time::timeout(self.config.timeout, self.client.lease_revoke(self.lease))
                .await
                .map_err(|_| EtcdError::Request("revoking the lease timed out".into()))?;
        revoked.map(drop).map_err(request)
    }

    /// Stops as a crash looks to the others: the lease is no longer kept
    /// alive and expires after `ttl`.
    pub fn stop(mut self) {
        self.abort();
    }

    fn abort(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

impl Drop for EtcdMembership {
    fn drop(&mut self) {
        self.abort();
    }
}

async fn put_record(
    client: &mut Client,
    key: &str,
    record: &SiloRecord,
    lease: i64,
) -> Result<(), EtcdError> {
    let value = serde_json::to_vec(record).map_err(|err| EtcdError::BadRecord(err.to_string()))?;
    client
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await
        .map(drop)
        .map_err(request)
}

/// Every silo record, by key, and the revision they were read at.
async fn read_view(
    client: &mut Client,
    config: &EtcdConfig,
) -> Result<(i64, BTreeMap<Vec<u8>, SiloRecord>), EtcdError> {
    let answer = client
        .get(config.silos(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(request)?;
    let revision = answer.header().map_or(0, |header| header.revision());
    let mut records = BTreeMap::new();
    for kv in answer.kvs() {
        match serde_json::from_slice::<SiloRecord>(kv.value()) {
            Ok(record) => {
                records.insert(kv.key().to_vec(), record);
            }
            Err(err) => tracing::warn!(error = %err, "an unreadable silo record is ignored"),
        }
    }
    Ok((revision, records))
}

fn members(records: &BTreeMap<Vec<u8>, SiloRecord>) -> Vec<Member> {
    let mut members: Vec<Member> = records
        .values()
        .filter(|record| !record.leaving)
        .map(|record| Member {
            silo: record.silo.clone(),
            gossip: None,
            load: record.load.clone(),
        })
        .collect();
    members.sort_by(|a, b| a.silo.cmp(&b.silo));
    members
}

/// Rule 2: applies watched changes to the view; reads and watches again
/// when the watch ends.
async fn watch_view(
    mut client: Client,
    config: EtcdConfig,
    first: (i64, BTreeMap<Vec<u8>, SiloRecord>),
    publish: watch::Sender<Vec<Member>>,
) {
    let (mut revision, mut records) = first;
    loop {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        if let Ok(mut stream) = client.watch(config.silos(), Some(options)).await {
            while let Ok(Some(answer)) = stream.message().await {
                if answer.canceled() {
                    break;
                }
                for event in answer.events() {
                    let Some(kv) = event.kv() else { continue };
                    revision = revision.max(kv.mod_revision());
                    match event.event_type() {
                        EventType::Put => match serde_json::from_slice::<SiloRecord>(kv.value()) {
                            Ok(record) => {
                                records.insert(kv.key().to_vec(), record);
                            }
                            Err(err) => {
                                tracing::warn!(error = %err, "an unreadable silo record is ignored");
                            }
                        },
                        EventType::Delete => {
                            records.remove(kv.key());
                        }
                    }
                }
                let view = members(&records);
                publish.send_if_modified(|current| {
                    if *current == view {
                        false
                    } else {
                        *current = view;
                        true
                    }
                });
            }
        }
        if publish.is_closed() {
            return;
        }
        // The watch ended (etcd restarted, compaction): read it afresh.
        tokio::time::sleep(config.ttl / 6).await;
        match read_view(&mut client, &config).await {
            Ok((at, fresh)) => {
                revision = at;
                records = fresh;
                publish.send_replace(members(&records));
            }
            Err(err) => tracing::warn!(error = %err, "reading the etcd view failed"),
        }
    }
}

/// The grain directory in etcd (rules 4 and 5), for one silo.
#[derive(Clone)]
pub struct EtcdDirectory {
    client: Client,
    config: EtcdConfig,
    silo: SiloId,
    lease: i64,
}

impl std::fmt::Debug for EtcdDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdDirectory")
            .field("silo", &self.silo)
            .finish_non_exhaustive()
    }
}

impl EtcdDirectory {
    fn key(&self, grain: &GrainId) -> Result<Vec<u8>, EtcdError> {
        let id =
            postcard::to_allocvec(grain).map_err(|err| EtcdError::BadRecord(err.to_string()))?;
        let mut key = self.config.grains().into_bytes();
        for byte in id {
            key.extend_from_slice(format!("{byte:02x}").as_bytes());
        }
        Ok(key)
    }

    /// Registers this silo's `activation` as `grain`'s home unless another
    /// is registered; returns the home that stands (rule 4).
    pub async fn register(
        &self,
        grain: &GrainId,
        activation: u64,
    ) -> Result<ActivationAddress, EtcdError> {
        let key = self.key(grain)?;
        let ours = ActivationAddress {
            silo: self.silo.clone(),
            activation,
        };
        let value =
            serde_json::to_vec(&ours).map_err(|err| EtcdError::BadRecord(err.to_string()))?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                value,
                Some(PutOptions::new().with_lease(self.lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let answer = self.client.clone().txn(txn).await.map_err(request)?;
        if answer.succeeded() {
            return Ok(ours);
        }
        for response in answer.op_responses() {
            if let TxnOpResponse::Get(got) = response {
                if let Some(kv) = got.kvs().first() {
                    return serde_json::from_slice(kv.value())
                        .map_err(|err| EtcdError::BadRecord(err.to_string()));
                }
            }
        }
        Err(EtcdError::Request(
            "the entry vanished inside its own transaction".into(),
        ))
    }

    /// The home registered for `grain`, if any.
    pub async fn lookup(&self, grain: &GrainId) -> Result<Option<ActivationAddress>, EtcdError> {
        let answer = self
            .client
            .clone()
            .get(self.key(grain)?, None)
            .await
            .map_err(request)?;
        answer
            .kvs()
            .first()
            .map(|kv| {
                serde_json::from_slice(kv.value())
                    .map_err(|err| EtcdError::BadRecord(err.to_string()))
            })
            .transpose()
    }

    /// Removes `grain`'s entry if this silo registered it, and if given,
    /// as `activation` (rule 5); returns whether it did.
    pub async fn unregister(
        &self,
        grain: &GrainId,
        activation: Option<u64>,
    ) -> Result<bool, EtcdError> {
        let key = self.key(grain)?;
        let mut when = vec![Compare::lease(key.clone(), CompareOp::Equal, self.lease)];
        if let Some(activation) = activation {
            let ours = ActivationAddress {
                silo: self.silo.clone(),
                activation,
            };
            let value =
                serde_json::to_vec(&ours).map_err(|err| EtcdError::BadRecord(err.to_string()))?;
            when.push(Compare::value(key.clone(), CompareOp::Equal, value));
        }
        let txn = Txn::new().when(when).and_then([TxnOp::delete(key, None)]);
        let answer = self.client.clone().txn(txn).await.map_err(request)?;
        Ok(answer.succeeded())
    }
}
