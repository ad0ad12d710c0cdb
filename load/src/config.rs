//! `config.json` of a Hugging Face model directory, validated into a [`ModelConfig`].
//!
//! Only what the graph needs is read; unknown keys are ignored. Everything that changes the math
//! (activation, sub-norms, tying, head layout, quantization convention) is decided here, from the
//! config alone, and never guessed from tensor names. Anything not understood is an error that names
//! the key.

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use std::path::Path;
use tern_cpu::bitlinear::reference::row_bytes;
use tern_cpu::elementwise::GateActivation;

/// The transformer's shape and numerics, independent of the file format it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: String,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    pub activation: GateActivation,
    /// RMSNorms before `o_proj` and `down_proj` (BitNet b1.58 2B-4T's `attn_sub_norm`/`ffn_sub_norm`).
    pub sub_norms: bool,
    /// Logits use the token embedding (no separate output head).
    pub tied_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// `(outputs, inputs)` of each layer's ternary linears: q, k, v, o, gate, up, down.
    pub fn linear_shapes(&self) -> [(usize, usize); 7] {
        let (h, q, kv, ff) = (self.hidden, self.q_dim(), self.kv_dim(), self.intermediate);
        [(q, h), (kv, h), (kv, h), (h, q), (ff, h), (ff, h), (h, ff)]
    }

    /// Ternary weights of the whole model: parameters, and bytes in the canonical 2-bit layout.
    pub fn ternary_size(&self) -> (usize, usize) {
        let (params, bytes) = self
            .linear_shapes()
            .iter()
            .fold((0, 0), |(p, b), &(rows, cols)| {
                (p + rows * cols, b + rows * row_bytes(cols))
            });
        (self.layers * params, self.layers * bytes)
    }

    /// Checks the invariants the graph relies on; `source` names the file in errors.
    pub fn validate(&self, source: &str) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden),
            ("intermediate_size", self.intermediate),
            ("num_hidden_layers", self.layers),
            ("num_attention_heads", self.heads),
            ("num_key_value_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab),
            ("max_position_embeddings", self.max_positions),
        ];
        for (key, value) in positive {
            ensure!(value > 0, "{source}: `{key}` must be positive");
        }
        ensure!(
            self.heads.is_multiple_of(self.kv_heads),
            "{source}: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
            self.heads,
            self.kv_heads
        );
        ensure!(
            self.head_dim.is_multiple_of(2),
            "{source}: head_dim ({}) must be even for rotary embeddings",
            self.head_dim
        );
        ensure!(
            !self.sub_norms || self.q_dim() == self.hidden,
            "{source}: num_attention_heads * head_dim ({}) must equal hidden_size ({}) when \
             attention has a sub-norm",
            self.q_dim(),
            self.hidden
        );
        ensure!(
            self.rope_theta.is_finite() && self.rope_theta > 0.0,
            "{source}: `rope_theta` must be positive"
        );
        ensure!(
            self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0,
            "{source}: `rms_norm_eps` must be non-negative"
        );
        Ok(())
    }
}

/// How a checkpoint stores its ternary linears.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// uint8 2-bit codes packed along the output dimension, `weight_scale` multiplies
    /// (`linear_class: autobitlinear`, `quantization_mode: offline`).
    PackedScaleMultiplies,
    /// The same packed codes, but `weight_scale` stores `1 / absmean` and **divides**
    /// (`linear_class: bitlinear`, transformers' default: Llama3-8B-1.58, Falcon3-*-1.58bit).
    /// The loader stores its reciprocal, so the canonical scale still multiplies.
    PackedScaleDivides,
    /// Full-precision master weights, ternarized at load by per-tensor absmean
    /// (`quantization_mode: online`, and 1bitLLM's fp16 latent weights).
    MasterWeights,
}

impl WeightFormat {
    /// One line for `tern info` and logs.
    pub fn describe(self) -> &'static str {
        match self {
            WeightFormat::PackedScaleMultiplies => {
                "packed 2-bit ternary + weight_scale that multiplies (autobitlinear, offline)"
            }
            WeightFormat::PackedScaleDivides => {
                "packed 2-bit ternary + weight_scale that divides (bitlinear, offline; stored as its reciprocal)"
            }
            WeightFormat::MasterWeights => "master weights ternarized at load (per-tensor absmean)",
        }
    }
}

/// Which published family a Hugging Face checkpoint belongs to: decides tensor names and the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfFamily {
    /// `model_type: bitnet` (BitNetForCausalLM, 2B-4T): sub-norms `attn_sub_norm`/`ffn_sub_norm`.
    BitNet,
    /// `model_type: llama` with `quantization_config.quant_method: bitnet` (Llama3-8B-1.58,
    /// Falcon3-*-1.58bit): a plain Llama block, no sub-norms.
    LlamaBitLinear,
    /// 1bitLLM bitnet_b1_58 (`architectures: [BitnetForCausalLM]`, `model_type: llama`, no
    /// `quantization_config`): fp16 latent weights, sub-norms `inner_attn_ln`/`ffn_layernorm`.
    OneBitLlm,
}

impl HfFamily {
    /// Tensor names of the sub-norms before `o_proj` and `down_proj`, under `model.layers.N.`.
    pub fn sub_norm_names(self) -> Option<[&'static str; 2]> {
        match self {
            HfFamily::BitNet => Some(["self_attn.attn_sub_norm", "mlp.ffn_sub_norm"]),
            HfFamily::OneBitLlm => Some(["self_attn.inner_attn_ln", "mlp.ffn_layernorm"]),
            HfFamily::LlamaBitLinear => None,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            HfFamily::BitNet => "BitNet b1.58 (model_type bitnet)",
            HfFamily::LlamaBitLinear => {
                "Llama with BitLinear projections (model_type llama, quant_method bitnet)"
            }
            HfFamily::OneBitLlm => "1bitLLM bitnet_b1_58 (BitnetForCausalLM, model_type llama)",
        }
    }
}

/// A parsed Hugging Face `config.json`.
#[derive(Clone, Debug)]
pub struct HfConfig {
    pub model: ModelConfig,
    pub family: HfFamily,
    pub weight_format: WeightFormat,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    rms_norm_eps: f32,
    rope_theta: Option<f32>,
    max_position_embeddings: usize,
    vocab_size: usize,
    tie_word_embeddings: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
    /// 1bitLLM's own quantization keys (no `quantization_config` there).
    weight_bits: Option<f64>,
    input_bits: Option<f64>,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
    quantization_config: Option<RawQuantization>,
}

#[derive(Deserialize)]
struct RawQuantization {
    quant_method: Option<String>,
    linear_class: Option<String>,
    quantization_mode: Option<String>,
    use_rms_norm: Option<bool>,
}

/// A token id field that is an integer in some configs and a list in others.
#[derive(Deserialize, Clone, Debug)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

impl HfConfig {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses a `config.json` text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(text).with_context(|| format!("{source}: invalid config"))?;
        let model_type = raw.model_type.as_deref().unwrap_or("");
        let family = family(&raw, source)?;
        let weight_format = match family {
            HfFamily::OneBitLlm => WeightFormat::MasterWeights,
            HfFamily::BitNet | HfFamily::LlamaBitLinear => weight_format(&raw, family, source)?,
        };
        let activation = match raw.hidden_act.as_deref() {
            Some("relu2") => GateActivation::Relu2,
            Some("silu") | Some("swish") => GateActivation::Silu,
            Some(other) => bail!(
                "{source}: hidden_act `{other}` is not supported (expected `relu2` or `silu`)"
            ),
            None => bail!("{source}: `hidden_act` is missing"),
        };
        let sub_norms = family.sub_norm_names().is_some();
        if let Some(scaling) = &raw.rope_scaling
            && !scaling.is_null()
        {
            bail!("{source}: rope_scaling {scaling} is not supported");
        }
        let heads = raw.num_attention_heads;
        ensure!(
            heads > 0,
            "{source}: `num_attention_heads` must be positive"
        );
        let model = ModelConfig {
            architecture: raw
                .architectures
                .first()
                .cloned()
                .unwrap_or_else(|| model_type.to_string()),
            hidden: raw.hidden_size,
            intermediate: raw.intermediate_size,
            layers: raw.num_hidden_layers,
            heads,
            kv_heads: raw.num_key_value_heads.unwrap_or(heads),
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / heads),
            vocab: raw.vocab_size,
            max_positions: raw.max_position_embeddings,
            rope_theta: raw.rope_theta.unwrap_or(10000.0),
            rms_norm_eps: raw.rms_norm_eps,
            activation,
            sub_norms,
            // transformers' defaults: BitNetConfig ties, LlamaConfig does not.
            tied_embeddings: raw
                .tie_word_embeddings
                .unwrap_or(family == HfFamily::BitNet),
            bos_token_id: raw
                .bos_token_id
                .as_ref()
                .and_then(|t| t.to_vec().first().copied()),
            eos_token_ids: raw
                .eos_token_id
                .as_ref()
                .map(TokenIds::to_vec)
                .unwrap_or_default(),
        };
        model.validate(source)?;
        Ok(Self {
            model,
            family,
            weight_format,
        })
    }
}

/// The family, from `model_type`, `architectures` and the quantization keys; never from tensor names.
fn family(raw: &RawConfig, source: &str) -> Result<HfFamily> {
    let onebit_arch = raw.architectures.iter().any(|a| a == "BitnetForCausalLM");
    match raw.model_type.as_deref() {
        Some("bitnet") => Ok(HfFamily::BitNet),
        Some("llama") if raw.quantization_config.is_some() => Ok(HfFamily::LlamaBitLinear),
        Some("llama") if onebit_arch => {
            for (key, value, want) in [
                ("weight_bits", raw.weight_bits, 1.0),
                ("input_bits", raw.input_bits, 8.0),
            ] {
                ensure!(
                    value.is_none_or(|v| v == want),
                    "{source}: `{key}` is {}, expected {want} (1bitLLM bitnet_b1_58: ternary \
                     weights, 8-bit activations)",
                    value.unwrap_or_default()
                );
            }
            Ok(HfFamily::OneBitLlm)
        }
        Some("llama") => bail!(
            "{source}: model_type `llama` without a `quantization_config` (quant_method `bitnet`) \
             or the 1bitLLM architecture `BitnetForCausalLM` is not a ternary checkpoint"
        ),
        other => bail!(
            "{source}: model_type `{}` is not supported (this version runs `bitnet`, and `llama` \
             with BitNet quantization)",
            other.unwrap_or("")
        ),
    }
}

fn weight_format(raw: &RawConfig, family: HfFamily, source: &str) -> Result<WeightFormat> {
    let Some(q) = &raw.quantization_config else {
        bail!(
            "{source}: no `quantization_config`: not a ternary checkpoint this version can run \
             (expected quant_method `bitnet`)"
        );
    };
    match q.quant_method.as_deref() {
        Some("bitnet") => {}
        other => bail!(
            "{source}: quantization_config.quant_method {other:?} is not supported (expected `bitnet`)"
        ),
    }
    // transformers' BitNetQuantConfig defaults: linear_class `bitlinear`, quantization_mode `offline`.
    let linear_class = q.linear_class.as_deref().unwrap_or("bitlinear");
    let mode = q.quantization_mode.as_deref().unwrap_or("offline");
    let format = match (linear_class, mode) {
        ("autobitlinear", "offline") => WeightFormat::PackedScaleMultiplies,
        ("autobitlinear", "online") => WeightFormat::MasterWeights,
        ("bitlinear", "offline") => WeightFormat::PackedScaleDivides,
        (class, mode) => bail!(
            "{source}: quantization_config linear_class `{class}` with quantization_mode `{mode}` \
             is not supported (expected autobitlinear with offline or online, or bitlinear with \
             offline)"
        ),
    };
    // transformers' BitLinear can put an RMSNorm inside every projection; no published checkpoint
    // uses it, and running without it would be silently wrong.
    ensure!(
        !q.use_rms_norm.unwrap_or(false),
        "{source}: quantization_config.use_rms_norm `true` (an RMSNorm inside every BitLinear) \
         is not supported"
    );
    ensure!(
        family == HfFamily::BitNet || format == WeightFormat::PackedScaleDivides,
        "{source}: model_type `llama` with linear_class `{linear_class}` is not a known checkpoint \
         layout (expected linear_class `bitlinear`)"
    );
    Ok(format)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"{"architectures":["BitNetForCausalLM"],"model_type":"bitnet",
        "hidden_size":256,"intermediate_size":512,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"hidden_act":"relu2","rms_norm_eps":1e-05,"rope_theta":500000.0,
        "max_position_embeddings":512,"vocab_size":1024,"tie_word_embeddings":true,
        "bos_token_id":1008,"eos_token_id":1009,"some_unknown_key":[1,2],
        "quantization_config":{"quant_method":"bitnet","linear_class":"autobitlinear",
        "quantization_mode":"offline"}}"#;

    /// The keys of 1bitLLM/bitnet_b1_58-large's config.json, at fixture size.
    const ONEBIT: &str = r#"{"architectures":["BitnetForCausalLM"],"model_type":"llama",
        "hidden_size":256,"intermediate_size":512,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":4,"hidden_act":"silu","rms_norm_eps":1e-05,"rope_theta":10000.0,
        "max_position_embeddings":512,"vocab_size":1024,"bos_token_id":1,"eos_token_id":2,
        "weight_bits":1,"input_bits":8,"rope_scaling":null,"torch_dtype":"float16"}"#;

    /// tiny-bitlinear's config.json keys (Llama3-8B-1.58 / Falcon3-1.58bit style).
    const BITLINEAR: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama",
        "hidden_size":256,"intermediate_size":768,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":1,"head_dim":64,"hidden_act":"silu","rms_norm_eps":1e-06,
        "rope_theta":1000042.0,"max_position_embeddings":512,"vocab_size":1024,
        "tie_word_embeddings":false,"rope_scaling":null,"quantization_config":{"quant_method":"bitnet"}}"#;

    #[test]
    fn families_are_detected_from_the_config() {
        let c = HfConfig::parse(BITLINEAR, "config.json").unwrap();
        assert_eq!(c.family, HfFamily::LlamaBitLinear);
        assert_eq!(c.weight_format, WeightFormat::PackedScaleDivides);
        assert_eq!(c.model.activation, GateActivation::Silu);
        assert!(!c.model.sub_norms && !c.model.tied_embeddings);
        assert_eq!((c.model.kv_heads, c.model.head_dim), (1, 64));

        let c = HfConfig::parse(ONEBIT, "config.json").unwrap();
        assert_eq!(c.family, HfFamily::OneBitLlm);
        assert_eq!(c.weight_format, WeightFormat::MasterWeights);
        assert!(c.model.sub_norms && !c.model.tied_embeddings);
        assert_eq!(
            c.family.sub_norm_names(),
            Some(["self_attn.inner_attn_ln", "mlp.ffn_layernorm"])
        );
    }

    fn with(key_value: &str) -> String {
        TINY.replacen('{', &format!("{{{key_value},"), 1)
    }

    #[test]
    fn parses_the_packed_fixture_config() {
        let c = HfConfig::parse(TINY, "config.json").unwrap();
        assert_eq!(c.weight_format, WeightFormat::PackedScaleMultiplies);
        let m = c.model;
        assert_eq!((m.hidden, m.heads, m.kv_heads, m.head_dim), (256, 4, 2, 64));
        assert_eq!(m.activation, GateActivation::Relu2);
        assert!(m.sub_norms && m.tied_embeddings);
        assert_eq!(m.eos_token_ids, vec![1009]);
    }

    #[test]
    fn online_mode_means_master_weights() {
        let text = TINY.replace("\"offline\"", "\"online\"");
        let c = HfConfig::parse(&text, "config.json").unwrap();
        assert_eq!(c.weight_format, WeightFormat::MasterWeights);
    }

    #[test]
    fn refusals_name_the_key() {
        let cases = [
            (
                TINY.replace("autobitlinear", "sparselinear"),
                "linear_class",
            ),
            (
                TINY.replace(
                    "\"quantization_mode\":\"offline\"",
                    "\"quantization_mode\":\"online\",\"use_rms_norm\":true",
                ),
                "use_rms_norm",
            ),
            (
                TINY.replace("\"model_type\":\"bitnet\"", "\"model_type\":\"llama\""),
                "linear_class",
            ),
            (
                ONEBIT.replace("\"weight_bits\":1", "\"weight_bits\":2"),
                "weight_bits",
            ),
            (
                ONEBIT.replace("BitnetForCausalLM", "LlamaForCausalLM"),
                "not a ternary checkpoint",
            ),
            (
                TINY.replace("\"model_type\":\"bitnet\"", "\"model_type\":\"mamba\""),
                "model_type",
            ),
            (TINY.replace("relu2", "gelu"), "hidden_act"),
            (
                TINY.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3"),
                "num_key_value_heads",
            ),
            (
                TINY.replace("\"quant_method\":\"bitnet\"", "\"quant_method\":\"gptq\""),
                "quant_method",
            ),
            (with("\"rope_scaling\":{\"type\":\"yarn\"}"), "rope_scaling"),
            (TINY.replace("\"hidden_size\":256,", ""), "hidden_size"),
            ("{not json".to_string(), "invalid config"),
        ];
        for (text, needle) in cases {
            assert_ne!(text, TINY);
            let err = format!("{:#}", HfConfig::parse(&text, "config.json").unwrap_err());
            assert!(err.contains(needle), "`{err}` should mention `{needle}`");
            assert!(err.contains("config.json"), "`{err}` should name the file");
        }
    }
}
