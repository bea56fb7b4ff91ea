"""The project's C++ kernels (issue 14), built on this machine with torch's ``cpp_extension`` at
the first load of a model (or by ``main``, which make's ``run`` and ``test`` call), cached under
the home (``cache/extensions``, or torch's ``TORCH_EXTENSIONS_DIR`` when set), one build per CPU
capability and torch version:

- ``csrc/decode_attention.cpp``, the decode attention (``attention_kernel``). A decode step's
  attention is one query per row over that row's cached keys; torch's SDPA and matmuls treat it
  as a tiny GEMM per head, and a bfloat16 cache is cast to float32 first. The kernel reads the
  keys and values in place (float32 or bfloat16, widened in registers), 16 keys at a time, with a
  KV head's query heads together, and stops at each row's own length; a row may read the prompt
  prefix it shares with another row from that row (``sharing``). Each row is one task in a fixed
  order, so its result is bit for bit the same alone and in any batch. ``rope_write_attention``
  also does the step's RoPE and cache write in the same call (~40 torch calls a layer fewer).
  ``prefill_attention`` does the same for the tokens of prefill chunks (one sequence's or several
  packed), each token attending over its own sequence up to itself: only the keys the causal mask
  lets it see, where torch's SDPA with a mask computes every score.
- ``csrc/decode_layer.cpp``: a residual add and the RMS norm after it in one call
  (``add_rms_norm``), in decode steps and prefill chunks.
- ``csrc/decode_layers.cpp``: an eager decode step's whole layer loop in one call
  (``DecodeLayers``, the runner's ``kernel_layers``) when every projection of every layer runs
  through one of the matmul kernels below: the same kernel calls as the runner's Python loop,
  without the Python between them.
- ``csrc/int4_weights.cpp``: an int4 model's weights unpacked to bfloat16 for its prefill chunks
  (``int4_prefill_matmul``).
- ``csrc/int8_weights.cpp``: int8 weights in blocks of 64 output channels times bfloat16 rows
  (``int8_rows_mm``), for an int8 model's projections and the int8 output head of int8 and int4
  models (``int8_kernel``, ``packed.py``), and bfloat16 weights (``bf16_rows_mm``, a bfloat16
  model's projections: ``bf16_kernel``), through AVX512-BF16's dot product.
- ``csrc/int4_rows.cpp``: int4 weights in blocks of 64 output channels times bfloat16 rows
  (``int4_rows_mm``), for an int4 model's projections (``int4_kernel``, ``packed.py``), through
  AVX512-BF16's dot product.
- ``csrc/f32_rows.cpp``: float32 weights in blocks of 64 output channels times float32 rows
  (``f32_rows_mm``), for a float32 model's projections and head (``f32_kernel``, ``packed.py``),
  on AVX-512 CPUs.
- ``csrc/team_threads.cpp``: the thread ids of the calling thread's OpenMP team
  (``team_threads``), which ``threads.pin_team`` pins one per CPU.

Without a C++ compiler ``load`` returns None (and says why, once) and the runner keeps torch's
code for all of them (and the threads stay unpinned).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import torch
from filelock import FileLock

from ..config import home_dir

log = logging.getLogger("llamawrapper.engine")

# prefill and decode attention, a residual add + RMS norm, a decode step's layer loop, int4 weights
# unpacked to bfloat16 for prefill, the matmuls, the OpenMP team's thread ids
SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("decode_attention.cpp", "decode_layer.cpp", "decode_layers.cpp", "int4_weights.cpp", "int4_rows.cpp",
                        "int8_weights.cpp", "f32_rows.cpp", "team_threads.cpp")]
DTYPES = (torch.float32, torch.bfloat16)  # of the KV cache
BUILD_TIMEOUT_S = 600  # most time to wait for another process's build
# compiler flags of torch's vector types per CPU capability (what ``at::vec`` is built for)
_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": [],
}

def _headers_flag() -> str:
    """A define naming the csrc headers' contents: torch rebuilds when the sources or the flags change,
    and without it a changed header (``row_tasks.h``) would leave an old build in use."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(SOURCES[0].parent.glob("*.h")))).hexdigest()
    return f"-DLLAMAWRAPPER_HEADERS={digest[:16]}"


_lock = threading.Lock()
_module: Optional[ModuleType] = None
_failed: Optional[str] = None


def capability() -> str:
    """The CPU capability torch dispatches to here, as the build names it."""
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in _FLAGS else "DEFAULT"


def load() -> Optional[ModuleType]:
    """The built kernel (built now if needed, once per process), or None if it cannot be built
    here (the reason is logged once)."""
    global _module, _failed
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        cap = capability()
        name = f"llamawrapper_kernels_{cap.lower()}"
        root = Path(os.environ["TORCH_EXTENSIONS_DIR"]) if os.environ.get("TORCH_EXTENSIONS_DIR") else home_dir() / "cache" / "extensions"
        build = root / f"{name}-torch{torch.__version__.split('+')[0]}"
        try:
            from torch.utils.cpp_extension import load as build_extension

            if shutil.which("ninja") is None:  # the pip package's binary, when the venv is not on PATH
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            build.mkdir(parents=True, exist_ok=True)
            # -ffp-contract=off: RoPE's products and sum rounded one by one, as torch's separate ops round them
            flags = ["-O3", "-fopenmp", "-ffp-contract=off", f"-DCPU_CAPABILITY={cap}", *_FLAGS[cap], _headers_flag()]
            # torch's own lock is a file that a build killed half-way (Ctrl-C, SIGKILL) leaves behind,
            # and every later load would wait on it forever: builds take an OS lock here instead
            # (released when its holder dies), under which torch's file can only be stale
            with FileLock(str(build / "llamawrapper.lock"), timeout=BUILD_TIMEOUT_S):
                (build / "lock").unlink(missing_ok=True)
                if not any(build.glob("*.so")):
                    log.info("building the C++ kernels (attention, norms, int4/int8/bfloat16/float32 matmuls) for this CPU (%s), once: ~2 min on 2 cores", cap)
                _module = build_extension(name, [str(p) for p in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                          build_directory=str(build), verbose=False)
            # the compiled decode step traces the operator: its output's shape, without running it
            torch.library.register_fake("llamawrapper::decode_attention")(lambda q, k, v, lengths: torch.empty_like(q))
            # the matmuls: x [..., K] -> [..., N], N = blocks of 64 output channels
            rows = lambda x, blocks: x.new_empty(*x.shape[:-1], blocks.shape[0] * blocks.shape[2])  # noqa: E731
            torch.library.register_fake("llamawrapper::int8_rows_mm")(lambda x, blocks, scales: rows(x, blocks))
            torch.library.register_fake("llamawrapper::bf16_rows_mm")(rows)
            torch.library.register_fake("llamawrapper::f32_rows_mm")(rows)
            torch.library.register_fake("llamawrapper::int4_rows_mm")(lambda x, blocks, scales_and_zeros, group_size: rows(x, blocks))
        except Exception as exc:  # no compiler or ninja, a failed build: torch's attention instead
            lines = str(exc).strip().splitlines() or [""]
            errors = [line.strip() for line in lines if "error" in line.lower() and "subcommand failed" not in line]
            _failed = f"{type(exc).__name__}: {(errors or lines)[0][:300]}"
            log.warning("the C++ kernels could not be built (%s); prefill and decode use torch's attention and norms, "
                        "int4 prefill torch's int4 kernel "
                        "(it needs g++; `apt-get install g++`)", _failed)
        return _module


Sharing = Optional[tuple[torch.Tensor, torch.Tensor]]


def decode_attention(module: Optional[ModuleType], q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     lengths: torch.Tensor, sharing: Sharing = None) -> torch.Tensor:
    """q [B, H, 1, D] over keys/values [B, KVH, >= max(lengths), D] (views of the slot cache),
    row b over its first ``lengths[b]`` keys -> [B, H, 1, D] in q's dtype, computed in float32.
    ``sharing`` (``src``, ``shared``): row b reads its first ``shared[b]`` positions from row
    ``src[b]``, which holds the same values (``SlotCache.sharing``), so a prompt prefix common to
    many rows is read once from memory; the result is the same as from the row's own copy.
    With ``module`` None it calls the operator (inside a compiled graph; no ``sharing``), else the
    module's binding, which lets other Python threads run meanwhile."""
    B, H, _, D = q.shape
    q32 = q.reshape(B, H, D).float().contiguous()
    if module is None:  # the operator of a compiled graph reads every row's own keys
        out = torch.ops.llamawrapper.decode_attention(q32, keys, values, lengths)
    else:
        out = module.decode_attention(q32, keys, values, lengths, *(sharing or (None, None)))
    return out.view(B, H, 1, D).to(q.dtype)


def rope_write_attention(module: ModuleType, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, positions: torch.Tensor, heads: int, sharing: Sharing = None) -> torch.Tensor:
    """A decode step's attention block after the fused q/k/v projection, in one call: ``y``
    [B, 1, (H + 2 KVH) * D] rotated (q and k, RoPE exactly as torch's ops round it), k and v
    written at each row's position of one layer's slot cache ``[slots, KVH, capacity, D]``, q
    attended over the row's keys so far -> [B, 1, H * D] in y's dtype. The same numbers, bit for
    bit, as ``_rotate``, the cache write and ``decode_attention`` (``sharing`` as there), for ~40
    fewer torch calls a layer."""
    B = y.shape[0]
    D = k_cache.shape[-1]
    out = module.rope_write_attention(y.view(B, -1, D), cos, sin, k_cache, v_cache, positions, heads, *(sharing or (None, None)))
    return out.view(B, 1, heads * D)


def prefill_attention(module: ModuleType, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: list[torch.Tensor],
                      values: list[torch.Tensor], seqs: torch.Tensor, positions: torch.Tensor, heads: int) -> torch.Tensor:
    """A prefill forward's attention block after the fused q/k/v projection, in one call: ``y``
    [1, N, (H + 2 KVH) * D] of N prompt tokens, token n at ``positions[n]`` of sequence ``seqs[n]``,
    whose layer buffers are ``keys``/``values[seqs[n]]`` [KVH, capacity, D]; q and k rotated (as
    ``rope_write_attention`` rotates them), k and v written at the token's position, q attended over
    the sequence's positions up to the token's -> [1, N, H * D] in y's dtype. Each token's result
    is what a decode step at its position computes, in whichever chunk or batch it is prefilled."""
    N = y.shape[1]
    D = keys[0].shape[-1]
    out = module.prefill_attention(y.view(N, -1, D), cos, sin, keys, values, seqs, positions, heads)
    return out.view(1, N, heads * D)


_int4_checked: Optional[bool] = None


def int4_prefill_matmul() -> Optional[Callable[..., torch.Tensor]]:
    """``mm(x [M, in] bfloat16, weight, scales_and_zeros, group_size)`` -> ``[M, out]`` bfloat16
    for ``Int4Linear``'s packed weights: one bfloat16 GEMM over the weight unpacked for the call
    (``int4_weights.cpp``), for the hundreds of rows of a prefill chunk. None on a CPU without
    AVX-512, if the kernels are not built, or if they do not read torch's packed int4 layout here
    as they expect (checked once per process against torch's own kernel)."""
    global _int4_checked
    # measured on AVX-512 only; torch packs int4 in other blocks elsewhere (32 channels on AVX2),
    # and its bfloat16 GEMMs are slow without AVX-512
    if capability() != "AVX512" or load() is None:
        return None
    unpack = torch.ops.llamawrapper.int4_weight_bf16
    if _int4_checked is None:
        g = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (128, 64), generator=g, dtype=torch.int32)
        sz = torch.stack([torch.rand(2, 128, generator=g) / 8 + 0.01, torch.randn(2, 128, generator=g)], dim=2).bfloat16()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        x = torch.randn(3, 64, generator=g).bfloat16()
        try:
            want = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz).float()
            got = torch.mm(x, unpack(packed, sz, 32)).float()
            # within the rounding of the weights to bfloat16 (relative to the largest output)
            _int4_checked = packed.shape == (128, 32) and float((got - want).abs().max()) <= 0.02 * float(want.abs().max())
        except RuntimeError:
            _int4_checked = False
        if not _int4_checked:
            log.warning("torch's packed int4 layout is not the one the int4 unpacker reads here: int4 prefill keeps "
                        "torch's int4 kernel")
    if not _int4_checked:
        return None

    def prefill(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
        return torch.mm(x, unpack(weight, scales_and_zeros, group_size))

    return prefill


def _operator(name: str, bf16: bool) -> Optional[Callable[..., torch.Tensor]]:
    """The kernels' operator ``name``, or None on a CPU without AVX-512 (or, with ``bf16``, without
    AVX512-BF16, whose dot product the operator uses) or if the kernels are not built."""
    if capability() != "AVX512" or (bf16 and not torch.cpu._is_avx512_bf16_supported()) or load() is None:
        return None
    return getattr(torch.ops.llamawrapper, name)


def int8_rows_mm() -> Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
    """``mm(x [..., K] bfloat16, blocks, scales)`` -> ``[..., N]`` bfloat16 for int8 weights laid out by
    ``torch.ops.llamawrapper.int8_weight_blocks`` (``int8_weights.cpp``).
    None on a CPU without AVX512-BF16 (its dot product is the kernel's) or if the kernels are not built."""
    return _operator("int8_rows_mm", bf16=True)


def bf16_rows_mm() -> Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """``mm(x [..., K] bfloat16, blocks)`` -> ``[..., N]`` bfloat16 for bfloat16 weights laid out by
    ``torch.ops.llamawrapper.bf16_weight_blocks`` (``int8_weights.cpp``). None on a CPU without
    AVX512-BF16 or if the kernels are not built."""
    return _operator("bf16_rows_mm", bf16=True)


def f32_rows_mm() -> Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """``mm(x [..., K] float32, blocks)`` -> ``[..., N]`` float32 for float32 weights laid out by
    ``torch.ops.llamawrapper.f32_weight_blocks`` (``f32_rows.cpp``). None on a CPU without AVX-512
    or if the kernels are not built."""
    return _operator("f32_rows_mm", bf16=False)


def int4_rows_mm() -> Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]]:
    """``mm(x [..., K] bfloat16, blocks, scales_and_zeros, group_size)`` -> ``[..., N]`` bfloat16 for int4
    weights laid out by ``torch.ops.llamawrapper.int4_weight_pairs`` (``int4_rows.cpp``). None on a
    CPU without AVX512-BF16 (its dot product is the kernel's) or if the kernels are not built."""
    return _operator("int4_rows_mm", bf16=True)


def main() -> None:
    """Build it now and say where it is (make run / make test), so that no model load waits for the compiler."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module = load()
    print(f"C++ kernels: {module.__file__ if module else 'not built; the engine uses torch attention and norms'}")
