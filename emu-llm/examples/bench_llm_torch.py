"""PyTorch side of `bench_llm` (emu-llm/examples/bench_llm.rs), on the same weights.

usage: python bench_llm_torch.py DIR PROMPT NEW REGRESS THREADS DTYPE

DIR holds what bench_llm saved: config.json + model.safetensors (transformers'
LlamaForCausalLM layout), visual.safetensors (project_up / project_down, bias-free
nn.Linear weights) and regress_io.safetensors (the regression prompt Rust used and
Rust's regressed embeddings). Prints one JSON line with the timings.
"""

import json
import sys
import time
import warnings

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM
from transformers.utils import logging

warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values renames
logging.set_verbosity_error()
logging.disable_progress_bar()

d, prompt, new, n_regress, threads, dtype = sys.argv[1:7]
prompt, new, n_regress, threads = int(prompt), int(new), int(n_regress), int(threads)
dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
torch.set_num_threads(threads)
torch.manual_seed(0)

m = LlamaForCausalLM.from_pretrained(d, dtype=dtype).eval()
vis = load_file(f"{d}/visual.safetensors")
up, down = vis["project_up.weight"].to(dtype), vis["project_down.weight"].to(dtype)
io = load_file(f"{d}/regress_io.safetensors")
res = {"threads": torch.get_num_threads(), "torch": torch.__version__}

with torch.no_grad():
    x = torch.randn(1, prompt, m.config.hidden_size, dtype=dtype)
    m(inputs_embeds=x, use_cache=True, logits_to_keep=1)  # warm-up, as Rust's load touches the weights
    t = time.perf_counter()
    o = m(inputs_embeds=x, use_cache=True, logits_to_keep=1)
    res["prefill_s"] = time.perf_counter() - t
    past = o.past_key_values
    tok = o.logits[:, -1].argmax(-1, keepdim=True)
    t = time.perf_counter()
    for _ in range(new):
        o = m(input_ids=tok, past_key_values=past, use_cache=True)
        past = o.past_key_values
        tok = o.logits[:, -1].argmax(-1, keepdim=True)
    res["decode_s"] = time.perf_counter() - t

    # Emu2-Gen's generate_image: the whole sequence re-run for every embedding, no cache.
    e0 = io["prompt"].to(dtype)
    t = time.perf_counter()
    x, outs = e0, []
    for k in range(n_regress):
        h = m.model(inputs_embeds=x).last_hidden_state[:, -1:]
        e = h @ down.T
        outs.append(e)
        if k + 1 < n_regress:
            x = torch.cat([x, e @ up.T], dim=1)
    res["regress_upstream_s"] = time.perf_counter() - t
    ref = torch.cat(outs, dim=1).float()

    # The same recurrence on transformers' own KV cache, for comparison.
    t = time.perf_counter()
    o = m.model(inputs_embeds=e0, use_cache=True)
    h, past, outs = o.last_hidden_state[:, -1:], o.past_key_values, []
    for k in range(n_regress):
        e = h @ down.T
        outs.append(e)
        if k + 1 < n_regress:
            o = m.model(inputs_embeds=e @ up.T, past_key_values=past, use_cache=True)
            h, past = o.last_hidden_state, o.past_key_values
    res["regress_cached_s"] = time.perf_counter() - t
    cached = torch.cat(outs, dim=1).float()

    # Relative error of each regressed embedding against upstream's. A random
    # model's recurrence is chaotic: rounding differences (summation order)
    # grow a few-fold per step, so late embeddings of any two implementations
    # part ways; the per-step errors show where.
    def rel(a, b):
        return [((a[:, k] - b[:, k]).abs().max() / b[:, k].abs().max().clamp_min(1e-30)).item() for k in range(b.shape[1])]

    res["rust_vs_upstream_rel"] = rel(io["rust_out"].float(), ref)
    res["torch_cached_vs_upstream_rel"] = rel(cached, ref)

print(json.dumps(res))
