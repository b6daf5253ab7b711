"""Recurrent networks decoupled in time: truncated BPTT, with a synthesizer at each segment boundary.

An LSTM language model reads its training text as ``batch_size`` parallel streams, one segment
of ``model.bptt`` tokens per step, its state carried from segment to segment (and reset at the
start of each epoch). Plain truncated BPTT (``method: backprop``) detaches the state at the
boundary: the segment learns nothing of what its state does to later segments. With
``method: dni`` (paper section 3.2, figure 4) the stage's synthesizer predicts the gradient the
future would send into the state at the end of the segment, g^ = M(s_T), and the segment
backpropagates its loss and g^ together, so it learns from beyond its window. The gradient that
reaches the segment's initial state, dL/ds_0 (its own loss plus the bootstrapped g^ at its end),
is the target of the previous boundary's prediction M(s_0): the same bootstrapped target that a
layer-decoupled stage gets from the stage above (:mod:`dni.rules`), here from the next segment.
With ``synthesizer.discount`` gamma < 1 the segment backpropagates gamma g^ instead, so M predicts
the gradient of the discounted future (TD learning's discount).

The one stage is a :class:`~dni.stage.DecoupledStage` (its optimisers, schedule, stochastic
updates, fit gate and checkpoints are the layer-decoupled stages'); :class:`RecurrentPipeline`
takes the place of :class:`~dni.pipeline.Pipeline` for it.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from dni import rules
from dni.evaluation import EvalSums
from dni.pipeline import StepResult
from dni.stage import DecoupledStage, NonFiniteError, check_finite

State = tuple[torch.Tensor, torch.Tensor]
"""An LSTM's (h, c), each (layers, B, width)."""


class LSTMLanguageModel(nn.Module):
    """Token ids (B, T) and a state to next-token logits (B, T, vocab) and the state after the segment."""

    def __init__(self, vocab: int, *, width: int, depth: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, width, num_layers=depth, batch_first=True)
        self.head = nn.Linear(width, vocab)

    @property
    def state_features(self) -> int:
        """Per-example size of the flattened state: h and c of every layer."""
        return 2 * self.lstm.num_layers * self.lstm.hidden_size

    def initial_state(self, batch: int, device: torch.device) -> State:
        shape = (self.lstm.num_layers, batch, self.lstm.hidden_size)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        out, (h, c) = self.lstm(self.embed(ids), state)
        return self.head(out), (h, c)


def flatten_state(state: State) -> torch.Tensor:
    """(h, c) as one (B, 2 * layers * width) tensor, per example (what the synthesizer sees)."""
    h, c = state
    return torch.cat([h, c], 0).permute(1, 0, 2).reshape(h.shape[1], -1)


def unflatten_state(flat: torch.Tensor, layers: int) -> State:
    """The inverse of :func:`flatten_state`."""
    b = flat.shape[0]
    both = flat.reshape(b, 2 * layers, -1).permute(1, 0, 2).contiguous()
    return both[:layers], both[layers:]


class RecurrentPipeline:
    """Truncated BPTT of one recurrent stage over parallel streams, optionally with a synthesizer at
    each segment boundary (see the module docstring).

    Args:
        stage: the stage; its module is an :class:`LSTMLanguageModel`, its synthesizer (or None for
            plain truncated BPTT) models the flattened state.
        steps_per_epoch: segments per stream per epoch; the state restarts at zero when an epoch starts.
        discount: gamma, the weight of g^ at the end of a segment, in the update and in the target it
            bootstraps (``synthesizer.discount``; 1: the paper's).
    """

    def __init__(self, stage: DecoupledStage, *, steps_per_epoch: int, discount: float = 1.0) -> None:
        if not isinstance(stage.module, LSTMLanguageModel):
            raise ValueError("a recurrent pipeline's stage is an LSTMLanguageModel")
        self.stages = [stage]
        self.model: LSTMLanguageModel = stage.module
        self.steps_per_epoch, self.discount = steps_per_epoch, discount
        self.delay = 0
        self._state: State | None = None  # carried into the next segment (detached)
        self._boundary: torch.Tensor | None = None  # the flattened state the last g^ was made for

    @property
    def decoupled(self) -> bool:
        return self.stages[0].synthesizer is not None

    def train(self, mode: bool = True) -> None:
        self.stages[0].train(mode)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, *, true_round: str | None = None) -> StepResult:
        """One segment of every stream: tokens ``x`` (B, T), next tokens ``y`` (B, T). On a ``"measure"``
        round the previous boundary's g^ is compared with the target it is trained on (the next
        segment's bootstrapped gradient): ``sg/cosine/stage_0`` and ``sg/rel_error/stage_0``.

        Raises:
            NonFiniteError: a NaN/inf in the loss, g^ or the gradient target (nothing updated).
            ValueError: a ``"train"`` round (the future's true gradient is never computed).
        """
        if true_round not in (None, "measure"):
            raise ValueError("truncated BPTT has no true-gradient training rounds: the future segments' "
                             "gradient is never computed")
        stage = self.stages[0]
        if stage.steps_done % self.steps_per_epoch == 0:  # a new epoch: the streams start over
            self._state, self._boundary = None, None
        start = self._state if self._state is not None else self.model.initial_state(x.shape[0], x.device)
        s0 = flatten_state(start).requires_grad_(self._boundary is not None)
        logits, end = self.model(x, unflatten_state(s0, self.model.lstm.num_layers))
        loss = stage.loss_fn(logits, y)
        self._finite(loss, "loss")
        outputs, grads = [loss], [torch.ones_like(loss)]
        s_end = flatten_state(end)
        if stage.synthesizer is not None:
            synthetic = self._finite(rules.synthetic_gradient(stage.synthesizer, s_end, None), "synthetic gradient")
            outputs.append(s_end)
            grads.append(self.discount * synthetic)
        torch.autograd.backward(outputs, grads)
        result = StepResult(loss=loss.item(), updated=[False])
        if self._boundary is not None and stage.synthesizer is not None:
            assert s0.grad is not None
            target = self._finite(s0.grad.detach(), "gradient target")
            if true_round == "measure":
                result.scalars.update(self._agreement(stage, target))
            result.synth_losses[0] = stage.train_synthesizer(self._boundary, y, target)
        result.updated[0] = stage.step()
        self._state = (end[0].detach(), end[1].detach())
        self._boundary = s_end.detach() if stage.synthesizer is not None else None
        return result

    def _agreement(self, stage: DecoupledStage, target: torch.Tensor) -> dict[str, float]:
        """Cosine and relative error of the previous boundary's g^ against the target it is trained on:
        what ``sg/cosine/stage_0`` means for a recurrent stage."""
        assert self._boundary is not None and stage.synthesizer is not None
        synthetic = rules.synthetic_gradient(stage.synthesizer, self._boundary, None)
        cosine, rel = rules.gradient_agreement(synthetic, target)
        return {"sg/cosine/stage_0": cosine, "sg/rel_error/stage_0": rel}

    def _finite(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """:func:`~dni.stage.check_finite`, and on a fault the streams start over (the carried state
        may hold the fault)."""
        try:
            return check_finite(t, self.stages[0], what)
        except NonFiniteError:
            self._state, self._boundary = None, None
            raise

    def flush(self) -> None:
        """Nothing is owed: each segment's update is applied in its step."""

    @property
    def owed(self) -> int:
        return 0

    def carried_state(self) -> dict[str, torch.Tensor]:
        """The state carried into the next segment and the boundary of the pending g^ (checkpoints)."""
        out: dict[str, torch.Tensor] = {}
        if self._state is not None:
            out["h"], out["c"] = self._state
        if self._boundary is not None:
            out["boundary"] = self._boundary
        return out

    def load_carried_state(self, state: dict[str, torch.Tensor]) -> None:
        self._state = (state["h"], state["c"]) if "h" in state else None
        self._boundary = state.get("boundary")

    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Loss and accuracy over consecutive segments of parallel streams (``batches`` in stream
        order, see :func:`dni.schedule.stream_order`), the state carried from batch to batch and
        started at zero; training mode and the carried training state are left as they were."""
        self.train(False)
        sums = EvalSums(self.stages[0].loss_fn)
        state: State | None = None
        try:
            for x, y in batches:
                logits, state = self.model(x, state)
                sums.add(logits, y)
        finally:
            self.train(True)
        return sums.result()

