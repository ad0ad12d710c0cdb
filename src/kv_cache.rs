//! The KV-cache manager: which sequence owns which slot, how long each sequence is, and which pages
//! of the backend's KV pool hold its positions (the page table handed to every attention call).
//!
//! The K/V memory itself lives on the backend (allocated through [`Backend::alloc_kv`] as a pool of
//! pages of [`KvSpec::page_size`] positions, laid out as the backend likes); this manager hands out
//! slots, positions and pages. Invariants:
//! - a slot belongs to at most one live [`SequenceId`]; released slots are reused;
//! - a sequence's cached positions are `0..len`, and `len <= capacity` always: [`KvCache::reserve`]
//!   refuses (with an error naming the context length) any step that would pass the capacity, so a
//!   prompt or a generation never overflows and is never truncated silently;
//! - a sequence of `len` positions holds exactly its first `⌈len / page_size⌉` page-table entries,
//!   each a distinct page of the pool, which no other sequence holds (except the shared full pages
//!   of prefix reuse, below); every other page is on the free list (or idle, below). Pages are
//!   taken as a sequence grows and all returned when it is truncated, cleared or released, so
//!   memory follows the tokens actually cached;
//! - when the pool has no free page for a step, [`KvCache::reserve`] evicts cached prefix pages
//!   (below), then grows the pool (up to the manager's growth limit, see [`KvCache::new`]) or
//!   refuses with an out-of-pages error, changing nothing.
//!
//! # Prefix reuse ([`KvCache::enable_prefix_reuse`])
//! A *full* page's keys and values depend only on the tokens of its positions and of every
//! position before it. So once a sequence has filled a page, the page is registered under the
//! key (the page before it in the sequence, or none; the page's tokens), and a new sequence whose
//! prompt starts with the same tokens takes the registered pages instead of computing them
//! ([`KvCache::acquire_with_prefix`]): the chain of keys, matched exactly (no hashing of token
//! runs), names the whole prefix. Invariants on top of the ones above:
//! - a page may sit in several sequences' tables (`refs` counts them), only as one of their
//!   leading full pages, which nobody writes again: a sequence writes only past its own length,
//!   and shares only whole pages below it;
//! - a registered page no sequence holds is *idle*: off the free list, counted free (it is handed
//!   out, least recently released first, once the free list is empty), and evicted together with
//!   every registered page keyed on it, so no key ever names a page whose contents changed;
//! - a page whose contents a sequence will overwrite (a truncation into it) is unregistered first.

use crate::backend::{Backend, KvSpec, NO_PAGE, PageTable, TokenPosition};
use anyhow::{Result, bail, ensure};
use std::collections::{BTreeMap, HashMap};

/// A live sequence in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SequenceId(usize);

impl SequenceId {
    pub fn slot(self) -> usize {
        self.0
    }
}

pub struct KvCache {
    spec: KvSpec,
    /// Cached length of the sequence in each slot; `None` for a free slot.
    lengths: Vec<Option<usize>>,
    /// `slots × pages_per_slot` entries: slot `s`'s pages, [`NO_PAGE`] past its last.
    table: Vec<u32>,
    /// Pages no sequence holds; the next one handed out is the last.
    free: Vec<u32>,
    /// The pool never grows past this many pages.
    max_pages: usize,
    /// Sequences holding each page.
    refs: Vec<u32>,
    /// Registered full pages (`None`: prefix reuse off).
    prefixes: Option<Prefixes>,
}

/// What a registered page is known by: the page before it in its sequence ([`NO_PAGE`] for a
/// first page) and its tokens.
type PageKey = (u32, Vec<u32>);

/// The registered pages of [`KvCache::enable_prefix_reuse`] (see the module documentation).
#[derive(Default)]
struct Prefixes {
    pages: HashMap<PageKey, u32>,
    /// Each registered page's key.
    keys: HashMap<u32, PageKey>,
    /// Registered pages keyed on each page.
    children: HashMap<u32, Vec<u32>>,
    /// Idle registered pages by release time, oldest first, and each one's time.
    idle: BTreeMap<u64, u32>,
    idle_since: HashMap<u32, u64>,
    clock: u64,
    /// Each slot's cached tokens.
    tokens: Vec<Vec<u32>>,
}

impl KvCache {
    /// Allocates a pool of `spec.pages` pages on `backend`, which [`KvCache::reserve`] may grow
    /// (doubling) up to `max_pages` pages when a step needs more (`max_pages <= spec.pages`: a
    /// fixed pool). Growing never needs more than `slots × pages_per_slot` pages.
    pub fn new(backend: &mut dyn Backend, spec: KvSpec, max_pages: usize) -> Result<Self> {
        ensure!(spec.slots > 0, "the KV cache needs at least one slot");
        ensure!(spec.capacity > 0, "the context length must be at least 1");
        ensure!(
            spec.page_size > 0,
            "KV pages must hold at least one position"
        );
        ensure!(spec.pages > 0, "the KV pool needs at least one page");
        ensure!(
            spec.pages < NO_PAGE as usize,
            "{} KV pages are more than a page table can name",
            spec.pages
        );
        backend.alloc_kv(&spec)?;
        let max_pages = max_pages
            .max(spec.pages)
            .min((spec.slots * spec.pages_per_slot()).max(spec.pages));
        Ok(Self {
            spec,
            lengths: vec![None; spec.slots],
            table: vec![NO_PAGE; spec.slots * spec.pages_per_slot()],
            free: (0..spec.pages as u32).rev().collect(),
            max_pages,
            refs: vec![0; spec.pages],
            prefixes: None,
        })
    }

    /// Keeps full pages for later sequences whose prompts start with the same tokens (see the
    /// module documentation). Sequences live now register nothing until their next tokens.
    /// An error while a sequence is live (its tokens were not recorded).
    pub fn enable_prefix_reuse(&mut self) -> Result<()> {
        ensure!(
            self.slots_in_use() == 0,
            "prefix reuse is turned on before any sequence starts"
        );
        if self.prefixes.is_none() {
            self.prefixes = Some(Prefixes {
                tokens: vec![Vec::new(); self.spec.slots],
                ..Prefixes::default()
            });
        }
        Ok(())
    }

    /// Positions each sequence can hold.
    pub fn capacity(&self) -> usize {
        self.spec.capacity
    }

    /// Slots in the cache (sequences it can hold at once).
    pub fn slots(&self) -> usize {
        self.spec.slots
    }

    /// Slots held by live sequences.
    pub fn slots_in_use(&self) -> usize {
        self.lengths.iter().filter(|l| l.is_some()).count()
    }

    /// Positions per page.
    pub fn page_size(&self) -> usize {
        self.spec.page_size
    }

    /// Pages in the pool now.
    pub fn pages(&self) -> usize {
        self.spec.pages
    }

    /// Pages the pool may grow to.
    pub fn max_pages(&self) -> usize {
        self.max_pages
    }

    /// Pages no sequence holds (cached prefix pages included: they are handed out when needed).
    pub fn pages_free(&self) -> usize {
        self.free.len() + self.pages_cached()
    }

    /// Pages held by live sequences.
    pub fn pages_used(&self) -> usize {
        self.spec.pages - self.pages_free()
    }

    /// Full pages no sequence holds, kept for a later prompt that starts with their tokens.
    pub fn pages_cached(&self) -> usize {
        self.prefixes.as_ref().map_or(0, |p| p.idle.len())
    }

    /// Bytes of the pool now (K and V, every layer).
    pub fn bytes(&self) -> usize {
        self.spec.bytes()
    }

    /// The geometry and pool the backend holds.
    pub fn spec(&self) -> &KvSpec {
        &self.spec
    }

    /// Every slot's pages, for [`Backend::attention`].
    pub fn page_table(&self) -> &PageTable {
        &self.table
    }

    /// Pages `positions` positions occupy.
    pub fn pages_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.spec.page_size)
    }

    /// Takes a free slot for a new, empty sequence.
    pub fn acquire(&mut self) -> Result<SequenceId> {
        let Some(slot) = self.lengths.iter().position(Option::is_none) else {
            bail!("all {} KV-cache slots are in use", self.spec.slots);
        };
        self.lengths[slot] = Some(0);
        Ok(SequenceId(slot))
    }

    /// [`KvCache::acquire`], then the longest run of registered pages that the prompt starts
    /// with, taken as the sequence's first pages (at most up to the prompt's last token, whose
    /// logits the caller still needs); returns the sequence and the positions it already holds.
    pub fn acquire_with_prefix(&mut self, prompt: &[u32]) -> Result<(SequenceId, usize)> {
        let seq = self.acquire()?;
        let size = self.spec.page_size;
        let row = seq.0 * self.spec.pages_per_slot();
        let Some(prefixes) = self.prefixes.as_mut() else {
            return Ok((seq, 0));
        };
        let mut parent = NO_PAGE;
        let mut taken = 0;
        let capacity = self.spec.capacity;
        while (taken + 1) * size < prompt.len() && (taken + 1) * size <= capacity {
            let key = (parent, prompt[taken * size..(taken + 1) * size].to_vec());
            let Some(&page) = prefixes.pages.get(&key) else {
                break;
            };
            if let Some(since) = prefixes.idle_since.remove(&page) {
                prefixes.idle.remove(&since);
            }
            self.refs[page as usize] += 1;
            self.table[row + taken] = page;
            parent = page;
            taken += 1;
        }
        let len = taken * size;
        prefixes.tokens[seq.0] = prompt[..len].to_vec();
        self.lengths[seq.0] = Some(len);
        Ok((seq, len))
    }

    /// Records the tokens just computed at the sequence's last `tokens.len()` positions and, with
    /// prefix reuse on, registers the pages they fill.
    pub fn record(&mut self, seq: SequenceId, tokens: &[u32]) -> Result<()> {
        let len = self.len(seq)?;
        let size = self.spec.page_size;
        let row = seq.0 * self.spec.pages_per_slot();
        let Some(prefixes) = self.prefixes.as_mut() else {
            return Ok(());
        };
        let cached = &mut prefixes.tokens[seq.0];
        ensure!(
            cached.len() + tokens.len() == len,
            "sequence {} holds {len} positions, not {} + {} recorded tokens",
            seq.0,
            cached.len(),
            tokens.len()
        );
        let first = cached.len() / size;
        cached.extend_from_slice(tokens);
        for i in first..len / size {
            let page = self.table[row + i];
            let parent = if i == 0 {
                NO_PAGE
            } else {
                self.table[row + i - 1]
            };
            if prefixes.keys.contains_key(&page) {
                continue; // taken from the registered pages
            }
            if parent != NO_PAGE && !prefixes.keys.contains_key(&parent) {
                break; // a key must name a registered page, whose contents never change
            }
            let key = (parent, cached[i * size..(i + 1) * size].to_vec());
            if prefixes.pages.contains_key(&key) {
                break; // the same tokens under another page (computed at the same time)
            }
            prefixes.pages.insert(key.clone(), page);
            prefixes.keys.insert(page, key);
            prefixes.children.entry(parent).or_default().push(page);
        }
        Ok(())
    }

    /// Returns the sequence's pages to the pool and its slot to the free list.
    pub fn release(&mut self, seq: SequenceId) {
        if self.truncate(seq, 0).is_ok() {
            self.lengths[seq.0] = None;
        }
    }

    /// Forgets the sequence's cached tokens (returning its pages), keeping its slot.
    pub fn clear(&mut self, seq: SequenceId) -> Result<()> {
        self.truncate(seq, 0)
    }

    /// Cached tokens of the sequence.
    pub fn len(&self, seq: SequenceId) -> Result<usize> {
        match self.lengths.get(seq.0) {
            Some(Some(len)) => Ok(*len),
            _ => bail!("sequence {} is not live", seq.0),
        }
    }

    /// Appends `count` positions to the sequence, taking the pages they need, and returns them as
    /// batch rows; or an error if the context would overflow or the pool has too few pages
    /// (nothing is changed then).
    pub fn reserve(
        &mut self,
        backend: &mut dyn Backend,
        seq: SequenceId,
        count: usize,
    ) -> Result<Vec<TokenPosition>> {
        let capacity = self.spec.capacity;
        let start = self.len(seq)?;
        if start + count > capacity {
            bail!(
                "context overflow: {start} cached + {count} new tokens exceed the context length \
                 of {capacity} (raise --ctx, up to the model's maximum, or shorten the prompt)"
            );
        }
        let (held, needed) = (self.pages_for(start), self.pages_for(start + count));
        let more = needed - held;
        if more > self.pages_free() {
            self.grow(backend, more - self.pages_free())?;
        }
        while more > self.free.len() {
            self.evict_oldest();
        }
        let row = seq.0 * self.spec.pages_per_slot();
        for entry in &mut self.table[row + held..row + needed] {
            *entry = self.free.pop().expect("enough free pages, checked above");
            self.refs[*entry as usize] = 1;
        }
        self.lengths[seq.0] = Some(start + count);
        Ok((start..start + count)
            .map(|position| TokenPosition {
                slot: seq.0,
                position,
            })
            .collect())
    }

    /// Shortens the sequence to `len` tokens (e.g. to drop a rejected continuation), returning the
    /// pages it no longer needs.
    pub fn truncate(&mut self, seq: SequenceId, len: usize) -> Result<()> {
        let cur = self.len(seq)?;
        ensure!(
            len <= cur,
            "cannot truncate a sequence of {cur} tokens to {len}"
        );
        let row = seq.0 * self.spec.pages_per_slot();
        let (keep, held) = (self.pages_for(len), self.pages_for(cur));
        if !len.is_multiple_of(self.spec.page_size) && len < cur {
            // The sequence will write into its last kept page again.
            let page = self.table[row + keep - 1];
            ensure!(
                self.refs[page as usize] == 1,
                "cannot truncate sequence {} to {len} tokens: its page of those positions is \
                 shared with another sequence",
                seq.0
            );
            self.unregister(page);
        }
        // Released last page first, so the next sequence takes them back in position order.
        for i in (keep..held).rev() {
            let page = std::mem::replace(&mut self.table[row + i], NO_PAGE);
            self.put_back(page);
        }
        if let Some(prefixes) = self.prefixes.as_mut() {
            prefixes.tokens[seq.0].truncate(len);
        }
        self.lengths[seq.0] = Some(len);
        Ok(())
    }

    /// A sequence lets go of `page`: the last holder of a registered page makes it idle, of any
    /// other page free.
    fn put_back(&mut self, page: u32) {
        let refs = &mut self.refs[page as usize];
        *refs -= 1;
        if *refs > 0 {
            return;
        }
        match self.prefixes.as_mut() {
            Some(p) if p.keys.contains_key(&page) => {
                p.clock += 1;
                p.idle.insert(p.clock, page);
                p.idle_since.insert(page, p.clock);
            }
            _ => self.free.push(page),
        }
    }

    /// Forgets `page`'s registration and those of the pages keyed on it (idle ones go to the free
    /// list; held ones stay with their sequences, unregistered).
    fn unregister(&mut self, page: u32) {
        let Some(p) = self.prefixes.as_mut() else {
            return;
        };
        let mut pending = vec![page];
        while let Some(page) = pending.pop() {
            let Some(key) = p.keys.remove(&page) else {
                continue;
            };
            p.pages.remove(&key);
            if let Some(siblings) = p.children.get_mut(&key.0) {
                siblings.retain(|&c| c != page);
            }
            pending.extend(p.children.remove(&page).unwrap_or_default());
            if let Some(since) = p.idle_since.remove(&page) {
                p.idle.remove(&since);
                self.free.push(page);
            }
        }
    }

    /// Hands the least recently released idle page (and the pages keyed on it) to the free list.
    fn evict_oldest(&mut self) {
        let oldest = self
            .prefixes
            .as_ref()
            .and_then(|p| p.idle.values().next().copied());
        if let Some(page) = oldest {
            self.unregister(page);
        }
    }

    /// Grows the pool by at least `missing` pages (doubling it when that is more, never past
    /// `max_pages`), or refuses with the out-of-pages error.
    fn grow(&mut self, backend: &mut dyn Backend, missing: usize) -> Result<()> {
        let pages = self.spec.pages;
        let wanted = pages + missing;
        if wanted > self.max_pages {
            bail!(
                "out of KV-cache pages: this step needs {missing} more page(s) of {} positions, \
                 {} of {pages} are in use (raise --kv-memory, or wait for running sequences to \
                 finish)",
                self.spec.page_size,
                self.pages_used()
            );
        }
        let target = (2 * pages).clamp(wanted, self.max_pages);
        backend.grow_kv(target)?;
        self.free.splice(0..0, (pages as u32..target as u32).rev());
        self.refs.resize(target, 0);
        self.spec.pages = target;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::KvType;
    use crate::backend::cpu::CpuBackend;

    fn spec(slots: usize, capacity: usize, pages: usize) -> KvSpec {
        KvSpec {
            layers: 1,
            slots,
            capacity,
            pages,
            page_size: 4,
            kv_type: KvType::F32,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            rope_theta: 10000.0,
        }
    }

    fn cache(slots: usize, capacity: usize) -> (CpuBackend, KvCache) {
        let mut backend = CpuBackend::new(1).unwrap();
        let spec = spec(slots, capacity, slots * capacity.div_ceil(4));
        let kv = KvCache::new(&mut backend, spec, 0).unwrap();
        (backend, kv)
    }

    #[test]
    fn slots_are_handed_out_and_reused() {
        let (_b, mut kv) = cache(2, 8);
        let a = kv.acquire().unwrap();
        let b = kv.acquire().unwrap();
        assert_ne!(a, b);
        assert!(kv.acquire().is_err());
        assert_eq!((kv.slots(), kv.slots_in_use()), (2, 2));
        kv.release(a);
        assert_eq!(kv.slots_in_use(), 1);
        assert_eq!(kv.acquire().unwrap().slot(), a.slot());
        assert!(kv.len(b).is_ok());
    }

    #[test]
    fn positions_continue_and_overflow_is_refused_without_change() {
        let (mut b, mut kv) = cache(1, 8);
        let s = kv.acquire().unwrap();
        let rows = kv.reserve(&mut b, s, 5).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.position).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        assert_eq!(kv.reserve(&mut b, s, 1).unwrap()[0].position, 5);
        let err = kv.reserve(&mut b, s, 3).unwrap_err().to_string();
        assert!(err.contains("context length of 8"), "{err}");
        assert_eq!(kv.len(s).unwrap(), 6);
        kv.truncate(s, 2).unwrap();
        assert_eq!(kv.reserve(&mut b, s, 6).unwrap()[0].position, 2);
        kv.clear(s).unwrap();
        assert_eq!(kv.len(s).unwrap(), 0);
        kv.release(s);
        assert!(kv.len(s).is_err());
        assert!(kv.reserve(&mut b, s, 1).is_err());
    }

    /// Every live sequence's first ⌈len / page_size⌉ entries are pages of the pool (distinct within
    /// the sequence), each held by as many sequences as its count says, the rest of the table is
    /// empty; the free list and the idle registered pages hold exactly the other pages, once.
    fn assert_consistent(kv: &KvCache) {
        let per_slot = kv.spec.pages_per_slot();
        let mut holders = vec![0u32; kv.pages()];
        for (slot, len) in kv.lengths.iter().enumerate() {
            let held = kv.pages_for(len.unwrap_or(0));
            let entries = &kv.table[slot * per_slot..][..per_slot];
            for (i, &p) in entries.iter().enumerate() {
                if i < held {
                    assert!(!entries[..i].contains(&p), "page {p} twice in slot {slot}");
                    holders[p as usize] += 1;
                } else {
                    assert_eq!(p, NO_PAGE, "slot {slot} entry {i}");
                }
            }
        }
        assert_eq!(holders, kv.refs, "holders per page");
        let idle: Vec<u32> = kv
            .prefixes
            .as_ref()
            .map_or(Vec::new(), |p| p.idle.values().copied().collect());
        let mut seen = holders.iter().map(|&h| h > 0).collect::<Vec<_>>();
        for &p in kv.free.iter().chain(&idle) {
            assert!(
                !std::mem::replace(&mut seen[p as usize], true),
                "free page {p} held, or listed twice"
            );
        }
        assert!(seen.iter().all(|&s| s), "a page is lost");
        if let Some(prefixes) = &kv.prefixes {
            for (key, page) in &prefixes.pages {
                assert_eq!(prefixes.keys.get(page), Some(key), "page {page}'s key");
                let parent_ok = key.0 == NO_PAGE || prefixes.keys.contains_key(&key.0);
                assert!(
                    parent_ok,
                    "page {page} keyed on unregistered page {}",
                    key.0
                );
            }
            assert_eq!(prefixes.pages.len(), prefixes.keys.len());
            for &p in &idle {
                assert!(prefixes.keys.contains_key(&p), "idle page {p} unregistered");
            }
        }
    }

    #[test]
    fn pages_follow_the_tokens_and_are_reused_after_release() {
        // 3 slots, 6 pages of 4 positions: less than 3 full contexts of 12.
        let mut b = CpuBackend::new(1).unwrap();
        let mut kv = KvCache::new(&mut b, spec(3, 12, 6), 0).unwrap();
        let (x, y) = (kv.acquire().unwrap(), kv.acquire().unwrap());
        kv.reserve(&mut b, x, 5).unwrap(); // 2 pages
        kv.reserve(&mut b, y, 4).unwrap(); // 1 page
        kv.reserve(&mut b, x, 3).unwrap(); // still 2 pages (8 positions)
        assert_eq!((kv.pages_used(), kv.pages_free()), (3, 3));
        assert_consistent(&kv);
        kv.reserve(&mut b, y, 1).unwrap(); // a second page for y, after x's: interleaved
        let per_slot = kv.spec.pages_per_slot();
        assert_eq!(&kv.page_table()[..2], &[0, 1]);
        assert_eq!(&kv.page_table()[per_slot..per_slot + 2], &[2, 3]);
        kv.truncate(x, 4).unwrap(); // gives back page 1
        assert_eq!((kv.pages_used(), kv.pages_free()), (3, 3));
        assert_consistent(&kv);
        let x_pages: Vec<u32> = kv.page_table()[..1].to_vec();
        kv.release(x);
        assert_eq!(kv.pages_used(), 2);
        let z = kv.acquire().unwrap();
        kv.reserve(&mut b, z, 12).unwrap(); // 3 pages: x's two come back first
        assert_eq!(kv.page_table()[z.slot() * per_slot], x_pages[0]);
        assert_consistent(&kv);
        kv.release(y);
        kv.release(z);
        assert_eq!((kv.pages_used(), kv.pages_free()), (0, 6));
        assert_consistent(&kv);
    }

    #[test]
    fn out_of_pages_is_an_error_that_changes_nothing() {
        let mut b = CpuBackend::new(1).unwrap();
        let mut kv = KvCache::new(&mut b, spec(2, 12, 3), 0).unwrap();
        let (x, y) = (kv.acquire().unwrap(), kv.acquire().unwrap());
        kv.reserve(&mut b, x, 9).unwrap(); // 3 pages: the whole pool
        let err = kv.reserve(&mut b, y, 1).unwrap_err().to_string();
        assert!(err.contains("out of KV-cache pages"), "{err}");
        assert!(err.contains("--kv-memory"), "{err}");
        assert_eq!((kv.len(y).unwrap(), kv.pages_free()), (0, 0));
        kv.reserve(&mut b, x, 3).unwrap(); // the last page's free positions still fit
        assert!(kv.reserve(&mut b, x, 1).is_err());
        assert_eq!(kv.len(x).unwrap(), 12);
        assert_consistent(&kv);
    }

    #[test]
    fn a_growable_pool_doubles_up_to_its_limit_keeping_its_pages() {
        let mut b = CpuBackend::new(1).unwrap();
        let mut kv = KvCache::new(&mut b, spec(1, 40, 2), 7).unwrap();
        let s = kv.acquire().unwrap();
        kv.reserve(&mut b, s, 8).unwrap();
        assert_eq!(kv.pages(), 2);
        kv.reserve(&mut b, s, 1).unwrap();
        assert_eq!((kv.pages(), kv.pages_used()), (4, 3));
        kv.reserve(&mut b, s, 12).unwrap(); // 21 positions: 6 pages
        assert_eq!((kv.pages(), kv.pages_used()), (7, 6));
        assert_eq!(&kv.page_table()[..6], &[0, 1, 2, 3, 4, 5]);
        assert_consistent(&kv);
        let err = kv.reserve(&mut b, s, 8).unwrap_err().to_string();
        assert!(err.contains("out of KV-cache pages"), "{err}");
        assert_eq!(kv.len(s).unwrap(), 21);
    }

    /// Feeds `tokens` to a new sequence that takes what it can from the registered pages; returns
    /// it and the number of tokens taken.
    fn start(b: &mut CpuBackend, kv: &mut KvCache, tokens: &[u32]) -> (SequenceId, usize) {
        let (s, cached) = kv.acquire_with_prefix(tokens).unwrap();
        kv.reserve(b, s, tokens.len() - cached).unwrap();
        kv.record(s, &tokens[cached..]).unwrap();
        assert_consistent(kv);
        (s, cached)
    }

    #[test]
    fn a_prompt_takes_the_full_pages_of_an_earlier_prompt_it_starts_with() {
        let mut b = CpuBackend::new(1).unwrap();
        let mut kv = KvCache::new(&mut b, spec(3, 16, 12), 0).unwrap();
        kv.enable_prefix_reuse().unwrap();
        let prompt: Vec<u32> = (10..20).collect(); // 2 full pages of 4 and 2 positions
        let (a, cached) = start(&mut b, &mut kv, &prompt);
        assert_eq!(cached, 0);
        let a_pages = kv.page_table()[..3].to_vec();
        kv.release(a);
        assert_eq!((kv.pages_cached(), kv.pages_used()), (2, 0));
        assert_consistent(&kv);
        // The same first 9 tokens: both full pages; the same 8: one (the last token is fed).
        let mut other = prompt[..9].to_vec();
        other.push(99);
        let (x, cached) = start(&mut b, &mut kv, &other);
        assert_eq!(cached, 8);
        let per_slot = kv.spec.pages_per_slot();
        assert_eq!(&kv.page_table()[x.slot() * per_slot..][..2], &a_pages[..2]);
        let (y, cached) = start(&mut b, &mut kv, &prompt[..8]);
        assert_eq!((cached, kv.refs[a_pages[0] as usize]), (4, 2));
        // A different first token, or the same tokens in another order, take nothing; nor do
        // the tokens of a registered page at another position (their keys and values differ).
        let (z, cached) = start(&mut b, &mut kv, &[11, 10, 12, 13, 14, 15, 16, 17, 18]);
        assert_eq!(cached, 0);
        kv.release(z);
        let (w, cached) = start(&mut b, &mut kv, &[14, 15, 16, 17, 0]);
        assert_eq!(cached, 0);
        kv.release(w);
        kv.release(x);
        assert_eq!(kv.refs[a_pages[0] as usize], 1, "still held by y");
        kv.release(y);
        assert_eq!(kv.pages_used(), 0);
        assert_consistent(&kv);
        // Off (the default), nothing is kept.
        let mut plain = KvCache::new(&mut b, spec(1, 16, 4), 0).unwrap();
        let (p, _) = start(&mut b, &mut plain, &prompt);
        plain.release(p);
        assert_eq!(start(&mut b, &mut plain, &prompt).1, 0);
    }

    #[test]
    fn cached_pages_are_handed_out_oldest_first_with_the_pages_keyed_on_them() {
        let mut b = CpuBackend::new(1).unwrap();
        let mut kv = KvCache::new(&mut b, spec(2, 16, 4), 0).unwrap();
        kv.enable_prefix_reuse().unwrap();
        let (a, _) = start(&mut b, &mut kv, &[1, 2, 3, 4, 5, 6, 7, 8]); // 2 full pages
        kv.release(a);
        let (c, _) = start(&mut b, &mut kv, &[9, 9, 9, 9, 9]); // 1 full page, 1 partial
        kv.release(c);
        assert_eq!((kv.pages_cached(), kv.pages_free()), (3, 4));
        // 8 positions: the free page, then the least recently released idle page.
        let (d, cached) = start(&mut b, &mut kv, &[7, 7, 7, 7, 7, 7, 7, 7]);
        assert_eq!((cached, kv.pages_cached()), (0, 2));
        kv.release(d);
        // [1..4] is still cached; [5..8], keyed on it and released before it, was handed out.
        assert_eq!(start(&mut b, &mut kv, &[1, 2, 3, 4, 5, 6, 7, 8, 0]).1, 4);
        assert_consistent(&kv);
    }

    #[test]
    fn a_page_written_again_is_forgotten_and_a_shared_one_is_not_truncated() {
        let mut b = CpuBackend::new(1).unwrap();
        let mut kv = KvCache::new(&mut b, spec(2, 16, 8), 0).unwrap();
        kv.enable_prefix_reuse().unwrap();
        let prompt: Vec<u32> = (1..=9).collect();
        let (a, _) = start(&mut b, &mut kv, &prompt);
        let (x, cached) = start(&mut b, &mut kv, &prompt);
        assert_eq!(cached, 8);
        let err = kv.truncate(x, 6).unwrap_err().to_string();
        assert!(err.contains("shared"), "{err}");
        kv.release(x);
        // a alone holds its pages: truncating into the second one unregisters it.
        kv.truncate(a, 6).unwrap();
        kv.reserve(&mut b, a, 2).unwrap();
        kv.record(a, &[50, 51]).unwrap();
        assert_consistent(&kv);
        kv.release(a);
        let (y, cached) = start(&mut b, &mut kv, &prompt);
        assert_eq!(cached, 4, "only the first page is still known");
        kv.release(y);
        // Turning reuse on needs an empty cache.
        let mut fresh = KvCache::new(&mut b, spec(1, 16, 4), 0).unwrap();
        let _s = fresh.acquire().unwrap();
        assert!(fresh.enable_prefix_reuse().is_err());
    }
}
