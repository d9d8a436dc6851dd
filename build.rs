//! Sets `cfg(granary_etcd)` when `GRANARY_ETCD_ENDPOINTS` names an etcd for
//! the tests (CI starts one on loopback). Without it, the etcd tests report
//! as ignored, with the reason.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(granary_etcd)");
    println!("cargo::rerun-if-env-changed=GRANARY_ETCD_ENDPOINTS");
    if std::env::var_os("GRANARY_ETCD_ENDPOINTS").is_some_and(|url| !url.is_empty()) {
        println!("cargo::rustc-cfg=granary_etcd");
    }
}
