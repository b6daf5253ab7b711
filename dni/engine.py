"""The per-stage step, written once: what one stage does with one batch, on every backend.

The single-process :class:`~dni.pipeline.Pipeline` and the runtime's stage worker
(:mod:`workers.stage_runner`) both call :func:`train_step` for a stage's batch and
:meth:`~dni.stage.DecoupledStage.train_synthesizer` when a target arrives; they differ
only in how the tensors travel. The order within a step (paper section 3.1):

  1. forward: h = f(x);
  2. the gradient for h: the stage's synthetic gradient g^ = M(h, c) (update-unlocked), or
     under local losses the gradient of its auxiliary head's loss (:mod:`dni.local_head`),
     or, for a *locked* stage, the gradient from above (``from_above(h)``; backprop, or
     BP(lambda) mixed with g^); the last stage computes the true loss instead;
  3. backward: parameter gradients, and dL/dx, the target for the stage below;
  4. the optimiser step (with probability ``p_update``);
  5. a locked stage with a synthesizer trains it on the gradient from above at once; an
     unlocked one trains it when the target of h arrives (the caller's part).

A stage that *defers its target* keeps each batch (:class:`Kept`) until the batch's dL/dh comes
back, then :func:`settle` takes the rule's part and gives the dL/dx for the stage below: the
delayed rule (its only update, replayed on the kept input) and corrected synthetic gradients
(the step at once on g^ as above, then the residual target - g^ through a replay, added to the
next step's gradients, so that a batch's two contributions add up to its target's).

Complete unlock (:mod:`dni.unlock`) splits a stage's step in two: :func:`unlocked_step` on the
synthetic input, before anything has arrived from below, and :func:`real_forward` once the real
input has.

A NaN or inf raises :class:`~dni.stage.NonFiniteError` before the stage updates;
:func:`apply_nonfinite` is the run's policy for it (``train.nonfinite``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from dni import rules
from dni.stage import DecoupledStage, NonFiniteError, preserved_buffers

GradientFromAbove = Callable[[torch.Tensor], torch.Tensor]
"""Given h (detached), return dL/dh from the stages above (runs them, or waits for their message)."""

NONFINITE_HINT = ("train.nonfinite=skip or reset continues past such batches; lowering train.lr or "
                  "synthesizer.lr often avoids them")


@dataclass
class StageStep:
    """What one stage's step produced."""

    h: torch.Tensor
    """The output, detached: what travels to the next stage (the logits at the last stage)."""
    synthetic: torch.Tensor | None
    """g^ for h (None for the last stage and for stages without a synthesizer)."""
    target: torch.Tensor | None
    """dL/dx for the stage below (bootstrapped, true, or mixed); None for the first stage."""
    loss: float = math.nan
    """The last stage's loss."""
    updated: bool = False
    """Whether the optimiser step was applied (see p_update)."""
    synth_loss: float | None = None
    """A locked stage's synthesizer loss on the gradient from above."""
    local_loss: float | None = None
    """Under local losses, the loss of the stage's auxiliary head."""


def is_locked(stage: DecoupledStage, bp_lambda: float) -> bool:
    """Whether ``stage`` waits for the gradient from above before it updates: a stage (not the
    last, not delayed, not frozen, without an auxiliary head) without a synthesizer (backprop), or
    any stage under BP(lambda > 0)."""
    return (not stage.is_last and not stage.delayed and not stage.frozen and stage.local_head is None
            and (stage.synthesizer is None or bp_lambda > 0))


def delayed_forward(stage: DecoupledStage, x: torch.Tensor) -> StageStep:
    """The delayed rule's step on a new batch: the output only; the update comes with the batch's
    gradient (:func:`settle`). The caller keeps the batch (:func:`keep`) until then."""
    return StageStep(stage.forward_only(x), None, None)


def frozen_step(stage: DecoupledStage, x: torch.Tensor) -> StageStep:
    """A frozen stage's step (No-Bprop): the output, and nothing learned; the schedule advances."""
    h = stage.forward_only(x)
    stage.steps_done += 1
    return StageStep(h, None, None)


@dataclass
class Kept:
    """What a stage that defers its target (:attr:`DecoupledStage.defers_target`) keeps of one batch
    until the batch's dL/dh comes back: its memory cost per batch in flight."""

    x: torch.Tensor
    """The input, replayed at the stage's weights of that time (features replay)."""
    labels: torch.Tensor
    h: torch.Tensor | None = None
    """Corrected: the output, which the synthesizer is regressed from."""
    synthetic: torch.Tensor | None = None
    """Corrected: g^ of the step taken at once."""
    early_target: torch.Tensor | None = None
    """Corrected: dL/dx of that step (g^ backpropagated); None for stage 0."""


def keep(stage: DecoupledStage, x: torch.Tensor, labels: torch.Tensor, step: StageStep) -> Kept:
    """What ``stage`` keeps of its ``step`` on input ``x`` until :func:`settle`."""
    if stage.corrected:
        return Kept(x, labels, step.h, step.synthetic, step.target)
    return Kept(x, labels)


@dataclass
class Settled:
    """What :func:`settle` did with a batch's target."""

    target: torch.Tensor | None
    """dL/dx for the stage below (None for stage 0)."""
    updated: bool = False
    """The delayed rule: whether its step was applied (see p_update)."""
    synth_loss: float | None = None
    """Corrected: the synthesizer's regression loss on the target."""


def settle(stage: DecoupledStage, kept: Kept, grad: torch.Tensor) -> Settled:
    """dL/dh of the batch ``kept`` has come back to a stage that defers its target.

    * delayed: replay the forward at the current weights, backpropagate ``grad``, step; the target
      for the stage below is that replay's dL/dx, the true gradient with the schedule's delay;
    * corrected: train the synthesizer on ``grad``; backpropagate the residual ``grad - g^`` through
      a replay and leave its parameter gradients for the next step (one optimiser step per batch,
      so Adam's statistics see one gradient per step); the target for the stage below is the early
      dL/dx plus the residual's, so that it too adds up to ``grad`` backpropagated.
    """
    if not stage.corrected:
        return Settled(stage.replay_backward(kept.x, grad), stage.step())
    assert kept.h is not None and kept.synthetic is not None
    synth_loss = stage.train_synthesizer(kept.h, kept.labels, grad)
    residual = stage.replay_backward(kept.x, grad - kept.synthetic)
    down = None if residual is None or kept.early_target is None else kept.early_target + residual
    return Settled(down, synth_loss=synth_loss)


def train_step(stage: DecoupledStage, x: torch.Tensor, labels: torch.Tensor, *,
               from_above: GradientFromAbove | None = None, bp_lambda: float = 0.0) -> StageStep:
    """One training step of ``stage`` on its input ``x``.

    Args:
        stage: the stage (its module, synthesizer and optimisers).
        x: its input: the batch (stage 0) or the activation of the stage below.
        labels: the batch's labels: the loss's targets and the cDNI context.
        from_above: for a locked stage (:func:`is_locked`), how to get dL/dh; None for an
            unlocked or the last stage.
        bp_lambda: BP(lambda) mix of the gradient from above with g^ (locked stages with a synthesizer).

    Returns:
        The step's :class:`StageStep`.

    Raises:
        NonFiniteError: a NaN/inf in h, g^, the loss or the target (nothing was updated here).
        ValueError: a stage that is neither last nor has a synthesizer, without ``from_above``.
    """
    h = stage.forward(x)
    synthetic, loss, from_top, local_loss = None, math.nan, None, None
    if stage.is_last:
        loss, target = stage.loss_backward(labels)
    elif stage.local_head is not None:
        grad, local_loss = stage.local_gradient(labels)
        target = stage.backward(grad)
    else:
        if stage.synthesizer is not None:
            synthetic = stage.synthetic_gradient(labels)
        if from_above is not None:
            from_top = from_above(h)
            grad = from_top if synthetic is None else rules.bp_lambda_mix(from_top, synthetic, bp_lambda)
        elif synthetic is not None:
            grad = synthetic
        else:
            stage.abandon()
            raise ValueError(f"stage {stage.index} has no synthesizer: it needs the gradient from above (from_above)")
        target = stage.backward(grad)
    updated = stage.step()
    synth_loss = None
    if from_top is not None and stage.synthesizer is not None:
        synth_loss = stage.train_synthesizer(h, labels, from_top)
    return StageStep(h, synthetic, target, loss, updated, synth_loss, local_loss)


def unlocked_step(stage: DecoupledStage, batch: torch.Tensor, labels: torch.Tensor) -> StageStep:
    """Complete unlock, the step: :func:`train_step` (update-unlocked, or the loss at the last stage) on
    the synthetic input I(``batch``) of the raw batch. Its target is dL/d(synthetic input), for the
    stage below; its h is the output on the synthetic input (the real one is :func:`real_forward`'s).
    BatchNorm statistics are left as they were: the real chain sets them."""
    if stage.unlock is None:
        raise ValueError(f"stage {stage.index} has no input model (synthesizer.unlock)")
    with preserved_buffers([stage.module]):
        return train_step(stage, stage.unlock.predict(batch), labels)


def real_forward(stage: DecoupledStage, batch: torch.Tensor, x: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Complete unlock, the real input ``x`` of the raw ``batch`` has arrived: fit the input model to
    it and run the stage on it (no graph; BatchNorm statistics move).

    Returns:
        (the real output, detached; the input model's loss; at the last stage the loss of the real
        output, else NaN).
    """
    if stage.unlock is None:
        raise ValueError(f"stage {stage.index} has no input model (synthesizer.unlock)")
    input_loss = stage.unlock.fit(batch, x, lr_scale=stage.lr_scale)
    h = stage.forward_only(x)
    loss = stage.loss_fn(h, labels).item() if stage.is_last else math.nan
    return h, input_loss, loss


def apply_nonfinite(policy: str, error: NonFiniteError, stage: DecoupledStage | None, *, step: int,
                    stopped: str = "") -> dict[str, float]:
    """``train.nonfinite`` for a fault found at global ``step`` (0-based), once the batch was dropped.

    Args:
        policy: ``stop``, ``skip`` or ``reset``.
        error: the fault.
        stage: the stage at fault, when this process holds it (its synthesizer is reset under
            ``reset`` when its synthetic gradient was at fault).
        stopped: under ``stop``, what was saved, for the message (e.g. "a checkpoint at ...").

    Returns:
        The scalars to log for the skipped batch: ``nonfinite/stage_<i>``.

    Raises:
        NonFiniteError: under ``stop``, with a message naming the stage, the step and what to do.
    """
    if policy == "stop":
        saved = f"; stopped with {stopped}" if stopped else ""
        raise NonFiniteError(error.stage, error.what, f"non-finite {error.what} at stage {error.stage}, step {step + 1}"
                                                      f"{saved} (train.nonfinite=stop; {NONFINITE_HINT})")
    if policy == "reset" and error.what == "synthetic gradient" and stage is not None:
        stage.reset_synthesizer()
    return {f"nonfinite/stage_{error.stage}": 1.0}
