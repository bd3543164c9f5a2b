"""Weight memory of Emu2-Chat and Emu2-Gen's LLaMA and EVA encoder at each
format, computed from the real configs (../shared/reference/hf-configs).

What `--quantize` does is modelled exactly: the attention and MLP linears
of the LLaMA decoder are stored as Q8_0 (34 bytes per 32 weights) or Q4_K
(144 bytes per 256 weights); embeddings, lm_head, norms, the EVA encoder
and the projections stay in bf16. Parameters are counted from the shapes
the configs imply (EVA: patch embedding, class/position embeddings, blocks
with qkv bias; no pooling head). Usage:

    python tools/reference/quant_memory.py [HF_CONFIG_DIR]
"""

import json
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
        rows.append((name, lin + other, lin, vis, proj, llm, bf16(vis + proj)))
    print("| model | LLaMA params (quantized linears) | EVA params | LLM bf16 | LLM q8_0 | LLM q4_k | EVA + projections bf16 |")
    print("|---|---|---|---|---|---|---|")
    for name, total, lin, vis, proj, llm, visb in rows:
        print(
            f"| {name} | {total / 1e9:.2f}B ({lin / 1e9:.2f}B) | {vis / 1e9:.2f}B | "
            f"{llm['bf16']:.1f} GB | {llm['q8_0']:.1f} GB | {llm['q4_k']:.1f} GB | {visb:.1f} GB |"
        )


if __name__ == "__main__":
    main()
