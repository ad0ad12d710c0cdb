//! `tern run`: one completion (or one chat turn), streamed as text or as JSON lines.

use super::{ModelArgs, SamplingArgs, engine_for, load_model};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use tern::capture::DumpDir;
use tern::chat::ChatMessage;
use tern::engine::{Engine, GenerateOptions, GenerationStats, KvPool};
use tern::kv_cache::SequenceId;
use tern::sampler::Sampler;
use tern::tokenizer::Tokenizer;

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt (a plain completion, or the user message with --chat).
    #[arg(short, long)]
    prompt: String,
    /// Tokens to generate at most.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    n_predict: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Treat the prompt as one user turn and apply the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Report the K most likely alternatives of each token (with --format jsonl).
    #[arg(long, default_value_t = 0)]
    logprobs: usize,
    /// `text` streams the completion; `jsonl` prints one JSON object per generated token.
    #[arg(long, value_enum, default_value_t = RunFormat::Text)]
    format: RunFormat,
    /// Write these intermediates of every forward pass to --dump-dir (comma-separated names such
    /// as blk.3.attn_out or blk.*.qkv; see README).
    #[arg(long, value_delimiter = ',', requires = "dump_dir")]
    dump: Vec<String>,
    /// Directory for --dump: NAME.f32.bin (rows of little-endian f32) and index.json (shapes).
    #[arg(long, requires = "dump")]
    dump_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RunFormat {
    Text,
    Jsonl,
}

pub fn run(args: RunArgs) -> Result<()> {
    // One call: a seed drawn from the clock is drawn (and logged) once, and is the one used.
    let sampling = args.sampling.params();
    // JSON lines carry each token's log-probability, which needs every logit.
    let top_read = sampling
        .top_read()
        .filter(|_| args.format == RunFormat::Text);
    let loaded = load_model(&args.model.model)?;
    let tokenizer = loaded.tokenizer?;
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system.as_str()));
        }
        messages.push(ChatMessage::new("user", args.prompt.as_str()));
        chat_prompt_ids(&tokenizer, &messages)?
    } else {
        tokenizer.encode(&args.prompt, true)?
    };
    // The KV pool holds what this run can cache: the prompt and the tokens to generate (beyond
    // the context, generation stops at its end anyway).
    let pool = KvPool::Positions(prompt.len() + args.n_predict.max(1));
    let mut engine = engine_for(&args.model, loaded.source.as_ref(), top_read, pool)?;
    drop(loaded.source);
    if let Some(dir) = &args.dump_dir {
        let dump = DumpDir::new(dir, &args.dump, engine.config())?;
        engine.set_capture(Some(Box::new(dump)));
    }
    let mut sampler = Sampler::new(sampling);
    let seq = engine.new_sequence()?;
    let options = GenerateOptions {
        max_tokens: args.n_predict,
        stop_ids: stop_ids(&tokenizer, &engine),
        top_logprobs: args.logprobs,
    };
    let jsonl = args.format == RunFormat::Jsonl;
    let streamed = stream_generation(
        &mut engine,
        &tokenizer,
        seq,
        &prompt,
        &options,
        &mut sampler,
        jsonl,
    )?;
    report_stats(&streamed.stats);
    Ok(())
}

/// Renders `messages` with the model's chat template (with the assistant prompt) and tokenizes the
/// result as is: the template writes BOS itself.
pub fn chat_prompt_ids(tokenizer: &Tokenizer, messages: &[ChatMessage]) -> Result<Vec<u32>> {
    let template = tokenizer.chat_template().context(
        "this model has no chat template (tokenizer_config.json has no `chat_template`)",
    )?;
    let text = template.render(messages, true)?;
    tokenizer.encode(&text, false)
}

/// Every id that ends generation: the tokenizer's and the model config's.
pub fn stop_ids(tokenizer: &Tokenizer, engine: &Engine) -> Vec<u32> {
    let mut ids = tokenizer.eos_ids().to_vec();
    for &id in &engine.config().eos_token_ids {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// What a streamed generation produced.
pub struct Streamed {
    pub stats: GenerationStats,
    /// Every sampled id, a final stop id included.
    pub ids: Vec<u32>,
    /// The printed text (special tokens skipped).
    pub text: String,
}

/// Generates and prints as it goes (text, or one JSON object per token).
pub fn stream_generation(
    engine: &mut Engine,
    tokenizer: &Tokenizer,
    seq: SequenceId,
    prompt: &[u32],
    options: &GenerateOptions,
    sampler: &mut Sampler,
    jsonl: bool,
) -> Result<Streamed> {
    let mut decoder = tokenizer.stream_decoder(true);
    let mut out = std::io::stdout().lock();
    let (mut ids, mut all_text) = (Vec::new(), String::new());
    let stats = engine.generate(seq, prompt, options, sampler, |token| {
        let text = decoder.push(token.id)?;
        ids.push(token.id);
        all_text += &text;
        if jsonl {
            let top: Vec<_> = token
                .top
                .iter()
                .map(|&(id, logprob)| json!({"id": id, "logprob": logprob}))
                .collect();
            let mut line = json!({"id": token.id, "text": text, "logprob": token.logprob});
            if options.top_logprobs > 0 {
                line["top_logprobs"] = serde_json::Value::Array(top);
            }
            writeln!(out, "{line}")?;
        } else {
            write!(out, "{text}")?;
        }
        out.flush()?;
        Ok(true)
    })?;
    let rest = decoder.finish()?;
    all_text += &rest;
    if jsonl {
        if !rest.is_empty() {
            writeln!(out, "{}", json!({"text": rest}))?;
        }
    } else {
        writeln!(out, "{rest}")?;
    }
    out.flush()?;
    Ok(Streamed {
        stats,
        ids,
        text: all_text,
    })
}

pub fn report_stats(stats: &GenerationStats) {
    let rate = |n: usize, d: std::time::Duration| n as f64 / d.as_secs_f64().max(1e-9);
    tracing::info!(
        "prompt {} tokens at {:.1} t/s; generated {} tokens at {:.1} t/s; finish: {}",
        stats.prompt_tokens,
        rate(stats.prompt_tokens, stats.prefill_time),
        stats.generated_tokens,
        rate(stats.generated_tokens.saturating_sub(1), stats.decode_time),
        stats.finish.as_str()
    );
}
