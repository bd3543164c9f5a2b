"""Fixtures of the LLaMA decoder (crate emu-llm), from transformers' LlamaForCausalLM.

Writes, under `out_dir` (tests/fixtures/llm/), one folder per tiny config:
  mha/  hidden 64, 2 layers, 4 heads (MHA), rope_theta 10000 (config.json rewritten to the
        transformers-4 layout: top-level `rope_theta`, `rope_scaling: null`, as Emu2's)
  gqa/  hidden 64, 3 layers, 4 heads / 2 kv heads, rope_theta 500000 (5.x `rope_parameters`)
each with
  config.json, model.safetensors   the model as `save_pretrained` writes it (keys `model.layers.N...`,
                                   `lm_head.weight`), f32
  cases.safetensors                inputs and expected outputs (f32 unless noted):
    slots.ids [1,T] i64, slots.image [Ni,H], slots.video [Nv,H]: a prompt whose image/video slot ids
        (IMAGE_ID / VIDEO_ID below; small so that the vocab stays small) are overwritten in order
    prefill.embeds [1,T,H] (= the slot-filled embeddings), prefill.hidden [1,T,H] (after the final
        norm), prefill.logits [1,T,V]
    decode.embeds [1,S,H], decode.hidden / decode.logits [1,S,*]: S single-token steps on the cache
    batch.embeds [B,Tb,H], batch.mask [B,Tb] i64 (left padding), batch.hidden / batch.logits,
    batch.step_embeds [B,S,H], batch.step_logits [B,S,V]: padded prefill then cached steps
    bf16.{prefill,decode,batch}.*: the same outputs from the model and inputs cast to bf16 (torch bf16)
    gen.embeds.{i} [1,Ti,H]: generation prompts; gen.{name}.{i} [1,N] i64: transformers `generate`
        output for the settings in generation.json (greedy and beam search variants)
    gen2.embeds [2,T,H] and gen2.{name} [2,N]: an unpadded two-prompt batch
    gen3.embeds [3,T,H], gen3.mask [3,T] i64 and gen3.{name} [3,N]: a left-padded batch
        (generate with attention_mask; no repetition penalty, which transformers 5.24 applies
        differently with a padding mask and inputs_embeds)
    visual.prompt [1,Tv,H], visual.project_up [H,Dv], visual.project_down [Dv,H],
    visual.out [1,64,Dv]: Emu2-Gen's regression of 64 visual embeddings, computed the upstream way
        (the whole sequence re-run for each of the 64 positions, no KV cache)
  generation.json                  the generate() settings of each gen.* name
"""
import copy
import json
import pathlib

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

IMAGE_ID = 390
VIDEO_ID = 391
VOCAB = 400

CONFIGS = {
    "mha": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=128,
        seed=11,
    ),
    "gqa": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=128,
        seed=22,
    ),
}


def _model(name: str, spec: dict) -> LlamaForCausalLM:
    spec = dict(spec)
    seed = spec.pop("seed")
    theta = spec.pop("rope_theta")
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": theta}, **spec,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    # Larger-than-default weights so that the logits are peaked (beam search and greedy
    # then take clear decisions) and the norms' scales are not all ones.
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in key:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "lm_head" in key:
                p.copy_(torch.randn(p.shape, generator=g) * (4.0 / p.shape[1] ** 0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[1] ** 0.5))
    return model


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # What generate() does for left-padded batches.
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def _gen_settings(eos: int):
    base = dict(eos_token_id=eos, pad_token_id=0, bos_token_id=1)
    return {
        "greedy": dict(base, do_sample=False, num_beams=1, max_new_tokens=12),
        "greedy_min3_rep": dict(base, do_sample=False, num_beams=1, max_new_tokens=12, min_new_tokens=3,
                                repetition_penalty=1.5),
        "beam5_lp-1": dict(base, do_sample=False, num_beams=5, max_new_tokens=10, length_penalty=-1.0),
        "beam5_lp2": dict(base, do_sample=False, num_beams=5, max_new_tokens=10, length_penalty=2.0),
        "beam5_lp2_early": dict(base, do_sample=False, num_beams=5, max_new_tokens=10, length_penalty=2.0,
                                early_stopping=True),
        "beam3_lp1_min4_rep": dict(base, do_sample=False, num_beams=3, max_new_tokens=9, length_penalty=1.0,
                                   min_new_tokens=4, repetition_penalty=1.3),
        "beam4_never": dict(base, do_sample=False, num_beams=4, max_new_tokens=8, length_penalty=0.5,
                            early_stopping="never"),
    }


def _visual_reference(model, prompt, up, down, n=64):
    """Upstream `generate_image`: re-runs the full sequence for every new embedding."""
    embeds = prompt
    out = []
    with torch.no_grad():
        for k in range(n):
            h = model.model(inputs_embeds=embeds).last_hidden_state[:, -1:]
            e = h @ down.T
            out.append(e)
            if k == n - 1:
                break
            embeds = torch.cat([embeds, e @ up.T], dim=1)
    return torch.cat(out, dim=1)


def _forward_cases(model, cases: dict, prefix: str) -> None:
    """Prefill + cached decode, and a left-padded batch, writing outputs as f32 under `prefix`."""
    dt = model.dtype
    f32 = lambda t: t.to(torch.float32)
    embeds = cases["prefill.embeds"].to(dt)
    o = model(inputs_embeds=embeds, use_cache=True)
    cases[prefix + "prefill.hidden"] = f32(model.model(inputs_embeds=embeds).last_hidden_state)
    cases[prefix + "prefill.logits"] = f32(o.logits)
    past = o.past_key_values
    steps = cases["decode.embeds"].to(dt)
    hs, ls = [], []
    for s in range(steps.shape[1]):
        o = model(inputs_embeds=steps[:, s:s + 1], past_key_values=past, use_cache=True,
                  output_hidden_states=True)
        past = o.past_key_values
        ls.append(o.logits)
        # hidden_states[-1] is after the final norm in transformers 5.
        hs.append(o.hidden_states[-1])
    cases[prefix + "decode.logits"] = f32(torch.cat(ls, 1))
    cases[prefix + "decode.hidden"] = f32(torch.cat(hs, 1))

    bemb = cases["batch.embeds"].to(dt)
    mask = cases["batch.mask"]
    o = model(inputs_embeds=bemb, attention_mask=mask, position_ids=_positions(mask), use_cache=True,
              output_hidden_states=True)
    cases[prefix + "batch.logits"] = f32(o.logits)
    cases[prefix + "batch.hidden"] = f32(o.hidden_states[-1])
    past = o.past_key_values
    steps = cases["batch.step_embeds"].to(dt)
    ls = []
    for s in range(steps.shape[1]):
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.long)], 1)
        o = model(inputs_embeds=steps[:, s:s + 1], attention_mask=mask, position_ids=_positions(mask)[:, -1:],
                  past_key_values=past, use_cache=True)
        past = o.past_key_values
        ls.append(o.logits)
    cases[prefix + "batch.step_logits"] = f32(torch.cat(ls, 1))


def _build_one(out: pathlib.Path, name: str, spec: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = _model(name, spec)
    model.save_pretrained(str(out), safe_serialization=True)
    # The generate() settings the tests use are in generation.json instead.
    (out / "generation_config.json").unlink(missing_ok=True)
    if name == "mha":
        # Also cover the transformers-4 layout of the RoPE fields (as in Emu2's config.json).
        cfg = json.loads((out / "config.json").read_text())
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        cfg["rope_scaling"] = None
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    H = model.config.hidden_size
    g = torch.Generator().manual_seed(spec["seed"] + 1000)
    emb = model.get_input_embeddings().weight.detach()
    cases = {}

    with torch.no_grad():
        # --- slot-filled prompt, prefill, cached decode ---
        ids = torch.randint(3, 380, (1, 21), generator=g)
        ids[0, 3:7] = IMAGE_ID
        ids[0, 9:11] = VIDEO_ID
        ids[0, 14:17] = IMAGE_ID
        ids[0, 2] = IMAGE_ID - 1  # a neighbour id that must not be treated as a slot
        n_img = int((ids == IMAGE_ID).sum())
        n_vid = int((ids == VIDEO_ID).sum())
        image = torch.randn(n_img, H, generator=g)
        video = torch.randn(n_vid, H, generator=g)
        embeds = emb[ids].clone()
        embeds[ids == IMAGE_ID] = image
        embeds[ids == VIDEO_ID] = video
        cases["slots.ids"] = ids
        cases["slots.image"] = image
        cases["slots.video"] = video
        cases["prefill.embeds"] = embeds
        cases["decode.embeds"] = torch.randn(1, 5, H, generator=g)
        lens = [9, 6, 3]
        T = max(lens)
        cases["batch.embeds"] = torch.randn(len(lens), T, H, generator=g)
        mask = torch.zeros(len(lens), T, dtype=torch.long)
        for b, n in enumerate(lens):
            mask[b, T - n:] = 1
        cases["batch.mask"] = mask
        cases["batch.step_embeds"] = torch.randn(len(lens), 4, H, generator=g)
        _forward_cases(model, cases, "")
        # bf16 references: the same weights and inputs rounded to bf16, run by torch in bf16.
        _forward_cases(copy.deepcopy(model).to(torch.bfloat16), cases, "bf16.")

        # --- generation ---
        prompts = [torch.randn(1, n, H, generator=g) for n in (5, 8, 3, 11, 6, 7)]
        for i, p in enumerate(prompts):
            cases[f"gen.embeds.{i}"] = p
        # Pick as EOS the token greedy decoding produces most often past the first step,
        # so that EOS is actually hit in a deterministic, model-dependent way.
        counts = torch.zeros(VOCAB, dtype=torch.long)
        for p in prompts:
            seq = model.generate(inputs_embeds=p, do_sample=False, max_new_tokens=12, eos_token_id=None,
                                 pad_token_id=0)
            counts += torch.bincount(seq[0, 1:], minlength=VOCAB)
        eos = int(counts.argmax())
        settings = _gen_settings(eos)
        for gname, kw in settings.items():
            for i, p in enumerate(prompts):
                cases[f"gen.{gname}.{i}"] = model.generate(inputs_embeds=p, **kw)
        pair = torch.randn(2, 6, H, generator=g)
        cases["gen2.embeds"] = pair
        for gname in ("greedy", "beam5_lp-1", "beam5_lp2"):
            cases[f"gen2.{gname}"] = model.generate(inputs_embeds=pair, **settings[gname])
        # Left padding: prompts of 9, 4 and 6 positions; padding rows hold noise that must not matter.
        lens = [9, 4, 6]
        padded = torch.randn(len(lens), max(lens), H, generator=g)
        pmask = torch.zeros(len(lens), max(lens), dtype=torch.long)
        for b, n in enumerate(lens):
            pmask[b, max(lens) - n:] = 1
        cases["gen3.embeds"] = padded
        cases["gen3.mask"] = pmask
        for gname in ("greedy", "beam5_lp-1", "beam5_lp2", "beam4_never"):
            cases[f"gen3.{gname}"] = model.generate(inputs_embeds=padded, attention_mask=pmask,
                                                    **settings[gname])

        # --- Emu2-Gen visual regression ---
        dv = 32
        # A strong project_up keeps the 64-step feedback loop well conditioned: with a weak one,
        # a random model makes the loop chaotic, and even torch's own cached and uncached runs
        # drift apart by 1e-3 from rounding alone. The outputs still depend strongly on the
        # prompt (the KV cache), which is what the test is about.
        up = torch.randn(H, dv, generator=g) * (8.0 / dv ** 0.5)
        down = torch.randn(dv, H, generator=g) / H ** 0.5
        vprompt = torch.randn(1, 7, H, generator=g)
        cases["visual.prompt"] = vprompt
        cases["visual.project_up"] = up
        cases["visual.project_down"] = down
        cases["visual.out"] = _visual_reference(model, vprompt, up, down)

    save_file({k: v.contiguous() for k, v in cases.items()}, str(out / "cases.safetensors"))
    (out / "generation.json").write_text(json.dumps({"eos_token_id": eos, "settings": settings}, indent=2) + "\n")


def build(out_dir: pathlib.Path) -> None:
    torch.set_grad_enabled(False)
    for name, spec in CONFIGS.items():
        _build_one(pathlib.Path(out_dir) / name, name, spec)
