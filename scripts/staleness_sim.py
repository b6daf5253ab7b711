"""K-stage staleness, simulated in one process: accuracy per step of each rule at K = 2, 4, 8.

    .venv/bin/python scripts/staleness_sim.py configs/bench/heavy.yaml --stages 2,4,8 [--rules delayed,corrected,local,cdni] \
        [overrides] --out DIR

On two cores only K = 2 stages run in parallel, but users run K = 4 to 8 on GPUs. The local
backend reproduces the delays a runtime worker sees (``method: delayed`` applies each batch's
gradient ``runtime.max_in_flight - 1`` steps late, exactly as the stage workers do; a test checks
it), so the effect of K stages on accuracy per step can be measured here without the
parallelism. For each K the model is cut into K stages of equal depth (``model.boundaries``);
the rules with a delay (``delayed``, ``corrected``) run with ``runtime.max_in_flight = K`` (delay
K - 1, one batch in flight per stage) and ``2K - 1`` (delay 2(K - 1): what keeps every stage of
a K-stage pipeline busy when gradients travel back one stage per step); ``cdni`` and ``local``
(nothing waits for a gradient from above) once per K. Backprop is the same at every K. Writes
``staleness.json`` and ``staleness.md`` (test accuracy at each evaluation) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dni.cli import run_training
from dni.config import DEFERRED_METHODS, load_config
from dni.projection import equal_cut

RULES = ("delayed", "corrected", "local", "cdni", "dni")


def accuracy_curve(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["test/accuracy"]) for r in rows if r.get("test/accuracy") is not None]


def run(config: str, overrides: list[str]) -> dict[str, Any]:
    cfg = load_config(config, [*overrides, "backend=local", "log.progress=false", "checkpoint.every=0"])
    run_dir, summary = run_training(cfg, progress=False)
    return {"curve": accuracy_curve(run_dir), "final": summary["test_accuracy"], "seconds": summary["wall_seconds"],
            "run_dir": str(run_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--stages", default="2,4,8")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rules", default="delayed",
                        help=f"comma-separated, of {', '.join(RULES)} (default delayed)")
    args = parser.parse_args(argv)
    rules = args.rules.split(",")
    if not set(rules) <= set(RULES):
        parser.error(f"--rules: each must be one of {', '.join(RULES)} (got {args.rules})")
    base = load_config(args.config, args.overrides)
    layers = base.model.depth + 1
    rows: dict[str, dict[str, Any]] = {"backprop": run(args.config, [*args.overrides, "method=backprop"])}
    for k in (int(s) for s in args.stages.split(",")):
        cut = f"model.boundaries={equal_cut(layers, k)}"
        for rule in rules:
            if rule in DEFERRED_METHODS:
                for in_flight in (k, 2 * k - 1):
                    rows[f"{rule} K={k} (delay {in_flight - 1})"] = run(
                        args.config, [*args.overrides, cut, f"method={rule}", f"runtime.max_in_flight={in_flight}"])
            else:
                rows[f"{rule} K={k}"] = run(args.config, [*args.overrides, cut, f"method={rule}"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"python": platform.python_version(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    command = " ".join(["python scripts/staleness_sim.py", args.config, *args.overrides, "--stages", args.stages,
                        "--rules", args.rules])
    (out / "staleness.json").write_text(json.dumps({"command": command, "environment": env, "rows": rows}, indent=2) + "\n")
    steps = [s for s, _ in rows["backprop"]["curve"]]
    lines = ["| rule | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for name, r in rows.items():
        acc = dict(r["curve"])
        lines.append(f"| {name} | " + " | ".join(f"{100 * acc[s]:.2f}%" if s in acc else "" for s in steps) + " |")
    (out / "staleness.md").write_text(f"Test accuracy at each evaluation. `{command}`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
