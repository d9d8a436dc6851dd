//! Handshakes under way, counted by the host they come from, so that one
//! host's silent connections cannot take every slot of a listener
//! (`tls/mod.rs` rule 3, `node/mod.rs` rule 10).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Handshakes under way by source host, each host at most `limit`.
pub(crate) struct Sources {
    limit: usize,
    counts: Mutex<HashMap<String, usize>>,
}

/// One handshake counted against its source host; uncounted when dropped.
pub(crate) struct FromSource {
    sources: Arc<Sources>,
    host: String,
}

impl Sources {
    /// At most `limit` handshakes under way from one host.
    pub(crate) fn new(limit: usize) -> Sources {
        Sources {
            limit,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a handshake from `from` (`host:port`), unless its host has
    /// `limit` under way.
    pub(crate) fn enter(sources: &Arc<Sources>, from: &str) -> Option<FromSource> {
        let host = from
            .rsplit_once(':')
            .map(|(host, _)| host)
            .unwrap_or(from)
            .to_string();
        let mut counts = sources
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(host.clone()).or_insert(0);
        if *count >= sources.limit {
            return None;
        }
        *count += 1;
        Some(FromSource {
            sources: sources.clone(),
            host,
        })
    }
}

impl Drop for FromSource {
    fn drop(&mut self) {
        let mut counts = self
            .sources
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.host) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.host);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_host_has_its_share_and_gets_it_back() {
        let sources = Arc::new(Sources::new(2));
        let a1 = Sources::enter(&sources, "10.0.0.1:5000").expect("a first slot");
        let _a2 = Sources::enter(&sources, "10.0.0.1:5001").expect("a second slot");
        assert!(Sources::enter(&sources, "10.0.0.1:5002").is_none());
        let _b = Sources::enter(&sources, "[::1]:5000").expect("another host's own share");
        drop(a1);
        assert!(Sources::enter(&sources, "10.0.0.1:5003").is_some());
    }
}
