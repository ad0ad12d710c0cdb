//! Per-token absmax int8 activation quantization (BitNet b1.58's `ActQuant`).
//!
//! For one activation row `x` (one token, the full input of a BitLinear):
//! `s = 127 / max(max_k |x_k|, 1e-5)`, `q_k = clamp(round_half_even(x_k * s), -128, 127)`, all in f32.
//! The matrix product then yields `y = acc / s * weight_scale`. Computing `x * s` exactly like this
//! (one f32 multiply, ties to even) reproduces the reference implementation's codes bit for bit.

use crate::{ShapeError, check_len};

/// Smallest absmax the scale is computed from, so an all-zero row gives zero codes, not NaN.
pub const ABSMAX_FLOOR: f32 = 1e-5;

/// Quantizes one row; returns the scale `s` (codes = `x * s`, so dequantize by dividing by `s`).
pub fn quantize_row(x: &[f32], codes: &mut [i8]) -> Result<f32, ShapeError> {
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
) -> Result<(), ShapeError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
