//! Upload layouts both GPU backends (wgpu, CUDA) share: ternary weights as 16 codes per u32 word
//! and the RoPE angle table. Neither backend imports the other; both import this.
//!
//! # Ternary words
//! Each output row is padded to a multiple of the backend's `row_multiple` codes (padding codes
//! are 1, value 0) and stored as u32 words of 16 codes: in word `g` of a row, byte `b`, bits
//! `2j..2j+1` hold the code of column `16g + 4j + b` (`code = value + 1`, as in the canonical
//! layout). So `(word >> 2j) & 0x03030303` yields four int8 lanes that line up with activation
//! bytes `16g + 4j .. 16g + 4j + 3`, ready for `dp4a` (CUDA) or `dot4I8Packed` (WGSL); the kernels
//! compute `Σ code·x` and subtract `Σ x`. Fused parts are stacked by rows, one scale per row.
//!
//! # RoPE table
//! `[position][cos of pairs 0..head_dim/2 ‖ sin of the same]`, f32, computed with
//! `tern_cpu::attention::rope::rope_cos_sin`, so the rotated values match the CPU bit for bit.

use super::{KvSpec, fused_in_features};
use crate::ternary::TernaryMatrix;
use anyhow::Result;
use tern_cpu::attention::rope::rope_cos_sin;

/// Codes per u32 word.
pub const CODES_PER_WORD: usize = 16;

/// Row length in codes after padding to a multiple of `row_multiple` (itself a multiple of 16).
pub const fn padded_cols(cols: usize, row_multiple: usize) -> usize {
    cols.div_ceil(row_multiple) * row_multiple
}

/// The fused `parts` (checked: at least one, equal input widths) in the word layout, rows padded
/// to a multiple of `row_multiple` codes: `(words, row_scales, in_features)`, `words` holding
/// `row_scales.len() × padded_cols(in_features, row_multiple) / 16` values.
pub fn pack_ternary(
    parts: &[&TernaryMatrix],
    row_multiple: usize,
) -> Result<(Vec<u32>, Vec<f32>, usize)> {
    debug_assert!(row_multiple.is_multiple_of(CODES_PER_WORD));
    let cols = fused_in_features(parts)?;
    let words_per_row = padded_cols(cols, row_multiple) / CODES_PER_WORD;
    let out_features: usize = parts.iter().map(|p| p.rows).sum();
    let mut words = Vec::with_capacity(out_features * words_per_row);
    let mut row_scales = Vec::with_capacity(out_features);
    let mut row = vec![0i8; cols];
    for part in parts {
        let view = part.view();
        for n in 0..part.rows {
            view.unpack_row(n, &mut row);
            for g in 0..words_per_row {
                let mut word = 0u32;
                for j in 0..4 {
                    for b in 0..4 {
                        let code = row.get(16 * g + 4 * j + b).map_or(1, |&v| (v + 1) as u32);
                        word |= code << (8 * b + 2 * j);
                    }
                }
                words.push(word);
            }
            row_scales.push(part.scale);
        }
    }
    Ok((words, row_scales, cols))
}

/// The RoPE table of `spec` (see the module documentation).
pub fn rope_table(spec: &KvSpec) -> Result<Vec<f32>> {
    let half = spec.head_dim / 2;
    let (mut cos, mut sin) = (vec![0f32; half], vec![0f32; half]);
    let mut table = Vec::with_capacity(spec.capacity * 2 * half);
    for position in 0..spec.capacity {
        rope_cos_sin(spec.rope_theta, spec.head_dim, position, &mut cos, &mut sin)?;
        table.extend_from_slice(&cos);
        table.extend_from_slice(&sin);
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_cpu::bitlinear::reference::{gemm_reference, pack};

    /// `__dp4a(a, b, c)` / `dot4I8Packed`: four signed byte products added to `c`.
    fn dp4a(a: u32, b: u32, c: i32) -> i32 {
        (0..4).fold(c, |acc, i| {
            acc + i32::from((a >> (8 * i)) as u8 as i8) * i32::from((b >> (8 * i)) as u8 as i8)
        })
    }

    /// The kernels' arithmetic on one row, word by word, on the host.
    fn kernel_dot(words: &[u32], x: &[i8]) -> i32 {
        let mut padded = x.to_vec();
        padded.resize(words.len() * 16, 0);
        let xw: Vec<u32> = padded
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]))
            .collect();
        let sum: i32 = x.iter().map(|&v| i32::from(v)).sum();
        let mut acc = 0;
        for (g, &w) in words.iter().enumerate() {
            for j in 0..4 {
                acc = dp4a((w >> (2 * j)) & 0x0303_0303, xw[4 * g + j], acc);
            }
        }
        acc - sum
    }

    #[test]
    fn shift_and_mask_decode_matches_the_reference_product() {
        let mut seed = 5u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            (seed >> 33) as u32
        };
        for row_multiple in [16, 64] {
            for (rows, cols) in [(1, 1), (3, 63), (5, 64), (4, 100), (7, 2560), (2, 6912)] {
                let values: Vec<i8> = (0..rows * cols).map(|_| (next() % 3) as i8 - 1).collect();
                let codes = pack(&values, rows, cols).unwrap();
                let m = TernaryMatrix::new("t", rows, cols, codes, 0.5).unwrap();
                let (words, scales, in_features) = pack_ternary(&[&m, &m], row_multiple).unwrap();
                assert_eq!((scales, in_features), (vec![0.5; 2 * rows], cols));
                let per_row = padded_cols(cols, row_multiple) / 16;
                assert_eq!(words.len(), 2 * rows * per_row);
                let mut x: Vec<i8> = (0..cols).map(|_| next() as u8 as i8).collect();
                x[0] = -128; // the extreme code
                let mut want = vec![0; rows];
                gemm_reference(m.view(), &x, 1, &mut want).unwrap();
                for n in 0..2 * rows {
                    let got = kernel_dot(&words[n * per_row..(n + 1) * per_row], &x);
                    assert_eq!(got, want[n % rows], "{rows}x{cols} row {n}");
                }
            }
        }
    }

    #[test]
    fn padding_codes_are_value_zero() {
        let codes = pack(&[1; 18], 1, 18).unwrap();
        let m = TernaryMatrix::new("t", 1, 18, codes, 2.0).unwrap();
        let (words, _, _) = pack_ternary(&[&m], 16).unwrap();
        assert_eq!(words.len(), 2);
        assert_eq!(words[1] & 0x0303, 0x0202, "columns 16 and 17 hold +1");
        assert_eq!(words[1] >> 16 & 0x0303, 0x0101, "padding is value 0");
    }

    #[test]
    fn rope_table_rows_are_the_cpu_angles() {
        let spec = KvSpec {
            layers: 1,
            slots: 1,
            capacity: 5,
            pages: 1,
            page_size: 16,
            kv_type: crate::backend::KvType::F32,
            heads: 2,
            kv_heads: 1,
            head_dim: 8,
            rope_theta: 10000.0,
        };
        let table = rope_table(&spec).unwrap();
        assert_eq!(table.len(), 5 * 8);
        let (mut cos, mut sin) = ([0f32; 4], [0f32; 4]);
        rope_cos_sin(10000.0, 8, 3, &mut cos, &mut sin).unwrap();
        assert_eq!(&table[24..28], &cos);
        assert_eq!(&table[28..32], &sin);
    }
}
