//! The KV-cache manager: which sequence owns which slot of the backend's KV cache, and how long
//! each sequence is.
//!
//! The K/V memory itself lives on the backend (allocated through [`Backend::alloc_kv`], laid out as
//! the backend likes); this manager only hands out slots and positions. Invariants:
//! - a slot belongs to at most one live [`SequenceId`]; released slots are reused;
//! - a sequence's cached positions are `0..len`, and `len <= capacity` always: [`KvCache::reserve`]
//!   refuses (with an error naming the context length) any step that would pass the capacity, so a
//!   prompt or a generation never overflows and is never truncated silently.

use crate::backend::{Backend, KvSpec, TokenPosition};
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
}

impl KvCache {
    /// Allocates the cache on `backend`.
    pub fn new(backend: &mut dyn Backend, spec: KvSpec) -> Result<Self> {
        ensure!(spec.slots > 0, "the KV cache needs at least one slot");
        ensure!(spec.capacity > 0, "the context length must be at least 1");
        backend.alloc_kv(&spec)?;
        Ok(Self {
            spec,
            lengths: vec![None; spec.slots],
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

    /// Takes a free slot for a new, empty sequence.
    pub fn acquire(&mut self) -> Result<SequenceId> {
        let Some(slot) = self.lengths.iter().position(Option::is_none) else {
            bail!("all {} KV-cache slots are in use", self.spec.slots);
        };
        self.lengths[slot] = Some(0);
        Ok(SequenceId(slot))
    }

    /// Returns the sequence's slot to the free list.
    pub fn release(&mut self, seq: SequenceId) {
        if let Some(len) = self.lengths.get_mut(seq.0) {
            *len = None;
        }
    }

    /// Forgets the sequence's cached tokens, keeping its slot.
    pub fn clear(&mut self, seq: SequenceId) -> Result<()> {
        *self.length_mut(seq)? = 0;
        Ok(())
    }

    /// Cached tokens of the sequence.
    pub fn len(&self, seq: SequenceId) -> Result<usize> {
        match self.lengths.get(seq.0) {
            Some(Some(len)) => Ok(*len),
            _ => bail!("sequence {} is not live", seq.0),
        }
    }

    /// Appends `count` positions to the sequence and returns them as batch rows, or an error if the
    /// context would overflow (nothing is changed then).
    pub fn reserve(&mut self, seq: SequenceId, count: usize) -> Result<Vec<TokenPosition>> {
        let capacity = self.spec.capacity;
        let len = self.length_mut(seq)?;
        let start = *len;
        if start + count > capacity {
            bail!(
                "context overflow: {start} cached + {count} new tokens exceed the context length \
                 of {capacity} (raise --ctx, up to the model's maximum, or shorten the prompt)"
            );
        }
        *len += count;
        Ok((start..start + count)
            .map(|position| TokenPosition {
                slot: seq.0,
                position,
            })
            .collect())
    }

    /// Shortens the sequence to `len` tokens (e.g. to drop a rejected continuation).
    pub fn truncate(&mut self, seq: SequenceId, len: usize) -> Result<()> {
        let cur = self.length_mut(seq)?;
        ensure!(
            len <= *cur,
            "cannot truncate a sequence of {cur} tokens to {len}"
        );
        *cur = len;
        Ok(())
    }

    fn length_mut(&mut self, seq: SequenceId) -> Result<&mut usize> {
        match self.lengths.get_mut(seq.0) {
            Some(Some(len)) => Ok(len),
            _ => bail!("sequence {} is not live", seq.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    fn cache(slots: usize, capacity: usize) -> KvCache {
        let mut backend = CpuBackend::new(1).unwrap();
        let spec = KvSpec {
            layers: 1,
            slots,
            capacity,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            rope_theta: 10000.0,
        };
        KvCache::new(&mut backend, spec).unwrap()
    }

    #[test]
    fn slots_are_handed_out_and_reused() {
        let mut kv = cache(2, 8);
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
        let mut kv = cache(1, 8);
        let s = kv.acquire().unwrap();
        let rows = kv.reserve(s, 5).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.position).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        assert_eq!(kv.reserve(s, 1).unwrap()[0].position, 5);
        let err = kv.reserve(s, 3).unwrap_err().to_string();
        assert!(err.contains("context length of 8"), "{err}");
        assert_eq!(kv.len(s).unwrap(), 6);
        kv.truncate(s, 2).unwrap();
        assert_eq!(kv.reserve(s, 6).unwrap()[0].position, 2);
        kv.clear(s).unwrap();
        assert_eq!(kv.len(s).unwrap(), 0);
        kv.release(s);
        assert!(kv.len(s).is_err());
        assert!(kv.reserve(s, 1).is_err());
    }
}
