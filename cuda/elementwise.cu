// Row-wise and element-wise float ops: RMSNorm, the gated activation, the residual add.
// Each follows tern_cpu::float operation by operation (sum of squares in f64, IEEE sqrt/division).

// One block per row of `width` values: out = w * (x * (1 / sqrt(mean(x²) + eps))).
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ weight,
                                    float eps, int width, float* __restrict__ out) {
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

// out[t][i] = act(gate[t][i]) * up[t][i] for rows of gate‖up (2·width values).
// activation: 0 = relu(g)², 1 = g·sigmoid(g) (the GateActivation order on the Rust side).
extern "C" __global__ void gated(const float* __restrict__ gate_up, int activation, int rows,
                                 int width, float* __restrict__ out) {
    const size_t n = (size_t)rows * width;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / width, k = i % width;
        const float g = gate_up[t * 2 * width + k], u = gate_up[t * 2 * width + width + k];
        float a;
        if (activation == 0) {
            const float r = fmaxf(g, 0.0f);
            a = r * r;
        } else {
            a = g / (1.0f + expf(-g));
        }
        out[i] = a * u;
    }
}

// acc[i] += x[i].
extern "C" __global__ void add(float* __restrict__ acc, const float* __restrict__ x, int len) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < len; i += gridDim.x * blockDim.x)
        acc[i] += x[i];
}
