"""Quantization on CPU (weight-only int8 and int4; int8 weights with int8 activations, ``w8a8``)
as an explicit module swap, and the on-disk cache of quantized weights.

Every ``nn.Linear`` of the decoder (and the output head) is replaced by ``Int8Linear`` or
``Int4Linear``, which keep packed integer weights and call torch's own packed CPU kernels
(``aten._weight_int8pack_mm``, ``aten._weight_int4pack_mm_for_cpu``). Those kernels are fast only
with bfloat16 activations, so an int8 or int4 model runs with bfloat16 activations throughout
(norms, attention, KV cache): the runner sees a bfloat16 model and casts nothing per layer.
The token embedding becomes ``Int8Embedding`` (rows dequantized on lookup); when the model ties
its head to the embedding, both share one int8 tensor.

The quantized state dict is saved next to the converted model in ``quant-<mode>/`` with a
manifest; a later load builds the module tree on the meta device and assigns those tensors,
so it neither reads the fp32 weights nor quantizes again. The manifest names what the tensors
depend on beyond the source (torch's version, the int4 packing's CPU kernel set, w8a8's weight
range): a cache written on another kind of CPU is quantized again, not misread.

``w8a8`` keeps float32 activations between layers and quantizes each token's input to a Linear
to 8 bits at run time (one scale per token, so a row's result never depends on the rows batched
with it), multiplying by per-channel weights in FBGEMM, torch's x86 int8 GEMM (``W8A8Linear``).
The weights are 8-bit where FBGEMM multiplies with AVX512-VNNI (``vpdpbusd`` sums u8 x s8
products in int32) and 7-bit elsewhere, which keeps every pair of products inside the int16 that
AVX2's ``vpmaddubsw`` saturates at (``w8a8_weight_max``; the cache records which, so weights
quantized on one kind of CPU are not used on the other). The token embedding stays its own int8 table. Before quantizing,
each Linear's input channels are smoothed (``smoothing.py``): a per-channel factor, found on a
short built-in text, moves activation outliers into the weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .cachefs import atomic_folder
from .smoothing import calibration_ids, smoothing_factors, smoothing_key
from ..errors import InvalidRequestError

log = logging.getLogger("llamawrapper.quantization")

QUANTIZATIONS = ("int8", "int4", "w8a8")
INT4_GROUP_SIZE = 32  # the GGUF's Q4_1 blocks are 32 wide: group 32 with a zero point recovers them
QUANT_FORMAT_VERSION = 2  # 2: w8a8 Linears carry smoothing factors
ACTIVATION_DTYPE = torch.bfloat16


@functools.lru_cache(maxsize=None)
def w8a8_weight_max() -> int:
    """The largest magnitude of a w8a8 weight here: 127 where FBGEMM's kernel sums u8 x s8
    products without saturating (AVX512-VNNI), else 63 (two u8 x s7 products fit AVX2's
    saturating int16). Asked of the kernel itself, with the worst case (every activation 255,
    every weight 127), so a CPU flag or ``FBGEMM_ENABLE_INSTRUCTIONS`` cannot mislead it. On
    smollm2 with AVX512-VNNI, 8-bit weights gave perplexity 27.95 against 7-bit's 28.95 (float32:
    27.98)."""
    packed = _fbgemm_pack(torch.full((1, 64), 127, dtype=torch.int8), torch.ones(1))
    y = torch.ops.quantized.linear_dynamic(torch.ones(1, 64), packed, False)
    return 127 if abs(y.item() - 64 * 127) < 0.01 * 64 * 127 else 63


def _fbgemm_pack(weight: torch.Tensor, scales: torch.Tensor) -> Any:
    """FBGEMM's packed form of int8 weights with per-output-channel ``scales``."""
    import warnings

    with warnings.catch_warnings():  # torch marks quantized-tensor creation deprecated (torchao's successor needs compile)
        warnings.simplefilter("ignore")
        q = torch._make_per_channel_quantized_tensor(weight, scales.double(), torch.zeros(weight.shape[0], dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(q, None)


def activation_dtype(mode: str) -> torch.dtype:
    """The dtype a model quantized with ``mode`` runs its activations (norms, attention, KV) in."""
    return torch.float32 if mode == "w8a8" else ACTIVATION_DTYPE


def check_quantization(quantization: Optional[str]) -> Optional[str]:
    if quantization in (None, "", "none"):
        return None
    if quantization not in QUANTIZATIONS:
        raise InvalidRequestError(
            f"Invalid quantization {quantization!r}; choose one of none, {', '.join(QUANTIZATIONS)}.", param="quantization"
        )
    return quantization


# -- modules ------------------------------------------------------------------------------------------
class Int8Linear(nn.Module):
    """``y = x @ (w_int8 * scale).T + b`` with per-output-channel symmetric int8 weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device: Any = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=ACTIVATION_DTYPE, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=ACTIVATION_DTYPE, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()
        q, scales = quantize_int8_rows(w)
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None)
        mod.weight, mod.scales = q, scales
        if linear.bias is not None:
            mod.bias = linear.bias.detach().to(ACTIVATION_DTYPE)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(ACTIVATION_DTYPE), self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


Int4MatMul = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
INT4_BLOCK = 64  # output channels of the packed layout's blocks: the project's int4 kernels take multiples of it


class Int4Linear(nn.Module):
    """Group-wise asymmetric int4 weights (``group_size`` along the input), packed for the CPU kernel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = INT4_GROUP_SIZE, device: Any = None) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of the int4 group size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group_size, out_features, 2, dtype=ACTIVATION_DTYPE, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=ACTIVATION_DTYPE, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> "Int4Linear":
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        q, sz = quantize_int4_groups(linear.weight.detach().float(), group_size)
        mod.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        mod.scales_and_zeros = sz
        if linear.bias is not None:
            mod.bias = linear.bias.detach().to(ACTIVATION_DTYPE)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.through(x, None)

    def through(self, x: torch.Tensor, matmul: Optional[Int4MatMul]) -> torch.Tensor:
        """``forward`` with ``matmul(x [M, in] bfloat16, weight, scales_and_zeros, group_size)`` ->
        ``[M, out]`` in place of torch's packed int4 kernel (None: torch's)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(ACTIVATION_DTYPE)
        if matmul is not None:
            y = matmul(x2, self.weight, self.scales_and_zeros, self.group_size)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group_size}"


class Int4Through:
    """An ``Int4Linear`` computed by another kernel on its packed weights (``Int4Linear.through``):
    the engine's runner calls these for an int4 model's prefill forwards, and the module itself,
    on torch's int4 kernel, for its decode steps."""

    __slots__ = ("linear", "matmul")

    def __init__(self, linear: Int4Linear, matmul: Int4MatMul) -> None:
        self.linear, self.matmul = linear, matmul

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear.through(x, self.matmul)


def int4_through(module: Any, matmul: Int4MatMul) -> Any:
    """``module`` computed by ``matmul`` if it is an ``Int4Linear`` whose output channels fill the
    packed layout's blocks (what the project's int4 kernels take), else ``module`` itself."""
    if isinstance(module, Int4Linear) and module.out_features % INT4_BLOCK == 0:
        return Int4Through(module, matmul)
    return module


class W8A8Linear(nn.Module):
    """``y = x @ w.T + b`` with 8- or 7-bit (``w8a8_weight_max``) per-output-channel weights and each row of ``x`` quantized
    to u8 at run time with a scale of its own, through FBGEMM's dynamic int8 linear.

    FBGEMM picks one scale for the whole input; dividing every row by its largest magnitude and
    appending a bounds row ``[-1, 1, 0, ...]`` makes that scale the same for every batch, so a
    row's result depends only on that row (greedy text alone = in a batch). ``smooth`` (per input
    channel, ones when not calibrated) multiplies the input; the weight was divided by it. The FBGEMM-packed
    weight is built on first use from the ``weight``/``scales`` buffers (which are what is saved
    and handed between processes)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device: Any = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float32, device=device) if bias else None)
        self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32, device=device))
        self._packed: Any = None
        self._bounds: Optional[torch.Tensor] = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, smooth: Optional[torch.Tensor] = None) -> "W8A8Linear":
        w = linear.weight.detach().float()
        if smooth is not None:
            w = w / smooth[None, :]
        top = w8a8_weight_max()
        scales = (w.abs().amax(dim=1) / top).clamp(min=1e-8)
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None)
        mod.weight = torch.round(w / scales[:, None]).clamp(-top, top).to(torch.int8)
        mod.scales = scales
        if linear.bias is not None:
            mod.bias = linear.bias.detach().float()
        if smooth is not None:
            mod.smooth = smooth.float().contiguous()
        return mod

    def _pack(self) -> Any:
        packed = _fbgemm_pack(self.weight, self.scales)
        bounds = torch.zeros(1, self.in_features)
        bounds[0, 0], bounds[0, 1 % self.in_features] = -1.0, 1.0
        self._bounds, self._packed = bounds, packed
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed if self._packed is not None else self._pack()
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x2 = x2.float() * self.smooth
        top = x2.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30)  # 4-6x faster than vector_norm(inf) at 16 rows
        y = torch.ops.quantized.linear_dynamic(torch.cat([x2 / top, self._bounds]), packed, False)[:-1].mul_(top)
        if self.bias is not None:
            y = y + self.bias
        y = y.view(*shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def drop_packed(self) -> None:
        """Free the FBGEMM copy of the weights (rebuilt on the next call)."""
        self._packed = self._bounds = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_packed"] = state["_bounds"] = None  # rebuilt on first use where the module lands
        return state

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8"


class Int8Embedding(nn.Module):
    """Token embedding with int8 rows and per-row scales, dequantized on lookup."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device: Any = None,
                 dtype: torch.dtype = ACTIVATION_DTYPE) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=dtype, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[ids].to(self.scales.dtype)
        return rows * self.scales[ids].unsqueeze(-1)


# -- math -----------------------------------------------------------------------------------------------
def quantize_int8_rows(w: torch.Tensor, dtype: torch.dtype = ACTIVATION_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``w ≈ q * scale[:, None]``."""
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales.to(dtype)


def quantize_int4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of ``group_size`` inputs: ``w ≈ (q - 8) * scale + zero``.

    Returns ``q`` as int32 ``[N, K]`` in 0..15 and ``scales_and_zeros`` ``[K/group, N, 2]``."""
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    q = torch.round((g - lo.unsqueeze(2)) / scale.unsqueeze(2)).clamp(0, 15)
    zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
    sz = torch.stack([scale, zero], dim=2).transpose(0, 1).contiguous().to(ACTIVATION_DTYPE)
    return q.reshape(n, k).to(torch.int32), sz


# -- swapping ---------------------------------------------------------------------------------------------
def _targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every Linear in the decoder layers plus the output head."""
    out = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                out.append((parent, name, child))
    return out


def quantize_model(model: nn.Module, mode: str, calibration: Optional[torch.Tensor] = None) -> nn.Module:
    """Swap ``model``'s Linear layers and embedding for quantized ones, in place; return it.
    ``calibration`` (token ids [1, n]) smooths w8a8's activations (``smoothing.py``)."""
    mode = check_quantization(mode)
    tied = _is_tied(model)
    head = model.get_output_embeddings()
    targets = _targets(model)
    smooth = {}
    if mode == "w8a8" and calibration is not None:
        smooth = smoothing_factors(model, targets, calibration)
    for parent, name, linear in targets:
        cls = _module_class(mode, linear, head)
        setattr(parent, name, cls.from_linear(linear, smooth.get(linear)) if cls is W8A8Linear else cls.from_linear(linear))
    _quantize_embedding(model, tied, mode)
    dtype = activation_dtype(mode)
    for mod in model.modules():  # norms and anything else left in float: the activations' dtype
        for pname, p in list(mod.named_parameters(recurse=False)):
            p.data = p.data.to(dtype)
    model.config.dtype = str(dtype).removeprefix("torch.")
    return model


def _module_class(mode: str, linear: nn.Linear, head: Optional[nn.Module]) -> type:
    """The quantized module a Linear becomes: in int4 mode the output head stays int8 (shared with
    the embedding; its error reaches every logit directly), as does a Linear whose input is not a
    whole number of int4 groups."""
    if mode == "w8a8":
        return W8A8Linear
    if linear is head or mode == "int8" or linear.in_features % INT4_GROUP_SIZE:
        return Int8Linear
    return Int4Linear


def _is_tied(model: nn.Module) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return bool(getattr(model.config, "tie_word_embeddings", False)) and head is not None and head.weight is emb.weight


def _quantize_embedding(model: nn.Module, tied: bool, mode: str) -> None:
    """The int8 token table: the int8 head's own tensor when the two are tied, else rows of its
    own (w8a8's head has rows of its own range)."""
    emb = model.get_input_embeddings()
    new = Int8Embedding(emb.num_embeddings, emb.embedding_dim, dtype=activation_dtype(mode))
    head = model.get_output_embeddings()
    if tied and isinstance(head, Int8Linear):
        new.weight, new.scales = head.weight, head.scales  # one int8 tensor for both
    else:
        new.weight, new.scales = quantize_int8_rows(emb.weight.detach().float(), activation_dtype(mode))
    model.set_input_embeddings(new)


def _skeleton(config: Any, mode: str) -> nn.Module:
    """The quantized module tree on the meta device, ready for ``load_state_dict(assign=True)``."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=activation_dtype(mode))
    head = model.get_output_embeddings()
    for parent, name, linear in _targets(model):
        cls = _module_class(mode, linear, head)
        setattr(parent, name, cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta"))
    emb = model.get_input_embeddings()
    model.set_input_embeddings(Int8Embedding(emb.num_embeddings, emb.embedding_dim, device="meta", dtype=activation_dtype(mode)))
    return model


# -- cache on disk ------------------------------------------------------------------------------------------
def cache_folder(model_folder: Path, mode: str, key: str = "") -> Path:
    """``quant-<mode>[-<key>]/`` inside a converted model's cache folder; for a user's own folder
    (which we do not write into) a folder of the same name under the models cache."""
    from .registry import models_dir

    name = f"quant-{mode}" + (f"-{key}" if key else "")
    model_folder = Path(model_folder).resolve()
    root = models_dir().resolve()
    if root in model_folder.parents:
        return model_folder / name
    digest = hashlib.sha256(str(model_folder).encode()).hexdigest()[:12]
    return root / "quantized" / f"{model_folder.name}-{digest}" / name


def fingerprint(model_folder: Path, manifest: dict) -> str:
    """What the quantized weights were made from: the GGUF's sha256 when the folder is a
    conversion, else the names, sizes and times of the folder's weight files."""
    if manifest.get("source_sha256"):
        return str(manifest["source_sha256"])
    parts = sorted(
        f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}"
        for f in Path(model_folder).iterdir() if f.suffix in (".safetensors", ".bin")
    )
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _manifest(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _pins(mode: str, source_fingerprint: str) -> dict[str, Any]:
    """What cached tensors of ``mode`` depend on beyond their own file: the manifest records it
    and a cache whose record differs is quantized again. w8a8: the smoothing (alpha and
    calibration text) and the weight range this CPU's FBGEMM multiplies without saturating. int4:
    the CPU kernel set the packing is for (torch packs int4 differently for AVX512, AVX2 and its
    default kernels, and reads another set's packing as other weights)."""
    return {
        "format_version": QUANT_FORMAT_VERSION,
        "quantization": mode,
        "source_fingerprint": source_fingerprint,
        "smoothing": smoothing_key() if mode == "w8a8" else None,
        "w8a8_weight_max": w8a8_weight_max() if mode == "w8a8" else None,
        "int4_layout": torch.backends.cpu.get_cpu_capability() if mode == "int4" else None,
        "torch": torch.__version__,
    }


def cache_is_valid(folder: Path, mode: str, source_fingerprint: str) -> bool:
    m = _manifest(folder)
    return bool(m and all(m.get(k) == v for k, v in _pins(mode, source_fingerprint).items())
                and (folder / "model.safetensors").is_file())


def save_quantized(model: nn.Module, folder: Path, mode: str, source_fingerprint: str) -> None:
    """Write the quantized state dict and a manifest atomically into ``folder``."""
    from safetensors.torch import save_file

    with atomic_folder(folder) as tmp:
        tmp.mkdir(parents=True)
        state = {}
        seen: set[tuple] = set()
        for name, t in model.state_dict().items():
            key = (t.data_ptr(), t.dtype, tuple(t.shape))
            if key in seen:  # tied tensors are stored once
                continue
            seen.add(key)
            state[name] = t.contiguous()
        save_file(state, str(tmp / "model.safetensors"))
        manifest = {
            **_pins(mode, source_fingerprint),
            "int4_group_size": INT4_GROUP_SIZE,
            "activation_dtype": str(activation_dtype(mode)).removeprefix("torch."),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))


def load_quantized(config: Any, folder: Path, mode: str) -> nn.Module:
    """Build the quantized model from a cache folder without touching fp32 weights."""
    from safetensors import safe_open

    model = _skeleton(config, mode)
    state = {}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            # the packed kernels use aligned vector loads: a tensor that sits at an odd offset of a
            # file buffer crashes them, so give every tensor its own (64-byte aligned) storage
            state[name] = t if t.data_ptr() % 64 == 0 else t.clone()
    model.load_state_dict(state, strict=False, assign=True)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if _tied_config(config) and isinstance(head, Int8Linear):
        head.weight, head.scales = emb.weight, emb.scales
    inner = model.model
    inner.rotary_emb = type(inner.rotary_emb)(config=config)  # non-persistent buffers: rebuild on CPU
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise RuntimeError(f"quantized cache {folder} lacks tensors: {missing[:3]}")
    return model.eval()


def _tied_config(config: Any) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def load_or_quantize(folder: Path, config: Any, mode: str, manifest: dict, load_float: Any, key: str = "") -> nn.Module:
    """The quantized model for ``folder``: from its cache, else ``load_float()`` quantized and cached."""
    from filelock import FileLock

    qfolder = cache_folder(folder, mode, key)
    source_fp = fingerprint(folder, manifest)
    qfolder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(qfolder) + ".lock"):
        if cache_is_valid(qfolder, mode, source_fp):
            log.info("loading %s weights from %s", mode, qfolder)
            return load_quantized(config, qfolder, mode)
        log.info("quantizing to %s (cached in %s)", mode, qfolder)
        calibration = calibration_ids(folder) if mode == "w8a8" else None
        model = quantize_model(load_float(), mode, calibration)
        try:
            save_quantized(model, qfolder, mode, source_fp)
        except OSError as exc:  # a read-only cache still gives a working model
            log.warning("could not cache quantized weights in %s: %s", qfolder, exc)
            return model.eval()
    # reload from the cache so the float weights are gone from memory, as on every later load
    del model
    return load_quantized(config, qfolder, mode)


def bitsandbytes_config(mode: str) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``mode`` (CUDA only)."""
    if mode == "w8a8":
        raise InvalidRequestError("w8a8 quantization runs on the CPU (FBGEMM); on CUDA choose int8 or int4.", param="quantization")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise InvalidRequestError(
            "Quantization on CUDA needs bitsandbytes: pip install bitsandbytes.", param="quantization"
        ) from exc
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
