"""One logging interface with sinks: TensorBoard, JSONL and the console.

Tags follow the glossary, ``<group>/<metric>[/stage_<i>]``:
  train/loss, train/samples_per_second, train/lr, val/accuracy, test/accuracy, test/loss,
  sg/loss/stage_i      synthesizer regression loss of stage i's output interface,
  sg/log10_loss/stage_i  log10 of sg/loss/stage_i, added by :class:`MetricsLogger` for every
                       positive sg/loss: the loss is a mean over gradient entries, often near 1e-4,
                       which TensorBoard's tables print as ``0.0001`` or ``0``; ``-4.02`` reads well,
  sg/fit/stage_i       the fraction of its targets that synthesizer explains, 1 - its loss / the loss
                       of predicting zero, moving averages (:mod:`dni.fit`; synthesizer.gate: fit
                       scales the stage's step by it),
  sg/cosine/stage_i    cosine similarity of synthetic and true gradient there,
  sg/rel_error/stage_i ||g^ - g|| / ||g|| there.

HParams (written once, at the end of a run, into the run's own event file, so no extra
sub-run or scalar card appears): the leading hyper-parameters of :data:`LEADING_HPARAMS`
first, then the rest of the flattened config by name; the metrics of :data:`HPARAM_METRICS`
that the summary has, which TensorBoard reads from the run's own scalars. TensorBoard orders
hyper-parameters by name, so each leading one is named with its rank (``03 model.depth``) and
displayed by its plain name.

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

    def hparams(self, config: dict[str, Any], summary: dict[str, Any]) -> None:
        """Record the run's hyper-parameters and name its final metrics (the HPARAMS tab), in
        this run's own event file: TensorBoard takes each metric's value from the run's last
        scalar of that tag, so no sub-run and no extra scalar is written."""
        from tensorboard.plugins.hparams import plugin_data_pb2  # type: ignore[import-untyped]  # no stubs
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        table = hparam_table(config, summary)
        experiment, start, end = hparams_summaries({name: v for name, _, v in table},
                                                   {tag: 0.0 for tag in hparam_metrics(summary)})
        value = experiment.value[0]  # give the ranked names their plain display names
        data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
        for info, (_, display, _) in zip(data.experiment.hparam_infos, table):
            info.display_name = display
        value.metadata.plugin_data.content = data.SerializeToString()
        writer = self._writer._get_file_writer()
        for s in (experiment, start, end):
            writer.add_summary(s)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


class MetricsLogger:
    """Fans scalars out to every sink and keeps the latest value of each tag.

    Args:
        sinks: where scalars go.
        per_char: the losses are nats per character (text data): each ``train/``, ``val/`` and
            ``test/loss`` is also logged as ``<split>/bits_per_char``.
    """

    def __init__(self, sinks: list[Sink], *, per_char: bool = False) -> None:
        self.sinks = sinks
        self.per_char = per_char
        self.latest: dict[str, float] = {}
        self.latest_step = 0  # the newest step logged

    def log(self, step: int, scalars: dict[str, float]) -> None:
        scalars = with_log10_losses(scalars)
        if self.per_char:
            scalars = with_bits_per_char(scalars)
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

    def hparams(self, config: dict[str, Any], summary: dict[str, Any]) -> None:
        """Record the hyper-parameters (``config`` flattened, see :func:`flatten`) and the final
        metrics of ``summary`` for TensorBoard's HPARAMS tab."""
        for sink in self.sinks:
            if isinstance(sink, TensorBoardSink):
                sink.hparams(config, summary)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def by_stage(scalars: dict[str, float], metric: str) -> dict[str, float]:
    """``{"stage_i": v}`` for every ``<metric>/stage_i`` tag in ``scalars`` (e.g. ``sg/cosine``)."""
    prefix = metric + "/"
    return {k[len(prefix):]: v for k, v in scalars.items() if k.startswith(prefix)}


def with_log10_losses(scalars: dict[str, float]) -> dict[str, float]:
    """``scalars`` and ``sg/log10_loss/stage_i`` for each positive, finite ``sg/loss/stage_i``."""
    extra = {
        "sg/log10_loss/" + k[len("sg/loss/"):]: math.log10(v)
        for k, v in scalars.items()
        if k.startswith("sg/loss/") and math.isfinite(v) and v > 0
    }
    return {**scalars, **extra} if extra else scalars


SPLITS = ("train", "val", "test")


def with_bits_per_char(scalars: dict[str, float]) -> dict[str, float]:
    """``scalars`` and ``<split>/bits_per_char`` (the loss over ln 2) for each ``<split>/loss`` of
    train, val and test: a character-level model's mean cross-entropy in bits."""
    extra = {f"{split}/bits_per_char": scalars[f"{split}/loss"] / math.log(2)
             for split in SPLITS if f"{split}/loss" in scalars}
    return {**scalars, **extra} if extra else scalars


def bits_per_char_summary(latest: dict[str, float]) -> dict[str, float]:
    """The summary's ``val_bits_per_char`` and ``test_bits_per_char``, where logged."""
    return {f"{split}_bits_per_char": latest[f"{split}/bits_per_char"]
            for split in ("val", "test") if f"{split}/bits_per_char" in latest}


LEADING_HPARAMS = ("method", "model", "model.depth", "stages", "train.lr", "synthesizer.lr",
                   "train.batch_size", "train.optimizer", "seed", "backend")
"""The hyper-parameters shown first, in this order (the first five are TensorBoard's default
columns). ``model`` (``fcn-4``, ``custom:stages``), ``stages`` (how many) and ``backend`` are
the summary's; the others are config keys."""

HPARAM_METRICS = (("test/accuracy", "test_accuracy"), ("test/loss", "test_loss"),
                  ("val/accuracy", "val_accuracy"), ("train/loss", "train_loss"),
                  ("test/bits_per_char", "test_bits_per_char"))
"""(TensorBoard tag, summary key) of the HPARAMS tab's metrics, in order."""


def hparam_table(config: dict[str, Any], summary: dict[str, Any]) -> list[tuple[str, str, int | float | str]]:
    """The HPARAMS tab's hyper-parameters as (name, display name, value) rows: those of
    :data:`LEADING_HPARAMS` found in ``summary`` or the flattened ``config``, named
    ``"01 method"``, ``"02 model"``, ... so that TensorBoard's sort by name keeps them first and
    in order; then every other config key under its own name. Values that are not numbers or
    strings become strings (``true``, ``none``, ``[2, 4]``)."""
    values = dict(config)
    if values.get("stages"):  # the per-stage runtime settings; "stages" below is their number
        values["stages.specs"] = values["stages"]
    values.pop("stages", None)
    values.update({k: summary[k] for k in ("model", "stages", "backend") if k in summary})
    leading = [k for k in LEADING_HPARAMS if k in values]
    rows = [(f"{LEADING_HPARAMS.index(k) + 1:02d} {k}", k, values[k]) for k in leading]  # the same name in every run
    rows += [(k, k, v) for k, v in values.items() if k not in leading]
    return [(name, shown, _hparam_value(v)) for name, shown, v in rows]


def _hparam_value(v: Any) -> int | float | str:
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    return v if isinstance(v, (int, float, str)) else str(v)


def hparam_metrics(summary: dict[str, Any]) -> list[str]:
    """The tags of :data:`HPARAM_METRICS` whose final value ``summary`` has (a finite number)."""
    return [tag for tag, key in HPARAM_METRICS
            if isinstance(summary.get(key), (int, float)) and math.isfinite(summary[key])]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for hparams)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
