//! A GGUF file as a streaming [`ModelSource`] (tensors decoded to the canonical layout when asked
//! for, F16/BF16/F32 tables served from the mapped file) and a [`Tokenizer`].
//!
//! Architectures (`general.architecture`), decided from metadata, never from tensor names alone:
//! - `bitnet-b1.58`, `bitnet-25` (bitnet.cpp's names for the 2B-4T graph): ReLU² FFN, sub-norms.
//! - `bitnet` (llama.cpp's, also bitnet.cpp's for 1bitLLM models): sub-norms; the FFN activation is
//!   `bitnet.hidden_activation` when present, else inferred from the family and reported: a gpt2
//!   (Llama-3 BPE) tokenizer means a 2B-4T-style model (ReLU²), a llama (SentencePiece) tokenizer a
//!   1bitLLM one (SiLU).
//! - `llama` with ternary tensors (Llama3-8B-1.58, Falcon3-1.58bit converted by llama.cpp or
//!   bitnet.cpp): SwiGLU, no sub-norms. llama.cpp's converter permutes Q/K rows for interleaved RoPE;
//!   they are permuted back here, since the graph uses rotate-half RoPE.
//!
//! Tensor names (`ne = [in, out]`): `token_embd`, optional `output` (absent: tied head),
//! `output_norm`, and `blk.N.` + `attn_norm`, `attn_q`, `attn_k`, `attn_v`, `attn_output`,
//! `attn_sub_norm`, `ffn_norm`, `ffn_gate`, `ffn_up`, `ffn_down`, `ffn_sub_norm` (`.weight`); an
//! optional 1-element `blk.N.<linear>.scale` (bitnet.cpp's 1bitLLM files) multiplies into the scale.
//! Linears must be ternary types (I2_S, TQ1_0, TQ2_0); embeddings and the head may be any type
//! [`super::quants::dense_values`] decodes (block-quantized ones are dequantized to f32).
//!
//! The tokenizer comes from `tokenizer.ggml.*` (see [`super::vocab`]) unless a `tokenizer.json`
//! lies beside the file, which wins.

use super::quants::{dense_values, ternary_values};
use super::vocab::tokenizer_from_metadata;
use super::{GgmlType, GgufFile, TensorInfo, Value};
use crate::config::ModelConfig;
use crate::source::{HostLayer, ModelSource};
use crate::ternary::{DenseData, DenseMatrix, MappedValues, TableDtype, TernaryMatrix};
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result, anyhow, bail, ensure};
use half::{bf16, f16};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use tern_cpu::bitlinear::reference::pack;
use tern_cpu::elementwise::GateActivation;

/// A GGUF file read tensor by tensor from its memory map.
pub struct GgufSource {
    file: GgufFile,
    config: ModelConfig,
    arch: Arch,
    format: String,
}

impl GgufSource {
    /// Parses and checks the file's header and metadata, and builds its tokenizer, whose failure
    /// is returned apart: commands that need no text run without one. Notes on what was inferred
    /// are logged and appended to the format description.
    pub fn open(path: &Path) -> Result<(Self, Result<Tokenizer>)> {
        let file = GgufFile::open(path)?;
        let source = path.display().to_string();
        let mut notes = Vec::new();
        let (config, arch, mut format) =
            model_config(&file, &mut notes).with_context(|| source.clone())?;
        let tokenizer = gguf_tokenizer(path, &file, &mut notes);
        for note in &notes {
            tracing::warn!("{source}: {note}");
        }
        if !notes.is_empty() {
            format = format!("{format}; inferred: {}", notes.join("; "));
        }
        let me = Self {
            file,
            config,
            arch,
            format,
        };
        Ok((me, tokenizer))
    }

    fn in_file<T>(&self, value: Result<T>) -> Result<T> {
        value.with_context(|| self.file.path.display().to_string())
    }
}

impl ModelSource for GgufSource {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn format(&self) -> &str {
        &self.format
    }

    fn embed(&self) -> Result<Cow<'_, DenseMatrix>> {
        let c = &self.config;
        let embed = dense(&self.file, "token_embd.weight", c.vocab, c.hidden);
        self.in_file(embed).map(Cow::Owned)
    }

    fn output(&self) -> Result<Option<Cow<'_, DenseMatrix>>> {
        let c = &self.config;
        if c.tied_embeddings {
            return Ok(None);
        }
        let head = dense(&self.file, "output.weight", c.vocab, c.hidden);
        self.in_file(head).map(|h| Some(Cow::Owned(h)))
    }

    fn final_norm(&self) -> Result<Cow<'_, [f32]>> {
        let norm = vector(&self.file, "output_norm.weight", self.config.hidden);
        self.in_file(norm).map(Cow::Owned)
    }

    /// The layer's values are converted out of the file, so its tensors' pages are released
    /// ([`GgufFile::release`]) as soon as they are read.
    fn layer(&self, index: usize) -> Result<Cow<'_, HostLayer>> {
        let layer = self.in_file(layer(&self.file, &self.config, self.arch, index))?;
        let prefix = format!("blk.{index}.");
        for tensor in self
            .file
            .tensors
            .iter()
            .filter(|t| t.name.starts_with(&prefix))
        {
            self.file.release(tensor);
        }
        Ok(Cow::Owned(layer))
    }
}

/// The tokenizer of the GGUF file at `path`: a `tokenizer.json` beside it wins over the metadata.
pub fn gguf_tokenizer(path: &Path, file: &GgufFile, notes: &mut Vec<String>) -> Result<Tokenizer> {
    let beside = path.parent().map(|d| d.join("tokenizer.json"));
    match beside.filter(|p| p.is_file()) {
        Some(json) => {
            notes.push(format!(
                "tokenizer from {} (wins over GGUF metadata)",
                json.display()
            ));
            Tokenizer::from_dir(json.parent().expect("a file has a parent"))
        }
        None => tokenizer_from_metadata(file, notes)
            .with_context(|| format!("{}: tokenizer metadata", path.display())),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Arch {
    /// bitnet-b1.58 / bitnet-25 / bitnet: sub-norms.
    BitNet,
    /// llama with ternary tensors: no sub-norms, Q/K permuted for interleaved RoPE.
    Llama,
}

struct Meta<'a> {
    file: &'a GgufFile,
    arch: String,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.file.get(&format!("{}.{key}", self.arch))
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|v| usize::try_from(v).ok())
                    .ok_or_else(|| anyhow!("`{}.{key}` is not a non-negative integer", self.arch))
            })
            .transpose()
    }

    fn required(&self, key: &str) -> Result<usize> {
        self.usize(key)?
            .ok_or_else(|| anyhow!("metadata `{}.{key}` is missing", self.arch))
    }

    fn f32(&self, key: &str) -> Result<Option<f32>> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .map(|v| v as f32)
                    .ok_or_else(|| anyhow!("`{}.{key}` is not a number", self.arch))
            })
            .transpose()
    }
}

/// The model's configuration, architecture and a description of the file, from the metadata.
fn model_config(file: &GgufFile, notes: &mut Vec<String>) -> Result<(ModelConfig, Arch, String)> {
    let arch_name = file
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("metadata `general.architecture` is missing"))?
        .to_string();
    let arch = match arch_name.as_str() {
        "bitnet-b1.58" | "bitnet-25" | "bitnet" => Arch::BitNet,
        "llama" => Arch::Llama,
        other => bail!(
            "architecture `{other}` is not supported (tern runs bitnet-b1.58, bitnet-25, bitnet, \
             and llama with ternary tensors)"
        ),
    };
    let m = Meta {
        file,
        arch: arch_name.clone(),
    };
    let activation = match (arch_name.as_str(), m.get("hidden_activation")) {
        (_, Some(v)) => match v.as_str() {
            Some("relu2") => GateActivation::Relu2,
            Some("silu") | Some("swish") => GateActivation::Silu,
            _ => bail!(
                "`{arch_name}.hidden_activation` is {}, expected \"relu2\" or \"silu\"",
                v.summary()
            ),
        },
        ("bitnet-b1.58" | "bitnet-25", None) => GateActivation::Relu2,
        ("llama", None) => GateActivation::Silu,
        (_, None) => {
            let tokenizer = file.get("tokenizer.ggml.model").and_then(Value::as_str);
            match tokenizer {
                Some("gpt2") => {
                    notes.push(
                        "FFN activation ReLU² (no `bitnet.hidden_activation`; a Llama-3 BPE \
                         tokenizer means a BitNet b1.58 2B-4T-style model)"
                            .into(),
                    );
                    GateActivation::Relu2
                }
                Some("llama") => {
                    notes.push(
                        "FFN activation SiLU (no `bitnet.hidden_activation`; a SentencePiece \
                         tokenizer means a 1bitLLM bitnet_b1_58 model)"
                            .into(),
                    );
                    GateActivation::Silu
                }
                _ => bail!(
                    "`bitnet` file without `bitnet.hidden_activation` and with tokenizer {:?}: \
                     cannot tell ReLU² (2B-4T) from SiLU (1bitLLM)",
                    tokenizer
                ),
            }
        }
    };
    if let Some(kind) = m.get("rope.scaling.type") {
        let factor = m.f32("rope.scaling.factor")?.unwrap_or(1.0);
        ensure!(
            kind.as_str() == Some("none") || (kind.as_str() == Some("linear") && factor == 1.0),
            "rope scaling {} (factor {factor}) is not supported",
            kind.summary()
        );
    }
    ensure!(
        file.tensor("rope_freqs.weight").is_none(),
        "tensor `rope_freqs.weight` (Llama-3.1-style RoPE frequency scaling) is not supported"
    );

    let hidden = m.required("embedding_length")?;
    let heads = m.required("attention.head_count")?;
    ensure!(heads > 0, "`{arch_name}.attention.head_count` is 0");
    let head_dim = m.usize("attention.key_length")?.unwrap_or(hidden / heads);
    if let Some(rope_dim) = m.usize("rope.dimension_count")? {
        ensure!(
            rope_dim == head_dim,
            "`{arch_name}.rope.dimension_count` {rope_dim} differs from the head size {head_dim}: \
             partial rotary embeddings are not supported"
        );
    }
    let embed_info = tensor(file, "token_embd.weight")?;
    let vocab = match m.usize("vocab_size")? {
        Some(v) => v,
        None => embed_info.ne.get(1).copied().unwrap_or(0) as usize,
    };
    let rope_theta = match m.f32("rope.freq_base")? {
        Some(theta) => theta,
        None => {
            notes.push("rope.freq_base 10000 (llama.cpp's default; the key is absent)".into());
            10000.0
        }
    };
    let config = ModelConfig {
        architecture: format!("{arch_name} (GGUF)"),
        hidden,
        intermediate: m.required("feed_forward_length")?,
        layers: m.required("block_count")?,
        heads,
        kv_heads: m.usize("attention.head_count_kv")?.unwrap_or(heads),
        head_dim,
        vocab,
        max_positions: m.required("context_length")?,
        rope_theta,
        rms_norm_eps: m
            .f32("attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| anyhow!("`{arch_name}.attention.layer_norm_rms_epsilon` is missing"))?,
        activation,
        sub_norms: arch == Arch::BitNet,
        tied_embeddings: file.tensor("output.weight").is_none(),
        bos_token_id: token_id(file, "tokenizer.ggml.bos_token_id")?,
        eos_token_ids: token_id(file, "tokenizer.ggml.eos_token_id")?
            .into_iter()
            .collect(),
    };
    config.validate(&format!("{arch_name} metadata"))?;

    let mut types: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &file.tensors {
        *types.entry(t.ggml_type.name()).or_default() += 1;
    }
    let types = types
        .iter()
        .map(|(name, n)| format!("{name} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let format = format!(
        "GGUF v{}, architecture {arch_name}, tensor types {types}",
        file.version
    );
    Ok((config, arch, format))
}

/// Layer `l`'s tensors, decoded to the canonical layout.
fn layer(file: &GgufFile, c: &ModelConfig, arch: Arch, l: usize) -> Result<HostLayer> {
    let p = format!("blk.{l}");
    let linear = |name: &str, rows: usize, cols: usize, heads: Option<usize>| {
        ternary(file, &format!("{p}.{name}"), rows, cols, heads)
    };
    // llama.cpp permutes Q/K rows of `llama` files for its interleaved RoPE.
    let permuted = |h: usize| (arch == Arch::Llama).then_some(h);
    let sub_norm = |name: &str, len: usize| {
        c.sub_norms
            .then(|| vector(file, &format!("{p}.{name}.weight"), len))
            .transpose()
    };
    Ok(HostLayer {
        attn_norm: vector(file, &format!("{p}.attn_norm.weight"), c.hidden)?,
        q: linear("attn_q", c.q_dim(), c.hidden, permuted(c.heads))?,
        k: linear("attn_k", c.kv_dim(), c.hidden, permuted(c.kv_heads))?,
        v: linear("attn_v", c.kv_dim(), c.hidden, None)?,
        attn_sub_norm: sub_norm("attn_sub_norm", c.q_dim())?,
        o: linear("attn_output", c.hidden, c.q_dim(), None)?,
        ffn_norm: vector(file, &format!("{p}.ffn_norm.weight"), c.hidden)?,
        gate: linear("ffn_gate", c.intermediate, c.hidden, None)?,
        up: linear("ffn_up", c.intermediate, c.hidden, None)?,
        ffn_sub_norm: sub_norm("ffn_sub_norm", c.intermediate)?,
        down: linear("ffn_down", c.hidden, c.intermediate, None)?,
    })
}

fn token_id(file: &GgufFile, key: &str) -> Result<Option<u32>> {
    file.get(key)
        .map(|v| {
            v.as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| anyhow!("`{key}` is not a token id"))
        })
        .transpose()
}

fn tensor<'a>(file: &'a GgufFile, name: &str) -> Result<&'a TensorInfo> {
    file.tensor(name)
        .ok_or_else(|| anyhow!("tensor `{name}` is missing"))
}

fn shaped<'a>(file: &'a GgufFile, name: &str, ne: &[usize]) -> Result<&'a TensorInfo> {
    let t = tensor(file, name)?;
    ensure!(
        t.ne.iter().map(|&d| d as usize).eq(ne.iter().copied()),
        "tensor `{name}` has ne {:?}, expected {ne:?}",
        t.ne
    );
    Ok(t)
}

fn vector(file: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = shaped(file, name, &[len])?;
    dense_values(t.ggml_type, file.data(t), len).with_context(|| format!("tensor `{name}`"))
}

/// A table, served from the mapped file where its type and alignment allow, else decoded.
fn dense(file: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<DenseMatrix> {
    let t = shaped(file, name, &[cols, rows])?;
    let bytes = file.data(t);
    let in_place = match t.ggml_type {
        GgmlType::F32 => Some(TableDtype::F32),
        GgmlType::F16 => Some(TableDtype::F16),
        GgmlType::Bf16 => Some(TableDtype::Bf16),
        _ => None,
    };
    if let Some(mapped) = in_place.and_then(|ty| MappedValues::new(file.map(), bytes, ty)) {
        return Ok(DenseMatrix {
            rows,
            cols,
            data: DenseData::Mapped(mapped),
        });
    }
    let u16s = || {
        bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let data = match t.ggml_type {
        GgmlType::F16 => DenseData::F16(u16s().map(f16::from_bits).collect()),
        GgmlType::Bf16 => DenseData::Bf16(u16s().map(bf16::from_bits).collect()),
        ty if ty.is_ternary() => bail!("tensor `{name}` is {}, expected a dense type", ty.name()),
        // F32 as is; block-quantized types dequantized to f32.
        ty => DenseData::F32(
            dense_values(ty, bytes, rows * cols).with_context(|| format!("tensor `{name}`"))?,
        ),
    };
    Ok(DenseMatrix { rows, cols, data })
}

/// A ternary linear `[rows, cols]`; `permuted_heads` undoes llama.cpp's Q/K row permutation.
fn ternary(
    file: &GgufFile,
    name: &str,
    rows: usize,
    cols: usize,
    permuted_heads: Option<usize>,
) -> Result<TernaryMatrix> {
    let weight = format!("{name}.weight");
    let t = shaped(file, &weight, &[cols, rows])?;
    ensure!(
        t.ggml_type.is_ternary(),
        "tensor `{weight}` is {}: tern runs ternary GGUF types only (I2_S, TQ1_0, TQ2_0) for \
         linear layers",
        t.ggml_type.name()
    );
    let (mut values, mut scale) = ternary_values(t.ggml_type, file.data(t), rows * cols)
        .with_context(|| format!("tensor `{weight}` ({})", t.ggml_type.name()))?;
    if let Some(extra) = file.tensor(&format!("{name}.scale")) {
        let s = vector(file, &extra.name, 1)?;
        scale *= s[0];
    }
    if let Some(heads) = permuted_heads {
        values = unpermute_rows(&values, rows, cols, heads)
            .with_context(|| format!("tensor `{weight}`"))?;
    }
    TernaryMatrix::new(&weight, rows, cols, pack(&values, rows, cols)?, scale)
}

/// Inverse of llama.cpp's `permute` (HF rotate-half rows to interleaved pairs): GGUF row
/// `h*d + 2i + j` is HF row `h*d + j*d/2 + i` for head `h`, `i < d/2`, `j < 2`.
pub(super) fn unpermute_rows(
    values: &[i8],
    rows: usize,
    cols: usize,
    heads: usize,
) -> Result<Vec<i8>> {
    ensure!(
        heads > 0 && rows.is_multiple_of(heads) && (rows / heads).is_multiple_of(2),
        "{rows} rows cannot be split into {heads} heads of even size"
    );
    let d = rows / heads;
    let mut out = vec![0i8; values.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let from = (h * d + 2 * i + j) * cols;
                let to = (h * d + j * d / 2 + i) * cols;
                out[to..to + cols].copy_from_slice(&values[from..from + cols]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // Two heads of 4 rows, one column: HF rows 0..8; llama.cpp's permute interleaves the
        // halves of each head: [0, 2, 1, 3, 4, 6, 5, 7].
        let gguf = [0i8, 2, 1, 3, 4, 6, 5, 7].map(|r| r % 3 - 1);
        let hf: Vec<i8> = (0..8).map(|r| (r % 3) as i8 - 1).collect();
        assert_eq!(unpermute_rows(&gguf, 8, 1, 2).unwrap(), hf);
        assert!(unpermute_rows(&gguf, 8, 1, 3).is_err());
    }
}
