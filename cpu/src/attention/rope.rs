//! Rotary position embedding (rotate-half RoPE), the first step of the attention op: the angles of
//! one position, then each q and k head rotated in place, pairs `(i, i + head_dim/2)`, in f32 with
//! the reference implementation's operations (the GPU backends upload the same angles as a table).

use crate::{Error, check_len};

/// The rotary angles' cosines and sines at `position` for a head of `head_dim`:
/// `inv_freq[i] = 1 / theta^(2i / head_dim)`, angle `position * inv_freq[i]`, `i < head_dim / 2`.
pub fn rope_cos_sin(
    theta: f32,
    head_dim: usize,
    position: usize,
    cos: &mut [f32],
    sin: &mut [f32],
) -> Result<(), Error> {
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
pub fn apply_rope(head: &mut [f32], cos: &[f32], sin: &[f32]) -> Result<(), Error> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
