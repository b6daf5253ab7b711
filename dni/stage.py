"""One stage of a decoupled network with everything it owns.

A :class:`DecoupledStage` holds a stage module, the synthesizer of its output
interface (none for the last stage), their optimisers and schedules, and its own
random stream for stochastic updates. It knows nothing about other stages or
processes: the single-process trainer calls it for every stage in turn, a Ray
worker calls it for its one stage. The tensors it exchanges with neighbours are
activations (downstream) and gradient targets (upstream).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from dni import rules
from dni.checkpoint import CheckpointError
from dni.fit import SynthesizerFit
from dni.local_head import LocalHead
from dni.losses import LossFn, cross_entropy
from dni.optim import OptimizerSpec, set_lr
from dni.run import RunError
from dni.synthesizer import Synthesizer, reinitialise
from dni.unlock import InputModel


class NonFiniteError(RunError):
    """A NaN or inf appeared in a stage's activation, synthetic gradient, loss or gradient target.

    Raised where it appears, before the stage applies any update from it; ``stage`` and
    ``what`` say where (the trainer adds the step).
    """

    def __init__(self, stage: int, what: str, message: str | None = None) -> None:
        super().__init__(message or f"non-finite {what} at stage {stage}")
        self.stage, self.what = stage, what

    def __reduce__(self):  # picklable, so that it crosses process boundaries (Ray) intact
        return (NonFiniteError, (self.stage, self.what, str(self)))


def check_finite(t: torch.Tensor, stage: "DecoupledStage", what: str) -> torch.Tensor:
    """``t``, once every value is finite; else ``stage`` drops its pending batch and NonFiniteError says
    where (``what``: activation, loss, ...)."""
    if not bool(torch.isfinite(t).all()):
        stage.abandon()
        raise NonFiniteError(stage.index, what)
    return t


@contextlib.contextmanager
def preserved_buffers(modules: list[nn.Module]) -> Iterator[None]:
    """Restore every buffer (BatchNorm running statistics) on exit: a side computation
    in training mode must not change the model."""
    saved = [[b.detach().clone() for b in m.buffers()] for m in modules]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, copies in zip(modules, saved):
                for b, c in zip(m.buffers(), copies):
                    b.copy_(c)


@dataclass(frozen=True)
class StageOptions:
    """How a stage and its synthesizer learn (see :class:`dni.config.TrainConfig` and
    :class:`dni.config.SynthesizerConfig`)."""

    lr: float = 1e-3
    synth_lr: float = 1e-4
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    """The stage's optimiser (its weight decay included)."""
    synth_optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    """The synthesizer's optimiser."""
    synth_loss_weight: float = 1.0
    p_update: float = 1.0
    gate: str = "none"
    """``fit``: scale the stage's step by the fraction of its targets the synthesizer explains
    (:mod:`dni.fit`); ``none``: the paper's full step."""
    schedule: str = "constant"
    total_steps: int = 1
    warmup: int = 0
    """Steps of linear warm-up before the schedule (see :func:`lr_factor`)."""


def lr_factor(schedule: str, step: int, total_steps: int, warmup: int = 0) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``.

    constant: 1; cosine: half a cosine from 1 to 0; step: 1, then /10 at 60% and /100 at 80%
    (the paper's /10 at 300k and 400k of 500k iterations). With ``warmup``, the first ``warmup``
    steps scale that by (step + 1) / warmup.
    """
    if step < warmup:
        return (step + 1) / warmup * lr_factor(schedule, step, total_steps)
    frac = min(step / max(total_steps, 1), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    if schedule == "step":
        return 1.0 if frac < 0.6 else 0.1 if frac < 0.8 else 0.01
    raise ValueError(f"unknown schedule {schedule!r}: use constant, cosine or step")


class DecoupledStage:
    """A stage, its output synthesizer, optimisers and random stream.

    Args:
        index: position in the pipeline (0 is the first stage).
        module: the stage's layers.
        synthesizer: M for this stage's output, or None (last stage, or backprop).
        is_last: whether the true loss is computed here.
        options: learning rates, schedule and update probability.
        seed: seeds this stage's stochastic-update stream.
        loss_fn: the last stage's loss ``(output, labels) -> scalar``, a batch mean
            (default :func:`dni.losses.cross_entropy`).
        delayed: the delayed true-gradient rule (``method: delayed``): the stage sends its output
            on at once but updates only when dL/dh of that batch comes back, replaying its
            forward on the kept input with its current weights (features replay).
        corrected: corrected synthetic gradients (``method: corrected``): the stage steps at once on
            its synthetic gradient, as under cDNI, and when the batch's target comes back adds the
            residual (target - synthetic), backpropagated through a replay of its forward, to the
            gradients of its next step (see :func:`dni.engine.settle`).
        frozen: the paper's No-Bprop baseline (``method: nobprop``): the stage never learns; its
            parameters stay at their initialisation (BatchNorm statistics still move) and no
            gradient is computed for it.
        unlock: complete unlock (:mod:`dni.unlock`): the model of this stage's input, from which it
            trains without waiting for the stage below; None: the stage trains on its real input.
        local_head: local losses (``method: local``, :mod:`dni.local_head`): the auxiliary head whose
            loss gradient the stage backpropagates in place of a synthetic gradient.
        sends_target: whether the stage below needs dL/dx (False under local losses, where nothing
            travels down: the backward then stops at the stage's parameters).
    """

    def __init__(
        self,
        index: int,
        module: nn.Module,
        synthesizer: Synthesizer | None,
        *,
        is_last: bool,
        options: StageOptions,
        seed: int,
        loss_fn: LossFn = cross_entropy,
        delayed: bool = False,
        corrected: bool = False,
        frozen: bool = False,
        unlock: InputModel | None = None,
        local_head: LocalHead | None = None,
        sends_target: bool = True,
    ) -> None:
        if is_last and synthesizer is not None:
            raise ValueError("the last stage computes the true loss and takes no synthesizer")
        if delayed and (is_last or synthesizer is not None):
            raise ValueError("the delayed rule is for stages below the last, without a synthesizer")
        if corrected and (is_last or synthesizer is None):
            raise ValueError("the corrected rule is for stages below the last, with a synthesizer")
        if frozen and (is_last or synthesizer is not None or delayed):
            raise ValueError("a frozen stage is below the last, without a synthesizer, and not delayed")
        if unlock is not None and (index == 0 or delayed or frozen):
            raise ValueError("an input model is for a stage above the first that learns from synthetic gradients")
        if local_head is not None and (is_last or synthesizer is not None or delayed or frozen or unlock is not None):
            raise ValueError("an auxiliary head is for a stage below the last that learns from it alone")
        self.delayed, self.corrected, self.frozen, self.unlock = delayed, corrected, frozen, unlock
        self.local_head, self.sends_target = local_head, sends_target
        self.index = index
        self.module = module
        self.synthesizer = synthesizer
        self.is_last = is_last
        self.options = options
        self.loss_fn = loss_fn
        self.optimizer = options.optimizer.build(list(module.parameters()), options.lr)
        self.synth_optimizer = None
        if synthesizer is not None:
            self.synth_optimizer = options.synth_optimizer.build(list(synthesizer.parameters()), options.synth_lr)
        self.fit = SynthesizerFit()  # how well the synthesizer predicts its targets
        self.steps_done = 0  # steps taken (updated or skipped): drives the schedule
        self.update_generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._buffers: list[torch.Tensor] | None = None

    @property
    def computes_target(self) -> bool:
        """Whether the backward computes dL/dx, the target for the stage below: a stage above the
        first whose target is sent (not under local losses)."""
        return self.index > 0 and self.sends_target

    @property
    def defers_target(self) -> bool:
        """Whether the stage keeps each batch until its target comes back and only then sends dL/dx
        down (the delayed and corrected rules; see :func:`dni.engine.settle`)."""
        return self.delayed or self.corrected

    # -- forward ---------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the stage on ``x`` and keep the graph for :meth:`backward`.

        Returns the output, detached: what travels to the next stage.
        """
        # BatchNorm statistics move during the forward; kept until step() so that a fault
        # (see abandon) can put them back instead of keeping a NaN in the running mean.
        self._buffers = [b.detach().clone() for b in self.module.buffers()]
        self._input = x.detach().requires_grad_(self.computes_target)
        self._output = self.module(self._input)
        return check_finite(self._output, self, "activation").detach()

    def forward_only(self, x: torch.Tensor) -> torch.Tensor:
        """The output now, without keeping a graph: the delayed rule's forward (the update replays
        it, :meth:`replay_backward`) and a frozen stage's. BatchNorm statistics move as usual."""
        with torch.no_grad():
            h = self.module(x)
        return check_finite(h, self, "activation")

    def replay_backward(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
        """The delayed rule's backward: run the stage again on the kept input ``x`` at its current
        weights and backpropagate ``grad``, dL/dh of that batch (features replay). The replay leaves
        the BatchNorm statistics as the first forward set them. Returns dL/dx (None for stage 0)."""
        saved = [b.detach().clone() for b in self.module.buffers()]
        try:
            self._input = x.detach().requires_grad_(self.index > 0)
            self._output = self.module(self._input)
            return self.backward(grad)
        finally:  # after the backward: BatchNorm's graph holds its statistics at their version
            with torch.no_grad():
                for b, old in zip(self.module.buffers(), saved):
                    b.copy_(old)

    def context(self, labels: torch.Tensor) -> torch.Tensor | None:
        """What this stage's synthesizer conditions on: the labels for cDNI, else nothing."""
        if self.synthesizer is not None and self.synthesizer.conditioned:
            return labels
        return None

    def synthetic_gradient(self, labels: torch.Tensor) -> torch.Tensor:
        """g^ for the output of the last :meth:`forward` (see :func:`dni.rules.synthetic_gradient`)."""
        if self.synthesizer is None or self._output is None:
            raise RuntimeError(f"stage {self.index} has no synthesizer or no pending forward")
        return check_finite(rules.synthetic_gradient(self.synthesizer, self._output, self.context(labels)), self,
                       "synthetic gradient")

    def local_gradient(self, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Local losses: dL_local/dh for the output of the last :meth:`forward`, and the local loss;
        the auxiliary head takes its step on that loss (see :meth:`dni.local_head.LocalHead.gradient`)."""
        if self.local_head is None or self._output is None:
            raise RuntimeError(f"stage {self.index} has no auxiliary head or no pending forward")
        grad, loss = self.local_head.gradient(self._output, labels, lr_scale=self.lr_scale)
        if not math.isfinite(loss):
            self.abandon()
            raise NonFiniteError(self.index, "local loss")
        return grad, loss

    # -- backward ----------------------------------------------------------------
    def backward(self, grad: torch.Tensor) -> torch.Tensor | None:
        """Backpropagate dL/d output through the stage; return dL/d input (None for stage 0)."""
        if self._output is None:
            raise RuntimeError(f"stage {self.index}: backward before forward")
        target = rules.backward_from(self._output, grad, self._input if self.computes_target else None)
        self._output = self._input = None  # free the graph
        return check_finite(target, self, "gradient target") if target is not None else None

    def loss_backward(self, labels: torch.Tensor) -> tuple[float, torch.Tensor | None]:
        """Last stage: the loss of the pending output, backpropagated.

        Returns:
            (loss value, true dL/d input; None for a single-stage network and when no target is sent).
        """
        if not self.is_last or self._output is None:
            raise RuntimeError(f"stage {self.index} is not the last stage or has no pending forward")
        loss = check_finite(self.loss_fn(self._output, labels), self, "loss")
        target = rules.loss_backward(loss, self._input if self.computes_target else None)
        self._output = self._input = None
        return loss.item(), check_finite(target, self, "gradient target") if target is not None else None

    def abandon(self) -> None:
        """Drop the pending batch: its graph, any gradients it left and what its forward did to
        the BatchNorm statistics; no update is applied."""
        self._output = self._input = None
        self.optimizer.zero_grad(set_to_none=True)
        if self._buffers is not None:
            with torch.no_grad():
                for b, saved in zip(self.module.buffers(), self._buffers):
                    b.copy_(saved)
            self._buffers = None

    def reset_synthesizer(self) -> None:
        """Start the synthesizer over: fresh hidden layers, a zero output layer, no optimiser state."""
        if self.synthesizer is None or self.synth_optimizer is None:
            return
        reinitialise(self.synthesizer)
        self.synth_optimizer.state.clear()

    def step(self) -> bool:
        """Apply the accumulated gradients with probability ``p_update`` at the scheduled
        learning rate; advance the schedule.

        Returns whether the parameters were updated.
        """
        update = rules.should_update(self.update_generator, self.options.p_update)
        if update:
            set_lr(self.optimizer, self.lr * self.gate)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        self._buffers = None  # the batch is committed
        return update

    def apply_residuals(self) -> None:
        """The corrected rule at a consistent cut (a checkpoint): apply the residual gradients
        accumulated since the last step now, at the scheduled learning rate, rather than with the
        next batch's (which a resumed run would not have). Neither the schedule nor the update
        stream advances."""
        if any(p.grad is not None for p in self.module.parameters()):
            set_lr(self.optimizer, self.lr)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr_scale(self) -> float:
        """The schedule's factor at the current step."""
        return lr_factor(self.options.schedule, self.steps_done, self.options.total_steps, self.options.warmup)

    @property
    def lr(self) -> float:
        """The stage's learning rate at the current step (before the gate)."""
        return self.options.lr * self.lr_scale

    @property
    def gate(self) -> float:
        """The factor of this stage's step: its synthesizer's explained fraction under
        ``gate: fit`` (a stage with a synthesizer), else 1."""
        if self.options.gate == "fit" and self.synthesizer is not None:
            return self.fit.explained
        return 1.0

    # -- synthesizer -----------------------------------------------------------------
    def train_synthesizer(self, h: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> float:
        """One regression step of this stage's synthesizer on (h, target); returns the loss."""
        if self.synthesizer is None or self.synth_optimizer is None:
            raise RuntimeError(f"stage {self.index} has no synthesizer")
        weight = self.options.synth_loss_weight
        loss = rules.synthesizer_loss(self.synthesizer, h, self.context(labels), target, weight=weight)
        value = loss.item()  # read once: each read waits for the device
        self.fit.add(value, rules.zero_prediction_loss(h, target, weight=weight))
        self.synth_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        set_lr(self.synth_optimizer, self.options.synth_lr * self.lr_scale)
        self.synth_optimizer.step()
        return value

    # -- state ------------------------------------------------------------------------
    def train(self, mode: bool = True) -> None:
        self.module.train(mode)
        if self.synthesizer is not None:
            self.synthesizer.train(mode)
        if self.unlock is not None:
            self.unlock.train(mode)
        if self.local_head is not None:
            self.local_head.train(mode)

    def state_dict(self) -> dict:
        """Everything needed to resume this stage exactly (tensors and plain values only)."""
        state = {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "steps_done": self.steps_done,
            "update_generator": self.update_generator.get_state(),
        }
        if self.synthesizer is not None:
            state["synthesizer"] = self.synthesizer.state_dict()
            state["synth_optimizer"] = self.synth_optimizer.state_dict()  # type: ignore[union-attr]
            state["fit"] = self.fit.state_dict()
        if self.unlock is not None:
            state["unlock"] = self.unlock.state_dict()
        if self.local_head is not None:
            state["local_head"] = self.local_head.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`.

        Raises:
            CheckpointError: the state is not one of this stage (another model, or a version of
                dni whose modules had other parameters); the message names the first mismatch.
        """
        try:
            self._load_state(state)
        except (KeyError, RuntimeError, ValueError) as e:
            # torch's message starts "Error(s) in loading state_dict for X:" and names the keys next
            reason = " ".join(line.strip() for line in str(e).strip().splitlines()[:2]) or type(e).__name__
            raise CheckpointError(
                f"stage {self.index}: the checkpoint does not fit this stage ({reason}); it was written for another "
                "model or by another version of dni: resume with that version, or start a new run") from e

    def _load_state(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_done = int(state["steps_done"])
        self.update_generator.set_state(state["update_generator"])
        if self.synthesizer is not None:
            if "synthesizer" not in state:
                raise KeyError("synthesizer")
            self.synthesizer.load_state_dict(state["synthesizer"])
            self.synth_optimizer.load_state_dict(state["synth_optimizer"])  # type: ignore[union-attr]
            if "fit" in state:  # checkpoints before dni.fit start the averages afresh
                self.fit.load_state_dict(state["fit"])
        if self.unlock is not None:
            self.unlock.load_state_dict(state["unlock"])
        if self.local_head is not None:
            self.local_head.load_state_dict(state["local_head"])
