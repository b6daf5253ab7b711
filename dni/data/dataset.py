"""In-memory datasets, train/validation splitting and batching.

Everything here works on whole tensors held in memory: the supported
datasets (MNIST, CIFAR-10, small IDX datasets, a custom factory's datasets)
fit easily, and indexing whole tensors is far faster than a per-sample
``Dataset``/``DataLoader`` pipeline. Loading by name lives in
:mod:`dni.data.registry`, so this module imports none of the loaders.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dni.data.spec import DataSpec

if TYPE_CHECKING:
    from dni.data.vocabulary import Vocabulary

#: The integer label of an ignored example or position (padding, unlabelled tokens).
IGNORE_LABEL = -1


class DataError(ValueError):
    """Bad or missing data.

    The message always says what is wrong and how to fix it.
    """


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A labelled dataset held in memory: one input and one label tensor.

    ``eq=False`` because element-wise tensor comparison has no single truth
    value; datasets compare by identity.

    Attributes:
        images: The inputs, shape (N, ...): float32 with at least one
            per-example dimension (the built-in loaders give images
            (N, C, H, W) in [0, 1]; the range is not re-checked here because
            that would scan every value on each construction), or int64
            (e.g. token ids, (N, T)).
        labels: The targets, shape (N, ...): int64 class labels (one per
            example, (N,), or one per position, e.g. (N, T)) with values in
            [0, num_classes) or -1 for ignored; or float32 regression targets.
        num_classes: For int64 labels the number of classes, >= 1; for
            float32 labels the number of target features per example (the
            product of the per-example label shape, 1 for shape (N,)).

    Raises:
        DataError: on construction, if dtypes, shapes, or label range are
            inconsistent.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        _check_images(self.images)
        _check_labels(self.labels)
        if self.images.shape[0] != self.labels.shape[0]:
            raise DataError(
                f"ArrayDataset has {self.images.shape[0]} images but "
                f"{self.labels.shape[0]} labels: pass matching images and labels"
            )
        if self.num_classes < 1:
            raise DataError(
                f"num_classes must be >= 1, got {self.num_classes}: give the number of "
                "classes (int64 labels) or of target features per example (float32 labels)"
            )
        if self.labels.is_floating_point():
            _check_target_features(self.labels, self.num_classes)
        else:
            _check_label_range(self.labels, self.num_classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, e.g. (C, H, W) for images or (T,) for token ids."""
        return tuple(int(d) for d in self.images.shape[1:])

    @property
    def spec(self) -> DataSpec:
        """Per-example shapes and dtypes of inputs and labels, and ``num_classes``."""
        return DataSpec.of(self)

    def to(self, device: torch.device | str) -> ArrayDataset:
        """The same samples on ``device`` (self when already there)."""
        if self.images.device == torch.device(device):
            return self
        return ArrayDataset(self.images.to(device), self.labels.to(device), self.num_classes)

    def subset(self, indices: torch.Tensor) -> ArrayDataset:
        """Return a new dataset holding the samples at ``indices`` (copied).

        Args:
            indices: 1-D int64 tensor of sample indices.
        """
        return ArrayDataset(
            self.images.index_select(0, indices),
            self.labels.index_select(0, indices),
            self.num_classes,
        )


@dataclass(frozen=True)
class Splits:
    """Train, validation and test datasets. ``val`` may be empty."""

    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    vocabulary: "Vocabulary | None" = None
    """Text data: the characters behind the token ids (saved with the run)."""


def describe(value: object) -> str:
    """Short description of a value for error messages."""
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _check_images(images: object) -> None:
    """Raise DataError unless ``images`` is float32 (N, d, ...) or int64 (N, ...)."""
    ok = isinstance(images, torch.Tensor) and (
        (images.dtype == torch.float32 and images.ndim >= 2)
        or (images.dtype == torch.int64 and images.ndim >= 1)
    )
    if not ok:
        raise DataError(
            "ArrayDataset.images must be a float32 tensor of shape (N, ...) with at least "
            "one per-example dimension (e.g. images (N, C, H, W)) or an int64 tensor of "
            f"shape (N, ...) (e.g. token ids (N, T)); got {describe(images)}: convert "
            "uint8 images with images.float().div(255) (add a channel dimension if "
            "needed), other floats with .float(), token ids with .long()"
        )


def _check_labels(labels: object) -> None:
    """Raise DataError unless ``labels`` is int64 or float32 of shape (N, ...)."""
    ok = isinstance(labels, torch.Tensor) and labels.ndim >= 1 and (
        labels.dtype in (torch.int64, torch.float32)
    )
    if not ok:
        raise DataError(
            "ArrayDataset.labels must be an int64 tensor of shape (N,) or (N, ...) (class "
            "labels, -1 = ignored) or a float32 tensor of shape (N, ...) (regression "
            f"targets); got {describe(labels)}: convert class labels with labels.long() "
            "(one label per example: labels.long().flatten()), targets with .float()"
        )


def _check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    """Raise DataError unless every integer label is -1 or in [0, num_classes)."""
    if not labels.numel():
        return
    low, high = int(labels.min()), int(labels.max())
    if low < IGNORE_LABEL or high >= num_classes:
        raise DataError(
            f"labels range over [{low}, {high}] but num_classes is {num_classes}: "
            f"class labels must lie in [0, {num_classes - 1}] (or be {IGNORE_LABEL} for "
            "ignored examples or positions); fix the labels or num_classes"
        )


def _check_target_features(labels: torch.Tensor, num_classes: int) -> None:
    """Raise DataError unless ``num_classes`` is the number of float target features."""
    features = math.prod(labels.shape[1:])
    if features != num_classes:
        raise DataError(
            f"float32 labels are regression targets with {features} features per example "
            f"(shape {tuple(labels.shape[1:])}) but num_classes is {num_classes}: set "
            f"num_classes to {features}, or use int64 labels for classes"
        )


def split_validation(
    train: ArrayDataset, val_size: int, seed: int
) -> tuple[ArrayDataset, ArrayDataset]:
    """Hold out a random validation set from ``train``.

    The split depends only on ``len(train)``, ``val_size`` and ``seed`` (a
    dedicated ``torch.Generator``; the global RNG is untouched), and both
    parts keep the original sample order.

    Args:
        train: The dataset to split.
        val_size: Number of validation samples, 0 <= val_size < len(train).
            0 gives an empty validation set.
        seed: Seed of the permutation.

    Returns:
        ``(train_part, val_part)``, disjoint and together covering ``train``.

    Raises:
        DataError: ``val_size`` is negative or leaves no training samples.
    """
    n = len(train)
    if val_size < 0 or val_size >= n:
        raise DataError(
            f"val_size must be in [0, {n - 1}] for a training set of {n} samples, "
            f"got {val_size}: lower data.val_size (0 disables validation)"
        )
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    # Sorting keeps the original order inside each part, so val_size=0
    # returns the data unchanged and copies read memory sequentially.
    val_idx = perm[:val_size].sort().values
    train_idx = perm[val_size:].sort().values
    return train.subset(train_idx), train.subset(val_idx)


def iterate_batches(
    ds: ArrayDataset,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` mini-batches covering ``ds`` once.

    Args:
        ds: The dataset.
        batch_size: Samples per batch, >= 1.
        shuffle: Visit samples in a random order (one permutation per call).
        generator: RNG for the permutation; ``None`` uses torch's global RNG.
            Ignored when ``shuffle`` is False.
        drop_last: Skip the final batch if it is smaller than ``batch_size``.

    Returns:
        An iterator of batches. Without shuffling the batches are views of
        ``ds`` (no copy); with shuffling they are gathered copies.

    Raises:
        DataError: ``batch_size`` < 1 (raised by the call itself, not lazily
            on the first ``next``).
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}: fix the batch size")
    n = len(ds)
    stop = n - n % batch_size if drop_last else n
    # The permutation is drawn now, so the generator state advances at call
    # time regardless of how far the caller iterates.
    perm = torch.randperm(n, generator=generator) if shuffle else None
    if perm is not None:
        perm = perm.to(ds.images.device)  # drawn on the CPU (generator), used where the data lives
    return _batches(ds, batch_size, stop, perm)


def _batches(
    ds: ArrayDataset, batch_size: int, stop: int, perm: torch.Tensor | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield batches of ``ds`` up to sample ``stop``, in ``perm`` order if given."""
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, stop)
        if perm is None:
            yield ds.images[start:end], ds.labels[start:end]
        else:
            idx = perm[start:end]
            yield ds.images.index_select(0, idx), ds.labels.index_select(0, idx)


def padded_batches(ds: ArrayDataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``ds`` in order, in batches of exactly ``batch_size`` examples.

    The last batch is padded with zero inputs whose labels are all -1 (integer
    labels) or all NaN (float targets), so every batch has the same shape and
    evaluation can leave the padding rows out.

    Args:
        ds: The dataset.
        batch_size: Examples per batch, >= 1.

    Returns:
        An iterator of ``(inputs, labels)`` batches; the unpadded ones are views of ``ds``.

    Raises:
        DataError: ``batch_size`` < 1 (raised by the call itself).
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}: fix the batch size")
    return _padded(ds, batch_size)


def _padded(ds: ArrayDataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of :func:`padded_batches`."""
    fill = float("nan") if ds.labels.is_floating_point() else IGNORE_LABEL
    for start in range(0, len(ds), batch_size):
        x, y = ds.images[start : start + batch_size], ds.labels[start : start + batch_size]
        pad = batch_size - len(y)
        if pad:
            x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
            y = torch.cat([y, y.new_full((pad, *y.shape[1:]), fill)])
        yield x, y
