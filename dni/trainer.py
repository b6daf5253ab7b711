"""The single-process reference trainer (``backend: local``).

It trains a :class:`~dni.pipeline.Pipeline` on one device with the configured
method, seeded and deterministic, evaluates, checkpoints and resumes exactly,
and is the correctness oracle the distributed runtime is checked against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dni.build import trainable
from dni.checkpoint import load_latest, save_checkpoint
from dni.config import Config
from dni.data import Splits, iterate_batches, load_splits
from dni.data.spec import DataSpec
from dni.engine import apply_nonfinite
from dni.metrics import JsonlSink, MetricsLogger, TensorBoardSink, bits_per_char_summary, by_stage, flatten
from dni.models import describe
from dni.pipeline import Pipeline
from dni.run import CHECKPOINTS, METRICS_FILE, Interrupted, write_summary
from dni.recurrent import RecurrentPipeline
from dni.schedule import EpochBatches, Schedule, StreamBatches, stream_batches
from dni.stage import NonFiniteError


def resolve_device(name: str) -> torch.device:
    """``auto`` is cuda when available, else cpu. Raises ValueError for cuda without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but torch sees no GPU; set device=cpu or device=auto")
    return torch.device(name)


@dataclass
class Budget:
    """How long a run trains."""

    steps_per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, cfg: Config, train_size: int) -> "Budget":
        per_epoch = train_size // cfg.train.batch_size
        if per_epoch == 0:
            raise ValueError(
                f"train.batch_size={cfg.train.batch_size} is larger than the training split "
                f"({train_size} examples); lower it"
            )
        total = per_epoch * cfg.train.epochs
        if cfg.train.max_steps is not None:
            total = min(total, cfg.train.max_steps)
        return cls(per_epoch, total)


class Trainer:
    """Trains one run in one process.

    Args:
        cfg: the validated config.
        run_dir: the run directory (see :mod:`dni.run`).
        splits: the data, already loaded (None: load as configured).
        progress: a callback ``(step, total, scalars)`` for a progress display, or None.
        pipeline: stages built elsewhere (e.g. :func:`dni.decouple`) to train instead of the
            config's model; the config still gives the data, budget, schedule and logging.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        *,
        splits: Splits | None = None,
        progress: Callable[[int, int, dict[str, float]], None] | None = None,
        pipeline: Pipeline | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = resolve_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.splits = splits or load_splits(cfg.data, seed=cfg.seed)
        self.train_data = self.splits.train.to(self.device)
        self.budget = Budget.of(cfg, len(self.splits.train))
        self.schedule = Schedule.of(cfg, self.budget.total_steps, self.budget.steps_per_epoch)
        torch.manual_seed(cfg.seed)
        self.pipeline: Pipeline | RecurrentPipeline = pipeline or trainable(
            cfg, DataSpec.of(self.splits.train), total_steps=self.budget.total_steps,
            steps_per_epoch=self.budget.steps_per_epoch, device=self.device)
        self.recurrent = isinstance(self.pipeline, RecurrentPipeline)  # streams, not shuffled batches
        self.progress = progress
        self.step = 0
        self.elapsed = 0.0  # wall seconds of the run so far, including earlier processes (resumed runs)
        self.step_seconds = 0.0  # of which inside training steps (no evaluation, logging or measurement)
        self.eval_seconds = 0.0  # of which evaluating
        self.logger: MetricsLogger | None = None
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._stop_requested = False

    def request_stop(self) -> None:
        """Ask :meth:`fit` to stop after the step in progress, with a checkpoint there (safe to
        call from a signal handler: it only sets a flag)."""
        self._stop_requested = True

    # -- state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "stages": [s.state_dict() for s in self.pipeline.stages],
            "carried": self.pipeline.carried_state(),
            "elapsed": self.elapsed,
            "step_seconds": self.step_seconds,
            "eval_seconds": self.eval_seconds,
            "torch_rng": torch.get_rng_state(),
        }

    def resume(self) -> None:
        """Continue from the newest readable checkpoint of the run directory.

        Raises:
            CheckpointError: none readable, or of another format.
        """
        state = load_latest(self.run_dir / CHECKPOINTS)
        for stage, s in zip(self.pipeline.stages, state["stages"], strict=True):
            stage.load_state_dict(s)
        self.pipeline.load_carried_state(state.get("carried", {}))
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        self.step_seconds = float(state["step_seconds"])
        self.eval_seconds = float(state["eval_seconds"])
        torch.set_rng_state(state["torch_rng"])

    def save(self) -> Path:
        # Delayed stages first take the updates still owed, as runtime workers drain at a checkpoint:
        # the saved state has nothing in flight, and a resumed run replays the same updates.
        self.pipeline.flush()
        return save_checkpoint(self.run_dir / CHECKPOINTS, self.step, self.state_dict(), keep=self.cfg.checkpoint.keep)

    # -- loop ------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to the end of the budget; returns (and writes) the summary.

        Raises:
            Interrupted: :meth:`request_stop` was called; the checkpoint of that step is written.
        """
        resumed = self.step if self.step > 0 else None
        self.logger = MetricsLogger([
            JsonlSink(self.run_dir / METRICS_FILE, resume_step=resumed),
            TensorBoardSink(self.run_dir, resume_step=resumed),
        ], per_char=self.cfg.data.per_char)
        try:
            self._loop()
            summary = self._summary()
            self.logger.hparams(flatten(self.cfg.to_dict()), summary)
        finally:
            self.logger.close()
        write_summary(self.run_dir, summary)
        return summary

    def _loop(self) -> None:
        cfg, budget, schedule = self.cfg, self.budget, self.schedule
        batches: EpochBatches | StreamBatches = (StreamBatches(self.train_data, cfg.train.batch_size) if self.recurrent
                                                 else EpochBatches(self.train_data, cfg.train.batch_size, cfg.seed))
        start = time.perf_counter() - self.elapsed
        window_start, window_steps = time.perf_counter(), 0
        for g in range(self.step, budget.total_steps):
            scalars = self._train_step(g, *batches(g))
            self.step = g + 1
            window_steps += 1
            measured = any(k.startswith("sg/cosine/") for k in scalars)
            if measured or schedule.reports_after(g):
                now = time.perf_counter()
                scalars["train/samples_per_second"] = window_steps * cfg.train.batch_size / (now - window_start)
                window_start, window_steps = now, 0
                self._log(scalars)
            if self.progress is not None:
                self.progress(self.step, budget.total_steps, self.logger.latest if self.logger else {})
            if schedule.evaluates_after(g):
                self._log({"time/train_seconds": time.perf_counter() - start - self.eval_seconds})
                eval_start = time.perf_counter()
                self._log(self._evaluate())
                self.eval_seconds += time.perf_counter() - eval_start
            self.elapsed = time.perf_counter() - start
            if schedule.checkpoints_after(g):
                self.save()
            elif self._stop_requested:
                self.save()
            if self._stop_requested and self.step < budget.total_steps:
                raise Interrupted(self.step, checkpoint=self.step, saved=True)

    def _train_step(self, g: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        scalars: dict[str, float] = {}
        started = time.perf_counter()
        try:
            result = self.pipeline.train_step(x, y, true_round=self.schedule.true_round(g))
        except NonFiniteError as e:
            return self._on_nonfinite(g, e)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # count the GPU work in this step's time
        self.step_seconds += time.perf_counter() - started
        scalars["train/loss"] = result.loss
        scalars["train/lr"] = self.pipeline.stages[0].lr
        for i, v in result.synth_losses.items():
            scalars[f"sg/loss/stage_{i}"] = v
            scalars[f"sg/fit/stage_{i}"] = self.pipeline.stages[i].fit.explained
        scalars.update(result.scalars)
        return scalars

    def _on_nonfinite(self, g: int, error: NonFiniteError) -> dict[str, float]:
        """Apply ``train.nonfinite`` to a fault found at step ``g`` (no stage updated from it)."""
        for stage in self.pipeline.stages:
            stage.abandon()
        policy = self.cfg.train.nonfinite
        stopped = f"a checkpoint at {self.save()}" if policy == "stop" else ""
        return apply_nonfinite(policy, error, self.pipeline.stages[error.stage], step=g, stopped=stopped)

    def _log(self, scalars: dict[str, float]) -> None:
        assert self.logger is not None
        self.logger.log(self.step, scalars)
        for tag, v in scalars.items():
            self.history.setdefault(tag, []).append((self.step, v))

    def _evaluate(self) -> dict[str, float]:
        out = {}
        for name, ds in (("val", self.splits.val), ("test", self.splits.test)):
            if len(ds) == 0:
                continue
            on_device = ds.to(self.device)
            batches = (stream_batches(on_device, self.cfg.train.batch_size) if self.recurrent
                       else iterate_batches(on_device, 1024, shuffle=False))
            for metric, v in self.pipeline.evaluate(batches).items():
                out[f"{name}/{metric}"] = v
        return out

    def _summary(self) -> dict[str, Any]:
        assert self.logger is not None
        cfg, latest = self.cfg, self.logger.latest
        test_acc = latest.get("test/accuracy", float("nan"))
        samples = self.step * cfg.train.batch_size
        return {
            "name": cfg.name,
            "method": cfg.method,
            "backend": "local",
            "status": "completed",
            "model": describe(cfg.model),
            "stages": len(self.pipeline.stages),
            "dataset": cfg.data.name,
            "seed": cfg.seed,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "epochs": self.step / self.budget.steps_per_epoch,
            "steps": self.step,
            "batch_size": cfg.train.batch_size,
            "train_loss": latest.get("train/loss"),
            "val_accuracy": latest.get("val/accuracy"),
            "test_accuracy": test_acc,
            "test_error": 1.0 - test_acc,
            "test_loss": latest.get("test/loss"),
            "wall_seconds": self.elapsed,
            "step_seconds": self.step_seconds,
            "seconds_per_step": self.step_seconds / max(self.step, 1),
            "samples_per_second": samples / self.elapsed if self.elapsed > 0 else None,
            "sg_cosine": by_stage(latest, "sg/cosine"),
            "sg_rel_error": by_stage(latest, "sg/rel_error"),
            **bits_per_char_summary(latest),
        }
