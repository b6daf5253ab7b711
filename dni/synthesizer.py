"""Gradient synthesizers: models M(h [, c]) that predict dL/dh for a stage output h.

Glossary (used in code, YAML keys and TensorBoard tags):
  activation  h, the output of a stage, the input of the next one.
  context     c, extra information the synthesizer may see: the one-hot label (cDNI).
  synthetic gradient  g^ = M(h, c), the prediction of dL/dh.
  target      the gradient that M is regressed onto (bootstrapped or true).

Units: a synthesizer predicts the *per-example* gradient, i.e. ``batch_size x dL/dh``
for a batch-mean loss L. Gradients of a mean loss shrink with the batch (about 1e-4
here), which a regressor trained with Adam does not learn; per-example units keep
targets O(1) and make a synthesizer independent of the batch size. The rules in
:mod:`dni.rules` do the scaling.

Every synthesizer's final layer is zero-initialised, weights AND biases (paper,
appendix): its first predictions are exactly zero, so the first updates are no-ops.

Normalised targets (``normalize_targets``): per-example gradients are still small per
element where an activation is large (a CNN's feature maps: about 1e-2 at 32x7x7), and
an optimiser steps the synthesizer's weights by about lr each, whatever the size of the
target: the prediction's noise from those steps then exceeds the target it learns. A
normalised synthesizer predicts in units of the targets' running RMS (a buffer, updated
from each target before the regression), so its own outputs stay O(1) at every layer
and at every point of training, as the gradients shrink.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


class Synthesizer(nn.Module):
    """Base class: ``forward(h, context=None)`` returns a tensor shaped like ``h``.

    A conditioned (cDNI) synthesizer takes the batch's labels as context: integer class
    labels of any shape (B, ...) enter one-hot (-1, padding or unlabelled, as zeros);
    float targets enter as they are.
    """

    num_classes: int
    conditioned: bool
    target_rms: torch.Tensor | None
    """The running RMS of the per-example targets, the unit of the predictions; None: not normalised."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("target_rms", None)  # a None buffer is left out of the state_dict

    def normalize_targets(self) -> "Synthesizer":
        """Predict in units of the targets' running RMS (module docstring); returns self."""
        self.target_rms = torch.zeros(())
        return self

    @torch.no_grad()
    def observe_target(self, target: torch.Tensor, *, decay: float = 0.99) -> None:
        """Fold one batch of per-example targets into the running RMS (the first sets it).

        A no-op for a synthesizer that is not normalised."""
        if self.target_rms is None:
            return
        power = target.detach().pow(2).mean().to(self.target_rms)
        average = decay * self.target_rms.pow(2) + (1.0 - decay) * power
        # where, not an if: reading the buffer on the host would wait for the device
        self.target_rms.copy_(torch.where(self.target_rms == 0, power, average).sqrt())

    def zero_initialised(self) -> list[nn.Module]:
        """The layers that start at exactly zero, so that the first predictions are zero."""
        return [cast(nn.Module, self.out)]

    def _in_units(self, prediction: torch.Tensor) -> torch.Tensor:
        return prediction if self.target_rms is None else prediction * self.target_rms

    def _context(self, h: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor | None:
        if not self.conditioned:
            return None
        if context is None:
            raise ValueError("this synthesizer is conditioned (cDNI): pass the labels as context")
        if not context.is_floating_point():
            context = F.one_hot(context.long().clamp(min=-1) + 1, self.num_classes + 1)[..., 1:]
        return context.to(h.dtype)


def context_size(num_classes: int, label_shape: tuple[int, ...], *, integer: bool) -> int:
    """Features per example of a flattened context: one-hot classes per label, or the float targets."""
    return math.prod(label_shape) * (num_classes if integer else 1)


def _zero_(layer: nn.Module) -> None:
    # nn.Module's attributes are typed Tensor | Module; a Linear's or Conv2d's weight and bias are Parameters.
    nn.init.zeros_(cast(torch.Tensor, layer.weight))
    nn.init.zeros_(cast(torch.Tensor, layer.bias))


def reinitialise(synthesizer: Synthesizer) -> None:
    """Draw the hidden layers afresh (from torch's global RNG) and zero the final layer (and
    the unit of a normalised one): the synthesizer predicts exactly zero again, e.g. after a
    numerical fault spoilt its weights."""
    with torch.no_grad():
        for m in synthesizer.modules():
            if m is not synthesizer and hasattr(m, "reset_parameters"):
                m.reset_parameters()  # type: ignore[operator]  # torch types nn.Module's attributes Tensor | Module
        for layer in synthesizer.zero_initialised():
            _zero_(layer)
        if synthesizer.target_rms is not None:
            synthesizer.target_rms.zero_()  # the next target sets the unit afresh


class MLPSynthesizer(Synthesizer):
    """An MLP synthesizer for activations of shape (B, D) (or (B, ...), flattened).

    Args:
        features: the size D of the activation it predicts gradients for.
        hidden_layers: 0 (linear, the paper's cDNI choice), 1 or 2 (the paper's DNI choice).
        hidden_width: units per hidden layer (paper: 1024).
        batch_norm: BatchNorm1d after each hidden linear layer.
        num_classes: classes of the one-hot context; required when ``conditioned``.
        conditioned: cDNI: the input is [h, onehot(y)].
        context_size: features of the flattened context (default ``num_classes``: one label per
            example; see :func:`context_size`).

    Raises:
        ValueError: on impossible sizes or a conditioned synthesizer without classes.
    """

    def __init__(
        self,
        features: int,
        *,
        hidden_layers: int = 2,
        hidden_width: int = 1024,
        batch_norm: bool = False,
        num_classes: int = 0,
        conditioned: bool = False,
        context_size: int | None = None,
    ) -> None:
        super().__init__()
        if features < 1:
            raise ValueError(f"features must be >= 1, got {features}")
        if hidden_layers not in (0, 1, 2):
            raise ValueError(f"hidden_layers must be 0, 1 or 2, got {hidden_layers}")
        if hidden_width < 1:
            raise ValueError(f"hidden_width must be >= 1, got {hidden_width}")
        if conditioned and num_classes < 1:
            raise ValueError("a conditioned (cDNI) synthesizer needs num_classes >= 1")
        self.features = features
        self.num_classes = num_classes
        self.conditioned = conditioned
        layers: list[nn.Module] = []
        width = features + ((num_classes if context_size is None else context_size) if conditioned else 0)
        for _ in range(hidden_layers):
            layers.append(nn.Linear(width, hidden_width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_width))
            layers.append(nn.ReLU())
            width = hidden_width
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(width, features)
        _zero_(self.out)

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = h.flatten(1)  # (B, D)
        c = self._context(h, context)
        if c is not None:
            x = torch.cat([x, c.flatten(1)], dim=1)  # (B, D + context features)
        return self._in_units(self.out(self.hidden(x)).view_as(h))


class ConvSynthesizer(Synthesizer):
    """A convolutional synthesizer for activations of shape (B, C, H, W).

    The paper's CNN synthesizer: ``hidden_layers`` conv layers of ``hidden_channels``
    filters (5x5, 'same' padding), then a final zero-initialised conv back to C channels.
    The cDNI context enters as ``num_classes`` constant one-hot planes and, given ``spatial``,
    also through a zero-initialised linear map from the context to a (C, H, W) term added to
    the output. The map is there because a convolution over constant planes gives nearly the
    same output at every position (only the zero padding differs), while the gradient that a
    linear classifier on the flattened maps sends back, W^T (softmax - onehot), has its own
    pattern at each position: without the map a linear cDNI synthesizer cannot represent it.

    Args:
        channels: C of the activation.
        hidden_layers: 0, 1 or 2 (paper: 2).
        hidden_channels: filters per hidden conv (paper: 128).
        kernel_size: odd kernel size (paper: 5).
        batch_norm: BatchNorm2d after each hidden conv.
        num_classes: classes of the one-hot context; required when ``conditioned``.
        conditioned: cDNI.
        context_size: features of the flattened context (default ``num_classes``).
        spatial: (H, W) of the activation; with ``conditioned``, adds the per-position context map.
    """

    def __init__(
        self,
        channels: int,
        *,
        hidden_layers: int = 2,
        hidden_channels: int = 128,
        kernel_size: int = 5,
        batch_norm: bool = False,
        num_classes: int = 0,
        conditioned: bool = False,
        context_size: int | None = None,
        spatial: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if hidden_layers not in (0, 1, 2):
            raise ValueError(f"hidden_layers must be 0, 1 or 2, got {hidden_layers}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if conditioned and num_classes < 1:
            raise ValueError("a conditioned (cDNI) synthesizer needs num_classes >= 1")
        self.channels = channels
        self.num_classes = num_classes
        self.conditioned = conditioned
        pad = kernel_size // 2
        layers: list[nn.Module] = []
        context_features = (num_classes if context_size is None else context_size) if conditioned else 0
        width = channels + context_features
        for _ in range(hidden_layers):
            layers.append(nn.Conv2d(width, hidden_channels, kernel_size, padding=pad))
            if batch_norm:
                layers.append(nn.BatchNorm2d(hidden_channels))
            layers.append(nn.ReLU())
            width = hidden_channels
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Conv2d(width, channels, kernel_size, padding=pad)
        _zero_(self.out)
        self.context_map: nn.Linear | None = None
        if conditioned and spatial is not None:
            self.context_map = nn.Linear(context_features, channels * spatial[0] * spatial[1])
            _zero_(self.context_map)

    def zero_initialised(self) -> list[nn.Module]:
        return [self.out] if self.context_map is None else [self.out, self.context_map]

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = h  # (B, C, H, W)
        c = self._context(h, context)
        if c is not None:
            c = c.flatten(1)
            planes = c[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])  # (B, context features, H, W)
            x = torch.cat([x, planes], dim=1)
        out = self.out(self.hidden(x))
        if c is not None and self.context_map is not None:
            out = out + self.context_map(c).view_as(out)
        return self._in_units(out)


class TokenSynthesizer(Synthesizer):
    """A synthesizer for sequence activations (B, T, D): one MLP applied at every position.

    The cDNI context is one label per position (B, T) (e.g. the next-token targets), one-hot,
    or one per sequence (B,), repeated at every position.

    Args:
        features: D of the activation.
        hidden_layers, hidden_width, num_classes, conditioned: as for :class:`MLPSynthesizer`.
    """

    def __init__(self, features: int, *, hidden_layers: int = 2, hidden_width: int = 1024, num_classes: int = 0,
                 conditioned: bool = False) -> None:
        super().__init__()
        if features < 1 or hidden_layers not in (0, 1, 2) or hidden_width < 1:
            raise ValueError(f"bad sizes: features={features}, hidden_layers={hidden_layers}, hidden_width={hidden_width}")
        if conditioned and num_classes < 1:
            raise ValueError("a conditioned (cDNI) synthesizer needs num_classes >= 1")
        self.features, self.num_classes, self.conditioned = features, num_classes, conditioned
        layers: list[nn.Module] = []
        width = features + (num_classes if conditioned else 0)
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden_width), nn.ReLU()]
            width = hidden_width
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(width, features)
        _zero_(self.out)

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = h  # (B, T, D)
        c = self._context(h, context)
        if c is not None:
            if c.dim() == 2:  # (B, classes): one label per sequence
                c = c[:, None, :].expand(-1, h.shape[1], -1)
            x = torch.cat([x, c], dim=2)  # (B, T, D + classes)
        return self._in_units(self.out(self.hidden(x)))


def make_synthesizer(
    activation_shape: tuple[int, ...],
    *,
    hidden_layers: int,
    hidden_width: int,
    batch_norm: bool,
    num_classes: int,
    conditioned: bool,
    context_size: int | None = None,
    normalize: bool = False,
    kind: str = "auto",
) -> Synthesizer:
    """The synthesizer that fits an activation of per-example shape ``activation_shape``.

    (C, H, W) gets a :class:`ConvSynthesizer`; (T, D) a :class:`TokenSynthesizer` when the
    context is one label per position or none (``context_size`` None or ``num_classes``);
    any other shape an :class:`MLPSynthesizer` on the flattened activation.
    ``context_size``: features of the flattened cDNI context (see :func:`context_size`).
    ``normalize``: predict in units of the targets' running RMS (:meth:`Synthesizer.normalize_targets`).
    ``kind``: ``auto`` picks by shape as above; ``mlp`` an :class:`MLPSynthesizer` on the flattened
    activation whatever its shape: it sees all of h, where a convolution sees a neighbourhood (the
    gradient a classifier on flattened maps sends back depends on all of them).

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind not in SYNTHESIZER_KINDS:
        raise ValueError(f"kind must be one of {', '.join(SYNTHESIZER_KINDS)}, got {kind!r}")
    synthesizer = _pick_synthesizer(activation_shape, hidden_layers=hidden_layers, hidden_width=hidden_width,
                                    batch_norm=batch_norm, num_classes=num_classes, conditioned=conditioned,
                                    context_size=context_size, flat=kind == "mlp")
    return synthesizer.normalize_targets() if normalize else synthesizer


SYNTHESIZER_KINDS = ("auto", "mlp")
"""``synthesizer.kind``: by the activation's shape, or an MLP on the flattened activation."""


def _pick_synthesizer(activation_shape: tuple[int, ...], *, hidden_layers: int, hidden_width: int, batch_norm: bool,
                      num_classes: int, conditioned: bool, context_size: int | None, flat: bool) -> Synthesizer:
    common = dict(hidden_layers=hidden_layers, num_classes=num_classes, conditioned=conditioned)
    if not flat and len(activation_shape) == 3:
        return ConvSynthesizer(activation_shape[0], hidden_channels=hidden_width, batch_norm=batch_norm,
                               context_size=context_size, spatial=(activation_shape[1], activation_shape[2]),
                               **common)  # type: ignore[arg-type]
    per_position = context_size is None or context_size in (num_classes, num_classes * activation_shape[0])
    if not flat and len(activation_shape) == 2 and per_position and not batch_norm:
        return TokenSynthesizer(activation_shape[1], hidden_width=hidden_width, **common)  # type: ignore[arg-type]
    return MLPSynthesizer(math.prod(activation_shape), hidden_width=hidden_width, batch_norm=batch_norm,
                          context_size=context_size, **common)  # type: ignore[arg-type]
