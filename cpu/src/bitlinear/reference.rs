//! The canonical packed ternary layout and the scalar reference W1.58A8 matrix product.
//!
//! # Layout
//! A ternary matrix of `rows` (outputs) × `cols` (inputs) with values in {-1, 0, +1} is stored
//! row-major as 2-bit codes, `code = value + 1` (0 → -1, 1 → 0, 2 → +1; 3 never occurs).
//! Each row takes `row_bytes(cols) = ceil(cols / 4)` bytes; element `k` of row `n` sits in byte
//! `n * row_bytes + k / 4` at bits `2 * (k % 4) .. 2 * (k % 4) + 1` (least significant pair first).
//! Padding codes past `cols` in a row's last byte are 1 (value 0).
//!
//! This layout is independent of any SIMD width: it is what loaders produce and what every backend
//! repacks from at upload.
//!
//! # Reference product
//! [`gemm_reference`] computes `acc[n][t] = Σ_k value(n, k) · x[t][k]` in i32 for int8 activations
//! `x`, exactly (no rounding anywhere). It is deliberately plain: each weight row is unpacked once
//! into int8 and reused for every token, and the dot products are written so the compiler can
//! vectorize them, but nothing else. Every other ternary kernel must match it bit for bit.

use crate::{Error, check_len};

/// Bytes per packed row of `cols` ternary values.
pub const fn row_bytes(cols: usize) -> usize {
    cols.div_ceil(4)
}

/// A borrowed packed ternary matrix whose length has been checked against its shape.
#[derive(Clone, Copy, Debug)]
pub struct TernaryView<'a> {
    codes: &'a [u8],
    rows: usize,
    cols: usize,
}

impl<'a> TernaryView<'a> {
    /// Wraps `codes` as a `rows × cols` packed matrix.
    pub fn new(codes: &'a [u8], rows: usize, cols: usize) -> Result<Self, Error> {
        check_len("packed ternary matrix", codes.len(), rows * row_bytes(cols))?;
        Ok(Self { codes, rows, cols })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn codes(&self) -> &'a [u8] {
        self.codes
    }

    /// Rows `start..end` as a matrix of their own.
    pub fn row_range(&self, start: usize, end: usize) -> Result<Self, Error> {
        if start > end || end > self.rows {
            return Err(Error::Shape(format!(
                "row range {start}..{end} outside a matrix of {} rows",
                self.rows
            )));
        }
        let rb = row_bytes(self.cols);
        Ok(Self {
            codes: &self.codes[start * rb..end * rb],
            rows: end - start,
            cols: self.cols,
        })
    }

    /// The value (-1, 0 or +1) at row `n`, column `k`; codes of 3 read as 0.
    pub fn get(&self, n: usize, k: usize) -> i8 {
        let byte = self.codes[n * row_bytes(self.cols) + k / 4];
        decode_code((byte >> (2 * (k % 4))) & 3)
    }

    /// Unpacks row `n` into `out` (length `cols`) as int8 values.
    pub fn unpack_row(&self, n: usize, out: &mut [i8]) {
        let rb = row_bytes(self.cols);
        let row = &self.codes[n * rb..(n + 1) * rb];
        let out = &mut out[..self.cols];
        // Whole bytes through a table of their four values (loading is this copy's hot loop).
        let mut quads = out.chunks_exact_mut(4);
        for (quad, &byte) in (&mut quads).zip(row) {
            quad.copy_from_slice(&BYTE_VALUES[usize::from(byte)]);
        }
        let tail = quads.into_remainder();
        let last = BYTE_VALUES[usize::from(row.last().copied().unwrap_or(0))];
        tail.copy_from_slice(&last[..tail.len()]);
    }

    /// True if some code equals 3, which no valid ternary matrix contains.
    pub fn has_invalid_code(&self) -> bool {
        // A pair is 3 when both its bits are set; an OR over a chunk vectorizes, unlike an early
        // exit per byte.
        self.codes
            .chunks(4096)
            .any(|c| c.iter().fold(0, |any, &b| any | (b & (b >> 1) & 0x55)) != 0)
    }
}

/// Maps a 2-bit code to its value; the invalid code 3 maps to 0.
const fn decode_code(code: u8) -> i8 {
    match code {
        0 => -1,
        2 => 1,
        _ => 0,
    }
}

/// The four values of each code byte, least significant pair first.
const BYTE_VALUES: [[i8; 4]; 256] = {
    let mut table = [[0i8; 4]; 256];
    let mut b = 0;
    while b < 256 {
        let mut i = 0;
        while i < 4 {
            table[b][i] = decode_code(((b >> (2 * i)) & 3) as u8);
            i += 1;
        }
        b += 1;
    }
    table
};

/// Packs int8 values in {-1, 0, +1} (row-major `rows × cols`) into the canonical layout.
pub fn pack(values: &[i8], rows: usize, cols: usize) -> Result<Vec<u8>, Error> {
    check_len("ternary values", values.len(), rows * cols)?;
    let rb = row_bytes(cols);
    let mut codes = vec![0x55u8; rows * rb]; // 0b01 in every pair: value 0
    for (n, (row, out)) in values
        .chunks_exact(cols.max(1))
        .zip(codes.chunks_exact_mut(rb.max(1)))
        .enumerate()
        .take(rows)
    {
        // Four values a word, in a loop that vectorizes (loading packs every weight here): the
        // bytes `v + 1` without carries between them, any code above 2 (a value outside -1..=1:
        // a bit above the low two, or both of them) remembered, and the codes at bits 0, 8, 16,
        // 24 shifted to bits 0, 2, 4, 6.
        let mut invalid = 0u32;
        let mut quads = row.chunks_exact(4);
        for (byte, q) in out.iter_mut().zip(&mut quads) {
            let w = u32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8]);
            let c = ((w & 0x7f7f_7f7f) + 0x0101_0101) ^ (w & 0x8080_8080);
            invalid |= (c & 0xfcfc_fcfc) | (c & (c >> 1) & 0x0101_0101);
            *byte = (c | (c >> 6) | (c >> 12) | (c >> 18)) as u8;
        }
        for (i, &v) in quads.remainder().iter().enumerate() {
            let c = v.wrapping_add(1) as u8;
            invalid |= u32::from(c > 2);
            out[rb - 1] = (out[rb - 1] & !(3 << (2 * i))) | ((c & 3) << (2 * i));
        }
        if invalid != 0 {
            let k = row
                .iter()
                .position(|v| !(-1..=1).contains(v))
                .expect("a value outside");
            return Err(Error::Shape(format!(
                "value {} at ({n}, {k}) is not ternary",
                row[k]
            )));
        }
    }
    Ok(codes)
}

/// Reference product: `acc[n * tokens + t] = Σ_k W[n][k] · x[t * cols + k]` (output row-major by
/// weight row, so that disjoint row ranges write disjoint, contiguous slices of `acc`).
pub fn gemm_reference(
    w: TernaryView<'_>,
    x: &[i8],
    tokens: usize,
    acc: &mut [i32],
) -> Result<(), Error> {
    check_len("activation codes", x.len(), tokens * w.cols)?;
    check_len("accumulators", acc.len(), w.rows * tokens)?;
    let mut row = vec![0i8; w.cols];
    for n in 0..w.rows {
        w.unpack_row(n, &mut row);
        for t in 0..tokens {
            acc[n * tokens + t] = dot_i8(&row, &x[t * w.cols..(t + 1) * w.cols]);
        }
    }
    Ok(())
}

/// Exact int8 dot product with an i32 result (inputs of equal length).
fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&p, &q)| i32::from(p) * i32::from(q))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small deterministic generator so the tests need no dependency.
    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    #[test]
    fn pack_then_read_back_every_value() {
        let mut seed = 7;
        for (rows, cols) in [(1, 1), (3, 5), (8, 256), (5, 7)] {
            let values: Vec<i8> = (0..rows * cols)
                .map(|_| (lcg(&mut seed) % 3) as i8 - 1)
                .collect();
            let codes = pack(&values, rows, cols).unwrap();
            let view = TernaryView::new(&codes, rows, cols).unwrap();
            assert!(!view.has_invalid_code());
            let mut row = vec![0i8; cols];
            for n in 0..rows {
                view.unpack_row(n, &mut row);
                assert_eq!(row, values[n * cols..(n + 1) * cols]);
                for k in 0..cols {
                    assert_eq!(view.get(n, k), values[n * cols + k]);
                }
            }
        }
    }

    #[test]
    fn an_invalid_code_is_found_in_any_pair_of_any_byte() {
        let cols = 4 * 5000; // bytes past the first chunk of 4096 the check ORs together
        let valid = pack(&vec![1; cols], 1, cols).unwrap();
        assert!(
            !TernaryView::new(&valid, 1, cols)
                .unwrap()
                .has_invalid_code()
        );
        for at in [0, 4095, 4096, 4999] {
            for pair in 0..4 {
                let mut codes = valid.clone();
                codes[at] |= 3 << (2 * pair);
                let view = TernaryView::new(&codes, 1, cols).unwrap();
                assert!(view.has_invalid_code(), "byte {at}, pair {pair}");
            }
        }
    }

    #[test]
    fn every_non_ternary_value_is_refused_in_a_word_and_in_the_tail() {
        for v in i8::MIN..=i8::MAX {
            for k in 0..6 {
                let mut values = [0i8; 6];
                values[k] = v;
                let packed = pack(&values, 1, 6);
                assert_eq!(packed.is_ok(), (-1..=1).contains(&v), "value {v} at {k}");
            }
        }
    }

    #[test]
    fn code_order_is_least_significant_pair_first() {
        // Values +1, -1, 0, +1 -> codes 2, 0, 1, 2 -> 0b10_01_00_10.
        assert_eq!(pack(&[1, -1, 0, 1], 1, 4).unwrap(), vec![0b1001_0010]);
    }

    #[test]
    fn reference_matches_a_naive_triple_loop() {
        let mut seed = 11;
        for (rows, cols, tokens) in [(4, 8, 1), (7, 13, 3), (16, 64, 17)] {
            let w: Vec<i8> = (0..rows * cols)
                .map(|_| (lcg(&mut seed) % 3) as i8 - 1)
                .collect();
            let x: Vec<i8> = (0..tokens * cols)
                .map(|_| (lcg(&mut seed) % 256) as u8 as i8)
                .collect();
            let codes = pack(&w, rows, cols).unwrap();
            let mut acc = vec![0; rows * tokens];
            gemm_reference(
                TernaryView::new(&codes, rows, cols).unwrap(),
                &x,
                tokens,
                &mut acc,
            )
            .unwrap();
            for n in 0..rows {
                for t in 0..tokens {
                    let mut want = 0i32;
                    for k in 0..cols {
                        want += w[n * cols + k] as i32 * x[t * cols + k] as i32;
                    }
                    assert_eq!(acc[n * tokens + t], want, "row {n} token {t}");
                }
            }
        }
    }

    #[test]
    fn extreme_codes_do_not_overflow() {
        let cols = 6912;
        let codes = pack(&vec![-1; cols], 1, cols).unwrap();
        let x = vec![-128i8; cols];
        let mut acc = [0];
        gemm_reference(TernaryView::new(&codes, 1, cols).unwrap(), &x, 1, &mut acc).unwrap();
        assert_eq!(acc[0], 128 * cols as i32);
    }

    #[test]
    fn wrong_lengths_are_errors() {
        assert!(TernaryView::new(&[0; 3], 2, 8).is_err());
        let codes = pack(&[0; 8], 2, 4).unwrap();
        let view = TernaryView::new(&codes, 2, 4).unwrap();
        assert!(gemm_reference(view, &[0; 7], 2, &mut [0; 4]).is_err());
        assert!(gemm_reference(view, &[0; 8], 2, &mut [0; 3]).is_err());
        assert!(view.row_range(1, 3).is_err());
        assert!(pack(&[2, 0, 0, 0], 1, 4).is_err());
    }
}
