//! Per-token absmax int8 activation quantization (BitNet b1.58's `ActQuant`).
//!
//! For one activation row `x` (one token, the full input of a BitLinear):
//! `s = 127 / max(max_k |x_k|, 1e-5)`, `q_k = clamp(round_half_even(x_k * s), -128, 127)`, all in f32.
//! The matrix product then yields `y = acc / s * weight_scale`. Computing `x * s` exactly like this
//! (one f32 multiply, ties to even) reproduces the reference implementation's codes bit for bit.
//!
//! [`quantize_row`] is the reference. [`QuantizedRows`] is what the SIMD kernels consume: the same
//! codes (bit for bit, at every [`Isa`]), each row zero-padded to a multiple of [`ROW_PADDING`]
//! columns, plus each row's scale and the sum of its codes (the
//! unsigned-weight kernels subtract it). The per-ISA versions are one generic body compiled once per
//! `#[target_feature]` level, written with independent lanes so the compiler vectorizes it; the
//! maximum is order-independent and each code depends on its own input only, so they are exact.

use crate::isa::Isa;
use crate::{Error, check_len, grown};

/// Row padding of [`QuantizedRows`]: a multiple of every kernel family's column block
/// ([`crate::bitlinear::mad::K_BLOCK`] = 256, [`crate::bitlinear::base3::BLOCK_COLS`] = 320), so each reads whole blocks.
pub const ROW_PADDING: usize = 1280;
const _: () = assert!(
    ROW_PADDING.is_multiple_of(crate::bitlinear::mad::K_BLOCK)
        && ROW_PADDING.is_multiple_of(crate::bitlinear::base3::BLOCK_COLS)
);

/// Smallest absmax the scale is computed from, so an all-zero row gives zero codes, not NaN.
pub const ABSMAX_FLOOR: f32 = 1e-5;

/// Quantizes one row; returns the scale `s` (codes = `x * s`, so dequantize by dividing by `s`).
pub fn quantize_row(x: &[f32], codes: &mut [i8]) -> Result<f32, Error> {
    check_len("quantize_row codes", codes.len(), x.len())?;
    let absmax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = 127.0 / absmax.max(ABSMAX_FLOOR);
    for (q, v) in codes.iter_mut().zip(x) {
        *q = (v * scale).round_ties_even().clamp(-128.0, 127.0) as i8;
    }
    Ok(scale)
}

/// Quantizes `rows` consecutive rows of `cols` values; writes one scale per row.
pub fn quantize_rows(
    x: &[f32],
    cols: usize,
    codes: &mut [i8],
    scales: &mut [f32],
) -> Result<(), Error> {
    let rows = scales.len();
    check_len("quantize_rows input", x.len(), rows * cols)?;
    check_len("quantize_rows codes", codes.len(), rows * cols)?;
    for ((row, q), s) in x
        .chunks_exact(cols)
        .zip(codes.chunks_exact_mut(cols))
        .zip(scales.iter_mut())
    {
        *s = quantize_row(row, q)?;
    }
    Ok(())
}

/// Quantized activation rows, padded for every kernel family ([`ROW_PADDING`]); reused across calls
/// so a decode step allocates nothing once the buffers have grown.
#[derive(Clone, Debug, Default)]
pub struct QuantizedRows {
    codes: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<i32>,
    rows: usize,
    cols: usize,
    padded_cols: usize,
}

impl QuantizedRows {
    /// Quantizes `rows` rows of `cols` values from `x` with the `isa` kernels.
    pub fn quantize(&mut self, isa: Isa, x: &[f32], rows: usize, cols: usize) -> Result<(), Error> {
        check_len("activations to quantize", x.len(), rows * cols)?;
        isa.check()?;
        let padded = cols.div_ceil(ROW_PADDING) * ROW_PADDING;
        let all_codes = grown(&mut self.codes, rows * padded, 0);
        self.scales.resize(rows, 0.0);
        self.sums.resize(rows, 0);
        (self.rows, self.cols, self.padded_cols) = (rows, cols, padded);
        for (t, (row, codes)) in x
            .chunks_exact(cols.max(1))
            .zip(all_codes.chunks_exact_mut(padded.max(1)))
            .take(rows)
            .enumerate()
        {
            let (codes, padding) = codes.split_at_mut(cols);
            padding.fill(0);
            (self.scales[t], self.sums[t]) = isa.vectorized(
                #[inline(always)]
                || quantize_lanes(row, codes),
            )?;
        }
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row length in `codes`: `cols` rounded up to a multiple of [`ROW_PADDING`], the rest zeros.
    pub fn padded_cols(&self) -> usize {
        self.padded_cols
    }

    /// Every row's codes, one after another, each `padded_cols` long.
    pub fn codes(&self) -> &[i8] {
        &self.codes[..self.rows * self.padded_cols]
    }

    /// Row `t`'s codes, `padded_cols` long.
    pub fn row(&self, t: usize) -> &[i8] {
        &self.codes[t * self.padded_cols..(t + 1) * self.padded_cols]
    }

    /// The scales `s` (codes = `x * s`).
    pub fn scales(&self) -> &[f32] {
        &self.scales[..self.rows]
    }

    /// Each row's sum of codes.
    pub fn sums(&self) -> &[i32] {
        &self.sums[..self.rows]
    }
}

/// Lanes of the absmax loop: a multiple of every vector width in f32.
const LANES: usize = 16;

/// The vectorizable body: absmax over independent lanes, then one code per input.
#[inline(always)]
fn quantize_lanes(x: &[f32], codes: &mut [i8]) -> (f32, i32) {
    let mut lane_max = [0f32; LANES];
    let whole = x.len() / LANES * LANES;
    for chunk in x[..whole].chunks_exact(LANES) {
        for (m, v) in lane_max.iter_mut().zip(chunk) {
            *m = m.max(v.abs());
        }
    }
    let absmax = x[whole..]
        .iter()
        .chain(&lane_max)
        .fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = 127.0 / absmax.max(ABSMAX_FLOOR);
    // The integer sum is exact in any order, so one flat loop lets the compiler vectorize it.
    let mut sum = 0i32;
    for (q, v) in codes.iter_mut().zip(x) {
        *q = code(*v, scale);
        sum += i32::from(*q);
    }
    (scale, sum)
}

/// [`quantize_row`]'s code for `v`, in operations that vectorize: Rust's saturating float-to-int
/// casts keep LLVM from vectorizing the loop, so the clamped product is rounded by adding
/// 1.5 · 2²³ (the sum's last mantissa bit is worth 1, so the addition rounds ties to even) and the
/// integer is read from the mantissa. Clamping before rounding gives the same code, as both bounds
/// are integers; NaN gives 0, as the cast does.
#[inline(always)]
fn code(v: f32, scale: f32) -> i8 {
    const ROUNDER: f32 = 12_582_912.0;
    let clamped = (v * scale).clamp(-128.0, 127.0);
    let rounded = (clamped + ROUNDER)
        .to_bits()
        .wrapping_sub(ROUNDER.to_bits());
    if clamped.is_nan() { 0 } else { rounded as i8 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_isa_quantizes_bit_identically_to_the_reference() {
        let mut seed = 5u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        // One buffer per level, reused across the shapes: a call's padding is zeros whatever
        // the previous wider call left there.
        let mut reused: Vec<QuantizedRows> = Isa::ALL.iter().map(|_| Default::default()).collect();
        for cols in [1, 15, 16, 17, 255, 256, 2560, 6913, 17] {
            let mut x: Vec<f32> = (0..3 * cols).map(|_| next() * 7.0).collect();
            // Exact ties, zeros, a NaN and an infinity in the mix.
            x[0] = 0.0;
            if cols > 4 {
                x[1] = f32::NAN;
                x[2] = -0.5;
                x[cols + 3] = f32::INFINITY;
            }
            for (isa, q) in Isa::ALL.into_iter().zip(&mut reused) {
                if !isa.is_supported() {
                    continue;
                }
                q.quantize(isa, &x, 3, cols).unwrap();
                assert_eq!(q.padded_cols() % ROW_PADDING, 0);
                for t in 0..3 {
                    let mut want = vec![0i8; cols];
                    let s = quantize_row(&x[t * cols..(t + 1) * cols], &mut want).unwrap();
                    assert_eq!(q.scales()[t].to_bits(), s.to_bits(), "{isa} cols {cols}");
                    assert_eq!(&q.row(t)[..cols], &want[..], "{isa} cols {cols} row {t}");
                    assert!(q.row(t)[cols..].iter().all(|&c| c == 0));
                    let sum: i32 = want.iter().map(|&c| i32::from(c)).sum();
                    assert_eq!(q.sums()[t], sum, "{isa} cols {cols}");
                }
            }
        }
        let mut q = QuantizedRows::default();
        assert!(q.quantize(Isa::Scalar, &[0.0; 5], 2, 3).is_err());
    }

    #[test]
    fn absmax_maps_to_127_and_ties_round_to_even() {
        // absmax 2.54 -> s = 50; 0.01 * 50 = 0.5 rounds to 0, 0.03 * 50 = 1.5 rounds to 2.
        let x = [2.54f32, -2.54, 0.01, 0.03, 0.0];
        let mut q = [0i8; 5];
        let s = quantize_row(&x, &mut q).unwrap();
        assert!((s - 50.0).abs() < 1e-4);
        assert_eq!(q[0], 127);
        assert_eq!(q[1], -127);
        assert_eq!(q[4], 0);
        for (v, c) in x.iter().zip(q) {
            assert_eq!(c as f32, (v * s).round_ties_even());
        }
    }

    #[test]
    fn zero_row_gives_zero_codes_and_finite_scale() {
        let mut q = [5i8; 8];
        let s = quantize_row(&[0.0; 8], &mut q).unwrap();
        assert!(s.is_finite());
        assert_eq!(q, [0; 8]);
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let mut q = [0i8; 3];
        assert!(quantize_row(&[1.0; 4], &mut q).is_err());
        let mut s = [0f32; 2];
        let mut q = [0i8; 8];
        assert!(quantize_rows(&[1.0; 6], 4, &mut q, &mut s).is_err());
    }
}
