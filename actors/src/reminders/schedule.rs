//! A silo's schedule: the owned reminder rows it fires, ordered by due
//! time (rules 2, 4 to 6 of `reminders.rs`).
//!
//! Every entry is in `entries`; those not being fired are also in `queue`,
//! keyed by due time, so the next due entry is the queue's first and a
//! firing round takes a prefix of it: no scan of every entry per tick.
//!
//! Reads of the table race with changes made here (rule 6). Every change
//! made here stamps its entry with a fresh generation, and a read takes one
//! when it starts; merging the read, an entry stamped before the read
//! started takes the row as read (the read is newer), one stamped after
//! keeps whichever ETag is greater (ETags only grow,
//! `storage/reminders.rs` rule 2), and a row deleted here after the read
//! started (a tombstone with the row's last ETag) is not brought back.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::key::GrainId;
use crate::storage::{ETag, ReminderRow};

/// A reminder's identity: its grain and name.
pub(super) type Key = (GrainId, String);

/// An owned reminder.
#[derive(Debug, Clone)]
struct Entry {
    period_ms: u64,
    /// The next due time. Ahead of the row's while a firing's write failed
    /// or lost to a conflict (rule 5); the ETag is then the row's.
    due_ms: u64,
    etag: ETag,
    /// Fired and not yet written back: not in the queue.
    in_flight: bool,
    /// The generation of the last change made here or of the read that
    /// last confirmed it.
    generation: u64,
}

/// One reminder to fire (rule 4).
#[derive(Debug, Clone)]
pub(super) struct Firing {
    pub(super) key: Key,
    /// The row's ETag when it was fired: the write expects it.
    pub(super) etag: ETag,
    /// The due time fired.
    pub(super) due_ms: u64,
    /// The due time to write: whole periods past the firing time.
    pub(super) next_due_ms: u64,
}

/// What a read of the table covered.
pub(super) enum Scope<'a> {
    /// The whole table (a rescan).
    All,
    /// One grain's rows.
    Grain(&'a GrainId),
}

/// How a firing's write ended.
pub(super) enum Written {
    /// Stored with this new ETag.
    Saved(ETag),
    /// Not stored (the store failed): the row keeps its ETag and old due
    /// time, and this silo keeps the new one in memory (rule 5).
    Unsaved,
}

/// The first due time after `fired_ms` on the grid `due_ms + k * period`,
/// capped at `MAX_MS` (rule 9: the SQL stores keep integers below 2^63).
fn after(due_ms: u64, period_ms: u64, fired_ms: u64) -> u64 {
    let period = period_ms.max(1);
    if due_ms > fired_ms {
        return due_ms.min(super::MAX_MS);
    }
    let behind = (fired_ms - due_ms) / period + 1;
    due_ms
        .saturating_add(behind.saturating_mul(period))
        .min(super::MAX_MS)
}

/// A silo's owned reminders.
#[derive(Debug, Default)]
pub(super) struct Schedule {
    entries: BTreeMap<Key, Entry>,
    /// `(due, key)` of every entry not in flight.
    queue: BTreeSet<(u64, Key)>,
    /// Rows deleted here: their last ETag and the generation of the delete.
    tombstones: HashMap<Key, (ETag, u64)>,
    generation: u64,
}

impl Schedule {
    fn fresh_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// Starts a read of the table: its generation, for `merge`.
    pub(super) fn begin_read(&mut self) -> u64 {
        self.fresh_generation()
    }

    /// Owned reminders scheduled.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The earliest due time of an entry not in flight.
    pub(super) fn next_due(&self) -> Option<u64> {
        self.queue.first().map(|(due, _)| *due)
    }

    /// Replaces (or inserts) `key`'s entry, keeping the queue in step.
    fn put(&mut self, key: Key, entry: Entry) {
        if let Some(old) = self.entries.get(&key)
            && !old.in_flight
        {
            self.queue.remove(&(old.due_ms, key.clone()));
        }
        if !entry.in_flight {
            self.queue.insert((entry.due_ms, key.clone()));
        }
        self.entries.insert(key, entry);
    }

    fn remove(&mut self, key: &Key) {
        if let Some(old) = self.entries.remove(key)
            && !old.in_flight
        {
            self.queue.remove(&(old.due_ms, key.clone()));
        }
    }

    /// A registration made here (rule 3): the row as written.
    pub(super) fn registered(&mut self, key: Key, period_ms: u64, due_ms: u64, etag: ETag) {
        if self
            .entries
            .get(&key)
            .is_some_and(|entry| entry.etag > etag)
        {
            // A newer registration, read meanwhile, stays.
            return;
        }
        let generation = self.fresh_generation();
        self.put(
            key,
            Entry {
                period_ms,
                due_ms,
                etag,
                in_flight: false,
                generation,
            },
        );
    }

    /// A removal made here (rule 3): `deleted` is the ETag the row had.
    pub(super) fn unregistered(&mut self, key: Key, deleted: Option<ETag>) {
        self.remove(&key);
        if let Some(etag) = deleted {
            let generation = self.fresh_generation();
            self.tombstones.insert(key, (etag, generation));
        }
    }

    /// Merges a read that began at generation `start` and covered `scope`
    /// (rule 6): rows of grains `keep` accepts are adopted, entries that
    /// the read shows gone, or that `keep` refuses, leave.
    pub(super) fn merge(
        &mut self,
        start: u64,
        rows: Vec<ReminderRow>,
        scope: Scope<'_>,
        keep: &dyn Fn(&GrainId) -> bool,
    ) {
        for row in rows {
            if !keep(&row.grain) {
                self.remove(&(row.grain, row.name));
                continue;
            }
            let key = (row.grain, row.name);
            if !self.tombstones.is_empty()
                && let Some((etag, generation)) = self.tombstones.get(&key)
                && *generation > start
                && row.etag <= *etag
            {
                // Deleted here while the read ran.
                continue;
            }
            let Some(entry) = self.entries.get_mut(&key) else {
                // New here: the row as read.
                self.queue.insert((row.next_due_ms, key.clone()));
                self.entries.insert(
                    key,
                    Entry {
                        period_ms: row.period_ms,
                        due_ms: row.next_due_ms,
                        etag: row.etag,
                        in_flight: false,
                        generation: start,
                    },
                );
                continue;
            };
            let adopted = if entry.generation > start && row.etag <= entry.etag {
                // Changed here while the read ran: the greater ETag wins.
                continue;
            } else if entry.etag == row.etag {
                // The version this silo has: a due time moved on here stays
                // (rule 5), and so does a firing under way.
                Entry {
                    period_ms: row.period_ms,
                    due_ms: entry.due_ms.max(row.next_due_ms),
                    etag: row.etag,
                    in_flight: entry.in_flight,
                    generation: entry.generation.max(start),
                }
            } else {
                // Changed elsewhere: the row as read. A firing under way
                // will meet a conflict and re-read (rule 5).
                Entry {
                    period_ms: row.period_ms,
                    due_ms: row.next_due_ms,
                    etag: row.etag,
                    in_flight: false,
                    generation: start,
                }
            };
            let queued = (!entry.in_flight).then_some(entry.due_ms);
            let requeue = (!adopted.in_flight).then_some(adopted.due_ms);
            *entry = adopted;
            if queued != requeue {
                // Keep the queue in step (the common rescan leaves it be).
                let mut item = (queued.unwrap_or_default(), key);
                if queued.is_some() {
                    self.queue.remove(&item);
                }
                if let Some(due) = requeue {
                    item.0 = due;
                    self.queue.insert(item);
                }
            }
        }
        // Entries the read did not show, unless changed here since it
        // began (and still kept).
        let gone: Vec<Key> = match scope {
            Scope::All => self
                .entries
                .iter()
                .filter(|(key, entry)| {
                    entry.generation < start || (entry.generation > start && !keep(&key.0))
                })
                .map(|(key, _)| key.clone())
                .collect(),
            Scope::Grain(grain) => {
                let kept = keep(grain);
                self.entries
                    .range((grain.clone(), String::new())..)
                    .take_while(|((g, _), _)| g == grain)
                    .filter(|(_, entry)| entry.generation < start || !kept)
                    .map(|(key, _)| key.clone())
                    .collect()
            }
        };
        for key in gone {
            self.remove(&key);
        }
        // A tombstone from before the read has done its work.
        match scope {
            Scope::All => self
                .tombstones
                .retain(|_, (_, generation)| *generation > start),
            Scope::Grain(grain) => self
                .tombstones
                .retain(|key, (_, generation)| key.0 != *grain || *generation > start),
        }
    }

    /// Takes every entry due at `now_ms` (rule 4), marking it in flight;
    /// entries of grains `keep` refuses leave the schedule instead.
    pub(super) fn take_due(&mut self, now_ms: u64, keep: &dyn Fn(&GrainId) -> bool) -> Vec<Firing> {
        let mut firings = Vec::new();
        while let Some((due_ms, _)) = self.queue.first()
            && *due_ms <= now_ms
        {
            let Some((due_ms, key)) = self.queue.pop_first() else {
                break;
            };
            let Some(entry) = self.entries.get_mut(&key) else {
                continue;
            };
            if !keep(&key.0) {
                self.entries.remove(&key);
                continue;
            }
            entry.in_flight = true;
            firings.push(Firing {
                etag: entry.etag,
                due_ms,
                next_due_ms: after(due_ms, entry.period_ms, now_ms),
                key,
            });
        }
        firings
    }

    /// A firing's write ended (rule 4, 5): the entry, if it is still the
    /// version fired, moves on to `firing.next_due_ms`.
    pub(super) fn written(&mut self, firing: &Firing, written: Written) {
        let Some(entry) = self.entries.get(&firing.key) else {
            return;
        };
        if !entry.in_flight || entry.etag != firing.etag {
            // Replaced meanwhile by a newer version, which stays.
            return;
        }
        let mut entry = entry.clone();
        if let Written::Saved(etag) = written {
            entry.etag = etag;
        }
        entry.due_ms = firing.next_due_ms;
        entry.in_flight = false;
        entry.generation = self.fresh_generation();
        self.put(firing.key.clone(), entry);
    }

    /// A firing that did not happen (the silo, or the grain's home, is
    /// shutting down): the row is left as it was, and this silo tries
    /// again at `retry_ms`.
    pub(super) fn not_fired(&mut self, firing: &Firing, retry_ms: u64) {
        if let Some(entry) = self.entries.get(&firing.key)
            && entry.in_flight
            && entry.etag == firing.etag
        {
            let mut entry = entry.clone();
            entry.in_flight = false;
            entry.due_ms = entry.due_ms.max(retry_ms);
            entry.generation = self.fresh_generation();
            self.put(firing.key.clone(), entry);
        }
    }

    /// After a conflict and the re-read of the grain's rows (or a failed
    /// re-read): the due time fired is not fired again (rule 5).
    pub(super) fn after_conflict(&mut self, firing: &Firing) {
        let Some(entry) = self.entries.get(&firing.key) else {
            // Deleted, or no longer owned.
            return;
        };
        if entry.in_flight && entry.etag == firing.etag {
            // The re-read failed: as if the write had failed.
            self.written(firing, Written::Unsaved);
            return;
        }
        if entry.in_flight || entry.due_ms > firing.due_ms {
            return;
        }
        let mut entry = entry.clone();
        entry.due_ms = after(entry.due_ms, entry.period_ms, firing.due_ms);
        entry.generation = self.fresh_generation();
        self.put(firing.key.clone(), entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::GrainKey;

    fn grain(key: u64) -> GrainId {
        GrainId {
            type_name: "t".into(),
            key: GrainKey::U64(key),
        }
    }

    fn row(key: u64, due: u64, etag: ETag) -> ReminderRow {
        ReminderRow {
            grain: grain(key),
            name: "r".into(),
            period_ms: 10,
            next_due_ms: due,
            etag,
        }
    }

    fn all(_: &GrainId) -> bool {
        true
    }

    #[test]
    fn the_queue_orders_by_due_time_and_a_firing_moves_on_by_whole_periods() {
        let mut schedule = Schedule::default();
        let start = schedule.begin_read();
        schedule.merge(start, vec![row(1, 100, 1), row(2, 50, 2)], Scope::All, &all);
        assert_eq!(schedule.next_due(), Some(50));
        let firings = schedule.take_due(75, &all);
        assert_eq!(firings.len(), 1);
        assert_eq!(firings[0].next_due_ms, 80);
        assert_eq!(schedule.next_due(), Some(100));
        // Missed periods fire once.
        schedule.written(&firings[0], Written::Saved(3));
        let firings = schedule.take_due(125, &all);
        assert_eq!(firings.len(), 2);
        let late = firings
            .iter()
            .find(|f| f.key.0 == grain(2))
            .map(|f| f.next_due_ms);
        assert_eq!(late, Some(130));
    }

    #[test]
    fn a_stale_read_does_not_undo_a_newer_write_or_revive_a_deleted_row() {
        let mut schedule = Schedule::default();
        let start = schedule.begin_read();
        schedule.merge(
            start,
            vec![row(1, 100, 1), row(2, 100, 2)],
            Scope::All,
            &all,
        );
        let firing = schedule.take_due(100, &all).remove(0);
        // A read begins before the write lands, and sees the old version.
        let stale = schedule.begin_read();
        schedule.written(&firing, Written::Saved(5));
        schedule.unregistered((grain(2), "r".into()), Some(2));
        schedule.merge(
            stale,
            vec![row(1, 100, 1), row(2, 100, 2)],
            Scope::All,
            &all,
        );
        assert_eq!(schedule.len(), 1);
        assert_eq!(schedule.next_due(), Some(110));
        // A read begun after the write shows the row gone: it goes.
        let fresh = schedule.begin_read();
        schedule.merge(fresh, vec![], Scope::All, &all);
        assert_eq!(schedule.len(), 0);
    }

    /// Rule 9: a period near the longest allowed (a one-shot reminder's
    /// idiom) moves the due time to the cap, not past 2^63, which the SQL
    /// stores refuse (and SQLite's batch write then failed every firing of
    /// its round).
    #[test]
    fn a_due_time_after_the_longest_period_stays_below_two_to_the_sixty_three() {
        let now = 1_800_000_000_000;
        assert_eq!(after(now, super::super::MAX_MS, now), super::super::MAX_MS);
        assert_eq!(after(u64::MAX, 10, 0), super::super::MAX_MS);
        assert!(after(now, super::super::MAX_MS, now) <= i64::MAX as u64);
        assert_eq!(after(100, 10, 105), 110);
    }

    #[test]
    fn after_a_conflict_the_due_time_fired_is_not_fired_again() {
        let mut schedule = Schedule::default();
        let start = schedule.begin_read();
        schedule.merge(start, vec![row(1, 100, 1)], Scope::All, &all);
        let firing = schedule.take_due(105, &all).remove(0);
        // Re-registered elsewhere with the same due time: a new version.
        let reread = schedule.begin_read();
        schedule.merge(reread, vec![row(1, 100, 4)], Scope::Grain(&grain(1)), &all);
        schedule.after_conflict(&firing);
        assert_eq!(schedule.next_due(), Some(110));
        assert!(schedule.take_due(105, &all).is_empty());
    }

    #[test]
    fn grains_not_kept_leave_the_schedule() {
        let mut schedule = Schedule::default();
        let start = schedule.begin_read();
        schedule.merge(
            start,
            vec![row(1, 100, 1), row(2, 100, 2)],
            Scope::All,
            &all,
        );
        let odd = |grain: &GrainId| grain.key == GrainKey::U64(1);
        let start = schedule.begin_read();
        schedule.merge(
            start,
            vec![row(1, 100, 1), row(2, 100, 2)],
            Scope::All,
            &odd,
        );
        assert_eq!(schedule.len(), 1);
        assert!(schedule.take_due(100, &|_| false).is_empty());
        assert_eq!(schedule.len(), 0);
    }
}
