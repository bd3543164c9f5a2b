"""End-to-end reference of the emu-cli pipelines on tiny checkpoints in the three real layouts.

Writes under out_dir (= tests/fixtures/pipeline/):

  chat/     BAAI/Emu2-Chat as on the Hub: config.json, fp32 PyTorch pickle shards
            `pytorch_model-0000{1,2}-of-00002.bin` + `pytorch_model.bin.index.json` (torch.save,
            keys `model.visual.*`, `model.decoder.lm.*`, `project_up/down.weight`), and the
            SentencePiece tokenizer as `LlamaTokenizer.save_pretrained` writes it
            (tokenizer.model, added_tokens.json, special_tokens_map.json, tokenizer_config.json;
            no tokenizer.json).
  gen/      BAAI/Emu2-Gen as on the Hub: model_index.json, multimodal_encoder/ (config.json,
            `model.bf16-0000{1,2}-of-00002.safetensors`, `model.safetensors.index.bf16.json`, and a
            `model.safetensors.index.json` naming fp32 shards that are not there, as upstream's),
            unet/ and vae/ (`diffusion_pytorch_model.bf16.safetensors`), scheduler/, tokenizer/
            (tokenizer.json from LlamaTokenizerFast, added_tokens.json, ...).
  native/   upstream's own single file `Emu2-Chat_pytorch_model.bf16.bin` (torch.save of the
            native `EmuModel` state dict in bf16: `visual.*`, `decoder.lm.model.*`,
            `decoder.lm.lm_head.weight`, `decoder.lm.project_up.weight`,
            `decoder.lm.project_down.weight`; Emu2/emu/emu.py + lm.py module tree), next to a
            config.json (the file itself has none) and the bare LLaMA `tokenizer.model` (upstream
            adds the Emu2 tokens at run time, lm.py).
  inputs/   picture.png (a 40x30 RGB picture; resized to the tiny 56x56 like any photo),
            gen_noise.safetensors (`noise` [1,4,8,8]: the unscaled initial latents).
  reference/<case>/<name>.safetensors   every stage tensor under the names `--dump` writes
            (emu-cli/src/pipeline/dump.rs), computed by the PyTorch reference pipeline below;
  reference/cases.json   prompts, decoding settings, generated ids (greedy and beam search).

The tiny tokenizer is a real SentencePiece BPE model (trained on a few sentences, with LLaMA's
normalizer, byte fallback and the 3 + 256 special/byte pieces) padded to LLaMA's 32000 pieces with
single CJK characters, so that the Emu2 special tokens land on their real ids (32000...). Reference
token ids come from transformers 4.31's slow `LlamaTokenizer` (`legacy: true`) with the Emu2 tokens
added exactly as Emu2/emu/lm.py does, which is what upstream runs; that part runs in the
transformers-4.31 venv (EMU_PROMPT_REF_PYTHON, default /work/venv-prompt/bin/python).

The reference pipeline is written from upstream (Emu2/emu/emu.py, chat.py, diffusion.py):
PIL bicubic resize + CLIP normalisation, the EVA ViT (fixtures_vision.eva_forward), CLS dropped and
avg-pooled to n_query, project_up into the `<image>` slots of the embedded prompt, transformers
`LlamaForCausalLM.generate(inputs_embeds=...)` (greedy, and beam search with upstream's defaults),
`generate_image` (the whole sequence re-run for each of the n_query regressed embeddings, hidden
state after the final norm through project_down), and the EmuVisualGeneration loop with diffusers'
UNet2DConditionModel, EulerDiscreteScheduler (classifier-free guidance, [cond; uncond] rows,
time ids original_size (1024, 1024) + crop (0, 0) + (height, width)) and AutoencoderKL, from the
given initial noise. Everything runs in float32 on the weights as stored (bf16 files are widened).
"""
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
REF_PYTHON = os.environ.get("EMU_PROMPT_REF_PYTHON", "/work/venv-prompt/bin/python")

# Emu2/emu/lm.py order; chat adds [USER] [ASSISTANT].
from fixtures_prompt import CHAT_SPECIAL, SPECIAL, SYSTEM  # noqa: E402

# Tiny dimensions (the real ones in brackets). An 8x8 patch grid pooled with stride 2 gives
# 16 visual tokens (as 32x32 -> 16x16 = 256 for Emu2-Chat); Emu2-Gen uses 16 too here.
VISION = {
    "drop_path_rate": 0,
    "eva_model_name": "eva-clip-tiny-pipeline-test",
    "head_width": 8,          # [112]
    "image_size": 56,         # [448]
    "intermediate_size": 32,  # [15360]
    "layer_norm_eps": 1e-06,
    "layers": 2,              # [64]
    "mlp_ratio": 2.0,
    "n_query": 16,            # [256 chat, 64 base/gen]
    "patch_size": 7,          # [14]
    "postnorm": True,
    "qkv_bias": True,
    "v_query": 4,             # [64]
    "width": 16,              # [1792]
    "xattn": False,
}
HIDDEN, HEADS, INTER, LAYERS, MAX_POS = 4, 2, 8, 2, 256
CHAT_VOCAB, BASE_VOCAB = 32274, 32272
GEN_SIZE = 16  # output pixels; the tiny VAE halves it: an 8x8 latent
GEN_STEPS, GEN_GUIDANCE = 4, 3.0
MAX_NEW = 12

# Prompts as upstream renders them (SPEC 3.5 native chat template; 4.1 Emu2-Gen).
IMG_SLOTS = "[IMG]" + "<image>" * VISION["n_query"] + "[/IMG]"
CHAT_QUESTION = "What is in this picture?"
CHAT_TEXT = SYSTEM + " [USER]: " + IMG_SLOTS + CHAT_QUESTION + " [ASSISTANT]:"
# Multi-turn with a video (two frames) and an image: the `</s>` turn separator of the native
# template is EOS for the slow tokenizer (SPEC 3.3), frames fill `[gIMG]` slots with v_query tokens.
FRAME_SLOTS = "[IMG]" + "[gIMG]" * VISION["v_query"] + "[/IMG]"
MULTI_Q1, MULTI_A1, MULTI_Q2 = "What happens in this video?", "A red box moves.", "And in this picture?"
CHAT_MULTI_TEXT = (SYSTEM + " [USER]: " + "[VIDEO]" + FRAME_SLOTS * 2 + MULTI_Q1 + " [ASSISTANT]: " + MULTI_A1
                   + "</s>[USER]: " + IMG_SLOTS + MULTI_Q2 + " [ASSISTANT]:")
GEN_TEXT_PROMPT = "a red cube on the grass"
GEN_TEXT = IMG_SLOTS + GEN_TEXT_PROMPT + "[IMG]"
GEN_NEG_TEXT = "[IMG]"

CORPUS = [
    SYSTEM,
    CHAT_QUESTION,
    GEN_TEXT_PROMPT,
    MULTI_Q1,
    MULTI_A1,
    MULTI_Q2,
    "Describe the image in details.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "An impressionist painting of an astronaut in a jungle, wearing a red hat on the beach.",
    "What color is the cube? It is red, and the grass is green.",
    "0123456789 numbers, commas; colons: and (brackets) [boxes] {braces} 'quotes' \"double\"!?",
    "a picture of a dog, a cat, and a bird sitting on a tree in the garden",
]


# ============================================================================ tokenizer (venv 4.31)

def _train_sentencepiece(out_path: pathlib.Path) -> None:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_writer=buf, model_type="bpe", vocab_size=420,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        hard_vocab_limit=False, minloglevel=2,
    )
    m = pb.ModelProto()
    m.ParseFromString(buf.getvalue())
    # The trainer records its own arguments; keep only what a tokenizer needs.
    m.trainer_spec.ClearField("input")
    # The trainer gives its first merge the score -0.0. HF's converter (and emu-prompt after it)
    # turns only non-zero scores into merges (`if piece_score:`), so shift every trained score
    # down by one, order unchanged, as in LLaMA's own file, where no merged piece scores 0.
    for p in m.pieces:
        if p.type == pb.ModelProto.SentencePiece.NORMAL:
            p.score -= 1.0
    have = {p.piece for p in m.pieces}
    # Pad to LLaMA's 32000 pieces with single CJK characters / Hangul syllables: single
    # characters make no merges, so the BPE over the trained pieces is unchanged.
    cp = 0x4E00
    while len(m.pieces) < 32000:
        ch = chr(cp)
        cp += 1
        if cp == 0xA000:
            cp = 0xAC00
        if ch in have:
            continue
        # Score and type left at their defaults (0, NORMAL) so that they take no bytes.
        m.pieces.add().piece = ch
    out_path.write_bytes(m.SerializeToString())


def _slow(model_dir: pathlib.Path, chat: bool):
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer(vocab_file=str(model_dir / "tokenizer.model"), legacy=True)
    tok.add_special_tokens(dict(
        pad_token="[PAD]", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=SPECIAL + (CHAT_SPECIAL if chat else []),
    ))
    return tok


def _tokenizer_main(out: pathlib.Path) -> None:
    """Runs under transformers 4.31: writes the tokenizer files of the three layouts and the
    reference ids of every prompt to out/tokenizer_ids.json."""
    import transformers
    from transformers import LlamaTokenizerFast

    assert transformers.__version__ == "4.31.0", transformers.__version__
    work = out / "_tok"
    work.mkdir(parents=True, exist_ok=True)
    _train_sentencepiece(work / "tokenizer.model")
    # native/: the bare LLaMA tokenizer.model, as in upstream's emu/conf/llama_config.
    (out / "native").mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "tokenizer.model", out / "native" / "tokenizer.model")
    chat = _slow(work, chat=True)
    assert len(chat) == CHAT_VOCAB, len(chat)
    chat.save_pretrained(str(out / "chat"))
    base = _slow(work, chat=False)
    assert len(base) == BASE_VOCAB, len(base)
    # Emu2-Gen's tokenizer/ is a LlamaTokenizerFast (model_index.json); ship its tokenizer.json.
    base.save_pretrained(str(work / "base"))
    fast = LlamaTokenizerFast.from_pretrained(str(work / "base"))
    assert len(fast) == BASE_VOCAB, len(fast)
    gen_tok = out / "gen" / "tokenizer"
    fast.save_pretrained(str(gen_tok))
    # tokenizer.json carries the vocabulary; drop the duplicate SentencePiece file to stay small.
    (gen_tok / "tokenizer.model").unlink(missing_ok=True)
    # Compact JSON (save_pretrained indents): the same document in about half the bytes.
    doc = json.loads((gen_tok / "tokenizer.json").read_text())
    (gen_tok / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False, separators=(",", ":")))
    ids = {
        "chat": chat(CHAT_TEXT).input_ids,
        "chat_multi": chat(CHAT_MULTI_TEXT).input_ids,
        "gen": base(GEN_TEXT).input_ids,
        "gen_negative": base(GEN_NEG_TEXT).input_ids,
        "gen_fast": fast(GEN_TEXT).input_ids,
    }
    assert ids["gen"] == ids["gen_fast"], "Emu2-Gen prompts tokenize alike in slow and fast"
    (out / "tokenizer_ids.json").write_text(json.dumps(ids))
    shutil.rmtree(work)


# ============================================================================ models (venv-ref)

def _emu_config(version: str, vocab: int, dtype: str) -> dict:
    return {
        "_name_or_path": "emu2-tiny",
        "architectures": ["EmuForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_emu.EmuConfig",
            "AutoModelForCausalLM": "modeling_emu.EmuForCausalLM",
        },
        "bos_token_id": 1,
        "d_model": VISION["width"],
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTER,
        "max_position_embeddings": MAX_POS,
        "model_version": version,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": HEADS,
        "pad_token_id": 32000,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "transformers_version": "4.31.0",
        "use_cache": True,
        "vision_config": VISION,
        "vocab_size": vocab,
    }


def _emu_weights(vocab: int, seed: int, dtype, smooth: float = 1.0):
    """Random Emu2 weights with HF key names (`model.visual.*`, `model.decoder.lm.*`,
    `project_up/down.weight`), rounded to `dtype` and returned as f32."""
    import torch

    sys.path.insert(0, str(HERE))
    import fixtures_vision

    vis, up = fixtures_vision.make_weights(VISION, HIDDEN, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)

    def rnd(*shape, scale):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    w = {f"model.visual.{k}": v for k, v in vis.items()}
    w["project_up.weight"] = up
    w["project_down.weight"] = rnd(VISION["width"], HIDDEN, scale=HIDDEN ** -0.5)
    lm = "model.decoder.lm."
    w[lm + "model.embed_tokens.weight"] = rnd(vocab, HIDDEN, scale=1.0)
    for i in range(LAYERS):
        p = f"{lm}model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            scale = HIDDEN ** -0.5 * (smooth if n in ("q_proj", "k_proj") else 1.0)
            w[p + f"self_attn.{n}.weight"] = rnd(HIDDEN, HIDDEN, scale=scale)
        w[p + "mlp.gate_proj.weight"] = rnd(INTER, HIDDEN, scale=HIDDEN ** -0.5)
        w[p + "mlp.up_proj.weight"] = rnd(INTER, HIDDEN, scale=HIDDEN ** -0.5)
        w[p + "mlp.down_proj.weight"] = rnd(HIDDEN, INTER, scale=INTER ** -0.5)
        w[p + "input_layernorm.weight"] = 1 + rnd(HIDDEN, scale=0.2)
        w[p + "post_attention_layernorm.weight"] = 1 + rnd(HIDDEN, scale=0.2)
    w[lm + "model.norm.weight"] = 1 + rnd(HIDDEN, scale=0.2)
    # Peaked logits (clear greedy/beam decisions); end-of-sequence made likely enough that
    # beams finish before max_new_tokens.
    head = rnd(vocab, HIDDEN, scale=4.0 * HIDDEN ** -0.5)
    head[2] *= 2.4
    w[lm + "lm_head.weight"] = head
    return {k: v.to(dtype).to(torch.float32).contiguous() for k, v in w.items()}


def _native_keys(w: dict) -> dict:
    """HF EmuForCausalLM keys -> native EmuModel keys (emu.py: `visual`, `decoder.lm` with the
    projections on the LM module, lm.py)."""
    out = {}
    for k, v in w.items():
        if k.startswith("model."):
            out[k[len("model."):]] = v
        elif k in ("project_up.weight", "project_down.weight"):
            out["decoder.lm." + k] = v
        else:
            raise KeyError(k)
    return out


def _write_chat(out: pathlib.Path, w: dict) -> None:
    import torch

    d = out / "chat"
    (d / "config.json").write_text(json.dumps(_emu_config("chat", CHAT_VOCAB, "float32"), indent=2) + "\n")
    (d / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32000,
         "transformers_version": "4.31.0"}, indent=2) + "\n")
    first = [k for k in w if k.startswith("model.visual.") or k.startswith("project_")
             or "embed_tokens" in k or ".layers.0." in k]
    shards = {"pytorch_model-00001-of-00002.bin": first,
              "pytorch_model-00002-of-00002.bin": [k for k in w if k not in first]}
    weight_map, total = {}, 0
    for name, keys in shards.items():
        torch.save({k: w[k].clone() for k in keys}, d / name)
        for k in keys:
            weight_map[k] = name
            total += w[k].numel() * 4
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")


def _write_native(out: pathlib.Path, w: dict) -> None:
    import torch

    d = out / "native"
    nat = _native_keys(w)
    torch.save({k: v.to(torch.bfloat16).clone() for k, v in nat.items()}, d / "Emu2-Chat_pytorch_model.bf16.bin")
    (d / "config.json").write_text(json.dumps(_emu_config("chat", CHAT_VOCAB, "bfloat16"), indent=2) + "\n")


def _unet_vae(seed: int):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    sys.path.insert(0, str(HERE))
    import fixtures_decoder

    c = VISION["width"]
    unet = UNet2DConditionModel(
        sample_size=GEN_SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=(8, 16), layers_per_block=1,
        transformer_layers_per_block=(1, 1), attention_head_dim=(2, 4), num_attention_heads=None,
        cross_attention_dim=c, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=c + 6 * 4,
        addition_embed_type_num_heads=64, norm_num_groups=4, norm_eps=1e-5, flip_sin_to_cos=True,
        freq_shift=0, act_fn="silu", downsample_padding=1,
    ).eval()
    fixtures_decoder.randomize(unet, seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=GEN_SIZE,
        scaling_factor=0.13025, force_upcast=True,
    ).eval()
    fixtures_decoder.randomize(vae, seed + 1)
    # Round to bf16 (what the files hold) and compute in f32 from there.
    unet = unet.to(torch.bfloat16).to(torch.float32)
    vae = vae.to(torch.bfloat16).to(torch.float32)
    return unet, vae


def _write_gen(out: pathlib.Path, w: dict, unet, vae) -> None:
    import copy

    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(HERE))
    import fixtures_decoder

    d = out / "gen"
    (d / "model_index.json").write_text(json.dumps({
        "_class_name": "EmuVisualGenerationPipeline",
        "_diffusers_version": "0.21.2",
        "multimodal_encoder": ["transformers_modules.modeling_emu", "EmuForCausalLM"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "tokenizer": ["transformers", "LlamaTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2) + "\n")
    enc = d / "multimodal_encoder"
    enc.mkdir(parents=True, exist_ok=True)
    (enc / "config.json").write_text(json.dumps(_emu_config("base", BASE_VOCAB, "bfloat16"), indent=2) + "\n")
    first = [k for k in w if k.startswith("model.visual.") or k.startswith("project_") or "embed_tokens" in k]
    rest = [k for k in w if k not in first]
    weight_map, weight_map_fp32, total = {}, {}, 0
    for i, keys in enumerate((first, rest), 1):
        name = f"model.bf16-{i:05d}-of-00002.safetensors"
        save_file({k: w[k].to(torch.bfloat16).contiguous() for k in keys}, str(enc / name),
                  metadata={"format": "pt"})
        for k in keys:
            weight_map[k] = name
            weight_map_fp32[k] = f"model-{i:05d}-of-00002.safetensors"
            total += w[k].numel() * 2
    (enc / "model.safetensors.index.bf16.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    # Upstream ships this index too, although its fp32 shards are not in the repo.
    (enc / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * 2}, "weight_map": dict(sorted(weight_map_fp32.items()))}, indent=2) + "\n")
    copy.deepcopy(unet).to(torch.bfloat16).save_pretrained(d / "unet", safe_serialization=True, variant="bf16")
    copy.deepcopy(vae).to(torch.bfloat16).save_pretrained(d / "vae", safe_serialization=True, variant="bf16")
    (d / "scheduler").mkdir(parents=True, exist_ok=True)
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(fixtures_decoder.EMU_SCHEDULER, indent=2) + "\n")


# ============================================================================ reference pipeline

class Emu2Ref:
    """Upstream EmuModel (emu.py) over HF-named weights, in float32."""

    def __init__(self, w: dict, vocab: int, dtype=None):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        self.dtype = dtype or torch.float32
        w = {k: v.to(self.dtype) for k, v in w.items()}

        self.vis = {k[len("model.visual."):]: v for k, v in w.items() if k.startswith("model.visual.")}
        self.up = w["project_up.weight"]
        self.down = w["project_down.weight"]
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=HEADS, hidden_act="silu",
            max_position_embeddings=MAX_POS, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            bos_token_id=1, eos_token_id=2, pad_token_id=32000, attention_bias=False,
        )
        self.lm = LlamaForCausalLM(cfg).eval()
        sd = {k[len("model.decoder.lm."):]: v for k, v in w.items() if k.startswith("model.decoder.lm.")}
        missing, unexpected = self.lm.load_state_dict(sd, strict=False)
        assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
        self.lm.to(self.dtype)
        self.torch = torch

    def preprocess(self, path: pathlib.Path):
        import torchvision.transforms as T
        from PIL import Image

        sys.path.insert(0, str(HERE))
        import fixtures_vision

        s = VISION["image_size"]
        im = Image.open(path).convert("RGB")
        t = T.Compose([
            T.Resize((s, s), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(fixtures_vision.CLIP_MEAN, fixtures_vision.CLIP_STD),
        ])
        # chat.py / diffusion.py: `image_prompt.type(dtype)`.
        return t(im).unsqueeze(0).to(self.dtype)

    def encode_image(self, pixels, n_query, stages, frames=False):
        sys.path.insert(0, str(HERE))
        import fixtures_vision

        feats = fixtures_vision.eva_forward(self.vis, VISION, pixels)
        pooled = fixtures_vision.pool(feats, n_query)
        projected = pooled.reshape(-1, pooled.shape[-1]) @ self.up.T
        names = (["frame_values", "frame_features", "frame_pooled_tokens", "frame_projected_tokens"] if frames
                 else ["pixel_values", "vision_features", "pooled_tokens", "projected_tokens"])
        stages.update(zip(names, (pixels, feats, pooled, projected)))
        return projected

    def embeds(self, ids, projected, stages, frames=None):
        torch = self.torch
        ids_t = torch.tensor([ids])
        e = self.lm.model.embed_tokens(ids_t).detach().clone()
        if projected is not None:
            e[ids_t == 32003] = projected
        if frames is not None:
            e[ids_t == 32004] = frames
        stages.update(input_ids=torch.tensor(ids, dtype=torch.int64), input_embeds=e)
        return e

    def prefill(self, e, stages):
        h = self.lm.model(inputs_embeds=e).last_hidden_state
        stages["prefill_hidden"] = h
        stages["prefill_logits"] = self.lm.lm_head(h[:, -1:])

    def generate(self, e, **kw):
        torch = self.torch
        out = self.lm.generate(
            inputs_embeds=e, attention_mask=torch.ones(e.shape[:2], dtype=torch.long),
            bos_token_id=1, eos_token_id=2, pad_token_id=32000, do_sample=False,
            max_new_tokens=MAX_NEW, min_length=1, repetition_penalty=1.0, **kw,
        )[0].tolist()
        return out[: out.index(2)] if 2 in out else out

    def generate_image(self, e, n_query):
        """emu.py generate_image: for every new embedding, the whole sequence is run again; the
        hidden state (after the final norm) at the last position goes through project_down,
        and project_up of it is the next input."""
        torch = self.torch
        out = []
        for k in range(n_query):
            h = self.lm.model(inputs_embeds=e, output_hidden_states=True).hidden_states[-1][:, -1:]
            x = h @ self.down.T
            out.append(x)
            if k + 1 < n_query:
                e = torch.cat([e, x @ self.up.T], dim=1)
        return torch.cat(out, dim=1)


def _save_stages(d: pathlib.Path, stages: dict) -> None:
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    for name, t in stages.items():
        t = t.detach().contiguous()
        if t.is_floating_point():
            t = t.to(torch.float32)
        save_file({name: t}, str(d / f"{name}.safetensors"))


def _chat_case(ref: Emu2Ref, ids, picture, out_dir: pathlib.Path, frames=()) -> dict:
    import torch

    with torch.no_grad():
        stages = {}
        proj = ref.encode_image(ref.preprocess(picture), VISION["n_query"], stages)
        fproj = None
        if frames:
            fpix = torch.cat([ref.preprocess(f) for f in frames])
            fproj = ref.encode_image(fpix, VISION["v_query"], stages, frames=True)
        e = ref.embeds(ids, proj, stages, frames=fproj)
        ref.prefill(e, stages)
        greedy = ref.generate(e, num_beams=1)
        beam = ref.generate(e, num_beams=5, length_penalty=-1.0, early_stopping=False)
        beam_lp2 = ref.generate(e, num_beams=3, length_penalty=2.0)
    _save_stages(out_dir, stages)
    return {"greedy": greedy, "beam5_lp-1": beam, "beam3_lp2": beam_lp2}


def _gen_case(ref: Emu2Ref, ids, neg_ids, picture, noise, unet, vae, out_dir: pathlib.Path, dtype=None) -> None:
    import torch
    from diffusers import EulerDiscreteScheduler

    sys.path.insert(0, str(HERE))
    import fixtures_decoder

    nq = VISION["n_query"]
    with torch.no_grad():
        stages = {}
        proj = ref.encode_image(ref.preprocess(picture), nq, stages)
        cond = ref.generate_image(ref.embeds(ids, proj, stages), nq)
        neg = {}
        uncond = ref.generate_image(ref.embeds(neg_ids, None, neg), nq)
        stages.update({f"negative_{k}": v for k, v in neg.items()})
        stages["condition"] = cond
        stages["negative_condition"] = uncond
        # diffusion.py EmuVisualGeneration.forward
        sched = EulerDiscreteScheduler.from_config(fixtures_decoder.EMU_SCHEDULER)
        sched.set_timesteps(GEN_STEPS)
        prompt_embeds = torch.cat([cond, uncond])
        time_ids = torch.LongTensor([1024, 1024] + [0, 0] + [GEN_SIZE, GEN_SIZE])
        added = {"time_ids": torch.cat([time_ids, time_ids], dim=0), "text_embeds": prompt_embeds.mean(dim=1)}
        # diffusion.py draws the noise in the model dtype.
        latents = noise.to(ref.dtype) * sched.init_noise_sigma
        stages["initial_latents"] = latents
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([latents] * 2), t)
            eps = unet(inp, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added).sample
            c, u = eps.chunk(2)
            latents = sched.step(u + GEN_GUIDANCE * (c - u), t, latents).prev_sample
        stages["final_latents"] = latents
        img = vae.decode(latents / vae.config.scaling_factor).sample
        img = (img / 2 + 0.5).clamp(0, 1)
        stages["image"] = (img[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
    _save_stages(out_dir, stages)


def _picture(path: pathlib.Path, h=30, w=40, box=(8, 20, 12, 28)) -> None:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 6) % 256, (y * 8) % 256, ((x * y) * 3) % 256], axis=-1).astype(np.uint8)
    rgb[box[0]:box[1], box[2]:box[3]] = [200, 30, 40]
    Image.fromarray(rgb).save(path)


def build(out_dir: pathlib.Path) -> None:
    import torch
    from safetensors.torch import save_file

    out_dir = pathlib.Path(out_dir)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for sub in ("chat", "gen", "native", "inputs", "reference"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    # sentencepiece 0.1.99's generated protobuf module needs the pure-Python protobuf runtime.
    env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python")
    subprocess.run([REF_PYTHON, str(pathlib.Path(__file__).resolve()), "--tokenizer", str(out_dir)], check=True, env=env)
    ids = json.loads((out_dir / "tokenizer_ids.json").read_text())
    (out_dir / "tokenizer_ids.json").unlink()

    inputs = out_dir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    picture = inputs / "picture.png"
    _picture(picture)
    # A second picture (portrait) and a video frame with the box moved.
    picture2 = inputs / "picture2.png"
    _picture(picture2, h=44, w=24, box=(10, 30, 4, 16))
    frame2 = inputs / "frame2.png"
    _picture(frame2, box=(12, 24, 18, 34))
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 4, GEN_SIZE // 2, GEN_SIZE // 2, generator=g)
    save_file({"noise": noise}, str(inputs / "gen_noise.safetensors"))

    chat_w = _emu_weights(CHAT_VOCAB, seed=100, dtype=torch.float32)
    native_w = _emu_weights(CHAT_VOCAB, seed=200, dtype=torch.bfloat16)
    # Softer attention logits in the Emu2-Gen LLM: the regression feeds every output back as the
    # next input, and with full-scale random weights this 4-wide model amplifies any rounding
    # difference ~50-fold (chaotic), which would leave a bf16 comparison nothing to hold on to.
    gen_w = _emu_weights(BASE_VOCAB, seed=300, dtype=torch.bfloat16, smooth=0.3)
    _write_chat(out_dir, chat_w)
    _write_native(out_dir, native_w)
    unet, vae = _unet_vae(seed=400)
    _write_gen(out_dir, gen_w, unet, vae)

    ref_dir = out_dir / "reference"
    cases = {
        "about": "Reference outputs of tools/reference/fixtures_pipeline.py; stage tensors in <case>/",
        "chat": {"rendered": CHAT_TEXT, "max_new_tokens": MAX_NEW},
        "chat_multi_rendered": CHAT_MULTI_TEXT,
        "gen": {"rendered": GEN_TEXT, "negative_rendered": GEN_NEG_TEXT, "steps": GEN_STEPS,
                "guidance": GEN_GUIDANCE, "size": GEN_SIZE},
    }
    for name, w in (("chat", chat_w), ("native", native_w)):
        ref = Emu2Ref(w, CHAT_VOCAB)
        cases[name] = dict(cases.get(name, {}), **_chat_case(ref, ids["chat"], picture, ref_dir / name))
        print(f"  {name}: {cases[name]}")
        multi = f"{name}_multi"
        cases[multi] = _chat_case(ref, ids["chat_multi"], picture2, ref_dir / multi, frames=(picture, frame2))
        print(f"  {multi}: {cases[multi]}")
    ref = Emu2Ref(gen_w, BASE_VOCAB)
    _gen_case(ref, ids["gen"], ids["gen_negative"], picture, noise, unet, vae, ref_dir / "gen")
    # The same in bfloat16 end to end, as upstream runs Emu2-Gen (weights, pixels, latents in bf16).
    ref16 = Emu2Ref(gen_w, BASE_VOCAB, dtype=torch.bfloat16)
    _gen_case(ref16, ids["gen"], ids["gen_negative"], picture, noise, unet.to(torch.bfloat16), vae.to(torch.bfloat16),
              ref_dir / "gen_bf16")
    (ref_dir / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    total = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    print(f"  pipeline fixtures: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--tokenizer":
        _tokenizer_main(pathlib.Path(sys.argv[2]))
    else:
        sys.exit("usage: make_fixtures.py pipeline")
