"""Checkpoints: atomic, versioned, safe to load, newest-first with fallback.

A checkpoint is one ``torch.save`` file ``step-<n>.pt`` in a run's
``checkpoints/`` folder holding only tensors and plain values, so it loads with
``weights_only=True`` (no code runs on load). It is written to a temporary file
and renamed into place, so a crash never leaves a half-written checkpoint under
a real name.
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
import warnings
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or incompatible; the message says what to do.

    ``reason`` is the short what-is-wrong part of an unreadable file's message (empty otherwise).
    """

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


def _why_unreadable(error: Exception, *, archive: bool) -> str:
    """What is wrong with a file torch could not load, in a few words: never torch's whole text
    (several lines, and advice to load with code execution on, which dni never does).
    ``archive``: the file is a zip archive, as torch.save writes (else it is damage, whatever
    the unpickler said)."""
    text = str(error).strip()
    if archive and ("weights only" in text.lower() or "weights_only" in text):
        return "it holds objects other than tensors and plain values, which dni does not load"
    first = text.splitlines()[0] if text else ""
    first = first.split(". ")[0].rstrip(".")  # torch's first sentence says what failed
    detail = f"{type(error).__name__}: {first[:100]}" if first else type(error).__name__
    return f"corrupted or truncated, or not a checkpoint ({detail})"


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:08d}.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], *, keep: int) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step``; keep the newest ``keep``.

    Returns:
        The checkpoint's path.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(folder, step)
    payload = {"format_version": FORMAT_VERSION, "step": step, **state}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load one checkpoint with ``weights_only=True``.

    Raises:
        CheckpointError: missing, corrupted or truncated, or of another format version.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        reason = _why_unreadable(e, archive=zipfile.is_zipfile(path))
        raise CheckpointError(f"{path}: {reason}; delete it to resume from the previous checkpoint",
                              reason=reason) from None
    if not isinstance(state, dict) or "format_version" not in state:
        reason = "not a dni checkpoint (no format_version)"
        raise CheckpointError(f"{path}: {reason}", reason=reason)
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {state['format_version']} but this dni reads format "
            f"{FORMAT_VERSION}; resume it with the dni version that wrote it"
        )
    return state


def load_latest(folder: Path) -> dict[str, Any]:
    """The newest readable checkpoint in ``folder``; a damaged newer one is skipped with a warning.

    Raises:
        CheckpointError: no readable checkpoint in the folder.
    """
    candidates = list_checkpoints(folder)
    if not candidates:
        raise CheckpointError(f"{folder}: no checkpoints to resume from (is this a run directory?)")
    errors = []
    for n, path in enumerate(reversed(candidates)):
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            if not e.reason:  # readable, but of another format version: an older one would be too
                raise
            errors.append(f"{path.name}: {e.reason}")
            instead = f"trying {candidates[-n - 2].name} instead" if n + 1 < len(candidates) else "no older one left"
            warnings.warn(f"skipping unreadable checkpoint {path}: {e.reason}; {instead}", stacklevel=2)
    raise CheckpointError(f"{folder}: no readable checkpoint ({'; '.join(errors)}); delete the run directory and "
                          "start afresh with `dni train CONFIG`")
