"""The paper's networks as lists of layers, and their partition into stages.

A *layer* is the unit the paper decouples (Linear-BN-ReLU, or Conv-BN-ReLU-pool);
a *stage* is a run of consecutive layers that one worker owns. ``boundaries``
are the layer indices where a new stage starts; none given decouples every
layer, as in the paper's tables.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import nn

from dni.config import ModelConfig


LayerBuilder = Callable[[], nn.Module]


def _fcn_hidden(features: int, width: int, flatten: bool) -> nn.Module:
    first = [nn.Flatten()] if flatten else []
    return nn.Sequential(*first, nn.Linear(features, width), nn.BatchNorm1d(width), nn.ReLU())


def _classifier(features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(features, num_classes))


def _conv_block(c_in: int, channels: int, pool: bool) -> nn.Module:
    block: list[nn.Module] = [nn.Conv2d(c_in, channels, 5, padding=2), nn.BatchNorm2d(channels), nn.ReLU()]
    if pool:
        block.append(nn.MaxPool2d(3, stride=2, padding=1))  # (H, W) -> ceil(H/2), ceil(W/2)
    return nn.Sequential(*block)


def fcn_layers(in_features: int, num_classes: int, *, depth: int, width: int = 256) -> list[LayerBuilder]:
    """FCN-k (paper section 3.2): ``depth`` Linear-BN-ReLU layers of ``width`` units, then a Linear classifier.

    Returns one builder per layer, so that a worker can build only the layers it owns.
    """
    builders: list[LayerBuilder] = []
    features = in_features
    for i in range(depth):
        builders.append(partial(_fcn_hidden, features, width, i == 0))
        features = width
    builders.append(partial(_classifier, features, num_classes))
    return builders


def cnn_layers(
    in_shape: tuple[int, int, int], num_classes: int, *, depth: int, channels: int = 128
) -> list[LayerBuilder]:
    """CNN-k: ``depth`` layers of Conv5x5(``channels``)-BN-ReLU, max-pooled (3x3, stride 2)
    after the first two, then a Linear classifier on the flattened maps. One builder per layer."""
    c, h, w = in_shape
    builders: list[LayerBuilder] = []
    for i in range(depth):
        builders.append(partial(_conv_block, c, channels, i < 2))
        if i < 2:
            h, w = (h + 1) // 2, (w + 1) // 2
        c = channels
    builders.append(partial(_classifier, c * h * w, num_classes))
    return builders


def partition(num_layers: int, boundaries: list[int] | None) -> list[range]:
    """Split layer indices 0..num_layers-1 into stages starting at ``boundaries``.

    >>> partition(4, None)
    [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    >>> partition(4, [2])
    [range(0, 2), range(2, 4)]

    Raises:
        ValueError: boundaries not strictly increasing inside 1..num_layers-1.
    """
    if num_layers < 1:
        raise ValueError(f"need at least one layer, got {num_layers}")
    cuts = list(range(1, num_layers)) if boundaries is None else list(boundaries)
    if any(not 0 < b < num_layers for b in cuts) or any(a >= b for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"boundaries {cuts} must be strictly increasing within 1..{num_layers - 1}")
    edges = [0, *cuts, num_layers]
    return [range(a, b) for a, b in zip(edges, edges[1:])]


def layer_builders(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> list[LayerBuilder]:
    """The configured model's layers, as builders."""
    if cfg.kind == "fcn":
        return fcn_layers(math.prod(in_shape), num_classes, depth=cfg.depth, width=cfg.width)
    if cfg.kind == "cnn":
        if len(in_shape) != 3:
            raise ValueError(f"a CNN needs image inputs (C, H, W), got {in_shape}")
        return cnn_layers(in_shape, num_classes, depth=cfg.depth, channels=cfg.channels)  # type: ignore[arg-type]
    raise ValueError(f"unknown model kind {cfg.kind!r}")


def stage_seed(seed: int, index: int) -> int:
    """The seed of stage ``index``'s parameters (and of its synthesizer's, offset by one)."""
    return seed * 10_007 + 2 * index


def build_stage(cfg: ModelConfig, index: int, in_shape: tuple[int, ...], num_classes: int, *, seed: int) -> nn.Sequential:
    """Stage ``index`` alone, its parameters drawn from its own seed.

    Any process builds the same stage from the same arguments, without building
    the others, and torch's global RNG is left as it was.
    """
    builders = layer_builders(cfg, in_shape, num_classes)
    stages = partition(len(builders), cfg.boundaries)
    if not 0 <= index < len(stages):
        raise ValueError(f"stage index {index} out of range: the model has {len(stages)} stages")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stage_seed(seed, index))
        return nn.Sequential(*(builders[i]() for i in stages[index]))


def num_stages(cfg: ModelConfig) -> int:
    """How many stages the configured model is cut into."""
    return len(partition(cfg.depth + 1, cfg.boundaries))


def build_stages(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int, *, seed: int) -> list[nn.Sequential]:
    """Every stage of the configured model (see :func:`build_stage`)."""
    return [build_stage(cfg, i, in_shape, num_classes, seed=seed) for i in range(num_stages(cfg))]


def activation_shapes(stages: list[nn.Module], in_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-example output shape of every stage, found by a forward pass of two zero examples."""
    shapes = []
    x = torch.zeros(2, *in_shape)
    modes = [s.training for s in stages]
    try:
        with torch.no_grad():
            for s in stages:
                s.eval()  # no batch statistics are touched
                x = s(x)
                shapes.append(tuple(x.shape[1:]))
    finally:
        for s, m in zip(stages, modes):
            s.train(m)
    return shapes
