//! Next-token sampling, compatible with llama.cpp's default sampler chain, and log-probability helpers.
//!
//! Invariants:
//! - The chain is llama.cpp's order: penalties, top-k, top-p, min-p, temperature, then a draw from
//!   the softmax of what is left. `temperature <= 0` is greedy: the argmax after the penalties,
//!   lowest id on ties.
//! - Penalties, as llama.cpp applies them, over the last `repeat_last_n` ids of the history (prompt
//!   and generated): a token seen `c > 0` times there has a positive logit divided by
//!   `repeat_penalty` (a negative one multiplied), then `c · frequency_penalty + presence_penalty`
//!   subtracted (OpenAI's definition, over that window).
//! - Deterministic: the RNG is ChaCha8 seeded from [`SamplingParams::seed`] (portable across platforms
//!   and crate versions), candidates are ordered by (logit descending, id ascending), so the same seed,
//!   logits and history always give the same ids.
//! - Never panics on bad logits: NaN counts as `-inf`; `+inf` logits share all the probability; if every
//!   candidate is `-inf` the draw is uniform over them. History ids outside the vocabulary are ignored.
//! - Work per call is O(V) plus O(m log m), m = the tokens left after top-k and min-p (m <= top_k when
//!   top-k is on; only with both off and top-p on is it a full sort). Top-k (and greedy, top-1) reads
//!   the logits once, and most blocks of them only for a vectorized maximum (a 2B-4T vocabulary:
//!   ~0.07 ms, where building and partitioning every (id, logit) pair took ~0.5 ms, a step of 16
//!   sequences' sampling ~8 ms). Buffers are reused, so nothing is allocated per token after the
//!   first call.
//! - Log-probabilities use a max-shifted log-sum-exp in f64.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling settings; `Default` is llama.cpp's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `<= 0` means greedy (argmax). Default 0.8.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 = off. Default 40.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1.0 = off.
    /// Default 0.95.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely one's; 0 = off.
    /// Default 0.05.
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of recently seen tokens by this; 1.0 = off.
    pub repeat_penalty: f32,
    /// Subtracted from a logit once per occurrence of its token in the penalty window; 0 = off.
    pub frequency_penalty: f32,
    /// Subtracted from the logit of every token present in the penalty window; 0 = off.
    pub presence_penalty: f32,
    /// How many of the most recent history ids the penalties look at; 0 = off. Default 64.
    pub repeat_last_n: usize,
    /// RNG seed. Default 0 (fixed, so runs are reproducible unless the caller picks a seed).
    pub seed: u64,
}

impl SamplingParams {
    /// How many of the largest logits (and their order) sampling reads, if not all: 1 greedy,
    /// `top_k` with top-k on (top-p, min-p and temperature then only see those); `None` with a
    /// penalty (which could lift a smaller logit into the top) or without top-k.
    pub fn top_read(&self) -> Option<usize> {
        if !self.no_penalty() {
            None
        } else if self.temperature <= 0.0 {
            Some(1)
        } else {
            (self.top_k > 0).then_some(self.top_k)
        }
    }

    fn no_penalty(&self) -> bool {
        let none = self.repeat_penalty == 1.0
            && self.frequency_penalty == 0.0
            && self.presence_penalty == 0.0;
        none || self.repeat_last_n == 0
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token (other settings at their defaults).
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// A token sampler: the settings, its RNG, and reusable buffers.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// (id, logit) of the tokens still in the running.
    candidates: Vec<(u32, f32)>,
    /// Unnormalized probabilities of `candidates` for the final draw.
    weights: Vec<f64>,
    /// The penalty window's ids, sorted.
    recent: Vec<u32>,
    /// The logits with the penalties applied.
    penalized: Vec<f32>,
}

impl Sampler {
    /// A sampler with `params`, its RNG seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            candidates: Vec::new(),
            weights: Vec::new(),
            recent: Vec::new(),
            penalized: Vec::new(),
        }
    }

    /// The settings this sampler uses.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (one per vocabulary id). `history` is the sequence so far
    /// (prompt and generated ids), used by the penalties. Returns 0 for empty `logits`.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = self.params;
        if logits.is_empty() {
            return 0;
        }
        // With a penalty, a penalized copy of the logits.
        let logits = if p.no_penalty() {
            logits
        } else {
            self.penalized.clear();
            self.penalized.extend_from_slice(logits);
            self.apply_penalties(history);
            &self.penalized
        };
        // Greedy is top-1.
        let k = if p.temperature <= 0.0 { 1 } else { p.top_k };
        if k > 0 {
            top_k(logits, k, &mut self.candidates);
        } else {
            all_pairs(logits, &mut self.candidates);
        }
        if p.temperature <= 0.0 {
            return self.candidates[0].0;
        }

        let top_p_on = p.top_p < 1.0;
        let min_p_on = p.min_p > 0.0;
        if top_p_on || min_p_on {
            let max = max_logit(&self.candidates);
            // Softmax normalizer over the top-k survivors: top-p's cumulative sums use it.
            let total: f64 = self
                .candidates
                .iter()
                .map(|&(_, l)| shifted_exp(l, max, 1.0))
                .sum();
            // Top-p and min-p each keep a prefix of the descending order, so min-p (a threshold,
            // O(n)) can run first: the sort below then only touches min-p's survivors, and top-p's
            // cut inside them is the same as on the full order.
            if min_p_on {
                let threshold = max + p.min_p.ln();
                self.candidates.retain(|&(_, l)| l >= threshold || l == max);
            }
            self.candidates.sort_unstable_by(by_logit_desc);
            if top_p_on {
                let mut cumulative = 0.0;
                let mut keep = self.candidates.len();
                for (i, &(_, l)) in self.candidates.iter().enumerate() {
                    cumulative += shifted_exp(l, max, 1.0) / total;
                    if cumulative >= f64::from(p.top_p) {
                        keep = i + 1;
                        break;
                    }
                }
                self.candidates.truncate(keep);
            }
        }

        // Temperature and softmax in one pass: exp((l - max) / T) cannot overflow.
        let max = max_logit(&self.candidates);
        let inv_t = 1.0 / f64::from(p.temperature);
        self.weights.clear();
        self.weights.extend(
            self.candidates
                .iter()
                .map(|&(_, l)| shifted_exp(l, max, inv_t)),
        );
        let total: f64 = self.weights.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (&(id, _), &w) in self.candidates.iter().zip(&self.weights) {
            if u < w {
                return id;
            }
            u -= w;
        }
        // Rounding left `u` past the end: the last token with any weight.
        self.candidates
            .iter()
            .zip(&self.weights)
            .rev()
            .find(|(_, w)| **w > 0.0)
            .map_or(self.candidates[0].0, |(&(id, _), _)| id)
    }

    /// llama.cpp's repetition penalty in `penalized`: once per distinct id among the last
    /// `repeat_last_n` of `history`, `logit / penalty` if positive, `logit * penalty` otherwise.
    fn apply_penalties(&mut self, history: &[u32]) {
        let p = self.params;
        if p.no_penalty() {
            return;
        }
        let window = &history[history.len().saturating_sub(p.repeat_last_n)..];
        self.recent.clear();
        self.recent.extend_from_slice(window);
        self.recent.sort_unstable();
        for run in self.recent.chunk_by(|a, b| a == b) {
            if let Some(l) = self.penalized.get_mut(run[0] as usize) {
                if p.repeat_penalty != 1.0 {
                    *l = if *l > 0.0 {
                        *l / p.repeat_penalty
                    } else {
                        *l * p.repeat_penalty
                    };
                }
                *l -= run.len() as f32 * p.frequency_penalty + p.presence_penalty;
            }
        }
    }
}

/// The `k` best ids of `logits` ([`clean`]ed) by [`by_logit_desc`], best first, in `out`: one pass
/// that keeps the best so far in order, so a logit enters only if it beats the worst of them (a
/// later id never beats an equal logit). A block of logits none of which beats it is passed over
/// after one vectorizable maximum; once the `k` are found that is nearly every block. A large `k`
/// (a request may ask for any) partitions all the pairs instead, where insertions would cost more.
fn top_k(logits: &[f32], k: usize, out: &mut Vec<(u32, f32)>) {
    const BLOCK: usize = 64;
    const ONE_PASS_MAX_K: usize = 256;
    if k > ONE_PASS_MAX_K {
        all_pairs(logits, out);
        if k < out.len() {
            out.select_nth_unstable_by(k - 1, by_logit_desc);
            out.truncate(k);
        }
        out.sort_unstable_by(by_logit_desc);
        return;
    }
    out.clear();
    for (b, block) in logits.chunks(BLOCK).enumerate() {
        if out.len() == k {
            // NaN is passed over by `max` (it counts as `-inf`).
            let max = block.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
            if out.last().is_some_and(|&(_, worst)| max <= worst) {
                continue;
            }
        }
        for (i, &l) in block.iter().enumerate() {
            let l = clean(l);
            if out.len() == k && out.last().is_some_and(|&(_, worst)| l <= worst) {
                continue;
            }
            let new = ((b * BLOCK + i) as u32, l);
            let at = out.partition_point(|c| by_logit_desc(c, &new).is_lt());
            if out.len() == k {
                out.pop();
            }
            out.insert(at, new);
        }
    }
}

/// Every (id, logit) of `logits`, [`clean`]ed, in id order, in `out`.
fn all_pairs(logits: &[f32], out: &mut Vec<(u32, f32)>) {
    out.clear();
    out.extend(
        logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, clean(l))),
    );
}

/// NaN becomes `-inf` (never chosen unless nothing else is left), `-0.0` becomes `0.0` so that
/// ordering ties are real ties.
fn clean(l: f32) -> f32 {
    if l.is_nan() {
        f32::NEG_INFINITY
    } else {
        l + 0.0
    }
}

/// Orders candidates best first: higher logit, then lower id.
fn by_logit_desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

fn max_logit(candidates: &[(u32, f32)]) -> f32 {
    candidates
        .iter()
        .fold(f32::NEG_INFINITY, |m, &(_, l)| m.max(l))
}

/// `exp((l - max) * scale)` with the infinite cases made well defined: when `max` is `+inf` the `+inf`
/// logits get weight 1 and the rest 0; when every logit is `-inf` all weigh 1 (uniform).
fn shifted_exp(l: f32, max: f32, scale: f64) -> f64 {
    if max == f32::INFINITY {
        if l == max { 1.0 } else { 0.0 }
    } else if max == f32::NEG_INFINITY {
        1.0
    } else {
        (f64::from(l - max) * scale).exp()
    }
}

/// `(max, log(sum(exp(l - max))))` over `logits`, NaN as `-inf`, in f64.
fn log_sum_exp(logits: &[f32]) -> (f32, f64) {
    let max = logits
        .iter()
        .fold(f32::NEG_INFINITY, |m, &l| m.max(clean(l)));
    let sum: f64 = logits
        .iter()
        .map(|&l| shifted_exp(clean(l), max, 1.0))
        .sum();
    (max, sum.ln())
}

fn log_prob(l: f32, max: f32, lse: f64) -> f32 {
    (shifted_exp(clean(l), max, 1.0).ln() - lse) as f32
}

/// Log-probabilities (log-softmax of `logits`) of each of `ids`; ids outside `logits` get `-inf`.
pub fn log_softmax_at(logits: &[f32], ids: &[u32]) -> Vec<f32> {
    let (max, lse) = log_sum_exp(logits);
    ids.iter()
        .map(|&id| {
            logits
                .get(id as usize)
                .map_or(f32::NEG_INFINITY, |&l| log_prob(l, max, lse))
        })
        .collect()
}

/// Log-probability of `id` under the softmax of `logits` (`-inf` if `id` is out of range).
pub fn logprob_of(logits: &[f32], id: u32) -> f32 {
    log_softmax_at(logits, &[id])[0]
}

/// The `k` most likely ids with their log-probabilities, most likely first (lower id first on ties).
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(logits.len());
    if k == 0 {
        return Vec::new();
    }
    let mut all = Vec::with_capacity(k);
    top_k(logits, k, &mut all);
    let (max, lse) = log_sum_exp(logits);
    all.into_iter()
        .map(|(id, l)| (id, log_prob(l, max, lse)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_filters(temperature: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            repeat_last_n: 64,
            seed,
        }
    }

    /// Which ids a sampler can return for `logits`, estimated from many draws.
    fn support(params: SamplingParams, logits: &[f32], history: &[u32]) -> Vec<u32> {
        let mut s = Sampler::new(params);
        let mut seen: Vec<u32> = (0..2000).map(|_| s.sample(logits, history)).collect();
        seen.sort_unstable();
        seen.dedup();
        seen
    }

    fn logits_for_probs(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    /// What `top_read` promises: changing logits below the n-th largest (keeping them below it)
    /// changes no draw. And where it says `None`, such a change can matter.
    #[test]
    fn top_read_means_lower_logits_do_not_matter() {
        let k = 8;
        let logits: Vec<f32> = (0..200).map(|i| ((i * 37) % 101) as f32 * 0.05).collect();
        let mut sorted = logits.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        // Every logit below the n-th raised to just under it: the mass outside the top n grows.
        let raised_below = |n: usize| -> Vec<f32> {
            let nth = sorted[n - 1];
            logits
                .iter()
                .map(|&l| if l < nth { nth - 1e-3 } else { l })
                .collect()
        };
        let raised = raised_below(k);
        let history: Vec<u32> = (0..200).collect();
        let draws = |params: SamplingParams, logits: &[f32]| -> Vec<u32> {
            let mut s = Sampler::new(params);
            (0..300).map(|_| s.sample(logits, &history)).collect()
        };
        let defaults = SamplingParams::default();
        let top_k = SamplingParams {
            top_k: k,
            ..defaults
        };
        let greedy = SamplingParams {
            temperature: 0.0,
            top_k: 0,
            ..defaults
        };
        for (params, n) in [(top_k, k), (greedy, 1)] {
            assert_eq!(params.top_read(), Some(n));
            assert_eq!(draws(params, &logits), draws(params, &raised_below(n)));
        }
        let no_top_k = SamplingParams {
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..defaults
        };
        let penalized = SamplingParams {
            repeat_penalty: 5.0,
            ..top_k
        };
        assert_eq!((no_top_k.top_read(), penalized.top_read()), (None, None));
        assert_ne!(draws(no_top_k, &logits), draws(no_top_k, &raised));
        assert_ne!(draws(penalized, &logits), draws(penalized, &raised));
    }

    #[test]
    fn defaults_are_llama_cpp() {
        let p = SamplingParams::default();
        assert_eq!(
            (
                p.temperature,
                p.top_k,
                p.top_p,
                p.min_p,
                p.repeat_penalty,
                p.repeat_last_n
            ),
            (0.8, 40, 0.95, 0.05, 1.0, 64)
        );
        assert_eq!(SamplingParams::greedy().temperature, 0.0);
    }

    #[test]
    fn greedy_picks_argmax_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9], &[]), 1);
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 2.0], &[]), 1);
        assert_eq!(s.sample(&[3.0, -0.0, 0.0, 3.0], &[]), 0);
        let mut s = Sampler::new(SamplingParams {
            temperature: -1.0,
            ..SamplingParams::default()
        });
        assert_eq!(s.sample(&[0.0, 0.5, 0.25], &[]), 1);
    }

    #[test]
    fn top_k_1_is_greedy_at_any_temperature() {
        let logits: Vec<f32> = (0..500)
            .map(|i| ((i * 37 % 101) as f32).sin() * 3.0)
            .collect();
        let mut greedy = Sampler::new(SamplingParams::greedy());
        let want = greedy.sample(&logits, &[]);
        for t in [0.1, 1.0, 5.0, 100.0] {
            let mut s = Sampler::new(SamplingParams {
                temperature: t,
                top_k: 1,
                ..SamplingParams::default()
            });
            for _ in 0..50 {
                assert_eq!(s.sample(&logits, &[]), want);
            }
        }
    }

    #[test]
    fn same_seed_same_ids_different_seed_differs() {
        let flat = vec![0.0f32; 1000];
        let draw = |seed| {
            let mut s = Sampler::new(no_filters(1.0, seed));
            (0..64).map(|_| s.sample(&flat, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
        let mut a = Sampler::new(SamplingParams {
            seed: 9,
            ..SamplingParams::default()
        });
        let mut b = a.clone();
        let logits: Vec<f32> = (0..300).map(|i| (i % 17) as f32 * 0.1).collect();
        for _ in 0..100 {
            assert_eq!(a.sample(&logits, &[1, 2]), b.sample(&logits, &[1, 2]));
        }
    }

    #[test]
    fn top_p_keeps_smallest_prefix_reaching_p() {
        let logits = logits_for_probs(&[0.1, 0.5, 0.25, 0.15]);
        let with_p = |top_p| {
            support(
                SamplingParams {
                    top_p,
                    ..no_filters(1.0, 1)
                },
                &logits,
                &[],
            )
        };
        assert_eq!(with_p(0.5), [1]);
        assert_eq!(with_p(0.6), [1, 2]);
        assert_eq!(with_p(0.75), [1, 2]);
        assert_eq!(with_p(0.8), [1, 2, 3]);
        assert_eq!(with_p(1.0), [0, 1, 2, 3]);
        // Top-p after top-k renormalizes over the top-k survivors: 0.5/0.75 = 0.67 >= 0.6.
        let p = SamplingParams {
            top_k: 2,
            top_p: 0.6,
            ..no_filters(1.0, 1)
        };
        assert_eq!(support(p, &logits, &[]), [1]);
    }

    #[test]
    fn min_p_keeps_tokens_above_fraction_of_max() {
        let logits = logits_for_probs(&[0.1, 0.4, 0.21, 0.19, 0.1]);
        let with_min_p = |min_p| {
            support(
                SamplingParams {
                    min_p,
                    ..no_filters(1.0, 2)
                },
                &logits,
                &[],
            )
        };
        assert_eq!(with_min_p(0.5), [1, 2]);
        assert_eq!(with_min_p(0.45), [1, 2, 3]);
        assert_eq!(with_min_p(1.0), [1]);
        assert_eq!(with_min_p(0.2), [0, 1, 2, 3, 4]);
        // Combined with top-p: the shorter prefix wins, whatever the order they are computed in.
        let p = SamplingParams {
            top_p: 0.6,
            min_p: 0.45,
            ..no_filters(1.0, 2)
        };
        assert_eq!(support(p, &logits, &[]), [1, 2]);
    }

    #[test]
    fn top_k_keeps_k_best() {
        let logits = [1.0, 5.0, 3.0, 4.0, 2.0];
        let p = SamplingParams {
            top_k: 3,
            ..no_filters(10.0, 3)
        };
        assert_eq!(support(p, &logits, &[]), [1, 2, 3]);
    }

    #[test]
    fn repetition_penalty_moves_tokens() {
        let params = SamplingParams {
            repeat_penalty: 2.0,
            repeat_last_n: 2,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(params);
        // 3.0 / 2 = 1.5 < 2.0: token 0 loses to token 1.
        assert_eq!(s.sample(&[3.0, 2.0, -1.0], &[0]), 1);
        // Only the last 2 history ids count: 0 is out of the window.
        assert_eq!(s.sample(&[3.0, 2.0, -1.0], &[0, 2, 2]), 0);
        // Negative logits are multiplied: -1 * 2 = -2 < -1.5, so token 1 wins.
        assert_eq!(s.sample(&[-1.0, -1.5], &[0]), 1);
        // Penalized once per distinct id, however often it repeats.
        assert_eq!(s.sample(&[3.0, 1.4], &[0, 0]), 0);
        // Ids outside the vocabulary are ignored.
        assert_eq!(s.sample(&[3.0, 1.6], &[99]), 0);
    }

    #[test]
    fn frequency_and_presence_penalties_subtract_per_occurrence_and_once() {
        let with = |frequency_penalty, presence_penalty, repeat_penalty| {
            Sampler::new(SamplingParams {
                frequency_penalty,
                presence_penalty,
                repeat_penalty,
                repeat_last_n: 3,
                ..SamplingParams::greedy()
            })
        };
        let mut s = with(1.0, 0.0, 1.0);
        // Twice in the window: 3 - 2 = 1 < 1.5; once: 3 - 1 = 2 > 1.5.
        assert_eq!(s.sample(&[3.0, 1.5], &[0, 0]), 1);
        assert_eq!(s.sample(&[3.0, 1.5], &[0]), 0);
        // Only the last 3 ids count: 3 - 2 = 1 < 1.5, not 3 - 4.
        assert_eq!(s.sample(&[3.0, 1.5, -9.0], &[0, 0, 2, 0, 0]), 1);
        assert_eq!(s.sample(&[3.0, 0.5, -9.0], &[0, 0, 2, 0, 0]), 0);
        let mut s = with(0.0, 1.0, 1.0);
        // Once however often: 3 - 1 = 2 > 1.5; 2.4 - 1 = 1.4 < 1.5.
        assert_eq!(s.sample(&[3.0, 1.5], &[0, 0, 0]), 0);
        assert_eq!(s.sample(&[2.4, 1.5], &[0]), 1);
        // After the repetition penalty: 3 / 2 - 2 · 0.5 - 0.25 = 0.25.
        let mut s = with(0.5, 0.25, 2.0);
        assert_eq!(s.sample(&[3.0, 0.3], &[0, 0]), 1);
        assert_eq!(s.sample(&[3.0, 0.2], &[0, 0]), 0);
        // Negative penalties favour what was seen: 1 + 1 = 2 > 1.5.
        assert_eq!(with(-1.0, 0.0, 1.0).sample(&[1.0, 1.5], &[0]), 0);
        assert_eq!(with(0.1, 0.0, 1.0).params().top_read(), None);
        assert_eq!(with(0.0, 0.1, 1.0).params().top_read(), None);
        assert!(with(0.0, 0.0, 1.0).params().top_read().is_some());
    }

    #[test]
    fn frequencies_match_softmax() {
        let logits = [1.0f32, 0.0, 2.0, -1.0, 0.5, 1.5];
        let (max, lse) = log_sum_exp(&logits);
        let probs: Vec<f64> = logits
            .iter()
            .map(|&l| f64::from(log_prob(l, max, lse)).exp())
            .collect();
        let mut s = Sampler::new(no_filters(1.0, 11));
        let n = 20_000;
        let mut counts = [0usize; 6];
        for _ in 0..n {
            counts[s.sample(&logits, &[]) as usize] += 1;
        }
        for (c, p) in counts.iter().zip(&probs) {
            let f = *c as f64 / n as f64;
            assert!((f - p).abs() < 0.01 + 0.03 * p, "freq {f} vs p {p}");
        }
        // Temperature 2 flattens: p ∝ exp(l / 2).
        let mut s = Sampler::new(no_filters(2.0, 12));
        let mut c0 = 0;
        let mut c3 = 0;
        for _ in 0..n {
            match s.sample(&logits, &[]) {
                2 => c0 += 1,
                3 => c3 += 1,
                _ => {}
            }
        }
        let ratio = c0 as f64 / c3 as f64;
        assert!((ratio / 1.5f64.exp() - 1.0).abs() < 0.1, "ratio {ratio}");
    }

    #[test]
    fn non_finite_logits_do_not_panic() {
        let mut s = Sampler::new(SamplingParams::default());
        let nan = [f32::NAN, 1.0, f32::NAN];
        for _ in 0..20 {
            assert_eq!(s.sample(&nan, &[]), 1);
        }
        let inf = [0.0, f32::INFINITY, 3.0, f32::INFINITY];
        let got = support(no_filters(1.0, 5), &inf, &[]);
        assert_eq!(got, [1, 3]);
        let mut s = Sampler::new(SamplingParams::default());
        for _ in 0..20 {
            assert!([1, 3].contains(&s.sample(&inf, &[])));
        }
        let all_bad = [f32::NAN, f32::NEG_INFINITY, f32::NAN];
        assert_eq!(support(no_filters(1.0, 6), &all_bad, &[]), [0, 1, 2]);
        assert!(Sampler::new(SamplingParams::default()).sample(&all_bad, &[]) < 3);
        assert_eq!(
            Sampler::new(SamplingParams::greedy()).sample(&all_bad, &[]),
            0
        );
        assert_eq!(Sampler::new(SamplingParams::default()).sample(&[], &[]), 0);
        let mut tiny = Sampler::new(SamplingParams {
            temperature: 1e-30,
            ..SamplingParams::default()
        });
        assert_eq!(tiny.sample(&[1.0, 1.0001, 0.5], &[]), 1);
    }

    #[test]
    fn logprobs_are_normalized_and_sorted() {
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect();
        let all = top_logprobs(&logits, logits.len());
        let total: f64 = all.iter().map(|&(_, lp)| f64::from(lp).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        assert!(all.windows(2).all(|w| w[0].1 >= w[1].1));
        let top = top_logprobs(&logits, 5);
        assert_eq!(top.len(), 5);
        assert_eq!(top[..], all[..5]);
        for &(id, lp) in &top {
            assert_eq!(logprob_of(&logits, id), lp);
        }
        let ids: Vec<u32> = (0..1000).collect();
        let each = log_softmax_at(&logits, &ids);
        let total: f64 = each.iter().map(|&lp| f64::from(lp).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        // Large logits do not overflow: log-softmax is shift invariant.
        let shifted: Vec<f32> = logits.iter().map(|l| l + 1e4).collect();
        assert!((logprob_of(&shifted, 3) - logprob_of(&logits, 3)).abs() < 1e-2);
        assert_eq!(logprob_of(&logits, 5000), f32::NEG_INFINITY);
        assert!(top_logprobs(&[], 3).is_empty());
        let two = top_logprobs(&[0.0, 0.0], 2);
        assert_eq!(two[0].0, 0);
        assert!((two[0].1 - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(logprob_of(&[f32::NAN, 0.0], 0), f32::NEG_INFINITY);
    }

    #[test]
    fn top_k_is_the_first_k_of_the_full_order() {
        // Ties (logits from 12 values), NaN, -0.0 and infinities, over several blocks.
        let mut x = 1u64;
        let logits: Vec<f32> = (0..1000)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                match (i % 97, x >> 60) {
                    (5, _) => f32::NAN,
                    (6, _) => -0.0,
                    (7, _) if i < 200 => f32::NEG_INFINITY,
                    (8, _) if i > 900 => f32::INFINITY,
                    (_, v) => v as f32 * 0.5 - 2.0,
                }
            })
            .collect();
        let mut full: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, clean(l)))
            .collect();
        full.sort_unstable_by(by_logit_desc);
        let mut out = Vec::new();
        // Both ways: one pass up to 256, a partition above.
        for k in [1, 2, 3, 40, 64, 65, 256, 257, 999, 1000, 1200] {
            top_k(&logits, k, &mut out);
            let n = k.min(logits.len());
            assert_eq!(out.len(), n);
            for (a, b) in out.iter().zip(&full[..n]) {
                assert!(
                    a.0 == b.0 && a.1.to_bits() == b.1.to_bits(),
                    "k {k}: {a:?} {b:?}"
                );
            }
        }
    }
}
