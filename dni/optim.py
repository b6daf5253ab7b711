"""The optimisers a stage or a synthesizer may use (``train.optimizer``, ``synthesizer.optimizer``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True)
class OptimizerSpec:
    """Which optimiser, and its settings other than the (scheduled) learning rate."""

    kind: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.0
    """SGD only."""
    nesterov: bool = False
    """SGD only."""

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.kind!r}: use one of {', '.join(OPTIMIZERS)}")
        if self.kind != "sgd" and (self.momentum or self.nesterov):
            raise ValueError(f"momentum and nesterov are SGD settings, not {self.kind}'s")

    def build(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """An optimiser over ``params``. A parameter-free module (e.g. a reshape) still gets one,
        so that its checkpoints look like every other stage's."""
        params = params or [nn.Parameter(torch.zeros(0))]
        if self.kind == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=self.weight_decay)
        if self.kind == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=self.momentum, nesterov=self.nesterov,
                               weight_decay=self.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (the schedule's value for the coming step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
