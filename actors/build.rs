//! Sets `cfg(granary_postgres)` when `GRANARY_POSTGRES_URL` names a
//! PostgreSQL server for the tests (CI starts one on loopback). Without it,
//! the PostgreSQL tests report as ignored, with the reason.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(granary_postgres)");
    println!("cargo::rerun-if-env-changed=GRANARY_POSTGRES_URL");
    if std::env::var_os("GRANARY_POSTGRES_URL").is_some_and(|url| !url.is_empty()) {
        println!("cargo::rustc-cfg=granary_postgres");
    }
}
