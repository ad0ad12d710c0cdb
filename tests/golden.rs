//! Golden checks of tests/fixtures/README.md section 7 on the Hugging Face fixtures, through the
//! public API on every backend of `common::backends()`: weights, module outputs, prefill logits, teacher-forced decode with
//! the KV cache, free-running greedy decode and perplexity.

mod common;

use common::*;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tern::backend::Backend;
use tern::capture::Capture;
use tern::engine::GenerateOptions;
use tern::loader::{HostLayer, HostModel};
use tern::model::LogitsFor;
use tern::perplexity::perplexity;
use tern::sampler::{Sampler, SamplingParams};
use tern::ternary::TernaryMatrix;

/// Runs `check(fixture, label, backend)` for every Hugging Face fixture on every backend; `label`
/// names both in assertion messages.
fn on_every_backend(check: impl FnMut(&str, &str, Box<dyn Backend>)) {
    on_backends(backends, check);
}

/// As [`on_every_backend`], on the backends `list` gives.
fn on_backends(
    list: impl Fn() -> Vec<(String, Box<dyn Backend>)>,
    mut check: impl FnMut(&str, &str, Box<dyn Backend>),
) {
    for fixture in all_fixtures() {
        for (backend_name, backend) in list() {
            check(fixture, &format!("{fixture} on {backend_name}"), backend);
        }
    }
}

fn tolerance(g: &serde_json::Value, key: &str) -> f32 {
    g["tolerance"][key].as_f64().unwrap() as f32
}

fn linear<'a>(layer: &'a HostLayer, name: &str) -> &'a TernaryMatrix {
    match name {
        "self_attn.q_proj" => &layer.q,
        "self_attn.k_proj" => &layer.k,
        "self_attn.v_proj" => &layer.v,
        "self_attn.o_proj" => &layer.o,
        "mlp.gate_proj" => &layer.gate,
        "mlp.up_proj" => &layer.up,
        "mlp.down_proj" => &layer.down,
        other => panic!("unknown linear {other}"),
    }
}

#[test]
fn weights_unpack_or_ternarize_to_the_golden_matrices() {
    for name in all_fixtures() {
        let g = golden(name);
        let model = load(name);
        // tiny-bitlinear: untied head, and its weight_scale divides.
        let bitlinear = g["format"] == "packed-bitlinear";
        assert_eq!(model.output.is_none(), !bitlinear, "{name}: tied head");
        let weights = g["weights"].as_object().unwrap();
        assert_eq!(weights.len(), 7 * model.layers.len());
        for (key, want) in weights {
            let rest = key.strip_prefix("model.layers.").unwrap();
            let (l, proj) = rest.split_once('.').unwrap();
            let m = linear(
                &model.layers[l.parse::<usize>().unwrap()],
                proj.strip_suffix(".weight").unwrap(),
            );
            let values = m.to_i8();
            let bytes: Vec<u8> = values.iter().map(|&v| v as u8).collect();
            let sha = format!("{:x}", Sha256::digest(&bytes));
            assert_eq!(
                sha,
                want["ternary_sha256"].as_str().unwrap(),
                "{name} {key}"
            );
            let count = |v: i8| values.iter().filter(|&&x| x == v).count() as u64;
            assert_eq!(
                count(-1),
                want["count_minus1"].as_u64().unwrap(),
                "{name} {key}"
            );
            assert_eq!(
                count(0),
                want["count_zero"].as_u64().unwrap(),
                "{name} {key}"
            );
            assert_eq!(
                count(1),
                want["count_plus1"].as_u64().unwrap(),
                "{name} {key}"
            );
            let stored = want
                .get("weight_scale")
                .or_else(|| want.get("absmean_f32"))
                .unwrap()
                .as_f64()
                .unwrap() as f32;
            // The canonical scale multiplies; a bitlinear checkpoint's weight_scale divides.
            let scale = if bitlinear { 1.0 / stored } else { stored };
            assert!(
                ((m.scale - scale) / scale).abs() <= 1e-6,
                "{name} {key}: {} vs {scale}",
                m.scale
            );
        }
    }
}

/// Records the named intermediates of a forward pass (see `tern::capture`).
#[derive(Clone, Default)]
struct Recorded(Arc<Mutex<HashMap<String, Vec<f32>>>>);

impl Capture for Recorded {
    fn wants(&self, _: &str) -> bool {
        true
    }

    fn record(&mut self, name: &str, _: usize, values: &[f32]) -> anyhow::Result<()> {
        let mut map = self.0.lock().unwrap();
        map.insert(name.to_string(), values.to_vec());
        Ok(())
    }
}

impl Recorded {
    fn take(&self, name: &str) -> Vec<f32> {
        let map = self.0.lock().unwrap();
        map.get(name)
            .unwrap_or_else(|| panic!("no intermediate {name}"))
            .clone()
    }
}

/// The recorded module tensors of a fixture (tests/fixtures/README.md: `modules`).
struct Modules {
    values: Vec<f32>,
    golden: serde_json::Value,
}

impl Modules {
    fn new(name: &str) -> Self {
        let golden = golden(name);
        let file = golden["modules"]["file"].as_str().unwrap().to_string();
        Self {
            values: read_f32(name, &file),
            golden,
        }
    }

    fn tensor(&self, key: &str) -> Vec<f32> {
        let t = &self.golden["modules"]["tensors"][key];
        let offset = t["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("no module {key}")) as usize;
        let len: usize = t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .product();
        self.values[offset..offset + len].to_vec()
    }
}

/// Columns `range` of each row of `width` values.
fn columns(values: &[f32], width: usize, range: std::ops::Range<usize>) -> Vec<f32> {
    values
        .chunks_exact(width)
        .flat_map(|row| row[range.clone()].to_vec())
        .collect()
}

#[test]
fn every_named_intermediate_matches_the_recorded_modules() {
    on_every_backend(check_named_intermediates);
}

/// The same on the CUDA kernels under CPU emulation (tests/common/cuda_emu.rs).
#[test]
fn every_named_intermediate_matches_on_the_emulated_cuda_kernels() {
    on_backends(emulated_cuda_backends, check_named_intermediates);
}

fn check_named_intermediates(fixture: &str, name: &str, backend: Box<dyn Backend>) {
    let model = load(fixture);
    let c = model.config.clone();
    let modules = Modules::new(fixture);
    let strict = tolerance(&modules.golden, "strict_atol");
    let ids = ids(&modules.golden["modules"]["input_ids"]);
    let t = ids.len();
    let mut engine = engine(&model, backend, 0);
    let recorded = Recorded::default();
    engine.set_capture(Some(Box::new(recorded.clone())));
    let seq = engine.new_sequence().unwrap();
    engine.feed(seq, &ids, LogitsFor::All).unwrap();
    // Relative to max(1, max |ref|), as the fixtures' tolerance says.
    let check = |got: &[f32], key: &str| {
        let want = modules.tensor(key);
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let (max, _) = diff(got, &want);
        assert!(
            max / scale <= strict,
            "{name} {key}: max |diff| {max} (scale {scale})"
        );
    };
    check(&recorded.take("inp_embd"), "embed_tokens.out");
    let (qd, kd, ff) = (c.q_dim(), c.kv_dim(), c.intermediate);
    for l in 0..c.layers {
        let blk = |what: &str| recorded.take(&format!("blk.{l}.{what}"));
        let qkv = blk("qkv");
        let gate_up = blk("ffn_gate_up");
        // Without sub-norms, the attention output and act(g)·u are the projections' inputs.
        let (kqv_out, ffn_act) = if c.sub_norms {
            ("self_attn.attn_sub_norm.in", "mlp.ffn_sub_norm.in")
        } else {
            ("self_attn.o_proj.in", "mlp.down_proj.in")
        };
        let mut pairs = vec![
            (blk("attn_norm"), "input_layernorm.out"),
            (columns(&qkv, qd + 2 * kd, 0..qd), "self_attn.q_proj.out"),
            (
                columns(&qkv, qd + 2 * kd, qd..qd + kd),
                "self_attn.k_proj.out",
            ),
            (
                columns(&qkv, qd + 2 * kd, qd + kd..qd + 2 * kd),
                "self_attn.v_proj.out",
            ),
            (blk("kqv_out"), kqv_out),
            (blk("attn_out"), "self_attn.o_proj.out"),
            (blk("ffn_inp"), "post_attention_layernorm.in"),
            (blk("ffn_norm"), "post_attention_layernorm.out"),
            (columns(&gate_up, 2 * ff, 0..ff), "mlp.gate_proj.out"),
            (columns(&gate_up, 2 * ff, ff..2 * ff), "mlp.up_proj.out"),
            (blk("ffn_act"), ffn_act),
            (blk("ffn_out"), "mlp.down_proj.out"),
            (blk("l_out"), "out"),
        ];
        if c.sub_norms {
            pairs.push((blk("attn_sub_norm"), "self_attn.attn_sub_norm.out"));
            pairs.push((blk("ffn_sub_norm"), "mlp.ffn_sub_norm.out"));
        }
        for (got, key) in pairs {
            check(&got, &format!("layers.{l}.{key}"));
        }
    }
    check(&recorded.take("result_norm"), "norm.out");

    // Attention in decode form: the last token alone after the others, through the cache.
    engine.clear(seq).unwrap();
    engine.set_capture(None);
    engine.feed(seq, &ids[..t - 1], LogitsFor::Last).unwrap();
    engine.set_capture(Some(Box::new(recorded.clone())));
    engine.feed(seq, &ids[t - 1..], LogitsFor::Last).unwrap();
    for l in 0..c.layers {
        let key = if c.sub_norms {
            "self_attn.attn_sub_norm.in"
        } else {
            "self_attn.o_proj.in"
        };
        let want = modules.tensor(&format!("layers.{l}.{key}"));
        let (max, _) = diff(
            &recorded.take(&format!("blk.{l}.kqv_out")),
            &want[(t - 1) * qd..],
        );
        assert!(
            max <= strict,
            "{name} layer {l}: decode-form attention differs by {max}"
        );
    }
}

fn check_argmax(name: &str, what: &str, logits: &[f32], top: &serde_json::Value, gap: f32) {
    let top6: Vec<f32> = top["top6_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    if top6[0] - top6[1] >= gap {
        let want = top["top5_ids"][0].as_u64().unwrap() as usize;
        assert_eq!(argmax(logits), want, "{name} {what}: argmax");
    }
}

#[test]
fn prefill_logits_match_at_every_position() {
    on_every_backend(|fixture, name, backend| {
        let g = golden(fixture);
        let model = load(fixture);
        let mut engine = engine(&model, backend, 0);
        let vocab = model.config.vocab;
        for case in g["logits"].as_array().unwrap() {
            let seq_name = case["name"].as_str().unwrap();
            let tokens = ids(&case["input_ids"]);
            let seq = engine.new_sequence().unwrap();
            let logits = engine.feed(seq, &tokens, LogitsFor::All).unwrap();
            engine.release(seq);
            let last = &logits[(tokens.len() - 1) * vocab..];
            let want_last = read_f32(
                fixture,
                case["last_position_logits"]["file"].as_str().unwrap(),
            );
            let (max, mean) = diff(last, &want_last);
            if case["check"] == "strict" {
                let want_all = read_f32(
                    fixture,
                    case["all_position_logits"]["file"].as_str().unwrap(),
                );
                let (max_all, _) = diff(&logits, &want_all);
                assert!(
                    max_all <= tolerance(&g, "strict_atol"),
                    "{name} {seq_name}: max |diff| {max_all}"
                );
            } else {
                assert!(
                    max <= tolerance(&g, "loose_atol"),
                    "{name} {seq_name}: max |diff| {max}"
                );
                assert!(
                    mean <= tolerance(&g, "loose_mean_abs"),
                    "{name} {seq_name}: mean |diff| {mean}"
                );
            }
            for (t, top) in case["per_position_top"]
                .as_array()
                .unwrap()
                .iter()
                .enumerate()
            {
                let row = &logits[t * vocab..(t + 1) * vocab];
                check_argmax(
                    name,
                    &format!("{seq_name} position {t}"),
                    row,
                    top,
                    tolerance(&g, "top1_gap"),
                );
            }
        }
    });
}

fn greedy_cases(g: &serde_json::Value) -> Vec<serde_json::Value> {
    g["greedy"]["cases"].as_array().unwrap().clone()
}

#[test]
fn teacher_forced_decode_through_the_kv_cache() {
    on_every_backend(|fixture, name, backend| {
        let g = golden(fixture);
        let model = load(fixture);
        let mut engine = engine(&model, backend, 0);
        let vocab = model.config.vocab;
        for (i, case) in greedy_cases(&g).iter().enumerate() {
            let prompt = ids(&case["prompt_ids"]);
            let new = ids(&case["new_ids"]);
            let steps = read_f32(fixture, case["step_logits"]["file"].as_str().unwrap());
            let robust = case["robust_prefix_len"].as_u64().unwrap() as usize;
            let seq = engine.new_sequence().unwrap();
            let mut logits = engine.feed(seq, &prompt, LogitsFor::Last).unwrap();
            for (k, &id) in new.iter().enumerate() {
                let (max, mean) = diff(&logits, &steps[k * vocab..(k + 1) * vocab]);
                assert!(
                    max <= tolerance(&g, "loose_atol"),
                    "{name} case {i} step {k}: max |diff| {max}"
                );
                assert!(
                    mean <= tolerance(&g, "loose_mean_abs"),
                    "{name} case {i} step {k}: mean {mean}"
                );
                if k < robust {
                    assert_eq!(argmax(&logits) as u32, id, "{name} case {i} step {k}");
                }
                logits = engine.feed(seq, &[id], LogitsFor::Last).unwrap();
            }
            engine.release(seq);
        }
    });
}

#[test]
fn free_running_greedy_reproduces_the_robust_prefix() {
    on_every_backend(|fixture, name, backend| {
        let g = golden(fixture);
        let model: HostModel = load(fixture);
        let mut engine = engine(&model, backend, 0);
        for case in greedy_cases(&g) {
            let prompt = ids(&case["prompt_ids"]);
            let new = ids(&case["new_ids"]);
            let robust = case["robust_prefix_len"].as_u64().unwrap() as usize;
            let seq = engine.new_sequence().unwrap();
            let mut sampler = Sampler::new(SamplingParams::greedy());
            let options = GenerateOptions {
                max_tokens: new.len(),
                stop_ids: vec![],
                top_logprobs: 0,
            };
            let mut got = Vec::new();
            let stats = engine
                .generate(seq, &prompt, &options, &mut sampler, |t| {
                    got.push(t.id);
                    Ok(true)
                })
                .unwrap();
            engine.release(seq);
            assert_eq!(stats.generated_tokens, new.len());
            assert_eq!(got[..robust], new[..robust], "{name}");
        }
    });
}

#[test]
fn perplexity_matches_within_half_a_percent() {
    let text = std::fs::read_to_string(fixture_dir("ppl.txt")).unwrap();
    for name in all_fixtures() {
        let golden_ppl: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(golden_dir(name).join("perplexity.json")).unwrap(),
        )
        .unwrap();
        let (model, tokenizer) = tern::loader::load_model_files(&fixture_dir(name)).unwrap();
        let ids = tokenizer.encode(&text, true).unwrap();
        assert_eq!(ids.len() as u64, golden_ppl["n_tokens"].as_u64().unwrap());
        // Every context on the first backend; on the others (a software GPU is slow) the smallest
        // context, and only for Hugging Face fixtures: a GGUF fixture holds tiny-packed's weights,
        // so past loading it runs the same math.
        let how_many = if HF_FIXTURES.contains(&name) {
            usize::MAX
        } else {
            1
        };
        for (i, (backend_name, backend)) in backends().into_iter().take(how_many).enumerate() {
            let mut engine = engine(&model, backend, 0);
            let results = golden_ppl["results"].as_array().unwrap();
            for r in &results[..if i == 0 { results.len() } else { 1 }] {
                let ctx = r["ctx"].as_u64().unwrap() as usize;
                let got = perplexity(&mut engine, &ids, ctx).unwrap();
                let want = r["ppl"].as_f64().unwrap();
                assert_eq!(
                    got.scored_tokens as u64,
                    r["scored_tokens"].as_u64().unwrap()
                );
                let rel = (got.ppl - want).abs() / want;
                assert!(
                    rel <= 0.005,
                    "{name} on {backend_name} ctx {ctx}: ppl {} vs {want} ({:.3} %)",
                    got.ppl,
                    rel * 100.0
                );
            }
        }
    }
}
