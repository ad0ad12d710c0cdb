// The bitlinear op (W1.58A8): per-token int8 activation quantization (bitlinear_quantize), then
// the ternary matrix product with int32 accumulation (bitlinear_gemv1/gemv/gemm here, dp4a;
// bitlinear_gemm_mma in bitlinear_mma.cu on int8 tensor cores). Every result equals
// tern_cpu::bitlinear::reference bit for bit.
//
// ---- Activation quantization ---------------------------------------------------------------
// Per-token absmax int8 activation quantization (tern_cpu::bitlinear::quant, bit for bit).
//
// One block per row of `cols` f32 values: s = 127 / max(max|x|, 1e-5) (fmaxf skips NaN, as the
// CPU's f32::max does; a row holding ±Inf has s = 0), q = clamp(round_half_even(x * s), -128, 127),
// and q = 0 where x * s is NaN. Codes are written with a row stride of `padded`
// bytes (a multiple of 64, so the ternary kernels can read 16 bytes at a time); the padding is zero.
// sums[row] = Σ q, which the ternary kernels subtract because they multiply by code = value + 1.

struct QuantizeParams {
    const float* x;
    i8* codes;
    float* scales;
    int* sums;
    int cols;
    int padded;
};

extern "C" __global__ void bitlinear_quantize(const __grid_constant__ QuantizeParams p) {
    const float* __restrict__ x = p.x;
    i8* __restrict__ codes = p.codes;
    float* __restrict__ scales = p.scales;
    int* __restrict__ sums = p.sums;
    const int cols = p.cols, padded = p.padded;
    __shared__ float scratch_f[32];
    __shared__ int scratch_i[32];
    const float* row = x + (size_t)blockIdx.x * cols;
    i8* out = codes + (size_t)blockIdx.x * padded;

    float m = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, fabsf(row[i]));
    m = block_max(m, scratch_f);
    const float s = 127.0f / fmaxf(m, 1e-5f);

    int sum = 0;
    for (int i = threadIdx.x; i < padded; i += blockDim.x) {
        int q = 0;
        if (i < cols) {
            // NaN (a NaN input, or ±Inf times the zero scale of a row holding ±Inf) gives code 0,
            // like the CPU's `as i8`; fmaxf alone would turn it into -128.
            const float r = rintf(__fmul_rn(row[i], s));
            q = r != r ? 0 : (int)fminf(fmaxf(r, -128.0f), 127.0f);
        }
        out[i] = (i8)q;
        sum += q;
    }
    sum = block_sum_int(sum, scratch_i);
    if (threadIdx.x == 0) {
        scales[blockIdx.x] = s;
        sums[blockIdx.x] = sum;
    }
}

// ---- W2A8 ternary matrix products: 2-bit weights × int8 activations, dp4a ---------------------
//
// Weight layout (written by src/backend/cuda/layout.rs at upload): each output row holds `padded`
// codes (a multiple of 64; padding codes are 1, value 0) as u32 words of 16 codes. In word g of a
// row, byte b, bits 2j..2j+1 hold code(16g + 4j + b), code = value + 1 ∈ {0, 1, 2}. So
// (word >> 2j) & 0x03030303 is four int8 lanes lining up with activation bytes 16g + 4j .. + 3,
// and one 16-byte load brings 64 weights. The kernels compute Σ code·x with dp4a and subtract Σ x
// (from bitlinear_quantize), which is exact: Σ (code - 1)·x = Σ code·x - Σ x.
//
// Activations: `padded` int8 codes per token (zero padded), with a per-token scale s and sum.
// Output: y[t][n] = (acc / s[t]) * row_scale[n] in f32 (`dequantize` in common.cuh).

#define LANE_MASK 0x03030303u

// Σ over one 64-weight chunk: four weight words against sixteen activation words.
__device__ __forceinline__ int dot_chunk(uint4 w, const uint4* __restrict__ x, int acc) {
    const u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int g = 0; g < 4; ++g) {
        const uint4 a = __ldg(x + g);
        const u32 as[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int j = 0; j < 4; ++j)
            acc = __dp4a((int)((ws[g] >> (2 * j)) & LANE_MASK), (int)as[j], acc);
    }
    return acc;
}

// Decode and small batches: one warp per output row, the lanes striding over 16-byte weight chunks,
// four independent chunk loads in flight per lane where the row is long enough; each weight chunk
// is loaded once for all tokens. Instantiated for one token (decode: few registers, so many warps
// per SM keep HBM busy) and for up to GEMV_MAX_TOKENS tokens (batched decode).
#define GEMV_MAX_TOKENS 8
template <int MAX_TOKENS>
__device__ __forceinline__ void gemv(const ProductParams& p) {
    const uint4* __restrict__ w = p.w;
    const uint4* __restrict__ x = p.x;
    const int n_rows = p.n_rows, chunks = p.chunks, tokens = p.tokens;
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= n_rows) return;
    const uint4* wr = w + (size_t)row * chunks;
    int acc[MAX_TOKENS];
#pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) acc[t] = 0;
    int c = lane;
    for (; c + 96 < chunks; c += 128) {
        uint4 wc[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) wc[u] = __ldg(wr + c + 32 * u);
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
            for (int t = 0; t < MAX_TOKENS; ++t)
                if (t < tokens) acc[t] = dot_chunk(wc[u], x + ((size_t)t * chunks + c + 32 * u) * 4, acc[t]);
    }
    for (; c < chunks; c += 32) {
        const uint4 wc = __ldg(wr + c);
#pragma unroll
        for (int t = 0; t < MAX_TOKENS; ++t)
            if (t < tokens) acc[t] = dot_chunk(wc, x + ((size_t)t * chunks + c) * 4, acc[t]);
    }
#pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) {
        if (t < tokens) {
            const int sum = warp_sum_int(acc[t]);
            if (lane == 0)
                p.y[(size_t)t * n_rows + row] =
                    dequantize(sum - p.act_sums[t], p.act_scales[t], p.row_scales[row]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) bitlinear_gemv1(const __grid_constant__ ProductParams p) {
    gemv<1>(p);
}
extern "C" __global__ void __launch_bounds__(256) bitlinear_gemv(const __grid_constant__ ProductParams p) {
    gemv<GEMV_MAX_TOKENS>(p);
}

// Prefill: a 64-row × 64-token output tile per block of 256 threads, 64 weights deep per step,
// staged in shared memory so each weight word serves 64 tokens and each activation word 64 rows.
// Thread (tx, ty) owns rows ty + 16i and tokens tx + 16j (i, j < 4).
#define TILE 64
extern "C" __global__ void __launch_bounds__(256)
bitlinear_gemm(const __grid_constant__ ProductParams p) {
    const uint4* __restrict__ w = p.w;
    const uint4* __restrict__ x = p.x;
    const float* __restrict__ act_scales = p.act_scales;
    const int* __restrict__ act_sums = p.act_sums;
    const float* __restrict__ row_scales = p.row_scales;
    float* __restrict__ y = p.y;
    const int n_rows = p.n_rows, chunks = p.chunks, tokens = p.tokens;
    __shared__ u32 ws[TILE][4 + 1];   // one 64-weight chunk per row (+1 word against bank conflicts)
    __shared__ u32 xs[TILE][16 + 1];  // 64 activation bytes per token
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int row0 = blockIdx.x * TILE, tok0 = blockIdx.y * TILE;
    int acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0;

    for (int c = 0; c < chunks; ++c) {
        if (threadIdx.x < TILE) {
            const int r = row0 + threadIdx.x;
            // Rows past the end read as code 1 (value 0); their outputs are never written.
            const uint4 v = r < n_rows ? __ldg(w + (size_t)r * chunks + c)
                                       : make_uint4(0x55555555u, 0x55555555u, 0x55555555u, 0x55555555u);
            ws[threadIdx.x][0] = v.x; ws[threadIdx.x][1] = v.y;
            ws[threadIdx.x][2] = v.z; ws[threadIdx.x][3] = v.w;
        }
        {
            const int t = threadIdx.x >> 2, part = threadIdx.x & 3;
            const uint4 v = tok0 + t < tokens ? __ldg(x + ((size_t)(tok0 + t) * chunks + c) * 4 + part)
                                              : make_uint4(0, 0, 0, 0);
            xs[t][4 * part] = v.x; xs[t][4 * part + 1] = v.y;
            xs[t][4 * part + 2] = v.z; xs[t][4 * part + 3] = v.w;
        }
        __syncthreads();
#pragma unroll
        for (int g = 0; g < 4; ++g) {
            u32 wg[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) wg[i] = ws[ty + 16 * i][g];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                int a[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) a[j] = (int)xs[tx + 16 * j][4 * g + k];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int lanes = (int)((wg[i] >> (2 * k)) & LANE_MASK);
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(lanes, a[j], acc[i][j]);
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = row0 + ty + 16 * i;
        if (r >= n_rows) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int t = tok0 + tx + 16 * j;
            if (t < tokens)
                y[(size_t)t * n_rows + r] = dequantize(acc[i][j] - act_sums[t], act_scales[t], row_scales[r]);
        }
    }
}
