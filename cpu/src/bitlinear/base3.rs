//! Base-3 multiply-add ternary kernels (W1.58A8): five weights per byte, 1.6 bits per weight instead
//! of the 2 of [`crate::bitlinear::mad`], integer-exact.
//!
//! # Encoding
//! Five codes `c_0..c_4 ∈ {0, 1, 2}` (`code = value + 1`) form `v = Σ_i c_i · 3^(4−i)` (0..243),
//! stored as the byte `q = ⌈256 v / 243⌉`. Reading it back: `x_0 = q`, and for `i = 0..5`
//! `3 x_i = 256 c_i + x_{i+1}`, that is `c_i = ⌊3 x_i / 256⌋` and `x_{i+1} = 3 x_i mod 256`: `q / 256`
//! approximates `v / 243` from above by less than `1 / 256`, so each multiplication by 3 moves the
//! next base-3 digit above the binary point (checked for all 243 patterns by a test).
//!
//! # The arithmetic
//! With the identity above, `Σ_k c_ik a_k = (3 Σ_k x_ik a_k − Σ_k x_{i+1,k} a_k) / 256`: the
//! digits never need extracting. The AVX-512 VNNI GEMV keeps two accumulators per row, `vpdpbusd`
//! of `x_i` (unsigned bytes) with plane `i`'s activations and of `x_{i+1}` with the same, where
//! `x_{i+1}` costs two byte additions; the row's sum of codes times activations is then
//! `(3 A − B) / 256`. Its true value `256 Σ c a` lies in `−2³¹..2³¹` over at most 2¹⁵ columns
//! (`|256 Σ c a| ≤ 256 · 2 · 128 · 2¹⁵ = 2³¹`, reached only as `−2³¹`: every code 2 against −128),
//! so computing it in wrapping i32 gives it exactly and the arithmetic shift divides exactly. A
//! wider row (a 100B model's `down` has 45,568 inputs) is summed in segments of
//! [`SEGMENT_BLOCKS`] blocks, each reduced exactly on its own. As in [`crate::bitlinear::mad`],
//! `Σ value · a = Σ code · a − Σ a`.
//!
//! # Layout ([`PackedBase3`], repacked at upload from the canonical layout)
//! [`crate::bitlinear::grouped`]'s, with blocks of [`BLOCK_COLS`] = 320 columns (columns padded with value 0;
//! padding rows hold zero bytes, whose outputs no product writes). Byte `j` of a chunk holds the
//! codes of columns `block · 320 + 64 i + j` for `i = 0..5` (`c_i` above), so a contiguous run of
//! bytes gives, for each `i`, the codes of consecutive columns.
//!
//! # Which kernel runs
//! One token at [`Isa::Avx512`] or [`Isa::AvxVnni`]: the direct GEMV above (64 or 32 bytes per
//! `vpdpbusd`). Two to `DIRECT_TOKENS` tokens at [`Isa::Avx512`] (a few sequences decoding
//! together): each plane's codes `⌊3 x / 256⌋` extracted in registers once for up to 4 tokens and
//! multiplied with each (`x86::gemm_group`). Otherwise (prompts, and the other levels, whose byte
//! products are signed × signed or saturate on operands up to 255) each group of 4 rows is decoded into
//! [`crate::bitlinear::mad`]'s layout in a per-thread buffer and [`crate::bitlinear::mad`]'s
//! micro-kernels run over it, so a prompt decodes each weight once per chunk of tokens (as many as
//! fit in L2).

use crate::Error;
use crate::bitlinear::grouped::{CHUNK, Coding, Grouped, ROW_GROUP};
use crate::bitlinear::mad::{self, K_BLOCK};
use crate::bitlinear::quant::QuantizedRows;
use crate::bitlinear::reference::TernaryView;
use crate::isa::Isa;
use std::cell::RefCell;
use std::ops::Range;

/// Columns per weight block: five planes of 64.
pub const BLOCK_COLS: usize = PLANES * CHUNK;
/// Blocks the GEMV sums before reducing: the most whole blocks within 2¹⁵ columns (see the module
/// documentation).
#[cfg(target_arch = "x86_64")]
const SEGMENT_BLOCKS: usize = (1 << 15) / BLOCK_COLS;
/// Codes per byte.
const PLANES: usize = 5;
/// Tokens up to which a batch runs the direct GEMM ([`x86::gemm_group`]) at the AVX-512 level
/// instead of decoding each group into the multiply-add layout: it reads each weight byte once per
/// [`TOKENS_AT_ONCE`] tokens and extracts its codes in registers, where the decoded layout costs a
/// write and a read of every weight and the multiply-add kernel's own unpacking.
#[cfg(target_arch = "x86_64")]
pub const DIRECT_TOKENS: usize = 8;
/// Tokens [`x86::gemm_group`] multiplies with each group's codes while they sit in registers: 4
/// rows × 4 tokens of accumulators, beside the rows' bytes and codes, fill the 32 vector registers.
#[cfg(target_arch = "x86_64")]
const TOKENS_AT_ONCE: usize = 4;

/// One block's chunk: byte `j` holds the codes of columns `64 i + j` of `block` (values), as
/// `⌈256 v / 243⌉` (see the module documentation), in loops over contiguous bytes that vectorize
/// (loading repacks every weight here).
fn encode_block(block: &[i8], chunk: &mut [u8]) {
    let mut v = [0u8; CHUNK];
    for plane in block.chunks_exact(CHUNK) {
        for (v, &value) in v.iter_mut().zip(plane) {
            // At most 3 · 80 + 2 = 242.
            *v = 3 * *v + (value + 1) as u8;
        }
    }
    for (byte, &v) in chunk.iter_mut().zip(&v) {
        *byte = (256 * u32::from(v)).div_ceil(243) as u8;
    }
}

/// `⌊3 x / 256⌋`: the code read from `x_i` (see the module documentation), as two comparisons
/// that vectorize.
#[inline(always)]
fn code_of(x: u8) -> u8 {
    u8::from(x > 85) + u8::from(x > 170)
}

/// `3 x mod 256`: `x_{i+1}` from `x_i`.
#[inline(always)]
fn next(x: u8) -> u8 {
    x.wrapping_add(x).wrapping_add(x)
}

/// The base-3 coding of [`Grouped`] (see the module documentation).
#[derive(Clone, Debug)]
pub struct Base3;

impl Coding for Base3 {
    const BLOCK_COLS: usize = BLOCK_COLS;
    const NAME: &'static str = "base-3 ternary";
}

/// A ternary matrix in the base-3 layout (see the module documentation).
pub type PackedBase3 = Grouped<Base3>;

impl PackedBase3 {
    /// Repacks a canonical matrix (codes of 3, which validated matrices never hold, read as 0).
    pub fn from_canonical(w: TernaryView<'_>) -> Self {
        let (rows, cols) = (w.rows(), w.cols());
        let mut packed = Self::zeroed(rows, cols);
        // One row's values padded with zeros to whole blocks.
        let mut values = vec![0i8; packed.blocks() * BLOCK_COLS];
        for n in 0..rows {
            w.unpack_row(n, &mut values[..cols]);
            for (b, block) in values.chunks_exact(BLOCK_COLS).enumerate() {
                encode_block(block, packed.chunk_mut(n, b));
            }
        }
        packed
    }

    /// Writes group `g` in [`crate::bitlinear::mad`]'s layout with `mad_blocks` blocks into `out` (columns
    /// past this layout's padding read as value 0). Plain byte loops, vectorized by
    /// [`Isa::vectorized`].
    #[inline(always)]
    fn decode_group(&self, g: usize, mad_blocks: usize, out: &mut [u8]) {
        let group = self.group(g);
        let segments = mad_blocks * 4;
        out.fill(0);
        // Column segments of 64: segment `s` is plane `s % 5` of block `s / 5` here and plane
        // `s % 4` of block `s / 4` there.
        let at = |s: usize, r: usize| ((s / 4) * ROW_GROUP + r) * CHUNK;
        for b in 0..self.blocks() {
            for r in 0..ROW_GROUP {
                let mut x = [0u8; CHUNK];
                x.copy_from_slice(&group[(b * ROW_GROUP + r) * CHUNK..][..CHUNK]);
                for s in b * PLANES..((b + 1) * PLANES).min(segments) {
                    let shift = 2 * (s % 4);
                    for (d, x) in out[at(s, r)..][..CHUNK].iter_mut().zip(&mut x) {
                        *d |= code_of(*x) << shift;
                        *x = next(*x);
                    }
                }
            }
        }
        // Segments past this layout's blocks: code 1 (value 0).
        for s in self.blocks() * PLANES..segments {
            for r in 0..ROW_GROUP {
                let shift = 2 * (s % 4);
                out[at(s, r)..][..CHUNK]
                    .iter_mut()
                    .for_each(|d| *d |= 1 << shift);
            }
        }
    }
}

thread_local! {
    /// One group decoded into [`crate::bitlinear::mad`]'s layout, reused by every call on this thread.
    static DECODED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// `acc[(n - rows.start) · tokens + t] = Σ_k W[n][k] · x[t][k]` for `n` in `rows`, exactly.
///
/// `rows.start` must be a multiple of [`ROW_GROUP`] (so threads split on group boundaries); the
/// output is row-major by weight row, so disjoint row ranges write disjoint slices.
pub fn gemm(
    isa: Isa,
    w: &PackedBase3,
    rows: Range<usize>,
    x: &QuantizedRows,
    acc: &mut [i32],
) -> Result<(), Error> {
    let mad_blocks = w.cols().div_ceil(K_BLOCK);
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx512 | Isa::AvxVnni) && x.rows() == 1 {
        let (x_row, sum) = (x.row(0), x.sums()[0]);
        if x_row.len() < w.blocks() * BLOCK_COLS {
            return Err(Error::Shape(format!(
                "base-3 gemv: {} activation codes for {} blocks of {BLOCK_COLS}",
                x_row.len(),
                w.blocks()
            )));
        }
        return w.for_each_group(isa, rows, x, acc, 1, |g, _, out| {
            out.iter_mut().for_each(|a| *a = -sum);
            for first in (0..w.blocks()).step_by(SEGMENT_BLOCKS) {
                let blocks = SEGMENT_BLOCKS.min(w.blocks() - first);
                // Block `b` of a group starts at byte `b · ROW_GROUP · CHUNK`.
                let group = &w.group(g)[first * ROW_GROUP * CHUNK..];
                let x_row = &x_row[first * BLOCK_COLS..];
                // SAFETY: `for_each_group` checked the level (AVX-512 VNNI or AVX-VNNI); `group`
                // holds the `blocks` blocks from `first` on, and the padded row at least
                // `(first + blocks) · BLOCK_COLS` codes (above).
                let dots = unsafe {
                    if isa == Isa::Avx512 {
                        x86::gemv_group(group, blocks, x_row)
                    } else {
                        x86::gemv_group_avxvnni(group, blocks, x_row)
                    }
                };
                for (a, dot) in out.iter_mut().zip(dots) {
                    *a += dot;
                }
            }
            Ok(())
        });
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && (2..=DIRECT_TOKENS).contains(&x.rows()) {
        let tokens = x.rows();
        if let Some(short) = (0..tokens).find(|&t| x.row(t).len() < w.blocks() * BLOCK_COLS) {
            return Err(Error::Shape(format!(
                "base-3 gemm: {} activation codes in row {short} for {} blocks of {BLOCK_COLS}",
                x.row(short).len(),
                w.blocks()
            )));
        }
        return w.for_each_group(isa, rows, x, acc, 1, |g, _, out| {
            let rows_here = out.len() / tokens;
            for t0 in (0..tokens).step_by(TOKENS_AT_ONCE) {
                let n = TOKENS_AT_ONCE.min(tokens - t0);
                let row = |t: usize| x.row(t0 + t.min(n - 1));
                let x_rows = [row(0), row(1), row(2), row(3)];
                // SAFETY: the level is AVX-512 with VNNI (checked by `for_each_group`, which also
                // checked that the group holds `w.blocks()` blocks); every row holds at least
                // `w.blocks() · BLOCK_COLS` codes (above).
                let dots = unsafe {
                    match n {
                        1 => x86::gemm_group::<1>(w.group(g), w.blocks(), &x_rows),
                        2 => x86::gemm_group::<2>(w.group(g), w.blocks(), &x_rows),
                        3 => x86::gemm_group::<3>(w.group(g), w.blocks(), &x_rows),
                        _ => x86::gemm_group::<4>(w.group(g), w.blocks(), &x_rows),
                    }
                };
                for (r, dots) in dots.iter().enumerate().take(rows_here) {
                    for (t, &dot) in dots.iter().enumerate().take(n) {
                        out[r * tokens + t0 + t] = dot.wrapping_sub(x.sums()[t0 + t]);
                    }
                }
            }
            Ok(())
        });
    }
    DECODED.with_borrow_mut(|decoded| {
        decoded.resize(mad_blocks * ROW_GROUP * CHUNK, 0);
        w.for_each_group(isa, rows, x, acc, mad::TILE_TOKENS, |g, chunk, out| {
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx512 {
                // SAFETY: `for_each_group` checked the level (AVX-512BW); the group holds
                // `w.blocks()` blocks of 4 chunks and `decoded` `mad_blocks` (resized above).
                unsafe { x86::decode_group(w.group(g), w.blocks(), mad_blocks, decoded) };
                return mad::group_gemm(isa, decoded, mad_blocks, x, chunk, out);
            }
            isa.vectorized(
                #[inline(always)]
                || w.decode_group(g, mad_blocks, decoded),
            )?;
            mad::group_gemm(isa, decoded, mad_blocks, x, chunk, out)
        })
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BLOCK_COLS, CHUNK, PLANES, ROW_GROUP, TOKENS_AT_ONCE};
    use crate::bitlinear::mad::x86::hsum_avx2;
    use crate::isa::{PREFETCH_AHEAD, prefetch};
    use std::arch::x86_64::*;

    /// Block `b`'s chunk of each of the group's 4 rows, the lines [`PREFETCH_AHEAD`] further on
    /// asked for.
    ///
    /// # Safety
    /// The CPU supports AVX-512F; `group` holds more than `b` blocks of 4 chunks.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block_rows(group: &[u8], b: usize) -> [__m512i; ROW_GROUP] {
        let at = |r: usize| (b * ROW_GROUP + r) * CHUNK;
        for r in 0..ROW_GROUP {
            prefetch(group.as_ptr().wrapping_add(at(r) + PREFETCH_AHEAD));
        }
        // SAFETY: block `b` of the group is in bounds (contract).
        std::array::from_fn(|r| unsafe { _mm512_loadu_si512(group.as_ptr().add(at(r)).cast()) })
    }

    /// `Σ_k code[r][k] · x[k]` for the 4 rows of one group (see the module documentation).
    ///
    /// # Safety
    /// The CPU supports AVX-512 VNNI; `group` holds `blocks` blocks of 4 chunks and `x` at least
    /// `blocks · BLOCK_COLS` codes. Exact for `blocks ≤ SEGMENT_BLOCKS`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn gemv_group(group: &[u8], blocks: usize, x: &[i8]) -> [i32; ROW_GROUP] {
        // `three[r]` sums `x_i · a`, `next[r]` sums `x_{i+1} · a`, over every plane `i`.
        let mut three = [_mm512_setzero_si512(); ROW_GROUP];
        let mut next = [_mm512_setzero_si512(); ROW_GROUP];
        for b in 0..blocks {
            // SAFETY: the group holds `blocks` blocks of 4 chunks (contract).
            let mut w = unsafe { block_rows(group, b) };
            for i in 0..PLANES {
                // SAFETY: `x` holds `blocks · BLOCK_COLS` codes (contract).
                let a = unsafe {
                    _mm512_loadu_si512(x.as_ptr().add(b * BLOCK_COLS + CHUNK * i).cast())
                };
                for r in 0..ROW_GROUP {
                    three[r] = _mm512_dpbusd_epi32(three[r], w[r], a);
                    // 3 x mod 256, byte by byte.
                    w[r] = _mm512_add_epi8(_mm512_add_epi8(w[r], w[r]), w[r]);
                    next[r] = _mm512_dpbusd_epi32(next[r], w[r], a);
                }
            }
        }
        std::array::from_fn(|r| {
            let t = three[r];
            let sum = _mm512_sub_epi32(_mm512_add_epi32(_mm512_add_epi32(t, t), t), next[r]);
            // Exact in wrapping i32 (see the module documentation); the shift divides exactly.
            _mm512_reduce_add_epi32(sum) >> 8
        })
    }

    /// `dots[r][t] = Σ_k code[r][k] · x_t[k]` for the 4 rows of one group and the first `T` rows of
    /// `x` (`T ≤ 4`; the other columns of `dots` are 0): each plane's codes `⌊3 x / 256⌋`
    /// extracted once (two unsigned comparisons) and multiplied with every token's activations by
    /// `vpdpbusd` (codes 0..=2 as unsigned bytes: `|Σ| ≤ 2 · 128 · cols`, so no sum wraps below
    /// 2²³ columns).
    ///
    /// # Safety
    /// The CPU supports AVX-512 VNNI; `group` holds `blocks` blocks of 4 chunks and each of the
    /// first `T` rows of `x` at least `blocks · BLOCK_COLS` codes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn gemm_group<const T: usize>(
        group: &[u8],
        blocks: usize,
        x: &[&[i8]; TOKENS_AT_ONCE],
    ) -> [[i32; TOKENS_AT_ONCE]; ROW_GROUP] {
        let (third, two_thirds) = (_mm512_set1_epi8(85), _mm512_set1_epi8(170u8 as i8));
        let one = _mm512_set1_epi8(1);
        let mut acc = [[_mm512_setzero_si512(); T]; ROW_GROUP];
        for b in 0..blocks {
            // SAFETY: the group holds `blocks` blocks of 4 chunks (contract).
            let mut w = unsafe { block_rows(group, b) };
            for i in 0..PLANES {
                let codes: [__m512i; ROW_GROUP] = std::array::from_fn(|r| {
                    let c = _mm512_maskz_mov_epi8(_mm512_cmpgt_epu8_mask(w[r], third), one);
                    _mm512_mask_add_epi8(c, _mm512_cmpgt_epu8_mask(w[r], two_thirds), c, one)
                });
                for t in 0..T {
                    // SAFETY: row `t < T` holds `blocks · BLOCK_COLS` codes (contract).
                    let a = unsafe {
                        _mm512_loadu_si512(x[t].as_ptr().add(b * BLOCK_COLS + CHUNK * i).cast())
                    };
                    for r in 0..ROW_GROUP {
                        acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], codes[r], a);
                    }
                }
                for w in &mut w {
                    // 3 x mod 256, byte by byte.
                    *w = _mm512_add_epi8(_mm512_add_epi8(*w, *w), *w);
                }
            }
        }
        let mut dots = [[0; TOKENS_AT_ONCE]; ROW_GROUP];
        for (dots, acc) in dots.iter_mut().zip(&acc) {
            for (dot, &acc) in dots.iter_mut().zip(acc) {
                *dot = _mm512_reduce_add_epi32(acc);
            }
        }
        dots
    }

    /// [`PackedBase3::decode_group`](super::PackedBase3) on 512-bit registers: each output chunk
    /// (4 planes of 2-bit codes) is assembled in a register and stored once, where the plain loop
    /// reads and writes it back per plane. Segment `s` of 64 columns is plane `s % 5` of block
    /// `s / 5` here and plane `s % 4` of block `s / 4` there; its code `⌊3 x / 256⌋` is two
    /// unsigned comparisons, each adding the plane's bit where it holds; segments past this
    /// layout's blocks get code 1 (value 0).
    ///
    /// # Safety
    /// The CPU supports AVX-512BW; `group` holds `blocks` blocks of 4 chunks and `out`
    /// `mad_blocks` blocks of 4 chunks.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn decode_group(group: &[u8], blocks: usize, mad_blocks: usize, out: &mut [u8]) {
        assert!(group.len() >= blocks * ROW_GROUP * CHUNK);
        assert!(out.len() >= mad_blocks * ROW_GROUP * CHUNK);
        let (third, two_thirds) = (_mm512_set1_epi8(85), _mm512_set1_epi8(170u8 as i8));
        let mut x = [_mm512_setzero_si512(); ROW_GROUP];
        for mb in 0..mad_blocks {
            let mut d = [_mm512_setzero_si512(); ROW_GROUP];
            for p in 0..4 {
                let (b, plane) = ((4 * mb + p) / PLANES, (4 * mb + p) % PLANES);
                let bit = _mm512_set1_epi8(1 << (2 * p));
                for r in 0..ROW_GROUP {
                    if b >= blocks {
                        d[r] = _mm512_add_epi8(d[r], bit);
                        continue;
                    }
                    if plane == 0 {
                        // SAFETY: block `b < blocks` of the group (asserted length).
                        x[r] = unsafe {
                            _mm512_loadu_si512(
                                group.as_ptr().add((b * ROW_GROUP + r) * CHUNK).cast(),
                            )
                        };
                    }
                    let (one, two) = (
                        _mm512_cmpgt_epu8_mask(x[r], third),
                        _mm512_cmpgt_epu8_mask(x[r], two_thirds),
                    );
                    d[r] = _mm512_mask_add_epi8(d[r], one, d[r], bit);
                    d[r] = _mm512_mask_add_epi8(d[r], two, d[r], bit);
                    x[r] = _mm512_add_epi8(_mm512_add_epi8(x[r], x[r]), x[r]);
                }
            }
            for (r, d) in d.iter().enumerate() {
                // SAFETY: block `mb < mad_blocks` of `out` (asserted length).
                unsafe {
                    _mm512_storeu_si512(
                        out.as_mut_ptr().add((mb * ROW_GROUP + r) * CHUNK).cast(),
                        *d,
                    )
                };
            }
        }
    }

    /// [`gemv_group`] on 256-bit vectors with AVX-VNNI: each chunk in two halves of 32 bytes.
    ///
    /// # Safety
    /// The CPU supports AVX-VNNI; `group` and `x` as in [`gemv_group`].
    #[target_feature(enable = "avx2,avxvnni")]
    pub unsafe fn gemv_group_avxvnni(group: &[u8], blocks: usize, x: &[i8]) -> [i32; ROW_GROUP] {
        let mut three = [_mm256_setzero_si256(); ROW_GROUP];
        let mut next = [_mm256_setzero_si256(); ROW_GROUP];
        for b in 0..blocks {
            for half in 0..2 {
                let at = |r: usize| (b * ROW_GROUP + r) * CHUNK + 32 * half;
                for r in 0..ROW_GROUP {
                    prefetch(group.as_ptr().wrapping_add(at(r) + PREFETCH_AHEAD));
                }
                // SAFETY: the group holds `blocks` blocks of 4 chunks (contract).
                let mut w: [__m256i; ROW_GROUP] = std::array::from_fn(|r| unsafe {
                    _mm256_loadu_si256(group.as_ptr().add(at(r)).cast())
                });
                for i in 0..PLANES {
                    // SAFETY: `x` holds `blocks · BLOCK_COLS` codes (contract).
                    let a = unsafe {
                        let at = b * BLOCK_COLS + CHUNK * i + 32 * half;
                        _mm256_loadu_si256(x.as_ptr().add(at).cast())
                    };
                    for r in 0..ROW_GROUP {
                        three[r] = _mm256_dpbusd_avx_epi32(three[r], w[r], a);
                        w[r] = _mm256_add_epi8(_mm256_add_epi8(w[r], w[r]), w[r]);
                        next[r] = _mm256_dpbusd_avx_epi32(next[r], w[r], a);
                    }
                }
            }
        }
        std::array::from_fn(|r| {
            let t = three[r];
            let sum = _mm256_sub_epi32(_mm256_add_epi32(_mm256_add_epi32(t, t), t), next[r]);
            // Exact in wrapping i32, as above.
            hsum_avx2(sum) >> 8
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitlinear::testing::{
        case, check_bad_arguments, check_extremes, check_levels, raw_codes, real_shape_cases,
    };

    /// The byte holding codes `c` (each 0..=2), `c[0]` the most significant digit.
    fn encode(c: [u8; PLANES]) -> u8 {
        let mut block = [0i8; BLOCK_COLS];
        for (i, &c) in c.iter().enumerate() {
            block[CHUNK * i] = c as i8 - 1;
        }
        let mut chunk = [0u8; CHUNK];
        encode_block(&block, &mut chunk);
        chunk[0]
    }

    #[test]
    fn every_pattern_decodes_to_its_codes() {
        for v in 0..243u32 {
            let codes: [u8; PLANES] =
                std::array::from_fn(|i| (v / 3u32.pow(4 - i as u32) % 3) as u8);
            let mut x = encode(codes);
            for (i, &c) in codes.iter().enumerate() {
                assert_eq!(code_of(x), c, "pattern {v} plane {i}");
                // The identity the direct kernel sums: 3 x_i = 256 c_i + x_{i+1}.
                let sum = 256 * u32::from(c) + u32::from(next(x));
                assert_eq!(3 * u32::from(x), sum, "pattern {v} plane {i}");
                x = next(x);
            }
        }
    }

    fn check(codes: &[u8], rows: usize, cols: usize, q: &QuantizedRows) {
        let view = TernaryView::new(codes, rows, cols).unwrap();
        let packed = PackedBase3::from_canonical(view);
        check_levels(view, q, ROW_GROUP, |isa, range, acc| {
            gemm(isa, &packed, range, q, acc)
        });
    }

    #[test]
    fn every_isa_is_integer_exact_on_the_real_shapes() {
        for (rows, cols, tokens, seed) in real_shape_cases() {
            let (codes, q) = case(rows, cols, tokens, seed);
            check(&codes, rows, cols, &q);
        }
    }

    #[test]
    fn every_isa_is_integer_exact_on_awkward_shapes() {
        // Columns that end inside a block here and inside a block of the decoded layout, or past
        // its blocks (520: 2 blocks here, 3 there), and rows that leave partial groups.
        for (rows, cols, tokens) in [
            (4, 320, 1),
            (1, 1, 1),
            (3, 5, 2),
            (7, 300, 3),
            (13, 520, 1),
            (13, 520, 17),
            (64, 768, 5),
            (5, 1000, 4),
            (11, 640, 7),
            (6, 330, 8),
            (9, 6912, 1),
        ] {
            let (codes, q) = case(rows, cols, tokens, (rows * cols + tokens) as u64);
            check(&codes, rows, cols, &q);
        }
    }

    #[test]
    fn invalid_codes_and_padding_pairs_read_as_zero_like_the_reference() {
        let (rows, cols) = (9, 301);
        let codes = raw_codes(rows, cols, 3);
        assert!(
            TernaryView::new(&codes, rows, cols)
                .unwrap()
                .has_invalid_code()
        );
        for tokens in [1, 2] {
            let (_, q) = case(0, cols, tokens, 4);
            check(&codes, rows, cols, &q);
        }
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        // Over a segment's columns the identity's `256 Σ c a` reaches its largest magnitude; over
        // a 100B model's `down` (45,568 inputs) it would wrap without the segments.
        for cols in [(1 << 15) / BLOCK_COLS * BLOCK_COLS, 45_568] {
            check_extremes(cols, PackedBase3::from_canonical, gemm);
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        check_bad_arguments(320, PackedBase3::from_canonical, gemm);
    }
}
