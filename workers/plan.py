"""What every stage worker must agree on, derived once from the config and the data (no Ray)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dni.config import Config
from dni.data import load_dataset
from dni.models import activation_shapes, build_stages
from dni.trainer import Budget
from dni.schedule import Schedule
from workers.topology import Topology

if TYPE_CHECKING:
    import torch

    from workers.stage_runner import StageRunner


@dataclass
class Plan:
    """What every worker must agree on, derived once from the config and the data."""

    in_shape: tuple[int, ...]
    shapes: list[tuple[int, ...]]
    num_classes: int
    topology: Topology
    schedule: Schedule


def make_plan(cfg: Config) -> Plan:
    """Obtain the data (once, in the driver) and derive shapes, topology and schedule."""
    splits = load_dataset(cfg.data.name, cfg.data.path, val_size=cfg.data.val_size, seed=cfg.seed,
                          download=cfg.data.download)
    in_shape = tuple(splits.train.images.shape[1:])
    num_classes = splits.train.num_classes
    shapes = activation_shapes(build_stages(cfg.model, in_shape, num_classes, seed=cfg.seed), in_shape)
    budget = Budget.of(cfg, len(splits.train))
    topology = Topology(tuple(cfg.replicas(i) for i in range(len(shapes))))
    schedule = Schedule.of(cfg, budget.total_steps, budget.steps_per_epoch)
    return Plan(in_shape, shapes, num_classes, topology, schedule)


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
    group forms when all have joined. Stage 0 loads the data from ``data.path``.
    """
    from workers.stage_runner import StageRunner
    from workers.transport import Transport

    stage, replica = plan.topology.place(rank)
    transport = Transport(rank, plan.topology.world_size, init_method=init_method,
                          backend=transport_backend(cfg, device, own_gpu=own_gpu), device=device, timeout_s=cfg.runtime.timeout_s)
    data = None
    if stage == 0:
        splits = load_dataset(cfg.data.name, cfg.data.path, val_size=cfg.data.val_size, seed=cfg.seed, download=False)
        data = {name: getattr(splits, name).to(device) for name in ("train", "val", "test")}
    runner = StageRunner(cfg, stage, replica, topology=plan.topology, schedule=plan.schedule, transport=transport,
                         in_shape=plan.in_shape, shapes=plan.shapes, num_classes=plan.num_classes, device=device,
                         data=data, keep_true_gradients=keep_true_gradients)
    runner.make_groups()
    return runner
