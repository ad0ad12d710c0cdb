// table.wgsl prelude: f16 elements without the shader-f16 feature; two per u32 (element 2i in
// the low half), unpacked exactly with unpack2x16float.
@group(0) @binding(1) var<storage, read> table: array<u32>;

fn table_at(i: u32) -> f32 {
    return unpack2x16float(table[i / 2u])[i % 2u];
}
