//! The CUDA backend: W2A8 ternary kernels and the float ops of a step, on one CUDA stream.
//!
//! # Layouts on the device
//! - Linear: the parts' rows one after another in the word layout of
//!   [`gpu_upload`](super::gpu_upload) (2-bit codes, rows padded to 64 columns, u32 words decoded by
//!   shift and mask into four int8 lanes), plus one f32 scale per output row, so fused q‖k‖v and
//!   gate‖up keep each part's scale.
//! - Activations: `CudaSlice<f32>`, row-major. Tables (embedding, head) keep the checkpoint's
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
//! and replayed ([`graph`]); the ops below therefore stage host inputs through
//! [`Graphs::stage`], skip their launches while a graph is replayed, and fingerprint their
//! parameters.
//!
//! Not here yet (see README, CUDA section): greedy sampling on the device wired into the engine
//! (`argmax` exists, the engine reads logits back), RMSNorm fused with quantization, an f16 KV
//! cache.

pub mod device;
mod graph;
pub mod kernels;
pub mod launch;
pub mod nvrtc;

use super::gpu_upload::{self, padded_cols};
use super::{
    Activations, Backend, KvSpec, LinearId, TableId, TokenPosition, VectorId, allocated_kv,
    distinct_buffers, insert_in_free_slot, uploaded,
};
use crate::ternary::{DenseData, DenseMatrix, TernaryMatrix};
use anyhow::{Context, Result, anyhow, bail, ensure};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, DriverError, LaunchConfig,
    PushKernelArg, ValidAsZeroBits, sys,
};
use graph::Graphs;
use kernels::{DenseDtype, Kernels};
use std::sync::Arc;
use tern_cpu::elementwise::GateActivation;

use launch::{ATT_MAX_DIM, CHUNK, GEMV_MAX_TOKENS, Launch, Product};

struct Linear {
    words: CudaSlice<u32>,
    row_scales: CudaSlice<f32>,
    out_features: usize,
    in_features: usize,
}

enum TableData {
    F32(CudaSlice<f32>),
    F16(CudaSlice<half::f16>),
    Bf16(CudaSlice<half::bf16>),
}

struct Table {
    data: TableData,
    rows: usize,
    cols: usize,
}

/// `Geometry` of cuda/attention.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct Geometry {
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    slots: i32,
    capacity: i32,
    layer: i32,
}

// SAFETY: a plain #[repr(C)] struct of i32 fields, matching `struct Geometry` in cuda/attention.cu.
unsafe impl DeviceRepr for Geometry {}

struct KvStorage {
    spec: KvSpec,
    keys: CudaSlice<f32>,
    values: CudaSlice<f32>,
    rope: CudaSlice<f32>,
}

/// Device scratch that grows with the largest batch seen (never shrinks).
struct Scratch {
    codes: CudaSlice<i8>,
    act_scales: CudaSlice<f32>,
    act_sums: CudaSlice<i32>,
    /// (slot, position) pairs of the current attention batch.
    rows: CudaSlice<u32>,
    tokens: CudaSlice<u32>,
    partial: CudaSlice<f32>,
}

pub struct CudaBackend {
    stream: Arc<CudaStream>,
    kernels: Kernels,
    description: String,
    linears: Vec<Linear>,
    vectors: Vec<CudaSlice<f32>>,
    tables: Vec<Table>,
    /// `None` marks a freed handle.
    buffers: Vec<Option<CudaSlice<f32>>>,
    kv: Option<KvStorage>,
    scratch: Scratch,
    graphs: Graphs,
}

/// A driver error with a clear message for running out of device memory.
fn alloc_error(e: DriverError, ctx: &CudaContext, bytes: usize, what: &str) -> anyhow::Error {
    if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
        let free = ctx.mem_get_info().map_or(0, |(free, _)| free);
        anyhow!(
            "GPU out of memory allocating {} MiB for {what} ({} MiB free); lower --ctx, or use \
             --backend cpu",
            bytes >> 20,
            free >> 20
        )
    } else {
        anyhow!("CUDA error allocating {} MiB for {what}: {e}", bytes >> 20)
    }
}

fn alloc<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    len: usize,
    what: &str,
) -> Result<CudaSlice<T>> {
    let bytes = len * std::mem::size_of::<T>();
    stream
        .alloc_zeros::<T>(len.max(1))
        .map_err(|e| alloc_error(e, stream.context(), bytes, what))
}

fn upload<T: DeviceRepr>(stream: &Arc<CudaStream>, data: &[T], what: &str) -> Result<CudaSlice<T>> {
    let bytes = std::mem::size_of_val(data);
    if data.is_empty() {
        // SAFETY: a one-element allocation that is never read before it is written.
        return unsafe { stream.alloc::<T>(1) }
            .map_err(|e| alloc_error(e, stream.context(), bytes, what));
    }
    stream
        .clone_htod(data)
        .map_err(|e| alloc_error(e, stream.context(), bytes, what))
}

/// Grows `slot` to at least `len` elements (contents are not kept); graphs pointing to the old
/// allocation are dropped.
fn grow<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    graphs: &mut Graphs,
    slot: &mut CudaSlice<T>,
    len: usize,
    what: &str,
) -> Result<()> {
    if slot.len() < len {
        // Cannot happen: a shape is captured only after an eager step of it sized the scratch.
        ensure!(
            !graphs.capturing(),
            "CUDA: {what} would grow during graph capture"
        );
        graphs.invalidate();
        *slot = alloc(stream, len, what)?;
    }
    Ok(())
}

fn to_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow!("{what} = {v} is too large for the CUDA kernels"))
}

fn config(l: Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: l.grid,
        block_dim: l.block,
        shared_mem_bytes: 0,
    }
}

/// A launch's result (its optional timing events are not requested) as an error naming the kernel.
fn launch<T>(result: std::result::Result<T, DriverError>, kernel: &str) -> Result<()> {
    result
        .map(drop)
        .with_context(|| format!("CUDA kernel {kernel} failed to launch"))
}

impl CudaBackend {
    /// Opens CUDA device `ordinal` and compiles (or loads from the cache) every kernel; errors say
    /// why CUDA is unusable here (no driver, no NVRTC, no device, PTX rejected).
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
        let scratch = Scratch {
            codes: alloc(&stream, 1, "scratch")?,
            act_scales: alloc(&stream, 1, "scratch")?,
            act_sums: alloc(&stream, 1, "scratch")?,
            rows: alloc(&stream, 2, "scratch")?,
            tokens: alloc(&stream, 1, "scratch")?,
            partial: alloc(&stream, 1, "scratch")?,
        };
        let graphs = Graphs::new(&stream)?;
        Ok(Self {
            description: format!(
                "cuda ({}, {}, W2A8 dp4a{} kernels, f32 KV cache)",
                dev.name,
                format_args!("sm_{}", dev.arch),
                if mma { " + mma.sync s8" } else { "" }
            ),
            stream,
            kernels,
            linears: Vec::new(),
            vectors: Vec::new(),
            tables: Vec::new(),
            buffers: Vec::new(),
            kv: None,
            scratch,
            graphs,
        })
    }

    /// Buffer `a`, checked to hold at least `needed` values.
    fn buf(&self, a: Activations, needed: usize, what: &str) -> Result<&CudaSlice<f32>> {
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

    /// Input and output buffers of an op, which must be distinct.
    fn in_out(
        &self,
        x: Activations,
        in_len: usize,
        out: Activations,
        out_len: usize,
        what: &str,
    ) -> Result<(&CudaSlice<f32>, &CudaSlice<f32>)> {
        distinct_buffers(what, x, out)?;
        Ok((self.buf(x, in_len, what)?, self.buf(out, out_len, what)?))
    }

    fn table(&self, id: TableId) -> Result<&Table> {
        uploaded(&self.tables, id.0, "table")
    }

    fn dense_kernel<'a>(&'a self, set: &'a [CudaFunction; 3], t: &Table) -> &'a CudaFunction {
        let dtype = match t.data {
            TableData::F32(_) => DenseDtype::F32,
            TableData::F16(_) => DenseDtype::F16,
            TableData::Bf16(_) => DenseDtype::Bf16,
        };
        &set[dtype as usize]
    }
}

/// Pushes a table's device pointer, whatever its dtype.
fn push_table<'a>(b: &mut cudarc::driver::LaunchArgs<'a>, t: &'a Table) {
    match &t.data {
        TableData::F32(s) => b.arg(s),
        TableData::F16(s) => b.arg(s),
        TableData::Bf16(s) => b.arg(s),
    };
}

impl Backend for CudaBackend {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn upload_linear(&mut self, parts: &[&TernaryMatrix]) -> Result<LinearId> {
        let (words, row_scales, cols) = gpu_upload::pack_ternary(parts, CHUNK)?;
        to_i32(padded_cols(cols, CHUNK), "linear input width")?;
        to_i32(row_scales.len(), "linear output width")?;
        self.linears.push(Linear {
            words: upload(&self.stream, &words, "ternary weights")?,
            row_scales: upload(&self.stream, &row_scales, "weight scales")?,
            out_features: row_scales.len(),
            in_features: cols,
        });
        Ok(LinearId(self.linears.len() - 1))
    }

    fn upload_vector(&mut self, values: &[f32]) -> Result<VectorId> {
        self.vectors
            .push(upload(&self.stream, values, "a norm weight")?);
        Ok(VectorId(self.vectors.len() - 1))
    }

    fn upload_table(&mut self, table: &DenseMatrix) -> Result<TableId> {
        ensure!(
            table.view().len() == table.rows * table.cols,
            "upload_table: {} values for a {}x{} matrix",
            table.view().len(),
            table.rows,
            table.cols
        );
        to_i32(table.rows, "table rows")?;
        to_i32(table.cols, "table columns")?;
        let what = "an embedding or output-head table";
        let data = match &table.data {
            DenseData::F32(v) => TableData::F32(upload(&self.stream, v, what)?),
            DenseData::F16(v) => TableData::F16(upload(&self.stream, v, what)?),
            DenseData::Bf16(v) => TableData::Bf16(upload(&self.stream, v, what)?),
        };
        self.tables.push(Table {
            data,
            rows: table.rows,
            cols: table.cols,
        });
        Ok(TableId(self.tables.len() - 1))
    }

    fn alloc(&mut self, len: usize) -> Result<Activations> {
        let buf = alloc(&self.stream, len, "activations")?;
        Ok(Activations(insert_in_free_slot(&mut self.buffers, buf)))
    }

    fn free(&mut self, buffer: Activations) {
        if let Some(slot) = self.buffers.get_mut(buffer.0) {
            self.graphs.invalidate();
            *slot = None;
        }
    }

    fn write(&mut self, dst: Activations, data: &[f32]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.buf(dst, data.len(), "write")?;
        let buf = self.buffers[dst.0].as_mut().expect("checked above");
        self.stream
            .memcpy_htod(data, &mut buf.slice_mut(..data.len()))
            .context("CUDA: copying activations to the device")
    }

    fn read(&mut self, src: Activations, out: &mut [f32]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let buf = self.buf(src, out.len(), "read")?;
        self.stream
            .memcpy_dtoh(&buf.slice(..out.len()), out)
            .and_then(|()| self.stream.synchronize())
            .context("CUDA: reading activations back (or an earlier kernel failed)")
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
        self.graphs
            .note("copy", &[src.0, src_offset, dst.0, dst_offset, len]);
        if len == 0 || self.graphs.replaying() {
            return Ok(());
        }
        // Moved out so the source can be borrowed while the destination is written.
        let mut to = self.buffers[dst.0].take().expect("checked above");
        let from = self.buffers[src.0].as_ref().expect("checked above");
        let result = self.stream.memcpy_dtod(
            &from.slice(src_offset..src_offset + len),
            &mut to.slice_mut(dst_offset..dst_offset + len),
        );
        self.buffers[dst.0] = Some(to);
        result.context("CUDA: device copy")
    }

    fn alloc_kv(&mut self, spec: &KvSpec) -> Result<()> {
        self.graphs.invalidate();
        self.kv = None; // release the old cache before allocating the new one
        spec.check_geometry(ATT_MAX_DIM)?;
        to_i32(spec.bytes(1) / 2, "KV cache values per K or V")?;
        let len = spec.bytes(1) / 2;
        let rope = gpu_upload::rope_table(spec)?;
        self.kv = Some(KvStorage {
            spec: *spec,
            keys: alloc(&self.stream, len, "the KV cache's keys")?,
            values: alloc(&self.stream, len, "the KV cache's values")?,
            rope: upload(&self.stream, &rope, "the RoPE table")?,
        });
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
        self.graphs.note("embed", &[table.0, tokens.len(), out.0]);
        grow(
            &self.stream,
            &mut self.graphs,
            &mut self.scratch.tokens,
            tokens.len(),
            "token ids",
        )?;
        self.graphs
            .stage(&self.stream, tokens, &mut self.scratch.tokens)?;
        if self.graphs.replaying() {
            return Ok(());
        }
        let t = self.table(table)?;
        let f = self.dense_kernel(&self.kernels.embed, t);
        let out = self.buf(out, 0, "embed")?;
        let cols = cols as i32;
        let mut b = self.stream.launch_builder(f);
        push_table(&mut b, t);
        b.arg(&cols).arg(&self.scratch.tokens).arg(out);
        let cfg = config(launch::per_row("embed", tokens.len())?);
        // SAFETY: the table has `vocab × cols` elements, every id is < vocab (checked above),
        // `tokens` holds one id per block and `out` at least tokens × cols values.
        launch(unsafe { b.launch(cfg) }, "embed")
    }

    fn rms_norm(
        &mut self,
        x: Activations,
        weight: VectorId,
        eps: f32,
        tokens: usize,
        out: Activations,
    ) -> Result<()> {
        self.graphs.note(
            "rms_norm",
            &[x.0, weight.0, eps.to_bits() as usize, tokens, out.0],
        );
        let w = uploaded(&self.vectors, weight.0, "vector")?;
        let width = w.len();
        let n = tokens * width;
        let (src, dst) = self.in_out(x, n, out, n, "rms_norm")?;
        if n == 0 || self.graphs.replaying() {
            return Ok(());
        }
        let width = to_i32(width, "rms_norm width")?;
        let cfg = config(launch::per_row("rms_norm", tokens)?);
        let mut b = self.stream.launch_builder(&self.kernels.rms_norm);
        b.arg(src).arg(w).arg(&eps).arg(&width).arg(dst);
        // SAFETY: one block per row; x and out hold tokens × width values, the weight width.
        launch(unsafe { b.launch(cfg) }, "rms_norm")
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
        let plan = launch::bitlinear(
            tokens,
            n_out,
            cols,
            self.kernels.bitlinear_gemm_mma.is_some(),
        )?;
        let padded = plan.padded;
        let tokens_i32 = to_i32(tokens, "bitlinear tokens")?;
        to_i32(tokens * padded, "bitlinear activation bytes")?;
        self.graphs
            .note("bitlinear", &[x.0, linear.0, tokens, out.0]);
        let (s, g) = (&mut self.scratch, &mut self.graphs);
        grow(
            &self.stream,
            g,
            &mut s.codes,
            tokens * padded,
            "activation codes",
        )?;
        grow(
            &self.stream,
            g,
            &mut s.act_scales,
            tokens,
            "activation scales",
        )?;
        grow(&self.stream, g, &mut s.act_sums, tokens, "activation sums")?;
        if self.graphs.replaying() {
            return Ok(());
        }

        let lin = &self.linears[linear.0];
        let (src, dst) = self.in_out(x, 0, out, 0, "bitlinear")?;
        let (cols_i, padded_i) = (cols as i32, padded as i32);
        let s = &self.scratch;
        let mut b = self.stream.launch_builder(&self.kernels.bitlinear_quantize);
        b.arg(src)
            .arg(&cols_i)
            .arg(&padded_i)
            .arg(&s.codes)
            .arg(&s.act_scales)
            .arg(&s.act_sums);
        // SAFETY: one block per row; x holds tokens × cols values, codes tokens × padded bytes,
        // scales and sums one value per row (all checked or grown above).
        launch(
            unsafe { b.launch(config(plan.quantize)) },
            "bitlinear_quantize",
        )?;

        let (n_rows, chunks) = (n_out as i32, plan.chunks as i32);
        let cfg = config(plan.product_launch);
        let k = &self.kernels;
        if let (Product::GemmMma, Some(mma)) = (plan.product, &k.bitlinear_gemm_mma) {
            let mut b = self.stream.launch_builder(mma);
            b.arg(&lin.words)
                .arg(&n_rows)
                .arg(&chunks)
                .arg(&s.codes)
                .arg(&s.act_scales)
                .arg(&lin.row_scales)
                .arg(&tokens_i32)
                .arg(dst);
            // SAFETY: as for the kernels below; the tile guards tokens ≥ n_rows and tokens ≥ tokens.
            return launch(unsafe { b.launch(cfg) }, "bitlinear_gemm_mma");
        }
        let f = match plan.product {
            Product::Gemv1 => &k.bitlinear_gemv1,
            Product::Gemv => &k.bitlinear_gemv,
            Product::Gemm | Product::GemmMma => &k.bitlinear_gemm,
        };
        let mut b = self.stream.launch_builder(f);
        b.arg(&lin.words)
            .arg(&n_rows)
            .arg(&chunks)
            .arg(&s.codes)
            .arg(&s.act_scales)
            .arg(&s.act_sums)
            .arg(&lin.row_scales)
            .arg(&tokens_i32)
            .arg(dst);
        // SAFETY: weights hold n_rows × chunks 16-byte chunks (gpu_upload::pack_ternary), codes
        // tokens × chunks × 64 bytes, out tokens × n_rows values; the GEMV takes at most
        // GEMV_MAX_TOKENS tokens and the GEMM guards partial tiles.
        launch(unsafe { b.launch(cfg) }, plan.product.kernel())
    }

    fn attention(
        &mut self,
        layer: usize,
        qkv: Activations,
        tokens: &[TokenPosition],
        out: Activations,
    ) -> Result<()> {
        let kv = allocated_kv(self.kv.as_ref())?;
        let spec = kv.spec;
        spec.check_tokens(layer, tokens)?;
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
        self.graphs
            .note("attention", &[layer, qkv.0, tokens.len(), out.0]);
        let (s, g) = (&mut self.scratch, &mut self.graphs);
        grow(&self.stream, g, &mut s.rows, meta.len(), "attention tokens")?;
        grow(
            &self.stream,
            g,
            &mut s.partial,
            plan.partial_len,
            "attention partial sums",
        )?;
        g.stage(&self.stream, &meta, &mut s.rows)?;
        if self.graphs.replaying() {
            return Ok(());
        }

        let kv = self.kv.as_ref().expect("checked above");
        let (src, dst) = self.in_out(qkv, 0, out, 0, "attention")?;
        let s = &self.scratch;
        let g = Geometry {
            heads: spec.heads as i32,
            kv_heads: spec.kv_heads as i32,
            head_dim: hd as i32,
            slots: spec.slots as i32,
            capacity: spec.capacity as i32,
            layer: layer as i32,
        };
        let mut b = self.stream.launch_builder(&self.kernels.rope_append);
        b.arg(src)
            .arg(&s.rows)
            .arg(&kv.rope)
            .arg(&g)
            .arg(&kv.keys)
            .arg(&kv.values);
        let cfg = config(plan.rope_append);
        // SAFETY: tokens holds (slot, position) pairs inside the cache (checked above); qkv holds
        // tokens × qkv_width values; the rope table covers every position of the capacity.
        launch(unsafe { b.launch(cfg) }, "rope_append")?;

        let kps = plan.keys_per_split as i32;
        let mut b = self.stream.launch_builder(&self.kernels.attend_partial);
        b.arg(src)
            .arg(&s.rows)
            .arg(&g)
            .arg(&kv.keys)
            .arg(&kv.values)
            .arg(&kps)
            .arg(&s.partial);
        let cfg = config(plan.attend_partial);
        // SAFETY: as above; partial holds tokens × heads × splits × (head_dim + 2) values and every
        // key read is at a position ≤ the row's own, which rope_append has already written.
        launch(unsafe { b.launch(cfg) }, "attend_partial")?;

        let (splits_i, heads_i, hd_i) = (plan.splits as i32, spec.heads as i32, hd as i32);
        let mut b = self.stream.launch_builder(&self.kernels.attend_combine);
        b.arg(&s.partial)
            .arg(&splits_i)
            .arg(&heads_i)
            .arg(&hd_i)
            .arg(dst);
        let cfg = config(plan.attend_combine);
        // SAFETY: partial was written for every (row, head, split); out holds tokens × q_dim values.
        launch(unsafe { b.launch(cfg) }, "attend_combine")
    }

    fn gated(
        &mut self,
        gate_up: Activations,
        activation: GateActivation,
        tokens: usize,
        width: usize,
        out: Activations,
    ) -> Result<()> {
        self.graphs.note(
            "gated",
            &[gate_up.0, activation as usize, tokens, width, out.0],
        );
        let n = tokens * width;
        let (src, dst) = self.in_out(gate_up, 2 * n, out, n, "gated")?;
        if n == 0 || self.graphs.replaying() {
            return Ok(());
        }
        let act: i32 = match activation {
            GateActivation::Relu2 => 0,
            GateActivation::Silu => 1,
        };
        let (rows_i, width_i) = (
            to_i32(tokens, "gated tokens")?,
            to_i32(width, "gated width")?,
        );
        let mut b = self.stream.launch_builder(&self.kernels.gated);
        b.arg(src).arg(&act).arg(&rows_i).arg(&width_i).arg(dst);
        // SAFETY: grid-stride over tokens × width outputs; gate_up holds 2 × that many values.
        launch(unsafe { b.launch(config(launch::grid_stride(n))) }, "gated")
    }

    fn add(&mut self, acc: Activations, x: Activations, len: usize) -> Result<()> {
        self.graphs.note("add", &[acc.0, x.0, len]);
        let (src, dst) = self.in_out(x, len, acc, len, "add")?;
        if len == 0 || self.graphs.replaying() {
            return Ok(());
        }
        let len_i = to_i32(len, "add length")?;
        let mut b = self.stream.launch_builder(&self.kernels.add);
        b.arg(dst).arg(src).arg(&len_i);
        // SAFETY: grid-stride over len values, which both buffers hold.
        launch(unsafe { b.launch(config(launch::grid_stride(len))) }, "add")
    }

    fn logits(
        &mut self,
        x: Activations,
        table: TableId,
        tokens: usize,
        out: Activations,
    ) -> Result<()> {
        self.graphs.note("logits", &[x.0, table.0, tokens, out.0]);
        let t = self.table(table)?;
        let (vocab, cols) = (t.rows, t.cols);
        let (src, dst) = self.in_out(x, tokens * cols, out, tokens * vocab, "logits")?;
        if tokens == 0 || vocab == 0 || self.graphs.replaying() {
            return Ok(());
        }
        let (vocab_i, cols_i, rows_i) =
            (vocab as i32, cols as i32, to_i32(tokens, "logits tokens")?);
        let f = self.dense_kernel(&self.kernels.logits, t);
        let mut b = self.stream.launch_builder(f);
        push_table(&mut b, t);
        b.arg(&vocab_i).arg(&cols_i).arg(src).arg(&rows_i).arg(dst);
        let cfg = config(launch::warp_per_row("logits", vocab)?);
        // SAFETY: one warp per table row; x holds tokens × cols values, out tokens × vocab.
        launch(unsafe { b.launch(cfg) }, "logits")
    }

    fn begin_step(&mut self, tokens: usize, logits_tokens: usize) -> Result<()> {
        self.graphs.begin(
            &self.stream,
            tokens,
            logits_tokens,
            tokens <= GEMV_MAX_TOKENS,
        )
    }

    fn end_step(&mut self) -> Result<()> {
        self.graphs.end(&self.stream)
    }

    fn argmax(&mut self, x: Activations, tokens: usize, width: usize) -> Result<Vec<u32>> {
        let src = self.buf(x, tokens * width, "argmax")?;
        if tokens == 0 {
            return Ok(Vec::new());
        }
        ensure!(width > 0, "argmax: tokens of zero width");
        let width_i = to_i32(width, "argmax width")?;
        let mut ids = alloc::<u32>(&self.stream, tokens, "sampled ids")?;
        let mut b = self.stream.launch_builder(&self.kernels.argmax_rows);
        b.arg(src).arg(&width_i).arg(&mut ids);
        let cfg = config(launch::argmax(tokens)?);
        // SAFETY: one block per row of `width` values; ids holds one u32 per row.
        launch(unsafe { b.launch(cfg) }, "argmax_rows")?;
        let mut out = vec![0u32; tokens];
        self.stream
            .memcpy_dtoh(&ids, &mut out)
            .and_then(|()| self.stream.synchronize())
            .context("CUDA: reading sampled ids")?;
        Ok(out)
    }
}
