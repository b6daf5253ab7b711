"""Reading and writing the IDX format, and loading folders of IDX files.

The IDX format (used by MNIST and friends) is a tiny header followed by raw
big-endian array data:

* two zero bytes,
* one dtype code byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
  0x0D float32, 0x0E float64),
* one byte holding the number of dimensions,
* one big-endian int32 per dimension,
* the array data, big-endian, C order.

Files may be gzip-compressed; compression is detected from the content (the
gzip magic bytes ``1f 8b``), never from the file name.
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

from dni.data.dataset import ArrayDataset, DataError

# IDX dtype code -> big-endian numpy dtype. Immutable mapping by convention
# (module constant, never mutated).
_CODE_TO_DTYPE: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_INT32_MAX = 2**31 - 1

#: Standard file names of the four files in an IDX dataset folder (without
#: the optional ``.gz`` suffix), keyed by role.
IDX_FILE_NAMES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _read_raw(path: Path) -> bytes:
    """Return the decompressed bytes of ``path``.

    Raises:
        DataError: the file is missing, unreadable, or a corrupt gzip stream.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"IDX file {path} does not exist: check the path, or obtain the "
            "dataset first (for MNIST run `dni data mnist`)"
        ) from None
    except OSError as exc:
        raise DataError(
            f"cannot read IDX file {path} ({exc.strerror or exc}): check the "
            "file permissions and that the path is a regular file"
        ) from None
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        # gzip raises BadGzipFile (an OSError), EOFError on truncation, or
        # zlib.error on corrupt deflate data; all mean the same to the user.
        raise DataError(
            f"IDX file {path} is a corrupt or truncated gzip file ({exc}): "
            "delete it and download or copy it again"
        ) from None


def _parse_header(data: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """Parse an IDX header.

    Args:
        data: The decompressed file content.
        path: The file name, for error messages only.

    Returns:
        ``(dtype, shape, header_size)``: the big-endian element dtype, the
        array shape and the number of header bytes preceding the data.

    Raises:
        DataError: bad magic number, unknown dtype code, or truncated header.
    """
    hint = "the file is not an IDX file or is damaged: delete it and obtain it again"
    if len(data) < 4:
        raise DataError(f"IDX file {path} is truncated ({len(data)} bytes, no header): {hint}")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or code not in _CODE_TO_DTYPE or ndim == 0:
        raise DataError(
            f"IDX file {path} has a bad magic number 0x{data[:4].hex()} (expected "
            f"00 00, a dtype code in {{{', '.join(f'0x{c:02X}' for c in _CODE_TO_DTYPE)}}}"
            f" and a dimension count >= 1): {hint}"
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(
            f"IDX file {path} is truncated inside its header "
            f"({len(data)} of {header_size} bytes): {hint}"
        )
    shape = struct.unpack(f">{ndim}i", data[4:header_size])
    if any(d < 0 for d in shape):
        raise DataError(f"IDX file {path} declares negative dimensions {shape}: {hint}")
    return _CODE_TO_DTYPE[code], tuple(shape), header_size


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, plain or gzip-compressed.

    Args:
        path: The file to read. Gzip compression is detected from the first
            two bytes, so the name does not need to end in ``.gz``.

    Returns:
        A writable array in native byte order with the dtype and shape stored
        in the file.

    Raises:
        DataError: the file is missing, unreadable, not an IDX file (bad
            magic), truncated, or longer than its header declares.
    """
    path = Path(path)
    data = _read_raw(path)
    dtype, shape, header_size = _parse_header(data, path)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_size
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header declares"
        raise DataError(
            f"IDX file {path} is {what}: shape {shape} of {dtype.name} needs "
            f"{expected} data bytes but {actual} are present; delete it and "
            "obtain it again"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    # astype copies: the result is writable and in native byte order, which
    # torch.from_numpy requires.
    return array.astype(dtype.newbyteorder("="))


def _idx_code(dtype: np.dtype) -> int:
    """Return the IDX dtype code for ``dtype``.

    Raises:
        DataError: the dtype has no IDX representation.
    """
    for code, idx_dtype in _CODE_TO_DTYPE.items():
        if dtype.kind == idx_dtype.kind and dtype.itemsize == idx_dtype.itemsize:
            return code
    names = ", ".join(d.name for d in _CODE_TO_DTYPE.values())
    raise DataError(
        f"cannot write dtype {dtype} to IDX: convert the array to one of {names} first"
    )


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` to an IDX file atomically.

    The data goes to a temporary file in the destination folder which then
    replaces ``path`` (``os.replace``), so readers never see a partial file.

    Args:
        path: Destination. If it ends in ``.gz`` the file is gzip-compressed.
        array: An array of dtype uint8, int8, int16, int32, float32 or
            float64 with 1 to 255 dimensions, each below 2**31.

    Raises:
        DataError: the dtype or shape cannot be represented in IDX.
        OSError: the destination cannot be written.
    """
    path = Path(path)
    array = np.asarray(array)
    code = _idx_code(array.dtype)
    if not 1 <= array.ndim <= 255 or any(d > _INT32_MAX for d in array.shape):
        raise DataError(
            f"cannot write shape {array.shape} to IDX: it needs 1 to 255 "
            "dimensions, each below 2**31; reshape the array first"
        )
    header = struct.pack(f">BBBB{array.ndim}i", 0, 0, code, array.ndim, *array.shape)
    payload = np.ascontiguousarray(array, dtype=_CODE_TO_DTYPE[code]).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw_file:
            if path.name.endswith(".gz"):
                # mtime=0 and an explicit name keep the output reproducible
                # and free of the temporary file name.
                with gzip.GzipFile(
                    filename=path.name[:-3], mode="wb", fileobj=raw_file, mtime=0,
                    compresslevel=6,
                ) as gz:
                    gz.write(header)
                    gz.write(payload)
            else:
                raw_file.write(header)
                raw_file.write(payload)
        # mkstemp creates the file 0600; data files are not secret and other
        # users (or a container user) may need to read the cache.
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def find_idx_files(folder: str | Path) -> dict[str, Path] | None:
    """Locate the four standard IDX files in ``folder``.

    Args:
        folder: The folder to search.

    Returns:
        A mapping from role (the keys of :data:`IDX_FILE_NAMES`) to the file
        path, preferring the uncompressed name when both exist; ``None`` if
        any of the four files is missing.
    """
    folder = Path(folder)
    found: dict[str, Path] = {}
    for role, name in IDX_FILE_NAMES.items():
        candidates = [folder / name, folder / f"{name}.gz"]
        existing = [c for c in candidates if c.is_file()]
        if not existing:
            return None
        found[role] = existing[0]
    return found


def idx_file_list() -> str:
    """The standard IDX file names as a readable list, for messages."""
    return ", ".join(f"{n}[.gz]" for n in IDX_FILE_NAMES.values())


def images_to_tensor(images: np.ndarray, source: Path) -> torch.Tensor:
    """Convert an image array to float32 (N, C, H, W) in [0, 1].

    Args:
        images: uint8 array (scaled by 1/255) or floating array already in
            [0, 1]; shape (N, H, W) (one channel is added) or (N, C, H, W).
        source: The file the array came from, for error messages.

    Returns:
        The converted tensor.

    Raises:
        DataError: unsupported dtype, shape or value range.
    """
    if images.ndim == 3:
        images = images[:, None, :, :]
    if images.ndim != 4:
        raise DataError(
            f"images in {source} have shape {images.shape}; expected (N, H, W) or "
            "(N, C, H, W): check that the images and labels files are not swapped"
        )
    if images.dtype == np.uint8:
        return torch.from_numpy(images).float().div_(255.0)
    if images.dtype.kind == "f":
        tensor = torch.from_numpy(images).float()
        if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
            raise DataError(
                f"floating-point images in {source} are outside [0, 1]: rescale "
                "them to [0, 1] or store them as uint8 in 0..255"
            )
        return tensor
    raise DataError(
        f"images in {source} have dtype {images.dtype}; store them as uint8 "
        "(0..255) or float32/float64 in [0, 1]"
    )


def labels_to_tensor(labels: np.ndarray, source: Path) -> torch.Tensor:
    """Convert a label array to an int64 tensor of shape (N,).

    Raises:
        DataError: the labels are not a 1-D array of non-negative integers.
    """
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(
            f"labels in {source} have shape {labels.shape} and dtype {labels.dtype}; "
            "expected a 1-D integer array: check that the images and labels files "
            "are not swapped"
        )
    if labels.size and labels.min() < 0:
        raise DataError(f"labels in {source} contain negative values: class ids must be >= 0")
    return torch.from_numpy(labels.astype(np.int64))


def _load_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and convert one images/labels file pair, checking their counts agree."""
    images = images_to_tensor(read_idx(images_path), images_path)
    labels = labels_to_tensor(read_idx(labels_path), labels_path)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels: the files do not belong together; replace "
            "them with a matching pair"
        )
    return images, labels


def load_idx_folder(
    folder: str | Path, *, num_classes: int | None = None
) -> tuple[ArrayDataset, ArrayDataset]:
    """Load a folder holding the four standard IDX files.

    Args:
        folder: Folder with ``train-images-idx3-ubyte``,
            ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
            ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``).
        num_classes: Number of classes; ``None`` infers it as the largest
            label (over train and test) plus one.

    Returns:
        ``(train, test)`` datasets with float32 images in [0, 1].

    Raises:
        DataError: files missing or invalid, counts mismatched, train and
            test image shapes differ, or labels outside ``num_classes``.
    """
    folder = Path(folder)
    files = find_idx_files(folder)
    if files is None:
        raise DataError(
            f"IDX dataset not found in {folder}: copy the files {idx_file_list()} "
            "there, or set data.path to the folder that holds them"
        )
    train_x, train_y = _load_pair(files["train_images"], files["train_labels"])
    test_x, test_y = _load_pair(files["test_images"], files["test_labels"])
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(
            f"train images in {folder} have shape {tuple(train_x.shape[1:])} but test "
            f"images have {tuple(test_x.shape[1:])}: both splits must come from the "
            "same dataset"
        )
    if num_classes is None:
        all_labels = torch.cat([train_y, test_y])
        if all_labels.numel() == 0:
            raise DataError(
                f"the IDX dataset in {folder} holds no samples: replace the files "
                "with a non-empty dataset"
            )
        num_classes = int(all_labels.max()) + 1
    train = ArrayDataset(train_x, train_y, num_classes)
    test = ArrayDataset(test_x, test_y, num_classes)
    return train, test
