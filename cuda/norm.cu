// The norm op: RMSNorm, following tern_cpu::norm operation by operation (sum of squares in f64,
// IEEE sqrt and division).

// One block per row of `width` values: out = w * (x * (1 / sqrt(mean(x²) + eps))).
struct RmsNormParams {
    const float* x;
    const float* weight;
    float* out;
    float eps;
    int width;
};

extern "C" __global__ void rms_norm(const __grid_constant__ RmsNormParams p) {
    const float* __restrict__ x = p.x;
    const float* __restrict__ weight = p.weight;
    float* __restrict__ out = p.out;
    const float eps = p.eps;
    const int width = p.width;
    __shared__ double scratch[32];
    const float* row = x + (size_t)blockIdx.x * width;
    float* o = out + (size_t)blockIdx.x * width;
    double sum = 0.0;
    for (int i = threadIdx.x; i < width; i += blockDim.x) sum += (double)row[i] * (double)row[i];
    sum = block_sum_f64(sum, scratch);
    const float mean_sq = (float)(sum / (double)width);
    const float inv = 1.0f / sqrtf(mean_sq + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) o[i] = weight[i] * (row[i] * inv);
}
