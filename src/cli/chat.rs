//! `tern chat`: an interactive conversation. Each turn re-renders the whole conversation with the
//! chat template and feeds only the tokens that differ from what the KV cache already holds.

use super::run::{chat_prompt_ids, report_stats, stop_ids, stream_generation};
use super::{ModelArgs, SamplingArgs, engine_for, load_model};
use anyhow::Result;
use clap::Args;
use std::io::{BufRead, Write};
use tern::chat::ChatMessage;
use tern::engine::{GenerateOptions, KvPool};
use tern::sampler::Sampler;

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// System message that opens the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Tokens to generate at most per reply.
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    n_predict: usize,
}

/// Positions the KV pool of `tern chat` holds before it first grows.
const CHAT_START_POSITIONS: usize = 512;

const HELP: &str =
    "commands: /help this text, /clear start a new conversation, /exit quit (also Ctrl-D)";

pub fn run(args: ChatArgs) -> Result<()> {
    // One call: a seed drawn from the clock is drawn (and logged) once.
    let sampling = args.sampling.params();
    let top_read = sampling.top_read();
    let loaded = load_model(&args.model.model)?;
    let tokenizer = loaded.tokenizer?;
    // A conversation's length is not known: the pool starts with room for CHAT_START_POSITIONS
    // and doubles as the conversation grows, up to the context.
    let pool = KvPool::Growing(CHAT_START_POSITIONS);
    let mut engine = engine_for(&args.model, loaded.source.as_ref(), top_read, pool)?;
    drop(loaded.source);
    let mut sampler = Sampler::new(sampling);
    let seq = engine.new_sequence()?;
    let options = GenerateOptions {
        max_tokens: args.n_predict,
        stop_ids: stop_ids(&tokenizer, &engine),
        top_logprobs: 0,
    };
    let opening: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s.as_str()))
        .collect();
    let mut messages = opening.clone();
    // The ids whose keys and values are in the cache, in order.
    let mut cached: Vec<u32> = Vec::new();
    eprintln!("{HELP}");
    let mut lines = std::io::stdin().lock().lines();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let Some(line) = lines.next().transpose()? else {
            break;
        };
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/help" => eprintln!("{HELP}"),
            "/clear" => {
                messages = opening.clone();
                cached.clear();
                engine.clear(seq)?;
                eprintln!("(conversation cleared)");
            }
            text => {
                messages.push(ChatMessage::new("user", text));
                let ids = chat_prompt_ids(&tokenizer, &messages)?;
                // Reuse the longest cached prefix; always feed at least one token.
                let common = cached
                    .iter()
                    .zip(&ids)
                    .take_while(|(a, b)| a == b)
                    .count()
                    .min(ids.len() - 1);
                engine.truncate(seq, common)?;
                cached.truncate(common);
                match stream_generation(
                    &mut engine,
                    &tokenizer,
                    seq,
                    &ids[common..],
                    &options,
                    &mut sampler,
                    false,
                ) {
                    Ok(reply) => {
                        report_stats(&reply.stats);
                        // The cache holds the prompt and every reply id but a final stop id.
                        let fed = engine.sequence_len(seq)? - ids.len();
                        cached = [&ids[..], &reply.ids[..fed]].concat();
                        messages.push(ChatMessage::new("assistant", reply.text.trim()));
                    }
                    Err(e) => {
                        messages.pop();
                        engine.truncate(seq, common)?;
                        eprintln!("error: {e:#}\n(turn dropped; /clear starts a new conversation)");
                    }
                }
            }
        }
    }
    Ok(())
}
