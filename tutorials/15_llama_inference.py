"""Lesson 15: Llama inference under tensor parallelism: greedy generation with a KV cache.

The same ``Parallel`` serves inference. Under tp=2 each rank holds half the attention
heads (and so half of every layer's key/value cache) and half of each MLP; one all-reduce
after each row-parallel linear puts the hidden state back together. Generation is the
usual loop: run the prompt once (the *prefill*, filling the cache), then one token at a
time (each *decode* step reads the cache and appends one position to it), always taking
the most likely next token. Hugging Face's own ``DynamicCache`` holds the keys and values;
the model code is transformers', unchanged.

You will see: (a) the tokens generated on one device and on tp=2: the same; (b) what a
rank's cache holds (its 1 of 2 key/value heads); (c) the collectives of each forward.

Run it:  python tutorials/15_llama_inference.py
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from transformers import DynamicCache

import lowering
import models.hf

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
PROMPT, NEW = 8, 12


@torch.no_grad()
def generate(mesh: str) -> tuple[list[int], lowering.Parallel, DynamicCache]:
    torch.manual_seed(0)
    par = lowering.parallelize(models.hf.load("llama-3-8b", **TINY), mesh)
    par.model.eval()
    prompt = torch.randint(0, TINY["vocab_size"], (1, PROMPT),
                           generator=torch.Generator().manual_seed(1))
    cache = DynamicCache()
    ids = par.shard(prompt, None, None)                  # one sequence: not split over dp
    out: list[int] = []
    for _ in range(NEW):
        logits = par.model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        last = logits[:, -1]                              # (1, V), split over tp by vocab
        last = last.full_tensor() if isinstance(last, DTensor) else last  # gathered: 1 x V
        out.append(int(last.argmax(-1)))                  # the most likely token
        ids = par.shard(torch.tensor([[out[-1]]]), None, None)
    return out, par, cache


def main() -> None:
    ref, par, _ = generate("")
    par.close()
    got, par, cache = generate("tp=2")
    print(f"(a) one device: {ref}")
    print(f"    tp=2:       {got}")
    print(f"    the same tokens: {got == ref}")
    k = cache.layers[0].keys
    local = par.values(k)
    print(f"(b) layer 0's key cache: global {tuple(k.shape)} (batch, kv heads, positions, "
          f"head dim); rank 0 holds {tuple(local[0].shape)}")
    recs = par.schedule()  # every forward so far: the prefill and the decode steps
    per = {op: sum(r.op.value == op for r in recs) / NEW for op in ("all_reduce", "all_gather")}
    print(f"(c) per forward (prefill or decode), on tp: {per['all_reduce']:.0f} all-reduces "
          f"(2 per layer, 1 for the vocab-parallel embedding) and {per['all_gather']:.0f} "
          "all-gather (the last position's logits)")
    par.close()


if __name__ == "__main__":
    main()
