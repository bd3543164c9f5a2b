"""diffusers side of `cargo xtask bench --component unet|vae` (see bench_common.py).

MODEL_DIR is a diffusers folder written by xtask: a UNet2DConditionModel
(call `step`: one forward at batch 2, the `[cond; uncond]` rows of a guided
step, on `sample`, `timestep`, `context`, `text_embeds`, `time_ids`) or an
AutoencoderKL (call `decode`: one latent `z` decoded to pixels).
"""

import json

import torch

from bench_common import finish, setup, timed
from diffusers import AutoencoderKL, UNet2DConditionModel

args, x, dtype = setup(__doc__)
kind = json.loads((args.model / "config.json").read_text())["_class_name"]
with torch.inference_mode():
    if kind == "UNet2DConditionModel":
        unet = UNet2DConditionModel.from_pretrained(args.model, torch_dtype=dtype, low_cpu_mem_usage=False).eval()
        added = {"text_embeds": x["text_embeds"].to(dtype), "time_ids": x["time_ids"].to(dtype)}
        sample, context = x["sample"].to(dtype), x["context"].to(dtype)
        t = float(x["timestep"][0])
        ms, out = timed(
            lambda: unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=added).sample,
            args.warmup,
            args.iters,
        )
        finish(args, {"step": ms}, {"step": out})
    elif kind == "AutoencoderKL":
        vae = AutoencoderKL.from_pretrained(args.model, torch_dtype=dtype, low_cpu_mem_usage=False).eval()
        z = x["z"].to(dtype)
        ms, out = timed(lambda: vae.decode(z).sample, args.warmup, args.iters)
        finish(args, {"decode": ms}, {"decode": out})
    else:
        raise SystemExit(f"{args.model}: not a UNet2DConditionModel or AutoencoderKL ({kind})")
