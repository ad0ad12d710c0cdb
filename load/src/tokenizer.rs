//! Text to token ids and back: a Hugging Face `tokenizers` tokenizer plus the model's special tokens.
//!
//! Invariants:
//! - `encode` matches transformers' `tokenizer(text, add_special_tokens=...)` exactly: special-token
//!   strings inside the text (e.g. a literal `<|eot_id|>`) become their special ids, and with
//!   `add_special_tokens` the tokenizer's post-processor adds BOS (unless `add_bos_token` overrides it).
//! - `decode` matches transformers' `decode(ids, skip_special_tokens=...)`.
//! - [`Tokenizer::eos_ids`] is the deduplicated union of every end-of-sequence id the model directory
//!   declares (`generation_config.json`, `config.json`, `tokenizer_config.json`): generation stops on
//!   any of them, because models end turns with a token (`<|eot_id|>`) other than `config.json`'s EOS.
//! - [`StreamDecoder`] emits text incrementally and never splits a UTF-8 character; the concatenation
//!   of everything it emits equals `decode` of all ids it was fed, with the same `skip_special_tokens`.
//! - Malformed files are errors naming the file and the field, never panics.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Map, Value};

use crate::chat::ChatTemplate;

/// A tokenizer with the model's BOS/EOS ids and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<ChatTemplate>,
    /// `add_bos_token` from the model files; `None` leaves BOS to the post-processor.
    add_bos: Option<bool>,
    /// Whether `inner.encode(.., true)` already starts with BOS (its post-processor adds it).
    post_processor_adds_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face model directory: `tokenizer.json` (required), and when present
    /// `tokenizer_config.json` (`chat_template`, `bos_token`, `eos_token`, `add_bos_token`),
    /// `chat_template.jinja` (overrides `tokenizer_config.json`'s template, as in transformers),
    /// `generation_config.json` and `config.json` (`bos_token_id`, `eos_token_id`).
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            bail!(
                "{}: not found (a model directory needs tokenizer.json)",
                tokenizer_path.display()
            );
        }
        let inner = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| anyhow!("{}: not a valid tokenizer: {e}", tokenizer_path.display()))?;

        let tc_path = dir.join("tokenizer_config.json");
        let gen_path = dir.join("generation_config.json");
        let cfg_path = dir.join("config.json");
        let tc = read_json_object(&tc_path)?.unwrap_or_default();
        let gen_cfg = read_json_object(&gen_path)?.unwrap_or_default();
        let cfg = read_json_object(&cfg_path)?.unwrap_or_default();

        // (template source, where it came from) for error messages.
        let mut template = chat_template_field(&tc_path, &tc)?
            .map(|t| (t, format!("{}: field `chat_template`", tc_path.display())));
        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.is_file() {
            let source = std::fs::read_to_string(&jinja_path)
                .with_context(|| format!("{}: cannot read", jinja_path.display()))?;
            template = Some((source, jinja_path.display().to_string()));
        }
        let add_bos = match tc.get("add_bos_token") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => bail!(
                "{}: field `add_bos_token` must be true or false, got {other}",
                tc_path.display()
            ),
        };

        let bos_text = token_text_field(&tc_path, &tc, "bos_token")?;
        let eos_text = token_text_field(&tc_path, &tc, "eos_token")?;
        let text_id = |text: &Option<String>, field: &str| -> Result<Option<u32>> {
            text.as_deref()
                .map(|t| {
                    inner.token_to_id(t).ok_or_else(|| {
                        anyhow!(
                            "{}: field `{field}` is {t:?}, which is not a token of {}",
                            tc_path.display(),
                            tokenizer_path.display()
                        )
                    })
                })
                .transpose()
        };
        let bos_from_text = text_id(&bos_text, "bos_token")?;
        let eos_from_text = text_id(&eos_text, "eos_token")?;

        // The tokenizer's own BOS text wins (it is what the template and post-processor use).
        let gen_bos = token_ids_field(&gen_path, &gen_cfg, "bos_token_id")?;
        let cfg_bos = token_ids_field(&cfg_path, &cfg, "bos_token_id")?;
        let bos_id = bos_from_text
            .or_else(|| gen_bos.first().copied())
            .or_else(|| cfg_bos.first().copied());
        let mut eos_ids = token_ids_field(&gen_path, &gen_cfg, "eos_token_id")?;
        eos_ids.extend(token_ids_field(&cfg_path, &cfg, "eos_token_id")?);
        eos_ids.extend(eos_from_text);
        dedup_in_order(&mut eos_ids);

        let mut tokenizer = Self::build(inner, bos_id, eos_ids, bos_text, eos_text, add_bos);
        if let Some((source, origin)) = template {
            tokenizer.chat_template = Some(tokenizer.compile_template(&source).context(origin)?);
        }
        Ok(tokenizer)
    }

    /// Builds a tokenizer from parts (e.g. GGUF metadata): the `tokenizers` tokenizer, the Jinja chat
    /// template if any, the BOS id and every EOS id. The BOS/EOS texts the template sees are the
    /// tokens of `bos` and of the first EOS id. Fails if the template does not compile.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        chat_template: Option<String>,
        bos: Option<u32>,
        mut eos_ids: Vec<u32>,
    ) -> Result<Tokenizer> {
        dedup_in_order(&mut eos_ids);
        let bos_text = bos.and_then(|id| inner.id_to_token(id));
        let eos_text = eos_ids.first().and_then(|&id| inner.id_to_token(id));
        let mut tokenizer = Self::build(inner, bos, eos_ids, bos_text, eos_text, None);
        if let Some(source) = chat_template {
            tokenizer.chat_template = Some(tokenizer.compile_template(&source)?);
        }
        Ok(tokenizer)
    }

    fn build(
        inner: tokenizers::Tokenizer,
        bos_id: Option<u32>,
        eos_ids: Vec<u32>,
        bos_text: Option<String>,
        eos_text: Option<String>,
        add_bos: Option<bool>,
    ) -> Tokenizer {
        let bos_token = bos_text.or_else(|| bos_id.and_then(|id| inner.id_to_token(id)));
        let eos_token = eos_text.or_else(|| eos_ids.first().and_then(|&id| inner.id_to_token(id)));
        // Encoding the empty string shows what the post-processor adds around a sequence.
        let post_processor_adds_bos = match (bos_id, inner.encode_fast("", true)) {
            (Some(bos), Ok(enc)) => enc.get_ids().first() == Some(&bos),
            _ => false,
        };
        Tokenizer {
            inner,
            bos_id,
            eos_ids,
            bos_token,
            eos_token,
            chat_template: None,
            add_bos,
            post_processor_adds_bos,
        }
    }

    fn compile_template(&self, source: &str) -> Result<ChatTemplate> {
        ChatTemplate::new(
            source,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
    }

    /// Token ids of `text`. Special-token strings in `text` become special ids. With
    /// `add_special_tokens`, BOS is prepended as the model files say (post-processor or `add_bos_token`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| anyhow!("cannot tokenize text: {e}"))?;
        let mut ids = encoding.get_ids().to_vec();
        match (add_special_tokens, self.bos_id, self.add_bos) {
            (true, Some(bos), Some(false))
                if self.post_processor_adds_bos && ids.first() == Some(&bos) =>
            {
                ids.remove(0);
            }
            (true, Some(bos), Some(true)) if !self.post_processor_adds_bos => ids.insert(0, bos),
            _ => {}
        }
        Ok(ids)
    }

    /// Text of `ids`. With `skip_special_tokens`, special tokens (BOS, `<|eot_id|>`, ...) are left out.
    /// Ids outside the vocabulary are ignored.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("cannot decode token ids: {e}"))
    }

    /// A streaming decoder over this tokenizer (see [`StreamDecoder`]).
    pub fn stream_decoder(&self, skip_special_tokens: bool) -> StreamDecoder<'_> {
        StreamDecoder::new(self, skip_special_tokens)
    }

    /// The raw vocabulary string of `id` (byte-level form, e.g. `"Ġw"`), or `None` outside the vocabulary.
    pub fn id_to_piece(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of the vocabulary string `piece` (inverse of [`Tokenizer::id_to_piece`]).
    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.inner.token_to_id(piece)
    }

    /// Number of tokens, added/special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The beginning-of-sequence id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Every id that ends generation, deduplicated, in declaration order.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Whether generation must stop on `id`.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    /// Whether `encode(.., add_special_tokens = true)` starts with BOS.
    pub fn adds_bos(&self) -> bool {
        self.bos_id.is_some() && self.add_bos.unwrap_or(self.post_processor_adds_bos)
    }

    /// The chat template, or `None` if the model ships none (callers must then report that clearly).
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The BOS text the chat template sees (e.g. `<|begin_of_text|>`).
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The EOS text the chat template sees (`tokenizer_config.json`'s `eos_token`, e.g. `<|eot_id|>`).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Incremental detokenization for streaming output.
///
/// Byte-level BPE tokens can end inside a multi-byte UTF-8 character, and some decoders treat the
/// first token of a sequence specially, so a token cannot be decoded on its own. The decoder keeps a
/// window `ids[prefix_offset..]`: `ids[prefix_offset..read_offset]` was already emitted (it is decoded
/// again only as context), the rest is pending. Each push decodes the window once with and once
/// without the pending ids and emits the difference, unless the text ends in U+FFFD (an incomplete
/// character) or did not grow. After an emission the window slides forward, so the work per token is
/// bounded by the window, not by the length of the generation.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder that emits the text of pushed ids as `tokenizer.decode(ids, skip_special_tokens)` would.
    pub fn new(tokenizer: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        StreamDecoder {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds `id` and returns the text that is now complete (often empty while a character is split).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let (prefix, text) = self.window_texts()?;
        let complete = text.len() > prefix.len() && !text.ends_with(char::REPLACEMENT_CHARACTER);
        let Some(new) = text.strip_prefix(prefix.as_str()).filter(|_| complete) else {
            return Ok(String::new());
        };
        let new = new.to_owned();
        // Slide the window: what was pending becomes the context of the next push.
        self.ids.drain(..self.read_offset);
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
        Ok(new)
    }

    /// Returns the text still held back (e.g. an incomplete character at the end, decoded as U+FFFD
    /// exactly as `decode` would) and resets the decoder for a new sequence.
    pub fn finish(&mut self) -> Result<String> {
        let (prefix, text) = self.window_texts()?;
        // A prefix-stable decoder (byte-level, metaspace) always has `text` starting with `prefix`;
        // otherwise emit what differs after the longest common prefix.
        let common = text
            .char_indices()
            .zip(prefix.chars())
            .take_while(|((_, a), b)| a == b)
            .last()
            .map_or(0, |((i, c), _)| i + c.len_utf8());
        let rest = text[common..].to_owned();
        self.ids.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
        Ok(rest)
    }

    /// Decoded text of the emitted context and of the whole window.
    fn window_texts(&self) -> Result<(String, String)> {
        let prefix = self.tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let text = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        Ok((prefix, text))
    }
}

/// Reads an optional JSON file that must hold an object. `Ok(None)` if the file does not exist.
fn read_json_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
    };
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => bail!("{}: expected a JSON object", path.display()),
        Err(e) => Err(e).with_context(|| format!("{}: invalid JSON", path.display())),
    }
}

/// A token id field: an integer, a list of integers, `null` or absent (empty).
fn token_ids_field(path: &Path, obj: &Map<String, Value>, field: &str) -> Result<Vec<u32>> {
    let bad = |v: &Value| {
        anyhow!(
            "{}: field `{field}` must be a token id or a list of token ids, got {v}",
            path.display()
        )
    };
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(v))
    };
    match obj.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

/// A special-token text field: a string, an `{"content": "..."}` object (AddedToken form), `null` or
/// absent.
fn token_text_field(path: &Path, obj: &Map<String, Value>, field: &str) -> Result<Option<String>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => bail!(
                "{}: field `{field}` is an object without a string `content`",
                path.display()
            ),
        },
        Some(v) => bail!(
            "{}: field `{field}` must be a string or an object with `content`, got {v}",
            path.display()
        ),
    }
}

/// `chat_template`: a string, or a list of `{name, template}` (the one named `default`, else the
/// first), `null` or absent.
fn chat_template_field(path: &Path, obj: &Map<String, Value>) -> Result<Option<String>> {
    let bad = || {
        anyhow!(
            "{}: field `chat_template` must be a string or a list of {{\"name\", \"template\"}} objects",
            path.display()
        )
    };
    match obj.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(items)) => {
            let named = |item: &Value| item.get("name").and_then(Value::as_str) == Some("default");
            let Some(chosen) = items.iter().find(|i| named(i)).or_else(|| items.first()) else {
                return Ok(None);
            };
            chosen
                .get("template")
                .and_then(Value::as_str)
                .map(|s| Some(s.to_owned()))
                .ok_or_else(bad)
        }
        Some(_) => Err(bad()),
    }
}

/// Removes repeated ids, keeping the first occurrence of each.
fn dedup_in_order(ids: &mut Vec<u32>) {
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::path::PathBuf;

    fn fixtures_dir() -> PathBuf {
        std::env::var_os("TERN_FIXTURES")
            .map(Into::into)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"))
    }

    fn fixture_tokenizer() -> Tokenizer {
        Tokenizer::from_dir(&fixtures_dir().join("tiny-packed")).unwrap()
    }

    fn golden_cases() -> Vec<Value> {
        let path = fixtures_dir().join("tiny-packed/golden.json");
        let golden: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let cases = golden["tokenization"].as_array().unwrap().clone();
        assert_eq!(cases.len(), 5);
        cases
    }

    fn ids(v: &Value) -> Vec<u32> {
        serde_json::from_value(v.clone()).unwrap()
    }

    /// Copies the fixture tokenizer files into a temp dir, so tests can alter some of them.
    fn fixture_copy() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "config.json",
        ] {
            std::fs::copy(
                fixtures_dir().join("tiny-packed").join(f),
                dir.path().join(f),
            )
            .unwrap();
        }
        dir
    }

    #[test]
    fn golden_tokenization() {
        let tok = fixture_tokenizer();
        for (i, case) in golden_cases().iter().enumerate() {
            let text = case["text"].as_str().unwrap();
            let with = ids(&case["ids_with_special_tokens"]);
            let without = ids(&case["ids_without_special_tokens"]);
            assert_eq!(tok.encode(text, true).unwrap(), with, "case {i}");
            assert_eq!(tok.encode(text, false).unwrap(), without, "case {i}");
            let pieces: Vec<String> = without
                .iter()
                .map(|&id| tok.id_to_piece(id).unwrap())
                .collect();
            let golden_pieces: Vec<String> =
                serde_json::from_value(case["tokens_without_special_tokens"].clone()).unwrap();
            assert_eq!(pieces, golden_pieces, "case {i}");
            assert_eq!(
                tok.decode(&without, false).unwrap(),
                case["decoded_without_special_tokens"].as_str().unwrap(),
                "case {i}"
            );
            assert_eq!(
                tok.decode(&with, true).unwrap(),
                case["decoded_with_special_tokens_skipped"]
                    .as_str()
                    .unwrap(),
                "case {i}"
            );
        }
    }

    #[test]
    fn golden_chat_case_renders_and_tokenizes() {
        let tok = fixture_tokenizer();
        let case = &golden_cases()[4];
        let messages: Vec<crate::chat::ChatMessage> =
            serde_json::from_value(case["chat_messages"].clone()).unwrap();
        let text = tok
            .chat_template()
            .unwrap()
            .render(&messages, case["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(text, case["text"].as_str().unwrap());
        assert_eq!(
            tok.encode(&text, false).unwrap(),
            ids(&case["ids_without_special_tokens"])
        );
    }

    #[test]
    fn special_ids_of_fixture() {
        let tok = fixture_tokenizer();
        assert_eq!(tok.bos_id(), Some(1008));
        let mut eos = tok.eos_ids().to_vec();
        eos.sort_unstable();
        assert_eq!(eos, [1009, 1017]);
        assert!(tok.is_eos(1009) && tok.is_eos(1017) && !tok.is_eos(1008));
        assert_eq!(tok.vocab_size(), 1024);
        assert_eq!(tok.bos_token(), Some("<|begin_of_text|>"));
        assert_eq!(tok.eos_token(), Some("<|eot_id|>"));
        assert_eq!(tok.piece_to_id("<|eot_id|>"), Some(1017));
        assert!(tok.adds_bos());
        assert_eq!(tok.id_to_piece(5000), None);
    }

    #[test]
    fn eos_union_from_every_file() {
        let dir = fixture_copy();
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": 1009, "bos_token_id": 1008}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"eos_token_id": [1010, 1009]}"#,
        )
        .unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        // generation_config, then config.json, then tokenizer_config's `<|eot_id|>`.
        assert_eq!(tok.eos_ids(), [1009, 1010, 1017]);
    }

    #[test]
    fn only_tokenizer_json_is_required() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            fixtures_dir().join("tiny-packed/tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        assert!(tok.chat_template().is_none());
        assert!(tok.eos_ids().is_empty());
        assert_eq!(tok.bos_id(), None);
        assert_eq!(tok.encode("Hello", false).unwrap(), [39, 68, 358, 78]);
    }

    #[test]
    fn tokenizer_config_variants() {
        let dir = fixture_copy();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{
                "bos_token": {"content": "<|begin_of_text|>", "special": true},
                "eos_token": {"content": "<|end_of_text|>"},
                "add_bos_token": false,
                "chat_template": [
                    {"name": "tool_use", "template": "tools"},
                    {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"}
                ]
            }"#,
        )
        .unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        let t = tok.chat_template().unwrap();
        let msg = [crate::chat::ChatMessage::new("user", "hi")];
        assert_eq!(
            t.render(&msg, false).unwrap(),
            "<|begin_of_text|>hi<|end_of_text|>"
        );
        // add_bos_token: false removes the BOS the post-processor adds.
        assert!(!tok.adds_bos());
        assert_eq!(tok.encode("Hello", true).unwrap(), [39, 68, 358, 78]);
        assert_eq!(tok.eos_ids(), [1009, 1017]);

        // chat_template.jinja overrides tokenizer_config.json's template.
        std::fs::write(dir.path().join("chat_template.jinja"), "J{{ eos_token }}").unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        let rendered = tok.chat_template().unwrap().render(&msg, false).unwrap();
        assert_eq!(rendered, "J<|end_of_text|>");
        std::fs::write(dir.path().join("chat_template.jinja"), "{% if %}").unwrap();
        let err = from_dir_err(dir.path());
        assert!(
            err.contains("chat_template.jinja") && err.contains("does not compile"),
            "{err}"
        );
    }

    fn from_dir_err(dir: &Path) -> String {
        format!("{:#}", Tokenizer::from_dir(dir).unwrap_err())
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let empty = tempfile::tempdir().unwrap();
        let err = from_dir_err(empty.path());
        assert!(
            err.contains("tokenizer.json") && err.contains("not found"),
            "{err}"
        );

        let dir = fixture_copy();
        std::fs::write(dir.path().join("tokenizer.json"), "{\"version\": 1").unwrap();
        let err = from_dir_err(dir.path());
        assert!(
            err.contains("tokenizer.json: not a valid tokenizer"),
            "{err}"
        );

        let cases = [
            (
                "generation_config.json",
                r#"{"eos_token_id": "x"}"#,
                "`eos_token_id`",
            ),
            ("config.json", r#"{"bos_token_id": -1}"#, "`bos_token_id`"),
            ("config.json", "[1, 2]", "expected a JSON object"),
            ("tokenizer_config.json", "{", "invalid JSON"),
            (
                "tokenizer_config.json",
                r#"{"eos_token": 5}"#,
                "`eos_token`",
            ),
            (
                "tokenizer_config.json",
                r#"{"bos_token": "<nope>"}"#,
                "`bos_token`",
            ),
            (
                "tokenizer_config.json",
                r#"{"add_bos_token": "yes"}"#,
                "`add_bos_token`",
            ),
            (
                "tokenizer_config.json",
                r#"{"chat_template": 3}"#,
                "`chat_template`",
            ),
            (
                "tokenizer_config.json",
                r#"{"chat_template": "{% if %}"}"#,
                "`chat_template`",
            ),
        ];
        for (file, content, needle) in cases {
            let dir = fixture_copy();
            std::fs::write(dir.path().join(file), content).unwrap();
            let err = from_dir_err(dir.path());
            assert!(
                err.contains(file) && err.contains(needle),
                "{file} {content}: {err}"
            );
        }
    }

    #[test]
    fn from_parts_without_a_post_processor() {
        // No post-processor: `encode` adds no BOS (GGUF vocabularies get one that adds it).
        let path = fixtures_dir().join("tiny-packed/tokenizer.json");
        let mut json: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        json["post_processor"] = Value::Null;
        let inner = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&json).unwrap()).unwrap();
        let template =
            "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}";
        let tok = Tokenizer::from_parts(
            inner,
            Some(template.into()),
            Some(1008),
            vec![1017, 1009, 1017],
        )
        .unwrap();
        assert_eq!(tok.eos_ids(), [1017, 1009]);
        assert_eq!(tok.eos_token(), Some("<|eot_id|>"));
        assert!(!tok.adds_bos());
        assert_eq!(tok.encode("Hello", true).unwrap(), [39, 68, 358, 78]);
        let msg = [crate::chat::ChatMessage::new("user", "x")];
        let text = tok.chat_template().unwrap().render(&msg, false).unwrap();
        assert_eq!(text, "<|begin_of_text|>x<|eot_id|>");

        let inner = fixture_tokenizer().inner().clone();
        assert!(Tokenizer::from_parts(inner, Some("{% for %}".into()), None, vec![]).is_err());
    }

    /// Feeds `ids` one at a time and checks the stream against `decode`.
    fn check_stream(tok: &Tokenizer, ids: &[u32], skip: bool) -> Vec<String> {
        let mut stream = tok.stream_decoder(skip);
        let mut pieces: Vec<String> = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
        pieces.push(stream.finish().unwrap());
        assert_eq!(
            pieces.concat(),
            tok.decode(ids, skip).unwrap(),
            "ids {ids:?} skip {skip}"
        );
        pieces
    }

    #[test]
    fn stream_decoder_never_splits_characters() {
        let tok = fixture_tokenizer();
        let text = "Café naïve — 東京 日本語 Привет 🚀🙂 done. <|eot_id|>ok";
        for skip in [false, true] {
            let ids = tok.encode(text, true).unwrap();
            let pieces = check_stream(&tok, &ids, skip);
            for piece in &pieces {
                assert!(!piece.contains(char::REPLACEMENT_CHARACTER), "{pieces:?}");
            }
            // Everything is emitted before `finish` once the last token completes the text.
            assert_eq!(pieces.last().unwrap(), "");
            // Emoji are split across byte tokens: some pushes return nothing.
            assert!(pieces.iter().filter(|p| p.is_empty()).count() > 3);
        }
        for case in golden_cases() {
            for skip in [false, true] {
                check_stream(&tok, &ids(&case["ids_with_special_tokens"]), skip);
            }
        }
    }

    #[test]
    fn stream_decoder_matches_decode_on_random_ids() {
        let tok = fixture_tokenizer();
        let vocab = tok.vocab_size() as u32;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // Byte tokens of multi-byte characters, so that valid and invalid UTF-8 both occur often.
        let multibyte = tok.encode("é東🚀Жß", false).unwrap();
        for round in 0..300 {
            let len = rng.random_range(0..40);
            let ids: Vec<u32> = (0..len)
                .map(|_| match rng.random_range(0..3) {
                    0 => multibyte[rng.random_range(0..multibyte.len())],
                    1 => rng.random_range(1008..vocab),
                    _ => rng.random_range(0..vocab),
                })
                .collect();
            check_stream(&tok, &ids, round % 2 == 0);
        }
        // A decoder is reusable after `finish`.
        let mut stream = tok.stream_decoder(false);
        let hello = tok.encode("Hello", false).unwrap();
        let first: String = hello.iter().map(|&id| stream.push(id).unwrap()).collect();
        assert_eq!(first + &stream.finish().unwrap(), "Hello");
        let second: String = hello.iter().map(|&id| stream.push(id).unwrap()).collect();
        assert_eq!(second + &stream.finish().unwrap(), "Hello");
    }

    #[test]
    fn stream_window_stays_small() {
        let tok = fixture_tokenizer();
        let ids = tok
            .encode(&"The quick brown fox. ".repeat(200), false)
            .unwrap();
        let mut stream = tok.stream_decoder(true);
        for &id in &ids {
            stream.push(id).unwrap();
            assert!(stream.ids.len() <= 4, "window grew to {}", stream.ids.len());
        }
    }
}
