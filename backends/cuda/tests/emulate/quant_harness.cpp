// Runs quant.cu's kernels on the host: each CUDA thread is a std::thread,
// a warp's shuffles meet at a per-warp barrier. Only what quant.cu uses from
// prelude.cuh is stood in for (f16 reads, f32 stores). Input (binary, from
// the Rust test): i64 m, n, k, format (0 Q8_0, 1 Q4_K), weight bytes; the
// weight's bytes; x (m*k f32); bias (n f32). Output: the matvec's m*n f32,
// then the dequantized n*k f32.
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
typedef long long i64;
struct Dim { unsigned x; };
thread_local Dim threadIdx, blockIdx;
Dim gridDim, blockDim;

struct h16 { unsigned short x; };
inline float tof(float v) { return v; }
inline float tof(h16 v) {
    unsigned s = v.x >> 15, e = (v.x >> 10) & 31, m = v.x & 1023;
    float f = e == 0 ? std::ldexp((float)m, -24)
            : e == 31 ? (m ? NAN : INFINITY)
                      : std::ldexp((float)(m | 1024), (int)e - 25);
    return s ? -f : f;
}
template <typename T> inline T fromf(float v);
template <> inline float fromf<float>(float v) { return v; }
#define GRID_STRIDE(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)

static std::vector<std::barrier<>*> warp_barriers;
static float lanes[1024];
float __shfl_xor_sync(unsigned, float v, int o) {
    int t = threadIdx.x;
    std::barrier<>* b = warp_barriers[t / 32];
    lanes[t] = v;
    b->arrive_and_wait();
    float r = lanes[t ^ o];
    b->arrive_and_wait();
    return r;
}

// The f16/bf16 kernels compile here but only the f32 ones are run.
struct b16 { unsigned short x; };
inline float tof(b16) { abort(); }
template <> inline h16 fromf<h16>(float) { abort(); }
template <> inline b16 fromf<b16>(float) { abort(); }
#include "quant.cu"

template <typename F> void launch(unsigned grid, unsigned block, F f) {
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        std::vector<std::barrier<>*> bars;
        for (unsigned w = 0; w < block / 32; ++w) bars.push_back(new std::barrier<>(32));
        warp_barriers = bars;
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < block; ++t)
            ts.emplace_back([&, t, b] { threadIdx.x = t; blockIdx.x = b; f(); });
        for (auto& t : ts) t.join();
        for (auto* p : bars) delete p;
    }
}

int main(int argc, char** argv) {
    if (argc < 4) return 2;
    FILE* f = fopen(argv[1], "rb");
    if (!f) return 3;
    i64 h[5];
    if (fread(h, 8, 5, f) != 5) return 4;
    i64 m = h[0], n = h[1], k = h[2], format = h[3], wbytes = h[4];
    std::vector<unsigned char> w(wbytes);
    std::vector<float> x(m * k), bias(n), out(m * n), dense(n * k);
    if (fread(w.data(), 1, wbytes, f) != (size_t)wbytes || fread(x.data(), 4, m * k, f) != (size_t)(m * k) ||
        fread(bias.data(), 4, n, f) != (size_t)n)
        return 4;
    fclose(f);
    unsigned grid = (unsigned)atoi(argv[3]);
    if (format == 0) {
        launch(grid, 32 * LQ_WARPS, [&] { lq_q8_0_f32(m, n, k, x.data(), w.data(), bias.data(), 1, out.data()); });
        launch(3, 64, [&] { dequant_q8_0_f32(n * k, w.data(), dense.data()); });
    } else {
        launch(grid, 32 * LQ_WARPS, [&] { lq_q4_k_f32(m, n, k, x.data(), w.data(), bias.data(), 1, out.data()); });
        launch(3, 64, [&] { dequant_q4_k_f32(n * k, w.data(), dense.data()); });
    }
    FILE* o = fopen(argv[2], "wb");
    if (!o) return 3;
    fwrite(out.data(), 4, m * n, o);
    fwrite(dense.data(), 4, n * k, o);
    return fclose(o) == 0 ? 0 : 5;
}
