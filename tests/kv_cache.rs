//! The paged KV cache through the engine: a pool smaller than the context, a pool that grows, and
//! the f16 cache against the f32 one, on the golden fixtures.

mod common;

use common::{backends, diff, load};
use tern::backend::KvType;
use tern::backend::cpu::CpuBackend;
use tern::engine::{Engine, KvOptions, KvPool};
use tern::model::LogitsFor;

/// A prompt of `n` ids of the tiny fixtures' vocabulary, BOS first.
fn prompt(n: usize) -> Vec<u32> {
    std::iter::once(1008)
        .chain((1..n as u32).map(|i| (i * 37 + 11) % 1000))
        .collect()
}

fn kv(ctx: usize, kv_type: KvType, pool: KvPool) -> KvOptions {
    KvOptions {
        ctx,
        slots: 1,
        kv_type,
        pool,
    }
}

/// Feeds `ids` as a 37-token prefill then one token at a time; returns every position's logits.
fn run(engine: &mut Engine, ids: &[u32]) -> Vec<f32> {
    let seq = engine.new_sequence().unwrap();
    let mut logits = engine.feed(seq, &ids[..37], LogitsFor::All).unwrap();
    for &id in &ids[37..] {
        logits.extend(engine.feed(seq, &[id], LogitsFor::Last).unwrap());
    }
    engine.release(seq);
    logits
}

/// A pool that starts with one page and doubles as the sequence grows gives, on every backend,
/// the bits of a pool allocated whole: growing keeps every cached key and value.
#[test]
fn a_growing_pool_gives_the_logits_of_a_full_one() {
    let model = load("tiny-packed");
    let ids = prompt(120);
    for (name, backend) in backends() {
        let mut full =
            Engine::with_kv(&model, backend, kv(128, KvType::F32, KvPool::Full)).unwrap();
        let want = run(&mut full, &ids);
        let backend = backends().into_iter().find(|(n, _)| *n == name).unwrap().1;
        let mut growing =
            Engine::with_kv(&model, backend, kv(128, KvType::F32, KvPool::Growing(16))).unwrap();
        assert_eq!(growing.kv().pages(), 1, "{name}");
        let got = run(&mut growing, &ids);
        assert_eq!(
            growing.kv().pages(),
            8,
            "{name}: 120 positions in pages of 16"
        );
        assert_eq!(growing.kv().pages_used(), 0, "{name}: released");
        assert_eq!(got, want, "{name}");
    }
}

/// A fixed pool smaller than the context bounds a sequence: the engine's context is the pool's,
/// a prompt that fits runs, one position more is refused as out of pages, changing nothing.
#[test]
fn a_pool_smaller_than_the_context_holds_what_fits_and_refuses_the_rest() {
    let model = load("tiny-packed");
    let backend = Box::new(CpuBackend::new(1).unwrap());
    let mut engine =
        Engine::with_kv(&model, backend, kv(512, KvType::F32, KvPool::Positions(40))).unwrap();
    assert_eq!((engine.kv().pages(), engine.context()), (3, 48));
    let seq = engine.new_sequence().unwrap();
    engine.feed(seq, &prompt(48), LogitsFor::Last).unwrap();
    let err = engine
        .feed(seq, &[5], LogitsFor::Last)
        .unwrap_err()
        .to_string();
    assert!(err.contains("out of KV-cache pages"), "{err}");
    assert_eq!(engine.sequence_len(seq).unwrap(), 48);
    engine.truncate(seq, 20).unwrap();
    assert_eq!(engine.kv().pages_used(), 2);
    engine.release(seq);
    assert_eq!(engine.kv().pages_free(), 3);
    // A pool of less than a page is refused with the flag to raise.
    let backend = Box::new(CpuBackend::new(1).unwrap());
    let err = Engine::with_kv(&model, backend, kv(64, KvType::F32, KvPool::Bytes(1000)))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--kv-memory"), "{err}");
}

/// How far the f16 KV cache may move the fixtures' logits: the golden tests' loose tolerance
/// between implementations (max and mean |difference|). The tiny fixtures' random weights give
/// keys and scores far larger than a trained model's, so rounding keys and values to 11
/// significant bits moves their logits by up to about 0.25 (mean 0.04); on the trained fixture
/// the perplexity moves by less than 0.1 % (README).
const F16_LOGIT_TOLERANCE: (f32, f32) = (0.5, 0.1);

/// Where two backends' f16 caches may part (max and mean |difference|). Every backend rounds to
/// f16 the same way (to nearest even), but their f32 arithmetic differs in the last bits (about
/// 1e-6 apart), which flips the rounding of the odd value lying near a tie, and one flipped value
/// moves these fixtures' logits by up to ~0.13 (their random weights amplify it). So the max is a
/// rounding's worth; the mean stays a few times below what f16 storage moves (~0.025-0.04).
const F16_ACROSS_BACKENDS: (f32, f32) = (0.25, 0.01);

#[test]
fn f16_cache_matches_the_f32_cache_within_tolerance_on_every_backend() {
    let ids = prompt(100);
    for fixture in common::HF_FIXTURES {
        let model = load(fixture);
        let mut reference: Option<Vec<f32>> = None;
        // Two instances of each backend, in the same order: one per cache type. The CPU's cache
        // code is the same at every kernel level, so its first level stands for all; one
        // emulated CUDA backend, on the first fixture only (the emulation is slow).
        let emulated = if fixture == common::HF_FIXTURES[0] {
            1
        } else {
            0
        };
        let all = || {
            let cpu = backends().into_iter().take(1);
            let others = backends()
                .into_iter()
                .filter(|(n, _)| !n.starts_with("cpu"));
            cpu.chain(others)
                .chain(common::emulated_cuda_backends().into_iter().take(emulated))
        };
        for ((name, wide_backend), (_, narrow_backend)) in all().zip(all()) {
            let mut wide =
                Engine::with_kv(&model, wide_backend, kv(128, KvType::F32, KvPool::Full)).unwrap();
            let mut narrow =
                Engine::with_kv(&model, narrow_backend, kv(128, KvType::F16, KvPool::Full))
                    .unwrap();
            assert_eq!(narrow.kv().bytes() * 2, wide.kv().bytes(), "{name}");
            let (want, got) = (run(&mut wide, &ids), run(&mut narrow, &ids));
            let (max, mean) = diff(&got, &want);
            eprintln!("{fixture} {name}: f16 KV cache max |diff| {max}, mean {mean}");
            let (max_tol, mean_tol) = F16_LOGIT_TOLERANCE;
            assert!(
                max <= max_tol && mean <= mean_tol,
                "{fixture} {name}: {max}, {mean}"
            );
            assert!(
                max > 0.0,
                "{fixture} {name}: f16 storage changed nothing (is it used?)"
            );
            let reference = reference.get_or_insert_with(|| got.clone());
            let (max, mean) = diff(&got, reference);
            eprintln!("{fixture} {name}: f16 against the first backend's f16: {max}, {mean}");
            let (max_tol, mean_tol) = F16_ACROSS_BACKENDS;
            assert!(
                max <= max_tol && mean <= mean_tol,
                "{fixture} {name} against the first backend, both f16: {max}, {mean}"
            );
        }
    }
}

/// A prompt that starts with an earlier prompt's tokens takes its full pages from the cache and
/// gives, on every backend, the logits of computing it whole.
#[test]
fn a_cached_prefix_gives_the_logits_of_computing_it() {
    let model = load("tiny-packed");
    let first = prompt(45);
    let mut second = first[..40].to_vec();
    second.extend([5, 6, 7]);
    for (name, backend) in backends() {
        let mut engine =
            Engine::with_kv(&model, backend, kv(128, KvType::F32, KvPool::Full)).unwrap();
        engine.enable_prefix_reuse().unwrap();
        let vocab = engine.config().vocab;
        let (a, cached) = engine.new_sequence_with_prefix(&first).unwrap();
        assert_eq!(cached, 0, "{name}");
        engine.feed(a, &first, LogitsFor::Last).unwrap();
        engine.release(a);
        let (b, cached) = engine.new_sequence_with_prefix(&second).unwrap();
        assert_eq!(cached, 32, "{name}: two pages of 16 positions");
        let got = engine.feed(b, &second[cached..], LogitsFor::All).unwrap();
        engine.release(b);
        let backend = backends().into_iter().find(|(n, _)| *n == name).unwrap().1;
        let mut fresh =
            Engine::with_kv(&model, backend, kv(128, KvType::F32, KvPool::Full)).unwrap();
        let s = fresh.new_sequence().unwrap();
        let want = fresh.feed(s, &second, LogitsFor::All).unwrap();
        assert_eq!(got, want[cached * vocab..], "{name}");
    }
}
