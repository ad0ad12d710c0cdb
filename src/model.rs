//! The BitNet b1.58 transformer, written once against the [`Backend`] trait.
//!
//! ```text
//! h = embed[tokens]
//! for each layer:
//!     a = RMSNorm(h; attn_norm)
//!     q‖k‖v = BitLinear(a; q‖k‖v)                    one activation quantization, three scales
//!     o = Attention(RoPE(q), RoPE(k), v, KV cache)     causal, GQA
//!     h += BitLinear(RMSNorm(o; attn_sub_norm); o)     sub-norm only where the config has it
//!     b = RMSNorm(h; ffn_norm)
//!     g‖u = BitLinear(b; gate‖up)
//!     m = act(g) * u                                   ReLU² (2B-4T) or SiLU
//!     h += BitLinear(RMSNorm(m; ffn_sub_norm); down)
//! logits = RMSNorm(h; final_norm) · headᵀ             head = embedding when tied
//! ```
//!
//! A call to [`Model::forward`] runs one batch of rows (tokens with their KV slot and position);
//! prefill, decode and batched decode are all just batches. Scratch activations are allocated on
//! the backend once and grown only when a larger batch arrives. Every intermediate has a name
//! (`blk.3.attn_out`, see [`crate::capture`]) under which a [`Capture`] can read it.

use crate::backend::{
    Activations, Backend, KvSpec, KvType, LinearId, PAGE_SIZE, PageTable, TableId, TokenPosition,
    VectorId,
};
use crate::capture::Capture;
use crate::config::ModelConfig;
use crate::source::ModelSource;
use anyhow::{Context, Result, ensure};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Which rows of a fed run of tokens need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last row (generation).
    Last,
    /// Every row (perplexity, teacher forcing).
    All,
}

struct Layer {
    attn_norm: VectorId,
    qkv: LinearId,
    attn_sub_norm: Option<VectorId>,
    o: LinearId,
    ffn_norm: VectorId,
    gate_up: LinearId,
    ffn_sub_norm: Option<VectorId>,
    down: LinearId,
}

/// Per-batch device buffers, each sized for `rows` rows.
#[derive(Clone, Copy)]
struct Scratch {
    rows: usize,
    residual: Activations,
    normed: Activations,
    qkv: Activations,
    attn: Activations,
    projected: Activations,
    gate_up: Activations,
    ffn: Activations,
    ffn_normed: Activations,
    logits: Activations,
}

impl Scratch {
    fn buffers(&self) -> [Activations; 9] {
        [
            self.residual,
            self.normed,
            self.qkv,
            self.attn,
            self.projected,
            self.gate_up,
            self.ffn,
            self.ffn_normed,
            self.logits,
        ]
    }
}

pub struct Model {
    config: ModelConfig,
    embed: TableId,
    head: TableId,
    head_bytes: usize,
    final_norm: VectorId,
    layers: Vec<Layer>,
    scratch: Option<Scratch>,
    capture: Option<Box<dyn Capture>>,
}

impl Model {
    /// Uploads the weights of `source` to `backend` (fusing q‖k‖v and gate‖up), streaming: the
    /// tables first, then one layer at a time, each dropped once the backend holds it in its own
    /// layout, so that no more than one layer exists twice (see [`crate::source`]). A progress
    /// bar on stderr (only when it is a terminal) counts the layers and their ternary bytes.
    pub fn upload(source: &dyn ModelSource, backend: &mut dyn Backend) -> Result<Self> {
        let c = source.config().clone();
        let embed_table = source.embed()?;
        let embed = backend.upload_table(&embed_table)?;
        let (head, head_bytes) = match source.output()? {
            Some(output) => (backend.upload_table(&output)?, output.bytes()),
            None => (embed, embed_table.bytes()),
        };
        drop(embed_table);
        let final_norm = backend.upload_vector(&source.final_norm()?)?;
        let progress = load_progress(&c);
        let mut layers = Vec::with_capacity(c.layers);
        for l in 0..c.layers {
            let host = source.layer(l)?;
            let sub_norm =
                |b: &mut dyn Backend, w: &Option<Vec<f32>>| -> Result<Option<VectorId>> {
                    w.as_ref().map(|w| b.upload_vector(w)).transpose()
                };
            let linears = backend
                .upload_linears(&[
                    &[&host.q, &host.k, &host.v],
                    &[&host.o],
                    &[&host.gate, &host.up],
                    &[&host.down],
                ])
                .with_context(|| format!("layer {l}"))?;
            let [qkv, o, gate_up, down] = linears[..] else {
                anyhow::bail!("the backend returned {} linears for 4", linears.len());
            };
            layers.push(Layer {
                attn_norm: backend.upload_vector(&host.attn_norm)?,
                qkv,
                attn_sub_norm: sub_norm(backend, &host.attn_sub_norm)?,
                o,
                ffn_norm: backend.upload_vector(&host.ffn_norm)?,
                gate_up,
                ffn_sub_norm: sub_norm(backend, &host.ffn_sub_norm)?,
                down,
            });
            let bytes: usize = host.linears().iter().map(|m| m.packed_bytes()).sum();
            progress.inc(bytes as u64);
            progress.set_message(format!("layer {}/{}", l + 1, c.layers));
            drop(host);
            return_freed_heap();
        }
        progress.finish_and_clear();
        Ok(Self {
            config: c,
            embed,
            head,
            head_bytes,
            final_norm,
            layers,
            scratch: None,
            capture: None,
        })
    }

    /// Bytes of the full-precision output head (the embedding when tied) in its stored dtype.
    pub fn head_bytes(&self) -> usize {
        self.head_bytes
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The KV-cache geometry this model needs for `slots` sequences of `capacity` positions, with
    /// a pool of `pages` pages of [`PAGE_SIZE`] positions holding `kv_type` values.
    pub fn kv_spec(&self, slots: usize, capacity: usize, pages: usize, kv_type: KvType) -> KvSpec {
        let c = &self.config;
        KvSpec {
            layers: c.layers,
            slots,
            capacity,
            pages,
            page_size: PAGE_SIZE,
            kv_type,
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            rope_theta: c.rope_theta,
        }
    }

    /// Hands the named intermediates of the following passes to `capture` (`None`: to nobody);
    /// returns the previous capture.
    pub fn set_capture(&mut self, capture: Option<Box<dyn Capture>>) -> Option<Box<dyn Capture>> {
        std::mem::replace(&mut self.capture, capture)
    }

    /// Runs one batch and returns the logits of its last `logits_rows` rows, row-major
    /// `[logits_rows, vocab]` (none when 0: the batch only fills the KV cache).
    ///
    /// `rows[i]` says where `tokens[i]` goes and `pages` where each slot's positions live; the
    /// caller (the KV-cache manager) guarantees the positions are valid, their pages taken, and
    /// each row's earlier positions already cached or earlier in the batch. Rows that need logits
    /// go last, so that selecting them is one contiguous copy whose offset depends only on the
    /// batch's shape (a recorded step stays replayable).
    pub fn forward(
        &mut self,
        backend: &mut dyn Backend,
        tokens: &[u32],
        rows: &[TokenPosition],
        pages: &PageTable,
        logits_rows: usize,
    ) -> Result<Vec<f32>> {
        ensure!(
            tokens.len() == rows.len(),
            "forward: {} tokens but {} row positions",
            tokens.len(),
            rows.len()
        );
        ensure!(!tokens.is_empty(), "forward: empty batch");
        let n = tokens.len();
        ensure!(
            logits_rows <= n,
            "forward: logits for {logits_rows} rows of a batch of {n}"
        );
        let s = self.scratch_for(backend, n)?;
        let c = &self.config;
        let (eps, hidden) = (c.rms_norm_eps, c.hidden);
        let out_rows = logits_rows;

        // A captured pass reads buffers between ops, so it is not one recorded step.
        let step = self.capture.is_none();
        let mut tap = Tap {
            capture: self.capture.as_deref_mut(),
            rows: n,
        };
        if step {
            backend.begin_step(n, out_rows)?;
        }
        backend.embed(self.embed, tokens, s.residual)?;
        tap.at(backend, || "inp_embd".into(), s.residual, hidden)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let name = |what: &'static str| move || format!("blk.{l}.{what}");
            backend.rms_norm(s.residual, layer.attn_norm, eps, n, s.normed)?;
            tap.at(backend, name("attn_norm"), s.normed, hidden)?;
            backend.bitlinear(s.normed, layer.qkv, n, s.qkv)?;
            tap.at(backend, name("qkv"), s.qkv, c.q_dim() + 2 * c.kv_dim())?;
            backend.attention(l, s.qkv, rows, pages, s.attn)?;
            tap.at(backend, name("kqv_out"), s.attn, c.q_dim())?;
            let attn_out = match layer.attn_sub_norm {
                Some(w) => {
                    backend.rms_norm(s.attn, w, eps, n, s.normed)?;
                    tap.at(backend, name("attn_sub_norm"), s.normed, c.q_dim())?;
                    s.normed
                }
                None => s.attn,
            };
            backend.bitlinear(attn_out, layer.o, n, s.projected)?;
            tap.at(backend, name("attn_out"), s.projected, hidden)?;
            backend.add(s.residual, s.projected, n * hidden)?;
            tap.at(backend, name("ffn_inp"), s.residual, hidden)?;

            backend.rms_norm(s.residual, layer.ffn_norm, eps, n, s.normed)?;
            tap.at(backend, name("ffn_norm"), s.normed, hidden)?;
            backend.bitlinear(s.normed, layer.gate_up, n, s.gate_up)?;
            tap.at(backend, name("ffn_gate_up"), s.gate_up, 2 * c.intermediate)?;
            backend.gated(s.gate_up, c.activation, n, c.intermediate, s.ffn)?;
            tap.at(backend, name("ffn_act"), s.ffn, c.intermediate)?;
            let ffn_out = match layer.ffn_sub_norm {
                Some(w) => {
                    backend.rms_norm(s.ffn, w, eps, n, s.ffn_normed)?;
                    tap.at(backend, name("ffn_sub_norm"), s.ffn_normed, c.intermediate)?;
                    s.ffn_normed
                }
                None => s.ffn,
            };
            backend.bitlinear(ffn_out, layer.down, n, s.projected)?;
            tap.at(backend, name("ffn_out"), s.projected, hidden)?;
            backend.add(s.residual, s.projected, n * hidden)?;
            tap.at(backend, name("l_out"), s.residual, hidden)?;
        }

        if out_rows > 0 {
            let final_in = if out_rows == n {
                s.residual
            } else {
                let first = n - out_rows;
                backend.copy(
                    s.residual,
                    first * hidden,
                    s.projected,
                    0,
                    out_rows * hidden,
                )?;
                s.projected
            };
            tap.rows = out_rows;
            backend.rms_norm(final_in, self.final_norm, eps, out_rows, s.normed)?;
            tap.at(backend, || "result_norm".into(), s.normed, hidden)?;
            backend.logits(s.normed, self.head, out_rows, s.logits)?;
            tap.at(backend, || "logits".into(), s.logits, c.vocab)?;
        }
        if step {
            backend.end_step()?;
        }
        let mut logits = vec![0f32; out_rows * c.vocab];
        backend.read(s.logits, &mut logits)?;
        Ok(logits)
    }

    /// Scratch buffers for at least `rows` rows, (re)allocated only when the batch grows.
    fn scratch_for(&mut self, backend: &mut dyn Backend, rows: usize) -> Result<Scratch> {
        if self.scratch.as_ref().is_none_or(|s| s.rows < rows) {
            if let Some(old) = self.scratch.take() {
                old.buffers().into_iter().for_each(|b| backend.free(b));
            }
            let c = &self.config;
            let wide = c.hidden.max(c.q_dim());
            let qkv = c.q_dim() + 2 * c.kv_dim();
            self.scratch = Some(Scratch {
                rows,
                residual: backend.alloc(rows * c.hidden)?,
                normed: backend.alloc(rows * wide)?,
                qkv: backend.alloc(rows * qkv)?,
                attn: backend.alloc(rows * c.q_dim())?,
                projected: backend.alloc(rows * c.hidden)?,
                gate_up: backend.alloc(rows * 2 * c.intermediate)?,
                ffn: backend.alloc(rows * c.intermediate)?,
                ffn_normed: backend.alloc(rows * c.intermediate)?,
                logits: backend.alloc(rows * c.vocab)?,
            });
        }
        Ok(self.scratch.expect("allocated above"))
    }
}

/// A bar over the ternary bytes of every layer, drawn on stderr only when it is a terminal.
fn load_progress(c: &ModelConfig) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(c.ternary_size().1 as u64),
        ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        ProgressStyle::with_template("loading {bar:30} {bytes}/{total_bytes} {msg} {elapsed}")
            .expect("static template"),
    );
    bar
}

/// Hands intermediates to the model's [`Capture`], if it has one.
struct Tap<'a> {
    capture: Option<&'a mut (dyn Capture + 'static)>,
    /// Rows of the values tapped next.
    rows: usize,
}

impl Tap<'_> {
    /// Offers `name()` (built only when there is a capture) and, if wanted, reads the first rows
    /// of `buffer` (`width` values each) back for it.
    fn at(
        &mut self,
        backend: &mut dyn Backend,
        name: impl FnOnce() -> String,
        buffer: Activations,
        width: usize,
    ) -> Result<()> {
        let Some(capture) = self.capture.as_deref_mut() else {
            return Ok(());
        };
        let name = name();
        if capture.wants(&name) {
            let mut values = vec![0f32; self.rows * width];
            backend.read(buffer, &mut values)?;
            capture.record(&name, width, &values)?;
        }
        Ok(())
    }
}

/// Hands the heap memory freed while loading a layer (its tensors' decoded values and canonical
/// codes, the repacking's temporaries) back to the OS. glibc keeps freed blocks below its mmap
/// threshold in its arenas (one per thread that repacks), and a streaming load frees hundreds of
/// them between the weights it keeps: about 100 MB stayed resident on a 7B model after loading,
/// and the load's peak stood ~0.6 GB above the loaded model's footprint on a 30B one.
fn return_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: glibc's malloc_trim only releases memory no allocation holds; it takes no
        // pointers and may be called from any thread at any time.
        unsafe { malloc_trim(0) };
    }
}
