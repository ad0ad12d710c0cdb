// attention.wgsl prelude: the KV cache in f16 without the shader-f16 feature, two values per u32
// (element 2i in the low half), read exactly with unpack2x16float. Stores round to nearest even
// by hand (f16_bits), as the CPU and CUDA backends do: pack2x16float's rounding is the driver's
// choice (lavapipe's differs), and the same rounding everywhere stores the same values. Every
// store writes a whole word (an even element and the next), so no two invocations share one; the
// host requires head_dim to be a multiple of 4, so rope_append's pairs never straddle the
// rotation's halves.
@group(0) @binding(3) var<storage, read_write> k_cache_rw: array<u32>;
@group(0) @binding(4) var<storage, read_write> v_cache_rw: array<u32>;
@group(0) @binding(6) var<storage, read> k_cache: array<u32>;
@group(0) @binding(7) var<storage, read> v_cache: array<u32>;

fn load_k(i: u32) -> f32 {
    return unpack2x16float(k_cache[i / 2u])[i % 2u];
}

fn load_v(i: u32) -> f32 {
    return unpack2x16float(v_cache[i / 2u])[i % 2u];
}

// The f16 nearest to `f` (ties to even; overflow to infinity; NaN quiet, keeping the top of its
// payload), as bits.
fn f16_bits(f: f32) -> u32 {
    let x = bitcast<u32>(f);
    let sign = (x >> 16u) & 0x8000u;
    let exp = (x >> 23u) & 0xffu;
    let man = x & 0x7fffffu;
    if exp == 0xffu {
        return sign | 0x7c00u | select(0u, 0x200u | (man >> 13u), man != 0u);
    }
    let e = i32(exp) - 112; // the f16 exponent field, before range checks
    if e >= 31 {
        return sign | 0x7c00u;
    }
    if e < -10 {
        return sign; // below half the smallest subnormal
    }
    // Keep the top bits of the significand and round the `shift` dropped ones (13 for a normal
    // result, more for a subnormal one).
    var kept: u32;
    var dropped: u32;
    var shift: u32;
    if e > 0 {
        shift = 13u;
        kept = (u32(e) << 10u) | (man >> 13u);
        dropped = man & 0x1fffu;
    } else {
        let m = man | 0x800000u;
        shift = u32(14 - e);
        kept = m >> shift;
        dropped = m & ((1u << shift) - 1u);
    }
    let halfway = 1u << (shift - 1u);
    if dropped > halfway || (dropped == halfway && (kept & 1u) == 1u) {
        kept += 1u; // a carry into the exponent (or to infinity) is the right result
    }
    return sign | kept;
}

fn f16_pair(v: vec2<f32>) -> u32 {
    return f16_bits(v.x) | (f16_bits(v.y) << 16u);
}

// Elements i (even) and i + 1; `both` is always true here (see above).
fn store_k_pair(i: u32, v: vec2<f32>, both: bool) {
    k_cache_rw[i / 2u] = f16_pair(v);
}

fn store_v_pair(i: u32, v: vec2<f32>) {
    v_cache_rw[i / 2u] = f16_pair(v);
}
