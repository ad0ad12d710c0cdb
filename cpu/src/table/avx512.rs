//! [`DenseView::dot_rows`](super::DenseView::dot_rows) and
//! [`dot_listed_rows`](super::DenseView::dot_listed_rows) at the AVX-512 level, where several
//! tokens share the output head (a prompt's logits, the server's decode rows) and the head's
//! arithmetic, not its bytes, sets the pace.
//!
//! Tiles of up to [`ROWS`] matrix rows × [`TOKENS`] tokens: each 32-column step widens the rows
//! once (F16C's `vcvtph2ps` for f16, a 16-bit shift for bf16) and feeds every token of the tile
//! with fused multiply-adds, so one activation load serves `ROWS` rows and one widening serves
//! `TOKENS` tokens. Each (row, token) pair runs the same operations on its own two registers
//! whatever tile it is in (32 lanes, the two registers added and reduced, then the columns past
//! the last whole step in order), so a token's logits are the same bit for bit alone, in any
//! batch and re-scored by listed row ([`dot_one`]). Fusing rounds once per multiply-add where the other levels
//! round twice: sums differ from theirs in the last bits, as the levels' orders already do.

use super::{Dtype, Widen};
use std::arch::x86_64::*;

/// Matrix rows per tile: 3 rows × 4 tokens × 2 accumulators, the rows' 6 and the activations'
/// 2 registers fill AVX-512's 32.
const ROWS: usize = 3;
/// Tokens per tile.
const TOKENS: usize = 4;
/// Columns per step: two registers of f32.
const STEP: usize = 32;

/// `out[i · tokens + t] = x[t] · row i` for the whole rows of `cols` columns in `rows`, `x` holding
/// `tokens` rows of `cols` values.
///
/// # Safety
/// The CPU supports AVX-512 F and BW, FMA and F16C (the [`Isa::Avx512`](crate::isa::Isa) level).
/// `cols > 0`; `rows.len()` and `x.len()` are multiples of `cols`; `out` holds a sum per pair.
pub(super) unsafe fn dot_rows<T: Widen>(rows: &[T], x: &[f32], cols: usize, out: &mut [f32]) {
    let tokens = x.len() / cols;
    if tokens == 0 {
        return;
    }
    for (tile, o) in rows.chunks(ROWS * cols).zip(out.chunks_mut(ROWS * tokens)) {
        // SAFETY: forwarded (whole rows and tokens of `cols` values, `o` a sum per pair).
        unsafe {
            match tile.len() / cols {
                3 => row_tile::<T, 3>(tile, x, cols, o),
                2 => row_tile::<T, 2>(tile, x, cols, o),
                _ => row_tile::<T, 1>(tile, x, cols, o),
            }
        }
    }
}

/// `x · row` (one row of `x.len()` values), summed as in every tile.
///
/// # Safety
/// The CPU supports the level (see [`dot_rows`]); `row.len() == x.len() > 0`.
pub(super) unsafe fn dot_one<T: Widen>(row: &[T], x: &[f32]) -> f32 {
    // SAFETY: forwarded; one row and one token of the same length.
    let sums = unsafe { tile::<T, 1, 1>([row], [x]) };
    sums[0][0]
}

/// The `R` rows of `rows` against every token, `TOKENS` tokens at a time.
///
/// # Safety
/// As [`dot_rows`], with `rows` holding exactly `R` rows and `out` `R · tokens` sums.
#[inline(always)]
unsafe fn row_tile<T: Widen, const R: usize>(rows: &[T], x: &[f32], cols: usize, out: &mut [f32]) {
    let tokens = x.len() / cols;
    let tile_rows: [&[T]; R] = std::array::from_fn(|r| &rows[r * cols..(r + 1) * cols]);
    for first in (0..tokens).step_by(TOKENS) {
        let token = |n: usize| &x[(first + n) * cols..(first + n + 1) * cols];
        // SAFETY: forwarded; every slice holds `cols` values.
        unsafe {
            match tokens - first {
                1 => put(out, tokens, first, tile::<T, R, 1>(tile_rows, [token(0)])),
                2 => put(
                    out,
                    tokens,
                    first,
                    tile::<T, R, 2>(tile_rows, [token(0), token(1)]),
                ),
                3 => put(
                    out,
                    tokens,
                    first,
                    tile(tile_rows, std::array::from_fn::<_, 3, _>(token)),
                ),
                _ => put(
                    out,
                    tokens,
                    first,
                    tile(tile_rows, std::array::from_fn::<_, TOKENS, _>(token)),
                ),
            }
        }
    }
}

/// Stores a tile's sums for tokens `first..first + N` into `out[r · tokens + t]`.
#[inline(always)]
fn put<const R: usize, const N: usize>(
    out: &mut [f32],
    tokens: usize,
    first: usize,
    sums: [[f32; N]; R],
) {
    for (r, sums) in sums.iter().enumerate() {
        out[r * tokens + first..][..N].copy_from_slice(sums);
    }
}

/// `xs[n] · rows[r]` for every pair.
///
/// # Safety
/// The CPU supports the level (see [`dot_rows`]); every row and token holds the same number of
/// values, and `N ≥ 1`.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn tile<T: Widen, const R: usize, const N: usize>(
    rows: [&[T]; R],
    xs: [&[f32]; N],
) -> [[f32; N]; R] {
    let cols = xs[0].len();
    let whole = cols / STEP * STEP;
    let mut acc = [[[_mm512_setzero_ps(); 2]; N]; R];
    for at in (0..whole).step_by(STEP) {
        // SAFETY: `at + STEP ≤ whole ≤ cols`, the length of every row and token.
        let w: [[__m512; 2]; R] =
            std::array::from_fn(|r| [0, 16].map(|h| unsafe { load16(rows[r], at + h) }));
        for n in 0..N {
            // SAFETY: as above.
            let x = [0, 16].map(|h| unsafe { _mm512_loadu_ps(xs[n].as_ptr().add(at + h)) });
            for r in 0..R {
                for h in 0..2 {
                    acc[r][n][h] = _mm512_fmadd_ps(x[h], w[r][h], acc[r][n][h]);
                }
            }
        }
    }
    std::array::from_fn(|r| {
        std::array::from_fn(|n| {
            let [lo, hi] = acc[r][n];
            let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
            for (a, b) in xs[n][whole..].iter().zip(&rows[r][whole..]) {
                sum = a.mul_add(b.widen(), sum);
            }
            sum
        })
    })
}

/// 16 values of `row` from `at`, widened exactly to f32.
///
/// # Safety
/// The CPU supports the level; `at + 16 ≤ row.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
#[inline]
unsafe fn load16<T: Widen>(row: &[T], at: usize) -> __m512 {
    let p = row.as_ptr().wrapping_add(at);
    // SAFETY: 16 values from `p` lie within `row` (the caller's contract); each arm reads them as
    // the type they are.
    unsafe {
        match T::DTYPE {
            Dtype::F32 => _mm512_loadu_ps(p.cast()),
            Dtype::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
            Dtype::Bf16 => {
                let halves = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(halves))
            }
        }
    }
}
