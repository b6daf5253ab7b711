"""``dni.decouple``: your own list of modules as a trainable decoupled pipeline.

    stages = [nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU()), nn.Linear(256, 10)]
    pipe = dni.decouple(stages, in_shape=(1, 28, 28), num_classes=10, method="cdni")
    for x, y in loader:
        pipe.train_step(x, y)        # every stage updates at once from its synthetic gradient

The synthesizers are built for each interface's activation shape (found by running the
stages once on a zero input), exactly as ``dni train`` builds them from a config: the
same :mod:`dni.build` functions, the same defaults and validation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import nn

from dni.build import decoupled_stage, delay, input_shape
from dni.config import Config, ConfigError
from dni.data.spec import DataSpec
from dni.losses import LossFn
from dni.models import activation_shapes
from dni.pipeline import Pipeline


def decouple(
    stages: Sequence[nn.Module],
    *,
    in_shape: tuple[int, ...],
    num_classes: int,
    method: str = "cdni",
    config: Config | None = None,
    loss: str | LossFn | None = None,
    lr: float | None = None,
    synthesizer_lr: float | None = None,
    optimizer: str | None = None,
    bp_lambda: float | None = None,
    total_steps: int = 1,
    device: str | torch.device = "cpu",
    in_dtype: torch.dtype = torch.float32,
    label_shape: tuple[int, ...] = (),
    label_dtype: torch.dtype = torch.int64,
) -> Pipeline:
    """Wrap ``stages`` (one module per stage, in order; the last one's output goes into the loss)
    as a :class:`~dni.pipeline.Pipeline` with a synthesizer after every stage but the last.

    Args:
        stages: the modules; they are used (and trained) in place, moved to ``device``.
        in_shape: the per-example input shape, e.g. (1, 28, 28).
        num_classes: classes of the labels (the cDNI context and the default loss), or the
            number of target features for float targets.
        method: a run's ``method``: ``cdni`` (synthesizers see the labels), ``dni``, ``backprop``,
            ``delayed``, ``corrected`` (these two with ``runtime.max_in_flight - 1`` steps of delay), ``local``.
        config: everything else, as in a YAML run (synthesizer sizes, schedule, p_update, seed);
            default :class:`~dni.config.Config`'s defaults with a constant learning rate (a run's
            cosine schedule needs its length: pass ``total_steps`` and a config that says so).
            The keyword arguments below win over it.
        loss: ``cross_entropy``, ``mse``, ``"module:function"`` or a callable ``(output, labels) -> loss``.
        lr, synthesizer_lr, optimizer, bp_lambda: ``train.lr``, ``synthesizer.lr``, ``train.optimizer``
            and ``synthesizer.bp_lambda``.
        total_steps: the budget that the learning-rate schedule spans.
        in_dtype, label_shape, label_dtype: inputs of another type (token ids), labels per example
            of another shape (one per token) or float targets.

    Raises:
        ConfigError: an impossible setting (the message names it), or no stages.
    """
    if config is None:
        config = Config()
        config.train.schedule = "constant"
    cfg = _config(config, method=method, lr=lr, synthesizer_lr=synthesizer_lr, optimizer=optimizer,
                  bp_lambda=bp_lambda, loss=loss if isinstance(loss, str) else None)
    modules = list(stages)
    if not modules or not all(isinstance(m, nn.Module) for m in modules):
        raise ConfigError("decouple: stages must be a non-empty list of torch.nn.Module, one per stage")
    data = DataSpec(tuple(in_shape), num_classes, in_dtype, tuple(label_shape), label_dtype)
    shapes = activation_shapes(modules, data.in_shape, dtype=in_dtype)
    built = [decoupled_stage(cfg, m, i, data=data, input_shape=input_shape(data, shapes, i), output_shape=shapes[i],
                             num_stages=len(modules),
                             total_steps=total_steps, device=torch.device(device)) for i, m in enumerate(modules)]
    if callable(loss):
        built[-1].loss_fn = loss
    return Pipeline(built, bp_lambda=cfg.synthesizer.bp_lambda, correction=cfg.sync.bp_lambda, delay=delay(cfg))


def _config(cfg: Config, *, method: str, lr: float | None, synthesizer_lr: float | None, optimizer: str | None,
            bp_lambda: float | None, loss: str | None) -> Config:
    """``cfg`` with the keyword arguments that were given, validated."""
    train_kw: dict[str, Any] = {k: v for k, v in (("lr", lr), ("optimizer", optimizer)) if v is not None}
    synth_kw: dict[str, Any] = {k: v for k, v in (("lr", synthesizer_lr), ("bp_lambda", bp_lambda)) if v is not None}
    train = dataclasses.replace(cfg.train, **train_kw)
    synth = dataclasses.replace(cfg.synthesizer, **synth_kw)
    model = dataclasses.replace(cfg.model, loss=loss) if loss is not None else cfg.model
    return dataclasses.replace(cfg, method=method, train=train, synthesizer=synth, model=model).validate()
