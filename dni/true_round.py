"""True-gradient rounds (level 2 of the synchronisation), per stage, on every backend.

On a round's batch every stage keeps what it needs before its forward: a copy of
itself as it was then (the *snapshot*) and its input. Once the stage has stepped,
it adds its h and g^. When the true dL/dh of its output arrives from above, the
stage measures g^ against it (``sg/cosine``, ``sg/rel_error``), on a *training*
round (``sync.true_every``) trains its synthesizer on it, passes it through the
snapshot to get the true dL/d input for the stage below (the live stage has moved
on, so its own graph would give a different gradient) and, with ``sync.bp_lambda``,
applies a delayed correction of lambda x (true - g^) to its live parameters. A
*measuring* round (``log.grad_every``) only measures and passes the gradient on.

The single-process pipeline and the stage worker call the same two functions,
:meth:`TrueRound.before_forward` and :func:`finish_round`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from dni import rules
from dni.engine import StageStep
from dni.stage import DecoupledStage

MEASURE, TRAIN = "measure", "train"
"""Round kinds: measure only (log.grad_every), or also train and correct (sync.true_every)."""


@dataclass
class TrueRound:
    """What a stage keeps of a round's batch until its true gradient arrives."""

    kind: str
    snapshot: torch.nn.Module | None  # the stage as it was at this batch's forward
    stage_input: torch.Tensor | None  # the activation it received (None for stage 0)
    batch_input: torch.Tensor | None = None  # stage 0's batch, when a BP(lambda) correction needs it
    h: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    synthetic: torch.Tensor | None = None

    @classmethod
    def before_forward(cls, stage: DecoupledStage, x: torch.Tensor, *, kind: str, bp_lambda: float) -> "TrueRound":
        """Open a round for the batch whose input ``x`` the stage is about to run forward."""
        correct = kind == TRAIN and bp_lambda > 0 and stage.synthesizer is not None
        # Stage 0 passes nothing further down: it needs its snapshot only for a correction.
        needs_snapshot = not stage.is_last and (stage.index > 0 or correct)
        snapshot = copy.deepcopy(stage.module) if needs_snapshot else None
        first = stage.index == 0
        return cls(kind, snapshot, None if first else x.detach(),
                   batch_input=x.detach() if first and snapshot is not None else None)

    def after_step(self, step: StageStep, labels: torch.Tensor) -> "TrueRound":
        """Add what the stage's step produced (its h and g^)."""
        self.h, self.labels, self.synthetic = step.h, labels, step.synthetic
        return self


def finish_round(stage: DecoupledStage, tr: TrueRound, true_grad: torch.Tensor, *,
                 bp_lambda: float) -> tuple[dict[str, float], torch.Tensor | None]:
    """The true dL/dh of ``tr``'s batch has arrived: measure, train, correct, pass it on.

    Returns:
        (scalars to log at the round's step, the true dL/d input for the stage below or None).
    """
    scalars: dict[str, float] = {}
    i = stage.index
    if tr.synthetic is not None:
        assert tr.h is not None and tr.labels is not None
        cos, rel = rules.gradient_agreement(tr.synthetic, true_grad)
        scalars[f"sg/cosine/stage_{i}"], scalars[f"sg/rel_error/stage_{i}"] = cos, rel
        if tr.kind == TRAIN:
            scalars[f"sg/true_loss/stage_{i}"] = stage.train_synthesizer(tr.h, tr.labels, true_grad)
    grad_in = None
    if tr.snapshot is not None:
        lam = bp_lambda if tr.kind == TRAIN else 0.0
        grad_in = pass_true_gradient(stage, tr, true_grad, lam)
    return scalars, grad_in


def pass_true_gradient(stage: DecoupledStage, tr: TrueRound, true_grad: torch.Tensor, lam: float) -> torch.Tensor | None:
    """The true dL/d input of ``tr.snapshot`` given the true dL/d output (None for stage 0);
    with ``lam > 0``, also apply the BP(lambda) correction to the live ``stage``."""
    assert tr.snapshot is not None
    out = None
    grad_in = None
    if tr.stage_input is not None:
        x = tr.stage_input.detach().requires_grad_()
        out = tr.snapshot(x)
        (grad_in,) = torch.autograd.grad(out, [x], true_grad, retain_graph=lam > 0)
    if lam > 0 and tr.synthetic is not None:
        correct(stage, tr, out, lam * (true_grad - tr.synthetic))
    return grad_in


def correct(stage: DecoupledStage, tr: TrueRound, out: torch.Tensor | None, grad: torch.Tensor) -> None:
    """A delayed update of the live stage with the parameter gradient of ``grad`` (a dL/d output)
    taken at the snapshot: the BP(lambda) correction of a level-2 round."""
    assert tr.snapshot is not None
    if out is None:  # stage 0: its input is the batch it kept
        out = tr.snapshot(tr.batch_input)
    params = list(tr.snapshot.parameters())
    correction = torch.autograd.grad(out, params, grad, allow_unused=True)
    for p, c in zip(stage.module.parameters(), correction):
        p.grad = c
    stage.optimizer.step()
    stage.optimizer.zero_grad(set_to_none=True)
