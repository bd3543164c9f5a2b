"""Shared by the PyTorch sides of `cargo xtask bench` (tools/reference/bench_*.py).

Every script is called as `bench_<component>.py MODEL_DIR IO_DIR [--threads N]
--warmup N --iters N --dtype f32|bf16`: MODEL_DIR holds the model xtask wrote
in its upstream layout, IO_DIR/inputs.safetensors the inputs. The script times
the same calls as the Rust side and writes IO_DIR/torch.json (torch version,
threads, milliseconds of every timed run by call) and
IO_DIR/torch_out.safetensors (the last output of each call, as float32), so
xtask can check PyTorch computed the same thing before comparing times.
"""

import argparse
import json
import pathlib
import time

import torch
from safetensors.torch import load_file, save_file


def setup(description: str):
    """Parses the common arguments, fixes the thread count; returns (args, inputs, dtype)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("model", type=pathlib.Path)
    ap.add_argument("io", type=pathlib.Path)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    inputs = load_file(str(args.io / "inputs.safetensors"))
    return args, inputs, dtype


def timed(fn, warmup: int, iters: int):
    """Runs fn warmup times, then iters timed times; returns (ms list, last output)."""
    out = None
    for _ in range(warmup):
        out = fn()
    ms = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return ms, out


def finish(args, ms: dict, outputs: dict) -> None:
    """Writes torch.json and torch_out.safetensors for xtask."""
    (args.io / "torch.json").write_text(
        json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "ms": ms}) + "\n"
    )
    save_file(
        {k: v.detach().float().contiguous() for k, v in outputs.items()},
        str(args.io / "torch_out.safetensors"),
    )
