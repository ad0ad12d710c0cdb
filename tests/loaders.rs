//! Checkpoint families without a golden fixture of their own, built here from tiny-bf16's tensors.

mod common;

use common::*;
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use tern::loader::load_hf_dir;
use tern_cpu::elementwise::GateActivation;

/// 1bitLLM/bitnet_b1_58's config.json keys, at tiny-bf16's shape.
const ONEBIT_CONFIG: &str = r#"{
  "architectures": ["BitnetForCausalLM"], "model_type": "llama",
  "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
  "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "rope_scaling": null,
  "max_position_embeddings": 512, "vocab_size": 1024, "tie_word_embeddings": false,
  "bos_token_id": 1008, "eos_token_id": 1009, "weight_bits": 1, "input_bits": 8,
  "torch_dtype": "float16"
}"#;

/// The 1bitLLM name of a tiny-bf16 (BitNet 2B-4T layout) tensor.
fn onebit_name(name: &str) -> String {
    name.replace("self_attn.attn_sub_norm", "self_attn.inner_attn_ln")
        .replace("mlp.ffn_sub_norm", "mlp.ffn_layernorm")
}

/// Writes a 1bitLLM-style checkpoint: tiny-bf16's master weights as fp16 latent weights, renamed
/// sub-norms, and an explicit `lm_head.weight`. Returns the directory.
fn write_onebit_checkpoint(drop: Option<&str>) -> tempfile::TempDir {
    let bytes = std::fs::read(fixture_dir("tiny-bf16").join("model.safetensors")).unwrap();
    let source = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in source.tensors() {
        assert_eq!(view.dtype(), Dtype::BF16);
        let as_f16: Vec<u8> = view
            .data()
            .chunks_exact(2)
            .flat_map(|b| {
                let v = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                f16::from_f32(v).to_bits().to_le_bytes()
            })
            .collect();
        if name == "model.embed_tokens.weight" {
            tensors.push((
                "lm_head.weight".into(),
                Dtype::F16,
                view.shape().to_vec(),
                as_f16.clone(),
            ));
        }
        tensors.push((
            onebit_name(&name),
            Dtype::F16,
            view.shape().to_vec(),
            as_f16,
        ));
    }
    tensors.retain(|(name, ..)| Some(name.as_str()) != drop);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.path().join("config.json"), ONEBIT_CONFIG).unwrap();
    dir
}

#[test]
fn onebitllm_latent_weights_are_ternarized_with_their_sub_norms() {
    let dir = write_onebit_checkpoint(None);
    let model = load_hf_dir(dir.path()).unwrap();
    let reference = load("tiny-bf16");
    let c = &model.config;
    assert_eq!(c.activation, GateActivation::Silu, "1bitLLM is SwiGLU");
    assert!(c.sub_norms && !c.tied_embeddings);
    assert!(model.output.is_some(), "lm_head.weight is its own tensor");
    assert!(model.format.contains("1bitLLM"), "{}", model.format);
    for (got, want) in model.layers.iter().zip(&reference.layers) {
        // bf16 values are exact in f16 except a few subnormals, which never sit at a rounding
        // boundary of the ternarization: the matrices are tiny-bf16's.
        for (g, w) in [
            (&got.q, &want.q),
            (&got.o, &want.o),
            (&got.down, &want.down),
        ] {
            assert_eq!(g.codes, w.codes);
            assert!(((g.scale - w.scale) / w.scale).abs() < 1e-5);
        }
        assert_eq!(got.attn_sub_norm, want.attn_sub_norm);
        assert_eq!(got.ffn_sub_norm, want.ffn_sub_norm);
    }
}

#[test]
fn a_missing_onebitllm_sub_norm_is_named() {
    let missing = "model.layers.1.mlp.ffn_layernorm.weight";
    let dir = write_onebit_checkpoint(Some(missing));
    let err = format!("{:#}", load_hf_dir(dir.path()).unwrap_err());
    assert!(err.contains(missing), "{err}");
}
