// Element-wise ops: the gated activation and the residual add, following tern_cpu::elementwise.

// out[t][i] = act(gate[t][i]) * up[t][i] for rows of gate‖up (2·width values).
// activation: 0 = relu(g)², 1 = g·sigmoid(g) (the GateActivation order on the Rust side).
struct GatedParams {
    const float* gate_up;
    float* out;
    int activation;
    int rows;
    int width;
    int pad;
};

extern "C" __global__ void gated(const __grid_constant__ GatedParams p) {
    const float* __restrict__ gate_up = p.gate_up;
    float* __restrict__ out = p.out;
    const int activation = p.activation, rows = p.rows, width = p.width;
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
struct AddParams {
    float* acc;
    const float* x;
    int len;
    int pad;
};

extern "C" __global__ void add(const __grid_constant__ AddParams p) {
    float* __restrict__ acc = p.acc;
    const float* __restrict__ x = p.x;
    const int len = p.len;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < len; i += gridDim.x * blockDim.x)
        acc[i] += x[i];
}
