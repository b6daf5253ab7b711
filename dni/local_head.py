"""Local losses (``method: local``): each stage learns from a small classifier of its own output.

Decoupled Greedy Learning (Belilovsky et al. 2019, arXiv 1901.08164) gives every stage but the last
an *auxiliary head*: a small network from the stage's output h to the task's predictions, trained
on the batch's labels with the model's own loss. The stage backpropagates the gradient of that
local loss, dL_local/dh, in place of a synthetic gradient, and the head learns from the same loss.
Nothing travels back down: no targets, no synthesizers to fit, and from the first step each stage
has a useful signal (a synthetic gradient is near zero until its synthesizer has learned). The
price is that a stage learns features that its own head can use, not the ones the stages above
need; the literature finds that close to backprop at 2-4 stages and worse as the cut deepens.

A head is ``[pool] -> flatten -> LayerNorm -> (Linear -> GELU) x hidden_layers -> Linear``:

* a feature map (per-example shape (C, H, W)) is average-pooled to at most ``pool`` x ``pool``
  first, as DGL's auxiliary nets do, so the head's cost does not grow with the map;
* a sequence of vectors (per-example (T, C), with one label per position: a language model)
  keeps its positions: the head maps each position's C features to the classes;
* anything else (a vector per example) is flattened.

LayerNorm makes the head indifferent to the scale of h (a residual stream grows with depth).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dni.losses import LossFn
from dni.optim import OptimizerSpec, set_lr


class AuxiliaryHead(nn.Module):
    """The auxiliary classifier of one stage's output.

    Args:
        in_shape: per-example shape of the stage's output.
        num_classes: outputs per example (per position for sequences).
        hidden_layers: GELU hidden layers (0: a linear classifier on the normalised features).
        hidden_width: units per hidden layer.
        pool: a feature map is average-pooled to at most pool x pool first.
        per_position: for an output of shape (T, C), classify each of the T positions.
    """

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, *, hidden_layers: int = 0,
                 hidden_width: int = 256, pool: int = 2, per_position: bool = False) -> None:
        super().__init__()
        if num_classes < 1 or hidden_layers < 0 or hidden_width < 1 or pool < 1:
            raise ValueError(f"bad sizes: num_classes={num_classes}, hidden_layers={hidden_layers}, "
                             f"hidden_width={hidden_width}, pool={pool}")
        if per_position and len(in_shape) != 2:
            raise ValueError(f"a per-position head needs outputs of shape (T, C), got {tuple(in_shape)}")
        self.per_position = per_position
        self.pool: nn.Module = nn.Identity()
        features = in_shape[-1] if per_position else math.prod(in_shape)
        if len(in_shape) == 3 and not per_position:
            side = (min(pool, in_shape[1]), min(pool, in_shape[2]))
            self.pool = nn.AdaptiveAvgPool2d(side)
            features = in_shape[0] * side[0] * side[1]
        layers: list[nn.Module] = [nn.LayerNorm(features)]
        width = features
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden_width), nn.GELU()]
            width = hidden_width
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.per_position:
            return self.net(h)  # (B, T, C) -> (B, T, classes)
        return self.net(self.pool(h).flatten(1))


class LocalHead:
    """A stage's auxiliary head, its optimiser and the loss it is trained with.

    Args:
        head: the :class:`AuxiliaryHead`.
        loss_fn: the model's loss ``(predictions, labels) -> scalar`` (a batch mean).
        lr: the head's base learning rate (scaled by the stage's schedule at each step).
        optimizer: its optimiser's kind and weight decay.
    """

    def __init__(self, head: AuxiliaryHead, *, loss_fn: LossFn, lr: float, optimizer: OptimizerSpec) -> None:
        self.head, self.loss_fn, self.lr = head, loss_fn, lr
        self.optimizer = optimizer.build(list(head.parameters()), lr)

    def gradient(self, h: torch.Tensor, labels: torch.Tensor, *, lr_scale: float = 1.0) -> tuple[torch.Tensor, float]:
        """The local loss of the stage's output ``h``: one step of the head on it, and dL_local/dh.

        Returns:
            (dL_local/dh, detached, the shape of ``h``; the local loss before the head's step). A
            non-finite loss is returned without a step, for the caller to report.
        """
        h = h.detach().requires_grad_()
        loss = self.loss_fn(self.head(h), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # one pass: the head's parameter gradients and dL_local/dh (h is a leaf)
        assert h.grad is not None
        value = loss.item()
        if math.isfinite(value):  # a non-finite loss must not reach the head's weights (the stage raises)
            set_lr(self.optimizer, self.lr * lr_scale)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return h.grad.detach(), value

    @torch.no_grad()
    def predict(self, h: torch.Tensor) -> torch.Tensor:
        """The head's predictions for ``h`` (for measuring the head alone)."""
        return self.head(h)

    def train(self, mode: bool = True) -> None:
        self.head.train(mode)

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
