"""Level 2 of the synchronisation: a true end-to-end gradient round through stage snapshots.

On a true-round batch every stage keeps a copy of itself as it was at that batch's
forward. When the true dL/dh of its output arrives from above, the stage passes it
through the copy to get the true dL/d input for the stage below (the live stage has
moved on, so its own graph would give a different gradient), and, with BP(lambda),
applies a delayed correction of lambda x (true - synthetic) to its live parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dni.stage import DecoupledStage


@dataclass
class TrueRound:
    """What a stage keeps of a level-2 batch until its true gradient arrives."""

    h: torch.Tensor
    labels: torch.Tensor
    synthetic: torch.Tensor | None
    snapshot: torch.nn.Module | None  # the stage as it was at this batch's forward
    stage_input: torch.Tensor | None  # the activation it received (None for stage 0)
    batch_input: torch.Tensor | None = None  # stage 0's batch, when a BP(lambda) correction needs it


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
    correction = torch.autograd.grad(out, list(tr.snapshot.parameters()), grad)
    for p, c in zip(stage.module.parameters(), correction):
        p.grad = c
    stage.optimizer.step()
    stage.optimizer.zero_grad(set_to_none=True)
