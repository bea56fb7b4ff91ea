"""The model forward pass the engine drives: a Llama-family decoder run layer by layer on the
Hugging Face module's own weights, reading and writing an external KV store.

Owning the forward (instead of calling ``model(...)``) lets the engine keep a preallocated,
slot-indexed KV cache, run one batched decode step over sequences of different lengths, and
compute logits only for the positions it samples from. Quantized or LoRA-wrapped ``Linear``
modules work unchanged because every projection is called as a module.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class KVView(Protocol):
    """Where one forward writes the new keys/values of a layer and reads the whole context."""

    def write_read(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...


class LlamaRunner:
    """Runs ``forward(tokens, positions, kv, mask)`` for a loaded Llama-architecture model."""

    def __init__(self, model: torch.nn.Module) -> None:
        cfg = model.config
        model_type = getattr(cfg, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"Architecture '{model_type}' is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if inner is None or layers is None or not hasattr(layers[0], "self_attn"):
            raise UnsupportedModelError(f"Model of type '{model_type}' does not have the Llama decoder layout.")
        self.model = model
        self.config = cfg
        self.embed = inner.embed_tokens
        self.layers = list(layers)
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        self.n_layers = len(self.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab_size = cfg.vocab_size
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self._apply_rope = apply_rotary_pos_emb
        # called with each row's request namespace before every forward (per-row LoRA adapters)
        self.row_hook: Callable[[list[str]], None] | None = None

    def bind_rows(self, namespaces: list[str]) -> None:
        """Tell per-row modules (adapters) which request each row of the next forward belongs to."""
        if self.row_hook is not None:
            self.row_hook(namespaces)

    @property
    def context_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    @property
    def kv_bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * elem

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,  # [B, T] int64
        positions: torch.Tensor,  # [B, T] int64
        kv: KVView,
        mask: torch.Tensor,  # [B, 1, T, L] bool, True = may attend
        last: torch.Tensor | None = None,  # [B] index into T of the row to compute logits for
        every: bool = False,  # logits of every position, [B, T, vocab] (prompt log-probabilities)
    ) -> torch.Tensor:  # [B, vocab] float32
        B, T = tokens.shape
        h = self.embed(tokens)  # [B, T, hidden]
        cos, sin = self.rotary(h, positions)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._apply_rope(q, k, cos, sin)
            keys, values = kv.write_read(i, k, v)  # [B, KVH, L, D]
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if every:
            pass
        elif last is None:
            h = h[:, -1]
        else:
            h = h[torch.arange(B, device=h.device), last]
        return self.lm_head(self.norm(h)).float()
