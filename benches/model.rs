//! One decode step and one prefill of the BitNet b1.58 2B-4T shape (random weights from
//! [`tern::bench::ShapePreset`], through the same upload and forward code as a checkpoint) on
//! every backend that opens here: the CPU (all cores) always, wgpu when a hardware adapter opens,
//! CUDA when a device opens; a skipped backend is printed with the reason.
//!
//! Counters: bytes are the weights a step reads (the linears in the backend's layout and the
//! output head it reads), so `B/s` is the weight bandwidth; items are the int8 operations of the
//! ternary linears (2 · ternary weights · tokens), so `item/s` is OPS.
//!
//! `cargo bench --bench model` (`-- decode` or `-- prefill` to filter; divan's flags apply).

use divan::Bencher;
use divan::counter::{BytesCount, ItemsCount};
use std::sync::LazyLock;
use tern::backend::cpu::CpuBackend;
use tern::backend::cuda::CudaBackend;
use tern::backend::wgpu::{WgpuBackend, WgpuOptions};
use tern::backend::{Backend, LmHead};
use tern::bench::{ShapePreset, decode_weight_bytes};
use tern::engine::Engine;
use tern::loader::HostModel;
use tern::model::LogitsFor;

/// Prompt tokens of the prefill, and the cached positions a decode step follows.
const PROMPT: usize = 128;

static MODEL: LazyLock<HostModel> = LazyLock::new(|| {
    ShapePreset::parse("2b4t")
        .expect("a known shape")
        .random_model(7)
});

fn main() {
    println!("{}: 2B-4T shape, random weights", BACKENDS.join(", "));
    println!("B/s: weight bytes read; item/s: int8 operations of the ternary linears");
    divan::main();
}

/// The backends that open here (each opened once to find out; the reason printed for the others).
static BACKENDS: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    let mut found = vec!["cpu"];
    match open("cuda") {
        Ok(_) => found.push("cuda"),
        Err(e) => println!("cuda skipped: {e:#}"),
    }
    match open("wgpu") {
        Ok(_) => found.push("wgpu"),
        Err(e) => println!("wgpu skipped: {e:#}"),
    }
    found
});

fn open(name: &str) -> anyhow::Result<Box<dyn Backend>> {
    Ok(match name {
        "cpu" => Box::new(CpuBackend::new(0)?),
        "cuda" => Box::new(CudaBackend::new(0)?),
        _ => {
            let gpu = WgpuBackend::new(&WgpuOptions::from_env())?;
            anyhow::ensure!(
                !gpu.is_software(),
                "only a software adapter: {}",
                gpu.describe()
            );
            Box::new(gpu)
        }
    })
}

/// An engine on `backend` with its output head (the 8-bit copy where the backend has one, as
/// `tern bench` measures greedy decoding), a sequence and `PROMPT` random tokens, and the weight
/// bytes one decode step reads.
fn setup(backend: &str) -> (Engine, tern::kv_cache::SequenceId, Vec<u32>, u64) {
    let mut backend = open(backend).unwrap();
    // Greedy decoding reads only the largest logit.
    let q8 = LmHead::Q8 { top: 1 };
    let head = match backend.set_lm_head(q8) {
        Ok(()) => q8,
        Err(_) => LmHead::Full,
    };
    let mut engine = Engine::new(&*MODEL, backend, PROMPT + 1, 1).unwrap();
    let bytes = decode_weight_bytes(
        &MODEL.config,
        engine.linear_weight_bytes(),
        engine.head_bytes(),
        head,
    );
    let seq = engine.new_sequence().unwrap();
    let vocab = MODEL.config.vocab as u32;
    let tokens = (0..PROMPT as u32).map(|i| i * 7919 % vocab).collect();
    (engine, seq, tokens, bytes)
}

/// int8 operations of the ternary linears for `tokens` tokens.
fn ops(tokens: usize) -> u64 {
    2 * MODEL.ternary_size().0 as u64 * tokens as u64
}

/// One token after `PROMPT` cached ones, logits for it.
#[divan::bench(args = BACKENDS.to_vec(), sample_count = 20)]
fn decode_step(bencher: Bencher, backend: &'static str) {
    let (mut engine, seq, tokens, bytes) = setup(backend);
    engine.feed(seq, &tokens, LogitsFor::Last).unwrap();
    bencher
        .counter(BytesCount::new(bytes))
        .counter(ItemsCount::new(ops(1)))
        .bench_local(|| {
            engine.truncate(seq, PROMPT).unwrap();
            engine.feed(seq, &tokens[..1], LogitsFor::Last).unwrap()
        });
}

/// `PROMPT` tokens from an empty cache, logits for the last.
#[divan::bench(args = BACKENDS.to_vec(), sample_count = 3)]
fn prefill(bencher: Bencher, backend: &'static str) {
    let (mut engine, seq, tokens, _) = setup(backend);
    bencher
        .counter(ItemsCount::new(ops(PROMPT)))
        .bench_local(|| {
            engine.clear(seq).unwrap();
            engine.feed(seq, &tokens, LogitsFor::Last).unwrap()
        });
}
