// Fused scaled-dot-product attention, flash-decoding style: the keys of each
// query row are split into chunks; one block walks its chunk in tiles of
// ATT_THREADS keys with an online softmax (running max m, running sum l,
// rescaled accumulator) and writes (m, l, acc[D]) to a workspace; a second
// kernel combines the chunks of each row. Decode steps (one query) get their
// parallelism from the chunks, prefill from the rows.
//
// Scores follow the trait's composite: s = q.k * scale + max(bias, MASK_VALUE)
// + (MASK_VALUE where key j > offset + i under causal masking), so a fully
// masked row is uniform, never NaN. Without a bias, causally masked keys
// contribute exp(MASK_VALUE - m) == 0 exactly, so they are skipped.

#define ATT_THREADS 128
#define ATT_MAX_D 256
#define ATT_SLOTS (ATT_MAX_D / ATT_THREADS)

struct AttnParams {
    i64 b, h, tq, tk, d, rep;           // rep = H / Hkv (grouped-query attention)
    i64 qs[4], ks[4], vs[4], bs[4];     // strides (bias: broadcast, 0 on expanded dims)
    i64 qo, ko, vo, bo;                 // offsets
    i64 causal, offset, has_bias;
    i64 chunk, nchunks;                 // keys per chunk, chunks per row
    float scale;
};

#define ATTN_PARTIAL(NAME, T, BT)                                                \
    extern "C" __global__ void NAME(AttnParams p, const T* q, const T* k,        \
                                    const T* v, const BT* bias, float* ws) {     \
        __shared__ float qsh[ATT_MAX_D];                                         \
        __shared__ float psh[ATT_THREADS];                                       \
        __shared__ float red[32];                                                \
        i64 rows = p.b * p.h * p.tq;                                             \
        for (i64 blk = blockIdx.x; blk < rows * p.nchunks; blk += gridDim.x) {   \
            i64 row = blk / p.nchunks, c = blk % p.nchunks;                      \
            i64 i = row % p.tq, hh = (row / p.tq) % p.h, bb = row / (p.tq * p.h); \
            i64 hk = hh / p.rep;                                                 \
            const T* qr = q + p.qo + bb * p.qs[0] + hh * p.qs[1] + i * p.qs[2];  \
            const T* kb = k + p.ko + bb * p.ks[0] + hk * p.ks[1];                \
            const T* vb = v + p.vo + bb * p.vs[0] + hk * p.vs[1];                \
            const BT* br = bias + p.bo + bb * p.bs[0] + hh * p.bs[1] + i * p.bs[2]; \
            __syncthreads();                                                     \
            for (i64 dd = threadIdx.x; dd < p.d; dd += blockDim.x) qsh[dd] = tof(qr[dd * p.qs[3]]); \
            __syncthreads();                                                     \
            i64 kbeg = c * p.chunk;                                              \
            i64 kend = kbeg + p.chunk < p.tk ? kbeg + p.chunk : p.tk;            \
            if (p.causal && !p.has_bias && kend > p.offset + i + 1) kend = p.offset + i + 1; \
            float m = NEG_INF, l = 0.0f;                                         \
            float acc[ATT_SLOTS];                                                \
            for (int s = 0; s < ATT_SLOTS; ++s) acc[s] = 0.0f;                   \
            for (i64 j0 = kbeg; j0 < kend; j0 += ATT_THREADS) {                  \
                i64 j = j0 + threadIdx.x;                                        \
                float sc = NEG_INF;                                              \
                if (j < kend) {                                                  \
                    const T* kr = kb + j * p.ks[2];                              \
                    float dot = 0.0f;                                            \
                    for (i64 dd = 0; dd < p.d; ++dd) dot += qsh[dd] * tof(kr[dd * p.ks[3]]); \
                    sc = dot * p.scale;                                          \
                    if (p.has_bias) sc += fmaxf(tof(br[j * p.bs[3]]), MASK_VALUE); \
                    if (p.causal && j > p.offset + i) sc += MASK_VALUE;          \
                }                                                                \
                float mt = block_reduce(sc, true, red);                          \
                float mn = fmaxf(m, mt);                                         \
                float pj = j < kend ? expf(sc - mn) : 0.0f;                      \
                psh[threadIdx.x] = pj;                                           \
                float lt = block_reduce(pj, false, red);                         \
                float corr = expf(m - mn);                                       \
                l = l * corr + lt;                                               \
                i64 nt = kend - j0 < ATT_THREADS ? kend - j0 : ATT_THREADS;      \
                for (int s = 0; s < ATT_SLOTS; ++s) {                            \
                    i64 dd = threadIdx.x + s * ATT_THREADS;                      \
                    if (dd < p.d) {                                              \
                        float a = 0.0f;                                          \
                        for (i64 jj = 0; jj < nt; ++jj)                          \
                            a += psh[jj] * tof(vb[(j0 + jj) * p.vs[2] + dd * p.vs[3]]); \
                        acc[s] = acc[s] * corr + a;                              \
                    }                                                            \
                }                                                                \
                m = mn;                                                          \
                __syncthreads();                                                 \
            }                                                                    \
            float* out = ws + blk * (p.d + 2);                                   \
            if (threadIdx.x == 0) { out[0] = m; out[1] = l; }                    \
            for (int s = 0; s < ATT_SLOTS; ++s) {                                \
                i64 dd = threadIdx.x + s * ATT_THREADS;                          \
                if (dd < p.d) out[2 + dd] = acc[s];                              \
            }                                                                    \
        }                                                                        \
    }
ATTN_PARTIAL(attn_partial_f32_f32, float, float)
ATTN_PARTIAL(attn_partial_f16_f16, h16, h16)
ATTN_PARTIAL(attn_partial_bf16_bf16, b16, b16)
ATTN_PARTIAL(attn_partial_f16_f32, h16, float)
ATTN_PARTIAL(attn_partial_bf16_f32, b16, float)

// out[row, :] = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c, contiguous [rows, D].
#define ATTN_COMBINE(NAME, T)                                                    \
    extern "C" __global__ void NAME(i64 rows, i64 d, i64 nchunks,                \
                                    const float* ws, T* out) {                   \
        for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {               \
            const float* w = ws + row * nchunks * (d + 2);                       \
            float mx = NEG_INF;                                                  \
            for (i64 c = 0; c < nchunks; ++c) mx = fmaxf(mx, w[c * (d + 2)]);    \
            float l = 0.0f;                                                      \
            for (i64 c = 0; c < nchunks; ++c)                                    \
                l += expf(w[c * (d + 2)] - mx) * w[c * (d + 2) + 1];             \
            for (i64 dd = threadIdx.x; dd < d; dd += blockDim.x) {               \
                float a = 0.0f;                                                  \
                for (i64 c = 0; c < nchunks; ++c)                                \
                    a += expf(w[c * (d + 2)] - mx) * w[c * (d + 2) + 2 + dd];    \
                out[row * d + dd] = fromf<T>(a / l);                             \
            }                                                                    \
        }                                                                        \
    }
ATTN_COMBINE(attn_combine_f32, float)
ATTN_COMBINE(attn_combine_f16, h16)
ATTN_COMBINE(attn_combine_bf16, b16)
