"""lm-eval (EleutherAI's harness, a client nobody here wrote) against a real ``llamawrapper serve``.

Runs the offline multiple-choice task in ``bench/lm_eval_tasks`` twice: with lm-eval's
``local-completions`` model, which scores every choice through ``/v1/completions`` with
``echo`` + ``logprobs`` (the prompt's log-probabilities), and with lm-eval's own ``hf`` model
(transformers in-process) on the same weights; then compares the per-choice log-likelihoods.

    python -m bench.lm_eval_server [--lm-eval-path DIR] [--out bench/results/lm_eval.json]

``--lm-eval-path``: a folder holding lm-eval and its dependencies (``pip install --target DIR
lm-eval``) when it is not installed in this environment. Everything runs offline.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .served import ServeProcess

TASKS = Path(__file__).parent / "lm_eval_tasks"


def _samples(folder: str) -> tuple[dict[int, list[float]], dict[int, float]]:
    path = glob.glob(f"{folder}/**/samples_*.jsonl", recursive=True)[0]
    rows = [json.loads(line) for line in open(path)]
    return {r["doc_id"]: [float(x[0][0]) for x in r["resps"]] for r in rows}, {r["doc_id"]: r["acc"] for r in rows}


def _lm_eval(model: str, model_args: str, out: str, env: dict) -> float:
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", "capitals_local",
           "--include_path", ".", "--output_path", out, "--log_samples", "--device", "cpu", "--batch_size", "1"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=TASKS, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lm-eval-path", default=None)
    ap.add_argument("--out", default="bench/results/lm_eval.json")
    args = ap.parse_args()
    from llamawrapper.models import loading, registry

    folder = str(loading.convert_gguf(registry.resolve("smollm2"), progress=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.lm_eval_path:
        env["PYTHONPATH"] = args.lm_eval_path + os.pathsep + env.get("PYTHONPATH", "")
    tmp = tempfile.mkdtemp(prefix="lm-eval-")
    server = ServeProcess(["smollm2"], Path(tmp) / "server.log")
    port = server.port
    try:
        server.wait_ready(300)
        served_s = _lm_eval("local-completions", f"model=smollm2,base_url=http://127.0.0.1:{port}/v1/completions,"
                            f"tokenizer_backend=huggingface,tokenizer={folder},num_concurrent=1,max_retries=1",
                            f"{tmp}/server", env)
    finally:
        server.stop()
    hf_s = _lm_eval("hf", f"pretrained={folder},dtype=float32", f"{tmp}/hf", {**env, "OMP_NUM_THREADS": "2"})
    (served, served_acc), (hf, hf_acc) = _samples(f"{tmp}/server"), _samples(f"{tmp}/hf")
    diffs = [abs(a - b) for k in served for a, b in zip(served[k], hf[k])]
    report = {
        "task": "capitals_local", "documents": len(served), "choices_scored": len(diffs),
        "acc_server": sum(served_acc.values()) / len(served_acc), "acc_hf": sum(hf_acc.values()) / len(hf_acc),
        "max_abs_loglikelihood_diff": max(diffs), "seconds_server": round(served_s, 1), "seconds_hf": round(hf_s, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
