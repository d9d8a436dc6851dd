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
//! 2. **The view** is every silo record. It is read at one revision and
//!    then watched from the next, so no change between the read and the
//!    watch is missed. A watch that fails, is cancelled (compaction) or
//!    stays silent for a whole `ttl` reads and watches again.
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
//! 8. **TLS and users.** With [`EtcdConfig::tls`], a silo speaks TLS to
//!    etcd, trusting only the CA given, and presents its certificate when
//!    etcd asks for one (`--client-cert-auth`); with [`EtcdConfig::user`],
//!    it authenticates as that user. Endpoints are `https://` with TLS and
//!    `http://` without; a mix is a configuration error.
//! 7. **Signed records.** Every value a silo writes (its record, a
//!    directory entry) is `<hex tag>:<json>`, the tag HMAC-SHA-256 under
//!    the cluster secret's etcd key (`auth.rs` rule 2) over the cluster's
//!    name, the key, the lease it is attached to and the JSON: a record
//!    cannot be forged, altered, moved to another key, or copied off its
//!    lease (where it would outlive its silo) by anyone without the
//!    secret. A silo record that does not verify is not in the view: a
//!    forged write over a real record leaves the last verified one until
//!    the view is next read afresh (every `5 × ttl` at most), and then the
//!    silo is out of the view until it writes its record again with its
//!    next load (so nothing forged outlives its lease for long, and
//!    someone with write access to etcd can take a silo out of the view
//!    for a few seconds, as they could by deleting its key). A directory entry without a lease that does not
//!    verify is deleted (if unchanged since it was read) and taken as
//!    absent; one attached to a lease that does not verify is refused
//!    with an error, never deleted, since this silo's secret may be the
//!    wrong one and deleting a live silo's entry would let two homes
//!    stand.
//! 6. **Fencing.** A silo holds its lease until `ttl` (less a margin)
//!    after its last confirmed renewal was sent: etcd, counting from when
//!    it received that renewal, cannot have expired it sooner. A lost
//!    keep-alive stream is re-opened. Once a silo can no longer be sure it
//!    holds its lease, it has left for good ([`EtcdMembership::holds_lease`]
//!    turns false): a node then stops serving, since others may already
//!    have activated its grains elsewhere.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use granary_actors::GrainId;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::SiloId;
use crate::auth::{ClusterSecret, Purpose};
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
    /// TLS to etcd (`https://` endpoints): the CA that signed etcd's
    /// certificate and, for etcd's `--client-cert-auth`, this silo's
    /// certificate and key. None: plain HTTP.
    pub tls: Option<EtcdTls>,
    /// A user and password for etcd's authentication. None: no user (or,
    /// with a client certificate and etcd's `--client-cert-auth`, the
    /// certificate's common name).
    pub user: Option<EtcdUser>,
}

/// TLS to etcd, as PEM text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that signed etcd's server certificate.
    pub ca_pem: String,
    /// This silo's certificate and key, for etcd's client-certificate
    /// authentication.
    pub identity: Option<(String, String)>,
    /// The name etcd's certificate must carry, if not the endpoint's host.
    pub domain: Option<String>,
}

/// A user of etcd's authentication. Its `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdUser {
    /// The user's name.
    pub name: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for EtcdUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdUser")
            .field("name", &self.name)
            .field("password", &"<hidden>")
            .finish()
    }
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
            tls: None,
            user: None,
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
        // TLS goes with https:// endpoints, plain HTTP with http://.
        let tls = self.tls.is_some();
        if let Some(endpoint) = self
            .endpoints
            .iter()
            .find(|endpoint| endpoint.starts_with("https://") != tls)
        {
            return Err(EtcdError::InvalidConfig(if tls {
                format!("{endpoint}: TLS is set, so every endpoint is https://")
            } else {
                format!("{endpoint}: an https:// endpoint needs TLS settings (its CA)")
            }));
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

/// Seals and opens the values of one cluster's keys (rule 7).
#[derive(Clone)]
struct Records {
    secret: ClusterSecret,
    cluster: String,
}

impl Records {
    /// `json` sealed for `key` under `lease`.
    fn seal(&self, key: &[u8], lease: i64, json: &[u8]) -> Vec<u8> {
        let tag = self.secret.tag(
            Purpose::EtcdRecord,
            &self.cluster,
            &[key, &lease.to_le_bytes(), json],
        );
        let mut out: Vec<u8> = tag
            .iter()
            .flat_map(|byte| format!("{byte:02x}").into_bytes())
            .collect();
        out.push(b':');
        out.extend_from_slice(json);
        out
    }

    /// The JSON of `value` at `key`, attached to `lease`, if its tag
    /// verifies for that lease: a value copied to a key without a lease,
    /// or to another lease, does not.
    fn open<'a>(&self, key: &[u8], lease: i64, value: &'a [u8]) -> Option<&'a [u8]> {
        if lease == 0 {
            return None;
        }
        let split = value.iter().position(|byte| *byte == b':')?;
        let (hex, json) = (&value[..split], &value[split + 1..]);
        if hex.len() != 64 {
            return None;
        }
        let tag = hex
            .chunks_exact(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        self.secret
            .verify_tag(
                Purpose::EtcdRecord,
                &self.cluster,
                &[key, &lease.to_le_bytes(), json],
                &tag,
            )
            .then_some(json)
    }

    /// The silo record of `kv`, if it verifies and reads.
    fn silo(&self, kv: &etcd_client::KeyValue) -> Option<SiloRecord> {
        let (key, value) = (kv.key(), kv.value());
        let Some(json) = self.open(key, kv.lease(), value) else {
            tracing::warn!(
                key = %String::from_utf8_lossy(key),
                "a silo record whose tag does not verify is ignored"
            );
            return None;
        };
        serde_json::from_slice(json)
            .inspect_err(|err| tracing::warn!(error = %err, "an unreadable silo record is ignored"))
            .ok()
    }
}

/// A silo's record (rule 2).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SiloRecord {
    silo: SiloId,
    load: SiloLoad,
}

/// One silo's membership in etcd (rules 1 to 3).
pub struct EtcdMembership {
    client: Client,
    config: EtcdConfig,
    records: Records,
    silo: SiloId,
    key: String,
    lease: i64,
    /// When the lease may expire at the earliest (rule 6).
    lease_ends: Arc<LeaseClock>,
    view: watch::Receiver<Vec<Member>>,
    tasks: Vec<JoinHandle<()>>,
}

/// The earliest moment etcd may expire a silo's lease, from this side:
/// `ttl` after the last renewal was *sent* (etcd counts from when it
/// received it, which is later), less a margin for clock-rate drift.
#[derive(Debug)]
struct LeaseClock {
    /// The clock's zero.
    base: Instant,
    /// Nanoseconds after `base` when the lease may end; 0 once lost.
    ends_at: AtomicU64,
    ttl: Duration,
}

impl LeaseClock {
    fn new(granted: Instant, ttl: Duration) -> LeaseClock {
        let ends = u64::try_from((ttl - ttl / 6).as_nanos()).unwrap_or(u64::MAX);
        LeaseClock {
            base: granted,
            ends_at: AtomicU64::new(ends),
            ttl,
        }
    }

    /// A renewal sent at `sent` was confirmed.
    fn renewed(&self, sent: Instant) {
        let ends = sent.saturating_duration_since(self.base) + self.ttl - self.ttl / 6;
        let nanos = u64::try_from(ends.as_nanos()).unwrap_or(u64::MAX);
        // Never revives a lost lease, never moves the end back.
        let _ = self
            .ends_at
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                (current != 0 && nanos > current).then_some(nanos)
            });
    }

    fn lose(&self) {
        self.ends_at.store(0, Ordering::Release);
    }

    /// Whether the lease is held now; once it is not, it never is again
    /// (a renewal confirmed late does not revive it).
    fn holds(&self) -> bool {
        let now = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let ends = self.ends_at.load(Ordering::Acquire);
        if now < ends {
            return true;
        }
        // Lost: make it stick, unless a renewal moved the end meanwhile.
        let _ = self
            .ends_at
            .compare_exchange(ends, 0, Ordering::AcqRel, Ordering::Acquire);
        now < self.ends_at.load(Ordering::Acquire)
    }
}

/// Rule 1: renews the lease every `ttl / 3`, re-opening the keep-alive
/// stream when it breaks (an etcd restart, a leader change); each round is
/// bounded, so a silent etcd cannot stall it. When the lease is found
/// expired, or cannot have been renewed in time, it is lost for good.
async fn keep_alive(mut client: Client, lease: i64, ttl: Duration, clock: Arc<LeaseClock>) {
    let every = ttl / 3;
    let mut stream = None;
    loop {
        if !clock.holds() {
            clock.lose();
            tracing::error!(
                lease,
                "the etcd lease could not be renewed in time; this silo left the view"
            );
            return;
        }
        let sent = Instant::now();
        let round = async {
            if stream.is_none() {
                stream = Some(client.lease_keep_alive(lease).await?);
            }
            let Some((keeper, answers)) = stream.as_mut() else {
                return Ok(None);
            };
            keeper.keep_alive().await?;
            answers.message().await
        };
        match tokio::time::timeout(every, round).await {
            Ok(Ok(Some(answer))) if answer.ttl() > 0 => clock.renewed(sent),
            Ok(Ok(Some(_))) => {
                clock.lose();
                tracing::error!(lease, "the etcd lease expired; this silo left the view");
                return;
            }
            // The stream ended, failed or went silent: open a new one,
            // after a short pause (etcd may be refusing at once).
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                tracing::warn!(lease, "etcd lease keep-alive failed; retrying");
                stream = None;
                tokio::time::sleep((ttl / 30).max(Duration::from_millis(20))).await;
                continue;
            }
        }
        tokio::time::sleep(every.saturating_sub(sent.elapsed())).await;
    }
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
    /// the lease alive, and starts watching the view; every record is
    /// signed with `secret` and checked with it (rule 7).
    pub async fn join(
        config: EtcdConfig,
        secret: ClusterSecret,
        silo: SiloId,
        load: SiloLoad,
    ) -> Result<EtcdMembership, EtcdError> {
        config.validate()?;
        let records = Records {
            secret,
            cluster: config.cluster.clone(),
        };
        // HTTP/2 pings find a connection that went silent (a partition)
        // instead of waiting on it for ever.
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.timeout)
            .with_timeout(config.timeout)
            .with_keep_alive(config.ttl / 3, config.ttl / 3)
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &config.tls {
            let mut settings = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                settings = settings.identity(etcd_client::Identity::from_pem(cert, key));
            }
            if let Some(domain) = &tls.domain {
                settings = settings.domain_name(domain.clone());
            }
            options = options.with_tls(settings);
        }
        if let Some(user) = &config.user {
            options = options.with_user(user.name.clone(), user.password.clone());
        }
        let mut client = tokio::time::timeout(
            config.timeout,
            Client::connect(config.endpoints.clone(), Some(options)),
        )
        .await
        .map_err(|_| EtcdError::Connect(format!("no answer in {:?}", config.timeout)))?
        .map_err(|err| EtcdError::Connect(err.to_string()))?;
        let ttl = i64::try_from(config.ttl.as_secs()).unwrap_or(i64::MAX);
        let granted = Instant::now();
        let grant = client.lease_grant(ttl, None).await.map_err(request)?;
        let lease = grant.id();
        // Fencing counts from what etcd granted, in whole seconds, never
        // more than was asked for.
        let lease_ttl = Duration::from_secs(u64::try_from(grant.ttl()).unwrap_or(0))
            .min(Duration::from_secs(config.ttl.as_secs()));
        let key = format!("{}{}", config.silos(), silo);
        let record = SiloRecord {
            silo: silo.clone(),
            load,
        };
        put_record(&mut client, &records, &key, &record, lease).await?;
        let (publish, view) = watch::channel(Vec::new());
        let first = read_view(&mut client, &config, &records).await?;
        publish.send_replace(members(&first.1));
        // Nothing is awaited from here on: a join cancelled earlier leaves
        // no task keeping its lease alive (the lease expires after ttl).
        let lease_ends = Arc::new(LeaseClock::new(granted, lease_ttl));
        let keeping = tokio::spawn(keep_alive(
            client.clone(),
            lease,
            lease_ttl,
            lease_ends.clone(),
        ));
        let watching = tokio::spawn(watch_view(
            client.clone(),
            config.clone(),
            records.clone(),
            first,
            publish,
        ));
        Ok(EtcdMembership {
            client,
            config,
            records,
            silo,
            key,
            lease,
            lease_ends,
            view,
            tasks: vec![keeping, watching],
        })
    }

    /// A cheap check of [`EtcdMembership::holds_lease`] that outlives
    /// this handle (a node reads it on every call it serves).
    pub fn lease_check(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let clock = self.lease_ends.clone();
        move || clock.holds()
    }

    /// Whether this silo may still act as a member (rule 6): its lease
    /// was last renewed recently enough that etcd cannot have expired it.
    /// Once false it stays false: the silo has, or may have, left the
    /// view, and only a new incarnation may rejoin.
    pub fn holds_lease(&self) -> bool {
        self.lease_ends.holds()
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
        };
        put_record(
            &mut self.client.clone(),
            &self.records,
            &self.key,
            &record,
            self.lease,
        )
        .await
    }

    /// The directory, with entries attached to this silo's lease.
    pub fn directory(&self) -> EtcdDirectory {
        EtcdDirectory {
            client: self.client.clone(),
            config: self.config.clone(),
            records: self.records.clone(),
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
    records: &Records,
    key: &str,
    record: &SiloRecord,
    lease: i64,
) -> Result<(), EtcdError> {
    let json = serde_json::to_vec(record).map_err(|err| EtcdError::BadRecord(err.to_string()))?;
    let value = records.seal(key.as_bytes(), lease, &json);
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
    records: &Records,
) -> Result<(i64, BTreeMap<Vec<u8>, SiloRecord>), EtcdError> {
    let answer = client
        .get(config.silos(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(request)?;
    let revision = answer.header().map_or(0, |header| header.revision());
    let mut read = BTreeMap::new();
    for kv in answer.kvs() {
        if let Some(record) = records.silo(kv) {
            read.insert(kv.key().to_vec(), record);
        }
    }
    Ok((revision, read))
}

fn members(records: &BTreeMap<Vec<u8>, SiloRecord>) -> Vec<Member> {
    let mut members: Vec<Member> = records
        .values()
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
    signed: Records,
    first: (i64, BTreeMap<Vec<u8>, SiloRecord>),
    publish: watch::Sender<Vec<Member>>,
) {
    let (mut revision, mut records) = first;
    loop {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        if let Ok(mut stream) = client.watch(config.silos(), Some(options)).await {
            // A stream quiet for a whole ttl is read afresh: a partition
            // can leave it open and silent. So is any stream every 5 ttl
            // (rule 7): a record a forged write detached from its lease
            // leaves the view then, if its silo is gone.
            let fresh_until = tokio::time::Instant::now() + config.ttl * 5;
            while let Ok(Ok(Some(answer))) =
                tokio::time::timeout(config.ttl, stream.message()).await
            {
                if tokio::time::Instant::now() > fresh_until {
                    break;
                }
                if answer.canceled() {
                    break;
                }
                for event in answer.events() {
                    let Some(kv) = event.kv() else { continue };
                    revision = revision.max(kv.mod_revision());
                    match event.event_type() {
                        // A forged value over a real record's key: the last
                        // record that verified stands (its silo writes it
                        // again with its next load).
                        EventType::Put => {
                            if let Some(record) = signed.silo(kv) {
                                records.insert(kv.key().to_vec(), record);
                            }
                        }
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
        match read_view(&mut client, &config, &signed).await {
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
    records: Records,
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
        let json =
            serde_json::to_vec(&ours).map_err(|err| EtcdError::BadRecord(err.to_string()))?;
        let value = self.records.seal(&key, self.lease, &json);
        // Rule 7: an entry without a lease that does not verify is deleted
        // and the registration tried again; a few rounds, in case it is
        // written again meanwhile.
        for _ in 0..3 {
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(self.lease)),
                )])
                .or_else([TxnOp::get(key.clone(), None)]);
            let answer = self.client.clone().txn(txn).await.map_err(request)?;
            if answer.succeeded() {
                return Ok(ours);
            }
            let standing = answer
                .op_responses()
                .into_iter()
                .find_map(|response| match response {
                    TxnOpResponse::Get(got) => got.kvs().first().cloned(),
                    _ => None,
                });
            let Some(kv) = standing else {
                // Deleted between the compare and the get: try again.
                continue;
            };
            match self.entry(&key, &kv).await? {
                Some(home) => return Ok(home),
                None => continue,
            }
        }
        Err(EtcdError::BadRecord(
            "the entry kept being replaced by values that do not verify".into(),
        ))
    }

    /// Moves `grain`'s entry from `from` (this silo's activation: only the
    /// silo an entry names gives it away) to `to`, attached to `to`'s lease
    /// `to_lease` and sealed as its silo would seal it: done if the entry is
    /// `from` (compared by its revision once verified), or already `to`.
    /// Returns the entry afterwards.
    pub async fn switch(
        &self,
        grain: &GrainId,
        from: &ActivationAddress,
        to: &ActivationAddress,
        to_lease: i64,
    ) -> Result<Option<ActivationAddress>, EtcdError> {
        if from.silo != self.silo {
            return Err(EtcdError::BadRecord(format!(
                "{} may not move an entry of {}",
                self.silo, from.silo
            )));
        }
        let key = self.key(grain)?;
        let json = serde_json::to_vec(to).map_err(|err| EtcdError::BadRecord(err.to_string()))?;
        let value = self.records.seal(&key, to_lease, &json);
        let answer = self
            .client
            .clone()
            .get(key.clone(), None)
            .await
            .map_err(request)?;
        let Some(kv) = answer.kvs().first() else {
            return Ok(None);
        };
        match self.entry(&key, kv).await? {
            Some(home) if home == *from => {}
            standing => return Ok(standing),
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                kv.mod_revision(),
            )])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(to_lease)),
            )]);
        self.client.clone().txn(txn).await.map_err(request)?;
        // Switched, or changed since it was read: whatever stands now.
        self.lookup(grain).await
    }

    /// This silo's lease: what an entry moved to this silo goes with.
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// The home in `kv`, the entry at `key` (rule 7). One without a lease
    /// that does not verify (no silo writes one: a forgery, or a value
    /// copied off its lease) is deleted if unchanged since it was read,
    /// and taken as absent. One attached to a lease that does not verify
    /// is refused, never deleted: it may be a live silo's, and this silo's
    /// secret the wrong one; deleting it would let two homes stand.
    async fn entry(
        &self,
        key: &[u8],
        kv: &etcd_client::KeyValue,
    ) -> Result<Option<ActivationAddress>, EtcdError> {
        if let Some(json) = self.records.open(key, kv.lease(), kv.value()) {
            return serde_json::from_slice(json)
                .map(Some)
                .map_err(|err| EtcdError::BadRecord(err.to_string()));
        }
        if kv.lease() != 0 {
            return Err(EtcdError::BadRecord(format!(
                "the directory entry {} is held by lease {:x} but its tag does not verify: \
                 is this silo's cluster secret the cluster's?",
                String::from_utf8_lossy(key),
                kv.lease()
            )));
        }
        tracing::warn!(
            key = %String::from_utf8_lossy(key),
            "a directory entry without a lease whose tag does not verify is deleted"
        );
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.to_vec(),
                CompareOp::Equal,
                kv.mod_revision(),
            )])
            .and_then([TxnOp::delete(key.to_vec(), None)]);
        self.client.clone().txn(txn).await.map_err(request)?;
        Ok(None)
    }

    /// The home registered for `grain`, if any.
    pub async fn lookup(&self, grain: &GrainId) -> Result<Option<ActivationAddress>, EtcdError> {
        let key = self.key(grain)?;
        let answer = self
            .client
            .clone()
            .get(key.clone(), None)
            .await
            .map_err(request)?;
        match answer.kvs().first() {
            Some(kv) => self.entry(&key, kv).await,
            None => Ok(None),
        }
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
            let json =
                serde_json::to_vec(&ours).map_err(|err| EtcdError::BadRecord(err.to_string()))?;
            // Sealing is deterministic: the value written is the value
            // compared.
            let value = self.records.seal(&key, self.lease, &json);
            when.push(Compare::value(key.clone(), CompareOp::Equal, value));
        }
        let txn = Txn::new().when(when).and_then([TxnOp::delete(key, None)]);
        let answer = self.client.clone().txn(txn).await.map_err(request)?;
        Ok(answer.succeeded())
    }
}
