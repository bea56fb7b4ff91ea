"""The model forward pass the engine drives: a Llama-family decoder run layer by layer on the
Hugging Face module's own weights, reading and writing an external KV store.

Owning the forward (instead of calling ``model(...)``) lets the engine keep a preallocated,
slot-indexed KV cache, run one batched decode step over sequences of different lengths, and
compute logits only for the positions it samples from. Quantized or LoRA-wrapped ``Linear``
modules work unchanged because every projection is called as a module.

With ``fuse`` (the default) a layer whose q/k/v (and gate/up) projections are plain, int8 or int4
Linears runs them as one matmul each (``fusion.py``) and rotates q and k in one pass; a layer
with a LoRA-wrapped projection keeps the unfused path.

Attention of a bfloat16/float16 model runs in float32 (``attention_fp32``, on by default):
torch's bf16 SDPA kernel was slower than casting q, k and v to float32 and back on every CPU
measured — 3-7x on an AVX2 machine, 2.6x for a 16-row decode step on an AVX512-BF16 one — and
there its result for a prompt position depended on how the prompt was chunked.

With ``attention_per_row`` (the default for int8, int4 and w8a8 models, whose GEMMs compute
each row on its own) each row's attention is bit for bit
what it is alone: decode steps use ``_attend_invariant`` over key blocks of ``KV_ALIGN``,
prefill chunks of several rows attend one row at a time.

With ``onednn`` (``onednn_linear``, the default) a float32 or bfloat16 model's plain projections
run through oneDNN's matmul on weights packed once (``packed.py``): torch's float32 linear calls
MKL, about half as fast a decode step on the AVX-512 AMD EPYC measured, and its bfloat16 one
reorders the weights on every call; with ``bf16_kernel`` and ``f32_kernel`` (the defaults) a
bfloat16 or float32 model's run through the project's kernels instead (``packed.py``). With ``int8_kernel`` (the default) an int8 model's projections
and the int8 output head of int8 and int4 models run through the project's int8 kernel
(``packed.py``), in every forward; with ``int4_kernel`` (the default) an int4 model's projections
run through the project's int4 kernel, in every forward (on AVX512-BF16 CPUs).

With ``kernel`` (``attention_kernel``, the default) a decode step's attention runs in the
project's C++ kernel (``kernels.py``): it reads a float32 or bfloat16 cache in place,
stops at each row's own length, and gives each row what it gives it alone, so it serves both the
batched and the per-row decode. With ``kernel_block`` (the default) an eager decode step's RoPE
and cache write run in the same call, bit for bit as torch's ops compute them, and with
``kernel_layers`` (the default), where every layer's projections run through the project's matmul
kernels, its whole layer loop is one kernel call (``csrc/decode_layers.cpp``): the loop's calls,
bit for bit, without the Python between them. With ``kernel_prefill`` (the default) prefill
chunks (one prompt's, or several packed) run their RoPE, cache write and attention in one call a
layer too: each token attends over its own sequence up to itself, as a decode step at its position
would, and only over the keys the causal mask lets it see (torch's SDPA with a mask computes them all).

With ``compile`` (``compile_decode``) a decode step of a fully fused model runs as one graph
compiled by torch's inductor (``_decode_step``, built at load by ``warm_up``, cached on disk under
the home), with the same batch-invariant attention.
"""

from __future__ import annotations

import copy
import logging
import os
import types
import weakref
from typing import Any, Callable, Optional, Protocol

import torch
import torch._dynamo
import torch.nn.functional as F

from ..config import home_dir
from ..errors import InvalidRequestError, UnsupportedModelError
from . import kernels
from .fusion import fuse_linears
from .packed import (DTYPES as ONEDNN_DTYPES, RowsKernelLinear, available as onednn_available, packed_bf16, packed_bytes,
                     packed_f32, packed_int4, packed_int8, packed_linear)
from .kv_cache import PackWriter, _ChunkWriter, _DecodeWriter, _SpanWriter
from ..models.quantization import Int4Linear, int4_through

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

log = logging.getLogger("llamawrapper.engine")


class KVView(Protocol):
    """Where one forward writes the new keys/values of a layer and reads the whole context."""

    def write_read(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...


# fused modules per decoder layer, built once per loaded model and shared by every runner on it:
# layer -> (parts fused, fused module); reused only while the layer still holds those parts
_FUSED: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, tuple[tuple, Optional[torch.nn.Module]]]]" = weakref.WeakKeyDictionary()


def _fused(layer: torch.nn.Module, key: str, parts: tuple) -> Optional[torch.nn.Module]:
    cache = _FUSED.setdefault(layer, {})
    hit = cache.get(key)
    if hit is not None and len(hit[0]) == len(parts) and all(a is b for a, b in zip(hit[0], parts)):
        return hit[1]
    fused = fuse_linears(parts)
    cache[key] = (parts, fused)
    return fused


class _Fused:
    """One layer's projections as the runner calls them: q/k/v fused (else ``q``, ``k``, ``v``
    separate), gate/up fused (None where the layer keeps its MLP), the output and down projections
    (the layer's own modules, packed copies: ``packed.py``, or other kernels: ``through``)."""

    __slots__ = ("qkv", "q", "k", "v", "gate_up", "act", "o", "down")
    PROJECTIONS = ("qkv", "q", "k", "v", "gate_up", "o", "down")  # the slots that hold projections (or None)

    def __init__(self, layer: torch.nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _fused(layer, "qkv", (attn.q_proj, attn.k_proj, attn.v_proj))
        separate = self.qkv is None
        self.q, self.k, self.v = (attn.q_proj, attn.k_proj, attn.v_proj) if separate else (None, None, None)
        parts = tuple(getattr(mlp, n, None) for n in ("gate_proj", "up_proj"))
        ok = None not in parts and hasattr(mlp, "down_proj") and hasattr(mlp, "act_fn")
        self.gate_up = _fused(layer, "gate_up", parts) if ok else None
        self.act = mlp.act_fn if ok else None
        self.o, self.down = attn.o_proj, getattr(mlp, "down_proj", None)

    def pack(self, packed: Callable[[Any], Any] = packed_linear) -> None:
        """Use ``packed`` copies of the projections it takes (``packed.py``: oneDNN's for plain
        float32/bfloat16 ones, the project's bfloat16 kernel's for plain bfloat16 ones, its int8 and
        int4 kernels' for ``Int8Linear`` and ``Int4Linear``)."""
        for name in self.PROJECTIONS:
            setattr(self, name, packed(getattr(self, name)))  # (None stays None; the others as they are)

    def through(self, wrap: Callable[[Any], Any]) -> "_Fused":
        """A copy of these projections, each replaced by ``wrap(projection)``."""
        other = copy.copy(self)
        for name in self.PROJECTIONS:
            setattr(other, name, wrap(getattr(self, name)))
        return other


def prefuse(model: torch.nn.Module) -> None:
    """Fuse every decoder layer's projections now (the loader process does, before it hands the
    model over): the parts become views of the fused weights, so they travel as one storage and
    the parent's runner fuses them again as views, without a second copy. A model without the
    Llama layout is left as it is."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if getattr(model.config, "model_type", None) not in SUPPORTED_MODEL_TYPES or layers is None:
        return
    with torch.inference_mode(False), torch.no_grad():
        for layer in layers:
            if hasattr(layer, "self_attn"):
                _Fused(layer)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers' ``apply_rotary_pos_emb`` computes it, on [B, T, heads, D] with
    cos/sin [B, T, 1, D]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _fused_qkv(fused: _Fused, x: torch.Tensor, cos4: torch.Tensor, sin4: torch.Tensor, H: int, KVH: int,
               D: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ([B, heads, T, D]) from one fused projection, q and k rotated in one pass."""
    B, T = x.shape[0], x.shape[1]
    y = fused.qkv(x).view(B, T, H + 2 * KVH, D)
    qk = _rotate(y[:, :, : H + KVH], cos4, sin4)
    return qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), y[:, :, H + KVH :].transpose(1, 2)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
            attn32: bool) -> torch.Tensor:
    """Grouped-query attention of q over the cached keys/values (in float32 when ``attn32``)."""
    if attn32:
        return F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask,
                                              enable_gqa=True).to(q.dtype)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


def _attend_rows(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, attn32: bool,
                 lengths: list[int], counts: Optional[list[int]] = None) -> torch.Tensor:
    """``_attend`` one row at a time over its own first ``counts`` queries (all by default) and
    ``lengths`` keys (up to its last visible key): the same call, bit for bit, whether the row
    runs alone, beside others, or packed with other prompts' chunks (SDPA over the padded batch
    changes most rows' last bits); padding queries past a row's count come out as zeros. One-query
    decode steps use ``_attend_invariant``."""
    B, H, T, D = q.shape
    counts = counts or [T] * B
    rows = [_attend(q[i : i + 1, :, :c], keys[i : i + 1, :, :n], values[i : i + 1, :, :n], mask[i : i + 1, :, :c, :n], attn32)
            for i, (n, c) in enumerate(zip(lengths, counts))]
    if all(c == T for c in counts):
        return torch.cat(rows)
    out = q.new_zeros(B, H, T, D)
    for i, (row, c) in enumerate(zip(rows, counts)):
        out[i, :, :c] = row[0]
    return out


def _visible_lengths(mask: torch.Tensor) -> list[int]:
    """Per row of ``mask`` [B, 1, T, L]: how many keys its last query may see (up to the last)."""
    visible = mask[:, 0, -1, :]
    return (visible.shape[-1] - visible.flip(-1).to(torch.uint8).argmax(-1)).tolist()


def _mask_bias(mask: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, L] bool -> [B, 1, 1, T, length] additive bias (0 or the dtype's lowest finite
    value, so a row that sees nothing stays finite), False past L."""
    B, _, T, L = mask.shape
    bias = torch.full((B, 1, 1, T, length), torch.finfo(dtype).min, dtype=dtype)
    bias[..., :L].masked_fill_(mask.view(B, 1, 1, T, L), 0.0)
    return bias


def _attend_invariant(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                      attn32: bool) -> torch.Tensor:
    """Grouped-query attention whose every row is bit for bit what it is alone, whatever the
    batch's padded length, for keys read in whole ``KV_ALIGN`` blocks (``_DecodeWriter.widened``).

    Measured on torch's CPU kernels (not a documented guarantee; the tests check it): SDPA's
    output for a row changes in the last bits with the batch, even at the same length; ``q @ k.T``
    and the softmax change with the number of keys unless it is a whole number of blocks (then
    padded keys add exact zeros to the same vector lanes); ``p @ v`` adds exact zeros for
    positions past a row's length; and a query strided by the batch (a view of the fused
    projection) changes the GEMM's result, so it is made contiguous first."""
    dtype = q.dtype
    if attn32:
        q, keys, values = q.float(), keys.float(), values.float()
    B, H, T, D = q.shape
    KVH, L = keys.shape[1], keys.shape[2]
    g = H // KVH
    # q arrives as a view of the fused projection, strided by the batch: one layout for any batch
    s = torch.matmul(q.contiguous().view(B, KVH, g * T, D), keys.transpose(-1, -2))  # [B, KVH, g*T, L]
    s = s.view(B, KVH, g, T, L).mul_(D ** -0.5).add_(bias)
    p = torch.softmax(s, dim=-1).view(B, KVH, g * T, L)
    return torch.matmul(p, values).view(B, H, T, D).to(dtype)


def _unpack(t: torch.Tensor, flat: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """[1, heads, N, D] of N packed positions -> [B, heads, T, D], zeros where nothing was fed."""
    heads, D = t.shape[1], t.shape[3]
    out = t.new_zeros(B * T, heads, D)
    out[flat] = t[0].transpose(0, 1)
    return out.view(B, T, heads, D).transpose(1, 2)


def _norm_in_kernel(kernel: types.ModuleType, norm: torch.nn.Module) -> bool:
    """Whether the kernel's ``add_rms_norm`` computes what ``norm`` computes, a Llama-family RMS
    norm (``weight * x / sqrt(mean(x^2) + variance_epsilon)``): asked of the module itself, on one
    random input, within rounding. A norm of another formula (Gemma's ``(1 + weight)``, a centred
    LayerNorm) keeps its own forward."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.dtype in kernels.DTYPES
            and isinstance(eps, (int, float))):
        return False
    x = (torch.randn(2, 1, weight.shape[0], generator=torch.Generator().manual_seed(0)) * 3).to(weight.dtype)
    try:
        with torch.inference_mode():
            want = norm(x)
            got = kernel.add_rms_norm(x.clone(), None, weight, float(eps))
    except Exception:  # a module that does not take this input: its own forward, as before
        return False
    if not isinstance(want, torch.Tensor) or want.shape != got.shape or want.dtype != got.dtype:
        return False
    tol = 1e-5 if weight.dtype == torch.float32 else 2 ** -7
    return bool((got.float() - want.float()).abs().max() <= tol * want.float().abs().max())


def _fused_mlp(layer: torch.nn.Module, fused: _Fused, x: torch.Tensor) -> torch.Tensor:
    """The MLP with gate and up in one projection."""
    gate, up = fused.gate_up(x).chunk(2, dim=-1)
    return fused.down(fused.act(gate) * up)


def _layer_loop(runner: "LlamaRunner") -> Optional[Any]:
    """The kernel's ``DecodeLayers`` over ``runner``'s layers, or None unless every layer's q/k/v,
    output, gate/up and down projections run through the project's matmul kernels on rows of the
    model's dtype and its MLP is SiLU(gate) * up: what the Python loop calls for a decode step."""
    specs = []
    sample = torch.randn(64, generator=torch.Generator().manual_seed(0)).to(runner.dtype) * 4
    for layer, f in zip(runner.layers, runner.fused):
        # (transformers' SiLUActivation or torch's SiLU: the loop calls torch's silu, as their forward does)
        if f is None or f.act is None or not torch.equal(f.act(sample), F.silu(sample)):
            return None
        projections = (f.qkv, f.o, f.gate_up, f.down)
        for m in projections:
            if not isinstance(m, RowsKernelLinear) or m.ROWS != runner.dtype or (m.bias is not None and m.bias.dtype != runner.dtype):
                return None  # (a bias of another dtype would promote the output: the Python loop's add and norm take it)
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        specs.append((norms[0].weight, float(norms[0].variance_epsilon), norms[1].weight, float(norms[1].variance_epsilon),
                      *(m.loop_spec() for m in projections)))
    return runner.kernel.DecodeLayers(specs, runner.n_heads)


def _decode_step(runner: "LlamaRunner", tokens: torch.Tensor, positions: torch.Tensor, ks: list[torch.Tensor],
                 vs: list[torch.Tensor], at: tuple[torch.Tensor, torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """One whole decode step (T = 1) of a model whose every layer is fused: the unit ``compile``
    hands to ``torch.compile``, all layers in one graph. ``ks``/``vs`` are each layer's slot
    cache as the batch reads it (``[B, kv_heads, L, D]`` views, L in whole ``KV_ALIGN`` blocks);
    each row writes its new k/v at ``at`` (rows, positions) and attends with the batch-invariant
    attention (``bias`` masks what a row may not see). The views are cut before the call: cut
    inside the graph, after the write, the inductor copied every layer's keys and values."""
    B = tokens.shape[0]
    H, KVH, D = runner.n_heads, runner.n_kv_heads, runner.head_dim
    h = runner.embed(tokens)
    cos, sin = runner.rotary(h, positions)
    cos4, sin4 = cos.unsqueeze(2), sin.unsqueeze(2)
    for layer, fused, kc, vc in zip(runner.layers, runner.fused, ks, vs):
        q, k, v = _fused_qkv(fused, layer.input_layernorm(h), cos4, sin4, H, KVH, D)
        kc[at[0], :, at[1]] = k[:, :, 0].to(kc.dtype)
        vc[at[0], :, at[1]] = v[:, :, 0].to(vc.dtype)
        if runner.kernel is not None:  # the C++ kernel as an operator of the graph, each row over its own keys
            o = kernels.decode_attention(None, q, kc, vc, at[1] + 1)
        else:
            o = _attend_invariant(q, kc, vc, bias, runner.attention_fp32)
        h = h + fused.o(o.transpose(1, 2).reshape(B, 1, H * D))
        h = h + _fused_mlp(layer, fused, layer.post_attention_layernorm(h))
    return runner.lm_head(runner.norm(h[:, -1])).float()


def _compiled_step(runner: "LlamaRunner", backend: Any) -> Callable[..., torch.Tensor]:
    """``_decode_step`` compiled for ``runner`` alone: dynamic batch and KV length (one graph for
    one row, one for more), the inductor's C++ wrapper, and no guards on the model's modules
    (checking them cost 0.5 ms a step; a runner's modules never change). The step runs under a
    code object of the runner's own, so dynamo's cache of graphs, kept per code object, is the
    runner's and goes with it."""
    def step(tokens, positions, ks, vs, at, bias):  # noqa: ANN001, ANN202
        return _decode_step(runner, tokens, positions, ks, vs, at, bias)

    code = step.__code__.replace(co_name=f"decode_step_{id(runner):x}")
    own = types.FunctionType(code, step.__globals__, code.co_name, None, step.__closure__)
    options: dict = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    if backend == "inductor":
        options["cpp_wrapper"] = True
        # compiled graphs are cached on disk and found again by the next process (the two take
        # ~4 min to build on 2 cores): under the project's home, not in /tmp, unless the user's
        # TORCHINDUCTOR_CACHE_DIR names another place (torch writes its /tmp default into that
        # variable at its first use, so the default does not count as the user's)
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir():
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(home_dir() / "cache" / "inductor")
    return torch.compile(own, dynamic=True, backend=backend, options=options)


class LlamaRunner:
    """Runs ``forward(tokens, positions, kv, mask)`` for a loaded Llama-architecture model."""

    def __init__(self, model: torch.nn.Module, *, fuse: bool = True, attention_fp32: bool = True,
                 compile: Any = False, attention_per_row: Optional[bool] = None,
                 kv_dtype: torch.dtype | str | None = None, onednn: bool = True, kernel: bool = True,
                 kernel_block: bool = True, kernel_norm: bool = True, int4_prefill_bf16: bool = True,
                 kernel_prefill: bool = True, int8_kernel: bool = True, int4_kernel: bool = True,
                 bf16_kernel: bool = True, f32_kernel: bool = True, kernel_layers: bool = True) -> None:
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
        # an int8 output head (int8 and int4 models) through the project's int8 kernel (packed.py)
        self.lm_head = packed_int8(model.lm_head) if int8_kernel else model.lm_head
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
        self.fused: list[Optional[_Fused]] = [_Fused(layer) if fuse else None for layer in self.layers]
        # ... and so do an int8 model's projections (those of fused layers); an int4 model's run through
        # the project's int4 kernel (packed.py)
        packers = [p for p, on in ((packed_int8, int8_kernel), (packed_int4, int4_kernel)) if on]
        for f in self.fused:
            for p in packers if f is not None else ():
                f.pack(p)
        half = self.dtype in (torch.bfloat16, torch.float16)
        if isinstance(kv_dtype, str):
            kv_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(kv_dtype, kv_dtype)
        if kv_dtype not in (None, torch.float32, self.dtype):
            raise InvalidRequestError(
                f"Invalid value for 'kv_cache_dtype': {str(kv_dtype).removeprefix('torch.')!r} for a "
                f"{str(self.dtype).removeprefix('torch.')} model; choose float32 or the model's own dtype.",
                param="kv_cache_dtype")
        # attention in float32 unless asked otherwise, also where the CPU has native bf16: on an
        # AVX512-BF16 machine torch's bf16 SDPA made a 16-row decode step of a bf16 model 2.6x
        # slower, and gave a prompt position a result that depended on how the prompt was chunked
        # (a request packed with others got other logprobs than alone, 1e-2 apart). The cache is
        # in the model's dtype unless asked otherwise; a float32 cache of a half model (no step
        # casts the whole context, at twice the KV memory) is attended in float32
        self.attention_fp32 = half and (bool(attention_fp32) or kv_dtype == torch.float32)
        self.kv_dtype = kv_dtype or self.dtype
        from ..models.quantization import Int8Linear, W8A8Linear

        kinds = {type(m) for m in model.modules()}
        self.quantizes_activations = W8A8Linear in kinds
        # the quantized kernels (FBGEMM's int8, torch's packed int8/int4) compute each row on its
        # own, torch's float GEMMs do not: with them a batch-invariant attention makes a request's
        # text the same alone and in a batch, so it is their default
        row_exact = bool(kinds & {Int8Linear, Int4Linear, W8A8Linear})
        self.attention_per_row = row_exact if attention_per_row is None else bool(attention_per_row)
        # torch.compile (CPU inductor) of the whole decode step, for a model whose every layer is
        # fused (``compile`` may name another backend, e.g. "eager" to test dynamo's guards quickly)
        whole = all(f is not None and f.qkv is not None and f.gate_up is not None for f in self.fused)
        if compile and not whole:
            log.warning("compile_decode is not used: a layer keeps separate projections (LoRA-wrapped, fuse_projections "
                        "off, or int4 blocks that do not line up)")
        backend = "inductor" if compile is True else compile
        self.compiled: Optional[Callable[..., torch.Tensor]] = _compiled_step(self, backend) if compile and whole else None
        self._warmed = False  # warm_up has built the compiled step's graphs
        # float32/bfloat16 projections through oneDNN's packed kernel (packed.py), on the fused
        # layout; the compiled step keeps torch's own linears
        self.onednn = (bool(onednn and fuse) and self.dtype in ONEDNN_DTYPES and self.compiled is None
                       and onednn_available())
        if self.onednn:  # (with bf16_kernel / f32_kernel, a bfloat16 / float32 model's through the project's kernels first)
            first = {torch.bfloat16: packed_bf16 if bf16_kernel else None,
                     torch.float32: packed_f32 if f32_kernel else None}.get(self.dtype) or (lambda m: m)
            for f in self.fused:
                f.pack(first)
                f.pack()
            self.lm_head = packed_linear(first(self.lm_head))
        # decode attention through the C++ kernel (kernels.py), which computes in float32:
        # for float32 models and for half models attended in float32; built here, at load
        in_fp32 = self.dtype == torch.float32 or self.attention_fp32
        usable = bool(kernel) and in_fp32 and self.kv_dtype in kernels.DTYPES
        module = kernels.load() if usable else None
        self.kernel = module if module is not None and module.supports(self.head_dim) else None
        # eager decode steps also rotate and write the cache in the kernel's call (one call a layer)
        self.kernel_block = self.kernel is not None and bool(kernel_block) and self.dtype in kernels.DTYPES
        # ... and so do prefill chunks, in and out of the prompt's own KV buffer
        self.kernel_prefill = self.kernel is not None and bool(kernel_prefill) and self.dtype in kernels.DTYPES
        # ... and each residual add with the RMS norm after it (if the kernel computes the model's norms)
        norms = [n for layer in self.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        self.kernel_norm = (self.kernel is not None and bool(kernel_norm) and self.dtype in kernels.DTYPES
                            and all(_norm_in_kernel(self.kernel, n) for n in norms))
        # without the int4 kernel, an int4 model's prefill forwards call its fused projections through
        # bfloat16 GEMMs over weights unpacked per call (torch's int4 kernel is made for a few rows:
        # decode and verify steps keep it); with fuse_projections off they all stay on torch's kernel
        torch_int4 = any(type(getattr(f, n)) is Int4Linear for f in self.fused if f is not None for n in _Fused.PROJECTIONS)
        self.int4_prefill = kernels.int4_prefill_matmul() if int4_prefill_bf16 and torch_int4 else None
        unpacked = self.int4_prefill
        self.prefill_fused = self.fused if unpacked is None else [
            None if f is None else f.through(lambda m: int4_through(m, unpacked)) for f in self.fused]
        # an eager decode step's whole layer loop in one kernel call, when every layer's projections
        # run through the project's matmul kernels (the same calls, without Python between them)
        self.kernel_layers = bool(kernel_layers)
        self.layer_loop = _layer_loop(self) if self.kernel_block and self.kernel_norm else None

    @property
    def packed_bytes(self) -> int:
        """Memory of the packed copies this runner calls (oneDNN's and the kernels', ``packed.py``; 0 without them)."""
        return packed_bytes([self.lm_head, *(getattr(f, n) for f in self.fused if f is not None for n in _Fused.PROJECTIONS)])

    def _decode_bias(self, kv: "_DecodeWriter", mask: torch.Tensor) -> tuple["_DecodeWriter", torch.Tensor]:
        """A decode step's KV view read up to whole key blocks, and the attention's additive mask over it."""
        kv = kv.widened()
        return kv, _mask_bias(mask, kv.length, torch.float32 if self.attention_fp32 else self.dtype)

    def _step_inputs(self, tokens: torch.Tensor, positions: torch.Tensor, kv: "_DecodeWriter", mask: torch.Tensor) -> tuple:
        """The compiled decode step's inputs: the batch's slots up to whole key blocks, cut here
        (views: the step's writes land in the cache), and the attention's additive mask (None with
        the kernel, which reads each row up to its own position)."""
        if self.kernel is not None:
            kv, bias = kv.widened(), None
        else:
            kv, bias = self._decode_bias(kv, mask)
        B, cache, L = tokens.shape[0], kv.cache, kv.length
        return (tokens, positions, [k[:B, :, :L] for k in cache.k], [v[:B, :, :L] for v in cache.v],
                (kv.rows, kv.positions), bias)

    def warm_up(self) -> None:
        """Build the compiled decode step's two graphs (one row; several) now, on a scratch
        cache, so that no request waits for the compiler (run it on the executor thread; the
        first compiled step runs it too, for a runner built without the load).

        The cache's head count and head size are marked static: dynamo would otherwise make one
        symbol of every pair of sizes equal at the first call ("duck" shapes) — the warm-up's 64
        keys and smollm2's head_dim of 64 became one, and every longer request compiled again —
        and with duck shapes off every layer's cache got symbols of its own (12 min of compiling)."""
        if self.compiled is None:
            return
        from .kv_cache import SlotCache

        for B in (1, 2):  # the inputs made as the engine makes them (dynamo guards on inference mode):
            cache = SlotCache(self.n_layers, self.n_kv_heads, self.head_dim, self.kv_dtype, B)  # what the engine
            cache.ensure(B, 1)  # hands ``forward`` outside it,
            positions = torch.zeros(B, dtype=torch.long)
            args = (torch.zeros(B, 1, dtype=torch.long), positions.unsqueeze(1), cache.decode_view(B, positions, 1),
                    torch.ones(B, 1, 1, 1, dtype=torch.bool))
            with torch.inference_mode():  # the step's views and mask inside it, as ``forward`` makes them
                inputs = self._step_inputs(*args)
                for t in inputs[2] + inputs[3]:  # the heads and head size are the model's, not symbols
                    for dim in (1, 3):  # of the view and of the cache it views (dynamo tracks both)
                        torch._dynamo.mark_static(t, dim)
                        torch._dynamo.mark_static(t._base, dim)
                try:
                    self.compiled(*inputs)
                except Exception as exc:  # the inductor's errors (no C++ compiler, a failed build) are long
                    first = (str(exc).strip().splitlines() or [""])[0][:300]
                    raise UnsupportedModelError(
                        f"compile_decode could not compile the decode step ({type(exc).__name__}: {first}); it needs a "
                        "C++ compiler (g++; `apt-get install g++`). Turn compile_decode off to run uncompiled.") from exc
        self._warmed = True

    def bind_rows(self, namespaces: list[str]) -> None:
        """Tell per-row modules (adapters) which request each row of the next forward belongs to."""
        if self.row_hook is not None:
            self.row_hook(namespaces)

    @property
    def context_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    @property
    def kv_bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * elem

    def _attention(self, kv: KVView, mask: torch.Tensor, T: int) -> tuple[KVView, Callable[..., torch.Tensor]]:
        """The KV view and attention this forward uses: the C++ kernel for decode steps (each
        row's result what it is alone); otherwise over the batch at once, or (with
        ``attention_per_row``) so that each row's result is what it is alone — batch-invariant
        attention over whole key blocks for decode steps, one row at a time for prefill chunks."""
        attn32 = self.attention_fp32
        if self.kernel is not None and T == 1 and isinstance(kv, _DecodeWriter):
            # a decode step's mask lets each row see its keys up to its own position (the engine's)
            module, lengths, sharing = self.kernel, kv.positions + 1, kv.sharing
            return kv, lambda q, k, v: kernels.decode_attention(module, q, k, v, lengths, sharing)
        if self.attention_per_row and T == 1 and isinstance(kv, _DecodeWriter):
            kv, bias = self._decode_bias(kv, mask)
            return kv, lambda q, k, v: _attend_invariant(q, k, v, bias, attn32)
        if self.attention_per_row:  # every other forward (prefill chunks, packed prompts, verify steps) row by row
            lengths, counts = _visible_lengths(mask), getattr(kv, "counts", None)
            return kv, lambda q, k, v: _attend_rows(q, k, v, mask, attn32, lengths, counts)
        return kv, lambda q, k, v: _attend(q, k, v, mask, attn32)

    def _add_norm(self, norm: torch.nn.Module, h: torch.Tensor,
                  delta: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``h + delta`` (no add when None) and ``norm`` of it: one kernel call (``add_rms_norm``,
        h updated in place) with ``kernel_norm``; torch's ops for an adapter's output of another
        dtype or layout, which promote as torch does."""
        if self.kernel_norm and (delta is None or (delta.dtype == h.dtype and delta.is_contiguous())) and h.is_contiguous():
            return h, self.kernel.add_rms_norm(h, delta, norm.weight, norm.variance_epsilon)
        h = h if delta is None else h + delta
        return h, norm(h)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,  # [B, T] int64
        positions: torch.Tensor,  # [B, T] int64
        kv: KVView,
        mask: torch.Tensor,  # [B, 1, T, L] bool, True = may attend
        last: torch.Tensor | None = None,  # [B] index into T of the row to compute logits for
        every: bool = False,  # logits of every position, [B, T, vocab] (prompt log-probabilities)
        flat: torch.Tensor | None = None,  # [N] indices into the B*T positions: logits of those, [N, vocab]
        pack: bool = False,  # with ``flat``: only those N positions go through the projections and MLP
        logits_at: torch.Tensor | None = None,  # with ``pack``: logits only of these of the N positions
        logits: bool = True,  # False: none (a prompt chunk that is not its last); returns None
    ) -> Optional[torch.Tensor]:  # [B, vocab] float32
        B, T = tokens.shape
        if self.compiled is not None and T == 1 and isinstance(kv, _DecodeWriter) and last is None and flat is None and not every:
            if not self._warmed:  # a runner used without the load's warm-up
                with torch.inference_mode(False):  # its cache made as the engine makes it
                    self.warm_up()
            return self.compiled(*self._step_inputs(tokens, positions, kv, mask))
        packed = pack and flat is not None
        if packed:  # token-wise work on the N real positions ([1, N]); attention on the padded [B, T]
            tokens, positions = tokens.reshape(-1)[flat].unsqueeze(0), positions.reshape(-1)[flat].unsqueeze(0)
        Bt, Tt = tokens.shape
        h = self.embed(tokens)  # [Bt, Tt, hidden]
        cos, sin = self.rotary(h, positions)
        cos4, sin4 = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, T, 1, D]
        H, KVH, D = self.n_heads, self.n_kv_heads, self.head_dim
        attend: Optional[Callable[..., torch.Tensor]] = None  # torch's attention, for a layer without the block (made once)
        # the attention block (RoPE, the cache write, attention) in one kernel call a layer: a decode
        # step's, or a prefill forward's (its chunks' tokens, Bt = 1: a lone chunk or packed ones)
        block: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None
        layers = self.layers
        if self.kernel_block and T == 1 and not packed and isinstance(kv, _DecodeWriter):
            cos1, sin1, writer = cos[:, 0].contiguous(), sin[:, 0].contiguous(), kv
            if self.kernel_layers and self.layer_loop is not None:  # the loop below, in one call
                h = self.layer_loop(h, cos1, sin1, writer.cache.k, writer.cache.v, writer.positions,
                                    *(writer.sharing or (None, None)))
                layers = []
            else:
                block = lambda y, i: kernels.rope_write_attention(  # noqa: E731
                    self.kernel, y, cos1, sin1, writer.cache.k[i], writer.cache.v[i], writer.positions, H, writer.sharing)
        elif self.kernel_prefill and Bt == 1 and isinstance(kv, (_ChunkWriter, PackWriter)):
            cos1, sin1, pos1, chunks = cos[0].contiguous(), sin[0].contiguous(), positions[0].contiguous(), kv
            block = lambda y, i: kernels.prefill_attention(  # noqa: E731
                self.kernel, y, cos1, sin1, *chunks.buffers(i), chunks.token_seqs, pos1, H)
        # an int4 model's prefill forwards: its projections through the unpacked weights
        fused_layers = self.fused if isinstance(kv, (_DecodeWriter, _SpanWriter)) else self.prefill_fused
        add_norm = self._add_norm
        pending = None  # the last MLP's output, added to h with the next norm
        for i, layer in enumerate(layers):
            attn, fused = layer.self_attn, fused_layers[i]
            h, x = add_norm(layer.input_layernorm, h, pending)
            if block is not None and fused is not None and fused.qkv is not None:
                h, x = add_norm(layer.post_attention_layernorm, h, fused.o(block(fused.qkv(x), i)))
                pending = _fused_mlp(layer, fused, x) if fused.gate_up is not None else layer.mlp(x)
                continue
            if attend is None:
                kv, attend = self._attention(kv, mask, T)
            if fused is not None and fused.qkv is not None:
                q, k, v = _fused_qkv(fused, x, cos4, sin4, H, KVH, D)
            else:
                qp, kp, vp = (attn.q_proj, attn.k_proj, attn.v_proj) if fused is None else (fused.q, fused.k, fused.v)
                q = qp(x).view(Bt, Tt, H, D).transpose(1, 2)
                k = kp(x).view(Bt, Tt, KVH, D).transpose(1, 2)
                v = vp(x).view(Bt, Tt, KVH, D).transpose(1, 2)
                q, k = self._apply_rope(q, k, cos, sin)
            if packed:
                q, k, v = (_unpack(t, flat, B, T) for t in (q, k, v))
            if self.kv_dtype != self.dtype:
                k, v = k.to(self.kv_dtype), v.to(self.kv_dtype)
            keys, values = kv.write_read(i, k, v)  # [B, KVH, L, D]
            o = attend(q, keys, values)
            o = o.transpose(1, 2).reshape(B, T, H * D)
            if packed:
                o = o.reshape(B * T, H * D)[flat].unsqueeze(0)
            h, x = add_norm(layer.post_attention_layernorm, h, (attn.o_proj if fused is None else fused.o)(o))
            pending = _fused_mlp(layer, fused, x) if fused is not None and fused.gate_up is not None else layer.mlp(x)
        if not logits:
            return None
        if pending is not None:
            h = h + pending
        if packed:
            h = h[0] if logits_at is None else h[0, logits_at]
        elif flat is not None:
            h = h.reshape(B * T, -1)[flat]
        elif every:
            pass
        elif last is None:
            h = h[:, -1]
        else:
            h = h[torch.arange(B, device=h.device), last]
        return self.lm_head(self.norm(h)).float()
