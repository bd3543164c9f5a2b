// Fill, strided copy, cast, unary, affine and broadcasting binary ops.
// Every op computes in f32 and rounds its output once to the tensor's dtype.

#define FILL(NAME, T)                                                            \
    extern "C" __global__ void NAME(i64 n, T value, T* out) {                    \
        GRID_STRIDE(i, n) out[i] = value;                                        \
    }
FILL(fill_u16, unsigned short)
FILL(fill_u32, unsigned)

// Copies operand 0 (source view) into operand 1 (destination view).
#define COPY(NAME, T)                                                            \
    extern "C" __global__ void NAME(Strided p, const T* in, T* out) {            \
        GRID_STRIDE(i, p.n) {                                                    \
            i64 o[2];                                                            \
            strided_offsets(p, i, o, 2);                                         \
            out[o[1]] = in[o[0]];                                                \
        }                                                                        \
    }
COPY(copy_u16, unsigned short)
COPY(copy_u32, unsigned)

// Float to integer conversions saturate (NaN gives 0), like WGSL's and
// PTX's `cvt.rzi.sat`.
__device__ __forceinline__ unsigned f2u(float x) {
    if (!(x > 0.0f)) return 0u;
    if (x >= 4294967296.0f) return 0xffffffffu;
    return (unsigned)x;
}
__device__ __forceinline__ int f2i(float x) {
    if (x != x) return 0;
    if (x <= -2147483648.0f) return (int)0x80000000;
    if (x >= 2147483648.0f) return 0x7fffffff;
    return (int)x;
}

template <typename TO> struct Cvt {
    template <typename TI> __device__ static TO go(TI x) { return fromf<TO>(tof(x)); }
};
template <> struct Cvt<unsigned> {
    template <typename TI> __device__ static unsigned go(TI x) { return f2u(tof(x)); }
    __device__ static unsigned go(unsigned x) { return x; }
    __device__ static unsigned go(int x) { return (unsigned)x; }
};
template <> struct Cvt<int> {
    template <typename TI> __device__ static int go(TI x) { return f2i(tof(x)); }
    __device__ static int go(unsigned x) { return (int)x; }
    __device__ static int go(int x) { return x; }
};

#define CAST(NAME, TI, TO)                                                       \
    extern "C" __global__ void NAME(Strided p, const TI* in, TO* out) {          \
        GRID_STRIDE(i, p.n) {                                                    \
            i64 o[1];                                                            \
            strided_offsets(p, i, o, 1);                                         \
            out[i] = Cvt<TO>::go(in[o[0]]);                                      \
        }                                                                        \
    }
#define CAST_FROM(FROM, TI)                                                      \
    CAST(cast_##FROM##_f32, TI, float)                                           \
    CAST(cast_##FROM##_f16, TI, h16)                                             \
    CAST(cast_##FROM##_bf16, TI, b16)                                            \
    CAST(cast_##FROM##_u32, TI, unsigned)                                        \
    CAST(cast_##FROM##_i32, TI, int)
CAST_FROM(f32, float)
CAST_FROM(f16, h16)
CAST_FROM(bf16, b16)
CAST_FROM(u32, unsigned)
CAST_FROM(i32, int)

__device__ __forceinline__ float sigmoid_(float x) { return 1.0f / (1.0f + expf(-x)); }

// Op codes: the order of `UnaryOp` on the Rust side, then 15 = affine.
__device__ __forceinline__ float unary_op(int op, float x, float mul, float add) {
    switch (op) {
        case 0: return -x;
        case 1: return fabsf(x);
        case 2: return expf(x);
        case 3: return logf(x);
        case 4: return sqrtf(x);
        case 5: return x * x;
        case 6: return 1.0f / x;
        case 7: return tanhf(x);
        case 8: return sigmoid_(x);
        case 9: return sinf(x);
        case 10: return cosf(x);
        case 11: return fmaxf(x, 0.0f);
        case 12: return x * sigmoid_(x);
        case 13: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
        case 14: return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
        default: return x * mul + add;
    }
}

#define UNARY(NAME, T)                                                           \
    extern "C" __global__ void NAME(Strided p, int op, float mul, float add,     \
                                    const T* in, T* out) {                       \
        GRID_STRIDE(i, p.n) {                                                    \
            i64 o[1];                                                            \
            strided_offsets(p, i, o, 1);                                         \
            out[i] = fromf<T>(unary_op(op, tof(in[o[0]]), mul, add));            \
        }                                                                        \
    }
UNARY(unary_f32, float)
UNARY(unary_f16, h16)
UNARY(unary_bf16, b16)

// Op codes: the order of `BinaryOp` on the Rust side.
__device__ __forceinline__ float binary_op(int op, float a, float b) {
    switch (op) {
        case 0: return a + b;
        case 1: return a - b;
        case 2: return a * b;
        case 3: return a / b;
        case 4: return fmaxf(a, b);
        default: return fminf(a, b);
    }
}

// Operands 0 and 1 are the (broadcast) inputs; the output is contiguous.
#define BINARY(NAME, T)                                                          \
    extern "C" __global__ void NAME(Strided p, int op, const T* a, const T* b,   \
                                    T* out) {                                    \
        GRID_STRIDE(i, p.n) {                                                    \
            i64 o[2];                                                            \
            strided_offsets(p, i, o, 2);                                         \
            out[i] = fromf<T>(binary_op(op, tof(a[o[0]]), tof(b[o[1]])));        \
        }                                                                        \
    }
BINARY(binary_f32, float)
BINARY(binary_f16, h16)
BINARY(binary_bf16, b16)
