//! llama-bench-style throughput measurement, and random-weight models of real models' shapes.
//!
//! `pp N`: one sequence, N prompt tokens fed from an empty cache in batches, logits for the last
//! row only; `tg N`: N tokens fed one at a time from an empty cache (each a full decode step with
//! logits); `tg N xP`: P sequences decoding together, one row each per step with its logits (a
//! server's decode steps), tokens/s summed over the sequences. Each test runs once untimed
//! (warm-up), then `repetitions` times; tokens/s is reported as mean ± sample standard deviation
//! over the repetitions. Tokenization and sampling are excluded.
//!
//! A [`ShapePreset`] gives a [`RandomSource`]: the exact shape of a published model with random
//! ternary weights, generated layer by layer as the backend takes them, so anyone can benchmark
//! without downloading weights, through the same upload and forward paths as a loaded checkpoint.

use crate::backend::LmHead;
use crate::config::ModelConfig;
use crate::engine::{Engine, Feed};
use crate::model::LogitsFor;
use crate::source::{HostLayer, HostModel, ModelSource};
use crate::ternary::{DenseData, DenseMatrix, TernaryMatrix};
use anyhow::{Result, bail, ensure};
use half::bf16;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::borrow::Cow;
use std::time::Instant;
use tern_cpu::bitlinear::reference::row_bytes;
use tern_cpu::elementwise::GateActivation;

/// A published model shape: the dimensions that decide speed and memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShapePreset {
    /// The `--shape` name.
    pub name: &'static str,
    /// What it is the shape of.
    pub model: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub rope_theta: f32,
    pub activation: GateActivation,
    pub sub_norms: bool,
    pub tied: bool,
}

/// `(name, model, hidden, intermediate, layers, heads, kv_heads)` of bitnet.cpp's dummy models
/// (its `generate-dummy-bitnet-model.py` layouts: multi-head attention, vocabulary 32002, the
/// 1bitLLM architecture: SiLU gate, sub-norms).
const BITNET_CPP_DUMMIES: [(&str, &str, usize, usize, usize, usize); 11] = [
    ("125m", "bitnet.cpp dummy 125M", 768, 3072, 11, 12),
    ("350m", "bitnet.cpp dummy 350M", 1024, 3072, 24, 16),
    ("1b", "bitnet.cpp dummy 1B", 2048, 3584, 24, 32),
    ("1.5b", "bitnet.cpp dummy 1.5B", 1536, 9216, 28, 32),
    ("2.7b", "bitnet.cpp dummy 2.7B", 3072, 7680, 24, 32),
    ("3.8b", "bitnet.cpp dummy 3.8B", 3840, 8192, 24, 32),
    ("7b", "bitnet.cpp dummy 7B", 4096, 12032, 32, 32),
    ("13b", "bitnet.cpp dummy 13B", 5120, 13824, 40, 40),
    ("30b", "bitnet.cpp dummy 30B", 6656, 16384, 60, 52),
    ("70b", "bitnet.cpp dummy 70B", 8192, 24576, 80, 64),
    ("100b", "bitnet.cpp dummy 100B", 8192, 45568, 72, 64),
];

impl ShapePreset {
    /// Every preset: the checkpoints tern runs, then bitnet.cpp's dummy layouts.
    pub fn all() -> Vec<Self> {
        let hf = |name, model, hidden, intermediate, layers, heads, kv_heads, vocab, llama3| Self {
            name,
            model,
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            vocab,
            rope_theta: if llama3 { 500000.0 } else { 10000.0 },
            activation: GateActivation::Silu,
            sub_norms: true,
            tied: true,
        };
        let mut all = vec![
            Self {
                activation: GateActivation::Relu2,
                ..hf(
                    "2b4t",
                    "microsoft/bitnet-b1.58-2B-4T",
                    2560,
                    6912,
                    30,
                    20,
                    5,
                    128256,
                    true,
                )
            },
            hf(
                "700m",
                "1bitLLM/bitnet_b1_58-large",
                1536,
                4096,
                24,
                16,
                16,
                32002,
                false,
            ),
            hf(
                "3b",
                "1bitLLM/bitnet_b1_58-3B",
                3200,
                8640,
                26,
                32,
                32,
                32002,
                false,
            ),
            Self {
                sub_norms: false,
                tied: false,
                ..hf(
                    "8b",
                    "HF1BitLLM/Llama3-8B-1.58-100B-tokens",
                    4096,
                    14336,
                    32,
                    32,
                    8,
                    128256,
                    true,
                )
            },
        ];
        all.extend(
            BITNET_CPP_DUMMIES.map(|(name, model, hidden, intermediate, layers, heads)| {
                hf(
                    name,
                    model,
                    hidden,
                    intermediate,
                    layers,
                    heads,
                    heads,
                    32002,
                    false,
                )
            }),
        );
        all
    }

    /// The `--shape` names, for messages.
    pub fn names() -> String {
        Self::all()
            .iter()
            .map(|p| p.name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn parse(name: &str) -> Result<Self> {
        let wanted = match name.to_ascii_lowercase().as_str() {
            "2b" => "2b4t".to_string(),
            "large" => "700m".to_string(),
            "llama3-8b" => "8b".to_string(),
            other => other.to_string(),
        };
        match Self::all().into_iter().find(|p| p.name == wanted) {
            Some(preset) => Ok(preset),
            None => bail!("unknown shape `{name}` (known: {})", Self::names()),
        }
    }

    pub fn config(self) -> ModelConfig {
        ModelConfig {
            architecture: format!("random weights, {} shape ({})", self.name, self.model),
            hidden: self.hidden,
            intermediate: self.intermediate,
            layers: self.layers,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.hidden / self.heads,
            vocab: self.vocab,
            max_positions: 4096,
            rope_theta: self.rope_theta,
            rms_norm_eps: 1e-5,
            activation: self.activation,
            sub_norms: self.sub_norms,
            tied_embeddings: self.tied,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    /// Bytes a backend holds while this shape's random weights stream into it, when its layout
    /// takes `bits_per_weight` bits a ternary weight: the packed linears, one layer being
    /// generated in the canonical 2 bits, the bf16 tables and the 8-bit head.
    pub fn load_bytes(self, bits_per_weight: f64) -> u64 {
        let c = self.config();
        let (params, canonical) = c.ternary_size();
        let tables = if c.tied_embeddings { 1 } else { 2 } * c.vocab * c.hidden;
        let head = c.vocab * (c.hidden + 8);
        (params as f64 * bits_per_weight / 8.0) as u64
            + (canonical / c.layers + 2 * tables + head) as u64
    }

    /// A streaming source of this shape with random weights ([`RandomSource`]).
    pub fn random_source(self, seed: u64) -> RandomSource {
        RandomSource::new(self.config(), seed)
    }

    /// [`Self::random_source`], whole in memory.
    pub fn random_model(self, seed: u64) -> HostModel {
        random_model(self.config(), seed)
    }
}

/// A random-weight model for `config`, whole in memory (tests at small shapes).
pub fn random_model(config: ModelConfig, seed: u64) -> HostModel {
    HostModel::collect(&RandomSource::new(config, seed)).expect("a random source cannot fail")
}

/// Random weights generated on demand, a layer at a time: ternary codes uniform over the 81 bytes
/// of four valid codes (about a third each of -1, 0, +1; padding codes of a partial last byte are
/// 0), a scale in [0.5, 2) per tensor, bf16 tables uniform in ±0.05, unit norm weights.
///
/// Deterministic per seed and tensor, whatever the thread count: every chunk of
/// [`RANDOM_CHUNK`] values draws from its own ChaCha8 stream, numbered by (tensor, layer, chunk),
/// so the chunks are generated in parallel on every core and layer 70 needs nothing of layer 69.
pub struct RandomSource {
    config: ModelConfig,
    seed: u64,
}

/// Values (code bytes or table entries) per random stream.
const RANDOM_CHUNK: usize = 1 << 20;

/// Stream tags of the tables and of the per-tensor scales (linears are tagged 0..7 by position).
const EMBED_TAG: u64 = 8;
const OUTPUT_TAG: u64 = 9;
const SCALE_CHUNK: u64 = u32::MAX as u64;

impl RandomSource {
    pub fn new(config: ModelConfig, seed: u64) -> Self {
        Self { config, seed }
    }

    /// A ChaCha8 generator for chunk `chunk` of tensor `tag` in layer `layer`.
    fn rng(&self, tag: u64, layer: usize, chunk: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream((tag << 48) | ((layer as u64) << 32) | chunk);
        rng
    }

    /// Fills `out` chunk by chunk on every core, chunk `i` from stream `(tag, layer, i)`.
    fn fill<T: Send>(
        &self,
        out: &mut [T],
        tag: u64,
        layer: usize,
        f: impl Fn(&mut ChaCha8Rng, &mut [T]) + Sync,
    ) {
        let chunks = std::sync::Mutex::new(out.chunks_mut(RANDOM_CHUNK).enumerate());
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    loop {
                        let next = chunks.lock().unwrap_or_else(|e| e.into_inner()).next();
                        let Some((i, chunk)) = next else { break };
                        f(&mut self.rng(tag, layer, i as u64), chunk);
                    }
                });
            }
        });
    }

    fn ternary(&self, tag: u64, layer: usize, rows: usize, cols: usize) -> TernaryMatrix {
        // The 81 bytes made of four valid codes; a random byte picks one by multiply-shift.
        let valid: Vec<u8> = (0..=255u8)
            .filter(|b| (0..4).all(|i| (b >> (2 * i)) & 3 != 3))
            .collect();
        let mut codes = vec![0u8; rows * row_bytes(cols)];
        self.fill(&mut codes, tag, layer, |rng, chunk| {
            rng.fill_bytes(chunk);
            chunk
                .iter_mut()
                .for_each(|b| *b = valid[(usize::from(*b) * valid.len()) >> 8]);
        });
        if !cols.is_multiple_of(4) {
            let keep = 2 * (cols % 4);
            for row in codes.chunks_exact_mut(row_bytes(cols)) {
                let last = row.last_mut().expect("cols > 0");
                *last = (*last & ((1 << keep) - 1)) | (0x55 & !((1u8 << keep) - 1));
            }
        }
        let scale = self.rng(tag, layer, SCALE_CHUNK).random_range(0.5..2.0f32);
        TernaryMatrix::new("random", rows, cols, codes, scale).expect("valid by construction")
    }

    fn table(&self, tag: u64) -> DenseMatrix {
        let c = &self.config;
        let mut values = vec![bf16::ZERO; c.vocab * c.hidden];
        self.fill(&mut values, tag, 0, |rng, chunk| {
            chunk
                .iter_mut()
                .for_each(|v| *v = bf16::from_f32(rng.random_range(-0.05..0.05f32)));
        });
        DenseMatrix {
            rows: c.vocab,
            cols: c.hidden,
            data: DenseData::Bf16(values),
        }
    }
}

impl ModelSource for RandomSource {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn format(&self) -> &str {
        "random ternary weights, bf16 embeddings"
    }

    fn embed(&self) -> Result<Cow<'_, DenseMatrix>> {
        Ok(Cow::Owned(self.table(EMBED_TAG)))
    }

    fn output(&self) -> Result<Option<Cow<'_, DenseMatrix>>> {
        let untied = !self.config.tied_embeddings;
        Ok(untied.then(|| Cow::Owned(self.table(OUTPUT_TAG))))
    }

    fn final_norm(&self) -> Result<Cow<'_, [f32]>> {
        Ok(Cow::Owned(vec![1.0; self.config.hidden]))
    }

    fn layer(&self, index: usize) -> Result<Cow<'_, HostLayer>> {
        let c = &self.config;
        ensure!(
            index < c.layers,
            "layer {index} of a model with {} layers",
            c.layers
        );
        let [q, k, v, o, gate, up, down] = c
            .linear_shapes()
            .iter()
            .zip(0..)
            .map(|(&(rows, cols), tag)| self.ternary(tag, index, rows, cols))
            .collect::<Vec<_>>()
            .try_into()
            .expect("seven linears");
        Ok(Cow::Owned(HostLayer {
            attn_norm: vec![1.0; c.hidden],
            q,
            k,
            v,
            attn_sub_norm: c.sub_norms.then(|| vec![1.0; c.q_dim()]),
            o,
            ffn_norm: vec![1.0; c.hidden],
            gate,
            up,
            ffn_sub_norm: c.sub_norms.then(|| vec![1.0; c.intermediate]),
            down,
        }))
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
    /// Seconds to make the model ready for this thread count: reading (or generating) the weights
    /// where this run did it, plus the backend's upload and KV allocation.
    pub load_s: Option<f64>,
    /// The process's peak resident memory (bytes) over this thread count's load and tests
    /// ([`PeakRss`]); `None` where the OS does not report it.
    pub peak_rss_bytes: Option<u64>,
}

/// The process's peak resident set size, from Linux's `/proc/self/status` (`VmHWM`), with a reset
/// (`/proc/self/clear_refs`, value 5) so that each measured phase reports its own peak. Elsewhere
/// (or where /proc is not readable) every reading is `None`.
pub struct PeakRss;

impl PeakRss {
    /// Starts a new phase: the peak becomes the current resident size.
    pub fn reset() {
        // Best effort: a kernel without the interface keeps the process-wide peak, which is still
        // an upper bound of the phase's.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }

    /// The peak resident size since the last reset (or the process start), in bytes.
    pub fn read() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        parse_vm_hwm(&status)
    }
}

/// `VmHWM:   1234 kB` → bytes.
fn parse_vm_hwm(status: &str) -> Option<u64> {
    parse_kb_field(status, "VmHWM:")
}

/// The value of a `/proc` field given in kB (`Key:   1234 kB`), in bytes.
fn parse_kb_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..]
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Memory the kernel says can be allocated without swapping (`MemAvailable` of /proc/meminfo);
/// `None` where it is not reported.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_kb_field(&meminfo, "MemAvailable:")
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
    /// Sequences decoding together in `tg` (1: llama-bench's tg).
    pub parallel: usize,
    pub repetitions: usize,
}

/// Weight bytes a single decode step reads: every linear's weights (`linear_bytes` in the backend's
/// layout, else the canonical codes) and the whole output head in the form `head` reads (the
/// full-precision table of `head_bytes`, or the 8-bit copy: codes and two f32 per row; the few
/// re-scored rows are left out).
pub fn decode_weight_bytes(
    config: &ModelConfig,
    linear_bytes: Option<usize>,
    head_bytes: usize,
    head: LmHead,
) -> u64 {
    let linears = linear_bytes.unwrap_or(config.ternary_size().1);
    let head = match head {
        LmHead::Full => head_bytes,
        LmHead::Q8 { .. } => config.vocab * (config.hidden + 8),
    };
    (linears + head) as u64
}

/// Runs the plan on `engine` (which must have `parallel` free slots and a context of at least
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
        let parallel = if kind == "tg" {
            plan.parallel.max(1)
        } else {
            1
        };
        let tokens: Vec<Vec<u32>> = (0..parallel)
            .map(|_| (0..n).map(|_| rng.random_range(0..vocab)).collect())
            .collect();
        let mut seqs = Vec::with_capacity(parallel);
        let measured = (|| {
            for _ in 0..parallel {
                seqs.push(engine.new_sequence()?);
            }
            let once = |engine: &mut Engine| -> Result<f64> {
                for &seq in &seqs {
                    engine.clear(seq)?;
                }
                let start = Instant::now();
                if kind == "pp" {
                    engine.feed(seqs[0], &tokens[0], LogitsFor::Last)?;
                } else {
                    for step in 0..n {
                        let items: Vec<Feed> = seqs
                            .iter()
                            .zip(&tokens)
                            .map(|(&seq, tokens)| Feed {
                                seq,
                                tokens: &tokens[step..step + 1],
                                logits: true,
                            })
                            .collect();
                        engine.feed_batch(&items)?;
                    }
                }
                Ok((n * parallel) as f64 / start.elapsed().as_secs_f64())
            };
            once(engine)?; // warm-up
            (0..plan.repetitions.max(1))
                .map(|_| once(engine))
                .collect::<Result<Vec<f64>>>()
        })();
        for seq in seqs {
            engine.release(seq);
        }
        let samples = measured?;
        let (mean, std) = mean_std(&samples);
        let decode = kind == "tg";
        rows.push(BenchRow {
            model: model_name.to_string(),
            backend: engine.backend_description(),
            threads,
            test: match parallel {
                1 => format!("{kind}{n}"),
                p => format!("{kind}{n} x{p}"),
            },
            tok_s: mean,
            tok_s_std: std,
            // A step of P rows reads the weights once for all of them.
            bytes_per_token: decode.then_some(weight_bytes / parallel as u64),
            gb_s: decode.then(|| weight_bytes as f64 * mean / parallel as f64 / 1e9),
            bandwidth_fraction: None,
            int8_gops: None,
            load_s: None,
            peak_rss_bytes: None,
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
        "| model | backend | threads | test | t/s | weight MB/token | GB/s | of read BW | int8 GOPS | load s | peak RSS MB |\n|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
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
        let load = r.load_s.map_or(String::new(), |s| format!("{s:.2}"));
        let rss = r
            .peak_rss_bytes
            .map_or(String::new(), |b| format!("{:.0}", b as f64 / 1e6));
        out += &format!(
            "| {} | {} | {} | {} | {:.2} ± {:.2} | {mb} | {gbs} | {frac} | {gops} | {load} | {rss} |\n",
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
        for preset in ShapePreset::all() {
            preset.config().validate(preset.name).unwrap();
        }
        assert!(ShapePreset::parse("12b").is_err());
        let c = ShapePreset::parse("2b4t").unwrap().config();
        assert_eq!((c.q_dim(), c.kv_dim(), c.head_dim), (2560, 640, 128));
        assert_eq!(ShapePreset::parse("2B").unwrap().name, "2b4t");
        // bitnet.cpp's largest dummy: ~100 billion ternary parameters, 25 GB of 2-bit codes, 20 GB
        // in base 3.
        let big = ShapePreset::parse("100b").unwrap();
        let c = big.config();
        let layer = 4 * c.hidden * c.hidden + 3 * c.hidden * c.intermediate;
        assert_eq!(c.layers * layer, 99_958_652_928);
        // One bf16 table (tied embeddings) and its 8-bit head.
        assert!(c.tied_embeddings);
        let (tables, head) = (2 * 32002 * 8192, 32002 * (8192 + 8));
        let rest = (layer / 4 + tables + head) as u64;
        assert_eq!(big.load_bytes(2.0), 99_958_652_928 / 4 + rest);
        assert_eq!(big.load_bytes(1.6), 99_958_652_928 / 5 + rest);
    }

    #[test]
    fn random_weights_are_ternary_with_padding_zero() {
        let c = ShapePreset {
            hidden: 18,
            intermediate: 10,
            layers: 1,
            heads: 2,
            kv_heads: 1,
            vocab: 7,
            sub_norms: false,
            ..ShapePreset::parse("700m").unwrap()
        }
        .config();
        let m = random_model(c, 3);
        let values = m.layers[0].down.to_i8();
        assert!(values.contains(&-1) && values.contains(&1));
        // 10 inputs: the last byte of each row has two padding pairs, which must decode to 0.
        for row in m.layers[0].down.codes.chunks_exact(3) {
            assert_eq!(row[2] >> 4, 0b0101);
        }
    }

    #[test]
    fn peak_rss_is_read_from_vm_hwm() {
        let status = "Name:\ttern\nVmPeak:\t  900 kB\nVmHWM:\t   1234 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(1234 * 1024));
        assert_eq!(parse_vm_hwm("VmRSS:\t 1000 kB\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\t 12 MB\n"), None);
        if cfg!(target_os = "linux") {
            PeakRss::reset();
            let before = PeakRss::read().expect("Linux reports VmHWM");
            let touched = vec![1u8; 64 << 20];
            std::hint::black_box(&touched);
            let after = PeakRss::read().unwrap();
            assert!(after >= before + (60 << 20), "{before} -> {after}");
        }
    }

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert_eq!((m, s), (2.0, 1.0));
        assert_eq!(mean_std(&[5.0]), (5.0, 0.0));
    }
}
