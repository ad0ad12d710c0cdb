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
//!   each a distinct page of the pool, and no other sequence holds them; every other page is on
//!   the free list. Pages are taken as a sequence grows and all returned when it is truncated,
//!   cleared or released, so memory follows the tokens actually cached;
//! - when the pool has no free page for a step, [`KvCache::reserve`] grows it (up to the
//!   manager's growth limit, see [`KvCache::new`]) or refuses with an out-of-pages error, changing
//!   nothing.

use crate::backend::{Backend, KvSpec, NO_PAGE, PageTable, TokenPosition};
use anyhow::{Result, bail, ensure};

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
        })
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

    /// Pages no sequence holds.
    pub fn pages_free(&self) -> usize {
        self.free.len()
    }

    /// Pages held by live sequences.
    pub fn pages_used(&self) -> usize {
        self.spec.pages - self.free.len()
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
        if more > self.free.len() {
            self.grow(backend, more - self.free.len())?;
        }
        let row = seq.0 * self.spec.pages_per_slot();
        for entry in &mut self.table[row + held..row + needed] {
            *entry = self.free.pop().expect("enough free pages, checked above");
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
        // Pushed last page first, so the next sequence takes them back in position order.
        for entry in self.table[row + keep..row + held].iter_mut().rev() {
            self.free.push(std::mem::replace(entry, NO_PAGE));
        }
        self.lengths[seq.0] = Some(len);
        Ok(())
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

    /// Every live sequence's first ⌈len / page_size⌉ entries are distinct pages of the pool, the
    /// rest of the table is empty, and the free list holds exactly the other pages.
    fn assert_consistent(kv: &KvCache) {
        let per_slot = kv.spec.pages_per_slot();
        let mut seen = vec![false; kv.pages()];
        for (slot, len) in kv.lengths.iter().enumerate() {
            let held = kv.pages_for(len.unwrap_or(0));
            for (i, &p) in kv.table[slot * per_slot..][..per_slot].iter().enumerate() {
                if i < held {
                    assert!(
                        !std::mem::replace(&mut seen[p as usize], true),
                        "page {p} twice"
                    );
                } else {
                    assert_eq!(p, NO_PAGE, "slot {slot} entry {i}");
                }
            }
        }
        for &p in &kv.free {
            assert!(
                !std::mem::replace(&mut seen[p as usize], true),
                "free page {p} held"
            );
        }
        assert!(seen.iter().all(|&s| s), "a page is lost");
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
}
