"""From a :class:`~dni.config.Config` to decoupled stages.

Each stage is built from its seed (:func:`dni.models.stage_seed`), so the
single-process trainer and a worker that owns one stage build identical stages.
"""

from __future__ import annotations

import math

import torch

from dni.config import CONDITIONED_METHODS, DEFERRED_METHODS, SYNTHESIZER_METHODS, Config, ConfigError
from dni.data.spec import DataSpec
from dni.losses import resolve_loss
from dni.models import activation_shapes, build_stages, stage_seed
from dni.optim import OptimizerSpec
from dni.pipeline import Pipeline
from dni.recurrent import LSTMLanguageModel, RecurrentPipeline
from dni.stage import DecoupledStage, StageOptions
from dni.synthesizer import Synthesizer, make_synthesizer
from dni.local_head import AuxiliaryHead, LocalHead
from dni.unlock import InputModel, InputSynthesizer


def stage_options(cfg: Config, total_steps: int) -> StageOptions:
    """The per-stage learning options of a run of ``total_steps`` steps."""
    t = cfg.train

    def spec(kind: str, weight_decay: float) -> OptimizerSpec:
        sgd = kind == "sgd"
        return OptimizerSpec(kind, weight_decay, t.momentum if sgd else 0.0, t.nesterov and sgd)

    return StageOptions(
        lr=t.lr,
        synth_lr=cfg.synthesizer.lr,
        optimizer=spec(t.optimizer, t.weight_decay),
        synth_optimizer=spec(cfg.synthesizer.optimizer or t.optimizer, 0.0),
        synth_loss_weight=cfg.synthesizer.loss_weight,
        p_update=cfg.synthesizer.p_update,
        gate=cfg.synthesizer.gate,
        schedule=t.schedule,
        total_steps=total_steps,
        warmup=t.warmup,
    )


def check_context(cfg: Config, data: DataSpec) -> None:
    """cDNI conditions on the labels: they must exist as classes or float targets.

    Raises:
        ConfigError: cDNI on data without labels.
    """
    if cfg.method in CONDITIONED_METHODS and data.labels_per_example == 0:
        raise ConfigError(f"method: {cfg.method} conditions its synthesizers on the labels, and this data has none; "
                          "use method=dni")


def build_synthesizer(cfg: Config, index: int, activation_shape: tuple[int, ...], data: DataSpec) -> Synthesizer | None:
    """The synthesizer of stage ``index``'s output; None for backprop. Seeded per stage."""
    if cfg.method not in SYNTHESIZER_METHODS:
        return None
    check_context(cfg, data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stage_seed(cfg.seed, index) + 1)
        return make_synthesizer(
            activation_shape,
            hidden_layers=cfg.synthesizer_hidden_layers,
            hidden_width=cfg.synthesizer.hidden_width,
            batch_norm=cfg.synthesizer.batch_norm,
            normalize=cfg.synthesizer.normalize,
            kind=cfg.synthesizer.kind,
            num_classes=data.num_classes,
            conditioned=cfg.method in CONDITIONED_METHODS,
            context_size=data.context_size,
        )


def build_input_model(cfg: Config, index: int, input_shape: tuple[int, ...], data: DataSpec,
                      device: torch.device) -> InputModel | None:
    """Stage ``index``'s input model under complete unlock (``synthesizer.unlock``), else None. Seeded per stage.

    Raises:
        ConfigError: data whose raw batch is not floating point (token ids): an MLP cannot read it.
    """
    if not cfg.synthesizer.unlock or index == 0:
        return None
    if not data.in_dtype.is_floating_point:
        raise ConfigError(f"synthesizer.unlock predicts each stage's input from the raw batch with an MLP, which "
                          f"needs floating-point inputs (this data's are {data.in_dtype}); remove synthesizer.unlock")
    s = cfg.synthesizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stage_seed(cfg.seed, index) + 2)
        net = InputSynthesizer(math.prod(data.in_shape), input_shape, hidden_layers=s.input_hidden_layers,
                               hidden_width=s.input_width).to(device)
    return InputModel(net, lr=s.lr if s.input_lr is None else s.input_lr, optimizer=stage_options(cfg, 1).synth_optimizer)


def build_local_head(cfg: Config, index: int, output_shape: tuple[int, ...], data: DataSpec,
                     device: torch.device) -> LocalHead | None:
    """Stage ``index``'s auxiliary head under ``method: local`` (not for the last stage), else None.
    Seeded per stage.

    Raises:
        ConfigError: data without labels, which a head has nothing to predict from.
    """
    if cfg.method != "local":
        return None
    if data.labels_per_example == 0:
        raise ConfigError("method: local trains each stage on a classifier of its output against the labels, "
                          "and this data has none; use method=dni")
    per_position = len(data.label_shape) == 1 and len(output_shape) == 2 and output_shape[0] == data.label_shape[0]
    loc = cfg.local
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stage_seed(cfg.seed, index) + 3)
        head = AuxiliaryHead(output_shape, data.num_classes, hidden_layers=loc.hidden_layers,
                             hidden_width=loc.hidden_width, pool=loc.pool, per_position=per_position).to(device)
    options = stage_options(cfg, 1)
    return LocalHead(head, loss_fn=resolve_loss(cfg.model.loss), lr=cfg.train.lr if loc.lr is None else loc.lr,
                     optimizer=options.optimizer)


def decoupled_stage(cfg: Config, module: torch.nn.Module, index: int, *, data: DataSpec, input_shape: tuple[int, ...],
                    output_shape: tuple[int, ...], num_stages: int, total_steps: int,
                    device: torch.device) -> DecoupledStage:
    """``module`` as stage ``index`` of ``num_stages`` (per-example input and output shapes given), with
    its synthesizer, its input model under complete unlock, its auxiliary head under local losses and
    their optimisers, on ``device``."""
    is_last = index == num_stages - 1
    synth = None if is_last else build_synthesizer(cfg, index, output_shape, data)
    return DecoupledStage(
        index, module.to(device), synth.to(device) if synth is not None else None, is_last=is_last,
        options=stage_options(cfg, total_steps), seed=cfg.seed, loss_fn=resolve_loss(cfg.model.loss),
        delayed=cfg.method == "delayed" and not is_last, corrected=cfg.method == "corrected" and not is_last,
        frozen=cfg.method == "nobprop" and not is_last,
        unlock=build_input_model(cfg, index, input_shape, data, device),
        local_head=None if is_last else build_local_head(cfg, index, output_shape, data, device),
        sends_target=cfg.method != "local",
    )


def model_stages(cfg: Config, data: DataSpec) -> tuple[list[torch.nn.Module], list[tuple[int, ...]]]:
    """The configured model's stages and each one's per-example output shape.

    Raises:
        ConfigError: a model that cannot be built or run on the data, or a ``stages`` list of the
            wrong length.
    """
    modules = build_stages(cfg.model, data.in_shape, data.num_classes, seed=cfg.seed)
    if cfg.stages and len(cfg.stages) != len(modules):
        raise ConfigError(f"stages: has {len(cfg.stages)} entries but the model has {len(modules)} stages; "
                          "give one entry per stage or none")
    return modules, activation_shapes(modules, data.in_shape, dtype=data.in_dtype)


def trainable(cfg: Config, data: DataSpec, *, total_steps: int, steps_per_epoch: int,
              device: torch.device) -> Pipeline | RecurrentPipeline:
    """What the single-process trainer trains: :func:`build_pipeline`, or for a recurrent model
    (``model.kind: lstm``) :func:`recurrent_pipeline`, whose streams restart every ``steps_per_epoch``."""
    if cfg.model.kind == "lstm":
        return recurrent_pipeline(cfg, data, total_steps=total_steps, device=device, steps_per_epoch=steps_per_epoch)
    return build_pipeline(cfg, data, total_steps=total_steps, device=device)


def build_pipeline(cfg: Config, data: DataSpec, *, total_steps: int, device: torch.device) -> Pipeline:
    """All stages of the configured run as a single-process :class:`Pipeline` (layer-decoupled
    models; a recurrent one is :func:`recurrent_pipeline`)."""
    modules, shapes = model_stages(cfg, data)
    stages = [
        decoupled_stage(cfg, m, i, data=data, input_shape=input_shape(data, shapes, i), output_shape=shapes[i],
                        num_stages=len(modules),
                        total_steps=total_steps, device=device)
        for i, m in enumerate(modules)
    ]
    return Pipeline(stages, bp_lambda=cfg.synthesizer.bp_lambda, correction=cfg.sync.bp_lambda, delay=delay(cfg))


def recurrent_pipeline(cfg: Config, data: DataSpec, *, total_steps: int, device: torch.device,
                       steps_per_epoch: int) -> RecurrentPipeline:
    """The LSTM of ``model.kind: lstm`` as one stage trained by truncated BPTT; under ``method: dni``
    with a synthesizer of its flattened state (seeded like any stage's)."""
    (module,) = build_stages(cfg.model, data.in_shape, data.num_classes, seed=cfg.seed)
    assert isinstance(module, LSTMLanguageModel)
    synth = build_synthesizer(cfg, 0, (module.state_features,), data)
    stage = DecoupledStage(0, module.to(device), synth.to(device) if synth is not None else None, is_last=False,
                           options=stage_options(cfg, total_steps), seed=cfg.seed, loss_fn=resolve_loss(cfg.model.loss))
    return RecurrentPipeline(stage, steps_per_epoch=steps_per_epoch, discount=cfg.synthesizer.discount)


def input_shape(data: DataSpec, shapes: list[tuple[int, ...]], index: int) -> tuple[int, ...]:
    """Stage ``index``'s per-example input shape: the data's, or the output of the stage below."""
    return data.in_shape if index == 0 else shapes[index - 1]


def delay(cfg: Config) -> int:
    """How many steps late a stage that defers its target (delayed, corrected) settles a batch: with
    ``runtime.max_in_flight`` batches in flight a runtime worker gets it back after sending that many;
    the local backend reproduces the same delay (0 for the other methods)."""
    return cfg.runtime.max_in_flight - 1 if cfg.method in DEFERRED_METHODS else 0
