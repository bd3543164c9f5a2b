"""Generation fixtures from transformers 4.31's `generate`, the version upstream Emu2 pins.

Upstream Emu2 / Emu2-Chat decode with transformers 4.31.0's `generate(inputs_embeds=...)` (beam
search, 5 beams, length_penalty -1 by default). Its beam scorer (`BeamSearchScorer` /
`BeamHypotheses`) differs from 5.x's vectorised `_beam_search`, which fixtures_llm.py covers; these
fixtures pin the 4.31 behaviour for emu-llm's `BeamScoring::Transformers431`.

The model is tests/fixtures/llm/mha (read, not rewritten; 4.31 has no `rope_theta` field, and that
model uses the default 10000). With `inputs_embeds` and no `input_ids`, 4.31 seeds `input_ids` with
one BOS token per row; the outputs below drop that leading BOS, so they hold only generated tokens
as emu-llm returns them.

Writes, under `out_dir` (tests/fixtures/llm431/):
  cases.safetensors
    gen.embeds.{i} [1,Ti,H]: prompts: token embeddings of the model with some positions replaced by
        "image slot" vectors (random, as projected visual features would be)
    gen.{name}.{i} [1,N] i64: 4.31 `generate` output (leading BOS removed) for the settings in
        generation.json
    gen2.embeds [2,T,H], gen2.{name} [2,N] i64: an unpadded two-prompt batch
    gen3.embeds [3,T,H], gen3.mask [3,T] i64, gen3.{name} [3,N] i64: a left-padded batch
  generation.json   eos_token_id and the generate() settings of each name

transformers 4.31 cannot live in the main reference venv (transformers 5.x), so `build()` re-runs
this file under the interpreter named by EMU_LLM431_REF_PYTHON (default /work/venv-431/bin/python,
created from tools/reference/requirements-431.txt).
"""
import json
import os
import pathlib
import sys

from under_431 import build_under_431

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
REF_PYTHON = os.environ.get("EMU_LLM431_REF_PYTHON", "/work/venv-431/bin/python")
MODEL_DIR = ROOT / "tests" / "fixtures" / "llm" / "mha"

VOCAB = 400
BOS = 1


def build(out_dir: pathlib.Path) -> None:
    build_under_431(__file__, out_dir, _build, REF_PYTHON, "EMU_LLM431_REF_PYTHON", "requirements-431.txt")


def _settings(eos: int, bos_hit: int) -> dict:
    base = dict(eos_token_id=eos, pad_token_id=0, bos_token_id=BOS, do_sample=False)
    s = {
        "greedy": dict(base, num_beams=1, max_new_tokens=12),
        "greedy_min3_rep": dict(base, num_beams=1, max_new_tokens=12, min_new_tokens=3, repetition_penalty=1.5),
        "beam3_lp1_min4_rep": dict(base, num_beams=3, max_new_tokens=9, length_penalty=1.0, min_new_tokens=4,
                                   repetition_penalty=1.3),
        "beam4_never": dict(base, num_beams=4, max_new_tokens=8, length_penalty=0.5, early_stopping="never"),
        "beam5_lp-1_never": dict(base, num_beams=5, max_new_tokens=10, length_penalty=-1.0,
                                 early_stopping="never"),
    }
    for lp in (-1.0, 0.0, 1.0, 2.0):
        for n in (10, 16):
            tag = f"beam5_lp{lp:g}_n{n}"
            s[tag] = dict(base, num_beams=5, max_new_tokens=n, length_penalty=lp)
            s[tag + "_early"] = dict(base, num_beams=5, max_new_tokens=n, length_penalty=lp, early_stopping=True)
    # 4.31's repetition penalty also sees the BOS it seeds input_ids with. The model never sees that id
    # (inputs_embeds), so any id shows the effect: here one that greedy decoding generates.
    rep_bos = dict(base, bos_token_id=bos_hit, repetition_penalty=1.5)
    s["greedy_rep_bos"] = dict(rep_bos, num_beams=1, max_new_tokens=12)
    s["beam5_lp-1_rep_bos"] = dict(rep_bos, num_beams=5, max_new_tokens=12, length_penalty=-1.0)
    # Upstream Emu2's own defaults: min_len=1 (min_new_tokens), beams 5, length_penalty -1.
    s["beam5_upstream"] = dict(base, num_beams=5, max_new_tokens=16, length_penalty=-1.0, min_new_tokens=1)
    return s


def _generate(model, embeds, kw):
    import torch

    out = model.generate(inputs_embeds=embeds, **kw)
    # 4.31 seeds input_ids with BOS when only inputs_embeds are given; it is not generated.
    assert bool((out[:, 0] == kw["bos_token_id"]).all()), out
    return out[:, 1:].contiguous().to(torch.int64)


def _build(out_dir: pathlib.Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_grad_enabled(False)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = json.loads((MODEL_DIR / "config.json").read_text())
    assert raw.get("rope_theta", 10000.0) == 10000.0, "transformers 4.31 LLaMA has a fixed RoPE base"
    cfg = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("rope_theta", "rope_scaling", "architectures")})
    cfg.rope_scaling = None
    model = LlamaForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(load_file(str(MODEL_DIR / "model.safetensors")), strict=False)
    # Only the non-persistent rotary buffers may be absent from the file.
    assert not unexpected and all("rotary_emb" in k for k in missing), (missing, unexpected)
    # The same model as the 5.x fixtures: its prefill logits must agree.
    ref = load_file(str(MODEL_DIR / "cases.safetensors"))
    got = model(inputs_embeds=ref["prefill.embeds"]).logits
    err = (got - ref["prefill.logits"]).abs().max().item()
    assert err < 1e-4, f"4.31 logits differ from the 5.x fixture by {err}"

    H = cfg.hidden_size
    g = torch.Generator().manual_seed(431)
    emb = model.get_input_embeddings().weight.detach()
    prompts = []
    for n, slots in ((6, (1, 3)), (9, (2, 6)), (4, (0, 2)), (12, (3, 9)), (7, (1, 5)), (10, (4, 8)),
                     (5, (2, 4)), (8, (0, 4))):
        ids = torch.randint(3, 380, (n,), generator=g)
        e = emb[ids].clone()
        a, b = slots
        e[a:b] = torch.randn(b - a, H, generator=g)
        prompts.append(e[None])
    cases = {}
    for i, p in enumerate(prompts):
        cases[f"gen.embeds.{i}"] = p
    # EOS: the token greedy decoding produces most often past the first step, so that EOS is hit.
    counts = torch.zeros(VOCAB, dtype=torch.long)
    for p in prompts:
        seq = _generate(model, p, dict(do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0,
                                       bos_token_id=BOS))
        counts += torch.bincount(seq[0, 1:], minlength=VOCAB)
    eos = int(counts.argmax())
    # A token greedy decoding generates (not EOS) for the BOS-under-repetition-penalty settings.
    counts[eos] = 0
    settings = _settings(eos, int(counts.argmax()))
    for name, kw in settings.items():
        for i, p in enumerate(prompts):
            cases[f"gen.{name}.{i}"] = _generate(model, p, kw)
    pair = torch.cat([prompts[0][:, :6], prompts[1][:, :6]], 0)
    cases["gen2.embeds"] = pair
    for name in ("greedy", "beam5_lp-1_n10", "beam5_lp2_n10", "beam5_lp2_n16_early"):
        cases[f"gen2.{name}"] = _generate(model, pair, settings[name])
    # Left padding (upstream pads batches on the left): prompts of 9, 4 and 6 positions with an
    # attention mask; the padding rows hold noise that must not matter.
    lens = [9, 4, 6]
    padded = torch.randn(len(lens), max(lens), H, generator=g)
    pmask = torch.zeros(len(lens), max(lens), dtype=torch.long)
    for b, n in enumerate(lens):
        pmask[b, max(lens) - n:] = 1
    cases["gen3.embeds"] = padded
    cases["gen3.mask"] = pmask
    for name in ("greedy", "beam5_lp-1_n10", "beam5_lp2_n10", "beam5_lp2_n16_early", "beam5_upstream"):
        out = model.generate(inputs_embeds=padded, attention_mask=pmask, **settings[name])
        assert bool((out[:, 0] == settings[name]["bos_token_id"]).all()), out
        cases[f"gen3.{name}"] = out[:, 1:].contiguous()
    save_file({k: v.contiguous() for k, v in cases.items()}, str(out_dir / "cases.safetensors"))
    doc = dict(transformers="4.31.0", torch=torch.__version__.split("+")[0], model="llm/mha",
               eos_token_id=eos, settings=settings)
    (out_dir / "generation.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    _build(pathlib.Path(sys.argv[1]))
