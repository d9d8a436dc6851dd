//! The grain directory's parts: who owns a grain's entry, the entries a
//! silo owns, and the locations a silo caches.
//!
//! # Rules
//!
//! 1. **Ownership.** The entry of a grain lives on one silo of the view,
//!    chosen by rendezvous hashing of the grain's identity with each silo's
//!    ([`owner`]) among the silos that host grains (an external client,
//!    which hosts none, owns no entry; a view where no silo says it hosts
//!    anything counts every silo): every silo that sees the same view
//!    agrees, and a change of view moves only the entries of the silos
//!    that came or went.
//! 2. **First registration wins.** [`Partition::register`] records the
//!    proposed activation only if the grain has no entry, or its entry
//!    names a silo that is no longer live; otherwise it returns the entry
//!    that stands, and the proposer must not activate. Registrations of one
//!    grain are serialised by the partition's per-entry lock.
//! 3. **Unregistering** removes an entry only if it still names the
//!    activation being removed, so a late unregister never erases a newer
//!    activation.
//! 4. **Caching.** Callers keep the locations they learn
//!    ([`LocationCache`]); a location that turns out stale (its silo is
//!    gone, or it no longer hosts the grain) is invalidated and looked up
//!    again. A silo that leaves the view is dropped from the cache whole.
//!    The cache holds at most its capacity ([`LOCATIONS_KEPT`] by default,
//!    a million, as Orleans keeps): an insert into a full cache first
//!    forgets about an eighth of it, chosen by a freshly keyed hash, so at
//!    random and across every shard (one shard locked at a time, once per
//!    eighth of the capacity inserted). A forgotten location costs one
//!    directory lookup when it is next needed, nothing else; a silo that
//!    calls many distinct grains no longer keeps one entry per grain for
//!    its whole life.
//!
//! The messages that carry registrations between silos, and the hand-over
//! of entries when ownership moves, are the directory service's
//! (`node/directory_client.rs`, `node/directory_service.rs`); these rules
//! are what it enforces.

use dashmap::DashMap;
use granary_actors::GrainId;
use serde::{Deserialize, Serialize};

use crate::SiloId;
use crate::membership::Member;
use crate::placement::{grain_key_hash, rendezvous};

/// Where a grain's activation lives: the silo, and which activation there
/// (an activation that is replaced gets a new number).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ActivationAddress {
    /// The hosting silo.
    pub silo: SiloId,
    /// The activation's number on that silo.
    pub activation: u64,
}

/// The silo that owns `grain`'s directory entry in `members` (rule 1).
pub fn owner<'m>(grain: &GrainId, members: &'m [Member]) -> Option<&'m SiloId> {
    let grain = grain_key_hash(grain);
    let any_host = members
        .iter()
        .any(|member| !member.load.grain_types.is_empty());
    members
        .iter()
        .filter(|member| !any_host || !member.load.grain_types.is_empty())
        .map(|member| &member.silo)
        .max_by_key(|silo| (rendezvous(grain, silo), *silo))
}

/// The directory entries one silo owns (rules 2 and 3).
#[derive(Debug, Default)]
pub struct Partition {
    entries: DashMap<GrainId, ActivationAddress>,
}

impl Partition {
    /// An empty partition.
    pub fn new() -> Partition {
        Partition::default()
    }

    /// Registers `proposed` for `grain` unless a live activation stands;
    /// returns the activation that stands afterwards (rule 2). `live` tells
    /// whether a silo is in the current view.
    pub fn register(
        &self,
        grain: &GrainId,
        proposed: ActivationAddress,
        live: impl Fn(&SiloId) -> bool,
    ) -> ActivationAddress {
        match self.entries.entry(grain.clone()) {
            dashmap::Entry::Occupied(mut entry) => {
                if live(&entry.get().silo) {
                    entry.get().clone()
                } else {
                    entry.insert(proposed.clone());
                    proposed
                }
            }
            dashmap::Entry::Vacant(vacant) => {
                vacant.insert(proposed.clone());
                proposed
            }
        }
    }

    /// Moves `grain`'s entry from `from` to `to` (a migration's switch):
    /// done if the entry is `from`, or already `to`; returns the entry
    /// afterwards, if any.
    pub fn switch(
        &self,
        grain: &GrainId,
        from: &ActivationAddress,
        to: ActivationAddress,
    ) -> Option<ActivationAddress> {
        let mut entry = self.entries.get_mut(grain)?;
        if *entry == *from {
            *entry = to;
        }
        Some(entry.clone())
    }

    /// The activation registered for `grain`.
    pub fn lookup(&self, grain: &GrainId) -> Option<ActivationAddress> {
        self.entries.get(grain).map(|entry| entry.clone())
    }

    /// Removes `grain`'s entry if it is still `address` (rule 3); returns
    /// whether it was.
    pub fn unregister(&self, grain: &GrainId, address: &ActivationAddress) -> bool {
        self.entries
            .remove_if(grain, |_, current| current == address)
            .is_some()
    }

    /// Removes `grain`'s entry if it names `silo` (its home gave it up);
    /// returns whether it did.
    pub fn unregister_silo(&self, grain: &GrainId, silo: &SiloId) -> bool {
        self.entries
            .remove_if(grain, |_, current| &current.silo == silo)
            .is_some()
    }

    /// Removes every entry naming `silo` (it left the view); returns how
    /// many.
    pub fn forget_silo(&self, silo: &SiloId) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, address| &address.silo != silo);
        before - self.entries.len()
    }

    /// Removes every entry (a silo that fenced itself comes back as a new
    /// incarnation owning none); returns how many.
    pub fn clear(&self) -> usize {
        let before = self.entries.len();
        self.entries.clear();
        before
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// How many locations a [`LocationCache`] keeps unless told otherwise
/// (rule 4).
pub const LOCATIONS_KEPT: usize = 1 << 20;

/// Locations a silo has learned (rule 4), at most its capacity.
#[derive(Debug)]
pub struct LocationCache {
    locations: DashMap<GrainId, ActivationAddress>,
    capacity: usize,
}

impl Default for LocationCache {
    fn default() -> LocationCache {
        LocationCache::with_capacity(LOCATIONS_KEPT)
    }
}

impl LocationCache {
    /// An empty cache of [`LOCATIONS_KEPT`] locations.
    pub fn new() -> LocationCache {
        LocationCache::default()
    }

    /// An empty cache of at most `capacity` locations (at least 1).
    pub fn with_capacity(capacity: usize) -> LocationCache {
        LocationCache {
            locations: DashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// Locations held.
    pub fn len(&self) -> usize {
        self.locations.len()
    }

    /// Whether no location is held.
    pub fn is_empty(&self) -> bool {
        self.locations.is_empty()
    }

    /// The cached location of `grain`.
    pub fn get(&self, grain: &GrainId) -> Option<ActivationAddress> {
        self.locations.get(grain).map(|entry| entry.clone())
    }

    /// Remembers `address` for `grain`, first making room in a full cache
    /// (rule 4).
    pub fn insert(&self, grain: GrainId, address: ActivationAddress) {
        if self.locations.len() >= self.capacity && !self.locations.contains_key(&grain) {
            use std::hash::BuildHasher;
            let chosen = std::collections::hash_map::RandomState::new();
            self.locations
                .retain(|grain, _| chosen.hash_one(grain) % 8 != 0);
            // A small cache may lose none that way: any one then.
            if self.locations.len() >= self.capacity {
                let mut shed = (self.capacity / 8).max(1);
                self.locations.retain(|_, _| {
                    if shed == 0 {
                        return true;
                    }
                    shed -= 1;
                    false
                });
            }
        }
        self.locations.insert(grain, address);
    }

    /// Forgets `grain`'s location if it is still `stale` (a newer one that
    /// raced in stays).
    pub fn invalidate(&self, grain: &GrainId, stale: &ActivationAddress) {
        self.locations.remove_if(grain, |_, cached| cached == stale);
    }

    /// Forgets every location on `silo`.
    pub fn forget_silo(&self, silo: &SiloId) {
        self.locations.retain(|_, address| &address.silo != silo);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Arc;

    use granary_actors::GrainKey;

    use super::*;
    use crate::membership::SiloLoad;

    fn grain(key: u64) -> GrainId {
        GrainId {
            type_name: "g".into(),
            key: GrainKey::U64(key),
        }
    }

    fn view(addresses: &[&str]) -> Vec<Member> {
        addresses
            .iter()
            .map(|address| Member {
                silo: SiloId::new(*address, 1),
                gossip: "127.0.0.1:1".parse().ok(),
                load: SiloLoad::default(),
            })
            .collect()
    }

    fn at(silo: &str, activation: u64) -> ActivationAddress {
        ActivationAddress {
            silo: SiloId::new(silo, 1),
            activation,
        }
    }

    #[test]
    fn ownership_is_agreed_and_moves_only_with_the_silo_that_left() {
        let five = view(&["a", "b", "c", "d", "e"]);
        let four = view(&["a", "b", "d", "e"]);
        let mut owners = HashSet::new();
        for key in 0..1000 {
            let before = owner(&grain(key), &five).unwrap();
            owners.insert(before.clone());
            let after = owner(&grain(key), &four).unwrap();
            if before.address != "c" {
                assert_eq!(before, after, "grain {key}");
            }
        }
        assert_eq!(owners.len(), 5);
        assert_eq!(owner(&grain(1), &[]), None);
    }

    #[test]
    fn the_first_registration_wins_until_its_silo_leaves() {
        let partition = Partition::new();
        let everyone = |_: &SiloId| true;
        assert_eq!(
            partition.register(&grain(1), at("a", 1), everyone),
            at("a", 1)
        );
        assert_eq!(
            partition.register(&grain(1), at("b", 9), everyone),
            at("a", 1)
        );
        // Silo a is gone: the next proposal takes over.
        let without_a = |silo: &SiloId| silo.address != "a";
        assert_eq!(
            partition.register(&grain(1), at("b", 9), without_a),
            at("b", 9)
        );
        // A late unregister of the old activation changes nothing.
        assert!(!partition.unregister(&grain(1), &at("a", 1)));
        assert_eq!(partition.lookup(&grain(1)), Some(at("b", 9)));
        assert!(partition.unregister(&grain(1), &at("b", 9)));
        assert_eq!(partition.lookup(&grain(1)), None);
        partition.register(&grain(2), at("c", 1), everyone);
        partition.register(&grain(3), at("c", 2), everyone);
        assert_eq!(partition.forget_silo(&SiloId::new("c", 1)), 2);
        assert!(partition.is_empty());
    }

    #[test]
    fn concurrent_first_registrations_agree_on_one_winner() {
        let partition = Arc::new(Partition::new());
        let threads: Vec<_> = (0..8u64)
            .map(|silo| {
                let partition = partition.clone();
                std::thread::spawn(move || {
                    (0..500)
                        .map(|key| {
                            partition.register(&grain(key), at(&format!("s{silo}"), key), |_| true)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let results: Vec<Vec<ActivationAddress>> =
            threads.into_iter().map(|t| t.join().unwrap()).collect();
        for key in 0..500usize {
            let winners: HashSet<_> = results.iter().map(|r| r[key].clone()).collect();
            assert_eq!(winners.len(), 1, "grain {key}: {winners:?}");
        }
    }

    /// Rule 4: a silo that calls many distinct grains keeps at most the
    /// cache's capacity of locations, and the latest one learned.
    #[test]
    fn the_cache_keeps_at_most_its_capacity() {
        let cache = LocationCache::with_capacity(100);
        for key in 0..10_000 {
            cache.insert(grain(key), at("a", key));
            assert!(cache.len() <= 100, "{} locations", cache.len());
            assert_eq!(cache.get(&grain(key)), Some(at("a", key)));
        }
        // Updating a location held makes no room.
        let held = cache.len();
        cache.insert(grain(9_999), at("b", 1));
        assert_eq!(cache.len(), held);
    }

    #[test]
    fn a_stale_location_is_invalidated_but_a_newer_one_stays() {
        let cache = LocationCache::new();
        cache.insert(grain(1), at("a", 1));
        cache.invalidate(&grain(1), &at("a", 1));
        assert_eq!(cache.get(&grain(1)), None);
        cache.insert(grain(1), at("b", 2));
        cache.invalidate(&grain(1), &at("a", 1));
        assert_eq!(cache.get(&grain(1)), Some(at("b", 2)));
        cache.insert(grain(2), at("b", 3));
        cache.forget_silo(&SiloId::new("b", 1));
        assert_eq!(cache.get(&grain(1)), None);
        assert_eq!(cache.get(&grain(2)), None);
    }
}
