// The CUDA device environment, emulated on the CPU, for compiling tern's cuda/*.cu unchanged as C++.
//
// Every CUDA thread of a block is a fiber (its own stack, switched in user space on one OS
// thread; blocks run on several OS threads); the block's scheduler runs each fiber until it reaches a synchronization point
// (__syncthreads, a warp shuffle, an mma), then the next one, in thread order (or reversed, see
// launch.cpp). So the write-then-read order of shared memory is exactly what the barriers allow: a
// missing barrier makes later threads read what earlier ones left, and a thread waiting at a
// barrier that another thread of the block never reaches is reported as a deadlock.
//
// Float arithmetic is IEEE single precision without contraction (-ffp-contract=off), like NVRTC's
// --fmad=false; expf/sqrtf are the C library's (the GPU's expf differs in the last ulp, which the
// float tolerances of the tests cover).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#define TERN_CUDA_EMU 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
// Shared memory: one copy per OS thread, which runs one block at a time. AddressSanitizer puts no
// redzones around thread-local variables: under it, shared memory is one plain static copy (with
// redzones), blocks run on one OS thread, and one launch runs at a time in the process (runtime.cpp).
#if defined(TERN_EMU_SANITIZE_ADDRESS)
#define __shared__ static
#else
#define __shared__ static thread_local
#endif

struct uint3 {
    unsigned x, y, z;
};
struct uint4 {
    unsigned x, y, z, w;
};
struct int2 {
    int x, y;
};
struct float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

namespace emu {
// The running fiber's coordinates (thread_local: blocks may run on several OS threads).
struct Coords {
    uint3 thread, block, block_dim, grid_dim;
};
extern thread_local Coords coords;
// Waits until every thread of the block is here.
void sync_block();
// Waits until every running lane of the caller's warp is here.
void sync_warp();
// This warp's exchange area: 32 lanes × 64 bytes.
unsigned char* warp_slots();
}  // namespace emu

#define threadIdx (emu::coords.thread)
#define blockIdx (emu::coords.block)
#define blockDim (emu::coords.block_dim)
#define gridDim (emu::coords.grid_dim)

inline void __syncthreads() { emu::sync_block(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int offset) {
    static_assert(sizeof(T) <= 64, "shuffled value too large");
    const unsigned lane = threadIdx.x & 31;
    unsigned char* slots = emu::warp_slots();
    std::memcpy(slots + 64 * lane, &v, sizeof(T));
    emu::sync_warp();
    T r;
    std::memcpy(&r, slots + 64 * (lane ^ (unsigned)offset), sizeof(T));
    emu::sync_warp();  // nobody overwrites a slot before every lane has read its partner's
    return r;
}

template <typename T>
inline T __ldg(const T* p) { return *p; }

inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; ++i) c += (int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
    return c;
}

// Per-byte a - b, each byte wrapping.
inline unsigned __vsub4(unsigned a, unsigned b) {
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= ((((a >> (8 * i)) & 0xff) - ((b >> (8 * i)) & 0xff)) & 0xff) << (8 * i);
    return r;
}

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int min(int a, int b) { return a < b ? a : b; }

// ---- The three PTX sites of common.cuh -------------------------------------------------------

// cvt.f32.f16: exact widening (subnormals, infinities; NaN keeps its payload).
inline float f16_to_f32(unsigned short h) {
    const unsigned sign = (unsigned)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    unsigned bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  // subnormal: value = man · 2^-24, normalized
        int e = -1;
        unsigned m = man;
        do {
            ++e;
            m <<= 1;
        } while (!(m & 0x400));
        bits = sign | ((unsigned)(112 - e) << 23) | ((m & 0x3ff) << 13);
    }
    return __uint_as_float(bits);
}

// cvt.rn.f16.f32: round to nearest, ties to even; overflow to infinity; NaN quiet, keeping the
// top of its payload.
inline unsigned short f32_to_f16(float f) {
    unsigned x;
    std::memcpy(&x, &f, 4);
    const unsigned sign = (x >> 16) & 0x8000u, exp = (x >> 23) & 0xff;
    const unsigned man = x & 0x7fffffu;
    if (exp == 0xff) {
        return (unsigned short)(sign | 0x7c00u | (man != 0 ? 0x200u | (man >> 13) : 0u));
    }
    const int e = (int)exp - 112;  // the f16 exponent field, before range checks
    if (e >= 0x1f) {
        return (unsigned short)(sign | 0x7c00u);
    }
    // Keep the top bits of the significand and round the dropped ones: `shift` bits dropped
    // (13 for a normal result; more below, where the result is subnormal or zero).
    unsigned kept, dropped, shift;
    if (e > 0) {
        shift = 13;
        kept = ((unsigned)e << 10) | (man >> 13);
        dropped = man & 0x1fffu;
    } else {
        if (e < -10) {
            return (unsigned short)sign;  // below half the smallest subnormal
        }
        const unsigned m = man | 0x800000u;
        shift = (unsigned)(14 - e);
        kept = m >> shift;
        dropped = m & ((1u << shift) - 1);
    }
    const unsigned halfway = 1u << (shift - 1);
    if (dropped > halfway || (dropped == halfway && (kept & 1))) {
        ++kept;  // a carry into the exponent (or to infinity) is the right result
    }
    return (unsigned short)(sign | kept);
}

namespace emu {
// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 over the warp; every lane passes its fragments.
void mma_m16n8k32_s8(int* c, const unsigned* a, const unsigned* b);
}  // namespace emu
inline void mma_s8(int* c, const unsigned* a, const unsigned* b) { emu::mma_m16n8k32_s8(c, a, b); }
