// attention.wgsl prelude: the KV cache in f32, one element per value.
@group(0) @binding(3) var<storage, read_write> k_cache_rw: array<f32>;
@group(0) @binding(4) var<storage, read_write> v_cache_rw: array<f32>;
@group(0) @binding(6) var<storage, read> k_cache: array<f32>;
@group(0) @binding(7) var<storage, read> v_cache: array<f32>;

fn load_k(i: u32) -> f32 {
    return k_cache[i];
}

fn load_v(i: u32) -> f32 {
    return v_cache[i];
}

// Elements i and (when `both`) i + 1.
fn store_k_pair(i: u32, v: vec2<f32>, both: bool) {
    k_cache_rw[i] = v.x;
    if both {
        k_cache_rw[i + 1u] = v.y;
    }
}

fn store_v_pair(i: u32, v: vec2<f32>) {
    v_cache_rw[i] = v.x;
    v_cache_rw[i + 1u] = v.y;
}
