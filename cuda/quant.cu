// Per-token absmax int8 activation quantization (tern_cpu::quant, bit for bit).
//
// One block per row of `cols` f32 values: s = 127 / max(max|x|, 1e-5),
// q = clamp(round_half_even(x * s), -128, 127). Codes are written with a row stride of `padded`
// bytes (a multiple of 64, so the ternary kernels can read 16 bytes at a time); the padding is zero.
// sums[row] = Σ q, which the ternary kernels subtract because they multiply by code = value + 1.

extern "C" __global__ void quantize_rows(const float* __restrict__ x, int cols, int padded,
                                         i8* __restrict__ codes, float* __restrict__ scales,
                                         int* __restrict__ sums) {
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
        if (i < cols) q = (int)fminf(fmaxf(rintf(__fmul_rn(row[i], s)), -128.0f), 127.0f);
        out[i] = (i8)q;
        sum += q;
    }
    sum = block_sum_int(sum, scratch_i);
    if (threadIdx.x == 0) {
        scales[blockIdx.x] = s;
        sums[blockIdx.x] = sum;
    }
}
