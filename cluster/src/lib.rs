//! Granary clustering (not built yet).
//!
//! This crate will hold membership with failure detection (chitchat gossip,
//! etcd), the TCP transport with an in-process test transport, the
//! distributed grain directory and GPU-aware placement. See issue 5 and
//! `ARCHITECTURE.md`.
