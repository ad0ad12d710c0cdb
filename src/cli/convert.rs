//! `tern convert`: any model tern loads, or random weights of a `--shape`, written as a ternary GGUF
//! file (I2_S for bitnet.cpp, TQ2_0 / TQ1_0 for llama.cpp), streamed a layer at a time. The mapping
//! is in `tern::gguf::write`.

use super::load_model;
use anyhow::{Result, anyhow, ensure};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use tern::bench::ShapePreset;
use tern::gguf::write::{TernaryTarget, VocabSource, write_model_gguf_file};
use tern::gguf::{GgufFile, is_gguf};
use tern::hub;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    /// bitnet.cpp's I2_S (2 bits per weight, per-tensor f32 scale).
    #[value(name = "i2_s")]
    I2S,
    /// llama.cpp's TQ2_0 (2.06 bits per weight).
    #[value(name = "tq2_0")]
    Tq2_0,
    /// llama.cpp's TQ1_0 (1.69 bits per weight).
    #[value(name = "tq1_0")]
    Tq1_0,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// Model directory, GGUF file, or Hugging Face repo id.
    #[arg(short, long, default_value = hub::DEFAULT_MODEL, conflicts_with = "shape")]
    model: String,
    /// Random weights in a preset shape instead of a model (see `tern bench --help`), with a dummy
    /// byte-level BPE vocabulary of the shape's size, for measuring the peers on the same weights.
    #[arg(long)]
    shape: Option<String>,
    /// Seed of the random weights (with --shape).
    #[arg(long, default_value_t = 7, requires = "shape")]
    seed: u64,
    /// Ternary tensor type of the output.
    #[arg(long = "to", value_enum)]
    to: Target,
    /// Output GGUF file.
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let target = match args.to {
        Target::I2S => TernaryTarget::I2S,
        Target::Tq2_0 => TernaryTarget::Tq2_0,
        Target::Tq1_0 => TernaryTarget::Tq1_0,
    };
    let notes = match &args.shape {
        Some(shape) => {
            let preset = ShapePreset::parse(shape)?;
            let name = format!("random-ternary-{}", preset.name);
            let source = preset.random_source(args.seed);
            write_model_gguf_file(&source, VocabSource::Dummy, target, &name, &args.output)?
        }
        None => convert_model(&args, target)?,
    };
    for note in &notes {
        tracing::warn!("{note}");
    }
    let bytes = std::fs::metadata(&args.output).map_or(0, |m| m.len());
    println!(
        "wrote {} ({:?}, {:.1} MiB)",
        args.output.display(),
        target,
        bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

/// Converts the model `-m` names; returns the writer's notes.
fn convert_model(args: &ConvertArgs, target: TernaryTarget) -> Result<Vec<String>> {
    let loaded = load_model(&args.model)?;
    ensure!(
        loaded.path != args.output,
        "-o {} would overwrite the input",
        args.output.display()
    );
    let name = loaded
        .path
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    // A GGUF source keeps its vocabulary exactly (any kind, even one tern cannot build a tokenizer
    // from); a model directory's tokenizer is serialized.
    let source = is_gguf(&loaded.path)
        .then(|| GgufFile::open(&loaded.path))
        .transpose()?
        .filter(|file| file.get("tokenizer.ggml.model").is_some());
    let vocab = match &source {
        Some(file) => {
            // Only for its warning: the keys are copied whether or not a tokenizer can be built.
            loaded.tokenizer_if_any();
            VocabSource::Metadata(&file.metadata)
        }
        None => VocabSource::Tokenizer(loaded.tokenizer.as_ref().map_err(|e| anyhow!("{e:#}"))?),
    };
    let model = loaded.source.as_ref();
    write_model_gguf_file(model, vocab, target, &name, &args.output)
}
