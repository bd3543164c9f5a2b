"""Checks a GGUF written by `emu convert --quantize` with the `gguf` package.

Reads OUT/*.gguf with gguf.GGUFReader, dequantizes every Q8_0 / Q4_K tensor
with gguf.quants.dequantize, and compares each tensor with the source
safetensors (parsed here, no torch): quantized tensors within the format's
error bound (Q8_0: half a step of amax/127 per block of 32; Q4_K: one step
of the sub-block range / 15 plus the 6-bit scale rounding), float tensors
within their dtype's rounding. Exits non-zero on any mismatch.

Usage: python tools/reference/check_gguf.py SRC_SAFETENSORS_OR_DIR OUT_DIR_OR_GGUF
(a directory: every *.safetensors in it is the source)
(venv: tools/reference/requirements-gguf.txt)
"""

import json
import struct
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize

ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def read_safetensors(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        if v["dtype"] == "BF16":
            u = np.frombuffer(data[s:e], dtype=np.uint16).astype(np.uint32) << 16
            arr = u.view(np.float32)
        else:
            arr = np.frombuffer(data[s:e], dtype=ST_DTYPES[v["dtype"]])
        out[k] = arr.reshape(v["shape"]).astype(np.float64)
    return out


def main():
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    files = [src] if src.is_file() else sorted(src.glob("*.safetensors"))
    ref = {}
    for f in files:
        ref.update(read_safetensors(f))
    gguf_path = out if out.is_file() else next(out.glob("*.gguf"))
    reader = GGUFReader(gguf_path)
    bad, counts = [], {}
    for t in reader.tensors:
        want = ref.get(t.name)
        if want is None:
            bad.append(f"{t.name}: not in the source")
            continue
        kind = t.tensor_type
        counts[kind.name] = counts.get(kind.name, 0) + 1
        if kind in (T.Q8_0, T.Q4_K):
            got = dequantize(t.data, kind).astype(np.float64)
            bs = 32 if kind == T.Q8_0 else 256
            blocks = want.reshape(-1, bs)
            amax = np.abs(blocks).max(axis=1, keepdims=True)
            # Q8_0: half a step, plus |q| <= 127 times the rounding of d to f16.
            tol = amax / 127 * (0.5 + 127 * 2.0**-11) if kind == T.Q8_0 else amax * (2 / 15 + 2 / 63) + 2.0**-25 * 63 * 16
            err = np.abs(got.reshape(-1, bs) - blocks)
            ok = bool((err <= tol + 1e-12).all())
        else:
            raw = np.asarray(t.data)
            if kind == T.BF16:  # gguf returns the raw bytes
                raw = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            got = raw.astype(np.float64).reshape(want.shape)
            rel = {T.F32: 0.0, T.F16: 2.0**-11, T.BF16: 2.0**-8}.get(kind, 0.0)
            ok = bool((np.abs(got - want) <= rel * np.abs(want) + 1e-30).all())
        if got.shape != want.shape and got.size == want.size:
            got = got.reshape(want.shape)
        if got.shape != want.shape:
            bad.append(f"{t.name}: shape {got.shape} vs {want.shape}")
        elif not ok:
            bad.append(f"{t.name}: {kind.name} values out of bound")
    missing = set(ref) - {t.name for t in reader.tensors}
    bad += [f"{k}: missing from the GGUF" for k in sorted(missing)]
    print(f"{gguf_path}: {len(reader.tensors)} tensors {counts}")
    if bad:
        print("\n".join(bad))
        sys.exit(1)
    print("ok: gguf reads every tensor, values within the format bounds")


if __name__ == "__main__":
    main()
