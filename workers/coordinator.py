"""The coordinator: builds the pipeline from the config, places it on Ray, and watches it.

It starts (or joins) Ray, reserves one placement bundle per stage worker, starts
the actors, has them form their process group, and then stays off the per-step
path: the workers follow the shared schedule (:mod:`dni.schedule`, :mod:`workers.topology`) for the
three levels of synchronisation, and the coordinator gathers their metrics into
one run directory, writes checkpoints, and fails with a message, never a hang,
when the cluster cannot hold the pipeline or a worker stops answering.

Checkpoints are consistent cuts (see :mod:`workers.stage_runner`). When a worker
dies, raises or stops answering, the coordinator replaces the whole pipeline from
the newest checkpoint, in the same placement group (so on the same node, or on
another one where Ray moved a lost bundle), with a new process group: a
torch.distributed group cannot swap one member, and a cut is only consistent for
all stages together. Up to ``runtime.max_restarts`` times; the next failure stops
the run with a message. ``resume=True`` starts from a run directory's checkpoint
the same way (``dni train --resume``).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dni.checkpoint import CheckpointError, load_latest, save_checkpoint
from dni.config import Config, RuntimeConfig
from dni.imports import with_absolute_paths
from dni.models import describe
from dni.metrics import JsonlSink, MetricsLogger, TensorBoardSink, bits_per_char_summary, by_stage, flatten
from dni.run import CHECKPOINTS, METRICS_FILE, Interrupted, RunError, write_summary
from dni.stage import NonFiniteError
from workers.actor import StageActor
from workers.plan import make_plan


STOP_MARGIN = 4  # steps between the furthest worker and the boundary an interrupted run stops at


class PlacementError(RunError):
    """The cluster cannot hold the pipeline as configured; the message says what is missing."""


class ClusterError(RunError):
    """No Ray cluster answers at the address given; the message says what to start."""


class WorkerError(RunError):
    """A stage worker died, raised or stopped answering; the message names it and the last checkpoint.

    ``failure`` is the first part of the message (what failed, and how); ``restartable`` is
    false for faults a replay would meet again (a non-finite value under train.nonfinite=stop).
    """

    def __init__(self, message: str, *, failure: str = "", restartable: bool = True) -> None:
        super().__init__(message)
        self.failure, self.restartable = failure or message, restartable


def ensure_ray(runtime: RuntimeConfig, *, cpus_needed: float) -> bool:
    """Connect to Ray: the configured cluster, RAY_ADDRESS, or a new local instance on 127.0.0.1.

    Returns whether this call started Ray (and so should shut it down).
    """
    if ray.is_initialized():
        return False
    # Ray's driver logger also carries its start-up lines and the token notice (see README).
    level = int(getattr(logging, runtime.ray_log_level.upper()))  # one of RAY_LOG_LEVELS
    address = runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=level)
        except ConnectionError as e:
            raise ClusterError(f"no Ray cluster answers at {address} ({_first_line(e)}); {START_A_CLUSTER}") from None
        _no_reset_at_exit()
        return True
    cpus = os.cpu_count() or 1
    warning = oversubscribed(round(cpus_needed / runtime.cpus_per_stage), runtime.cpus_per_stage, cpus)
    if warning:
        print(f"dni: warning: {warning}", file=sys.stderr, flush=True)
    # Logical CPUs may exceed physical ones: one bundle per stage must fit on a small machine.
    ray.init(
        num_cpus=max(cpus, int(cpus_needed + 0.999)),
        num_gpus=torch.cuda.device_count(),
        include_dashboard=runtime.dashboard,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        logging_level=level,
    )
    _no_reset_at_exit()
    return True


def oversubscribed(workers: int, cpus_per_stage: float, cpus: int) -> str | None:
    """What to warn of when the stage workers ask a local instance for more CPUs than the machine
    has (Ray is then given logical CPUs beyond the real ones); None when they fit."""
    if workers * cpus_per_stage <= cpus:
        return None
    return (f"{workers} stage workers x {cpus_per_stage:g} CPU on a machine with {cpus} CPUs: they will share "
            "cores (expect each stage to run slower)")


START_A_CLUSTER = ("start one with `ray start --head` or `bash launch/local_cluster.sh up`; for a remote cluster, "
                   "`dni submit` through `ray dashboard launch/cluster.yaml`; or drop --address/RAY_ADDRESS to "
                   "start a local instance")


def check_reachable(address: str, *, timeout_s: float = 3.0) -> None:
    """Fail in seconds, with one line, when nothing listens at a Ray address (``host:port``,
    ``ray://host:port``; ``auto`` and other forms are left to Ray).

    Raises:
        ClusterError: the TCP connection is refused or times out.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()  # [::1]:6379 too
    except OSError as e:
        raise ClusterError(f"no Ray cluster answers at {address} ({e.strerror or e}); {START_A_CLUSTER}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else type(error).__name__


def _no_reset_at_exit() -> None:
    """Ray imports its copy of colorama with ``init()``, which writes a colour reset (ESC [0m) to
    a terminal at exit, after everything dni printed; take that exit hook back."""
    initialise = sys.modules.get("colorama.initialise")
    if initialise is not None:
        atexit.unregister(initialise.reset_all)


def gpus_per_stage(runtime: RuntimeConfig) -> float:
    """The configured GPUs per stage; null means one per stage when the cluster has GPUs."""
    if runtime.gpus_per_stage is not None:
        return runtime.gpus_per_stage
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def place(world: int, runtime: RuntimeConfig) -> PlacementGroup:
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
        resume: continue from the newest readable checkpoint in ``run_dir`` (read here, so a
            missing or incompatible one fails before anything starts).

    Raises:
        CheckpointError: ``resume`` and no usable checkpoint of this pipeline.
    """

    def __init__(self, cfg: Config, run_dir: Path, *, progress: Callable[[int, int, dict[str, float]], None] | None = None,
                 resume: bool = False) -> None:
        # Workers may start in another folder: they get the data path and the user's files resolved here.
        cfg = with_absolute_paths(cfg)
        self.cfg, self.run_dir, self.progress = cfg, run_dir, progress
        self.plan = make_plan(cfg)
        self.actors: list[Any] = []
        self.pg: PlacementGroup | None = None
        self.started_ray = False
        self.hops: dict[str, float] = {}
        self.last_checkpoint = 0
        self.logger: MetricsLogger | None = None
        self.start_step = 0
        self.states: list[dict[str, Any]] | None = None  # per rank: where the workers start from
        self.restarts: list[dict[str, Any]] = []  # the failures survived
        self.failures = 0
        self._runs: list[Any] = []  # the workers' run() calls
        self._shown = 0  # the step the progress display shows
        self.setup_seconds = 0.0
        self._stop_requested = False  # an interrupt asked the run to stop (see request_stop)
        self.stop_step: int | None = None  # the boundary every worker agreed to stop at
        self._stop_deadline = 0.0
        self.nodes: list[str] = []  # the Ray node of each worker, by rank
        self._failed: tuple[WorkerError, float] | None = None  # the failure being recovered from, and when
        self.resumed_from = self._load_checkpoint(required=True) if resume else None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Place the workers, connect their data plane, and restore them when resuming."""
        started = time.perf_counter()
        rt, topo = self.cfg.runtime, self.plan.topology
        self.started_ray = ensure_ray(rt, cpus_needed=rt.cpus_per_stage * topo.world_size)
        self.pg = place(topo.world_size, rt)
        self._start_workers()
        for hops in self._get([a.measure_hops.remote() for a in self.actors], "measure hop latency"):
            self.hops.update(hops)
        self.setup_seconds = time.perf_counter() - started

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop at a step boundary that every worker keeps as a checkpoint (safe
        to call from a signal handler: it only sets a flag; the watch loop acts on it)."""
        self._stop_requested = True

    def _start_workers(self) -> None:
        """One actor per placement bundle, connected into a new process group, restored from
        ``self.states`` when there are any."""
        rt, topo = self.cfg.runtime, self.plan.topology
        gpus = gpus_per_stage(rt)
        cfg_dict = self.cfg.to_dict()
        assert self.pg is not None, "start() places the group first"
        for rank in range(topo.world_size):
            strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank)
            # mypy keeps a class's type through a class decorator: StageActor is a ray ActorClass.
            actor = StageActor.options(  # type: ignore[attr-defined]
                num_cpus=rt.cpus_per_stage, num_gpus=gpus, scheduling_strategy=strategy).remote(cfg_dict, rank, self.plan)
            self.actors.append(actor)
        ip, port = self._get(self.actors[0].address.remote(), "report its address")
        self._get([a.connect.remote(f"tcp://{ip}:{port}") for a in self.actors], "connect the data plane")
        if self.states is not None:
            self._get([a.restore.remote(s) for a, s in zip(self.actors, self.states)], "restore the checkpoint")
        self.nodes = [r["node_id"] for r in self._get([a.resources.remote() for a in self.actors], "say where they run")]

    def _load_checkpoint(self, *, required: bool) -> int:
        """Make the newest readable checkpoint of the run directory the workers' starting point;
        returns its step (0, with fresh workers, when there is none and none is ``required``).

        Raises:
            CheckpointError: none readable (when required), or not one of this pipeline.
        """
        try:
            state = load_latest(self.run_dir / CHECKPOINTS)
        except CheckpointError:
            if required:
                raise
            self.start_step, self.states, self.last_checkpoint = 0, None, 0
            return 0
        topo, step = self.plan.topology, int(state["step"])
        where = f"{self.run_dir / CHECKPOINTS} (step {step})"
        if state.get("backend") != "ray":
            raise CheckpointError(f"{where} was written by backend: local; resume it with backend: local")
        stages = state["stages"]
        if [len(replicas) for replicas in stages] != list(topo.replicas):
            raise CheckpointError(f"{where} holds stages x replicas {[len(r) for r in stages]}, but the config "
                                  f"asks for {list(topo.replicas)}; resume with the config the run started with")
        self.states = [stages[s][r] for s, r in map(topo.place, range(topo.world_size))]
        self.start_step = self.last_checkpoint = step
        return step

    def run(self) -> dict[str, Any]:
        """Train to the end, surviving up to ``runtime.max_restarts`` worker failures; returns
        (and writes) the summary.

        Raises:
            WorkerError: a worker failed once more than the budget allows, or with a fault that a
                restart would meet again; the message names it and the last checkpoint.
            Interrupted: :meth:`request_stop` was called; ``saved`` says whether the checkpoint of
                the step where the workers stopped was written.
        """
        resumed = self.start_step or None
        self.logger = MetricsLogger([JsonlSink(self.run_dir / METRICS_FILE, resume_step=resumed),
                                     TensorBoardSink(self.run_dir, resume_step=resumed)],
                                    per_char=self.cfg.data.per_char)
        try:
            if not self.actors:
                self.start()
            setup = self.setup_seconds
            t0 = time.perf_counter()
            totals = self._train()
            wall = time.perf_counter() - t0
            self._gather()
            self._checkpoint(final=self.stop_step is None)
            if self.stop_step is not None:
                raise Interrupted(self.stop_step, checkpoint=self.last_checkpoint,
                                  saved=self.last_checkpoint == self.stop_step)
            summary = self._summary(totals, wall, setup)
            self.logger.hparams(flatten(self.cfg.to_dict()), summary)
        finally:
            self.logger.close()
            self.shutdown()
        write_summary(self.run_dir, summary)
        return summary

    def shutdown(self) -> None:
        self._kill_workers()
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False

    def _kill_workers(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        for ref in self._runs:  # collect their errors: they are known, not "unhandled"
            try:
                ray.get(ref, timeout=10)
            except Exception:
                pass
        self._runs = []

    # -- failures --------------------------------------------------------------------------------
    def _train(self) -> list[dict[str, float]]:
        """Run the workers to the end, replacing the pipeline after each failure the budget allows."""
        while True:
            try:
                if not self.actors:
                    self._start_workers()
                    self._resumed()
                self._runs = [a.run.remote(self.start_step) for a in self.actors]
                return self._watch(self._runs)
            except WorkerError as e:
                budget = self.cfg.runtime.max_restarts
                if self._stop_requested:  # no restart once asked to stop: keep the last checkpoint
                    raise Interrupted(self.stop_step or self._shown, checkpoint=self.last_checkpoint,
                                      saved=False) from None
                if not e.restartable:
                    raise
                if self.failures >= budget:
                    raise WorkerError(f"{e}; the run stops: {self.failures} of runtime.max_restarts={budget} "
                                      "restarts used; resume with `dni train --resume RUN_DIR`",
                                      failure=e.failure, restartable=False) from None
                self._recover(e)

    def _recover(self, error: WorkerError) -> None:
        """Stop every worker and go back to the newest checkpoint (metrics after it are forgotten:
        the restarted pipeline logs those steps again)."""
        assert self.logger is not None
        detected = time.monotonic()
        self.failures += 1  # a restart that fails to start counts too
        self._kill_workers()
        step = self._load_checkpoint(required=False)
        self.logger.rewind(step)
        if self._failed is None:  # a failed restart attempt keeps the first failure and its time
            self._failed = (error, detected)

    def _resumed(self) -> None:
        """Record a restart once the new workers hold the checkpoint and are about to train."""
        if self._failed is None:
            return
        error, detected = self._failed
        self._failed = None
        resumed = time.monotonic()
        seconds = resumed - detected
        self.restarts.append({"failure": error.failure, "from_step": self.start_step, "detected": detected,
                              "resumed": resumed})
        assert self.logger is not None
        self.logger.log(self.start_step, {"run/restarts": float(len(self.restarts))})
        print(f"dni: warning: {error.failure}; the pipeline restarted from step {self.start_step} in {seconds:.1f} s "
              f"(restart {self.failures} of runtime.max_restarts={self.cfg.runtime.max_restarts})",
              file=sys.stderr, flush=True)

    # -- watching ---------------------------------------------------------------------------------
    def _watch(self, futures: list[Any]) -> list[dict[str, float]]:
        pending = list(futures)
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=self.cfg.runtime.poll_s)
            for ref in done:
                self._check_worker(futures.index(ref), ref)  # raises at once if that worker failed
            self._gather()
            self._show_progress()
            self._checkpoint(final=False)
            if self._stop_requested:
                self._stop_at_a_boundary()
        return ray.get(futures)

    def _stop_at_a_boundary(self) -> None:
        """Act on :meth:`request_stop`: tell every worker to stop at the same boundary,
        ``runtime.max_in_flight`` + STOP_MARGIN steps past the furthest worker (a fast stage runs at
        most about that far ahead of the others before the request reaches them), keeping its
        state there; then wait for them, at most ``runtime.timeout_s``.

        Raises:
            Interrupted: without a new checkpoint, when a worker was already past that boundary
                or the workers did not reach it in time.
        """
        if self.stop_step is not None:
            if time.monotonic() > self._stop_deadline:
                raise Interrupted(self.stop_step, checkpoint=self.last_checkpoint, saved=False)
            return
        reached = max(self._get([a.steps_done.remote() for a in self.actors], "report their step"))
        step = reached + self.cfg.runtime.max_in_flight + STOP_MARGIN
        if step >= self.plan.schedule.total_steps:  # the end (a checkpoint) comes as soon
            self._stop_requested = False
            return
        agreed = self._get([a.request_stop.remote(step) for a in self.actors], "agree on a step to stop at")
        if not all(agreed):
            raise Interrupted(reached, checkpoint=self.last_checkpoint, saved=False)
        self.stop_step, self._stop_deadline = step, time.monotonic() + self.cfg.runtime.timeout_s

    def _show_progress(self) -> None:
        """Move the progress display to the last stage's step count, asked at every poll (its
        replica 0: every replica's loop passes every global step)."""
        if self.progress is None:
            return
        assert self.logger is not None
        topo = self.plan.topology
        step = self._get(self.actors[topo.rank(topo.num_stages - 1, 0)].steps_done.remote(), "report their step")
        if step != self._shown:
            self._shown = step
            self.progress(step, self.plan.schedule.total_steps, self.logger.latest)

    def _check_worker(self, rank: int, ref: Any) -> None:
        try:
            ray.get(ref)
        except ray.exceptions.RayError as e:  # died, raised, or raised something Ray could not carry
            # A peer's death often surfaces first as a data-plane error in a live worker: name the dead one.
            dead = [r for r in self._dead_ranks() if r != rank]
            if dead and not isinstance(getattr(e, "cause", None), NonFiniteError):
                who = ", ".join(f"stage worker {self._describe(r)}" for r in dead)
                raise self._worker_error(f"{who} died (stage worker {rank} saw it first)", e) from None
            raise self._worker_error(f"stage worker {self._describe(rank)} failed", e) from None

    def _dead_ranks(self, timeout_s: float = 5.0) -> list[int]:
        """The ranks whose actors no longer answer because they died."""
        refs = [a.pid.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        dead = []
        for rank, ref in enumerate(refs):
            if ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    dead.append(rank)
        return dead

    def _describe(self, rank: int) -> str:
        stage, replica = self.plan.topology.place(rank)
        return f"{rank} (stage {stage}, replica {replica})"

    def _worker_error(self, what: str, cause: BaseException) -> WorkerError:
        cause = getattr(cause, "cause", None) or cause  # a task error wraps the worker's own exception
        first_line = str(cause).strip().splitlines()[0].rstrip(".") if str(cause).strip() else type(cause).__name__
        saved = (f"the last checkpoint is step {self.last_checkpoint} in {self.run_dir / CHECKPOINTS}"
                 if self.last_checkpoint else "no checkpoint had been written yet")
        return WorkerError(f"{what}: {first_line}; {saved}", failure=f"{what}: {first_line}",
                           restartable=not isinstance(cause, NonFiniteError))

    def _gather(self) -> None:
        assert self.logger is not None
        batches = self._get([a.drain_metrics.remote() for a in self.actors], "report metrics")
        by_step: dict[int, dict[str, float]] = {}
        for batch in batches:
            for step, scalars in batch:
                by_step.setdefault(step, {}).update(scalars)
        for step in sorted(by_step):
            self.logger.log(step, by_step[step])

    def _checkpoint(self, *, final: bool) -> None:
        """Write a checkpoint of the newest boundary whose state every worker still keeps."""
        kept = self._get([a.saved_steps.remote() for a in self.actors], "report checkpoint steps")
        step = max(set(kept[0]).intersection(*kept[1:]), default=0)
        if final and step != self.plan.schedule.total_steps:
            raise RuntimeError(f"workers ended without a common final state (they keep steps {kept})")
        if step <= self.last_checkpoint:
            return
        # Workers record a boundary's metrics before keeping its state: with this gather, the
        # history on disk reaches the checkpoint's step before the checkpoint exists.
        self._gather()
        states = self._get([a.saved_state.remote(step) for a in self.actors], "send checkpoints")
        if any(s is None for s in states):
            return  # a worker moved on and let that state go meanwhile: try at the next poll
        topo = self.plan.topology
        stages: list[list[dict[str, Any]]] = [[] for _ in range(topo.num_stages)]
        for rank, state in enumerate(states):
            stages[topo.place(rank)[0]].append(state)
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
            "name": cfg.name, "method": cfg.method, "backend": "ray", "status": "completed",
            "model": describe(cfg.model), "stages": topo.num_stages,
            "replicas": list(topo.replicas), "dataset": cfg.data.name, "seed": cfg.seed,
            "epochs": sched.total_steps / sched.steps_per_epoch, "steps": sched.total_steps,
            "batch_size": cfg.train.batch_size, "train_loss": latest.get("train/loss"),
            "val_accuracy": latest.get("val/accuracy"), "test_accuracy": test_acc, "test_error": 1.0 - test_acc,
            "test_loss": latest.get("test/loss"),
            "wall_seconds": wall, "setup_seconds": setup,
            "samples_per_second": sched.total_steps * cfg.train.batch_size / wall if wall > 0 else None,
            "busy_fraction": busy, "hop_latency_ms": self.hops,
            "bytes_sent": sum(t["bytes_sent"] for t in totals),
            "sg_cosine": by_stage(latest, "sg/cosine"),
            "sg_rel_error": by_stage(latest, "sg/rel_error"),
            "max_in_flight": cfg.runtime.max_in_flight, "true_every": cfg.sync.true_every,
            "resumed_from_step": self.resumed_from, "nodes": self.nodes,
            "restarts": [{"failure": r["failure"], "from_step": r["from_step"],
                          "seconds_to_resume": r["resumed"] - r["detected"]} for r in self.restarts],
            **bits_per_char_summary(latest),
        }
