"""From a :class:`~dni.config.Config` to decoupled stages.

Each stage is built from its own seed (:func:`dni.models.stage_seed`), so the
single-process trainer and a worker that owns one stage build identical stages.
"""

from __future__ import annotations

import torch

from dni.config import Config
from dni.models import activation_shapes, build_stage, build_stages, stage_seed
from dni.pipeline import Pipeline
from dni.stage import DecoupledStage, StageOptions
from dni.synthesizer import Synthesizer, make_synthesizer


def stage_options(cfg: Config, total_steps: int) -> StageOptions:
    """The per-stage learning options of a run of ``total_steps`` steps."""
    return StageOptions(
        lr=cfg.train.lr,
        synth_lr=cfg.synthesizer.lr,
        weight_decay=cfg.train.weight_decay,
        synth_loss_weight=cfg.synthesizer.loss_weight,
        p_update=cfg.synthesizer.p_update,
        schedule=cfg.train.schedule,
        total_steps=total_steps,
    )


def build_synthesizer(cfg: Config, index: int, activation_shape: tuple[int, ...], num_classes: int) -> Synthesizer | None:
    """The synthesizer of stage ``index``'s output; None for backprop. Seeded per stage."""
    if cfg.method == "backprop":
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stage_seed(cfg.seed, index) + 1)
        return make_synthesizer(
            activation_shape,
            hidden_layers=cfg.synthesizer_hidden_layers,
            hidden_width=cfg.synthesizer.hidden_width,
            batch_norm=cfg.synthesizer.batch_norm,
            num_classes=num_classes,
            conditioned=cfg.method == "cdni",
        )


def build_decoupled_stage(
    cfg: Config,
    index: int,
    *,
    in_shape: tuple[int, ...],
    num_classes: int,
    output_shape: tuple[int, ...],
    num_stages: int,
    total_steps: int,
    device: torch.device,
) -> DecoupledStage:
    """Stage ``index`` with its synthesizer and optimisers, on ``device``."""
    module = build_stage(cfg.model, index, in_shape, num_classes, seed=cfg.seed).to(device)
    is_last = index == num_stages - 1
    synth = None if is_last else build_synthesizer(cfg, index, output_shape, num_classes)
    if synth is not None:
        synth = synth.to(device)
    return DecoupledStage(
        index, module, synth, is_last=is_last, options=stage_options(cfg, total_steps), seed=cfg.seed
    )


def build_pipeline(
    cfg: Config, in_shape: tuple[int, ...], num_classes: int, *, total_steps: int, device: torch.device
) -> Pipeline:
    """All stages of the configured run as a single-process :class:`Pipeline`."""
    shapes = activation_shapes(build_stages(cfg.model, in_shape, num_classes, seed=cfg.seed), in_shape)
    k = len(shapes)
    stages = [
        build_decoupled_stage(
            cfg, i, in_shape=in_shape, num_classes=num_classes, output_shape=shapes[i],
            num_stages=k, total_steps=total_steps, device=device,
        )
        for i in range(k)
    ]
    return Pipeline(stages)
