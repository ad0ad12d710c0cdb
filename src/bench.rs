//! llama-bench-style throughput measurement, and random-weight models of real models' shapes.
//!
//! `pp N`: one sequence, N prompt tokens fed from an empty cache in batches, logits for the last
//! row only; `tg N`: N tokens fed one at a time from an empty cache (each a full decode step with
//! logits). Each test runs once untimed (warm-up), then `repetitions` times; tokens/s is reported as
//! mean ± sample standard deviation over the repetitions. Tokenization and sampling are excluded.
//!
//! A [`ShapePreset`] builds a [`HostModel`] of the exact shape of a published model with random
//! ternary weights, so anyone can benchmark without downloading weights, through the same upload and
//! forward paths as a loaded checkpoint.

use crate::backend::LmHead;
use crate::config::ModelConfig;
use crate::engine::Engine;
use crate::loader::{HostLayer, HostModel};
use crate::model::LogitsFor;
use crate::ternary::{DenseData, DenseMatrix, TernaryMatrix};
use anyhow::{Result, bail};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::time::Instant;
use tern_cpu::bitlinear::reference::row_bytes;
use tern_cpu::elementwise::GateActivation;

/// Published model shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShapePreset {
    /// microsoft/bitnet-b1.58-2B-4T.
    BitNet2B4T,
    /// 1bitLLM/bitnet_b1_58-large.
    BitNet700M,
    /// 1bitLLM/bitnet_b1_58-3B.
    BitNet3B,
    /// HF1BitLLM/Llama3-8B-1.58-100B-tokens.
    Llama8B,
}

impl ShapePreset {
    pub const NAMES: &'static str = "2b4t, 700m, 3b, 8b";

    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "2b4t" | "2b" => Self::BitNet2B4T,
            "700m" | "large" => Self::BitNet700M,
            "3b" => Self::BitNet3B,
            "8b" | "llama3-8b" => Self::Llama8B,
            other => bail!("unknown shape `{other}` (known: {})", Self::NAMES),
        })
    }

    pub fn config(self) -> ModelConfig {
        // (name, hidden, intermediate, layers, heads, kv_heads, vocab, theta, activation, sub-norms, tied)
        let (name, hidden, intermediate, layers, heads, kv_heads, vocab, theta, act, sub, tied) =
            match self {
                Self::BitNet2B4T => (
                    "2b4t",
                    2560,
                    6912,
                    30,
                    20,
                    5,
                    128256,
                    500000.0,
                    GateActivation::Relu2,
                    true,
                    true,
                ),
                Self::BitNet700M => (
                    "700m",
                    1536,
                    4096,
                    24,
                    16,
                    16,
                    32002,
                    10000.0,
                    GateActivation::Silu,
                    true,
                    true,
                ),
                Self::BitNet3B => (
                    "3b",
                    3200,
                    8640,
                    26,
                    32,
                    32,
                    32002,
                    10000.0,
                    GateActivation::Silu,
                    true,
                    true,
                ),
                Self::Llama8B => (
                    "8b",
                    4096,
                    14336,
                    32,
                    32,
                    8,
                    128256,
                    500000.0,
                    GateActivation::Silu,
                    false,
                    false,
                ),
            };
        ModelConfig {
            architecture: format!("random weights, {name} shape"),
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            head_dim: hidden / heads,
            vocab,
            max_positions: 4096,
            rope_theta: theta,
            rms_norm_eps: 1e-5,
            activation: act,
            sub_norms: sub,
            tied_embeddings: tied,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    /// A model of this shape with random ternary weights (about a third each of -1, 0, +1),
    /// random bf16 embeddings and unit norm weights.
    pub fn random_model(self, seed: u64) -> HostModel {
        random_model(self.config(), seed)
    }
}

/// A random-weight model for `config` (also used by tests at small shapes).
pub fn random_model(config: ModelConfig, seed: u64) -> HostModel {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let c = &config;
    let mut ternary = |rows: usize, cols: usize| -> TernaryMatrix {
        // Every byte of four valid codes (3^4 = 81 of them), drawn uniformly; a partial last byte per
        // row keeps its padding codes at value 0 when cols is not a multiple of 4.
        let valid: Vec<u8> = (0..=255u8)
            .filter(|b| (0..4).all(|i| (b >> (2 * i)) & 3 != 3))
            .collect();
        let mut codes = vec![0u8; rows * row_bytes(cols)];
        codes
            .iter_mut()
            .for_each(|b| *b = valid[rng.random_range(0..valid.len())]);
        if !cols.is_multiple_of(4) {
            let keep = 2 * (cols % 4);
            for row in codes.chunks_exact_mut(row_bytes(cols)) {
                let last = row.last_mut().expect("cols > 0");
                *last = (*last & ((1 << keep) - 1)) | (0x55 & !((1u8 << keep) - 1));
            }
        }
        let scale = rng.random_range(0.5..2.0f32);
        TernaryMatrix::new("random", rows, cols, codes, scale).expect("valid by construction")
    };
    let layers = (0..c.layers)
        .map(|_| HostLayer {
            attn_norm: vec![1.0; c.hidden],
            q: ternary(c.q_dim(), c.hidden),
            k: ternary(c.kv_dim(), c.hidden),
            v: ternary(c.kv_dim(), c.hidden),
            attn_sub_norm: c.sub_norms.then(|| vec![1.0; c.q_dim()]),
            o: ternary(c.hidden, c.q_dim()),
            ffn_norm: vec![1.0; c.hidden],
            gate: ternary(c.intermediate, c.hidden),
            up: ternary(c.intermediate, c.hidden),
            ffn_sub_norm: c.sub_norms.then(|| vec![1.0; c.intermediate]),
            down: ternary(c.hidden, c.intermediate),
        })
        .collect();
    let mut dense = || DenseMatrix {
        rows: c.vocab,
        cols: c.hidden,
        data: DenseData::Bf16(
            (0..c.vocab * c.hidden)
                .map(|_| bf16::from_f32(rng.random_range(-0.05..0.05f32)))
                .collect(),
        ),
    };
    let embed = dense();
    let output = (!c.tied_embeddings).then(&mut dense);
    HostModel {
        format: "random ternary weights, bf16 embeddings".to_string(),
        final_norm: vec![1.0; c.hidden],
        layers,
        embed,
        output,
        config,
    }
}

/// One row of the results table.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub model: String,
    pub backend: String,
    pub threads: usize,
    /// `pp512`, `tg128`, ...
    pub test: String,
    pub tok_s: f64,
    pub tok_s_std: f64,
    /// Weight bytes read per decoded token (ternary codes + output head); tg rows only.
    pub bytes_per_token: Option<u64>,
    /// `bytes_per_token × tok_s`: the weight bandwidth a decode achieved; tg rows only.
    pub gb_s: Option<f64>,
    /// `gb_s` as a fraction of the read bandwidth measured on this machine with as many threads
    /// ([`read_bandwidth`]); tg rows only.
    pub bandwidth_fraction: Option<f64>,
    /// `2 × ternary parameters × tok_s / 1e9`: the int8 multiply-adds of the ternary linears.
    pub int8_gops: Option<f64>,
}

/// Read bandwidth of this machine in GB/s with `threads` threads: the best of 3 passes summing a
/// 512 MiB buffer (far larger than any cache), split evenly between the threads.
pub fn read_bandwidth(threads: usize) -> f64 {
    let threads = threads.max(1);
    let buffer: Vec<u64> = (0..(512usize << 20) / 8).map(|i| i as u64).collect();
    let chunk = buffer.len().div_ceil(threads);
    let pass = || {
        let start = Instant::now();
        let total = std::thread::scope(|scope| {
            let handles: Vec<_> = buffer
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        // Independent lanes so the sum vectorizes and loads overlap.
                        let mut lanes = [0u64; 8];
                        for c in part.chunks_exact(8) {
                            for (l, v) in lanes.iter_mut().zip(c) {
                                *l = l.wrapping_add(*v);
                            }
                        }
                        lanes.iter().fold(0u64, |a, b| a.wrapping_add(*b))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        (buffer.len() * 8) as f64 / start.elapsed().as_secs_f64() / 1e9
    };
    (0..3).map(|_| pass()).fold(0.0, f64::max)
}

/// Which tests to run.
#[derive(Clone, Debug)]
pub struct BenchPlan {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub repetitions: usize,
}

/// Weight bytes a single decode step reads: every linear's weights (`linear_bytes` in the backend's
/// layout, else the canonical codes) and the whole output head in the form `head` reads (the 8-bit
/// copy: codes and two f32 per row; the few re-scored rows are left out).
pub fn decode_weight_bytes(model: &HostModel, linear_bytes: Option<usize>, head: LmHead) -> u64 {
    let linears = linear_bytes.unwrap_or(model.ternary_size().1);
    let head = match head {
        LmHead::Full => model.head().bytes(),
        LmHead::Q8 => model.head().rows * (model.head().cols + 8),
    };
    (linears + head) as u64
}

/// Runs the plan on `engine` (which must have a free slot and a context of at least
/// `max(prompt_tokens, gen_tokens)`).
pub fn run(
    engine: &mut Engine,
    plan: &BenchPlan,
    model_name: &str,
    threads: usize,
    weight_bytes: u64,
) -> Result<Vec<BenchRow>> {
    let vocab = engine.config().vocab as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let mut rows = Vec::new();
    let tests = [("pp", plan.prompt_tokens), ("tg", plan.gen_tokens)];
    for (kind, n) in tests.into_iter().filter(|(_, n)| *n > 0) {
        let tokens: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab)).collect();
        let seq = engine.new_sequence()?;
        let once = |engine: &mut Engine| -> Result<f64> {
            engine.clear(seq)?;
            let start = Instant::now();
            if kind == "pp" {
                engine.feed(seq, &tokens, LogitsFor::Last)?;
            } else {
                for &t in &tokens {
                    engine.feed(seq, &[t], LogitsFor::Last)?;
                }
            }
            Ok(n as f64 / start.elapsed().as_secs_f64())
        };
        let measured = (|| {
            once(engine)?; // warm-up
            (0..plan.repetitions.max(1))
                .map(|_| once(engine))
                .collect::<Result<Vec<f64>>>()
        })();
        engine.release(seq);
        let samples = measured?;
        let (mean, std) = mean_std(&samples);
        let decode = kind == "tg";
        rows.push(BenchRow {
            model: model_name.to_string(),
            backend: engine.backend_description(),
            threads,
            test: format!("{kind}{n}"),
            tok_s: mean,
            tok_s_std: std,
            bytes_per_token: decode.then_some(weight_bytes),
            gb_s: decode.then(|| weight_bytes as f64 * mean / 1e9),
            bandwidth_fraction: None,
            int8_gops: None,
        });
    }
    Ok(rows)
}

fn mean_std(samples: &[f64]) -> (f64, f64) {
    let n = samples.len() as f64;
    let mean = samples.iter().sum::<f64>() / n;
    let var = if samples.len() > 1 {
        samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// The rows as a Markdown table.
pub fn markdown(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "| model | backend | threads | test | t/s | weight MB/token | GB/s | of read BW | int8 GOPS |\n|---|---|---:|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let mb = r
            .bytes_per_token
            .map_or(String::new(), |b| format!("{:.0}", b as f64 / 1e6));
        let gbs = r.gb_s.map_or(String::new(), |g| format!("{g:.2}"));
        let frac = r
            .bandwidth_fraction
            .map_or(String::new(), |f| format!("{:.0} %", f * 100.0));
        let gops = r.int8_gops.map_or(String::new(), |g| format!("{g:.1}"));
        out += &format!(
            "| {} | {} | {} | {} | {:.2} ± {:.2} | {mb} | {gbs} | {frac} | {gops} |\n",
            r.model, r.backend, r.threads, r.test, r.tok_s, r.tok_s_std
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_configs() {
        for name in ["2b4t", "700m", "3b", "8b"] {
            let c = ShapePreset::parse(name).unwrap().config();
            c.validate(name).unwrap();
        }
        assert!(ShapePreset::parse("13b").is_err());
        let c = ShapePreset::BitNet2B4T.config();
        assert_eq!((c.q_dim(), c.kv_dim(), c.head_dim), (2560, 640, 128));
    }

    #[test]
    fn random_weights_are_ternary_with_padding_zero() {
        let mut c = ShapePreset::BitNet700M.config();
        (
            c.hidden,
            c.intermediate,
            c.layers,
            c.heads,
            c.kv_heads,
            c.head_dim,
            c.vocab,
        ) = (18, 10, 1, 2, 1, 9, 7);
        c.sub_norms = false;
        let m = random_model(c, 3);
        let values = m.layers[0].down.to_i8();
        assert!(values.contains(&-1) && values.contains(&1));
        // 10 inputs: the last byte of each row has two padding pairs, which must decode to 0.
        for row in m.layers[0].down.codes.chunks_exact(3) {
            assert_eq!(row[2] >> 4, 0b0101);
        }
    }

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert_eq!((m, s), (2.0, 1.0));
        assert_eq!(mean_std(&[5.0]), (5.0, 0.0));
    }
}
