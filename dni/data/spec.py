"""What a model and its synthesizers need to know of the data: shapes and types per example."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dni.data.dataset import ArrayDataset


@dataclass(frozen=True)
class DataSpec:
    """Per-example input and label shapes and dtypes, and the number of classes.

    For float targets (regression), ``num_classes`` is the number of target features.
    """

    in_shape: tuple[int, ...]
    num_classes: int
    in_dtype: torch.dtype = torch.float32
    label_shape: tuple[int, ...] = ()
    label_dtype: torch.dtype = torch.int64

    @classmethod
    def of(cls, ds: "ArrayDataset") -> "DataSpec":
        return cls(tuple(int(d) for d in ds.images.shape[1:]), ds.num_classes, ds.images.dtype,
                   tuple(int(d) for d in ds.labels.shape[1:]), ds.labels.dtype)

    @property
    def integer_labels(self) -> bool:
        """Class labels (one-hot as cDNI context, accuracy measured), not float targets."""
        return not self.label_dtype.is_floating_point

    @property
    def labels_per_example(self) -> int:
        """How many label values one example has (1 for one class label per example)."""
        return math.prod(self.label_shape)

    @property
    def context_size(self) -> int:
        """Features of one example's flattened cDNI context: one-hot per label, or the float targets."""
        return self.labels_per_example * (self.num_classes if self.integer_labels else 1)
