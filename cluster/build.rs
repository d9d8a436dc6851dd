//! Sets `cfg(granary_etcd)` when `GRANARY_ETCD_ENDPOINTS` names an etcd for
//! the tests (CI starts one on loopback), and `cfg(granary_etcd_tls)` when
//! `GRANARY_ETCD_TLS_ENDPOINTS` and `GRANARY_ETCD_TLS_DIR` name one over
//! TLS. Without them, the etcd tests report as ignored, with the reason.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(granary_etcd)");
    println!("cargo::rustc-check-cfg=cfg(granary_etcd_tls)");
    // A second etcd, over TLS with client certificates and users
    // (`scripts/etcd-tls.sh`), for the etcd TLS tests.
    println!("cargo::rerun-if-env-changed=GRANARY_ETCD_TLS_ENDPOINTS");
    println!("cargo::rerun-if-env-changed=GRANARY_ETCD_TLS_DIR");
    if std::env::var_os("GRANARY_ETCD_TLS_ENDPOINTS").is_some_and(|url| !url.is_empty())
        && std::env::var_os("GRANARY_ETCD_TLS_DIR").is_some_and(|dir| !dir.is_empty())
    {
        println!("cargo::rustc-cfg=granary_etcd_tls");
    }
    println!("cargo::rerun-if-env-changed=GRANARY_ETCD_ENDPOINTS");
    if std::env::var_os("GRANARY_ETCD_ENDPOINTS").is_some_and(|url| !url.is_empty()) {
        println!("cargo::rustc-cfg=granary_etcd");
    }
}
