"""When things happen in a run, and which batch each step trains on: pure functions of the config.

Both the single-process trainer and every distributed worker follow the same
:class:`Schedule` and :class:`EpochBatches`, so they agree without talking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dni.data import ArrayDataset

if TYPE_CHECKING:
    from dni.config import Config


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffle stream of one epoch: a pure function of (seed, epoch), so a resumed
    run, or another process, replays the same order without sharing state."""
    return torch.Generator().manual_seed(seed * 7919 + epoch)


class EpochBatches:
    """Random access to the training batch of any global step.

    Step g is batch g % steps_per_epoch of epoch g // steps_per_epoch, whose order is a
    permutation drawn from :func:`epoch_generator`; the last partial batch is dropped
    (a tiny batch would give BatchNorm noisy statistics).
    """

    def __init__(self, data: ArrayDataset, batch_size: int, seed: int) -> None:
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.steps_per_epoch = len(data) // batch_size
        self._perm: tuple[int, torch.Tensor] | None = None

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, j = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            perm = torch.randperm(len(self.data), generator=epoch_generator(self.seed, epoch))
            self._perm = (epoch, perm.to(self.data.images.device))
        idx = self._perm[1][j * self.batch_size : (j + 1) * self.batch_size]
        return self.data.images.index_select(0, idx), self.data.labels.index_select(0, idx)


def stream_order(count: int, streams: int) -> torch.Tensor:
    """The order in which to read ``count`` consecutive windows as ``streams`` parallel streams: stream b
    is windows ``b * L .. (b + 1) * L - 1`` (L = count // streams; the last ``count % streams`` are left
    out), and batch j of ``streams`` rows holds window j of every stream."""
    length = count // streams
    return (torch.arange(length)[:, None] + torch.arange(streams)[None, :] * length).flatten()


class StreamBatches:
    """The training batch of any global step for truncated BPTT: step g reads segment
    ``g % steps_per_epoch`` of every stream (:func:`stream_order`), the same order every epoch."""

    def __init__(self, data: ArrayDataset, batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size
        self.steps_per_epoch = len(data) // batch_size
        self.order = stream_order(len(data), batch_size).to(data.images.device)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = step % self.steps_per_epoch
        idx = self.order[j * self.batch_size : (j + 1) * self.batch_size]
        return self.data.images.index_select(0, idx), self.data.labels.index_select(0, idx)


def stream_batches(data: ArrayDataset, streams: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every segment of ``data`` read as ``streams`` parallel streams (fewer if it has fewer windows), in order:
    the evaluation batches of a recurrent model."""
    streams = max(min(streams, len(data)), 1)
    batches = StreamBatches(data, streams)
    return [batches(j) for j in range(batches.steps_per_epoch)] if len(data) else []


@dataclass(frozen=True)
class Schedule:
    """When the periodic actions happen, in global steps (0-based)."""

    total_steps: int
    steps_per_epoch: int
    true_every: int = 0
    measure_every: int = 0
    replica_every: int = 0
    checkpoint_every: int = 0
    eval_every_epochs: int = 1
    eval_every_steps: int = 0
    log_every: int = 50

    @classmethod
    def of(cls, cfg: "Config", total_steps: int, steps_per_epoch: int) -> "Schedule":
        """The schedule of ``cfg`` for a budget of ``total_steps``."""
        return cls(
            total_steps=total_steps, steps_per_epoch=steps_per_epoch, true_every=cfg.sync.true_every,
            measure_every=cfg.log.grad_every, replica_every=cfg.sync.replica_every,
            checkpoint_every=cfg.checkpoint.every, eval_every_epochs=cfg.train.eval_every,
            eval_every_steps=cfg.train.eval_steps, log_every=cfg.log.every,
        )

    def true_round(self, step: int) -> str | None:
        """Level 2: the last step of every ``true_every`` gets a training true-gradient round
        (``"train"``), the last of every ``measure_every`` (``log.grad_every``) a measuring one
        (``"measure"``); None for other steps. Numbered from 1, so the last step can be one."""
        if self.true_every > 0 and (step + 1) % self.true_every == 0:
            return "train"
        if self.measure_every > 0 and (step + 1) % self.measure_every == 0:
            return "measure"
        return None

    def is_true_round(self, step: int) -> bool:
        """Whether ``step`` has a true-gradient round of either kind."""
        return self.true_round(step) is not None

    def reports_after(self, step: int) -> bool:
        """Training scalars are logged after every ``log_every`` steps and the last."""
        return (step + 1) % self.log_every == 0 or step + 1 == self.total_steps

    def syncs_replicas_after(self, step: int) -> bool:
        return self.replica_every > 0 and (step + 1) % self.replica_every == 0

    def evaluates_after(self, step: int) -> bool:
        last = step + 1 == self.total_steps
        epoch_end = (step + 1) % self.steps_per_epoch == 0
        if self.eval_every_steps and (step + 1) % self.eval_every_steps == 0:
            return True
        return last or (epoch_end and ((step + 1) // self.steps_per_epoch) % self.eval_every_epochs == 0)

    def checkpoints_after(self, step: int) -> bool:
        last = step + 1 == self.total_steps
        return last or (self.checkpoint_every > 0 and (step + 1) % self.checkpoint_every == 0)
