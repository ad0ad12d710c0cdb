//! Dequantization of a ternary product: the exact integer products, laid out by weight row
//! (`acc[n · stride + t]`, as the kernels write them so that threads own disjoint row ranges),
//! become BitLinear outputs laid out by token (`out[t · rows + n]`):
//! `y[t][n] = acc[n][t] / s_t · w_n`, with `s_t` the token's activation scale
//! ([`crate::bitlinear::quant`]) and `w_n` the row's weight scale. The order of operations is the
//! reference's (divide, then multiply); both are correctly rounded f32 operations, so every level
//! gives the same bits as the plain formula.
//!
//! # Blocking
//! More than one token is a transposition: [`dequantize`] walks [`TOKENS_BLOCK`] tokens at a time
//! (a cache line of i32 from each row of `acc`) and copies [`ROWS_BLOCK`] rows of them into a block
//! in L1, so that both the reads of `acc` and the writes of each token's outputs are contiguous
//! runs. One token (a decode) is a plain strided loop.

use crate::isa::Isa;
use crate::{Error, check_len};

/// Tokens per transposition block: one cache line of i32 accumulators per weight row. A caller
/// that splits the tokens across threads splits them into multiples of this.
pub const TOKENS_BLOCK: usize = 16;

/// Weight rows per transposition block.
const ROWS_BLOCK: usize = 16;

/// One BitLinear output from its exact product, its token's activation scale and its row's weight
/// scale.
#[inline(always)]
pub fn dequantize_one(acc: i32, token_scale: f32, row_scale: f32) -> f32 {
    acc as f32 / token_scale * row_scale
}

/// `out[t · n + r] = acc[r · stride + t] / token_scales[t] · row_scales[r]` for every token
/// `t < token_scales.len()` and row `r < n = row_scales.len()` (see the module documentation).
///
/// `stride ≥ token_scales.len()` is the length of a row of `acc`; a caller that dequantizes some
/// of the tokens passes `acc` from its first token on.
pub fn dequantize(
    isa: Isa,
    acc: &[i32],
    stride: usize,
    token_scales: &[f32],
    row_scales: &[f32],
    out: &mut [f32],
) -> Result<(), Error> {
    let (tokens, rows) = (token_scales.len(), row_scales.len());
    check_len("dequantized outputs", out.len(), tokens * rows)?;
    if tokens == 0 || rows == 0 {
        return Ok(());
    }
    if stride < tokens || acc.len() < (rows - 1) * stride + tokens {
        return Err(Error::Shape(format!(
            "dequantize: {} accumulators with a row stride of {stride} cannot hold {rows} rows of \
             {tokens} tokens",
            acc.len()
        )));
    }
    isa.vectorized(
        #[inline(always)]
        || {
            if tokens == 1 {
                let acc = acc.iter().step_by(stride);
                for ((o, &a), &r) in out.iter_mut().zip(acc).zip(row_scales) {
                    *o = dequantize_one(a, token_scales[0], r);
                }
            } else {
                transpose(acc, stride, token_scales, row_scales, out);
            }
        },
    )
}

/// The blocked transposition of [`dequantize`] (arguments checked there).
#[inline(always)]
fn transpose(
    acc: &[i32],
    stride: usize,
    token_scales: &[f32],
    row_scales: &[f32],
    out: &mut [f32],
) {
    let rows = row_scales.len();
    let mut block = [[0i32; TOKENS_BLOCK]; ROWS_BLOCK];
    let token_blocks = out
        .chunks_mut(TOKENS_BLOCK * rows)
        .zip(token_scales.chunks(TOKENS_BLOCK));
    for (b, (part, scales)) in token_blocks.enumerate() {
        let t0 = b * TOKENS_BLOCK;
        for n0 in (0..rows).step_by(ROWS_BLOCK) {
            let n1 = (n0 + ROWS_BLOCK).min(rows);
            for (n, line) in (n0..n1).zip(&mut block) {
                line[..scales.len()].copy_from_slice(&acc[n * stride + t0..][..scales.len()]);
            }
            let row_scales = &row_scales[n0..n1];
            for (i, (out, &scale)) in part.chunks_exact_mut(rows).zip(scales).enumerate() {
                for ((o, line), &r) in out[n0..n1].iter_mut().zip(&block).zip(row_scales) {
                    *o = dequantize_one(line[i], scale, r);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitlinear::testing::lcg;

    /// The plain formula, written independently of the kernel.
    fn reference(acc: &[i32], stride: usize, token_scales: &[f32], row_scales: &[f32]) -> Vec<f32> {
        let mut out = Vec::new();
        for (t, &s) in token_scales.iter().enumerate() {
            for (n, &w) in row_scales.iter().enumerate() {
                out.push(acc[n * stride + t] as f32 / s * w);
            }
        }
        out
    }

    #[test]
    fn every_level_gives_the_bits_of_the_plain_formula_on_odd_shapes() {
        let mut seed = 11u64;
        for (rows, tokens, stride) in [
            (1, 1, 1),
            (37, 1, 1),
            (37, 1, 5),
            (5, 3, 3),
            (17, 16, 16),
            (33, 17, 17),
            (40, 35, 41),
            (16, 48, 50),
        ] {
            let acc: Vec<i32> = (0..rows * stride)
                .map(|_| (lcg(&mut seed) as i32 % 200_000) - 100_000)
                .collect();
            let token_scales: Vec<f32> = (0..tokens)
                .map(|_| 0.5 + (lcg(&mut seed) % 1000) as f32 / 7.0)
                .collect();
            let row_scales: Vec<f32> = (0..rows)
                .map(|_| 0.01 + (lcg(&mut seed) % 1000) as f32 / 313.0)
                .collect();
            let want = reference(&acc, stride, &token_scales, &row_scales);
            for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
                let mut out = vec![f32::NAN; rows * tokens];
                dequantize(isa, &acc, stride, &token_scales, &row_scales, &mut out).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&out),
                    bits(&want),
                    "{isa}: {rows} rows, {tokens} tokens"
                );
                // From a later token on, as a thread that owns some of the tokens calls it.
                if tokens > TOKENS_BLOCK {
                    let mut part = vec![f32::NAN; rows * (tokens - TOKENS_BLOCK)];
                    let (acc, scales) = (&acc[TOKENS_BLOCK..], &token_scales[TOKENS_BLOCK..]);
                    dequantize(isa, acc, stride, scales, &row_scales, &mut part).unwrap();
                    assert_eq!(bits(&part), bits(&want[TOKENS_BLOCK * rows..]), "{isa}");
                }
            }
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let (acc, scales, rows) = ([1i32; 12], [1f32; 3], [1f32; 4]);
        let mut out = [0f32; 12];
        assert!(dequantize(Isa::Scalar, &acc, 3, &scales, &rows, &mut out).is_ok());
        assert!(dequantize(Isa::Scalar, &acc, 2, &scales, &rows, &mut out).is_err());
        assert!(dequantize(Isa::Scalar, &acc[..11], 3, &scales, &rows, &mut out).is_err());
        assert!(dequantize(Isa::Scalar, &acc, 3, &scales, &rows, &mut out[..11]).is_err());
        assert!(dequantize(Isa::Scalar, &acc, 3, &scales, &rows[..3], &mut out).is_err());
        for isa in Isa::ALL.into_iter().filter(|i| !i.is_supported()) {
            assert!(dequantize(isa, &acc, 3, &scales, &rows, &mut out).is_err());
        }
    }
}
