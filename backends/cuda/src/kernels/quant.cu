// Linear layers whose weights stay in GGUF's block layouts (Q8_0, Q4_K) on
// the device. Few input rows (decode): one warp per output feature reads the
// feature's blocks once, dequantizes them in registers and accumulates every
// row in f32. Many rows (prefill): the weight is dequantized into a dense
// matrix of the input's dtype and the GEMM runs on cuBLAS.
//
// Dequantization is that of the `gguf` package (and llama.cpp) in f32:
//   Q8_0 (34 bytes / 32 weights): f16 d, 32 x int8 q;        w = d * q
//   Q4_K (144 bytes / 256 weights): f16 d, f16 dmin, 12 bytes of 6-bit
//   scales and mins for 8 sub-blocks of 32, 128 bytes of nibbles; in each
//   64-weight chunk j, byte 32j+l holds weight 64j+l (low nibble, sub-block
//   2j) and 64j+32+l (high nibble, sub-block 2j+1);
//   w = (d * sc) * q - (dmin * m).

#define Q8_0_BYTES 34
#define Q4_K_BYTES 144
// Most input rows of one matvec launch (`LQ_ROWS` on the Rust side).
#define LQ_ROWS 8
// Warps (output features) per block (`LQ_WARPS`).
#define LQ_WARPS 4

// An f16 stored little-endian at any byte address (Q8_0 blocks are 34 bytes,
// so their scales are only 2-byte aligned).
__device__ __forceinline__ float f16_at(const unsigned char* p) {
    h16 h;
    h.x = (unsigned short)(p[0] | (p[1] << 8));
    return tof(h);
}

// Scale and min of sub-block j (0..8) from Q4_K's 12 packed bytes.
__device__ __forceinline__ void scale_min_k4(int j, const unsigned char* s, float* sc, float* mn) {
    if (j < 4) {
        *sc = (float)(s[j] & 63);
        *mn = (float)(s[j + 4] & 63);
    } else {
        *sc = (float)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        *mn = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// acc[r] += sum_t w[t] * x[r, c + t] for t < 4 (the `4` weights of a lane).
template <typename T>
__device__ __forceinline__ void lq_accumulate(float* acc, i64 m, i64 k, const T* x, i64 c, const float* w) {
#pragma unroll
    for (int r = 0; r < LQ_ROWS; ++r) {
        if (r < m) {
            const T* xr = x + r * k + c;
            acc[r] += w[0] * tof(xr[0]) + w[1] * tof(xr[1]) + w[2] * tof(xr[2]) + w[3] * tof(xr[3]);
        }
    }
}

// Sums each row's partials over the warp; lane 0 writes row r's output j.
template <typename T>
__device__ __forceinline__ void lq_store(float* acc, i64 m, i64 n, i64 j, const T* bias, int has_bias, T* out) {
    float b = has_bias ? tof(bias[j]) : 0.0f;
#pragma unroll
    for (int r = 0; r < LQ_ROWS; ++r) {
        float v = warp_sum(acc[r]);
        if (r < m && (threadIdx.x & 31) == 0) out[r * n + j] = fromf<T>(v + b);
    }
}

// out[m, n] = x[m, k] w[n, k]^T (+ bias) for m <= LQ_ROWS, x contiguous.
// Per step a warp covers 4 blocks of 32 weights: 8 lanes a block, 4
// consecutive weights a lane.
#define LQ_Q8_0(NAME, T)                                                          \
    extern "C" __global__ void NAME(i64 m, i64 n, i64 k, const T* x,              \
                                    const unsigned char* w, const T* bias,        \
                                    int has_bias, T* out) {                       \
        int lane = threadIdx.x & 31;                                              \
        int sub = lane >> 3, quad = lane & 7;                                     \
        i64 nb = k / 32;                                                          \
        for (i64 j = (i64)blockIdx.x * LQ_WARPS + (threadIdx.x >> 5); j < n;      \
             j += (i64)gridDim.x * LQ_WARPS) {                                    \
            const unsigned char* row = w + j * nb * Q8_0_BYTES;                   \
            float acc[LQ_ROWS];                                                   \
            _Pragma("unroll") for (int r = 0; r < LQ_ROWS; ++r) acc[r] = 0.0f;    \
            for (i64 b = sub; b < nb; b += 4) {                                   \
                const unsigned char* blk = row + b * Q8_0_BYTES;                  \
                float d = f16_at(blk);                                            \
                const signed char* q = (const signed char*)(blk + 2 + 4 * quad);  \
                float wv[4] = {d * (float)q[0], d * (float)q[1], d * (float)q[2], \
                               d * (float)q[3]};                                  \
                lq_accumulate<T>(acc, m, k, x, b * 32 + 4 * quad, wv);            \
            }                                                                     \
            lq_store<T>(acc, m, n, j, bias, has_bias, out);                       \
        }                                                                         \
    }
LQ_Q8_0(lq_q8_0_f32, float)
LQ_Q8_0(lq_q8_0_f16, h16)
LQ_Q8_0(lq_q8_0_bf16, b16)

// As LQ_Q8_0 for Q4_K: a warp takes one 256-weight block per step, lane l
// the 4 bytes 4l..4l+3 of its nibbles (chunk l/8), so 4 weights from each of
// the chunk's two sub-blocks.
#define LQ_Q4_K(NAME, T)                                                          \
    extern "C" __global__ void NAME(i64 m, i64 n, i64 k, const T* x,              \
                                    const unsigned char* w, const T* bias,        \
                                    int has_bias, T* out) {                       \
        int lane = threadIdx.x & 31;                                              \
        int chunk = lane >> 3, p = 4 * (lane & 7);                                \
        i64 nb = k / 256;                                                         \
        for (i64 j = (i64)blockIdx.x * LQ_WARPS + (threadIdx.x >> 5); j < n;      \
             j += (i64)gridDim.x * LQ_WARPS) {                                    \
            const unsigned char* row = w + j * nb * Q4_K_BYTES;                   \
            float acc[LQ_ROWS];                                                   \
            _Pragma("unroll") for (int r = 0; r < LQ_ROWS; ++r) acc[r] = 0.0f;    \
            for (i64 b = 0; b < nb; ++b) {                                        \
                const unsigned char* blk = row + b * Q4_K_BYTES;                  \
                float d = f16_at(blk), dmin = f16_at(blk + 2);                    \
                float sc0, mn0, sc1, mn1;                                         \
                scale_min_k4(2 * chunk, blk + 4, &sc0, &mn0);                     \
                scale_min_k4(2 * chunk + 1, blk + 4, &sc1, &mn1);                 \
                float d0 = d * sc0, m0 = dmin * mn0, d1 = d * sc1, m1 = dmin * mn1; \
                unsigned q = *(const unsigned*)(blk + 16 + 32 * chunk + p);       \
                float lo[4], hi[4];                                               \
                _Pragma("unroll") for (int t = 0; t < 4; ++t) {                   \
                    lo[t] = d0 * (float)((q >> (8 * t)) & 0xF) - m0;              \
                    hi[t] = d1 * (float)((q >> (8 * t + 4)) & 0xF) - m1;          \
                }                                                                 \
                i64 c = b * 256 + 64 * chunk + p;                                 \
                lq_accumulate<T>(acc, m, k, x, c, lo);                            \
                lq_accumulate<T>(acc, m, k, x, c + 32, hi);                       \
            }                                                                     \
            lq_store<T>(acc, m, n, j, bias, has_bias, out);                       \
        }                                                                         \
    }
LQ_Q4_K(lq_q4_k_f32, float)
LQ_Q4_K(lq_q4_k_f16, h16)
LQ_Q4_K(lq_q4_k_bf16, b16)

// The dense [n, k] weight (count = n * k values) in T, rounded from the f32
// dequantized value.
#define DEQUANT_Q8_0(NAME, T)                                                     \
    extern "C" __global__ void NAME(i64 count, const unsigned char* w, T* out) {  \
        GRID_STRIDE(i, count) {                                                   \
            const unsigned char* blk = w + (i / 32) * Q8_0_BYTES;                 \
            signed char q = (signed char)blk[2 + i % 32];                         \
            out[i] = fromf<T>(f16_at(blk) * (float)q);                            \
        }                                                                         \
    }
DEQUANT_Q8_0(dequant_q8_0_f32, float)
DEQUANT_Q8_0(dequant_q8_0_f16, h16)
DEQUANT_Q8_0(dequant_q8_0_bf16, b16)

#define DEQUANT_Q4_K(NAME, T)                                                     \
    extern "C" __global__ void NAME(i64 count, const unsigned char* w, T* out) {  \
        GRID_STRIDE(i, count) {                                                   \
            const unsigned char* blk = w + (i / 256) * Q4_K_BYTES;                \
            int e = (int)(i % 256), chunk = e / 64, within = e % 64;              \
            int high = within >= 32, l = within % 32;                             \
            unsigned char byte = blk[16 + 32 * chunk + l];                        \
            int q = high ? byte >> 4 : byte & 0xF;                                \
            float sc, mn;                                                         \
            scale_min_k4(2 * chunk + high, blk + 4, &sc, &mn);                    \
            float d = f16_at(blk) * sc, mm = f16_at(blk + 2) * mn;                \
            out[i] = fromf<T>(d * (float)q - mm);                                 \
        }                                                                         \
    }
DEQUANT_Q4_K(dequant_q4_k_f32, float)
DEQUANT_Q4_K(dequant_q4_k_f16, h16)
DEQUANT_Q4_K(dequant_q4_k_bf16, b16)
