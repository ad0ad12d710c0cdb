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
// Workgroup (table row v of the piece, tile z of TILE tokens): out[t][row_start + v] = x[t]·table[v].
// Each table value loaded serves the whole tile.
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read_write> logits_out: array<f32>;

const TILE: u32 = 8u;

var<workgroup> partial: array<array<f32, WG>, TILE>;

@compute @workgroup_size(64)
fn logits(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let rows = p[0];
    let cols = p[1];
    let v = wid.x + wid.y * nwg.x;
    let t0 = wid.z * TILE;
    var acc: array<f32, TILE>;
    if v < p[3] - p[2] {
        for (var k = lid; k < cols; k += WG) {
            let w = table_at(v * cols + k);
            for (var t = 0u; t < TILE; t++) {
                if t0 + t < rows {
                    acc[t] += x[(t0 + t) * cols + k] * w;
                }
            }
        }
    }
    for (var t = 0u; t < TILE; t++) {
        partial[t][lid] = acc[t];
    }
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if lid < stride {
            for (var t = 0u; t < TILE; t++) {
                partial[t][lid] += partial[t][lid + stride];
            }
        }
        workgroupBarrier();
    }
    let t = t0 + lid;
    if lid < TILE && v < p[3] - p[2] && t < rows {
        logits_out[t * p[4] + p[2] + v] = partial[lid][0];
    }
}
