"""Projected time to a target accuracy on K devices, per rule (see dni/projection.py for the model).

    .venv/bin/python scripts/k_stage_time.py configs/bench/heavy.yaml results/staleness/heavy/staleness.json \
        --targets 0.96,0.97 --hop-ms 1.18 [--stages 2,4,8] [--rules delayed,corrected,local] [overrides] --out DIR

Steps to the target come from ``staleness.json`` (``scripts/staleness_sim.py`` on the same config and
overrides); per-stage work per batch is measured here for each rule at each K, one thread, stages
cut into equal depths as the simulation cut them (single-device backprop: the whole model as one
stage). ``--hop-ms``: one hop of a stage's activation, as ``dni bench`` measures it
(``hop_latency_ms``). Writes ``projection.json`` and ``projection.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dni.config import DEFERRED_METHODS, load_config
from dni.data import load_splits
from dni.data.spec import DataSpec
from dni.projection import Projection, equal_cut, gpipe_step_seconds, pipeline_step_seconds, stage_work, steps_to

MICRO_BATCHES = 4


def curve(rows: dict[str, Any], name: str) -> list[tuple[int, float]]:
    if name not in rows:
        raise SystemExit(f"k_stage_time: the simulation has no row {name!r}; run scripts/staleness_sim.py with "
                         f"these --stages and --rules first")
    return [(int(s), float(a)) for s, a in rows[name]["curve"]]


def sim_row(rule: str, k: int) -> str:
    """The simulation row of ``rule`` at K stages with every stage kept busy."""
    return f"{rule} K={k} (delay {2 * (k - 1)})" if rule in DEFERRED_METHODS else f"{rule} K={k}"


def project(config: str, overrides: list[str], rows: dict[str, Any], *, k: int, rules: list[str], targets: list[float],
            hop: float, data: DataSpec) -> dict[float, list[Projection]]:
    """Per target, the projections of single-device backprop, GPipe and each rule at K stages."""
    base = load_config(config, [*overrides, "threads=1"])
    cut = f"model.boundaries={equal_cut(base.model.depth + 1, k)}"

    def work(method: str, boundaries: str = cut) -> list[float]:
        return stage_work(load_config(config, [*overrides, "threads=1", boundaries, f"method={method}"]), data)

    backprop = work("backprop")
    single = work("backprop", "model.boundaries=[]")  # the whole model as one stage: no per-stage overheads
    contestants = [("backprop, one device", sum(single), curve(rows, "backprop")),
                   (f"GPipe, {MICRO_BATCHES} micro-batches", gpipe_step_seconds(backprop, hop, MICRO_BATCHES),
                    curve(rows, "backprop"))]
    contestants += [(rule, pipeline_step_seconds(work(rule), hop), curve(rows, sim_row(rule, k))) for rule in rules]
    return {t: [Projection(name, step, steps_to(c, t)) for name, step, c in contestants] for t in targets}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("simulation", help="staleness.json of scripts/staleness_sim.py")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--targets", required=True, help="test accuracies, comma-separated, e.g. 0.96,0.97")
    parser.add_argument("--hop-ms", type=float, required=True)
    parser.add_argument("--stages", default="2,4,8")
    parser.add_argument("--rules", default="delayed,corrected,local")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    simulation = json.loads(Path(args.simulation).read_text())
    if args.config not in simulation["command"].split():
        raise SystemExit(f"k_stage_time: {args.simulation} simulated another config ({simulation['command']}); "
                         f"give the staleness.json of scripts/staleness_sim.py {args.config}")
    rows = simulation["rows"]
    cfg = load_config(args.config, args.overrides)
    data = DataSpec.of(load_splits(cfg.data, seed=cfg.seed).train)
    torch.set_num_threads(1)
    targets = [float(t) for t in args.targets.split(",")]
    table: dict[int, dict[float, list[Projection]]] = {}
    for k in (int(s) for s in args.stages.split(",")):
        table[k] = project(args.config, args.overrides, rows, k=k, rules=args.rules.split(","), targets=targets,
                           hop=args.hop_ms / 1000, data=data)
    command = " ".join(["python scripts/k_stage_time.py", args.config, args.simulation, *args.overrides, "--targets",
                        args.targets, "--hop-ms", str(args.hop_ms), "--stages", args.stages, "--rules", args.rules])
    lines = [f"Projected time to a test accuracy on K devices, in this machine's per-stage seconds. `{command}`", "",
             "| target | K | contestant | step (ms) | steps to target | projected seconds | vs one-device backprop |",
             "|---|---|---|---|---|---|---|"]
    for k, by_target in table.items():
        for t, projections in by_target.items():
            single = projections[0].seconds
            for p in projections:
                steps = str(p.steps) if p.steps is not None else "not reached"
                secs = f"{p.seconds:.1f}" if p.steps is not None else "-"
                ratio = f"{single / p.seconds:.2f}x" if p.steps is not None and math.isfinite(single) else "-"
                lines.append(f"| {100 * t:.0f}% | {k} | {p.name} | {1000 * p.step_seconds:.1f} | {steps} | {secs} | {ratio} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "date": time.strftime("%Y-%m-%d")}
    record = {"command": command, "environment": env, "targets": targets, "hop_ms": args.hop_ms,
              "projections": {f"K={k} target={t}": [vars(p) | {"seconds": p.seconds if p.steps is not None else None}
                                                    for p in ps] for k, by_target in table.items() for t, ps in by_target.items()}}
    (out / "projection.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "projection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
