// Dense tables (token embedding, output head). A table may be split by rows into several buffers
// (each under the device's storage binding limit); each kernel runs once per piece, on the rows
// `row_start .. row_end` that piece holds. The element type comes from a prelude (table_*.wgsl)
// that declares binding 1 `table` and `fn table_at(i: u32) -> f32` (element i of the piece).

const WG: u32 = 64u;

@group(0) @binding(0) var<storage, read> p: array<u32>;

// ---- embed: params [tokens, cols, row_start, row_end, token ids...] -------------------------
// One invocation per output value; rows of other pieces are left for their own dispatch.
@group(0) @binding(2) var<storage, read_write> embed_out: array<f32>;

@compute @workgroup_size(64)
fn embed(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let cols = p[1];
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if i >= p[0] * cols {
        return;
    }
    let token = p[4u + i / cols];
    if token >= p[2] && token < p[3] {
        embed_out[i] = table_at((token - p[2]) * cols + i % cols);
    }
}

// ---- logits: params [rows, cols, row_start, row_end, vocab] ----------------------------------
// One invocation per (table row v of the piece, token t): out[t][row_start + v] = x[t] · table[v],
// a serial dot product. No barriers: on software GPUs a workgroup barrier costs more than the dot
// product of a small model's row.
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read_write> logits_out: array<f32>;

@compute @workgroup_size(64)
fn logits(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let rows = p[0];
    let cols = p[1];
    let pieces_rows = p[3] - p[2];
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if i >= pieces_rows * rows {
        return;
    }
    let v = i % pieces_rows;
    let t = i / pieces_rows;
    var acc = 0.0;
    for (var k = 0u; k < cols; k++) {
        acc += x[t * cols + k] * table_at(v * cols + k);
    }
    logits_out[t * p[4] + p[2] + v] = acc;
}
