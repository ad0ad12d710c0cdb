//! Perplexity over a token stream, with llama-perplexity's window definition:
//!
//! ```text
//! windows = ids[i*C .. (i+1)*C] for i in 0 .. len(ids)/C     (a last partial window is dropped)
//!           each evaluated on its own from an empty KV cache, positions 0..C-1
//! NLL     = mean over windows and t = 0..C-2 of -log_softmax(logits[t])[window[t+1]]
//! PPL     = exp(NLL)
//! ```
//! Log-probabilities come from [`logprob_of`] (max-shifted log-sum-exp in f64); the sum is f64.

use crate::engine::Engine;
use crate::model::LogitsFor;
use crate::sampler::logprob_of;
use anyhow::{Result, ensure};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    pub mean_nll: f64,
    /// Tokens in the input.
    pub tokens: usize,
    /// Predictions scored (windows × (ctx − 1)).
    pub scored_tokens: usize,
    pub windows: usize,
    pub ctx: usize,
}

/// Scores `ids` in windows of `ctx` tokens.
pub fn perplexity(engine: &mut Engine, ids: &[u32], ctx: usize) -> Result<Perplexity> {
    perplexity_with_progress(engine, ids, ctx, |_, _| {})
}

/// As [`perplexity`], calling `progress(done, total)` after each window.
pub fn perplexity_with_progress(
    engine: &mut Engine,
    ids: &[u32],
    ctx: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    ensure!(
        ctx >= 2,
        "perplexity needs a context of at least 2 tokens, got {ctx}"
    );
    ensure!(
        ctx <= engine.context(),
        "perplexity context {ctx} exceeds the engine's context length {} (raise --ctx)",
        engine.context()
    );
    let windows = ids.len() / ctx;
    ensure!(
        windows > 0,
        "the text has {} tokens, fewer than one window of {ctx}",
        ids.len()
    );
    let vocab = engine.config().vocab;
    let seq = engine.new_sequence()?;
    let mut nll_sum = 0f64;
    let result = (|| -> Result<()> {
        for w in 0..windows {
            let window = &ids[w * ctx..(w + 1) * ctx];
            engine.clear(seq)?;
            let logits = engine.feed(seq, window, LogitsFor::All)?;
            for t in 0..ctx - 1 {
                let row = &logits[t * vocab..(t + 1) * vocab];
                nll_sum -= f64::from(logprob_of(row, window[t + 1]));
            }
            progress(w + 1, windows);
        }
        Ok(())
    })();
    engine.release(seq);
    result?;
    let scored = windows * (ctx - 1);
    let mean_nll = nll_sum / scored as f64;
    Ok(Perplexity {
        ppl: mean_nll.exp(),
        mean_nll,
        tokens: ids.len(),
        scored_tokens: scored,
        windows,
        ctx,
    })
}
