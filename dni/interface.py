"""A decoupled neural interface to put inside a user's own model and training loop.

``h = self.interface(h, context=y)`` at a cut in ``forward`` makes the layers below
the cut learn from a synthetic gradient and the layers above learn as usual (paper,
section 3.1; the drop-in form follows koz4k/dni-pytorch's ``BackwardInterface``).
In training mode, when ``h`` requires grad, one call

  1. predicts g^ = M(h, c) / B (:func:`dni.rules.synthetic_gradient`) and
     backpropagates it into the layers below at once: their gradients are ready
     before the forward goes on (update unlocking, in one process), and their
     graph is freed;
  2. returns h' = h detached, a new leaf: the layers above are cut off from below;
  3. when the user's ``loss.backward()`` reaches h' with dL/dh' (true, or
     bootstrapped if another interface sits above), regresses M(h, c) onto it
     (:func:`dni.rules.synthesizer_loss`) and steps M with its own optimiser.
     Nothing flows below h': the layers below already have their gradient.

In eval mode, with grad disabled, or when ``h`` does not require grad, the interface
is the identity (returns ``h`` itself, trains nothing): gradients then flow through
it as in plain backprop.

Contract for the user's loop:
  * call ``optimizer.zero_grad()`` BEFORE the forward: the layers below an interface
    receive their gradient during the forward, so a zero_grad between forward and
    backward would erase it;
  * the cut must be complete: nothing above may use a tensor from below the cut
    other than through the interface (a skip connection across it would backpropagate
    into a graph that step 1 has already freed);
  * each forward trains M at most once, on that forward's own (h, c), also when
    several forwards precede one backward; a forward never followed by a backward
    trains nothing and is freed with its graph;
  * the loss is a batch mean (the synthesizer predicts per-example gradients, B x dL/dh,
    and the rules scale by the batch size; see :mod:`dni.synthesizer`);
  * one process, no DistributedDataParallel: gradients reach the layers below during
    the forward, which DDP's bucketing does not expect.

Parameters: the synthesizer is a registered submodule, so ``.to(device)``,
``state_dict()`` and checkpoints include it (and its optimiser state, as the module's
extra state). It therefore also appears in ``model.parameters()``; its gradients are
set to None right after its own step, and torch optimisers skip parameters whose
``.grad`` is None (weight decay included), so the user's optimiser never moves it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from dni import rules
from dni.optim import OptimizerSpec
from dni.synthesizer import Synthesizer, make_synthesizer


@dataclass
class _Pending:
    """What one forward leaves for its hook: just enough to train M once the target arrives."""

    h: torch.Tensor | None  # detached, (B, ...)
    context: torch.Tensor | None
    synthetic: torch.Tensor | None  # g^, kept only to measure agreement


def _check_finite(t: torch.Tensor, what: str, hint: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise RuntimeError(f"non-finite {what} at a BackwardInterface: {hint}")


class BackwardInterface(nn.Module):
    """Placed in a model's forward at a cut: ``h = self.interface(h, context=y)``.

    Args:
        synthesizer: M for the activation at the cut (see :mod:`dni.synthesizer`).
        lr: the synthesizer's learning rate.
        optimizer: the synthesizer's optimiser (default Adam).
        loss_weight: weight of its L2 regression loss (paper: 1.0).
        measure_agreement: keep g^ until the target arrives and record
            :attr:`last_agreement`; False saves that memory and a device sync.

    Attributes:
        last_agreement: (cosine, relative error) of the last g^ with its target
            (:func:`dni.rules.gradient_agreement`), or None before the first target.

    Raises:
        ValueError: on a non-positive ``lr`` or ``loss_weight``.
    """

    def __init__(
        self,
        synthesizer: Synthesizer,
        *,
        lr: float = 1e-4,
        optimizer: OptimizerSpec = OptimizerSpec(),
        loss_weight: float = 1.0,
        measure_agreement: bool = True,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not loss_weight > 0:
            raise ValueError(f"loss_weight must be positive, got {loss_weight}")
        self.synthesizer = synthesizer
        self.loss_weight = loss_weight
        self.measure_agreement = measure_agreement
        # A plain attribute, not a submodule: it holds references to M's parameters,
        # which .to(device) moves in place, so it stays valid.
        self.optimizer = optimizer.build(list(synthesizer.parameters()), lr)
        self.last_agreement: tuple[float, float] | None = None
        self._last_loss: torch.Tensor | None = None

    @classmethod
    def for_shape(
        cls,
        activation_shape: tuple[int, ...],
        *,
        num_classes: int = 0,
        conditioned: bool = False,
        hidden_layers: int | None = None,
        hidden_width: int = 1024,
        batch_norm: bool = False,
        context_size: int | None = None,
        normalize: bool = False,
        kind: str = "auto",
        lr: float = 1e-4,
        optimizer: OptimizerSpec = OptimizerSpec(),
        loss_weight: float = 1.0,
        measure_agreement: bool = True,
    ) -> "BackwardInterface":
        """An interface with the synthesizer :func:`dni.synthesizer.make_synthesizer` picks.

        Args:
            activation_shape: the per-example shape of h, without the batch dimension.
            num_classes, conditioned, hidden_width, batch_norm, context_size, normalize, kind: as for
                :func:`~dni.synthesizer.make_synthesizer`; conditioned is cDNI, with
                the labels (or float targets) passed as ``context``.
            hidden_layers: None for the paper's choice: 0 (linear) for cDNI, else 2.
            lr, optimizer, loss_weight, measure_agreement: as for the constructor.
        """
        if hidden_layers is None:
            hidden_layers = 0 if conditioned else 2
        synthesizer = make_synthesizer(tuple(activation_shape), hidden_layers=hidden_layers,
                                       hidden_width=hidden_width, batch_norm=batch_norm,
                                       num_classes=num_classes, conditioned=conditioned,
                                       context_size=context_size, normalize=normalize, kind=kind)
        return cls(synthesizer, lr=lr, optimizer=optimizer, loss_weight=loss_weight,
                   measure_agreement=measure_agreement)

    @property
    def last_synthesizer_loss(self) -> float | None:
        """The synthesizer's last regression loss, or None before the first target.

        Kept as a tensor until read, so that training does not wait on the device.
        """
        return None if self._last_loss is None else float(self._last_loss)

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Cut the graph at ``h`` (see the module docstring); identity outside training.

        Args:
            h: the activation at the cut, (B, ...), attached to the layers below.
            context: the labels (B,) or float targets for a conditioned (cDNI)
                synthesizer; ignored by an unconditioned one.

        Returns:
            h' = h detached, requiring grad (or ``h`` itself when inactive).

        Raises:
            RuntimeError: if g^ is non-finite; nothing is backpropagated then.
            ValueError: if the synthesizer is conditioned and ``context`` is None.
        """
        if not (self.training and torch.is_grad_enabled() and h.requires_grad):
            return h
        synthetic = rules.synthetic_gradient(self.synthesizer, h, context)  # (B, ...), dL/dh units
        _check_finite(synthetic, "synthetic gradient",
                      "h holds NaN/inf, or the synthesizer diverged (lower its lr)")
        h.backward(synthetic)  # the layers below get their gradient now
        cut = h.detach().requires_grad_()
        pending = _Pending(h.detach(), None if context is None else context.detach(),
                           synthetic if self.measure_agreement else None)
        # The hook owns this forward's pending state: a second forward before the
        # backward cannot mix up (h, c) pairs, and an unused one dies with its graph.
        cut.register_hook(partial(self._on_target, pending))
        return cut

    def _on_target(self, pending: _Pending, target: torch.Tensor) -> None:
        """Hook on h': dL/dh' has arrived; train M on it once, then free the pending state."""
        if pending.h is None:  # a second backward through a retained graph
            return
        h, context, synthetic = pending.h, pending.context, pending.synthetic
        pending.h = pending.context = pending.synthetic = None
        _check_finite(target, "gradient target", "the loss or a layer above produced NaN/inf")
        if synthetic is not None:
            self.last_agreement = rules.gradient_agreement(synthetic, target)
        self._train_synthesizer(h, context, target)

    def _train_synthesizer(self, h: torch.Tensor, context: torch.Tensor | None, target: torch.Tensor) -> None:
        """One step of M's own optimiser on its L2 loss; its grads are None afterwards."""
        params = [p for p in self.synthesizer.parameters() if p.requires_grad]
        with torch.enable_grad():  # hooks run inside backward, where grad mode is off
            loss = rules.synthesizer_loss(self.synthesizer, h, context, target, weight=self.loss_weight)
            # autograd.grad rather than backward: touches M's parameters only and
            # leaves no .grad behind for the user's optimiser to find.
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        self.optimizer.step()
        for p in params:
            p.grad = None
        self._last_loss = loss.detach()

    def get_extra_state(self) -> dict[str, Any]:
        """The synthesizer optimiser's state travels in the model's ``state_dict``."""
        return self.optimizer.state_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
