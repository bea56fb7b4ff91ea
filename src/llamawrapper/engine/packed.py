"""Projections through a faster kernel on weights laid out once for it (issue 14).

float32 and bfloat16 ones through oneDNN (``onednn_linear``):

torch's ``F.linear`` on float32 CPU tensors calls MKL's sgemm, and on bfloat16 ones oneDNN with
the weights reordered on every call. oneDNN's matmul on weights reordered once into its own
blocked layout (the kernel torch's inductor uses for frozen linears) made a float32 decode step
~2x faster on the AVX-512 AMD EPYC this project is benchmarked on, at 1 row and at 16
(docs/BENCHMARKS.md section 13); for bfloat16 it gives the same results as ``F.linear``, sooner.
``packed_linear`` wraps a plain ``nn.Linear`` in a module that calls that kernel; the model's own
module is left as it is (``model(...)``, LoRA, evaluation and export still use it), so the packed
copy costs the weight's memory once more. One packed copy per module, shared by every runner on
the model.

int8 weights (``Int8Linear``: an int8 model's projections, the output head of int8 and int4
models; ``int8_kernel``) through the project's int8 kernel (``csrc/int8_weights.cpp``,
``packed_int8``) on AVX512-BF16 CPUs: torch's int8 kernel read smollm2's 28 MB head at ~25 GB/s at
one row and sums each output across its lanes; the kernel reads the weights in blocks of 64 output
channels, two inputs at a time, as exact bfloat16 values multiplied by the CPU's bfloat16 dot
product: 1.4x to 2.8x torch's int8 kernel at 1 to 256 rows (docs/BENCHMARKS.md section 20). Each
output is the same whatever rows share the call; against torch's kernel it can differ by one
bfloat16 step (another order of the same float32 sum).

float32 weights (a float32 model's plain projections and head; ``f32_kernel``) through the
project's kernel (``csrc/f32_rows.cpp``, ``packed_f32``) on AVX-512 CPUs, in place of oneDNN's:
oneDNN read the weights at ~20 GB/s at one row; the kernel streams each block of 64 output channels
input after input with float32 FMAs, 1.4-1.7x oneDNN at one row and the same at 16 to 256 rows
(docs/BENCHMARKS.md section 21). Each output is the same whatever rows share the call.

bfloat16 weights (a bfloat16 model's plain projections and head; ``bf16_kernel``) through the
project's kernel (``csrc/int8_weights.cpp``'s ``bf16_rows_mm``, ``packed_bf16``) on AVX512-BF16
CPUs, in place of oneDNN's: the same dot products on the same layout as int8 weights, 1.1x to 1.6x
oneDNN's packed bfloat16 matmul at 1 to 256 rows (docs/BENCHMARKS.md section 20).

int4 weights (``Int4Linear``: an int4 model's projections; ``int4_kernel``) through the project's
int4 kernel (``csrc/int4_rows.cpp``, ``packed_int4``) on AVX512-BF16 CPUs: torch's int4 kernel
dequantizes every weight to float32 with a multiply-add before it multiplies it by each row; the
kernel turns each weight into an exact bfloat16 ``q - 8`` by a table lookup and multiplies two
input features at once with the CPU's bfloat16 dot product, then scales each group's sum: 1.3x
(one row, weights from memory) to 2.3x torch's kernel at 1 to 256 rows, and faster than unpacking the weights for a bfloat16 GEMM up to
a 256-row prefill chunk (docs/BENCHMARKS.md section 20). Each output is the same whatever rows share
the call.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
from torch import nn

# the batch size oneDNN packs the weights for: one layout serves every row count (in a probe,
# packing for 16 rows was as fast as packing for 1 at one row, and 1.3x faster at 16)
PACK_ROWS = 16
DTYPES = (torch.float32, torch.bfloat16)

# per module, per kind of copy: the weight it was made from and the copy
_PACKED: "weakref.WeakKeyDictionary[nn.Module, dict[type, tuple[torch.Tensor, nn.Module]]]" = weakref.WeakKeyDictionary()


def available() -> bool:
    """Whether torch has oneDNN's packed-linear kernels (CPU builds with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """``linear(x)`` through oneDNN, on a packed copy of ``linear``'s weight (float32 or bfloat16, CPU)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_version = linear.weight._version  # a weight changed in place is packed again
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_ROWS)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class RowsKernelLinear(nn.Module):
    """A projection through one of the project's kernels on a copy of its weights (``packed`` and,
    per kind, ``_operands``): ``[..., in]`` -> ``[..., out]`` in ``ROWS`` (the rows' dtype), plus its bias."""

    ROWS = torch.bfloat16
    LOOP_KIND = -1  # the kernel's number in csrc/decode_layers.cpp (``Projection::Kind``)

    def __init__(self, linear: nn.Module, mm: Callable[..., torch.Tensor], packed: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_version = linear.weight._version  # a weight changed in place is laid out again
        self.mm = mm
        # buffers: a compiled decode step takes their shapes as static, as the model's own
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def _operands(self) -> tuple:
        """What the kernel takes after the rows: the laid-out weights, then the kind's own."""
        return (self.packed,)

    def loop_spec(self) -> tuple:
        """This projection as ``DecodeLayers`` takes it: (kind, packed, the kind's scales or None,
        int4's group size or 0, bias or None)."""
        packed, *extra = self._operands()
        return (self.LOOP_KIND, packed, extra[0] if extra else None, extra[1] if len(extra) > 1 else 0, self.bias)

    def _bind(self) -> None:
        # the eager path's call, in plain attributes: a module's buffers are read through
        # nn.Module.__getattr__, and with the reshape, dtype and layout calls a one-row call cost
        # 16 µs against the kernel's 8 (a 576 x 576 int4 projection); the kernels take [..., in]
        self._call = (self.mm, self._operands(), self.bias)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202  (a buffer moved or cast: bind the new ones)
        out = super()._apply(fn, recurse)
        self._bind()
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # no hooks: these copies are the engine's own
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        # traced (the compiled step): the buffers themselves, whose shapes it takes as static
        mm, operands, bias = (self.mm, self._operands(), self.bias) if torch.compiler.is_compiling() else self._call
        y = mm(x if x.dtype == self.ROWS else x.to(self.ROWS), *operands)
        return y if bias is None else y + bias


class PackedInt8Linear(RowsKernelLinear):
    """``Int8Linear`` (``x @ (w_int8 * scale).T + b``, bfloat16 out) through ``int8_rows_mm`` on a copy
    of its weights in blocks of 64 output channels."""

    LOOP_KIND = 2

    def __init__(self, linear: nn.Module, mm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        with torch.no_grad():
            super().__init__(linear, mm, torch.ops.llamawrapper.int8_weight_blocks(linear.weight.detach()))
        # float32 once here, so the kernel does not widen them at every call (49,152 for the head, each step)
        self.register_buffer("scales", linear.scales.detach().float(), persistent=False)
        self._bind()

    def _operands(self) -> tuple:
        return self.packed, self.scales


class PackedBf16Linear(RowsKernelLinear):
    """A bfloat16 ``nn.Linear`` through ``bf16_rows_mm`` on a copy of its weight in blocks of 64 output
    channels, two inputs at a time (``bf16_weight_blocks``)."""

    LOOP_KIND = 1

    def __init__(self, linear: nn.Linear, mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        with torch.no_grad():
            super().__init__(linear, mm, torch.ops.llamawrapper.bf16_weight_blocks(linear.weight.detach()))
        self._bind()


class PackedF32Linear(RowsKernelLinear):
    """A float32 ``nn.Linear`` through ``f32_rows_mm`` on a copy of its weight in blocks of 64 output
    channels, input after input (``f32_weight_blocks``)."""

    LOOP_KIND = 0

    ROWS = torch.float32

    def __init__(self, linear: nn.Linear, mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        with torch.no_grad():
            super().__init__(linear, mm, torch.ops.llamawrapper.f32_weight_blocks(linear.weight.detach()))
        self._bind()


class PackedInt4Linear(RowsKernelLinear):
    """``Int4Linear`` (``x @ ((q - 8) * scale + zero).T + b`` per group of inputs, bfloat16 out) through
    ``int4_rows_mm`` on a copy of its weights in pairs of input features (``int4_weight_pairs``)."""

    LOOP_KIND = 3

    def __init__(self, linear: nn.Module, mm: Callable[..., torch.Tensor]) -> None:
        N, K, G = linear.out_features, linear.in_features, linear.group_size
        with torch.no_grad():
            # the weights' values 0..15 out of torch's packed layout, by the unpacker of int4_weights.cpp
            # with scale 1 and zero 8 (w = (q - 8) * 1 + 8)
            unit = torch.stack([torch.ones(K // G, N), torch.full((K // G, N), 8.0)], dim=2).to(torch.bfloat16)
            q = torch.ops.llamawrapper.int4_weight_bf16(linear.weight, unit, G).t()
            super().__init__(linear, mm, torch.ops.llamawrapper.int4_weight_pairs(q))
            # [K / G, N, 2] -> [N / 64, K / G, 2, 64] bfloat16 (the model's own values): a block's scales
            # and zeros group after group
            sz = linear.scales_and_zeros.to(torch.bfloat16).view(K // G, N // 64, 64, 2).permute(1, 0, 3, 2).contiguous()
        self.group_size = G
        self.register_buffer("scales_and_zeros", sz, persistent=False)
        self._bind()

    def _operands(self) -> tuple:
        return self.packed, self.scales_and_zeros, self.group_size


def packed_bytes(modules: "list[Optional[nn.Module]]") -> int:
    """Bytes of the copies among ``modules`` (each counted once): the packed weights, and the kernels'
    scales and zeros laid out for them; a bias is the model's own tensor, not a copy."""
    seen = {id(m): m for m in modules if isinstance(m, (PackedLinear, RowsKernelLinear))}
    return sum(t.numel() * t.element_size() for m in seen.values()
               for t in ([m.packed] if isinstance(m, PackedLinear) else [b for n, b in m.named_buffers() if n != "bias"]))


def packed_linear(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """``module`` packed for oneDNN if it is a plain float32/bfloat16 CPU ``nn.Linear`` (not a subclass,
    so LoRA-wrapped and quantized projections keep their own forward), else ``module`` itself."""
    if type(module) is not nn.Linear or module.weight.dtype not in DTYPES or module.weight.device.type != "cpu":
        return module
    return _once(module, PackedLinear, lambda: PackedLinear(module))


def _plain(module: Optional[nn.Module], dtype: torch.dtype) -> bool:
    """A plain (not a subclass) CPU ``nn.Linear`` of ``dtype`` whose output channels fill blocks of 64."""
    return (type(module) is nn.Linear and module.weight.dtype == dtype and module.weight.device.type == "cpu"
            and module.out_features % 64 == 0)


def _through(module: Optional[nn.Module], eligible: bool, kernel: Callable[[], Optional[Callable]], kind: type) -> Optional[nn.Module]:
    """``module``'s copy of ``kind`` (made once) if it is ``eligible`` and ``kernel()`` (the operator,
    None where it does not run) runs here, else ``module`` itself."""
    mm = kernel() if eligible else None
    return module if mm is None else _once(module, kind, lambda: kind(module, mm))


def packed_f32(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """``module`` through the project's float32 kernel if it is a plain float32 CPU ``nn.Linear`` (not a
    subclass) whose output channels come in blocks of 64, and the kernel runs here (AVX-512), else ``module``."""
    from . import kernels

    return _through(module, _plain(module, torch.float32), kernels.f32_rows_mm, PackedF32Linear)


def packed_int8(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """``module`` through the project's int8 kernel if it is an ``Int8Linear`` on the CPU whose output
    channels come in blocks of 64 and inputs in pairs, and the kernel runs here (AVX512-BF16), else ``module``."""
    from ..models.quantization import Int8Linear
    from . import kernels

    eligible = (type(module) is Int8Linear and module.out_features % 64 == 0 and module.in_features % 2 == 0
                and module.weight.device.type == "cpu")
    return _through(module, eligible, kernels.int8_rows_mm, PackedInt8Linear)


def packed_bf16(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """``module`` through the project's bfloat16 kernel if it is a plain bfloat16 CPU ``nn.Linear`` (not a
    subclass) whose output channels come in blocks of 64 and inputs in pairs, and the kernel runs here
    (AVX512-BF16), else ``module``."""
    from . import kernels

    eligible = _plain(module, torch.bfloat16) and module.in_features % 2 == 0
    return _through(module, eligible, kernels.bf16_rows_mm, PackedBf16Linear)


def packed_int4(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """``module`` through the project's int4 kernel if it is an ``Int4Linear`` on the CPU whose output
    channels come in blocks of 64 and whose groups are even, and the kernel runs here (AVX512-BF16,
    torch's packed layout as the unpacker reads it), else ``module``."""
    from ..models.quantization import Int4Linear
    from . import kernels

    eligible = (type(module) is Int4Linear and module.out_features % 64 == 0 and module.group_size % 2 == 0
                and module.weight.device.type == "cpu")
    def kernel() -> Optional[Callable]:  # (int4_prefill_matmul checks torch's packed layout, which the copy is read out of)
        mm = kernels.int4_rows_mm()
        return mm if mm is not None and kernels.int4_prefill_matmul() is not None else None

    return _through(module, eligible, kernel, PackedInt4Linear)


def _once(module: nn.Module, kind: type, pack: Callable[[], nn.Module]) -> nn.Module:
    """``module``'s copy of ``kind``: the one made before, unless its weight changed since, else ``pack()``
    (a bfloat16 module may have oneDNN's copy for one runner and the project's kernel's for another)."""
    copies = _PACKED.setdefault(module, {})
    hit = copies.get(kind)
    if hit is not None and hit[0] is module.weight and hit[1].weight_version == module.weight._version:
        return hit[1]
    packed = pack()
    copies[kind] = (module.weight, packed)
    return packed
