"""A chain of decoupled stages driven in one process: the reference semantics.

Two schedules, both built from the per-stage rules:

* **unlocked** (``bp_lambda == 0``): stage by stage, each stage updates from its
  synthetic gradient as soon as it has run forward, and its output's target is
  produced when the next stage runs. This is the order a distributed worker sees.
* **locked** (``bp_lambda > 0``, or backprop): forward through every stage, then
  backward from the loss, mixing true and synthetic gradients at each interface
  (BP(lambda)). With no synthesizers this is plain backprop.

With ``bp_lambda == 0`` both schedules give identical updates; a test checks it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dni import rules
from dni.stage import DecoupledStage


@dataclass
class StepResult:
    """What one training step reports."""

    loss: float
    synth_losses: dict[int, float] = field(default_factory=dict)
    """Synthesizer regression loss, by the index of the stage whose output it models."""
    updated: list[bool] = field(default_factory=list)


@contextlib.contextmanager
def preserved_buffers(modules: list[nn.Module]) -> Iterator[None]:
    """Restore every buffer (BatchNorm running statistics) on exit: a side computation
    in training mode must not change the model."""
    saved = [[b.detach().clone() for b in m.buffers()] for m in modules]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, copies in zip(modules, saved):
                for b, c in zip(m.buffers(), copies):
                    b.copy_(c)


class Pipeline:
    """The stages of one network, run in one process.

    Args:
        stages: in order; only the last has ``is_last`` and no synthesizer.
    """

    def __init__(self, stages: list[DecoupledStage]) -> None:
        if not stages or not stages[-1].is_last or any(s.is_last for s in stages[:-1]):
            raise ValueError("a pipeline needs stages whose last (and only the last) computes the loss")
        self.stages = stages

    @property
    def decoupled(self) -> bool:
        return any(s.synthesizer is not None for s in self.stages)

    def train(self, mode: bool = True) -> None:
        for s in self.stages:
            s.train(mode)

    # -- training ------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor, *, bp_lambda: float = 0.0) -> StepResult:
        """One step on the batch (x, y). Uses the unlocked schedule when possible."""
        if self.decoupled and bp_lambda == 0.0:
            return self._unlocked_step(x, y)
        return self._locked_step(x, y, bp_lambda)

    def _unlocked_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        result = StepResult(loss=float("nan"))
        previous: torch.Tensor | None = None  # h of the stage before, waiting for its target
        for stage in self.stages:
            h = stage.forward(x)
            if stage.is_last:
                result.loss, target = stage.loss_backward(y)
            else:
                target = stage.backward(stage.synthetic_gradient(y))
            result.updated.append(stage.step())
            if previous is not None and target is not None:
                upstream = self.stages[stage.index - 1]
                result.synth_losses[upstream.index] = upstream.train_synthesizer(previous, y, target)
            previous, x = h, h
        return result

    def _locked_step(self, x: torch.Tensor, y: torch.Tensor, bp_lambda: float) -> StepResult:
        result = StepResult(loss=float("nan"))
        outputs = []
        for stage in self.stages:
            x = stage.forward(x)
            outputs.append(x)
        result.loss, grad = self.stages[-1].loss_backward(y)
        updated = [self.stages[-1].step()]
        for stage in reversed(self.stages[:-1]):
            target = grad  # dL/dh arriving from above: true, or mixed below the first interface
            assert target is not None
            if stage.synthesizer is not None:
                mixed = rules.bp_lambda_mix(target, stage.synthetic_gradient(y), bp_lambda)
            else:
                mixed = target
            grad = stage.backward(mixed)
            updated.append(stage.step())
            if stage.synthesizer is not None:
                result.synth_losses[stage.index] = stage.train_synthesizer(outputs[stage.index], y, target)
        result.updated = updated[::-1]
        result.synth_losses = dict(sorted(result.synth_losses.items()))
        return result

    # -- measurement -----------------------------------------------------------------
    def true_gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Backprop on the side: the activations h_i and the true dL/dh_i at every interface.

        Changes nothing: parameters get no gradient and BatchNorm statistics are restored.

        Returns:
            (activations, true gradients), one per interface (K - 1 for K stages).
        """
        modules = [s.module for s in self.stages]
        with preserved_buffers(modules):
            hs = []
            for s in self.stages[:-1]:
                x = s.module(x)
                hs.append(x)
            loss = self.stages[-1].loss_fn(self.stages[-1].module(x), y)
            grads = torch.autograd.grad(loss, hs) if hs else ()
        return [h.detach() for h in hs], [g.detach() for g in grads]

    def gradient_agreement(self, x: torch.Tensor, y: torch.Tensor) -> dict[int, tuple[float, float]]:
        """(cosine, relative error) of each synthesizer's g^ against the true gradient on (x, y)."""
        hs, grads = self.true_gradients(x, y)
        out = {}
        for stage, h, g in zip(self.stages, hs, grads):
            if stage.synthesizer is None:
                continue
            synthetic = rules.synthetic_gradient(stage.synthesizer, h, stage.context(y))
            out[stage.index] = rules.gradient_agreement(synthetic, g)
        return out

    # -- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for ``x`` through every stage (in whatever mode the stages are)."""
        for s in self.stages:
            x = s.module(x)
        return x

    def evaluate(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
        """(mean loss, accuracy) over ``batches``, in eval mode; restores training mode."""
        self.train(False)
        total, correct, loss_sum = 0, 0, 0.0
        try:
            for x, y in batches:
                logits = self.predict(x)
                loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(1) == y).sum().item()
                total += y.numel()
        finally:
            self.train(True)
        if total == 0:
            return float("nan"), float("nan")
        return loss_sum / total, correct / total
