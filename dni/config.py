"""The run configuration: dataclasses are the schema, YAML the values, CLI overrides win.

Precedence is CLI ``section.key=value`` > YAML file > dataclass defaults. Every
field is typed; unknown keys, wrong types and impossible values raise
:class:`ConfigError` with one line naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from dni.optim import OPTIMIZERS
from dni.synthesizer import SYNTHESIZER_KINDS

GATES = ("none", "fit")
METHODS = ("backprop", "dni", "cdni", "delayed", "corrected", "local", "nobprop")
RACE_RULES = ("dni", "cdni", "delayed", "corrected", "local")
"""The methods that decouple stages on the runtime: what ``bench.methods`` races."""
SYNTHESIZER_METHODS = ("dni", "cdni", "corrected")
"""The methods whose stages below the last own a synthesizer."""
CONDITIONED_METHODS = ("cdni", "corrected")
"""The methods whose synthesizers also see the labels (the cDNI context)."""
DEFERRED_METHODS = ("delayed", "corrected")
"""The methods whose stages keep each batch until its target returns, ``runtime.max_in_flight - 1``
steps later (see :func:`dni.engine.settle`)."""
MODEL_KINDS = ("fcn", "cnn", "gpt", "lstm", "custom")
DATASETS = ("mnist", "cifar10", "idx", "custom", "text", "copy")
TEXT_CONTEXT = 64
"""``data.context`` of text data when not given: characters per window."""
LOSSES = ("cross_entropy", "mse")
BACKENDS = ("local", "ray")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
TRANSPORTS = ("auto", "gloo", "nccl")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("constant", "cosine", "step")
NONFINITE_POLICIES = ("stop", "skip", "reset")
RAY_LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible; the message names the key."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: str, choices: tuple[str, ...], key: str) -> None:
    _check(value in choices, key, f"must be one of {', '.join(choices)} (got {value!r})")


@dataclass
class ModelConfig:
    """The network and where it is cut into stages."""

    kind: str = "fcn"
    """``fcn``: ``depth`` hidden Linear-BN-ReLU layers then a Linear classifier (paper FCN-k);
    ``cnn``: ``depth`` Conv5x5-BN-ReLU(-pool) layers then a Linear classifier (paper CNN-k);
    ``gpt``: a GPT-style language model of ``depth`` transformer blocks ``width`` wide with ``heads``
    attention heads, on token ids (text data), its context the data's (:mod:`dni.transformer`);
    ``lstm``: an LSTM language model (``depth`` layers of ``width`` units) trained by truncated BPTT
    over segments of ``bptt`` tokens, its state carried from segment to segment; ``method: dni``
    adds a synthesizer of the gradient the future sends into the carried state (:mod:`dni.recurrent`);
    ``custom``: the stages that ``model.factory`` returns."""
    factory: str | None = None
    """``custom`` only: ``"path/to/file.py:function"`` or ``"package.module:function"``, called as
    ``function(in_shape, num_classes)`` and returning a list of ``torch.nn.Module``, one per stage."""
    loss: str = "cross_entropy"
    """The last stage's loss, a batch mean: ``cross_entropy`` (classes on the last dimension of the
    output, labels of any shape, -1 ignored), ``mse``, or an importable ``"module:function"`` called
    as ``function(output, labels)``."""
    depth: int = 3
    """Number of hidden layers (the k of FCN-k / CNN-k; a GPT's blocks); the classifier (a GPT's
    head) is one more layer."""
    width: int = 256
    """Units per hidden layer of an FCN; a GPT's embedding width."""
    channels: int = 128
    """Filters per conv layer of a CNN."""
    heads: int = 4
    """Attention heads per block of a GPT (``width`` must be a multiple)."""
    bptt: int | None = None
    """``lstm`` only, required: tokens per truncated-BPTT segment (T); the data's windows are the
    segments (``data.context`` defaults to it)."""
    boundaries: list[int] | None = None
    """Layer indices where a new stage starts (strictly increasing, in 1..depth).
    ``null`` decouples every layer, as in the paper: depth + 1 stages."""

    @property
    def num_stages(self) -> int | None:
        """Stages of a built-in model (``boundaries`` cut its depth + 1 layers); None for a custom
        model, whose factory decides."""
        if self.kind == "custom":
            return None
        return len(self.boundaries) + 1 if self.boundaries is not None else self.depth + 1

    def validate(self) -> None:
        _one_of(self.kind, MODEL_KINDS, "model.kind")
        if self.kind == "custom":
            _check(bool(self.factory), "model.factory",
                   "model.kind=custom needs a factory, e.g. model.factory=path/to/model.py:stages")
            _check(self.boundaries is None, "model.boundaries",
                   "only for fcn and cnn: a custom factory returns one module per stage; set it to null")
        else:
            _check(self.factory is None, "model.factory",
                   f"only for model.kind=custom (got kind {self.kind!r}); remove it or set model.kind=custom")
        _check(self.loss in LOSSES or ":" in self.loss, "model.loss",
               f"must be one of {', '.join(LOSSES)} or an importable module:function (got {self.loss!r})")
        _check(self.depth >= 1, "model.depth", f"must be >= 1 (got {self.depth})")
        _check(self.width >= 1, "model.width", f"must be >= 1 (got {self.width})")
        _check(self.channels >= 1, "model.channels", f"must be >= 1 (got {self.channels})")
        _check(self.heads >= 1, "model.heads", f"must be >= 1 (got {self.heads})")
        if self.kind == "gpt":
            _check(self.width % self.heads == 0, "model.heads",
                   f"model.width={self.width} must be a multiple of model.heads={self.heads}")
        if self.kind == "lstm":
            _check(self.bptt is not None and self.bptt >= 1, "model.bptt",
                   f"an LSTM needs its truncation window, >= 1 tokens, e.g. model.bptt=5 (got {self.bptt})")
            _check(self.boundaries is None, "model.boundaries",
                   "an LSTM is one stage, decoupled in time at its segment boundaries; set it to null")
        else:
            _check(self.bptt is None, "model.bptt", f"only for model.kind=lstm (got {self.kind!r}); remove it")
        if self.boundaries is not None:
            layers = self.depth + 1
            b = self.boundaries
            _check(
                all(0 < x < layers for x in b) and all(x < y for x, y in zip(b, b[1:])),
                "model.boundaries",
                f"must be strictly increasing layer indices in 1..{layers - 1} for a "
                f"{self.kind.upper()}-{self.depth} ({layers} layers); got {b}. "
                "Use null to decouple every layer",
            )


@dataclass
class DataConfig:
    """Which dataset, where it lives, and how much of train is held out."""

    name: str = "mnist"
    """``mnist``, ``cifar10``, ``idx`` (any folder of standard-named idx files), ``custom``
    (the datasets that ``data.factory`` returns), ``text`` (one UTF-8 file, character level:
    :mod:`dni.data.text`) or ``copy`` (the paper's copy tasks, generated: :mod:`dni.data.copy_task`)."""
    path: str = "data/mnist"
    """Folder holding the data (created and filled by ``dni data mnist`` for MNIST); passed to a
    custom factory that takes a ``path`` argument; for ``text`` the file (``.../shakespeare.txt``
    is obtained on first use, as by ``dni data shakespeare``)."""
    factory: str | None = None
    """``custom`` only: ``"path/to/file.py:function"`` or ``"package.module:function"`` returning
    ``(train, test)`` or ``(train, val, test)`` ``torch.utils.data.Dataset`` objects of
    ``(input, label)`` pairs; they are read into memory once."""
    val_size: int = 5000
    """Training examples held out for validation (0: none). For ``text``: windows, the last of the
    training part (contiguous, so validation text is never seen in training)."""
    download: bool = True
    """Obtain the dataset on first use when it is missing."""
    context: int | None = None
    """``text`` and ``copy``: tokens per window, the model's context (default 64; an LSTM's model.bptt)."""
    stride: int | None = None
    """``text`` only: characters between the starts of training windows (default: ``context``, each
    character once per epoch; smaller gives more, overlapping windows)."""
    length: int | None = None
    """``copy`` only, required: symbols per sequence to copy (N)."""
    repeats: int = 1
    """``copy`` only: how many times the sequence is to be output (1: Copy; more: Repeat Copy)."""
    episodes: int = 10000
    """``copy`` only: training episodes (validation: ``val_size``, test: 1000)."""

    @property
    def per_char(self) -> bool:
        """Whether losses are per character (``text``, ``copy``): they are also reported in bits per character."""
        return self.name in ("text", "copy")

    @property
    def text_context(self) -> int:
        """Tokens per window of text or copy data."""
        return self.context if self.context is not None else TEXT_CONTEXT

    def validate(self) -> None:
        _one_of(self.name, DATASETS, "data.name")
        if self.name == "custom":
            _check(bool(self.factory), "data.factory",
                   "data.name=custom needs a factory, e.g. data.factory=path/to/data.py:datasets")
        else:
            _check(self.factory is None, "data.factory",
                   f"only for data.name=custom (got {self.name!r}); remove it or set data.name=custom")
        _check(self.val_size >= 0, "data.val_size", f"must be >= 0 (got {self.val_size})")
        for key, names in (("context", ("text", "copy")), ("stride", ("text",)), ("length", ("copy",))):
            value = getattr(self, key)
            if self.name not in names:
                _check(value is None, f"data.{key}", f"only for data.name={' or '.join(names)} (got {self.name!r}); remove it")
            else:
                _check(value is None or value >= 1, f"data.{key}", f"must be >= 1 (got {value})")
        if self.name == "copy":
            _check(self.length is not None, "data.length", "the copy task needs its sequence length, e.g. data.length=10")
            _check(self.repeats >= 1 and self.episodes >= 1, "data.repeats",
                   f"and data.episodes must be >= 1 (got {self.repeats} and {self.episodes})")
        else:
            _check(self.repeats == 1 and self.episodes == 10000, "data.repeats",
                   f"and data.episodes are for data.name=copy only (got {self.name!r}); remove them")


@dataclass
class TrainConfig:
    """The optimisation budget and the network's optimiser."""

    epochs: int = 20
    """Passes over the training split."""
    max_steps: int | None = None
    """Stop after this many steps in total (overrides epochs when smaller)."""
    batch_size: int = 256
    lr: float = 1e-3
    """Learning rate of the stages' optimiser."""
    optimizer: str = "adam"
    """The stages' optimiser: adam, adamw or sgd (and the synthesizers', unless synthesizer.optimizer)."""
    momentum: float = 0.0
    """SGD momentum (train.optimizer or synthesizer.optimizer sgd only)."""
    nesterov: bool = False
    """Nesterov momentum for SGD (needs train.momentum > 0)."""
    schedule: str = "cosine"
    """Learning-rate schedule of stages and synthesizers: constant, cosine (to 0) or step (/10 at 60% and 80%)."""
    warmup: int = 0
    """Steps of linear learning-rate warm-up from 0 before the schedule (nanoGPT: 100)."""
    weight_decay: float = 0.0
    eval_every: int = 1
    """Evaluate on validation and test every this many epochs (the last epoch always)."""
    eval_steps: int = 0
    """Also evaluate every this many steps (0: only at epoch ends), e.g. to time accuracy finely."""
    nonfinite: str = "stop"
    """A NaN/inf in an activation, synthetic gradient, loss or target: stop (with a checkpoint),
    skip (the batch, in every stage), or reset (the synthesizer at fault, then skip)."""

    def validate(self) -> None:
        _check(self.epochs >= 1, "train.epochs", f"must be >= 1 (got {self.epochs})")
        _check(
            self.max_steps is None or self.max_steps >= 1,
            "train.max_steps",
            f"must be >= 1 or null (got {self.max_steps})",
        )
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1 (got {self.batch_size})")
        _check(self.lr > 0, "train.lr", f"must be > 0, e.g. 1e-3 (got {self.lr})")
        _one_of(self.schedule, SCHEDULES, "train.schedule")
        _check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0 (got {self.weight_decay})")
        _one_of(self.optimizer, OPTIMIZERS, "train.optimizer")
        _check(0 <= self.momentum < 1, "train.momentum", f"must be in [0, 1) (got {self.momentum})")
        _check(not self.nesterov or self.momentum > 0, "train.nesterov", "needs train.momentum > 0, e.g. 0.9")
        _check(self.eval_every >= 1, "train.eval_every", f"must be >= 1 (got {self.eval_every})")
        _check(self.eval_steps >= 0, "train.eval_steps", f"must be >= 0 (got {self.eval_steps})")
        _check(self.warmup >= 0, "train.warmup", f"must be >= 0 (got {self.warmup})")
        _one_of(self.nonfinite, NONFINITE_POLICIES, "train.nonfinite")


@dataclass
class SynthesizerConfig:
    """The gradient synthesizers, one per stage output except the last (paper section 3)."""

    hidden_layers: int | None = None
    """Hidden layers: null picks the paper's choice (2 for dni, 0 = linear for cdni)."""
    hidden_width: int = 1024
    """Units (FCN) or filters (CNN) per hidden layer."""
    batch_norm: bool = False
    """BatchNorm after each hidden layer."""
    kind: str = "auto"
    """auto: a convolutional synthesizer for (C, H, W) activations, a per-position one for sequences,
    an MLP otherwise; mlp: an MLP on the flattened activation of any shape (it sees all of h)."""
    normalize: bool = False
    """Predict in units of the targets' running RMS, so the synthesizer's own outputs are O(1)
    however small the gradients per element (large activations, late training); false: the paper."""
    lr: float = 1e-3
    """Learning rate of the synthesizers (their own: targets are per-example gradients)."""
    optimizer: str | None = None
    """adam, adamw or sgd (with train.momentum and train.nesterov); null: train.optimizer."""
    loss_weight: float = 1.0
    """Weight of the L2 regression loss (paper: 1.0)."""
    discount: float = 1.0
    """``model.kind: lstm`` only: the weight of the future in the synthetic gradient at a segment
    boundary, gamma in (0, 1]: the synthesizer predicts the gradient of sum_k gamma^k L_{next+k}, as in
    TD learning (paper: 1, no discount); below 1 the bootstrapped targets cannot grow without bound
    where the state's Jacobian amplifies them."""
    bp_lambda: float = 0.0
    """BP(lambda): each stage waits for the gradient from above and backpropagates lambda x that +
    (1 - lambda) x its synthetic gradient; 0 = pure synthetic gradients (update-unlocked), 1 = backprop.
    Above 0 the pipeline is locked, on both backends."""
    p_update: float = 1.0
    """Probability that a stage applies its update at a step (paper's random-update experiment)."""
    gate: str = "none"
    """none: a stage steps at its full learning rate on its synthetic gradient (the paper);
    fit: the step is scaled by the fraction of its targets the synthesizer explains (1 - its loss /
    the loss of predicting zero, moving averages), so a stage waits while its synthesizer is uninformative."""
    unlock: bool = False
    """Complete unlock (paper section 3.3, :mod:`dni.unlock`): every stage above the first trains on a
    synthetic input, predicted from the raw batch by its own input model, so it waits for neither
    neighbour; false: update unlock only (a stage runs forward on the activation it receives)."""
    input_hidden_layers: int = 2
    """``unlock`` only: ReLU hidden layers of each input model."""
    input_width: int = 256
    """``unlock`` only: units per hidden layer of each input model."""
    input_lr: float | None = None
    """``unlock`` only: learning rate of the input models; null: ``synthesizer.lr``."""

    def validate(self) -> None:
        _check(
            self.hidden_layers is None or 0 <= self.hidden_layers <= 2,
            "synthesizer.hidden_layers",
            f"must be 0, 1, 2 or null (got {self.hidden_layers})",
        )
        _check(self.hidden_width >= 1, "synthesizer.hidden_width", f"must be >= 1 (got {self.hidden_width})")
        _check(self.lr > 0, "synthesizer.lr", f"must be > 0, e.g. 1e-3 (got {self.lr})")
        if self.optimizer is not None:
            _one_of(self.optimizer, OPTIMIZERS, "synthesizer.optimizer")
        _check(self.loss_weight > 0, "synthesizer.loss_weight", f"must be > 0 (got {self.loss_weight})")
        _check(0.0 <= self.bp_lambda <= 1.0, "synthesizer.bp_lambda", f"must be in [0, 1] (got {self.bp_lambda})")
        _check(0.0 < self.p_update <= 1.0, "synthesizer.p_update", f"must be in (0, 1] (got {self.p_update})")
        _one_of(self.gate, GATES, "synthesizer.gate")
        _one_of(self.kind, SYNTHESIZER_KINDS, "synthesizer.kind")
        _check(self.gate == "none" or self.bp_lambda == 0, "synthesizer.gate",
               "scales the steps of update-unlocked stages, and synthesizer.bp_lambda > 0 locks them; use one of the two")
        _check(self.input_hidden_layers >= 0, "synthesizer.input_hidden_layers",
               f"must be >= 0 (got {self.input_hidden_layers})")
        _check(self.input_width >= 1, "synthesizer.input_width", f"must be >= 1 (got {self.input_width})")
        _check(self.input_lr is None or self.input_lr > 0, "synthesizer.input_lr",
               f"must be > 0 or null (got {self.input_lr})")
        _check(not self.unlock or self.bp_lambda == 0, "synthesizer.unlock",
               "trains every stage without waiting for its neighbours, and synthesizer.bp_lambda > 0 makes each "
               "wait for the gradient from above; use one of the two")


@dataclass
class LogConfig:
    """What a run writes and how often."""

    dir: str = "runs"
    """Parent folder of run directories (``<dir>/<name>-<time>/``)."""
    every: int = 50
    """Log training scalars every this many steps."""
    grad_every: int = 200
    """Measure synthetic-vs-true gradient cosine and relative error every this many steps (0: never),
    by a true-gradient round that only measures (see sync.true_every, which also trains on it)."""
    progress: bool = True
    """Show a progress bar on the terminal."""

    def validate(self) -> None:
        _check(self.every >= 1, "log.every", f"must be >= 1 (got {self.every})")
        _check(self.grad_every >= 0, "log.grad_every", f"must be >= 0 (got {self.grad_every})")


@dataclass
class CheckpointConfig:
    """Periodic checkpoints of every stage, synthesizer and optimiser."""

    every: int = 0
    """Save every this many steps (0: only at the end). On the Ray runtime each is a consistent cut
    (stages first receive what they are owed), and a failed worker restarts the pipeline from the
    newest: with 0, from step 0."""
    keep: int = 3
    """Keep the newest this many checkpoints."""

    def validate(self) -> None:
        _check(self.every >= 0, "checkpoint.every", f"must be >= 0 (got {self.every})")
        _check(self.keep >= 1, "checkpoint.keep", f"must be >= 1 (got {self.keep})")


@dataclass
class StageSpec:
    """Per-stage settings of the Ray runtime (``stages:`` is a list, one entry per stage)."""

    replicas: int = 1
    """Data-parallel replicas of this stage; they take turns on batches and are averaged every sync.replica_every steps."""

    def validate(self, key: str) -> None:
        _check(self.replicas >= 1, f"{key}.replicas", f"must be >= 1 (got {self.replicas})")


@dataclass
class RuntimeConfig:
    """How the Ray runtime runs the stages (``backend: ray``)."""

    max_in_flight: int = 2
    """Batches a stage may have sent downstream whose gradient targets have not come back (backpressure; 1 = lock-step).
    Under methods delayed and corrected it sets the delay of every target (max_in_flight - 1 steps), on both backends."""
    max_staleness: int = 16
    """Targets older than this many steps are dropped rather than used to train a synthesizer (the drops are logged;
    dni and cdni: the corrected rule uses every target)."""
    placement_strategy: str = "PACK"
    """Ray placement-group strategy for the stage bundles: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD."""
    cpus_per_stage: float = 1.0
    gpus_per_stage: float | None = None
    """GPUs per stage worker; null: 1 when the cluster has GPUs (one stage per GPU), else 0."""
    transport: str = "auto"
    """torch.distributed backend between stages: gloo (CPU tensors), nccl (GPUs) or auto."""
    address: str | None = None
    """Ray cluster to join (also RAY_ADDRESS); null starts a local Ray instance on 127.0.0.1."""
    dashboard: bool = False
    """Start Ray's dashboard with a local instance (bound to 127.0.0.1)."""
    timeout_s: float = 120.0
    """Longest wait for placement, setup or a silent worker before the run fails with a message."""
    poll_s: float = 1.0
    """How often the coordinator gathers metrics from the workers."""
    max_restarts: int = 3
    """Stage-worker failures survived per run, each by restarting the pipeline from its last
    checkpoint (see checkpoint.every); one more stops the run with a message."""
    ray_log_level: str = "error"
    """Level of Ray's own driver-side logging (its start-up lines, the token notice): debug, info,
    warning or error; the default shows only Ray's errors."""

    def validate(self) -> None:
        _check(self.max_in_flight >= 1, "runtime.max_in_flight", f"must be >= 1 (got {self.max_in_flight})")
        _check(self.max_staleness >= 1, "runtime.max_staleness", f"must be >= 1 (got {self.max_staleness})")
        _one_of(self.placement_strategy, PLACEMENT_STRATEGIES, "runtime.placement_strategy")
        _check(self.cpus_per_stage > 0, "runtime.cpus_per_stage", f"must be > 0 (got {self.cpus_per_stage})")
        _check(
            self.gpus_per_stage is None or self.gpus_per_stage >= 0,
            "runtime.gpus_per_stage",
            f"must be >= 0 or null (got {self.gpus_per_stage})",
        )
        _one_of(self.transport, TRANSPORTS, "runtime.transport")
        _check(self.timeout_s > 0, "runtime.timeout_s", f"must be > 0 (got {self.timeout_s})")
        _check(self.poll_s > 0, "runtime.poll_s", f"must be > 0 (got {self.poll_s})")
        _check(self.max_restarts >= 0, "runtime.max_restarts", f"must be >= 0 (got {self.max_restarts})")
        _one_of(self.ray_log_level, RAY_LOG_LEVELS, "runtime.ray_log_level")


@dataclass
class SyncConfig:
    """The coordinator's hierarchical synchronisation of the Ray runtime (level 1, neighbour targets, is always on)."""

    true_every: int = 0
    """Level 2: every this many steps, one batch gets a true end-to-end gradient round that trains
    every synthesizer on it and measures it (0: never); on both backends."""
    replica_every: int = 0
    """Level 3: replicas of a stage average parameters and synthesizers every this many of their steps (0: never)."""
    bp_lambda: float = 0.0
    """On a level-2 round, also update each stage by lambda x (true - synthetic) gradient, taken at the
    weights of that batch's forward (a delayed BP(lambda) correction); needs sync.true_every."""

    def validate(self) -> None:
        _check(self.true_every >= 0, "sync.true_every", f"must be >= 0 (got {self.true_every})")
        _check(self.replica_every >= 0, "sync.replica_every", f"must be >= 0 (got {self.replica_every})")
        _check(0.0 <= self.bp_lambda <= 1.0, "sync.bp_lambda", f"must be in [0, 1] (got {self.bp_lambda})")
        _check(self.bp_lambda == 0 or self.true_every > 0, "sync.bp_lambda",
               "applies on level-2 rounds only: set sync.true_every > 0 too")


@dataclass
class LocalConfig:
    """The auxiliary heads of ``method: local`` (local losses, DGL; see :mod:`dni.local_head`)."""

    hidden_layers: int = 0
    """GELU hidden layers of each head (0: a linear classifier on the LayerNorm-ed output)."""
    hidden_width: int = 256
    """Units per hidden layer."""
    pool: int = 2
    """A feature map (C, H, W) is average-pooled to at most pool x pool before its head."""
    lr: float | None = None
    """The heads' learning rate (null: train.lr); it follows the stage's schedule."""

    def validate(self) -> None:
        _check(self.hidden_layers >= 0, "local.hidden_layers", f"must be >= 0 (got {self.hidden_layers})")
        _check(self.hidden_width >= 1, "local.hidden_width", f"must be >= 1 (got {self.hidden_width})")
        _check(self.pool >= 1, "local.pool", f"must be >= 1 (got {self.pool})")
        _check(self.lr is None or self.lr > 0, "local.lr", f"must be > 0 (got {self.lr})")


@dataclass
class BenchConfig:
    """``dni bench``: how many steps each contestant runs."""

    steps: int = 40
    """Steps measured per contestant, after the warm-up."""
    warmup: int = 5
    """Steps run first and not measured."""
    out: str = "results/bench"
    """Folder for <name>.json and <name>.md."""
    race: bool = False
    """Also race, over the whole train budget to ``target_accuracy``: single-process backprop on one
    thread and on all cores, DDP, and each decoupled rule of ``methods`` (:mod:`workers.race`)."""
    target_accuracy: float = 0.97
    """Test accuracy whose time (training seconds from the first step) the race compares."""
    repeats: int = 3
    """Rounds of the race (every contestant once per round, interleaved); medians are reported."""
    methods: list[str] = field(default_factory=list)
    """The decoupled rules the race runs on the runtime (empty: the config's method)."""

    def validate(self) -> None:
        _check(self.repeats >= 1, "bench.repeats", f"must be >= 1 (got {self.repeats})")
        for m in self.methods:
            _check(m in RACE_RULES, "bench.methods", f"{m!r} is not a decoupled rule; use some of {', '.join(RACE_RULES)}")
        _check(self.steps >= 2, "bench.steps", f"must be >= 2 (got {self.steps})")
        _check(0 < self.target_accuracy <= 1, "bench.target_accuracy", f"must be in (0, 1] (got {self.target_accuracy})")
        _check(self.warmup >= 0, "bench.warmup", f"must be >= 0 (got {self.warmup})")


@dataclass
class Config:
    """A whole run. See ``configs/`` for commented examples."""

    name: str = "run"
    """Run name; the run directory is ``log.dir/<name>-<time>``."""
    method: str = "cdni"
    """backprop, dni (synthesizer sees the activation), cdni (activation and label), or delayed
    (no synthesizer: each stage applies the true gradient of a batch when it comes back,
    runtime.max_in_flight - 1 steps later on both backends, replaying its forward on the kept input),
    or corrected (cDNI's step at once on the synthetic gradient; when the target comes back, with the same
    delay, the residual target - synthetic is replayed into the next step, so each batch adds up to its target),
    or local (local losses, DGL: each stage but the last learns from an auxiliary head of its own output,
    see the local section; nothing travels back down),
    or nobprop (the paper's No-Bprop baseline: only the last stage learns, the others stay at their
    initialisation; backend local)."""
    backend: str = "local"
    """local: the single-process reference trainer; ray: one Ray actor per stage."""
    seed: int = 0
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    threads: int = 0
    """torch intra-op threads of each process (0: torch's default; on backend ray,
    runtime.cpus_per_stage)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    synthesizer: SynthesizerConfig = field(default_factory=SynthesizerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    stages: list[StageSpec] = field(default_factory=list)
    """Per-stage runtime settings; empty: one replica each. Otherwise one entry per stage."""
    bench: BenchConfig = field(default_factory=BenchConfig)

    def validate(self) -> "Config":
        """Check every field; returns self. Raises ConfigError naming the first bad key."""
        _check(bool(self.name) and "/" not in self.name, "name", f"must be a non-empty name without '/' (got {self.name!r})")
        _one_of(self.method, METHODS, "method")
        _check(self.synthesizer.gate == "none" or self.method in ("dni", "cdni"), "synthesizer.gate",
               f"scales steps taken on synthetic gradients: it needs method dni or cdni (got {self.method})")
        _check(self.synthesizer.bp_lambda == 0 or self.method in ("dni", "cdni"), "synthesizer.bp_lambda",
               f"mixes true and synthetic gradients: it needs method dni or cdni (got {self.method})")
        _check(self.method not in DEFERRED_METHODS or self.train.nonfinite == "stop", "train.nonfinite",
               f"skip and reset are not available with method={self.method} yet; use stop")
        _check(self.method != "corrected" or self.sync.true_every == 0, "sync.true_every",
               "method corrected already corrects every batch with its target: set sync.true_every=0")
        _one_of(self.backend, BACKENDS, "backend")
        _check(self.method != "nobprop" or self.backend == "local", "method",
               "nobprop is the paper's No-Bprop baseline (only the last stage learns) and runs on backend: local; "
               "set backend=local")
        _one_of(self.device, DEVICES, "device")
        _check(self.threads >= 0, "threads", f"must be >= 0 (got {self.threads})")
        if self.model.kind == "lstm":
            self._check_recurrent()
        else:
            _check(self.synthesizer.discount == 1, "synthesizer.discount",
                   "discounts the future at a recurrent model's segment boundary (model.kind=lstm); remove it")
        for section in (self.model, self.data, self.train, self.synthesizer, self.log, self.checkpoint, self.runtime, self.sync,
                        self.local, self.bench):
            section.validate()
        if self.synthesizer.unlock:
            self._check_unlock()
        n = self.model.num_stages
        if n is not None:  # a custom model's stages are counted when its factory runs
            _check(
                not self.stages or len(self.stages) == n,
                "stages",
                f"has {len(self.stages)} entries but the model has {n} stages; give one entry per stage or none",
            )
        sgd = "sgd" in (self.train.optimizer, self.synthesizer.optimizer)
        _check(sgd or (self.train.momentum == 0 and not self.train.nesterov), "train.momentum",
               "and train.nesterov are for SGD only: set train.optimizer=sgd (or synthesizer.optimizer=sgd), or remove them")
        for i, spec in enumerate(self.stages):
            spec.validate(f"stages[{i}]")
            _check(self.backend == "ray" or spec.replicas == 1, f"stages[{i}].replicas",
                   "replicas run on backend: ray only; set backend=ray or remove the entry")
        return self

    def _check_recurrent(self) -> None:
        """What a truncated-BPTT run (model.kind=lstm) needs: the data's windows are its segments."""
        _check(self.data.context == self.model.bptt, "data.context",
               f"an LSTM's windows are its truncated-BPTT segments: data.context={self.data.context} must equal "
               f"model.bptt={self.model.bptt}; remove data.context (it defaults to model.bptt)")
        _check(self.data.stride in (None, self.data.context), "data.stride",
               "an LSTM reads its text as contiguous streams: remove data.stride")
        _check(self.method in ("backprop", "dni"), "method",
               f"an LSTM trains with backprop (plain truncated BPTT) or dni (a synthesizer at the truncation "
               f"boundary); got {self.method}: cdni's context would be the labels of segments not yet read")
        _check(self.backend == "local", "backend",
               "an LSTM is one stage, decoupled in time rather than across workers: set backend=local")
        _check(0 < self.synthesizer.discount <= 1, "synthesizer.discount",
               f"must be in (0, 1] (got {self.synthesizer.discount})")
        _check(self.sync.true_every == 0, "sync.true_every",
               "true-gradient rounds need the gradient from the future segments, which truncated BPTT never "
               "computes: set sync.true_every=0 (log.grad_every measures the synthesizer against its target)")

    def _check_unlock(self) -> None:
        """What complete unlock (synthesizer.unlock) needs: synthetic gradients, and no true rounds."""
        _check(self.method in ("dni", "cdni"), "synthesizer.unlock",
               f"trains each stage on synthetic inputs and synthetic gradients: it needs method dni or cdni "
               f"(got {self.method})")
        _check(self.model.kind != "lstm", "synthesizer.unlock",
               "is for a network cut into stages; an LSTM is one stage: remove it")
        _check(self.sync.true_every == 0 and self.log.grad_every == 0, "sync.true_every",
               "true-gradient rounds follow the real chain, which complete unlock does not train on: set "
               "sync.true_every=0 and log.grad_every=0 with synthesizer.unlock")
        _check(all(spec.replicas == 1 for spec in self.stages), "stages",
               "replicas average their stages but not their input models: with synthesizer.unlock give every "
               "stage one replica")

    def replicas(self, stage: int) -> int:
        """Replicas of stage ``stage`` (1 unless ``stages`` says otherwise)."""
        return self.stages[stage].replicas if self.stages else 1

    @property
    def synthesizer_hidden_layers(self) -> int:
        """The synthesizer depth in effect: the configured one, else the paper's per method."""
        if self.synthesizer.hidden_layers is not None:
            return self.synthesizer.hidden_layers
        return 0 if self.method in CONDITIONED_METHODS else 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` checked against the annotation ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        _check(isinstance(value, list), key, f"must be a list (got {value!r})")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"must be a mapping of keys (got {value!r})")
        return _build(typing.cast(type, tp), value, key + ".")  # an annotation: the class, not an instance
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 1e-3 as a string; accept what float() accepts.
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok, key, f"must be a number (got {value!r})")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer (got {value!r})")
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, f"must be true or false (got {value!r})")
        return value
    if tp is str:
        _check(isinstance(value, str), key, f"must be a string (got {value!r})")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # a schema bug, not a user error


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key; valid keys here are {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"{text}: an override must look like section.key=value, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    # YAML parses the value so that 5, 1e-3, true, null and [1, 2] mean what they do in the file.
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the nested ``values`` with each ``a.b=value`` override set."""
    out = _deepcopy_dict(values)
    for text in overrides:
        path, value = _parse_override(text)
        node = out
        for part in path[:-1]:
            existing = node.get(part)
            if existing is None:
                existing = node[part] = {}
            if not isinstance(existing, dict):
                raise ConfigError(f"{text}: {part} is not a section")
            node = existing
        node[path[-1]] = value
    return out


def _deepcopy_dict(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy_dict(v) if isinstance(v, dict) else v for k, v in d.items()}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader. Raises ConfigError on a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such config file; see configs/ for examples")
    try:
        values = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: must hold a mapping of sections (name:, model:, train:, ...)")
    return values


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a Config from nested plain values (as read from YAML)."""
    return _derive(_build(Config, values)).validate()


def _derive(cfg: Config) -> Config:
    """Fill the settings whose defaults follow from others (the run directory's config.yaml then
    holds them): an LSTM's data windows default to its truncation window."""
    if cfg.model.kind == "lstm" and cfg.data.context is None and cfg.data.per_char:
        cfg.data.context = cfg.model.bptt
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (None: defaults only), apply ``overrides``, validate.

    Raises:
        ConfigError: one line naming the key and what to do.
    """
    values = read_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(values, overrides or []))
