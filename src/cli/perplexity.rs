//! `tern perplexity`: llama-perplexity's measurement over a text file.

use super::{ModelArgs, TextOrJson, load_model, select_backend};
use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use tern::engine::{Engine, KvOptions, KvPool};
use tern::perplexity::perplexity_with_progress;

/// Window length when --ctx is not given (llama-perplexity's default).
const DEFAULT_WINDOW: usize = 512;

#[derive(Args)]
pub struct PerplexityArgs {
    /// Model, backend, threads; --ctx is the window length (default 512, at most the model's).
    #[command(flatten)]
    model: ModelArgs,
    /// Text file to score.
    #[arg(short, long)]
    file: PathBuf,
    #[arg(long, value_enum, default_value_t = TextOrJson::Text)]
    format: TextOrJson,
}

pub fn run(args: PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let loaded = load_model(&args.model.model)?;
    let window = match args.model.ctx {
        0 => DEFAULT_WINDOW.min(loaded.source.config().max_positions),
        n => n,
    };
    let ids = loaded.tokenizer?.encode(&text, true)?;
    let mut backend = select_backend(
        args.model.backend,
        args.model.threads,
        args.model.device.as_deref(),
    )?;
    args.model.lm_head.apply(backend.as_mut(), None)?;
    // The pool holds one window: exactly what each pass needs.
    let kv = KvOptions {
        ctx: window,
        ..args.model.kv(1, KvPool::Full)
    };
    let mut engine = Engine::with_kv(loaded.source.as_ref(), backend, kv)?;
    let bar = ProgressBar::new((ids.len() / window) as u64);
    bar.set_style(ProgressStyle::with_template(
        "perplexity {bar:30} {pos}/{len} windows {elapsed}",
    )?);
    let result = perplexity_with_progress(&mut engine, &ids, window, |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    match args.format {
        TextOrJson::Json => println!("{}", serde_json::to_string(&result)?),
        TextOrJson::Text => println!(
            "perplexity: {:.4} (mean NLL {:.6}; {} windows of {} tokens, {} predictions scored, {} tokens in the file)",
            result.ppl,
            result.mean_nll,
            result.windows,
            result.ctx,
            result.scored_tokens,
            result.tokens
        ),
    }
    Ok(())
}
