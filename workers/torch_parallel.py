"""The race's torch.distributed contestants: what a user would pick instead of decoupling.

* :func:`train_ddp`: DistributedDataParallel over gloo on K processes, each with a whole copy of
  the model computing 1/K of the global batch, gradients all-reduced in the backward;
* :func:`train_pipelined`: a synchronous pipeline from ``torch.distributed.pipelining``, one
  process per stage, GPipe over ``micro_batches`` micro-batches (the gradient of the global batch's
  mean loss, then one optimiser step per stage).

For a fair race both share with the other contestants what the race fixes: the data and batch
order (:class:`~dni.schedule.EpochBatches`: every rank draws the same global batch), the initial
weights (the model factory, same seed), the optimiser, learning rate and schedule
(:func:`dni.stage.lr_factor`), the global batch, the budget and the evaluation points
(:class:`~dni.schedule.Schedule`). One torch thread per process, as a stage worker has. Rank 0
evaluates the test split at the schedule's evaluation points with the clock stopped (the pipeline's
ranks first send it their stages' weights), so the seconds are training seconds from the first
step, as the trainer and the runtime report them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dni.build import stage_options
from dni.config import Config
from dni.data import iterate_batches, load_splits
from dni.evaluation import EvalSums
from dni.losses import resolve_loss
from dni.models import build_stages
from dni.optim import set_lr
from dni.schedule import EpochBatches, Schedule
from dni.stage import lr_factor
from dni.trainer import Budget

Step = Callable[[torch.Tensor, torch.Tensor], None]
"""One rank's part of a training step on the global batch (x, y): forward, backward, all-reduce or
pipeline sends; the optimiser step comes after it."""


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
        torch.multiprocessing.ProcessRaisedException: a worker process failed (its error is in the message).
    """
    if cfg.train.batch_size % workers:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {workers} DDP workers")
    return _spawn(cfg, "ddp", workers, 1, out)


def train_pipelined(cfg: Config, *, micro_batches: int, out: Path) -> dict[str, Any]:
    """Train ``cfg``'s model as a GPipe pipeline of its stages, one process each; rank 0 writes
    ``out`` (JSON, as :func:`train_ddp`'s, with ``micro_batches``).

    Raises:
        ValueError: a global batch that ``micro_batches`` does not divide.
    """
    if cfg.train.batch_size % micro_batches:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible into {micro_batches} micro-batches")
    return _spawn(cfg, "pipeline", num_stages(cfg), micro_batches, out)


def num_stages(cfg: Config) -> int:
    """Stages of the configured model (a custom one's are counted by building it)."""
    if cfg.model.num_stages is not None:
        return cfg.model.num_stages
    splits = load_splits(cfg.data, seed=cfg.seed)
    return len(build_stages(cfg.model, splits.train.input_shape, splits.train.num_classes, seed=cfg.seed))


def _spawn(cfg: Config, kind: str, workers: int, micro_batches: int, out: Path) -> dict[str, Any]:
    port = free_port()
    mp.spawn(_worker, args=(workers, port, cfg.to_dict(), kind, micro_batches, str(out)), nprocs=workers, join=True)
    result = json.loads(out.read_text())
    result["micro_batches"] = micro_batches if kind == "pipeline" else None
    return result


def _worker(rank: int, workers: int, port: int, cfg_dict: dict[str, Any], kind: str, micro_batches: int, out: str) -> None:
    from dni.config import config_from_dict

    cfg = config_from_dict(cfg_dict)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=workers)
    try:
        result = _train(cfg, rank, workers, kind, micro_batches)
        if rank == 0:
            Path(out).write_text(json.dumps(result) + "\n")
    finally:
        dist.destroy_process_group()


def _train(cfg: Config, rank: int, workers: int, kind: str, micro_batches: int) -> dict[str, Any]:
    splits = load_splits(cfg.data, seed=cfg.seed)
    budget = Budget.of(cfg, len(splits.train))
    schedule = Schedule.of(cfg, budget.total_steps, budget.steps_per_epoch)
    stages = build_stages(cfg.model, splits.train.input_shape, splits.train.num_classes, seed=cfg.seed)
    model = nn.Sequential(*stages)  # rank 0 evaluates this; a pipeline rank trains only stages[rank] of it
    loss_fn = resolve_loss(cfg.model.loss)
    step, params, gather = (_ddp_step(model, loss_fn, rank, workers) if kind == "ddp"
                            else _pipeline_step(stages, loss_fn, rank, workers, micro_batches, cfg.train.batch_size))
    optimizer = stage_options(cfg, budget.total_steps).optimizer.build(params, cfg.train.lr)  # a stage's optimiser
    t = cfg.train
    batches = EpochBatches(splits.train, t.batch_size, cfg.seed)
    curve: list[tuple[int, float, float, float]] = []
    train_seconds, started = 0.0, time.perf_counter()
    for g in range(budget.total_steps):
        set_lr(optimizer, t.lr * lr_factor(t.schedule, g, budget.total_steps, t.warmup))
        optimizer.zero_grad(set_to_none=True)
        step(*batches(g))
        optimizer.step()
        if schedule.evaluates_after(g):
            dist.barrier()  # every rank has finished step g: stop the clock
            train_seconds += time.perf_counter() - started
            gather()
            if rank == 0:
                curve.append((g + 1, train_seconds, *_test_metrics(model, splits.test, loss_fn)))
            dist.barrier()
            started = time.perf_counter()
    return {"curve": curve, "steps": budget.total_steps, "train_seconds": train_seconds, "workers": workers,
            "samples_per_second": budget.total_steps * t.batch_size / train_seconds,
            "final_accuracy": curve[-1][2] if curve else None}


def _ddp_step(model: nn.Module, loss_fn: Any, rank: int, workers: int) -> tuple[Step, list[nn.Parameter], Callable[[], None]]:
    """DDP: this rank's slice of the global batch; the all-reduce happens inside the backward."""
    ddp = nn.parallel.DistributedDataParallel(model)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        share = x.shape[0] // workers
        loss_fn(ddp(x[rank * share:(rank + 1) * share]), y[rank * share:(rank + 1) * share]).backward()

    return step, list(ddp.parameters()), lambda: None  # every rank holds the whole model already


def _pipeline_step(stages: list[nn.Module], loss_fn: Any, rank: int, workers: int, micro_batches: int,
                   batch_size: int) -> tuple[Step, list[nn.Parameter], Callable[[], None]]:
    """GPipe: rank r runs stage r on every micro-batch forward, then backward; the first rank feeds
    the batch, the last computes the loss (a micro-batch mean; the schedule averages the micro-batches)."""
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    if len(stages) != workers:
        raise ValueError(f"a pipeline of {len(stages)} stages needs {len(stages)} processes, got {workers}")
    stage = PipelineStage(stages[rank], rank, workers, torch.device("cpu"))
    pipe = ScheduleGPipe(stage, n_microbatches=micro_batches, loss_fn=loss_fn)
    first, last = rank == 0, rank == workers - 1

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if first and last:
            pipe.step(x, target=y)
        elif first:
            pipe.step(x)
        elif last:
            pipe.step(target=y)
        else:
            pipe.step()

    def gather() -> None:
        """Every rank's stage weights (and BatchNorm statistics) to rank 0's copy of the model."""
        for s in range(1, workers):
            for tensor in [*stages[s].parameters(), *stages[s].buffers()]:
                if rank == s:
                    dist.send(tensor.detach().contiguous(), dst=0)
                elif rank == 0:
                    received = torch.empty_like(tensor)
                    dist.recv(received, src=s)
                    with torch.no_grad():
                        tensor.copy_(received)

    return step, list(stages[rank].parameters()), gather


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


def plain_config(cfg: Config) -> Config:
    """``cfg`` as these contestants run it: plain backprop on the local data, nothing decoupled."""
    return dataclasses.replace(cfg, method="backprop", backend="local", threads=1)
