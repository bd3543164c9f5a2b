"""PyTorch side of `cargo xtask bench --component llm` (see bench_common.py).

MODEL_DIR is transformers' LlamaForCausalLM layout (config.json +
model.safetensors). Calls, as xtask times them:

* `prefill`: the prompt embeddings `prompt` on a fresh cache; output: the
  last position's logits.
* `decode`: after that prefill, the tokens `decode_tokens` one at a time on
  transformers' KV cache (a fixed sequence, not the argmax, so every
  implementation computes the same steps), reading each step's logits back;
  output: the last step's logits. Prefill and decode are timed in the same
  loop, as on the Rust side.
* `regress`: Emu2-Gen's regression of `regress_n` visual embeddings after
  `regress_prompt`, with the bias-free `project_down` / `project_up`, on the
  KV cache (the same recurrence as upstream's `generate_image`, which re-runs
  the whole sequence per embedding); output: the embeddings.
"""

import time
import warnings

import torch
from transformers import LlamaForCausalLM
from transformers.utils import logging

from bench_common import finish, setup, timed

warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values renames
logging.set_verbosity_error()
logging.disable_progress_bar()

args, x, dtype = setup(__doc__)
m = LlamaForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
prompt = x["prompt"].to(dtype)
tokens = x["decode_tokens"].long()
up, down = x["project_up"].to(dtype), x["project_down"].to(dtype)
rprompt = x["regress_prompt"].to(dtype)
n_regress = int(x["regress_n"][0])

ms = {"prefill": [], "decode": []}
outs = {}
with torch.inference_mode():
    for i in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        o = m(inputs_embeds=prompt, use_cache=True, logits_to_keep=1)
        outs["prefill"] = o.logits[:, -1:].float()
        t1 = time.perf_counter()
        past = o.past_key_values
        for tok in tokens:
            o = m(input_ids=tok.view(1, 1), past_key_values=past, use_cache=True)
            past = o.past_key_values
            outs["decode"] = o.logits[:, -1:].float()
        t2 = time.perf_counter()
        if i >= args.warmup:
            ms["prefill"].append((t1 - t0) * 1e3)
            ms["decode"].append((t2 - t1) * 1e3)

    def regress():
        o = m.model(inputs_embeds=rprompt, use_cache=True)
        h, past, embs = o.last_hidden_state[:, -1:], o.past_key_values, []
        for k in range(n_regress):
            e = h @ down.T
            embs.append(e)
            if k + 1 < n_regress:
                o = m.model(inputs_embeds=e @ up.T, past_key_values=past, use_cache=True)
                h, past = o.last_hidden_state, o.past_key_values
        return torch.cat(embs, dim=1)

    ms["regress"], outs["regress"] = timed(regress, args.warmup, args.iters)
finish(args, ms, outs)
