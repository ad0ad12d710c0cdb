//! Loading streams: while `Model::upload` loads a model of each fixture format (safetensors packed,
//! bf16 master weights, Llama-style, GGUF I2_S / TQ2_0 / TQ1_0), the heap never holds more than the
//! backend's final footprint plus one layer (read, converted and repacked) — never the whole model
//! twice. Tables stored in a dtype the backends read as is are served from the mapped file, not
//! copied.
//!
//! A counting global allocator measures live heap bytes and their peak, so this binary holds one
//! test: other tests running at the same time would count in. The fixtures have 2 layers, where one
//! layer and the whole model are hard to tell apart; each is deepened to [`LAYERS`] layers (its own
//! layers repeated, tensor bytes unchanged) so that holding every layer at once is far over the
//! ceiling.

mod common;

use common::{GGUF_FIXTURES, HF_FIXTURES, fixture_dir};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use tern::backend::Backend;
use tern::backend::cpu::CpuBackend;
use tern::gguf::write::GgufWriter;
use tern::gguf::{GgufFile, Value};
use tern::loader::{ModelSource, open_model};
use tern::model::Model;

/// Live heap bytes, and the most there were since the last [`reset_peak`].
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

struct Counting;

fn grew(bytes: usize) {
    let now = LIVE.fetch_add(bytes, Ordering::SeqCst) + bytes;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters are only
// updated next to it, and never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc`, passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc`, passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Counted as the new block arriving before the old one leaves: the moment of the
            // copy, when both exist.
            grew(new_size);
            LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::SeqCst)
}

fn reset_peak() {
    PEAK.store(live(), Ordering::SeqCst);
}

fn peak() -> usize {
    PEAK.load(Ordering::SeqCst)
}

/// Layers of the deepened fixtures.
const LAYERS: usize = 16;

/// Allocations of the upload besides the weights (the graph's layer handles, names, the progress
/// bar's state).
const SLACK: usize = 256 << 10;

/// A copy of the model directory `fixture` with [`LAYERS`] layers (layer `l` is the fixture's
/// layer `l % 2`) in `out`.
fn deepen_safetensors(fixture: &Path, out: &Path) {
    let bytes = std::fs::read(fixture.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut deep = Vec::new();
    for (name, view) in tensors.tensors() {
        match name.strip_prefix("model.layers.") {
            Some(rest) => {
                let (layer, tail) = rest.split_once('.').unwrap();
                let layer: usize = layer.parse().unwrap();
                for l in (layer..LAYERS).step_by(2) {
                    deep.push((format!("model.layers.{l}.{tail}"), view.clone()));
                }
            }
            None => deep.push((name, view)),
        }
    }
    safetensors::serialize_to_file(deep, None, &out.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] = LAYERS.into();
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
}

/// A copy of the GGUF file `fixture` with [`LAYERS`] layers, written to `out`.
fn deepen_gguf(fixture: &Path, out: &Path) {
    let file = GgufFile::open(fixture).unwrap();
    let arch = file
        .get("general.architecture")
        .and_then(Value::as_str)
        .unwrap()
        .to_string();
    let mut w = GgufWriter::default();
    for (key, value) in &file.metadata {
        match key.as_str() {
            "general.alignment" => {} // the writer uses the default
            k if k == format!("{arch}.block_count") => w.meta(k, Value::U32(LAYERS as u32)),
            _ => w.meta(key.clone(), value.clone()),
        }
    }
    let mut blocks: HashMap<usize, Vec<_>> = HashMap::new();
    for t in &file.tensors {
        match t.name.strip_prefix("blk.") {
            Some(rest) => {
                let (layer, tail) = rest.split_once('.').unwrap();
                blocks
                    .entry(layer.parse().unwrap())
                    .or_default()
                    .push((tail.to_string(), t));
            }
            None => w.tensor(&t.name, t.ne.clone(), t.ggml_type, file.data(t).to_vec()),
        }
    }
    for l in 0..LAYERS {
        for (tail, t) in &blocks[&(l % 2)] {
            let data = file.data(t).to_vec();
            w.tensor(format!("blk.{l}.{tail}"), t.ne.clone(), t.ggml_type, data);
        }
    }
    w.write(out).unwrap();
}

/// Heap bytes of one layer's load: reading it from `source`, converting it and handing its linears
/// to a fresh backend (fused as the graph fuses them), the most over the layers.
fn one_layer_peak(source: &dyn ModelSource) -> usize {
    (0..source.config().layers)
        .map(|l| {
            let mut backend = CpuBackend::new(2).unwrap();
            let base = live();
            reset_peak();
            let layer = source.layer(l).unwrap();
            let h = &*layer;
            backend
                .upload_linears(&[&[&h.q, &h.k, &h.v], &[&h.o], &[&h.gate, &h.up], &[&h.down]])
                .unwrap();
            drop(layer);
            peak() - base
        })
        .max()
        .unwrap()
}

/// Loads `path` into a CPU backend and checks the peak against the ceiling; returns the figures
/// for the report line.
fn check_streaming(name: &str, path: &Path) -> String {
    let (source, _tokenizer) = open_model(path).unwrap();
    let source = source.as_ref();
    let c = source.config().clone();
    assert_eq!(c.layers, LAYERS, "{name}");
    let layer = one_layer_peak(source);
    let mut backend = CpuBackend::new(2).unwrap();
    let base = live();
    reset_peak();
    let model = Model::upload(source, &mut backend).unwrap();
    let footprint = live() - base;
    let peak = peak() - base;
    let ceiling = footprint + layer + SLACK;
    assert!(
        peak <= ceiling,
        "{name}: loading peaked at {peak} heap bytes, over the ceiling {ceiling} = backend \
         footprint {footprint} + one layer {layer} + slack {SLACK}"
    );
    // The ceiling must be able to fail: every layer held at once in the canonical layout would
    // be far over it.
    let all_layers = c.ternary_size().1;
    assert!(
        footprint + all_layers > ceiling + all_layers / 2,
        "{name}: the model is too small for the test to tell one layer from all of them"
    );
    drop(model);
    format!(
        "{name}: peak {peak}, footprint {footprint}, one layer {layer}, all layers {all_layers}"
    )
}

#[test]
fn loading_never_holds_the_model_twice_and_tables_stay_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for fixture in HF_FIXTURES {
        let out = dir.path().join(fixture);
        std::fs::create_dir(&out).unwrap();
        deepen_safetensors(&fixture_dir(fixture), &out);
        report.push(check_streaming(fixture, &out));
    }
    for fixture in GGUF_FIXTURES {
        let out = dir.path().join(fixture.replace('/', "-"));
        deepen_gguf(&fixture_dir(fixture), &out);
        report.push(check_streaming(fixture, &out));
    }
    eprintln!("{}", report.join("\n"));

    // Every fixture stores its tables in a dtype a backend reads as is: none is copied, neither
    // by the loader nor by the CPU backend.
    for fixture in HF_FIXTURES.into_iter().chain(GGUF_FIXTURES) {
        let (source, _) = open_model(&fixture_dir(fixture)).unwrap();
        let embed = source.embed().unwrap();
        assert!(embed.is_mapped(), "{fixture}: the embedding was copied");
        if let Some(output) = source.output().unwrap() {
            assert!(output.is_mapped(), "{fixture}: the output head was copied");
        }
        let mut backend = CpuBackend::new(1).unwrap();
        let base = live();
        backend.upload_table(&embed).unwrap();
        assert!(
            live() - base < embed.bytes() / 8,
            "{fixture}: the CPU backend copied the mapped table"
        );
    }
}
