"""Run directories: where a run leaves its config, metrics, events, checkpoints and summary.

Layout of ``<log.dir>/<name>-<YYYYmmdd-HHMMSS>/``::

    config.yaml        the resolved config (every key, after CLI overrides)
    vocab.json         text data only: the characters behind the token ids
    metrics.jsonl      one JSON object per logged step
    events.out.tfevents.*   TensorBoard
    checkpoints/step-<n>.pt
    summary.json       written when the run ends: "status" completed, interrupted or failed
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from dni.config import Config, ConfigError, config_from_dict, read_yaml
from dni.data.vocabulary import VOCAB_FILE, Vocabulary

CONFIG_FILE = "config.yaml"


class RunError(RuntimeError):
    """A run stopped for a reason outside its config (a worker died, the cluster cannot hold
    the pipeline); the message says what happened and what was saved."""

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


class Interrupted(Exception):
    """A run stopped on request (Ctrl-C, SIGTERM) at global ``step``; ``checkpoint`` is the step of
    the newest checkpoint on disk (0: none), ``saved`` whether it was written at ``step``."""

    def __init__(self, step: int, *, checkpoint: int, saved: bool) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step, self.checkpoint, self.saved = step, checkpoint, saved


def next_run_dir(cfg: Config) -> Path:
    """Where a new run of ``cfg`` would go: ``<log.dir>/<name>-<time>``, not created yet."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.log.dir).expanduser() / f"{cfg.name}-{stamp}"
    path, n = base, 1
    while path.exists():  # two runs started within the same second
        path, n = Path(f"{base}-{n}"), n + 1
    return path


def create_run_dir(cfg: Config, *, at: Path | None = None, vocabulary: Vocabulary | None = None) -> Path:
    """A new, empty run directory for ``cfg`` (at ``at``, else :func:`next_run_dir`) holding its
    resolved config and, for text data, its ``vocabulary``."""
    path = at or next_run_dir(cfg)
    path.mkdir(parents=True)
    write_text_atomic(path / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if vocabulary is not None:
        write_text_atomic(path / VOCAB_FILE, vocabulary.to_json())
    return path


def read_run_config(run_dir: Path) -> Config:
    """The resolved config a run was started with.

    Raises:
        ConfigError: not a run directory, or its config no longer validates.
    """
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no {CONFIG_FILE}); pass the folder a run created under runs/")
    return config_from_dict(read_yaml(path))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_text_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


def write_status(run_dir: Path, cfg: Config, status: str, **fields: Any) -> None:
    """The summary of a run that did not complete: ``status`` (``failed`` or ``interrupted``) and
    what is known (e.g. ``error``, the one-line message; ``checkpoint``, the step resuming starts at)."""
    write_summary(run_dir, {"name": cfg.name, "method": cfg.method, "backend": cfg.backend, "status": status, **fields})
