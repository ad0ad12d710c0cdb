// table.wgsl prelude: f16 elements read natively (Features::SHADER_F16), widened to f32.
enable f16;

@group(0) @binding(1) var<storage, read> table: array<f16>;

fn table_at(i: u32) -> f32 {
    return f32(table[i]);
}
