"""The last stage's loss (``model.loss``): built-in names or the user's own function.

A loss is ``(output, labels) -> scalar``, the mean over the batch: the synthesizers'
per-example units (:mod:`dni.synthesizer`) assume a batch mean.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dni.config import ConfigError
from dni.imports import import_object

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

IGNORE = -1
"""Label value that the cross-entropy and accuracy skip (padding rows, unlabelled tokens)."""


def cross_entropy(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the classes on the LAST dimension of ``output`` (B, ..., C) and integer
    ``labels`` (B, ...), e.g. one label per token: the mean over the labels that are not -1 (ignored),
    and 0, with zero gradients, when every label is (a segment of a copy task with nothing to output)."""
    flat = labels.reshape(-1)
    if not bool((flat != IGNORE).any()):  # torch's mean over no labels is NaN
        return output.sum() * 0.0
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), flat, ignore_index=IGNORE)


def mse(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error against float targets shaped like ``output`` (or reshapeable to it)."""
    return F.mse_loss(output, labels.to(output.dtype).reshape(output.shape))


LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy, "mse": mse}


def resolve_loss(spec: str) -> LossFn:
    """The loss named by ``model.loss``: a key of :data:`LOSSES` or ``"module:function"``.

    Raises:
        ConfigError: an import that fails or names something that is not callable.
    """
    if spec in LOSSES:
        return LOSSES[spec]
    fn = import_object(spec, "model.loss")
    if not callable(fn):
        raise ConfigError(f"model.loss: {spec} is a {type(fn).__name__}, not a function (output, labels) -> loss")
    return fn
