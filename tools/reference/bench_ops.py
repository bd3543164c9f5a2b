"""PyTorch side of `cargo xtask bench --component ops` (see bench_common.py).

The single-op cases of xtask/src/bench/run.rs (`ops_cases`): inputs `KEY.0`,
`KEY.1`, ... in inputs.safetensors.
"""

import math

import torch
import torch.nn.functional as F

from bench_common import finish, setup, timed

args, x, dtype = setup(__doc__)


def op(key, a):
    if key == "matmul":
        return lambda: a[0] @ a[1]
    if key in ("linear", "linear_decode"):
        return lambda: F.linear(a[0], a[1])
    if key == "attention":
        return lambda: F.scaled_dot_product_attention(a[0], a[1], a[2], is_causal=True, scale=1 / math.sqrt(a[0].shape[-1]))
    if key == "conv2d":
        return lambda: F.conv2d(a[0], a[1], padding=1)
    if key == "softmax":
        return lambda: a[0].softmax(-1)
    if key == "layer_norm":
        return lambda: F.layer_norm(a[0], a[0].shape[-1:], eps=1e-5)
    raise SystemExit(f"unknown op case {key}")


keys = sorted({k.rsplit(".", 1)[0] for k in x})
ms, outs = {}, {}
with torch.inference_mode():
    for key in keys:
        a = [x[f"{key}.{i}"].to(dtype) for i in range(sum(1 for k in x if k.rsplit(".", 1)[0] == key))]
        ms[key], outs[key] = timed(op(key, a), args.warmup, args.iters)
finish(args, ms, outs)
