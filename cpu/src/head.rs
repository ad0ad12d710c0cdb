//! An 8-bit copy of the output head whose top candidates are re-scored exactly.
//!
//! The head (the tied embedding of a small model) is the largest weight a decode step reads. A
//! [`Q8Head`] stores each row `v` as int8 codes `q_v` with one f32 scale `d_v = max_k |w_vk| / 127`
//! (`q = round_ties_even(w / d)`), half the bytes of f16/bf16. For an input `x` it gives
//! `approx_v = d_v · (q_v · x)` and a bound `bound_v ≥ |exact_v − approx_v|`, where `exact_v` is
//! the full-precision dot product. With the residual `r_v = w_v − d_v q_v` (measured at
//! quantization), `|r_v · x| ≤ min(max_k |r_vk| · ‖x‖₁, ‖r_v‖₂ · ‖x‖₂)` (Hölder, Cauchy–Schwarz);
//! `d_v · K · 2⁻¹⁵ · ‖x‖₁` is added for the f32 rounding of both dot products over `K` columns (each
//! within `K · 2⁻²⁴ · Σ|w_k x_k| ≤ K · 2⁻²⁴ · 128 d_v ‖x‖₁`, doubled as a margin), and the norms
//! are rounded up by a factor `1 + 2⁻¹⁰`.
//!
//! [`top_candidates`] then keeps every row whose exact logit could still be among the `k` largest;
//! the caller re-scores those with the full-precision head. So the `k` largest logits and their
//! order are exactly those of the full-precision head (exact greedy decoding and top-k sampling for
//! any `k` up to the one used); the other logits are approximations within their bounds.

use crate::float::DenseView;
use crate::isa::Isa;
use crate::{ShapeError, check_len};
use std::ops::Range;

/// Factor by which computed norms are rounded up, so that they stay upper bounds.
const ROUND_UP: f32 = 1.0 + 1.0 / 1024.0;

/// A row-major int8 matrix with one scale per row and its quantization error bound.
#[derive(Clone, Debug)]
pub struct Q8Head {
    codes: Vec<i8>,
    scales: Vec<f32>,
    /// `max_k |r_vk|` per row (rounded up).
    residual_max: Vec<f32>,
    /// `‖r_v‖₂` per row (rounded up).
    residual_l2: Vec<f32>,
    rows: usize,
    cols: usize,
}

impl Q8Head {
    /// Quantizes a `rows × cols` full-precision matrix.
    pub fn quantize(view: DenseView<'_>, rows: usize, cols: usize) -> Result<Self, ShapeError> {
        check_len("output head", view.len(), rows * cols)?;
        let mut codes = vec![0i8; rows * cols];
        let mut scales = vec![0f32; rows];
        let mut residual_max = vec![0f32; rows];
        let mut residual_l2 = vec![0f32; rows];
        let mut row = vec![0f32; cols];
        for v in 0..rows {
            view.row_to_f32(v, cols, &mut row)?;
            if row.iter().any(|w| !w.is_finite()) {
                return Err(ShapeError(format!(
                    "output head row {v} holds a value that is not finite"
                )));
            }
            let absmax = row.iter().fold(0f32, |m, w| m.max(w.abs()));
            let d = if absmax > 0.0 { absmax / 127.0 } else { 1.0 };
            let (mut max, mut sum_sq) = (0f32, 0f64);
            for (q, &w) in codes[v * cols..(v + 1) * cols].iter_mut().zip(&row) {
                *q = (w / d).round_ties_even().clamp(-127.0, 127.0) as i8;
                let r = f64::from(w) - f64::from(d) * f64::from(*q);
                max = max.max(r.abs() as f32);
                sum_sq += r * r;
            }
            scales[v] = d;
            residual_max[v] = max * ROUND_UP;
            residual_l2[v] = sum_sq.sqrt() as f32 * ROUND_UP;
        }
        Ok(Self {
            codes,
            scales,
            residual_max,
            residual_l2,
            rows,
            cols,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn bytes(&self) -> usize {
        self.codes.len() + 8 * self.rows
    }

    /// Approximate logits and their error bounds for rows `range` and one input `x`.
    pub fn logits(
        &self,
        isa: Isa,
        range: Range<usize>,
        x: &[f32],
        approx: &mut [f32],
        bounds: &mut [f32],
    ) -> Result<(), ShapeError> {
        check_len("q8 head input", x.len(), self.cols)?;
        check_len("q8 head bounds", bounds.len(), range.len())?;
        let all = DenseView::I8(&self.codes);
        all.dot_rows(isa, range.clone(), x, self.cols, approx)?;
        let l1 = x.iter().map(|&v| f64::from(v).abs()).sum::<f64>() as f32 * ROUND_UP;
        let l2 = x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt() as f32 * ROUND_UP;
        let rounding = self.cols as f32 * 2f32.powi(-15) * l1;
        for (i, (a, b)) in approx.iter_mut().zip(bounds.iter_mut()).enumerate() {
            let v = range.start + i;
            let d = self.scales[v];
            *a *= d;
            *b = (self.residual_max[v] * l1).min(self.residual_l2[v] * l2) + d * rounding;
        }
        Ok(())
    }
}

/// Appends to `out` every index whose exact value could be among the `k` largest, given
/// `approx[v] ± bounds[v]`: those with `approx + bound ≥` the `k`-th largest `approx − bound`.
/// `scratch` is reused between calls.
pub fn top_candidates(
    approx: &[f32],
    bounds: &[f32],
    k: usize,
    scratch: &mut Vec<f32>,
    out: &mut Vec<usize>,
) {
    out.clear();
    if approx.is_empty() || k == 0 {
        return;
    }
    let k = k.min(approx.len());
    scratch.clear();
    scratch.extend(approx.iter().zip(bounds).map(|(a, b)| a - b));
    let (_, kth, _) = scratch.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let threshold = *kth;
    out.extend(
        approx
            .iter()
            .zip(bounds)
            .enumerate()
            .filter(|(_, (a, b))| *a + *b >= threshold || a.is_nan())
            .map(|(v, _)| v),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn bounds_hold_and_candidates_contain_the_exact_top_k() {
        let (rows, cols) = (3000, 2560);
        let mut seed = 9u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let table: Vec<bf16> = (0..rows * cols)
            .map(|_| bf16::from_f32(next() * 0.1))
            .collect();
        let x: Vec<f32> = (0..cols).map(|_| next() * 4.0).collect();
        let view = DenseView::Bf16(&table);
        let head = Q8Head::quantize(view, rows, cols).unwrap();
        assert_eq!(head.bytes(), rows * cols + 8 * rows);
        for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
            let mut exact = vec![0f32; rows];
            view.dot_rows(isa, 0..rows, &x, cols, &mut exact).unwrap();
            let (mut approx, mut bounds) = (vec![0f32; rows], vec![0f32; rows]);
            head.logits(isa, 0..rows, &x, &mut approx, &mut bounds)
                .unwrap();
            for v in 0..rows {
                assert!(
                    (exact[v] - approx[v]).abs() <= bounds[v],
                    "{isa} row {v}: exact {} approx {} bound {}",
                    exact[v],
                    approx[v],
                    bounds[v]
                );
            }
            let mut sorted: Vec<usize> = (0..rows).collect();
            sorted.sort_by(|&a, &b| exact[b].total_cmp(&exact[a]));
            let (mut scratch, mut cand) = (Vec::new(), Vec::new());
            for k in [1, 40] {
                top_candidates(&approx, &bounds, k, &mut scratch, &mut cand);
                assert!(
                    cand.len() >= k && cand.len() < rows / 4,
                    "{} candidates",
                    cand.len()
                );
                for v in &sorted[..k] {
                    assert!(cand.contains(v), "{isa}: top-{k} row {v} was dropped");
                }
            }
        }
    }

    #[test]
    fn degenerate_inputs() {
        let (mut scratch, mut cand) = (Vec::new(), Vec::new());
        top_candidates(&[], &[], 3, &mut scratch, &mut cand);
        assert!(cand.is_empty());
        top_candidates(&[1.0, 3.0, 2.0], &[0.0; 3], 5, &mut scratch, &mut cand);
        assert_eq!(cand, [0, 1, 2]);
        top_candidates(&[1.0, 3.0, 2.0], &[0.0; 3], 1, &mut scratch, &mut cand);
        assert_eq!(cand, [1]);
        let zeros = vec![0f32; 8];
        let head = Q8Head::quantize(DenseView::F32(&zeros), 2, 4).unwrap();
        let (mut a, mut b) = ([0f32; 2], [0f32; 2]);
        head.logits(Isa::Scalar, 0..2, &[1.0; 4], &mut a, &mut b)
            .unwrap();
        assert_eq!(a, [0.0, 0.0]);
        assert!(Q8Head::quantize(DenseView::F32(&[f32::NAN; 4]), 1, 4).is_err());
        assert!(
            head.logits(Isa::Scalar, 0..2, &[1.0; 3], &mut a, &mut b)
                .is_err()
        );
    }
}
