"""Loading a dataset by name: the table of loaders and the validation split.

Every loader returns ``(train, test)`` or ``(train, val, test)`` as
:class:`ArrayDataset` objects; :func:`load_dataset` turns that into
:class:`Splits`, holding a validation set out of train when the loader gave none.
This module imports the loaders, and they import only :mod:`dni.data.dataset`,
so there is no import circle.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dni.config import ConfigError
from dni.data.cifar import load_cifar10
from dni.data.copy_task import load_copy
from dni.data.custom import load_custom
from dni.data.dataset import ArrayDataset, DataError, Splits, split_validation
from dni.data.idx import load_idx_folder
from dni.data.mnist import load_mnist
from dni.data.text import load_text

if TYPE_CHECKING:
    from dni.config import DataConfig

Log = Callable[[str], None]


class Loader(Protocol):
    """Loads one named dataset.

    Args:
        path: Folder holding (or to receive) the data (``data.path``).
        download: Obtain the data when it is missing, where the loader can.
        log: Optional progress callback, used while obtaining data.
        factory: ``data.factory`` (only the ``custom`` loader uses it).

    Returns:
        ``(train, test)`` or ``(train, val, test)``.
    """

    def __call__(
        self, path: Path, *, download: bool, log: Log | None, factory: str | None
    ) -> tuple[ArrayDataset, ...]: ...


def _mnist(path: Path, *, download: bool, log: Log | None, factory: str | None) -> tuple[ArrayDataset, ...]:
    """MNIST from (or obtained into) ``path``."""
    return load_mnist(path, download=download, log=log)


def _cifar10(path: Path, *, download: bool, log: Log | None, factory: str | None) -> tuple[ArrayDataset, ...]:
    """CIFAR-10 from (or downloaded into) ``path``."""
    return load_cifar10(path, download=download, log=log)


def _idx(path: Path, *, download: bool, log: Log | None, factory: str | None) -> tuple[ArrayDataset, ...]:
    """The four standard IDX files in ``path``; classes: the largest label plus one."""
    return load_idx_folder(path)


def _custom(path: Path, *, download: bool, log: Log | None, factory: str | None) -> tuple[ArrayDataset, ...]:
    """The datasets that the ``data.factory`` function returns."""
    if not factory:
        raise ConfigError("data.factory: data.name=custom needs a factory, e.g. "
                          "data.factory=path/to/data.py:datasets")
    return load_custom(factory, path)


#: Dataset name (``data.name``) -> its loader.
DATASETS: dict[str, Loader] = {"mnist": _mnist, "cifar10": _cifar10, "idx": _idx, "custom": _custom}

#: Names accepted by :func:`load_dataset` (the same as ``dni.config.DATASETS``): the loaders above,
#: ``text``, which splits one file itself (:mod:`dni.data.text`), and ``copy``, generated (:mod:`dni.data.copy_task`).
DATASET_NAMES: tuple[str, ...] = (*DATASETS, "text", "copy")


def load_dataset(
    name: str,
    path: str | Path,
    *,
    val_size: int,
    seed: int,
    download: bool = True,
    log: Log | None = None,
    factory: str | None = None,
    context: int = 64,
    stride: int | None = None,
) -> Splits:
    """Load a dataset by name and split off a validation set.

    Args:
        name: ``"mnist"``, ``"cifar10"``, ``"idx"`` (a folder holding the
            four standard IDX files, MNIST naming, optionally gzipped; the
            number of classes is the largest label plus one) or ``"custom"``
            (the datasets ``factory`` returns; see :mod:`dni.data.custom`).
        path: Folder holding (or to receive) the data; given to a custom
            factory that has a ``path`` parameter.
        val_size: Training samples held out for validation (0 for none).
            Must be 0 when a custom factory returns its own validation split.
        seed: Seed of the validation split.
        download: Fetch MNIST/CIFAR-10 when absent (ignored for the others).
        log: Optional progress callback, used while obtaining data.
        factory: ``"path/to/file.py:function"`` or ``"package.module:function"``;
            required for ``"custom"``, not allowed otherwise.
        context, stride: ``"text"`` only (``path`` is then one UTF-8 file): characters per window
            and between training windows' starts (see :mod:`dni.data.text`); its validation part is
            the last ``val_size`` windows before the test part, not a random draw.

    Returns:
        The train/val/test splits.

    Raises:
        DataError: unknown name, data missing (and not downloadable) or
            invalid, a bad ``val_size``, or a factory's validation split
            together with ``val_size`` > 0.
        ConfigError: ``factory`` missing for ``"custom"``, given for another
            name, or not importable.
    """
    if name not in DATASET_NAMES:
        raise DataError(
            f"unknown dataset {name!r}: set data.name to one of {', '.join(DATASET_NAMES)}"
        )
    if factory is not None and name != "custom":
        raise ConfigError(f"data.factory: only for data.name=custom (got {name!r}); remove it "
                          "or set data.name=custom")
    if name == "copy":
        raise DataError("data.name=copy is generated from data.length, data.repeats and data.episodes: "
                        "load it with load_splits(cfg.data, seed=...)")
    if name == "text":
        return load_text(Path(path), context=context, stride=stride, val_size=val_size, download=download, log=log)
    parts = DATASETS[name](Path(path), download=download, log=log, factory=factory)
    return _splits(parts, name=name, val_size=val_size, seed=seed)


def load_splits(
    cfg: DataConfig, *, seed: int, download: bool | None = None, log: Log | None = None
) -> Splits:
    """Load the dataset that a config's ``data`` section describes.

    Args:
        cfg: The ``data`` section (name, path, val_size, download, factory; context and stride for text).
        seed: Seed of the validation split (the run's seed).
        download: Overrides ``cfg.download`` when not None.
        log: Optional progress callback, used while obtaining data.

    Returns:
        The train/val/test splits.

    Raises:
        DataError, ConfigError: as :func:`load_dataset`.
    """
    if cfg.name == "copy":
        assert cfg.length is not None  # validated
        return load_copy(length=cfg.length, repeats=cfg.repeats, episodes_train=cfg.episodes, val_size=cfg.val_size,
                         context=cfg.text_context, seed=seed)
    return load_dataset(
        cfg.name,
        cfg.path,
        val_size=cfg.val_size,
        seed=seed,
        download=cfg.download if download is None else download,
        log=log,
        factory=cfg.factory,
        context=cfg.text_context,
        stride=cfg.stride,
    )


def _splits(parts: tuple[ArrayDataset, ...], *, name: str, val_size: int, seed: int) -> Splits:
    """Splits from a loader's ``(train, test)`` or ``(train, val, test)``.

    Raises:
        DataError: a bad ``val_size``, or a validation split of the loader's own
            together with ``val_size`` > 0.
    """
    if len(parts) == 3:
        train, val, test = parts
        if val_size > 0:
            source = "data.factory" if name == "custom" else f"dataset {name!r}"
            raise DataError(
                f"{source} returned its own validation split ({len(val)} examples) but "
                f"data.val_size is {val_size}: set data.val_size=0 to use that split, or "
                f"return only (train, test) to hold {val_size} training examples out"
            )
        return Splits(train=train, val=val, test=test)
    train, test = parts
    train, val = split_validation(train, val_size, seed)
    return Splits(train=train, val=val, test=test)
