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
//! Multiplies and adds stay separate operations (never fused), as in Rust's own `a * b + c`, so a
//! kernel's lanes round exactly like the plain scalar code.

use crate::ShapeError;
use crate::isa::Isa;

/// A level's f32 vector: `LANES` independent lanes.
pub(crate) trait Lanes: Copy {
    type V: Copy;
    const LANES: usize;
    /// Every lane `x`.
    fn splat(self, x: f32) -> Self::V;
    /// The first `LANES` values of `from` (panics if it is shorter).
    fn load(self, from: &[f32]) -> Self::V;
    /// Writes the lanes to the first `LANES` places of `to` (panics if it is shorter).
    fn store(self, v: Self::V, to: &mut [f32]);
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
}

/// One lane: plain f32 arithmetic, every level's reference.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scalar;

impl Lanes for Scalar {
    type V = f32;
    const LANES: usize = 1;
    #[inline(always)]
    fn splat(self, x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn load(self, from: &[f32]) -> f32 {
        from[0]
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
    fn add(self, a: f32, b: f32) -> f32 {
        a + b
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Isa, Lanes, ShapeError};
    use std::arch::x86_64::*;

    /// Eight lanes of AVX (available at the AVX2 and AVX-512 levels).
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx2(());

    impl Avx2 {
        /// The token, if this CPU runs one of the levels that include AVX2.
        pub(crate) fn new() -> Result<Self, ShapeError> {
            if !Isa::Avx512.is_supported() {
                Isa::Avx2.check()?;
            }
            Ok(Self(()))
        }
    }

    impl Lanes for Avx2 {
        type V = __m256;
        const LANES: usize = 8;
        #[inline(always)]
        fn splat(self, x: f32) -> __m256 {
            // SAFETY: the token exists only where the CPU has AVX2 (`new`).
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        fn load(self, from: &[f32]) -> __m256 {
            let from = &from[..Self::LANES];
            // SAFETY: AVX2 as above; `from` holds the 8 values read.
            unsafe { _mm256_loadu_ps(from.as_ptr()) }
        }
        #[inline(always)]
        fn store(self, v: __m256, to: &mut [f32]) {
            let to = &mut to[..Self::LANES];
            // SAFETY: AVX2 as above; `to` holds the 8 places written.
            unsafe { _mm256_storeu_ps(to.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: AVX2 as above.
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: AVX2 as above.
            unsafe { _mm256_add_ps(a, b) }
        }
    }

    /// Sixteen lanes of AVX-512F.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx512(());

    impl Avx512 {
        /// The token, if this CPU runs the AVX-512 level.
        pub(crate) fn new() -> Result<Self, ShapeError> {
            Isa::Avx512.check()?;
            Ok(Self(()))
        }
    }

    impl Lanes for Avx512 {
        type V = __m512;
        const LANES: usize = 16;
        #[inline(always)]
        fn splat(self, x: f32) -> __m512 {
            // SAFETY: the token exists only where the CPU has AVX-512F (`new`).
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        fn load(self, from: &[f32]) -> __m512 {
            let from = &from[..Self::LANES];
            // SAFETY: AVX-512F as above; `from` holds the 16 values read.
            unsafe { _mm512_loadu_ps(from.as_ptr()) }
        }
        #[inline(always)]
        fn store(self, v: __m512, to: &mut [f32]) {
            let to = &mut to[..Self::LANES];
            // SAFETY: AVX-512F as above; `to` holds the 16 places written.
            unsafe { _mm512_storeu_ps(to.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn mul(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: AVX-512F as above.
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: AVX-512F as above.
            unsafe { _mm512_add_ps(a, b) }
        }
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) use arm::Neon;

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::{Isa, Lanes, ShapeError};
    use std::arch::aarch64::*;

    /// Four lanes of Advanced SIMD.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Neon(());

    impl Neon {
        /// The token, if this CPU runs the NEON level.
        pub(crate) fn new() -> Result<Self, ShapeError> {
            Isa::Neon.check()?;
            Ok(Self(()))
        }
    }

    impl Lanes for Neon {
        type V = float32x4_t;
        const LANES: usize = 4;
        #[inline(always)]
        fn splat(self, x: f32) -> float32x4_t {
            // SAFETY: the token exists only where the CPU has NEON (`new`).
            unsafe { vdupq_n_f32(x) }
        }
        #[inline(always)]
        fn load(self, from: &[f32]) -> float32x4_t {
            let from = &from[..Self::LANES];
            // SAFETY: NEON as above; `from` holds the 4 values read.
            unsafe { vld1q_f32(from.as_ptr()) }
        }
        #[inline(always)]
        fn store(self, v: float32x4_t, to: &mut [f32]) {
            let to = &mut to[..Self::LANES];
            // SAFETY: NEON as above; `to` holds the 4 places written.
            unsafe { vst1q_f32(to.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn mul(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
            // SAFETY: NEON as above.
            unsafe { vmulq_f32(a, b) }
        }
        #[inline(always)]
        fn add(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
            // SAFETY: NEON as above.
            unsafe { vaddq_f32(a, b) }
        }
    }
}
