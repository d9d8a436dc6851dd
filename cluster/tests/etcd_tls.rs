//! The etcd provider against an etcd over TLS with client certificates
//! and authentication (`scripts/etcd-tls.sh`; CI starts it): a silo with
//! the CA, its certificate and a user joins and keeps the directory; one
//! without a certificate, with a wrong password, with another CA, or over
//! plain HTTP is refused with a typed error.

#![cfg(feature = "etcd")]

mod common;

use std::time::Duration;

use granary_actors::{GrainId, GrainKey};
use granary_cluster::etcd::{EtcdConfig, EtcdError, EtcdMembership, EtcdTls, EtcdUser};
use granary_cluster::{ClusterSecret, SiloId, SiloLoad};

#[cfg(granary_etcd_tls)]
const ENDPOINTS: &str = env!("GRANARY_ETCD_TLS_ENDPOINTS");
#[cfg(not(granary_etcd_tls))]
const ENDPOINTS: &str = "";
#[cfg(granary_etcd_tls)]
const CERTS: &str = env!("GRANARY_ETCD_TLS_DIR");
#[cfg(not(granary_etcd_tls))]
const CERTS: &str = "";

fn read(name: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(CERTS).join(name))
        .unwrap_or_else(|err| panic!("{CERTS}/{name}: {err}"))
}

fn secret() -> ClusterSecret {
    ClusterSecret::new([0xd7; 32]).expect("32 non-text bytes are a secret")
}

/// A cluster of its own, over TLS with this CA's client certificate and
/// the user the script made.
fn tls_config(test: &str) -> EtcdConfig {
    let mut config = common::etcd_config(test, ENDPOINTS);
    config.timeout = Duration::from_secs(3);
    config.tls = Some(EtcdTls {
        ca_pem: read("ca.pem"),
        identity: Some((read("127.0.0.1.pem"), read("127.0.0.1-key.pem"))),
        domain: None,
    });
    config.user = Some(EtcdUser {
        name: "granary".into(),
        password: "granary-pass".into(),
    });
    config
}

fn silo(n: u64) -> SiloId {
    SiloId::new(format!("10.0.1.{n}:7000"), 100 + n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(granary_etcd_tls),
    ignore = "GRANARY_ETCD_TLS_ENDPOINTS was not set when this test was built (CI starts an etcd over TLS)"
)]
async fn a_silo_with_the_ca_its_certificate_and_a_user_joins() {
    let config = tls_config("tls");
    let a = EtcdMembership::join(config, secret(), silo(1), SiloLoad::default())
        .await
        .expect("joined over TLS");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while a.members().len() != 1 {
        assert!(std::time::Instant::now() < deadline, "no view");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let directory = a.directory();
    let grain = GrainId {
        type_name: "counter".into(),
        key: GrainKey::U64(1),
    };
    let home = directory.register(&grain, 3).await.expect("registered");
    assert_eq!(directory.lookup(&grain).await.expect("read"), Some(home));
    a.leave().await.expect("left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(granary_etcd_tls),
    ignore = "GRANARY_ETCD_TLS_ENDPOINTS was not set when this test was built (CI starts an etcd over TLS)"
)]
async fn a_silo_without_what_etcd_asks_is_refused() {
    let refused = |config: EtcdConfig, why: &'static str| async move {
        let joined = EtcdMembership::join(config, secret(), silo(2), SiloLoad::default()).await;
        assert!(
            matches!(joined, Err(EtcdError::Connect(_) | EtcdError::Request(_))),
            "{why}: {joined:?}"
        );
    };
    // No client certificate.
    let mut config = tls_config("no-cert");
    if let Some(tls) = &mut config.tls {
        tls.identity = None;
    }
    refused(config, "no client certificate").await;
    // A wrong password.
    let mut config = tls_config("password");
    config.user = Some(EtcdUser {
        name: "granary".into(),
        password: "not-it".into(),
    });
    refused(config, "a wrong password").await;
    // A CA that did not sign etcd's certificate.
    let other = granary_cluster::tls::certs::CertAuthority::generate().expect("a CA");
    let mut config = tls_config("other-ca");
    if let Some(tls) = &mut config.tls {
        tls.ca_pem = other.cert_pem().to_string();
    }
    refused(config, "another CA").await;
    // Plain HTTP to the TLS port.
    let mut config = tls_config("plain");
    config.tls = None;
    config.endpoints = config
        .endpoints
        .iter()
        .map(|endpoint| endpoint.replacen("https://", "http://", 1))
        .collect();
    refused(config, "plain HTTP").await;
    // TLS settings with an http:// endpoint: a configuration error.
    let mut config = tls_config("mixed");
    config.endpoints = vec!["http://127.0.0.1:2389".into()];
    assert!(matches!(
        EtcdMembership::join(config, secret(), silo(2), SiloLoad::default()).await,
        Err(EtcdError::InvalidConfig(_))
    ));
}
