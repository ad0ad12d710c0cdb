//! BitLinear (W1.58A8), the `bitlinear` op: each activation row quantized to int8 per token
//! (absmax), multiplied by ternary weights with integer accumulation, and dequantized as
//! `acc / s · weight_scale`.
//!
//! - [`reference`]: the canonical packed 2-bit layout (what loaders produce and every backend
//!   repacks from) and the scalar reference product, the integer-exact oracle for every ternary
//!   kernel of the project (CPU, WGSL, CUDA).
//! - [`quant`]: per-token absmax int8 activation quantization (reference, and the padded rows the
//!   SIMD kernels consume).
//! - Three kernel families, each in its own weight layout, all integer-exact:
//!   - [`mad`]: multiply-add of unsigned 2-bit codes (scalar, AVX2, AVX-512 VNNI, NEON);
//!   - [`base3`]: multiply-add on five weights per byte (1.6 bits per weight);
//!   - [`lut`]: lookup tables of the 27 dot products of a weight triple (1.78 bits per weight).
//! - [`amx`]: AMX-INT8 tiles for prompts, over the multiply-add or base-3 weights (x86-64 Linux,
//!   where the CPU and OS allow it).
//! - [`grouped`]: the weight storage the two multiply-add families share.
//! - [`dequantize`]: the integer products, by weight row, to scaled outputs, by token.
//! - [`linear`]: one whole BitLinear over the thread pool ([`Linear::forward`]: quantize, the
//!   parallel product of one [`Family`], dequantize), and the rule that picks the family.

pub mod amx;
pub mod base3;
pub mod dequantize;
pub mod grouped;
pub mod linear;
pub mod lut;
pub mod mad;
pub mod quant;
pub mod reference;
#[cfg(test)]
pub(crate) mod testing;

pub use linear::{Family, Linear, LinearScratch};
