"""llama.cpp side of `cargo xtask bench --llamacpp PYTHON` (the LLM rows).

    bench_llamacpp.py GGUF IO_DIR --label FORMAT --kv f32|f16 [--threads N] --warmup N --iters N
                      [--no-extra-bufts] [--flash-attn auto|on|off]

GGUF is the bench's random LLaMA, written by xtask in llama.cpp's layout
(architecture `llama`, a dummy vocabulary of the model's size, q/k rows
permuted to llama.cpp's rope order) with the linears in FORMAT;
IO_DIR/inputs.safetensors holds the same inputs the Rust and PyTorch sides
get. Timed like xtask's `llm` calls, through llama-cpp-python's low-level
API (the C API one to one, so Python adds only a call per step):

* `prefill`: the prompt embeddings `prompt` as one batch on a cleared KV
  cache, logits of the last position only; output: those logits.
* `decode`: after that prefill, the tokens `decode_tokens` one at a time,
  reading each step's logits back (a generation loop would sample from
  them); output: the last step's logits.

Writes IO_DIR/llamacpp_FORMAT.json: {"llama_cpp": version, "threads": n,
"ms": {call: [..]}, "out": {call: [floats]}}. Needs only llama-cpp-python
(and numpy, which it depends on): see tools/reference/requirements-llamacpp.txt.
"""

import argparse
import ctypes
import json
import os
import pathlib
import struct
import time

import llama_cpp as L
import numpy as np


def read_safetensors(path: pathlib.Path) -> dict:
    """The f32 tensors of a safetensors file (xtask writes only f32)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise SystemExit(f"{path}: {name} is {info['dtype']}, expected F32")
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[base + a : base + b], dtype="<f4").reshape(info["shape"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", type=pathlib.Path)
    ap.add_argument("io", type=pathlib.Path)
    ap.add_argument("--label", required=True)
    ap.add_argument("--kv", choices=["f32", "f16"], default="f16")
    ap.add_argument("--threads", type=int, default=0)
    # Off: ggml's plain kernels only, no repacked (AMX, interleaved AVX) weight copies.
    ap.add_argument("--no-extra-bufts", action="store_true")
    ap.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()

    x = read_safetensors(args.io / "inputs.safetensors")
    prompt = np.ascontiguousarray(x["prompt"][0], dtype=np.float32)  # [P, H]
    tokens = [int(t) for t in x["decode_tokens"]]
    n_prompt, n_embd = prompt.shape

    # Model loading prints every tensor; the bench's table is what matters.
    silence = L.llama_log_callback(lambda level, text, data: None)
    L.llama_log_set(silence, ctypes.c_void_p(0))
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    if args.no_extra_bufts:
        mp.use_extra_bufts = False
    model = L.llama_model_load_from_file(str(args.gguf).encode(), mp)
    if not model:
        raise SystemExit(f"llama.cpp could not load {args.gguf}")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    threads = args.threads if args.threads > 0 else (os.cpu_count() or 1)
    cp = L.llama_context_default_params()
    cp.n_ctx = n_prompt + len(tokens) + 1
    cp.n_batch = n_prompt
    cp.n_ubatch = n_prompt
    cp.n_seq_max = 1
    cp.n_threads = threads
    cp.n_threads_batch = threads
    kv_type = L.GGML_TYPE_F32 if args.kv == "f32" else L.GGML_TYPE_F16
    cp.type_k = kv_type
    cp.type_v = kv_type
    cp.flash_attn_type = {
        "auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO,
        "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
        "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    }[args.flash_attn]
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("llama.cpp could not create a context")
    mem = L.llama_get_memory(ctx)

    emb_batch = L.llama_batch_init(n_prompt, n_embd, 1)
    ctypes.memmove(emb_batch.embd, prompt.ctypes.data, prompt.nbytes)
    for i in range(n_prompt):
        emb_batch.pos[i] = i
        emb_batch.n_seq_id[i] = 1
        emb_batch.seq_id[i][0] = 0
        emb_batch.logits[i] = 1 if i == n_prompt - 1 else 0
    emb_batch.n_tokens = n_prompt
    tok_batch = L.llama_batch_init(1, 0, 1)
    tok_batch.n_tokens = 1
    tok_batch.n_seq_id[0] = 1
    tok_batch.seq_id[0][0] = 0
    tok_batch.logits[0] = 1

    def logits() -> np.ndarray:
        p = L.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(p, shape=(n_vocab,)).copy()

    def decode(batch) -> None:
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise SystemExit(f"llama_decode failed ({rc})")

    ms = {"prefill": [], "decode": []}
    out = {}
    for i in range(args.warmup + args.iters):
        L.llama_memory_clear(mem, True)
        t0 = time.perf_counter()
        decode(emb_batch)
        out["prefill"] = logits()
        t1 = time.perf_counter()
        for k, tok in enumerate(tokens):
            tok_batch.token[0] = tok
            tok_batch.pos[0] = n_prompt + k
            decode(tok_batch)
            out["decode"] = logits()
        t2 = time.perf_counter()
        if i >= args.warmup:
            ms["prefill"].append((t1 - t0) * 1e3)
            ms["decode"].append((t2 - t1) * 1e3)

    L.llama_batch_free(emb_batch)
    L.llama_batch_free(tok_batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    (args.io / f"llamacpp_{args.label}.json").write_text(
        json.dumps(
            {
                "llama_cpp": L.__version__,
                "threads": threads,
                "ms": ms,
                "out": {k: v.tolist() for k, v in out.items()},
            }
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
