//! Floating-point kernels of the transformer step, one row or one head at a time.
//!
//! Numerics follow the float32 reference implementation; the reductions that decide int8 codes
//! downstream (RMSNorm's sum of squares, softmax's sum) are accumulated in f64 so summation order
//! cannot move an activation across a rounding boundary.
//!
//! The output head ([`DenseView::dot_rows`], the largest weight of a small model) runs at an
//! [`Isa`]: one generic body over independent lanes, compiled once per `#[target_feature]` level so
//! the compiler vectorizes the widening (bf16 and f16 are widened exactly with integer operations)
//! and the multiply-adds. Levels differ from each other only in float summation order.

use crate::isa::{Isa, prefetch_lines};
use crate::{ShapeError, check_len};
use half::{bf16, f16};
use std::ops::Range;

/// `out = x * rsqrt(mean(x²) + eps) * weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<(), ShapeError> {
    check_len("rms_norm weight", weight.len(), x.len())?;
    check_len("rms_norm output", out.len(), x.len())?;
    let sum_sq = sum_f64(x.iter().map(|&v| f64::from(v) * f64::from(v)));
    let mean_sq = (sum_sq / x.len().max(1) as f64) as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (v * inv);
    }
    Ok(())
}

/// The rotary angles' cosines and sines at `position` for a head of `head_dim`:
/// `inv_freq[i] = 1 / theta^(2i / head_dim)`, angle `position * inv_freq[i]`, `i < head_dim / 2`.
pub fn rope_cos_sin(
    theta: f32,
    head_dim: usize,
    position: usize,
    cos: &mut [f32],
    sin: &mut [f32],
) -> Result<(), ShapeError> {
    let half = head_dim / 2;
    check_len("rope cos", cos.len(), half)?;
    check_len("rope sin", sin.len(), half)?;
    for i in 0..half {
        let inv_freq = 1.0 / theta.powf((2 * i) as f32 / head_dim as f32);
        let angle = position as f32 * inv_freq;
        cos[i] = angle.cos();
        sin[i] = angle.sin();
    }
    Ok(())
}

/// Rotate-half RoPE on one head vector in place: pairs `(i, i + d/2)`.
pub fn apply_rope(head: &mut [f32], cos: &[f32], sin: &[f32]) -> Result<(), ShapeError> {
    let half = cos.len();
    check_len("rope head", head.len(), 2 * half)?;
    check_len("rope sin", sin.len(), half)?;
    let (lo, hi) = head.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (lo[i], hi[i]);
        lo[i] = a * cos[i] - b * sin[i];
        hi[i] = b * cos[i] + a * sin[i];
    }
    Ok(())
}

/// Where one kv head's queries, keys, values and outputs sit for [`attend`].
///
/// `rows` consecutive positions of one sequence; the first sees `first_keys` cached positions
/// (itself included), each next one a position more. Row `r` has `group` query heads (the heads
/// sharing this kv head), head `h` at `queries[r · query_stride + h · head_dim ..][..head_dim]`,
/// its output at the same place in `out` with `out_stride`. Cached position `j`'s key and value
/// sit at `j · kv_stride ..][..head_dim]`.
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
    /// Cached positions the last row sees.
    fn max_keys(&self) -> usize {
        self.first_keys + self.rows - 1
    }

    fn check(
        &self,
        queries: usize,
        keys: usize,
        values: usize,
        out: usize,
    ) -> Result<(), ShapeError> {
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
            && keys >= span(self.kv_stride, self.max_keys(), d)
            && values >= span(self.kv_stride, self.max_keys(), d);
        if fits {
            Ok(())
        } else {
            Err(ShapeError(format!(
                "attention {self:?} does not fit {queries} query, {keys} key, {values} value and \
                 {out} output values"
            )))
        }
    }
}

/// Causal attention `softmax(q·kᵀ / √d) · V` of every query of `geometry` over its cached
/// positions, at `isa`. Each key and value is read once for all the block's queries (`group ×
/// rows` of them), which keeps a long prefill out of the cache bandwidth limit. `scratch` is
/// grown as needed.
///
/// The queries are processed in lanes of [`QUERY_LANES`]: a score is a plain sequential f32 sum
/// over the head dimension in every lane, so results do not depend on the level, the block, or a
/// query's lane.
pub fn attend(
    isa: Isa,
    geometry: &HeadGroup,
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    scratch: &mut Vec<f32>,
    out: &mut [f32],
) -> Result<(), ShapeError> {
    geometry.check(queries.len(), keys.len(), values.len(), out.len())?;
    let lanes = (geometry.rows * geometry.group).div_ceil(QUERY_LANES) * QUERY_LANES;
    let needed = lanes * (geometry.head_dim + geometry.max_keys());
    if scratch.len() < needed {
        scratch.resize(needed, 0.0);
    }
    let (transposed, scores) = scratch[..needed].split_at_mut(lanes * geometry.head_dim);
    isa.vectorized(
        #[inline(always)]
        || {
            let transposed = transposed.as_chunks_mut::<QUERY_LANES>().0;
            let scores = scores.as_chunks_mut::<QUERY_LANES>().0;
            attend_lanes(geometry, queries, keys, values, transposed, scores, out)
        },
    )
}

/// Queries processed side by side in [`attend`] (one AVX2 vector, half an AVX-512 one).
pub const QUERY_LANES: usize = 8;

/// [`attend`] after its checks. Query `q = r · group + h` is lane `q % QUERY_LANES` of lane group
/// `q / QUERY_LANES`; `transposed[lg · d + i]` holds dimension `i` of lane group `lg`'s queries,
/// `scores[j · lane_groups + lg]` their scores (then weights) for cached position `j`.
#[inline(always)]
fn attend_lanes(
    g: &HeadGroup,
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    transposed: &mut [[f32; QUERY_LANES]],
    scores: &mut [[f32; QUERY_LANES]],
    out: &mut [f32],
) {
    let (d, n_queries) = (g.head_dim, g.rows * g.group);
    let lane_groups = n_queries.div_ceil(QUERY_LANES);
    let inv_sqrt_d = 1.0 / (d as f32).sqrt();
    let query_at = |q: usize| (q / g.group) * g.query_stride + (q % g.group) * d;
    let out_at = |q: usize| (q / g.group) * g.out_stride + (q % g.group) * d;
    // Keys visible to each lane (0 for padding lanes).
    let visible = |lg: usize| -> [usize; QUERY_LANES] {
        std::array::from_fn(|l| {
            let q = lg * QUERY_LANES + l;
            if q < n_queries {
                g.first_keys + q / g.group
            } else {
                0
            }
        })
    };
    for (lg, dims) in transposed.chunks_exact_mut(d).enumerate() {
        for l in 0..QUERY_LANES {
            let q = lg * QUERY_LANES + l;
            for (i, dim) in dims.iter_mut().enumerate() {
                dim[l] = if q < n_queries {
                    queries[query_at(q) + i]
                } else {
                    0.0
                };
            }
        }
    }
    // Key-major: each key is loaded once and dotted with every lane of queries; KEYS_AT_ONCE keys
    // at a time give independent sums (each still sequential over the dimensions).
    for (j0, rows) in scores.chunks_mut(KEYS_AT_ONCE * lane_groups).enumerate() {
        let n = rows.len() / lane_groups;
        let key = |k: usize| &keys[(j0 * KEYS_AT_ONCE + k.min(n - 1)) * g.kv_stride..][..d];
        let batch: [&[f32]; KEYS_AT_ONCE] = std::array::from_fn(key);
        for (lg, dims) in transposed.chunks_exact(d).enumerate() {
            let mut acc = [[0f32; QUERY_LANES]; KEYS_AT_ONCE];
            for (i, dim) in dims.iter().enumerate() {
                for (acc, key) in acc.iter_mut().zip(&batch) {
                    let k = key[i];
                    for l in 0..QUERY_LANES {
                        acc[l] += k * dim[l];
                    }
                }
            }
            for (k, acc) in acc.iter().enumerate().take(n) {
                for l in 0..QUERY_LANES {
                    rows[k * lane_groups + lg][l] = acc[l] * inv_sqrt_d;
                }
            }
        }
    }
    // Softmax per lane over its visible keys; invisible ones get weight exactly 0.
    for lg in 0..lane_groups {
        let visible = visible(lg);
        let mut max = [f32::NEG_INFINITY; QUERY_LANES];
        let mut sum = [0f64; QUERY_LANES];
        for (j, row) in scores.chunks_exact(lane_groups).enumerate() {
            for l in 0..QUERY_LANES {
                if j < visible[l] {
                    max[l] = max[l].max(row[lg][l]);
                }
            }
        }
        for (j, row) in scores.chunks_exact_mut(lane_groups).enumerate() {
            for l in 0..QUERY_LANES {
                let p = if j < visible[l] {
                    exp(row[lg][l] - max[l])
                } else {
                    0.0
                };
                row[lg][l] = p;
                sum[l] += f64::from(p);
            }
        }
        let inv_sum: [f32; QUERY_LANES] = std::array::from_fn(|l| {
            if sum[l] > 0.0 {
                (1.0 / sum[l]) as f32
            } else {
                0.0
            }
        });
        for row in scores.chunks_exact_mut(lane_groups) {
            for l in 0..QUERY_LANES {
                row[lg][l] *= inv_sum[l];
            }
        }
    }
    for q in 0..n_queries {
        out[out_at(q)..][..d].fill(0.0);
    }
    // Every weight of a position a query does not see is exactly 0, and every value up to the
    // block's last position is written, so KEYS_AT_ONCE values are added per pass over an output
    // (in position order, as one at a time would).
    for (j0, rows) in scores.chunks(KEYS_AT_ONCE * lane_groups).enumerate() {
        let n = rows.len() / lane_groups;
        let value = |k: usize| &values[(j0 * KEYS_AT_ONCE + k.min(n - 1)) * g.kv_stride..][..d];
        let batch: [&[f32]; KEYS_AT_ONCE] = std::array::from_fn(value);
        for q in 0..n_queries {
            let w: [f32; KEYS_AT_ONCE] = std::array::from_fn(|k| {
                if k < n {
                    rows[k * lane_groups + q / QUERY_LANES][q % QUERY_LANES]
                } else {
                    0.0
                }
            });
            for (i, o) in out[out_at(q)..][..d].iter_mut().enumerate() {
                let mut sum = *o;
                for (w, value) in w.iter().zip(&batch) {
                    sum += w * value[i];
                }
                *o = sum;
            }
        }
    }
}

/// Cached positions [`attend`] handles per pass (independent sums in flight).
const KEYS_AT_ONCE: usize = 4;

/// `e^x` in f32 without branches or calls, so loops over it vectorize: `x = n·ln 2 + r` with
/// `|r| ≤ ln 2 / 2` (ln 2 split in two parts so `n·ln 2` is exact), a degree-7 Taylor polynomial
/// for `e^r` (truncation error below 2⁻²⁴ relative there), and `2^n` built in the exponent bits.
/// Within 2 ulp of the exact value; inputs are clamped to [-87, 88], where the result stays a
/// normal float (softmax only feeds it values ≤ 0, whose tails below e⁻⁸⁷ do not matter).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75; // ln 2 rounded to 16 significant bits
    const LN2_LO: f32 = 1.428_606_8e-6; // ln 2 − LN2_HI
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
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
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Lanes of independent partial results: enough for the compiler to vectorize reductions (two
/// AVX-512 vectors of f32).
const LANES: usize = 32;

/// The f64 sum of `values` over independent lanes (a fixed order, vectorizable).
#[inline(always)]
fn sum_f64(values: impl Iterator<Item = f64>) -> f64 {
    let mut acc = [0f64; 8];
    for (i, v) in values.enumerate() {
        acc[i % 8] += v;
    }
    acc.iter().sum()
}

/// The gate activation of a gated feed-forward block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateActivation {
    /// `relu(g)²` (BitNet b1.58 2B-4T).
    Relu2,
    /// `g · sigmoid(g)` (Llama-style SwiGLU).
    Silu,
}

/// `out[i] = act(gate[i]) * up[i]`.
pub fn gated(
    activation: GateActivation,
    gate: &[f32],
    up: &[f32],
    out: &mut [f32],
) -> Result<(), ShapeError> {
    check_len("gated up", up.len(), gate.len())?;
    check_len("gated output", out.len(), gate.len())?;
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let a = match activation {
            GateActivation::Relu2 => {
                let r = g.max(0.0);
                r * r
            }
            GateActivation::Silu => g / (1.0 + (-g).exp()),
        };
        *o = a * u;
    }
    Ok(())
}

/// A borrowed row-major matrix of full-precision values (embeddings, output heads).
#[derive(Clone, Copy, Debug)]
pub enum DenseView<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl DenseView<'_> {
    pub fn len(&self) -> usize {
        match self {
            DenseView::F32(v) => v.len(),
            DenseView::F16(v) => v.len(),
            DenseView::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies row `r` of a matrix with `cols` columns into `out` as f32.
    pub fn row_to_f32(&self, r: usize, cols: usize, out: &mut [f32]) -> Result<(), ShapeError> {
        check_len("dense row output", out.len(), cols)?;
        if (r + 1) * cols > self.len() {
            return Err(ShapeError(format!(
                "row {r} of {cols} columns is outside a matrix of {} values",
                self.len()
            )));
        }
        let range = r * cols..(r + 1) * cols;
        match self {
            DenseView::F32(v) => out.copy_from_slice(&v[range]),
            DenseView::F16(v) => out
                .iter_mut()
                .zip(&v[range])
                .for_each(|(o, h)| *o = h.to_f32()),
            DenseView::Bf16(v) => out
                .iter_mut()
                .zip(&v[range])
                .for_each(|(o, h)| *o = h.to_f32()),
        }
        Ok(())
    }

    /// `x · row r` for a matrix with `x.len()` columns.
    pub fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        let cols = x.len();
        let range = r * cols..(r + 1) * cols;
        match self {
            DenseView::F32(v) => dot_with(x, &v[range], |&w| w),
            DenseView::F16(v) => dot_with(x, &v[range], |h| h.to_f32()),
            DenseView::Bf16(v) => dot_with(x, &v[range], |h| {
                f32::from_bits(u32::from(h.to_bits()) << 16)
            }),
        }
    }
}

impl DenseView<'_> {
    /// `out[i · tokens + t] = x[t] · row (rows.start + i)` for a matrix of `cols` columns, with `x`
    /// holding `tokens` rows of `cols` values (output row-major by matrix row, so disjoint row
    /// ranges write disjoint slices).
    pub fn dot_rows(
        &self,
        isa: Isa,
        rows: Range<usize>,
        x: &[f32],
        cols: usize,
        out: &mut [f32],
    ) -> Result<(), ShapeError> {
        isa.check()?;
        let tokens = x.len().checked_div(cols).unwrap_or(0);
        check_len("dense dot activations", x.len(), tokens * cols)?;
        check_len("dense dot output", out.len(), rows.len() * tokens)?;
        if rows.start > rows.end || rows.end * cols > self.len() {
            return Err(ShapeError(format!(
                "rows {rows:?} of {cols} columns are outside a matrix of {} values",
                self.len()
            )));
        }
        let range = rows.start * cols..rows.end * cols;
        match self {
            DenseView::F32(v) => dot_rows_at(isa, &v[range], x, cols, out),
            DenseView::F16(v) => dot_rows_at(isa, &v[range], x, cols, out),
            DenseView::Bf16(v) => dot_rows_at(isa, &v[range], x, cols, out),
        }
    }

    /// `out[i] = x · row rows[i]` for a matrix of `x.len()` columns and rows listed in any order
    /// (the re-scoring of output-head candidates), the same sums as [`dot_rows`](Self::dot_rows).
    /// Scattered rows defeat the hardware prefetchers, so each row's lines are requested a few
    /// rows before it is read.
    pub fn dot_listed_rows(
        &self,
        isa: Isa,
        rows: &[usize],
        x: &[f32],
        out: &mut [f32],
    ) -> Result<(), ShapeError> {
        isa.check()?;
        check_len("listed dot output", out.len(), rows.len())?;
        let matrix_rows = self.len().checked_div(x.len()).unwrap_or(0);
        if let Some(&r) = rows.iter().find(|&&r| r >= matrix_rows) {
            return Err(ShapeError(format!(
                "row {r} is outside a matrix of {matrix_rows} rows of {} columns",
                x.len()
            )));
        }
        match self {
            DenseView::F32(v) => dot_listed_at(isa, v, rows, x, out),
            DenseView::F16(v) => dot_listed_at(isa, v, rows, x, out),
            DenseView::Bf16(v) => dot_listed_at(isa, v, rows, x, out),
        }
    }
}

/// Rows ahead of the one being read whose lines [`DenseView::dot_listed_rows`] requests.
const LISTED_ROWS_AHEAD: usize = 2;

/// See [`DenseView::dot_listed_rows`]; `dot_with` as in `dot_rows_lanes`, so the sums are the same.
fn dot_listed_at<T: Widen>(
    isa: Isa,
    matrix: &[T],
    rows: &[usize],
    x: &[f32],
    out: &mut [f32],
) -> Result<(), ShapeError> {
    let cols = x.len();
    let row = |r: usize| &matrix[r * cols..(r + 1) * cols];
    isa.vectorized(
        #[inline(always)]
        || {
            for (i, (&r, o)) in rows.iter().zip(out).enumerate() {
                if let Some(&ahead) = rows.get(i + LISTED_ROWS_AHEAD) {
                    prefetch_lines(row(ahead));
                }
                *o = dot_with(x, row(r), |v| v.widen());
            }
        },
    )
}

/// An element type the output head is stored in.
trait Widen: Copy {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

impl Widen for f16 {
    /// Exact and branch-free (so it vectorizes): the magnitude's bits moved into f32 position and
    /// multiplied by 2^112 rebias normals and subnormals alike; infinities and NaNs keep an
    /// all-ones exponent.
    #[inline(always)]
    fn widen(self) -> f32 {
        let h = u32::from(self.to_bits());
        let magnitude = (h & 0x7fff) << 13;
        let finite = f32::from_bits(magnitude) * f32::from_bits(0x7780_0000);
        let value = if magnitude >= 0x7c00 << 13 {
            magnitude | 0x7f80_0000
        } else {
            finite.to_bits()
        };
        f32::from_bits(value | ((h & 0x8000) << 16))
    }
}

fn dot_rows_at<T: Widen>(
    isa: Isa,
    rows: &[T],
    x: &[f32],
    cols: usize,
    out: &mut [f32],
) -> Result<(), ShapeError> {
    isa.vectorized(
        #[inline(always)]
        || dot_rows_lanes(rows, x, cols, out),
    )
}

/// Each matrix row is read once and dotted with every token while it is in L1.
#[inline(always)]
fn dot_rows_lanes<T: Widen>(rows: &[T], x: &[f32], cols: usize, out: &mut [f32]) {
    let tokens = out.len() / (rows.len() / cols.max(1)).max(1);
    for (row, o) in rows.chunks_exact(cols).zip(out.chunks_exact_mut(tokens)) {
        for (xt, o) in x.chunks_exact(cols).zip(o) {
            *o = dot_with(xt, row, |v| v.widen());
        }
    }
}

#[inline(always)]
fn dot_with<T>(a: &[f32], b: &[T], widen: impl Fn(&T) -> f32) -> f32 {
    let (a_lanes, a_tail) = a.as_chunks::<LANES>();
    let (b_lanes, b_tail) = b[..a.len()].as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for (ca, cb) in a_lanes.iter().zip(b_lanes) {
        for l in 0..LANES {
            acc[l] += ca[l] * widen(&cb[l]);
        }
    }
    // Pairwise halving: vector adds instead of a chain of LANES dependent scalar adds (this
    // dominates a 128-wide attention dot product).
    for width in [16, 8, 4, 2, 1] {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    let mut sum = acc[0];
    for (x, y) in a_tail.iter().zip(b_tail) {
        sum += x * widen(y);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_of_constant_row_is_weight() {
        let mut out = [0f32; 4];
        rms_norm(&[3.0; 4], &[1.0, 2.0, 3.0, 4.0], 0.0, &mut out).unwrap();
        for (o, w) in out.iter().zip([1.0, 2.0, 3.0, 4.0]) {
            assert!((o - w).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let (mut c, mut s) = ([0f32; 4], [0f32; 4]);
        rope_cos_sin(10000.0, 8, 0, &mut c, &mut s).unwrap();
        let mut head = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let orig = head;
        apply_rope(&mut head, &c, &s).unwrap();
        assert_eq!(head, orig);
        rope_cos_sin(10000.0, 8, 17, &mut c, &mut s).unwrap();
        apply_rope(&mut head, &c, &s).unwrap();
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = head.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3);
        // Pair (0, 4) rotates by angle 17 (inv_freq[0] = 1).
        assert!((head[0] - (1.0 * 17f32.cos() - 5.0 * 17f32.sin())).abs() < 1e-5);
    }

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
            let (mut scores, mut out) = (Vec::new(), [0f32; 2]);
            let (query, key, value) = ([1.0, 0.0], [0.5, 0.5], [3.0, -1.0]);
            attend(
                isa,
                &single(2, 1, 2),
                &query,
                &key,
                &value,
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
            let (mut scores, mut out) = (Vec::new(), [0f32; 2]);
            let g = single(2, 2, 2);
            attend(isa, &g, &[1.0, 0.0], &keys, &values, &mut scores, &mut out).unwrap();
            assert!((out[0] - 1.0).abs() < 1e-5 && (out[1] - 3.0).abs() < 1e-5);
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
            let (mut scratch, mut out) = (Vec::new(), vec![0f32; d]);
            let g = single(d, n_keys, stride);
            attend(isa, &g, &query, &keys, &values, &mut scratch, &mut out).unwrap();
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
    fn a_block_equals_its_queries_one_at_a_time() {
        let (d, group, rows, first_keys) = (64, 4, 5, 40);
        let (q_stride, out_stride, kv_stride) = (group * d + 96, group * d + 32, 3 * d);
        let max_keys = first_keys + rows - 1;
        let queries = random_values(rows * q_stride, 11);
        let keys = random_values(max_keys * kv_stride, 12);
        let values = random_values(max_keys * kv_stride, 13);
        for isa in supported() {
            let block = HeadGroup {
                head_dim: d,
                group,
                rows,
                first_keys,
                query_stride: q_stride,
                out_stride,
                kv_stride,
            };
            let (mut scratch, mut out) = (Vec::new(), vec![7f32; rows * out_stride]);
            attend(
                isa,
                &block,
                &queries,
                &keys,
                &values,
                &mut scratch,
                &mut out,
            )
            .unwrap();
            for r in 0..rows {
                for h in 0..group {
                    let q = &queries[r * q_stride + h * d..][..d];
                    let mut alone = vec![0f32; d];
                    let g = single(d, first_keys + r, kv_stride);
                    attend(isa, &g, q, &keys, &values, &mut scratch, &mut alone).unwrap();
                    assert_eq!(
                        &out[r * out_stride + h * d..][..d],
                        &alone[..],
                        "{isa} {r} {h}"
                    );
                }
                let gap = &out[r * out_stride + group * d..(r + 1) * out_stride];
                assert!(gap.iter().all(|&v| v == 7.0));
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
    fn gated_activations() {
        let mut out = [0f32; 3];
        gated(
            GateActivation::Relu2,
            &[-1.0, 2.0, 3.0],
            &[5.0, 0.5, -1.0],
            &mut out,
        )
        .unwrap();
        assert_eq!(out, [0.0, 2.0, -9.0]);
        gated(
            GateActivation::Silu,
            &[0.0, 0.0, 0.0],
            &[1.0, 1.0, 1.0],
            &mut out,
        )
        .unwrap();
        assert_eq!(out, [0.0, 0.0, 0.0]);
    }

    #[test]
    fn dense_dot_in_every_dtype() {
        let x: Vec<f32> = (0..19).map(|i| i as f32 * 0.25).collect();
        let row: Vec<f32> = (0..19).map(|i| 1.0 - i as f32 * 0.125).collect();
        let want: f32 = x.iter().zip(&row).map(|(a, b)| a * b).sum();
        let f16s: Vec<f16> = row.iter().map(|&v| f16::from_f32(v)).collect();
        let bf16s: Vec<bf16> = row.iter().map(|&v| bf16::from_f32(v)).collect();
        for view in [
            DenseView::F32(&row),
            DenseView::F16(&f16s),
            DenseView::Bf16(&bf16s),
        ] {
            assert!((view.dot_row(0, &x) - want).abs() < 1e-4);
            let mut back = vec![0f32; 19];
            view.row_to_f32(0, 19, &mut back).unwrap();
            assert_eq!(back, row);
            assert!(view.row_to_f32(1, 19, &mut back).is_err());
        }
    }

    #[test]
    fn f16_widening_is_exact_for_every_bit_pattern() {
        for bits in 0..=u16::MAX {
            let h = f16::from_bits(bits);
            let (got, want) = (h.widen(), h.to_f32());
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{bits:#06x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn dot_rows_and_listed_rows_agree_with_dot_row_at_every_isa() {
        let (rows, cols, tokens) = (37, 2560 + 19, 3);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 997.0)
            .collect();
        let x: Vec<f32> = (0..tokens * cols)
            .map(|i| ((i * 104729 % 1000) as f32 - 500.0) / 1009.0)
            .collect();
        let f16s: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let bf16s: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        for view in [
            DenseView::F32(&w),
            DenseView::F16(&f16s),
            DenseView::Bf16(&bf16s),
        ] {
            for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
                let mut out = vec![0f32; (rows - 5) * tokens];
                view.dot_rows(isa, 5..rows, &x, cols, &mut out).unwrap();
                for r in 5..rows {
                    for t in 0..tokens {
                        let want = view.dot_row(r, &x[t * cols..(t + 1) * cols]);
                        let got = out[(r - 5) * tokens + t];
                        assert!((got - want).abs() < 1e-3, "{isa} row {r}: {got} vs {want}");
                    }
                }
                assert!(view.dot_rows(isa, 0..rows + 1, &x, cols, &mut out).is_err());
                assert!(view.dot_rows(isa, 0..2, &x, cols, &mut out).is_err());
                // Listed rows, in any order and repeated: the same sums bit for bit.
                let listed = [36, 5, 6, 5, 20, 36, 9, 30, 7];
                let mut got = vec![0f32; listed.len()];
                let x0 = &x[..cols];
                view.dot_listed_rows(isa, &listed, x0, &mut got).unwrap();
                for (&r, g) in listed.iter().zip(&got) {
                    let want = out[(r - 5) * tokens];
                    assert_eq!(g.to_bits(), want.to_bits(), "{isa} listed row {r}");
                }
                assert!(
                    view.dot_listed_rows(isa, &[0, rows], x0, &mut got[..2])
                        .is_err()
                );
                assert!(view.dot_listed_rows(isa, &[0], x0, &mut got).is_err());
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut out = [0f32; 2];
        assert!(rms_norm(&[1.0; 3], &[1.0; 2], 1e-5, &mut out).is_err());
        let (short, mut scratch) = ([0.0; 2], Vec::new());
        let (query, four) = ([1.0, 0.0], [0.0; 4]);
        let two_keys = single(2, 2, 2);
        let err = attend(
            Isa::Scalar,
            &two_keys,
            &query,
            &short,
            &short,
            &mut scratch,
            &mut out,
        );
        assert!(err.is_err());
        let no_keys = single(2, 0, 2);
        let err = attend(
            Isa::Scalar,
            &no_keys,
            &query,
            &four,
            &four,
            &mut scratch,
            &mut out,
        );
        assert!(err.is_err());
        assert!(gated(GateActivation::Relu2, &[0.0; 2], &[0.0; 3], &mut out).is_err());
    }
}
