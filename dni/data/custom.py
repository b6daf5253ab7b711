"""Datasets from the user's own code: ``data.name: custom`` with ``data.factory``.

The factory, ``"path/to/file.py:function"`` or ``"package.module:function"``, is
called with no arguments, or as ``function(path=data.path)`` (a ``str``) when it
has a parameter named ``path``. It returns ``(train, test)`` or
``(train, val, test)``: map-style datasets (``__len__`` and ``__getitem__``, e.g.
``torch.utils.data.TensorDataset``) whose items are ``(input, label)`` pairs, or
ready :class:`~dni.data.dataset.ArrayDataset` objects. Each split is read into
memory once and becomes an ``ArrayDataset``:

* Inputs are stacked and used as given, never rescaled or normalised: floating
  point becomes float32; uint8 and bool become float32 with the same values (so
  uint8 images stay in 0..255: divide by 255 in the factory for [0, 1]); other
  integer types become int64 (e.g. token ids).
* Labels: integers (python ints, integer tensors of any shape, e.g. one label per
  token) become int64 class labels (-1 = ignored); floats become float32
  regression targets.
* ``num_classes``: for integer labels, the largest label over all splits plus
  one, unless the train dataset has an attribute ``num_classes``, which then
  wins (use it when the largest class is absent from the data); for float
  labels, the number of target features per example.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from dni.config import ConfigError
from dni.data.dataset import ArrayDataset, DataError, describe
from dni.imports import import_object

KEY = "data.factory"
_RETURNS = "(train, test) or (train, val, test), each a torch.utils.data.Dataset of (input, label) pairs"
_SPLIT_NAMES: dict[int, tuple[str, ...]] = {2: ("train", "test"), 3: ("train", "val", "test")}

Arrays = tuple[torch.Tensor, torch.Tensor]  # (inputs (N, ...), labels (N, ...)) of one split


def load_custom(factory: str, path: str | Path) -> tuple[ArrayDataset, ...]:
    """Call the ``data.factory`` function and read its datasets into memory.

    Args:
        factory: ``"path/to/file.py:function"`` or ``"package.module:function"``.
        path: ``data.path``, passed as ``path=str(path)`` when the function has a
            parameter named ``path``.

    Returns:
        ``(train, test)`` or ``(train, val, test)`` as the function returned them,
        as ArrayDatasets sharing one ``num_classes`` (see the module docstring).

    Raises:
        ConfigError: the spec cannot be imported or names no function.
        DataError: the function raised, returned something other than 2 or 3
            datasets, an empty train split, items that are not (input, label)
            pairs, inconsistent shapes or types, or labels out of range.
    """
    fn = import_object(factory, KEY)
    parts = _check_returned(_call(fn, factory, path), factory)
    names = _SPLIT_NAMES[len(parts)]
    arrays = [_read_split(part, name, factory) for part, name in zip(parts, names)]
    train = arrays[0]
    if train is None or len(train[1]) == 0:
        raise DataError(f"{_prefix(factory)}the train split is empty: return a train dataset "
                        "with at least one example")
    filled = [train] + [_like_train(a, train) for a in arrays[1:]]
    for name, split in zip(names[1:], filled[1:]):
        _check_like_train(split, train, name, factory)
    num_classes = _num_classes(parts[0], [labels for _, labels in filled], factory)
    return tuple(_dataset(split, num_classes, name, factory) for split, name in zip(filled, names))


def _prefix(factory: str) -> str:
    """The start of every error message: which config key and value it is about."""
    return f"{KEY} {factory!r}: "


def _what(value: object) -> str:
    """Describe a returned value for error messages: type, and length of a tuple or list."""
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, torch.Tensor):
        return f"a {describe(value)}"
    return f"an object of type {type(value).__name__}"


def _takes_path(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` has a parameter named ``path`` that can be passed by keyword."""
    try:
        parameter = inspect.signature(fn).parameters.get("path")
    except (TypeError, ValueError):  # no signature (some builtins): call without arguments
        return False
    return parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    )


def _call(fn: object, factory: str, path: str | Path) -> object:
    """Call the factory function, turning any exception it raises into a DataError.

    Raises:
        ConfigError: ``fn`` is not callable.
        DataError: the call raised.
    """
    if not callable(fn):
        raise ConfigError(f"{KEY}: {factory!r} names {_what(fn)}, not a function: "
                          f"point it at a function returning {_RETURNS}")
    kwargs = {"path": str(path)} if _takes_path(fn) else {}
    try:
        return fn(**kwargs)
    except Exception as exc:
        call = f"path={str(path)!r}" if kwargs else ""
        raise DataError(
            f"{_prefix(factory)}the function raised {type(exc).__name__}: {exc} (it was called "
            f"as {getattr(fn, '__name__', 'factory')}({call})); fix the function"
        ) from exc


def _check_returned(parts: object, factory: str) -> Sequence[Any]:
    """Check that the factory returned 2 or 3 map-style datasets.

    Raises:
        DataError: another number of items, a tensor, or a non-dataset among them.
    """
    if not isinstance(parts, (tuple, list)) or len(parts) not in _SPLIT_NAMES:
        raise DataError(f"{_prefix(factory)}the function returned {_what(parts)}: return {_RETURNS}")
    for name, part in zip(_SPLIT_NAMES[len(parts)], parts):
        if isinstance(part, torch.Tensor):
            raise DataError(
                f"{_prefix(factory)}the {name} split is a tensor, not a dataset: return "
                "torch.utils.data.TensorDataset(inputs, labels) for each split"
            )
        if not isinstance(part, ArrayDataset) and not (
            hasattr(part, "__len__") and hasattr(part, "__getitem__")
        ):
            raise DataError(
                f"{_prefix(factory)}the {name} split ({type(part).__name__}) is not a map-style "
                "dataset: return datasets with __len__ and __getitem__ (e.g. TensorDataset)"
            )
    return parts


def _read_split(ds: Any, split: str, factory: str) -> Arrays | None:
    """The inputs and labels of one split, converted; None for an empty generic dataset."""
    if isinstance(ds, ArrayDataset):
        return ds.images, ds.labels
    if isinstance(ds, TensorDataset) and len(ds.tensors) == 2:
        # Fast path: the tensors are already stacked.
        inputs, labels = ds.tensors
        return _input_dtype(inputs.detach()), _label_dtype(labels.detach())
    n = _length(ds, split, factory)
    if n == 0:
        return None
    return _stack([_item(ds, i, split, factory) for i in range(n)], split, factory)


def _length(ds: Any, split: str, factory: str) -> int:
    """``len(ds)``, its failure a DataError."""
    try:
        return len(ds)
    except Exception as exc:
        raise DataError(f"{_prefix(factory)}len() of the {split} split raised "
                        f"{type(exc).__name__}: {exc}; fix the dataset's __len__") from exc


def _item(ds: Any, index: int, split: str, factory: str) -> Arrays:
    """Example ``index`` of ``ds`` as converted (input, label) tensors.

    Raises:
        DataError: reading it raised, or it is not an (input, label) pair of tensor-likes.
    """
    try:
        item = ds[index]
    except Exception as exc:
        raise DataError(f"{_prefix(factory)}reading {split} item {index} raised "
                        f"{type(exc).__name__}: {exc}; fix the dataset's __getitem__") from exc
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise DataError(f"{_prefix(factory)}{split} item {index} is {_what(item)}, not an "
                        "(input, label) pair: make __getitem__ return (input, label)")
    where = f"{split} item {index}"
    inputs = _as_tensor(item[0], f"the input of {where}", factory)
    labels = _as_tensor(item[1], f"the label of {where}", factory)
    return _input_dtype(inputs), _label_dtype(labels)


def _as_tensor(value: object, what: str, factory: str) -> torch.Tensor:
    """``value`` (tensor, numpy array, number or nested list) as a tensor.

    Raises:
        DataError: it cannot be converted.
    """
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(value)
    except Exception as exc:
        raise DataError(
            f"{_prefix(factory)}cannot convert {what} ({type(value).__name__}) to a tensor "
            f"({exc}): return tensors, numpy arrays or numbers (for torchvision datasets "
            "pass transform=torchvision.transforms.ToTensor())"
        ) from None


def _input_dtype(inputs: torch.Tensor) -> torch.Tensor:
    """float32 for floating, uint8 and bool inputs (values unchanged), int64 for other integers."""
    if inputs.is_complex():
        return inputs  # rejected by ArrayDataset, with a conversion hint
    if inputs.is_floating_point() or inputs.dtype in (torch.uint8, torch.bool):
        return inputs.float()
    return inputs.long()


def _label_dtype(labels: torch.Tensor) -> torch.Tensor:
    """float32 regression targets for floating labels, int64 class labels for integers."""
    if labels.is_complex():
        return labels  # rejected by ArrayDataset, with a conversion hint
    return labels.float() if labels.is_floating_point() else labels.long()


def _stack(items: list[Arrays], split: str, factory: str) -> Arrays:
    """Stack per-example tensors into (N, ...) tensors.

    Raises:
        DataError: an item's input or label differs in shape or type from item 0's.
    """
    first = items[0]
    for index, item in enumerate(items):
        for kind, value, reference in zip(("input", "label"), item, first):
            if value.shape != reference.shape or value.dtype != reference.dtype:
                raise DataError(
                    f"{_prefix(factory)}{split} item {index} has {kind} {describe(value)} but "
                    f"item 0 has {describe(reference)}: every example needs the same {kind} "
                    "shape and type (pad or crop in the dataset)"
                )
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def _like_train(split: Arrays | None, train: Arrays) -> Arrays:
    """``split``, or an empty split shaped like ``train`` when it is None."""
    if split is not None:
        return split
    inputs, labels = train
    return inputs.new_zeros(0, *inputs.shape[1:]), labels.new_zeros(0, *labels.shape[1:])


def _check_like_train(split: Arrays, train: Arrays, name: str, factory: str) -> None:
    """Raise DataError unless ``split`` holds examples of the same shapes and types as train."""
    for kind, value, reference in zip(("inputs", "labels"), split, train):
        if value.shape[1:] != reference.shape[1:] or value.dtype != reference.dtype:
            raise DataError(
                f"{_prefix(factory)}{name} {kind} are {value.dtype} of shape "
                f"{tuple(value.shape[1:])} per example but train {kind} are {reference.dtype} "
                f"of shape {tuple(reference.shape[1:])}: all splits must hold the same kind "
                "of examples"
            )


def _num_classes(train_ds: object, labels: list[torch.Tensor], factory: str) -> int:
    """The train dataset's ``num_classes`` attribute, else inferred from the labels.

    Raises:
        DataError: the attribute is not a positive int, or every integer label is -1.
    """
    override = getattr(train_ds, "num_classes", None)
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, int) or override < 1:
            raise DataError(f"{_prefix(factory)}the train dataset's num_classes attribute is "
                            f"{override!r}: make it a positive int, or remove it to infer it")
        return override
    if labels[0].is_floating_point():
        return math.prod(labels[0].shape[1:])  # target features per example
    high = max(int(y.max()) for y in labels if y.numel())
    if high < 0:
        raise DataError(f"{_prefix(factory)}every label is -1 (ignored): give real class labels "
                        "(0, 1, ...) or a num_classes attribute on the train dataset")
    return high + 1


def _dataset(split: Arrays, num_classes: int, name: str, factory: str) -> ArrayDataset:
    """An ArrayDataset of ``split``, its errors naming the factory and split."""
    try:
        return ArrayDataset(split[0], split[1], num_classes)
    except DataError as exc:
        raise DataError(f"{_prefix(factory)}{name} split: {exc}") from None
