// W2A8 prefill GEMM on int8 tensor cores (mma.sync m16n8k32 s8, compute capability 8.0+; older
// GPUs use bitlinear_gemm in bitlinear.cu). Same weight and activation layouts as bitlinear.cu.
//
// Block: 8 warps, a 128-row × 64-token output tile, 64 weights deep per step. Weights are decoded
// to int8 values (code - 1) while staged into shared memory, so the accumulator is Σ value·x
// directly. Warp (wm, wn) = (warp % 4, warp / 4) owns rows 32·wm .. +32 and tokens 32·wn .. +32:
// 2 × 4 tiles of 16 × 8, two k32 steps per 64-deep chunk. The next chunk's global loads are issued
// before the current one is multiplied. Shared rows are 20 words (16 + 4 padding), which spreads a
// fragment load's 32 lanes over all 32 banks.
//
// Fragments (PTX ISA, mma.m16n8k32 .s8; g = lane / 4, t = lane % 4; words of 4 int8 along k):
// A regs 0..3 = (row g, k 4t), (row g+8, k 4t), (row g, k 16+4t), (row g+8, k 16+4t);
// B regs 0..1 = (token g, k 4t), (token g, k 16+4t); C regs 0..3 = (row g, token 2t), (g, 2t+1),
// (g+8, 2t), (g+8, 2t+1). The product itself is common.cuh's mma_s8.

#define MMA_ROWS 128
#define MMA_TOKENS 64
#define STRIDE 20

extern "C" __global__ void __launch_bounds__(256)
bitlinear_gemm_mma(const __grid_constant__ ProductParams p) {
    const uint4* __restrict__ w = p.w;
    const uint4* __restrict__ x = p.x;
    const float* __restrict__ act_scales = p.act_scales;
    const float* __restrict__ row_scales = p.row_scales;
    float* __restrict__ y = p.y;
    const int n_rows = p.n_rows, chunks = p.chunks, tokens = p.tokens;
    __shared__ __align__(16) u32 ws[MMA_ROWS * STRIDE];
    __shared__ __align__(16) u32 xs[MMA_TOKENS * STRIDE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp & 3, wn = warp >> 2;
    const int row0 = blockIdx.x * MMA_ROWS, tok0 = blockIdx.y * MMA_TOKENS;

    // What this thread stages: weight row threadIdx.x (threads < 128), token threadIdx.x / 4's
    // 16-byte part threadIdx.x % 4.
    const int w_row = row0 + threadIdx.x;
    const bool w_loader = threadIdx.x < MMA_ROWS;
    // chunks == 0 (a linear of zero input width) loads nothing: its buffers hold no chunk.
    const bool w_valid = w_loader && w_row < n_rows && chunks > 0;
    const int x_tok = threadIdx.x >> 2, x_part = threadIdx.x & 3;
    const bool x_valid = tok0 + x_tok < tokens && chunks > 0;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    uint4 w_next = w_valid ? __ldg(w + (size_t)w_row * chunks) : zero;
    uint4 x_next = x_valid ? __ldg(x + (size_t)(tok0 + x_tok) * chunks * 4 + x_part) : zero;

    int acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

    for (int c = 0; c < chunks; ++c) {
        if (w_loader) {
            // Rows past the end stage zeros (value 0); their outputs are never written.
            const u32 words[4] = {w_next.x, w_next.y, w_next.z, w_next.w};
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                u32 v[4];
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    v[j] = w_valid ? __vsub4((words[q] >> (2 * j)) & 0x03030303u, 0x01010101u) : 0u;
                *(uint4*)&ws[threadIdx.x * STRIDE + 4 * q] = make_uint4(v[0], v[1], v[2], v[3]);
            }
        }
        *(uint4*)&xs[x_tok * STRIDE + 4 * x_part] = x_next;
        __syncthreads();
        if (c + 1 < chunks) {
            if (w_valid) w_next = __ldg(w + (size_t)w_row * chunks + c + 1);
            if (x_valid) x_next = __ldg(x + ((size_t)(tok0 + x_tok) * chunks + c + 1) * 4 + x_part);
        }
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
            u32 a[2][4], b[4][2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const u32* base = ws + (wm * 32 + i * 16 + g) * STRIDE + kk * 8 + t;
                a[i][0] = base[0];
                a[i][1] = base[8 * STRIDE];
                a[i][2] = base[4];
                a[i][3] = base[8 * STRIDE + 4];
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const u32* base = xs + (wn * 32 + j * 8 + g) * STRIDE + kk * 8 + t;
                b[j][0] = base[0];
                b[j][1] = base[4];
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_s8(acc[i][j], a[i], b[j]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int row = row0 + wm * 32 + i * 16 + g + (r >= 2 ? 8 : 0);
                const int tok = tok0 + wn * 32 + j * 8 + 2 * t + (r & 1);
                if (row < n_rows && tok < tokens)
                    y[(size_t)tok * n_rows + row] =
                        dequantize(acc[i][j][r], act_scales[tok], row_scales[row]);
            }
}
