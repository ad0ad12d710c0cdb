//! CPU kernels for ternary (W1.58A8) transformer inference.
//!
//! This crate knows nothing of models, files or the runtime: every function takes plain slices and
//! shapes, checks them, and computes. The runtime's CPU backend splits work across threads (with
//! [`pool`]) and calls these kernels on disjoint pieces.
//!
//! - [`ternary`]: the packed 2-bit weight layout and the scalar reference W1.58A8 matrix product,
//!   the integer-exact oracle that every other ternary kernel in the project is tested against.
//! - [`quant`]: per-token absmax int8 activation quantization (reference, and the vectorized rows
//!   the SIMD kernels consume).
//! - [`grouped`]: the weight storage of the multiply-add families (rows in groups of 4, each
//!   group's blocks side by side).
//! - [`mad`]: the multiply-add ternary GEMV/GEMM kernels (scalar, AVX2, AVX-512 VNNI, NEON) in
//!   their own repacked layout.
//! - [`base3`]: multiply-add kernels on five weights per byte (1.6 bits per weight): a direct
//!   AVX-512 VNNI GEMV, elsewhere each group of rows decoded for [`mad`]'s micro-kernels.
//! - [`lut`]: the lookup-table ternary GEMV/GEMM kernels (scalar, AVX-512BW `vpermw`): per-token
//!   tables of the 27 dot products of a weight triple, 1.78 bits per weight, in their own layout.
//! - [`pool`]: the persistent thread pool the runtime spreads kernels over (workers spin between
//!   the short jobs of a decode step instead of parking).
//! - [`head`]: an 8-bit copy of the output head with error bounds, for exact top-k re-scoring.
//! - [`isa`]: runtime detection of the SIMD level, and `TERN_CPU_ISA` to force one.
//! - [`lanes`]: each level's f32 vectors behind one trait, for float kernels written once.
//! - [`attention`]: causal grouped-query attention of one kv head's queries over the cache.
//! - [`float`]: RMSNorm, RoPE, gated activations, dense dot products.

pub mod attention;
pub mod base3;
pub mod float;
pub mod grouped;
pub mod head;
pub mod isa;
mod lanes;
pub mod lut;
pub mod mad;
pub mod pool;
pub mod quant;
pub mod ternary;
#[cfg(test)]
mod testing;

/// A shape or length that does not fit the kernel it was passed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError(pub String);

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShapeError {}

/// Returns an error naming `what` unless `actual == expected`.
pub(crate) fn check_len(what: &str, actual: usize, expected: usize) -> Result<(), ShapeError> {
    if actual == expected {
        Ok(())
    } else {
        Err(ShapeError(format!(
            "{what}: expected {expected} elements, got {actual}"
        )))
    }
}
