// Shared helpers, prepended to every kernel file before NVRTC compiles it (so no kernel needs an
// include path or a CUDA toolkit header). Kernels are compiled with --fmad=false and IEEE division
// and square root, so that float results follow the CPU reference operation by operation.

typedef unsigned int u32;
typedef unsigned short u16;
typedef signed char i8;

#define FULL_MASK 0xffffffffu

// The only inline PTX of the kernels. The CPU emulation harness (cuda-emu/) compiles these sources
// as C++ with TERN_CUDA_EMU defined and its own versions of all three (cuda-emu/emu/emu.h).
#ifndef TERN_CUDA_EMU
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Rounds to the nearest f16, ties to even (overflow to infinity, NaN stays NaN).
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// c += a · b on int8 tensor cores (compute capability 8.0+), fragments as bitlinear_mma.cu says.
__device__ __forceinline__ void mma_s8(int* c, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Block-wide reductions for blocks of whole warps (at most 32 warps); every thread gets the result.
// `scratch` is shared memory of 32 elements; callers may reuse it after the call returns.
#define BLOCK_REDUCE(NAME, T, WARP_OP, COMBINE, IDENTITY)                      \
    __device__ __forceinline__ T NAME(T v, T* scratch) {                         \
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;              \
        const int warps = blockDim.x >> 5;                                       \
        v = WARP_OP(v);                                                          \
        __syncthreads();                                                         \
        if (lane == 0) scratch[warp] = v;                                        \
        __syncthreads();                                                         \
        T r = IDENTITY;                                                          \
        for (int w = 0; w < warps; ++w) r = COMBINE(r, scratch[w]);              \
        return r;                                                                \
    }
__device__ __forceinline__ float add_f32(float a, float b) { return a + b; }
__device__ __forceinline__ int add_int(int a, int b) { return a + b; }
__device__ __forceinline__ double add_f64(double a, double b) { return a + b; }
BLOCK_REDUCE(block_max, float, warp_max, fmaxf, 0.0f)
BLOCK_REDUCE(block_sum_int, int, warp_sum_int, add_int, 0)
BLOCK_REDUCE(block_sum_f64, double, warp_sum_f64, add_f64, 0.0)

// Kernel parameters: each kernel takes one struct by value, mirrored field by field by a
// #[repr(C)] struct of src/backend/cuda/params.rs (device pointers there are u64; a test compares
// sizes and offsets through the emulator build). Fields are ordered pointers first, so there is no
// padding the Rust side would not see. Each is a `const __grid_constant__` parameter, read in place from
// the parameter bank (as a plain by-value struct, ptxas spilled registers in two kernels).

// The ternary products (bitlinear_gemv1/gemv/gemm in bitlinear.cu, bitlinear_gemm_mma, which does
// not read act_sums, in bitlinear_mma.cu): y[tokens][n_rows] from weights w (n_rows × chunks
// 16-byte chunks) and activation codes x (tokens × chunks chunks).
struct ProductParams {
    const uint4* w;
    const uint4* x;
    const float* act_scales;
    const int* act_sums;
    const float* row_scales;
    float* y;
    int n_rows;
    int chunks;
    int tokens;
    int pad;
};

// A ternary product's exact integer result to f32: (acc / activation scale) * weight scale, with
// the CPU backend's two roundings (so outputs are bit-identical to it).
__device__ __forceinline__ float dequantize(int acc, float act_scale, float row_scale) {
    return __fmul_rn(__fdiv_rn((float)acc, act_scale), row_scale);
}

// Dense-table element types (the DenseDtype discriminants on the Rust side).
__device__ __forceinline__ float load_f32(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load_f16(const u16* p, size_t i) { return f16_to_f32(p[i]); }
__device__ __forceinline__ float load_bf16(const u16* p, size_t i) {
    return __uint_as_float(((u32)p[i]) << 16);
}
