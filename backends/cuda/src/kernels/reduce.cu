// Reductions along one axis, argmax, softmax and the norms. Inputs are
// contiguous; statistics are accumulated in f32 by one block per output
// (or per row), so long rows are read by all threads of the block.

#define RED_THREADS 256

// Reduction of the middle axis of a contiguous [outer, r, inner] tensor.
// Op codes: the order of `ReduceOp` (sum, mean, max, min).
#define REDUCE(NAME, T)                                                          \
    extern "C" __global__ void NAME(i64 nout, i64 r, i64 inner, int op,         \
                                    const T* in, T* out) {                       \
        __shared__ float red[32];                                                \
        bool is_max = op >= 2;                                                   \
        float sign = op == 3 ? -1.0f : 1.0f;                                     \
        for (i64 o = blockIdx.x; o < nout; o += gridDim.x) {                     \
            const T* base = in + (o / inner) * r * inner + o % inner;            \
            float acc = is_max ? NEG_INF : 0.0f;                                 \
            for (i64 k = threadIdx.x; k < r; k += blockDim.x) {                  \
                float v = sign * tof(base[k * inner]);                           \
                acc = is_max ? fmaxf(acc, v) : acc + v;                          \
            }                                                                    \
            acc = block_reduce(acc, is_max, red);                                \
            if (threadIdx.x == 0) {                                              \
                float y = sign * acc;                                            \
                if (op == 1) y = y / (float)r;                                   \
                out[o] = fromf<T>(y);                                            \
            }                                                                    \
        }                                                                        \
    }
REDUCE(reduce_f32, float)
REDUCE(reduce_f16, h16)
REDUCE(reduce_bf16, b16)

// Index of the largest value along the middle axis, the first one on ties.
#define ARGMAX(NAME, T)                                                          \
    extern "C" __global__ void NAME(i64 nout, i64 r, i64 inner, const T* in,     \
                                    unsigned* out) {                             \
        __shared__ float sv[RED_THREADS];                                        \
        __shared__ i64 si[RED_THREADS];                                          \
        for (i64 o = blockIdx.x; o < nout; o += gridDim.x) {                     \
            const T* base = in + (o / inner) * r * inner + o % inner;            \
            float best = NEG_INF;                                                \
            i64 bi = -1;                                                         \
            for (i64 k = threadIdx.x; k < r; k += blockDim.x) {                  \
                float v = tof(base[k * inner]);                                  \
                if (bi < 0 || v > best) { best = v; bi = k; }                    \
            }                                                                    \
            __syncthreads();                                                     \
            sv[threadIdx.x] = best;                                              \
            si[threadIdx.x] = bi;                                                \
            __syncthreads();                                                     \
            for (int s = blockDim.x / 2; s > 0; s >>= 1) {                       \
                if (threadIdx.x < s) {                                           \
                    float v2 = sv[threadIdx.x + s];                              \
                    i64 i2 = si[threadIdx.x + s];                                \
                    float v1 = sv[threadIdx.x];                                  \
                    i64 i1 = si[threadIdx.x];                                    \
                    bool take = i2 >= 0 && (i1 < 0 || v2 > v1 || (v2 == v1 && i2 < i1)); \
                    if (take) { sv[threadIdx.x] = v2; si[threadIdx.x] = i2; }    \
                }                                                                \
                __syncthreads();                                                 \
            }                                                                    \
            if (threadIdx.x == 0) out[o] = (unsigned)(si[0] < 0 ? 0 : si[0]);    \
        }                                                                        \
    }
ARGMAX(argmax_f32, float)
ARGMAX(argmax_f16, h16)
ARGMAX(argmax_bf16, b16)

// Softmax over rows of a contiguous [rows, cols] tensor, in f32.
#define SOFTMAX(NAME, T)                                                         \
    extern "C" __global__ void NAME(i64 rows, i64 cols, const T* in, T* out) {   \
        __shared__ float red[32];                                                \
        for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {               \
            const T* x = in + row * cols;                                        \
            T* y = out + row * cols;                                             \
            float m = NEG_INF;                                                   \
            for (i64 j = threadIdx.x; j < cols; j += blockDim.x) m = fmaxf(m, tof(x[j])); \
            m = block_reduce(m, true, red);                                      \
            float s = 0.0f;                                                      \
            for (i64 j = threadIdx.x; j < cols; j += blockDim.x) s += expf(tof(x[j]) - m); \
            s = block_reduce(s, false, red);                                     \
            for (i64 j = threadIdx.x; j < cols; j += blockDim.x)                 \
                y[j] = fromf<T>(expf(tof(x[j]) - m) / s);                        \
        }                                                                        \
    }
SOFTMAX(softmax_f32, float)
SOFTMAX(softmax_f16, h16)
SOFTMAX(softmax_bf16, b16)

// Layer, RMS and group norm over rows of a contiguous [rows, cols] tensor,
// statistics in f32 (two passes: mean, then the centred variance). The
// normalised value is rounded to T before the weight multiplies it and
// again before the bias is added, as the trait's composites do.
// Weight index of column j: j itself (`chan == 0`), or, for group norm
// over rows of (sample, group), the channel `(row % groups) * per_group + j / chan`.
struct NormParams {
    i64 rows, cols, chan, groups, per_group;
    float eps;
    int rms, has_w, has_b;
};

#define NORM(NAME, T)                                                            \
    extern "C" __global__ void NAME(NormParams p, const T* in, const T* w,       \
                                    const T* b, T* out) {                        \
        __shared__ float red[32];                                                \
        for (i64 row = blockIdx.x; row < p.rows; row += gridDim.x) {             \
            const T* x = in + row * p.cols;                                      \
            T* y = out + row * p.cols;                                           \
            float mean = 0.0f;                                                   \
            if (!p.rms) {                                                        \
                float s = 0.0f;                                                  \
                for (i64 j = threadIdx.x; j < p.cols; j += blockDim.x) s += tof(x[j]); \
                mean = block_reduce(s, false, red) / (float)p.cols;              \
            }                                                                    \
            float q = 0.0f;                                                      \
            for (i64 j = threadIdx.x; j < p.cols; j += blockDim.x) {             \
                float c = tof(x[j]) - mean;                                      \
                q += c * c;                                                      \
            }                                                                    \
            float var = block_reduce(q, false, red) / (float)p.cols;             \
            float rstd = 1.0f / sqrtf(var + p.eps);                              \
            for (i64 j = threadIdx.x; j < p.cols; j += blockDim.x) {             \
                float v = rnd<T>((tof(x[j]) - mean) * rstd);                     \
                i64 c = p.chan == 0 ? j : (row % p.groups) * p.per_group + j / p.chan; \
                if (p.has_w) v = rnd<T>(v * tof(w[c]));                          \
                if (p.has_b) v = v + tof(b[c]);                                  \
                y[j] = fromf<T>(v);                                              \
            }                                                                    \
        }                                                                        \
    }
NORM(norm_f32, float)
NORM(norm_f16, h16)
NORM(norm_bf16, b16)
