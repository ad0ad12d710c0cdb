//! Loads a Hugging Face model directory into host memory, in the canonical representation.
//!
//! A directory holds `config.json` and either `model.safetensors` or `model.safetensors.index.json`
//! plus the shards it names; every file is memory-mapped and checked (header, dtype, shape) before a
//! byte of it is used. Ternary linears come out as [`TernaryMatrix`] (scale multiplies), whatever the
//! checkpoint's convention:
//! - packed (`quantization_mode: offline`): `uint8 P[out/4][in]`, packed along the output dimension
//!   in four contiguous blocks: `W[i*out/4 + j][k] = ((P[j][k] >> 2i) & 3) - 1`, `weight_scale` [1]
//!   (BF16 or F32). With `linear_class: autobitlinear` the scale multiplies and is kept as is; with
//!   `linear_class: bitlinear` it stores `1/absmean` and divides (`y = acc / (s_x * weight_scale)`),
//!   so the canonical scale is its reciprocal `1 / weight_scale` (computed in f32; this changes the
//!   product by at most an ulp against dividing);
//! - master weights (`online`, and 1bitLLM's fp16 latent weights): ternarized here exactly like the
//!   reference `WeightQuant`: `m = max(mean|W|, 1e-5)`,
//!   `W_t = clamp(round_half_even(W * (1/m)), -1, 1)`, scale `m`.
//!
//! Sub-norm tensor names depend on the family ([`crate::config::HfFamily`]): `attn_sub_norm` /
//! `ffn_sub_norm` (BitNet 2B-4T), `inner_attn_ln` / `ffn_layernorm` (1bitLLM), none (Llama BitLinear).
//!
//! Embeddings and the output head stay in their stored dtype; norm weights become f32.

use crate::config::{HfConfig, ModelConfig, WeightFormat};
pub use crate::source::{HostLayer, HostModel, ModelSource};
use crate::ternary::{DenseData, DenseMatrix, MappedFile, MappedValues, TableDtype, TernaryMatrix};
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result, bail, ensure};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tern_cpu::bitlinear::reference::{pack, row_bytes};

/// Loads weights and tokenizer from `path` whole into memory (tests and tools that inspect
/// tensors; inference streams through [`open_model`]).
pub fn load_model_files(path: &Path) -> Result<(HostModel, Tokenizer)> {
    let (host, tokenizer) = load_model_parts(path)?;
    Ok((host, tokenizer?))
}

/// Like [`load_model_files`], but a tokenizer that cannot be built is returned as its error beside
/// the weights.
pub fn load_model_parts(path: &Path) -> Result<(HostModel, Result<Tokenizer>)> {
    let (source, tokenizer) = open_model(path)?;
    Ok((HostModel::collect(source.as_ref())?, tokenizer))
}

/// Opens `path`, a Hugging Face model directory or a GGUF file, as a streaming [`ModelSource`]
/// (headers and config are read and checked; tensors are read when asked for), with its tokenizer,
/// whose failure is returned apart: commands that need no text (bench, info, convert) run without
/// one.
pub fn open_model(path: &Path) -> Result<(Box<dyn ModelSource>, Result<Tokenizer>)> {
    if is_gguf_file(path)? {
        let (source, tokenizer) = crate::gguf::model::GgufSource::open(path)?;
        return Ok((Box::new(source), tokenizer));
    }
    Ok((Box::new(HfSource::open(path)?), Tokenizer::from_dir(path)))
}

/// The tokenizer alone, without reading weights: a model directory's, or a GGUF file's (also a
/// vocab-only one). Notes on what was inferred are logged.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if !is_gguf_file(path)? {
        return Tokenizer::from_dir(path);
    }
    let file = crate::gguf::GgufFile::open(path)?;
    let mut notes = Vec::new();
    let tokenizer = crate::gguf::model::gguf_tokenizer(path, &file, &mut notes)?;
    for note in &notes {
        tracing::warn!("{}: {note}", path.display());
    }
    Ok(tokenizer)
}

/// Whether `path` is a GGUF file (`false` for a directory); any other file is an error.
fn is_gguf_file(path: &Path) -> Result<bool> {
    if !path.is_file() {
        return Ok(false);
    }
    ensure!(
        crate::gguf::is_gguf(path),
        "{}: not a GGUF file (no GGUF magic) and not a model directory",
        path.display()
    );
    Ok(true)
}

/// Loads a model directory in Hugging Face layout whole into memory.
pub fn load_hf_dir(dir: &Path) -> Result<HostModel> {
    HostModel::collect(&HfSource::open(dir)?)
}

/// A model directory in Hugging Face layout, read tensor by tensor from its mapped files.
pub struct HfSource {
    config: HfConfig,
    files: SafetensorsFiles,
    format: String,
}

impl HfSource {
    /// Reads and checks `config.json` and every safetensors header.
    pub fn open(dir: &Path) -> Result<Self> {
        ensure!(
            dir.is_dir(),
            "{} is not a model directory (expected config.json and model.safetensors inside)",
            dir.display()
        );
        let config = HfConfig::from_dir(dir)?;
        let files = SafetensorsFiles::open(dir)?;
        let format = format!(
            "safetensors, {}: {}",
            config.family.describe(),
            config.weight_format.describe()
        );
        Ok(Self {
            config,
            files,
            format,
        })
    }
}

impl ModelSource for HfSource {
    fn config(&self) -> &ModelConfig {
        &self.config.model
    }

    fn format(&self) -> &str {
        &self.format
    }

    fn embed(&self) -> Result<Cow<'_, DenseMatrix>> {
        let c = &self.config.model;
        let embed = self
            .files
            .dense("model.embed_tokens.weight", [c.vocab, c.hidden])?;
        Ok(Cow::Owned(embed))
    }

    fn output(&self) -> Result<Option<Cow<'_, DenseMatrix>>> {
        let c = &self.config.model;
        if c.tied_embeddings {
            return Ok(None);
        }
        let head = self.files.dense("lm_head.weight", [c.vocab, c.hidden])?;
        Ok(Some(Cow::Owned(head)))
    }

    fn final_norm(&self) -> Result<Cow<'_, [f32]>> {
        let c = &self.config.model;
        Ok(Cow::Owned(
            self.files.vector("model.norm.weight", c.hidden)?,
        ))
    }

    fn layer(&self, index: usize) -> Result<Cow<'_, HostLayer>> {
        Ok(Cow::Owned(load_layer(&self.files, &self.config, index)?))
    }
}

fn load_layer(files: &SafetensorsFiles, config: &HfConfig, l: usize) -> Result<HostLayer> {
    let c = &config.model;
    let p = format!("model.layers.{l}");
    let linear = |name: &str, rows: usize, cols: usize| {
        files.ternary(&format!("{p}.{name}"), rows, cols, config.weight_format)
    };
    let sub_norms = config.family.sub_norm_names();
    let sub_norm = |which: usize, len: usize| -> Result<Option<Vec<f32>>> {
        sub_norms
            .map(|names| files.vector(&format!("{p}.{}.weight", names[which]), len))
            .transpose()
    };
    Ok(HostLayer {
        attn_norm: files.vector(&format!("{p}.input_layernorm.weight"), c.hidden)?,
        q: linear("self_attn.q_proj", c.q_dim(), c.hidden)?,
        k: linear("self_attn.k_proj", c.kv_dim(), c.hidden)?,
        v: linear("self_attn.v_proj", c.kv_dim(), c.hidden)?,
        attn_sub_norm: sub_norm(0, c.q_dim())?,
        o: linear("self_attn.o_proj", c.hidden, c.q_dim())?,
        ffn_norm: files.vector(&format!("{p}.post_attention_layernorm.weight"), c.hidden)?,
        gate: linear("mlp.gate_proj", c.intermediate, c.hidden)?,
        up: linear("mlp.up_proj", c.intermediate, c.hidden)?,
        ffn_sub_norm: sub_norm(1, c.intermediate)?,
        down: linear("mlp.down_proj", c.hidden, c.intermediate)?,
    })
}

/// One tensor of a checkpoint, located by [`SafetensorsFiles::open`].
struct TensorEntry {
    /// Index into `SafetensorsFiles::maps`.
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range in the mapped file.
    bytes: std::ops::Range<usize>,
}

/// The memory-mapped safetensors files of a checkpoint and where each tensor lies in them (every
/// header parsed once, at open).
struct SafetensorsFiles {
    maps: Vec<(PathBuf, Arc<MappedFile>)>,
    tensors: BTreeMap<String, TensorEntry>,
}

impl SafetensorsFiles {
    fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if single.is_file() {
            vec!["model.safetensors".into()]
        } else if index.is_file() {
            shards_of_index(&index)?
        } else {
            bail!(
                "{}: neither model.safetensors nor model.safetensors.index.json found",
                dir.display()
            );
        };
        let mut maps = Vec::new();
        let mut entries = BTreeMap::new();
        for (i, name) in shard_names.iter().enumerate() {
            let path = dir.join(name);
            let map = MappedFile::open(&path)?;
            let tensors = SafeTensors::deserialize(&map).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not a valid safetensors file (truncated or corrupt?): {e}",
                    path.display()
                )
            })?;
            for (tensor_name, view) in tensors.tensors() {
                let start = view.data().as_ptr() as usize - map.as_ptr() as usize;
                let entry = TensorEntry {
                    file: i,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: start..start + view.data().len(),
                };
                entries.insert(tensor_name, entry);
            }
            maps.push((path, Arc::new(map)));
        }
        Ok(Self {
            maps,
            tensors: entries,
        })
    }

    /// The raw tensor: its file, dtype, shape and bytes.
    fn raw(&self, name: &str) -> Result<(&Path, Dtype, &[usize], &[u8])> {
        let Some(t) = self.tensors.get(name) else {
            bail!(
                "tensor `{name}` is missing from {}",
                self.maps
                    .iter()
                    .map(|(p, _)| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        let (path, map) = &self.maps[t.file];
        Ok((path, t.dtype, &t.shape, &map[t.bytes.clone()]))
    }

    /// The map a tensor's bytes lie in.
    fn map_of(&self, name: &str) -> &Arc<MappedFile> {
        &self.maps[self.tensors[name].file].1
    }

    fn expect_shape(&self, name: &str, want: &[usize]) -> Result<(&Path, Dtype, &[u8])> {
        let (path, dtype, shape, data) = self.raw(name)?;
        ensure!(
            shape == want,
            "{}: tensor `{name}` has shape {shape:?}, expected {want:?}",
            path.display()
        );
        Ok((path, dtype, data))
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (path, dtype, data) = self.expect_shape(name, &[len])?;
        float_values(data, dtype).with_context(|| format!("{}: tensor `{name}`", path.display()))
    }

    /// A table, served from the mapped file where its dtype and alignment allow, else copied.
    fn dense(&self, name: &str, [rows, cols]: [usize; 2]) -> Result<DenseMatrix> {
        let (path, dtype, data) = self.expect_shape(name, &[rows, cols])?;
        let in_place = match dtype {
            Dtype::BF16 => Some(TableDtype::Bf16),
            Dtype::F16 => Some(TableDtype::F16),
            Dtype::F32 => Some(TableDtype::F32),
            _ => None,
        };
        if let Some(mapped) = in_place.and_then(|t| MappedValues::new(self.map_of(name), data, t)) {
            return Ok(DenseMatrix {
                rows,
                cols,
                data: DenseData::Mapped(mapped),
            });
        }
        let data = match dtype {
            Dtype::BF16 => DenseData::Bf16(le_u16(data).map(bf16::from_bits).collect()),
            Dtype::F16 => DenseData::F16(le_u16(data).map(f16::from_bits).collect()),
            Dtype::F32 => DenseData::F32(le_f32(data).collect()),
            other => bail!(
                "{}: tensor `{name}` has dtype {other:?}, expected BF16, F16 or F32",
                path.display()
            ),
        };
        Ok(DenseMatrix { rows, cols, data })
    }

    /// A ternary linear `[rows, cols]`, in whichever format the config names.
    fn ternary(
        &self,
        prefix: &str,
        rows: usize,
        cols: usize,
        format: WeightFormat,
    ) -> Result<TernaryMatrix> {
        let name = format!("{prefix}.weight");
        match format {
            WeightFormat::PackedScaleMultiplies | WeightFormat::PackedScaleDivides => {
                ensure!(
                    rows.is_multiple_of(4),
                    "tensor `{name}`: {rows} outputs cannot be packed four to a byte"
                );
                let (path, dtype, data) = self.expect_shape(&name, &[rows / 4, cols])?;
                ensure!(
                    dtype == Dtype::U8,
                    "{}: tensor `{name}` has dtype {dtype:?}, expected U8 (packed ternary)",
                    path.display()
                );
                let scale_name = format!("{prefix}.weight_scale");
                let stored = self.vector(&scale_name, 1)?[0];
                let scale = if format == WeightFormat::PackedScaleDivides {
                    ensure!(
                        stored.is_finite() && stored != 0.0,
                        "tensor `{scale_name}`: {stored} cannot divide (linear_class bitlinear)"
                    );
                    1.0 / stored
                } else {
                    stored
                };
                let codes = output_blocks_to_canonical(data, rows, cols)
                    .with_context(|| format!("{}: tensor `{name}`", path.display()))?;
                TernaryMatrix::new(&name, rows, cols, codes, scale)
            }
            WeightFormat::MasterWeights => {
                let (path, dtype, data) = self.expect_shape(&name, &[rows, cols])?;
                let master = float_values(data, dtype)
                    .with_context(|| format!("{}: tensor `{name}`", path.display()))?;
                let (values, scale) = ternarize_absmean(&master);
                TernaryMatrix::new(&name, rows, cols, pack(&values, rows, cols)?, scale)
            }
        }
    }
}

fn shards_of_index(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", index.display()))?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        bail!("{}: no `weight_map` object", index.display());
    };
    let mut shards: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            bail!(
                "{}: weight_map[{tensor}] is not a file name",
                index.display()
            );
        };
        ensure!(
            !file.contains('/') && !file.contains('\\') && !file.starts_with('.'),
            "{}: weight_map[{tensor}] = `{file}` is not a plain file name",
            index.display()
        );
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_string());
        }
    }
    Ok(shards)
}

/// Moves the codes of the HF packed layout (see the module doc) into the canonical one (rows by
/// output, four codes per byte along the input), without an unpacked copy: both store
/// `code = value + 1`.
fn output_blocks_to_canonical(packed: &[u8], rows: usize, cols: usize) -> Result<Vec<u8>> {
    let block = rows / 4;
    let stride = row_bytes(cols);
    let mut codes = vec![0u8; rows * stride];
    for j in 0..block {
        for k in 0..cols {
            let byte = packed[j * cols + k];
            for i in 0..4 {
                let code = (byte >> (2 * i)) & 3;
                ensure!(
                    code != 3,
                    "packed byte ({j}, {k}) holds the 2-bit code 3, which is not a ternary value"
                );
                codes[(i * block + j) * stride + k / 4] |= code << (2 * (k % 4));
            }
        }
    }
    // Padding codes of a last partial byte stand for 0 (code 1), as `pack` writes them.
    if !cols.is_multiple_of(4) {
        let pad = 0x55u8 << (2 * (cols % 4));
        codes
            .chunks_exact_mut(stride)
            .for_each(|row| row[stride - 1] |= pad);
    }
    Ok(codes)
}

/// Per-tensor absmean ternarization; returns the values and the scale `m` that multiplies them.
pub fn ternarize_absmean(master: &[f32]) -> (Vec<i8>, f32) {
    let sum_abs: f64 = master.iter().map(|v| f64::from(v.abs())).sum();
    let mean = (sum_abs / master.len().max(1) as f64) as f32;
    let m = mean.max(1e-5);
    let inv = 1.0 / m;
    let values = master
        .iter()
        .map(|v| (v * inv).round_ties_even().clamp(-1.0, 1.0) as i8)
        .collect();
    (values, m)
}

fn float_values(data: &[u8], dtype: Dtype) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::BF16 => le_u16(data).map(|b| bf16::from_bits(b).to_f32()).collect(),
        Dtype::F16 => le_u16(data).map(|b| f16::from_bits(b).to_f32()).collect(),
        Dtype::F32 => le_f32(data).collect(),
        other => bail!("dtype {other:?} where BF16, F16 or F32 was expected"),
    })
}

fn le_u16(data: &[u8]) -> impl Iterator<Item = u16> + '_ {
    data.chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
}

fn le_f32(data: &[u8]) -> impl Iterator<Item = f32> + '_ {
    data.chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpacks_the_documented_example() {
        // out = 8, in = 1: byte 0b10_01_00_10 gives rows 0, 2, 4, 6 = +1, -1, 0, +1.
        let codes = output_blocks_to_canonical(&[0b1001_0010, 0b0101_0101], 8, 1).unwrap();
        let m = TernaryMatrix::new("t", 8, 1, codes.clone(), 1.0).unwrap();
        assert_eq!(m.to_i8(), vec![1, 0, -1, 0, 0, 0, 1, 0]);
        assert_eq!(
            codes,
            pack(&m.to_i8(), 8, 1).unwrap(),
            "padding as pack writes it"
        );
        assert!(output_blocks_to_canonical(&[0b11, 0], 8, 1).is_err());
    }

    #[test]
    fn absmean_ternarization() {
        let (values, scale) = ternarize_absmean(&[0.9, -0.2, 0.05, -3.0]);
        // mean |W| = 1.0375: 0.9 -> 1, -0.2 -> 0, 0.05 -> 0, -3.0 -> -1 (clamped).
        assert_eq!(values, vec![1, 0, 0, -1]);
        assert!((scale - 1.0375).abs() < 1e-6);
        let (zeros, floor) = ternarize_absmean(&[0.0; 4]);
        assert_eq!((zeros, floor), (vec![0; 4], 1e-5));
    }
}
