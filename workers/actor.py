"""The Ray actor around a :class:`~workers.stage_runner.StageRunner`: thin, verbs only.

It runs with two concurrent calls allowed, so that the coordinator can gather
metrics and checkpoints while ``run`` is busy in the other thread.
"""

from __future__ import annotations

import os
from typing import Any

import ray
import torch

from dni.config import Config, config_from_dict
from workers.plan import Plan, build_runner
from workers.stage_runner import StageRunner
from workers.transport import free_port


# The coordinator calls the polled verbs (marked below) every runtime.poll_s for the whole run.
# Ray's GCS keeps an event record of every call; for these that grew its memory by about 2 MiB a
# minute (measured in a soak, results/soak/), so they are left out of Ray's task events.


@ray.remote(max_concurrency=2)  # type: ignore[call-overload]  # ray's overloads omit the actor option
class StageActor:
    """One replica of one stage, on the device its placement bundle gives it."""

    def __init__(self, cfg: dict[str, Any], rank: int, plan: Plan) -> None:
        self.cfg: Config = config_from_dict(cfg)
        self.rank, self.plan = rank, plan
        gpus = ray.get_gpu_ids()
        self.device = torch.device("cuda:0") if gpus and torch.cuda.is_available() else torch.device("cpu")
        torch.set_num_threads(self.cfg.threads or max(1, int(self.cfg.runtime.cpus_per_stage)))
        self.runner: StageRunner | None = None

    @ray.method(enable_task_events=False)  # polled
    def resources(self) -> dict[str, Any]:
        """Where this worker runs: node IP and id, GPU ids Ray gave it, and its torch device."""
        return {"node": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "gpu_ids": ray.get_gpu_ids(), "device": str(self.device)}

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port, for the process group to meet at."""
        return ray.util.get_node_ip_address(), free_port()

    def connect(self, init_method: str) -> None:
        """Join the process group and build the stage (all actors call this together)."""
        # Ray gives a worker whole GPUs of its own (CUDA_VISIBLE_DEVICES), or none.
        self.runner = build_runner(self.cfg, self.plan, self.rank, init_method=init_method, device=self.device,
                                   own_gpu=self.device.type == "cuda")

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from this worker's state in a checkpoint (after :meth:`connect`)."""
        self._runner().restore(state)

    def inject_fault(self, step: int, where: str) -> None:
        """Fault injection for tests and drills (see :meth:`StageRunner.inject_fault`)."""
        self._runner().inject_fault(step, where)

    @ray.method(enable_task_events=False)  # polled
    def pid(self) -> int:
        """This worker's process id (to watch its memory, or to kill it in a drill)."""
        return os.getpid()

    def measure_hops(self) -> dict[str, float]:
        return self._runner().measure_hops()

    def run(self, start_step: int = 0) -> dict[str, float]:
        runner = self._runner()
        totals = runner.run(start_step)
        totals["bytes_sent"] = runner.transport.bytes_sent
        return totals

    @ray.method(enable_task_events=False)  # polled
    def drain_metrics(self) -> list[tuple[int, dict[str, float]]]:
        return self.runner.drain_metrics() if self.runner is not None else []

    @ray.method(enable_task_events=False)  # polled
    def steps_done(self) -> int:
        """Global steps this worker's loop has passed (the last stage's drives the progress bar)."""
        return self.runner.steps_done() if self.runner is not None else 0

    def request_stop(self, step: int) -> bool:
        """End ``run`` at the boundary before ``step``, with its state kept (see
        :meth:`StageRunner.request_stop`); False when this worker is already past it."""
        return self._runner().request_stop(step)

    @ray.method(enable_task_events=False)  # polled
    def saved_steps(self) -> list[int]:
        """The checkpoint boundaries whose states this worker keeps (cheap to ask)."""
        return sorted(self.runner.kept) if self.runner is not None else []

    @ray.method(enable_task_events=False)  # polled
    def saved_state(self, step: int) -> dict[str, Any] | None:
        """This worker's state kept at boundary ``step``; None once it has been let go."""
        return self.runner.kept.get(step) if self.runner is not None else None

    def close(self) -> None:
        if self.runner is not None:
            self.runner.transport.close()

    def _runner(self) -> StageRunner:
        if self.runner is None:
            raise RuntimeError("connect() first")
        return self.runner

