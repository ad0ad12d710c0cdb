//! A [`Tokenizer`] from GGUF metadata (`tokenizer.ggml.*`), assembled from the `tokenizers` crate's
//! models, normalizers, pre-tokenizers and decoders so that it encodes as llama.cpp (and the Hugging
//! Face tokenizer the file was converted from) does.
//!
//! `tokenizer.ggml.model`:
//! - `llama`: SentencePiece BPE (Llama 1/2, 1bitLLM, ...). A BPE model with byte fallback (`<0xXX>`
//!   tokens) whose merges are derived from `tokenizer.ggml.scores` the way transformers converts a
//!   SentencePiece model: every split of a token into two tokens is a merge, ranked by the merged
//!   token's score (highest first), ties in token order. Spaces become `▁`, and one is prepended to
//!   the text (and after each special token) unless `tokenizer.ggml.add_space_prefix` is false;
//!   decoding removes that leading space again.
//! - `gpt2`: byte-level BPE with `tokenizer.ggml.merges`. `tokenizer.ggml.pre` names llama.cpp's list
//!   of split regexes ([`PRE_TOKENIZERS`]): each regex in turn splits every piece into its matches and
//!   the text between them. A missing `pre` means Llama-3's (bitnet.cpp writes 2B-4T files without
//!   it), with a note.
//!
//! Token types (`tokenizer.ggml.token_type`, llama.cpp's numbering): 2 (unknown) and 3 (control) are
//! special tokens, 4 (user-defined) added tokens; both are matched in the raw text before
//! normalization. BOS and EOS are added by a post-processor as `tokenizer.ggml.add_bos_token` /
//! `add_eos_token` say, with llama.cpp's defaults when absent (BOS for `llama` and the Llama-3
//! family, no EOS). Generation stops on the EOS, EOT and EOM ids and on control tokens that end
//! turns by name (`<|eot_id|>`, `<|im_end|>`, ...).
//!
//! Invariants: an unknown `model` or `pre` value is an error that names it and says how to supply a
//! tokenizer.json instead; malformed metadata is an error naming the key, never a panic.

use super::{GgufFile, Value};
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::json;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior,
};

/// GPT-2's split (llama.cpp's form, without the trailing `|\s+`: whitespace no alternative matches
/// becomes a piece of its own anyway).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama-3's split (case-insensitive contractions spelled out, as llama.cpp does).
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: Llama-3's with single digits.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen3.5's split: Qwen2's with combining marks inside words.
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// CJK ideographs and Hangul (DeepSeek's splits; code points spelled out, since an editor or a
/// terminal could normalize the characters themselves).
const CJK_HANGUL: &str = r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+";

/// One family of `tokenizer.ggml.pre` values and its rules, as llama.cpp's `llama-vocab.cpp` defines
/// them.
struct PreTokenizer {
    names: &'static [&'static str],
    /// Applied in order; each splits every piece into matches and the text between them.
    splits: &'static [&'static str],
    /// A piece that is a whole token is not merged further (Llama-3's `ignore_merges`).
    ignore_merges: bool,
    /// Whether BOS is added when `tokenizer.ggml.add_bos_token` is absent.
    add_bos: bool,
}

const PRE_TOKENIZERS: &[PreTokenizer] = &[
    PreTokenizer {
        names: &[
            "llama-bpe",
            "llama3",
            "llama-v3",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
        ],
        splits: &[LLAMA3],
        ignore_merges: true,
        add_bos: true,
    },
    PreTokenizer {
        names: &["dbrx", "smaug-bpe"],
        splits: &[LLAMA3],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["falcon"],
        splits: &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &[
            "gpt-2",
            "phi-2",
            "mpt",
            "olmo",
            "jais",
            "exaone4",
            "jina-es",
            "jina-de",
            "jina-v2-es",
            "jina-v2-de",
            "gigachat",
            "mellum",
            "modern-bert",
            "a.x-4.0",
        ],
        splits: &[GPT2],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &[
            "starcoder",
            "refact",
            "command-r",
            "smollm",
            "codeshell",
            "exaone",
            "minerva-7b",
        ],
        splits: &[r"\p{N}", GPT2],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &[
            "qwen2",
            "deepseek-r1-qwen",
            "stablelm2",
            "megrez",
            "hunyuan",
        ],
        splits: &[QWEN2],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["qwen35"],
        splits: &[QWEN35],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["deepseek-coder"],
        splits: &["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK_HANGUL, r"\p{N}"],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["deepseek-llm"],
        splits: &[
            "[\r\n]",
            r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+",
            r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+",
            r"\s+$",
            CJK_HANGUL,
            r"\p{N}+",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["default"],
        splits: &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
        ignore_merges: false,
        add_bos: false,
    },
];

/// Control tokens that end a turn or a document, by text (llama.cpp's end-of-generation names):
/// the GGUF names one EOS, the model may end turns with another.
const END_TOKENS: [&str; 7] = [
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
];

/// llama.cpp's token types.
const NORMAL: u64 = 1;
const UNKNOWN: u64 = 2;
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

/// BitNet b1.58 2B-4T's chat template, used where bitnet.cpp's converter wrote its placeholder.
const BITNET_2B4T_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}";

/// How to supply a tokenizer when the metadata cannot describe one.
const USE_TOKENIZER_JSON: &str = "put the model's tokenizer.json beside the file";

/// The tokenizer `tokenizer.ggml.*` and `tokenizer.chat_template` describe (see the module doc).
/// `notes` receives what was inferred or ignored.
pub fn tokenizer_from_metadata(file: &GgufFile, notes: &mut Vec<String>) -> Result<Tokenizer> {
    let meta = Meta(file);
    let model = meta.string("tokenizer.ggml.model")?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types = match meta.get("tokenizer.ggml.token_type") {
        None => vec![NORMAL; tokens.len()],
        Some(_) => meta.numbers("tokenizer.ggml.token_type", Value::as_u64)?,
    };
    ensure!(
        types.len() == tokens.len(),
        "`tokenizer.ggml.token_type` has {} entries for {} tokens",
        types.len(),
        tokens.len()
    );
    let mut vocab = Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        if vocab.contains_key(*token) {
            notes.push(format!(
                "token {id} ({token:?}) repeats an earlier token; ignored"
            ));
        } else {
            vocab.insert(token.to_string(), id as u32);
        }
    }

    // (tokenizer, SentencePiece?, whether BOS is added when `add_bos_token` is absent)
    let (mut inner, spm, default_add_bos) = match model {
        "llama" => (
            spm_tokenizer(&meta, &tokens, &types, vocab, notes)?,
            true,
            true,
        ),
        "gpt2" => {
            let pre = pre_tokenizer(&meta, notes)?;
            (byte_level_tokenizer(&meta, vocab, pre)?, false, pre.add_bos)
        }
        other => bail!(
            "`tokenizer.ggml.model` {other:?} is not supported from GGUF metadata (tern builds \
             \"llama\" (SentencePiece) and \"gpt2\" (byte-level BPE) tokenizers); \
             {USE_TOKENIZER_JSON}"
        ),
    };

    // Special and user-defined tokens are matched in the raw text (llama.cpp partitions the text
    // on them before tokenizing the pieces between).
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|&(id, (token, _))| inner.token_to_id(token) == Some(id as u32))
        .filter(|(_, (_, kind))| matches!(**kind, UNKNOWN | CONTROL | USER_DEFINED))
        .map(|(_, (token, &kind))| {
            AddedToken::from(token.to_string(), kind != USER_DEFINED).normalized(false)
        })
        .collect();
    inner
        .add_tokens(added)
        .map_err(|e| anyhow!("cannot add the special and user-defined tokens: {e}"))?;

    // llama.cpp's defaults for `llama` vocabularies without the keys, where the vocabulary has them.
    let default_id = |id: u32| (spm && (id as usize) < tokens.len()).then_some(id);
    let bos = meta
        .token_id("tokenizer.ggml.bos_token_id", tokens.len(), notes)?
        .or(default_id(1));
    let eos = meta
        .token_id("tokenizer.ggml.eos_token_id", tokens.len(), notes)?
        .or(default_id(2));
    let add_bos = meta
        .bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(default_add_bos);
    let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let bos_added = add_bos.then_some(bos).flatten();
    let eos_added = add_eos.then_some(eos).flatten();
    if add_bos && bos.is_none() {
        notes.push("`tokenizer.ggml.add_bos_token` is true but there is no BOS id".into());
    }
    if add_eos && eos.is_none() {
        notes.push("`tokenizer.ggml.add_eos_token` is true but there is no EOS id".into());
    }
    if bos_added.is_some() || eos_added.is_some() {
        inner.with_post_processor(Some(edge_tokens(&tokens, bos_added, eos_added)?));
    }

    let mut end_ids: Vec<u32> = eos.into_iter().collect();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        end_ids.extend(meta.token_id(key, tokens.len(), notes)?);
    }
    for text in END_TOKENS {
        if let Some(id) = tokens.iter().position(|&t| t == text)
            && types[id] == CONTROL
        {
            end_ids.push(id as u32);
        }
    }
    Tokenizer::from_parts(inner, chat_template(&meta, notes)?, bos, end_ids)
        .context("`tokenizer.chat_template`")
}

/// SentencePiece BPE: merges from the scores, byte fallback, `▁` for spaces.
fn spm_tokenizer(
    meta: &Meta,
    tokens: &[&str],
    types: &[u64],
    vocab: Vocab,
    notes: &mut Vec<String>,
) -> Result<tokenizers::Tokenizer> {
    let scores = match meta.get("tokenizer.ggml.scores") {
        // llama.cpp reads f32 or i32 scores.
        Some(_) => meta.numbers("tokenizer.ggml.scores", |v| match v {
            Value::I32(score) => Some(f64::from(*score)),
            other => other.as_f64(),
        })?,
        None => {
            notes.push(
                "`tokenizer.ggml.scores` is missing: SentencePiece merges ranked by token order"
                    .into(),
            );
            vec![0.0; tokens.len()]
        }
    };
    ensure!(
        scores.len() == tokens.len(),
        "`tokenizer.ggml.scores` has {} entries for {} tokens",
        scores.len(),
        tokens.len()
    );
    // transformers' SentencePiece extraction: for each token in id order, its splits into two
    // tokens ordered by (left id, right id); then a stable sort by the merged token's score.
    let mut merges: Vec<(f64, u32, u32)> = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        if vocab.get(*token) != Some(&(id as u32)) {
            continue;
        }
        let start = merges.len();
        for (at, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(at);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                merges.push((scores[id], l, r));
            }
        }
        merges[start..].sort_by_key(|&(_, l, r)| (l, r));
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    let merges = merges
        .into_iter()
        .map(|(_, l, r)| {
            (
                tokens[l as usize].to_string(),
                tokens[r as usize].to_string(),
            )
        })
        .collect();
    let unk = match meta.token_id("tokenizer.ggml.unknown_token_id", tokens.len(), notes)? {
        Some(id) => Some(id as usize),
        None => types.iter().position(|&t| t == UNKNOWN),
    };
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(tokens[unk].to_string());
    }
    let model = builder
        .build()
        .map_err(|e| anyhow!("cannot build the SentencePiece BPE model: {e}"))?;

    let add_space_prefix = meta
        .bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new("▁".into()).into());
    }
    normalizers.push(replace(" ", "▁")?.into());
    let decoders: Vec<DecoderWrapper> = vec![
        replace("▁", " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', usize::from(add_space_prefix), 0).into(),
    ];
    let mut inner = tokenizers::Tokenizer::new(model);
    inner
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|e| anyhow!("cannot set the SentencePiece normalizer: {e}"))?;
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

fn replace(from: &str, to: &str) -> Result<Replace> {
    Replace::new(from, to).map_err(|e| anyhow!("cannot build a replacement of {from:?}: {e}"))
}

/// Byte-level BPE with `tokenizer.ggml.merges` and the split regexes of `tokenizer.ggml.pre`.
fn byte_level_tokenizer(
    meta: &Meta,
    vocab: Vocab,
    pre: &PreTokenizer,
) -> Result<tokenizers::Tokenizer> {
    let merges = meta
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            // As llama.cpp: the first space after the first byte separates the two tokens.
            m.bytes()
                .skip(1)
                .position(|b| b == b' ')
                .map(|at| (m[..at + 1].to_string(), m[at + 2..].to_string()))
                .ok_or_else(|| {
                    anyhow!(
                        "`tokenizer.ggml.merges` holds {m:?}, not two tokens separated by a space"
                    )
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| anyhow!("cannot build the BPE model: {e}"))?;
    let mut splits: Vec<PreTokenizerWrapper> = pre
        .splits
        .iter()
        .map(|regex| {
            Split::new(
                SplitPattern::Regex((*regex).into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(Into::into)
            .map_err(|e| anyhow!("cannot compile the split regex {regex:?}: {e}"))
        })
        .collect::<Result<_>>()?;
    splits.push(ByteLevel::new(false, true, false).into());
    let mut inner = tokenizers::Tokenizer::new(model);
    inner
        .with_pre_tokenizer(Some(PreTokenizerSequence::new(splits)))
        .with_decoder(Some(ByteLevel::new(true, true, true)));
    Ok(inner)
}

/// The rules of `tokenizer.ggml.pre` (Llama-3's when absent, with a note).
fn pre_tokenizer(meta: &Meta, notes: &mut Vec<String>) -> Result<&'static PreTokenizer> {
    let name = match meta.get("tokenizer.ggml.pre") {
        None => {
            notes.push(
                "tokenizer.ggml.pre is missing: using the Llama-3 pre-tokenizer (llama-bpe)".into(),
            );
            "llama-bpe"
        }
        Some(_) => meta.string("tokenizer.ggml.pre")?,
    };
    PRE_TOKENIZERS
        .iter()
        .find(|p| p.names.contains(&name))
        .ok_or_else(|| {
            let known: Vec<&str> = PRE_TOKENIZERS
                .iter()
                .flat_map(|p| p.names)
                .copied()
                .collect();
            anyhow!(
                "`tokenizer.ggml.pre` {name:?} is not supported (tern knows {}); \
                 {USE_TOKENIZER_JSON}",
                known.join(", ")
            )
        })
}

/// A post-processor that puts BOS before and EOS after every sequence (transformers' template
/// processing, given as JSON so that token texts are never parsed as template syntax).
fn edge_tokens(
    tokens: &[&str],
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<PostProcessorWrapper> {
    let piece = |id: u32| json!({"SpecialToken": {"id": tokens[id as usize], "type_id": 0}});
    let sequence = |name: &str| json!({"Sequence": {"id": name, "type_id": 0}});
    let around = |name: &str| {
        let mut pieces: Vec<_> = bos.map(piece).into_iter().collect();
        pieces.push(sequence(name));
        pieces.extend(eos.map(piece));
        pieces
    };
    let mut pair = around("A");
    pair.extend(around("B"));
    let special: serde_json::Map<_, _> = bos
        .into_iter()
        .chain(eos)
        .map(|id| {
            let text = tokens[id as usize];
            (
                text.to_string(),
                json!({"id": text, "ids": [id], "tokens": [text]}),
            )
        })
        .collect();
    serde_json::from_value(json!({
        "type": "TemplateProcessing", "single": around("A"), "pair": pair,
        "special_tokens": special,
    }))
    .map_err(|e| anyhow!("cannot build the BOS/EOS post-processor: {e}"))
}

/// `tokenizer.chat_template`; bitnet.cpp's placeholder becomes 2B-4T's real template (noted).
fn chat_template(meta: &Meta, notes: &mut Vec<String>) -> Result<Option<String>> {
    if meta.get("tokenizer.chat_template").is_none() {
        return Ok(None);
    }
    let template = meta.string("tokenizer.chat_template")?;
    if template.contains("BITNETAssistant") {
        notes.push(
            "chat template: bitnet.cpp's placeholder replaced by BitNet b1.58 2B-4T's template"
                .into(),
        );
        return Ok(Some(BITNET_2B4T_TEMPLATE.to_string()));
    }
    Ok(Some(template.to_string()))
}

/// Typed access to metadata, with errors naming the key.
struct Meta<'a>(&'a GgufFile);

impl<'a> Meta<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key)
    }

    fn string(&self, key: &str) -> Result<&'a str> {
        self.get(key)
            .ok_or_else(|| anyhow!("`{key}` is missing"))?
            .as_str()
            .ok_or_else(|| anyhow!("`{key}` is not a string"))
    }

    fn array(&self, key: &str) -> Result<&'a [Value]> {
        self.get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("`{key}` is missing or not an array"))
    }

    fn strings(&self, key: &str) -> Result<Vec<&'a str>> {
        self.array(key)?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| anyhow!("`{key}` holds a non-string"))
            })
            .collect()
    }

    fn numbers<T>(&self, key: &str, convert: impl Fn(&Value) -> Option<T>) -> Result<Vec<T>> {
        self.array(key)?
            .iter()
            .map(|v| convert(v).ok_or_else(|| anyhow!("`{key}` holds {}", v.summary())))
            .collect()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| anyhow!("`{key}` is not a bool")))
            .transpose()
    }

    /// A token id. One outside the vocabulary is ignored with a note, as llama.cpp does.
    fn token_id(&self, key: &str, vocab: usize, notes: &mut Vec<String>) -> Result<Option<u32>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let id = v
            .as_u64()
            .ok_or_else(|| anyhow!("`{key}` is {}, not a token id", v.summary()))?;
        if id >= vocab as u64 {
            notes.push(format!(
                "`{key}` {id} is outside the vocabulary of {vocab} tokens; ignored"
            ));
            return Ok(None);
        }
        Ok(Some(id as u32))
    }
}
