// The attention op: RoPE + KV-cache append, then causal GQA attention over the cache.
//
// qkv rows are q‖k‖v (heads + 2·kv_heads heads of head_dim). One layer's cache is two buffers
// `[page][position in page][kv_heads · head_dim]` of the element type a prelude gives
// (attention_kv_f32.wgsl or attention_kv_f16.wgsl: the bindings k_cache_rw, v_cache_rw, k_cache,
// v_cache and their accessors load_k, load_v, store_k_pair, store_v_pair); position `pos` of slot
// `slot` is in page
// `page_table[slot · pages_per_slot + pos / page_size]` (the trait's page table). `rope[position · head_dim + i]` and
// `rope[position · head_dim + head_dim/2 + i]` hold the cos and sin of pair (i, i + head_dim/2),
// computed on the host with the CPU's f32 formula (src/backend/gpu_upload.rs).

const WG: u32 = 64u;
const MAX_HEAD_DIM: u32 = 256u; // four output dims per invocation

// Mirrors `SlotPosition` and `AttentionParams` in src/backend/wgpu/params.rs.
struct SlotPosition {
    slot: u32,
    position: u32,
}

struct AttentionParams {
    tokens: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    page_size: u32, // positions per page
    pages_per_slot: u32, // page-table entries per slot
    inv_sqrt_d: f32,
    rows: array<SlotPosition>, // one per row of the batch
}

@group(0) @binding(0) var<storage, read> p: AttentionParams;
@group(0) @binding(9) var<storage, read> page_table: array<u32>;

// Where position `pos` of `slot` starts in a layer's K or V buffer.
fn cache_row(slot: u32, pos: u32) -> u32 {
    let page = page_table[slot * p.pages_per_slot + pos / p.page_size];
    return (page * p.page_size + pos % p.page_size) * p.kv_heads * p.head_dim;
}

// ---- rope_append: one workgroup per row -----------------------------------------------------
// Rotates q in place in qkv, writes rotated k and plain v to the row's cache position. Each
// invocation takes two adjacent dims (i, i + 1) of a head and their partners (i + half,
// i + 1 + half), so each cache store writes a pair of adjacent values (a whole word in f16).
@group(0) @binding(1) var<storage, read_write> qkv_rw: array<f32>;
@group(0) @binding(2) var<storage, read> rope: array<f32>;

@compute @workgroup_size(64)
fn rope_append(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x;
    let heads = p.heads;
    let kv_heads = p.kv_heads;
    let hd = p.head_dim;
    let half = hd / 2u;
    let pairs = (half + 1u) / 2u; // per head; the last is single when half is odd
    let slot = p.rows[row].slot;
    let pos = p.rows[row].position;
    let q_dim = heads * hd;
    let kv_dim = kv_heads * hd;
    let base = row * (q_dim + 2u * kv_dim);
    let cache_at = cache_row(slot, pos);
    for (var idx = lid; idx < (heads + kv_heads) * pairs; idx += WG) {
        let h = idx / pairs;
        let i = 2u * (idx % pairs);
        let both = i + 1u < half;
        let j = select(i, i + 1u, both); // the second dim, or the first again
        let at = base + h * hd;
        let a = vec2<f32>(qkv_rw[at + i], qkv_rw[at + j]);
        let b = vec2<f32>(qkv_rw[at + half + i], qkv_rw[at + half + j]);
        let c = vec2<f32>(rope[pos * hd + i], rope[pos * hd + j]);
        let s = vec2<f32>(rope[pos * hd + half + i], rope[pos * hd + half + j]);
        let lo = a * c - b * s;
        let hi = b * c + a * s;
        if h < heads {
            qkv_rw[at + i] = lo.x;
            qkv_rw[at + half + i] = hi.x;
            if both {
                qkv_rw[at + j] = lo.y;
                qkv_rw[at + half + j] = hi.y;
            }
        } else {
            let k_at = cache_at + (h - heads) * hd + i;
            store_k_pair(k_at, lo, both);
            store_k_pair(k_at + half, hi, both);
        }
    }
    let v_at = base + q_dim + kv_dim;
    for (var i = 2u * lid; i < kv_dim; i += 2u * WG) {
        store_v_pair(cache_at + i, vec2<f32>(qkv_rw[v_at + i], qkv_rw[v_at + i + 1u]));
    }
}

// ---- attend: one workgroup per (row, query head) -------------------------------------------
// Keys are visited in chunks of WG (one key per invocation) with an online softmax: a running
// max m and sum l, rescaling the output accumulators when the max grows.
@group(0) @binding(5) var<storage, read> qkv: array<f32>;
@group(0) @binding(8) var<storage, read_write> out: array<f32>;

var<workgroup> q_sh: array<f32, MAX_HEAD_DIM>;
var<workgroup> probs: array<f32, WG>;
var<workgroup> red: array<f32, WG>;

fn reduce_max(lid: u32) -> f32 {
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if lid < stride {
            red[lid] = max(red[lid], red[lid + stride]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn reduce_sum(lid: u32) -> f32 {
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if lid < stride {
            red[lid] += red[lid + stride];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(64)
fn attend(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let heads = p.heads;
    let kv_heads = p.kv_heads;
    let hd = p.head_dim;
    let inv_sqrt_d = p.inv_sqrt_d;
    let item = wid.x + wid.y * nwg.x;
    let valid = item < p.tokens * heads;
    let row = select(0u, item / heads, valid);
    let h = item % heads;
    let slot = p.rows[row].slot;
    let n_keys = select(0u, p.rows[row].position + 1u, valid);
    let kv_off = (h / (heads / kv_heads)) * hd;
    let q_at = row * (heads + 2u * kv_heads) * hd + h * hd;

    for (var d = lid; d < hd; d += WG) {
        q_sh[d] = qkv[q_at + d];
    }
    workgroupBarrier();

    var m = -3.0e38;
    var l = 0.0;
    var o = vec4<f32>(0.0);
    let chunks = (n_keys + WG - 1u) / WG;
    for (var c = 0u; c < chunks; c++) {
        let j = c * WG + lid;
        var s = -3.0e38;
        if j < n_keys {
            let k_at = cache_row(slot, j) + kv_off;
            var dot = 0.0;
            for (var d = 0u; d < hd; d++) {
                dot += q_sh[d] * load_k(k_at + d);
            }
            s = dot * inv_sqrt_d;
        }
        red[lid] = s;
        workgroupBarrier();
        let new_m = max(m, reduce_max(lid));
        let corr = exp(m - new_m);
        var pj = 0.0;
        if j < n_keys {
            pj = exp(s - new_m);
        }
        probs[lid] = pj;
        red[lid] = pj;
        workgroupBarrier();
        l = l * corr + reduce_sum(lid);
        o *= corr;
        let in_chunk = min(WG, n_keys - c * WG);
        for (var jj = 0u; jj < in_chunk; jj++) {
            let v_at = cache_row(slot, c * WG + jj) + kv_off;
            let pv = probs[jj];
            for (var r = 0u; r < 4u; r++) {
                let d = lid + r * WG;
                if d < hd {
                    o[r] += pv * load_v(v_at + d);
                }
            }
        }
        m = new_m;
        workgroupBarrier();
    }
    if valid {
        let out_at = row * heads * hd + h * hd;
        for (var r = 0u; r < 4u; r++) {
            let d = lid + r * WG;
            if d < hd {
                out[out_at + d] = o[r] / l;
            }
        }
    }
}
