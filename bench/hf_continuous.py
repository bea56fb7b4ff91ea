"""Measures transformers' own continuous batching (``model.generate_batch`` with a paged KV
cache) against this engine on the W2 workload, side by side in one run — the figure behind
the choice to write our own scheduler (docs/DESIGN.md).

    python -m bench.hf_continuous [--requests 16] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def w2_prompts(llm, n: int) -> list[list[int]]:
    system = ("You are a careful assistant for a travel company. " * 30).strip()  # ~300 tokens shared
    questions = [f"Question {i}: suggest one thing to see in city number {i} and say why." for i in range(n)]
    return [llm.chat_prompt_ids([{"role": "system", "content": system}, {"role": "user", "content": q}]) for q in questions]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default="bench/results/hf_continuous.json")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from llamawrapper import LlamaWrapper, SamplingParams

    llm = LlamaWrapper.load("smollm2", progress=False)
    prompts = w2_prompts(llm, args.requests)
    n_new = args.new_tokens

    # this engine
    t = time.perf_counter()
    handles = [llm.submit(p, SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True)) for p in prompts]
    ours = [h.result() for h in handles]
    ours_s = time.perf_counter() - t
    ours_tokens = sum(r.usage.completion_tokens for r in ours)
    llm.close()

    # transformers' continuous batching (paged attention, sdpa kernels)
    model = AutoModelForCausalLM.from_pretrained(str(llm.loaded.folder), dtype=torch.float32,
                                                 attn_implementation="paged|sdpa").eval()
    gen = GenerationConfig(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                           eos_token_id=model.generation_config.eos_token_id, pad_token_id=0)
    t = time.perf_counter()
    outs = model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False)
    hf_s = time.perf_counter() - t
    hf_tokens = sum(len(o.generated_tokens) for o in outs.values())

    result = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "workload": {"requests": args.requests, "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts), "new_tokens": n_new},
        "engine": {"seconds": ours_s, "tokens": ours_tokens, "tokens_per_s": ours_tokens / ours_s},
        "transformers_generate_batch": {"seconds": hf_s, "tokens": hf_tokens, "tokens_per_s": hf_tokens / hf_s},
    }
    result["ratio_engine_over_generate_batch"] = result["engine"]["tokens_per_s"] / result["transformers_generate_batch"]["tokens_per_s"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
