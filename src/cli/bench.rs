//! `tern bench`: llama-bench-style pp/tg table on a loaded model or a random model of a real shape.

use super::{BackendChoice, KvTypeChoice, LmHeadChoice, load_model, select_backend};
use anyhow::{Result, ensure};
use clap::{Args, ValueEnum};
use std::time::Instant;
use tern::backend::resolve_threads;
use tern::bench::{
    BenchPlan, BenchRow, PeakRss, ShapePreset, available_memory, decode_weight_bytes, markdown,
    read_bandwidth, run as run_plan,
};
use tern::engine::{Engine, KvOptions, KvPool};
use tern::loader::ModelSource;

#[derive(Args)]
pub struct BenchArgs {
    /// Model directory, GGUF file or Hugging Face repo id (or use --shape).
    #[arg(short, long, conflicts_with = "shape")]
    model: Option<String>,
    /// Random weights in the exact shape of a published model: 2b4t, 700m, 3b, 8b, or one of
    /// bitnet.cpp's dummy layouts 125m, 350m, 1b, 1.5b, 2.7b, 3.8b, 7b, 13b, 30b, 70b, 100b.
    #[arg(long)]
    shape: Option<String>,
    /// Prompt lengths to test (comma-separated; 0 skips).
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    prompt: Vec<usize>,
    /// Generation lengths to test (comma-separated; 0 skips).
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    gen_tokens: Vec<usize>,
    /// Sequences decoding together in the generation tests (comma-separated): `tgN xP` runs P
    /// sequences a row each per step, as `tern serve` does, and reports their summed tokens/s.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    parallel: Vec<usize>,
    /// Timed repetitions per test (after one warm-up run).
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    repetitions: usize,
    /// Thread counts to test (comma-separated; 0: one per core).
    #[arg(short, long, value_delimiter = ',', default_value = "0")]
    threads: Vec<usize>,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// GPU to use: a CUDA device number, or a wgpu adapter's index or part of its name.
    #[arg(long)]
    device: Option<String>,
    /// Output head: auto, f16 or q8 (see `tern run --help`); generation here is greedy, so `auto`
    /// takes the 8-bit copy where the backend has one.
    #[arg(long, value_enum, default_value_t = LmHeadChoice::Auto)]
    lm_head: LmHeadChoice,
    /// KV-cache value type (see `tern run --help`); the pool holds the longest test's tokens.
    #[arg(long, value_enum, default_value_t = KvTypeChoice::F32)]
    kv_type: KvTypeChoice,
    #[arg(long, value_enum, default_value_t = BenchFormat::Md)]
    format: BenchFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BenchFormat {
    Md,
    Json,
}

pub fn run(args: BenchArgs) -> Result<()> {
    PeakRss::reset();
    let started = Instant::now();
    let preset = args.shape.as_deref().map(ShapePreset::parse).transpose()?;
    let (source, name): (Box<dyn ModelSource>, String) = match (preset, &args.model) {
        (Some(preset), _) => {
            let name = args.shape.clone().unwrap_or_default();
            (Box::new(preset.random_source(7)), name)
        }
        (None, Some(model)) => {
            // A benchmark feeds token ids, not text: a model without a usable tokenizer runs.
            let loaded = load_model(model)?;
            loaded.tokenizer_if_any();
            (loaded.source, model.clone())
        }
        (None, None) => anyhow::bail!(
            "give a model with -m or a shape with --shape ({})",
            ShapePreset::names()
        ),
    };
    let config = source.config().clone();
    let longest = args
        .prompt
        .iter()
        .chain(&args.gen_tokens)
        .copied()
        .max()
        .unwrap_or(0);
    ensure!(longest > 0, "nothing to measure: every -p and -n is 0");
    ensure!(
        args.parallel.iter().all(|&p| p > 0),
        "--parallel: every count must be at least 1"
    );
    let slots = args.parallel.iter().copied().max().unwrap_or(1);
    ensure!(
        longest <= config.max_positions,
        "a test of {longest} tokens exceeds the model's context of {}",
        config.max_positions
    );
    let ternary_params = config.ternary_size().0 as f64;
    // Opening the source (headers, config) counts towards the first thread count's load; each
    // thread count reads (or generates) the weights again as its backend takes them.
    let mut opened_s = started.elapsed().as_secs_f64();
    let mut rows: Vec<BenchRow> = Vec::new();
    for (run, &threads) in args.threads.iter().enumerate() {
        if run > 0 {
            // This thread count's peak: its own load and tests. Not reset after the last, so the
            // process's peak as the OS reports it at exit (`/usr/bin/time`) covers every row.
            PeakRss::reset();
        }
        let upload_started = Instant::now();
        let mut backend = select_backend(args.backend, threads, args.device.as_deref())?;
        if let Some(preset) = preset {
            // Random weights stream into the backend a layer at a time. Refuse what cannot fit,
            // rather than be killed.
            let needed = preset.load_bytes(backend.host_bits_per_weight());
            if let Some(available) = available_memory() {
                ensure!(
                    needed <= available,
                    "--shape {}: {} needs about {:.1} GB (its weights at {:.2} bits, one layer \
                     being generated, the tables and the 8-bit head), {:.1} GB are available",
                    preset.name,
                    backend.describe(),
                    needed as f64 / 1e9,
                    backend.host_bits_per_weight(),
                    available as f64 / 1e9
                );
            }
        }
        // Generation here is greedy: the 8-bit head (where `auto` takes it) changes no token.
        let head = args.lm_head.apply(backend.as_mut(), Some(1))?;
        let kv = KvOptions {
            ctx: longest,
            slots,
            kv_type: args.kv_type.into(),
            pool: KvPool::Full,
        };
        let mut engine = Engine::with_kv(source.as_ref(), backend, kv)?;
        let load_s = std::mem::take(&mut opened_s) + upload_started.elapsed().as_secs_f64();
        let weight_bytes = decode_weight_bytes(
            &config,
            engine.linear_weight_bytes(),
            engine.head_bytes(),
            head,
        );
        let threads = resolve_threads(threads);
        for &p in &args.prompt {
            let plan = BenchPlan {
                prompt_tokens: p,
                gen_tokens: 0,
                parallel: 1,
                repetitions: args.repetitions,
            };
            rows.extend(run_plan(&mut engine, &plan, &name, threads, weight_bytes)?);
        }
        for &n in &args.gen_tokens {
            for &parallel in &args.parallel {
                let plan = BenchPlan {
                    prompt_tokens: 0,
                    gen_tokens: n,
                    parallel,
                    repetitions: args.repetitions,
                };
                rows.extend(run_plan(&mut engine, &plan, &name, threads, weight_bytes)?);
            }
        }
        let peak_rss_bytes = PeakRss::read();
        drop(engine); // free the model's memory before the bandwidth probe
        let bandwidth = read_bandwidth(threads);
        tracing::info!("measured read bandwidth with {threads} threads: {bandwidth:.1} GB/s");
        for row in rows.iter_mut().filter(|r| r.threads == threads) {
            row.int8_gops = Some(2.0 * ternary_params * row.tok_s / 1e9);
            row.bandwidth_fraction = row.gb_s.map(|g| g / bandwidth);
            row.load_s = Some(load_s);
            row.peak_rss_bytes = peak_rss_bytes;
        }
    }
    match args.format {
        BenchFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        BenchFormat::Md => print!("{}", markdown(&rows)),
    }
    Ok(())
}
