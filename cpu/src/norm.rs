//! RMSNorm, one row at a time: `out = weight · (x · 1/√(mean(x²) + eps))`.
//!
//! The sum of squares is accumulated in f64 over a fixed order of independent lanes: RMSNorm feeds
//! the activation quantization of the next BitLinear, and an f64 sum keeps summation order from
//! moving an activation across an int8 rounding boundary.

use crate::isa::Isa;
use crate::{Error, check_len};

/// `out = x * rsqrt(mean(x²) + eps) * weight`, compiled for `isa`'s vectors (the same bits at
/// every level: only independent lanes run side by side).
pub fn rms_norm(
    isa: Isa,
    x: &[f32],
    weight: &[f32],
    eps: f32,
    out: &mut [f32],
) -> Result<(), Error> {
    check_len("rms_norm weight", weight.len(), x.len())?;
    check_len("rms_norm output", out.len(), x.len())?;
    isa.vectorized(
        #[inline(always)]
        || {
            let sum_sq = sum_squares(x);
            let mean_sq = (sum_sq / x.len().max(1) as f64) as f32;
            let inv = 1.0 / (mean_sq + eps).sqrt();
            for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
                *o = w * (v * inv);
            }
        },
    )
}

/// The f64 sum of the squares of `x` over 8 independent lanes (lane `l` adds elements `l`, `l + 8`,
/// … in order; then the lanes in order): a fixed order, and whole chunks of 8, which vectorize.
#[inline(always)]
fn sum_squares(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f64::from(v) * f64::from(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(rest) {
        *a += f64::from(v) * f64::from(v);
    }
    acc.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_of_constant_row_is_weight() {
        let mut out = [0f32; 4];
        rms_norm(Isa::Scalar, &[3.0; 4], &[1.0, 2.0, 3.0, 4.0], 0.0, &mut out).unwrap();
        for (o, w) in out.iter().zip([1.0, 2.0, 3.0, 4.0]) {
            assert!((o - w).abs() < 1e-6);
        }
    }

    #[test]
    fn the_sum_of_squares_runs_over_eight_lanes_in_order() {
        // Rows of every length up to 64 (whole chunks and remainders) with magnitudes from 2⁻²⁰ to
        // 2²⁰, so that the f64 sum depends on the order: the plain lane-by-lane formula, bit for
        // bit.
        let mut seed = 5u64;
        let mut next = move || crate::bitlinear::testing::lcg(&mut seed);
        let mut x = Vec::new();
        for n in 1..=64 {
            x = (0..n)
                .map(|_| (next() % 1000) as f32 * 2f32.powi((next() % 41) as i32 - 20))
                .collect();
            let mut lanes = [0f64; 8];
            for (i, &v) in x.iter().enumerate() {
                lanes[i % 8] += f64::from(v) * f64::from(v);
            }
            let want = lanes.iter().sum::<f64>();
            assert_eq!(sum_squares(&x).to_bits(), want.to_bits(), "{n} values");
        }
        // And every level normalizes the row to the same bits.
        let weight: Vec<f32> = (0..x.len()).map(|i| 0.5 + (i % 7) as f32 / 3.0).collect();
        let mut first: Option<Vec<u32>> = None;
        for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
            let mut out = vec![0f32; x.len()];
            rms_norm(isa, &x, &weight, 1e-5, &mut out).unwrap();
            let bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
            assert_eq!(first.get_or_insert_with(|| bits.clone()), &bits, "{isa}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut out = [0f32; 2];
        assert!(rms_norm(Isa::Scalar, &[1.0; 3], &[1.0; 2], 1e-5, &mut out).is_err());
        assert!(rms_norm(Isa::Scalar, &[1.0; 2], &[1.0; 2], 1e-5, &mut out[..1]).is_err());
    }
}
