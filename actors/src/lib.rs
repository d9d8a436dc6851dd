//! Granary's virtual actor runtime (not built yet).
//!
//! This crate will hold grains, activations with bounded mailboxes on tokio,
//! turn-based execution with call-chain reentrancy, persistence providers,
//! timers, reminders and observers. It has no GPU dependency: the bridge
//! reaches grains as a silo service. See issue 4 and `ARCHITECTURE.md`.
