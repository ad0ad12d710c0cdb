// table.wgsl prelude: f32 elements.
@group(0) @binding(1) var<storage, read> table: array<f32>;

fn table_at(i: u32) -> f32 {
    return table[i];
}
