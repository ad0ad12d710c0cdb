// Dense tables (token embedding, output head). A table may be split by rows into several buffers
// (each under the device's storage binding limit); each kernel runs once per piece, on the rows
// `row_start .. row_end` that piece holds. The element type comes from a prelude (table_*.wgsl)
// that declares binding 1 `table` and `fn table_at(i: u32) -> f32` (element i of the piece).
// The parameter blocks mirror `EmbedParams` and `LogitsParams` in src/backend/wgpu/params.rs.

const WG: u32 = 64u;

// ---- embed ----------------------------------------------------------------------------------
// One invocation per output value; rows of other pieces are left for their own dispatch.
struct EmbedParams {
    tokens: u32,
    cols: u32,
    row_start: u32,
    row_end: u32,
    ids: array<u32>, // one token id per output row
}

@group(0) @binding(0) var<storage, read> embed_p: EmbedParams;
@group(0) @binding(2) var<storage, read_write> embed_out: array<f32>;

@compute @workgroup_size(64)
fn embed(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let cols = embed_p.cols;
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if i >= embed_p.tokens * cols {
        return;
    }
    let token = embed_p.ids[i / cols];
    if token >= embed_p.row_start && token < embed_p.row_end {
        embed_out[i] = table_at((token - embed_p.row_start) * cols + i % cols);
    }
}

// ---- logits ---------------------------------------------------------------------------------
// One invocation per (table row v of the piece, token t): out[t][row_start + v] = x[t] · table[v],
// a serial dot product. No barriers: on software GPUs a workgroup barrier costs more than the dot
// product of a small model's row.
struct LogitsParams {
    tokens: u32,
    cols: u32,
    row_start: u32,
    row_end: u32,
    vocab: u32, // rows of the whole table: the stride of out
}

@group(0) @binding(3) var<storage, read> logits_p: LogitsParams;
@group(0) @binding(4) var<storage, read> x: array<f32>;
@group(0) @binding(5) var<storage, read_write> logits_out: array<f32>;

@compute @workgroup_size(64)
fn logits(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let cols = logits_p.cols;
    let pieces_rows = logits_p.row_end - logits_p.row_start;
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if i >= pieces_rows * logits_p.tokens {
        return;
    }
    let v = i % pieces_rows;
    let t = i / pieces_rows;
    var acc = 0.0;
    for (var k = 0u; k < cols; k++) {
        acc += x[t * cols + k] * table_at(v * cols + k);
    }
    logits_out[t * logits_p.vocab + logits_p.row_start + v] = acc;
}
