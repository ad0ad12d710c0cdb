//! `tern serve`: the OpenAI-compatible HTTP server (see `tern::server`).

use super::run::stop_ids;
use super::{ModelArgs, load_model, select_backend};
use anyhow::{Result, ensure};
use clap::Args;
use std::time::Duration;
use tern::engine::Engine;
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
    /// Sequences generated at once (KV-cache slots of --ctx tokens each).
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Requests that may wait for a slot; more are refused with 503 and Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Key clients must send as `Authorization: Bearer KEY` (every route but /health).
    #[arg(long)]
    api_key: Option<String>,
    /// Seconds running requests may continue after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
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
    };
    let model = args.model;
    let parallel = args.parallel;
    serve(
        options,
        Box::new(move || {
            let loaded = load_model(&model.model)?;
            // A server handles text: no tokenizer, no server (the error says why).
            let tokenizer = loaded.tokenizer?;
            let mut backend =
                select_backend(model.backend, model.threads, model.device.as_deref())?;
            // Requests may sample any way and ask for log-probabilities: `auto` keeps the full head.
            model.lm_head.apply(backend.as_mut(), false)?;
            let engine = Engine::new(loaded.source.as_ref(), backend, model.ctx, parallel)?;
            let stops = stop_ids(&tokenizer, &engine);
            Ok((engine, tokenizer, stops))
        }),
    )
}
