"""A user's own model for ``model.kind: custom``: a residual MLP with LayerNorm, cut into stages.

``dni train configs/custom_resmlp.yaml`` calls :func:`stages` as ``stages(in_shape, num_classes)``
and trains the list it returns, one module per stage, on either backend (each Ray worker
calls it too and keeps only its own stage). Nothing here knows about dni.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """x + W2 gelu(W1 LayerNorm(x)): a pre-norm residual MLP block."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))  # (B, width)


def build(in_shape: tuple[int, ...], num_classes: int, *, width: int, blocks: int, num_stages: int) -> list[nn.Module]:
    """``num_stages`` stages of ``blocks`` residual blocks each; the first embeds the flattened
    input, the last ends with LayerNorm and a linear classifier."""
    out: list[nn.Module] = []
    for s in range(num_stages):
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(math.prod(in_shape), width)] if s == 0 else []
        layers += [ResidualBlock(width, 2 * width) for _ in range(blocks)]
        if s == num_stages - 1:
            layers += [nn.LayerNorm(width), nn.Linear(width, num_classes)]
        out.append(nn.Sequential(*layers))
    return out


def stages(in_shape: tuple[int, ...], num_classes: int) -> list[nn.Module]:
    """The model of configs/custom_resmlp.yaml: 3 stages of 2 blocks, 256 wide."""
    return build(in_shape, num_classes, width=256, blocks=2, num_stages=3)


def small(in_shape: tuple[int, ...], num_classes: int) -> list[nn.Module]:
    """A small version for tests and debugging: 3 stages of 1 block, 32 wide."""
    return build(in_shape, num_classes, width=32, blocks=1, num_stages=3)
