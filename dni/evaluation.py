"""Evaluation sums: the loss and accuracy of a pass over a split, however it is batched.

The single-process trainer and the last stage worker of the runtime feed batches of
(output, labels) into the same :class:`EvalSums`. Batches may be padded to a fixed
size (the runtime's messages have one shape): a padding row has every label -1
(integer labels) or NaN (float targets) and is left out.
"""

from __future__ import annotations

import torch

from dni.losses import IGNORE, LossFn


def valid_rows(labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the rows of ``labels`` that are not padding."""
    flat = labels.reshape(labels.shape[0], -1)
    if labels.is_floating_point():
        return ~torch.isnan(flat).all(1)
    return (flat != IGNORE).any(1)


class EvalSums:
    """Running sums of one evaluation pass.

    Args:
        loss_fn: the run's loss, a batch mean; the pass's loss is the mean over its examples (over
            the labelled positions, for class labels per position).
    """

    def __init__(self, loss_fn: LossFn) -> None:
        self.loss_fn = loss_fn
        self.loss_sum = 0.0
        self.weight = 0  # what the loss is averaged over: examples, or labelled positions (per-token labels)
        self.correct = 0
        self.labelled = 0  # integer labels other than -1: what accuracy is over

    def add(self, output: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: ``output`` of the last stage and its labels (padding rows are skipped)."""
        keep = valid_rows(labels)
        if not bool(keep.all()):
            output, labels = output[keep], labels[keep]
        n = int(labels.shape[0])
        if n == 0:
            return
        weight = n  # the loss is a mean over examples, or over the labelled positions of class labels
        if not labels.is_floating_point() and output.dim() == labels.dim() + 1:
            mask = labels != IGNORE
            weight = int(mask.sum().item())
            self.correct += int((output.argmax(-1) == labels)[mask].sum().item())
            self.labelled += weight
        self.loss_sum += float(self.loss_fn(output, labels).item()) * weight
        self.weight += weight

    def result(self) -> dict[str, float]:
        """``{"loss": ..., "accuracy": ...}``; accuracy only for class labels; empty for no examples."""
        if self.weight == 0:
            return {}
        out = {"loss": self.loss_sum / self.weight}
        if self.labelled:
            out["accuracy"] = self.correct / self.labelled
        return out
