//! The CPU backend: `tern_cpu` kernels spread over one persistent thread pool.
//!
//! Kernels run at one [`Isa`] level, chosen at construction ([`Isa::selected`]: the widest this CPU
//! has, or `TERN_CPU_ISA`), and linears in one kernel [`Family`] ([`Family::selected`]: the measured
//! default, or `TERN_CPU_KERNELS`). A linear is repacked at upload (the fused parts' rows one after
//! another, one scale per output row, so fused parts keep their own scales) into a
//! [`tern_cpu::bitlinear::Linear`], which runs the whole op on the pool. Activations are
//! `Vec<f32>`. The KV pool is one array per K and V, f32 or f16 ([`KvSpec::kv_type`]), in the
//! trait's paged layout `[page][layer][position in page][kv_head · head_dim]`; attention reads a
//! sequence's pages through the page table (`tern_cpu::attention::Cache`).
//!
//! Parallelism: linears split their weight rows (see `tern_cpu::bitlinear::linear`); attention
//! splits over (row, head); the output head over vocabulary chunks. Threads live as long as the
//! backend, and the linears' scratch, attention scratch and head outputs are owned by the backend,
//! so a decode step allocates nothing once they have grown.

use super::{
    Activations, Backend, KvSpec, KvType, LinearId, LmHead, PageTable, Q8_EXACT_TOP_K, TableId,
    TokenPosition, VectorId, allocated_kv, distinct_buffers, fused_in_features,
    insert_in_free_slot, resolve_threads, uploaded,
};
use crate::ternary::{DenseMatrix, TernaryMatrix};
use anyhow::{Context, Result, anyhow, bail, ensure};
use half::f16;
use tern_cpu::attention;
use tern_cpu::attention::{Cache, KvValue, rope};
use tern_cpu::bitlinear::amx::AmxUse;
use tern_cpu::bitlinear::reference::TernaryView;
use tern_cpu::bitlinear::{Family, Linear, LinearScratch};
use tern_cpu::elementwise::{self, GateActivation};
use tern_cpu::isa::Isa;
use tern_cpu::norm;
use tern_cpu::pool::ThreadPool;
use tern_cpu::table::q8::{self, Q8Head, Q8Input, top_candidates};

/// Prompt rows per attention task, at most: every cached key and value is read once for this many
/// rows (times the heads sharing it).
const ATTENTION_ROWS_PER_TASK: usize = 16;

/// Output-head rows per parallel task, at least.
const MIN_VOCAB_PER_TASK: usize = 256;

/// Rows of the 8-bit head each token of a batch is dotted with in turn: 640 KiB of codes at 2560
/// columns, read from memory once and from L2 for every other token.
const Q8_ROWS_PER_BLOCK: usize = 256;

/// Re-scored output-head candidates per parallel task (one full-precision row each).
const CANDIDATES_PER_TASK: usize = 64;

/// Per-op buffers kept between calls.
#[derive(Default)]
struct Scratch {
    linear: LinearScratch,
    head: Vec<f32>,
    /// `LmHead::Q8`: each row's quantized input, the error bounds of its approximate logits, and
    /// each row's candidates to re-score and their exact logits.
    q8_inputs: Vec<Q8Input>,
    bounds: Vec<f32>,
    candidates: Vec<Vec<usize>>,
    exact: Vec<Vec<f32>>,
    /// RoPE cosines and sines of one position.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
}

thread_local! {
    /// Attention scratch (transposed queries and scores, see `attention::attend`) per pool thread,
    /// reused across calls (the threads live as long as the backend), so attention allocates
    /// nothing once it has grown to the context.
    static ATTENTION_SCRATCH: std::cell::RefCell<attention::Scratch> = std::cell::RefCell::new(attention::Scratch::default());
    /// Rows of a table served from a file, read for one task (see `ternary::MappedValues::read_rows`).
    static READ_ROWS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// `top_candidates`' scratch, per pool thread.
    static RANKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct KvStorage {
    spec: KvSpec,
    pool: KvPool,
}

/// The K and V arrays in the spec's type.
enum KvPool {
    F32(Pool<f32>),
    F16(Pool<f16>),
}

struct Pool<E> {
    keys: Vec<E>,
    values: Vec<E>,
}

impl<E: KvValue + Default> Pool<E> {
    /// A zeroed pool of `len` values per K and V.
    fn new(len: usize) -> Result<Self> {
        let mut pool = Self {
            keys: Vec::new(),
            values: Vec::new(),
        };
        pool.grow(len)?;
        Ok(pool)
    }

    /// Grows K and V to `len` values each, keeping what they hold.
    fn grow(&mut self, len: usize) -> Result<()> {
        for (what, v) in [("keys", &mut self.keys), ("values", &mut self.values)] {
            let more = len.saturating_sub(v.len());
            v.try_reserve_exact(more).map_err(|_| {
                anyhow!(
                    "out of host memory allocating the KV cache's {what} ({} MiB; lower \
                     --ctx or --kv-memory)",
                    (len * std::mem::size_of::<E>()) >> 20
                )
            })?;
            v.resize(len, E::default());
        }
        Ok(())
    }
}

/// One `attention` call's arguments, checked, run over a pool of either value type.
struct AttentionStep<'a> {
    pool: &'a ThreadPool,
    isa: Isa,
    spec: &'a KvSpec,
    layer: usize,
    tokens: &'a [TokenPosition],
    pages: &'a PageTable,
}

impl AttentionStep<'_> {
    /// RoPE on q and k of every row of `src`, k and v appended to `kv`, attention into `dst`.
    fn run<E: KvValue>(
        &self,
        kv: &mut Pool<E>,
        src: &mut [f32],
        dst: &mut [f32],
        cos: &mut Vec<f32>,
        sin: &mut Vec<f32>,
    ) -> Result<()> {
        let (spec, tokens, layer) = (self.spec, self.tokens, self.layer);
        let (hd, kv_dim, q_dim) = (
            spec.head_dim,
            spec.kv_heads * spec.head_dim,
            spec.heads * spec.head_dim,
        );
        let width = spec.qkv_width();
        let (ps, per_slot) = (spec.page_size, spec.pages_per_slot());
        let table_of = |slot: usize| &self.pages[slot * per_slot..][..per_slot];
        cos.resize(hd / 2, 0.0);
        sin.resize(hd / 2, 0.0);
        for (row, r) in src.chunks_exact_mut(width).zip(tokens) {
            rope::rope_cos_sin(spec.rope_theta, hd, r.position, cos, sin)?;
            for head in row[..q_dim + kv_dim].chunks_exact_mut(hd) {
                rope::apply_rope(head, cos, sin)?;
            }
            let page = table_of(r.slot)[r.position / ps] as usize;
            let at = spec.offset(page, layer, r.position % ps);
            E::store(&row[q_dim..q_dim + kv_dim], &mut kv.keys[at..at + kv_dim]);
            E::store(&row[q_dim + kv_dim..width], &mut kv.values[at..at + kv_dim]);
        }
        let group = spec.heads / spec.kv_heads;
        let (isa, kv, qkv_rows) = (self.isa, &*kv, &*src);
        // Page `p` of the pool starts `page_stride` after page `p - 1`; this layer's rows sit at
        // `layer_at` in every page.
        let page_stride = spec.offset(1, 0, 0);
        let layer_at = spec.offset(0, layer, 0);
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
            let cache = Cache {
                keys: &kv.keys[layer_at + g * hd..],
                values: &kv.values[layer_at + g * hd..],
                pages: table_of(r.slot),
                page_size: ps,
                page_stride,
            };
            let queries = &qkv_rows[t0 * width + g * group * hd..];
            ATTENTION_SCRATCH.with_borrow_mut(|scratch| {
                attention::attend(isa, &geometry, queries, &cache, scratch, out)
            })
        };
        let pieces = run_pieces(tokens, ATTENTION_ROWS_PER_TASK);
        let result = if pieces.len() >= 2 * self.pool.threads() {
            // Prompts (and the decode rows beside them): a task per piece, each cached key and
            // value read once for all of its rows.
            let mut rest = &mut dst[..tokens.len() * q_dim];
            let mut tasks = Vec::with_capacity(pieces.len());
            for (t0, n) in pieces {
                let (out, tail) = rest.split_at_mut(n * q_dim);
                tasks.push((t0, n, out));
                rest = tail;
            }
            self.pool.try_for_each(tasks.into_iter(), |(t0, n, out)| {
                (0..spec.kv_heads)
                    .try_for_each(|g| attend_rows(t0, n, g, &mut out[g * group * hd..], q_dim))
            })
        } else {
            // A few rows: one task per (row, kv head), so even one row spreads over the threads.
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
        result.map_err(Into::into)
    }
}

/// `tokens` as (first token, rows) pieces: each run of consecutive positions of one slot (a prompt,
/// or one sequence's decode row) cut into near-equal pieces of at most `max` rows, in order.
fn run_pieces(tokens: &[TokenPosition], max: usize) -> Vec<(usize, usize)> {
    let mut pieces = Vec::new();
    let mut start = 0;
    for end in 1..=tokens.len() {
        let continues = end < tokens.len()
            && tokens[end].slot == tokens[end - 1].slot
            && tokens[end].position == tokens[end - 1].position + 1;
        if !continues {
            let (len, count) = (end - start, (end - start).div_ceil(max));
            pieces.extend((0..count).map(|p| {
                let (a, b) = (len * p / count, len * (p + 1) / count);
                (start + a, b - a)
            }));
            start = end;
        }
    }
    pieces
}

pub struct CpuBackend {
    pool: ThreadPool,
    isa: Isa,
    family: Family,
    /// The smallest batch whose products run on AMX ([`AmxUse`]), and what the description says.
    amx_from: Option<usize>,
    amx_note: String,
    /// Whether the 8-bit head's batches run on AMX (those of `amx_from` rows or more, as the
    /// linears'): where the linears' may, and the head's own start-up known-answer check passed.
    head_amx: bool,
    lm_head: LmHead,
    /// `LmHead::Q8`: the 8-bit copy of each table used as a head, built on its first use.
    q8_tables: Vec<Option<Q8Head>>,
    scratch: Scratch,
    linears: Vec<Linear>,
    vectors: Vec<Vec<f32>>,
    tables: Vec<DenseMatrix>,
    /// `None` marks a freed handle.
    buffers: Vec<Option<Vec<f32>>>,
    kv: Option<KvStorage>,
}

impl CpuBackend {
    /// A backend running on `threads` threads (0: one per available core) at the default ISA
    /// level ([`Isa::selected`]: `TERN_CPU_ISA`, else the widest this CPU supports) and kernel
    /// family ([`Family::selected`]: `TERN_CPU_KERNELS`, else [`Family::default_for`]).
    pub fn new(threads: usize) -> Result<Self> {
        let isa = Isa::selected()?;
        let family = Family::selected(isa)?;
        Self::with_family(threads, isa, family)
    }

    /// A backend whose multiply-add kernels run at `isa` (an error if this CPU does not support
    /// it).
    pub fn with_isa(threads: usize, isa: Isa) -> Result<Self> {
        Self::with_family(threads, isa, Family::Mad)
    }

    /// A backend whose kernels run at `isa`, linears in the `family` layout, batches on AMX as
    /// `TERN_CPU_AMX` says (an error if this CPU does not support the level, or the family does
    /// not run at it).
    pub fn with_family(threads: usize, isa: Isa, family: Family) -> Result<Self> {
        Self::with_amx(threads, isa, family, AmxUse::from_env()?)
    }

    /// [`Self::with_family`] with batches on AMX as `amx` says.
    pub fn with_amx(threads: usize, isa: Isa, family: Family, amx: AmxUse) -> Result<Self> {
        family.check(isa)?;
        let (amx_from, amx_note) = amx.min_tokens(isa, family)?;
        let head_amx = amx_from.is_some()
            && match q8::amx_status() {
                Ok(()) => true,
                Err(why) => {
                    tracing::warn!("the 8-bit head's batches run without AMX: {why}");
                    false
                }
            };
        let threads = resolve_threads(threads);
        let pool = ThreadPool::new(threads).context("cannot start the CPU thread pool")?;
        Ok(Self {
            pool,
            isa,
            family,
            amx_from,
            amx_note,
            head_amx,
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
    /// the `top` largest re-scored with the full-precision table (see `tern_cpu::table::q8`).
    fn logits_q8(
        &mut self,
        x: Activations,
        table: TableId,
        tokens: usize,
        top: usize,
        out: Activations,
    ) -> Result<()> {
        let t = &self.tables[table.0];
        let (vocab, cols) = (t.rows, t.cols);
        if self.q8_tables.len() <= table.0 {
            self.q8_tables.resize_with(table.0 + 1, || None);
        }
        if self.q8_tables[table.0].is_none() {
            let started = std::time::Instant::now();
            // Quantizing reads every row once; afterwards only a few rows a token are read (the
            // candidates re-scored, the embedding's gathered rows), so a table served from the
            // file gives its pages back as they are read, rather than all staying resident.
            let release = |rows| t.release_mapped(rows);
            let q8 = Q8Head::quantize_with(self.isa, t.view(), vocab, cols, release)?;
            self.q8_tables[table.0] = Some(q8);
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
                scratch.q8_inputs.resize_with(tokens, Q8Input::default);
                for (input, xt) in scratch.q8_inputs.iter_mut().zip(src.chunks_exact(cols)) {
                    input.prepare(me.isa, xt)?;
                }
                scratch.bounds.resize(tokens * vocab, 0.0);
                // Approximate logits of every row: each task takes a range of the vocabulary and
                // walks it a block at a time, every token's logits from the block while it is in
                // L2 (tasks[i][t]: task i's slices of token t's logits and bounds).
                let per_task = me.pool.chunk_len(vocab, MIN_VOCAB_PER_TASK, 1);
                let mut tasks: Vec<Vec<(&mut [f32], &mut [f32])>> =
                    (0..vocab.div_ceil(per_task)).map(|_| Vec::new()).collect();
                for (approx, bounds) in dst
                    .chunks_exact_mut(vocab)
                    .zip(scratch.bounds.chunks_exact_mut(vocab))
                {
                    let parts = approx.chunks_mut(per_task).zip(bounds.chunks_mut(per_task));
                    tasks.iter_mut().zip(parts).for_each(|(t, p)| t.push(p));
                }
                let inputs = &scratch.q8_inputs;
                let amx = me.head_amx && me.amx_from.is_some_and(|min| tokens >= min);
                me.pool
                    .try_for_each(tasks.into_iter().enumerate(), |(task, mut parts)| {
                        let start = task * per_task;
                        let len = parts.first().map_or(0, |(a, _)| a.len());
                        for at in (0..len).step_by(Q8_ROWS_PER_BLOCK) {
                            let block = at..(at + Q8_ROWS_PER_BLOCK).min(len);
                            let rows = start + block.start..start + block.end;
                            let mut block_parts: Vec<_> = parts
                                .iter_mut()
                                .map(|(a, b)| (&mut a[block.clone()], &mut b[block.clone()]))
                                .collect();
                            q8.logits_tokens(me.isa, amx, rows, inputs, &mut block_parts)?;
                        }
                        Ok::<_, tern_cpu::Error>(())
                    })?;
                // Each row's candidates for its top k (the rows' searches spread over the pool),
                // then every row's candidates re-scored with the full-precision table in one pass.
                scratch.candidates.resize_with(tokens, Vec::new);
                me.pool.for_each(
                    dst.chunks_exact(vocab)
                        .zip(scratch.bounds.chunks_exact(vocab))
                        .zip(scratch.candidates.iter_mut()),
                    |((logits, bounds), candidates)| {
                        RANKED.with_borrow_mut(|ranked| {
                            top_candidates(logits, bounds, top, ranked, candidates)
                        })
                    },
                );
                scratch.exact.resize_with(tokens, Vec::new);
                for (exact, candidates) in scratch.exact.iter_mut().zip(&scratch.candidates) {
                    exact.resize(candidates.len(), 0.0);
                }
                let mapped = me.tables[table.0].mapped();
                let tasks = src
                    .chunks_exact(cols)
                    .zip(scratch.candidates.iter().zip(scratch.exact.iter_mut()))
                    .flat_map(|(xt, (candidates, exact))| {
                        candidates
                            .chunks(CANDIDATES_PER_TASK)
                            .zip(exact.chunks_mut(CANDIDATES_PER_TASK))
                            .map(move |task| (xt, task))
                    });
                me.pool
                    .try_for_each(tasks, |(xt, (candidates, exact))| -> Result<()> {
                        let Some(mapped) = mapped else {
                            return Ok(view.dot_listed_rows(me.isa, candidates, xt, exact)?);
                        };
                        // Read, not mapped: mapping a row makes the folio around it resident.
                        READ_ROWS.with_borrow_mut(|buf| {
                            let rows = mapped.read_rows(candidates, cols, buf)?;
                            let n = candidates.len();
                            Ok(rows.dot_rows(me.isa, 0..n, xt, cols, exact)?)
                        })
                    })?;
                for ((logits, candidates), exact) in dst
                    .chunks_exact_mut(vocab)
                    .zip(&scratch.candidates)
                    .zip(&scratch.exact)
                {
                    for (&v, &e) in candidates.iter().zip(exact) {
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

/// A linear of fused `parts` in the `family` layout (the parts' rows one after another, each with
/// its part's scale).
fn repack(family: Family, parts: &[&TernaryMatrix]) -> Result<Linear> {
    let cols = fused_in_features(parts)?;
    let row_scales: Vec<f32> = parts
        .iter()
        .flat_map(|part| std::iter::repeat_n(part.scale, part.rows))
        .collect();
    // A single part is read in place; fused ones are concatenated (rows one after another).
    let fused: Vec<u8>;
    let codes = match parts {
        [one] => &one.codes[..],
        _ => {
            fused = parts
                .iter()
                .map(|p| &p.codes[..])
                .collect::<Vec<_>>()
                .concat();
            &fused[..]
        }
    };
    let canonical = TernaryView::new(codes, row_scales.len(), cols)?;
    Ok(Linear::new(family, canonical, row_scales)?)
}

impl Backend for CpuBackend {
    fn describe(&self) -> String {
        let head = match self.lm_head {
            LmHead::Full => "",
            LmHead::Q8 { .. } if self.head_amx => {
                ", 8-bit head with exact top-k, on AMX-INT8 in batches"
            }
            LmHead::Q8 { .. } => ", 8-bit head with exact top-k",
        };
        format!(
            "cpu ({} {} kernels{head}{}, {} threads)",
            self.isa,
            self.family.describe(),
            self.amx_note,
            self.pool.threads()
        )
    }

    fn linear_weight_bytes(&self) -> Option<usize> {
        Some(self.linears.iter().map(Linear::bytes).sum())
    }

    fn host_bits_per_weight(&self) -> f64 {
        self.family.bits_per_weight()
    }

    fn set_lm_head(&mut self, head: LmHead) -> Result<()> {
        if let LmHead::Q8 { top } = head {
            anyhow::ensure!(
                (1..=Q8_EXACT_TOP_K).contains(&top),
                "8-bit output head: {top} exact logits asked for, it keeps 1 to {Q8_EXACT_TOP_K}"
            );
        }
        self.lm_head = head;
        Ok(())
    }

    fn upload_linear(&mut self, parts: &[&TernaryMatrix]) -> Result<LinearId> {
        let linear = repack(self.family, parts)?;
        self.linears.push(linear);
        Ok(LinearId(self.linears.len() - 1))
    }

    /// Repacks the linears in parallel, one per pool thread (a layer's four linears at a load).
    fn upload_linears(&mut self, linears: &[&[&TernaryMatrix]]) -> Result<Vec<LinearId>> {
        let mut built: Vec<Option<Result<Linear>>> = linears.iter().map(|_| None).collect();
        let family = self.family;
        self.pool
            .for_each(linears.iter().zip(built.iter_mut()), |(parts, slot)| {
                *slot = Some(repack(family, parts));
            });
        built
            .into_iter()
            .map(|linear| {
                self.linears.push(linear.expect("every item ran")?);
                Ok(LinearId(self.linears.len() - 1))
            })
            .collect()
    }

    fn upload_vector(&mut self, values: &[f32]) -> Result<VectorId> {
        self.vectors.push(values.to_vec());
        Ok(VectorId(self.vectors.len() - 1))
    }

    fn upload_table(&mut self, table: &DenseMatrix) -> Result<TableId> {
        table.check_shape()?;
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
        let len = spec.pages * spec.page_values() / 2;
        let pool = match spec.kv_type {
            KvType::F32 => KvPool::F32(Pool::new(len)?),
            KvType::F16 => KvPool::F16(Pool::new(len)?),
        };
        self.kv = Some(KvStorage { spec: *spec, pool });
        Ok(())
    }

    fn grow_kv(&mut self, pages: usize) -> Result<()> {
        let kv = allocated_kv(self.kv.as_mut())?;
        ensure!(
            pages >= kv.spec.pages,
            "grow_kv: {pages} pages would shrink a pool of {}",
            kv.spec.pages
        );
        // Pages are the outermost index: the new ones go after the old.
        let len = pages * kv.spec.page_values() / 2;
        match &mut kv.pool {
            KvPool::F32(p) => p.grow(len)?,
            KvPool::F16(p) => p.grow(len)?,
        }
        kv.spec.pages = pages;
        Ok(())
    }

    fn embed(&mut self, table: TableId, tokens: &[u32], out: Activations) -> Result<()> {
        let t = uploaded(&self.tables, table.0, "table")?;
        let (vocab, cols) = (t.rows, t.cols);
        let mut dst = self.take(out, tokens.len() * cols, "embed")?;
        let table = &self.tables[table.0];
        let result = tokens
            .iter()
            .zip(dst.chunks_exact_mut(cols))
            .try_for_each(|(&id, row)| {
                ensure!(
                    (id as usize) < vocab,
                    "token id {id} is outside the vocabulary of {vocab} tokens"
                );
                match table.mapped() {
                    // Read, not mapped, as in the head's re-scoring.
                    Some(mapped) => READ_ROWS.with_borrow_mut(|buf| {
                        let one = mapped.read_rows(&[id as usize], cols, buf)?;
                        Ok(one.row_to_f32(0, cols, row)?)
                    }),
                    None => Ok(table.view().row_to_f32(id as usize, cols, row)?),
                }
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
                    norm::rms_norm(me.isa, s, w, eps, d)
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
        let (n_in, n_out) = (lin.in_features(), lin.out_features());
        let mut scratch = std::mem::take(&mut self.scratch.linear);
        let result = self.map_buffers(
            x,
            tokens * n_in,
            out,
            tokens * n_out,
            "bitlinear",
            |me, src, dst| {
                let lin = &me.linears[linear.0];
                Ok(lin.forward(
                    &me.pool,
                    me.isa,
                    me.amx_from,
                    src,
                    tokens,
                    dst,
                    &mut scratch,
                )?)
            },
        );
        self.scratch.linear = scratch;
        result
    }

    fn attention(
        &mut self,
        layer: usize,
        qkv: Activations,
        tokens: &[TokenPosition],
        pages: &PageTable,
        out: Activations,
    ) -> Result<()> {
        let spec = allocated_kv(self.kv.as_ref())?.spec;
        spec.check_tokens(layer, tokens, pages)?;
        let width = spec.qkv_width();
        let q_dim = spec.heads * spec.head_dim;
        let mut src = self.take(qkv, tokens.len() * width, "attention qkv")?;
        let mut dst = match self.take(out, tokens.len() * q_dim, "attention output") {
            Ok(d) => d,
            Err(e) => {
                self.put(qkv, src);
                return Err(e);
            }
        };
        let kv = self.kv.as_mut().expect("checked above");
        let step = AttentionStep {
            pool: &self.pool,
            isa: self.isa,
            spec: &spec,
            layer,
            tokens,
            pages,
        };
        let (cos, sin) = (&mut self.scratch.rope_cos, &mut self.scratch.rope_sin);
        let result = match &mut kv.pool {
            KvPool::F32(p) => step.run(p, &mut src, &mut dst, cos, sin),
            KvPool::F16(p) => step.run(p, &mut src, &mut dst, cos, sin),
        };
        self.put(qkv, src);
        self.put(out, dst);
        result
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
        if let LmHead::Q8 { top } = self.lm_head {
            return self.logits_q8(x, table, tokens, top, out);
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
                let per_task = me.pool.chunk_len(vocab, MIN_VOCAB_PER_TASK, 1);
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
    fn runs_of_positions_are_cut_into_near_equal_pieces() {
        let at = |slot, position| TokenPosition { slot, position };
        // 40 rows of one prompt, a decode row, a run of 3, and a row that does not continue it.
        let mut tokens: Vec<_> = (5..45).map(|p| at(0, p)).collect();
        tokens.push(at(1, 9));
        tokens.extend((0..3).map(|p| at(2, p)));
        tokens.push(at(2, 7));
        assert_eq!(
            run_pieces(&tokens, 16),
            [(0, 13), (13, 13), (26, 14), (40, 1), (41, 3), (44, 1)]
        );
        assert_eq!(run_pieces(&tokens[..32], 16), [(0, 16), (16, 16)]);
        assert!(run_pieces(&[], 16).is_empty());
    }

    #[test]
    fn a_base_3_linear_wider_than_a_segment_agrees_with_two_bit() {
        // A 100B model's `down` width: three exact segments of the base-3 GEMV at the best level.
        let (rows, cols) = (4, 45_568);
        let values: Vec<i8> = (0..rows * cols).map(|i| (i % 3) as i8 - 1).collect();
        let codes = tern_cpu::bitlinear::reference::pack(&values, rows, cols).unwrap();
        let m = TernaryMatrix::new("wide", rows, cols, codes, 0.5).unwrap();
        let x: Vec<f32> = (0..cols).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let run = |kernels| {
            let mut b = CpuBackend::with_family(1, Isa::best(), kernels).unwrap();
            let id = b.upload_linear(&[&m]).unwrap();
            let (input, out) = (b.alloc(cols).unwrap(), b.alloc(rows).unwrap());
            b.write(input, &x).unwrap();
            b.bitlinear(input, id, 1, out).unwrap();
            let mut y = vec![0f32; rows];
            b.read(out, &mut y).unwrap();
            (y, b.linear_weight_bytes())
        };
        let (base3, mad) = (run(Family::Base3), run(Family::Mad));
        assert_eq!(base3.0, mad.0);
        // Base 3 packs 1.6 bits per weight, not 2 (143 blocks of 320 columns against 178 of 256).
        assert_eq!(
            (base3.1, mad.1),
            (Some(rows * 143 * 64), Some(rows * 178 * 64))
        );
    }

    #[test]
    fn shared_argument_checks_refuse_bad_uploads_and_ops() {
        let mut b = CpuBackend::with_family(1, Isa::Scalar, Family::Mad).unwrap();
        let bad = DenseMatrix {
            rows: 2,
            cols: 3,
            data: crate::ternary::DenseData::F32(vec![0.0; 5]),
        };
        assert!(b.upload_table(&bad).is_err());
        assert!(b.upload_linear(&[]).is_err());
        let (a, c) = (b.alloc(4).unwrap(), b.alloc(4).unwrap());
        assert!(b.add(a, a, 4).is_err(), "in place");
        assert!(b.add(a, c, 4).is_ok());
        assert!(
            b.rms_norm(a, VectorId(7), 1e-5, 1, c).is_err(),
            "no such vector"
        );
        let row = [TokenPosition {
            slot: 0,
            position: 0,
        }];
        assert!(b.attention(0, a, &row, &[0], c).is_err(), "no KV cache");
    }
}
