//! Device buffers: identities, the activation pool, the parameter arena, and the upload layout of
//! dense tables (ternary weights are packed by `backend::gpu_upload`, rows padded to 16 codes).
//!
//! # Dense tables
//! Kept in their checkpoint dtype (f16 and bf16 two per u32, element `2i` in the low half) and
//! split by rows into pieces of at most `Gpu::max_binding` bytes, one buffer each.
//!
//! # Parameters
//! Each dispatch's parameter block (`params`: shapes, then token ids or row positions) is
//! appended to a host copy of the parameter arena at an offset aligned to the device's storage
//! offset alignment; the kernel sees it through a fixed `WINDOW`-byte binding at that dynamic
//! offset. The arena is written to the device once per submission, so the many dispatches of a
//! step cost one upload. Writes land before the submission's commands and after every earlier
//! submission's, so reusing the arena for the next submission is safe.

use super::device::Gpu;
use super::params::KernelParams;
use crate::backend::insert_in_free_slot;
use anyhow::{Result, bail};
use std::sync::atomic::{AtomicU64, Ordering};

/// A device buffer with an identity for bind-group caching (ids are never reused).
#[derive(Clone)]
pub struct GBuf {
    pub id: u64,
    pub buffer: wgpu::Buffer,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

pub const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

impl GBuf {
    /// A zeroed buffer of at least `bytes` (rounded up to 4; never empty).
    pub fn new(gpu: &Gpu, what: &str, bytes: u64, usage: wgpu::BufferUsages) -> Result<Self> {
        let size = bytes.max(4).next_multiple_of(4);
        if size > gpu.limits.max_buffer_size {
            bail!(
                "{what} needs {} MiB in one buffer; this GPU allows {} MiB",
                size >> 20,
                gpu.limits.max_buffer_size >> 20
            );
        }
        let buffer = gpu.scoped(&format!("{what} ({size} bytes)"), |d| {
            d.create_buffer(&wgpu::BufferDescriptor {
                label: Some(what),
                size,
                usage,
                mapped_at_creation: false,
            })
        })?;
        Ok(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            buffer,
        })
    }

    /// A storage buffer holding `data` (padded to 4 bytes).
    pub fn with_data(gpu: &Gpu, what: &str, data: &[u8]) -> Result<Self> {
        let b = Self::new(gpu, what, data.len() as u64, STORAGE)?;
        let padded = data.len().next_multiple_of(4);
        if padded == data.len() {
            gpu.queue.write_buffer(&b.buffer, 0, data);
        } else {
            let mut v = data.to_vec();
            v.resize(padded, 0);
            gpu.queue.write_buffer(&b.buffer, 0, &v);
        }
        Ok(b)
    }

    pub fn size(&self) -> u64 {
        self.buffer.size()
    }
}

/// Bytes of the parameter window each dispatch sees: room for over 16,000 token ids or 8,000
/// attention rows.
pub const WINDOW: u64 = 64 * 1024;
/// Bytes of parameters one submission may carry before it is flushed.
const ARENA_BYTES: u64 = 1024 * 1024;

pub struct ParamArena {
    pub buffer: GBuf,
    host: Vec<u8>,
    align: usize,
}

impl ParamArena {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        Ok(Self {
            buffer: GBuf::new(gpu, "parameter arena", ARENA_BYTES + WINDOW, STORAGE)?,
            host: Vec::new(),
            align: gpu.limits.min_storage_buffer_offset_alignment as usize,
        })
    }

    /// Appends a parameter block (`header`, then `tail` at [`KernelParams::tail_offset`]) and
    /// returns its offset, or `None` when the arena is full (flush first).
    pub fn push<P: KernelParams>(&mut self, header: &P, tail: &[P::Tail]) -> Result<Option<u32>> {
        let tail_at = P::tail_offset();
        let bytes = tail_at + size_of_val(tail);
        if bytes as u64 > WINDOW {
            bail!(
                "a batch needs {bytes} bytes of kernel parameters; the wgpu backend allows {WINDOW} \
                 (use smaller batches)"
            );
        }
        let offset = self.host.len().next_multiple_of(self.align);
        if (offset as u64) >= ARENA_BYTES {
            return Ok(None);
        }
        self.host.resize(offset, 0);
        self.host.extend_from_slice(bytemuck::bytes_of(header));
        self.host.resize(offset + tail_at, 0);
        self.host.extend_from_slice(bytemuck::cast_slice(tail));
        Ok(Some(offset as u32))
    }

    /// Writes the pending parameters to the device (before the next submission) and starts over.
    pub fn upload(&mut self, gpu: &Gpu) {
        if !self.host.is_empty() {
            gpu.queue.write_buffer(&self.buffer.buffer, 0, &self.host);
            self.host.clear();
        }
    }
}

/// Byte size classes of pooled buffers: powers of two up to 1 MiB, then whole MiB (so a large
/// buffer wastes at most 1 MiB).
fn size_class(bytes: u64) -> Option<u64> {
    const MIB: u64 = 1 << 20;
    if bytes <= MIB {
        Some(bytes.next_power_of_two())
    } else {
        bytes.checked_next_multiple_of(MIB)
    }
}

/// Activation buffers by handle, with freed buffers kept for reuse by size class.
#[derive(Default)]
pub struct ActivationPool {
    /// `(buffer, values)` per handle; `None` marks a freed handle.
    live: Vec<Option<(GBuf, usize)>>,
    free: Vec<GBuf>,
}

impl ActivationPool {
    /// A buffer for `len` f32 values; reused buffers are reported so the caller can zero them.
    pub fn alloc(&mut self, gpu: &Gpu, len: usize) -> Result<(usize, GBuf, bool)> {
        let Some(class) = (len.max(1) as u64)
            .checked_mul(4)
            .and_then(size_class)
            .filter(|&bytes| bytes <= gpu.max_binding)
        else {
            bail!(
                "{len} activations exceed this GPU's largest storage binding ({} MiB)",
                gpu.max_binding >> 20
            );
        };
        let (buf, reused) = match self.free.iter().position(|b| b.size() == class) {
            Some(i) => (self.free.swap_remove(i), true),
            None => (GBuf::new(gpu, "activations", class, STORAGE)?, false),
        };
        let handle = insert_in_free_slot(&mut self.live, (buf.clone(), len));
        Ok((handle, buf, reused))
    }

    pub fn free(&mut self, handle: usize) {
        if let Some((buf, _)) = self.live.get_mut(handle).and_then(Option::take) {
            self.free.push(buf);
        }
    }

    /// The buffer of `handle`, checked to hold at least `needed` values.
    pub fn get(&self, handle: usize, needed: usize, what: &str) -> Result<&GBuf> {
        match self.live.get(handle).and_then(Option::as_ref) {
            None => bail!("{what}: activation buffer {handle} does not exist"),
            Some((_, len)) if *len < needed => {
                bail!("{what}: needs {needed} values, buffer {handle} holds {len}")
            }
            Some((buf, _)) => Ok(buf),
        }
    }
}

/// Rows per piece when a table of `cols` values of `bytes_per_value` is split at `max_bytes`.
pub fn table_rows_per_piece(cols: usize, bytes_per_value: usize, max_bytes: u64) -> Result<usize> {
    let row = (cols * bytes_per_value) as u64;
    let rows = max_bytes / row.max(1);
    if rows == 0 {
        bail!("one table row ({row} bytes) exceeds the GPU's storage binding limit ({max_bytes})");
    }
    Ok(rows as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_pieces_fit_the_binding_limit() {
        assert_eq!(table_rows_per_piece(3, 2, 64).unwrap(), 10);
        assert_eq!(table_rows_per_piece(4, 4, 64).unwrap(), 4);
        assert!(table_rows_per_piece(100, 4, 64).is_err());
    }
}
