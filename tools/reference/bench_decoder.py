"""diffusers side of `cargo run --release -p emu-decoder --example bench_decoder`.

Builds (if `DIR/unet/config.json` is missing) a mid-size SDXL-structured UNet
and VAE with random weights and saves them with `save_pretrained` under DIR,
then times diffusers 0.42.1 on the CPU: one UNet forward at batch 2 (the
`[cond; uncond]` rows of a guided step) and one VAE decode of a single latent.
Writes `DIR/bench_io.safetensors` (the inputs and diffusers' outputs, so the
Rust side can time the same calls and check it computed the same thing) and
`DIR/bench_torch.json` (timings).

usage: python bench_decoder.py DIR [--latent 32] [--tokens 64] [--warmup 1] [--iters 3]
"""

import argparse
import json
import os
import pathlib
import time

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
from diffusers import AutoencoderKL, UNet2DConditionModel

# Emu2-Gen's UNet structure (DownBlock2D first, text_time embedding, head
# counts in attention_head_dim, linear projections, cross-attention width
# different from every channel width) at a width a 2-core CPU can step.
UNET_CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(64, 128, 256),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 2),
    attention_head_dim=(2, 4, 8),  # head counts (head dim 32), as Emu2-Gen's config reads
    num_attention_heads=None,
    cross_attention_dim=768,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=64,
    projection_class_embeddings_input_dim=768 + 6 * 64,
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
    downsample_padding=1,
)

# Four blocks: the VAE factor 8 of Emu2-Gen (32x32 latents -> 256x256 pixels).
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 64, 128, 128),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.13025,
    force_upcast=True,
)


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            module, kind = name.split(".")[-2:]
            if "norm" in module and kind == "weight":
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))


def timed(fn, warmup: int, iters: int) -> tuple[list[float], torch.Tensor]:
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=pathlib.Path)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    root: pathlib.Path = args.dir

    if not (root / "unet" / "config.json").exists():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**UNET_CONFIG).eval()
        randomize(unet, 1)
        vae = AutoencoderKL(**VAE_CONFIG).eval()
        randomize(vae, 2)
        unet.save_pretrained(root / "unet", safe_serialization=True)
        vae.save_pretrained(root / "vae", safe_serialization=True)
    unet = UNet2DConditionModel.from_pretrained(root / "unet", low_cpu_mem_usage=False).eval()
    vae = AutoencoderKL.from_pretrained(root / "vae", low_cpu_mem_usage=False).eval()
    ucfg, vcfg = unet.config, vae.config

    g = torch.Generator().manual_seed(3)
    h = w = args.latent
    f = 2 ** (len(vcfg.block_out_channels) - 1)
    sample = torch.randn(2, ucfg.in_channels, h, w, generator=g)
    context = torch.randn(2, args.tokens, ucfg.cross_attention_dim, generator=g)
    text_embeds = context.mean(1)
    time_ids = torch.tensor([[h * f, w * f, 0, 0, h * f, w * f]] * 2, dtype=torch.float32)
    timestep = 500.0
    z = torch.randn(1, vcfg.latent_channels, h, w, generator=g)

    with torch.inference_mode():
        unet_ms, eps = timed(
            lambda: unet(
                sample,
                timestep,
                encoder_hidden_states=context,
                added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            ).sample,
            args.warmup,
            args.iters,
        )
        vae_ms, decoded = timed(lambda: vae.decode(z).sample, args.warmup, args.iters)

    save_file(
        {
            "sample": sample,
            "context": context,
            "text_embeds": text_embeds,
            "time_ids": time_ids,
            "timestep": torch.tensor([timestep]),
            "z": z,
            "eps": eps.contiguous(),
            "decoded": decoded.contiguous(),
        },
        str(root / "bench_io.safetensors"),
    )
    result = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "vae_decoder_params": sum(p.numel() for n, p in vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))),
        "unet_ms": unet_ms,
        "vae_ms": vae_ms,
    }
    (root / "bench_torch.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
