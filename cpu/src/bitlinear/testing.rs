//! Test support shared by the ternary kernel families' tests: random cases and the reference.

use crate::Error;
use crate::bitlinear::grouped::chunk_tokens;
use crate::bitlinear::mad::TILE_TOKENS;
use crate::bitlinear::quant::{QuantizedRows, ROW_PADDING};
use crate::bitlinear::reference::{TernaryView, gemm_reference, pack};
use crate::isa::Isa;
use std::ops::Range;

/// The distinct linear shapes (rows, cols) of BitNet b1.58 2B-4T.
const REAL_SHAPES: [(usize, usize); 4] = [(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912)];

/// The real-shape cases every kernel family is checked on, as (rows, cols, tokens, seed): each
/// shape at 1 and 3 tokens, k/v at 17 tokens (more than one token tile), and 12 rows of `down`
/// at 3 tokens past one token chunk (two chunks, the second partial).
pub fn real_shape_cases() -> impl Iterator<Item = (usize, usize, usize, u64)> {
    let shapes = REAL_SHAPES.into_iter().zip(100u64..);
    let small = shapes.flat_map(|((rows, cols), seed)| [1, 3].map(|t| (rows, cols, t, seed)));
    let down_chunk = chunk_tokens(6912usize.next_multiple_of(ROW_PADDING), TILE_TOKENS);
    small.chain([(640, 2560, 17, 7), (12, 6912, down_chunk + 3, 8)])
}

pub fn lcg(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}

/// Random ternary weights (canonical) and activations quantized from random values with the
/// extremes mixed in (quantization yields codes in -127..=127).
pub fn case(rows: usize, cols: usize, tokens: usize, seed: u64) -> (Vec<u8>, QuantizedRows) {
    let mut s = seed;
    let w: Vec<i8> = (0..rows * cols)
        .map(|_| (lcg(&mut s) % 3) as i8 - 1)
        .collect();
    let x: Vec<f32> = (0..tokens * cols)
        .map(|_| match lcg(&mut s) % 16 {
            0 => -128.0,
            1 => 127.0,
            _ => f32::from((lcg(&mut s) % 256) as u8 as i8),
        })
        .collect();
    let mut q = QuantizedRows::default();
    q.quantize(Isa::Scalar, &x, tokens, cols).unwrap();
    (pack(&w, rows, cols).unwrap(), q)
}

/// The reference product of `view` with the codes of `q`.
pub fn reference(view: TernaryView<'_>, q: &QuantizedRows) -> Vec<i32> {
    let cols = view.cols();
    let x: Vec<i8> = (0..q.rows())
        .flat_map(|t| q.row(t)[..cols].to_vec())
        .collect();
    let mut want = vec![0i32; view.rows() * q.rows()];
    gemm_reference(view, &x, q.rows(), &mut want).unwrap();
    want
}

/// Raw random bytes as canonical codes of `rows × cols`: codes of 3 (invalid, read as 0)
/// everywhere and garbage in the padding pairs of the last byte of each row.
pub fn raw_codes(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    (0..rows * crate::bitlinear::reference::row_bytes(cols))
        .map(|_| lcg(&mut s) as u8)
        .collect()
}

/// Checks a kernel family's `product(isa, rows, acc)` of `view` with `q` against the reference at
/// every supported level: whole, and split at a multiple of `row_multiple` near the middle, as
/// threads split it.
pub fn check_levels(
    view: TernaryView<'_>,
    q: &QuantizedRows,
    row_multiple: usize,
    product: impl Fn(Isa, Range<usize>, &mut [i32]) -> Result<(), Error>,
) {
    let (rows, cols, tokens) = (view.rows(), view.cols(), q.rows());
    let want = reference(view, q);
    for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
        let mut got = vec![0i32; rows * tokens];
        product(isa, 0..rows, &mut got).unwrap();
        assert!(got == want, "{isa}: {rows}x{cols}, {tokens} tokens");
        let mid = (rows / 2) / row_multiple * row_multiple;
        // Poisoned, so a split product that leaves part of its slice unwritten fails.
        got.fill(i32::MIN);
        let (lo, hi) = got.split_at_mut(mid * tokens);
        product(isa, 0..mid, lo).unwrap();
        product(isa, mid..rows, hi).unwrap();
        assert!(got == want, "{isa}: split {rows}x{cols}, {tokens} tokens");
    }
}

/// Checks that a kernel family (`pack` from the canonical layout, then `product(isa, w, rows, q,
/// acc)`) stays exact where its sums are largest: 4 rows of all −1 and of all +1 over `cols`
/// columns against activation codes of −127 everywhere, for one token and for two.
pub fn check_extremes<P>(
    cols: usize,
    pack_matrix: impl Fn(TernaryView<'_>) -> P,
    product: impl Fn(Isa, &P, Range<usize>, &QuantizedRows, &mut [i32]) -> Result<(), Error>,
) {
    let mut q = QuantizedRows::default();
    // One token and a batch of two (the kernels for one token and for a few differ).
    for tokens in [1, 2] {
        // absmax 128 → scale 127/128: every code is round(-127) = -127.
        q.quantize(Isa::Scalar, &vec![-128f32; tokens * cols], tokens, cols)
            .unwrap();
        for value in [-1i8, 1] {
            let codes = pack(&vec![value; 4 * cols], 4, cols).unwrap();
            let view = TernaryView::new(&codes, 4, cols).unwrap();
            let want = vec![-127 * cols as i32 * i32::from(value); 4 * tokens];
            assert_eq!(reference(view, &q), want);
            let packed = pack_matrix(view);
            for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
                let mut acc = vec![0i32; 4 * tokens];
                product(isa, &packed, 0..4, &q, &mut acc).unwrap();
                assert_eq!(
                    acc, want,
                    "{isa}: {value} over {cols} columns, {tokens} tokens"
                );
            }
        }
    }
}

/// Checks that a kernel family's product (as in [`check_extremes`]) refuses, on an 8 × `cols`
/// matrix, a row range that starts inside a group or passes the rows, accumulators of the wrong
/// length, activations of another width, and levels this CPU lacks.
pub fn check_bad_arguments<P>(
    cols: usize,
    pack_matrix: impl Fn(TernaryView<'_>) -> P,
    product: impl Fn(Isa, &P, Range<usize>, &QuantizedRows, &mut [i32]) -> Result<(), Error>,
) {
    let codes = pack(&vec![0; 8 * cols], 8, cols).unwrap();
    let packed = pack_matrix(TernaryView::new(&codes, 8, cols).unwrap());
    let mut q = QuantizedRows::default();
    q.quantize(Isa::Scalar, &vec![1.0; cols], 1, cols).unwrap();
    let mut acc = [0i32; 8];
    assert!(product(Isa::Scalar, &packed, 0..8, &q, &mut acc).is_ok());
    assert!(product(Isa::Scalar, &packed, 2..8, &q, &mut acc[..6]).is_err());
    assert!(product(Isa::Scalar, &packed, 0..9, &q, &mut acc).is_err());
    assert!(product(Isa::Scalar, &packed, 0..8, &q, &mut acc[..7]).is_err());
    for isa in Isa::ALL.into_iter().filter(|i| !i.is_supported()) {
        assert!(product(isa, &packed, 0..8, &q, &mut acc).is_err());
    }
    q.quantize(Isa::Scalar, &vec![1.0; cols / 2], 1, cols / 2)
        .unwrap();
    assert!(product(Isa::Scalar, &packed, 0..8, &q, &mut acc).is_err());
}
