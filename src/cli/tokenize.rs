//! `tern tokenize`: token ids and pieces of a text.

use super::TextOrJson;
use anyhow::Result;
use clap::Args;
use serde_json::json;
use tern::hub;
use tern::loader::load_tokenizer;

#[derive(Args)]
pub struct TokenizeArgs {
    /// Model directory, GGUF file (a vocab-only one too) or Hugging Face repo id.
    #[arg(short, long, default_value = hub::DEFAULT_MODEL)]
    model: String,
    /// The text to tokenize.
    #[arg(short, long)]
    prompt: String,
    /// Do not add special tokens (BOS).
    #[arg(long)]
    no_special: bool,
    #[arg(long, value_enum, default_value_t = TextOrJson::Text)]
    format: TextOrJson,
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let tokenizer = load_tokenizer(&hub::resolve_model(&args.model)?)?;
    let ids = tokenizer.encode(&args.prompt, !args.no_special)?;
    let pieces: Vec<String> = ids
        .iter()
        .map(|&id| tokenizer.id_to_piece(id).unwrap_or_default())
        .collect();
    match args.format {
        TextOrJson::Json => println!("{}", json!({"ids": ids, "tokens": pieces})),
        TextOrJson::Text => {
            for (id, piece) in ids.iter().zip(&pieces) {
                println!("{id:>8} {piece:?}");
            }
        }
    }
    Ok(())
}
