//! The CPU backend: `tern_cpu` kernels spread over one persistent thread pool.
//!
//! Kernels run at one [`Isa`] level, chosen at construction ([`Isa::selected`]: the widest this CPU
//! has, or `TERN_CPU_ISA`). Layouts: a linear is repacked at upload (the fused parts' rows one after
//! another, one scale per output row, so fused parts keep their own scales) into the layout of the
//! backend's kernel family ([`CpuKernels`]): the multiply-add kernels' [`PackedTernary`] (or
//! [`PackedBase3`], five weights per byte) or the lookup-table kernels' [`PackedLut`]. Activations
//! are `Vec<f32>`. The KV cache is one f32 array per K and V, indexed
//! `[layer][slot][position][kv_head · head_dim]`.
//!
//! Parallelism: matrix products split the weight rows into chunks on row-group boundaries (each
//! chunk writes its own contiguous slice of a `[weight row][token]` accumulator, transposed and
//! scaled afterwards); attention splits over (row, head); the output head over vocabulary chunks.
//! Threads live as long as the backend, and the quantized activations, accumulators and head
//! outputs are scratch owned by the backend, so a decode step allocates nothing once they have grown.

use super::{
    Activations, Backend, KvSpec, LinearId, LmHead, Q8_EXACT_TOP_K, TableId, TokenPosition,
    VectorId, allocated_kv, distinct_buffers, fused_in_features, insert_in_free_slot,
    resolve_threads, uploaded,
};
use crate::ternary::{DenseMatrix, TernaryMatrix};
use anyhow::{Context, Result, anyhow, bail, ensure};
use tern_cpu::attention;
use tern_cpu::attention::rope;
use tern_cpu::bitlinear::amx;
use tern_cpu::bitlinear::base3::{self, PackedBase3};
use tern_cpu::bitlinear::lut::{self, LutTables, PackedLut};
use tern_cpu::bitlinear::mad::{self, PackedTernary, ROW_GROUP};
use tern_cpu::bitlinear::quant::QuantizedRows;
use tern_cpu::bitlinear::reference::TernaryView;
use tern_cpu::elementwise::{self, GateActivation};
use tern_cpu::isa::Isa;
use tern_cpu::norm;
use tern_cpu::pool::ThreadPool;
use tern_cpu::table::q8::{Q8Head, Q8Input, top_candidates};

/// Output rows per parallel task: a multiple of the kernels' row group, at least this many.
const MIN_ROWS_PER_TASK: usize = 16 * ROW_GROUP;

/// Tasks per thread a linear is split into: each thread streams a few long contiguous runs of
/// weights (which the hardware prefetchers follow) while a slow thread still gets fewer runs.
const TASKS_PER_THREAD: usize = 4;

/// Tokens per task when the products are transposed into the output (a cache line of i32).
const TOKENS_PER_TASK: usize = 16;

/// Weight rows per block of that transposition.
const TRANSPOSE_ROWS: usize = 16;

/// Prompt rows per attention task: every cached key and value is read once for this many rows
/// (times the heads sharing it).
const ATTENTION_ROWS_PER_TASK: usize = 8;

/// Output-head rows per parallel task, at least.
const MIN_VOCAB_PER_TASK: usize = 256;

/// Re-scored output-head candidates per parallel task (one full-precision row each).
const CANDIDATES_PER_TASK: usize = 64;

/// Which ternary kernel family runs the matrix products (`TERN_CPU_KERNELS`).
///
/// The rule ([`CpuKernels::default_for`]): base 3 at AVX-512 with two threads or more, multiply-add
/// otherwise; lookup tables never by default. Base 3 reads 20% fewer bytes, which pays where threads
/// share a core's memory bandwidth, while one thread is compute-bound on its GEMV and the levels
/// without AVX-512 VNNI would decode base 3 for every product; lookup tables stream about the same
/// weights per second as multiply-add from memory and their tables outgrow the caches in prompts.
/// A linear wider than [`base3::MAX_COLS`] columns stays 2-bit. The measurements behind the rule
/// are in `scripts/benchmark-log.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuKernels {
    /// Multiply-add ([`PackedTernary`], 2 bits per weight).
    Mad,
    /// Lookup tables ([`PackedLut`], 1.78 bits per weight; an error at a level without them).
    Lut,
    /// Multiply-add on five weights per byte ([`PackedBase3`], 1.6 bits per weight).
    Base3,
}

/// Environment variable that picks a [`CpuKernels`] (`mad`, `base3` or `lut`; unset or `auto`:
/// [`CpuKernels::default_for`]).
pub const KERNELS_ENV: &str = "TERN_CPU_KERNELS";

impl CpuKernels {
    /// `TERN_CPU_KERNELS`, `None` where it is unset or `auto`.
    pub fn from_env() -> Result<Option<Self>> {
        match std::env::var(KERNELS_ENV).as_deref() {
            Err(_) | Ok("auto") => Ok(None),
            Ok("mad") => Ok(Some(Self::Mad)),
            Ok("lut") => Ok(Some(Self::Lut)),
            Ok("base3") => Ok(Some(Self::Base3)),
            Ok(other) => bail!("{KERNELS_ENV}={other}: expected auto, mad, base3 or lut"),
        }
    }

    /// The measured choice at `isa` with `threads` threads (see the type's documentation).
    pub fn default_for(isa: Isa, threads: usize) -> Self {
        if isa == Isa::Avx512 && threads >= 2 {
            Self::Base3
        } else {
            Self::Mad
        }
    }
}

/// When the AMX-INT8 kernels ([`amx`]) run a batch's multiply-add and base-3 products
/// (`TERN_CPU_AMX`): never (`off`); at the AVX-512 level, for batches of at least
/// [`AMX_MIN_TOKENS`] tokens, where the CPU and OS allow it (`auto`, the default); for every
/// batch of two tokens or more at any level (`on`, an error where AMX is unavailable). The lookup
/// tables have no AMX path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmxUse {
    Off,
    Auto,
    On,
}

/// Environment variable that picks an [`AmxUse`] (`auto`, `on` or `off`).
pub const AMX_ENV: &str = "TERN_CPU_AMX";

/// Tokens a batch needs before `auto` runs its products on AMX: one whole step of the AMX kernel
/// (2 tiles of 16 tokens); the measurements are in `scripts/benchmark-log.md`.
pub const AMX_MIN_TOKENS: usize = 32;

impl AmxUse {
    /// `TERN_CPU_AMX` (unset: `auto`).
    pub fn from_env() -> Result<Self> {
        match std::env::var(AMX_ENV).as_deref() {
            Err(_) | Ok("auto") => Ok(Self::Auto),
            Ok("on") => Ok(Self::On),
            Ok("off") => Ok(Self::Off),
            Ok(other) => bail!("{AMX_ENV}={other}: expected auto, on or off"),
        }
    }

    /// The smallest batch whose products run on AMX with `kernels` at `isa` (`None`: never), and
    /// a note for the backend's description.
    fn min_tokens(self, isa: Isa, kernels: CpuKernels) -> Result<(Option<usize>, String)> {
        let unavailable = |why: &str| format!("AMX-INT8 unavailable: {why}");
        Ok(match (self, amx::status()) {
            (Self::Off, _) => (None, String::new()),
            (_, _) if kernels == CpuKernels::Lut => (None, String::new()),
            (Self::On, Ok(())) => (Some(2), ", AMX-INT8 for every batch".to_string()),
            (Self::On, Err(why)) => bail!("{AMX_ENV}=on: {}", unavailable(why)),
            (Self::Auto, Ok(())) if isa == Isa::Avx512 => (
                Some(AMX_MIN_TOKENS),
                format!(", AMX-INT8 for batches of {AMX_MIN_TOKENS}+ tokens"),
            ),
            (Self::Auto, Ok(())) => (None, String::new()),
            (Self::Auto, Err(why)) => (None, format!(", {}", unavailable(why))),
        })
    }
}

/// A BitLinear output from its exact product, its token's activation scale and its row's weight
/// scale (the reference's order of operations: divide, then multiply).
#[inline(always)]
fn dequantize(acc: i32, token_scale: f32, row_scale: f32) -> f32 {
    acc as f32 / token_scale * row_scale
}

/// A linear in its backend's kernel layout.
enum Packed {
    Mad(PackedTernary),
    Lut(PackedLut),
    Base3(PackedBase3),
}

struct CpuLinear {
    packed: Packed,
    in_features: usize,
    /// One per output feature.
    row_scales: Vec<f32>,
}

/// Per-op buffers kept between calls.
#[derive(Default)]
struct Scratch {
    quantized: QuantizedRows,
    lut_tables: LutTables,
    acc: Vec<i32>,
    head: Vec<f32>,
    /// `LmHead::Q8`: one row's quantized input, the error bounds of its approximate logits, and
    /// the candidates to re-score.
    q8_input: Q8Input,
    bounds: Vec<f32>,
    ranked: Vec<f32>,
    candidates: Vec<usize>,
    exact: Vec<f32>,
    /// RoPE cosines and sines of one position.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
}

thread_local! {
    /// Attention scratch (transposed queries and scores, see `attention::attend`) per pool thread,
    /// reused across calls (the threads live as long as the backend), so attention allocates
    /// nothing once it has grown to the context.
    static ATTENTION_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct KvStorage {
    spec: KvSpec,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl KvStorage {
    /// Offset of (layer, slot, position) in `keys`/`values`.
    fn offset(&self, layer: usize, slot: usize, position: usize) -> usize {
        let s = &self.spec;
        ((layer * s.slots + slot) * s.capacity + position) * s.kv_heads * s.head_dim
    }
}

pub struct CpuBackend {
    pool: ThreadPool,
    isa: Isa,
    kernels: CpuKernels,
    /// The smallest batch whose products run on AMX ([`AmxUse`]), and what the description says.
    amx_min_tokens: Option<usize>,
    amx_note: String,
    lm_head: LmHead,
    /// `LmHead::Q8`: the 8-bit copy of each table used as a head, built on its first use.
    q8_tables: Vec<Option<Q8Head>>,
    scratch: Scratch,
    linears: Vec<CpuLinear>,
    vectors: Vec<Vec<f32>>,
    tables: Vec<DenseMatrix>,
    /// `None` marks a freed handle.
    buffers: Vec<Option<Vec<f32>>>,
    kv: Option<KvStorage>,
}

impl CpuBackend {
    /// A backend running on `threads` threads (0: one per available core) at the default ISA
    /// level ([`Isa::selected`]: `TERN_CPU_ISA`, else the widest this CPU supports) and kernel
    /// family (`TERN_CPU_KERNELS`, else [`CpuKernels::default_for`]).
    pub fn new(threads: usize) -> Result<Self> {
        let isa = Isa::selected()?;
        let kernels = match CpuKernels::from_env()? {
            Some(kernels) => kernels,
            None => CpuKernels::default_for(isa, resolve_threads(threads)),
        };
        Self::with_kernels(threads, isa, kernels)
    }

    /// A backend whose multiply-add kernels run at `isa` (an error if this CPU does not support
    /// it).
    pub fn with_isa(threads: usize, isa: Isa) -> Result<Self> {
        Self::with_kernels(threads, isa, CpuKernels::Mad)
    }

    /// A backend whose kernels run at `isa`, products by the `kernels` families, batches on AMX
    /// as `TERN_CPU_AMX` says (an error if this CPU does not support the level, or the level has
    /// no lookup-table kernels and `Lut` asks for them).
    pub fn with_kernels(threads: usize, isa: Isa, kernels: CpuKernels) -> Result<Self> {
        Self::with_amx(threads, isa, kernels, AmxUse::from_env()?)
    }

    /// [`Self::with_kernels`] with batches on AMX as `amx` says.
    pub fn with_amx(threads: usize, isa: Isa, kernels: CpuKernels, amx: AmxUse) -> Result<Self> {
        isa.check()?;
        let (amx_min_tokens, amx_note) = amx.min_tokens(isa, kernels)?;
        ensure!(
            kernels != CpuKernels::Lut || lut::supports(isa),
            "{KERNELS_ENV}=lut: the lookup-table kernels need AVX-512 (or the scalar level), not \
             `{isa}`"
        );
        let threads = resolve_threads(threads);
        let pool = ThreadPool::new(threads).context("cannot start the CPU thread pool")?;
        Ok(Self {
            pool,
            isa,
            kernels,
            amx_min_tokens,
            amx_note,
            lm_head: LmHead::Full,
            q8_tables: Vec::new(),
            scratch: Scratch::default(),
            linears: Vec::new(),
            vectors: Vec::new(),
            tables: Vec::new(),
            buffers: Vec::new(),
            kv: None,
        })
    }

    /// Rows per parallel task for a product over `total` weight rows: [`TASKS_PER_THREAD`] runs
    /// per thread, a multiple of `multiple`, at least `min`.
    fn rows_per_task(&self, total: usize, min: usize, multiple: usize) -> usize {
        (total / (TASKS_PER_THREAD * self.pool.threads()))
            .next_multiple_of(multiple)
            .max(min)
    }

    fn buffer(&self, a: Activations) -> Result<&Vec<f32>> {
        self.buffers
            .get(a.0)
            .and_then(Option::as_ref)
            .ok_or_else(|| anyhow!("activation buffer {} does not exist", a.0))
    }

    /// Moves a buffer out so it can be written while others are read; [`Self::put`] returns it.
    fn take(&mut self, a: Activations, needed: usize, what: &str) -> Result<Vec<f32>> {
        let buf = self
            .buffers
            .get_mut(a.0)
            .and_then(Option::take)
            .ok_or_else(|| anyhow!("{what}: activation buffer {} does not exist", a.0))?;
        if buf.len() < needed {
            let len = buf.len();
            self.put(a, buf);
            bail!("{what}: needs {needed} values, buffer {} holds {len}", a.0);
        }
        Ok(buf)
    }

    fn put(&mut self, a: Activations, buf: Vec<f32>) {
        self.buffers[a.0] = Some(buf);
    }

    /// Input slice of `len` values from buffer `a`.
    fn input(&self, a: Activations, len: usize, what: &str) -> Result<&[f32]> {
        let buf = self.buffer(a)?;
        buf.get(..len).ok_or_else(|| {
            anyhow!(
                "{what}: needs {len} input values, buffer {} holds {}",
                a.0,
                buf.len()
            )
        })
    }

    /// Runs `op(input, output)` with `input` read from `x` and `output` taken from `out`.
    fn map_buffers(
        &mut self,
        x: Activations,
        in_len: usize,
        out: Activations,
        out_len: usize,
        what: &str,
        op: impl FnOnce(&Self, &[f32], &mut [f32]) -> Result<()>,
    ) -> Result<()> {
        if in_len == 0 || out_len == 0 {
            return Ok(()); // an empty batch: nothing to compute (and no zero-sized chunks)
        }
        let mut dst = self.take(out, out_len, what)?;
        let result = (|| {
            distinct_buffers(what, x, out)?;
            op(self, self.input(x, in_len, what)?, &mut dst[..out_len])
        })();
        self.put(out, dst);
        result
    }
}

impl CpuBackend {
    /// [`LmHead::Q8`]: approximate logits from the 8-bit copy, then the rows that could be among
    /// the top [`Q8_EXACT_TOP_K`] re-scored with the full-precision table (see `tern_cpu::table::q8`).
    fn logits_q8(
        &mut self,
        x: Activations,
        table: TableId,
        tokens: usize,
        out: Activations,
    ) -> Result<()> {
        let t = &self.tables[table.0];
        let (vocab, cols) = (t.rows, t.cols);
        if self.q8_tables.len() <= table.0 {
            self.q8_tables.resize_with(table.0 + 1, || None);
        }
        if self.q8_tables[table.0].is_none() {
            let started = std::time::Instant::now();
            self.q8_tables[table.0] = Some(Q8Head::quantize(self.isa, t.view(), vocab, cols)?);
            tracing::debug!(
                "8-bit output head built in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = self.map_buffers(
            x,
            tokens * cols,
            out,
            tokens * vocab,
            "logits",
            |me, src, dst| {
                let q8 = me.q8_tables[table.0].as_ref().expect("built above");
                let view = me.tables[table.0].view();
                let per_task = me.rows_per_task(vocab, MIN_VOCAB_PER_TASK, 1);
                scratch.bounds.resize(vocab, 0.0);
                for (xt, logits) in src.chunks_exact(cols).zip(dst.chunks_exact_mut(vocab)) {
                    scratch.q8_input.prepare(me.isa, xt)?;
                    let input = &scratch.q8_input;
                    me.pool.try_for_each(
                        logits
                            .chunks_mut(per_task)
                            .zip(scratch.bounds.chunks_mut(per_task))
                            .enumerate(),
                        |(chunk, (approx, bounds))| {
                            let start = chunk * per_task;
                            let range = start..start + approx.len();
                            q8.logits(me.isa, range, input, approx, bounds)
                        },
                    )?;
                    top_candidates(
                        logits,
                        &scratch.bounds,
                        Q8_EXACT_TOP_K,
                        &mut scratch.ranked,
                        &mut scratch.candidates,
                    );
                    let exact = &mut scratch.exact;
                    exact.resize(scratch.candidates.len(), 0.0);
                    me.pool.try_for_each(
                        scratch
                            .candidates
                            .chunks(CANDIDATES_PER_TASK)
                            .zip(exact.chunks_mut(CANDIDATES_PER_TASK)),
                        |(candidates, exact)| view.dot_listed_rows(me.isa, candidates, xt, exact),
                    )?;
                    for (&v, &e) in scratch.candidates.iter().zip(exact.iter()) {
                        logits[v] = e;
                    }
                }
                Ok(())
            },
        );
        self.scratch = scratch;
        result
    }
}

impl Backend for CpuBackend {
    fn describe(&self) -> String {
        let head = match self.lm_head {
            LmHead::Full => "",
            LmHead::Q8 => ", 8-bit head with exact top-k",
        };
        let kernels = match self.kernels {
            CpuKernels::Mad => "multiply-add",
            CpuKernels::Lut => "lookup-table",
            CpuKernels::Base3 => "base-3 multiply-add",
        };
        format!(
            "cpu ({} {kernels} kernels{head}{}, {} threads)",
            self.isa,
            self.amx_note,
            self.pool.threads()
        )
    }

    fn linear_weight_bytes(&self) -> Option<usize> {
        let bytes = |l: &CpuLinear| match &l.packed {
            Packed::Mad(w) => w.bytes(),
            Packed::Lut(w) => w.bytes(),
            Packed::Base3(w) => w.bytes(),
        };
        Some(self.linears.iter().map(bytes).sum())
    }

    fn set_lm_head(&mut self, head: LmHead) -> Result<()> {
        self.lm_head = head;
        Ok(())
    }

    fn upload_linear(&mut self, parts: &[&TernaryMatrix]) -> Result<LinearId> {
        let cols = fused_in_features(parts)?;
        let mut codes = Vec::new();
        let mut row_scales = Vec::new();
        for part in parts {
            codes.extend_from_slice(&part.codes);
            row_scales.extend(std::iter::repeat_n(part.scale, part.rows));
        }
        let canonical = TernaryView::new(&codes, row_scales.len(), cols)?;
        let packed = match self.kernels {
            CpuKernels::Lut => Packed::Lut(PackedLut::from_canonical(canonical)),
            // Wider linears than base 3 takes (none in BitNet b1.58 2B-4T) stay 2-bit.
            CpuKernels::Base3 if cols <= base3::MAX_COLS => {
                Packed::Base3(PackedBase3::from_canonical(canonical)?)
            }
            CpuKernels::Mad | CpuKernels::Base3 => {
                Packed::Mad(PackedTernary::from_canonical(canonical))
            }
        };
        self.linears.push(CpuLinear {
            packed,
            in_features: cols,
            row_scales,
        });
        Ok(LinearId(self.linears.len() - 1))
    }

    fn upload_vector(&mut self, values: &[f32]) -> Result<VectorId> {
        self.vectors.push(values.to_vec());
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
        self.tables.push(table.clone());
        Ok(TableId(self.tables.len() - 1))
    }

    fn alloc(&mut self, len: usize) -> Result<Activations> {
        let mut buf = Vec::new();
        buf.try_reserve_exact(len)
            .map_err(|_| anyhow!("out of host memory allocating {len} activations"))?;
        buf.resize(len, 0.0);
        Ok(Activations(insert_in_free_slot(&mut self.buffers, buf)))
    }

    fn free(&mut self, buffer: Activations) {
        if let Some(slot) = self.buffers.get_mut(buffer.0) {
            *slot = None;
        }
    }

    fn write(&mut self, dst: Activations, data: &[f32]) -> Result<()> {
        let mut buf = self.take(dst, data.len(), "write")?;
        buf[..data.len()].copy_from_slice(data);
        self.put(dst, buf);
        Ok(())
    }

    fn read(&mut self, src: Activations, out: &mut [f32]) -> Result<()> {
        out.copy_from_slice(self.input(src, out.len(), "read")?);
        Ok(())
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
        let mut to = self.take(dst, dst_offset + len, "copy destination")?;
        let result = self
            .input(src, src_offset + len, "copy source")
            .map(|from| to[dst_offset..dst_offset + len].copy_from_slice(&from[src_offset..]));
        self.put(dst, to);
        result
    }

    fn alloc_kv(&mut self, spec: &KvSpec) -> Result<()> {
        spec.check_geometry(usize::MAX)?;
        self.kv = None; // release the old cache before allocating the new one
        let len = spec.bytes(1) / 2;
        let zeroed = |what: &str| -> Result<Vec<f32>> {
            let mut v = Vec::new();
            v.try_reserve_exact(len).map_err(|_| {
                anyhow!(
                    "out of host memory allocating the KV cache's {what} ({} MiB; lower --ctx)",
                    (len * 4) >> 20
                )
            })?;
            v.resize(len, 0.0);
            Ok(v)
        };
        self.kv = Some(KvStorage {
            spec: *spec,
            keys: zeroed("keys")?,
            values: zeroed("values")?,
        });
        Ok(())
    }

    fn embed(&mut self, table: TableId, tokens: &[u32], out: Activations) -> Result<()> {
        let t = uploaded(&self.tables, table.0, "table")?;
        let (vocab, cols) = (t.rows, t.cols);
        let mut dst = self.take(out, tokens.len() * cols, "embed")?;
        let view = self.tables[table.0].view();
        let result = tokens
            .iter()
            .zip(dst.chunks_exact_mut(cols))
            .try_for_each(|(&id, row)| {
                ensure!(
                    (id as usize) < vocab,
                    "token id {id} is outside the vocabulary of {vocab} tokens"
                );
                view.row_to_f32(id as usize, cols, row).map_err(Into::into)
            });
        self.put(out, dst);
        result
    }

    fn rms_norm(
        &mut self,
        x: Activations,
        weight: VectorId,
        eps: f32,
        tokens: usize,
        out: Activations,
    ) -> Result<()> {
        let width = uploaded(&self.vectors, weight.0, "vector")?.len();
        let n = tokens * width;
        self.map_buffers(x, n, out, n, "rms_norm", |me, src, dst| {
            let w = &me.vectors[weight.0];
            me.pool
                .try_for_each(src.chunks(width).zip(dst.chunks_mut(width)), |(s, d)| {
                    norm::rms_norm(s, w, eps, d)
                })?;
            Ok(())
        })
    }

    fn bitlinear(
        &mut self,
        x: Activations,
        linear: LinearId,
        tokens: usize,
        out: Activations,
    ) -> Result<()> {
        let lin = uploaded(&self.linears, linear.0, "linear")?;
        let (n_out, cols) = (lin.row_scales.len(), lin.in_features);
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = self.map_buffers(
            x,
            tokens * cols,
            out,
            tokens * n_out,
            "bitlinear",
            |me, src, dst| {
                let lin = &me.linears[linear.0];
                let Scratch {
                    quantized,
                    lut_tables,
                    acc,
                    ..
                } = &mut scratch;
                quantized.quantize(me.isa, src, tokens, cols)?;
                if let Packed::Lut(_) = lin.packed {
                    lut_tables.build(me.isa, quantized)?;
                }
                // acc[n * tokens + t]: each task owns a contiguous block of weight tokens.
                acc.resize(n_out * tokens, 0);
                let (lut_tables, quantized) = (&*lut_tables, &*quantized);
                let row_multiple = match lin.packed {
                    Packed::Mad(_) | Packed::Base3(_) => ROW_GROUP,
                    Packed::Lut(_) => lut::TILE_ROWS,
                };
                let per_task = me.rows_per_task(n_out, MIN_ROWS_PER_TASK, row_multiple);
                let on_amx = me.amx_min_tokens.is_some_and(|min| tokens >= min);
                let gemm = |chunk: usize, acc: &mut [i32]| {
                    let start = chunk * per_task;
                    let range = start..start + acc.len() / tokens;
                    match &lin.packed {
                        Packed::Mad(w) if on_amx => amx::gemm(w, range, quantized, acc),
                        Packed::Base3(w) if on_amx => amx::gemm_base3(w, range, quantized, acc),
                        Packed::Mad(w) => mad::gemm(me.isa, w, range, quantized, acc),
                        Packed::Lut(w) => lut::gemm(me.isa, w, range, lut_tables, acc),
                        Packed::Base3(w) => base3::gemm(me.isa, w, range, quantized, acc),
                    }
                    .map(|()| start)
                };
                if tokens == 1 {
                    // Decode: the outputs are the weight tokens in order, so each task scales its
                    // own (no second pass over `acc`).
                    let scale = quantized.scales()[0];
                    return me.pool.try_for_each(
                        acc.chunks_mut(per_task)
                            .zip(dst.chunks_mut(per_task))
                            .enumerate(),
                        |(chunk, (acc, out))| {
                            let start = gemm(chunk, acc)?;
                            let row_scales = &lin.row_scales[start..start + acc.len()];
                            for ((o, &a), &row_scale) in out.iter_mut().zip(&*acc).zip(row_scales) {
                                *o = dequantize(a, scale, row_scale);
                            }
                            Ok(())
                        },
                    );
                }
                me.pool.try_for_each(
                    acc.chunks_mut(per_task * tokens).enumerate(),
                    |(chunk, acc)| gemm(chunk, acc).map(drop),
                )?;
                // Transposed and scaled in tasks of TOKENS_PER_TASK tokens, so each task reads
                // whole cache lines of `acc` (a weight row's consecutive tokens), through a block
                // of TRANSPOSE_ROWS tokens in L1 so that the writes are contiguous runs too.
                let (scales, acc) = (quantized.scales(), &*acc);
                me.pool.try_for_each(
                    dst.chunks_mut(TOKENS_PER_TASK * n_out).enumerate(),
                    |(chunk, part)| {
                        let t0 = chunk * TOKENS_PER_TASK;
                        let scales = &scales[t0..t0 + part.len() / n_out];
                        me.isa.vectorized(
                            #[inline(always)]
                            || {
                                let mut block = [[0i32; TOKENS_PER_TASK]; TRANSPOSE_ROWS];
                                for n0 in (0..n_out).step_by(TRANSPOSE_ROWS) {
                                    let n1 = (n0 + TRANSPOSE_ROWS).min(n_out);
                                    for (n, b) in (n0..n1).zip(&mut block) {
                                        let from = &acc[n * tokens + t0..];
                                        b[..scales.len()].copy_from_slice(&from[..scales.len()]);
                                    }
                                    let row_scales = &lin.row_scales[n0..n1];
                                    let tokens = part.chunks_exact_mut(n_out).zip(scales);
                                    for (i, (out, &scale)) in tokens.enumerate() {
                                        for ((o, b), &r) in
                                            out[n0..n1].iter_mut().zip(&block).zip(row_scales)
                                        {
                                            *o = dequantize(b[i], scale, r);
                                        }
                                    }
                                }
                            },
                        )
                    },
                )?;
                Ok(())
            },
        );
        self.scratch = scratch;
        result
    }

    fn attention(
        &mut self,
        layer: usize,
        qkv: Activations,
        tokens: &[TokenPosition],
        out: Activations,
    ) -> Result<()> {
        let spec = allocated_kv(self.kv.as_ref())?.spec;
        spec.check_tokens(layer, tokens)?;
        let (hd, kv_dim, q_dim) = (
            spec.head_dim,
            spec.kv_heads * spec.head_dim,
            spec.heads * spec.head_dim,
        );
        let width = spec.qkv_width();
        let mut src = self.take(qkv, tokens.len() * width, "attention qkv")?;
        let mut dst = match self.take(out, tokens.len() * q_dim, "attention output") {
            Ok(d) => d,
            Err(e) => {
                self.put(qkv, src);
                return Err(e);
            }
        };
        let kv = self.kv.as_mut().expect("checked above");
        // RoPE on q and k of every row, then append k and v at the row's position.
        let (cos, sin) = (&mut self.scratch.rope_cos, &mut self.scratch.rope_sin);
        cos.resize(hd / 2, 0.0);
        sin.resize(hd / 2, 0.0);
        for (row, r) in src.chunks_exact_mut(width).zip(tokens) {
            rope::rope_cos_sin(spec.rope_theta, hd, r.position, cos, sin)?;
            for head in row[..q_dim + kv_dim].chunks_exact_mut(hd) {
                rope::apply_rope(head, cos, sin)?;
            }
            let at = kv.offset(layer, r.slot, r.position);
            kv.keys[at..at + kv_dim].copy_from_slice(&row[q_dim..q_dim + kv_dim]);
            kv.values[at..at + kv_dim].copy_from_slice(&row[q_dim + kv_dim..width]);
        }
        let group = spec.heads / spec.kv_heads;
        let (isa, kv, qkv_rows) = (self.isa, &*kv, &src);
        // Queries of tokens `t0..t0 + n` (at consecutive positions of one slot) over kv head `g`,
        // written to `out` laid out like the output tokens from `t0`, starting at head `g · group`.
        let attend_rows = |t0: usize, n: usize, g: usize, out: &mut [f32], out_stride: usize| {
            let r = tokens[t0];
            let geometry = attention::HeadGroup {
                head_dim: hd,
                group,
                rows: n,
                first_keys: r.position + 1,
                query_stride: width,
                out_stride,
                kv_stride: kv_dim,
            };
            let base = kv.offset(layer, r.slot, 0) + g * hd;
            let end = kv.offset(layer, r.slot, r.position + n - 1) + kv_dim;
            let queries = &qkv_rows[t0 * width + g * group * hd..];
            ATTENTION_SCRATCH.with_borrow_mut(|scratch| {
                let (keys, values) = (&kv.keys[base..end], &kv.values[base..end]);
                attention::attend(isa, &geometry, queries, keys, values, scratch, out)
            })
        };
        let one_run = tokens
            .windows(2)
            .all(|w| w[1].slot == w[0].slot && w[1].position == w[0].position + 1);
        let result = if one_run && tokens.len() >= ATTENTION_ROWS_PER_TASK * self.pool.threads() {
            // A prefill: blocks of tokens, each key and value read once per block.
            self.pool.try_for_each(
                dst[..tokens.len() * q_dim]
                    .chunks_mut(ATTENTION_ROWS_PER_TASK * q_dim)
                    .enumerate(),
                |(block, out)| {
                    let (t0, n) = (block * ATTENTION_ROWS_PER_TASK, out.len() / q_dim);
                    (0..spec.kv_heads)
                        .try_for_each(|g| attend_rows(t0, n, g, &mut out[g * group * hd..], q_dim))
                },
            )
        } else {
            // Decode: one task per (row, kv head), so even one row spreads over the threads.
            self.pool.try_for_each(
                dst[..tokens.len() * q_dim]
                    .chunks_mut(group * hd)
                    .enumerate(),
                |(i, out)| {
                    let (t, g) = (i / spec.kv_heads, i % spec.kv_heads);
                    attend_rows(t, 1, g, out, group * hd)
                },
            )
        };
        self.put(qkv, src);
        self.put(out, dst);
        result.map_err(Into::into)
    }

    fn gated(
        &mut self,
        gate_up: Activations,
        activation: GateActivation,
        tokens: usize,
        width: usize,
        out: Activations,
    ) -> Result<()> {
        self.map_buffers(
            gate_up,
            tokens * 2 * width,
            out,
            tokens * width,
            "gated",
            |me, src, dst| {
                me.pool.try_for_each(
                    src.chunks(2 * width).zip(dst.chunks_mut(width)),
                    |(s, d)| {
                        let (gate, up) = s.split_at(width);
                        elementwise::gated(activation, gate, up, d)
                    },
                )?;
                Ok(())
            },
        )
    }

    fn add(&mut self, acc: Activations, x: Activations, len: usize) -> Result<()> {
        self.map_buffers(x, len, acc, len, "add", |_, src, dst| {
            Ok(elementwise::add(dst, src)?)
        })
    }

    fn logits(
        &mut self,
        x: Activations,
        table: TableId,
        tokens: usize,
        out: Activations,
    ) -> Result<()> {
        let t = uploaded(&self.tables, table.0, "table")?;
        let (vocab, cols) = (t.rows, t.cols);
        if self.lm_head == LmHead::Q8 {
            return self.logits_q8(x, table, tokens, out);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = self.map_buffers(
            x,
            tokens * cols,
            out,
            tokens * vocab,
            "logits",
            |me, src, dst| {
                let view = me.tables[table.0].view();
                let per_task = me.rows_per_task(vocab, MIN_VOCAB_PER_TASK, 1);
                // by_vocab[v * tokens + t]: vocabulary chunks write disjoint slices. With one row
                // that is already the output's layout.
                let by_vocab = if tokens == 1 {
                    &mut dst[..]
                } else {
                    scratch.head.resize(vocab * tokens, 0.0);
                    &mut scratch.head[..]
                };
                me.pool.try_for_each(
                    by_vocab.chunks_mut(per_task * tokens).enumerate(),
                    |(chunk, part)| {
                        let start = chunk * per_task;
                        let range = start..start + part.len() / tokens;
                        view.dot_rows(me.isa, range, src, cols, part)
                    },
                )?;
                if tokens > 1 {
                    for (t, row) in dst.chunks_exact_mut(vocab).enumerate() {
                        for (v, o) in row.iter_mut().enumerate() {
                            *o = scratch.head[v * tokens + t];
                        }
                    }
                }
                Ok(())
            },
        );
        self.scratch = scratch;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_linear_wider_than_base_3_takes_stays_two_bit_and_agrees() {
        let (rows, cols) = (4, base3::MAX_COLS + 1);
        let values: Vec<i8> = (0..rows * cols).map(|i| (i % 3) as i8 - 1).collect();
        let codes = tern_cpu::bitlinear::reference::pack(&values, rows, cols).unwrap();
        let m = TernaryMatrix::new("wide", rows, cols, codes, 0.5).unwrap();
        let x: Vec<f32> = (0..cols).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let run = |kernels| {
            let mut b = CpuBackend::with_kernels(1, Isa::Scalar, kernels).unwrap();
            let id = b.upload_linear(&[&m]).unwrap();
            let (input, out) = (b.alloc(cols).unwrap(), b.alloc(rows).unwrap());
            b.write(input, &x).unwrap();
            b.bitlinear(input, id, 1, out).unwrap();
            let mut y = vec![0f32; rows];
            b.read(out, &mut y).unwrap();
            (y, b.linear_weight_bytes())
        };
        assert_eq!(run(CpuKernels::Base3), run(CpuKernels::Mad));
    }
}
