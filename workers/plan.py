"""What every stage worker must agree on, derived once from the config and the data (no Ray)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dni.build import model_stages
from dni.config import Config
from dni.data import load_splits
from dni.data.spec import DataSpec
from dni.data.vocabulary import Vocabulary
from dni.schedule import Schedule
from dni.trainer import Budget
from workers.topology import Topology

if TYPE_CHECKING:
    import torch

    from workers.stage_runner import StageRunner


@dataclass
class Plan:
    """What every worker must agree on, derived once from the config and the data."""

    data: DataSpec
    shapes: list[tuple[int, ...]]
    """Every stage's per-example output shape."""
    topology: Topology
    schedule: Schedule
    vocabulary: Vocabulary | None = None
    """Text data: the characters behind the token ids (saved with the run)."""


def make_plan(cfg: Config) -> Plan:
    """Obtain the data (once, in the driver), build the model once to check it and find its
    shapes, and derive topology and schedule.

    Raises:
        ConfigError, DataError: the model or the data cannot be had as configured.
    """
    splits = load_splits(cfg.data, seed=cfg.seed)
    data = DataSpec.of(splits.train)
    _, shapes = model_stages(cfg, data)
    budget = Budget.of(cfg, len(splits.train))
    topology = Topology(tuple(cfg.replicas(i) for i in range(len(shapes))))
    schedule = Schedule.of(cfg, budget.total_steps, budget.steps_per_epoch)
    return Plan(data, shapes, topology, schedule, splits.vocabulary)


def transport_backend(cfg: Config, device: "torch.device", *, own_gpu: bool) -> str:
    """The configured backend; ``auto`` is NCCL between workers that each own a GPU, else gloo
    (CPU tensors, or GPU tensors staged through host memory when workers share a GPU)."""
    if cfg.runtime.transport != "auto":
        return cfg.runtime.transport
    return "nccl" if device.type == "cuda" and own_gpu else "gloo"


def build_runner(cfg: Config, plan: Plan, rank: int, *, init_method: str, device: "torch.device",
                 own_gpu: bool = False, keep_true_gradients: int = 0) -> "StageRunner":
    """Connect rank ``rank`` to the data plane and build its stage runner.

    Every rank of the plan must call this at about the same time: the process
    group forms when all have joined. Stage 0 (and under ``synthesizer.unlock`` every stage) loads the
    data from ``data.path``.
    """
    from workers.stage_runner import StageRunner
    from workers.transport import Transport

    stage, replica = plan.topology.place(rank)
    transport = Transport(rank, plan.topology.world_size, init_method=init_method,
                          backend=transport_backend(cfg, device, own_gpu=own_gpu), device=device, timeout_s=cfg.runtime.timeout_s)
    datasets = None
    if stage == 0 or cfg.synthesizer.unlock:  # an input-unlocked stage reads its own batches
        splits = load_splits(cfg.data, seed=cfg.seed, download=False)
        datasets = {name: getattr(splits, name).to(device) for name in ("train", "val", "test")}
    runner = StageRunner(cfg, stage, replica, topology=plan.topology, schedule=plan.schedule, transport=transport,
                         data=plan.data, shapes=plan.shapes, device=device, datasets=datasets,
                         keep_true_gradients=keep_true_gradients)
    runner.make_groups()
    return runner
