"""The Ray actor around a :class:`~workers.stage_runner.StageRunner`: thin, verbs only.

It runs with two concurrent calls allowed, so that the coordinator can gather
metrics and checkpoints while ``run`` is busy in the other thread.
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from dni.config import Config, config_from_dict
from workers.plan import Plan, build_runner
from workers.stage_runner import StageRunner
from workers.transport import free_port


@ray.remote(max_concurrency=2)
class StageActor:
    """One replica of one stage, on the device its placement bundle gives it."""

    def __init__(self, cfg: dict[str, Any], rank: int, plan: Plan) -> None:
        self.cfg: Config = config_from_dict(cfg)
        self.rank, self.plan = rank, plan
        gpus = ray.get_gpu_ids()
        self.device = torch.device("cuda:0") if gpus and torch.cuda.is_available() else torch.device("cpu")
        torch.set_num_threads(max(1, int(self.cfg.runtime.cpus_per_stage)))
        self.runner: StageRunner | None = None

    def resources(self) -> dict[str, Any]:
        """Where this worker runs: node IP, GPU ids Ray gave it, and its torch device."""
        return {"node": ray.util.get_node_ip_address(), "gpu_ids": ray.get_gpu_ids(), "device": str(self.device)}

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port, for the process group to meet at."""
        return ray.util.get_node_ip_address(), free_port()

    def connect(self, init_method: str) -> None:
        """Join the process group and build the stage (all actors call this together)."""
        # Ray gives a worker whole GPUs of its own (CUDA_VISIBLE_DEVICES), or none.
        self.runner = build_runner(self.cfg, self.plan, self.rank, init_method=init_method, device=self.device,
                                   own_gpu=self.device.type == "cuda")

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

