"""The project's matmul kernels against the ones they replace, one smollm2 layer's four projections
at a time (fused q/k/v 960 x 576, o 576 x 576, fused gate/up 3,072 x 576, down 576 x 1,536), over
30 layers' weights in turn, as a decode step reads them (issue 14; docs/BENCHMARKS.md section 20):

- int4: torch's ``_weight_int4pack_mm_for_cpu`` against ``int4_rows_mm``;
- int8: torch's ``_weight_int8pack_mm`` against ``int8_rows_mm``;
- bf16: oneDNN's packed matmul (``packed.PackedLinear``) against ``bf16_rows_mm``;
- f32: oneDNN's packed matmul against ``f32_rows_mm``.

Each pair takes turns ``--rounds`` times; the figure is the median µs a layer. Random weights,
quantized as the project quantizes them; the two sides' outputs are checked to agree first.

    PYTHONPATH=src:. python -m bench.kernels [--rows 1,4,16,41,256] [--layers 30] [--json PATH]
    PYTHONPATH=src:. python -m bench.kernels --calls    # one module call against its operator alone
    PYTHONPATH=src:. python -m bench.kernels --attention 1000 [--threads 1]   # the attention kernel alone

``--attention N``: the project's prefill attention (``prefill_attention``: RoPE, the cache write,
each token over its prompt up to itself) over an N-token prompt in the engine's chunks of 256, for
smollm2's 30 layers (9 query heads, 3 KV heads, head_dim 64), float32 or ``--dtype bfloat16``;
the median ms of ``--rounds`` and the GFLOP/s of its two passes (docs/BENCHMARKS.md section 24).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch

from bench.report import emit_json

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # (out, in) of a smollm2 layer's projections


def _layers(kind: str, n: int) -> list[list[tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]]]:
    """``n`` layers of (theirs, ours) for each projection of ``kind``."""
    from llamawrapper.engine import packed
    from llamawrapper.models.quantization import Int4Linear, Int8Linear

    out = []
    for i in range(n):
        pairs = []
        for j, (N, K) in enumerate(SHAPES):
            torch.manual_seed(i * 10 + j)
            linear = torch.nn.Linear(K, N, bias=False)
            if kind == "int4":
                theirs: Any = Int4Linear.from_linear(linear)
                ours = packed.packed_int4(theirs)
            elif kind == "int8":
                theirs = Int8Linear.from_linear(linear)
                ours = packed.packed_int8(theirs)
            elif kind == "f32":
                theirs, ours = packed.PackedLinear(linear), packed.packed_f32(linear)
            else:
                linear = linear.to(torch.bfloat16)
                theirs, ours = packed.PackedLinear(linear), packed.packed_bf16(linear)
            if ours is theirs or type(ours) is torch.nn.Linear:
                raise SystemExit(f"the project's {kind} kernel does not run here (it needs AVX-512, AVX512-BF16 but for f32, and g++)")
            pairs.append((theirs, ours))
        out.append(pairs)
    return out


def measure(kind: str, rows: list[int], layers: int, rounds: int) -> dict[str, Any]:
    stack = _layers(kind, layers)
    res: dict[str, Any] = {}
    with torch.inference_mode():
        for M in rows:
            xs = [torch.randn(M, K).to(torch.float32 if kind == "f32" else torch.bfloat16) for _, K in SHAPES]
            for (theirs, ours), x in zip(stack[0], xs):  # the two sides agree (within bfloat16 rounding)
                a, b = theirs(x).float(), ours(x).float()
                if (a - b).abs().max() > 2 ** -6 * a.abs().max():
                    raise SystemExit(f"{kind}: the kernel's output is not the reference's at {M} rows")
            times: dict[str, list[float]] = {"reference": [], "kernel": []}
            reps = max(1, 64 // M)
            for _ in range(rounds):
                for side, label in ((0, "reference"), (1, "kernel")):
                    t = time.perf_counter()
                    for _ in range(reps):
                        for layer in stack:
                            for pair, x in zip(layer, xs):
                                pair[side](x)
                    times[label].append((time.perf_counter() - t) / reps / layers * 1e6)
            ref, ker = statistics.median(times["reference"]), statistics.median(times["kernel"])
            res[str(M)] = {"reference_us": round(ref, 1), "kernel_us": round(ker, 1), "speedup": round(ref / ker, 2)}
    return res


def calls(kind: str, n: int = 20000) -> dict[str, Any]:
    """µs of one call at one row of a 576 x 576 projection of ``kind``: the module as the runner calls
    it (on a decode step's [1, 1, 576]) and its operator alone (on [1, 576]); the difference is the
    Python around the kernel."""
    import timeit

    (_, ours), = [pair for pair in _layers(kind, 1)[0] if pair[1].in_features == pair[1].out_features]
    dtype = ours.ROWS
    x = torch.randn(1, 1, 576).to(dtype)
    operands, x2 = ours._operands(), x.view(1, 576)
    with torch.inference_mode():
        module = min(timeit.repeat(lambda: ours(x), number=n, repeat=3)) / n * 1e6
        operator = min(timeit.repeat(lambda: ours.mm(x2, *operands), number=n, repeat=3)) / n * 1e6
    return {"module_us": round(module, 2), "operator_us": round(operator, 2)}


def attention(tokens: int, rounds: int, dtype: torch.dtype, chunk: int = 256, layers: int = 30) -> dict[str, Any]:
    """ms of the prefill attention of a ``tokens``-token prompt, chunk after chunk, over ``layers``
    layers' caches (smollm2's heads; random activations)."""
    from llamawrapper.engine import kernels

    kernel = kernels.load()
    if kernel is None:
        raise SystemExit("the kernels did not build here")
    H, KVH, D = 9, 3, 64
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(1, tokens, (H + 2 * KVH) * D, generator=gen).to(dtype)
    pos = torch.arange(tokens)
    angle = pos.view(tokens, 1).float() * torch.rand(1, D, generator=gen) * 0.1
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    caches = [(torch.zeros(KVH, tokens, D, dtype=dtype), torch.zeros(KVH, tokens, D, dtype=dtype)) for _ in range(layers)]
    parts = [(y[:, a : a + chunk].contiguous(), cos[a : a + chunk].contiguous(), sin[a : a + chunk].contiguous(),
              torch.zeros(min(chunk, tokens - a), dtype=torch.long), pos[a : a + chunk].contiguous()) for a in range(0, tokens, chunk)]

    def once() -> float:
        t = time.perf_counter()
        for yc, c, s, seq, p in parts:
            for k, v in caches:
                kernels.prefill_attention(kernel, yc, c, s, [k], [v], seq, p, H)
        return time.perf_counter() - t

    once()
    ms = statistics.median(once() for _ in range(rounds)) * 1000
    flops = 4 * H * D * layers * tokens * (tokens + 1) / 2  # scores and weighted sums, each token over its prompt so far
    return {"tokens": tokens, "dtype": str(dtype).replace("torch.", ""), "ms": round(ms, 1), "gflop_s": round(flops / ms / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="int4,int8,bf16,f32")
    ap.add_argument("--rows", default="1,4,16,41,256")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--calls", action="store_true", help="instead: µs of one module call at one row against its operator alone")
    ap.add_argument("--attention", type=int, default=0, help="instead: the prefill attention kernel over a prompt of this many tokens")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="with --attention")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.attention:
        r = attention(args.attention, args.rounds, getattr(torch, args.dtype))
        print(f"prefill attention, {r['tokens']} tokens ({r['dtype']}, {args.threads} threads): {r['ms']} ms, {r['gflop_s']} GFLOP/s")
        emit_json({"threads": args.threads, "attention": r}, args.json)
        return
    if args.calls:
        out_calls = {kind: calls(kind) for kind in args.kinds.split(",")}
        print("| kind | module call µs | operator alone µs |\n|---|---|---|")
        for kind, r in out_calls.items():
            print(f"| {kind} | {r['module_us']} | {r['operator_us']} |", flush=True)
        emit_json({"threads": args.threads, "calls": out_calls}, args.json)
        return
    rows = [int(r) for r in args.rows.split(",")]
    refs = {"int4": "torch int4", "int8": "torch int8", "bf16": "oneDNN bf16", "f32": "oneDNN f32"}
    out: dict[str, Any] = {"threads": args.threads, "layers": args.layers, "rounds": args.rounds, "kinds": {}}
    print("| kind | rows | reference µs/layer | kernel µs/layer | speedup |\n|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        out["kinds"][kind] = measure(kind, rows, args.layers, args.rounds)
        for M, r in out["kinds"][kind].items():
            print(f"| {kind} ({refs[kind]}) | {M} | {r['reference_us']} | {r['kernel_us']} | {r['speedup']}× |", flush=True)
    emit_json(out, args.json)


if __name__ == "__main__":
    main()
