"""``dni bench CONFIG bench.race=true``: who reaches ``bench.target_accuracy`` first, repeated and
interleaved, against what a user would pick instead on the same hardware.

Contestants, on the same data, seed, global batch, budget and evaluation points:

* single-process backprop with one thread, and with every core;
* DDP (:mod:`workers.torch_parallel`): torch's DistributedDataParallel over gloo on as many
  processes as the model has stages, one thread each;
* a synchronous pipeline from ``torch.distributed.pipelining`` (GPipe) on one process per stage,
  with 2 and with 4 micro-batches (the race compares with the better);
* each decoupled rule of ``bench.methods`` (default: the config's ``method``) on the Ray runtime,
  one worker per stage.

Each of ``bench.repeats`` rounds runs every contestant once, in this order (interleaved, so a
machine that slows down mid-bench slows every contestant alike). Seconds are training seconds from
the first step, evaluations excluded. Per contestant the race reports the medians over the
repeats (min and max beside them) of: seconds and steps to the target, training throughput,
final test accuracy, and its test accuracy at the moment the fastest contestant of that round
reached the target.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dni.config import Config
from dni.run import create_run_dir
from dni.trainer import Trainer
from workers.torch_parallel import num_stages, plain_config, train_ddp, train_pipelined

MICRO_BATCHES = (2, 4)
"""The synchronous pipeline's micro-batch counts; the race compares with the better one."""

Curve = list[tuple[int, float, float]]
"""(step, training seconds, test accuracy) at each evaluation."""


def reached(curve: Curve, target: float) -> tuple[int, float] | None:
    """(step, seconds) of the first evaluation at or above ``target``; None if none."""
    for step, seconds, accuracy in curve:
        if accuracy >= target:
            return step, seconds
    return None


def accuracy_at(curve: Curve, seconds: float) -> float | None:
    """The test accuracy of the last evaluation at or before ``seconds`` (None before the first)."""
    before = [accuracy for _, s, accuracy in curve if s <= seconds]
    return before[-1] if before else None


def curve_of(run_dir: Path) -> Curve:
    """The (step, training seconds, test accuracy) of a trainer's or the runtime's run directory."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = {r["step"]: r["time/train_seconds"] for r in rows if r.get("time/train_seconds") is not None}
    accuracy = {r["step"]: r["test/accuracy"] for r in rows if r.get("test/accuracy") is not None}
    return [(s, seconds[s], accuracy[s]) for s in sorted(accuracy) if s in seconds]


def _spread(values: list[float | None]) -> dict[str, float | None]:
    """Median, min and max of the values that exist (None for all three when none does)."""
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(present), "min": min(present), "max": max(present)}


def summarize(rounds: list[dict[str, Curve]], *, target: float, batch_size: int) -> dict[str, dict[str, Any]]:
    """Per contestant, the medians (and min-max) over the rounds.

    Args:
        rounds: per repeat, contestant -> its curve.
        target: the test accuracy raced to.
        batch_size: the global batch, for throughput (samples per training second).

    Returns:
        contestant -> ``seconds``, ``steps``, ``samples_per_second``, ``final_accuracy``,
        ``accuracy_at_first`` (each ``{"median", "min", "max"}``), ``reached`` (in how many rounds).
    """
    out: dict[str, dict[str, Any]] = {}
    for name in rounds[0]:
        seconds: list[float | None] = []
        steps: list[float | None] = []
        throughput: list[float | None] = []
        final: list[float | None] = []
        at_first: list[float | None] = []
        for curves in rounds:
            curve = curves[name]
            hit = reached(curve, target)
            steps.append(float(hit[0]) if hit else None)
            seconds.append(hit[1] if hit else None)
            last_step, last_seconds, last_accuracy = curve[-1]
            throughput.append(last_step * batch_size / last_seconds if last_seconds > 0 else None)
            final.append(last_accuracy)
            firsts = [h[1] for h in (reached(c, target) for c in curves.values()) if h is not None]
            at_first.append(accuracy_at(curve, min(firsts)) if firsts else None)
        out[name] = {"seconds": _spread(seconds), "steps": _spread(steps), "samples_per_second": _spread(throughput),
                     "final_accuracy": _spread(final), "accuracy_at_first": _spread(at_first),
                     "reached": sum(s is not None for s in seconds), "rounds": len(rounds)}
    return out


def verdict(summary: dict[str, dict[str, Any]], rules: list[str]) -> dict[str, Any]:
    """The best decoupled rule (smallest median seconds to the target) and its speed-ups: the
    contestant's median seconds over the rule's (None where either never reached the target)."""
    timed = [(summary[r]["seconds"]["median"], r) for r in rules if summary[r]["seconds"]["median"] is not None]
    if not timed:
        return {"race_best_method": None, "race_speedup_vs_backprop": None, "race_speedup_vs_backprop_all_cores": None,
                "race_speedup_vs_ddp": None, "race_speedup_vs_pipelining": None}
    best_seconds, best = min(timed)

    def speedup(*names: str) -> float | None:
        """The fastest of ``names`` (that reached the target) over the best rule."""
        s = [summary[n]["seconds"]["median"] for n in names if n in summary]
        reached_s = [v for v in s if v is not None]
        return min(reached_s) / best_seconds if reached_s else None

    pipelines = [n for n in summary if n.startswith("pipelining_")]
    return {"race_best_method": best.removeprefix("decoupled_"), "race_speedup_vs_backprop": speedup("backprop_1_thread"),
            "race_speedup_vs_backprop_all_cores": speedup("backprop_all_cores"), "race_speedup_vs_ddp": speedup("ddp"),
            "race_speedup_vs_pipelining": speedup(*pipelines)}


def contestants(cfg: Config, log_dir: str) -> dict[str, Callable[[], Curve]]:
    """Name -> a function that runs the contestant once and returns its curve."""
    from workers.coordinator import Coordinator

    log = dataclasses.replace(cfg.log, dir=log_dir, progress=False)
    k = num_stages(cfg)

    def backprop(threads: int) -> Callable[[], Curve]:
        def run() -> Curve:
            bp = dataclasses.replace(cfg, method="backprop", backend="local", threads=threads,
                                     name=f"{cfg.name}-race-backprop-{threads}t", log=log)
            previous = torch.get_num_threads()
            try:
                run_dir = create_run_dir(bp)
                Trainer(bp, run_dir).fit()
            finally:
                torch.set_num_threads(previous)
            return curve_of(run_dir)
        return run

    def ddp() -> Curve:
        out = Path(log_dir) / f"ddp-{time.time_ns()}.json"
        return [(s, t, a) for s, t, a, _ in train_ddp(plain_config(cfg), workers=k, out=out)["curve"]]

    def pipelined(micro_batches: int) -> Callable[[], Curve]:
        def run() -> Curve:
            out = Path(log_dir) / f"pipeline-{time.time_ns()}.json"
            result = train_pipelined(plain_config(cfg), micro_batches=micro_batches, out=out)
            return [(s, t, a) for s, t, a, _ in result["curve"]]
        return run

    def rule(method: str) -> Callable[[], Curve]:
        def run() -> Curve:
            dec = dataclasses.replace(cfg, method=method, backend="ray", name=f"{cfg.name}-race-{method}", log=log)
            run_dir = create_run_dir(dec)
            Coordinator(dec, run_dir).run()
            return curve_of(run_dir)
        return run

    out: dict[str, Callable[[], Curve]] = {"backprop_1_thread": backprop(1), "backprop_all_cores": backprop(os.cpu_count() or 1),
                                           "ddp": ddp, **{f"pipelining_gpipe_{m}": pipelined(m) for m in MICRO_BATCHES}}
    for method in cfg.bench.methods or [cfg.method]:
        out[f"decoupled_{method}"] = rule(method)
    return out


def race(cfg: Config, log_dir: str) -> dict[str, Any]:
    """Run every contestant ``bench.repeats`` times, interleaved; the summary, verdict and curves."""
    runs = contestants(cfg, log_dir)
    rounds = [{name: run() for name, run in runs.items()} for _ in range(cfg.bench.repeats)]
    summary = summarize(rounds, target=cfg.bench.target_accuracy, batch_size=cfg.train.batch_size)
    rules = [n for n in runs if n.startswith("decoupled_")]
    return {"target_accuracy": cfg.bench.target_accuracy, "repeats": cfg.bench.repeats, "contestants": summary,
            **verdict(summary, rules), "curves": rounds}


LABELS = {"backprop_1_thread": "single-process backprop, 1 thread", "backprop_all_cores": "single-process backprop, all cores",
          "ddp": "DDP (gloo), one process per stage"}


def label(name: str) -> str:
    if name.startswith("pipelining_gpipe_"):
        return f"torch.distributed.pipelining GPipe, {name.rsplit('_', 1)[1]} micro-batches"
    return LABELS.get(name, f"decoupled ({name.removeprefix('decoupled_')}), Ray")


def markdown_lines(race_result: dict[str, Any]) -> list[str]:
    """The race as a table (medians, min-max) and its verdict."""
    target, n = race_result["target_accuracy"], race_result["repeats"]

    def cell(spread: dict[str, float | None], fmt: str) -> str:
        if spread["median"] is None:
            return "not reached"
        return f"{spread['median']:{fmt}} ({spread['min']:{fmt}}-{spread['max']:{fmt}})"

    lines = [f"Race to {100 * target:g}% test accuracy, {n} interleaved repeats, medians (min-max); training seconds "
             "from the first step, evaluations excluded:", "",
             "| contestant | seconds to target | steps to target | samples/s (training) | final test accuracy | "
             "accuracy when the first got there | reached |", "|---|---|---|---|---|---|---|"]
    for name, c in race_result["contestants"].items():
        lines.append(f"| {label(name)} | {cell(c['seconds'], '.1f')} | {cell(c['steps'], '.0f')} | "
                     f"{cell(c['samples_per_second'], '.0f')} | {cell(c['final_accuracy'], '.4f')} | "
                     f"{cell(c['accuracy_at_first'], '.4f')} | {c['reached']}/{c['rounds']} |")
    best = race_result["race_best_method"]
    if best is None:
        return lines + ["", "No decoupled rule reached the target.", ""]

    def ratio(key: str) -> str:
        v = race_result[key]
        return f"{v:.2f}x" if v is not None else "n/a (not reached)"

    return lines + ["", f"Best decoupled rule: **{best}**: {ratio('race_speedup_vs_backprop')} sooner than one-thread "
                        f"backprop, {ratio('race_speedup_vs_backprop_all_cores')} than all-core backprop, "
                        f"{ratio('race_speedup_vs_ddp')} than DDP, {ratio('race_speedup_vs_pipelining')} than the "
                        "better `torch.distributed.pipelining` pipeline (ratios of medians).", ""]


def plot(path: Path, race_result: dict[str, Any]) -> None:
    """Accuracy against training seconds, every contestant, every repeat (the first one solid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(race_result["contestants"]):
        color = f"C{i}"
        for r, curves in enumerate(race_result["curves"]):
            xs = [s for _, s, _ in curves[name]]
            ys = [100 * a for _, _, a in curves[name]]
            ax.plot(xs, ys, color=color, alpha=1.0 if r == 0 else 0.35, label=label(name) if r == 0 else None)
    ax.axhline(100 * race_result["target_accuracy"], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("training seconds")
    ax.set_ylabel("test accuracy %")
    ax.set_ylim(90, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
