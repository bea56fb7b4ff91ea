"""Micro-benchmark: fp32 ``F.linear`` against oneDNN prepacked fp32 weights for smollm2's matmul
shapes at 1, 16 and 64 rows, one thread, thread CPU time, interleaved. The measured lever behind
the engine verdict in docs/BENCHMARKS.md (not used by the engine yet).

    python -m bench.prepacked
"""

from __future__ import annotations

import statistics
import time

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in) of smollm2's Linears


def main() -> None:
    import llamawrapper  # noqa: F401  (OpenMP settings before torch loads)
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    print("shape (out x in), rows: plain F.linear vs prepacked oneDNN, median thread-CPU time")
    for out_f, in_f in SHAPES:
        weight = torch.randn(out_f, in_f)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
        for rows in (1, 16, 64):
            x = torch.randn(rows, in_f)
            plain_ns, packed_ns = [], []
            for _ in range(60 if out_f > 10000 else 200):
                t = time.thread_time_ns()
                F.linear(x, weight)
                plain_ns.append(time.thread_time_ns() - t)
                t = time.thread_time_ns()
                torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                packed_ns.append(time.thread_time_ns() - t)
            p, q = statistics.median(plain_ns), statistics.median(packed_ns)
            print(f"{out_f}x{in_f} rows={rows}: plain {p / 1e3:.0f} us, prepacked {q / 1e3:.0f} us, speed-up {p / q:.2f}x")


if __name__ == "__main__":
    main()
