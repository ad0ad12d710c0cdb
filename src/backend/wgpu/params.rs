//! Typed kernel parameters: one `#[repr(C)]` struct per kernel, mirrored field by field (same
//! names, types and order) by a WGSL struct of the same name that the kernel binds as its
//! parameter block. Two kernels may share one struct (`gemv` and `gemm`, `rope_append` and
//! `attend`).
//!
//! A block is a fixed header, optionally followed by a variable-length tail (token ids, row
//! positions): in WGSL the struct's last member, a runtime-sized array; in Rust
//! [`KernelParams::Tail`] values written after the header at the array's offset (the header
//! size rounded up to the element's alignment). Only 4-byte scalars and structs of them appear,
//! so `repr(C)` and WGSL's storage layout agree without padding; `tests::rust_and_wgsl_layouts_agree`
//! checks every field's name, offset, size and type against the shaders as naga lays them out.

use bytemuck::{Pod, Zeroable};

/// The memory layout of a type both sides name: a scalar (no fields) or a struct.
#[derive(Debug)]
pub struct Layout {
    /// The WGSL type name (`u32`, `f32`, or the struct's name on both sides).
    pub name: &'static str,
    pub size: usize,
    pub align: usize,
    pub fields: &'static [Field],
}

/// A struct field: its name, byte offset and type.
#[derive(Debug)]
pub struct Field {
    pub name: &'static str,
    pub offset: usize,
    pub ty: &'static Layout,
}

/// A plain-data type with a WGSL twin.
pub trait Mirrored: Pod {
    const LAYOUT: Layout;
}

macro_rules! scalar {
    ($($ty:ty),*) => {$(
        impl Mirrored for $ty {
            const LAYOUT: Layout = Layout {
                name: stringify!($ty),
                size: size_of::<$ty>(),
                align: align_of::<$ty>(),
                fields: &[],
            };
        }
    )*};
}
scalar!(u32, i32, f32);

/// The element type of blocks without a tail.
impl Mirrored for () {
    const LAYOUT: Layout = Layout {
        name: "()",
        size: 0,
        align: 1,
        fields: &[],
    };
}

/// The variable-length tail of a parameter block: the WGSL array's name and element.
#[derive(Debug)]
pub struct Tail {
    pub name: &'static str,
    pub element: &'static Layout,
}

/// A kernel's parameter block.
pub trait KernelParams: Mirrored {
    /// Element of the variable-length tail (`()` for none).
    type Tail: Mirrored;
    /// The tail as WGSL declares it (`None` for none).
    const TAIL: Option<Tail>;

    /// Byte offset of the tail: the header rounded up to the tail element's alignment.
    fn tail_offset() -> usize {
        size_of::<Self>().next_multiple_of(align_of::<Self::Tail>())
    }
}

/// Declares a `#[repr(C)]` plain-data struct with its [`Layout`], and for a parameter block its
/// tail (`tail NAME: [ELEMENT]`, or `no tail`).
macro_rules! mirrored {
    (
        $(#[$meta:meta])*
        pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident: $ty:ty,)* }
        $($tail:tt)*
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl Mirrored for $name {
            const LAYOUT: Layout = Layout {
                name: stringify!($name),
                size: size_of::<$name>(),
                align: align_of::<$name>(),
                fields: &[$(Field {
                    name: stringify!($field),
                    offset: std::mem::offset_of!($name, $field),
                    ty: &<$ty as Mirrored>::LAYOUT,
                },)*],
            };
        }

        mirrored!(@tail $name $($tail)*);
    };
    (@tail $name:ident) => {};
    (@tail $name:ident no tail) => {
        impl KernelParams for $name {
            type Tail = ();
            const TAIL: Option<Tail> = None;
        }
    };
    (@tail $name:ident tail $array:ident: [$element:ty]) => {
        impl KernelParams for $name {
            type Tail = $element;
            const TAIL: Option<Tail> = Some(Tail {
                name: stringify!($array),
                element: &<$element as Mirrored>::LAYOUT,
            });
        }
    };
}

mirrored! {
    /// `quantize` (bitlinear.wgsl): one workgroup per token row.
    pub struct QuantizeParams {
        pub tokens: u32,
        pub cols: u32,
        /// Words of one quantized row (4 int8 codes each, 16-code aligned).
        pub x_words: u32,
    }
    no tail
}

mirrored! {
    /// `gemv` and `gemm` (bitlinear.wgsl): the ternary product.
    pub struct BitlinearParams {
        pub tokens: u32,
        pub out_features: u32,
        /// Words of one weight row (16 codes each).
        pub w_words: u32,
    }
    no tail
}

mirrored! {
    /// `rms_norm` (norm.wgsl).
    pub struct NormParams {
        pub tokens: u32,
        pub width: u32,
        pub eps: f32,
    }
    no tail
}

mirrored! {
    /// Where one row of an attention batch goes: its KV-cache slot and position.
    pub struct SlotPosition {
        pub slot: u32,
        pub position: u32,
    }
}

mirrored! {
    /// `rope_append` and `attend` (attention.wgsl), then one [`SlotPosition`] per row.
    pub struct AttentionParams {
        pub tokens: u32,
        pub heads: u32,
        pub kv_heads: u32,
        pub head_dim: u32,
        /// Positions per KV page.
        pub page_size: u32,
        /// Page-table entries per slot.
        pub pages_per_slot: u32,
        pub inv_sqrt_d: f32,
    }
    tail rows: [SlotPosition]
}

mirrored! {
    /// `gated` (elementwise.wgsl).
    pub struct GatedParams {
        pub tokens: u32,
        pub width: u32,
        /// 0: ReLU², 1: SiLU.
        pub activation: u32,
    }
    no tail
}

mirrored! {
    /// `add` (elementwise.wgsl).
    pub struct AddParams {
        pub len: u32,
    }
    no tail
}

mirrored! {
    /// `embed` (table.wgsl) on the piece holding rows `row_start .. row_end`, then the token ids.
    pub struct EmbedParams {
        pub tokens: u32,
        pub cols: u32,
        pub row_start: u32,
        pub row_end: u32,
    }
    tail ids: [u32]
}

mirrored! {
    /// `logits` (table.wgsl) on the piece holding rows `row_start .. row_end` of `vocab`.
    pub struct LogitsParams {
        pub tokens: u32,
        pub cols: u32,
        pub row_start: u32,
        pub row_end: u32,
        pub vocab: u32,
    }
    no tail
}

/// Every parameter block with its tail, for the layout test.
#[cfg(test)]
pub const ALL: [(&Layout, Option<Tail>); 8] = [
    (&QuantizeParams::LAYOUT, QuantizeParams::TAIL),
    (&BitlinearParams::LAYOUT, BitlinearParams::TAIL),
    (&NormParams::LAYOUT, NormParams::TAIL),
    (&AttentionParams::LAYOUT, AttentionParams::TAIL),
    (&GatedParams::LAYOUT, GatedParams::TAIL),
    (&AddParams::LAYOUT, AddParams::TAIL),
    (&EmbedParams::LAYOUT, EmbedParams::TAIL),
    (&LogitsParams::LAYOUT, LogitsParams::TAIL),
];
