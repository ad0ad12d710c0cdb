// Attention over the device KV cache: RoPE + cache append, then split-K (flash-decoding) attention.
//
// KV cache: f32 or f16 (the kernels' suffix: rope_append_f32 / _f16, attend_partial_f32 / _f16; f16
// rounded to nearest even when stored, widened exactly when read), one array per K and V, the
// trait's paged pool
// [page][layer][position in page][kv_head · head_dim]; position p of slot s is in page
// pages[s · pages_per_slot + p / page_size] (the caller's page table, checked on the host). Row
// metadata `rows` holds (slot, position) pairs, one per row of the batch.
// RoPE angles come from a host-computed table [capacity][head_dim / 2] of cos then sin
// (tern_cpu::attention::rope::rope_cos_sin), so the rotated values match the CPU bit for bit.
//
// Attention of row r (position p) reads keys 0..=p of its slot. The keys are cut into splits of
// `keys_per_split`; block (split, head, row) keeps an online softmax per warp, merges its warps and
// writes (max, sum, acc[head_dim]) to `partial`; attend_combine merges the splits. This serves
// decode (few rows, many splits) and prefill (many rows, causal by each row's position) alike.
// head_dim ≤ ATT_MAX_DIM; GQA: query head h reads kv head h / (heads / kv_heads).

#define ATT_MAX_DIM 256
#define ATT_PER_LANE (ATT_MAX_DIM / 32)
#define ATT_WARPS 4

struct Geometry {
    int heads;
    int kv_heads;
    int head_dim;
    int layers;
    int page_size;
    int pages_per_slot;
    int layer;
    int pad;
};

// The caches' elements are float or u16 (f16), as the kernel's suffix says.
struct RopeAppendParams {
    float* qkv;
    const int2* rows;
    const int* pages;
    const float* rope;
    void* k_cache;
    void* v_cache;
    Geometry g;
};

struct AttendPartialParams {
    const float* qkv;
    const int2* rows;
    const int* pages;
    const void* k_cache;
    const void* v_cache;
    float* partial;
    Geometry g;
    int keys_per_split;
    int pad;
};

struct AttendCombineParams {
    const float* partial;
    float* out;
    int splits;
    int heads;
    int head_dim;
    int pad;
};

__device__ __forceinline__ size_t cache_offset(const Geometry& g, const int* pages, int slot,
                                               int position) {
    const size_t page = (size_t)pages[(size_t)slot * g.pages_per_slot + position / g.page_size];
    return ((page * g.layers + g.layer) * g.page_size + position % g.page_size) *
           (size_t)g.kv_heads * g.head_dim;
}

// One cache element, stored from and read as f32.
__device__ __forceinline__ void store_kv(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_kv(u16* p, size_t i, float v) { p[i] = f32_to_f16(v); }
__device__ __forceinline__ float load_kv(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load_kv(const u16* p, size_t i) { return f16_to_f32(p[i]); }

// Grid (rows, heads + kv_heads), block head_dim / 2 threads: rotates pair (i, i + head_dim/2) of
// each q and k head in place; kv heads also store k (rotated) and v in the cache.
template <typename KV>
__device__ __forceinline__ void rope_append(const RopeAppendParams& params) {
    float* __restrict__ qkv = params.qkv;
    const int2* __restrict__ rows = params.rows;
    const int* __restrict__ pages = params.pages;
    const float* __restrict__ rope = params.rope;
    KV* __restrict__ k_cache = static_cast<KV*>(params.k_cache);
    KV* __restrict__ v_cache = static_cast<KV*>(params.v_cache);
    const Geometry g = params.g;
    const int half = g.head_dim / 2, i = threadIdx.x, h = blockIdx.y;
    const int2 rp = rows[blockIdx.x];
    const int q_dim = g.heads * g.head_dim, kv_dim = g.kv_heads * g.head_dim;
    float* row = qkv + (size_t)blockIdx.x * (q_dim + 2 * kv_dim);
    float* head = row + (size_t)h * g.head_dim;
    const float c = rope[(size_t)rp.y * g.head_dim + i];
    const float s = rope[(size_t)rp.y * g.head_dim + half + i];
    const float a = head[i], b = head[half + i];
    const float lo = a * c - b * s, hi = b * c + a * s;
    head[i] = lo;
    head[half + i] = hi;
    if (h >= g.heads) {
        const int kvh = h - g.heads;
        const size_t at = cache_offset(g, pages, rp.x, rp.y) + (size_t)kvh * g.head_dim;
        const float* v = row + q_dim + kv_dim + (size_t)kvh * g.head_dim;
        store_kv(k_cache, at + i, lo);
        store_kv(k_cache, at + half + i, hi);
        store_kv(v_cache, at + i, v[i]);
        store_kv(v_cache, at + half + i, v[half + i]);
    }
}

extern "C" __global__ void rope_append_f32(const __grid_constant__ RopeAppendParams params) {
    rope_append<float>(params);
}

extern "C" __global__ void rope_append_f16(const __grid_constant__ RopeAppendParams params) {
    rope_append<u16>(params);
}

// Grid (splits, heads, rows), block ATT_WARPS warps; partial holds head_dim + 2 floats per
// (row, head, split).
template <typename KV>
__device__ __forceinline__ void attend_partial(const AttendPartialParams& params) {
    const float* __restrict__ qkv = params.qkv;
    const int2* __restrict__ rows = params.rows;
    const int* __restrict__ pages = params.pages;
    const KV* __restrict__ k_cache = static_cast<const KV*>(params.k_cache);
    const KV* __restrict__ v_cache = static_cast<const KV*>(params.v_cache);
    float* __restrict__ partial = params.partial;
    const Geometry g = params.g;
    const int keys_per_split = params.keys_per_split;
    __shared__ float sm_m[ATT_WARPS], sm_l[ATT_WARPS];
    __shared__ float sm_acc[ATT_WARPS][ATT_MAX_DIM];
    const int split = blockIdx.x, h = blockIdx.y, r = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int2 rp = rows[r];
    const int d = g.head_dim;
    const int width = (g.heads + 2 * g.kv_heads) * d;
    const int kvh = h / (g.heads / g.kv_heads);
    const float* q = qkv + (size_t)r * width + (size_t)h * d;
    const float inv_sqrt_d = 1.0f / sqrtf((float)d);

    float qr[ATT_PER_LANE], acc[ATT_PER_LANE];
#pragma unroll
    for (int e = 0; e < ATT_PER_LANE; ++e) {
        const int i = lane + 32 * e;
        qr[e] = i < d ? q[i] : 0.0f;
        acc[e] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const int begin = split * keys_per_split;
    const int end = min(rp.y + 1, begin + keys_per_split);
    for (int j = begin + warp; j < end; j += ATT_WARPS) {
        const size_t at = cache_offset(g, pages, rp.x, j) + (size_t)kvh * d;
        const KV* k = k_cache + at;
        const KV* v = v_cache + at;
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < ATT_PER_LANE; ++e) {
            const int i = lane + 32 * e;
            if (i < d) dot += qr[e] * load_kv(k, i);
        }
        const float score = warp_sum(dot) * inv_sqrt_d;
        const float m_new = fmaxf(m, score);
        const float correction = expf(m - m_new);  // 0 on the first key (m = -inf)
        const float p = expf(score - m_new);
        l = l * correction + p;
#pragma unroll
        for (int e = 0; e < ATT_PER_LANE; ++e) {
            const int i = lane + 32 * e;
            if (i < d) acc[e] = acc[e] * correction + p * load_kv(v, i);
        }
        m = m_new;
    }
    if (lane == 0) { sm_m[warp] = m; sm_l[warp] = l; }
#pragma unroll
    for (int e = 0; e < ATT_PER_LANE; ++e) {
        const int i = lane + 32 * e;
        if (i < d) sm_acc[warp][i] = acc[e];
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int w = 0; w < ATT_WARPS; ++w) mx = fmaxf(mx, sm_m[w]);
    float* out = partial + (((size_t)r * g.heads + h) * gridDim.x + split) * (d + 2);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float a = 0.0f;
        for (int w = 0; w < ATT_WARPS; ++w)
            if (sm_m[w] != -INFINITY) a += sm_acc[w][i] * expf(sm_m[w] - mx);
        out[2 + i] = a;
    }
    if (threadIdx.x == 0) {
        float sum = 0.0f;
        for (int w = 0; w < ATT_WARPS; ++w)
            if (sm_m[w] != -INFINITY) sum += sm_l[w] * expf(sm_m[w] - mx);
        out[0] = mx;
        out[1] = sum;
    }
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attend_partial_f32(const __grid_constant__ AttendPartialParams params) {
    attend_partial<float>(params);
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attend_partial_f16(const __grid_constant__ AttendPartialParams params) {
    attend_partial<u16>(params);
}

// Grid (heads, rows), block head_dim threads: merges the splits of one (row, head) into out.
extern "C" __global__ void attend_combine(const __grid_constant__ AttendCombineParams params) {
    const float* __restrict__ partial = params.partial;
    float* __restrict__ out = params.out;
    const int splits = params.splits, heads = params.heads, head_dim = params.head_dim;
    const int h = blockIdx.x, r = blockIdx.y, i = threadIdx.x;
    const float* p = partial + ((size_t)r * heads + h) * splits * (head_dim + 2);
    float mx = -INFINITY;
    for (int s = 0; s < splits; ++s) mx = fmaxf(mx, p[(size_t)s * (head_dim + 2)]);
    float sum = 0.0f, acc = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float* ps = p + (size_t)s * (head_dim + 2);
        if (ps[0] == -INFINITY) continue;  // a split past this row's last key
        const float w = expf(ps[0] - mx);
        sum += ps[1] * w;
        acc += ps[2 + i] * w;
    }
    out[((size_t)r * heads + h) * head_dim + i] = acc / sum;
}
