//! Element-wise ops of the transformer step: the gated activation of the feed-forward block and
//! the residual add. Each output element depends on its own inputs only, in f32.

use crate::{Error, check_len};

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
) -> Result<(), Error> {
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

/// `acc[i] += x[i]` (the residual connection).
pub fn add(acc: &mut [f32], x: &[f32]) -> Result<(), Error> {
    check_len("add input", x.len(), acc.len())?;
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += v;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn add_is_elementwise() {
        let mut acc = [1.0f32, 2.0, 3.0];
        add(&mut acc, &[0.5, -2.0, 4.0]).unwrap();
        assert_eq!(acc, [1.5, 0.0, 7.0]);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut out = [0f32; 2];
        assert!(gated(GateActivation::Relu2, &[0.0; 2], &[0.0; 3], &mut out).is_err());
        assert!(add(&mut out, &[0.0; 3]).is_err());
    }
}
