"""A tiny GGUF written for tests: a 2-layer, hidden-64 Llama with random float32 weights and a
1,024-token cut of smollm2's byte-level BPE vocabulary (its special tokens, chat template and
token ids kept). transformers parses a GGUF's metadata three times per conversion, and smollm2's
49,152 tokens and 48,900 merges make that about half a minute; this file converts in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VOCAB = 1024


def tiny_tokenizer_fields(tokenizer_json: Path, vocab: int = VOCAB) -> tuple[list[str], list[int], list[str]]:
    """Tokens (by id), token types (3 = control for the special tokens, else 1) and the merges
    whose two parts and result all fall within the first ``vocab`` ids."""
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    by_id = {i: t for t, i in spec["model"]["vocab"].items() if i < vocab}
    tokens = [by_id[i] for i in range(vocab)]
    kept = set(tokens)
    special = {a["id"] for a in spec["added_tokens"] if a.get("special")}
    types = [3 if i in special else 1 for i in range(vocab)]
    merges = []
    for m in spec["model"]["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if a in kept and b in kept and a + b in kept:
            merges.append(f"{a} {b}")
    return tokens, types, merges


def write_tiny_gguf(out: Path, tokenizer_json: Path, chat_template: str, seed: int = 0,
                    layers: int = 2, hidden: int = 64, ffn: int = 128, heads: int = 4, kv_heads: int = 2) -> Path:
    import gguf

    tokens, types, merges = tiny_tokenizer_fields(tokenizer_json)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny-test-llama")
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(0)  # all float32
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(chat_template)
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    kv = hidden // heads * kv_heads
    weight("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)),
                            ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            weight(f"blk.{i}.{name}.weight", *shape)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
