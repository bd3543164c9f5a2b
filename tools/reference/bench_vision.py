"""PyTorch side of `cargo xtask bench --component vision` (see bench_common.py).

The EVA encoder and pooling as transcribed for the fixtures
(fixtures_vision.eva_forward / pool), on MODEL_DIR's `model.visual.*` weights.
"""

import json

import torch
from safetensors.torch import load_file

from bench_common import finish, setup, timed
from fixtures_vision import eva_forward, pool

args, x, dtype = setup(__doc__)
cfg = json.loads((args.model / "config.json").read_text())["vision_config"]
prefix = "model.visual."
w = {k[len(prefix):]: v.to(dtype) for k, v in load_file(str(args.model / "model.safetensors")).items() if k.startswith(prefix)}
pixels = x["pixels"].to(dtype)
with torch.inference_mode():
    ms, out = timed(lambda: pool(eva_forward(w, cfg, pixels), cfg["n_query"]), args.warmup, args.iters)
finish(args, {"encode": ms}, {"encode": out})
