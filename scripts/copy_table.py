"""The paper's copy-task table: for each truncation window T, the longest sequence length that plain
truncated BPTT and DNI each learn (results/rnn_copy/).

    .venv/bin/python scripts/copy_table.py [--config configs/copy_lstm.yaml] [--ts 2,3,4,5,8]
        [--methods backprop,dni] [--jobs 2] [--out results/rnn_copy] [overrides ...]

For each (T, method) it trains ``--config`` at sequence lengths N = 1, 2, ... (from ``T - 2`` when
the lengths below are learned, checked going down) until one is not learned: test bits per copied
symbol at or above ``--threshold`` (0.15, the paper's criterion) after the config's budget. Every
run is one ``dni`` training run (one torch thread); ``--jobs`` run side by side. Writes
``results.json`` (every run) and ``table.md``; the README beside them says how they were made.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from dni.config import load_config
from dni.run import create_run_dir
from dni.trainer import Trainer


def train_once(config: str, overrides: list[str]) -> dict[str, Any]:
    """One run of ``config`` with ``overrides``; its summary's figures."""
    cfg = load_config(config, overrides)
    torch.set_num_threads(1)
    summary = Trainer(cfg, create_run_dir(cfg)).fit()
    return {k: summary[k] for k in ("test_bits_per_char", "val_bits_per_char", "test_accuracy", "steps", "wall_seconds")}


def longest_learned(config: str, t: int, method: str, extra: list[str], threshold: float) -> dict[str, Any]:
    """Scan N for one (T, method): returns every run and the longest N learned."""
    runs: dict[int, dict[str, Any]] = {}

    def learned(n: int) -> bool:
        if n not in runs:
            overrides = [*extra, f"method={method}", f"model.bptt={t}", f"data.length={n}", "log.progress=false",
                         f"name=copy-t{t}-n{n}-{method}"]
            runs[n] = train_once(config, overrides)
            runs[n]["learned"] = runs[n]["test_bits_per_char"] < threshold
            print(f"T={t} {method} N={n}: {runs[n]['test_bits_per_char']:.3f} bits/char", flush=True)
        return bool(runs[n]["learned"])

    n = max(1, t - 2)
    while n > 1 and not learned(n):  # below the start: find a length that is learned
        n -= 1
    if n == 1 and not learned(1):
        return {"t": t, "method": method, "longest": 0, "runs": runs}
    while learned(n + 1):
        n += 1
    return {"t": t, "method": method, "longest": n, "runs": runs}


def table(results: list[dict[str, Any]], ts: list[int], methods: list[str]) -> str:
    by = {(r["t"], r["method"]): r["longest"] for r in results}
    head = "| method | " + " | ".join(f"T={t}" for t in ts) + " |"
    lines = [head, "|---" * (len(ts) + 1) + "|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(str(by[(t, m)]) for t in ts) + " |")
    if {"backprop", "dni"} <= set(methods):
        ratio = [by[(t, "dni")] / by[(t, "backprop")] if by[(t, "backprop")] else float("inf") for t in ts]
        lines.append("| dni / backprop | " + " | ".join(f"{r:.2f}x" for r in ratio) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/copy_lstm.yaml")
    parser.add_argument("--ts", default="2,3,4,5,8")
    parser.add_argument("--methods", default="backprop,dni")
    parser.add_argument("--threshold", type=float, default=0.15)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="results/rnn_copy")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied to every run")
    args = parser.parse_args()
    ts, methods = [int(t) for t in args.ts.split(",")], args.methods.split(",")
    start = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(longest_learned, args.config, t, m, args.overrides, args.threshold)
                   for t in ts for m in methods]
        results = [f.result() for f in futures]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["scripts/copy_table.py", f"--config {args.config}", f"--ts {args.ts}",
                        f"--methods {args.methods}", f"--threshold {args.threshold}", *args.overrides])
    meta = {"command": command, "seconds": time.time() - start, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "results": results}
    (out / "results.json").write_text(json.dumps(meta, indent=1) + "\n")
    (out / "table.md").write_text(table(results, ts, methods))
    print(table(results, ts, methods))


if __name__ == "__main__":
    main()
