"""Time to accuracy on K devices, projected from one machine: per-stage work measured here, steps
to the target from the single-process simulation of K stages (``scripts/staleness_sim.py``).

The model, and what it assumes:

* every stage runs on its own device, as fast as a stage of that size runs here (the projection is
  in units of this machine's per-stage seconds: scale by the device's speed-up, the same for all
  contestants, and the ratios hold);
* a decoupled rule's steady-state step takes the slowest stage's work per batch plus one hop of
  its activation: the stages overlap, and messages overlap compute except the one a stage waits
  for. The rule's steps are those of its simulation with the delay that keeps every stage busy
  (``2(K - 1)`` for the rules whose targets return through the chain, none for local losses);
* single-device backprop takes the work of the whole model run as one stage, and its simulated
  steps;
* a synchronous GPipe pipeline of M micro-batches takes ``(M + K - 1) / M`` of the slowest
  stage's backprop work, plus ``2(K - 1)`` hops of a micro-batch's activation, and backprop's
  steps (it computes the same gradients);
* data parallelism is not projected: its step depends on the all-reduce bandwidth between devices,
  which nothing here measures.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

from dni import engine
from dni.build import decoupled_stage, input_shape, model_stages
from dni.config import Config
from dni.data.spec import DataSpec

Curve = list[tuple[int, float]]
"""(step, accuracy) at each evaluation."""


def equal_cut(layers: int, k: int) -> list[int]:
    """``model.boundaries`` that cut ``layers`` layers into ``k`` stages of (nearly) equal depth.

    >>> equal_cut(9, 2), equal_cut(9, 4), equal_cut(9, 8)
    ([4], [2, 4, 7], [1, 2, 3, 4, 6, 7, 8])
    """
    if not 1 < k <= layers:
        raise ValueError(f"{k} stages need 2..{layers} layers")
    cuts = sorted({round(layers * i / k) for i in range(1, k)})
    return [c for c in cuts if 0 < c < layers]


def steps_to(curve: Curve, target: float) -> int | None:
    """The first evaluated step at which ``curve`` reaches ``target``; None if it never does."""
    return next((s for s, a in curve if a >= target), None)


def pipeline_step_seconds(work: list[float], hop: float) -> float:
    """A decoupled pipeline's steady-state step: the slowest stage's work plus one hop."""
    return max(work) + (hop if len(work) > 1 else 0.0)


def gpipe_step_seconds(work: list[float], hop: float, micro_batches: int) -> float:
    """A synchronous GPipe step over ``micro_batches`` (the fill-and-drain bubble included); ``hop``
    is one hop of the whole batch's activation, a micro-batch's is ``hop / micro_batches``."""
    k = len(work)
    return (micro_batches + k - 1) / micro_batches * max(work) + 2 * (k - 1) * hop / micro_batches


@dataclass
class Projection:
    """One contestant's projected time to the target on K devices."""

    name: str
    step_seconds: float
    steps: int | None
    """Steps to the target (None: not reached within the simulated budget)."""

    @property
    def seconds(self) -> float:
        return self.steps * self.step_seconds if self.steps is not None else math.inf


def stage_work(cfg: Config, data: DataSpec, *, reps: int = 5, warmup: int = 2) -> list[float]:
    """Seconds per batch of each stage's training work under ``cfg.method``, measured here, each
    stage alone on this process's threads: the engine's step, and for a stage that defers its
    target the settling as well (:func:`dni.engine.settle`, on a random target). Medians of
    ``reps`` batches after ``warmup``; inputs and labels are random of the data's shapes."""
    modules, shapes = model_stages(cfg, data)
    batch = cfg.train.batch_size
    out = []
    for i, module in enumerate(modules):
        shape = input_shape(data, shapes, i)
        stage = decoupled_stage(cfg, module, i, data=data, input_shape=shape, output_shape=shapes[i],
                                num_stages=len(modules), total_steps=reps + warmup, device=torch.device("cpu"))
        x = torch.randn(batch, *shape) if i > 0 or data.in_dtype.is_floating_point else \
            torch.randint(0, data.num_classes, (batch, *shape))
        y = torch.randint(0, data.num_classes, (batch, *data.label_shape))
        times = []
        for r in range(reps + warmup):
            start = time.perf_counter()
            if stage.delayed:
                step = engine.delayed_forward(stage, x)
            else:
                step = engine.train_step(stage, x, y, from_above=(lambda h: torch.zeros_like(h))
                                         if engine.is_locked(stage, cfg.synthesizer.bp_lambda) else None)
            target = torch.randn_like(step.h) * 1e-3  # what would come back from above
            if stage.defers_target:
                engine.settle(stage, engine.keep(stage, x, y, step), target)
            elif stage.synthesizer is not None and not stage.is_last:  # cDNI trains M when the target arrives
                stage.train_synthesizer(step.h, y, target)
            if r >= warmup:
                times.append(time.perf_counter() - start)
        out.append(statistics.median(times))
    return out
