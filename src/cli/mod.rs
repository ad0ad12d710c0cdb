//! Argument definitions, backend selection and model loading shared by the subcommands.

mod bench;
mod chat;
mod convert;
mod info;
mod perplexity;
mod run;
mod serve;
mod tokenize;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use tern::backend::cpu::CpuBackend;
use tern::backend::cuda::CudaBackend;
use tern::backend::selftest;
use tern::backend::wgpu::{WgpuBackend, WgpuOptions};
use tern::backend::{Backend, KvType, LmHead, Q8_EXACT_TOP_K};
use tern::engine::{Engine, KvOptions, KvPool};
use tern::hub;
use tern::loader::{ModelSource, open_model};
use tern::sampler::SamplingParams;
use tern::tokenizer::Tokenizer;

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Run 1.58-bit (ternary, BitNet b1.58) language models"
)]
pub struct Cli {
    /// Log more (-v: debug, -vv: trace). TERN_LOG overrides, e.g. TERN_LOG=tern=debug.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Complete a prompt (or answer one chat turn with --chat), streaming the text.
    Run(run::RunArgs),
    /// Interactive multi-turn chat with the model's chat template.
    Chat(chat::ChatArgs),
    /// Perplexity of a text file, in non-overlapping windows of --ctx tokens.
    Perplexity(perplexity::PerplexityArgs),
    /// Show the token ids (and pieces) of a text.
    Tokenize(tokenize::TokenizeArgs),
    /// Show a model's architecture, shapes, formats and memory needs.
    Info(info::InfoArgs),
    /// Measure prompt processing and generation speed (llama-bench style).
    Bench(bench::BenchArgs),
    /// Write a model as a ternary GGUF file (I2_S, TQ2_0 or TQ1_0).
    Convert(convert::ConvertArgs),
    /// Serve the model over HTTP with an OpenAI-compatible API (continuous batching).
    Serve(serve::ServeArgs),
}

pub fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(a) => run::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Perplexity(a) => perplexity::run(a),
        Command::Tokenize(a) => tokenize::run(a),
        Command::Info(a) => info::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Serve(a) => serve::run(a),
    }
}

pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "tern=info",
        1 => "tern=debug",
        _ => "tern=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}

/// Which device runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// CUDA if present, else wgpu, else CPU.
    Auto,
    Cuda,
    Wgpu,
    Cpu,
}

/// The model and device options every model-running subcommand takes.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model directory, or a Hugging Face repo id resolved in the local Hugging Face cache
    /// (downloaded when missing).
    #[arg(short, long, default_value = hub::DEFAULT_MODEL)]
    pub model: String,
    /// Device to run on.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// GPU to use: a CUDA device number, or a wgpu adapter's index or part of its name
    /// (default: CUDA device 0; for wgpu a discrete GPU first, or TERN_WGPU_ADAPTER).
    #[arg(long)]
    pub device: Option<String>,
    /// CPU threads (0: one per core).
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
    /// Context length in tokens (0: the model's maximum).
    #[arg(short = 'c', long, default_value_t = 0)]
    pub ctx: usize,
    #[arg(long, value_enum, default_value_t = LmHeadChoice::Auto)]
    pub lm_head: LmHeadChoice,
    /// How the KV cache stores keys and values: f32, or f16 (half the memory, on every backend).
    #[arg(long, value_enum, default_value_t = KvTypeChoice::F32)]
    pub kv_type: KvTypeChoice,
}

impl ModelArgs {
    /// The KV cache of `slots` sequences of --ctx positions in a pool of `pool`, of --kv-type.
    pub fn kv(&self, slots: usize, pool: KvPool) -> KvOptions {
        KvOptions {
            ctx: self.ctx,
            slots,
            kv_type: self.kv_type.into(),
            pool,
        }
    }
}

/// KV-cache value type (see `--kv-type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KvTypeChoice {
    F32,
    F16,
}

impl From<KvTypeChoice> for KvType {
    fn from(c: KvTypeChoice) -> Self {
        match c {
            KvTypeChoice::F32 => KvType::F32,
            KvTypeChoice::F16 => KvType::F16,
        }
    }
}

/// Output head. `f16`: the stored precision, every logit exact. `q8`: an 8-bit copy whose candidates
/// for the top 64 are re-scored exactly (exact greedy and top-k ≤ 64 sampling; the other logits,
/// so perplexity and log-probabilities, approximate). `auto` (default): `q8` where it changes no
/// output (greedy or top-k ≤ 64 sampling without penalties, no log-probabilities, on a
/// backend that has it), keeping exact only as many logits as the sampling reads (1 for greedy,
/// k for top-k), `f16` otherwise. The 8-bit copy is CPU only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LmHeadChoice {
    Auto,
    F16,
    Q8,
}

impl LmHeadChoice {
    /// Sets the output head on `backend` and returns it. `top_read`: the caller reads nothing
    /// but this many of the largest logits ([`SamplingParams::top_read`]), so `auto` may take the
    /// 8-bit head, keeping that many exact, where it is at most [`Q8_EXACT_TOP_K`].
    pub fn apply(self, backend: &mut dyn Backend, top_read: Option<usize>) -> Result<LmHead> {
        let head = match (self, top_read.filter(|&n| n <= Q8_EXACT_TOP_K)) {
            (Self::F16, _) => LmHead::Full,
            (Self::Q8, _) => LmHead::Q8 {
                top: Q8_EXACT_TOP_K,
            },
            (Self::Auto, Some(top)) if backend.set_lm_head(LmHead::Q8 { top }).is_ok() => {
                tracing::info!(
                    "output head: 8-bit copy, top {top} re-scored exactly \
                     (the same tokens as the full head for this sampling)"
                );
                return Ok(LmHead::Q8 { top });
            }
            (Self::Auto, _) => LmHead::Full,
        };
        backend.set_lm_head(head)?;
        Ok(head)
    }
}

/// Creates the backend the user asked for; `auto` tries CUDA, then wgpu, then the CPU, and logs
/// where it settled and why in one line (the probes' own details go to the debug log).
pub fn select_backend(
    choice: BackendChoice,
    threads: usize,
    device: Option<&str>,
) -> Result<Box<dyn Backend>> {
    let cuda = || {
        cuda_ordinal(device)
            .and_then(CudaBackend::new)
            .and_then(self_tested)
    };
    let backend: Box<dyn Backend> = match choice {
        BackendChoice::Cuda => {
            Box::new(cuda().context("--backend cuda: CUDA is not usable on this machine")?)
        }
        BackendChoice::Wgpu => Box::new(
            WgpuBackend::new(&wgpu_options(device))
                .and_then(self_tested)
                .map_err(|e| e.context("--backend wgpu"))?,
        ),
        BackendChoice::Cpu => Box::new(CpuBackend::new(threads)?),
        BackendChoice::Auto => {
            let (backend, why): (Box<dyn Backend>, _) = match cuda() {
                Ok(cuda) => (Box::new(cuda), "CUDA comes first".to_string()),
                Err(cuda) => match auto_wgpu(device) {
                    Ok(gpu) => (Box::new(gpu), format!("CUDA not usable ({cuda:#})")),
                    Err(wgpu) => (
                        Box::new(CpuBackend::new(threads)?),
                        format!("CUDA not usable ({cuda:#}); wgpu not used ({wgpu:#})"),
                    ),
                },
            };
            tracing::info!(
                "backend: {}, chosen by --backend auto: {why}",
                backend.describe()
            );
            return Ok(backend);
        }
    };
    tracing::info!("backend: {}", backend.describe());
    Ok(backend)
}

/// `backend` once it has passed the start-up self-test (src/backend/selftest.rs), which runs a few
/// small ops against the CPU reference; the error names the op that differs.
fn self_tested<B: Backend>(mut backend: B) -> Result<B> {
    let started = std::time::Instant::now();
    selftest::run(&mut backend).with_context(|| {
        format!(
            "the start-up self-test failed on {}: its kernels give wrong results on this device",
            backend.describe()
        )
    })?;
    tracing::debug!("self-test passed in {:.1?}", started.elapsed());
    Ok(backend)
}

/// The CUDA device number `--device` names (0 when not given).
fn cuda_ordinal(device: Option<&str>) -> Result<usize> {
    device.map_or(Ok(0), |d| {
        d.parse()
            .map_err(|_| anyhow::anyhow!("--device `{d}` is not a CUDA device number"))
    })
}

/// wgpu options from the environment, with `--device` choosing the adapter.
fn wgpu_options(device: Option<&str>) -> WgpuOptions {
    let mut options = WgpuOptions::from_env();
    if let Some(d) = device {
        options.adapter = Some(d.to_string());
    }
    options
}

/// The wgpu backend for `auto`: a software adapter (e.g. lavapipe) counts as absent, since the
/// CPU backend is faster than a GPU emulated on the same cores.
fn auto_wgpu(device: Option<&str>) -> Result<WgpuBackend> {
    let gpu = WgpuBackend::new(&wgpu_options(device))?;
    if gpu.is_software() {
        bail!(
            "only a software adapter, {}, slower than the CPU backend",
            gpu.adapter_name()
        );
    }
    self_tested(gpu)
}

/// A model opened from disk: its weights as a streaming source (read when uploaded), tokenizer (or
/// why it cannot be built) and where they came from.
pub struct LoadedModel {
    pub source: Box<dyn ModelSource>,
    /// Only commands that handle text need it: see [`LoadedModel::tokenizer_if_any`].
    pub tokenizer: Result<Tokenizer>,
    pub path: PathBuf,
}

impl LoadedModel {
    /// The tokenizer for a command that can do without one (bench, info, convert): `None`, with a
    /// warning saying why, when it cannot be built.
    pub fn tokenizer_if_any(&self) -> Option<&Tokenizer> {
        match &self.tokenizer {
            Ok(tokenizer) => Some(tokenizer),
            Err(e) => {
                tracing::warn!("continuing without a tokenizer: {e:#}");
                None
            }
        }
    }
}

/// Resolves `-m` (directory, GGUF file or repo id) and opens weights and tokenizer.
pub fn load_model(spec: &str) -> Result<LoadedModel> {
    let path = hub::resolve_model(spec)?;
    let (source, tokenizer) = open_model(&path)?;
    let c = source.config();
    tracing::info!(
        "opened {} ({} layers, hidden {}) from {}",
        c.architecture,
        c.layers,
        c.hidden,
        path.display(),
    );
    Ok(LoadedModel {
        source,
        tokenizer,
        path,
    })
}

/// Builds an engine for `source` (its weights streamed to the backend as they are uploaded) with one
/// sequence slot and a KV pool of `pool` on the chosen backend. `top_read`: see
/// [`LmHeadChoice::apply`].
pub fn engine_for(
    args: &ModelArgs,
    source: &dyn ModelSource,
    top_read: Option<usize>,
    pool: KvPool,
) -> Result<Engine> {
    let mut backend = select_backend(args.backend, args.threads, args.device.as_deref())?;
    args.lm_head.apply(backend.as_mut(), top_read)?;
    let started = std::time::Instant::now();
    let engine = Engine::with_kv(source, backend, args.kv(1, pool))?;
    tracing::info!("loaded in {:.1} s", started.elapsed().as_secs_f64());
    Ok(engine)
}

/// Sampling flags, with llama.cpp's defaults.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Temperature (0: greedy).
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep the K most likely tokens (0: off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches P (1: off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than P times the most likely one (0: off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalty for tokens among the last --repeat-last-n (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Subtracted from a token's logit once per time it occurs among the last --repeat-last-n
    /// (-2 to 2; 0: off).
    #[arg(long, default_value_t = 0.0, value_parser = penalty)]
    pub frequency_penalty: f32,
    /// Subtracted from the logit of every token among the last --repeat-last-n (-2 to 2; 0: off).
    #[arg(long, default_value_t = 0.0, value_parser = penalty)]
    pub presence_penalty: f32,
    /// How many of the most recent tokens (prompt and generated) the penalties look at.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed (default: from the clock; printed so a run can be repeated).
    #[arg(short, long)]
    pub seed: Option<u64>,
    /// Greedy decoding (same as --temp 0).
    #[arg(long)]
    pub greedy: bool,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        let greedy = self.greedy || self.temperature <= 0.0;
        let seed = self.seed.unwrap_or_else(|| {
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            if !greedy {
                tracing::info!("seed: {seed}");
            }
            seed
        });
        SamplingParams {
            temperature: if greedy { 0.0 } else { self.temperature },
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            repeat_last_n: self.repeat_last_n,
            seed,
        }
    }
}

/// A frequency or presence penalty: a number from -2 to 2, as OpenAI's API takes.
fn penalty(text: &str) -> Result<f32, String> {
    match text.parse::<f32>() {
        Ok(p) if (-2.0..=2.0).contains(&p) => Ok(p),
        _ => Err(format!("`{text}` is not a number from -2 to 2")),
    }
}

/// Output format of commands that print one result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TextOrJson {
    Text,
    Json,
}
