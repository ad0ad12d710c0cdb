//! Multiply-add ternary kernels (W1.58A8): unsigned 2-bit weight codes × int8 activations, minus
//! the activation sum, with int32 accumulation, at every [`Isa`] level (scalar; AVX2, AVX-VNNI and
//! AVX-512 VNNI; NEON with and without the dot-product extension).
//!
//! # The arithmetic
//! With `code = value + 1 ∈ {0, 1, 2}`, `Σ_k value_k·x_k = Σ_k code_k·x_k − Σ_k x_k`. The codes are
//! non-negative, so they feed the unsigned operand of `vpdpbusd` (AVX-512 VNNI, AVX-VNNI) and
//! `vpmaddubsw` (AVX2) directly, and are valid signed bytes for `sdot` (NEON dot product);
//! `Σ_k x_k` comes with the quantized row ([`QuantizedRows::sums`]). Every intermediate is bounded:
//! a `vpmaddubsw` lane is at most `2·2·128 = 512`, and the AVX2 kernel adds at most 8 of them in
//! i16 (4096 < 32767) before widening; the others accumulate in i32 (`|Σ| ≤ 256 · cols`). The
//! result is exact, so it equals [`gemm_reference`](crate::bitlinear::reference::gemm_reference)
//! bit for bit.
//!
//! # Layout ([`PackedTernary`], repacked at upload from the canonical layout)
//! [`crate::bitlinear::grouped`]'s, with blocks of [`K_BLOCK`] = 256 columns (columns padded with value 0;
//! padding rows hold zero bytes, whose outputs no product writes). Inside a chunk, byte `j` (0..64)
//! holds at bits `2i..2i+1` (i = 0..4) the code of column `block · 256 + 64·i + j`. So one shift
//! by `2i` and one mask by 3 turn any run of bytes into the codes of consecutive columns, matching a
//! contiguous load of activations, for any vector width (64 bytes on AVX-512, 32 on AVX2, 16 on
//! NEON). A kernel streams one contiguous buffer.
//!
//! # Blocking
//! [`gemm`] is three loops: for each chunk of tokens whose activations fit in L2
//! ([`crate::bitlinear::grouped`]'s token chunks), for each group of 4 rows, for each tile of up to
//! `TOKENS` activation rows of the chunk, an ISA's micro-kernel walks the group's blocks once,
//! unpacks each weight chunk once and multiplies it with every token of the tile (batched prefill
//! reuses each unpacked block), keeping the 4 × T accumulators in registers.

pub use crate::bitlinear::grouped::ROW_GROUP;
use crate::bitlinear::grouped::{CHUNK, Coding, Grouped};
use crate::bitlinear::quant::QuantizedRows;
use crate::bitlinear::reference::TernaryView;
use crate::isa::Isa;
use crate::{Error, check_len};
use std::ops::Range;

/// Columns per weight block: four 2-bit codes per byte of a chunk.
pub const K_BLOCK: usize = 4 * CHUNK;

/// The widest micro-kernel's token tile: token chunks are a multiple of it.
pub(crate) const TILE_TOKENS: usize = 4;

/// The 2-bit coding of [`Grouped`] (see the module documentation).
#[derive(Clone, Debug)]
pub struct TwoBit;

impl Coding for TwoBit {
    const BLOCK_COLS: usize = K_BLOCK;
    const NAME: &'static str = "ternary";
}

/// A ternary matrix in the kernels' layout (see the module documentation).
pub type PackedTernary = Grouped<TwoBit>;

impl PackedTernary {
    /// Repacks a canonical matrix (codes of 3, which validated matrices never hold, read as 0, and
    /// so do padding pairs past `cols`).
    pub fn from_canonical(w: TernaryView<'_>) -> Self {
        let (rows, cols) = (w.rows(), w.cols());
        let mut packed = Self::zeroed(rows, cols);
        let blocks = packed.blocks();
        let rb = crate::bitlinear::reference::row_bytes(cols);
        // One canonical row padded to whole blocks with value 0 (code 1 in every pair).
        let mut padded = vec![0x55u8; blocks * CHUNK];
        for n in 0..rows {
            padded[..rb].copy_from_slice(&w.codes()[n * rb..(n + 1) * rb]);
            if cols % 4 != 0 {
                let keep = 2 * (cols % 4);
                padded[rb - 1] = (padded[rb - 1] & ((1 << keep) - 1)) | (0x55 << keep);
            }
            for byte in &mut padded[..rb] {
                // Code 3 (invalid) reads as 1 (value 0): clear the high bit of such pairs.
                *byte ^= (*byte & (*byte >> 1) & 0x55) << 1;
            }
            for (b, src) in padded.chunks_exact(CHUNK).enumerate() {
                for (j, byte) in packed.chunk_mut(n, b).iter_mut().enumerate() {
                    // Column 64·i + j of the block is pair j % 4 of canonical byte 16·i + j / 4.
                    *byte = (0..4).fold(0u8, |acc, i| {
                        let code = (src[16 * i + j / 4] >> (2 * (j % 4))) & 3;
                        acc | (code << (2 * i))
                    });
                }
            }
        }
        packed
    }
}

/// `acc[(n - rows.start) · tokens + t] = Σ_k W[n][k] · x[t][k]` for `n` in `rows`, exactly.
///
/// `rows.start` must be a multiple of [`ROW_GROUP`] (so threads split on group boundaries); the
/// output is row-major by weight row, so disjoint row ranges write disjoint slices.
pub fn gemm(
    isa: Isa,
    w: &PackedTernary,
    rows: Range<usize>,
    x: &QuantizedRows,
    acc: &mut [i32],
) -> Result<(), Error> {
    w.for_each_group(isa, rows, x, acc, TILE_TOKENS, |g, chunk, out| {
        group_gemm(isa, w.group(g), w.blocks(), x, chunk, out)
    })
}

/// `out[r · tokens + t] = Σ_k W[r][k] · x[t][k]` for the first `out.len() / tokens` rows of one
/// group of 4 rows in the layout above (`blocks` blocks) and the tokens `t` of `chunk`, exactly.
pub(crate) fn group_gemm(
    isa: Isa,
    group: &[u8],
    blocks: usize,
    x: &QuantizedRows,
    chunk: Range<usize>,
    out: &mut [i32],
) -> Result<(), Error> {
    isa.check()?;
    check_len("ternary group", group.len(), blocks * ROW_GROUP * CHUNK)?;
    let tokens = x.rows();
    if x.padded_cols() < blocks * K_BLOCK
        || out.len() > ROW_GROUP * tokens
        || !out.len().is_multiple_of(tokens.max(1))
        || chunk.start > chunk.end
        || chunk.end > tokens
    {
        return Err(Error::Shape(format!(
            "ternary group gemm: {} activation columns for {blocks} blocks, {} outputs for {tokens} \
             tokens, tokens {chunk:?}",
            x.padded_cols(),
            out.len()
        )));
    }
    match isa {
        Isa::Scalar => run::<Scalar>(group, blocks, x, chunk, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => run::<x86::Avx2>(group, blocks, x, chunk, out),
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => run::<x86::AvxVnni>(group, blocks, x, chunk, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => run::<x86::Avx512>(group, blocks, x, chunk, out),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => run::<arm::Neon>(group, blocks, x, chunk, out),
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot => run::<arm::NeonDot>(group, blocks, x, chunk, out),
        #[allow(unreachable_patterns)] // every level is reachable on some target
        _ => unreachable!("isa.check() passed for a level of another architecture"),
    }
    Ok(())
}

/// A micro-kernel: one group of 4 rows times up to `TOKENS` activation rows.
trait MicroKernel {
    /// Most activation rows per tile (bounded by the registers the accumulators need).
    const TOKENS: usize;

    /// Returns `Σ_k code[r][k] · x[t][k]` for the group's rows `r` and the tile's tokens `t`.
    ///
    /// # Safety
    /// The CPU supports the kernel's ISA; `group` is one group of `blocks` blocks
    /// (`blocks · 256` bytes) and every `x[t]` holds `blocks · 256` codes.
    unsafe fn tile<const T: usize>(
        group: &[u8],
        blocks: usize,
        x: [&[i8]; T],
    ) -> [[i32; T]; ROW_GROUP];
}

/// The token tiles of one group and one chunk of tokens, shared by every ISA (see the module
/// documentation).
fn run<K: MicroKernel>(
    group: &[u8],
    blocks: usize,
    x: &QuantizedRows,
    chunk: Range<usize>,
    out: &mut [i32],
) {
    let tokens = x.rows();
    let mut t0 = chunk.start;
    while t0 < chunk.end {
        let n = (chunk.end - t0).min(K::TOKENS);
        macro_rules! tile {
            ($t:literal) => {{
                let xs: [&[i8]; $t] = std::array::from_fn(|i| x.row(t0 + i));
                // SAFETY: `group_gemm` checked the ISA, that the group spans `blocks` blocks and
                // that every padded activation row covers them.
                let tile = unsafe { K::tile::<$t>(group, blocks, xs) };
                for (row, out) in tile.iter().zip(out.chunks_exact_mut(tokens)) {
                    for (t, &v) in row.iter().enumerate() {
                        out[t0 + t] = v - x.sums()[t0 + t];
                    }
                }
            }};
        }
        match n {
            1 => tile!(1),
            2 => tile!(2),
            3 => tile!(3),
            _ => tile!(4),
        }
        t0 += n;
    }
}

/// Portable kernel: the same arithmetic on plain integers.
struct Scalar;

impl MicroKernel for Scalar {
    const TOKENS: usize = 4;

    unsafe fn tile<const T: usize>(
        group: &[u8],
        blocks: usize,
        x: [&[i8]; T],
    ) -> [[i32; T]; ROW_GROUP] {
        let mut out = [[0i32; T]; ROW_GROUP];
        for b in 0..blocks {
            for (r, out_r) in out.iter_mut().enumerate() {
                let chunk = &group[(b * ROW_GROUP + r) * CHUNK..][..CHUNK];
                for (o, xt) in out_r.iter_mut().zip(&x) {
                    let xb = &xt[b * K_BLOCK..(b + 1) * K_BLOCK];
                    for i in 0..4 {
                        for (j, &byte) in chunk.iter().enumerate() {
                            let code = i32::from((byte >> (2 * i)) & 3);
                            *o += code * i32::from(xb[64 * i + j]);
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{CHUNK, K_BLOCK, MicroKernel, ROW_GROUP};
    use crate::isa::{PREFETCH_AHEAD, prefetch};
    use std::arch::x86_64::*;

    /// AVX-512 VNNI: `vpdpbusd` on 64 codes × 64 activations per instruction; 4 rows × 4 tokens
    /// = 16 zmm accumulators, plus 4 weight chunks and 4 activation vectors.
    pub struct Avx512;

    impl MicroKernel for Avx512 {
        const TOKENS: usize = 4;

        unsafe fn tile<const T: usize>(
            group: &[u8],
            blocks: usize,
            x: [&[i8]; T],
        ) -> [[i32; T]; ROW_GROUP] {
            // SAFETY: forwarded from the trait's contract.
            unsafe { tile_avx512::<T>(group, blocks, x) }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_avx512<const T: usize>(
        group: &[u8],
        blocks: usize,
        x: [&[i8]; T],
    ) -> [[i32; T]; ROW_GROUP] {
        let mask = _mm512_set1_epi8(3);
        let mut acc = [[_mm512_setzero_si512(); T]; ROW_GROUP];
        for b in 0..blocks {
            for r in 0..ROW_GROUP {
                prefetch(
                    group
                        .as_ptr()
                        .wrapping_add((b * ROW_GROUP + r) * CHUNK + PREFETCH_AHEAD),
                );
            }
            // SAFETY: the group holds `blocks` blocks of 4 chunks of 64 bytes (trait contract).
            let mut w: [__m512i; ROW_GROUP] = std::array::from_fn(|r| unsafe {
                _mm512_loadu_si512(group.as_ptr().add((b * ROW_GROUP + r) * CHUNK).cast())
            });
            for i in 0..4 {
                // SAFETY: every x[t] holds `blocks · 256` codes (trait contract).
                let xv: [__m512i; T] = std::array::from_fn(|t| unsafe {
                    _mm512_loadu_si512(x[t].as_ptr().add(b * K_BLOCK + 64 * i).cast())
                });
                for r in 0..ROW_GROUP {
                    let codes = _mm512_and_si512(w[r], mask);
                    for t in 0..T {
                        acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], codes, xv[t]);
                    }
                    w[r] = _mm512_srli_epi16::<2>(w[r]);
                }
            }
        }
        acc.map(|row| row.map(|v| _mm512_reduce_add_epi32(v)))
    }

    /// AVX-VNNI: the 256-bit `vpdpbusd` (VEX-coded) on 32 codes × 32 activations per instruction;
    /// 4 rows × 2 tokens = 8 ymm accumulators, plus the 4 rows' weight halves, 2 activation
    /// vectors and the mask in the 16 registers.
    pub struct AvxVnni;

    impl MicroKernel for AvxVnni {
        const TOKENS: usize = 2;

        unsafe fn tile<const T: usize>(
            group: &[u8],
            blocks: usize,
            x: [&[i8]; T],
        ) -> [[i32; T]; ROW_GROUP] {
            // SAFETY: forwarded from the trait's contract.
            unsafe { tile_avxvnni::<T>(group, blocks, x) }
        }
    }

    #[target_feature(enable = "avx2,avxvnni")]
    unsafe fn tile_avxvnni<const T: usize>(
        group: &[u8],
        blocks: usize,
        x: [&[i8]; T],
    ) -> [[i32; T]; ROW_GROUP] {
        let mask = _mm256_set1_epi8(3);
        let mut acc = [[_mm256_setzero_si256(); T]; ROW_GROUP];
        for b in 0..blocks {
            for half in 0..2 {
                let at = |r: usize| (b * ROW_GROUP + r) * CHUNK + 32 * half;
                for r in 0..ROW_GROUP {
                    prefetch(group.as_ptr().wrapping_add(at(r) + PREFETCH_AHEAD));
                }
                // SAFETY: inside the group (trait contract).
                let mut w: [__m256i; ROW_GROUP] = std::array::from_fn(|r| unsafe {
                    _mm256_loadu_si256(group.as_ptr().add(at(r)).cast())
                });
                for i in 0..4 {
                    // SAFETY: inside the padded activation row (trait contract).
                    let xv: [__m256i; T] = std::array::from_fn(|t| unsafe {
                        let at = b * K_BLOCK + 64 * i + 32 * half;
                        _mm256_loadu_si256(x[t].as_ptr().add(at).cast())
                    });
                    for r in 0..ROW_GROUP {
                        let codes = _mm256_and_si256(w[r], mask);
                        for t in 0..T {
                            acc[r][t] = _mm256_dpbusd_avx_epi32(acc[r][t], codes, xv[t]);
                        }
                        w[r] = _mm256_srli_epi16::<2>(w[r]);
                    }
                }
            }
        }
        acc.map(|row| row.map(|v| hsum_avx2(v)))
    }

    /// AVX2: `vpmaddubsw` (pairs of u8 × i8 into i16), 8 of them summed in i16 per block, then
    /// `vpmaddwd` by ones into i32; 4 rows × 2 tokens of ymm accumulators.
    pub struct Avx2;

    impl MicroKernel for Avx2 {
        const TOKENS: usize = 2;

        unsafe fn tile<const T: usize>(
            group: &[u8],
            blocks: usize,
            x: [&[i8]; T],
        ) -> [[i32; T]; ROW_GROUP] {
            // SAFETY: forwarded from the trait's contract.
            unsafe { tile_avx2::<T>(group, blocks, x) }
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn tile_avx2<const T: usize>(
        group: &[u8],
        blocks: usize,
        x: [&[i8]; T],
    ) -> [[i32; T]; ROW_GROUP] {
        let mask = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); T]; ROW_GROUP];
        for b in 0..blocks {
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let mut partial = [_mm256_setzero_si256(); T];
                for half in 0..2 {
                    let at = (b * ROW_GROUP + r) * CHUNK + 32 * half;
                    prefetch(group.as_ptr().wrapping_add(at + PREFETCH_AHEAD));
                    // SAFETY: inside the group (trait contract).
                    let mut w = unsafe { _mm256_loadu_si256(group.as_ptr().add(at).cast()) };
                    for i in 0..4 {
                        let codes = _mm256_and_si256(w, mask);
                        for (p, xt) in partial.iter_mut().zip(&x) {
                            let at = b * K_BLOCK + 64 * i + 32 * half;
                            // SAFETY: inside the padded activation row (trait contract).
                            let xv = unsafe { _mm256_loadu_si256(xt.as_ptr().add(at).cast()) };
                            *p = _mm256_add_epi16(*p, _mm256_maddubs_epi16(codes, xv));
                        }
                        w = _mm256_srli_epi16::<2>(w);
                    }
                }
                for (a, p) in acc_r.iter_mut().zip(partial) {
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(p, ones));
                }
            }
        }
        acc.map(|row| row.map(|v| hsum_avx2(v)))
    }

    /// The sum of the eight i32 lanes (also used by [`crate::table::q8`]).
    #[target_feature(enable = "avx2")]
    pub(crate) fn hsum_avx2(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) mod arm {
    use super::{CHUNK, K_BLOCK, MicroKernel, ROW_GROUP};
    use std::arch::aarch64::*;
    use std::arch::asm;

    /// NEON with the dot-product extension: `sdot` adds four products of 16 codes × 16 activations
    /// into each i32 lane (the codes 0..2 are valid signed bytes); 4 rows × 4 tokens = 16
    /// accumulators, plus the 4 rows' weights, 4 activation vectors and the mask in the 32
    /// registers.
    pub struct NeonDot;

    impl MicroKernel for NeonDot {
        const TOKENS: usize = 4;

        unsafe fn tile<const T: usize>(
            group: &[u8],
            blocks: usize,
            x: [&[i8]; T],
        ) -> [[i32; T]; ROW_GROUP] {
            // SAFETY: forwarded from the trait's contract.
            unsafe { tile_neon_dot::<T>(group, blocks, x) }
        }
    }

    /// `acc + Σ` of each lane's four products `a · b` (`sdot`; also used by [`crate::table::q8`]).
    /// The intrinsic (`vdotq_s32`) is not stable in Rust yet.
    #[target_feature(enable = "neon,dotprod")]
    #[inline]
    pub(crate) fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // SAFETY: `sdot` reads and writes registers only; the dot-product extension is enabled
        // for this function (its callers check the CPU has it).
        unsafe {
            asm!(
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags)
            )
        };
        acc
    }

    #[target_feature(enable = "neon,dotprod")]
    unsafe fn tile_neon_dot<const T: usize>(
        group: &[u8],
        blocks: usize,
        x: [&[i8]; T],
    ) -> [[i32; T]; ROW_GROUP] {
        let mask = vdupq_n_u8(3);
        let mut acc = [[vdupq_n_s32(0); T]; ROW_GROUP];
        for b in 0..blocks {
            for quarter in 0..4 {
                let at = |r: usize| (b * ROW_GROUP + r) * CHUNK + 16 * quarter;
                // SAFETY: inside the group (trait contract).
                let mut w: [uint8x16_t; ROW_GROUP] =
                    std::array::from_fn(|r| unsafe { vld1q_u8(group.as_ptr().add(at(r))) });
                for i in 0..4 {
                    // SAFETY: inside the padded activation row (trait contract).
                    let xv: [int8x16_t; T] = std::array::from_fn(|t| unsafe {
                        vld1q_s8(x[t].as_ptr().add(b * K_BLOCK + 64 * i + 16 * quarter))
                    });
                    for r in 0..ROW_GROUP {
                        let codes = vreinterpretq_s8_u8(vandq_u8(w[r], mask));
                        for t in 0..T {
                            acc[r][t] = sdot(acc[r][t], codes, xv[t]);
                        }
                        w[r] = vshrq_n_u8::<2>(w[r]);
                    }
                }
            }
        }
        acc.map(|row| row.map(|v| vaddvq_s32(v)))
    }

    /// NEON: widening `smull`/`smlal` of 16 codes × 16 activations into i16 (two products per
    /// lane, at most 512), pairwise-added into i32 with `sadalp`; 4 rows × 2 tokens.
    pub struct Neon;

    impl MicroKernel for Neon {
        const TOKENS: usize = 2;

        unsafe fn tile<const T: usize>(
            group: &[u8],
            blocks: usize,
            x: [&[i8]; T],
        ) -> [[i32; T]; ROW_GROUP] {
            // SAFETY: forwarded from the trait's contract.
            unsafe { tile_neon::<T>(group, blocks, x) }
        }
    }

    #[target_feature(enable = "neon")]
    unsafe fn tile_neon<const T: usize>(
        group: &[u8],
        blocks: usize,
        x: [&[i8]; T],
    ) -> [[i32; T]; ROW_GROUP] {
        let mask = vdupq_n_u8(3);
        let mut acc = [[vdupq_n_s32(0); T]; ROW_GROUP];
        for b in 0..blocks {
            for (r, acc_r) in acc.iter_mut().enumerate() {
                for quarter in 0..4 {
                    let at = (b * ROW_GROUP + r) * CHUNK + 16 * quarter;
                    // SAFETY: inside the group (trait contract).
                    let mut w = unsafe { vld1q_u8(group.as_ptr().add(at)) };
                    for i in 0..4 {
                        let codes = vreinterpretq_s8_u8(vandq_u8(w, mask));
                        for (a, xt) in acc_r.iter_mut().zip(&x) {
                            let at = b * K_BLOCK + 64 * i + 16 * quarter;
                            // SAFETY: inside the padded activation row (trait contract).
                            let xv = unsafe { vld1q_s8(xt.as_ptr().add(at)) };
                            let p = vmull_s8(vget_low_s8(codes), vget_low_s8(xv));
                            let p = vmlal_high_s8(p, codes, xv);
                            *a = vpadalq_s16(*a, p);
                        }
                        w = vshrq_n_u8::<2>(w);
                    }
                }
            }
        }
        acc.map(|row| row.map(|v| vaddvq_s32(v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitlinear::testing::{
        case, check_bad_arguments, check_extremes, check_levels, raw_codes, real_shape_cases,
    };

    fn check(rows: usize, cols: usize, tokens: usize, seed: u64) {
        let (codes, q) = case(rows, cols, tokens, seed);
        let view = TernaryView::new(&codes, rows, cols).unwrap();
        let packed = PackedTernary::from_canonical(view);
        check_levels(view, &q, ROW_GROUP, |isa, range, acc| {
            gemm(isa, &packed, range, &q, acc)
        });
    }

    #[test]
    fn every_isa_is_integer_exact_on_the_real_shapes() {
        for (rows, cols, tokens, seed) in real_shape_cases() {
            check(rows, cols, tokens, seed);
        }
    }

    #[test]
    fn every_isa_is_integer_exact_on_awkward_shapes() {
        for (rows, cols, tokens) in [
            (4, 256, 1),
            (1, 1, 1),
            (3, 5, 2),
            (7, 300, 3),
            (13, 512, 17),
            (64, 768, 5),
            (5, 1000, 4),
            (256, 256, 9),
        ] {
            check(rows, cols, tokens, (rows * cols + tokens) as u64);
        }
    }

    #[test]
    fn invalid_codes_and_padding_pairs_read_as_zero_like_the_reference() {
        // Raw random bytes: codes of 3 everywhere and garbage in the padding pairs of 301 columns.
        let (rows, cols) = (9, 301);
        let codes = raw_codes(rows, cols, 3);
        let view = TernaryView::new(&codes, rows, cols).unwrap();
        assert!(view.has_invalid_code());
        let (_, q) = case(0, cols, 2, 4);
        let packed = PackedTernary::from_canonical(view);
        check_levels(view, &q, ROW_GROUP, |isa, range, acc| {
            gemm(isa, &packed, range, &q, acc)
        });
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        // The i16 partial sums of the AVX2 kernel see their largest magnitudes.
        check_extremes(6912, PackedTernary::from_canonical, gemm);
    }

    #[test]
    fn bad_arguments_are_errors() {
        check_bad_arguments(256, PackedTernary::from_canonical, gemm);
    }
}
