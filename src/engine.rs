//! An [`Engine`] owns a backend, the model uploaded to it and the KV cache, and runs sequences:
//! feeding tokens (prefill in batches of at most [`MAX_BATCH`] rows) and generating.
//!
//! Context policy: a prompt that does not fit in the context (with room for one new token) is an
//! error before any work is done; a generation that reaches the end of the context stops there with
//! [`FinishReason::ContextFull`]. Nothing is truncated silently.

use crate::backend::{Backend, KvType, LmHead, TokenPosition};
use crate::capture::Capture;
use crate::config::ModelConfig;
use crate::kv_cache::{KvCache, SequenceId};
use crate::model::{LogitsFor, Model};
use crate::sampler::{Sampler, logprob_of, top_logprobs};
use crate::source::ModelSource;
use anyhow::{Result, ensure};
use std::time::{Duration, Instant};

/// Rows per forward pass when feeding a long prompt.
pub const MAX_BATCH: usize = 256;

/// How big the KV pool is (see [`KvOptions`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvPool {
    /// Room for every slot's whole context, allocated up front.
    #[default]
    Full,
    /// Pages for this many positions over all sequences, fixed.
    Positions(usize),
    /// As many pages as fit in this many bytes, fixed.
    Bytes(usize),
    /// Pages for this many positions at first, grown (doubling) as sequences need more, up to
    /// [`KvPool::Full`].
    Growing(usize),
}

/// The KV cache an [`Engine`] allocates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvOptions {
    /// Positions per sequence (0: the model's maximum).
    pub ctx: usize,
    /// Sequences held at once (at least 1).
    pub slots: usize,
    pub kv_type: KvType,
    pub pool: KvPool,
}

pub struct Engine {
    backend: Box<dyn Backend>,
    model: Model,
    kv: KvCache,
}

/// One item of [`Engine::feed_batch`]: tokens appended to a sequence, and whether the last one's
/// logits are wanted.
#[derive(Clone, Copy, Debug)]
pub struct Feed<'a> {
    pub seq: SequenceId,
    pub tokens: &'a [u32],
    pub logits: bool,
}

/// One generated token as the engine reports it.
#[derive(Clone, Debug)]
pub struct GeneratedToken {
    pub id: u32,
    /// Natural-log probability of `id` under the model's (unmodified) distribution.
    pub logprob: f32,
    /// The `top_logprobs` most likely ids with their log probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence id was sampled (it is reported, not fed back).
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The sequence filled the context.
    ContextFull,
    /// The caller's callback asked to stop.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContextFull => "context_full",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    /// Ids that end generation.
    pub stop_ids: Vec<u32>,
    /// Alternatives reported per token (0: none).
    pub top_logprobs: usize,
}

#[derive(Clone, Debug)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    pub finish: FinishReason,
}

impl Engine {
    /// Uploads the weights of `source` to `backend` ([`Model::upload`]: streaming, one layer at a
    /// time) and allocates a full f32 KV cache of `slots` sequences × `ctx` positions (`ctx` 0: the
    /// model's maximum).
    pub fn new(
        source: &dyn ModelSource,
        backend: Box<dyn Backend>,
        ctx: usize,
        slots: usize,
    ) -> Result<Self> {
        let kv = KvOptions {
            ctx,
            slots,
            ..KvOptions::default()
        };
        Self::with_kv(source, backend, kv)
    }

    /// Uploads the weights of `source` to `backend` (streaming) and allocates the KV cache `kv`
    /// describes.
    pub fn with_kv(
        source: &dyn ModelSource,
        mut backend: Box<dyn Backend>,
        kv: KvOptions,
    ) -> Result<Self> {
        let max = source.config().max_positions;
        let ctx = if kv.ctx == 0 { max } else { kv.ctx };
        ensure!(
            ctx <= max,
            "context length {ctx} exceeds the model's maximum of {max} positions"
        );
        ensure!(
            kv.slots > 0,
            "the KV cache needs at least one sequence slot"
        );
        let model = Model::upload(source, backend.as_mut())?;
        let full = model.kv_spec(kv.slots, ctx, 0, kv.kv_type);
        let full_pages = kv.slots * full.pages_per_slot();
        let pages_for = |positions: usize| positions.div_ceil(full.page_size).max(1);
        let (pages, max_pages) = match kv.pool {
            KvPool::Full => (full_pages, 0),
            KvPool::Positions(n) => (pages_for(n), 0),
            KvPool::Bytes(bytes) => {
                let page = full.page_bytes();
                ensure!(
                    bytes >= page,
                    "a KV pool of {bytes} bytes holds not one page of {} positions ({page} bytes \
                     for this model as {}): raise --kv-memory",
                    full.page_size,
                    kv.kv_type.as_str()
                );
                (bytes / page, 0)
            }
            KvPool::Growing(n) => (pages_for(n).min(full_pages), full_pages),
        };
        let spec = crate::backend::KvSpec { pages, ..full };
        let kv = KvCache::new(backend.as_mut(), spec, max_pages)?;
        tracing::info!(
            "KV cache: {} pages of {} positions, {} bytes ({:.1} MiB) of {}{}",
            kv.pages(),
            spec.page_size,
            kv.bytes(),
            kv.bytes() as f64 / (1u64 << 20) as f64,
            spec.kv_type.as_str(),
            if kv.max_pages() > kv.pages() {
                format!(", growing up to {} pages", kv.max_pages())
            } else {
                String::new()
            }
        );
        Ok(Self { backend, model, kv })
    }

    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// [`Model::set_capture`]: named intermediates of the following passes go to `capture`.
    pub fn set_capture(&mut self, capture: Option<Box<dyn Capture>>) -> Option<Box<dyn Capture>> {
        self.model.set_capture(capture)
    }

    /// [`Backend::set_lm_head`]: how the following passes evaluate the output head.
    pub fn set_lm_head(&mut self, head: LmHead) -> Result<()> {
        self.backend.set_lm_head(head)
    }

    pub fn backend_description(&self) -> String {
        self.backend.describe()
    }

    /// [`Model::head_bytes`].
    pub fn head_bytes(&self) -> usize {
        self.model.head_bytes()
    }

    /// [`Backend::linear_weight_bytes`] of the backend.
    pub fn linear_weight_bytes(&self) -> Option<usize> {
        self.backend.linear_weight_bytes()
    }

    /// Positions one sequence can hold: the context length, or fewer when the whole KV pool (at
    /// its largest) holds fewer.
    pub fn context(&self) -> usize {
        let pool = self.kv.max_pages() * self.kv.page_size();
        self.kv.capacity().min(pool)
    }

    /// Sequences the KV cache holds at once.
    pub fn slots(&self) -> usize {
        self.kv.slots()
    }

    /// Slots held by live sequences.
    pub fn slots_in_use(&self) -> usize {
        self.kv.slots_in_use()
    }

    /// The KV cache: its pages (used, free, size), bytes and geometry.
    pub fn kv(&self) -> &KvCache {
        &self.kv
    }

    pub fn new_sequence(&mut self) -> Result<SequenceId> {
        self.kv.acquire()
    }

    /// Keeps the KV pages of finished prompts for later prompts that start with the same tokens
    /// ([`KvCache::enable_prefix_reuse`]); before any sequence starts.
    pub fn enable_prefix_reuse(&mut self) -> Result<()> {
        self.kv.enable_prefix_reuse()
    }

    /// A new sequence holding the longest cached prefix of `prompt` (whole pages, never its last
    /// token): returns it and the number of prompt tokens already cached, which the caller does
    /// not feed again.
    pub fn new_sequence_with_prefix(&mut self, prompt: &[u32]) -> Result<(SequenceId, usize)> {
        self.kv.acquire_with_prefix(prompt)
    }

    pub fn release(&mut self, seq: SequenceId) {
        self.kv.release(seq);
    }

    /// Empties the sequence's cache (a new conversation in the same slot).
    pub fn clear(&mut self, seq: SequenceId) -> Result<()> {
        self.kv.clear(seq)
    }

    /// Keeps only the first `len` cached tokens of the sequence (reuse of a shared prefix).
    pub fn truncate(&mut self, seq: SequenceId, len: usize) -> Result<()> {
        self.kv.truncate(seq, len)
    }

    /// Cached tokens of the sequence.
    pub fn sequence_len(&self, seq: SequenceId) -> Result<usize> {
        self.kv.len(seq)
    }

    /// Appends `tokens` to the sequence and returns logits (`[vocab]` for `Last`,
    /// `[tokens, vocab]` for `All`). Refuses, changing nothing, if the context would overflow.
    pub fn feed(
        &mut self,
        seq: SequenceId,
        tokens: &[u32],
        logits_for: LogitsFor,
    ) -> Result<Vec<f32>> {
        ensure!(!tokens.is_empty(), "nothing to feed: empty token list");
        let start = self.kv.len(seq)?;
        let rows = self.kv.reserve(self.backend.as_mut(), seq, tokens.len())?;
        let logits_rows = match logits_for {
            LogitsFor::Last => 1,
            LogitsFor::All => tokens.len(),
        };
        let result = self.run_batches(tokens, &rows, logits_rows);
        match result {
            Ok(_) => self.kv.record(seq, tokens)?,
            Err(_) => self.kv.truncate(seq, start)?,
        }
        result
    }

    /// One batch over several sequences (the server's step): appends each item's tokens to its
    /// sequence (each sequence at most once; a decode row is one token, a prefill chunk several)
    /// and returns the logits of the last token of every item that asks for them, `[items with
    /// logits, vocab]` in the order of `items`. Refuses, changing nothing, if any sequence would
    /// overflow.
    ///
    /// Row order inside the batch: every row except the logit rows, then the logit rows, so the
    /// model selects them as one contiguous tail; a sequence's rows stay in position order.
    pub fn feed_batch(&mut self, items: &[Feed<'_>]) -> Result<Vec<f32>> {
        ensure!(!items.is_empty(), "nothing to feed: no items");
        for (i, item) in items.iter().enumerate() {
            ensure!(
                !item.tokens.is_empty(),
                "nothing to feed: item {i} has no tokens"
            );
            ensure!(
                items[..i].iter().all(|other| other.seq != item.seq),
                "a sequence appears twice in one batch (item {i})"
            );
        }
        let mut reserved: Vec<(SequenceId, usize)> = Vec::with_capacity(items.len());
        let mut positions = Vec::with_capacity(items.len());
        let mut result = Ok(());
        for item in items {
            let start = self.kv.len(item.seq);
            let backend = self.backend.as_mut();
            let n = item.tokens.len();
            match start.and_then(|start| Ok((start, self.kv.reserve(backend, item.seq, n)?))) {
                Ok((start, rows)) => {
                    reserved.push((item.seq, start));
                    positions.push(rows);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let result = result.and_then(|()| {
            let total: usize = items.iter().map(|i| i.tokens.len()).sum();
            let (mut tokens, mut rows) = (Vec::with_capacity(total), Vec::with_capacity(total));
            let (mut tail_tokens, mut tail_rows) = (Vec::new(), Vec::new());
            for (item, pos) in items.iter().zip(&positions) {
                let body = item.tokens.len() - usize::from(item.logits);
                tokens.extend_from_slice(&item.tokens[..body]);
                rows.extend_from_slice(&pos[..body]);
                tail_tokens.extend_from_slice(&item.tokens[body..]);
                tail_rows.extend_from_slice(&pos[body..]);
            }
            let tail = tail_tokens.len();
            tokens.extend(tail_tokens);
            rows.extend(tail_rows);
            self.run_batches(&tokens, &rows, tail)
        });
        if result.is_err() {
            for (seq, start) in reserved {
                self.kv.truncate(seq, start)?;
            }
        } else {
            for item in items {
                self.kv.record(item.seq, item.tokens)?;
            }
        }
        result
    }

    /// Runs `tokens` at `rows` in forward passes of at most [`MAX_BATCH`] rows and returns the
    /// logits of the last `logits_rows` rows (each pass computes those of its share of that tail).
    fn run_batches(
        &mut self,
        tokens: &[u32],
        rows: &[TokenPosition],
        logits_rows: usize,
    ) -> Result<Vec<f32>> {
        let first_logit = tokens.len() - logits_rows;
        let mut logits = Vec::new();
        for (i, (t, r)) in tokens
            .chunks(MAX_BATCH)
            .zip(rows.chunks(MAX_BATCH))
            .enumerate()
        {
            let end = i * MAX_BATCH + t.len();
            let want = end.saturating_sub(first_logit).min(t.len());
            let pages = self.kv.page_table();
            let part = self
                .model
                .forward(self.backend.as_mut(), t, r, pages, want)?;
            // One pass (a step of at most `MAX_BATCH` rows): its logits as they are, not copied.
            if logits.is_empty() {
                logits = part;
            } else {
                logits.extend(part);
            }
        }
        Ok(logits)
    }

    /// Feeds `prompt` to an empty or continuing sequence, then samples up to `max_tokens` ids,
    /// calling `on_token` for each (return `false` to stop). Stop ids are reported but not fed.
    pub fn generate(
        &mut self,
        seq: SequenceId,
        prompt: &[u32],
        options: &GenerateOptions,
        sampler: &mut Sampler,
        mut on_token: impl FnMut(&GeneratedToken) -> Result<bool>,
    ) -> Result<GenerationStats> {
        let cached = self.kv.len(seq)?;
        ensure!(
            cached + prompt.len() < self.context(),
            "the prompt has {} tokens{}, which leaves no room to generate in a context of {} \
             (raise --ctx, up to the model's maximum of {}, or shorten the prompt)",
            prompt.len(),
            if cached > 0 {
                format!(" after {cached} cached")
            } else {
                String::new()
            },
            self.context(),
            self.config().max_positions
        );
        let started = Instant::now();
        let mut logits = self.feed(seq, prompt, LogitsFor::Last)?;
        let prefill_time = started.elapsed();
        let decode_start = Instant::now();
        let mut history: Vec<u32> = prompt.to_vec();
        let mut generated = 0;
        let finish = loop {
            if generated == options.max_tokens {
                break FinishReason::Length;
            }
            let id = sampler.sample(&logits, &history);
            let token = GeneratedToken {
                id,
                logprob: logprob_of(&logits, id),
                top: top_logprobs(&logits, options.top_logprobs),
            };
            generated += 1;
            let keep_going = on_token(&token)?;
            if options.stop_ids.contains(&id) {
                break FinishReason::Stop;
            }
            if !keep_going {
                break FinishReason::Cancelled;
            }
            if generated == options.max_tokens {
                break FinishReason::Length;
            }
            if self.kv.len(seq)? == self.context() {
                break FinishReason::ContextFull;
            }
            history.push(id);
            logits = self.feed(seq, &[id], LogitsFor::Last)?;
        };
        Ok(GenerationStats {
            prompt_tokens: prompt.len(),
            generated_tokens: generated,
            prefill_time,
            decode_time: decode_start.elapsed(),
            finish,
        })
    }
}
