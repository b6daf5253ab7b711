"""Loading CIFAR-10 from its standard "python version" batches.

Layout: ``cifar-10-batches-py/data_batch_1`` .. ``data_batch_5`` and
``test_batch`` (or those six files directly in the data folder). Each batch is
a pickled dict with ``b"data"``, a uint8 array of shape (N, 3072) holding the
red, green and blue 32x32 planes of each image, and ``b"labels"``, a list of N
ints in 0..9.
"""

from __future__ import annotations

import codecs
import hashlib
import http.client
import importlib
import pickle
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dni.data.dataset import ArrayDataset, DataError

Log = Callable[[str], None]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# Published checksum of the archive (the one torchvision checks too).
_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
_MAX_ARCHIVE_BYTES = 256 * 2**20  # the archive is ~163 MiB
_BATCH_DIR = "cifar-10-batches-py"
_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILE = "test_batch"
_NUM_CLASSES = 10
_SIDE = 32
_CHANNELS = 3


def _numpy_helper(name: str, modules: tuple[str, ...]) -> Callable[..., Any]:
    """Return numpy's private pickling helper ``name`` from the first module
    of ``modules`` that has it (numpy 2 moved ``numpy.core`` to ``numpy._core``).

    Raises:
        ImportError: no module provides it.
    """
    for module in modules:
        try:
            helper: Callable[..., Any] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        return helper
    raise ImportError(f"numpy provides no {name} in {', '.join(modules)}")


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a batch of numpy arrays needs.

    Plain ``pickle.load`` would import and call anything a file names, so a
    crafted batch could run arbitrary code. Allowing only numpy's array
    reconstruction helpers (under their numpy 1 and numpy 2 module names) and
    ``_codecs.encode`` (which protocol-2 pickles use for bytes) shuts that door
    for the standard files while still reading them unchanged.
    """

    def find_class(self, module: str, name: str) -> Any:
        reconstruct = _numpy_helper(
            "_reconstruct", ("numpy._core.multiarray", "numpy.core.multiarray")
        )
        frombuffer = _numpy_helper("_frombuffer", ("numpy._core.numeric", "numpy.core.numeric"))
        allowed: dict[tuple[str, str], Any] = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy.core.numeric", "_frombuffer"): frombuffer,
            ("numpy._core.numeric", "_frombuffer"): frombuffer,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): codecs.encode,
        }
        try:
            return allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in a CIFAR batch"
            ) from None


def _fix_hint(folder: Path) -> str:
    """How to provide CIFAR-10 by hand."""
    return (
        f"download {CIFAR10_URL}, extract it so that {folder / _BATCH_DIR} holds "
        f"{', '.join(_TRAIN_FILES)} and {_TEST_FILE}, or set data.path to a folder "
        "that holds them"
    )


def find_batch_dir(folder: str | Path) -> Path | None:
    """Return the folder holding all six batch files, or None.

    Looks in ``folder/cifar-10-batches-py`` first, then in ``folder`` itself.
    """
    folder = Path(folder)
    for candidate in (folder / _BATCH_DIR, folder):
        if all((candidate / name).is_file() for name in (*_TRAIN_FILES, _TEST_FILE)):
            return candidate
    return None


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one CIFAR-10 batch file.

    Security: the file is a pickle, a format that can execute code on load.
    It is read with a restricted unpickler that refuses every global except
    numpy's array helpers, but only load batches from a trusted source (the
    official archive, whose checksum :func:`download_cifar10` verifies).

    Returns:
        ``(images, labels)``: uint8 (N, 3, 32, 32) and int64 (N,).

    Raises:
        DataError: unreadable, not a valid pickle, or not a CIFAR-10 batch.
    """
    fix = f"delete {path} and extract it again from {CIFAR10_URL}"
    try:
        with path.open("rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise DataError(f"cannot read CIFAR-10 batch {path} ({exc}): {fix}") from None
    except Exception as exc:
        # A damaged pickle can fail with almost any exception type
        # (UnpicklingError, EOFError, ValueError, TypeError, ...).
        raise DataError(
            f"CIFAR-10 batch {path} is corrupted or not a pickle "
            f"({type(exc).__name__}: {exc}): {fix}"
        ) from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(
            f"{path} is not a CIFAR-10 batch (expected a dict with b'data' and "
            f"b'labels'): {fix}"
        )
    data, raw_labels = batch[b"data"], batch[b"labels"]
    row = _CHANNELS * _SIDE * _SIDE
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != row:
        shape = getattr(data, "shape", None)
        raise DataError(
            f"{path}: b'data' must be a uint8 array of shape (N, {row}), got "
            f"{type(data).__name__} {getattr(data, 'dtype', '')} {shape}: {fix}"
        )
    try:
        labels = np.asarray(raw_labels)
    except (TypeError, ValueError):
        labels = np.asarray([], dtype=np.float64)  # rejected just below
    if labels.dtype.kind not in "iu" or labels.shape != (data.shape[0],) or (
        labels.size and (labels.min() < 0 or labels.max() >= _NUM_CLASSES)
    ):
        raise DataError(
            f"{path}: b'labels' must be {data.shape[0]} ints in 0..{_NUM_CLASSES - 1}: {fix}"
        )
    images = data.reshape(-1, _CHANNELS, _SIDE, _SIDE)
    return images, labels.astype(np.int64)


def _to_dataset(parts: list[tuple[np.ndarray, np.ndarray]]) -> ArrayDataset:
    """Concatenate batches into an ArrayDataset with images scaled to [0, 1]."""
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ArrayDataset(
        torch.from_numpy(images).float().div_(255.0),
        torch.from_numpy(labels),
        _NUM_CLASSES,
    )


def download_cifar10(
    path: str | Path, *, log: Log | None = None, timeout: float = 30.0
) -> Path:
    """Download the official archive and extract the batches into ``path``.

    The archive's MD5 is checked before extraction, and only the expected
    batch files are extracted (with tarfile's ``data`` filter where
    available), so a hostile archive cannot write elsewhere.

    Args:
        path: Destination folder; ``path/cifar-10-batches-py`` is created.
        log: Optional progress callback.
        timeout: Seconds allowed per network operation.

    Returns:
        The folder holding the batch files.

    Raises:
        DataError: download, checksum or extraction failed.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".cifar-download-", dir=folder) as tmp:
            archive = Path(tmp) / "cifar-10-python.tar.gz"
            if log is not None:
                log(f"downloading {CIFAR10_URL}")
            _download_checked(archive, timeout)
            _extract_batches(archive, folder)
    except (OSError, EOFError, zlib.error, http.client.HTTPException, tarfile.TarError,
            DataError) as exc:
        # EOFError/zlib.error: a truncated or corrupt gzip stream during
        # extraction. DataError: oversize download or checksum mismatch.
        raise DataError(
            f"could not download CIFAR-10 into {folder} ({exc}): {_fix_hint(folder)}"
        ) from None
    batch_dir = find_batch_dir(folder)
    if batch_dir is None:
        raise DataError(f"the CIFAR-10 archive lacked batch files: {_fix_hint(folder)}")
    return batch_dir


def _download_checked(dest: Path, timeout: float) -> None:
    """Stream the archive to ``dest`` and verify its MD5.

    Raises:
        OSError, http.client.HTTPException: network failure.
        DataError: oversize response or checksum mismatch.
    """
    digest = hashlib.md5(usedforsecurity=False)
    request = urllib.request.Request(CIFAR10_URL, headers={"User-Agent": "dni-data"})
    with urllib.request.urlopen(request, timeout=timeout) as response, dest.open("wb") as out:
        copied = 0
        while chunk := response.read(1 << 20):
            copied += len(chunk)
            if copied > _MAX_ARCHIVE_BYTES:
                raise DataError(f"{CIFAR10_URL} sent more than {_MAX_ARCHIVE_BYTES} bytes")
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != _ARCHIVE_MD5:
        raise DataError(
            f"{CIFAR10_URL} has MD5 {digest.hexdigest()}, expected {_ARCHIVE_MD5} "
            "(damaged or altered download)"
        )


def _extract_batches(archive: Path, folder: Path) -> None:
    """Extract only the six batch files of ``archive`` into ``folder``."""
    wanted = {f"{_BATCH_DIR}/{name}" for name in (*_TRAIN_FILES, _TEST_FILE)}
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name in wanted and m.isfile()]
        if hasattr(tarfile, "data_filter"):
            tar.extractall(folder, members=members, filter="data")
        else:
            # Python < 3.11.4 has no filters; the fixed relative names and
            # regular-file check above already keep extraction inside folder.
            tar.extractall(folder, members=members)


def load_cifar10(
    path: str | Path,
    *,
    download: bool = False,
    log: Log | None = None,
    timeout: float = 30.0,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Load CIFAR-10 from the standard python batches.

    Security: batches are pickles; see :func:`read_batch`.

    Args:
        path: Folder holding ``cifar-10-batches-py/`` or the batch files.
        download: Fetch the official archive when the batches are missing.
        log: Optional progress callback, used while downloading.
        timeout: Seconds allowed per network operation when downloading.

    Returns:
        ``(train, test)``: images float32 (N, 3, 32, 32) in [0, 1], labels
        int64 in 0..9, ``num_classes`` 10.

    Raises:
        DataError: batches missing (and not downloadable), or invalid.
    """
    folder = Path(path)
    batch_dir = find_batch_dir(folder)
    if batch_dir is None:
        if not download:
            raise DataError(f"CIFAR-10 not found in {folder}: {_fix_hint(folder)}")
        batch_dir = download_cifar10(folder, log=log, timeout=timeout)
    train = _to_dataset([read_batch(batch_dir / name) for name in _TRAIN_FILES])
    test = _to_dataset([read_batch(batch_dir / _TEST_FILE)])
    return train, test
