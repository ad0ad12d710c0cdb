// The bitlinear op, W1.58A8: per-row int8 activation quantization, then the ternary product with
// integer accumulation. Results equal tern_cpu::bitlinear::reference bit for bit.
//
// Layouts (K16 = cols rounded up to a multiple of 16):
// - weights `w`: row n is K16 / 16 words; word j holds elements 16j .. 16j + 15, element
//   16j + 4g + b at bits 8b + 2g as its code (value + 1). `(word >> 2g) & 0x03030303` is then four
//   int8 lanes holding the codes of elements 16j + 4g .. 16j + 4g + 3. Padding codes are 1 (value 0).
// - quantized activations `qx`: row t is K16 / 4 words, word i holds x codes 4i .. 4i + 3 as int8
//   lanes (lane b = element 4i + b); padding codes are 0.
// - `quant[t]`: the row's scale s = 127 / max(absmax, 1e-5) and the sum of its codes.
// With codes c = value + 1: Σ value·x = Σ c·x − Σ x, so one subtraction per row and token.
//
// The gemv kernel expects a `tile_sum(slot, v)` (see bitlinear_reduce_*.wgsl) that adds every
// invocation's `v` into `sums[slot]`; integer sums are exact in any order.

struct RowQuant {
    scale: f32,
    code_sum: i32,
}

const WG: u32 = 64u;
const TILE: u32 = 8u; // tokens per workgroup: each weight word loaded once serves TILE tokens

// ---- quantize: one workgroup per row ------------------------------------------------------------

// Mirrors `QuantizeParams` in src/backend/wgpu/params.rs.
struct QuantizeParams {
    tokens: u32,
    cols: u32,
    x_words: u32, // words of one quantized row
}

@group(0) @binding(0) var<storage, read> quantize_p: QuantizeParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> qx_out: array<u32>;
@group(0) @binding(3) var<storage, read_write> quant_out: array<RowQuant>;

var<workgroup> absmax_bits: atomic<u32>;
var<workgroup> code_sum: atomic<i32>;

// Correctly rounded a / b (ties to even), as the CPU computes it; WGSL's `/` may be off by 2.5 ulp,
// which would move codes across rounding boundaries. Valid for normal or zero `a`, normal `b` and a
// normal quotient, which holds for the scale 127 / absmax and for acc / scale.
fn div_rn(a: f32, b: f32) -> f32 {
    let ua = bitcast<u32>(a);
    let ub = bitcast<u32>(b);
    let sign = (ua ^ ub) & 0x80000000u;
    // IEEE special cases (a is always finite here; b is 0 only for a row holding ±Inf, whose
    // scale 127 / Inf is 0): 0 / 0 = NaN, x / 0 = ±Inf, x / ±Inf = ±0.
    if (ub & 0x7fffffffu) == 0u {
        if a == 0.0 {
            return bitcast<f32>(0x7fc00000u);
        }
        return bitcast<f32>(sign | 0x7f800000u);
    }
    if a == 0.0 {
        return 0.0;
    }
    if (ub & 0x7fffffffu) == 0x7f800000u {
        return bitcast<f32>(sign);
    }
    var ma = (ua & 0x7fffffu) | 0x800000u;
    let mb = (ub & 0x7fffffu) | 0x800000u;
    var e = i32((ua >> 23u) & 0xffu) - i32((ub >> 23u) & 0xffu) + 127;
    if ma < mb {
        ma = ma << 1u;
        e -= 1;
    }
    // Long division: 24 quotient bits and one rounding bit; the remainder is the sticky bit.
    var r = ma;
    var q = 0u;
    for (var i = 0u; i < 25u; i++) {
        q = q << 1u;
        if r >= mb {
            r -= mb;
            q |= 1u;
        }
        r = r << 1u;
    }
    var m = q >> 1u;
    if (q & 1u) == 1u && (r != 0u || (m & 1u) == 1u) {
        m += 1u;
    }
    if m == 0x1000000u {
        m = m >> 1u;
        e += 1;
    }
    return bitcast<f32>(sign | (u32(e) << 23u) | (m & 0x7fffffu));
}

@compute @workgroup_size(64)
fn quantize(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x;
    let cols = quantize_p.cols;
    let words = quantize_p.x_words;
    if lid == 0u {
        atomicStore(&absmax_bits, 0u);
        atomicStore(&code_sum, 0);
    }
    workgroupBarrier();
    var m = 0.0;
    for (var k = lid; k < cols; k += WG) {
        // NaN is skipped (a NaN compares unequal to itself), as the CPU's f32::max does.
        let v = abs(x[row * cols + k]);
        if v == v {
            m = max(m, v);
        }
    }
    // Non-negative floats order like their bit patterns.
    atomicMax(&absmax_bits, bitcast<u32>(m));
    workgroupBarrier();
    let s = div_rn(127.0, max(bitcast<f32>(atomicLoad(&absmax_bits)), 1e-5));
    var sum = 0;
    for (var w = lid; w < words; w += WG) {
        var packed = 0u;
        for (var b = 0u; b < 4u; b++) {
            let k = 4u * w + b;
            if k < cols {
                // NaN (a NaN input, or ±Inf times the scale 0 of a row holding ±Inf) gives code 0,
                // like the CPU's saturating conversion.
                let p = x[row * cols + k] * s;
                var q = 0;
                if p == p {
                    q = i32(clamp(round(p), -128.0, 127.0));
                }
                sum += q;
                packed |= (u32(q) & 0xffu) << (8u * b);
            }
        }
        qx_out[row * words + w] = packed;
    }
    atomicAdd(&code_sum, sum);
    workgroupBarrier();
    if lid == 0u {
        quant_out[row] = RowQuant(s, atomicLoad(&code_sum));
    }
}

// ---- the product ----------------------------------------------------------------------------
// Two kernels share `accumulate` (one weight word against a tile of up to TILE tokens: each word
// loaded serves the whole tile) and `store`:
// - gemv (decode, tokens <= TILE): workgroup per weight row n, invocations split the row's words,
//   then `tile_sum` reduces across the workgroup;
// - gemm (prefill): one invocation per (row n, tile of TILE tokens), walking the whole row; no
//   barriers, so many more rows are in flight.

// Mirrors `BitlinearParams` in src/backend/wgpu/params.rs.
struct BitlinearParams {
    tokens: u32,
    out_features: u32,
    w_words: u32, // words of one weight row
}

@group(0) @binding(4) var<storage, read> p: BitlinearParams;
@group(0) @binding(5) var<storage, read> w: array<u32>;
@group(0) @binding(6) var<storage, read> row_scale: array<f32>;
@group(0) @binding(7) var<storage, read> qx: array<u32>;
@group(0) @binding(8) var<storage, read> quant: array<RowQuant>;
@group(0) @binding(9) var<storage, read_write> out: array<f32>;

var<workgroup> sums: array<atomic<i32>, TILE>;

fn accumulate(n: u32, j: u32, t0: u32, acc: ptr<function, array<i32, TILE>>) {
    let tokens = p.tokens;
    let w_words = p.w_words;
    let word = w[n * w_words + j];
    for (var g = 0u; g < 4u; g++) {
        let lanes = (word >> (2u * g)) & 0x03030303u;
        for (var t = 0u; t < TILE; t++) {
            if t0 + t < tokens {
                (*acc)[t] += dot4I8Packed(lanes, qx[(t0 + t) * 4u * w_words + 4u * j + g]);
            }
        }
    }
}

// Writes acc / s · scale for row n and token t, where acc = Σ code·x and Σ value·x = acc − Σ x.
fn store(n: u32, t: u32, code_dot: i32) {
    let q = quant[t];
    out[t * p.out_features + n] = div_rn(f32(code_dot - q.code_sum), q.scale) * row_scale[n];
}

@compute @workgroup_size(64)
fn gemv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let n = wid.x + wid.y * nwg.x;
    let valid = n < p.out_features;
    if lid < TILE {
        atomicStore(&sums[lid], 0);
    }
    workgroupBarrier();
    var acc: array<i32, TILE>;
    if valid {
        for (var j = lid; j < p.w_words; j += WG) {
            accumulate(n, j, 0u, &acc);
        }
    }
    for (var t = 0u; t < TILE; t++) {
        tile_sum(t, acc[t]);
    }
    workgroupBarrier();
    if valid && lid < p.tokens {
        store(n, lid, atomicLoad(&sums[lid]));
    }
}

@compute @workgroup_size(64)
fn gemm(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let n_out = p.out_features;
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    let n = i % n_out;
    let t0 = (i / n_out) * TILE;
    if t0 >= p.tokens {
        return;
    }
    var acc: array<i32, TILE>;
    for (var j = 0u; j < p.w_words; j++) {
        accumulate(n, j, t0, &acc);
    }
    for (var t = 0u; t < TILE && t0 + t < p.tokens; t++) {
        store(n, t0 + t, acc[t]);
    }
}
