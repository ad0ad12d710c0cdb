//! `tern serve`: the OpenAI-compatible HTTP server (see `tern::server`).

use super::run::stop_ids;
use super::{LmHeadChoice, ModelArgs, load_model, select_backend};
use anyhow::{Result, ensure};
use clap::Args;
use std::time::Duration;
use tern::engine::{Engine, KvPool};
use tern::server::{ServeOptions, serve};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on. Anything but loopback should come with --api-key.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the log says which).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Sequences generated at once (KV-cache slots of up to --ctx tokens each).
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Memory for the KV-cache pool shared by all sequences, e.g. 512MiB or 2G (K = 1024 bytes;
    /// default: room for --parallel full contexts of --ctx tokens). Requests wait until the pool
    /// has the pages their prompt and max_tokens may need.
    #[arg(long, value_parser = parse_size)]
    kv_memory: Option<usize>,
    /// Requests that may wait for a slot; more are refused with 503 and Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Key clients must send as `Authorization: Bearer KEY` (every route but /health).
    #[arg(long)]
    api_key: Option<String>,
    /// Seconds running requests may continue after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
    /// Do not keep the KV pages of earlier prompts: by default a prompt that starts with the
    /// tokens of an earlier one (a shared system prompt, a chat's previous turns) takes their
    /// cached keys and values, whole pages of 16 positions, instead of computing them again.
    #[arg(long)]
    no_prefix_cache: bool,
}

pub fn run(args: ServeArgs) -> Result<()> {
    ensure!(args.parallel >= 1, "--parallel must be at least 1");
    let options = ServeOptions {
        host: args.host,
        port: args.port,
        api_key: args.api_key.filter(|k| !k.is_empty()),
        model_id: args.model.model.clone(),
        max_queue: args.max_queue,
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        head_per_step: args.model.lm_head == LmHeadChoice::Auto,
    };
    let model = args.model;
    let parallel = args.parallel;
    let pool = args.kv_memory.map_or(KvPool::Full, KvPool::Bytes);
    let prefix_cache = !args.no_prefix_cache;
    serve(
        options,
        Box::new(move || {
            let loaded = load_model(&model.model)?;
            // A server handles text: no tokenizer, no server (the error says why).
            let tokenizer = loaded.tokenizer?;
            let mut backend =
                select_backend(model.backend, model.threads, model.device.as_deref())?;
            // Requests may sample any way and ask for log-probabilities: `auto` starts with the
            // full head, and the scheduler takes the 8-bit copy for the steps that allow it.
            model.lm_head.apply(backend.as_mut(), None)?;
            let mut engine =
                Engine::with_kv(loaded.source.as_ref(), backend, model.kv(parallel, pool))?;
            if prefix_cache {
                engine.enable_prefix_reuse()?;
            }
            let stops = stop_ids(&tokenizer, &engine);
            Ok((engine, tokenizer, stops))
        }),
    )
}

/// A byte count with an optional binary unit: `4096`, `512K`, `512MiB`, `2G`, `1.5GB` (K, M, G, T
/// with or without `i`/`B`, any case, all powers of 1024).
fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use e.g. 512MiB or 2G)"
            ));
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (use e.g. 512MiB or 2G)"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !(bytes >= 1.0 && bytes < usize::MAX as f64) {
        return Err(format!("{text:?} is not a usable size in bytes"));
    }
    Ok(bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_binary_units_and_refuse_garbage() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1.5gb"), Ok(3 << 29));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        for bad in ["", "MiB", "12 parsecs", "-1G", "0", "1e99T", "1.2.3M"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
