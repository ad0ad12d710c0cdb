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
//!   a position the query does not see, and for the padding queries);
//! - a block of up to [`KEYS_AT_ONCE`] keys one after another (converted to f32 there from an f16
//!   cache) while their scores are computed.
//!
//! The cache is read through [`Cache`]: keys and values stored as f32 or f16 ([`KvValue`]; f16 is
//! converted to f32 as it is read, a vector at a time by the level's conversion instruction where
//! the kernel loads lanes, so the sums are the same f32 sums over the converted values),
//! position `j`'s rows found through a page table (contiguous rows are the one-page case), once per
//! call: a division per position and pass cost as much as the multiply-adds at 2048 positions.
//!
//! The products run on [`Lanes`] vectors, in tiles whose sums stay in registers: `q·k` with lanes
//! across queries (each key value broadcast; a block of keys against one or two query vectors),
//! the weighted sum with lanes across dimensions (each weight broadcast; up to
//! [`QUERIES_AT_ONCE`] queries by two vectors of dimensions), [`VALUE_BLOCK`] positions at a time
//! so that the block's values serve every tile from the L1 cache. A block of rows reads each
//! cached key and value once for all its queries, which keeps a long prefill out of the cache
//! bandwidth limit. A decode row at AVX-512 (a few queries: a quarter of a vector) computes its
//! `q·k` with lanes across 16 keys instead, transposed in registers (`across_keys`), in the same
//! order of terms.

pub mod rope;

use crate::Error;
use crate::isa::{Isa, prefetch_l2, prefetch_lines};
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
    /// `src` as what it is, for the kernels' loads.
    fn stored(src: &[Self]) -> Stored<'_>;

    /// Stores `src` in `dst` (of the same length), f16 rounded to nearest.
    fn store(src: &[f32], dst: &mut [Self]);

    /// `src` as f32 in `dst` (of the same length).
    fn widen(src: &[Self], dst: &mut [f32]);
}

/// Stored keys or values of either type.
pub enum Stored<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

/// The first `L::LANES` values of `src` as f32 lanes (f16 converted by the level's instruction,
/// exactly).
#[inline(always)]
fn load<L: Lanes, E: KvValue>(lanes: L, src: &[E]) -> L::V {
    match E::stored(src) {
        Stored::F32(s) => lanes.load(s),
        Stored::F16(s) => lanes.load_f16(s),
    }
}

impl KvValue for f32 {
    #[inline(always)]
    fn stored(src: &[f32]) -> Stored<'_> {
        Stored::F32(src)
    }

    fn store(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    #[inline(always)]
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl KvValue for half::f16 {
    #[inline(always)]
    fn stored(src: &[half::f16]) -> Stored<'_> {
        Stored::F16(src)
    }

    fn store(src: &[f32], dst: &mut [half::f16]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }

    #[inline(always)]
    fn widen(src: &[half::f16], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
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
/// copied keys (the layouts in the module documentation), where each position's key and value
/// start (found through the page table once per call, not once per pass over them), and where each
/// query's output starts.
#[derive(Debug, Default)]
pub struct Scratch {
    values: Vec<f32>,
    starts: Vec<usize>,
    outs: Vec<usize>,
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
    let Scratch {
        values,
        starts,
        outs,
    } = scratch;
    starts.clear();
    let (n, page_size) = (geometry.max_keys(), cache.page_size);
    for (p, &page) in cache.pages.iter().enumerate().take(n.div_ceil(page_size)) {
        let first = page as usize * cache.page_stride;
        let rows = page_size.min(n - p * page_size);
        starts.extend((0..rows).map(|r| first + r * geometry.kv_stride));
    }
    outs.clear();
    for r in 0..geometry.rows {
        let row = r * geometry.out_stride;
        outs.extend((0..geometry.group).map(|h| row + h * geometry.head_dim));
    }
    let data = Data {
        g: geometry,
        queries,
        cache: *cache,
        starts,
        outs,
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
/// each query vector loaded once for all of them) where the level has 32 vector registers; half
/// as many with 16.
const KEYS_AT_ONCE: usize = 8;

/// Queries whose weighted value sums [`attend`] accumulates together (each value vector loaded once
/// for all of them); half as many for a block of at most that many (a decode row of 4 heads) and
/// on levels with 16 vector registers.
const QUERIES_AT_ONCE: usize = 8;

/// Cached positions whose values [`attend`] adds to every query's sums before moving on: their
/// values (16 KiB at head dimension 128) and weights stay in the L1 cache while every tile of
/// queries and dimensions reads them, instead of coming from further out once per tile.
const VALUE_BLOCK: usize = 32;

/// How far below a query's largest score a position's score may lie and still get a weight: the
/// others get exactly 0. Their weights would be below `e⁻⁴⁰ ≈ 2⁻⁵⁷` of the largest, so all of them
/// together (at most `2¹⁶` positions) change the output by less than `2⁻⁴¹` of the largest value's
/// magnitude, far below f32's precision; kept, such weights (down to `e⁻⁸⁷`, where [`exp`] clamps)
/// times the values are subnormal floats, which x86 cores multiply and add about a hundred times
/// slower: a prompt of 2048 tokens with peaked attention spent most of its time there.
pub const SOFTMAX_CUTOFF: f32 = -40.0;

/// The checked inputs of [`attend`], and the scratch rows' length `P`.
#[derive(Clone, Copy)]
struct Data<'a, E> {
    g: &'a HeadGroup,
    queries: &'a [f32],
    cache: Cache<'a, E>,
    /// Where position `j`'s key and value start in the cache.
    starts: &'a [usize],
    /// Where query `q = r · group + h`'s output starts in `out`.
    outs: &'a [usize],
    /// `P`, a multiple of the vector width and of [`QUERIES_AT_ONCE`] (set by [`run`]).
    padded: usize,
}

impl<E: KvValue> Data<'_, E> {
    /// Position `j`'s key (its `head_dim` values).
    #[inline(always)]
    fn key(&self, j: usize) -> &[E] {
        &self.cache.keys[self.starts[j]..][..self.g.head_dim]
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
    // Transposed queries, scores, and a block of [`KEYS_AT_ONCE`] keys as f32.
    let needed = padded * (g.head_dim + g.max_keys()) + KEYS_AT_ONCE * g.head_dim;
    if scratch.len() < needed {
        scratch.resize(needed, 0.0);
    }
    let (transposed, rest) = scratch[..needed].split_at_mut(padded * g.head_dim);
    let (scores, converted) = rest.split_at_mut(padded * g.max_keys());
    isa.vectorized(
        #[inline(always)]
        || {
            if g.rows == 1 {
                // A decode row reads each value once, after its scores: asked for now, the values
                // arrive while the keys are read (measured: a 16-sequence server step's attention
                // ~8-10 % faster at 65-130 positions, f32 and f16).
                for &start in &data.starts[..g.max_keys()] {
                    prefetch_lines(&data.cache.values[start..][..g.head_dim], prefetch_l2);
                }
            }
            transpose_queries(data, transposed);
            #[cfg(target_arch = "x86_64")]
            match across_keys::lanes(isa, data.g) {
                // SAFETY: the token exists only where the CPU has the AVX-512 level; `lanes`
                // gives it only where the block fits.
                Some(wide) => unsafe { across_keys::scores(wide, data, transposed, scores) },
                None => scores_of(lanes, data, transposed, scores, converted),
            }
            #[cfg(not(target_arch = "x86_64"))]
            scores_of(lanes, data, transposed, scores, converted);
            softmax(data, scores);
            weighted_values(lanes, data, scores, out);
        },
    )
}

#[inline(always)]
fn transpose_queries<E: KvValue>(data: &Data<'_, E>, transposed: &mut [f32]) {
    let (g, padded) = (data.g, data.padded);
    for r in 0..g.rows {
        for h in 0..g.group {
            let query = &data.queries[r * g.query_stride + h * g.head_dim..][..g.head_dim];
            for (i, &x) in query.iter().enumerate() {
                transposed[i * padded + r * g.group + h] = x;
            }
        }
    }
    for dim in transposed.chunks_exact_mut(padded) {
        dim[g.queries()..].fill(0.0);
    }
}

/// `scores[j · P + q] = (Σ_i q_i · k_j,i) · (1 / √d)` for every position up to the block's last.
///
/// `K` keys at a time (8 where the registers hold 16 sums and two query vectors, else 4), copied
/// one after another into `block` (and converted to f32 there from an f16 cache): one pointer
/// reaches them all, and at the head dimensions of the models users run (64, 128) the offsets are
/// constants, so the loop holds its sums in registers instead of spilling key pointers. Each
/// block's sums run over tiles of two query vectors (one for the rest).
#[inline(always)]
fn scores_of<L: Lanes, E: KvValue>(
    lanes: L,
    data: &Data<'_, E>,
    transposed: &[f32],
    scores: &mut [f32],
    block: &mut [f32],
) {
    if L::REGISTERS >= 32 {
        key_blocks::<L, E, KEYS_AT_ONCE>(lanes, data, transposed, scores, block);
    } else {
        key_blocks::<L, E, { KEYS_AT_ONCE / 2 }>(lanes, data, transposed, scores, block);
    }
}

/// [`scores_of`] with `K` keys a block.
#[inline(always)]
fn key_blocks<L: Lanes, E: KvValue, const K: usize>(
    lanes: L,
    data: &Data<'_, E>,
    transposed: &[f32],
    scores: &mut [f32],
    block: &mut [f32],
) {
    match data.g.head_dim {
        64 => key_blocks_of::<L, E, K>(lanes, data, 64, transposed, scores, block),
        128 => key_blocks_of::<L, E, K>(lanes, data, 128, transposed, scores, block),
        d => key_blocks_of::<L, E, K>(lanes, data, d, transposed, scores, block),
    }
}

/// [`key_blocks`] with `d` the head dimension.
#[inline(always)]
fn key_blocks_of<L: Lanes, E: KvValue, const K: usize>(
    lanes: L,
    data: &Data<'_, E>,
    d: usize,
    transposed: &[f32],
    scores: &mut [f32],
    block: &mut [f32],
) {
    let (padded, n_keys) = (data.padded, data.g.max_keys());
    let pair = 2 * L::LANES;
    let paired = padded / pair * pair;
    let block = &mut block[..K * d];
    for j0 in (0..n_keys).step_by(K) {
        // Past the last position the block repeats it; those sums are not stored.
        for (k, key) in block.chunks_exact_mut(d).enumerate() {
            E::widen(data.key((j0 + k).min(n_keys - 1)), key);
        }
        let stored = K.min(n_keys - j0);
        let scores = &mut scores[j0 * padded..];
        for l0 in (0..paired).step_by(pair) {
            score_tile::<L, 2, K>(lanes, block, transposed, padded, l0, stored, scores);
        }
        for l0 in (paired..padded).step_by(L::LANES) {
            score_tile::<L, 1, K>(lanes, block, transposed, padded, l0, stored, scores);
        }
    }
}

/// The sums of `QV` query vectors from `l0` with each of the `K` keys in `keys` (one after another),
/// held in registers while the dimensions run, scaled into rows `0..stored` of `scores`.
#[inline(always)]
fn score_tile<L: Lanes, const QV: usize, const K: usize>(
    lanes: L,
    keys: &[f32],
    transposed: &[f32],
    padded: usize,
    l0: usize,
    stored: usize,
    scores: &mut [f32],
) {
    let d = keys.len() / K;
    let mut sums = [[lanes.splat(0.0); K]; QV];
    for i in 0..d {
        let row = &transposed[i * padded + l0..][..QV * L::LANES];
        let q: [L::V; QV] = std::array::from_fn(|v| lanes.load(&row[v * L::LANES..]));
        for k in 0..K {
            let b = lanes.splat(keys[k * d + i]);
            for v in 0..QV {
                sums[v][k] = lanes.mul_add(b, q[v], sums[v][k]);
            }
        }
    }
    let inv_sqrt_d = lanes.splat(1.0 / (d as f32).sqrt());
    for (k, row) in scores.chunks_mut(padded).take(stored).enumerate() {
        for (v, sum) in sums.iter().enumerate() {
            lanes.store(lanes.mul(sum[k], inv_sqrt_d), &mut row[l0 + v * L::LANES..]);
        }
    }
}

/// [`scores_of`] for a decode row at the AVX-512 level, with lanes across keys instead of queries:
/// a row's few queries (4 heads of a kv head of 2B-4T) would fill a quarter of a 16-lane vector,
/// and each key value would be broadcast for them. Here 16 keys at a time are transposed in
/// registers (16 × 16 blocks of keys × dimensions), and each dimension's vector of 16 keys is
/// multiplied by each query's value of that dimension, broadcast. Every score is still the sum
/// over the dimensions in order from 0.0, one fused multiply-add a term, times `1 / √d`: the bits
/// of [`scores_of`].
#[cfg(target_arch = "x86_64")]
mod across_keys {
    use super::{Data, HeadGroup, KvValue, load};
    use crate::isa::Isa;
    use crate::lanes::{Avx512, Lanes, transpose_16x16};
    use std::arch::x86_64::*;

    /// Keys a block: AVX-512's lanes.
    const MAX_LANES: usize = Avx512::LANES;

    /// Whether [`scores`] takes this block: one row, a group of 1, 2, 4 or 8 heads, and a head
    /// dimension of whole 16 × 16 blocks.
    fn fits(g: &HeadGroup) -> bool {
        g.rows == 1 && matches!(g.group, 1 | 2 | 4 | 8) && g.head_dim.is_multiple_of(MAX_LANES)
    }

    /// The AVX-512 lanes [`scores`] runs on, where `isa` is that level and the block [`fits`].
    pub(super) fn lanes(isa: Isa, g: &HeadGroup) -> Option<Avx512> {
        (isa == Isa::Avx512 && fits(g))
            .then(Avx512::new)
            .and_then(Result::ok)
    }

    /// `scores[j · P + h] = (Σ_i q_h,i · k_j,i) · (1 / √d)` for the row's heads `h` and every
    /// position `j` (the padding queries' scores are left as they are: [`super::softmax`] gives
    /// them weight 0).
    ///
    /// # Safety
    /// The CPU has AVX-512 F; `data.g` [`fits`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores<E: KvValue>(
        lanes: Avx512,
        data: &Data<'_, E>,
        transposed: &[f32],
        scores: &mut [f32],
    ) {
        match data.g.group {
            1 => heads::<E, 1>(lanes, data, transposed, scores),
            2 => heads::<E, 2>(lanes, data, transposed, scores),
            4 => heads::<E, 4>(lanes, data, transposed, scores),
            _ => heads::<E, 8>(lanes, data, transposed, scores),
        }
    }

    /// [`scores`] for `G` heads.
    #[target_feature(enable = "avx512f")]
    fn heads<E: KvValue, const G: usize>(
        lanes: Avx512,
        data: &Data<'_, E>,
        transposed: &[f32],
        scores: &mut [f32],
    ) {
        let (padded, n_keys, d) = (data.padded, data.g.max_keys(), data.g.head_dim);
        assert!(
            data.g.group == G
                && d.is_multiple_of(MAX_LANES)
                && G <= padded
                && transposed.len() >= d * padded
                && scores.len() >= n_keys * padded
        );
        let inv_sqrt_d = _mm512_set1_ps(1.0 / (d as f32).sqrt());
        for j0 in (0..n_keys).step_by(MAX_LANES) {
            // Past the last position the block repeats it; those sums are not stored.
            let keys: [&[E]; MAX_LANES] =
                std::array::from_fn(|k| data.key((j0 + k).min(n_keys - 1)));
            let mut sums = [_mm512_setzero_ps(); G];
            for i0 in (0..d).step_by(MAX_LANES) {
                let rows: [__m512; MAX_LANES] =
                    std::array::from_fn(|k| load(lanes, &keys[k][i0..]));
                // dims[c]: dimension i0 + c of the 16 keys.
                let dims = transpose_16x16(rows);
                for (c, keys) in dims.iter().enumerate() {
                    let q = &transposed[(i0 + c) * padded..][..G];
                    for (sum, &q) in sums.iter_mut().zip(q) {
                        *sum = _mm512_fmadd_ps(_mm512_set1_ps(q), *keys, *sum);
                    }
                }
            }
            let stored = MAX_LANES.min(n_keys - j0);
            let mut heads = [[0f32; MAX_LANES]; G];
            for (h, sum) in heads.iter_mut().zip(sums) {
                // SAFETY: 16 writable f32.
                unsafe { _mm512_storeu_ps(h.as_mut_ptr(), _mm512_mul_ps(sum, inv_sqrt_d)) };
            }
            for (k, row) in scores[j0 * padded..]
                .chunks_mut(padded)
                .take(stored)
                .enumerate()
            {
                for (s, h) in row.iter_mut().zip(&heads) {
                    *s = h[k];
                }
            }
        }
    }
}

/// Scores to weights: softmax per query over the positions it sees; the rest, the positions below
/// [`SOFTMAX_CUTOFF`] (and the padding queries) get weight exactly 0. Queries a vector at a time
/// (64 where `P` allows, down to 8), so every pass over a position's scores is one loop over
/// contiguous lanes with its maxima and sums in registers, and a block's passes walk the scores
/// in order. The positions every query of a pass sees (the first row's, in a block of rows) need
/// no mask.
#[inline(always)]
fn softmax<E: KvValue>(data: &Data<'_, E>, scores: &mut [f32]) {
    match data.padded {
        p if p.is_multiple_of(64) => softmax_columns::<E, 64>(data, scores),
        p if p.is_multiple_of(32) => softmax_columns::<E, 32>(data, scores),
        p if p.is_multiple_of(16) => softmax_columns::<E, 16>(data, scores),
        _ => softmax_columns::<E, 8>(data, scores),
    }
}

/// [`softmax`] for `C` queries at a time (`P` a multiple of `C`).
#[inline(always)]
fn softmax_columns<E: KvValue, const C: usize>(data: &Data<'_, E>, scores: &mut [f32]) {
    let (padded, n_queries) = (data.padded, data.g.queries());
    for c0 in (0..padded).step_by(C) {
        let seen: [u32; C] = std::array::from_fn(|c| {
            if c0 + c < n_queries {
                data.keys_seen(c0 + c) as u32
            } else {
                0
            }
        });
        // Positions below `all` are seen by every query of the pass: no mask there.
        let all = *seen.iter().min().expect("C > 0") as usize;
        let (prefix, tail) = scores.split_at_mut(all * padded);
        let pass = Pass { padded, c0, seen };
        let mut max = [f32::NEG_INFINITY; C];
        pass.max::<false>(prefix, 0, &mut max);
        pass.max::<true>(tail, all, &mut max);
        let mut sum = [0f64; C];
        pass.exp::<false>(prefix, 0, &max, &mut sum);
        pass.exp::<true>(tail, all, &max, &mut sum);
        let inv_sum = sum.map(|s| if s > 0.0 { (1.0 / s) as f32 } else { 0.0 });
        for row in scores.chunks_exact_mut(padded) {
            for (s, inv) in columns::<C>(row, c0).iter_mut().zip(&inv_sum) {
                *s *= inv;
            }
        }
    }
}

/// One [`softmax_columns`] pass's queries: `C` from `c0` in rows of `padded` scores, query `c0 + c`
/// seeing positions below `seen[c]`. Its loops run over rows of positions from `first`; with
/// `MASKED` they skip the positions a query does not see (without, every query sees them all).
struct Pass<const C: usize> {
    padded: usize,
    c0: usize,
    seen: [u32; C],
}

impl<const C: usize> Pass<C> {
    /// Raises `max` to each query's largest score. `m` takes `s` only when `s > m`: a NaN score
    /// never becomes the maximum (as with `f32::max`), and the comparison is one vector maximum.
    #[inline(always)]
    fn max<const MASKED: bool>(&self, rows: &mut [f32], first: usize, max: &mut [f32; C]) {
        // A local copy stays in registers; through the reference it went to memory every row.
        let mut local = *max;
        for (j, row) in (first..).zip(rows.chunks_exact_mut(self.padded)) {
            let scores = columns::<C>(row, self.c0);
            for ((m, &s), &n) in local.iter_mut().zip(scores.iter()).zip(&self.seen) {
                let sees = !MASKED || (j as u32) < n;
                *m = if sees && s > *m { s } else { *m };
            }
        }
        *max = local;
    }

    /// Scores to `exp(score − max)` (0.0 below [`SOFTMAX_CUTOFF`] and where the query does not
    /// see the position), added to each query's `sum`. A NaN score keeps its weight (NaN), so
    /// that it reaches the output (`x < cutoff` is false for it).
    #[inline(always)]
    fn exp<const MASKED: bool>(
        &self,
        rows: &mut [f32],
        first: usize,
        max: &[f32; C],
        sum: &mut [f64; C],
    ) {
        for (j, row) in (first..).zip(rows.chunks_exact_mut(self.padded)) {
            let scores = columns::<C>(row, self.c0);
            for ((s, &m), &n) in scores.iter_mut().zip(max).zip(&self.seen) {
                // `exp` before the choice: a select the loop vectorizes, not a branch around a
                // call.
                let (x, e) = (*s - m, exp(*s - m));
                let hidden = MASKED && (j as u32) >= n;
                *s = if hidden || x < SOFTMAX_CUTOFF { 0.0 } else { e };
            }
            // A loop of its own: in the one above, the f64 sums held the exponentials to half the
            // vector width.
            for (&s, total) in scores.iter().zip(sum.iter_mut()) {
                *total += f64::from(s);
            }
        }
    }
}

/// The `C` scores of a row of `P` from query `c0`.
#[inline(always)]
fn columns<const C: usize>(row: &mut [f32], c0: usize) -> &mut [f32; C] {
    (&mut row[c0..c0 + C])
        .try_into()
        .expect("P is a multiple of C")
}

/// `out_q = Σ_j w_q,j · v_j` for every query: [`VALUE_BLOCK`] positions at a time, each block's
/// values and weights read by every tile of queries and dimensions while they sit in the L1 cache
/// (the sums wait in `out` between blocks, so each still runs over the positions in order from
/// 0.0). A tile is `Q` queries by two vectors of dimensions, then one vector, then single lanes
/// over the rest; `Q` is 8 where the registers hold those 16 sums, else 4 (and 4 for a block of
/// at most 4 queries, a decode row).
#[inline(always)]
fn weighted_values<L: Lanes, E: KvValue>(
    lanes: L,
    data: &Data<'_, E>,
    scores: &[f32],
    out: &mut [f32],
) {
    let (d, n_queries) = (data.g.head_dim, data.g.queries());
    for q in 0..n_queries {
        out[data.outs[q]..][..d].fill(0.0);
    }
    let (pairs, whole) = (d / (2 * L::LANES) * 2 * L::LANES, d / L::LANES * L::LANES);
    for j0 in (0..data.keys_seen(n_queries - 1)).step_by(VALUE_BLOCK) {
        let block = j0..j0 + VALUE_BLOCK;
        if L::REGISTERS >= 32 && n_queries > QUERIES_AT_ONCE / 2 {
            value_tiles::<L, E, QUERIES_AT_ONCE, 2>(lanes, data, scores, &block, 0..pairs, out);
            value_tiles::<L, E, QUERIES_AT_ONCE, 1>(lanes, data, scores, &block, pairs..whole, out);
        } else {
            const Q: usize = QUERIES_AT_ONCE / 2;
            value_tiles::<L, E, Q, 2>(lanes, data, scores, &block, 0..pairs, out);
            value_tiles::<L, E, Q, 1>(lanes, data, scores, &block, pairs..whole, out);
        }
        value_tiles::<Scalar, E, QUERIES_AT_ONCE, 1>(Scalar, data, scores, &block, whole..d, out);
    }
}

/// [`weighted_values`] over the positions of `block` (those each tile's last query sees) and
/// `dims` (a multiple of `DV · L::LANES` long), `Q` queries by `DV` vectors of dimensions a tile:
/// the tile's sums loaded from `out`, held in registers over the positions, stored back.
#[inline(always)]
fn value_tiles<L: Lanes, E: KvValue, const Q: usize, const DV: usize>(
    lanes: L,
    data: &Data<'_, E>,
    scores: &[f32],
    block: &std::ops::Range<usize>,
    dims: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let (padded, n_queries) = (data.padded, data.g.queries());
    let width = DV * L::LANES;
    for i0 in dims.step_by(width) {
        for q0 in (0..n_queries).step_by(Q) {
            let last = (q0 + Q).min(n_queries) - 1;
            let end = block.end.min(data.keys_seen(last));
            if end <= block.start {
                continue;
            }
            let mut sums = [[lanes.splat(0.0); DV]; Q];
            for (q, sum) in (q0..=last).zip(&mut sums) {
                let at = data.outs[q] + i0;
                *sum = std::array::from_fn(|v| lanes.load(&out[at + v * L::LANES..]));
            }
            let weights = scores[block.start * padded..end * padded].chunks_exact(padded);
            for (&start, weights) in data.starts[block.start..end].iter().zip(weights) {
                let weights: &[f32; Q] = weights[q0..q0 + Q]
                    .try_into()
                    .expect("padded rows hold whole tiles");
                let v = &data.cache.values[start + i0..][..width];
                let v: [L::V; DV] = std::array::from_fn(|x| load(lanes, &v[x * L::LANES..]));
                for (sum, &w) in sums.iter_mut().zip(weights) {
                    let w = lanes.splat(w);
                    for (s, &v) in sum.iter_mut().zip(&v) {
                        *s = lanes.mul_add(w, v, *s);
                    }
                }
            }
            for (q, sum) in (q0..=last).zip(&sums) {
                let at = data.outs[q] + i0;
                for (v, &s) in sum.iter().enumerate() {
                    lanes.store(s, &mut out[at + v * L::LANES..]);
                }
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
        // remainder past them; 6 and 8 queries (the 8-lane vectors, passes of 8 queries); groups
        // of 1, 2 and 8 heads (the rows one at a time: AVX-512's lanes across keys).
        let cases = [(64, 4, 5), (20, 4, 5), (64, 3, 2), (20, 4, 2)];
        for (d, group, rows) in cases
            .into_iter()
            .chain([(32, 1, 3), (64, 2, 2), (48, 8, 2)])
        {
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
                    // The row alone with all its heads (a decode step).
                    let row = HeadGroup {
                        rows: 1,
                        first_keys: first_keys + r,
                        ..block
                    };
                    let mut alone = vec![0f32; group * d];
                    let cache = Cache::contiguous(&keys, &values);
                    let q = &queries[r * q_stride..][..group * d];
                    attend(isa, &row, q, &cache, &mut scratch, &mut alone).unwrap();
                    assert_eq!(
                        &out[r * out_stride..][..group * d],
                        &alone[..],
                        "{isa} d {d} row {r} alone"
                    );
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
        // A block of rows, and one row of whole 16 × 16 blocks (AVX-512's lanes across keys).
        for (d, rows) in [(40, 3), (48, 1)] {
            f16_cache_case(d, rows);
        }
    }

    fn f16_cache_case(d: usize, rows: usize) {
        use half::f16;
        let (group, first_keys, kv_stride) = (4, 29, 80);
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
