"""Turning the systems' results into the verdict: ratios against the targets (issues 3 and 5), a
Markdown table of the figures, and the PNG plot (throughput and p99 latency vs concurrency)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

BASE = "engine"


def emit_json(doc: dict, path: Optional[str] = None) -> None:
    """Write ``doc`` to ``path`` (indented) when one is given, and print it on one line: the
    output of the benches that end with their JSON on stdout."""
    import json

    if path:
        Path(path).write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc))


def _w(results: dict, system: str, workload: str) -> Optional[dict]:
    r = results.get(system)
    if not r or r.get("status") != "ok":
        return None
    return r.get("workloads", {}).get(workload)


def _tps(results: dict, system: str, workload: str) -> Optional[float]:
    w = _w(results, system, workload)
    return w.get("tokens_per_s") if w else None


def _cpu_tps(results: dict, system: str, workload: str) -> Optional[float]:
    """Tokens per CPU-second of the system's own process (robust to other load on the machine)."""
    w = _w(results, system, workload)
    if not w or not w.get("cpu_s") or w.get("extrapolated"):
        return None
    return w["new_tokens_total"] / w["cpu_s"]


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _row(name: str, value: Optional[float], target: Optional[str], check: Callable[[float], bool] | None,
         cpu_value: Optional[float] = None, note: str = "") -> dict[str, Any]:
    met = None if value is None or check is None else bool(check(value))
    return {"name": name, "value": value, "cpu_time_value": cpu_value, "target": target, "met": met, "note": note}


def ratios(results: dict) -> list[dict[str, Any]]:
    """Every target as a row: its measured ratio (wall clock), the same ratio in tokens per CPU-second, met?"""
    rows = []
    seq, pad, cpp = "hf_sequential", "hf_padded", "llamacpp"
    rows.append(_row("W2 engine / one generate per request", _ratio(_tps(results, BASE, "w2"), _tps(results, seq, "w2")), ">= 8",
                     lambda v: v >= 8, _ratio(_cpu_tps(results, BASE, "w2"), _cpu_tps(results, seq, "w2"))))
    rows.append(_row("W2 engine / padded batch", _ratio(_tps(results, BASE, "w2"), _tps(results, pad, "w2")), ">= 2",
                     lambda v: v >= 2, _ratio(_cpu_tps(results, BASE, "w2"), _cpu_tps(results, pad, "w2"))))
    rows.append(_row("W1 engine / generate", _ratio(_tps(results, BASE, "w1"), _tps(results, seq, "w1")), ">= 1.0",
                     lambda v: v >= 1.0, _ratio(_cpu_tps(results, BASE, "w1"), _cpu_tps(results, seq, "w1"))))
    prefix = _w(results, BASE, "prefix") or {}
    rows.append(_row("TTFT cached ~300-token prefix / uncached (p50)", prefix.get("cached_over_uncached"), "<= 0.25",
                     lambda v: v <= 0.25))
    if prefix:
        peak, budget = prefix.get("cache_peak_bytes"), prefix.get("cache_budget_bytes")
        rss = _w(results, BASE, "rss") or {}
        peak = max(peak or 0, (rss.get("engine") or {}).get("prefix_cache_peak_bytes") or 0)
        rows.append(_row("prefix cache peak / budget", _ratio(peak, budget), "<= 1.0", lambda v: v <= 1.0,
                         note=f"peak {peak / 2**20:.1f} MiB of {budget / 2**20:.0f} MiB"))
    rss = _w(results, BASE, "rss")
    if rss:  # flat: raw growth within tolerance, or explained by the caches' own (budgeted) growth
        raw, net, tol = rss["rss_growth_mb"], rss["rss_growth_net_of_caches_mb"], rss["tolerance_mb"]
        rows.append(_row(f"RSS growth over requests {rss['rss_baseline_at_request']}..{rss['requests']} (MiB)", raw,
                         f"<= {tol:.0f} (flat)", lambda v, t=tol, n=net: v <= t or n <= t,
                         note=f"raw {raw:.1f} MiB, net of prefix/slot cache growth {net:.1f} MiB"))
    for wl_name in ("w1", "w2", "w3"):
        rows.append(_row(f"{wl_name.upper()} engine / llama.cpp", _ratio(_tps(results, BASE, wl_name), _tps(results, cpp, wl_name)),
                         None, None, _ratio(_cpu_tps(results, BASE, wl_name), _cpu_tps(results, cpp, wl_name))))
    for name in results:  # engine variants (quantization=, dtype=): issue 5's targets against the fp32 engine
        if name == BASE or not name.startswith("engine:"):
            continue
        q = "int4" if "int4" in name else "int8" if "int8" in name else None
        w1_target = {"int8": (">= 1.6", lambda v: v >= 1.6), "int4": (">= 2.0", lambda v: v >= 2.0)}.get(q, (None, None))
        rows.append(_row(f"W1 {name} / engine", _ratio(_tps(results, name, "w1"), _tps(results, BASE, "w1")), *w1_target))
        rows.append(_row(f"W1 {name} / llama.cpp", _ratio(_tps(results, name, "w1"), _tps(results, cpp, "w1")), None, None))
        rows.append(_row(f"W2 {name} / engine", _ratio(_tps(results, name, "w2"), _tps(results, BASE, "w2")),
                         ">= 1.0" if q == "int8" else None, (lambda v: v >= 1.0) if q == "int8" else None))
        a, b = (results.get(name) or {}), (results.get(BASE) or {})
        load = _ratio((a.get("rss_after_load_mb") or 0) - (a.get("rss_before_load_mb") or 0),
                      (b.get("rss_after_load_mb") or 0) - (b.get("rss_before_load_mb") or 0))
        rows.append(_row(f"RSS added by load {name} / engine", load, "<= 0.4" if q == "int8" else None,
                         (lambda v: v <= 0.4) if q == "int8" else None))
    return rows


def _agree(a: list[int], b: Optional[list[int]]) -> Optional[int]:
    if not b:
        return None
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def markdown(doc: dict) -> str:
    """The tables that go into docs/BENCHMARKS.md."""
    results = doc["systems"]
    lines = ["| system | W1 tok/s | W2 tok/s | W2 TTFT p50 / p99 (s) | W2 latency p50 / p99 (s) | W3 tok/s | W3 TTFT p50 (s) | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('status')}: {r.get('reason', '')[:90]} |||||||")
            continue
        w1, w2, w3 = (_w(results, name, k) or {} for k in ("w1", "w2", "w3"))
        star = "*" if w2.get("extrapolated") else ""
        lines.append(
            f"| {name} | {_f(w1.get('tokens_per_s'))} | {_f(w2.get('tokens_per_s'))}{star} | "
            f"{_f(w2.get('ttft_p50_s'), '{:.2f}')} / {_f(w2.get('ttft_p99_s'), '{:.2f}')}{star} | "
            f"{_f(w2.get('latency_p50_s'), '{:.2f}')} / {_f(w2.get('latency_p99_s'), '{:.2f}')}{star} | "
            f"{_f(w3.get('tokens_per_s'))} | {_f(w3.get('ttft_p50_s'), '{:.2f}')} | {_f(r.get('peak_rss_mb'), '{:.0f}')} |")
    levels = sorted({p["concurrency"] for name in results for p in ((_w(results, name, "sweep") or {}).get("points") or [])})
    if levels:
        lines += ["", "Sweep (W2 at each concurrency): aggregate tokens/s, p99 latency (s); * = partly extrapolated", ""]
        lines.append("| system | " + " | ".join(f"c={c}" for c in levels) + " |")
        lines.append("|---|" + "---|" * len(levels))
    for name in results if levels else []:
        pts = {p["concurrency"]: p for p in ((_w(results, name, "sweep") or {}).get("points") or [])}
        cells = [f"{_f(pts[c]['tokens_per_s'])} tok/s, {_f(pts[c]['latency_p99_s'], '{:.1f}')} s{'*' if pts[c]['extrapolated'] else ''}"
                 if c in pts else "–" for c in levels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| ratio | measured (wall clock) | same in tokens per CPU-second | target | met |", "|---|---|---|---|---|"]
    for row in doc["ratios"]:
        met = {True: "yes", False: "**no**", None: "–"}[row["met"]]
        lines.append(f"| {row['name']} | {_f(row['value'], '{:.2f}')} {row['note']} | {_f(row['cpu_time_value'], '{:.2f}')} | "
                     f"{row['target'] or 'info'} | {met} |")
    ref = (_w(results, "hf_sequential", "w1") or {}).get("token_ids")
    if ref:
        same = {name: _agree(ref, (_w(results, name, "w1") or {}).get("token_ids")) for name in results if name != "hf_sequential"}
        lines += ["", "Greedy W1 tokens equal to hf_sequential's (leading tokens): " + ", ".join(
            f"{name} {n}/{len(ref)}" for name, n in same.items() if n is not None) + "."]
    prefix = _w(results, BASE, "prefix")
    if prefix:
        lines += ["", f"Engine extras: TTFT p50 uncached {prefix['uncached_ttft_p50_s']:.3f} s vs cached "
                  f"{prefix['cached_ttft_p50_s']:.3f} s ({prefix['shared_prefix_tokens']} shared of "
                  f"~{prefix['prompt_tokens_mean']:.0f} prompt tokens); W2 with arrivals staggered "
                  f"{doc['settings']['stagger_ms']:.0f} ms apart: {_f(prefix['w2_staggered']['tokens_per_s'])} tok/s, "
                  f"TTFT p99 {_f(prefix['w2_staggered']['ttft_p99_s'], '{:.2f}')} s; W2 with the system prompt already cached: "
                  f"{_f(prefix['w2_system_prompt_cached']['tokens_per_s'])} tok/s, TTFT p99 "
                  f"{_f(prefix['w2_system_prompt_cached']['ttft_p99_s'], '{:.2f}')} s."]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> Optional[Path]:
    """Throughput and p99 latency against concurrency, one line per system; hollow = extrapolated."""
    if not any((_w(doc["systems"], name, "sweep") or {}).get("points") for name in doc["systems"]):
        return None  # nothing to draw without the sweep
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in doc["systems"].items():
        pts = sorted(((_w(doc["systems"], name, "sweep") or {}).get("points") or []), key=lambda p: p["concurrency"])
        if not pts:
            continue
        xs = [p["concurrency"] for p in pts]
        for ax, key in ((ax1, "tokens_per_s"), (ax2, "latency_p99_s")):
            line, = ax.plot(xs, [p[key] for p in pts], marker="o", label=name)
            ext = [(p["concurrency"], p[key]) for p in pts if p["extrapolated"]]
            if ext:
                ax.scatter(*zip(*ext), s=80, facecolors="white", edgecolors=line.get_color(), zorder=3)
    for ax, title in ((ax1, "aggregate tokens/s (higher is better)"), (ax2, "p99 request latency, s (lower is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"concurrent W2 requests ({doc['settings']['w2_new_tokens']} new tokens each)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    fig.suptitle(f"{doc['model']} on {doc['machine']['cpu_model']} ({doc['machine']['nproc']} cores); hollow = extrapolated", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
