#!/usr/bin/env python3
"""Cross-check the files `emu export-onnx --check-data` wrote with Python's onnxruntime.

Usage:
    emu export-onnx --model tiny --component all -o OUT --check-data
    .venv-ci/bin/python tools/onnx/check_export_onnx.py OUT

For every file in OUT/manifest.json this loads the model with onnxruntime (its
checker runs on load; external data files are read from beside the model),
checks that the graph's inputs and outputs have the names, dtypes and shapes
the manifest lists, runs it on the sample inputs under OUT/check/<graph>/ and
compares every output with what emu-rs computed in process (the LLM graphs at
a cache position, the UNet at a timestep, other than the ones they were traced
at). Fails when a relative error max|a-b| / max|b| exceeds the tolerance of
the export dtype (float32 1e-4, float16 5e-3, as the backend suite). bfloat16
exports are loaded and their signatures checked, but not run: numpy has no
bfloat16 to feed them with.
"""
import json
import pathlib
import sys

import numpy as np
import onnxruntime as ort

TOL = {"float32": 1e-4, "float16": 5e-3}
ORT_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "bfloat16": "tensor(bfloat16)",
    "float64": "tensor(double)",
    "int64": "tensor(int64)",
    "int32": "tensor(int32)",
    "uint32": "tensor(uint32)",
    "uint8": "tensor(uint8)",
}
NP_TYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64}


def check_ports(kind, got, want):
    problems = []
    if [p.name for p in got] != [p["name"] for p in want]:
        return [f"{kind} {[p.name for p in got]} != manifest {[p['name'] for p in want]}"]
    for g, w in zip(got, want):
        if g.type != ORT_TYPES[w["dtype"]]:
            problems.append(f"{kind} {g.name}: type {g.type}, manifest {w['dtype']}")
        if list(g.shape) != list(w["shape"]):
            problems.append(f"{kind} {g.name}: shape {g.shape}, manifest {w['shape']}")
    return problems


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    out = pathlib.Path(sys.argv[1])
    manifest = json.loads((out / "manifest.json").read_text())
    failed = 0
    checked = 0
    tol = TOL.get(manifest["dtype"])
    for f in manifest["files"]:
        path = out / f["file"]
        if f["external_data"] and not (out / f["external_data"]).is_file():
            print(f"{f['file']}: external data {f['external_data']} missing")
            failed += 1
            continue
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        problems = check_ports("inputs", sess.get_inputs(), f["inputs"])
        problems += check_ports("outputs", sess.get_outputs(), f["outputs"])
        if f["check"] is None or tol is None:
            why = "no check data" if f["check"] is None else f"numpy cannot feed {manifest['dtype']}"
            print(f"{f['file']}: loads, signature {'ok' if not problems else 'WRONG'} (not run: {why})")
        else:
            d = out / f["check"]
            feeds = {}
            for p in f["inputs"]:
                if p["dtype"] not in NP_TYPES:
                    problems.append(f"input {p['name']}: no numpy type for {p['dtype']}")
                    continue
                feeds[p["name"]] = np.load(d / f"{p['name']}.npy").astype(NP_TYPES[p["dtype"]])
            if not problems:
                names = [p["name"] for p in f["outputs"]]
                got = sess.run(names, feeds)
                worst = 0.0
                for name, g in zip(names, got):
                    want = np.load(d / f"{name}.npy")
                    if g.shape != want.shape:
                        problems.append(f"output {name}: shape {g.shape}, expected {want.shape}")
                        continue
                    err = float(
                        np.abs(g.astype(np.float64) - want).max() / max(float(np.abs(want).max()), 1e-30)
                    )
                    worst = max(worst, err)
                    if err > tol:
                        problems.append(f"output {name}: rel err {err:.2e} > {tol:.0e}")
                ext = f", weights in {f['external_data']}" if f["external_data"] else ""
                print(f"{f['file']}{ext}: {len(names)} outputs, worst rel err vs emu-rs {worst:.2e}")
                checked += 1
        for p in problems:
            print(f"  {f['file']}: {p}")
        failed += bool(problems)
    print(f"onnxruntime {ort.__version__}: {checked} graphs run, {failed} with problems")
    return 1 if failed or (checked == 0 and tol is not None) else 0


if __name__ == "__main__":
    sys.exit(main())
