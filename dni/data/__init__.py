"""Datasets for dni: IDX/MNIST/CIFAR-10 and custom loading, validation splits, batching.

All loaders return in-memory :class:`ArrayDataset` objects (the built-in ones:
float32 images in [0, 1], shape (N, C, H, W), and int64 labels; a custom
factory's datasets may hold other shapes, int64 inputs or float targets) and
report every problem with the data as a :class:`DataError` whose message says
how to fix it. :func:`load_dataset` and :func:`load_splits` load by name
(:mod:`dni.data.registry`).
"""

from dni.data.cifar import download_cifar10, load_cifar10
from dni.data.custom import load_custom
from dni.data.dataset import (
    ArrayDataset,
    DataError,
    Splits,
    iterate_batches,
    padded_batches,
    split_validation,
)
from dni.data.idx import load_idx_folder, read_idx, write_idx
from dni.data.mnist import load_mnist, obtain_mnist
from dni.data.registry import DATASET_NAMES, load_dataset, load_splits

__all__ = [
    "DATASET_NAMES",
    "ArrayDataset",
    "DataError",
    "Splits",
    "download_cifar10",
    "iterate_batches",
    "load_cifar10",
    "load_custom",
    "load_dataset",
    "load_idx_folder",
    "load_mnist",
    "load_splits",
    "obtain_mnist",
    "padded_batches",
    "read_idx",
    "split_validation",
    "write_idx",
]
