#!/usr/bin/env python3
"""Cross-check a graph exported by emu-rs's onnx backend with Python's onnxruntime.

Usage:
    EMU_ONNX_EXPORT_DIR=/tmp/emu-onnx cargo test -p emu-backend-onnx --test export
    .venv-ci/bin/python tools/onnx/check_export.py /tmp/emu-onnx

The Rust test writes block.onnx with the input it used (block_x.npy) and the
output the backend computed in process (block_y.npy). This loads the model in
onnxruntime (its own checker runs on load), runs it on the same input and fails
when the relative error max|a-b| / max|b| exceeds 1e-5.
"""
import pathlib
import sys

import numpy as np
import onnxruntime as ort


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    d = pathlib.Path(sys.argv[1])
    sess = ort.InferenceSession(str(d / "block.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    outs = [o.name for o in sess.get_outputs()]
    if names != ["x"] or outs != ["y"]:
        print(f"unexpected graph signature: inputs {names}, outputs {outs}")
        return 1
    x = np.load(d / "block_x.npy")
    want = np.load(d / "block_y.npy")
    (got,) = sess.run(["y"], {"x": x})
    if got.shape != want.shape:
        print(f"shape {got.shape}, expected {want.shape}")
        return 1
    err = float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30))
    print(f"onnxruntime {ort.__version__}: block.onnx output {got.shape}, rel err vs emu-rs {err:.2e}")
    return 0 if err <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
