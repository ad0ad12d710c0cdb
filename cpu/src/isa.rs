//! Which SIMD instruction set the kernels use, detected once at runtime.
//!
//! Levels, from plain to widest:
//! - [`Isa::Scalar`]: portable Rust, everywhere (the compiler may still vectorize it for the
//!   build's baseline target).
//! - [`Isa::Avx2`] (x86-64): AVX2 + FMA + F16C; ternary products with `vpmaddubsw` + `vpmaddwd`.
//! - [`Isa::AvxVnni`] (x86-64): AVX2's level plus AVX-VNNI (Intel Alder Lake and later client
//!   CPUs, AMD Zen 5); ternary products with the 256-bit `vpdpbusd`.
//! - [`Isa::Avx512`] (x86-64): AVX-512 F + BW + VNNI (+ F16C); ternary products with `vpdpbusd` on
//!   64 bytes per instruction.
//! - [`Isa::Neon`] (aarch64): Advanced SIMD; ternary products with widening multiply-adds.
//! - [`Isa::NeonDot`] (aarch64): NEON plus the dot-product extension (Apple M-series, Graviton 2
//!   and later, Cobalt); ternary products with `udot`/`sdot`.
//!
//! [`Isa::best`] is the widest level this CPU supports. [`Isa::selected`] is what a backend uses by
//! default: `best`, unless the environment variable `TERN_CPU_ISA` (`scalar`, `avx2`, `avxvnni`,
//! `avx512`, `neon`, `neon-dotprod`) forces a level, which is an error when the CPU lacks it. Every kernel entry point checks
//! [`Isa::is_supported`] before calling a `#[target_feature]` function, so forcing a level can never
//! execute an instruction the CPU does not have.

use crate::Error;
use std::sync::OnceLock;

/// A SIMD level the kernels can run at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    Scalar,
    Avx2,
    AvxVnni,
    Avx512,
    Neon,
    NeonDot,
}

/// Environment variable that forces a level.
pub const ISA_ENV: &str = "TERN_CPU_ISA";

impl Isa {
    /// Every level, plainest first per architecture (in the order of the variants).
    pub const ALL: [Isa; 6] = [
        Isa::Scalar,
        Isa::Avx2,
        Isa::AvxVnni,
        Isa::Avx512,
        Isa::Neon,
        Isa::NeonDot,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avxvnni",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
            Isa::NeonDot => "neon-dotprod",
        }
    }

    pub fn parse(name: &str) -> Result<Self, Error> {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.name() == name.trim().to_ascii_lowercase())
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "unknown CPU ISA level `{name}` (expected scalar, avx2, avxvnni, avx512, neon \
                     or neon-dotprod)"
                ))
            })
    }

    /// Whether this CPU can run kernels of this level (detected once, then cached).
    pub fn is_supported(self) -> bool {
        static DETECTED: OnceLock<[bool; Isa::ALL.len()]> = OnceLock::new();
        let detected = DETECTED.get_or_init(|| Isa::ALL.map(detect));
        detected[self as usize]
    }

    /// The widest supported level.
    pub fn best() -> Self {
        [
            Isa::Avx512,
            Isa::AvxVnni,
            Isa::Avx2,
            Isa::NeonDot,
            Isa::Neon,
        ]
        .into_iter()
        .find(|isa| isa.is_supported())
        .unwrap_or(Isa::Scalar)
    }

    /// `TERN_CPU_ISA` if set (an error if unknown or unsupported here), else [`Isa::best`].
    pub fn selected() -> Result<Self, Error> {
        match std::env::var(ISA_ENV) {
            Ok(name) if !name.trim().is_empty() => {
                let isa = Isa::parse(&name)?;
                isa.check()?;
                Ok(isa)
            }
            _ => Ok(Isa::best()),
        }
    }

    /// Runs `f` inside a function compiled with this level's target features, so that the loops
    /// of the `#[inline(always)]` code it calls are vectorized at this width (an error if this CPU
    /// lacks the level). Plain Rust over independent lanes gets SIMD this way without intrinsics.
    /// The closure must be `#[inline(always)]`: compiled on its own it would get the baseline's
    /// features only.
    pub fn vectorized<R>(self, f: impl FnOnce() -> R) -> Result<R, Error> {
        self.check()?;
        Ok(match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `check` confirmed that this CPU has the level's features.
            Isa::Avx512 => unsafe { with_avx512(f) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above (the AVX-VNNI level includes AVX2's).
            Isa::Avx2 | Isa::AvxVnni => unsafe { with_avx2(f) },
            // NEON is part of the aarch64 baseline (the dot products are not needed here); the
            // scalar level uses the build's baseline.
            _ => f(),
        })
    }

    /// An error naming the level unless this CPU supports it.
    pub fn check(self) -> Result<(), Error> {
        if self.is_supported() {
            Ok(())
        } else {
            Err(Error::Unsupported(format!(
                "this CPU does not support the `{}` kernels (supported: {})",
                self.name(),
                Isa::ALL
                    .into_iter()
                    .filter(|i| i.is_supported())
                    .map(Isa::name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How far past the byte it is reading a streaming kernel asks for the next cache lines. One Zen 4
/// core streams a ternary matrix from memory at ~31 GB/s on the hardware prefetchers alone and at
/// ~40 GB/s asking 8 KiB ahead (less at 4 or 16 KiB).
#[cfg(target_arch = "x86_64")]
pub(crate) const PREFETCH_AHEAD: usize = 8 << 10;

/// Asks for the cache line holding `p` on x86-64 (aarch64 is left to its hardware prefetchers:
/// unmeasured there). Any address will do: a prefetch never faults.
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    prefetch_into::<false>(p);
}

/// [`prefetch`] into the L2 cache only: for data read after other work that the L1 cache holds.
#[inline(always)]
pub(crate) fn prefetch_l2(p: *const u8) {
    prefetch_into::<true>(p);
}

#[inline(always)]
fn prefetch_into<const L2_ONLY: bool>(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it reads nothing architecturally visible and never faults.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1, _mm_prefetch};
        if L2_ONLY {
            _mm_prefetch::<_MM_HINT_T1>(p.cast())
        } else {
            _mm_prefetch::<_MM_HINT_T0>(p.cast())
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Asks for every cache line of `s` with `ask` ([`prefetch`] or [`prefetch_l2`]).
#[inline(always)]
pub(crate) fn prefetch_lines<T>(s: &[T], ask: fn(*const u8)) {
    let (start, bytes) = (s.as_ptr().cast::<u8>(), std::mem::size_of_val(s));
    for at in (0..bytes).step_by(64) {
        ask(start.wrapping_add(at));
    }
    // The last line, when `s` does not start on a line boundary.
    ask(start.wrapping_add(bytes.saturating_sub(1)));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
fn detect(isa: Isa) -> bool {
    use std::arch::is_x86_feature_detected as has;
    match isa {
        Isa::Scalar => true,
        Isa::Avx2 => has!("avx2") && has!("fma") && has!("f16c"),
        Isa::AvxVnni => detect(Isa::Avx2) && has!("avxvnni"),
        Isa::Avx512 => {
            has!("avx512f") && has!("avx512bw") && has!("avx512vnni") && has!("fma") && has!("f16c")
        }
        Isa::Neon | Isa::NeonDot => false,
    }
}

#[cfg(target_arch = "aarch64")]
fn detect(isa: Isa) -> bool {
    match isa {
        Isa::Scalar => true,
        Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
        Isa::NeonDot => detect(Isa::Neon) && std::arch::is_aarch64_feature_detected!("dotprod"),
        Isa::Avx2 | Isa::AvxVnni | Isa::Avx512 => false,
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn detect(isa: Isa) -> bool {
    isa == Isa::Scalar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_scalar_is_always_there() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()).unwrap(), isa);
        }
        assert_eq!(Isa::parse(" AVX512 ").unwrap(), Isa::Avx512);
        // `is_supported` indexes its table by the variant's number.
        for (i, isa) in Isa::ALL.into_iter().enumerate() {
            assert_eq!(isa as usize, i, "{isa}");
        }
        assert!(Isa::parse("sse9").is_err());
        assert!(Isa::Scalar.is_supported());
        assert!(Isa::best().is_supported());
    }

    #[test]
    fn unsupported_level_is_an_error_naming_it() {
        for isa in Isa::ALL.into_iter().filter(|i| !i.is_supported()) {
            let e = isa.check().unwrap_err();
            assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
            assert!(e.to_string().contains(isa.name()), "{e}");
        }
    }
}
