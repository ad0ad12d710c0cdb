//! The 8-bit output head (`LmHead::Q8`) keeps the largest logits exact: on every fixture and every
//! CPU kernel level, its top `top` logits (1, 8 and `Q8_EXACT_TOP_K`) equal the full-precision
//! head's bit for bit (values and order) at every position of a prompt, so greedy decoding and
//! top-k sampling up to `top` are unchanged.

mod common;

use common::*;
use tern::backend::{Backend, LmHead, Q8_EXACT_TOP_K};
use tern::model::LogitsFor;

/// Indices of the `k` largest values, largest first (ties by index).
fn top_ids(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

#[test]
fn q8_head_keeps_the_top_logits_exact() {
    for fixture in HF_FIXTURES {
        let model = load(fixture);
        let prompt: Vec<u32> = (0..24)
            .map(|i| (i * 37 + 5) % model.config.vocab as u32)
            .collect();
        let logits = |mut backend: Box<dyn Backend>, head: LmHead| {
            backend.set_lm_head(head).unwrap();
            let mut e = engine(&model, backend, 64);
            let seq = e.new_sequence().unwrap();
            e.feed(seq, &prompt, LogitsFor::All).unwrap()
        };
        let mut total_checked = 0;
        for (name, mut backend) in backends() {
            // Backends without an 8-bit head refuse it (the trait's default); skip them, saying so.
            if let Err(e) = backend.set_lm_head(LmHead::Q8 { top: 1 }) {
                eprintln!("{fixture} on {name}: skipped ({e:#})");
                continue;
            }
            // It keeps 1 to Q8_EXACT_TOP_K logits exact, and says so for any other count.
            for top in [0, Q8_EXACT_TOP_K + 1] {
                let e = backend.set_lm_head(LmHead::Q8 { top }).unwrap_err();
                assert!(
                    format!("{e:#}").contains(&format!("{top} exact logits")),
                    "{e:#}"
                );
            }
            let want = &logits(backend, LmHead::Full);
            let vocab = model.config.vocab;
            for top in [1, 8, Q8_EXACT_TOP_K] {
                let backend = (backends().into_iter())
                    .find(|(n, _)| *n == name)
                    .map(|(_, b)| b)
                    .expect("the same backends on every call");
                let got = logits(backend, LmHead::Q8 { top });
                for (p, (g, w)) in got
                    .chunks_exact(vocab)
                    .zip(want.chunks_exact(vocab))
                    .enumerate()
                {
                    let want_top = top_ids(w, top);
                    assert_eq!(
                        top_ids(g, top),
                        want_top,
                        "{fixture} on {name}, top {top}, position {p}"
                    );
                    for &v in &want_top {
                        assert_eq!(
                            g[v].to_bits(),
                            w[v].to_bits(),
                            "{fixture} on {name}, top {top}: logit {v}"
                        );
                    }
                    // The others are approximations, not garbage: with the head input quantized to
                    // int8 the worst error measured here is 0.11, against logits up to about 9.
                    let worst = g
                        .iter()
                        .zip(w)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        worst < 0.25,
                        "{fixture} on {name}, top {top}: an approximate logit is off by {worst}"
                    );
                    total_checked += 1;
                }
            }
        }
        assert!(
            total_checked >= 3 * 24,
            "{fixture}: checked {total_checked} positions"
        );
    }
}
