//! RMSNorm, one row at a time: `out = weight · (x · 1/√(mean(x²) + eps))`.
//!
//! The sum of squares is accumulated in f64 over a fixed order of independent lanes: RMSNorm feeds
//! the activation quantization of the next BitLinear, and an f64 sum keeps summation order from
//! moving an activation across an int8 rounding boundary.

use crate::{Error, check_len};

/// `out = x * rsqrt(mean(x²) + eps) * weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<(), Error> {
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

/// The f64 sum of `values` over independent lanes (a fixed order, vectorizable).
#[inline(always)]
fn sum_f64(values: impl Iterator<Item = f64>) -> f64 {
    let mut acc = [0f64; 8];
    for (i, v) in values.enumerate() {
        acc[i % 8] += v;
    }
    acc.iter().sum()
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
    fn bad_shapes_are_errors() {
        let mut out = [0f32; 2];
        assert!(rms_norm(&[1.0; 3], &[1.0; 2], 1e-5, &mut out).is_err());
        assert!(rms_norm(&[1.0; 2], &[1.0; 2], 1e-5, &mut out[..1]).is_err());
    }
}
