//! The [`Backend`] trait: the operations of a ternary transformer step, as a device runs them.
//!
//! # Contract
//! - **Weights are uploaded once**, in the backend's own layout, and referred to by handles
//!   ([`LinearId`], [`VectorId`], [`TableId`]). A fused linear ([`Backend::upload_linear`] with
//!   several parts, e.g. q‖k‖v or gate‖up) concatenates the parts' outputs; every part keeps its own
//!   scale.
//! - **Activations stay on the device**: [`Activations`] is a handle to an f32 buffer the backend
//!   owns; only [`Backend::write`] and [`Backend::read`] cross the host boundary. A buffer holds
//!   `rows × width` values row-major, one row per token of the batch.
//! - **A batch** is a list of rows, each a token at a position of a sequence; a sequence lives in
//!   one slot of the KV cache ([`TokenPosition`]). A prefill is many rows of one slot at consecutive
//!   positions; a batched decode is one row in each of several slots. The same ops serve both.
//! - **W1.58A8 is one op**: [`Backend::bitlinear`] quantizes each activation row to int8 (absmax,
//!   `s = 127 / max|x|`), multiplies by the ternary weights with integer accumulation, and writes
//!   `acc / s * scale`. Integer results must equal the scalar reference in `tern_cpu::bitlinear::reference`.
//! - **The KV cache is paged**: one pool of [`KvSpec::pages`] pages per backend, each holding
//!   [`KvSpec::page_size`] positions of every layer's K and V, stored as [`KvSpec::kv_type`]
//!   (`[page][layer][position in page][kv_head · head_dim]`, K and V apart). Which pages a sequence
//!   uses is the caller's [`PageTable`] (the KV-cache manager's): position `p` of slot `s` lives in
//!   page `table[s · pages_per_slot + p / page_size]` at `p % page_size`. The pool's content
//!   belongs to the backend; the table, to the caller, who hands it to every `attention` call.
//! - [`Backend::attention`] applies rotate-half RoPE to the rows' q and k, stores k and v in the KV
//!   cache at each row's slot and position (through the page table), and attends causally over
//!   positions `0..=position` of the row's slot (GQA: query head `h` reads kv head
//!   `h / (heads / kv_heads)`). Every page a row reads or writes must be in the table (checked).
//! - Ops are issued in order; a backend may queue them (GPU) and only [`Backend::read`] must wait.
//!   Errors report shape mismatches and device failures; they never panic.
//!
//! Backends implement this trait and nothing above it: the model graph and the KV-cache manager
//! see only `dyn Backend`.

pub mod cpu;
pub mod cuda;
pub mod gpu_upload;
pub mod selftest;
pub mod wgpu;

use crate::ternary::{DenseMatrix, TernaryMatrix};
use anyhow::Result;
use tern_cpu::elementwise::GateActivation;

/// A device buffer of f32 activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Activations(pub usize);

/// An uploaded ternary linear layer (possibly several fused along the output dimension).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinearId(pub usize);

/// An uploaded f32 vector (norm weights).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VectorId(pub usize);

/// An uploaded dense matrix whose rows are gathered (embedding) or dotted (output head).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TableId(pub usize);

/// Where one token of a batch belongs: its sequence's KV slot and its position in that sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenPosition {
    pub slot: usize,
    pub position: usize,
}

/// Positions per KV page. 16 keeps a sequence's unused tail under 16 positions (under 1 % of a
/// 2048-token context) and the page table small (256 entries for 4096 positions), while one page of
/// one layer's keys (16 × kv_heads · head_dim values, 40 KiB in f32 on the 2B-4T shape) is long
/// enough that reading through the table costs nothing measurable next to the reads themselves.
pub const PAGE_SIZE: usize = 16;

/// A page-table entry that names no page.
pub const NO_PAGE: u32 = u32::MAX;

/// Which pages of the pool hold each slot's positions: `slots × pages_per_slot` entries, row `s`
/// listing slot `s`'s pages in position order ([`NO_PAGE`] past its last one). See the module doc.
pub type PageTable = [u32];

/// How K and V values are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvType {
    #[default]
    F32,
    /// IEEE half precision, converted to f32 as attention reads it.
    F16,
}

impl KvType {
    pub fn bytes(self) -> usize {
        match self {
            KvType::F32 => 4,
            KvType::F16 => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
        }
    }
}

/// The attention geometry and the KV cache to allocate for it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvSpec {
    pub layers: usize,
    /// Sequences that can be cached at once (rows of the page table).
    pub slots: usize,
    /// Positions per slot (the context length).
    pub capacity: usize,
    /// Pages in the pool (shared by all slots).
    pub pages: usize,
    /// Positions per page ([`PAGE_SIZE`] unless a test says otherwise).
    pub page_size: usize,
    pub kv_type: KvType,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
}

impl KvSpec {
    /// Page-table entries per slot: enough pages for `capacity` positions.
    pub fn pages_per_slot(&self) -> usize {
        self.capacity.div_ceil(self.page_size)
    }

    /// The table that gives slot `s` the pages `s · pages_per_slot ..` in order (with a pool of
    /// `slots × pages_per_slot` pages): the contiguous cache, for callers without a manager.
    pub fn contiguous_table(&self) -> Vec<u32> {
        (0..self.slots * self.pages_per_slot())
            .map(|p| if p < self.pages { p as u32 } else { NO_PAGE })
            .collect()
    }

    /// Checks that `layer` and every row's slot and position lie inside this cache, and that the
    /// page table is this cache's and maps every position the rows touch to a page of the pool:
    /// what every backend's `attention` verifies before touching device memory.
    pub fn check_tokens(
        &self,
        layer: usize,
        tokens: &[TokenPosition],
        table: &PageTable,
    ) -> Result<()> {
        anyhow::ensure!(
            layer < self.layers,
            "attention: layer {layer} of {}",
            self.layers
        );
        let per_slot = self.pages_per_slot();
        anyhow::ensure!(
            table.len() == self.slots * per_slot,
            "attention: a page table of {} entries for {} slots x {per_slot} pages",
            table.len(),
            self.slots
        );
        // The last page each slot's rows reach; every page before it is read too.
        let mut reach = vec![0usize; self.slots];
        for r in tokens {
            anyhow::ensure!(
                r.slot < self.slots && r.position < self.capacity,
                "attention: slot {} position {} outside a cache of {} slots x {} positions",
                r.slot,
                r.position,
                self.slots,
                self.capacity
            );
            reach[r.slot] = reach[r.slot].max(r.position / self.page_size + 1);
        }
        for (slot, &n) in reach.iter().enumerate() {
            let row = &table[slot * per_slot..][..n];
            if let Some(i) = row.iter().position(|&p| p as usize >= self.pages) {
                anyhow::bail!(
                    "attention: slot {slot} page {i} is {} in a pool of {} pages",
                    row[i],
                    self.pages
                );
            }
        }
        Ok(())
    }

    /// Checks the attention geometry every backend needs (query heads in whole groups per kv
    /// head, an even head dimension) and the backend's own largest head dimension.
    pub fn check_geometry(&self, max_head_dim: usize) -> Result<()> {
        anyhow::ensure!(
            self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads),
            "alloc_kv: {} query heads do not group over {} kv heads",
            self.heads,
            self.kv_heads
        );
        let hd = self.head_dim;
        anyhow::ensure!(
            hd > 0 && hd.is_multiple_of(2) && hd <= max_head_dim,
            "alloc_kv: head_dim {hd} must be even, positive and at most {max_head_dim} here"
        );
        Ok(())
    }

    /// Width of one row of the fused q‖k‖v activations.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// K and V values of one page (each of K and V holds half).
    pub fn page_values(&self) -> usize {
        2 * self.layers * self.page_size * self.kv_heads * self.head_dim
    }

    /// Bytes of one page of K and V.
    pub fn page_bytes(&self) -> usize {
        self.page_values() * self.kv_type.bytes()
    }

    /// Bytes of the whole pool.
    pub fn bytes(&self) -> usize {
        self.pages * self.page_bytes()
    }

    /// Offset (in values, within K or within V) of position `in_page` of `layer` in `page`.
    pub fn offset(&self, page: usize, layer: usize, in_page: usize) -> usize {
        ((page * self.layers + layer) * self.page_size + in_page) * self.kv_heads * self.head_dim
    }
}

/// How the output head is evaluated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LmHead {
    /// In the stored precision (f16/bf16/f32): every logit exact.
    #[default]
    Full,
    /// An 8-bit copy with error bounds, the candidates for the `top` largest logits (1 to
    /// [`Q8_EXACT_TOP_K`]) re-scored in full precision: those logits (so greedy decoding with
    /// `top` 1, top-k sampling up to `top`) are exact, the others approximate (perplexity and
    /// deep log-probabilities are then approximate). The fewer asked for, the fewer rows the
    /// candidates' bounds let through to be re-scored.
    Q8 { top: usize },
}

/// The most of the largest logits [`LmHead::Q8`] keeps exact.
pub const Q8_EXACT_TOP_K: usize = 64;

/// `threads`, or one per available core for 0 (the command line's `-t 0`).
pub fn resolve_threads(threads: usize) -> usize {
    if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    }
}

/// The input width of a fused linear's `parts`, checked: at least one part, all of one width.
pub fn fused_in_features(parts: &[&TernaryMatrix]) -> Result<usize> {
    let Some(first) = parts.first() else {
        anyhow::bail!("upload_linear: no matrices given");
    };
    for part in parts {
        anyhow::ensure!(
            part.cols == first.cols,
            "upload_linear: fused parts have {} and {} inputs",
            first.cols,
            part.cols
        );
    }
    Ok(first.cols)
}

/// An error unless `op`'s input and output are different buffers (no op works in place).
pub fn distinct_buffers(op: &str, input: Activations, output: Activations) -> Result<()> {
    anyhow::ensure!(
        input != output,
        "{op}: input and output must be different buffers"
    );
    Ok(())
}

/// The uploaded item behind handle `index` of a backend's `items` of `kind` (linear, vector,
/// table): an error naming the handle when it does not exist.
pub fn uploaded<'a, T>(items: &'a [T], index: usize, kind: &str) -> Result<&'a T> {
    items
        .get(index)
        .ok_or_else(|| anyhow::anyhow!("{kind} {index} does not exist"))
}

/// The backend's KV storage, or the error every op that needs it gives before [`Backend::alloc_kv`].
pub fn allocated_kv<T>(kv: Option<T>) -> Result<T> {
    kv.ok_or_else(|| anyhow::anyhow!("attention: no KV cache allocated"))
}

/// Stores `item` in the first freed slot of a handle table (or a new one) and returns its index:
/// how every backend turns buffers into [`Activations`] handles that stay small as buffers come and go.
pub fn insert_in_free_slot<T>(slots: &mut Vec<Option<T>>, item: T) -> usize {
    match slots.iter().position(Option::is_none) {
        Some(i) => {
            slots[i] = Some(item);
            i
        }
        None => {
            slots.push(Some(item));
            slots.len() - 1
        }
    }
}

/// The operations the model graph runs on a device. See the module documentation for the contract.
pub trait Backend {
    /// Chooses how [`Backend::logits`] evaluates the output head (default: [`LmHead::Full`]).
    /// Backends without an 8-bit head refuse [`LmHead::Q8`].
    fn set_lm_head(&mut self, head: LmHead) -> Result<()> {
        anyhow::ensure!(
            head == LmHead::Full,
            "{}: no 8-bit output head on this backend (use --lm-head f16)",
            self.describe()
        );
        Ok(())
    }

    /// A one-line description for logs: device, kernel family, threads.
    fn describe(&self) -> String;

    /// Bytes of every uploaded linear's weights in this backend's own layout, all of which a
    /// decode step reads (`None`: the canonical 2 bits per weight).
    fn linear_weight_bytes(&self) -> Option<usize> {
        None
    }

    /// Bits a ternary weight takes in the layout this backend keeps in host memory (the canonical
    /// 2 unless it says otherwise), for estimating whether a model fits before loading it.
    fn host_bits_per_weight(&self) -> f64 {
        2.0
    }

    /// Uploads ternary matrices with equal input width as one linear whose outputs are the parts'
    /// outputs concatenated.
    fn upload_linear(&mut self, parts: &[&TernaryMatrix]) -> Result<LinearId>;
    /// Uploads several linears, each as [`Backend::upload_linear`] would; a backend may repack
    /// them in parallel.
    fn upload_linears(&mut self, linears: &[&[&TernaryMatrix]]) -> Result<Vec<LinearId>> {
        linears
            .iter()
            .map(|parts| self.upload_linear(parts))
            .collect()
    }
    fn upload_vector(&mut self, values: &[f32]) -> Result<VectorId>;
    fn upload_table(&mut self, table: &DenseMatrix) -> Result<TableId>;

    /// Allocates an activation buffer of `len` f32 values.
    fn alloc(&mut self, len: usize) -> Result<Activations>;
    fn free(&mut self, buffer: Activations);
    /// Copies `data` into the start of `dst`.
    fn write(&mut self, dst: Activations, data: &[f32]) -> Result<()>;
    /// Copies the first `out.len()` values of `src` to the host, waiting for queued work.
    fn read(&mut self, src: Activations, out: &mut [f32]) -> Result<()>;

    /// Copies `len` values from `src[src_offset..]` to `dst[dst_offset..]` (distinct buffers).
    fn copy(
        &mut self,
        src: Activations,
        src_offset: usize,
        dst: Activations,
        dst_offset: usize,
        len: usize,
    ) -> Result<()>;

    /// Allocates (or replaces) the backend's KV pool and fixes the attention geometry.
    fn alloc_kv(&mut self, spec: &KvSpec) -> Result<()>;

    /// Grows the KV pool to `pages` pages (at least the current number), keeping the content of
    /// the pages it has: how a cache that starts small follows a growing context.
    fn grow_kv(&mut self, pages: usize) -> Result<()>;

    /// `out[t] = table[tokens[t]]`.
    fn embed(&mut self, table: TableId, tokens: &[u32], out: Activations) -> Result<()>;
    /// RMSNorm of `rows` rows whose width is the weight's length.
    fn rms_norm(
        &mut self,
        x: Activations,
        weight: VectorId,
        eps: f32,
        tokens: usize,
        out: Activations,
    ) -> Result<()>;
    /// Fused activation quantization and ternary matrix product for `tokens` tokens.
    fn bitlinear(
        &mut self,
        x: Activations,
        linear: LinearId,
        tokens: usize,
        out: Activations,
    ) -> Result<()>;
    /// RoPE, KV-cache append and causal attention for the tokens of `qkv`, K and V found through
    /// `pages` (see the module doc); writes `tokens × heads·head_dim` values to `out`.
    fn attention(
        &mut self,
        layer: usize,
        qkv: Activations,
        tokens: &[TokenPosition],
        pages: &PageTable,
        out: Activations,
    ) -> Result<()>;
    /// `out[t][i] = act(x[t][i]) * x[t][width + i]` for `tokens` rows of `2·width` (gate‖up).
    fn gated(
        &mut self,
        gate_up: Activations,
        activation: GateActivation,
        tokens: usize,
        width: usize,
        out: Activations,
    ) -> Result<()>;
    /// `acc[i] += x[i]` for `i < len`.
    fn add(&mut self, acc: Activations, x: Activations, len: usize) -> Result<()>;
    /// `out[t][v] = x[t] · table[v]` for `tokens` tokens (the output head).
    fn logits(
        &mut self,
        x: Activations,
        table: TableId,
        tokens: usize,
        out: Activations,
    ) -> Result<()>;

    /// Brackets one model step of `tokens` tokens that ends with logits for `logits_tokens` of
    /// them: between `begin_step` and `end_step` the model issues the same ops, on the same buffers and with the
    /// same parameters, for every step of that shape; only host inputs (token ids, row positions)
    /// change. A backend may record a step once and replay it (CUDA graphs). Defaults: nothing.
    fn begin_step(&mut self, tokens: usize, logits_tokens: usize) -> Result<()> {
        let _ = (tokens, logits_tokens);
        Ok(())
    }

    /// Ends the step begun by [`Backend::begin_step`] (queues it; [`Backend::read`] waits).
    fn end_step(&mut self) -> Result<()> {
        Ok(())
    }

    /// Greedy sampling: for each of `tokens` rows of `width` values in `x`, the index of the largest
    /// (the first one on ties). Waits for queued work. The default reads the rows back; a GPU
    /// backend overrides it so that only the ids cross to the host.
    fn argmax(&mut self, x: Activations, tokens: usize, width: usize) -> Result<Vec<u32>> {
        let mut values = vec![0f32; tokens * width];
        self.read(x, &mut values)?;
        Ok(values
            .chunks_exact(width.max(1))
            .map(|row| {
                let mut best = 0;
                for (i, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = i;
                    }
                }
                best as u32
            })
            .collect())
    }
}
