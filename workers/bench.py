"""``dni bench``: throughput of one model three ways, measured side by side in one run.

  (a) single-process backprop on one device (one thread here, as each stage gets),
      and again with all cores, for honesty;
  (b) a locked pipeline on the same K Ray workers: forward through all stages,
      backward through all, no synthesizers (``method: backprop`` on the runtime);
  (c) the decoupled runtime with the config's method.

Throughput of (b) and (c) is the median over logging windows in steady state
(after the warm-up, before the final evaluation), from the last stage's count of
finished samples; busy fractions and idle time come from the same windows.
With ``bench.race=true`` it also races the contestants to an accuracy (:mod:`workers.race`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dni.build import build_pipeline
from dni.config import Config
from dni.data import load_splits
from dni.data.spec import DataSpec
from dni.schedule import EpochBatches
from dni.run import create_run_dir
from workers.race import markdown_lines, plot, race


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    import ray

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "commit": commit, "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
        "cpus": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor() or "unknown",
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def single_process(cfg: Config, *, threads: int) -> dict[str, float]:
    """Samples/s of plain backprop on one device with ``threads`` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        splits = load_splits(cfg.data, seed=cfg.seed)
        bp = dataclasses.replace(cfg, method="backprop")
        total = cfg.bench.warmup + cfg.bench.steps
        torch.manual_seed(cfg.seed)
        pipe = build_pipeline(bp, DataSpec.of(splits.train), total_steps=total, device=torch.device("cpu"))
        batches = EpochBatches(splits.train, cfg.train.batch_size, cfg.seed)
        for g in range(cfg.bench.warmup):
            pipe.train_step(*batches(g))
        start = time.perf_counter()
        for g in range(cfg.bench.warmup, total):
            pipe.train_step(*batches(g))
        seconds = (time.perf_counter() - start) / cfg.bench.steps
    finally:
        torch.set_num_threads(previous)
    return {"samples_per_second": cfg.train.batch_size / seconds, "seconds_per_step": seconds, "threads": threads}


def runtime(cfg: Config, method: str, log_dir: str) -> dict[str, Any]:
    """Samples/s, busy fractions and hops of the Ray runtime running ``method``."""
    from workers.coordinator import Coordinator

    steps = cfg.bench.warmup + cfg.bench.steps
    every = max(1, cfg.bench.steps // 8)
    run_cfg = dataclasses.replace(
        cfg, method=method, backend="ray", name=f"{cfg.name}-{method}",
        train=dataclasses.replace(cfg.train, max_steps=steps, epochs=max(cfg.train.epochs, 1)),
        log=dataclasses.replace(cfg.log, every=every, dir=log_dir, progress=False, grad_every=0),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=0),
    )
    run_dir = create_run_dir(run_cfg)
    summary = Coordinator(run_cfg, run_dir).run()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if cfg.bench.warmup + every <= r["step"] < steps]  # full windows after warm-up, before eval
    k = summary["stages"]
    out = {
        "samples_per_second": _median(steady, "train/samples_per_second"),
        "busy_fraction": {f"stage_{i}": _median(steady, f"stage/busy_fraction/stage_{i}") for i in range(k)},
        "idle_seconds_per_step": {
            f"stage_{i}": _total(steady, f"stage/idle_seconds/stage_{i}") / max(1, every * _count(steady, f"stage/idle_seconds/stage_{i}"))
            for i in range(k)
        },
        "hop_latency_ms": summary["hop_latency_ms"],
        "bytes_per_step": summary["bytes_sent"] / steps,
        "windows": len([r for r in steady if "train/samples_per_second" in r]),
        "setup_seconds": summary["setup_seconds"],
    }
    if method != "backprop":
        out["staleness"] = {f"stage_{i}": _median(steady, f"stage/staleness/stage_{i}") for i in range(k - 1)}
    return out


def _values(rows: list[dict], tag: str) -> list[float]:
    return [r[tag] for r in rows if r.get(tag) is not None]


def _median(rows: list[dict], tag: str) -> float:
    vals = _values(rows, tag)
    return statistics.median(vals) if vals else float("nan")


def _total(rows: list[dict], tag: str) -> float:
    return sum(_values(rows, tag))


def _count(rows: list[dict], tag: str) -> int:
    return len(_values(rows, tag))


def run_bench(cfg: Config, command: str) -> dict[str, Any]:
    """Measure every contestant, write ``<bench.out>/<name>.json`` and ``.md``; return the figures."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(Path(cfg.data.path).resolve())))
    results: dict[str, Any] = {"name": cfg.name, "environment": environment(), "config": cfg.to_dict()}
    results["single_process_1_thread"] = single_process(cfg, threads=1)
    results["single_process_all_cores"] = single_process(cfg, threads=os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        results["locked_pipeline"] = runtime(cfg, "backprop", tmp)
        results["decoupled"] = runtime(cfg, cfg.method, tmp)
        if cfg.bench.race:
            results["race"] = race(cfg, tmp)
    dec = results["decoupled"]["samples_per_second"]
    results["speedup_vs_backprop"] = dec / results["single_process_1_thread"]["samples_per_second"]
    results["speedup_vs_backprop_all_cores"] = dec / results["single_process_all_cores"]["samples_per_second"]
    results["speedup_vs_locked"] = dec / results["locked_pipeline"]["samples_per_second"]
    results["busy_fraction"] = results["decoupled"]["busy_fraction"]
    results["hop_latency_ms"] = results["decoupled"]["hop_latency_ms"]
    out = Path(cfg.bench.out)
    out.mkdir(parents=True, exist_ok=True)
    if "race" in results:
        verdict = {k: v for k, v in results["race"].items() if k.startswith("race_")}
        results.update(verdict)
        plot(out / f"{cfg.name}_race.png", results["race"])
    (out / f"{cfg.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{cfg.name}.md").write_text(markdown(results, command))
    return results


def markdown(r: dict[str, Any], command: str) -> str:
    """The bench as a table, with the environment and the command."""
    cfg, env = r["config"], r["environment"]
    base = r["single_process_1_thread"]["samples_per_second"]
    k = len(r["decoupled"]["busy_fraction"])
    lines = [
        f"# Bench: {r['name']}",
        "",
        f"Model {cfg['model']['kind']}-{cfg['model']['depth']} width {cfg['model']['width']}, {k} stages "
        f"(boundaries {cfg['model']['boundaries']}), batch {cfg['train']['batch_size']}, method {cfg['method']}, "
        f"max_in_flight {cfg['runtime']['max_in_flight']}; {cfg['bench']['steps']} measured steps after "
        f"{cfg['bench']['warmup']} warm-up steps per contestant.",
        "",
        "| contestant | samples/s | vs single-process backprop (1 thread) | busy fraction per stage |",
        "|---|---|---|---|",
    ]
    for key, label in (("single_process_1_thread", "single-process backprop, 1 thread"),
                       ("single_process_all_cores", f"single-process backprop, {env['cpus']} threads"),
                       ("locked_pipeline", f"locked pipeline, {k} Ray workers"),
                       ("decoupled", f"decoupled ({cfg['method']}), {k} Ray workers")):
        c = r[key]
        busy = ", ".join(f"{s}: {v:.2f}" for s, v in c.get("busy_fraction", {}).items()) or "-"
        lines.append(f"| {label} | {c['samples_per_second']:.1f} | {c['samples_per_second'] / base:.2f}x | {busy} |")
    hops = ", ".join(f"{s}: {v:.2f} ms" for s, v in r["hop_latency_ms"].items())
    lines += [
        "",
        f"Decoupled: **{r['speedup_vs_backprop']:.2f}x** single-process backprop (1 thread), "
        f"{r['speedup_vs_backprop_all_cores']:.2f}x with all cores, **{r['speedup_vs_locked']:.2f}x** the locked pipeline. "
        f"Hop latency (one way, activation-sized): {hops}; {r['decoupled']['bytes_per_step'] / 2**20:.1f} MiB sent per step.",
        "",
        f"Environment: commit `{env['commit'][:12]}`, Python {env['python']}, torch {env['torch']}, Ray {env['ray']}, "
        f"{env['cpus']} CPUs ({env['machine']}), GPU: {env['cuda'] or 'none'}, {env['date']}.",
        "",
        *_race_lines(r),
        f"Reproduce: `{command}`",
        "",
    ]
    return "\n".join(lines)


def _race_lines(r: dict[str, Any]) -> list[str]:
    if "race" not in r:
        return []
    return [*markdown_lines(r["race"]), f"Curves: `{r['name']}_race.png`.", ""]
