//! CPU kernels for ternary (W1.58A8) transformer inference.
//!
//! This crate knows nothing of models, files or the runtime: every function takes plain slices and
//! shapes, checks them, and computes. The runtime's CPU backend splits work across threads (with
//! [`pool`]) and calls these kernels on disjoint pieces.
//!
//! One module per operation of the runtime's `Backend` trait (the same names as the WGSL shaders in
//! `shaders/` and the CUDA kernels in `cuda/`):
//! - [`bitlinear`]: W1.58A8, activation quantization and the ternary matrix product; the scalar
//!   reference every ternary kernel of the project is tested against, and three kernel families
//!   (multiply-add, base 3, lookup tables) in their own weight layouts.
//! - [`norm`]: RMSNorm of each row.
//! - [`attention`]: RoPE and causal grouped-query attention of one kv head's queries over the
//!   cache.
//! - [`elementwise`]: the gated activation and the residual add.
//! - [`table`]: embedding rows and the output head (full precision, and an 8-bit copy with exact
//!   top-k re-scoring).
//!
//! Infrastructure: [`isa`] (runtime detection of the SIMD level, `TERN_CPU_ISA` to force one),
//! `lanes` (each level's f32 vectors behind one trait, for float kernels written once) and [`pool`]
//! (the persistent thread pool the runtime spreads kernels over).

pub mod attention;
pub mod bitlinear;
pub mod elementwise;
pub mod isa;
mod lanes;
pub mod norm;
pub mod pool;
pub mod table;

/// What a kernel refuses: arguments that do not fit it, or a CPU without the instructions it was
/// asked to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A shape, length or value that does not fit the kernel it was passed to.
    Shape(String),
    /// An instruction-set level (or a kernel family at a level) this CPU or build does not have.
    Unsupported(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Shape(what) | Error::Unsupported(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for Error {}

/// The first `n` values of a scratch `buffer`, grown (with `fill`) to hold them but never shrunk:
/// its length follows the largest call, so that calls of other shapes in turn (a step's linears
/// alternate between widths) do not fill it again each time. The caller writes every value it
/// reads.
pub(crate) fn grown<T: Clone>(buffer: &mut Vec<T>, n: usize, fill: T) -> &mut [T] {
    if buffer.len() < n {
        buffer.resize(n, fill);
    }
    &mut buffer[..n]
}

/// Returns an error naming `what` unless `actual == expected`.
pub(crate) fn check_len(what: &str, actual: usize, expected: usize) -> Result<(), Error> {
    if actual == expected {
        Ok(())
    } else {
        Err(Error::Shape(format!(
            "{what}: expected {expected} elements, got {actual}"
        )))
    }
}
