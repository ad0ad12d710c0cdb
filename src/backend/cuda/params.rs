//! The kernels' parameters: every kernel of `cuda/*.cu` takes one struct by value, and each is
//! mirrored here field by field as a `#[repr(C)]` struct of the same name. Device pointers are
//! `u64` addresses ([`super::gpu::Buf::addr`]); fields are ordered pointers first, then 4-byte
//! values, with an explicit `pad` where the C struct's size rounds up to 8, so neither side has
//! padding the other does not see (bytemuck's `Pod` derive refuses implicit padding here).
//!
//! The same structs go to the CUDA driver and to the CPU emulation of the kernels (`cuda-emu/`),
//! whose build exports the C layouts; `tests/cuda_emu.rs` compares every size and field offset.

use cudarc::driver::DeviceRepr;

/// Parameters of one kernel: plain bytes passed by value as its single argument.
pub trait Params: bytemuck::Pod + DeviceRepr {}

macro_rules! params {
    ($($(#[$doc:meta])* $name:ident { $($field:ident: $ty:ty),* $(,)? })*) => {$(
        $(#[$doc])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
        pub struct $name {
            $(pub $field: $ty,)*
        }
        // SAFETY: a #[repr(C)] struct of plain integers and floats without padding (Pod), laid out
        // like the C struct of the same name (checked by tests/cuda_emu.rs).
        unsafe impl DeviceRepr for $name {}
        impl Params for $name {}
    )*};
}

params! {
    /// `bitlinear_quantize` (cuda/bitlinear.cu).
    QuantizeParams { x: u64, codes: u64, scales: u64, sums: u64, cols: i32, padded: i32 }
    /// The ternary products: `bitlinear_gemv1`, `bitlinear_gemv`, `bitlinear_gemm` and
    /// `bitlinear_gemm_mma` (which does not read `act_sums`); cuda/common.cuh.
    ProductParams {
        w: u64, x: u64, act_scales: u64, act_sums: u64, row_scales: u64, y: u64,
        n_rows: i32, chunks: i32, tokens: i32, pad: i32,
    }
    /// `rms_norm` (cuda/norm.cu).
    RmsNormParams { x: u64, weight: u64, out: u64, eps: f32, width: i32 }
    /// `gated` (cuda/elementwise.cu); `activation` 0 = relu², 1 = SiLU.
    GatedParams { gate_up: u64, out: u64, activation: i32, rows: i32, width: i32, pad: i32 }
    /// `add` (cuda/elementwise.cu).
    AddParams { acc: u64, x: u64, len: i32, pad: i32 }
    /// Every `embed_*` kernel (cuda/table.cu).
    EmbedParams { table: u64, tokens: u64, out: u64, cols: i32, pad: i32 }
    /// Every `logits_*` kernel (cuda/table.cu).
    LogitsParams { table: u64, x: u64, out: u64, vocab: i32, cols: i32, rows: i32, pad: i32 }
    /// `argmax_rows` (cuda/argmax.cu).
    ArgmaxParams { logits: u64, ids: u64, vocab: i32, pad: i32 }
    /// The KV cache's shape and the layer, shared by the attention kernels (cuda/attention.cu).
    Geometry {
        heads: i32, kv_heads: i32, head_dim: i32, layers: i32, page_size: i32, pages_per_slot: i32,
        layer: i32, pad: i32,
    }
    /// `rope_append` (cuda/attention.cu).
    RopeAppendParams {
        qkv: u64, rows: u64, pages: u64, rope: u64, k_cache: u64, v_cache: u64, g: Geometry,
    }
    /// `attend_partial` (cuda/attention.cu).
    AttendPartialParams {
        qkv: u64, rows: u64, pages: u64, k_cache: u64, v_cache: u64, partial: u64, g: Geometry,
        keys_per_split: i32, pad: i32,
    }
    /// `attend_combine` (cuda/attention.cu).
    AttendCombineParams { partial: u64, out: u64, splits: i32, heads: i32, head_dim: i32, pad: i32 }
}
