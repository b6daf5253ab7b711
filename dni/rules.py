"""The decoupling rules, as small functions of one stage's tensors.

Each rule touches one stage and one interface only, never the whole network, so
a stage in another process (a Ray actor) calls exactly the same code as the
single-process trainer. The data flow between stage i and stage i+1 (paper
section 3.1):

  1. stage i computes h_i and asks its synthesizer for g^_i          (:func:`synthetic_gradient`)
  2. it backpropagates g^_i into its parameters and steps at once    (:func:`backward_from`)
  3. stage i+1, given h_i, produces dL/dh_i: from the true loss if
     it is the last stage, else from its own g^_{i+1} backpropagated
     through itself (a bootstrapped target, as in TD)                (:func:`backward_from`)
  4. that target travels back; stage i regresses M_i(h_i) onto it    (:func:`synthesizer_loss`)

BP(lambda) (paper, supplementary A) mixes the two gradients available at an
interface before backpropagating further (:func:`bp_lambda_mix`).

Units: synthesizers predict per-example gradients, ``batch_size x dL/dh`` for a
batch-mean loss L (see :mod:`dni.synthesizer`); these rules convert.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F

from dni.synthesizer import Synthesizer


def synthetic_gradient(
    synthesizer: Synthesizer, h: torch.Tensor, context: torch.Tensor | None
) -> torch.Tensor:
    """g^ = M(h, c) / B: the predicted gradient of the batch-mean loss w.r.t. ``h``.

    The prediction is detached: using it never trains the synthesizer.

    Args:
        synthesizer: M for this interface.
        h: the stage output, (B, ...); only its value is used.
        context: labels (B,) or one-hot (B, classes) for cDNI, else None.

    Returns:
        A tensor shaped like ``h``, in the units of ``dL/dh``.
    """
    with torch.no_grad():
        return synthesizer(h.detach(), context) / h.shape[0]


def backward_from(output: torch.Tensor, grad: torch.Tensor, stage_input: torch.Tensor | None) -> torch.Tensor | None:
    """Backpropagate ``grad`` (dL/d output) through one stage's graph.

    Accumulates parameter gradients in the stage and returns dL/d input, the
    target the previous stage's synthesizer is regressed onto: bootstrapped when
    ``grad`` is synthetic, true when it came from the loss.

    Args:
        output: the stage output, still attached to the stage's graph.
        grad: dL/d output (synthetic, true, or a BP(lambda) mix), same shape.
        stage_input: the detached input that required grad (None for the first stage).

    Returns:
        dL/d input (detached), or None for the first stage.
    """
    if stage_input is None:
        output.backward(grad)
        return None
    stage_input.grad = None
    output.backward(grad)
    # mypy still narrows .grad to the None assigned above; backward() may have filled it.
    filled = cast("torch.Tensor | None", stage_input.grad)
    if filled is None:  # the output does not depend on the input: dL/d input is zero
        return torch.zeros_like(stage_input)
    return filled.detach()


def loss_backward(loss: torch.Tensor, stage_input: torch.Tensor | None) -> torch.Tensor | None:
    """The last stage's rule: backpropagate the true loss; return the true dL/d input."""
    return backward_from(loss, torch.ones_like(loss), stage_input)


def synthesizer_loss(
    synthesizer: Synthesizer,
    h: torch.Tensor,
    context: torch.Tensor | None,
    target: torch.Tensor,
    *,
    weight: float = 1.0,
) -> torch.Tensor:
    """The L2 regression loss of M(h, c) onto ``target`` (paper: weight 1.0).

    Args:
        h: the activation the prediction is for (detached; kept until the target arrived).
        target: dL/dh for the batch-mean loss; scaled here by B to per-example units, and
            folded first into a normalised synthesizer's unit (:meth:`Synthesizer.observe_target`).

    Returns:
        A scalar with a graph into the synthesizer's parameters only.
    """
    per_example = target.detach() * h.shape[0]
    synthesizer.observe_target(per_example)  # a normalised synthesizer's unit follows its targets
    prediction = synthesizer(h.detach(), context)
    return weight * F.mse_loss(prediction, per_example)


def zero_prediction_loss(h: torch.Tensor, target: torch.Tensor, *, weight: float = 1.0) -> float:
    """What :func:`synthesizer_loss` would be for a synthesizer that predicts zero: the
    target's mean square, in the same per-example units."""
    return weight * (target.detach() * h.shape[0]).pow(2).mean().item()


def bp_lambda_mix(true_grad: torch.Tensor, synthetic: torch.Tensor, lam: float) -> torch.Tensor:
    """BP(lambda): ``lam * true + (1 - lam) * synthetic``; 1 is backprop, 0 pure DNI."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    if lam == 1.0:
        return true_grad
    if lam == 0.0:
        return synthetic
    return lam * true_grad + (1.0 - lam) * synthetic


def should_update(generator: torch.Generator, p_update: float) -> bool:
    """Whether a stage applies its update this step: true with probability ``p_update``.

    Draws exactly one number from ``generator`` every call (also when p is 1), so a
    stage's random stream does not depend on its p.
    """
    draw = torch.rand((), generator=generator).item()
    return draw < p_update


def gradient_agreement(synthetic: torch.Tensor, true_grad: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, relative error ||g^ - g|| / ||g||) over the whole batch."""
    s, t = synthetic.flatten().double(), true_grad.flatten().double()
    t_norm = t.norm()
    cosine = F.cosine_similarity(s, t, dim=0, eps=1e-30).item()
    rel = ((s - t).norm() / t_norm).item() if t_norm > 0 else float("inf")
    return cosine, rel
