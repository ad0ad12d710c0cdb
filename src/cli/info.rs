//! `tern info`: what a model is and what running it takes.

use super::{TextOrJson, load_model};
use anyhow::Result;
use clap::Args;
use serde_json::json;
use tern::backend::PAGE_SIZE;
use tern::hub;
use tern::ternary::DenseMatrix;

#[derive(Args)]
pub struct InfoArgs {
    /// Model directory, GGUF file or Hugging Face repo id.
    #[arg(short, long, default_value = hub::DEFAULT_MODEL)]
    model: String,
    /// Context length the KV-cache figure is given for (0: the model's maximum).
    #[arg(short = 'c', long, default_value_t = 0)]
    ctx: usize,
    #[arg(long, value_enum, default_value_t = TextOrJson::Text)]
    format: TextOrJson,
}

pub fn run(args: InfoArgs) -> Result<()> {
    let loaded = load_model(&args.model)?;
    let source = loaded.source.as_ref();
    let c = source.config();
    let (ternary_params, ternary_bytes) = c.ternary_size();
    // Shapes are fixed by the config, which the loaders check every tensor against; the tables
    // are opened (mapped or decoded) to say where they live.
    let embed = source.embed()?;
    let output = source.output()?;
    let dense_params = c.vocab * c.hidden * if output.is_some() { 2 } else { 1 };
    let norm_params = c.hidden * (1 + 2 * c.layers)
        + if c.sub_norms {
            c.layers * (c.q_dim() + c.intermediate)
        } else {
            0
        };
    let dense_bytes = embed.bytes() + output.as_ref().map_or(0, |o| o.bytes());
    let storage = |m: &DenseMatrix| {
        if m.is_mapped() {
            "mapped from the file (read in place, not copied)"
        } else {
            "resident (decoded into memory)"
        }
    };
    let ctx = if args.ctx == 0 {
        c.max_positions
    } else {
        args.ctx
    };
    // Keys and values of every layer, per position, in f32 (--kv-type f16: half).
    let kv_bytes_per_token = 2 * c.layers * c.kv_dim() * 4;
    let kv_pool_at_ctx = ctx.div_ceil(PAGE_SIZE) * PAGE_SIZE * kv_bytes_per_token;
    let info = json!({
        "path": loaded.path.display().to_string(),
        "format": source.format(),
        "architecture": c.architecture,
        "hidden_size": c.hidden,
        "intermediate_size": c.intermediate,
        "layers": c.layers,
        "heads": c.heads,
        "kv_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab,
        "max_positions": c.max_positions,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "activation": format!("{:?}", c.activation).to_lowercase(),
        "sub_norms": c.sub_norms,
        "tied_embeddings": c.tied_embeddings,
        "embedding_dtype": embed.dtype_name(),
        "tables": {
            "embedding": storage(&embed),
            "output_head": output.as_ref().map_or("tied to the embedding", |o| storage(o)),
            "ternary_weights": "resident in the backend's layout (repacked a layer at a time)",
        },
        "parameters": {
            "ternary": ternary_params,
            "embedding_and_head": dense_params,
            "norms": norm_params,
            "total": ternary_params + dense_params + norm_params,
        },
        "memory_bytes": {
            "ternary_packed": ternary_bytes,
            "embedding_and_head": dense_bytes,
            "kv_cache_per_token_f32": kv_bytes_per_token,
            "kv_cache_per_token_f16": kv_bytes_per_token / 2,
            "kv_page_positions": PAGE_SIZE,
            "kv_pool_at_ctx_f32": kv_pool_at_ctx,
            "kv_pool_at_ctx_f16": kv_pool_at_ctx / 2,
            "ctx": ctx,
        },
        // Shapes and sizes need no tokenizer: one that cannot be built is reported, not an error.
        "tokenizer": match &loaded.tokenizer {
            Ok(t) => json!({
                "vocab_size": t.vocab_size(),
                "bos_id": t.bos_id(),
                "eos_ids": t.eos_ids(),
                "chat_template": t.chat_template().is_some(),
            }),
            Err(e) => json!({ "unavailable": format!("{e:#}") }),
        },
    });
    match args.format {
        TextOrJson::Json => println!("{}", serde_json::to_string_pretty(&info)?),
        TextOrJson::Text => print_text(&info),
    }
    Ok(())
}

/// Prints the JSON object as indented `key: value` lines.
fn print_text(value: &serde_json::Value) {
    fn walk(v: &serde_json::Value, indent: usize) {
        if let Some(map) = v.as_object() {
            for (k, v) in map {
                match v {
                    serde_json::Value::Object(_) => {
                        println!("{:indent$}{k}:", "");
                        walk(v, indent + 2);
                    }
                    serde_json::Value::String(s) => println!("{:indent$}{k}: {s}", ""),
                    other => println!("{:indent$}{k}: {other}", ""),
                }
            }
        }
    }
    walk(value, 0);
}
