"""Complete unlock (paper section 3.3): a stage that need not wait for its input either.

An update-unlocked stage still waits for the activation of the stage below before it can
run forward (forward locking). Under complete unlock (``synthesizer.unlock: true``) every
stage above the first also owns an *input model* I_i: a regressor from the raw batch x,
which every stage can read itself, to the activation h_{i-1} it would receive. The stage's
training step then needs nothing from its neighbours:

  1. h^_{i-1} = I_i(x), the synthetic input;
  2. the stage's usual update-unlocked step on h^_{i-1}: forward, the synthetic gradient of its
     output (the loss, at the last stage), backward, step. dL/dh^_{i-1} is the target it
     sends down, as an update-unlocked stage sends dL/dh_{i-1};
  3. when the real h_{i-1} arrives, I_i takes one L2 regression step towards it, and the stage
     runs forward on it (no graph) to pass its real output on: the real chain is what the
     input models above learn and what evaluation runs.

The stage below trains its gradient synthesizer on (its real output, that target): the point it
queries its synthesizer at, with the target taken at the prediction of that point. BatchNorm
statistics follow the real chain only (the synthetic-input forward leaves them as they were),
since evaluation runs on real inputs.

Units: the regression loss is the mean squared error per element, so an input model's loss
reads as the squared error of one activation value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dni.optim import OptimizerSpec, set_lr


class InputSynthesizer(nn.Module):
    """I(x): an MLP from the flattened raw batch to a stage's input of per-example ``out_shape``.

    Args:
        in_features: features of one flattened raw example (784 for MNIST).
        out_shape: the per-example shape of the activation it predicts.
        hidden_layers: ReLU hidden layers (0 is a linear map).
        hidden_width: units per hidden layer.
    """

    def __init__(self, in_features: int, out_shape: tuple[int, ...], *, hidden_layers: int = 2,
                 hidden_width: int = 256) -> None:
        super().__init__()
        if in_features < 1 or hidden_layers < 0 or hidden_width < 1:
            raise ValueError(f"bad sizes: in_features={in_features}, hidden_layers={hidden_layers}, "
                             f"hidden_width={hidden_width}")
        self.out_shape = tuple(out_shape)
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden_width), nn.ReLU()]
            width = hidden_width
        layers.append(nn.Linear(width, math.prod(self.out_shape)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1)).view(x.shape[0], *self.out_shape)


class InputModel:
    """A stage's input model: the :class:`InputSynthesizer` and its optimiser.

    Args:
        synthesizer: I for the stage's input.
        lr: its base learning rate (scaled by the stage's schedule at each step).
        optimizer: its optimiser's kind and weight decay.
    """

    def __init__(self, synthesizer: InputSynthesizer, *, lr: float, optimizer: OptimizerSpec) -> None:
        self.synthesizer, self.lr = synthesizer, lr
        self.optimizer = optimizer.build(list(synthesizer.parameters()), lr)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """h^ = I(x), detached: the synthetic input of the stage for the raw batch ``x``."""
        return self.synthesizer(x)

    def fit(self, x: torch.Tensor, h: torch.Tensor, *, lr_scale: float = 1.0) -> float:
        """One regression step of I(x) towards the real input ``h``; returns the loss before the step
        (mean squared error per element)."""
        loss = F.mse_loss(self.synthesizer(x), h.detach())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        set_lr(self.optimizer, self.lr * lr_scale)
        self.optimizer.step()
        return loss.item()

    def train(self, mode: bool = True) -> None:
        self.synthesizer.train(mode)

    def state_dict(self) -> dict:
        return {"synthesizer": self.synthesizer.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.synthesizer.load_state_dict(state["synthesizer"])
        self.optimizer.load_state_dict(state["optimizer"])
