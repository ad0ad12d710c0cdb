//! Writing GGUF v3 files (layout in the [module doc](super)), and the mapping of a model (any
//! [`ModelSource`], streamed a layer at a time) with its vocabulary to the files bitnet.cpp (I2_S)
//! and llama.cpp (TQ2_0, TQ1_0) load.
//!
//! What is written, by model family:
//! - sub-norms + ReLU² (BitNet 2B-4T): architecture `bitnet-b1.58` for I2_S (bitnet.cpp's name),
//!   `bitnet` with `bitnet.hidden_activation = "relu2"` for TQ types (llama.cpp's name);
//! - sub-norms + SiLU (1bitLLM): `bitnet`, `bitnet.hidden_activation = "silu"`;
//! - no sub-norms + SiLU (Llama BitLinear): `llama`, Q/K rows permuted the way llama.cpp's converter
//!   does (its `llama` graph uses interleaved RoPE); [`super::model`] permutes them back.
//!
//! Ternary linears are encoded with the canonical per-tensor scale (I2_S: f32 in the tail; TQ: the
//! f16 block scale `d`, so a scale that is not an f16 value is rounded, and reported). The token
//! embedding and an untied head are written F16 (as both projects' converters do) when every value
//! converts exactly or within f16's range (bf16 → f16 rounds only subnormals), F32 otherwise; norms
//! F32. The output is deterministic: the same model gives the same bytes, and I2_S tail bytes after
//! the scale are zeros.

use super::quants::{encode_i2s, encode_tq1_0, encode_tq2_0};
use super::{DEFAULT_ALIGNMENT, GgmlType, MAGIC, Value};
use crate::config::ModelConfig;
use crate::source::{HostLayer, ModelSource};
use crate::ternary::{DenseMatrix, TernaryMatrix};
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result, anyhow, bail, ensure};
use half::f16;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use tern_cpu::elementwise::GateActivation;
use tern_cpu::table::DenseView;

/// A GGUF file being assembled in memory (small files: tests, vocab-only files). A model is
/// streamed to its file instead ([`write_model_gguf`]).
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    pub fn meta(&mut self, key: impl Into<String>, value: Value) {
        self.metadata.push((key.into(), value));
    }

    /// Adds a tensor; `ne` is contiguous-dimension first, `data` already encoded.
    pub fn tensor(&mut self, name: impl Into<String>, ne: Vec<u64>, ty: GgmlType, data: Vec<u8>) {
        self.tensors.push((name.into(), ne, ty, data));
    }

    /// The whole file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let entries = self
            .tensors
            .iter()
            .map(|(name, ne, ty, data)| (name.as_str(), &ne[..], *ty, data.len()));
        let mut out = header(&self.metadata, entries);
        for (_, _, _, data) in &self.tensors {
            out.resize(out.len().next_multiple_of(DEFAULT_ALIGNMENT as usize), 0);
            out.extend_from_slice(data);
        }
        out
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let mut file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        file.write_all(&self.to_bytes())
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// Everything before the tensor data (each tensor's data is preceded by padding to the alignment,
/// the first one's included): magic, version, counts, the
/// metadata, and one entry `(name, ne, type, data bytes)` per tensor, whose data follow in this
/// order, each starting at a multiple of the alignment.
fn header<'a>(
    metadata: &[(String, Value)],
    tensors: impl ExactSizeIterator<Item = (&'a str, &'a [u64], GgmlType, usize)>,
) -> Vec<u8> {
    let align = DEFAULT_ALIGNMENT as usize;
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut out, key);
        out.extend_from_slice(&value.type_id().to_le_bytes());
        put_value(&mut out, value);
    }
    let mut offset = 0usize;
    for (name, ne, ty, len) in tensors {
        put_string(&mut out, name);
        out.extend_from_slice(&(ne.len() as u32).to_le_bytes());
        ne.iter()
            .for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
        out.extend_from_slice(&ty.id().to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = (offset + len).next_multiple_of(align);
    }
    out
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.push(*v as u8),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            // An empty array is written as u32 elements.
            let element = items.first().map_or(4, Value::type_id);
            out.extend_from_slice(&element.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            items.iter().for_each(|v| put_value(out, v));
        }
    }
}

/// The ternary GGUF types `tern convert` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TernaryTarget {
    I2S,
    Tq2_0,
    Tq1_0,
}

impl TernaryTarget {
    fn ggml_type(self) -> GgmlType {
        match self {
            TernaryTarget::I2S => GgmlType::I2S,
            TernaryTarget::Tq2_0 => GgmlType::Tq2_0,
            TernaryTarget::Tq1_0 => GgmlType::Tq1_0,
        }
    }

    /// `general.file_type`: bitnet.cpp's MOSTLY_I2_S = 40, llama.cpp's MOSTLY_TQ2_0 = 37, TQ1_0 = 36.
    fn file_type(self) -> u32 {
        match self {
            TernaryTarget::I2S => 40,
            TernaryTarget::Tq2_0 => 37,
            TernaryTarget::Tq1_0 => 36,
        }
    }

    /// Elements a row length must be a multiple of.
    fn row_multiple(self) -> usize {
        match self {
            TernaryTarget::I2S => super::quants::I2S_GROUP,
            TernaryTarget::Tq2_0 | TernaryTarget::Tq1_0 => 256,
        }
    }

    fn encode(self, values: &[i8], scale: f32) -> Vec<u8> {
        match self {
            TernaryTarget::I2S => encode_i2s(values, scale),
            TernaryTarget::Tq2_0 => encode_tq2_0(values, scale),
            TernaryTarget::Tq1_0 => encode_tq1_0(values, scale),
        }
    }
}

/// Where the tokenizer metadata of a written file comes from.
pub enum VocabSource<'a> {
    /// A tokenizer, written as byte-level BPE with the Llama-3 pre-tokenizer (the only kind this
    /// writer serializes).
    Tokenizer(&'a Tokenizer),
    /// The `tokenizer.*` keys of a GGUF file, copied as they are (any kind llama.cpp reads, whether
    /// or not tern can build a tokenizer from it).
    Metadata(&'a BTreeMap<String, Value>),
    /// A dummy byte-level BPE vocabulary of the model's size ([`dummy_vocab_metadata`]), for
    /// random-weight models.
    Dummy,
}

/// Writes the GGUF of `model` to `out`, streaming: the header (every tensor's size follows from
/// the config and the types), then the tables, then one layer at a time, read from `model`,
/// encoded and written before the next is read, so a model larger than memory can be written.
/// Weights as `target`, the vocabulary, merges, special ids and chat template from `vocab`. `name`
/// becomes `general.name`. Returns notes on anything rounded.
pub fn write_model_gguf(
    model: &dyn ModelSource,
    vocab: VocabSource,
    target: TernaryTarget,
    name: &str,
    out: &mut dyn Write,
) -> Result<Vec<String>> {
    let (w, arch) = model_metadata(model, vocab, target, name)?;
    let c = model.config();
    let mut notes = Vec::new();
    let (embed_ty, embed) = dense_bytes(&*model.embed()?, "token_embd.weight", &mut notes);
    let output = model
        .output()?
        .map(|o| dense_bytes(&o, "output.weight", &mut notes));
    let table_ne = vec![c.hidden as u64, c.vocab as u64];
    let mut plan: Vec<(String, Vec<u64>, GgmlType)> = vec![
        ("token_embd.weight".into(), table_ne.clone(), embed_ty),
        (
            "output_norm.weight".into(),
            vec![c.hidden as u64],
            GgmlType::F32,
        ),
    ];
    if let Some((ty, _)) = &output {
        plan.push(("output.weight".into(), table_ne, *ty));
    }
    let layer_plan = |l: usize| layer_tensors(c, l, arch == "llama");
    for l in 0..c.layers {
        plan.extend(
            layer_plan(l)
                .into_iter()
                .map(|(name, ne, piece)| (name, ne, piece.ggml_type(target))),
        );
    }
    let sizes = plan
        .iter()
        .map(|(name, ne, ty)| {
            ty.tensor_bytes(ne)
                .map(|n| n as usize)
                .with_context(|| format!("tensor `{name}`"))
        })
        .collect::<Result<Vec<_>>>()?;
    let entries = plan
        .iter()
        .zip(&sizes)
        .map(|((name, ne, ty), &len)| (name.as_str(), &ne[..], *ty, len));
    let mut sink = TensorSink {
        out,
        written: 0,
        plan: plan.iter().zip(&sizes),
    };
    sink.raw(&header(&w.metadata, entries))?;
    sink.tensor(&embed)?;
    drop(embed);
    sink.tensor(&f32_bytes(&model.final_norm()?))?;
    if let Some((_, data)) = output {
        sink.tensor(&data)?;
    }
    for l in 0..c.layers {
        let layer = model.layer(l)?;
        for (name, _, piece) in layer_plan(l) {
            sink.tensor(&piece.encode(&layer, target, &name, &mut notes)?)?;
        }
    }
    ensure!(
        sink.plan.next().is_none(),
        "fewer tensors written than planned"
    );
    Ok(notes)
}

/// [`write_model_gguf`] to a file (removed again if writing fails).
pub fn write_model_gguf_file(
    model: &dyn ModelSource,
    vocab: VocabSource,
    target: TernaryTarget,
    name: &str,
    path: &Path,
) -> Result<Vec<String>> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let written = write_model_gguf(model, vocab, target, name, &mut out)
        .and_then(|notes| Ok(out.flush().map(|()| notes)?))
        .with_context(|| format!("writing {}", path.display()));
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

/// [`write_model_gguf`] into memory (small models: tests).
pub fn model_to_gguf(
    model: &dyn ModelSource,
    vocab: VocabSource,
    target: TernaryTarget,
    name: &str,
) -> Result<(Vec<u8>, Vec<String>)> {
    let mut bytes = Vec::new();
    let notes = write_model_gguf(model, vocab, target, name, &mut bytes)?;
    Ok((bytes, notes))
}

/// Writes tensor data in the planned order, checking each one's size and padding to the alignment.
struct TensorSink<'a, P> {
    out: &'a mut dyn Write,
    written: usize,
    plan: P,
}

impl<'a, P: Iterator<Item = (&'a (String, Vec<u64>, GgmlType), &'a usize)>> TensorSink<'_, P> {
    fn raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len();
        Ok(())
    }

    fn tensor(&mut self, data: &[u8]) -> Result<()> {
        let Some(((name, _, _), &len)) = self.plan.next() else {
            bail!("more tensors written than planned");
        };
        ensure!(
            data.len() == len,
            "tensor `{name}`: {} bytes encoded, {len} planned",
            data.len()
        );
        let pad = self.written.next_multiple_of(DEFAULT_ALIGNMENT as usize) - self.written;
        self.raw(&vec![0u8; pad])?;
        self.raw(data)
    }
}

/// One tensor of a layer, in the file's order.
#[derive(Clone, Copy)]
enum Piece {
    Norm(fn(&HostLayer) -> Option<&Vec<f32>>),
    /// Index into [`HostLayer::linears`]; `Some(heads)`: rows permuted for llama.cpp's RoPE.
    Linear(usize, Option<usize>),
}

impl Piece {
    fn ggml_type(self, target: TernaryTarget) -> GgmlType {
        match self {
            Piece::Norm(_) => GgmlType::F32,
            Piece::Linear(..) => target.ggml_type(),
        }
    }

    fn encode(
        self,
        layer: &HostLayer,
        target: TernaryTarget,
        name: &str,
        notes: &mut Vec<String>,
    ) -> Result<Vec<u8>> {
        match self {
            Piece::Norm(norm) => {
                let values = norm(layer).ok_or_else(|| anyhow!("tensor `{name}` is missing"))?;
                Ok(f32_bytes(values))
            }
            Piece::Linear(i, heads) => {
                ternary_bytes(layer.linears()[i], target, heads, name, notes)
            }
        }
    }
}

/// Layer `l`'s tensors: name, `ne` and what they hold, in the order they are written.
fn layer_tensors(c: &ModelConfig, l: usize, permute: bool) -> Vec<(String, Vec<u64>, Piece)> {
    let vector = |len: usize| vec![len as u64];
    let mut out = vec![
        (
            "attn_norm",
            vector(c.hidden),
            Piece::Norm(|l| Some(&l.attn_norm)),
        ),
        (
            "ffn_norm",
            vector(c.hidden),
            Piece::Norm(|l| Some(&l.ffn_norm)),
        ),
    ];
    if c.sub_norms {
        out.push((
            "attn_sub_norm",
            vector(c.q_dim()),
            Piece::Norm(|l| l.attn_sub_norm.as_ref()),
        ));
        out.push((
            "ffn_sub_norm",
            vector(c.intermediate),
            Piece::Norm(|l| l.ffn_sub_norm.as_ref()),
        ));
    }
    let names = [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];
    let heads = [Some(c.heads), Some(c.kv_heads)];
    for (i, (name, (rows, cols))) in names.into_iter().zip(c.linear_shapes()).enumerate() {
        let permuted = heads.get(i).copied().flatten().filter(|_| permute);
        out.push((
            name,
            vec![cols as u64, rows as u64],
            Piece::Linear(i, permuted),
        ));
    }
    out.into_iter()
        .map(|(name, ne, piece)| (format!("blk.{l}.{name}.weight"), ne, piece))
        .collect()
}

/// The metadata of `model`'s file and its architecture name.
fn model_metadata(
    model: &dyn ModelSource,
    vocab: VocabSource,
    target: TernaryTarget,
    name: &str,
) -> Result<(GgufWriter, &'static str)> {
    let c = model.config();
    let arch = match (c.sub_norms, c.activation, target) {
        (true, GateActivation::Relu2, TernaryTarget::I2S) => "bitnet-b1.58",
        (true, _, _) => "bitnet",
        (false, GateActivation::Silu, _) => "llama",
        (false, GateActivation::Relu2, _) => bail!(
            "a ReLU² model without sub-norms has no GGUF architecture that bitnet.cpp or \
             llama.cpp would run correctly"
        ),
    };
    let mut w = GgufWriter::default();
    let key = |k: &str| format!("{arch}.{k}");
    let u32v = |v: usize| -> Result<Value> {
        u32::try_from(v)
            .map(Value::U32)
            .map_err(|_| anyhow!("{v} does not fit a u32 metadata value"))
    };
    w.meta("general.architecture", Value::String(arch.into()));
    w.meta("general.name", Value::String(name.into()));
    w.meta(key("vocab_size"), u32v(c.vocab)?);
    w.meta(key("context_length"), u32v(c.max_positions)?);
    w.meta(key("embedding_length"), u32v(c.hidden)?);
    w.meta(key("block_count"), u32v(c.layers)?);
    w.meta(key("feed_forward_length"), u32v(c.intermediate)?);
    w.meta(key("rope.dimension_count"), u32v(c.head_dim)?);
    w.meta(key("attention.head_count"), u32v(c.heads)?);
    w.meta(key("attention.head_count_kv"), u32v(c.kv_heads)?);
    if c.head_dim * c.heads != c.hidden {
        w.meta(key("attention.key_length"), u32v(c.head_dim)?);
        w.meta(key("attention.value_length"), u32v(c.head_dim)?);
    }
    w.meta(
        key("attention.layer_norm_rms_epsilon"),
        Value::F32(c.rms_norm_eps),
    );
    w.meta(key("rope.freq_base"), Value::F32(c.rope_theta));
    if arch == "bitnet" {
        let act = match c.activation {
            GateActivation::Relu2 => "relu2",
            GateActivation::Silu => "silu",
        };
        w.meta(key("hidden_activation"), Value::String(act.into()));
    }
    w.meta("general.file_type", Value::U32(target.file_type()));
    w.meta("general.quantization_version", Value::U32(2));
    match vocab {
        VocabSource::Tokenizer(tokenizer) => {
            tokenizer_metadata(&mut w, tokenizer, target == TernaryTarget::I2S)?
        }
        VocabSource::Metadata(metadata) => metadata
            .iter()
            .filter(|(key, _)| key.starts_with("tokenizer."))
            .for_each(|(key, value)| w.meta(key.clone(), value.clone())),
        VocabSource::Dummy => dummy_vocab_metadata(&mut w, c.vocab, target == TernaryTarget::I2S)?,
    }

    Ok((w, arch))
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// F16 when every value survives within f16's range, else F32.
fn dense_bytes(m: &DenseMatrix, name: &str, notes: &mut Vec<String>) -> (GgmlType, Vec<u8>) {
    let values: Vec<f32> = match m.view() {
        DenseView::F16(v) => {
            return (
                GgmlType::F16,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            );
        }
        DenseView::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        DenseView::F32(v) => v.to_vec(),
    };
    let halves: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
    if halves.iter().any(|h| !h.is_finite()) {
        notes.push(format!("{name}: values beyond f16's range, written as F32"));
        return (GgmlType::F32, f32_bytes(&values));
    }
    let rounded = values
        .iter()
        .zip(&halves)
        .filter(|(v, h)| h.to_f32() != **v)
        .count();
    if rounded > 0 {
        notes.push(format!("{name}: {rounded} values rounded to f16"));
    }
    (
        GgmlType::F16,
        halves.iter().flat_map(|h| h.to_le_bytes()).collect(),
    )
}

fn ternary_bytes(
    m: &TernaryMatrix,
    target: TernaryTarget,
    permute_heads: Option<usize>,
    name: &str,
    notes: &mut Vec<String>,
) -> Result<Vec<u8>> {
    ensure!(
        m.cols.is_multiple_of(target.row_multiple()),
        "tensor `{name}`: rows of {} inputs are not a multiple of {}, which {:?} needs",
        m.cols,
        target.row_multiple(),
        target
    );
    let mut values = m.to_i8();
    if let Some(heads) = permute_heads {
        values = permute_rows(&values, m.rows, m.cols, heads);
    }
    if target != TernaryTarget::I2S && f16::from_f32(m.scale).to_f32() != m.scale {
        notes.push(format!(
            "{name}: scale {} rounded to the f16 block scale {}",
            m.scale,
            f16::from_f32(m.scale)
        ));
    }
    Ok(target.encode(&values, m.scale))
}

/// llama.cpp's `permute`: HF row `h*d + j*d/2 + i` goes to row `h*d + 2i + j`.
fn permute_rows(values: &[i8], rows: usize, cols: usize, heads: usize) -> Vec<i8> {
    let d = rows / heads;
    let mut out = vec![0i8; values.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let from = (h * d + j * d / 2 + i) * cols;
                let to = (h * d + 2 * i + j) * cols;
                out[to..to + cols].copy_from_slice(&values[from..from + cols]);
            }
        }
    }
    out
}

/// Special tokens at the end of the dummy vocabulary: bos, then eos.
const DUMMY_SPECIALS: [&str; 2] = ["<s>", "</s>"];

/// A dummy byte-level BPE vocabulary of `size` tokens (`gpt2`, pre-tokenizer `default`): the 256
/// byte tokens, then two-character tokens `a b` and three-character ones `ab c` with their merges,
/// then `<s>` (bos) and `</s>` (eos) as control tokens, as the peers' random-model script writes
/// it. Text tokenizes to something, and both peers' loaders accept it; the ids mean nothing.
fn dummy_vocab_metadata(w: &mut GgufWriter, size: usize, with_scores: bool) -> Result<()> {
    let chars = byte_level_chars();
    ensure!(
        size >= chars.len() + DUMMY_SPECIALS.len(),
        "a dummy vocabulary needs at least {} tokens, the model has {size}",
        chars.len() + DUMMY_SPECIALS.len()
    );
    let normal = size - DUMMY_SPECIALS.len();
    let mut tokens: Vec<String> = chars.iter().map(char::to_string).collect();
    let mut merges = Vec::new();
    let pairs = chars
        .iter()
        .flat_map(|a| chars.iter().map(move |b| (a.to_string(), *b)));
    let triples = pairs
        .clone()
        .flat_map(|(a, b)| chars.iter().map(move |c| (format!("{a}{b}"), *c)));
    for (left, right) in pairs.chain(triples).take(normal - chars.len()) {
        merges.push(Value::String(format!("{left} {right}")));
        tokens.push(format!("{left}{right}"));
    }
    tokens.extend(DUMMY_SPECIALS.map(String::from));
    let control = |id: usize| id >= normal;
    let ids = 0..tokens.len();
    w.meta("tokenizer.ggml.model", Value::String("gpt2".into()));
    w.meta("tokenizer.ggml.pre", Value::String("default".into()));
    w.meta(
        "tokenizer.ggml.tokens",
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    );
    if with_scores {
        let score = |id| Value::F32(if control(id) { -1000.0 } else { 0.0 });
        w.meta(
            "tokenizer.ggml.scores",
            Value::Array(ids.clone().map(score).collect()),
        );
    }
    let ty = |id| Value::I32(if control(id) { 3 } else { 1 });
    w.meta(
        "tokenizer.ggml.token_type",
        Value::Array(ids.map(ty).collect()),
    );
    w.meta("tokenizer.ggml.merges", Value::Array(merges));
    w.meta("tokenizer.ggml.bos_token_id", Value::U32(normal as u32));
    w.meta("tokenizer.ggml.eos_token_id", Value::U32(normal as u32 + 1));
    Ok(())
}

/// GPT-2's byte-to-character table, in its order: the printable bytes stand for themselves, the
/// others for characters from U+0100 on.
fn byte_level_chars() -> Vec<char> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut chars: Vec<char> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(char::from)
        .collect();
    let others = (0..=255u8).filter(|&b| !printable(b));
    chars.extend(
        others
            .zip(256u32..)
            .map(|(_, c)| char::from_u32(c).expect("below U+0200")),
    );
    chars
}

/// `tokenizer.ggml.*` and `tokenizer.chat_template` of a byte-level BPE tokenizer with the Llama-3
/// pre-tokenizer (`gpt2` + `llama-bpe`, which [`super::vocab`] rebuilds).
fn tokenizer_metadata(w: &mut GgufWriter, tokenizer: &Tokenizer, with_scores: bool) -> Result<()> {
    let inner = tokenizer.inner();
    let json: serde_json::Value = serde_json::from_str(
        &inner
            .to_string(false)
            .map_err(|e| anyhow!("cannot serialize the tokenizer: {e}"))?,
    )?;
    let model = &json["model"];
    ensure!(
        model["type"] == "BPE",
        "the tokenizer is not BPE: GGUF metadata can only carry a byte-level BPE (gpt2) tokenizer"
    );
    let pre = json["pre_tokenizer"].to_string();
    ensure!(
        pre.contains("ByteLevel") && pre.contains(r"\\p{N}{1,3}"),
        "the tokenizer's pre-tokenizer is not Llama-3's byte-level split (tokenizer.ggml.pre \
         llama-bpe), the only one tern writes"
    );
    let size = inner.get_vocab_size(true);
    let vocab = inner.get_vocab(true);
    let mut tokens = vec![None; size];
    for (token, id) in vocab {
        let slot = tokens
            .get_mut(id as usize)
            .ok_or_else(|| anyhow!("token id {id} is beyond the vocabulary size {size}"))?;
        *slot = Some(token);
    }
    let special: std::collections::HashSet<u32> = inner
        .get_added_tokens_decoder()
        .iter()
        .filter(|(_, t)| t.special)
        .map(|(&id, _)| id)
        .collect();
    let mut token_values = Vec::with_capacity(size);
    let mut types = Vec::with_capacity(size);
    let mut scores = Vec::with_capacity(size);
    for (id, token) in tokens.into_iter().enumerate() {
        let token = token.ok_or_else(|| anyhow!("the vocabulary has no token with id {id}"))?;
        let control = special.contains(&(id as u32));
        token_values.push(Value::String(token));
        types.push(Value::I32(if control { 3 } else { 1 }));
        scores.push(Value::F32(if control { -1000.0 } else { 0.0 }));
    }
    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| anyhow!("the BPE model has no merges"))?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(Value::String(s.clone())),
            serde_json::Value::Array(pair) if pair.len() == 2 => Ok(Value::String(format!(
                "{} {}",
                pair[0].as_str().unwrap_or_default(),
                pair[1].as_str().unwrap_or_default()
            ))),
            other => Err(anyhow!("merge {other} is not a pair")),
        })
        .collect::<Result<Vec<_>>>()?;
    w.meta("tokenizer.ggml.model", Value::String("gpt2".into()));
    w.meta("tokenizer.ggml.pre", Value::String("llama-bpe".into()));
    w.meta("tokenizer.ggml.tokens", Value::Array(token_values));
    // bitnet.cpp's converter writes scores (0 for BPE tokens, -1000 for control tokens).
    if with_scores {
        w.meta("tokenizer.ggml.scores", Value::Array(scores));
    }
    w.meta("tokenizer.ggml.token_type", Value::Array(types));
    w.meta("tokenizer.ggml.merges", Value::Array(merges));
    if let Some(bos) = tokenizer.bos_id() {
        w.meta("tokenizer.ggml.bos_token_id", Value::U32(bos));
    }
    let eos = tokenizer
        .eos_token()
        .and_then(|t| tokenizer.piece_to_id(t))
        .or_else(|| tokenizer.eos_ids().first().copied());
    if let Some(eos) = eos {
        w.meta("tokenizer.ggml.eos_token_id", Value::U32(eos));
    }
    w.meta(
        "tokenizer.ggml.add_bos_token",
        Value::Bool(tokenizer.adds_bos()),
    );
    if let Some(template) = tokenizer.chat_template() {
        w.meta(
            "tokenizer.chat_template",
            Value::String(template.source().to_string()),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_and_unpermute_are_inverse() {
        // Row r holds the base-3 digits of r: every row differs.
        let values: Vec<i8> = (0..24)
            .map(|i: u32| ((i / 3) / 3u32.pow(i % 3) % 3) as i8 - 1)
            .collect();
        let permuted = permute_rows(&values, 8, 3, 2);
        assert_ne!(permuted, values);
        let back = super::super::model::unpermute_rows(&permuted, 8, 3, 2).unwrap();
        assert_eq!(back, values);
    }
}
