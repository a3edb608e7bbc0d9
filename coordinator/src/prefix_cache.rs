//! Which token prefixes the stages hold in parked caches, so a request that starts like an earlier
//! one (the next turn of a chat, the same system prompt) copies those positions instead of
//! computing them again.
//!
//! An entry is a finished sequence whose caches every stage keeps parked (`ReleaseRequest.park`),
//! named by its sequence id, with the tokens of its prompt. A new sequence forks from the entry
//! sharing its longest prefix: its first step sends `copy_prefix_from` and starts there.
//!
//! Only positions that prompt steps computed are shared: a generated token's position was computed
//! by a one-row decode step, whose matmul and attention shapes differ from the prompt step that
//! computes the same position in a cold start, and round differently. For the same reason a fork
//! feeds at least two positions, so its last prompt position goes through a prompt step too. The
//! next turn of a chat thus recomputes the last answer and the new message, and copies everything
//! before. The positions computed after a copy still meet differently shaped attention matmuls than
//! in one cold prefill, so greedy tokens may part from a cold run's at near-ties.
//! Entries are found by scanning them (a few hundred at most, each compared only as far as it
//! agrees), kept least-recently-used within a count, and dropped when a worker says it evicted one.
//! An entry with a fork on its way is pinned: the coordinator never frees it under that step.

use std::collections::HashMap;

/// Fewer shared tokens than this are computed again rather than copied: a copy and an entry's
/// upkeep cost more than a few positions of prefill.
pub const MIN_SHARED_TOKENS: usize = 16;

/// A parked prefix and what uses it.
#[derive(Debug)]
struct Entry {
    tokens: Vec<u32>,
    last_used: u64,
    /// Steps in flight that copy from it.
    pins: usize,
}

/// What to do with a finished sequence offered to the cache.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Offer {
    /// Park it: it is an entry now. Otherwise free it (it adds nothing).
    pub park: bool,
    /// Entries it supersedes, or that fall out of the count: free them on every stage.
    pub dropped: Vec<u64>,
}

/// The coordinator's view of the parked prefixes. Owned by the scheduler task.
#[derive(Debug)]
pub struct PrefixCache {
    entries: HashMap<u64, Entry>,
    max_entries: usize,
    clock: u64,
}

impl PrefixCache {
    /// A cache of at most `max_entries` parked sequences; 0 turns prefix caching off.
    pub fn new(max_entries: usize) -> Self {
        Self {
            entries: HashMap::new(),
            max_entries,
            clock: 0,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.max_entries > 0
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn holds(&self, id: u64) -> bool {
        self.entries.contains_key(&id)
    }

    /// The entry sharing the longest prefix with `prompt`, and how many of its positions a new
    /// sequence copies: at most `prompt.len() - 2` (its first step feeds at least two, see above),
    /// and nothing under [`MIN_SHARED_TOKENS`].
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<(u64, usize)> {
        let limit = prompt.len().saturating_sub(2);
        let (id, shared) = self
            .entries
            .iter()
            .map(|(&id, e)| (id, shared_prefix(&e.tokens, &prompt[..limit])))
            .max_by_key(|&(id, shared)| (shared, self.entries[&id].last_used))?;
        if shared < MIN_SHARED_TOKENS {
            return None;
        }
        self.clock += 1;
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.last_used = self.clock;
        }
        Some((id, shared))
    }

    /// Offers a finished sequence whose stages hold `tokens`. It is parked unless prefix caching is
    /// off, it is too short, or an entry already holds all of it; entries it holds all of are
    /// dropped (what they would give, it gives), and so are the least recently used unpinned ones
    /// past the count.
    pub fn offer(&mut self, id: u64, tokens: &[u32]) -> Offer {
        if !self.is_enabled()
            || tokens.len() < MIN_SHARED_TOKENS
            || self.entries.values().any(|e| e.tokens.starts_with(tokens))
        {
            return Offer::default();
        }
        let mut dropped: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.pins == 0 && tokens.starts_with(&e.tokens))
            .map(|(&id, _)| id)
            .collect();
        for id in &dropped {
            self.entries.remove(id);
        }
        self.clock += 1;
        self.entries.insert(
            id,
            Entry {
                tokens: tokens.to_vec(),
                last_used: self.clock,
                pins: 0,
            },
        );
        while self.entries.len() > self.max_entries {
            let oldest = self
                .entries
                .iter()
                .filter(|(_, e)| e.pins == 0)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(&id, _)| id);
            let Some(oldest) = oldest else { break };
            self.entries.remove(&oldest);
            dropped.push(oldest);
        }
        let park = self.entries.contains_key(&id);
        Offer { park, dropped }
    }

    /// A step that copies from `id` is on its way.
    pub fn pin(&mut self, id: u64) {
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.pins += 1;
        }
    }

    /// That step is back.
    pub fn unpin(&mut self, id: u64) {
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.pins = entry.pins.saturating_sub(1);
        }
    }

    /// Forgets entries a worker no longer holds; returns those that were entries.
    pub fn forget(&mut self, ids: &[u64]) -> Vec<u64> {
        ids.iter()
            .copied()
            .filter(|id| self.entries.remove(id).is_some())
            .collect()
    }

    /// Forgets every entry (a stage was lost: its replacement holds none); returns their ids.
    pub fn clear(&mut self) -> Vec<u64> {
        self.entries.drain().map(|(id, _)| id).collect()
    }
}

/// How many leading tokens `a` and `b` share.
fn shared_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(n: u32) -> Vec<u32> {
        (0..n).collect()
    }

    fn with_tail(n: u32, tail: &[u32]) -> Vec<u32> {
        let mut tokens = run(n);
        tokens.extend_from_slice(tail);
        tokens
    }

    #[test]
    fn lookups_find_the_longest_shared_prefix_and_leave_a_token_to_feed() {
        let mut cache = PrefixCache::new(8);
        assert!(cache.offer(1, &run(40)).park);
        assert!(cache.offer(2, &with_tail(20, &[900; 30])).park);
        for (prompt, want) in [
            // The whole entry, and more to feed.
            (with_tail(40, &[7, 8]), Some((1, 40))),
            // Where it stops agreeing.
            (with_tail(30, &[5; 10]), Some((1, 30))),
            // The prompt is the entry, or one token longer: its last two tokens are fed again.
            (run(40), Some((1, 38))),
            (with_tail(40, &[7]), Some((1, 39))),
            (with_tail(20, &[900; 25]), Some((2, 43))),
            // Too little in common.
            (with_tail(10, &[5; 30]), None),
            (vec![9; 50], None),
            (vec![], None),
        ] {
            assert_eq!(cache.lookup(&prompt), want, "{prompt:?}");
        }
    }

    #[test]
    fn an_offer_supersedes_the_entries_it_extends_and_adds_nothing_they_hold() {
        let mut cache = PrefixCache::new(8);
        assert!(cache.offer(1, &run(30)).park);
        assert!(cache.offer(2, &with_tail(20, &[900; 10])).park);
        // Turn two of the first chat holds all of turn one: turn one goes.
        let offer = cache.offer(3, &with_tail(30, &[5; 20]));
        assert_eq!(
            offer,
            Offer {
                park: true,
                dropped: vec![1]
            }
        );
        // A sequence that an entry holds all of adds nothing.
        assert_eq!(cache.offer(4, &with_tail(30, &[5; 10])), Offer::default());
        // Too short to be worth a copy.
        assert_eq!(
            cache.offer(5, &run(MIN_SHARED_TOKENS as u32 - 1)),
            Offer::default()
        );
        assert_eq!(cache.len(), 2);
        // Off: nothing is parked.
        assert_eq!(PrefixCache::new(0).offer(6, &run(40)), Offer::default());
    }

    #[test]
    fn the_count_drops_the_least_recently_used_but_never_a_pinned_entry() {
        let mut cache = PrefixCache::new(2);
        cache.offer(1, &with_tail(20, &[1; 5]));
        cache.offer(2, &with_tail(20, &[2; 5]));
        // Entry 1 is used (and pinned by the step that copies from it): 2 is the oldest now.
        assert_eq!(cache.lookup(&with_tail(20, &[1; 9])), Some((1, 25)));
        cache.pin(1);
        assert_eq!(cache.offer(3, &with_tail(20, &[3; 5])).dropped, vec![2]);
        // With 1 pinned, 3 goes next, however old 1 is.
        assert_eq!(cache.offer(4, &with_tail(20, &[4; 5])).dropped, vec![3]);
        cache.unpin(1);
        assert_eq!(cache.offer(5, &with_tail(20, &[5; 5])).dropped, vec![1]);
        // A pinned entry that a new one extends stays too.
        cache.pin(5);
        let offer = cache.offer(6, &with_tail(20, &[5; 9]));
        assert!(offer.park && !offer.dropped.contains(&5), "{offer:?}");
    }

    #[test]
    fn evicted_and_lost_entries_are_forgotten() {
        let mut cache = PrefixCache::new(8);
        cache.offer(1, &with_tail(20, &[1; 5]));
        cache.offer(2, &with_tail(20, &[2; 5]));
        assert_eq!(cache.forget(&[2, 7]), vec![2]);
        assert!(cache.holds(1) && !cache.holds(2));
        assert_eq!(cache.lookup(&with_tail(20, &[2; 9])), Some((1, 20)));
        assert_eq!(cache.clear(), vec![1]);
        assert!(cache.is_empty());
        assert_eq!(cache.lookup(&with_tail(20, &[1; 9])), None);
    }
}
