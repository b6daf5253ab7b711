"""One logging interface with sinks: TensorBoard, JSONL and the console.

Tags follow the glossary, ``<group>/<metric>[/stage_<i>]``:
  train/loss, train/samples_per_second, train/lr, val/accuracy, test/accuracy, test/loss,
  sg/loss/stage_i      synthesizer regression loss of stage i's output interface,
  sg/cosine/stage_i    cosine similarity of synthetic and true gradient there,
  sg/rel_error/stage_i ||g^ - g|| / ||g|| there.

The library itself stays silent; the trainer (the coordinator) owns a
:class:`MetricsLogger` and is the only writer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol


class Sink(Protocol):
    """Something that records scalars at a step."""

    def write(self, step: int, scalars: dict[str, float]) -> None: ...

    def rewind(self, step: int) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """``metrics.jsonl``: one JSON object per logged step, ``{"step": n, tag: value, ...}``.

    Args:
        path: the file; appended to.
        resume_step: when resuming, lines of steps after this one (logged after the
            checkpoint the run resumes from) are dropped, so the history has no duplicates.
    """

    def __init__(self, path: Path, *, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            self._truncate(resume_step)
        self._file = path.open("a")

    def _truncate(self, step: int) -> None:
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def rewind(self, step: int) -> None:
        """Drop what was logged after ``step`` (a run going back to its checkpoint of ``step``)."""
        self._file.close()
        self._truncate(step)
        self._file = self.path.open("a")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        row = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in scalars.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line from a crash: drop it


class TensorBoardSink:
    """TensorBoard event files in ``log_dir``.

    Args:
        resume_step: when resuming, events after this step are purged so curves continue without duplicates.
    """

    def __init__(self, log_dir: Path, *, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is heavy

        self._make = lambda purge: SummaryWriter(log_dir=str(log_dir), purge_step=purge)
        self._writer = self._make(resume_step + 1 if resume_step is not None else None)

    def rewind(self, step: int) -> None:
        """Hide events after ``step`` from TensorBoard (a run going back to its checkpoint of ``step``)."""
        self._writer.close()
        self._writer = self._make(step + 1)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """Record the run's hyper-parameters with its final metrics (the HPARAMS tab)."""
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        self._writer.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


class MetricsLogger:
    """Fans scalars out to every sink and keeps the latest value of each tag."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks
        self.latest: dict[str, float] = {}
        self.latest_step = 0  # the newest step logged

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.latest.update(scalars)
        self.latest_step = max(self.latest_step, step)
        for sink in self.sinks:
            sink.write(step, scalars)

    def rewind(self, step: int) -> None:
        """Go back to ``step``: every sink forgets what was logged after it, so the history
        continues from there without duplicates (a pipeline restarted from a checkpoint)."""
        for sink in self.sinks:
            sink.rewind(step)
        self.latest_step = step

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            if isinstance(sink, TensorBoardSink):
                sink.hparams(hparams, metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def by_stage(scalars: dict[str, float], metric: str) -> dict[str, float]:
    """``{"stage_i": v}`` for every ``<metric>/stage_i`` tag in ``scalars`` (e.g. ``sg/cosine``)."""
    prefix = metric + "/"
    return {k[len(prefix):]: v for k, v in scalars.items() if k.startswith(prefix)}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for hparams)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
