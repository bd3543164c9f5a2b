"""Fixtures for emu-vision: the Emu2 EVA-CLIP encoder and its image preprocessing.

Model: a PyTorch transcription of SPEC §1.2 / upstream `eva_vit.py` conventions
(post-norm blocks, fused qkv with bias cat(q_bias, 0, v_bias), learned positions,
exact GELU, no final norm) and of `encode_image`'s pooling (§2.1), on a tiny config,
saved with the real key names in three checkpoint layouts. Expected outputs are
computed in float64 so that the Rust f32 error is measured against exact maths.

Preprocessing: PIL `convert('RGB')` + `resize(BICUBIC)` + torchvision ToTensor and
CLIP Normalize, on small crops of scikit-image photos in several PNG/JPEG modes, and
on the upstream demo photos (read from ../shared at build time; only the expected
outputs are written, never the photos). Resized images are stored as PNG (lossless).
"""
import io
import json
import pathlib
import shutil
import struct
import subprocess
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
DEMO_DIR = ROOT.parent / "shared" / "reference" / "emu2-examples"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TINY = {
    "image_size": 28,
    "patch_size": 7,
    "width": 32,
    "layers": 2,
    "head_width": 8,
    "mlp_ratio": 2.5,
    "intermediate_size": 80,
    "layer_norm_eps": 1e-6,
    "n_query": 4,
    "v_query": 16,
    "postnorm": True,
    "qkv_bias": True,
    "xattn": False,
    "drop_path_rate": 0,
    "eva_model_name": "eva-clip-tiny-test",
}
HIDDEN = 48


# ---------------------------------------------------------------- model

def make_weights(cfg, hidden, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    c, p, L = cfg["width"], cfg["patch_size"], cfg["layers"]
    mh = cfg["intermediate_size"]
    n = (cfg["image_size"] // p) ** 2
    w = {
        "cls_token": rnd(1, 1, c, scale=0.5),
        "pos_embed": rnd(1, n + 1, c, scale=0.5),
        "patch_embed.proj.weight": rnd(c, 3, p, p, scale=(3 * p * p) ** -0.5),
        "patch_embed.proj.bias": rnd(c, scale=0.1),
    }
    for i in range(L):
        b = f"blocks.{i}."
        w[b + "norm1.weight"] = 1 + rnd(c, scale=0.2)
        w[b + "norm1.bias"] = rnd(c, scale=0.2)
        w[b + "attn.qkv.weight"] = rnd(3 * c, c, scale=c**-0.5)
        w[b + "attn.q_bias"] = rnd(c, scale=0.2)
        w[b + "attn.v_bias"] = rnd(c, scale=0.2)
        w[b + "attn.proj.weight"] = rnd(c, c, scale=c**-0.5)
        w[b + "attn.proj.bias"] = rnd(c, scale=0.1)
        w[b + "norm2.weight"] = 1 + rnd(c, scale=0.2)
        w[b + "norm2.bias"] = rnd(c, scale=0.2)
        w[b + "mlp.fc1.weight"] = rnd(mh, c, scale=c**-0.5)
        w[b + "mlp.fc1.bias"] = rnd(mh, scale=0.1)
        w[b + "mlp.fc2.weight"] = rnd(c, mh, scale=mh**-0.5)
        w[b + "mlp.fc2.bias"] = rnd(c, scale=0.1)
    project_up = rnd(hidden, c, scale=c**-0.5)
    return w, project_up


def eva_forward(w, cfg, x):
    """The EVA ViT as in upstream eva_vit.py (postnorm, no rope/subln/swiglu/gamma)."""
    c, p = cfg["width"], cfg["patch_size"]
    heads = c // cfg["head_width"]
    eps = cfg["layer_norm_eps"]
    B = x.shape[0]
    t = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=p)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([w["cls_token"].expand(B, -1, -1), t], dim=1) + w["pos_embed"]
    for i in range(cfg["layers"]):
        b = f"blocks.{i}."
        N = t.shape[1]
        qkv_bias = torch.cat([w[b + "attn.q_bias"], torch.zeros_like(w[b + "attn.v_bias"]), w[b + "attn.v_bias"]])
        qkv = F.linear(t, w[b + "attn.qkv.weight"], qkv_bias)
        qkv = qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * (c // heads) ** -0.5
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        a = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        a = F.linear(a, w[b + "attn.proj.weight"], w[b + "attn.proj.bias"])
        t = t + F.layer_norm(a, (c,), w[b + "norm1.weight"], w[b + "norm1.bias"], eps)
        m = F.linear(t, w[b + "mlp.fc1.weight"], w[b + "mlp.fc1.bias"])
        m = F.gelu(m)  # exact erf
        m = F.linear(m, w[b + "mlp.fc2.weight"], w[b + "mlp.fc2.bias"])
        t = t + F.layer_norm(m, (c,), w[b + "norm2.weight"], w[b + "norm2.bias"], eps)
    return t  # no final norm


def pool(feats, n_query):
    """`EmuModel.encode_image` after the ViT: drop CLS, avg-pool the grid."""
    x = feats[:, 1:, :]
    b, n, c = x.shape
    side = int(n**0.5)
    x = x.permute(0, 2, 1).reshape(b, c, side, side)
    stride = int(side // (n_query**0.5))
    x = F.avg_pool2d(x, kernel_size=(stride, stride), stride=stride)
    return x.reshape(b, c, -1).permute(0, 2, 1).contiguous()


def hf_config(cfg, hidden):
    return {
        "architectures": ["EmuForCausalLM"],
        "d_model": cfg["width"],
        "hidden_size": hidden,
        "model_version": "base",
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "vocab_size": 64,
        "torch_dtype": "float32",
        "vision_config": cfg,
    }


def build_model(out):
    cfg = TINY
    w, up = make_weights(cfg, HIDDEN)
    f32 = lambda d: {k: v.to(torch.float32).contiguous() for k, v in d.items()}
    layouts = {
        "hf": ("model.visual.", "project_up.weight"),
        "native": ("visual.", "project_up.weight"),
        "gen_native": ("multimodal_encoder.visual.", "multimodal_encoder.project_up.weight"),
    }
    for name, (prefix, up_key) in layouts.items():
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        tensors = {prefix + k: v for k, v in w.items()}
        tensors[up_key] = up
        if name == "hf":
            # A decoder tensor, as in real checkpoints, which the encoder must ignore.
            tensors["model.decoder.lm.model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.float64)
        save_file(f32(tensors), str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(hf_config(cfg, HIDDEN), indent=2) + "\n")

    g = torch.Generator().manual_seed(1)
    s = cfg["image_size"]
    pixels = torch.randn(2, 3, s, s, generator=g, dtype=torch.float64)
    # The Rust side computes from f32 weights and f32 pixels: use exactly those values.
    wr = {k: v.to(torch.float32).to(torch.float64) for k, v in w.items()}
    pixels = pixels.to(torch.float32).to(torch.float64)
    up64 = up.to(torch.float32).to(torch.float64)
    with torch.no_grad():
        feats = eva_forward(wr, cfg, pixels)
        exp = {"pixels": pixels, "features": feats}
        for nq in (1, 4, 16):
            pooled = pool(feats, nq)
            exp[f"pooled_{nq}"] = pooled
            exp[f"projected_{nq}"] = F.linear(pooled, up64)
        # End to end: a real photo through PIL + torchvision preprocessing, then the encoder.
        photo = normalize(resize(pil_rgb(sample_inputs()["coffee_q90.jpg"], True), s, s))
        photo = photo.unsqueeze(0).to(torch.float64)
        e2e = eva_forward(wr, cfg, photo)
        exp["e2e_features"] = e2e
        exp["e2e_projected"] = F.linear(pool(e2e, cfg["n_query"]), up64)
    save_file(f32(exp), str(out / "expected_model.safetensors"))


# ---------------------------------------------------------------- preprocessing

def png_bytes(arr, bitdepth, colortype):
    """A minimal PNG encoder (PIL cannot write 16-bit RGB)."""
    h, w = arr.shape[:2]
    if bitdepth == 16:
        raw_rows = [b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h)]
    else:
        raw_rows = [b"\x00" + arr[y].astype("u1").tobytes() for y in range(h)]

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, bitdepth, colortype, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(raw_rows), 9)) + chunk(b"IEND", b"")


def encode(im, fmt, **kw):
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def sample_inputs():
    """Small crops of scikit-image photos in the modes that real uploads come in."""
    from skimage import data

    astro = data.astronaut()[40:136, 150:278]  # 96x128 RGB, face
    coffee = data.coffee()[100:190, 200:330]  # 90x130
    chelsea = data.chelsea()[50:150, 120:230]  # 100x110
    rocket = data.rocket()[150:250, 200:280]  # 100x80
    camera = data.camera()[60:160, 180:300]  # 100x120 gray
    rng = np.random.default_rng(0)
    inputs = {}
    inputs["astronaut_rgb.png"] = encode(Image.fromarray(astro), "PNG")
    inputs["coffee_q90.jpg"] = encode(Image.fromarray(coffee), "JPEG", quality=90)
    inputs["chelsea_444.jpg"] = encode(Image.fromarray(chelsea), "JPEG", quality=95, subsampling=0)
    inputs["camera_gray.jpg"] = encode(Image.fromarray(camera), "JPEG", quality=90)
    inputs["camera_gray.png"] = encode(Image.fromarray(camera), "PNG")
    inputs["chelsea_palette.png"] = encode(Image.fromarray(chelsea).quantize(colors=48), "PNG")
    alpha = np.linspace(0, 255, rocket.shape[1], dtype=np.float64)[None, :].repeat(rocket.shape[0], 0)
    rgba = np.concatenate([rocket, alpha.astype(np.uint8)[..., None]], axis=2)
    inputs["rocket_rgba.png"] = encode(Image.fromarray(rgba, "RGBA"), "PNG")
    la = np.stack([camera, 255 - camera], axis=2)
    inputs["camera_la.png"] = encode(Image.fromarray(la, "LA"), "PNG")
    inputs["camera_1bit.png"] = encode(Image.fromarray(camera).convert("1"), "PNG")
    rgb16 = astro.astype(np.uint16) * 257 + rng.integers(0, 257, size=astro.shape, dtype=np.uint16)
    inputs["astronaut_rgb16.png"] = png_bytes(rgb16, 16, 2)
    # JPEG coding variants the libjpeg-exact decoder must cover.
    inputs["astronaut_progressive.jpg"] = encode(Image.fromarray(astro), "JPEG", quality=85, progressive=True)
    inputs["chelsea_422.jpg"] = encode(Image.fromarray(chelsea), "JPEG", quality=90, subsampling=1)
    inputs["rocket_restart.jpg"] = encode(Image.fromarray(rocket), "JPEG", quality=90, restart_marker_blocks=5)
    # Chroma 2 samples wide (plain replication in libjpeg) and 3 wide (fancy).
    inputs["tiny_3x5.jpg"] = encode(Image.fromarray(astro[40:45, 60:63]), "JPEG", quality=95)
    inputs["tiny_5x3.jpg"] = encode(Image.fromarray(astro[40:43, 60:65]), "JPEG", quality=95)
    # 4:4:0 (chroma halved vertically only: libjpeg's h1v2 upsampler). PIL cannot
    # write it; libjpeg-turbo's cjpeg can (apt: libjpeg-turbo-progs).
    cjpeg = shutil.which("cjpeg")
    if cjpeg:
        ppm = b"P6 %d %d 255\n" % (chelsea.shape[1], chelsea.shape[0]) + chelsea.tobytes()
        inputs["chelsea_440.jpg"] = subprocess.run(
            [cjpeg, "-quality", "90", "-sample", "1x2,1x1,1x1"], input=ppm, capture_output=True, check=True
        ).stdout
    else:
        print("[fixtures] vision: cjpeg not found; the 4:4:0 JPEG sample is not built")
    # EXIF orientation 6 (rotate 90° clockwise for display).
    exif = Image.Exif()
    exif[0x0112] = 6
    inputs["coffee_exif6.jpg"] = encode(Image.fromarray(coffee), "JPEG", quality=90, exif=exif.tobytes())
    return inputs


def pil_rgb(data, exif_transpose):
    im = Image.open(io.BytesIO(data))
    if exif_transpose:
        im = ImageOps.exif_transpose(im)
    return im.convert("RGB")


def normalize(im):
    import torchvision.transforms as T

    t = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    return t(im)


def resize(im, w, h):
    import torchvision.transforms as T

    # What upstream does: torchvision Resize((h, w), BICUBIC) on a PIL image.
    return T.Resize((h, w), interpolation=T.InterpolationMode.BICUBIC)(im)


# (width, height) targets: down, non-square down, up.
SAMPLE_TARGETS = [(64, 64), (56, 40), (160, 144)]


def build_preprocess(out):
    d = out / "preprocess"
    d.mkdir(parents=True, exist_ok=True)
    manifest = {"samples": [], "demo": []}
    for name, data in sample_inputs().items():
        (d / name).write_bytes(data)
        im = pil_rgb(data, exif_transpose=True)
        entry = {"input": name, "decoded": f"{name}.decoded.png", "size": list(im.size), "resized": []}
        im.save(d / entry["decoded"])
        for w, h in SAMPLE_TARGETS:
            r = resize(im, w, h)
            fn = f"{name}.{w}x{h}.png"
            r.save(d / fn)
            entry["resized"].append({"width": w, "height": h, "file": fn})
        manifest["samples"].append(entry)
    # The normalized tensor of one sample, to check ToTensor + Normalize in f32.
    im = resize(pil_rgb((d / "coffee_q90.jpg").read_bytes(), True), 64, 64)
    save_file({"pixels": normalize(im).contiguous()}, str(d / "coffee_q90.64x64.normalized.safetensors"))

    # Upstream demo photos: expected outputs only (the photos stay in ../shared).
    if DEMO_DIR.is_dir():
        full = {"dog.jpg", "squirrel.jpeg", "emu.png", "book1.jpg"}
        for p in sorted(DEMO_DIR.iterdir()):
            im = pil_rgb(p.read_bytes(), exif_transpose=False)
            targets = [(112, 112)] + ([(448, 448)] if p.name in full else [])
            entry = {"input": p.name, "size": list(im.size), "resized": []}
            for w, h in targets:
                fn = f"demo.{p.name}.{w}x{h}.png"
                resize(im, w, h).save(d / fn)
                entry["resized"].append({"width": w, "height": h, "file": fn})
            manifest["demo"].append(entry)
    else:
        print(f"[fixtures] vision: {DEMO_DIR} not found; demo expectations not built")
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def build(out_dir: pathlib.Path) -> None:
    torch.manual_seed(0)
    build_model(out_dir)
    build_preprocess(out_dir)
