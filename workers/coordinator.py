"""The coordinator: builds the pipeline from the config, places it on Ray, and watches it.

It starts (or joins) Ray, reserves one placement bundle per stage worker, starts
the actors, has them form their process group, and then stays off the per-step
path: the workers follow the shared schedule (:mod:`dni.schedule`, :mod:`workers.topology`) for the
three levels of synchronisation, and the coordinator gathers their metrics into
one run directory, writes checkpoints, and fails with a message, never a hang,
when the cluster cannot hold the pipeline or a worker stops answering.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dni.checkpoint import save_checkpoint
from dni.config import Config, RuntimeConfig
from dni.metrics import JsonlSink, MetricsLogger, TensorBoardSink, by_stage, flatten
from dni.run import CHECKPOINTS, METRICS_FILE, RunError, write_summary
from workers.actor import StageActor
from workers.plan import make_plan


class PlacementError(RunError):
    """The cluster cannot hold the pipeline as configured; the message says what is missing."""


class WorkerError(RunError):
    """A stage worker died or stopped answering; the message names it and the last checkpoint."""


def ensure_ray(runtime: RuntimeConfig, *, cpus_needed: float) -> bool:
    """Connect to Ray: the configured cluster, RAY_ADDRESS, or a new local instance on 127.0.0.1.

    Returns whether this call started Ray (and so should shut it down).
    """
    if ray.is_initialized():
        return False
    address = runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return True
    # Logical CPUs may exceed physical ones: one bundle per stage must fit on a small machine.
    ray.init(
        num_cpus=max(os.cpu_count() or 1, int(cpus_needed + 0.999)),
        num_gpus=torch.cuda.device_count(),
        include_dashboard=runtime.dashboard,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    return True


def gpus_per_stage(runtime: RuntimeConfig) -> float:
    """The configured GPUs per stage; null means one per stage when the cluster has GPUs."""
    if runtime.gpus_per_stage is not None:
        return runtime.gpus_per_stage
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def place(world: int, runtime: RuntimeConfig) -> Any:
    """A ready placement group with one bundle per stage worker.

    Raises:
        PlacementError: the cluster lacks the resources (checked first, so it fails in
            seconds), or the group is not ready within ``runtime.timeout_s``.
    """
    gpus = gpus_per_stage(runtime)
    bundle = {"CPU": runtime.cpus_per_stage, **({"GPU": gpus} if gpus else {})}
    have = ray.cluster_resources()
    for res, amount in bundle.items():
        need = amount * world
        if have.get(res, 0) < need:
            raise PlacementError(
                f"the pipeline needs {need:g} {res} ({world} stage workers x {amount:g}) but the cluster has "
                f"{have.get(res, 0):g}; lower runtime.{'gpus' if res == 'GPU' else 'cpus'}_per_stage, "
                "use fewer stages or replicas, or add nodes"
            )
    pg = placement_group([dict(bundle) for _ in range(world)], strategy=runtime.placement_strategy)
    if not pg.wait(timeout_seconds=runtime.timeout_s):
        remove_placement_group(pg)
        raise PlacementError(
            f"{world} bundles of {bundle} with strategy {runtime.placement_strategy} could not be placed within "
            f"{runtime.timeout_s:g} s (cluster: {have}); STRICT_SPREAD needs one node per stage worker"
        )
    return pg


class Coordinator:
    """Runs one training run on Ray (``backend: ray``).

    Args:
        cfg: the validated config; ``data.path`` is resolved against the driver's folder.
        run_dir: the run directory.
        progress: callback ``(step, total, latest scalars)`` for a progress display.
    """

    def __init__(self, cfg: Config, run_dir: Path, *, progress: Callable[[int, int, dict[str, float]], None] | None = None) -> None:
        # Workers may start in another folder: they get the data path resolved here.
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(Path(cfg.data.path).resolve())))
        self.cfg, self.run_dir, self.progress = cfg, run_dir, progress
        self.plan = make_plan(cfg)
        self.actors: list[Any] = []
        self.pg = None
        self.started_ray = False
        self.hops: dict[str, float] = {}
        self.last_checkpoint = 0
        self.logger: MetricsLogger | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Place the workers and connect their data plane."""
        rt, topo = self.cfg.runtime, self.plan.topology
        self.started_ray = ensure_ray(rt, cpus_needed=rt.cpus_per_stage * topo.world_size)
        self.pg = place(topo.world_size, rt)
        gpus = gpus_per_stage(rt)
        cfg_dict = self.cfg.to_dict()
        for rank in range(topo.world_size):
            strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank)
            actor = StageActor.options(num_cpus=rt.cpus_per_stage, num_gpus=gpus, scheduling_strategy=strategy).remote(
                cfg_dict, rank, self.plan)
            self.actors.append(actor)
        ip, port = self._get(self.actors[0].address.remote(), "report its address")
        self._get([a.connect.remote(f"tcp://{ip}:{port}") for a in self.actors], "connect the data plane")
        for hops in self._get([a.measure_hops.remote() for a in self.actors], "measure hop latency"):
            self.hops.update(hops)

    def run(self) -> dict[str, Any]:
        """Train to the end; returns (and writes) the summary."""
        self.logger = MetricsLogger([JsonlSink(self.run_dir / METRICS_FILE), TensorBoardSink(self.run_dir)])
        try:
            started = time.perf_counter()
            self.start()
            setup = time.perf_counter() - started
            t0 = time.perf_counter()
            totals = self._watch([a.run.remote() for a in self.actors])
            wall = time.perf_counter() - t0
            self._gather()
            self._checkpoint(final=True)
            summary = self._summary(totals, wall, setup)
            self.logger.hparams(flatten(self.cfg.to_dict()), {"test_accuracy": summary["test_accuracy"]})
        finally:
            self.logger.close()
            self.shutdown()
        write_summary(self.run_dir, summary)
        return summary

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False

    # -- watching ---------------------------------------------------------------------------------
    def _watch(self, futures: list[Any]) -> list[dict[str, float]]:
        pending = list(futures)
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=self.cfg.runtime.poll_s)
            for ref in done:
                self._check_worker(futures.index(ref), ref)  # raises at once if that worker failed
            self._gather()
            self._checkpoint(final=False)
        return ray.get(futures)

    def _check_worker(self, rank: int, ref: Any) -> None:
        try:
            ray.get(ref)
        except ray.exceptions.RayError as e:  # died, raised, or raised something Ray could not carry
            raise self._worker_error(f"stage worker {self._describe(rank)} failed", e) from None

    def _describe(self, rank: int) -> str:
        stage, replica = self.plan.topology.place(rank)
        return f"{rank} (stage {stage}, replica {replica})"

    def _worker_error(self, what: str, cause: BaseException) -> WorkerError:
        cause = getattr(cause, "cause", None) or cause  # a task error wraps the worker's own exception
        first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        saved = (f"the last checkpoint is step {self.last_checkpoint} in {self.run_dir / CHECKPOINTS}"
                 if self.last_checkpoint else "no checkpoint had been written yet")
        return WorkerError(f"{what}: {first_line}; {saved}")

    def _gather(self) -> None:
        assert self.logger is not None
        batches = self._get([a.drain_metrics.remote() for a in self.actors], "report metrics")
        by_step: dict[int, dict[str, float]] = {}
        for batch in batches:
            for step, scalars in batch:
                by_step.setdefault(step, {}).update(scalars)
        for step in sorted(by_step):
            self.logger.log(step, by_step[step])
        if by_step and self.progress is not None:
            self.progress(max(by_step), self.plan.schedule.total_steps, self.logger.latest)

    def _checkpoint(self, *, final: bool) -> None:
        """Write a checkpoint once every worker has kept its state at the same, newer boundary."""
        steps = self._get([a.saved_step.remote() for a in self.actors], "report checkpoint steps")
        if None in steps or len(set(steps)) != 1 or steps[0] <= self.last_checkpoint:
            return
        saved = self._get([a.saved_state.remote() for a in self.actors], "send checkpoints")
        if len({s[0] for s in saved}) != 1:
            if final:
                raise RuntimeError(f"workers ended at different checkpoint steps: {[s[0] for s in saved]}")
            return  # a worker moved on meanwhile: try at the next poll
        topo = self.plan.topology
        stages: list[list[dict[str, Any]]] = [[] for _ in range(topo.num_stages)]
        for rank, (_, state) in enumerate(saved):
            stages[topo.place(rank)[0]].append(state)
        step = saved[0][0]
        save_checkpoint(self.run_dir / CHECKPOINTS, step, {"config": self.cfg.to_dict(), "stages": stages,
                                                            "backend": "ray"}, keep=self.cfg.checkpoint.keep)
        self.last_checkpoint = step

    def _get(self, refs: Any, what: str) -> Any:
        try:
            return ray.get(refs, timeout=self.cfg.runtime.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise self._worker_error(
                f"stage workers did not {what} within runtime.timeout_s={self.cfg.runtime.timeout_s:g} s",
                TimeoutError("timed out"),
            ) from None
        except ray.exceptions.RayActorError as e:
            rank = self._rank_of(getattr(e, "actor_id", None))
            who = f"stage worker {self._describe(rank)}" if rank is not None else "a stage worker"
            raise self._worker_error(f"{who} failed (found while asked to {what})", e) from None

    def _rank_of(self, actor_id: str | None) -> int | None:
        """The rank of the actor with this id (as Ray's errors give it), if it is one of ours."""
        for rank, actor in enumerate(self.actors):
            if actor_id is not None and actor._actor_id.hex() == actor_id:
                return rank
        return None

    def _summary(self, totals: list[dict[str, float]], wall: float, setup: float) -> dict[str, Any]:
        assert self.logger is not None
        cfg, latest, topo, sched = self.cfg, self.logger.latest, self.plan.topology, self.plan.schedule
        test_acc = latest.get("test/accuracy", float("nan"))
        busy = {}
        for rank, t in enumerate(totals):
            stage, replica = topo.place(rank)
            name = f"stage_{stage}" + (f"_r{replica}" if topo.replicas[stage] > 1 else "")
            busy[name] = t["busy_seconds"] / t["wall_seconds"] if t["wall_seconds"] > 0 else 0.0
        return {
            "name": cfg.name, "method": cfg.method, "backend": "ray",
            "model": f"{cfg.model.kind}-{cfg.model.depth}", "stages": topo.num_stages,
            "replicas": list(topo.replicas), "dataset": cfg.data.name, "seed": cfg.seed,
            "epochs": sched.total_steps / sched.steps_per_epoch, "steps": sched.total_steps,
            "batch_size": cfg.train.batch_size, "train_loss": latest.get("train/loss"),
            "val_accuracy": latest.get("val/accuracy"), "test_accuracy": test_acc, "test_error": 1.0 - test_acc,
            "wall_seconds": wall, "setup_seconds": setup,
            "samples_per_second": sched.total_steps * cfg.train.batch_size / wall if wall > 0 else None,
            "busy_fraction": busy, "hop_latency_ms": self.hops,
            "bytes_sent": sum(t["bytes_sent"] for t in totals),
            "sg_cosine": by_stage(latest, "sg/cosine"),
            "sg_rel_error": by_stage(latest, "sg/rel_error"),
            "max_in_flight": cfg.runtime.max_in_flight, "true_every": cfg.sync.true_every,
        }
