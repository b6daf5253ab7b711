"""The Ray actor around a :class:`~workers.stage_runner.StageRunner`: thin, verbs only.

It runs with two concurrent calls allowed, so that the coordinator can gather
metrics and checkpoints while ``run`` is busy in the other thread.
"""

from __future__ import annotations

import socket
from typing import Any

import ray
import torch

from dni.config import Config, config_from_dict
from dni.data import load_dataset
from workers.schedule import Schedule, Topology
from workers.stage_runner import StageRunner
from workers.transport import Transport


def free_port() -> int:
    """A TCP port that is free on this node now."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@ray.remote(max_concurrency=2)
class StageActor:
    """One replica of one stage, on the device its placement bundle gives it."""

    def __init__(self, cfg: dict[str, Any], stage: int, replica: int, rank: int, topology: Topology, schedule: Schedule,
                 in_shape: tuple[int, ...], shapes: list[tuple[int, ...]], num_classes: int) -> None:
        self.cfg: Config = config_from_dict(cfg)
        self.stage, self.replica, self.rank = stage, replica, rank
        self.topology, self.schedule = topology, schedule
        self.in_shape, self.shapes, self.num_classes = in_shape, shapes, num_classes
        gpus = ray.get_gpu_ids()
        self.device = torch.device("cuda:0") if gpus and torch.cuda.is_available() else torch.device("cpu")
        torch.set_num_threads(max(1, int(self.cfg.runtime.cpus_per_stage)))
        self.runner: StageRunner | None = None

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port, for the process group to meet at."""
        return ray.util.get_node_ip_address(), free_port()

    def connect(self, init_method: str) -> None:
        """Join the process group and build the stage (all actors call this together)."""
        backend = self.cfg.runtime.transport
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        transport = Transport(self.rank, self.topology.world_size, init_method=init_method, backend=backend,
                              device=self.device, timeout_s=self.cfg.runtime.timeout_s)
        data = None
        if self.stage == 0:
            splits = load_dataset(self.cfg.data.name, self.cfg.data.path, val_size=self.cfg.data.val_size,
                                  seed=self.cfg.seed, download=False)
            data = {name: getattr(splits, name).to(self.device) for name in ("train", "val", "test")}
        self.runner = StageRunner(self.cfg, self.stage, self.replica, topology=self.topology, schedule=self.schedule,
                                  transport=transport, in_shape=self.in_shape, shapes=self.shapes,
                                  num_classes=self.num_classes, device=self.device, data=data)
        self.runner.make_groups()

    def measure_hops(self) -> dict[str, float]:
        return self._runner().measure_hops()

    def run(self, start_step: int = 0) -> dict[str, float]:
        runner = self._runner()
        totals = runner.run(start_step)
        totals["bytes_sent"] = runner.transport.bytes_sent
        return totals

    def drain_metrics(self) -> list[tuple[int, dict[str, float]]]:
        return self.runner.drain_metrics() if self.runner is not None else []

    def saved_step(self) -> int | None:
        """The step of the newest state kept at a checkpoint boundary (cheap to ask)."""
        return self.runner.saved[0] if self.runner is not None and self.runner.saved is not None else None

    def saved_state(self) -> tuple[int, dict[str, Any]] | None:
        """The newest state this worker kept at a checkpoint boundary, as (step, state)."""
        return self.runner.saved if self.runner is not None else None

    def close(self) -> None:
        if self.runner is not None:
            self.runner.transport.close()

    def _runner(self) -> StageRunner:
        if self.runner is None:
            raise RuntimeError("connect() first")
        return self.runner

