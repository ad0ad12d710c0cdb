//! Host-side repacking of ternary weights into the layout of `cuda/ternary.cu`.
//!
//! Each output row is padded to [`padded_cols`] codes (a multiple of [`CHUNK`] = 64, one 16-byte
//! load; padding codes are 1, value 0) and stored as u32 words of 16 codes. In word `g` of a row,
//! byte `b`, bits `2j..2j+1` hold the code of column `16g + 4j + b` (`code = value + 1`). So
//! `(word >> 2j) & 0x03030303` yields four int8 lanes that line up with activation bytes
//! `16g + 4j .. 16g + 4j + 3`, ready for `dp4a`. The kernels compute `Σ code·x` and subtract `Σ x`.

use tern_cpu::ternary::TernaryView;

/// Weights per 16-byte load of a row.
pub const CHUNK: usize = 64;

/// Row length in codes (and activation bytes) after padding.
pub const fn padded_cols(cols: usize) -> usize {
    cols.div_ceil(CHUNK) * CHUNK
}

/// Appends the rows of `w` to `out` in the kernel layout: `rows × padded_cols / 16` words.
pub fn repack(w: TernaryView<'_>, out: &mut Vec<u32>) {
    let cols = w.cols();
    let words = padded_cols(cols) / 16;
    let mut row = vec![0i8; cols];
    out.reserve(w.rows() * words);
    for n in 0..w.rows() {
        w.unpack_row(n, &mut row);
        for g in 0..words {
            let mut word = 0u32;
            for j in 0..4 {
                for b in 0..4 {
                    let k = 16 * g + 4 * j + b;
                    let code = row.get(k).map_or(1, |&v| (v + 1) as u32);
                    word |= code << (8 * b + 2 * j);
                }
            }
            out.push(word);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_cpu::ternary::{gemm_reference, pack};

    /// `__dp4a(a, b, c)`: four signed byte products added to `c`.
    fn dp4a(a: u32, b: u32, c: i32) -> i32 {
        (0..4).fold(c, |acc, i| {
            acc + i32::from((a >> (8 * i)) as u8 as i8) * i32::from((b >> (8 * i)) as u8 as i8)
        })
    }

    /// The GEMV kernel's arithmetic, word by word, on the host.
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
        for (rows, cols) in [(1, 1), (3, 63), (5, 64), (4, 100), (7, 2560), (2, 6912)] {
            let values: Vec<i8> = (0..rows * cols).map(|_| (next() % 3) as i8 - 1).collect();
            let codes = pack(&values, rows, cols).unwrap();
            let view = TernaryView::new(&codes, rows, cols).unwrap();
            let mut words = Vec::new();
            repack(view, &mut words);
            let per_row = padded_cols(cols) / 16;
            assert_eq!(words.len(), rows * per_row);
            let mut x: Vec<i8> = (0..cols).map(|_| next() as u8 as i8).collect();
            x[0] = -128; // the extreme code
            let mut want = vec![0; rows];
            gemm_reference(view, &x, 1, &mut want).unwrap();
            for n in 0..rows {
                let got = kernel_dot(&words[n * per_row..(n + 1) * per_row], &x);
                assert_eq!(got, want[n], "{rows}x{cols} row {n}");
            }
        }
    }
}
