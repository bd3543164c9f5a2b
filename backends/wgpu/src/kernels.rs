//! WGSL sources of every kernel, generated per specialisation (op, output
//! rounding) and compiled once per backend.
//!
//! Conventions shared by all kernels:
//! * binding 0 is a read-only `array<u32>` of parameters (`P`), bindings
//!   `1..=k` are the inputs, binding `k + 1` the output;
//! * every tensor element is one 32-bit word: f32 for the float dtypes (f16
//!   and bf16 values are stored as the f32 they are exactly equal to, and
//!   every float output goes through `rnd` which rounds to the tensor's
//!   dtype), u32/i32 bits for the integer dtypes;
//! * 1-D kernels use 256 invocations per workgroup and a 2-D grid of
//!   workgroups (the x dimension is capped at 65535).
//!
//! Strided kernels (copy, unary, binary, cast) read their layout from `P`:
//! `P[0]` = element count, `P[1]` = rank, `P[2..10]` = dims, and for operand
//! `k`: `P[10 + 9k]` = offset, `P[11 + 9k ..]` = strides (elements).

use emu_core::backend::{BinaryOp, ReduceOp, UnaryOp};
use emu_core::DType;

/// Workgroup size of the 1-D kernels.
pub const WG: u32 = 256;
/// Largest rank the strided kernels index.
pub const MAX_RANK: usize = 8;
/// Index of the first extra parameter of a strided kernel with `nops` operands.
pub fn extra_param(nops: usize) -> usize {
    10 + 9 * nops
}

/// Output tile of the matmul kernel (square) and its depth.
pub const MM_TILE: u32 = 64;

fn round_fn(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => {
            "fn rnd(x: f32) -> f32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7f800000u) == 0x7f800000u) {
        if ((b & 0x007fffffu) != 0u) { return bitcast<f32>(b | 0x00400000u); }
        return x;
    }
    let r = b + 0x7fffu + ((b >> 16u) & 1u);
    return bitcast<f32>(r & 0xffff0000u);
}
"
        }
        DType::F16 => {
            // Round to nearest even at f16's precision: normal values by
            // rounding the f32 mantissa to 10 bits, subnormals (below 2^-14)
            // to a multiple of 2^-24 (WGSL's round() is half-to-even), and
            // overflow to infinity as IEEE conversion does.
            "fn rnd(x: f32) -> f32 {
    let b = bitcast<u32>(x);
    let e = (b >> 23u) & 0xffu;
    if (e == 0xffu) { return x; }
    if (e < 113u) {
        return round(x * 16777216.0) * 5.9604644775390625e-8;
    }
    let r = (b + 0x0fffu + ((b >> 13u) & 1u)) & 0xffffe000u;
    if (((r >> 23u) & 0xffu) > 142u) {
        return bitcast<f32>((b & 0x80000000u) | 0x7f800000u);
    }
    return bitcast<f32>(r);
}
"
        }
        _ => "fn rnd(x: f32) -> f32 { return x; }\n",
    }
}

const INDEX: &str = "
fn gindex(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.x + wid.y * nwg.x) * 256u + lid.x;
}
fn strided(i: u32, k: u32) -> u32 {
    var rem = i;
    var off = P[10u + 9u * k];
    var d = P[1];
    loop {
        if (d == 0u) { break; }
        d = d - 1u;
        let size = P[2u + d];
        off = off + (rem % size) * P[11u + 9u * k + d];
        rem = rem / size;
    }
    return off;
}
";

const MATH: &str = "
fn tanh_(x: f32) -> f32 {
    let a = abs(x);
    if (a > 15.0) { return sign(x); }
    let t = exp(-2.0 * a);
    return sign(x) * (1.0 - t) / (1.0 + t);
}
fn sigmoid_(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}
// erf through erfc's Chebyshev fit (Numerical Recipes), fractional error < 1.2e-7.
fn erf_(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
        t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 +
        t * (-0.82215223 + t * 0.17087277)))))))));
    if (x >= 0.0) { return 1.0 - r; }
    return r - 1.0;
}
";

fn header(inputs: &[&str], output: &str) -> String {
    let mut s = String::from("@group(0) @binding(0) var<storage, read> P: array<u32>;\n");
    for (i, ty) in inputs.iter().enumerate() {
        s.push_str(&format!(
            "@group(0) @binding({}) var<storage, read> I{i}: array<{ty}>;\n",
            i + 1
        ));
    }
    s.push_str(&format!(
        "@group(0) @binding({}) var<storage, read_write> O: array<{output}>;\n",
        inputs.len() + 1
    ));
    s.push_str(INDEX);
    s
}

const MAIN_1D: &str = "@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = gindex(wid, nwg, lid);";

/// Strided copy of 32-bit words: `O[view1(i)] = I0[view0(i)]`.
pub fn copy() -> String {
    format!(
        "{}{MAIN_1D}
    if (i >= P[0]) {{ return; }}
    O[strided(i, 1u)] = I0[strided(i, 0u)];
}}
",
        header(&["u32"], "u32")
    )
}

/// `O[P[1] + i] = P[2]` for `i < P[0]`.
pub fn fill() -> String {
    format!(
        "{}{MAIN_1D}
    if (i >= P[0]) {{ return; }}
    O[P[1] + i] = P[2];
}}
",
        header(&[], "u32")
    )
}

fn unary_expr(op: UnaryOp) -> &'static str {
    match op {
        UnaryOp::Neg => "-x",
        UnaryOp::Abs => "abs(x)",
        UnaryOp::Exp => "exp(x)",
        UnaryOp::Log => "log(x)",
        UnaryOp::Sqrt => "sqrt(x)",
        UnaryOp::Sqr => "x * x",
        UnaryOp::Recip => "1.0 / x",
        UnaryOp::Tanh => "tanh_(x)",
        UnaryOp::Sigmoid => "sigmoid_(x)",
        UnaryOp::Sin => "sin(x)",
        UnaryOp::Cos => "cos(x)",
        UnaryOp::Relu => "max(x, 0.0)",
        UnaryOp::Silu => "x * sigmoid_(x)",
        UnaryOp::Gelu => "0.5 * x * (1.0 + erf_(x * 0.70710678118654752))",
        UnaryOp::GeluTanh => "0.5 * x * (1.0 + tanh_(0.79788456080286536 * (x + 0.044715 * x * x * x)))",
    }
}

/// Elementwise one-input op over a strided input, contiguous output.
pub fn unary(op: UnaryOp, out: DType) -> String {
    format!(
        "{}{MATH}{}{MAIN_1D}
    if (i >= P[0]) {{ return; }}
    let x = I0[strided(i, 0u)];
    O[i] = rnd({});
}}
",
        header(&["f32"], "f32"),
        round_fn(out),
        unary_expr(op)
    )
}

/// `x * mul + add` with `mul`, `add` as f32 bits in the extra parameters.
pub fn affine(out: DType) -> String {
    let e = extra_param(1);
    format!(
        "{}{}{MAIN_1D}
    if (i >= P[0]) {{ return; }}
    let x = I0[strided(i, 0u)];
    O[i] = rnd(x * bitcast<f32>(P[{e}]) + bitcast<f32>(P[{}]));
}}
",
        header(&["f32"], "f32"),
        round_fn(out),
        e + 1
    )
}

/// Elementwise two-input op over strided (broadcast) inputs, contiguous output.
pub fn binary(op: BinaryOp, out: DType) -> String {
    let expr = match op {
        BinaryOp::Add => "a + b",
        BinaryOp::Sub => "a - b",
        BinaryOp::Mul => "a * b",
        BinaryOp::Div => "a / b",
        BinaryOp::Maximum => "max(a, b)",
        BinaryOp::Minimum => "min(a, b)",
    };
    format!(
        "{}{}{MAIN_1D}
    if (i >= P[0]) {{ return; }}
    let a = I0[strided(i, 0u)];
    let b = I1[strided(i, 1u)];
    O[i] = rnd({expr});
}}
",
        header(&["f32", "f32"], "f32"),
        round_fn(out)
    )
}

/// What a 32-bit storage word holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Word {
    Float,
    U32,
    I32,
}

impl Word {
    pub fn of(dtype: DType) -> Word {
        match dtype {
            DType::U32 => Word::U32,
            DType::I32 => Word::I32,
            _ => Word::Float,
        }
    }
}

/// Dtype conversion of a strided input into a contiguous output (raw words).
pub fn cast(from: Word, to: DType) -> String {
    let expr = match (from, Word::of(to)) {
        (Word::Float, Word::Float) => "bitcast<u32>(rnd(bitcast<f32>(w)))",
        (Word::Float, Word::U32) => "u32(bitcast<f32>(w))",
        (Word::Float, Word::I32) => "bitcast<u32>(i32(bitcast<f32>(w)))",
        (Word::U32, Word::Float) => "bitcast<u32>(rnd(f32(w)))",
        (Word::I32, Word::Float) => "bitcast<u32>(rnd(f32(bitcast<i32>(w))))",
        _ => "w",
    };
    format!(
        "{}{}{MAIN_1D}
    if (i >= P[0]) {{ return; }}
    let w = I0[strided(i, 0u)];
    O[i] = {expr};
}}
",
        header(&["u32"], "u32"),
        round_fn(to)
    )
}

/// Reduction of the middle axis of a contiguous `[outer, r, inner]` view.
/// `P` = `[outer * inner, r, inner, offset]`; one invocation per output.
pub fn reduce(op: ReduceOp, out: DType) -> String {
    let (init, step, fin) = match op {
        ReduceOp::Sum => ("0.0", "acc = acc + v;", "acc"),
        ReduceOp::Mean => ("0.0", "acc = acc + v;", "acc / f32(r)"),
        ReduceOp::Max => ("-3.4028234663852886e38", "acc = max(acc, v);", "acc"),
        ReduceOp::Min => ("3.4028234663852886e38", "acc = min(acc, v);", "acc"),
    };
    format!(
        "{}{}{MAIN_1D}
    if (i >= P[0]) {{ return; }}
    let r = P[1];
    let inner = P[2];
    let base = P[3] + (i / inner) * r * inner + i % inner;
    var acc: f32 = {init};
    for (var k = 0u; k < r; k = k + 1u) {{
        let v = I0[base + k * inner];
        {step}
    }}
    O[i] = rnd({fin});
}}
",
        header(&["f32"], "f32"),
        round_fn(out)
    )
}

/// Index of the first maximum along the middle axis (same layout as [`reduce`]).
pub fn argmax() -> String {
    format!(
        "{}{MAIN_1D}
    if (i >= P[0]) {{ return; }}
    let r = P[1];
    let inner = P[2];
    let base = P[3] + (i / inner) * r * inner + i % inner;
    var best = I0[base];
    var arg = 0u;
    for (var k = 1u; k < r; k = k + 1u) {{
        let v = I0[base + k * inner];
        if (v > best) {{ best = v; arg = k; }}
    }}
    O[i] = arg;
}}
",
        header(&["f32"], "u32")
    )
}

/// WGSL: the offsets of batch matrix `z` in A and B under the [`matmul`]
/// parameter layout (batch dims at 4.., A's batch strides at 13.., B's at 22..).
const BATCH_BASES: &str = "
fn batch_bases(z: u32) -> vec2<u32> {
    var rem = z;
    var a_base = P[10];
    var b_base = P[19];
    var d = P[3];
    loop {
        if (d == 0u) { break; }
        d = d - 1u;
        let size = P[4u + d];
        let c = rem % size;
        rem = rem / size;
        a_base = a_base + c * P[13u + d];
        b_base = b_base + c * P[22u + d];
    }
    return vec2<u32>(a_base, b_base);
}
";

/// Batched, strided `[M, K] x [K, N]` with 64x64 output tiles staged
/// through workgroup memory, 4x4 outputs per invocation. The tiles are held
/// as vec4s (4 rows of A, 4 columns of B per k), so each step of the inner
/// loop is two vector loads for 16 FMAs (2.1-2.3x faster on lavapipe than
/// eight scalar loads).
///
/// `P`: 0 M, 1 N, 2 K, 3 batch rank, 4..10 batch dims, 10 a offset, 11 a row
/// stride, 12 a col stride, 13..19 a batch strides, 19 b offset, 20 b row
/// stride, 21 b col stride, 22..28 b batch strides. Workgroup grid
/// `(ceil(N/64), ceil(M/64), batch)`.
pub fn matmul(out: DType) -> String {
    format!(
        "{}{}
var<workgroup> As: array<vec4<f32>, 256>;
{BATCH_BASES}
var<workgroup> Bs: array<vec4<f32>, 256>;

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {{
    let M = P[0];
    let N = P[1];
    let K = P[2];
    let bases = batch_bases(wid.z);
    let a_base = bases.x;
    let b_base = bases.y;
    let a_rs = P[11];
    let a_cs = P[12];
    let b_rs = P[20];
    let b_cs = P[21];
    let row0 = wid.y * 64u;
    let col0 = wid.x * 64u;
    let tid = lid.y * 16u + lid.x;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < K; k0 = k0 + 16u) {{
        for (var l = 0u; l < 4u; l = l + 1u) {{
            let e = tid + l * 256u;
            let r = e / 16u;
            let kk = e % 16u;
            let gr = row0 + r;
            let gk = k0 + kk;
            var v = 0.0;
            if (gr < M && gk < K) {{ v = I0[a_base + gr * a_rs + gk * a_cs]; }}
            As[kk * 16u + r / 4u][r % 4u] = v;
        }}
        for (var l = 0u; l < 4u; l = l + 1u) {{
            let e = tid + l * 256u;
            let kk = e / 64u;
            let c = e % 64u;
            let gk = k0 + kk;
            let gc = col0 + c;
            var v = 0.0;
            if (gk < K && gc < N) {{ v = I1[b_base + gk * b_rs + gc * b_cs]; }}
            Bs[kk * 16u + c / 4u][c % 4u] = v;
        }}
        workgroupBarrier();
        // Private arrays indexed at run time end up in scratch memory on
        // some drivers (llvmpipe): accumulate in four vec4 registers.
        for (var kk = 0u; kk < 16u; kk = kk + 1u) {{
            let a = As[kk * 16u + lid.y];
            let b = Bs[kk * 16u + lid.x];
            acc0 = acc0 + a.x * b;
            acc1 = acc1 + a.y * b;
            acc2 = acc2 + a.z * b;
            acc3 = acc3 + a.w * b;
        }}
        workgroupBarrier();
    }}
    let o_base = wid.z * M * N;
    let r0 = row0 + lid.y * 4u;
    let c0 = col0 + lid.x * 4u;
    store_row(o_base, r0, c0, M, N, acc0);
    store_row(o_base, r0 + 1u, c0, M, N, acc1);
    store_row(o_base, r0 + 2u, c0, M, N, acc2);
    store_row(o_base, r0 + 3u, c0, M, N, acc3);
}}

fn store_row(o_base: u32, r: u32, c0: u32, M: u32, N: u32, v: vec4<f32>) {{
    if (r >= M) {{ return; }}
    let o = o_base + r * N + c0;
    if (c0 < N) {{ O[o] = rnd(v.x); }}
    if (c0 + 1u < N) {{ O[o + 1u] = rnd(v.y); }}
    if (c0 + 2u < N) {{ O[o + 2u] = rnd(v.z); }}
    if (c0 + 3u < N) {{ O[o + 3u] = rnd(v.w); }}
}}
",
        header(&["f32", "f32"], "f32"),
        round_fn(out)
    )
}

/// Sums the 64 invocations' `acc` (vec4) into `red[0]` in workgroup memory
/// (`red: array<vec4<f32>, 64>`, invocation index `t`).
const REDUCE_64: &str = "    red[t] = acc;
    workgroupBarrier();
    for (var h = 32u; h > 0u; h = h >> 1u) {
        if (t < h) { red[t] = red[t] + red[t + h]; }
        workgroupBarrier();
    }
";

/// Output columns per workgroup of the [`matvec`] kernel.
pub const MV_COLS: u32 = 4;

/// Matrix-vector product for `M = 1` (decode steps): one workgroup of 64
/// invocations per 4 output elements, splitting K and reducing in
/// workgroup memory, so rows of a transposed weight are read contiguously
/// and each element of `a` is loaded once for 4 columns. Same `P` as
/// [`matmul`]; grid `(x, y, batch)` with `x * y >= ceil(N / 4)`.
pub fn matvec(out: DType) -> String {
    format!(
        "{}{}
var<workgroup> red: array<vec4<f32>, 64>;
{BATCH_BASES}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {{
    let N = P[1];
    let K = P[2];
    let col = (wid.x + wid.y * nwg.x) * 4u;
    if (col >= N) {{ return; }}
    let bases = batch_bases(wid.z);
    let a_base = bases.x;
    let b_base = bases.y;
    let a_cs = P[12];
    let b_rs = P[20];
    let b_cs = P[21];
    // Columns past N read the last one again and are not stored.
    let b0 = b_base + col * b_cs;
    let b1 = b_base + min(col + 1u, N - 1u) * b_cs;
    let b2 = b_base + min(col + 2u, N - 1u) * b_cs;
    let b3 = b_base + min(col + 3u, N - 1u) * b_cs;
    let t = lid.x;
    var acc = vec4<f32>(0.0);
    for (var k = t; k < K; k = k + 64u) {{
        let a = I0[a_base + k * a_cs];
        let kb = k * b_rs;
        acc = acc + a * vec4<f32>(I1[b0 + kb], I1[b1 + kb], I1[b2 + kb], I1[b3 + kb]);
    }}
{REDUCE_64}    if (t == 0u) {{
        let r = red[0];
        let o = wid.z * N + col;
        O[o] = rnd(r.x);
        if (col + 1u < N) {{ O[o + 1u] = rnd(r.y); }}
        if (col + 2u < N) {{ O[o + 2u] = rnd(r.z); }}
        if (col + 3u < N) {{ O[o + 3u] = rnd(r.w); }}
    }}
}}
",
        header(&["f32", "f32"], "f32"),
        round_fn(out)
    )
}

/// Direct 2-D convolution, one invocation per output element.
///
/// `P`: 0 total, 1 C, 2 H, 3 W, 4 O, 5 C/groups, 6 KH, 7 KW, 8 OH, 9 OW,
/// 10 sh, 11 sw, 12 ph, 13 pw, 14 dh, 15 dw, 16 O/groups, 17 has bias,
/// 18 x offset, 19 w offset, 20 bias offset.
pub fn conv2d(out: DType) -> String {
    format!(
        "{}{}{MAIN_1D}
    if (i >= P[0]) {{ return; }}
    let C = P[1]; let H = P[2]; let W = P[3]; let Oc = P[4]; let CG = P[5];
    let KH = P[6]; let KW = P[7]; let OH = P[8]; let OW = P[9];
    let ox = i % OW;
    let oy = (i / OW) % OH;
    let oc = (i / (OW * OH)) % Oc;
    let n = i / (OW * OH * Oc);
    let g = oc / P[16];
    var acc = 0.0;
    if (P[17] != 0u) {{ acc = I2[P[20] + oc]; }}
    for (var ic = 0u; ic < CG; ic = ic + 1u) {{
        let xc = P[18] + (n * C + g * CG + ic) * H * W;
        let wc = P[19] + (oc * CG + ic) * KH * KW;
        for (var ky = 0u; ky < KH; ky = ky + 1u) {{
            let iy = i32(oy * P[10] + ky * P[14]) - i32(P[12]);
            if (iy < 0 || iy >= i32(H)) {{ continue; }}
            for (var kx = 0u; kx < KW; kx = kx + 1u) {{
                let ix = i32(ox * P[11] + kx * P[15]) - i32(P[13]);
                if (ix < 0 || ix >= i32(W)) {{ continue; }}
                acc = acc + I0[xc + u32(iy) * W + u32(ix)] * I1[wc + ky * KW + kx];
            }}
        }}
    }}
    O[i] = rnd(acc);
}}
",
        header(&["f32", "f32", "f32"], "f32"),
        round_fn(out)
    )
}

/// Average pooling without padding. `P`: 0 total, 1 H, 2 W, 3 OH, 4 OW,
/// 5 kh, 6 kw, 7 sh, 8 sw, 9 offset.
pub fn avg_pool2d(out: DType) -> String {
    format!(
        "{}{}{MAIN_1D}
    if (i >= P[0]) {{ return; }}
    let H = P[1]; let W = P[2]; let OH = P[3]; let OW = P[4];
    let ox = i % OW;
    let oy = (i / OW) % OH;
    let nc = i / (OW * OH);
    let base = P[9] + nc * H * W + oy * P[7] * W + ox * P[8];
    var acc = 0.0;
    for (var ky = 0u; ky < P[5]; ky = ky + 1u) {{
        for (var kx = 0u; kx < P[6]; kx = kx + 1u) {{
            acc = acc + I0[base + ky * W + kx];
        }}
    }}
    O[i] = rnd(acc / f32(P[5] * P[6]));
}}
",
        header(&["f32"], "f32"),
        round_fn(out)
    )
}

/// Nearest-neighbour resize (PyTorch `mode="nearest"`); scales are f32 bits
/// computed on the host as `in / out`. `P`: 0 total, 1 H, 2 W, 3 OH, 4 OW,
/// 5 scale h, 6 scale w, 7 offset.
pub fn upsample_nearest2d() -> String {
    format!(
        "{}{MAIN_1D}
    if (i >= P[0]) {{ return; }}
    let H = P[1]; let W = P[2]; let OH = P[3]; let OW = P[4];
    let ox = i % OW;
    let oy = (i / OW) % OH;
    let nc = i / (OW * OH);
    let sy = min(u32(floor(f32(oy) * bitcast<f32>(P[5]))), H - 1u);
    let sx = min(u32(floor(f32(ox) * bitcast<f32>(P[6]))), W - 1u);
    O[i] = I0[P[7] + (nc * H + sy) * W + sx];
}}
",
        header(&["u32"], "u32")
    )
}

/// Gather of `[outer, D, inner]` by ids along D (raw words; ids out of range
/// give zeros). `P`: 0 total, 1 D, 2 inner, 3 n ids, 4 table offset, 5 ids offset.
pub fn index_select() -> String {
    format!(
        "{}{MAIN_1D}
    if (i >= P[0]) {{ return; }}
    let D = P[1]; let inner = P[2]; let n = P[3];
    let j = (i / inner) % n;
    let o = i / (inner * n);
    let id = I1[P[5] + j];
    if (id >= D) {{ O[i] = 0u; return; }}
    O[i] = I0[P[4] + (o * D + id) * inner + i % inner];
}}
",
        header(&["u32", "u32"], "u32")
    )
}

/// Numerically stable softmax over contiguous rows, one workgroup per row,
/// statistics by workgroup tree reductions. `P`: 0 rows, 1 cols, 2 offset.
pub fn softmax(out: DType) -> String {
    format!(
        "{}{}
var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {{
    let row = wid.x + wid.y * nwg.x;
    if (row >= P[0]) {{ return; }}
    let n = P[1];
    let base = P[2] + row * n;
    let t = lid.x;
    var m = -3.4028234663852886e38;
    for (var k = t; k < n; k = k + 256u) {{ m = max(m, I0[base + k]); }}
    red[t] = m;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s >> 1u) {{
        if (t < s) {{ red[t] = max(red[t], red[t + s]); }}
        workgroupBarrier();
    }}
    m = red[0];
    workgroupBarrier();
    var z = 0.0;
    for (var k = t; k < n; k = k + 256u) {{ z = z + exp(I0[base + k] - m); }}
    red[t] = z;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s >> 1u) {{
        if (t < s) {{ red[t] = red[t] + red[t + s]; }}
        workgroupBarrier();
    }}
    z = red[0];
    let ob = row * n;
    for (var k = t; k < n; k = k + 256u) {{ O[ob + k] = rnd(exp(I0[base + k] - m) / z); }}
}}
",
        header(&["f32"], "f32"),
        round_fn(out)
    )
}

/// LayerNorm / RMSNorm / GroupNorm over contiguous rows, one workgroup
/// per row. `rms`: no mean subtraction. Statistics in f32; the normalised
/// value is rounded to the output dtype before the affine part (as the
/// reference composites do). `P`: 0 rows, 1 cols, 2 offset, 3 eps bits,
/// 4 has weight, 5 has bias, 6 w offset, 7 b offset. `grouped`: a row is
/// one (sample, group) of GroupNorm and the weight/bias index is the
/// channel, with 8 elements per channel, 9 groups, 10 channels per group.
pub fn norm(rms: bool, grouped: bool, out: DType) -> String {
    let widx = if grouped {
        "(row % P[9]) * P[10] + k / P[8]"
    } else {
        "k"
    };
    let center = if rms {
        "let mean = 0.0;"
    } else {
        "var s = 0.0;
    for (var k = t; k < n; k = k + 256u) { s = s + I0[base + k]; }
    red[t] = s;
    workgroupBarrier();
    for (var h = 128u; h > 0u; h = h >> 1u) {
        if (t < h) { red[t] = red[t] + red[t + h]; }
        workgroupBarrier();
    }
    let mean = red[0] / f32(n);
    workgroupBarrier();"
    };
    format!(
        "{}{}
var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {{
    let row = wid.x + wid.y * nwg.x;
    if (row >= P[0]) {{ return; }}
    let n = P[1];
    let base = P[2] + row * n;
    let t = lid.x;
    {center}
    var q = 0.0;
    for (var k = t; k < n; k = k + 256u) {{ let c = I0[base + k] - mean; q = q + c * c; }}
    red[t] = q;
    workgroupBarrier();
    for (var h = 128u; h > 0u; h = h >> 1u) {{
        if (t < h) {{ red[t] = red[t] + red[t + h]; }}
        workgroupBarrier();
    }}
    let rstd = 1.0 / sqrt(red[0] / f32(n) + bitcast<f32>(P[3]));
    let ob = row * n;
    for (var k = t; k < n; k = k + 256u) {{
        var y = rnd((I0[base + k] - mean) * rstd);
        if (P[4] != 0u) {{ y = rnd(y * I1[P[6] + {widx}]); }}
        if (P[5] != 0u) {{ y = rnd(y + I2[P[7] + {widx}]); }}
        O[ob + k] = y;
    }}
}}
",
        header(&["f32", "f32", "f32"], "f32"),
        round_fn(out)
    )
}

/// Keys per chunk of the fused attention kernel (its workgroup size).
pub const ATTN_CHUNK: u32 = 64;
/// Largest head size the fused attention kernel holds (4 accumulators per
/// invocation).
pub const ATTN_MAX_D: u32 = 4 * ATTN_CHUNK;

/// Fused scaled dot-product attention, one workgroup of 64 invocations per
/// query row, keys in chunks of 64 (invocation `t` scores key `c + t`).
///
/// Scores follow `default_attention` step by step: `rnd(rnd(q.k) * scale)`,
/// plus the bias, plus `MASK_VALUE` where causally masked, all in f32. For
/// f32 outputs one pass with an online softmax (running max, rescaled sums
/// and accumulators); for f16/bf16 two passes (max and sum first, then the
/// probabilities rounded to the dtype before they weight `v`), because the
/// composite rounds the softmax output before its second matmul.
///
/// `P`: 0 rows (B*H*Tq), 1 H, 2 Tq, 3 Tk, 4 D, 5 H/Hkv, 6 scale bits,
/// 7 has bias, 8 causal, 9 causal offset, 10 skip masked keys (causal
/// without bias: keys past `offset + i` add exactly 0), then offset and
/// 4 strides (b, h, t, d) of q at 11, k at 16, v at 21, bias at 26.
pub fn attention(out: DType) -> String {
    let two_pass = !matches!(out, DType::F32);
    format!(
        "{}{}
const TWO_PASS: bool = {two_pass};
const MASK: f32 = -1e30;
var<workgroup> qs: array<f32, {ATTN_MAX_D}>;
var<workgroup> ps: array<f32, 64>;
var<workgroup> red: array<f32, 64>;

fn score(j: u32, i: u32, kb: u32, bb: u32, D: u32, scale: f32) -> f32 {{
    var dot = 0.0;
    let ks = P[20];
    for (var d = 0u; d < D; d = d + 1u) {{ dot = dot + qs[d] * I1[kb + j * P[19] + d * ks]; }}
    var s = rnd(rnd(dot) * scale);
    // A bias stored in f16 holds MASK_VALUE as -inf; clamped back, a fully
    // masked row stays uniform instead of NaN (as `default_attention`).
    if (P[7] != 0u) {{ s = s + max(I3[bb + j * P[30]], MASK); }}
    if (P[8] != 0u && j > P[9] + i) {{ s = s + MASK; }}
    return s;
}}

fn chunk_max(t: u32, s: f32) -> f32 {{
    red[t] = s;
    workgroupBarrier();
    for (var h = 32u; h > 0u; h = h >> 1u) {{
        if (t < h) {{ red[t] = max(red[t], red[t + h]); }}
        workgroupBarrier();
    }}
    let m = red[0];
    workgroupBarrier();
    return m;
}}

fn total(t: u32, x: f32) -> f32 {{
    red[t] = x;
    workgroupBarrier();
    for (var h = 32u; h > 0u; h = h >> 1u) {{
        if (t < h) {{ red[t] = red[t] + red[t + h]; }}
        workgroupBarrier();
    }}
    let s = red[0];
    workgroupBarrier();
    return s;
}}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {{
    let row = wid.x + wid.y * nwg.x;
    if (row >= P[0]) {{ return; }}
    let H = P[1];
    let Tq = P[2];
    let D = P[4];
    let scale = bitcast<f32>(P[6]);
    let i = row % Tq;
    let h = (row / Tq) % H;
    let b = row / (Tq * H);
    let hk = h / P[5];
    let t = lid.x;
    var Tk = P[3];
    if (P[10] != 0u) {{ Tk = min(Tk, P[9] + i + 1u); }}
    let qb = P[11] + b * P[12] + h * P[13] + i * P[14];
    let kb = P[16] + b * P[17] + hk * P[18];
    let vb = P[21] + b * P[22] + hk * P[23];
    let bb = P[26] + b * P[27] + h * P[28] + i * P[29];
    for (var d = t; d < D; d = d + 64u) {{ qs[d] = I0[qb + d * P[15]]; }}
    workgroupBarrier();
    let vt = P[24];
    let vd = P[25];
    var m = -3.4028234663852886e38;
    var l = 0.0;
    if (TWO_PASS) {{
        for (var c = 0u; c < Tk; c = c + 64u) {{
            let j = c + t;
            var s = -3.4028234663852886e38;
            if (j < Tk) {{ s = score(j, i, kb, bb, D, scale); }}
            let mn = max(m, chunk_max(t, s));
            l = l * exp(m - mn);
            if (j < Tk) {{ l = l + exp(s - mn); }}
            m = mn;
        }}
        l = total(t, l);
    }}
    var a0 = 0.0;
    var a1 = 0.0;
    var a2 = 0.0;
    var a3 = 0.0;
    for (var c = 0u; c < Tk; c = c + 64u) {{
        let j = c + t;
        var s = -3.4028234663852886e38;
        if (j < Tk) {{ s = score(j, i, kb, bb, D, scale); }}
        var p = 0.0;
        if (TWO_PASS) {{
            if (j < Tk) {{ p = rnd(exp(s - m) / l); }}
        }} else {{
            let mn = max(m, chunk_max(t, s));
            let alpha = exp(m - mn);
            l = l * alpha;
            if (j < Tk) {{ p = exp(s - mn); l = l + p; }}
            m = mn;
            a0 = a0 * alpha;
            a1 = a1 * alpha;
            a2 = a2 * alpha;
            a3 = a3 * alpha;
        }}
        ps[t] = p;
        workgroupBarrier();
        let n = min(64u, Tk - c);
        for (var jj = 0u; jj < n; jj = jj + 1u) {{
            let pj = ps[jj];
            let vr = vb + (c + jj) * vt;
            if (t < D) {{ a0 = a0 + pj * I2[vr + t * vd]; }}
            if (t + 64u < D) {{ a1 = a1 + pj * I2[vr + (t + 64u) * vd]; }}
            if (t + 128u < D) {{ a2 = a2 + pj * I2[vr + (t + 128u) * vd]; }}
            if (t + 192u < D) {{ a3 = a3 + pj * I2[vr + (t + 192u) * vd]; }}
        }}
        workgroupBarrier();
    }}
    var norm = 1.0;
    if (!TWO_PASS) {{ norm = 1.0 / total(t, l); }}
    let ob = row * D;
    if (t < D) {{ O[ob + t] = rnd(a0 * norm); }}
    if (t + 64u < D) {{ O[ob + t + 64u] = rnd(a1 * norm); }}
    if (t + 128u < D) {{ O[ob + t + 128u] = rnd(a2 * norm); }}
    if (t + 192u < D) {{ O[ob + t + 192u] = rnd(a3 * norm); }}
}}
",
        header(&["f32", "f32", "f32", "f32"], "f32"),
        round_fn(out)
    )
}

/// Input rows one workgroup of [`linear_quant`] takes.
pub const LQ_ROWS: u32 = 4;

/// `y = x W^T (+ b)` with `W` in a GGUF block format, dequantized in the
/// kernel: the weight stays in its 4.5- or 8.5-bit blocks on the device
/// (`I1`, the block bytes as little-endian words), each value widened as
/// `gguf.dequantize` computes it (`d * q` for Q8_0, `d * sc * q - dmin * m`
/// for Q4_K, in f32) and multiplied into f32 sums.
///
/// One workgroup of 64 invocations per output feature and [`LQ_ROWS`]
/// input rows; the invocations share out the 32-wide (sub-)blocks of the
/// row and reduce in workgroup memory, so each weight byte is read once for
/// four rows. Grid `(x, y, ceil(M / 4))` with `x * y >= N`.
///
/// `P`: 0 M, 1 N, 2 K, 3 x offset, 4 has bias, 5 bias offset, 6 bytes per
/// weight row, 7 first input row of this launch (grids have at most 65535
/// row groups). `I0` x `[M, K]` contiguous from its offset, `I2` the bias
/// (any buffer when there is none).
pub fn linear_quant(q: emu_core::QuantType, out: DType) -> String {
    let unit = match q {
        emu_core::QuantType::Q8_0 => {
            "    // Q8_0: blocks of 34 bytes, an f16 scale and 32 int8.
    let base = rowb + u * 34u;
    let d = f16_at(base);
    for (var i = 0u; i < 32u; i = i + 1u) {
        let w = d * f32(i32(byte_at(base + 2u + i) << 24u) >> 24u);
        let xi = xb + u * 32u + i;
        acc = acc + w * vec4<f32>(I0[xi], I0[xi + K * r1], I0[xi + K * r2], I0[xi + K * r3]);
    }"
        }
        emu_core::QuantType::Q4K => {
            "    // Q4_K: super-blocks of 144 bytes (f16 d, f16 dmin, 12 bytes of
    // 6-bit scales and mins, 128 bytes of nibbles), 8 sub-blocks of 32.
    let sb = u / 8u;
    let j = u % 8u;
    let base = rowb + sb * 144u;
    let d = f16_at(base);
    let dmin = f16_at(base + 2u);
    let s = base + 4u;
    var sc: u32;
    var mn: u32;
    if (j < 4u) {
        sc = byte_at(s + j) & 63u;
        mn = byte_at(s + j + 4u) & 63u;
    } else {
        sc = (byte_at(s + j + 4u) & 15u) | ((byte_at(s + j - 4u) >> 6u) << 4u);
        mn = (byte_at(s + j + 4u) >> 4u) | ((byte_at(s + j) >> 6u) << 4u);
    }
    let dl = d * f32(sc);
    let ml = dmin * f32(mn);
    let qs = base + 16u + (j / 2u) * 32u;
    let shift = (j % 2u) * 4u;
    for (var i = 0u; i < 32u; i = i + 1u) {
        let w = dl * f32((byte_at(qs + i) >> shift) & 15u) - ml;
        let xi = xb + u * 32u + i;
        acc = acc + w * vec4<f32>(I0[xi], I0[xi + K * r1], I0[xi + K * r2], I0[xi + K * r3]);
    }"
        }
    };
    format!(
        "{}{}
var<workgroup> red: array<vec4<f32>, 64>;

fn byte_at(o: u32) -> u32 {{
    return (I1[o >> 2u] >> ((o & 3u) * 8u)) & 0xffu;
}}

fn f16_at(o: u32) -> f32 {{
    return unpack2x16float(byte_at(o) | (byte_at(o + 1u) << 8u)).x;
}}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {{
    let M = P[0];
    let N = P[1];
    let K = P[2];
    let col = wid.x + wid.y * nwg.x;
    if (col >= N) {{ return; }}
    let row0 = P[7] + wid.z * 4u;
    // Rows past M read the last one again and are not stored.
    let r1 = min(1u, M - 1u - row0);
    let r2 = min(2u, M - 1u - row0);
    let r3 = min(3u, M - 1u - row0);
    let xb = P[3] + row0 * K;
    let rowb = col * P[6];
    let t = lid.x;
    var acc = vec4<f32>(0.0);
    for (var u = t; u < K / 32u; u = u + 64u) {{
{unit}
    }}
{REDUCE_64}    if (t == 0u) {{
        var r = red[0];
        if (P[4] != 0u) {{ r = r + vec4<f32>(I2[P[5] + col]); }}
        O[row0 * N + col] = rnd(r.x);
        if (row0 + 1u < M) {{ O[(row0 + 1u) * N + col] = rnd(r.y); }}
        if (row0 + 2u < M) {{ O[(row0 + 2u) * N + col] = rnd(r.z); }}
        if (row0 + 3u < M) {{ O[(row0 + 3u) * N + col] = rnd(r.w); }}
    }}
}}
",
        header(&["f32", "u32", "f32"], "f32"),
        round_fn(out)
    )
}
