"""The race's data-parallel contestant: torch's DistributedDataParallel over gloo on K processes.

What a user would pick instead of a pipeline when the model fits one device: K processes, each with
a whole copy of the model, each computing 1/K of the global batch, gradients all-reduced in the
backward. For a fair race it shares with the other contestants what the race fixes: the data and
batch order (:class:`~dni.schedule.EpochBatches`: every rank draws the same global batch and takes
its slice), the initial weights (the model factory, same seed), the optimiser, learning rate and
schedule (:func:`dni.stage.lr_factor`), the global batch, the budget and the evaluation points
(:class:`~dni.schedule.Schedule`). One torch thread per process, as a stage worker has.

Rank 0 evaluates the test split at the schedule's evaluation points with the clock stopped, so the
seconds are training seconds from the first step, as the trainer and the runtime report them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dni.config import Config
from dni.data import iterate_batches, load_splits
from dni.evaluation import EvalSums
from dni.losses import resolve_loss
from dni.models import build_stages
from dni.optim import OptimizerSpec
from dni.schedule import EpochBatches, Schedule
from dni.stage import lr_factor
from dni.trainer import Budget


def free_port() -> int:
    """A TCP port free on this host now (for the process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_ddp(cfg: Config, *, workers: int, out: Path) -> dict[str, Any]:
    """Train ``cfg``'s model with DDP on ``workers`` processes; rank 0 writes ``out`` (JSON).

    Returns:
        ``{"curve": [(step, train seconds, test accuracy, test loss), ...], "steps", "train_seconds",
        "samples_per_second", "final_accuracy", "workers"}``.

    Raises:
        ValueError: a global batch that ``workers`` does not divide.
        RuntimeError: a worker process failed (its error is in the message).
    """
    if cfg.train.batch_size % workers:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {workers} DDP workers")
    port = free_port()
    mp.spawn(_worker, args=(workers, port, cfg.to_dict(), str(out)), nprocs=workers, join=True)
    return json.loads(out.read_text())


def _worker(rank: int, workers: int, port: int, cfg_dict: dict[str, Any], out: str) -> None:
    from dni.config import config_from_dict

    cfg = config_from_dict(cfg_dict)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=workers)
    try:
        result = _train(cfg, rank, workers)
        if rank == 0:
            Path(out).write_text(json.dumps(result) + "\n")
    finally:
        dist.destroy_process_group()


def _train(cfg: Config, rank: int, workers: int) -> dict[str, Any]:
    splits = load_splits(cfg.data, seed=cfg.seed)
    budget = Budget.of(cfg, len(splits.train))
    schedule = Schedule.of(cfg, budget.total_steps, budget.steps_per_epoch)
    model = nn.Sequential(*build_stages(cfg.model, splits.train.input_shape, splits.train.num_classes, seed=cfg.seed))
    ddp = nn.parallel.DistributedDataParallel(model)
    t = cfg.train
    optimizer = OptimizerSpec(t.optimizer, t.weight_decay, t.momentum if t.optimizer == "sgd" else 0.0,
                              t.nesterov and t.optimizer == "sgd").build(list(ddp.parameters()), t.lr)
    loss_fn = resolve_loss(cfg.model.loss)
    batches = EpochBatches(splits.train, t.batch_size, cfg.seed)
    share = t.batch_size // workers
    curve: list[tuple[int, float, float, float]] = []
    train_seconds, started = 0.0, time.perf_counter()
    for g in range(budget.total_steps):
        x, y = batches(g)
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        for group in optimizer.param_groups:
            group["lr"] = t.lr * lr_factor(t.schedule, g, budget.total_steps, t.warmup)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(ddp(x), y).backward()  # the all-reduce of the gradients happens inside
        optimizer.step()
        if schedule.evaluates_after(g):
            dist.barrier()  # every rank has finished step g: stop the clock
            train_seconds += time.perf_counter() - started
            if rank == 0:
                curve.append((g + 1, train_seconds, *_test_metrics(model, splits.test, loss_fn)))
            dist.barrier()
            started = time.perf_counter()
    return {"curve": curve, "steps": budget.total_steps, "train_seconds": train_seconds, "workers": workers,
            "samples_per_second": budget.total_steps * t.batch_size / train_seconds,
            "final_accuracy": curve[-1][2] if curve else None}


def _test_metrics(model: nn.Module, test: Any, loss_fn: Any) -> tuple[float, float]:
    """(accuracy, loss) on the test split, in eval mode."""
    model.train(False)
    sums = EvalSums(loss_fn)
    with torch.no_grad():
        for x, y in iterate_batches(test, 1024, shuffle=False):
            sums.add(model(x), y)
    model.train(True)
    result = sums.result()
    return float(result["accuracy"]), float(result["loss"])


def ddp_config(cfg: Config) -> Config:
    """``cfg`` as the DDP contestant runs it: plain backprop on the local data, nothing decoupled."""
    return dataclasses.replace(cfg, method="backprop", backend="local", threads=1)
