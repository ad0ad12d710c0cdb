//! Named intermediates of a forward pass, for checking a backend and debugging one.
//!
//! [`Model::forward`](crate::model::Model::forward) names every tensor it computes, in the style
//! of ggml's graph tensors (`blk.N.` for layer N, counted from 0):
//!
//! | name | value | width |
//! |---|---|---|
//! | `inp_embd` | embedding rows of the tokens | hidden |
//! | `blk.N.attn_norm` | RMSNorm(h; attn_norm) | hidden |
//! | `blk.N.qkv` | q‖k‖v, before RoPE | q + 2·kv |
//! | `blk.N.kqv_out` | attention, heads concatenated | q |
//! | `blk.N.attn_sub_norm` | its sub-norm (where the model has one) | q |
//! | `blk.N.attn_out` | the o projection | hidden |
//! | `blk.N.ffn_inp` | h after the attention residual | hidden |
//! | `blk.N.ffn_norm` | RMSNorm(h; ffn_norm) | hidden |
//! | `blk.N.ffn_gate_up` | g‖u | 2·intermediate |
//! | `blk.N.ffn_act` | act(g)·u | intermediate |
//! | `blk.N.ffn_sub_norm` | its sub-norm (where the model has one) | intermediate |
//! | `blk.N.ffn_out` | the down projection | hidden |
//! | `blk.N.l_out` | h after the layer | hidden |
//! | `result_norm` | final RMSNorm of the rows with logits | hidden |
//! | `logits` | logits of those rows | vocab |
//!
//! Each value holds one row per token of the pass (`result_norm` and `logits`: per row with
//! logits), row-major f32. A [`Capture`] set on the model is offered every name of a pass and
//! receives the values of those it wants; a pass with a capture runs op by op (a backend that
//! records steps, such as CUDA's graphs, does not record it) and reads each wanted value back to
//! the host. Without one, the pass only tests one `Option` per intermediate.

use crate::config::ModelConfig;
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Receives named intermediates during forward passes.
pub trait Capture: Send {
    /// Whether to read `name` (asked once per intermediate and pass).
    fn wants(&self, name: &str) -> bool;
    /// `values`: the intermediate `name`, rows of `width`.
    fn record(&mut self, name: &str, width: usize, values: &[f32]) -> Result<()>;
}

/// Per-layer names, in the order a pass computes them (sub-norms only where the model has them).
const LAYER_NAMES: [&str; 12] = [
    "attn_norm",
    "qkv",
    "kqv_out",
    "attn_sub_norm",
    "attn_out",
    "ffn_inp",
    "ffn_norm",
    "ffn_gate_up",
    "ffn_act",
    "ffn_sub_norm",
    "ffn_out",
    "l_out",
];

/// Every name a pass of a model with `config` computes, in order.
pub fn names(config: &ModelConfig) -> Vec<String> {
    let per_layer = LAYER_NAMES
        .iter()
        .filter(|n| config.sub_norms || !n.ends_with("sub_norm"));
    let layers =
        (0..config.layers).flat_map(|l| per_layer.clone().map(move |n| format!("blk.{l}.{n}")));
    std::iter::once("inp_embd".to_string())
        .chain(layers)
        .chain(["result_norm".to_string(), "logits".to_string()])
        .collect()
}

/// Whether `pattern` (a name, or a name with one `*` standing for any text, e.g.
/// `blk.*.attn_out`) matches `name`.
pub fn matches(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => {
            name.len() >= head.len() + tail.len() && name.starts_with(head) && name.ends_with(tail)
        }
    }
}

/// Writes wanted intermediates to a directory: `NAME.f32.bin` gets each pass's rows appended
/// (little-endian f32), and `index.json` gives each file's width and rows so far.
pub struct DumpDir {
    dir: PathBuf,
    patterns: Vec<String>,
    /// name → (width, rows written).
    written: BTreeMap<String, (usize, usize)>,
}

impl DumpDir {
    /// A dump of the intermediates matching `patterns` (each must match a name of `config`'s
    /// model) into `dir`, created if missing.
    pub fn new(dir: &Path, patterns: &[String], config: &ModelConfig) -> Result<Self> {
        let all = names(config);
        for p in patterns {
            if !all.iter().any(|n| matches(p, n)) {
                bail!(
                    "--dump {p}: this model has no such intermediate (names: inp_embd, \
                     blk.0.attn_norm .. blk.{}.l_out, result_norm, logits; `*` matches any part, \
                     e.g. blk.*.attn_out)",
                    config.layers.saturating_sub(1)
                );
            }
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the dump directory {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            patterns: patterns.to_vec(),
            written: BTreeMap::new(),
        })
    }

    fn write_index(&self) -> Result<()> {
        let index: serde_json::Map<String, serde_json::Value> = self
            .written
            .iter()
            .map(|(name, &(width, rows))| {
                let entry =
                    serde_json::json!({"file": format!("{name}.f32.bin"), "shape": [rows, width]});
                (name.clone(), entry)
            })
            .collect();
        let path = self.dir.join("index.json");
        std::fs::write(&path, serde_json::to_string_pretty(&index)?)
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

impl Capture for DumpDir {
    fn wants(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| matches(p, name))
    }

    fn record(&mut self, name: &str, width: usize, values: &[f32]) -> Result<()> {
        let path = self.dir.join(format!("{name}.f32.bin"));
        let first = !self.written.contains_key(name);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(!first)
            .truncate(first)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        file.write_all(&bytes)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let entry = self.written.entry(name.to_string()).or_insert((width, 0));
        entry.1 += values.len() / width.max(1);
        self.write_index()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::bench::{ShapePreset, random_model};
    use crate::engine::Engine;
    use crate::model::LogitsFor;
    use std::sync::{Arc, Mutex};

    /// An intermediate: (name, width, values).
    type Named = (String, usize, Vec<f32>);

    /// Records every intermediate.
    #[derive(Clone, Default)]
    struct Everything(Arc<Mutex<Vec<Named>>>);

    impl Capture for Everything {
        fn wants(&self, _: &str) -> bool {
            true
        }

        fn record(&mut self, name: &str, width: usize, values: &[f32]) -> Result<()> {
            let mut seen = self.0.lock().unwrap();
            seen.push((name.to_string(), width, values.to_vec()));
            Ok(())
        }
    }

    #[test]
    fn a_pass_offers_every_name_in_order_and_a_capture_changes_no_bit() {
        let c = ShapePreset {
            hidden: 32,
            intermediate: 48,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 50,
            ..ShapePreset::parse("700m").unwrap()
        }
        .config();
        let model = random_model(c.clone(), 5);
        let mut engine = Engine::new(&model, Box::new(CpuBackend::new(2).unwrap()), 16, 1).unwrap();
        let tokens = [3, 1, 4, 1, 5];
        let seq = engine.new_sequence().unwrap();
        let plain = engine.feed(seq, &tokens, LogitsFor::Last).unwrap();
        engine.clear(seq).unwrap();
        let seen = Everything::default();
        engine.set_capture(Some(Box::new(seen.clone())));
        let captured = engine.feed(seq, &tokens, LogitsFor::Last).unwrap();
        assert!(engine.set_capture(None).is_some());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&captured), bits(&plain));
        let seen = seen.0.lock().unwrap();
        let got: Vec<&str> = seen.iter().map(|(name, ..)| name.as_str()).collect();
        assert_eq!(got, names(&c));
        for (name, width, values) in seen.iter() {
            let rows = if ["result_norm", "logits"].contains(&name.as_str()) {
                1
            } else {
                5
            };
            assert_eq!(values.len(), rows * width, "{name}");
        }
        let (_, _, logits) = seen.last().unwrap();
        assert_eq!(bits(logits), bits(&plain));
        // The residual stream: a layer's output is its input plus its two projections.
        let value = |name: &str| &seen.iter().find(|(n, ..)| n == name).unwrap().2;
        let (inp, attn, ffn, out) = (
            value("blk.1.ffn_inp"),
            value("blk.1.attn_out"),
            value("blk.1.ffn_out"),
            value("blk.1.l_out"),
        );
        let before = value("blk.0.l_out");
        for i in 0..out.len() {
            assert_eq!(inp[i], before[i] + attn[i]);
            assert_eq!(out[i], inp[i] + ffn[i]);
        }
    }

    #[test]
    fn names_follow_the_layers_and_sub_norms() {
        let mut c = ShapePreset::parse("700m").unwrap().config();
        c.layers = 2;
        let all = names(&c);
        assert_eq!(all.len(), 1 + 2 * 12 + 2);
        assert_eq!(all[1], "blk.0.attn_norm");
        assert!(all.contains(&"blk.1.ffn_sub_norm".to_string()));
        c.sub_norms = false;
        assert_eq!(names(&c).len(), 1 + 2 * 10 + 2);
    }

    #[test]
    fn patterns_match_whole_names_or_around_one_star() {
        assert!(matches("blk.3.attn_out", "blk.3.attn_out"));
        assert!(!matches("blk.3.attn_out", "blk.13.attn_out"));
        assert!(matches("blk.*.attn_out", "blk.13.attn_out"));
        assert!(!matches("blk.*.attn_out", "blk.13.ffn_out"));
        assert!(matches("*", "logits"));
        assert!(!matches("blk.1*1", "blk.1"));
    }

    #[test]
    fn a_dump_refuses_unknown_names_and_appends_rows() {
        let mut c = ShapePreset::parse("700m").unwrap().config();
        c.layers = 2;
        let dir = tempfile::tempdir().unwrap();
        let wanted = ["blk.2.attn_out".to_string()];
        assert!(DumpDir::new(dir.path(), &wanted, &c).is_err());
        let mut dump = DumpDir::new(dir.path(), &["blk.*.qkv".to_string()], &c).unwrap();
        assert!(dump.wants("blk.1.qkv") && !dump.wants("logits"));
        dump.record("blk.1.qkv", 2, &[1.0, 2.0, 3.0, 4.0]).unwrap();
        dump.record("blk.1.qkv", 2, &[5.0, 6.0]).unwrap();
        let bytes = std::fs::read(dir.path().join("blk.1.qkv.f32.bin")).unwrap();
        assert_eq!(bytes.len(), 6 * 4);
        assert_eq!(f32::from_le_bytes(bytes[20..24].try_into().unwrap()), 6.0);
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        assert_eq!(index["blk.1.qkv"]["shape"], serde_json::json!([3, 2]));
    }
}
