// Shared by every kernel module of the CUDA backend (prepended by the Rust
// side before NVRTC compiles a module). Header-free on purpose: the
// half-precision conversions are written with PTX / bit operations so that
// NVRTC needs no include path at run time.

#define MAX_RANK 8
#define NEG_INF __int_as_float(0xff800000)
// The finite "masked" logit of the trait's composites (emu_core MASK_VALUE).
#define MASK_VALUE (-1e30f)

typedef long long i64;

// f16 and bf16 are stored as their 16-bit patterns.
struct h16 { unsigned short x; };
struct b16 { unsigned short x; };

__device__ __forceinline__ float tof(float v) { return v; }
__device__ __forceinline__ float tof(h16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x));
    return f;
}
__device__ __forceinline__ float tof(b16 v) { return __uint_as_float(((unsigned)v.x) << 16); }
__device__ __forceinline__ float tof(unsigned v) { return (float)v; }
__device__ __forceinline__ float tof(int v) { return (float)v; }

// Round-to-nearest-even from f32, as the host's `half` crate does.
template <typename T> __device__ __forceinline__ T fromf(float v);
template <> __device__ __forceinline__ float fromf<float>(float v) { return v; }
template <> __device__ __forceinline__ h16 fromf<h16>(float v) {
    h16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.x) : "f"(v));
    return r;
}
template <> __device__ __forceinline__ b16 fromf<b16>(float v) {
    unsigned u = __float_as_uint(v);
    b16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.x = (unsigned short)((u >> 16) | 0x40u);  // quiet NaN, sign kept
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        r.x = (unsigned short)(u >> 16);
    }
    return r;
}

// Rounds an f32 value to the precision of T (identity for f32).
template <typename T> __device__ __forceinline__ float rnd(float v) { return tof(fromf<T>(v)); }

// A strided walk over a row-major index space shared by up to three
// operands: element `i` of the space sits at `off[k] + sum_d coord_d * str[k][d]`
// in operand k. Dimensions are outermost first.
struct Strided {
    i64 n;
    i64 rank;
    i64 dims[MAX_RANK];
    i64 off[3];
    i64 str[3][MAX_RANK];
};

__device__ __forceinline__ void strided_offsets(const Strided& p, i64 i, i64* o, int nops) {
    for (int k = 0; k < nops; ++k) o[k] = p.off[k];
    for (int d = (int)p.rank - 1; d >= 0; --d) {
        i64 c = i % p.dims[d];
        i /= p.dims[d];
        for (int k = 0; k < nops; ++k) o[k] += c * p.str[k][d];
    }
}

#define GRID_STRIDE(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)

// Sum or max over the whole block; every thread gets the result. The block
// size must be a multiple of 32 and every thread must call it.
__device__ __forceinline__ float block_reduce(float v, bool is_max, float* red) {
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, w) : v + w;
    }
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    __syncthreads();  // `red` may still be read by a previous call
    if (lane == 0) red[wid] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : (is_max ? NEG_INF : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, w) : v + w;
    }
    return v;
}
