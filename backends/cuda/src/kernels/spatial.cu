// Convolution lowering (im2col), pooling, resampling, gathers and the
// rotary embedding. Inputs are contiguous.

struct ConvParams {
    i64 c, h, w, kh, kw, oh, ow;
    i64 sh, sw, ph, pw, dh, dw;
    i64 p0, np;  // the block of output pixels [p0, p0 + np) of one sample
};

// col[(ci * kh + ky) * kw + kx][p - p0] = x[ci, oy * sh - ph + ky * dh, ox * sw - pw + kx * dw]
// for output pixel p = oy * ow + ox, zero outside the input (padding).
#define IM2COL(NAME, T)                                                          \
    extern "C" __global__ void NAME(ConvParams p, const T* x, T* col) {          \
        i64 n = p.c * p.kh * p.kw * p.np;                                        \
        GRID_STRIDE(i, n) {                                                      \
            i64 pi = i % p.np;                                                   \
            i64 row = i / p.np;                                                  \
            i64 kx = row % p.kw;                                                 \
            i64 ky = (row / p.kw) % p.kh;                                        \
            i64 ci = row / (p.kw * p.kh);                                        \
            i64 pix = p.p0 + pi;                                                 \
            i64 oy = pix / p.ow, ox = pix % p.ow;                                \
            i64 iy = oy * p.sh - p.ph + ky * p.dh;                               \
            i64 ix = ox * p.sw - p.pw + kx * p.dw;                               \
            T v = fromf<T>(0.0f);                                                \
            if (iy >= 0 && iy < p.h && ix >= 0 && ix < p.w) v = x[(ci * p.h + iy) * p.w + ix]; \
            col[i] = v;                                                          \
        }                                                                        \
    }
IM2COL(im2col_f32, float)
IM2COL(im2col_f16, h16)
IM2COL(im2col_bf16, b16)

// Average pooling without padding over [planes, h, w].
#define AVGPOOL(NAME, T)                                                         \
    extern "C" __global__ void NAME(i64 total, i64 h, i64 w, i64 oh, i64 ow,     \
                                    i64 kh, i64 kw, i64 sh, i64 sw,              \
                                    const T* x, T* out) {                        \
        GRID_STRIDE(i, total) {                                                  \
            i64 ox = i % ow, oy = (i / ow) % oh, plane = i / (ow * oh);          \
            const T* src = x + plane * h * w + (oy * sh) * w + ox * sw;          \
            float s = 0.0f;                                                      \
            for (i64 a = 0; a < kh; ++a)                                         \
                for (i64 b = 0; b < kw; ++b) s += tof(src[a * w + b]);           \
            out[i] = fromf<T>(s / (float)(kh * kw));                             \
        }                                                                        \
    }
AVGPOOL(avgpool_f32, float)
AVGPOOL(avgpool_f16, h16)
AVGPOOL(avgpool_bf16, b16)

// Nearest-neighbour resize (PyTorch's `nearest`: source index
// floor(dst * in / out) with the scale computed in f32), by element size.
#define UPSAMPLE(NAME, T)                                                        \
    extern "C" __global__ void NAME(i64 total, i64 ih, i64 iw, i64 oh, i64 ow,   \
                                    float sh, float sw, const T* x, T* out) {    \
        GRID_STRIDE(i, total) {                                                  \
            i64 ox = i % ow, oy = (i / ow) % oh, plane = i / (ow * oh);          \
            i64 sy = (i64)floorf((float)oy * sh);                                \
            i64 sx = (i64)floorf((float)ox * sw);                                \
            if (sy > ih - 1) sy = ih - 1;                                        \
            if (sx > iw - 1) sx = iw - 1;                                        \
            out[i] = x[(plane * ih + sy) * iw + sx];                             \
        }                                                                        \
    }
UPSAMPLE(upsample_u16, unsigned short)
UPSAMPLE(upsample_u32, unsigned)

// out[o, k, i] = t[o, ids[k], i] over a contiguous [outer, d, inner] input,
// by element size. Ids are checked on the host where they are known; an id
// out of range here (one computed on the device) gives zeros, never a stray read.
#define INDEX_SELECT(NAME, T)                                                    \
    extern "C" __global__ void NAME(i64 total, i64 d, i64 inner, i64 nids,       \
                                    const T* t, const unsigned* ids, T* out) {   \
        GRID_STRIDE(i, total) {                                                  \
            i64 in_ = i % inner, k = (i / inner) % nids, o = i / (inner * nids); \
            unsigned id = ids[k];                                                \
            out[i] = (i64)id < d ? t[(o * d + id) * inner + in_] : (T)0;         \
        }                                                                        \
    }
INDEX_SELECT(index_select_u16, unsigned short)
INDEX_SELECT(index_select_u32, unsigned)

// LLaMA's rotate-half rotary embedding of a contiguous [B, H, T, D] tensor
// with contiguous cos/sin of [T, D/2] (`batched == 0`) or [B, T, D/2].
// Each product and the sum are rounded to T, as in the trait's composite.
#define ROPE(NAME, T)                                                            \
    extern "C" __global__ void NAME(i64 b, i64 h, i64 t, i64 d, int batched,     \
                                    const T* x, const T* cs, const T* sn, T* out) { \
        i64 half = d / 2;                                                        \
        GRID_STRIDE(i, b * h * t * d) {                                          \
            i64 j = i % d, pos = (i / d) % t, bi = i / (d * t * h);              \
            i64 row = i - j;                                                     \
            i64 cj = j % half;                                                   \
            i64 ci = ((batched ? bi * t : 0) + pos) * half + cj;                 \
            float c = tof(cs[ci]), s = tof(sn[ci]);                              \
            float x1 = tof(x[row + cj]), x2 = tof(x[row + cj + half]);           \
            float y = j < half ? rnd<T>(x1 * c) - rnd<T>(x2 * s)                 \
                               : rnd<T>(x2 * c) + rnd<T>(x1 * s);                \
            out[i] = fromf<T>(y);                                                \
        }                                                                        \
    }
ROPE(rope_f32, float)
ROPE(rope_f16, h16)
ROPE(rope_bf16, b16)
