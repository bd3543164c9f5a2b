"""Fixtures for the `emu-decoder` crate: Euler scheduler, AutoencoderKL,
UNet2DConditionModel and the guided sampling loop of Emu2-Gen.

The tiny UNet keeps every structural feature of the Emu2-Gen UNet
(DownBlock2D + CrossAttn blocks, per-block transformer depth, linear
projections, GEGLU, a cross-attention width unlike any channel width, the
"text_time" added embedding) at a size that runs in milliseconds.

Layout under out_dir (= tests/fixtures/decoder):
  scheduler/cases.json        one entry per (config overrides, steps)
  scheduler/schedules.safetensors  `<case>.timesteps`, `<case>.sigmas`, `<case>.init_noise_sigma`
  scheduler/steps.safetensors      inputs and outputs of three consecutive scale/step calls
  pipeline/{unet,vae}/        save_pretrained folders (config.json + f32 safetensors;
                              the VAE also as a `bf16` variant)
  pipeline/scheduler/scheduler_config.json   Emu2-Gen's scheduler config
  unet_io.safetensors, vae_io.safetensors, sampling_io.safetensors
"""
import copy
import json
import pathlib

import numpy as np
import torch
from safetensors.torch import save_file

from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

# Emu2-Gen's scheduler/scheduler_config.json (SPEC §4.3), minus bookkeeping keys.
EMU_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.21.2",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(16, 24, 32),
    layers_per_block=2,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(1, 2, 4),  # head counts, as in Emu2-Gen (num_attention_heads null)
    num_attention_heads=None,
    cross_attention_dim=20,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=20 + 6 * 8,
    addition_embed_type_num_heads=64,
    norm_num_groups=8,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
    downsample_padding=1,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
    scaling_factor=0.13025,
    force_upcast=True,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent

SPACINGS = ("leading", "trailing", "linspace")
STEP_COUNTS = (1, 2, 25, 50, 100)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights at a scale where every layer matters (default inits zero
    some projections and make GroupNorm an identity)."""
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


def build_scheduler(out: pathlib.Path) -> None:
    d = out / "scheduler"
    d.mkdir(parents=True, exist_ok=True)
    cases, tensors = [], {}

    def add(name, overrides, steps):
        cfg = {**EMU_SCHEDULER, **overrides}
        s = EulerDiscreteScheduler.from_config(cfg)
        s.set_timesteps(steps)
        cases.append({"name": name, "overrides": overrides, "steps": steps})
        tensors[f"{name}.timesteps"] = s.timesteps.to(torch.float32).contiguous()
        tensors[f"{name}.sigmas"] = s.sigmas.to(torch.float32).contiguous()
        tensors[f"{name}.init_noise_sigma"] = torch.tensor([float(s.init_noise_sigma)], dtype=torch.float32)

    for spacing in SPACINGS:
        for n in STEP_COUNTS:
            add(f"{spacing}_{n}", {"timestep_spacing": spacing}, n)
    for n in (1, 7, 50):
        add(f"linear_betas_{n}", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, n)
        add(f"offset0_{n}", {"steps_offset": 0}, n)
        add(f"trailing_linear_{n}", {"timestep_spacing": "trailing", "beta_schedule": "linear"}, n)
    (d / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    save_file(tensors, str(d / "schedules.safetensors"))

    # Three consecutive scale_model_input/step calls per prediction type.
    g = torch.Generator().manual_seed(11)
    steps = {}
    cases = [(p, sp) for p in ("epsilon", "v_prediction") for sp in ("leading", "linspace")]
    for pred, spacing in cases + [("sample", "trailing")]:
        key = f"{pred}_{spacing}"
        s = EulerDiscreteScheduler.from_config({**EMU_SCHEDULER, "prediction_type": pred, "timestep_spacing": spacing})
        s.set_timesteps(10)
        sample = torch.randn(1, 4, 3, 3, generator=g) * s.init_noise_sigma
        steps[f"{key}.sample0"] = sample.clone()
        for i, t in enumerate(s.timesteps[:3]):
            scaled = s.scale_model_input(sample, t)
            out = torch.randn(1, 4, 3, 3, generator=g)
            sample = s.step(out, t, sample).prev_sample
            steps[f"{key}.model_output{i}"] = out
            steps[f"{key}.scaled{i}"] = scaled.contiguous()
            steps[f"{key}.sample{i + 1}"] = sample.contiguous()
    save_file(steps, str(d / "steps.safetensors"))


def build_models(out: pathlib.Path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    randomize(unet, 1)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    randomize(vae, 2)
    p = out / "pipeline"
    unet.save_pretrained(p / "unet", safe_serialization=True)
    vae.save_pretrained(p / "vae", safe_serialization=True)
    # A copy: casting `vae` itself would leave bf16-rounded weights behind.
    copy.deepcopy(vae).to(torch.bfloat16).save_pretrained(p / "vae", safe_serialization=True, variant="bf16")
    (p / "scheduler").mkdir(parents=True, exist_ok=True)
    (p / "scheduler" / "scheduler_config.json").write_text(json.dumps(EMU_SCHEDULER, indent=2) + "\n")
    print(f"  unet params {sum(x.numel() for x in unet.parameters())}, vae params {sum(x.numel() for x in vae.parameters())}")
    return unet, vae


def build_unet_io(out: pathlib.Path, unet) -> None:
    g = torch.Generator().manual_seed(21)
    cross = UNET_CONFIG["cross_attention_dim"]
    sample = torch.randn(2, 4, 8, 8, generator=g)
    ehs = torch.randn(2, 5, cross, generator=g)
    text_embeds = ehs.mean(dim=1)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [48.0, 80.0, 3.0, 5.0, 64.0, 64.0]])
    t = torch.tensor(981.0)
    with torch.no_grad():
        y = unet(sample, t, encoder_hidden_states=ehs, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        # A second call at a fractional timestep and an odd latent size
        # (exercises the forwarded upsample sizes).
        sample2 = torch.randn(1, 4, 6, 10, generator=g)
        y2 = unet(sample2, torch.tensor(37.5), encoder_hidden_states=ehs[:1],
                  added_cond_kwargs={"text_embeds": text_embeds[:1], "time_ids": time_ids[:1]}).sample
        unet_bf16 = UNet2DConditionModel.from_pretrained(out / "pipeline" / "unet", torch_dtype=torch.bfloat16).eval()
        y_bf16 = unet_bf16(sample.bfloat16(), t, encoder_hidden_states=ehs.bfloat16(),
                           added_cond_kwargs={"text_embeds": text_embeds.bfloat16(), "time_ids": time_ids}).sample
    save_file({
        "sample": sample, "timestep": t.reshape(1), "encoder_hidden_states": ehs,
        "text_embeds": text_embeds, "time_ids": time_ids, "out": y.contiguous(),
        "sample2": sample2, "timestep2": torch.tensor([37.5]), "out2": y2.contiguous(),
        "out_bf16": y_bf16.float().contiguous(),
    }, str(out / "unet_io.safetensors"))


def build_vae_io(out: pathlib.Path, vae) -> None:
    g = torch.Generator().manual_seed(31)
    z = torch.randn(1, 4, 8, 8, generator=g) * 2.0
    x = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        dec = vae.decode(z).sample
        enc = vae.encode(x).latent_dist
        vae_bf16 = AutoencoderKL.from_pretrained(out / "pipeline" / "vae", variant="bf16", torch_dtype=torch.bfloat16).eval()
        dec_bf16 = vae_bf16.decode(z.bfloat16()).sample
    save_file({
        "latents": z, "decoded": dec.contiguous(), "decoded_bf16": dec_bf16.float().contiguous(),
        "image": x, "posterior_mean": enc.mean.contiguous(), "posterior_logvar": enc.logvar.contiguous(),
    }, str(out / "vae_io.safetensors"))


def build_sampling_io(out: pathlib.Path, unet, vae) -> None:
    """The Emu2-Gen denoising loop (EmuVisualGeneration.forward) written out
    with diffusers components, from caller-supplied initial noise."""
    g = torch.Generator().manual_seed(41)
    cross = UNET_CONFIG["cross_attention_dim"]
    cond = torch.randn(1, 5, cross, generator=g)
    uncond = torch.randn(1, 5, cross, generator=g)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    steps, guidance = 3, 3.0
    height = width = 16  # pixels: the tiny VAE downsamples by 2
    sched = EulerDiscreteScheduler.from_config(EMU_SCHEDULER)
    sched.set_timesteps(steps)
    prompt_embeds = torch.cat([cond, uncond])
    pooled = prompt_embeds.mean(dim=1)
    time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.long).repeat(2, 1)
    latents = noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([latents, latents]), t)
            eps = unet(inp, t, encoder_hidden_states=prompt_embeds,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            eps_cond, eps_uncond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            latents = sched.step(eps, t, latents).prev_sample
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    image = (decoded / 2 + 0.5).clamp(0, 1)
    rgb = (image * 255).round().to(torch.uint8)[0].permute(1, 2, 0).contiguous()
    save_file({
        "cond": cond, "uncond": uncond, "noise": noise, "latents": latents.contiguous(),
        "decoded": decoded.contiguous(), "image": image.contiguous(), "rgb8": rgb,
        "params": torch.tensor([steps, guidance, height, width], dtype=torch.float32),
    }, str(out / "sampling_io.safetensors"))


def build_real_shapes(out: pathlib.Path) -> None:
    """Parameter names and shapes of the full-size Emu2-Gen UNet and VAE,
    instantiated by diffusers on the meta device (no memory) from the
    upstream configs. The configs themselves are read from ../shared at run
    time and not stored; only diffusers' resulting state-dict layout is."""
    conf = ROOT.parent / "shared" / "reference" / "emu2-conf" / "diffusion_config"
    shapes = {}
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        cfg = json.loads((conf / name / "config.json").read_text())
        with torch.device("meta"):
            model = cls.from_config(cfg)
        shapes[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
        print(f"  real {name}: {len(shapes[name])} tensors, {sum(int(np.prod(s)) for s in shapes[name].values())} params")
    (out / "real_shapes.json").write_text(json.dumps(shapes, separators=(",", ":"), sort_keys=True) + "\n")


def build(out_dir: pathlib.Path) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    build_scheduler(out_dir)
    unet, vae = build_models(out_dir)
    build_unet_io(out_dir, unet)
    build_vae_io(out_dir, vae)
    build_sampling_io(out_dir, unet, vae)
    build_real_shapes(out_dir)
