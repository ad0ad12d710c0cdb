//! Launch configurations of every kernel, as pure functions of the op's shape: the CUDA backend
//! launches with them, and the CPU emulation harness (`cuda-emu/`, tests/cuda_emu.rs) runs the same
//! kernels with the same grids, so a wrong grid or split shows up without a GPU.
//!
//! CUDA limits a grid to 2³¹ − 1 blocks in x and 65,535 in y and z; every configuration here is
//! checked against them, and a shape past them is an error naming the op, never a launch the
//! driver rejects or, worse, one that silently covers part of the output.

use anyhow::{Result, ensure};

/// Largest batch the GEMV kernel takes (`GEMV_MAX_TOKENS` in cuda/bitlinear.cu).
pub const GEMV_MAX_TOKENS: usize = 8;
/// Codes per 16-byte weight load: rows are padded to a multiple of it (`cuda/bitlinear.cu`).
pub const CHUNK: usize = 64;
/// Largest head dimension of cuda/attention.cu (`ATT_MAX_DIM`).
pub const ATT_MAX_DIM: usize = 256;
/// Threads per block of the row-wise and grid-stride kernels.
pub const BLOCK: u32 = 256;
/// Threads per block of `argmax_rows`.
pub const ARGMAX_BLOCK: u32 = 1024;
/// Threads per block of `attend_partial` (`ATT_WARPS` warps in cuda/attention.cu).
pub const ATTEND_BLOCK: u32 = 128;
/// CUDA's limit on grid x.
pub const MAX_GRID_X: usize = i32::MAX as usize;
/// CUDA's limit on grid y and z.
pub const MAX_GRID_YZ: usize = 65_535;

/// A grid and block shape (`cudarc::driver::LaunchConfig` without shared memory, which no kernel
/// takes dynamically).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

/// `grid` (x, y, z) in blocks and `threads` per block, checked against CUDA's limits for `what`.
fn launch(what: &str, grid: (usize, usize, usize), threads: usize) -> Result<Launch> {
    ensure!(
        grid.0 <= MAX_GRID_X && grid.1 <= MAX_GRID_YZ && grid.2 <= MAX_GRID_YZ,
        "{what}: a grid of {}x{}x{} blocks is past CUDA's limits ({MAX_GRID_X} x {MAX_GRID_YZ} x \
         {MAX_GRID_YZ}); split the batch",
        grid.0,
        grid.1,
        grid.2
    );
    Ok(Launch {
        grid: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block: (threads as u32, 1, 1),
    })
}

/// Grid-stride kernels (`gated`, `add`): more blocks than this only add scheduling overhead.
pub fn grid_stride(n: usize) -> Launch {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 65_535);
    Launch {
        grid: (blocks as u32, 1, 1),
        block: (BLOCK, 1, 1),
    }
}

/// One block of [`BLOCK`] threads per row (`bitlinear_quantize`, `rms_norm`, `embed_*`).
pub fn per_row(what: &str, rows: usize) -> Result<Launch> {
    launch(what, (rows, 1, 1), BLOCK as usize)
}

/// One warp per output row (`bitlinear_gemv*`, `logits_*`).
pub fn warp_per_row(what: &str, rows: usize) -> Result<Launch> {
    launch(
        what,
        ((rows * 32).div_ceil(BLOCK as usize), 1, 1),
        BLOCK as usize,
    )
}

/// `argmax_rows`: one block of [`ARGMAX_BLOCK`] threads per row.
pub fn argmax(rows: usize) -> Result<Launch> {
    launch("argmax", (rows, 1, 1), ARGMAX_BLOCK as usize)
}

/// The matrix-product kernel of a bitlinear op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Product {
    /// `bitlinear_gemv1`: one token.
    Gemv1,
    /// `bitlinear_gemv`: 2 to [`GEMV_MAX_TOKENS`] tokens.
    Gemv,
    /// `bitlinear_gemm`: dp4a tiles of 64 rows × 64 tokens.
    Gemm,
    /// `bitlinear_gemm_mma`: tensor-core tiles of 128 rows × 64 tokens.
    GemmMma,
}

impl Product {
    pub fn kernel(self) -> &'static str {
        match self {
            Self::Gemv1 => "bitlinear_gemv1",
            Self::Gemv => "bitlinear_gemv",
            Self::Gemm => "bitlinear_gemm",
            Self::GemmMma => "bitlinear_gemm_mma",
        }
    }
}

/// The bitlinear op's two launches: `bitlinear_quantize` then the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bitlinear {
    pub quantize: Launch,
    pub product: Product,
    pub product_launch: Launch,
    /// Activation row length in bytes (input width padded to [`CHUNK`]).
    pub padded: usize,
    /// 64-code chunks (16-byte loads) per weight and activation row: `padded / CHUNK`.
    pub chunks: usize,
}

/// The launches of a bitlinear op of `tokens` rows, `n_out` outputs, `cols` inputs; `mma` when the
/// tensor-core GEMM is loaded.
pub fn bitlinear(tokens: usize, n_out: usize, cols: usize, mma: bool) -> Result<Bitlinear> {
    let padded = cols.div_ceil(CHUNK) * CHUNK;
    let quantize = per_row("bitlinear_quantize", tokens)?;
    let (product, product_launch) = if tokens <= GEMV_MAX_TOKENS {
        let p = if tokens == 1 {
            Product::Gemv1
        } else {
            Product::Gemv
        };
        (p, warp_per_row(p.kernel(), n_out)?)
    } else if mma {
        let grid = (n_out.div_ceil(128), tokens.div_ceil(64), 1);
        (Product::GemmMma, launch("bitlinear_gemm_mma", grid, 256)?)
    } else {
        let grid = (n_out.div_ceil(64), tokens.div_ceil(64), 1);
        (Product::Gemm, launch("bitlinear_gemm", grid, 256)?)
    };
    Ok(Bitlinear {
        quantize,
        product,
        product_launch,
        padded,
        chunks: padded / CHUNK,
    })
}

/// The attention op's three launches and its key splits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attention {
    pub rope_append: Launch,
    pub attend_partial: Launch,
    pub attend_combine: Launch,
    pub keys_per_split: usize,
    pub splits: usize,
    /// f32 values of the `partial` scratch: rows × heads × splits × (head_dim + 2).
    pub partial_len: usize,
}

/// The launches of attention over `rows` rows with a cache of `capacity` positions.
///
/// Splits over the keys: enough blocks to fill the GPU for decode, one split when the batch alone
/// has plenty of (row, head) blocks (prefill). Sized by the capacity, not the rows' positions, so
/// a captured decode step stays valid as positions advance; splits past a row's last key finish at
/// once.
pub fn attention(
    rows: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
) -> Result<Attention> {
    let wanted = 1024usize.div_ceil(rows.max(1) * heads);
    let keys_per_split = capacity.div_ceil(wanted.clamp(1, capacity.div_ceil(32).max(1)));
    let splits = capacity.div_ceil(keys_per_split.max(1));
    Ok(Attention {
        rope_append: launch("rope_append", (rows, heads + kv_heads, 1), head_dim / 2)?,
        attend_partial: launch(
            "attend_partial",
            (splits, heads, rows),
            ATTEND_BLOCK as usize,
        )?,
        attend_combine: launch("attend_combine", (heads, rows, 1), head_dim)?,
        keys_per_split,
        splits,
        partial_len: rows * heads * splits * (head_dim + 2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_follow_the_batch_size() {
        let p = |tokens, mma| bitlinear(tokens, 100, 130, mma).unwrap();
        assert_eq!(p(1, true).product, Product::Gemv1);
        assert_eq!(p(8, true).product, Product::Gemv);
        assert_eq!(p(9, true).product, Product::GemmMma);
        assert_eq!(p(9, false).product, Product::Gemm);
        assert_eq!(p(9, true).product_launch.grid, (1, 1, 1));
        assert_eq!(p(130, false).product_launch.grid, (2, 3, 1));
        assert_eq!((p(1, true).padded, p(1, true).chunks), (192, 3));
        assert_eq!(bitlinear(3, 5, 0, true).unwrap().chunks, 0);
    }

    /// Rows in grid y or z past 65,535 are refused with the op's name, not launched.
    #[test]
    fn grids_past_cuda_limits_are_refused() {
        let e = attention(MAX_GRID_YZ + 1, 20, 5, 128, 70_000).unwrap_err();
        assert!(e.to_string().contains("attend_partial"), "{e}");
        assert!(attention(MAX_GRID_YZ, 20, 5, 128, 70_000).is_ok());
        let tokens = (MAX_GRID_YZ + 1) * 64;
        let e = bitlinear(tokens, 64, 64, true).unwrap_err();
        assert!(e.to_string().contains("bitlinear_gemm_mma"), "{e}");
        assert!(bitlinear(tokens - 64, 64, 64, false).is_ok());
        // Heads go to grid y of rope_append: (heads + kv_heads) past the limit is refused too.
        assert!(attention(1, MAX_GRID_YZ, 1, 2, 8).is_err());
    }

    #[test]
    fn decode_splits_the_keys_and_prefill_does_not() {
        let decode = attention(1, 20, 5, 128, 4096).unwrap();
        assert!(decode.splits > 1);
        assert!(decode.splits * decode.keys_per_split >= 4096);
        let prefill = attention(512, 20, 5, 128, 4096).unwrap();
        assert_eq!(prefill.splits, 1);
        assert_eq!(prefill.partial_len, 512 * 20 * 130);
    }
}
