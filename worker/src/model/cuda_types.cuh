// Element types and conversions shared by strata's CUDA sources (`paged_attention.cu`,
// `fused_ops.cu`). NVRTC compiles without headers, so half and bfloat16 are plain bit patterns here,
// converted by hand; the Rust side prepends this file to each source.

struct bf16_t { unsigned short bits; };
struct f16_t { unsigned short bits; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16_t x) {
    return __uint_as_float(((unsigned int)x.bits) << 16);
}
__device__ __forceinline__ float to_float(f16_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

__device__ __forceinline__ void store(float *p, float x) { *p = x; }
__device__ __forceinline__ void store(bf16_t *p, float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        p->bits = 0x7fc0;  // NaN
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    p->bits = (unsigned short)(u >> 16);
}
__device__ __forceinline__ void store(f16_t *p, float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    p->bits = h;
}

// -inf, without the headers NVRTC compiles without.
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_sum(float x) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        x += __shfl_xor_sync(0xffffffffu, x, offset);
    }
    return x;
}
