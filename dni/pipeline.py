"""A chain of decoupled stages driven in one process: the reference semantics.

Every stage takes its step through :func:`dni.engine.train_step`, the same call a
distributed worker makes. Stage by stage:

* an **unlocked** stage (it has a synthesizer, ``bp_lambda == 0``) updates from its
  synthetic gradient as soon as it has run forward; the rest of the chain then runs on
  its output, and the target that comes back trains its synthesizer;
* a **locked** stage (no synthesizer: backprop; or ``bp_lambda > 0``) runs the chain
  above it first and backpropagates the gradient that comes back, mixed with its
  synthetic gradient under BP(lambda). With no synthesizers this is plain backprop;
* a **delayed** stage (``method: delayed``) sends its output on at once and keeps its input;
  it applies the true gradient of a batch ``delay`` steps later, replaying its forward at
  its current weights (features replay): the order of a runtime worker with
  ``runtime.max_in_flight = delay + 1`` batches in flight. ``delay = 0`` is backprop.
  :meth:`Pipeline.flush` applies the updates still owed (at checkpoints, as the runtime's
  workers drain there).
* a **corrected** stage (``method: corrected``) steps at once on its synthetic gradient, as
  cDNI does, and keeps the batch like a delayed one: ``delay`` steps later the target trains
  its synthesizer and the residual (target - synthetic), replayed, joins its next step's
  gradients (:func:`dni.engine.settle`). It sends its target down then, not at once.
* an **input-unlocked** stage (``synthesizer.unlock``, :mod:`dni.unlock`) takes its step on the
  synthetic input that its input model predicts from the raw batch, then fits that model to
  the real input and passes its real output on;
* a stage with an **auxiliary head** (``method: local``, :mod:`dni.local_head`) updates at once from
  the gradient of its head's loss; the chain above runs on its output and sends nothing back;
* a **frozen** stage (``method: nobprop``, the paper's No-Bprop baseline) runs forward only
  and never learns; only the last stage trains, on the true loss.

True-gradient rounds (``true_round``, see :mod:`dni.true_round`) measure each
synthesizer against the true gradient of the same batch and, on training rounds, train
it on that gradient and apply the ``correction`` (``sync.bp_lambda``).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

import torch

from dni import engine, rules
from dni.engine import StageStep
from dni.evaluation import EvalSums
from dni.stage import DecoupledStage, preserved_buffers
from dni.true_round import TrueRound, finish_round


@dataclass
class StepResult:
    """What one training step reports."""

    loss: float
    synth_losses: dict[int, float] = field(default_factory=dict)
    """Synthesizer regression loss, by the index of the stage whose output it models."""
    updated: list[bool] = field(default_factory=list)
    scalars: dict[str, float] = field(default_factory=dict)
    """A true round's measurements (``sg/cosine/stage_i``, ...)."""


class Pipeline:
    """The stages of one network, run in one process.

    Args:
        stages: in order; only the last has ``is_last`` and no synthesizer.
        bp_lambda: BP(lambda) (``synthesizer.bp_lambda``): above 0 every stage is locked and
            mixes lambda x the gradient from above with (1 - lambda) x its synthetic one.
        correction: ``sync.bp_lambda``, applied on training true rounds.
    """

    def __init__(self, stages: list[DecoupledStage], *, bp_lambda: float = 0.0, correction: float = 0.0,
                 delay: int = 0) -> None:
        if not stages or not stages[-1].is_last or any(s.is_last for s in stages[:-1]):
            raise ValueError("a pipeline needs stages whose last (and only the last) computes the loss")
        if not 0.0 <= bp_lambda <= 1.0 or not 0.0 <= correction <= 1.0:
            raise ValueError(f"bp_lambda and correction must be in [0, 1], got {bp_lambda} and {correction}")
        if delay < 0:
            raise ValueError(f"delay must be >= 0, got {delay}")
        self.stages = stages
        self.bp_lambda, self.correction, self.delay = bp_lambda, correction, delay
        # Stages that defer their targets: the batches kept until their gradients are settled, and
        # those gradients once the stage above has produced them (oldest first).
        self._kept: list[deque[engine.Kept]] = [deque() for _ in stages]
        self._owed: list[deque[torch.Tensor]] = [deque() for _ in stages]
        self._batch = torch.empty(0)  # the raw batch of the step in progress

    @property
    def decoupled(self) -> bool:
        return any(s.synthesizer is not None for s in self.stages)

    def train(self, mode: bool = True) -> None:
        for s in self.stages:
            s.train(mode)

    # -- training ------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor, *, true_round: str | None = None) -> StepResult:
        """One step on the batch (x, y); ``true_round`` is None, ``"measure"`` or ``"train"``."""
        result = StepResult(loss=math.nan, updated=[False] * len(self.stages))
        self._batch = x  # what an input-unlocked stage predicts its input from
        rounds: dict[int, TrueRound] = {}
        steps = self._run_from(0, x, y, result, rounds, true_round if self.decoupled else None)
        if rounds:
            self._finish_rounds(rounds, steps[-1].target, result)
        result.synth_losses = dict(sorted(result.synth_losses.items()))
        return result

    def _run_from(self, i: int, x: torch.Tensor, y: torch.Tensor, result: StepResult, rounds: dict[int, TrueRound],
                  true_round: str | None) -> list[StageStep]:
        """Stage ``i`` and every stage above it on this batch; returns their steps, in order."""
        stage = self.stages[i]
        if stage.defers_target:
            return self._run_deferred(i, x, y, result, rounds, true_round)
        if stage.frozen:
            step = engine.frozen_step(stage, x)
            return [step, *self._run_from(i + 1, step.h, y, result, rounds, true_round)]
        above: list[StageStep] = []

        def from_above(h: torch.Tensor) -> torch.Tensor:  # a locked stage: the chain above runs first
            above.extend(self._run_from(i + 1, h, y, result, rounds, true_round))
            target = above[0].target
            assert target is not None
            return target

        tr = TrueRound.before_forward(stage, x, kind=true_round, bp_lambda=self.correction) if true_round else None
        locked = engine.is_locked(stage, self.bp_lambda)
        if stage.unlock is not None:
            step = self._unlocked_step(stage, x, y, result)
        else:
            step = engine.train_step(stage, x, y, from_above=from_above if locked else None, bp_lambda=self.bp_lambda)
        result.updated[i] = step.updated
        if stage.is_last:
            result.loss = step.loss
            if i > 0 and self.stages[i - 1].defers_target:
                assert step.target is not None
                self._owed[i - 1].append(step.target)
        if step.synth_loss is not None:
            result.synth_losses[i] = step.synth_loss
        if tr is not None:
            rounds[i] = tr.after_step(step, y)
        if step.local_loss is not None:
            result.scalars[f"local/loss/stage_{i}"] = step.local_loss
        if not stage.is_last and not locked:  # unlocked: the chain above runs on h now; its target trains M_i
            above = self._run_from(i + 1, step.h, y, result, rounds, true_round)
            if stage.synthesizer is not None:  # (an auxiliary head needs nothing from above)
                target = above[0].target
                assert target is not None
                result.synth_losses[i] = stage.train_synthesizer(step.h, y, target)
        return [step, *above]

    def _unlocked_step(self, stage: DecoupledStage, x: torch.Tensor, y: torch.Tensor, result: StepResult) -> StageStep:
        """Complete unlock: the step on the synthetic input, then the real input ``x``'s part; the
        step's h (and loss, at the last stage) are the real chain's."""
        step = engine.unlocked_step(stage, self._batch, y)
        h, input_loss, loss = engine.real_forward(stage, self._batch, x, y)
        result.scalars[f"unlock/input_loss/stage_{stage.index}"] = input_loss
        if stage.is_last:
            result.scalars["unlock/synthetic_input_loss"] = step.loss
        return dataclasses.replace(step, h=h, loss=loss)

    def _run_deferred(self, i: int, x: torch.Tensor, y: torch.Tensor, result: StepResult,
                      rounds: dict[int, TrueRound], true_round: str | None) -> list[StageStep]:
        """A stage that defers its target: its step now (the output only under the delayed rule, the
        step on g^ under the corrected one), the chain above, then the batch of ``delay`` steps ago
        settled."""
        stage = self.stages[i]
        # A corrected stage has a synthesizer to measure on true rounds (the delayed rule runs none).
        tr = TrueRound.before_forward(stage, x, kind=true_round, bp_lambda=self.correction) if true_round else None
        step = engine.train_step(stage, x, y) if stage.corrected else engine.delayed_forward(stage, x)
        result.updated[i] = step.updated
        if tr is not None:
            rounds[i] = tr.after_step(step, y)
        self._kept[i].append(engine.keep(stage, x, y, step))
        above = self._run_from(i + 1, step.h, y, result, rounds, true_round)
        if len(self._kept[i]) > self.delay:
            settled = self._settle(i)
            if stage.delayed:
                result.updated[i] = settled.updated
            if settled.synth_loss is not None:
                result.synth_losses[i] = settled.synth_loss
        return [step, *above]

    def _settle(self, i: int) -> engine.Settled:
        """Stage ``i``'s oldest kept batch, settled with its gradient; its target is owed to the stage
        below."""
        settled = engine.settle(self.stages[i], self._kept[i].popleft(), self._owed[i].popleft())
        if i > 0 and self.stages[i - 1].defers_target:
            assert settled.target is not None
            self._owed[i - 1].append(settled.target)
        return settled

    def flush(self) -> None:
        """Settle every batch still kept by a stage that defers its target, top down, and apply the
        corrected rule's residuals (a consistent cut)."""
        for i in range(len(self.stages) - 2, -1, -1):
            while self._kept[i]:
                self._settle(i)
            if self.stages[i].corrected:
                self.stages[i].apply_residuals()

    @property
    def owed(self) -> int:
        """Batches still kept by stages that defer their targets (0 after :meth:`flush`)."""
        return sum(len(k) for k in self._kept)

    def carried_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps besides the stages: nothing here (after :meth:`flush` nothing is in
        flight); a recurrent pipeline's carried state (:mod:`dni.recurrent`)."""
        return {}

    def load_carried_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`carried_state`."""

    def _finish_rounds(self, rounds: dict[int, TrueRound], true_grad: torch.Tensor | None, result: StepResult) -> None:
        """Pass the true gradient from the top down through every stage's round."""
        for i in range(len(self.stages) - 2, -1, -1):
            if true_grad is None:
                return
            scalars, true_grad = finish_round(self.stages[i], rounds[i], true_grad, bp_lambda=self.correction)
            result.scalars.update(scalars)

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
        """The last stage's output for ``x`` through every stage (in whatever mode the stages are)."""
        for s in self.stages:
            x = s.module(x)
        return x

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """``{"loss": ..., "accuracy": ...}`` over ``batches`` in eval mode (accuracy for class
        labels only; empty for no batches); restores training mode."""
        self.train(False)
        sums = EvalSums(self.stages[-1].loss_fn)
        try:
            for x, y in batches:
                sums.add(self.predict(x), y)
        finally:
            self.train(True)
        return sums.result()
