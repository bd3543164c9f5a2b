"""Fixtures of the checkpoint loader (emu_core::checkpoint).

Writes, under `out_dir` (tests/fixtures/loader/):
  safetensors_sharded/  model-0000{1,2}-of-00002.safetensors + model.safetensors.index.json
                        (f32, f16, bf16, i64; HF layout with a `model.` prefix)
  pickle_sharded/       pytorch_model-0000{1,2}-of-00002.bin + pytorch_model.bin.index.json,
                        written by torch.save: non-contiguous views saved as-is (a transpose,
                        a narrowed view sharing storage with another tensor, a strided column),
                        f32/f16/bf16/f64/i64/i32/u8/bool, a 0-d tensor, an nn.Parameter, a real
                        module state_dict() (OrderedDict with `_metadata`) and a uint32 tensor
                        (which torch writes as an UntypedStorage + dtype, `_rebuild_tensor_v3`);
                        shard 1 uses pickle protocol 2 (torch's default), shard 2 protocol 5
  diffusers_variant/    diffusion_pytorch_model.bf16.safetensors only
  hf_variant/           model.safetensors (f32) next to a bf16 variant sharded as
                        model.bf16-0000{1,2}-of-00002.safetensors + model.safetensors.index.bf16.json
  expected.safetensors  the true values of every tensor above, contiguous, as f32 (floats) or
                        i64 (integers), under `<folder>/<key>` (`hf_variant.bf16/<key>` for the
                        variant), so that Rust compares bit for bit.
"""
import json
import pathlib
from collections import OrderedDict

import torch
from safetensors.torch import save_file


def _expected_value(t: torch.Tensor) -> torch.Tensor:
    # A fresh contiguous copy: views must not share storage in the output file.
    if t.dtype.is_floating_point:
        return t.to(torch.float32, copy=True).contiguous()
    return t.to(torch.int64, copy=True).contiguous()


def _save_sharded_safetensors(folder: pathlib.Path, shards: list, name_fmt: str, index_name: str):
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = name_fmt.format(i=i + 1, n=len(shards))
        save_file({k: v.contiguous() for k, v in shard.items()}, str(folder / fname), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / index_name).write_text(json.dumps(index, indent=2) + "\n")


def build(out_dir: pathlib.Path) -> None:
    out_dir = pathlib.Path(out_dir)
    g = torch.Generator().manual_seed(1234)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    expected = {}

    # (a) sharded safetensors, HF layout.
    sd = {
        "model.embed_tokens.weight": randn(6, 4),
        "model.layers.0.weight": randn(4, 3),
        "model.layers.0.bias": randn(4, dtype=torch.float16),
        "model.layers.1.weight": randn(3, 4, dtype=torch.bfloat16),
        "model.layers.1.bias": randn(3, dtype=torch.bfloat16),
        "model.norm.weight": randn(4),
        "model.position_ids": torch.arange(5, dtype=torch.int64).reshape(1, 5) * 7 - 3,
    }
    folder = out_dir / "safetensors_sharded"
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    shards = [{k: sd[k] for k in keys[:4]}, {k: sd[k] for k in keys[4:]}]
    _save_sharded_safetensors(folder, shards, "model-{i:05d}-of-{n:05d}.safetensors", "model.safetensors.index.json")
    for k, v in sd.items():
        expected[f"safetensors_sharded/{k}"] = _expected_value(v)

    # (b) sharded PyTorch pickle, native layout (no prefix), views saved as-is.
    base = randn(3, 5)
    full = randn(4, 3)
    grid = randn(4, 3)
    half_base = randn(2, 3, dtype=torch.float16)
    bf_base = randn(2, 3, dtype=torch.bfloat16)
    shard1 = {
        "transposed": base.t(),  # [5, 3], strides (1, 5)
        "full": full,
        "narrowed": full[1:],  # shares `full`'s storage, offset 3
        "column": grid[:, 1],  # [4], stride 3, offset 1
        "half": half_base,
        "param": torch.nn.Parameter(randn(3)),  # pickled through _rebuild_parameter
    }
    # The second shard is a real module state_dict(): an OrderedDict carrying
    # `_metadata`, which pickle restores with BUILD after the items.
    block = torch.nn.Linear(2, 2)
    with torch.no_grad():
        block.weight.copy_(randn(2, 2))
        block.bias.copy_(randn(2))
    shard2 = torch.nn.Sequential(OrderedDict(block=block)).state_dict()
    assert hasattr(shard2, "_metadata")
    shard2.update(
        {
            "bf16_t": bf_base.t(),  # bf16 [3, 2], strides (1, 3)
            "ids": torch.tensor([3, -1, 1 << 40, 0], dtype=torch.int64),
            "i32": torch.tensor([[-5, 6]], dtype=torch.int32),
            "scalar": torch.tensor(2.5),
            "double": torch.randn(3, generator=g, dtype=torch.float64),
            "mask": torch.tensor([True, False, True]),
            "bytes": torch.tensor([0, 200, 255], dtype=torch.uint8),
            "u32": torch.tensor([1, 7, 4000000000], dtype=torch.uint32),
        }
    )
    assert not shard1["transposed"].is_contiguous() and shard1["narrowed"].storage_offset() == 3
    assert shard1["column"].stride() == (3,) and not shard2["bf16_t"].is_contiguous()
    folder = out_dir / "pickle_sharded"
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate([shard1, shard2]):
        fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        # torch.save's default pickle protocol (2) for the first shard, the newest
        # (5: FRAME, STACK_GLOBAL, MEMOIZE, SHORT_BINUNICODE) for the second.
        torch.save(shard, folder / fname, pickle_protocol=2 if i == 0 else 5)
        for k in shard:
            weight_map[k] = fname
    index = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for k, v in {**shard1, **shard2}.items():
        expected[f"pickle_sharded/{k}"] = _expected_value(v.detach())

    # (c) a diffusers bf16 variant folder (the variant is the only option).
    unet = {
        "conv_in.weight": randn(4, 2, 3, 3, dtype=torch.bfloat16),
        "conv_in.bias": randn(4, dtype=torch.bfloat16),
        "time_embedding.linear_1.weight": randn(8, 4, dtype=torch.bfloat16),
    }
    folder = out_dir / "diffusers_variant"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(unet, str(folder / "diffusion_pytorch_model.bf16.safetensors"))
    for k, v in unet.items():
        expected[f"diffusers_variant/{k}"] = _expected_value(v)

    # ... and an HF folder with a plain f32 file next to a sharded bf16 variant.
    hf = {
        "model.decoder.lm.model.embed_tokens.weight": randn(5, 4),
        "model.decoder.lm.lm_head.weight": randn(5, 4),
        "model.project_up.weight": randn(4, 3),
    }
    folder = out_dir / "hf_variant"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(hf, str(folder / "model.safetensors"))
    hf16 = {k: v.to(torch.bfloat16) for k, v in hf.items()}
    keys = sorted(hf16)
    _save_sharded_safetensors(
        folder,
        [{k: hf16[k] for k in keys[:2]}, {k: hf16[k] for k in keys[2:]}],
        "model.bf16-{i:05d}-of-{n:05d}.safetensors",
        "model.safetensors.index.bf16.json",
    )
    for k in hf:
        expected[f"hf_variant/{k}"] = _expected_value(hf[k])
        expected[f"hf_variant.bf16/{k}"] = _expected_value(hf16[k])

    save_file(expected, str(out_dir / "expected.safetensors"))
