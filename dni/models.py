"""Models as lists of stages: the registry of ``model.kind``, the paper's networks, and yours.

Every kind is an entry of :data:`MODELS` that returns one ``nn.Module`` per stage:
``fcn`` and ``cnn`` are the paper's networks, ``gpt`` a character language model
(:mod:`dni.transformer`), ``custom`` calls the user's
``model.factory(in_shape, num_classes)``. For the paper's networks a *layer* is the unit
the paper decouples (Linear-BN-ReLU, or Conv-BN-ReLU-pool) and a *stage* is a run of
consecutive layers that one worker owns; ``boundaries`` are the layer indices where a
new stage starts; none given decouples every layer, as in the paper's tables.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import nn

from dni.config import ConfigError, ModelConfig
from dni.imports import import_object
from dni.recurrent import LSTMLanguageModel
from dni.transformer import gpt_layer


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


def stage_seed(seed: int, index: int) -> int:
    """The seed of stage ``index``'s parameters (and of its synthesizer's, offset by one)."""
    return seed * 10_007 + 2 * index


ModelBuilder = Callable[[ModelConfig, tuple[int, ...], int, int], list[nn.Module]]
"""``(model config, per-example input shape, num_classes, seed) -> one module per stage``."""

MODELS: dict[str, ModelBuilder] = {}
"""The model registry: ``model.kind`` -> its builder."""


def register_model(kind: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a builder for ``model.kind: kind`` (a decorator)."""
    def add(builder: ModelBuilder) -> ModelBuilder:
        MODELS[kind] = builder
        return builder
    return add


def _per_stage(builders: list[LayerBuilder], boundaries: list[int] | None, seed: int) -> list[nn.Module]:
    """Group layers into stages, each drawn from its own seed (so a worker's stage does not
    depend on how the layers before it were drawn)."""
    stages: list[nn.Module] = []
    for index, layers in enumerate(partition(len(builders), boundaries)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stage_seed(seed, index))
            stages.append(nn.Sequential(*(builders[i]() for i in layers)))
    return stages


@register_model("fcn")
def _fcn(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int, seed: int) -> list[nn.Module]:
    return _per_stage(fcn_layers(math.prod(in_shape), num_classes, depth=cfg.depth, width=cfg.width),
                      cfg.boundaries, seed)


@register_model("cnn")
def _cnn(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int, seed: int) -> list[nn.Module]:
    if len(in_shape) != 3:
        raise ConfigError(f"model.kind: a CNN needs image inputs (C, H, W), got inputs of shape {in_shape}")
    c, h, w = in_shape
    return _per_stage(cnn_layers((c, h, w), num_classes, depth=cfg.depth, channels=cfg.channels), cfg.boundaries, seed)


def _check_token_ids(in_shape: tuple[int, ...], model: str, what: str) -> None:
    """Raise ConfigError unless the inputs are one token sequence, (T,), per example."""
    if len(in_shape) != 1:
        raise ConfigError(f"model.kind: {model} reads token ids, one {what} (T,) per example, got inputs of "
                          f"shape {in_shape}; use data.name=text")


@register_model("gpt")
def _gpt(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int, seed: int) -> list[nn.Module]:
    _check_token_ids(in_shape, "a GPT", "sequence")
    builders: list[LayerBuilder] = [partial(gpt_layer, i, vocab=num_classes, context=in_shape[0], depth=cfg.depth, width=cfg.width,
                        heads=cfg.heads) for i in range(cfg.depth + 1)]
    return _per_stage(builders, cfg.boundaries, seed)


@register_model("lstm")
def _lstm(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int, seed: int) -> list[nn.Module]:
    _check_token_ids(in_shape, "an LSTM", "segment")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stage_seed(seed, 0))
        return [LSTMLanguageModel(num_classes, width=cfg.width, depth=cfg.depth)]


@register_model("custom")
def _custom(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int, seed: int) -> list[nn.Module]:
    assert cfg.factory is not None  # validated
    factory = import_object(cfg.factory, "model.factory")
    if not callable(factory):
        raise ConfigError(f"model.factory: {cfg.factory} is a {type(factory).__name__}, not a function")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stage_seed(seed, 0))
        try:
            stages = factory(in_shape, num_classes)
        except Exception as e:
            raise ConfigError(f"model.factory: {cfg.factory}{(in_shape, num_classes)} raised "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(stages, (list, tuple)) or not stages or not all(isinstance(m, nn.Module) for m in stages):
        got = type(stages).__name__ if not isinstance(stages, (list, tuple)) else \
            f"a {type(stages).__name__} of {', '.join(sorted({type(m).__name__ for m in stages})) or 'nothing'}"
        raise ConfigError(f"model.factory: {cfg.factory} must return a non-empty list of torch.nn.Module, one per "
                          f"stage (got {got})")
    return list(stages)


def build_stages(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int, *, seed: int) -> list[nn.Module]:
    """Every stage of the configured model, its parameters drawn from ``seed``.

    Any process builds the same stages from the same arguments, and torch's global
    RNG is left as it was.

    Raises:
        ConfigError: a custom factory that cannot be imported, raises, or returns no modules.
    """
    return MODELS[cfg.kind](cfg, tuple(in_shape), num_classes, seed)


def build_stage(cfg: ModelConfig, index: int, in_shape: tuple[int, ...], num_classes: int, *, seed: int) -> nn.Module:
    """Stage ``index`` alone (see :func:`build_stages`); the other stages are dropped."""
    stages = build_stages(cfg, in_shape, num_classes, seed=seed)
    if not 0 <= index < len(stages):
        raise ValueError(f"stage index {index} out of range: the model has {len(stages)} stages")
    return stages[index]


def activation_shapes(stages: list[nn.Module], in_shape: tuple[int, ...], *,
                      dtype: torch.dtype = torch.float32) -> list[tuple[int, ...]]:
    """Per-example output shape of every stage, found by a forward pass of two zero examples
    of ``dtype`` (integer inputs, e.g. token ids, are zeros too).

    Raises:
        ConfigError: a stage cannot take its predecessor's output (the message names the stage).
    """
    shapes = []
    x = torch.zeros(2, *in_shape, dtype=dtype)
    modes = [s.training for s in stages]
    try:
        with torch.no_grad():
            for i, s in enumerate(stages):
                s.eval()  # no batch statistics are touched
                try:
                    x = s(x)
                except Exception as e:
                    raise ConfigError(f"model: stage {i} failed on an input of shape {tuple(x.shape[1:])} per example "
                                      f"(the output of stage {i - 1} or the data): {type(e).__name__}: {e}") from None
                if not isinstance(x, torch.Tensor):
                    raise ConfigError(f"model: stage {i} returned a {type(x).__name__}; a stage returns one tensor")
                shapes.append(tuple(x.shape[1:]))
    finally:
        for s, m in zip(stages, modes):
            s.train(m)
    return shapes


def describe(cfg: ModelConfig) -> str:
    """A short name of the configured model for summaries and tables: ``fcn-4``, ``custom:stages``."""
    if cfg.kind == "custom":
        return f"custom:{(cfg.factory or '').rpartition(':')[2]}"
    return f"{cfg.kind}-{cfg.depth}"
