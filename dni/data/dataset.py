"""In-memory datasets, train/validation splitting, batching and loading.

Everything here works on whole tensors held in memory: the supported
datasets (MNIST, CIFAR-10, small IDX datasets) fit easily, and indexing whole
tensors is far faster than a per-sample ``Dataset``/``DataLoader`` pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

#: Names accepted by :func:`load_dataset`.
DATASET_NAMES: tuple[str, ...] = ("mnist", "cifar10", "idx")


class DataError(ValueError):
    """Bad or missing data.

    The message always says what is wrong and how to fix it.
    """


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A labelled image dataset held in memory.

    ``eq=False`` because element-wise tensor comparison has no single truth
    value; datasets compare by identity.

    Attributes:
        images: float32 tensor of shape (N, C, H, W) with values in [0, 1]
            (the loaders guarantee the range; it is not re-checked here
            because that would scan every pixel on each construction).
        labels: int64 tensor of shape (N,) with values in [0, num_classes).
        num_classes: Number of classes, >= 1.

    Raises:
        DataError: on construction, if dtypes, shapes, or label range are
            inconsistent.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.float32 \
                or self.images.ndim != 4:
            raise DataError(
                "ArrayDataset.images must be a float32 tensor of shape (N, C, H, W); got "
                f"{_describe(self.images)}: convert with images.float().div(255) and add "
                "a channel dimension if needed"
            )
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64 \
                or self.labels.ndim != 1:
            raise DataError(
                "ArrayDataset.labels must be an int64 tensor of shape (N,); got "
                f"{_describe(self.labels)}: convert with labels.long().flatten()"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise DataError(
                f"ArrayDataset has {self.images.shape[0]} images but "
                f"{self.labels.shape[0]} labels: pass matching images and labels"
            )
        if self.num_classes < 1:
            raise DataError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.labels.numel() and (
            int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes
        ):
            raise DataError(
                f"labels range over [{int(self.labels.min())}, {int(self.labels.max())}] "
                f"but num_classes is {self.num_classes}: labels must lie in "
                f"[0, {self.num_classes - 1}]; fix the labels or num_classes"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The (C, H, W) shape of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

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


def _describe(value: object) -> str:
    """Short description of a value for error messages."""
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


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
    """``ds`` in order, in full batches: the last one padded with zero images labelled -1
    (to be ignored), so every batch has the same shape."""
    for start in range(0, len(ds), batch_size):
        x, y = ds.images[start : start + batch_size], ds.labels[start : start + batch_size]
        pad = batch_size - len(y)
        if pad:
            x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
            y = torch.cat([y, y.new_full((pad,), -1)])
        yield x, y


def load_dataset(
    name: str,
    path: str | Path,
    *,
    val_size: int,
    seed: int,
    download: bool = True,
    log: Callable[[str], None] | None = None,
) -> Splits:
    """Load a dataset by name and split off a validation set.

    Args:
        name: ``"mnist"``, ``"cifar10"`` or ``"idx"`` (a folder holding the
            four standard IDX files, MNIST naming, optionally gzipped; the
            number of classes is the largest label plus one).
        path: Folder holding (or to receive) the data.
        val_size: Training samples held out for validation (0 for none).
        seed: Seed of the validation split.
        download: Fetch MNIST/CIFAR-10 when absent (ignored for ``"idx"``).
        log: Optional progress callback, used while obtaining data.

    Returns:
        The train/val/test splits.

    Raises:
        DataError: unknown name, data missing (and not downloadable) or
            invalid, or a bad ``val_size``.
    """
    # Imported here because those modules import DataError/ArrayDataset from
    # this one; importing them at the top would be circular.
    if name == "mnist":
        from dni.data.mnist import load_mnist

        train, test = load_mnist(path, download=download, log=log)
    elif name == "cifar10":
        from dni.data.cifar import load_cifar10

        train, test = load_cifar10(path, download=download, log=log)
    elif name == "idx":
        from dni.data.idx import load_idx_folder

        train, test = load_idx_folder(path)
    else:
        raise DataError(
            f"unknown dataset {name!r}: set data.name to one of {', '.join(DATASET_NAMES)}"
        )
    train, val = split_validation(train, val_size, seed)
    return Splits(train=train, val=val, test=test)
