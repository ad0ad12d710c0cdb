// The argmax op: greedy sampling on the device.
//
// ids[t] = the first index of the largest of row t's `vocab`
// logits (the CPU sampler's tie rule), so only one u32 per row crosses to the host.
// One block of 1024 threads per row.
struct ArgmaxParams {
    const float* logits;
    u32* ids;
    int vocab;
    int pad;
};

extern "C" __global__ void __launch_bounds__(1024) argmax_rows(const __grid_constant__ ArgmaxParams p) {
    const float* __restrict__ logits = p.logits;
    u32* __restrict__ ids = p.ids;
    const int vocab = p.vocab;
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = row[i];
        if (v > bv) { bv = v; bi = i; }  // strided ascending: keeps the first maximum
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
        const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { best_v[warp] = bv; best_i[warp] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w)
            if (best_v[w] > bv || (best_v[w] == bv && best_i[w] < bi)) { bv = best_v[w]; bi = best_i[w]; }
        ids[blockIdx.x] = bi == 0x7fffffff ? 0u : (u32)bi;
    }
}
