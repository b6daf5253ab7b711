"""Datasets for dni: IDX/MNIST/CIFAR-10 loading, validation splits, batching.

All loaders return in-memory :class:`ArrayDataset` objects (float32 images in
[0, 1], shape (N, C, H, W); int64 labels) and report every problem with the
data as a :class:`DataError` whose message says how to fix it.
"""

from dni.data.cifar import download_cifar10, load_cifar10
from dni.data.dataset import (
    DATASET_NAMES,
    ArrayDataset,
    DataError,
    Splits,
    iterate_batches,
    load_dataset,
    padded_batches,
    split_validation,
)
from dni.data.idx import load_idx_folder, read_idx, write_idx
from dni.data.mnist import load_mnist, obtain_mnist

__all__ = [
    "DATASET_NAMES",
    "ArrayDataset",
    "DataError",
    "Splits",
    "download_cifar10",
    "iterate_batches",
    "load_cifar10",
    "load_dataset",
    "load_idx_folder",
    "load_mnist",
    "obtain_mnist",
    "padded_batches",
    "read_idx",
    "split_validation",
    "write_idx",
]
