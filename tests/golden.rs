//! Golden checks of tests/fixtures/README.md section 7 on the Hugging Face fixtures, through the
//! public API on every backend of `common::backends()`: weights, module outputs, prefill logits, teacher-forced decode with
//! the KV cache, free-running greedy decode and perplexity.

mod common;

use common::*;
use sha2::{Digest, Sha256};
use tern::backend::{Activations, Backend, KvSpec, TokenPosition};
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

/// Runs single backend ops on recorded module inputs and compares the recorded outputs.
struct ModuleCheck {
    backend: Box<dyn Backend>,
    values: Vec<f32>,
    golden: serde_json::Value,
    strict: f32,
}

impl ModuleCheck {
    fn new(name: &str, backend: Box<dyn Backend>) -> Self {
        let golden = golden(name);
        let file = golden["modules"]["file"].as_str().unwrap().to_string();
        Self {
            backend,
            values: read_f32(name, &file),
            strict: tolerance(&golden, "strict_atol"),
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

    fn upload(&mut self, data: &[f32]) -> Activations {
        let a = self.backend.alloc(data.len()).unwrap();
        self.backend.write(a, data).unwrap();
        a
    }

    fn compare(&mut self, got: Activations, key: &str) {
        let want = self.tensor(key);
        let mut out = vec![0f32; want.len()];
        self.backend.read(got, &mut out).unwrap();
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let (max, _) = diff(&out, &want);
        assert!(
            max / scale <= self.strict,
            "{key}: max |diff| {max} (scale {scale})"
        );
    }
}

#[test]
fn every_module_matches_on_the_recorded_inputs() {
    on_every_backend(check_modules);
}

/// The module-level goldens on the CUDA kernels under CPU emulation (tests/common/cuda_emu.rs).
#[test]
fn every_module_matches_on_the_emulated_cuda_kernels() {
    on_backends(emulated_cuda_backends, check_modules);
}

fn check_modules(fixture: &str, name: &str, backend: Box<dyn Backend>) {
    const T: usize = 7;
    let model = load(fixture);
    let c = model.config.clone();
    let mut m = ModuleCheck::new(fixture, backend);
    let ids = ids(&m.golden["modules"]["input_ids"]);

    let table = m.backend.upload_table(&model.embed).unwrap();
    let out = m.backend.alloc(T * c.hidden).unwrap();
    m.backend.embed(table, &ids, out).unwrap();
    m.compare(out, "embed_tokens.out");

    for l in [0, c.layers - 1] {
        let layer = &model.layers[l];
        let p = format!("layers.{l}");
        let norm = |m: &mut ModuleCheck, w: &[f32], input: &str, output: &str| {
            let data = m.tensor(input);
            let x = m.upload(&data);
            let w = m.backend.upload_vector(w).unwrap();
            let out = m.backend.alloc(data.len()).unwrap();
            m.backend.rms_norm(x, w, c.rms_norm_eps, T, out).unwrap();
            m.compare(out, output);
        };
        norm(
            &mut m,
            &layer.attn_norm,
            &format!("{p}.in"),
            &format!("{p}.input_layernorm.out"),
        );
        norm(
            &mut m,
            &layer.ffn_norm,
            &format!("{p}.post_attention_layernorm.in"),
            &format!("{p}.post_attention_layernorm.out"),
        );
        // Inputs of o_proj and down_proj: the sub-norm outputs where the block has sub-norms
        // (checked here from their recorded inputs), else the attention output and act(g) * u.
        let (attn_out, o_in, ffn_act, down_in) = match (&layer.attn_sub_norm, &layer.ffn_sub_norm) {
            (Some(attn_sub), Some(ffn_sub)) => {
                norm(
                    &mut m,
                    attn_sub,
                    &format!("{p}.self_attn.attn_sub_norm.in"),
                    &format!("{p}.self_attn.attn_sub_norm.out"),
                );
                norm(
                    &mut m,
                    ffn_sub,
                    &format!("{p}.mlp.ffn_sub_norm.in"),
                    &format!("{p}.mlp.ffn_sub_norm.out"),
                );
                (
                    "self_attn.attn_sub_norm.in",
                    "self_attn.attn_sub_norm.out",
                    "mlp.ffn_sub_norm.in",
                    "mlp.ffn_sub_norm.out",
                )
            }
            (None, None) => (
                "self_attn.o_proj.in",
                "self_attn.o_proj.in",
                "mlp.down_proj.in",
                "mlp.down_proj.in",
            ),
            _ => panic!("{name}: a layer with only one sub-norm"),
        };

        let projections = [
            ("self_attn.q_proj", "input_layernorm.out"),
            ("self_attn.k_proj", "input_layernorm.out"),
            ("self_attn.v_proj", "input_layernorm.out"),
            ("self_attn.o_proj", o_in),
            ("mlp.gate_proj", "post_attention_layernorm.out"),
            ("mlp.up_proj", "post_attention_layernorm.out"),
            ("mlp.down_proj", down_in),
        ];
        for (proj, input) in projections {
            let w = linear(layer, proj);
            let id = m.backend.upload_linear(&[w]).unwrap();
            let x = m.upload(&m.tensor(&format!("{p}.{input}")));
            let out = m.backend.alloc(T * w.rows).unwrap();
            m.backend.bitlinear(x, id, T, out).unwrap();
            m.compare(out, &format!("{p}.{proj}.out"));
        }

        // gate‖up fused, then the gated activation.
        let id = m.backend.upload_linear(&[&layer.gate, &layer.up]).unwrap();
        let x = m.upload(&m.tensor(&format!("{p}.post_attention_layernorm.out")));
        let gu = m.backend.alloc(T * 2 * c.intermediate).unwrap();
        m.backend.bitlinear(x, id, T, gu).unwrap();
        let out = m.backend.alloc(T * c.intermediate).unwrap();
        m.backend
            .gated(gu, c.activation, T, c.intermediate, out)
            .unwrap();
        m.compare(out, &format!("{p}.{ffn_act}"));

        // Attention from the recorded q, k, v: as one prefill, then as a decode of position 6.
        let (q, k, v) = (
            m.tensor(&format!("{p}.self_attn.q_proj.out")),
            m.tensor(&format!("{p}.self_attn.k_proj.out")),
            m.tensor(&format!("{p}.self_attn.v_proj.out")),
        );
        let (qd, kd) = (c.q_dim(), c.kv_dim());
        let qkv: Vec<f32> = (0..T)
            .flat_map(|t| {
                [
                    &q[t * qd..(t + 1) * qd],
                    &k[t * kd..(t + 1) * kd],
                    &v[t * kd..(t + 1) * kd],
                ]
                .concat()
            })
            .collect();
        let spec = KvSpec {
            layers: 1,
            slots: 2,
            capacity: 16,
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            rope_theta: c.rope_theta,
        };
        m.backend.alloc_kv(&spec).unwrap();
        let rows: Vec<TokenPosition> = (0..T)
            .map(|position| TokenPosition { slot: 1, position })
            .collect();
        let x = m.upload(&qkv);
        let out = m.backend.alloc(T * qd).unwrap();
        m.backend.attention(0, x, &rows, out).unwrap();
        m.compare(out, &format!("{p}.{attn_out}"));

        let width = qd + 2 * kd;
        let first = m.upload(&qkv[..(T - 1) * width]);
        let out_first = m.backend.alloc((T - 1) * qd).unwrap();
        m.backend
            .attention(0, first, &rows[..T - 1], out_first)
            .unwrap();
        let last = m.upload(&qkv[(T - 1) * width..]);
        let out_last = m.backend.alloc(qd).unwrap();
        m.backend
            .attention(0, last, &rows[T - 1..], out_last)
            .unwrap();
        let mut got = vec![0f32; qd];
        m.backend.read(out_last, &mut got).unwrap();
        let want = m.tensor(&format!("{p}.{attn_out}"));
        let (max, _) = diff(&got, &want[(T - 1) * qd..]);
        assert!(
            max <= m.strict,
            "{name} {p}: decode-form attention differs by {max}"
        );
    }

    let w = m.backend.upload_vector(&model.final_norm).unwrap();
    let x = m.upload(&m.tensor("norm.in"));
    let out = m.backend.alloc(T * c.hidden).unwrap();
    m.backend.rms_norm(x, w, c.rms_norm_eps, T, out).unwrap();
    m.compare(out, "norm.out");
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
