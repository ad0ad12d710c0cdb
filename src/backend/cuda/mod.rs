//! The CUDA backend: W2A8 ternary kernels and the float ops of a step, on one CUDA stream.
//!
//! # Layouts on the device
//! - Linear: the parts' rows one after another in the word layout of
//!   [`gpu_upload`](super::gpu_upload) (2-bit codes, rows padded to 64 columns, u32 words decoded by
//!   shift and mask into four int8 lanes), plus one f32 scale per output row, so fused q‖k‖v and
//!   gate‖up keep each part's scale.
//! - Activations: f32 device buffers, row-major. Tables (embedding, head) keep the checkpoint's
//!   dtype (f32, f16 or bf16). Vectors: f32.
//! - KV cache: **f32** (so the golden tolerances of the CPU reference hold unchanged), one array
//!   per K and V, `[layer][slot][position][kv_head · head_dim]`, plus the RoPE cos/sin table of
//!   [`gpu_upload`](super::gpu_upload).
//!
//! # Op by op (one kernel file per op: `cuda/<op>.cu`)
//! `bitlinear` (`bitlinear.cu`, `bitlinear_mma.cu`) = `bitlinear_quantize` (int8 codes, scale and code sum per token), then for at most 8
//! tokens (decode, batched decode) `bitlinear_gemv` (one warp per output row, 16-byte weight loads,
//! a one-token instance), and for more tokens a GEMM that reuses each staged weight across its
//! tile's tokens: `bitlinear_gemm_mma` on int8 tensor cores (compute capability 8.0+: 128×64 tiles,
//! `mma.sync` m16n8k32 s8), else `bitlinear_gemm` (64×64 tiles, dp4a). All are integer-exact, and
//! the dequantization `acc / s * scale` rounds like the CPU backend, so outputs are bit-identical.
//! `attention` (`attention.cu`) = `rope_append` then split-K `attend_partial` + `attend_combine`.
//! `rms_norm` (`norm.cu`), `gated` and `add` (`elementwise.cu`), `embed` and `logits`
//! (`table.cu`), `argmax` (`argmax.cu`).
//!
//! Everything is queued on one stream in issue order (cudarc's per-buffer event tracking is off:
//! one stream needs none); only `read` waits. Every op checks handles, shapes and buffer lengths on
//! the host before launching, so a kernel never sees an out-of-range index.
//!
//! Steps of at most `GEMV_MAX_TOKENS` rows (decode, batched decode) are captured as CUDA graphs
//! and replayed ([`graph`]); the ops below therefore stage host inputs through [`Gpu::stage`],
//! skip their launches while a graph is replayed, and fingerprint their parameters.
//!
//! The backend is generic over the device ([`Gpu`]): [`Cuda`] is the CUDA driver, and the tests'
//! CPU emulation of the kernels (`cuda-emu/`) is another, so all of the host code below (argument
//! checks, scratch sizes, launch configurations of [`launch`], the parameter structs of
//! [`params`]) is what the emulation harness runs too.
//!
//! Not here yet (see README, CUDA section): greedy sampling on the device wired into the engine
//! (`argmax` exists, the engine reads logits back), RMSNorm fused with quantization, an f16 KV
//! cache.

pub mod device;
pub mod gpu;
mod graph;
pub mod kernels;
pub mod launch;
pub mod nvrtc;
pub mod params;

use super::gpu_upload::{self, padded_cols};
use super::{
    Activations, Backend, KvSpec, KvType, LinearId, PageTable, TableId, TokenPosition, VectorId,
    allocated_kv, distinct_buffers, insert_in_free_slot, uploaded,
};
use crate::ternary::{DenseMatrix, TernaryMatrix};
use anyhow::{Result, anyhow, bail, ensure};
use gpu::{Buf, Cuda, Elem, Gpu};
use graph::Graphs;
use kernels::Kernels;
use launch::{ATT_MAX_DIM, CHUNK, GEMV_MAX_TOKENS};
use params::*;
use tern_cpu::elementwise::GateActivation;
use tern_cpu::table::DenseView;

struct Linear<G: Gpu> {
    words: G::Buf<u32>,
    row_scales: G::Buf<f32>,
    out_features: usize,
    in_features: usize,
}

enum TableData<G: Gpu> {
    F32(G::Buf<f32>),
    F16(G::Buf<half::f16>),
    Bf16(G::Buf<half::bf16>),
}

struct Table<G: Gpu> {
    data: TableData<G>,
    rows: usize,
    cols: usize,
}

impl<G: Gpu> Table<G> {
    /// The table's device address, and its kernel (`embed_*`, `logits_*`) for its dtype.
    fn kernel(&self, op: &'static str) -> (u64, &'static str) {
        let (ptr, suffix) = match &self.data {
            TableData::F32(b) => (b.addr(), 0),
            TableData::F16(b) => (b.addr(), 1),
            TableData::Bf16(b) => (b.addr(), 2),
        };
        let names = match op {
            "embed" => ["embed_f32", "embed_f16", "embed_bf16"],
            _ => ["logits_f32", "logits_f16", "logits_bf16"],
        };
        (ptr, names[suffix])
    }
}

/// The KV cache: K and V each in 16-bit words, two per value in f32 and one in f16
/// ([`kv_words`]); the attention kernels of the cache's type read them as such.
struct KvStorage<G: Gpu> {
    spec: KvSpec,
    keys: G::Buf<u16>,
    values: G::Buf<u16>,
    rope: G::Buf<f32>,
}

/// Device scratch that grows with the largest batch seen (never shrinks).
struct Scratch<G: Gpu> {
    codes: G::Buf<i8>,
    act_scales: G::Buf<f32>,
    act_sums: G::Buf<i32>,
    /// (slot, position) pairs of the current attention batch.
    rows: G::Buf<u32>,
    /// The page table of the current attention batch.
    pages: G::Buf<u32>,
    tokens: G::Buf<u32>,
    partial: G::Buf<f32>,
}

/// The CUDA backend on device `G` (the CUDA driver unless a test says otherwise).
pub struct CudaBackend<G: Gpu = Cuda> {
    gpu: G,
    linears: Vec<Linear<G>>,
    vectors: Vec<G::Buf<f32>>,
    tables: Vec<Table<G>>,
    /// `None` marks a freed handle.
    buffers: Vec<Option<G::Buf<f32>>>,
    kv: Option<KvStorage<G>>,
    scratch: Scratch<G>,
    /// Inside a step: whether its page table is staged yet (once per step, which the table does
    /// not change within). `None` outside a step, where every attention call stages it.
    step_pages: Option<bool>,
}

/// Grows `slot` to at least `len` elements (contents are not kept); graphs pointing to the old
/// allocation are dropped.
fn grow<G: Gpu, T: Elem>(gpu: &mut G, slot: &mut G::Buf<T>, len: usize, what: &str) -> Result<()> {
    if slot.len() < len {
        // Cannot happen: a shape is captured only after an eager step of it sized the scratch.
        ensure!(
            !gpu.capturing(),
            "CUDA: {what} would grow during graph capture"
        );
        gpu.invalidate();
        *slot = gpu.alloc(len, what)?;
    }
    Ok(())
}

/// 16-bit words of K (and of V) in a pool of `pages` pages of `spec`.
fn kv_words(spec: &KvSpec, pages: usize) -> usize {
    pages * spec.page_values() / 2 * spec.kv_type.bytes() / 2
}

fn to_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow!("{what} = {v} is too large for the CUDA kernels"))
}

impl CudaBackend<Cuda> {
    /// Opens CUDA device `ordinal` and compiles (or loads from the cache) every kernel; errors say
    /// why CUDA is unusable here (no driver, no NVRTC, no device, kernels rejected).
    pub fn new(ordinal: usize) -> Result<Self> {
        let dev = device::open(ordinal)?;
        // SAFETY: this backend issues all work on one stream, so cudarc's per-buffer events
        // (which order work across streams) are not needed; nothing else uses this context.
        unsafe { dev.ctx.disable_event_tracking() };
        let cache = device::cache_dir();
        // TERN_CUDA_MMA=0 keeps the dp4a GEMM on tensor-core GPUs too (to test or compare it).
        let mma = dev.has_int8_mma && std::env::var("TERN_CUDA_MMA").map_or(true, |v| v != "0");
        let kernels = Kernels::load(&dev.ctx, &dev.arch, cache.as_deref(), mma)?;
        // A stream of its own (not the legacy default stream), so a step can be captured in a graph.
        let stream = dev.ctx.new_stream()?;
        let graphs = Graphs::new(&stream)?;
        Self::with_gpu(Cuda {
            description: format!(
                "cuda ({}, sm_{}, W2A8 dp4a{} kernels, f32 KV cache)",
                dev.name,
                dev.arch,
                if mma { " + mma.sync s8" } else { "" }
            ),
            stream,
            kernels,
            graphs,
        })
    }
}

impl<G: Gpu> CudaBackend<G> {
    /// The backend on an opened device.
    pub fn with_gpu(gpu: G) -> Result<Self> {
        let scratch = Scratch {
            codes: gpu.alloc(1, "scratch")?,
            act_scales: gpu.alloc(1, "scratch")?,
            act_sums: gpu.alloc(1, "scratch")?,
            rows: gpu.alloc(2, "scratch")?,
            pages: gpu.alloc(1, "scratch")?,
            tokens: gpu.alloc(1, "scratch")?,
            partial: gpu.alloc(1, "scratch")?,
        };
        Ok(Self {
            gpu,
            linears: Vec::new(),
            vectors: Vec::new(),
            tables: Vec::new(),
            buffers: Vec::new(),
            kv: None,
            scratch,
            step_pages: None,
        })
    }

    /// Buffer `a`, checked to hold at least `needed` values.
    fn buf(&self, a: Activations, needed: usize, what: &str) -> Result<&G::Buf<f32>> {
        let b = self
            .buffers
            .get(a.0)
            .and_then(Option::as_ref)
            .ok_or_else(|| anyhow!("{what}: activation buffer {} does not exist", a.0))?;
        ensure!(
            b.len() >= needed,
            "{what}: needs {needed} values, buffer {} holds {}",
            a.0,
            b.len()
        );
        Ok(b)
    }

    /// The device addresses of an op's input and output buffers, which must be distinct and hold
    /// `in_len` and `out_len` values.
    fn in_out(
        &self,
        x: Activations,
        in_len: usize,
        out: Activations,
        out_len: usize,
        what: &str,
    ) -> Result<(u64, u64)> {
        distinct_buffers(what, x, out)?;
        Ok((
            self.buf(x, in_len, what)?.addr(),
            self.buf(out, out_len, what)?.addr(),
        ))
    }

    fn table(&self, id: TableId) -> Result<&Table<G>> {
        uploaded(&self.tables, id.0, "table")
    }
}

impl<G: Gpu> Backend for CudaBackend<G> {
    fn describe(&self) -> String {
        self.gpu.describe()
    }

    fn upload_linear(&mut self, parts: &[&TernaryMatrix]) -> Result<LinearId> {
        let (words, row_scales, cols) = gpu_upload::pack_ternary(parts, CHUNK)?;
        to_i32(padded_cols(cols, CHUNK), "linear input width")?;
        to_i32(row_scales.len(), "linear output width")?;
        self.linears.push(Linear {
            words: self.gpu.upload(&words, "ternary weights")?,
            row_scales: self.gpu.upload(&row_scales, "weight scales")?,
            out_features: row_scales.len(),
            in_features: cols,
        });
        Ok(LinearId(self.linears.len() - 1))
    }

    fn upload_vector(&mut self, values: &[f32]) -> Result<VectorId> {
        self.vectors.push(self.gpu.upload(values, "a norm weight")?);
        Ok(VectorId(self.vectors.len() - 1))
    }

    fn upload_table(&mut self, table: &DenseMatrix) -> Result<TableId> {
        table.check_shape()?;
        to_i32(table.rows, "table rows")?;
        to_i32(table.cols, "table columns")?;
        let what = "an embedding or output-head table";
        let data = match table.view() {
            DenseView::F32(v) => TableData::F32(self.gpu.upload(v, what)?),
            DenseView::F16(v) => TableData::F16(self.gpu.upload(v, what)?),
            DenseView::Bf16(v) => TableData::Bf16(self.gpu.upload(v, what)?),
        };
        self.tables.push(Table {
            data,
            rows: table.rows,
            cols: table.cols,
        });
        Ok(TableId(self.tables.len() - 1))
    }

    fn alloc(&mut self, len: usize) -> Result<Activations> {
        let buf = self.gpu.alloc(len, "activations")?;
        Ok(Activations(insert_in_free_slot(&mut self.buffers, buf)))
    }

    fn free(&mut self, buffer: Activations) {
        if let Some(slot) = self.buffers.get_mut(buffer.0) {
            self.gpu.invalidate();
            *slot = None;
        }
    }

    fn write(&mut self, dst: Activations, data: &[f32]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.buf(dst, data.len(), "write")?;
        let buf = self.buffers[dst.0].as_mut().expect("checked above");
        self.gpu.write(buf, data)
    }

    fn read(&mut self, src: Activations, out: &mut [f32]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let buf = self.buf(src, out.len(), "read")?;
        self.gpu.read(buf, out)
    }

    fn copy(
        &mut self,
        src: Activations,
        src_offset: usize,
        dst: Activations,
        dst_offset: usize,
        len: usize,
    ) -> Result<()> {
        distinct_buffers("copy", src, dst)?;
        self.buf(src, src_offset + len, "copy source")?;
        self.buf(dst, dst_offset + len, "copy destination")?;
        self.gpu
            .note("copy", &[src.0, src_offset, dst.0, dst_offset, len]);
        if len == 0 || self.gpu.replaying() {
            return Ok(());
        }
        // Moved out so the source can be borrowed while the destination is written.
        let mut to = self.buffers[dst.0].take().expect("checked above");
        let from = self.buffers[src.0].as_ref().expect("checked above");
        let result = self.gpu.copy(from, src_offset, &mut to, dst_offset, len);
        self.buffers[dst.0] = Some(to);
        result
    }

    fn alloc_kv(&mut self, spec: &KvSpec) -> Result<()> {
        self.gpu.invalidate();
        self.kv = None; // release the old cache before allocating the new one
        spec.check_geometry(ATT_MAX_DIM)?;
        let len = spec.pages * spec.page_values() / 2;
        to_i32(len, "KV cache values per K or V")?;
        let len = kv_words(spec, spec.pages);
        let rope = gpu_upload::rope_table(spec)?;
        self.kv = Some(KvStorage {
            spec: *spec,
            keys: self.gpu.alloc(len, "the KV cache's keys")?,
            values: self.gpu.alloc(len, "the KV cache's values")?,
            rope: self.gpu.upload(&rope, "the RoPE table")?,
        });
        Ok(())
    }

    fn grow_kv(&mut self, pages: usize) -> Result<()> {
        let spec = allocated_kv(self.kv.as_ref())?.spec;
        ensure!(
            pages >= spec.pages,
            "grow_kv: {pages} pages would shrink a pool of {}",
            spec.pages
        );
        to_i32(pages * spec.page_values() / 2, "KV cache values per K or V")?;
        let (old, len) = (kv_words(&spec, spec.pages), kv_words(&spec, pages));
        self.gpu.invalidate();
        let mut keys = self.gpu.alloc(len, "the KV cache's keys")?;
        let mut values = self.gpu.alloc(len, "the KV cache's values")?;
        let kv = self.kv.as_mut().expect("checked above");
        // Pages are the outermost index: the old pool is the start of the new one.
        self.gpu.copy(&kv.keys, 0, &mut keys, 0, old)?;
        self.gpu.copy(&kv.values, 0, &mut values, 0, old)?;
        kv.keys = keys;
        kv.values = values;
        kv.spec.pages = pages;
        Ok(())
    }

    fn embed(&mut self, table: TableId, tokens: &[u32], out: Activations) -> Result<()> {
        let (vocab, cols) = {
            let t = self.table(table)?;
            (t.rows, t.cols)
        };
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab) {
            bail!("token id {id} is outside the vocabulary of {vocab} tokens");
        }
        self.buf(out, tokens.len() * cols, "embed")?;
        if tokens.is_empty() {
            return Ok(());
        }
        let config = launch::per_row("embed", tokens.len())?;
        self.gpu.note("embed", &[table.0, tokens.len(), out.0]);
        grow(
            &mut self.gpu,
            &mut self.scratch.tokens,
            tokens.len(),
            "token ids",
        )?;
        self.gpu.stage(tokens, &mut self.scratch.tokens)?;
        if self.gpu.replaying() {
            return Ok(());
        }
        let (t, out) = (self.table(table)?, self.buf(out, 0, "embed")?);
        let (table, kernel) = t.kernel("embed");
        let params = EmbedParams {
            table,
            tokens: self.scratch.tokens.addr(),
            out: out.addr(),
            cols: cols as i32,
            pad: 0,
        };
        // SAFETY: the table has `vocab × cols` elements, every id is < vocab (checked above),
        // `tokens` holds one id per block and `out` at least tokens × cols values.
        unsafe { self.gpu.launch(kernel, config, &params) }
    }

    fn rms_norm(
        &mut self,
        x: Activations,
        weight: VectorId,
        eps: f32,
        tokens: usize,
        out: Activations,
    ) -> Result<()> {
        self.gpu.note(
            "rms_norm",
            &[x.0, weight.0, eps.to_bits() as usize, tokens, out.0],
        );
        let w = uploaded(&self.vectors, weight.0, "vector")?;
        let width = w.len();
        let n = tokens * width;
        let (src, dst) = self.in_out(x, n, out, n, "rms_norm")?;
        if n == 0 || self.gpu.replaying() {
            return Ok(());
        }
        let params = RmsNormParams {
            x: src,
            weight: w.addr(),
            out: dst,
            eps,
            width: to_i32(width, "rms_norm width")?,
        };
        let config = launch::per_row("rms_norm", tokens)?;
        // SAFETY: one block per row; x and out hold tokens × width values, the weight width.
        unsafe { self.gpu.launch("rms_norm", config, &params) }
    }

    fn bitlinear(
        &mut self,
        x: Activations,
        linear: LinearId,
        tokens: usize,
        out: Activations,
    ) -> Result<()> {
        let lin = uploaded(&self.linears, linear.0, "linear")?;
        let (n_out, cols) = (lin.out_features, lin.in_features);
        self.in_out(x, tokens * cols, out, tokens * n_out, "bitlinear")?;
        if tokens == 0 || n_out == 0 {
            return Ok(());
        }
        let plan = launch::bitlinear(tokens, n_out, cols, self.gpu.has_mma())?;
        let tokens_i32 = to_i32(tokens, "bitlinear tokens")?;
        to_i32(tokens * plan.padded, "bitlinear activation bytes")?;
        self.gpu.note("bitlinear", &[x.0, linear.0, tokens, out.0]);
        let (s, g) = (&mut self.scratch, &mut self.gpu);
        grow(g, &mut s.codes, tokens * plan.padded, "activation codes")?;
        grow(g, &mut s.act_scales, tokens, "activation scales")?;
        grow(g, &mut s.act_sums, tokens, "activation sums")?;
        if self.gpu.replaying() {
            return Ok(());
        }

        let lin = &self.linears[linear.0];
        let (src, dst) = self.in_out(x, 0, out, 0, "bitlinear")?;
        let s = &self.scratch;
        let params = QuantizeParams {
            x: src,
            codes: s.codes.addr(),
            scales: s.act_scales.addr(),
            sums: s.act_sums.addr(),
            cols: cols as i32,
            padded: plan.padded as i32,
        };
        // SAFETY: one block per row; x holds tokens × cols values, codes tokens × padded bytes,
        // scales and sums one value per row (all checked or grown above).
        unsafe {
            self.gpu
                .launch("bitlinear_quantize", plan.quantize, &params)?;
        }
        let params = ProductParams {
            w: lin.words.addr(),
            x: s.codes.addr(),
            act_scales: s.act_scales.addr(),
            act_sums: s.act_sums.addr(),
            row_scales: lin.row_scales.addr(),
            y: dst,
            n_rows: n_out as i32,
            chunks: plan.chunks as i32,
            tokens: tokens_i32,
            pad: 0,
        };
        // SAFETY: weights hold n_rows × chunks 16-byte chunks (gpu_upload::pack_ternary), codes
        // tokens × chunks × 64 bytes, out tokens × n_rows values; the GEMV takes at most
        // GEMV_MAX_TOKENS tokens and the GEMMs guard partial tiles.
        unsafe {
            self.gpu
                .launch(plan.product.kernel(), plan.product_launch, &params)
        }
    }

    fn attention(
        &mut self,
        layer: usize,
        qkv: Activations,
        tokens: &[TokenPosition],
        pages: &PageTable,
        out: Activations,
    ) -> Result<()> {
        let kv = allocated_kv(self.kv.as_ref())?;
        let spec = kv.spec;
        spec.check_tokens(layer, tokens, pages)?;
        let (hd, q_dim) = (spec.head_dim, spec.heads * spec.head_dim);
        self.in_out(
            qkv,
            tokens.len() * spec.qkv_width(),
            out,
            tokens.len() * q_dim,
            "attention",
        )?;
        if tokens.is_empty() {
            return Ok(());
        }
        let plan = launch::attention(tokens.len(), spec.heads, spec.kv_heads, hd, spec.capacity)?;
        let meta: Vec<u32> = tokens
            .iter()
            .flat_map(|r| [r.slot as u32, r.position as u32])
            .collect();
        self.gpu
            .note("attention", &[layer, qkv.0, tokens.len(), out.0]);
        let (s, g) = (&mut self.scratch, &mut self.gpu);
        grow(g, &mut s.rows, meta.len(), "attention tokens")?;
        grow(
            g,
            &mut s.partial,
            plan.partial_len,
            "attention partial sums",
        )?;
        g.stage(&meta, &mut s.rows)?;
        if self.step_pages != Some(true) {
            grow(g, &mut s.pages, pages.len(), "the KV page table")?;
            g.stage(pages, &mut s.pages)?;
            self.step_pages = self.step_pages.map(|_| true);
        }
        if self.gpu.replaying() {
            return Ok(());
        }

        let kv = self.kv.as_ref().expect("checked above");
        let (src, dst) = self.in_out(qkv, 0, out, 0, "attention")?;
        let s = &self.scratch;
        let g = Geometry {
            heads: spec.heads as i32,
            kv_heads: spec.kv_heads as i32,
            head_dim: hd as i32,
            layers: spec.layers as i32,
            page_size: spec.page_size as i32,
            pages_per_slot: spec.pages_per_slot() as i32,
            layer: layer as i32,
            pad: 0,
        };
        let (rows, k_cache, v_cache) = (s.rows.addr(), kv.keys.addr(), kv.values.addr());
        let (rope_append, attend_partial) = match spec.kv_type {
            KvType::F32 => ("rope_append_f32", "attend_partial_f32"),
            KvType::F16 => ("rope_append_f16", "attend_partial_f16"),
        };
        let pages = s.pages.addr();
        let params = RopeAppendParams {
            qkv: src,
            rows,
            pages,
            rope: kv.rope.addr(),
            k_cache,
            v_cache,
            g,
        };
        // SAFETY: tokens holds (slot, position) pairs inside the cache and the page table maps
        // every position they reach to a page of the pool (checked above); qkv holds
        // tokens × qkv_width values; the rope table covers every position of the capacity.
        unsafe {
            self.gpu.launch(rope_append, plan.rope_append, &params)?;
        }
        let params = AttendPartialParams {
            qkv: src,
            rows,
            pages,
            k_cache,
            v_cache,
            partial: s.partial.addr(),
            g,
            keys_per_split: plan.keys_per_split as i32,
            pad: 0,
        };
        // SAFETY: as above; partial holds tokens × heads × splits × (head_dim + 2) values and every
        // key read is at a position ≤ the row's own, which rope_append has already written.
        unsafe {
            self.gpu
                .launch(attend_partial, plan.attend_partial, &params)?;
        }
        let params = AttendCombineParams {
            partial: s.partial.addr(),
            out: dst,
            splits: plan.splits as i32,
            heads: spec.heads as i32,
            head_dim: hd as i32,
            pad: 0,
        };
        // SAFETY: partial was written for every (row, head, split); out holds tokens × q_dim values.
        unsafe {
            self.gpu
                .launch("attend_combine", plan.attend_combine, &params)
        }
    }

    fn gated(
        &mut self,
        gate_up: Activations,
        activation: GateActivation,
        tokens: usize,
        width: usize,
        out: Activations,
    ) -> Result<()> {
        self.gpu.note(
            "gated",
            &[gate_up.0, activation as usize, tokens, width, out.0],
        );
        let n = tokens * width;
        let (src, dst) = self.in_out(gate_up, 2 * n, out, n, "gated")?;
        if n == 0 || self.gpu.replaying() {
            return Ok(());
        }
        let act: i32 = match activation {
            GateActivation::Relu2 => 0,
            GateActivation::Silu => 1,
        };
        let params = GatedParams {
            gate_up: src,
            out: dst,
            activation: act,
            rows: to_i32(tokens, "gated tokens")?,
            width: to_i32(width, "gated width")?,
            pad: 0,
        };
        // SAFETY: grid-stride over tokens × width outputs; gate_up holds 2 × that many values.
        unsafe { self.gpu.launch("gated", launch::grid_stride(n), &params) }
    }

    fn add(&mut self, acc: Activations, x: Activations, len: usize) -> Result<()> {
        self.gpu.note("add", &[acc.0, x.0, len]);
        let (src, dst) = self.in_out(x, len, acc, len, "add")?;
        if len == 0 || self.gpu.replaying() {
            return Ok(());
        }
        let params = AddParams {
            acc: dst,
            x: src,
            len: to_i32(len, "add length")?,
            pad: 0,
        };
        // SAFETY: grid-stride over len values, which both buffers hold.
        unsafe { self.gpu.launch("add", launch::grid_stride(len), &params) }
    }

    fn logits(
        &mut self,
        x: Activations,
        table: TableId,
        tokens: usize,
        out: Activations,
    ) -> Result<()> {
        self.gpu.note("logits", &[x.0, table.0, tokens, out.0]);
        let t = self.table(table)?;
        let (vocab, cols) = (t.rows, t.cols);
        let (src, dst) = self.in_out(x, tokens * cols, out, tokens * vocab, "logits")?;
        if tokens == 0 || vocab == 0 || self.gpu.replaying() {
            return Ok(());
        }
        let (table, kernel) = t.kernel("logits");
        let params = LogitsParams {
            table,
            x: src,
            out: dst,
            vocab: vocab as i32,
            cols: cols as i32,
            rows: to_i32(tokens, "logits tokens")?,
            pad: 0,
        };
        let config = launch::warp_per_row("logits", vocab)?;
        // SAFETY: one warp per table row; x holds tokens × cols values, out tokens × vocab.
        unsafe { self.gpu.launch(kernel, config, &params) }
    }

    fn begin_step(&mut self, tokens: usize, logits_tokens: usize) -> Result<()> {
        self.step_pages = Some(false);
        self.gpu
            .begin_step(tokens, logits_tokens, tokens <= GEMV_MAX_TOKENS)
    }

    fn end_step(&mut self) -> Result<()> {
        self.step_pages = None;
        self.gpu.end_step()
    }

    fn argmax(&mut self, x: Activations, tokens: usize, width: usize) -> Result<Vec<u32>> {
        let src = self.buf(x, tokens * width, "argmax")?.addr();
        if tokens == 0 {
            return Ok(Vec::new());
        }
        ensure!(width > 0, "argmax: tokens of zero width");
        let config = launch::argmax(tokens)?;
        let ids = self.gpu.alloc::<u32>(tokens, "sampled ids")?;
        let params = ArgmaxParams {
            logits: src,
            ids: ids.addr(),
            vocab: to_i32(width, "argmax width")?,
            pad: 0,
        };
        // SAFETY: one block per row of `width` values; ids holds one u32 per row.
        unsafe { self.gpu.launch("argmax_rows", config, &params)? };
        let mut out = vec![0u32; tokens];
        self.gpu.read(&ids, &mut out)?;
        Ok(out)
    }
}
