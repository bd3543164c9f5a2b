"""Weight memory of Emu2-Chat and Emu2-Gen's LLaMA, EVA encoder and UNet at
each format, computed from the real configs (../shared/reference/hf-configs)
and, for the UNet, diffusers' real state-dict shapes
(tests/fixtures/decoder/real_shapes.json).

What `--quantize` does is modelled exactly: the attention and MLP linears
of the LLaMA decoder are stored as Q8_0 (34 bytes per 32 weights) or Q4_K
(144 bytes per 256 weights); embeddings, lm_head, norms and the projections
stay in bf16. `--quantize-components vision,unet` adds the EVA blocks'
qkv/proj/fc1/fc2 and the UNet transformer blocks' attn1/attn2 projections
and ff linears (Q4_K where 256 divides a row, else Q8_0 where 32 does, else
bf16); the rest of those components stays bf16. Parameters are counted from
the shapes the configs imply (EVA: patch embedding, class/position
embeddings, blocks with qkv bias; no pooling head). Usage:

    python tools/reference/quant_memory.py [HF_CONFIG_DIR]
"""

import json
import re
import sys
from pathlib import Path

GB = 1e9


def llama(c):
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c.get("num_key_value_heads", c["num_attention_heads"]) * (h // c["num_attention_heads"])
    linears = n * (2 * h * h + 2 * h * kv + 3 * h * i)
    other = 2 * v * h + n * 2 * h + h  # embed_tokens, lm_head, norms
    return linears, other


def eva(c):
    vc = c["vision_config"]
    w, layers, inter, p, img = vc["width"], vc["layers"], vc["intermediate_size"], vc["patch_size"], vc["image_size"]
    per_block = 4 * w * w + 4 * w + 2 * w * inter + inter + w + 4 * w  # qkv+proj (+bias), fc1/fc2 (+bias), 2 norms
    embed = 3 * p * p * w + w + ((img // p) ** 2 + 1) * w + w  # patch conv (+bias), position, class
    return layers * per_block + embed + 2 * w  # final norm


def eva_linears(c):
    vc = c["vision_config"]
    w, layers, inter = vc["width"], vc["layers"], vc["intermediate_size"]
    # (out, in) of qkv, proj, fc1, fc2 in every block
    return [(3 * w, w), (w, w), (inter, w), (w, inter)] * layers


UNET_LINEAR = re.compile(r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))\.weight$")


def block_bytes(out, inner, q):
    """Bytes of a [out, inner] linear in q (q4_k falling back as the loaders do), bf16 if nothing divides."""
    if q == "q4_k" and inner % 256 == 0:
        return out * inner // 256 * 144
    if inner % 32 == 0:
        return out * inner // 32 * 34
    return 2 * out * inner


def unet(shapes):
    total = sum(prod(s) for s in shapes.values())
    linears = [tuple(s) for k, s in shapes.items() if UNET_LINEAR.search(k) and len(s) == 2]
    return total, linears


def prod(s):
    n = 1
    for d in s:
        n *= d
    return n


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[3] / "shared/reference/hf-configs")
    rows = []
    for name, f in [("Emu2-Chat", "Emu2-Chat.config.json"), ("Emu2-Gen", "Emu2-Gen.multimodal_encoder.config.json")]:
        c = json.loads((root / f).read_text())
        lin, other = llama(c)
        vis = eva(c)
        proj = 2 * (c["d_model"] * c["hidden_size"]) + c["hidden_size"] + c["d_model"]
        bf16 = lambda n: 2 * n / GB
        llm = {
            "bf16": bf16(lin + other),
            "q8_0": lin * 34 / 32 / GB + bf16(other),
            "q4_k": lin * 144 / 256 / GB + bf16(other),
        }
        ev = eva_linears(c)
        ev_n = sum(o * i for o, i in ev)
        vis_q = {q: (sum(block_bytes(o, i, q) for o, i in ev) + 2 * (vis + proj - ev_n)) / GB for q in ("q8_0", "q4_k")}
        rows.append((name, lin + other, lin, vis, proj, llm, bf16(vis + proj), vis_q))
    print("| model | LLaMA params (quantized linears) | EVA params | LLM bf16 | LLM q8_0 | LLM q4_k | EVA + projections bf16 / q8_0 / q4_k |")
    print("|---|---|---|---|---|---|---|")
    for name, total, lin, vis, proj, llm, visb, vis_q in rows:
        print(
            f"| {name} | {total / 1e9:.2f}B ({lin / 1e9:.2f}B) | {vis / 1e9:.2f}B | "
            f"{llm['bf16']:.1f} GB | {llm['q8_0']:.1f} GB | {llm['q4_k']:.1f} GB | "
            f"{visb:.1f} / {vis_q['q8_0']:.1f} / {vis_q['q4_k']:.1f} GB |"
        )
    shapes = json.loads((Path(__file__).resolve().parents[2] / "tests/fixtures/decoder/real_shapes.json").read_text())
    for comp in ("unet", "vae"):
        total, linears = unet(shapes[comp]) if comp == "unet" else (sum(prod(s) for s in shapes[comp].values()), [])
        lin_n = sum(o * i for o, i in linears)
        q = {k: (sum(block_bytes(o, i, k) for o, i in linears) + 2 * (total - lin_n)) / GB for k in ("q8_0", "q4_k")}
        print(
            f"Emu2-Gen {comp}: {total / 1e9:.3f}B params ({lin_n / 1e9:.3f}B in transformer-block linears): "
            f"bf16 {2 * total / GB:.2f} GB" + (f", q8_0 {q['q8_0']:.2f} GB, q4_k {q['q4_k']:.2f} GB" if linears else "")
        )


if __name__ == "__main__":
    main()
