"""Writes tests/fixtures/quant/: Q8_0 and Q4_K block bytes and their
dequantized values, the reference for emu-core's `quant` module.

* Q8_0 quantization and all dequantization come from the `gguf` package
  (pinned in requirements-gguf.txt).
* gguf 0.19.0 has no Q4_K *quantizer* (only `dequantize`), so Q4_K bytes come
  from `q4_k_quantize` below: ggml-quants.c's `quantize_row_q4_K_ref` (with
  `make_qkx2_quants`) evaluated step by step in float32 numpy scalars, with no
  fused multiply-adds (llama.cpp built with FMA contraction can differ in the
  last bit of a scale on rare inputs). Its output is checked to dequantize,
  through gguf, within the format's error bound.

Each case NAME writes NAME.f32 (the input, little-endian f32), NAME.q8_0 and
NAME.q4_k (block bytes), NAME.q8_0.deq / NAME.q4_k.deq (gguf.dequantize of
those bytes, f32); manifest.json lists the shapes. A case `q4_k_random_bytes`
holds arbitrary Q4_K blocks (random packed scales and nibbles) and their
gguf dequantization, to test the bit unpacking on patterns a quantizer never
produces.

Usage: python tools/reference/fixtures_quant.py [OUT_DIR]
"""

import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

F = np.float32
QK_K = 256


def nearest_int(v):
    # ggml's trick: add 1.5 * 2^23 and read the mantissa (round half to even).
    b = np.array([F(v) + F(12582912.0)], dtype=np.float32).view(np.int32)[0]
    return int((int(b) & 0x007FFFFF) - 0x00400000)


def make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep):
    n = len(x)
    mn, mx = x[0], x[0]
    sum_w = w[0]
    sum_x = F(sum_w * x[0])
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w = F(sum_w + w[i])
        sum_x = F(sum_x + F(w[i] * x[i]))
    if mn > 0:
        mn = F(0)
    if mx == mn:
        return F(0), F(-mn), [0] * n
    iscale = F(F(nmax) / F(mx - mn))
    scale = F(F(1) / iscale)
    levels = [0] * n
    best = F(0)
    for i in range(n):
        q = max(0, min(nmax, nearest_int(F(iscale * F(x[i] - mn)))))
        levels[i] = q
        diff = F(F(F(scale * F(q)) + mn) - x[i])
        best = F(best + F(w[i] * F(diff * diff)))
    for step in range(nstep + 1):
        iscale = F(F(F(F(rmin) + F(F(rdelta) * F(step))) + F(nmax)) / F(mx - mn))
        sum_l = sum_l2 = sum_xl = F(0)
        aux = [0] * n
        for i in range(n):
            q = max(0, min(nmax, nearest_int(F(iscale * F(x[i] - mn)))))
            aux[i] = q
            wl = F(w[i] * F(q))
            sum_l = F(sum_l + wl)
            sum_l2 = F(sum_l2 + F(wl * F(q)))
            sum_xl = F(sum_xl + F(wl * x[i]))
        det = F(F(sum_w * sum_l2) - F(sum_l * sum_l))
        if det > 0:
            this_scale = F(F(F(sum_w * sum_xl) - F(sum_x * sum_l)) / det)
            this_min = F(F(F(sum_l2 * sum_x) - F(sum_l * sum_xl)) / det)
            if this_min > 0:
                this_min = F(0)
                this_scale = F(sum_xl / sum_l2)
            err = F(0)
            for i in range(n):
                diff = F(F(F(this_scale * F(aux[i])) + this_min) - x[i])
                err = F(err + F(w[i] * F(diff * diff)))
            if err < best:
                levels = aux
                best = err
                scale = this_scale
                mn = this_min
    return scale, F(-mn), levels


def scale_min_k4(j, s):
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def q4_k_block(x):
    levels = [0] * QK_K
    scales, mins = [F(0)] * 8, [F(0)] * 8
    max_scale = max_min = F(0)
    for j in range(8):
        xs = x[32 * j : 32 * j + 32]
        sum_x2 = F(0)
        for v in xs:
            sum_x2 = F(sum_x2 + F(v * v))
        av_x = F(np.sqrt(F(sum_x2 / F(32))))
        w = [F(av_x + F(abs(v))) for v in xs]
        s, m, lv = make_qkx2_quants(xs, w, 15, -1.0, 0.1, 20)
        levels[32 * j : 32 * j + 32] = lv
        scales[j], mins[j] = s, m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    inv_scale = F(F(63) / max_scale) if max_scale > 0 else F(0)
    inv_min = F(F(63) / max_min) if max_min > 0 else F(0)
    packed = [0] * 12
    for j in range(8):
        ls = min(63, nearest_int(F(inv_scale * scales[j])) & 0xFF)
        lm = min(63, nearest_int(F(inv_min * mins[j])) & 0xFF)
        if j < 4:
            packed[j] = ls
            packed[j + 4] = lm
        else:
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            packed[j - 4] |= (ls >> 4) << 6
            packed[j] |= (lm >> 4) << 6
    d16 = np.array([max_scale / F(63)], dtype=np.float32).astype(np.float16)
    dmin16 = np.array([max_min / F(63)], dtype=np.float32).astype(np.float16)
    d, dmin = F(d16[0]), F(dmin16[0])
    for j in range(8):
        sc, m = scale_min_k4(j, packed)
        dj = F(d * F(sc))
        if dj == 0:
            continue
        dm = F(dmin * F(m))
        for i in range(32):
            levels[32 * j + i] = max(0, min(15, nearest_int(F(F(x[32 * j + i] + dm) / dj))))
    qs = []
    for c in range(0, QK_K, 64):
        qs += [levels[c + i] | (levels[c + i + 32] << 4) for i in range(32)]
    return d16.view(np.uint8).tobytes() + dmin16.view(np.uint8).tobytes() + bytes(packed) + bytes(qs)


def q4_k_quantize(a):
    flat = a.astype(np.float32).reshape(-1)
    return b"".join(q4_k_block([F(v) for v in flat[i : i + QK_K]]) for i in range(0, flat.size, QK_K))


def cases(rng):
    n = lambda *s: rng.standard_normal(s).astype(np.float32)
    zero_blocks = n(4, 512)
    zero_blocks[0, :256] = 0  # a whole Q4_K super-block and 8 Q8_0 blocks
    zero_blocks[2, 32:64] = 0  # one Q8_0 block / one Q4_K sub-block
    outliers = n(4, 512) * 0.02
    outliers[1, 7] = 40.0
    outliers[3, 300] = -55.0
    outliers[0, 100:104] = [9.0, -9.0, 0.5, 12.0]
    negative = rng.uniform(-3.0, -1.0, (2, 512)).astype(np.float32)
    positive = rng.uniform(0.5, 2.0, (2, 256)).astype(np.float32)
    mixed = np.concatenate([rng.uniform(-5.0, -4.0, (2, 256)), rng.uniform(-0.01, 0.01, (2, 256))], axis=1).astype(np.float32)
    constant = np.full((1, 256), 0.75, dtype=np.float32)
    constant_neg = np.full((1, 256), -1.25, dtype=np.float32)
    tiny = n(2, 256) * 1e-6  # f16 scales in the subnormal range
    halves = (rng.integers(-40, 40, (2, 256)) * 0.5).astype(np.float32)  # ties for the rounding
    return {
        "normal": n(8, 256),
        "zero_blocks": zero_blocks,
        "outliers": outliers,
        "negative": negative,
        "positive": positive,
        "mixed_ranges": mixed,
        "constant": np.concatenate([constant, constant_neg], axis=0),
        "tiny": tiny,
        "halves": halves,
    }


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "tests/fixtures/quant")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1313)
    manifest = {"gguf": "0.19.0", "cases": {}}
    for name, a in cases(rng).items():
        (out / f"{name}.f32").write_bytes(a.astype("<f4").tobytes())
        q8 = quants.quantize(a, T.Q8_0)
        (out / f"{name}.q8_0").write_bytes(q8.tobytes())
        (out / f"{name}.q8_0.deq").write_bytes(quants.dequantize(q8, T.Q8_0).astype("<f4").tobytes())
        q4 = q4_k_quantize(a)
        q4_arr = np.frombuffer(q4, dtype=np.uint8).reshape(a.shape[0], -1)
        deq4 = quants.dequantize(q4_arr, T.Q4_K)
        # The transcription must behave like a Q4_K quantizer: every weight
        # within one 4-bit step (plus the 6-bit scale/min rounding) of its input,
        # plus the rounding of d and dmin to f16 (absolute 2^-25 each, times a
        # 6-bit scale and a 4-bit level: it dominates for the tiny case).
        step = np.abs(a).reshape(-1, QK_K).max(axis=1, keepdims=True) * (2.0 / 15.0 + 2.0 / 63.0) + 2.0**-25 * 63 * 16
        assert (np.abs(deq4.reshape(-1, QK_K) - a.reshape(-1, QK_K)) <= step).all(), name
        (out / f"{name}.q4_k").write_bytes(q4)
        (out / f"{name}.q4_k.deq").write_bytes(deq4.astype("<f4").tobytes())
        manifest["cases"][name] = list(a.shape)
    # Arbitrary Q4_K blocks: random scale bytes and nibbles, finite f16 d/dmin.
    nb = 6
    blocks = rng.integers(0, 256, (nb, 144), dtype=np.uint8)
    dd = rng.uniform(-0.5, 0.5, (nb, 2)).astype(np.float16)
    blocks[:, 0:4] = dd.view(np.uint8)
    (out / "q4_k_random_bytes.q4_k").write_bytes(blocks.tobytes())
    (out / "q4_k_random_bytes.q4_k.deq").write_bytes(quants.dequantize(blocks.reshape(2, -1), T.Q4_K).astype("<f4").tobytes())
    manifest["q4_k_random_bytes"] = [2, nb // 2 * QK_K]
    # A GGUF written by gguf's own GGUFWriter (a file emu-rs did not write):
    # one Q8_0, one Q4_K and one f32 tensor, read back by emu-core's loader.
    import gguf

    a = cases(np.random.default_rng(1313))["normal"]
    w = gguf.GGUFWriter(str(out / "gguf_writer.gguf"), arch="emu2")
    w.add_tensor("lin.q8_0.weight", quants.quantize(a, T.Q8_0), raw_dtype=T.Q8_0)
    w.add_tensor("lin.q4_k.weight", np.frombuffer(q4_k_quantize(a), dtype=np.uint8).reshape(a.shape[0], -1), raw_dtype=T.Q4_K)
    w.add_tensor("norm.weight", a[0, :16].copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    manifest["gguf_writer"] = {"source": "normal", "q8_0": "lin.q8_0.weight", "q4_k": "lin.q4_k.weight", "f32": "norm.weight"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
