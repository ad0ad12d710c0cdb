//! f32 vectors of each [`Isa`] level behind one trait, so that a float kernel is written once and
//! compiled per level with its operations in the same order in every lane: levels differ only in
//! how many lanes run side by side, never in a lane's result.
//!
//! A [`Lanes`] value is a token: the x86-64 and aarch64 ones are only created after checking that
//! this CPU has their level, so their methods can use the level's intrinsics behind a safe
//! interface. A kernel written over [`Lanes`] must still run inside [`Isa::vectorized`], because an
//! intrinsic is only inlined into a function compiled with its features; the token only makes the
//! intrinsic sound.
//!
//! A multiply-add is fused on every level (rounded once: `f32::mul_add` in the scalar code, the FMA
//! instructions in the vector ones), so a kernel's lanes round exactly like the scalar code. Fused,
//! a multiply-add issues one instruction instead of two, which is what attention's loops are made
//! of.
//!
//! Also here: a 16 × 16 transposition of AVX-512 vectors in registers, which the AMX tile layouts
//! and a decode row's attention scores share.

use crate::Error;
use crate::isa::Isa;
use half::f16;

/// A level's f32 vector: `LANES` independent lanes.
pub(crate) trait Lanes: Copy {
    type V: Copy;
    const LANES: usize;
    /// Vector registers the level has (16 or 32): how many accumulators a kernel's register tile
    /// may hold without spilling.
    const REGISTERS: usize;
    /// Every lane `x`.
    fn splat(self, x: f32) -> Self::V;
    /// The first `LANES` values of `from` (panics if it is shorter).
    fn load(self, from: &[f32]) -> Self::V;
    /// The first `LANES` values of `from` converted to f32 (exactly; panics if it is shorter).
    fn load_f16(self, from: &[f16]) -> Self::V;
    /// Writes the lanes to the first `LANES` places of `to` (panics if it is shorter).
    fn store(self, v: Self::V, to: &mut [f32]);
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a · b + c`, rounded once.
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
}

/// One lane: plain f32 arithmetic, every level's reference.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scalar;

impl Lanes for Scalar {
    type V = f32;
    const LANES: usize = 1;
    // x86-64's sixteen XMM registers without AVX-512 (aarch64 has 32; fewer only limits tiles).
    const REGISTERS: usize = 16;
    #[inline(always)]
    fn splat(self, x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn load(self, from: &[f32]) -> f32 {
        from[0]
    }
    #[inline(always)]
    fn load_f16(self, from: &[f16]) -> f32 {
        from[0].to_f32()
    }
    #[inline(always)]
    fn store(self, v: f32, to: &mut [f32]) {
        to[0] = v;
    }
    #[inline(always)]
    fn mul(self, a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    fn mul_add(self, a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// Implements [`Lanes`] for a token type from its level's intrinsics. The token's `new` is the
/// only way to make one, and it checks the level, which is what makes the intrinsics sound here.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! impl_lanes {
    ($token:ty, $vector:ty, $lanes:expr, $registers:expr, $splat:ident, $load:ident, $load_f16:ident, $store:ident, $mul:ident, $mul_add:ident) => {
        impl Lanes for $token {
            type V = $vector;
            const LANES: usize = $lanes;
            const REGISTERS: usize = $registers;
            #[inline(always)]
            fn splat(self, x: f32) -> $vector {
                // SAFETY: a token exists only where the CPU has its level (`new`).
                unsafe { $splat(x) }
            }
            #[inline(always)]
            fn load(self, from: &[f32]) -> $vector {
                let from = &from[..Self::LANES];
                // SAFETY: the level as above; `from` holds the `LANES` values read.
                unsafe { $load(from.as_ptr()) }
            }
            #[inline(always)]
            fn load_f16(self, from: &[f16]) -> $vector {
                let from = &from[..Self::LANES];
                // SAFETY: the level as above; `from` holds the `LANES` values read.
                unsafe { $load_f16(from.as_ptr()) }
            }
            #[inline(always)]
            fn store(self, v: $vector, to: &mut [f32]) {
                let to = &mut to[..Self::LANES];
                // SAFETY: the level as above; `to` holds the `LANES` places written.
                unsafe { $store(to.as_mut_ptr(), v) }
            }
            #[inline(always)]
            fn mul(self, a: $vector, b: $vector) -> $vector {
                // SAFETY: the level as above.
                unsafe { $mul(a, b) }
            }
            #[inline(always)]
            fn mul_add(self, a: $vector, b: $vector, c: $vector) -> $vector {
                // SAFETY: the level as above (every x86-64 level with these vectors includes FMA).
                unsafe { $mul_add(a, b, c) }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512, transpose_16x16};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Error, Isa, Lanes, f16};
    use std::arch::x86_64::*;

    /// Eight lanes of AVX (available at the AVX2, AVX-VNNI and AVX-512 levels).
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx2(());

    impl Avx2 {
        /// The token, if this CPU runs one of the levels that include AVX2.
        pub(crate) fn new() -> Result<Self, Error> {
            if !Isa::Avx512.is_supported() {
                Isa::Avx2.check()?;
            }
            Ok(Self(()))
        }
    }

    impl_lanes!(
        Avx2,
        __m256,
        8,
        16,
        _mm256_set1_ps,
        _mm256_loadu_ps,
        load_f16_avx2,
        _mm256_storeu_ps,
        _mm256_mul_ps,
        _mm256_fmadd_ps
    );

    /// Sixteen lanes of AVX-512F.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx512(());

    impl Avx512 {
        /// The token, if this CPU runs the AVX-512 level.
        pub(crate) fn new() -> Result<Self, Error> {
            Isa::Avx512.check()?;
            Ok(Self(()))
        }
    }

    impl_lanes!(
        Avx512,
        __m512,
        16,
        32,
        _mm512_set1_ps,
        _mm512_loadu_ps,
        load_f16_avx512,
        _mm512_storeu_ps,
        _mm512_mul_ps,
        _mm512_fmadd_ps
    );

    /// Eight f16 values from `p` as f32 (`vcvtph2ps`).
    ///
    /// # Safety
    /// The CPU has F16C (every level with these vectors); `p` points to 8 readable values.
    #[inline(always)]
    unsafe fn load_f16_avx2(p: *const f16) -> __m256 {
        // SAFETY: as the function's contract.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }

    /// Sixteen f16 values from `p` as f32.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; `p` points to 16 readable values.
    #[inline(always)]
    unsafe fn load_f16_avx512(p: *const f16) -> __m512 {
        // SAFETY: as the function's contract.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }

    /// The 16 × 16 matrix whose row `r` is `v[r]`, transposed: lane `r` of vector `c` of the result
    /// is lane `c` of `v[r]`. Interleaves pairs of rows, then pairs of pairs (64-bit), then
    /// gathers each column's four 128-bit quarters in two 128-bit shuffles.
    #[target_feature(enable = "avx512f")]
    pub(crate) fn transpose_16x16(v: [__m512; 16]) -> [__m512; 16] {
        // t[2p], t[2p + 1]: rows 2p and 2p + 1 interleaved (columns 4l + 0, 1 and 4l + 2, 3 of
        // each 128-bit quarter l).
        let t: [__m512; 16] = std::array::from_fn(|i| {
            let (a, b) = (v[i & !1], v[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        // u[4g + c]: rows 4g .. 4g + 4 of column 4l + c in quarter l.
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let (g, c) = (i / 4, i % 4);
            let (a, b) = (
                _mm512_castps_pd(t[4 * g + c / 2]),
                _mm512_castps_pd(t[4 * g + 2 + c / 2]),
            );
            _mm512_castpd_ps(if c % 2 == 0 {
                _mm512_unpacklo_pd(a, b)
            } else {
                _mm512_unpackhi_pd(a, b)
            })
        });
        let mut out = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            // Quarters 0 and 2, then 1 and 3, of row groups 0, 1 (`low`) and 2, 3 (`high`).
            let low_even = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
            let low_odd = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
            let high_even = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
            let high_odd = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
            out[c] = _mm512_shuffle_f32x4::<0x88>(low_even, high_even);
            out[c + 8] = _mm512_shuffle_f32x4::<0xdd>(low_even, high_even);
            out[c + 4] = _mm512_shuffle_f32x4::<0x88>(low_odd, high_odd);
            out[c + 12] = _mm512_shuffle_f32x4::<0xdd>(low_odd, high_odd);
        }
        out
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) use arm::Neon;

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::{Error, Isa, Lanes, f16};
    use std::arch::aarch64::*;

    /// Four lanes of Advanced SIMD.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Neon(());

    impl Neon {
        /// The token, if this CPU runs the NEON level (which the dot-product level includes).
        pub(crate) fn new() -> Result<Self, Error> {
            Isa::Neon.check()?;
            Ok(Self(()))
        }
    }

    impl_lanes!(
        Neon,
        float32x4_t,
        4,
        32,
        vdupq_n_f32,
        vld1q_f32,
        load_f16,
        vst1q_f32,
        vmulq_f32,
        fused
    );

    /// Four f16 values from `p` as f32, one at a time (the f16 vector types are not stable Rust).
    ///
    /// # Safety
    /// `p` points to 4 readable values.
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> float32x4_t {
        // SAFETY: as the function's contract; NEON is part of the aarch64 baseline.
        unsafe {
            let values: [f32; 4] = std::array::from_fn(|i| (*p.add(i)).to_f32());
            vld1q_f32(values.as_ptr())
        }
    }

    /// `a · b + c` fused (`vfmaq_f32` takes the addend first).
    ///
    /// # Safety
    /// NEON is available (part of the aarch64 baseline).
    #[inline(always)]
    unsafe fn fused(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        // SAFETY: as the function's contract.
        unsafe { vfmaq_f32(c, a, b) }
    }
}
