// table.wgsl prelude: bf16 elements, two per u32 (element 2i in the low half); a bf16 is the
// high half of an f32.
@group(0) @binding(1) var<storage, read> table: array<u32>;

fn table_at(i: u32) -> f32 {
    let word = table[i / 2u];
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (i & 1u) == 1u));
}
