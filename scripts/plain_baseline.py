"""A user's own model, trained by a plain PyTorch loop and by dni, side by side: results/custom_model/.

    .venv/bin/python scripts/plain_baseline.py configs/custom_resmlp.yaml [overrides] [--out DIR] [--no-ray]

The plain loop is what a user writes without dni: the factory's stages composed into one
``nn.Sequential``, one optimiser over all parameters, ``loss.backward()``, ``step()``. It
shares with dni only what makes the comparison fair: the data (same splits, same batch
order), the model's initial weights (the factory, same seed) and the budget and schedule.
Then ``dni train`` runs the same config with each of ``--methods`` (default backprop and cdni),
on the local backend and (unless ``--no-ray``) on Ray. Writes ``results.json`` and
``README.md`` (table, environment, commands) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dni.cli import run_training
from dni.config import Config, load_config
from dni.data import iterate_batches, load_splits
from dni.evaluation import EvalSums
from dni.losses import resolve_loss
from dni.models import build_stages
from dni.schedule import EpochBatches
from dni.trainer import Budget


def plain_loop(cfg: Config) -> dict[str, Any]:
    """Train the config's model the way a user would without dni; returns test accuracy and time."""
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    splits = load_splits(cfg.data, seed=cfg.seed)
    budget = Budget.of(cfg, len(splits.train))
    model = nn.Sequential(*build_stages(cfg.model, splits.train.input_shape, splits.train.num_classes, seed=cfg.seed))
    params = list(model.parameters())
    optimizer: torch.optim.Optimizer
    if cfg.train.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum, nesterov=cfg.train.nesterov,
                                    weight_decay=cfg.train.weight_decay)
    else:
        kind = torch.optim.Adam if cfg.train.optimizer == "adam" else torch.optim.AdamW
        optimizer = kind(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if cfg.train.schedule != "cosine":
        raise SystemExit("plain_baseline: only train.schedule=cosine is reproduced here")
    total = budget.total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * min(k / total, 1))))
    loss_fn = resolve_loss(cfg.model.loss)
    batches = EpochBatches(splits.train, cfg.train.batch_size, cfg.seed)
    start = time.perf_counter()
    for g in range(total):
        x, y = batches(g)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - start
    model.eval()
    sums = EvalSums(loss_fn)
    with torch.no_grad():
        for x, y in iterate_batches(splits.test, 1024, shuffle=False):
            sums.add(model(x), y)
    return {"test_accuracy": sums.result()["accuracy"], "train_seconds": seconds, "steps": total}


def dni_run(cfg: Config) -> dict[str, Any]:
    _, summary = run_training(cfg, progress=False)
    return {"test_accuracy": summary["test_accuracy"], "train_seconds": summary["wall_seconds"],
            "steps": summary["steps"], "sg_cosine": summary.get("sg_cosine")}


def environment() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    return {"commit": commit, "python": platform.python_version(), "torch": torch.__version__,
            "cpus": __import__("os").cpu_count(), "processor": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d")}


def write_report(out: Path, command: str, cfg: Config, rows: dict[str, dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    (out / "results.json").write_text(json.dumps({"command": command, "environment": env, "results": rows,
                                                  "config": cfg.to_dict()}, indent=2) + "\n")
    plain = rows["plain PyTorch loop"]["test_accuracy"]
    lines = ["| run | test accuracy | vs plain loop (points) | seconds (training) |", "|---|---|---|---|"]
    for name, r in rows.items():
        delta = 100 * (r["test_accuracy"] - plain)
        lines.append(f"| {name} | {100 * r['test_accuracy']:.2f}% | {delta:+.2f} | {r['train_seconds']:.1f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"environment: {env}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", default="results/custom_model")
    parser.add_argument("--no-ray", action="store_true", help="skip the backend=ray runs")
    parser.add_argument("--log-dir", default="runs/custom_model")
    parser.add_argument("--methods", default="backprop,cdni", help="dni methods to run (default: %(default)s)")
    args = parser.parse_args(argv)
    command = " ".join(["python scripts/plain_baseline.py", args.config, *args.overrides])
    base = [*args.overrides, f"log.dir={args.log_dir}", "log.progress=false"]
    cfg = load_config(args.config, base)
    rows = {"plain PyTorch loop": plain_loop(cfg)}
    backends = ["local"] + ([] if args.no_ray else ["ray"])
    for backend in backends:
        for method in args.methods.split(","):
            run_cfg = load_config(args.config, [*base, f"method={method}", f"backend={backend}",
                                                f"name={cfg.name}-{method}-{backend}"])
            rows[f"dni {method}, backend {backend}"] = dni_run(run_cfg)
    write_report(Path(args.out), command, cfg, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
