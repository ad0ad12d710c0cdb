//! The `attention` op: [`rope`] rotates each row's q and k, then causal grouped-query attention of
//! one kv head's queries over the cached positions (this module).
//!
//! For every query `q` (one query head of one row) over the `n` cached positions it sees:
//! `score_j = (Σ_i q_i · k_j,i) · (1 / √d)`, `w_j = exp(score_j − max) / Σ exp(· − max)` (the sum in
//! f64), `out = Σ_j w_j · v_j`, except that a position whose score lies more than
//! [`SOFTMAX_CUTOFF`] below the maximum gets weight exactly 0. Every sum over `i` and over `j` runs
//! sequentially from 0.0, each term added by a fused multiply-add (rounded once, on every level),
//! so a query's result does not depend on the level, on the block of rows it is computed with, or
//! on its place in that block: a prefill block gives the bits the decode steps would.
//!
//! Layouts (`HeadGroup` says where the caller's data sits) in the scratch buffer, `P` = the
//! block's queries rounded up to a multiple of the vector width and of [`QUERIES_AT_ONCE`]:
//! - `transposed[i · P + q]`: dimension `i` of query `q` (0.0 for the padding queries);
//! - `scores[j · P + q]`: query `q`'s score, then weight, for position `j` (weight exactly 0.0 for
//!   a position the query does not see, and for the padding queries).
//!
//! The cache is read through [`Cache`]: keys and values stored as f32 or f16 ([`KvValue`]; f16 is
//! converted to f32 as it is read, so the sums are the same f32 sums over the converted values),
//! position `j`'s rows found through a page table (contiguous rows are the one-page case), once per
//! call: a division per position and pass cost as much as the multiply-adds at 2048 positions.
//!
//! The products run on [`Lanes`] vectors: `q·k` with lanes across queries (each key value
//! broadcast, [`KEYS_AT_ONCE`] keys at a time), the weighted sum with lanes across dimensions
//! ([`QUERIES_AT_ONCE`] queries at a time, each weight broadcast). A block reads each cached key
//! and value once for all its queries, which keeps a long prefill out of the cache bandwidth limit.

pub mod rope;

use crate::Error;
use crate::isa::Isa;
use crate::lanes::{Lanes, Scalar};

/// Where one kv head's queries, keys, values and outputs sit for [`attend`].
///
/// `rows` consecutive positions of one sequence; the first sees `first_keys` cached positions
/// (itself included), each next one a position more. Row `r` has `group` query heads (the heads
/// sharing this kv head), head `h` at `queries[r · query_stride + h · head_dim ..][..head_dim]`,
/// its output at the same place in `out` with `out_stride`. Cached position `j`'s key and value
/// sit `kv_stride` after position `j − 1`'s within a page of the [`Cache`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadGroup {
    pub head_dim: usize,
    pub group: usize,
    pub rows: usize,
    pub first_keys: usize,
    pub query_stride: usize,
    pub out_stride: usize,
    pub kv_stride: usize,
}

impl HeadGroup {
    /// Queries of the block: `group` heads of each row.
    fn queries(&self) -> usize {
        self.rows * self.group
    }

    /// Cached positions the last row sees.
    fn max_keys(&self) -> usize {
        self.first_keys + self.rows - 1
    }

    fn check<E: KvValue>(&self, queries: usize, cache: &Cache<E>, out: usize) -> Result<(), Error> {
        let (d, heads) = (self.head_dim, self.group * self.head_dim);
        let span = |stride: usize, n: usize, width: usize| (n - 1) * stride + width;
        let fits = d > 0
            && self.group > 0
            && self.rows > 0
            && self.first_keys > 0
            && self.query_stride >= heads
            && self.out_stride >= heads
            && self.kv_stride >= d
            && queries >= span(self.query_stride, self.rows, heads)
            && out >= span(self.out_stride, self.rows, heads)
            && cache.holds(self.max_keys(), self.kv_stride, d);
        if fits {
            Ok(())
        } else {
            Err(Error::Shape(format!(
                "attention {self:?} does not fit {queries} query and {out} output values, or \
                 {} keys, {} values and {} pages of {} positions {} apart",
                cache.keys.len(),
                cache.values.len(),
                cache.pages.len(),
                cache.page_size,
                cache.page_stride
            )))
        }
    }
}

/// A stored key or value: f32, or f16 converted as it is read.
pub trait KvValue: Copy + Send + Sync + 'static {
    /// `src` as f32: `src` itself, or its values converted into the start of `buf` (at least as
    /// long as `src`).
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];

    /// Stores `src` in `dst` (of the same length), f16 rounded to nearest.
    fn store(src: &[f32], dst: &mut [Self]);
}

impl KvValue for f32 {
    #[inline(always)]
    fn as_f32<'a>(src: &'a [f32], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }

    fn store(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl KvValue for half::f16 {
    #[inline(always)]
    fn as_f32<'a>(src: &'a [half::f16], buf: &'a mut [f32]) -> &'a [f32] {
        use half::slice::HalfFloatSliceExt;
        let buf = &mut buf[..src.len()];
        src.convert_to_f32_slice(buf);
        buf
    }

    fn store(src: &[f32], dst: &mut [half::f16]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
}

/// One kv head's cached keys and values: position `j` of the sequence starts at
/// `pages[j / page_size] · page_stride + (j % page_size) · kv_stride` in `keys` and in `values`
/// (`kv_stride` from the [`HeadGroup`]).
#[derive(Clone, Copy, Debug)]
pub struct Cache<'a, E> {
    pub keys: &'a [E],
    pub values: &'a [E],
    /// The sequence's pages, in position order.
    pub pages: &'a [u32],
    pub page_size: usize,
    /// Distance between pages `p` and `p + 1` of the pool.
    pub page_stride: usize,
}

impl<'a, E: KvValue> Cache<'a, E> {
    /// Rows one after another from the start of `keys` and `values` (one page that never ends).
    pub fn contiguous(keys: &'a [E], values: &'a [E]) -> Self {
        Self {
            keys,
            values,
            pages: &[0],
            page_size: usize::MAX,
            page_stride: 0,
        }
    }

    /// Whether positions `0..n` (rows of `width` values `kv_stride` apart in a page) lie inside
    /// the keys and the values.
    fn holds(&self, n: usize, kv_stride: usize, width: usize) -> bool {
        let len = self.keys.len().min(self.values.len());
        if self.page_size == 0 || n.div_ceil(self.page_size) > self.pages.len() {
            return false;
        }
        (0..n.div_ceil(self.page_size)).all(|p| {
            let rows = self.page_size.min(n - p * self.page_size);
            (self.pages[p] as usize)
                .checked_mul(self.page_stride)
                .and_then(|start| start.checked_add((rows - 1).checked_mul(kv_stride)?))
                .and_then(|last| last.checked_add(width))
                .is_some_and(|end| end <= len)
        })
    }
}

/// What [`attend`] keeps between calls, grown as needed: the transposed queries, scores and
/// converted keys (the layouts in the module documentation), and where each position's key and
/// value start (found through the page table once per call, not once per pass over them).
#[derive(Debug, Default)]
pub struct Scratch {
    values: Vec<f32>,
    starts: Vec<usize>,
}

/// Causal attention `softmax(q·kᵀ / √d) · V` of every query of `geometry` over its cached
/// positions in `cache`, at `isa`.
pub fn attend<E: KvValue>(
    isa: Isa,
    geometry: &HeadGroup,
    queries: &[f32],
    cache: &Cache<'_, E>,
    scratch: &mut Scratch,
    out: &mut [f32],
) -> Result<(), Error> {
    geometry.check(queries.len(), cache, out.len())?;
    let Scratch { values, starts } = scratch;
    starts.clear();
    let (n, page_size) = (geometry.max_keys(), cache.page_size);
    for (p, &page) in cache.pages.iter().enumerate().take(n.div_ceil(page_size)) {
        let first = page as usize * cache.page_stride;
        let rows = page_size.min(n - p * page_size);
        starts.extend((0..rows).map(|r| first + r * geometry.kv_stride));
    }
    let data = Data {
        g: geometry,
        queries,
        cache: *cache,
        starts,
        padded: 0, // set by `run`, once the vector width is known
    };
    let scratch = values;
    match isa {
        // A block that fills no more than 8 lanes (a decode row) would leave half of a 16-lane
        // vector idle.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if geometry.queries() > 8 => {
            run(isa, crate::lanes::Avx512::new()?, &data, scratch, out)
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::AvxVnni | Isa::Avx2 => {
            run(isa, crate::lanes::Avx2::new()?, &data, scratch, out)
        }
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonDot => run(isa, crate::lanes::Neon::new()?, &data, scratch, out),
        _ => run(isa, Scalar, &data, scratch, out),
    }
}

/// Cached positions whose `q·k` sums [`attend`] accumulates together (independent sums in flight,
/// each query vector loaded once for all of them).
const KEYS_AT_ONCE: usize = 8;

/// Queries whose weighted value sums [`attend`] accumulates together (each value vector loaded once
/// for all of them); half as many for a block of at most that many (a decode row of 4 heads).
const QUERIES_AT_ONCE: usize = 8;

/// How far below a query's largest score a position's score may lie and still get a weight: the
/// others get exactly 0. Their weights would be below `e⁻⁴⁰ ≈ 2⁻⁵⁷` of the largest, so all of them
/// together (at most `2¹⁶` positions) change the output by less than `2⁻⁴¹` of the largest value's
/// magnitude, far below f32's precision; kept, such weights (down to `e⁻⁸⁷`, where [`exp`] clamps)
/// times the values are subnormal floats, which x86 cores multiply and add about a hundred times
/// slower: a prompt of 2048 tokens with peaked attention spent most of its time there.
pub const SOFTMAX_CUTOFF: f32 = -40.0;

/// Queries whose softmax [`attend`] computes together, so each pass over a position's scores is
/// one loop over contiguous lanes, which the compiler vectorizes.
const SOFTMAX_QUERIES: usize = 32;

/// The widest [`Lanes`] vector (AVX-512's 16 lanes): the buffer an f16 value vector is converted
/// into.
const MAX_LANES: usize = 16;

/// The checked inputs of [`attend`], and the scratch rows' length `P`.
#[derive(Clone, Copy)]
struct Data<'a, E> {
    g: &'a HeadGroup,
    queries: &'a [f32],
    cache: Cache<'a, E>,
    /// Where position `j`'s key and value start in the cache.
    starts: &'a [usize],
    /// `P`, a multiple of the vector width and of [`QUERIES_AT_ONCE`] (set by [`run`]).
    padded: usize,
}

impl<E: KvValue> Data<'_, E> {
    /// Position `j`'s key (its `head_dim` values).
    #[inline(always)]
    fn key(&self, j: usize) -> &[E] {
        &self.cache.keys[self.starts[j]..][..self.g.head_dim]
    }

    /// Position `j`'s value (its `head_dim` values).
    #[inline(always)]
    fn value(&self, j: usize) -> &[E] {
        &self.cache.values[self.starts[j]..][..self.g.head_dim]
    }

    /// Where query `q = r · group + h` starts in `queries`, and its output in `out`.
    fn query_at(&self, q: usize) -> usize {
        (q / self.g.group) * self.g.query_stride + (q % self.g.group) * self.g.head_dim
    }

    fn out_at(&self, q: usize) -> usize {
        (q / self.g.group) * self.g.out_stride + (q % self.g.group) * self.g.head_dim
    }

    /// Cached positions query `q` sees (`first_keys` for the first row's queries).
    fn keys_seen(&self, q: usize) -> usize {
        self.g.first_keys + q / self.g.group
    }
}

/// [`attend`] at `isa` with `lanes` (a token of `isa`'s or of a narrower level it includes).
fn run<L: Lanes, E: KvValue>(
    isa: Isa,
    lanes: L,
    data: &Data<'_, E>,
    scratch: &mut Vec<f32>,
    out: &mut [f32],
) -> Result<(), Error> {
    let g = data.g;
    let multiple = L::LANES.max(QUERIES_AT_ONCE);
    let padded = g.queries().div_ceil(multiple) * multiple;
    let data = &Data { padded, ..*data };
    // Transposed queries, scores, and [`KEYS_AT_ONCE`] keys converted to f32 (f16 caches).
    let needed = padded * (g.head_dim + g.max_keys()) + KEYS_AT_ONCE * g.head_dim;
    if scratch.len() < needed {
        scratch.resize(needed, 0.0);
    }
    let (transposed, rest) = scratch[..needed].split_at_mut(padded * g.head_dim);
    let (scores, converted) = rest.split_at_mut(padded * g.max_keys());
    isa.vectorized(
        #[inline(always)]
        || {
            transpose_queries(data, transposed);
            scores_of(lanes, data, transposed, scores, converted);
            softmax(data, scores);
            if g.queries() <= QUERIES_AT_ONCE / 2 {
                weighted_values::<L, E, { QUERIES_AT_ONCE / 2 }>(lanes, data, scores, out);
            } else {
                weighted_values::<L, E, QUERIES_AT_ONCE>(lanes, data, scores, out);
            }
        },
    )
}

#[inline(always)]
fn transpose_queries<E: KvValue>(data: &Data<'_, E>, transposed: &mut [f32]) {
    let n_queries = data.g.queries();
    for (i, dim) in transposed.chunks_exact_mut(data.padded).enumerate() {
        for (q, t) in dim.iter_mut().enumerate() {
            *t = if q < n_queries {
                data.queries[data.query_at(q) + i]
            } else {
                0.0
            };
        }
    }
}

/// `scores[j · P + q] = (Σ_i q_i · k_j,i) · (1 / √d)` for every position up to the block's last.
#[inline(always)]
fn scores_of<L: Lanes, E: KvValue>(
    lanes: L,
    data: &Data<'_, E>,
    transposed: &[f32],
    scores: &mut [f32],
    converted: &mut [f32],
) {
    let (g, padded) = (data.g, data.padded);
    let (d, n_keys) = (g.head_dim, g.max_keys());
    let inv_sqrt_d = lanes.splat(1.0 / (d as f32).sqrt());
    for j0 in (0..n_keys).step_by(KEYS_AT_ONCE) {
        // Past the last position the batch repeats it; those sums are not stored.
        let mut buffers = converted.chunks_exact_mut(d);
        let batch: [&[f32]; KEYS_AT_ONCE] = std::array::from_fn(|k| {
            let buf = buffers.next().expect("the scratch holds KEYS_AT_ONCE keys");
            E::as_f32(data.key((j0 + k).min(n_keys - 1)), buf)
        });
        let stored = KEYS_AT_ONCE.min(n_keys - j0);
        for l0 in (0..padded).step_by(L::LANES) {
            let mut sums = [lanes.splat(0.0); KEYS_AT_ONCE];
            for i in 0..d {
                let q = lanes.load(&transposed[i * padded + l0..]);
                for (sum, key) in sums.iter_mut().zip(&batch) {
                    *sum = lanes.mul_add(lanes.splat(key[i]), q, *sum);
                }
            }
            for (k, sum) in sums.iter().enumerate().take(stored) {
                lanes.store(
                    lanes.mul(*sum, inv_sqrt_d),
                    &mut scores[(j0 + k) * padded + l0..],
                );
            }
        }
    }
}

/// Scores to weights: softmax per query over the positions it sees; the rest, the positions below
/// [`SOFTMAX_CUTOFF`] (and the padding queries) get weight exactly 0.
#[inline(always)]
fn softmax<E: KvValue>(data: &Data<'_, E>, scores: &mut [f32]) {
    let (padded, n_queries) = (data.padded, data.g.queries());
    for c0 in (0..padded).step_by(SOFTMAX_QUERIES) {
        let cols = c0..padded.min(c0 + SOFTMAX_QUERIES);
        let mut seen = [0u32; SOFTMAX_QUERIES];
        for (q, s) in cols.clone().zip(&mut seen) {
            if q < n_queries {
                *s = data.keys_seen(q) as u32;
            }
        }
        let seen = &seen[..cols.len()];
        let mut max = [f32::NEG_INFINITY; SOFTMAX_QUERIES];
        for (j, row) in scores.chunks_exact(padded).enumerate() {
            for ((m, &s), &n) in max.iter_mut().zip(&row[cols.clone()]).zip(seen) {
                *m = if (j as u32) < n { m.max(s) } else { *m };
            }
        }
        let mut sum = [0f64; SOFTMAX_QUERIES];
        for (j, row) in scores.chunks_exact_mut(padded).enumerate() {
            let row = &mut row[cols.clone()];
            for (((s, &m), &n), total) in row.iter_mut().zip(&max).zip(seen).zip(&mut sum) {
                let x = *s - m;
                // A NaN score keeps its weight (NaN), so that it reaches the output.
                let kept = (j as u32) < n && (x >= SOFTMAX_CUTOFF || x.is_nan());
                *s = if kept { exp(x) } else { 0.0 };
                *total += f64::from(*s);
            }
        }
        let inv_sum = sum.map(|s| if s > 0.0 { (1.0 / s) as f32 } else { 0.0 });
        for row in scores.chunks_exact_mut(padded) {
            for (s, inv) in row[cols.clone()].iter_mut().zip(&inv_sum) {
                *s *= inv;
            }
        }
    }
}

/// `out_q = Σ_j w_q,j · v_j` for every query, `Q` queries at a time: vectors of `lanes` over the
/// head dimension, then single lanes over the rest.
#[inline(always)]
fn weighted_values<L: Lanes, E: KvValue, const Q: usize>(
    lanes: L,
    data: &Data<'_, E>,
    scores: &[f32],
    out: &mut [f32],
) {
    let d = data.g.head_dim;
    let whole = d / L::LANES * L::LANES;
    value_passes::<L, E, Q>(lanes, data, scores, 0..whole, out);
    value_passes::<Scalar, E, Q>(Scalar, data, scores, whole..d, out);
}

/// [`weighted_values`] over `dims` (a multiple of `L::LANES` long): a vector of dimensions and `Q`
/// queries at a time, held in registers over all the positions the last of them sees (the zero
/// weights of positions a query does not see add nothing). The query passes share a vector of
/// dimensions, which stays in the L1 cache between them.
#[inline(always)]
fn value_passes<L: Lanes, E: KvValue, const Q: usize>(
    lanes: L,
    data: &Data<'_, E>,
    scores: &[f32],
    dims: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let (g, padded) = (data.g, data.padded);
    let n_queries = g.queries();
    for i0 in dims.step_by(L::LANES) {
        for q0 in (0..n_queries).step_by(Q) {
            let last = (q0 + Q).min(n_queries) - 1;
            let weights = scores.chunks_exact(padded).map(|row| -> &[f32; Q] {
                row[q0..][..Q]
                    .try_into()
                    .expect("padded rows hold whole passes")
            });
            let mut sums = [lanes.splat(0.0); Q];
            let mut buf = [0f32; MAX_LANES];
            for (j, weights) in weights.enumerate().take(data.keys_seen(last)) {
                let v = lanes.load(E::as_f32(&data.value(j)[i0..i0 + L::LANES], &mut buf));
                for (sum, &w) in sums.iter_mut().zip(weights) {
                    *sum = lanes.mul_add(lanes.splat(w), v, *sum);
                }
            }
            for (q, sum) in (q0..=last).zip(sums) {
                lanes.store(sum, &mut out[data.out_at(q) + i0..]);
            }
        }
    }
}

/// `e^x` in f32 without branches or calls, so loops over it vectorize: `x = n·ln 2 + r` with
/// `|r| ≤ ln 2 / 2` (ln 2 split in two parts so `n·ln 2` is exact), a degree-7 Taylor polynomial
/// for `e^r` (truncation error below 2⁻²⁴ relative there), and `2^n` built in the exponent bits.
/// Within 2 ulp of the exact value; inputs are clamped to [-87, 88], where the result stays a
/// normal float (softmax only feeds it values from [`SOFTMAX_CUTOFF`] to 0).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75; // ln 2 rounded to 16 significant bits
    const LN2_LO: f32 = 1.428_606_8e-6; // ln 2 − LN2_HI
    // Adding 1.5 · 2²³ rounds to an integer (ties to even) held in the low mantissa bits, read
    // back without a float-to-int cast (Rust's saturating casts keep loops from vectorizing).
    const ROUNDER: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Horner form of Σ rᵏ/k!, k = 0..7.
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    let biased_exponent = shifted
        .to_bits()
        .wrapping_sub(ROUNDER.to_bits())
        .wrapping_add(127);
    p * f32::from_bits(biased_exponent << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported() -> impl Iterator<Item = Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_supported())
    }

    /// One query head over `n_keys` positions stored `stride` apart.
    fn single(d: usize, n_keys: usize, stride: usize) -> HeadGroup {
        HeadGroup {
            head_dim: d,
            group: 1,
            rows: 1,
            first_keys: n_keys,
            query_stride: d,
            out_stride: d,
            kv_stride: stride,
        }
    }

    #[test]
    fn attention_over_one_key_returns_its_value() {
        for isa in supported() {
            let (mut scores, mut out) = (Scratch::default(), [0f32; 2]);
            let (query, key, value) = ([1.0, 0.0], [0.5, 0.5], [3.0, -1.0]);
            attend(
                isa,
                &single(2, 1, 2),
                &query,
                &Cache::contiguous(&key, &value),
                &mut scores,
                &mut out,
            )
            .unwrap();
            assert_eq!(out, [3.0, -1.0]);
        }
    }

    #[test]
    fn attention_weights_follow_softmax() {
        // Two keys with scores 0 and ln(3)·√2/√2: weights 1/4 and 3/4.
        let d = 2.0f32;
        let k1 = 3f32.ln() * d.sqrt();
        let keys = [0.0, 0.0, k1, 0.0];
        let values = [4.0, 0.0, 0.0, 4.0];
        for isa in supported() {
            let (mut scores, mut out) = (Scratch::default(), [0f32; 2]);
            let g = single(2, 2, 2);
            attend(
                isa,
                &g,
                &[1.0, 0.0],
                &Cache::contiguous(&keys, &values),
                &mut scores,
                &mut out,
            )
            .unwrap();
            assert!((out[0] - 1.0).abs() < 1e-5 && (out[1] - 3.0).abs() < 1e-5);
        }
    }

    #[test]
    fn positions_far_below_the_largest_score_get_no_weight() {
        // Scores 0, −30 and −50 (keys along the first axis, d = 2): a huge third value would show
        // through a weight of e⁻⁵⁰, and the second one's e⁻³⁰ must still count.
        let d = 2.0f32;
        let keys = [0.0, 0.0, -30.0 * d.sqrt(), 0.0, -50.0 * d.sqrt(), 0.0];
        let values = [1.0, 0.0, 0.0, 1e20, 0.0, 1e30];
        for isa in supported() {
            let (mut scores, mut out) = (Scratch::default(), [0f32; 2]);
            let g = single(2, 3, 2);
            attend(
                isa,
                &g,
                &[1.0, 0.0],
                &Cache::contiguous(&keys, &values),
                &mut scores,
                &mut out,
            )
            .unwrap();
            let second = 1e20 * (-30f64).exp();
            assert!(
                (f64::from(out[1]) - second).abs() < 1e-5 * second,
                "{isa}: {out:?}"
            );
            let (mut scores, mut out) = (Scratch::default(), [0f32; 2]);
            let g = single(2, 3, 2);
            let keys = [0.0, 0.0, 0.0, 0.0, -50.0 * d.sqrt(), 0.0];
            let values = [1.0, 0.0, 3.0, 0.0, 0.0, 1e30];
            attend(
                isa,
                &g,
                &[1.0, 0.0],
                &Cache::contiguous(&keys, &values),
                &mut scores,
                &mut out,
            )
            .unwrap();
            assert_eq!(out, [2.0, 0.0], "{isa}");
        }
    }

    fn random_values(n: usize, seed: u64) -> Vec<f32> {
        let mut seed = seed;
        (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// A real head size and a cache longer than the lanes, against softmax in f64.
    #[test]
    fn attention_matches_an_f64_reference_at_every_isa() {
        let (d, stride, n_keys) = (128, 640, 301);
        let query: Vec<f32> = random_values(d, 5).iter().map(|q| q * 8.0).collect();
        let keys = random_values(n_keys * stride, 6);
        let values = random_values(n_keys * stride, 7);
        let scores: Vec<f64> = (0..n_keys)
            .map(|j| {
                let k = &keys[j * stride..j * stride + d];
                let dot: f64 = query.iter().zip(k).map(|(&q, &k)| f64::from(q * k)).sum();
                dot / (d as f64).sqrt()
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let expected: Vec<f64> = (0..d)
            .map(|i| {
                let v = (0..n_keys).map(|j| weights[j] * f64::from(values[j * stride + i]));
                v.sum::<f64>() / total
            })
            .collect();
        let mut first: Option<Vec<f32>> = None;
        for isa in supported() {
            let (mut scratch, mut out) = (Scratch::default(), vec![0f32; d]);
            let g = single(d, n_keys, stride);
            attend(
                isa,
                &g,
                &query,
                &Cache::contiguous(&keys, &values),
                &mut scratch,
                &mut out,
            )
            .unwrap();
            for (i, (&got, &want)) in out.iter().zip(&expected).enumerate() {
                assert!(
                    (f64::from(got) - want).abs() < 1e-5,
                    "{isa} dim {i}: {got} vs {want}"
                );
            }
            // The same bits at every level.
            assert_eq!(first.get_or_insert_with(|| out.clone()), &out, "{isa}");
        }
    }

    #[test]
    fn a_block_equals_its_queries_one_at_a_time_at_every_isa() {
        // 20 queries (16-lane vectors at AVX-512), head dimensions of whole vectors and with a
        // remainder past them; 6 and 8 queries (the 8-lane vectors, passes of 8 queries).
        for (d, group, rows) in [(64, 4, 5), (20, 4, 5), (64, 3, 2), (20, 4, 2)] {
            let first_keys = 40;
            let (q_stride, out_stride, kv_stride) = (group * d + 96, group * d + 32, 3 * d);
            let max_keys = first_keys + rows - 1;
            let queries = random_values(rows * q_stride, 11);
            let keys = random_values(max_keys * kv_stride, 12);
            let values = random_values(max_keys * kv_stride, 13);
            let block = HeadGroup {
                head_dim: d,
                group,
                rows,
                first_keys,
                query_stride: q_stride,
                out_stride,
                kv_stride,
            };
            let mut first: Option<Vec<f32>> = None;
            for isa in supported() {
                let (mut scratch, mut out) = (Scratch::default(), vec![7f32; rows * out_stride]);
                attend(
                    isa,
                    &block,
                    &queries,
                    &Cache::contiguous(&keys, &values),
                    &mut scratch,
                    &mut out,
                )
                .unwrap();
                for r in 0..rows {
                    for h in 0..group {
                        let q = &queries[r * q_stride + h * d..][..d];
                        let mut alone = vec![0f32; d];
                        let g = single(d, first_keys + r, kv_stride);
                        attend(
                            isa,
                            &g,
                            q,
                            &Cache::contiguous(&keys, &values),
                            &mut scratch,
                            &mut alone,
                        )
                        .unwrap();
                        assert_eq!(
                            &out[r * out_stride + h * d..][..d],
                            &alone[..],
                            "{isa} d {d} row {r} head {h}"
                        );
                    }
                    let gap = &out[r * out_stride + group * d..(r + 1) * out_stride];
                    assert!(gap.iter().all(|&v| v == 7.0));
                }
                assert_eq!(
                    first.get_or_insert_with(|| out.clone()),
                    &out,
                    "{isa} d {d}"
                );
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp_and_clamps() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            let ulp = want * f64::from(f32::EPSILON);
            assert!(
                (got - want).abs() <= 2.0 * ulp,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(f32::NEG_INFINITY) < 1e-37 && exp(1000.0).is_finite());
    }

    #[test]
    fn bad_shapes_are_errors() {
        let (query, mut scratch, mut out) = ([1.0, 0.0], Scratch::default(), [0f32; 2]);
        let cache = [0.0f32; 8];
        // Two cached positions in a cache of one; no cached position at all; a page past the
        // pool; positions past the pages given.
        let paged = |pages: &'static [u32], page_stride| Cache {
            keys: &cache[..],
            values: &cache[..],
            pages,
            page_size: 2,
            page_stride,
        };
        for (geometry, cache) in [
            (single(2, 2, 2), Cache::contiguous(&cache[..2], &cache[..2])),
            (single(2, 0, 2), Cache::contiguous(&cache[..4], &cache[..4])),
            (single(2, 2, 2), paged(&[2], 4)),
            (single(2, 3, 2), paged(&[1], 4)),
        ] {
            let err = attend(
                Isa::Scalar,
                &geometry,
                &query,
                &cache,
                &mut scratch,
                &mut out,
            )
            .unwrap_err();
            assert!(err.to_string().contains("attention"), "{err}");
        }
    }

    /// A sequence of many pages, placed in a shuffled order in a pool of pages with gaps, attends
    /// to the bits its contiguous copy gives, at every level, for a prefill block and a decode row.
    #[test]
    fn paged_cache_in_any_page_order_equals_the_contiguous_one() {
        let (d, group, kv_stride, page_size) = (64usize, 4, 3 * 64, 5usize);
        let (rows, first_keys) = (6usize, 37usize);
        let n = first_keys + rows - 1;
        let n_pages = n.div_ceil(page_size);
        // Pool pages hold page_size rows of kv_stride plus a gap; sequence page i sits at pool
        // page order[i].
        let page_stride = page_size * kv_stride + 7;
        let order: Vec<u32> = (0..n_pages as u32).map(|i| (i * 5 + 3) % 11).collect();
        assert!(n_pages <= 11 && order.iter().all(|&p| p < 11));
        let keys = random_values(n * kv_stride, 21);
        let values = random_values(n * kv_stride, 22);
        let mut pool_k = vec![f32::NAN; 11 * page_stride];
        let mut pool_v = vec![f32::NAN; 11 * page_stride];
        for j in 0..n {
            let at = order[j / page_size] as usize * page_stride + (j % page_size) * kv_stride;
            pool_k[at..at + kv_stride].copy_from_slice(&keys[j * kv_stride..][..kv_stride]);
            pool_v[at..at + kv_stride].copy_from_slice(&values[j * kv_stride..][..kv_stride]);
        }
        let paged = Cache {
            keys: &pool_k[..],
            values: &pool_v[..],
            pages: &order,
            page_size,
            page_stride,
        };
        for (rows, first_keys) in [(rows, first_keys), (1, n)] {
            let queries = random_values(rows * group * d, 23);
            let g = HeadGroup {
                head_dim: d,
                group,
                rows,
                first_keys,
                query_stride: group * d,
                out_stride: group * d,
                kv_stride,
            };
            for isa in supported() {
                let mut scratch = Scratch::default();
                let mut want = vec![0f32; rows * group * d];
                let contiguous = Cache::contiguous(&keys[..], &values[..]);
                attend(isa, &g, &queries, &contiguous, &mut scratch, &mut want).unwrap();
                let mut got = vec![0f32; rows * group * d];
                attend(isa, &g, &queries, &paged, &mut scratch, &mut got).unwrap();
                assert_eq!(got, want, "{isa} rows {rows}");
            }
        }
    }

    /// An f16 cache attends to the bits of an f32 cache holding the same (f16) values: only the
    /// storage differs.
    #[test]
    fn f16_cache_equals_f32_cache_of_the_same_values() {
        use half::f16;
        let (d, group, rows, first_keys, kv_stride) = (40, 4, 3, 29, 80);
        let n = first_keys + rows - 1;
        let halves = |seed| -> Vec<f16> {
            random_values(n * kv_stride, seed)
                .into_iter()
                .map(f16::from_f32)
                .collect()
        };
        let (keys16, values16) = (halves(31), halves(32));
        let widen = |v: &[f16]| -> Vec<f32> { v.iter().map(|x| x.to_f32()).collect() };
        let (keys32, values32) = (widen(&keys16), widen(&values16));
        let queries = random_values(rows * group * d, 33);
        let g = HeadGroup {
            head_dim: d,
            group,
            rows,
            first_keys,
            query_stride: group * d,
            out_stride: group * d,
            kv_stride,
        };
        for isa in supported() {
            let mut scratch = Scratch::default();
            let (mut want, mut got) = (vec![0f32; rows * group * d], vec![0f32; rows * group * d]);
            let wide = Cache::contiguous(&keys32[..], &values32[..]);
            attend(isa, &g, &queries, &wide, &mut scratch, &mut want).unwrap();
            let narrow = Cache::contiguous(&keys16[..], &values16[..]);
            attend(isa, &g, &queries, &narrow, &mut scratch, &mut got).unwrap();
            assert_eq!(got, want, "{isa}");
        }
    }
}
