//! Dense tables: the token embedding (rows gathered) and the full-precision output head (rows
//! dotted with the final hidden states), read in the checkpoint's dtype (f32, f16, bf16) and widened
//! exactly to f32. [`q8`] holds the 8-bit copy of the head with exact top-k re-scoring.
//!
//! The output head ([`DenseView::dot_rows`], the largest weight of a small model) runs at an
//! [`Isa`]: one generic body over independent lanes, compiled once per `#[target_feature]` level so
//! the compiler vectorizes the widening (bf16 and f16 are widened exactly with integer operations)
//! and the multiply-adds. Levels differ from each other only in float summation order, and
//! [`Isa::Avx512`] in rounding too: its own kernel ([`avx512`]) tiles rows × tokens with fused
//! multiply-adds, since a batch of tokens makes the head's arithmetic, not its bytes, the limit.
//! At any one level a token's sums are the same bit for bit alone, in any batch and re-scored by
//! listed row.

#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod q8;

use crate::isa::{Isa, prefetch, prefetch_lines};
use crate::{Error, check_len};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use std::ops::Range;

/// Lanes of independent partial results: enough for the compiler to vectorize reductions (two
/// AVX-512 vectors of f32).
const LANES: usize = 32;

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
    pub fn row_to_f32(&self, r: usize, cols: usize, out: &mut [f32]) -> Result<(), Error> {
        check_len("dense row output", out.len(), cols)?;
        if (r + 1) * cols > self.len() {
            return Err(Error::Shape(format!(
                "row {r} of {cols} columns is outside a matrix of {} values",
                self.len()
            )));
        }
        let range = r * cols..(r + 1) * cols;
        match self {
            DenseView::F32(v) => out.copy_from_slice(&v[range]),
            // The slice conversions use F16C where the CPU has it, 8 values an instruction (one
            // call per value spent ~1 s building the 8-bit head of 2B-4T); both are exact.
            DenseView::F16(v) => v[range].convert_to_f32_slice(out),
            DenseView::Bf16(v) => v[range].convert_to_f32_slice(out),
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
    ) -> Result<(), Error> {
        isa.check()?;
        let tokens = x.len().checked_div(cols).unwrap_or(0);
        check_len("dense dot activations", x.len(), tokens * cols)?;
        check_len("dense dot output", out.len(), rows.len() * tokens)?;
        if rows.start > rows.end || rows.end * cols > self.len() {
            return Err(Error::Shape(format!(
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
    ) -> Result<(), Error> {
        isa.check()?;
        check_len("listed dot output", out.len(), rows.len())?;
        let matrix_rows = self.len().checked_div(x.len()).unwrap_or(0);
        if let Some(&r) = rows.iter().find(|&&r| r >= matrix_rows) {
            return Err(Error::Shape(format!(
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
) -> Result<(), Error> {
    let cols = x.len();
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && cols > 0 {
        // SAFETY: `dot_listed_rows` checked the level and that every listed row is in `matrix`,
        // so every row passed holds `cols` values, as `x` does.
        each_listed_row(matrix, rows, cols, out, |row| unsafe {
            avx512::dot_one(row, x)
        });
        return Ok(());
    }
    isa.vectorized(
        #[inline(always)]
        || {
            each_listed_row(matrix, rows, cols, out, |row| {
                dot_with(x, row, |v| v.widen())
            })
        },
    )
}

/// `out[i] = dot(row rows[i])` of `matrix` (rows of `cols` values), each row's lines requested
/// [`LISTED_ROWS_AHEAD`] rows before it is read.
#[inline(always)]
fn each_listed_row<T>(
    matrix: &[T],
    rows: &[usize],
    cols: usize,
    out: &mut [f32],
    dot: impl Fn(&[T]) -> f32,
) {
    let row = |r: usize| &matrix[r * cols..(r + 1) * cols];
    for (i, (&r, o)) in rows.iter().zip(out).enumerate() {
        if let Some(&ahead) = rows.get(i + LISTED_ROWS_AHEAD) {
            prefetch_lines(row(ahead), prefetch);
        }
        *o = dot(row(r));
    }
}

/// The element types a table is stored in (what the x86-64 kernels dispatch their loads on).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

/// An element type the output head is stored in.
trait Widen: Copy {
    #[cfg(target_arch = "x86_64")]
    const DTYPE: Dtype;
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[cfg(target_arch = "x86_64")]
    const DTYPE: Dtype = Dtype::F32;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for bf16 {
    #[cfg(target_arch = "x86_64")]
    const DTYPE: Dtype = Dtype::Bf16;
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

impl Widen for f16 {
    #[cfg(target_arch = "x86_64")]
    const DTYPE: Dtype = Dtype::F16;
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
) -> Result<(), Error> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && cols > 0 {
        // SAFETY: `dot_rows` checked the level and the shapes (whole rows and tokens of `cols`
        // values, a sum per pair in `out`).
        unsafe { avx512::dot_rows(rows, x, cols, out) };
        return Ok(());
    }
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
    fn row_to_f32_is_exact_for_every_bit_pattern() {
        let f16s: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let bf16s: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        let mut back = vec![0f32; f16s.len()];
        let same =
            |got: f32, want: f32| got.to_bits() == want.to_bits() || got.is_nan() && want.is_nan();
        DenseView::F16(&f16s)
            .row_to_f32(0, f16s.len(), &mut back)
            .unwrap();
        assert!(back.iter().zip(&f16s).all(|(&g, h)| same(g, h.to_f32())));
        DenseView::Bf16(&bf16s)
            .row_to_f32(0, bf16s.len(), &mut back)
            .unwrap();
        assert!(back.iter().zip(&bf16s).all(|(&g, h)| same(g, h.to_f32())));
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

    /// Every row-tile and token-tile shape, with and without a column tail: each token's sums
    /// equal, bit for bit, those of the same token alone.
    #[test]
    fn a_tokens_sums_do_not_depend_on_its_batch() {
        for cols in [19, 64 + 19, 256] {
            let rows = 7;
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 997.0)
                .collect();
            let f16s: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let bf16s: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let x: Vec<f32> = (0..9 * cols)
                .map(|i| ((i * 104729 % 1000) as f32 - 500.0) / 1009.0)
                .collect();
            for view in [
                DenseView::F32(&w),
                DenseView::F16(&f16s),
                DenseView::Bf16(&bf16s),
            ] {
                for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
                    let alone: Vec<Vec<f32>> = x
                        .chunks(cols)
                        .map(|xt| {
                            let mut out = vec![0f32; rows];
                            view.dot_rows(isa, 0..rows, xt, cols, &mut out).unwrap();
                            out
                        })
                        .collect();
                    for tokens in 1..=9 {
                        for first_row in 0..rows {
                            let n = rows - first_row;
                            let mut out = vec![0f32; n * tokens];
                            let batch = &x[..tokens * cols];
                            view.dot_rows(isa, first_row..rows, batch, cols, &mut out)
                                .unwrap();
                            for (i, row) in out.chunks(tokens).enumerate() {
                                for (t, got) in row.iter().enumerate() {
                                    let want = alone[t][first_row + i];
                                    assert_eq!(
                                        got.to_bits(),
                                        want.to_bits(),
                                        "{isa} cols {cols} tokens {tokens} row {} token {t}",
                                        first_row + i
                                    );
                                }
                            }
                        }
                    }
                }
            }
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
}
