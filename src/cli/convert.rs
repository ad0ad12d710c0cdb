//! `tern convert`: any model tern loads, written as a ternary GGUF file (I2_S for bitnet.cpp, TQ2_0 /
//! TQ1_0 for llama.cpp). The mapping is in `tern::gguf::write`.

use super::load_model;
use anyhow::{Result, anyhow, ensure};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use tern::gguf::write::{TernaryTarget, VocabSource, model_to_gguf};
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
    #[arg(short, long, default_value = hub::DEFAULT_MODEL)]
    model: String,
    /// Ternary tensor type of the output.
    #[arg(long = "to", value_enum)]
    to: Target,
    /// Output GGUF file.
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let loaded = load_model(&args.model)?;
    ensure!(
        loaded.path != args.output,
        "-o {} would overwrite the input",
        args.output.display()
    );
    let target = match args.to {
        Target::I2S => TernaryTarget::I2S,
        Target::Tq2_0 => TernaryTarget::Tq2_0,
        Target::Tq1_0 => TernaryTarget::Tq1_0,
    };
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
    let (writer, notes) = model_to_gguf(&loaded.host, vocab, target, &name)?;
    for note in &notes {
        tracing::warn!("{note}");
    }
    writer.write(&args.output)?;
    let bytes = std::fs::metadata(&args.output).map_or(0, |m| m.len());
    println!(
        "wrote {} ({:?}, {:.1} MiB)",
        args.output.display(),
        target,
        bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}
