//! Which token prefixes the stages hold, so a request that starts like another (the next turn of a
//! chat, the same system prompt, the other choices of an `n > 1` request) copies those positions
//! instead of computing them again.
//!
//! An entry is a sequence every stage holds under its id, with the tokens of its prompt: a finished
//! one whose caches the stages keep parked (`ReleaseRequest.park`), or one still running, whose
//! prompt positions stay as its prompt steps left them (a running sequence only appends). A new
//! sequence forks from the entry sharing its longest computed prefix: its first step sends
//! `copy_prefix_from` and starts there. A prompt that would share more with a prompt still being
//! prefilled waits for those positions instead of computing them beside it (SGLang's in-batch prefix
//! caching defers such requests the same way): the choices of an `n > 1` request, or a burst of
//! requests with one system prompt, prefill the shared part once.
//!
//! Only positions that prompt steps computed are shared: a generated token's position was computed
//! by a one-row decode step, whose matmul and attention shapes differ from the prompt step that
//! computes the same position in a cold start, and round differently. For the same reason a fork
//! feeds at least two positions, so its last prompt position goes through a prompt step too. The
//! next turn of a chat thus recomputes the last answer and the new message, and copies everything
//! before. A CPU stage computes a prompt row alike in any prompt step (`layer/attention.rs`), so a
//! sequence on a copy generates what a cold one does, bit for bit, within 512 positions; past them,
//! and on GPUs, tokens may part at near-ties.
//!
//! Entries belong to a tenant (the name of the API key that made them) and only that tenant's
//! requests copy from them, wait on them, or learn their length: otherwise `cached_tokens` and the
//! time to a first token would tell one key, token by token, what another key sent (vLLM salts its
//! prefix hashes per tenant for this reason). A cluster that serves one user can share entries
//! across keys instead (`--share-prefix-cache`). The count of parked entries is shared: one
//! tenant's entries can push out another's, which costs speed, never content.
//! Entries are found by scanning them (a few hundred at most, each compared only as far as it
//! agrees); parked ones are kept least-recently-used within a count, and dropped when a worker says
//! it evicted one; a running one goes when its sequence is freed. An entry with a fork on its way is
//! pinned: the coordinator never frees it under that step.

use std::collections::HashMap;
use std::sync::Arc;

/// Fewer shared tokens than this are computed again rather than copied: a copy and an entry's
/// upkeep cost more than a few positions of prefill.
pub const MIN_SHARED_TOKENS: usize = 16;

/// A prefix the stages hold, or are computing, and what uses it.
#[derive(Debug)]
struct Entry {
    /// Whose requests may use it (empty when entries are shared across tenants).
    tenant: Arc<str>,
    /// The sequence's prompt.
    tokens: Vec<u32>,
    /// How many leading positions of `tokens` every stage holds: all of a parked entry's; a running
    /// sequence's grow as its prompt steps come back.
    computed: usize,
    /// Finished and parked (freed only by the cache), or still running (freed when it ends).
    parked: bool,
    last_used: u64,
    /// Steps in flight that copy from it.
    pins: usize,
}

/// Where a new sequence's prompt starts.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Nothing worth copying: compute the whole prompt.
    Cold,
    /// Copy the first `shared` positions of entry `source`.
    Copy { source: u64, shared: usize },
    /// A prompt being prefilled will hold more of this one soon: wait for its next steps.
    Wait,
}

/// What to do with a finished sequence offered to the cache.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Offer {
    /// Park it: it is an entry now. Otherwise free it (it adds nothing).
    pub park: bool,
    /// Parked entries it supersedes, or that fall out of the count: free them on every stage.
    pub dropped: Vec<u64>,
}

/// The coordinator's view of the prefixes the stages hold. Owned by the scheduler task.
#[derive(Debug)]
pub struct PrefixCache {
    entries: HashMap<u64, Entry>,
    max_entries: usize,
    /// Every tenant's requests use every entry (one user's cluster, by choice).
    shared: bool,
    clock: u64,
}

impl PrefixCache {
    /// A cache of at most `max_entries` parked sequences (running ones come and go with their
    /// sequences); 0 turns prefix caching off. Entries are each tenant's own unless `shared`.
    pub fn new(max_entries: usize, shared: bool) -> Self {
        Self {
            entries: HashMap::new(),
            max_entries,
            shared,
            clock: 0,
        }
    }

    /// The tenant an entry of `tenant`'s is filed under.
    fn owner<'a>(&self, tenant: &'a str) -> &'a str {
        if self.shared {
            ""
        } else {
            tenant
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.max_entries > 0
    }

    /// Parked entries.
    pub fn parked(&self) -> usize {
        self.entries.values().filter(|e| e.parked).count()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn holds(&self, id: u64) -> bool {
        self.entries.contains_key(&id)
    }

    /// Where a new sequence of `tenant`'s with `prompt` starts: on the tenant's entry sharing the
    /// longest computed prefix with it, copying at most `prompt.len() - 2` positions (its first
    /// step feeds at least two, see above) and nothing under [`MIN_SHARED_TOKENS`]; or, if a
    /// prompt of the tenant's being prefilled would give at least [`MIN_SHARED_TOKENS`] more than
    /// that once computed, after waiting for it.
    pub fn lookup(&mut self, tenant: &str, prompt: &[u32]) -> Lookup {
        let prompt = &prompt[..prompt.len().saturating_sub(2)];
        let tenant = self.owner(tenant);
        let mut best: Option<(u64, usize, u64)> = None;
        let mut coming = 0;
        for (&id, e) in self.entries.iter().filter(|(_, e)| *e.tenant == *tenant) {
            let agrees = shared_prefix(&e.tokens, prompt);
            let shared = agrees.min(e.computed);
            if best.is_none_or(|(_, s, used)| (shared, e.last_used) > (s, used)) {
                best = Some((id, shared, e.last_used));
            }
            if !e.parked {
                coming = coming.max(agrees);
            }
        }
        let (source, shared) = best.map_or((0, 0), |(id, shared, _)| (id, shared));
        let copies = if shared >= MIN_SHARED_TOKENS {
            shared
        } else {
            0
        };
        if coming >= MIN_SHARED_TOKENS && coming >= copies + MIN_SHARED_TOKENS {
            return Lookup::Wait;
        }
        if copies == 0 {
            return Lookup::Cold;
        }
        self.clock += 1;
        if let Some(entry) = self.entries.get_mut(&source) {
            entry.last_used = self.clock;
        }
        Lookup::Copy { source, shared }
    }

    /// A running sequence `id` of `tenant`'s with `prompt` starts its prompt steps: it is an entry
    /// from now on, unless caching is off, it is too short, or an entry of the tenant's holds all
    /// of its prompt already (the other choices of one request, or a sequence that copies a whole
    /// prompt).
    pub fn start(&mut self, id: u64, tenant: &str, prompt: &[u32]) {
        let tenant = self.owner(tenant);
        if !self.is_enabled()
            || prompt.len() < MIN_SHARED_TOKENS
            || self.entries.contains_key(&id)
            || self
                .entries
                .values()
                .any(|e| *e.tenant == *tenant && e.tokens.starts_with(prompt))
        {
            return;
        }
        self.clock += 1;
        self.entries.insert(
            id,
            Entry {
                tenant: tenant.into(),
                tokens: prompt.to_vec(),
                computed: 0,
                parked: false,
                last_used: self.clock,
                pins: 0,
            },
        );
    }

    /// Every stage holds the first `computed` positions of running sequence `id` (a step is back).
    pub fn computed(&mut self, id: u64, computed: usize) {
        if let Some(e) = self.entries.get_mut(&id).filter(|e| !e.parked) {
            e.computed = e.computed.max(computed.min(e.tokens.len()));
        }
    }

    /// Offers a finished sequence of `tenant`'s whose stages hold `tokens`. It is parked unless
    /// prefix caching is off, it is too short, or another entry of the tenant's holds all of it (a
    /// running sequence's entry is parked regardless while a copy from it is on its way); the
    /// tenant's parked entries it holds all of are dropped (what they would give, it gives), and
    /// so are the least recently used unpinned ones past the count.
    pub fn offer(&mut self, id: u64, tenant: &str, tokens: &[u32]) -> Offer {
        let tenant = self.owner(tenant);
        let pins = self.entries.remove(&id).map_or(0, |e| e.pins);
        let wanted = self.is_enabled()
            && tokens.len() >= MIN_SHARED_TOKENS
            && !self
                .entries
                .values()
                .any(|e| *e.tenant == *tenant && e.tokens.starts_with(tokens));
        if !wanted && pins == 0 {
            return Offer::default();
        }
        let mut dropped: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                *e.tenant == *tenant && e.parked && e.pins == 0 && tokens.starts_with(&e.tokens)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in &dropped {
            self.entries.remove(id);
        }
        self.clock += 1;
        self.entries.insert(
            id,
            Entry {
                tenant: tenant.into(),
                tokens: tokens.to_vec(),
                computed: tokens.len(),
                parked: true,
                last_used: self.clock,
                pins,
            },
        );
        let mut parked = self.parked();
        while parked > self.max_entries {
            let oldest = self
                .entries
                .iter()
                .filter(|(_, e)| e.parked && e.pins == 0)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(&id, _)| id);
            let Some(oldest) = oldest else { break };
            self.entries.remove(&oldest);
            dropped.push(oldest);
            parked -= 1;
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

    /// Forgets the entries among `ids` (a worker no longer holds them, or their sequences are
    /// being freed); returns the parked ones, which only the cache would free.
    pub fn forget(&mut self, ids: &[u64]) -> Vec<u64> {
        ids.iter()
            .copied()
            .filter(|id| self.entries.remove(id).is_some_and(|e| e.parked))
            .collect()
    }

    /// Forgets every entry (a stage was lost: its replacement holds none); returns the parked ones.
    pub fn clear(&mut self) -> Vec<u64> {
        self.entries
            .drain()
            .filter(|(_, e)| e.parked)
            .map(|(id, _)| id)
            .collect()
    }
}

/// How many leading tokens `a` and `b` share.
fn shared_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two tenants (API key names).
    const A: &str = "alice";
    const B: &str = "bob";

    fn run(n: u32) -> Vec<u32> {
        (0..n).collect()
    }

    fn with_tail(n: u32, tail: &[u32]) -> Vec<u32> {
        let mut tokens = run(n);
        tokens.extend_from_slice(tail);
        tokens
    }

    fn copy(source: u64, shared: usize) -> Lookup {
        Lookup::Copy { source, shared }
    }

    #[test]
    fn lookups_find_the_longest_shared_prefix_and_leave_a_token_to_feed() {
        let mut cache = PrefixCache::new(8, false);
        assert!(cache.offer(1, A, &run(40)).park);
        assert!(cache.offer(2, A, &with_tail(20, &[900; 30])).park);
        for (prompt, want) in [
            // The whole entry, and more to feed.
            (with_tail(40, &[7, 8]), copy(1, 40)),
            // Where it stops agreeing.
            (with_tail(30, &[5; 10]), copy(1, 30)),
            // The prompt is the entry, or one token longer: its last two tokens are fed again.
            (run(40), copy(1, 38)),
            (with_tail(40, &[7]), copy(1, 39)),
            (with_tail(20, &[900; 25]), copy(2, 43)),
            // Too little in common.
            (with_tail(10, &[5; 30]), Lookup::Cold),
            (vec![9; 50], Lookup::Cold),
            (vec![], Lookup::Cold),
        ] {
            assert_eq!(cache.lookup(A, &prompt), want, "{prompt:?}");
        }
    }

    #[test]
    fn a_prompt_waits_for_what_a_running_prefill_will_hold_then_copies_it() {
        let mut cache = PrefixCache::new(8, false);
        let prompt = with_tail(60, &[7; 4]);
        // The first of three choices starts; the other two wait for its prompt.
        assert_eq!(cache.lookup(A, &prompt), Lookup::Cold);
        cache.start(1, A, &prompt);
        assert_eq!(cache.lookup(A, &prompt), Lookup::Wait);
        // Its first chunk is back: a prompt sharing no more than that copies it at once ...
        cache.computed(1, 32);
        assert_eq!(cache.lookup(A, &with_tail(32, &[5; 10])), copy(1, 32));
        // ... one sharing more keeps waiting, unless the rest is too little to wait for.
        assert_eq!(cache.lookup(A, &prompt), Lookup::Wait);
        assert_eq!(cache.lookup(A, &with_tail(40, &[5; 10])), copy(1, 32));
        // The whole prompt is back: the choices copy all but their last two positions, and are
        // no entries of their own (the first holds all of theirs).
        cache.computed(1, 64);
        assert_eq!(cache.lookup(A, &prompt), copy(1, 62));
        cache.start(2, A, &prompt);
        assert!(!cache.holds(2));
        // Another prompt on the same prefix is an entry of its own.
        let longer = with_tail(60, &[7; 30]);
        cache.start(3, A, &longer);
        assert!(cache.holds(3));
        assert_eq!(cache.lookup(A, &with_tail(60, &[7; 40])), Lookup::Wait);
        assert_eq!(cache.lookup(A, &with_tail(60, &[7; 20])), copy(1, 64));
        // Too short to be worth an entry, or with caching off: none.
        cache.start(4, A, &run(MIN_SHARED_TOKENS as u32 - 1));
        assert!(!cache.holds(4));
        let mut off = PrefixCache::new(0, false);
        off.start(1, A, &prompt);
        assert_eq!(off.lookup(A, &prompt), Lookup::Cold);
    }

    #[test]
    fn a_running_entry_is_parked_when_it_ends_and_only_parked_ones_are_freed_by_the_cache() {
        let mut cache = PrefixCache::new(1, false);
        let prompt = with_tail(30, &[7; 4]);
        assert!(cache.offer(3, A, &run(20)).park);
        cache.start(1, A, &prompt);
        cache.computed(1, 34);
        cache.start(2, A, &with_tail(30, &[8; 4]));
        // The first ends: parked, superseding the parked prefix it extends; the running entry
        // does not count against the one parked entry allowed.
        assert_eq!(
            cache.offer(1, A, &prompt),
            Offer {
                park: true,
                dropped: vec![3]
            }
        );
        // A choice that copied it ends: nothing to add.
        assert_eq!(cache.offer(4, A, &prompt), Offer::default());
        // The second's sequence is freed while running: forgotten, but not freed again.
        assert_eq!(cache.forget(&[2]), Vec::<u64>::new());
        assert!(!cache.holds(2));
        assert_eq!(cache.clear(), vec![1]);
    }

    #[test]
    fn a_running_entry_with_a_copy_on_its_way_is_parked_even_if_another_holds_it() {
        let mut cache = PrefixCache::new(8, false);
        let prompt = with_tail(30, &[7; 4]);
        cache.start(1, A, &prompt);
        cache.computed(1, 34);
        assert_eq!(cache.lookup(A, &prompt), copy(1, 32));
        cache.pin(1);
        assert!(cache.offer(2, A, &with_tail(30, &[7; 10])).park);
        // Entry 2 holds all of 1, but a step copies from 1: it stays.
        assert!(cache.offer(1, A, &prompt).park);
        assert!(cache.holds(1) && cache.holds(2));
        // Unpinned, the same offer adds nothing.
        cache.unpin(1);
        assert_eq!(cache.offer(1, A, &prompt), Offer::default());
        assert!(!cache.holds(1));
    }

    #[test]
    fn an_offer_supersedes_the_entries_it_extends_and_adds_nothing_they_hold() {
        let mut cache = PrefixCache::new(8, false);
        assert!(cache.offer(1, A, &run(30)).park);
        assert!(cache.offer(2, A, &with_tail(20, &[900; 10])).park);
        // Turn two of the first chat holds all of turn one: turn one goes.
        let offer = cache.offer(3, A, &with_tail(30, &[5; 20]));
        assert_eq!(
            offer,
            Offer {
                park: true,
                dropped: vec![1]
            }
        );
        // A sequence that an entry holds all of adds nothing.
        assert_eq!(
            cache.offer(4, A, &with_tail(30, &[5; 10])),
            Offer::default()
        );
        // Too short to be worth a copy.
        assert_eq!(
            cache.offer(5, A, &run(MIN_SHARED_TOKENS as u32 - 1)),
            Offer::default()
        );
        assert_eq!(cache.parked(), 2);
        // Off: nothing is parked.
        assert_eq!(
            PrefixCache::new(0, false).offer(6, A, &run(40)),
            Offer::default()
        );
    }

    #[test]
    fn the_count_drops_the_least_recently_used_but_never_a_pinned_entry() {
        let mut cache = PrefixCache::new(2, false);
        cache.offer(1, A, &with_tail(20, &[1; 5]));
        cache.offer(2, A, &with_tail(20, &[2; 5]));
        // Entry 1 is used (and pinned by the step that copies from it): 2 is the oldest now.
        assert_eq!(cache.lookup(A, &with_tail(20, &[1; 9])), copy(1, 25));
        cache.pin(1);
        assert_eq!(cache.offer(3, A, &with_tail(20, &[3; 5])).dropped, vec![2]);
        // With 1 pinned, 3 goes next, however old 1 is.
        assert_eq!(cache.offer(4, A, &with_tail(20, &[4; 5])).dropped, vec![3]);
        cache.unpin(1);
        assert_eq!(cache.offer(5, A, &with_tail(20, &[5; 5])).dropped, vec![1]);
        // A pinned entry that a new one extends stays too.
        cache.pin(5);
        let offer = cache.offer(6, A, &with_tail(20, &[5; 9]));
        assert!(offer.park && !offer.dropped.contains(&5), "{offer:?}");
    }

    #[test]
    fn evicted_and_lost_entries_are_forgotten() {
        let mut cache = PrefixCache::new(8, false);
        cache.offer(1, A, &with_tail(20, &[1; 5]));
        cache.offer(2, A, &with_tail(20, &[2; 5]));
        assert_eq!(cache.forget(&[2, 7]), vec![2]);
        assert!(cache.holds(1) && !cache.holds(2));
        assert_eq!(cache.lookup(A, &with_tail(20, &[2; 9])), copy(1, 20));
        assert_eq!(cache.clear(), vec![1]);
        assert!(cache.is_empty());
        assert_eq!(cache.lookup(A, &with_tail(20, &[1; 9])), Lookup::Cold);
    }

    #[test]
    fn a_tenant_never_copies_waits_on_or_supersedes_another_tenants_entries() {
        let mut cache = PrefixCache::new(8, false);
        let prompt = with_tail(40, &[7; 4]);
        // Alice's prompt is being prefilled: Bob's same prompt neither waits for it ...
        cache.start(1, A, &prompt);
        assert_eq!(cache.lookup(A, &prompt), Lookup::Wait);
        assert_eq!(cache.lookup(B, &prompt), Lookup::Cold);
        // ... nor is kept from being an entry of his own by it.
        cache.start(2, B, &prompt);
        assert!(cache.holds(2));
        cache.computed(1, 44);
        // Alice's finished prompt is hers alone.
        assert!(cache.offer(1, A, &prompt).park);
        assert!(cache.offer(2, B, &run(20)).park);
        assert_eq!(cache.lookup(A, &prompt), copy(1, 42));
        assert_eq!(cache.lookup("carol", &prompt), Lookup::Cold);
        assert_eq!(cache.lookup(B, &prompt), copy(2, 20));
        // Bob's longer prompt does not supersede Alice's entry (hers to lose only by the count).
        let offer = cache.offer(3, B, &with_tail(40, &[7; 10]));
        assert_eq!(
            offer,
            Offer {
                park: true,
                dropped: vec![2]
            }
        );
        assert!(cache.holds(1));
        assert_eq!(cache.lookup(A, &prompt), copy(1, 42));

        // Shared across tenants by choice: everyone's entries serve everyone.
        let mut shared = PrefixCache::new(8, true);
        shared.start(1, A, &prompt);
        assert_eq!(shared.lookup(B, &prompt), Lookup::Wait);
        shared.computed(1, 44);
        assert!(shared.offer(1, A, &prompt).park);
        assert_eq!(shared.lookup(B, &prompt), copy(1, 42));
        assert_eq!(shared.offer(2, B, &prompt), Offer::default());
    }
}
