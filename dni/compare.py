"""Side-by-side comparison of runs: a markdown table, a JSON file and learning curves."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dni.run import METRICS_FILE

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``."""
    path = run_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def series(rows: list[dict[str, Any]], tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one tag, skipping rows without it."""
    pts = [(r["step"], r[tag]) for r in rows if r.get(tag) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def seconds_per_step(summary: dict[str, Any]) -> float:
    """A run's training seconds per step: ``seconds_per_step`` of the local backend (steps only), else
    (the Ray runtime's summary) its wall seconds over its steps, evaluation included."""
    if summary.get("seconds_per_step") is not None:
        return float(summary["seconds_per_step"])
    return float(summary["wall_seconds"]) / max(int(summary["steps"]), 1)


@dataclass(frozen=True)
class Measure:
    """What the curves of a comparison show: test accuracy, or bits per character for text."""

    tag: str
    label: str
    scale: float


ACCURACY = Measure("test/accuracy", "test accuracy %", 100.0)
BITS_PER_CHAR = Measure("test/bits_per_char", "test bits per char", 1.0)


def measure_of(rows: list[dict[str, Any]]) -> Measure:
    """Bits per character where a run logged them (a language model), else accuracy."""
    return BITS_PER_CHAR if any(BITS_PER_CHAR.tag in r for r in rows) else ACCURACY


def markdown_table(summaries: dict[str, dict[str, Any]], baseline: str | None = None) -> str:
    """One row per method: test error (bits per char for a language model), time per step and
    their differences and ratios to the baseline (backprop if present)."""
    base = summaries.get(baseline or "backprop") or next(iter(summaries.values()))
    if "test_bits_per_char" in base:
        return _bits_table(summaries, base)
    lines = [
        "| method | test error % | test accuracy | steps | s/step | cost vs baseline | final sg cosine (per stage) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, s in summaries.items():
        cos = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(s.get("sg_cosine", {}).items())) or "-"
        ratio = seconds_per_step(s) / seconds_per_step(base)
        lines.append(
            f"| {method} | {100 * s['test_error']:.2f} | {s['test_accuracy']:.4f} | {s['steps']} | "
            f"{seconds_per_step(s) * 1000:.1f} ms | {ratio:.2f}x | {cos} |"
        )
    return "\n".join(lines) + "\n"


def _bits_table(summaries: dict[str, dict[str, Any]], base: dict[str, Any]) -> str:
    lines = [
        "| method | test bits/char | vs baseline | test accuracy | steps | s/step | cost vs baseline | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, s in summaries.items():
        bits = s.get("test_bits_per_char", float("nan"))
        lines.append(
            f"| {method} | {bits:.3f} | {bits - base['test_bits_per_char']:+.3f} | {s['test_accuracy']:.4f} | "
            f"{s['steps']} | {seconds_per_step(s) * 1000:.1f} ms | "
            f"{seconds_per_step(s) / seconds_per_step(base):.2f}x | {s['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def accuracy_by_seconds(rows: list[dict[str, Any]], tag: str = ACCURACY.tag) -> tuple[list[float], list[float]]:
    """(training seconds, the test metric ``tag``) at each evaluation: ``time/train_seconds`` is logged
    at the step of each evaluation, evaluation time excluded."""
    seconds = {r["step"]: r["time/train_seconds"] for r in rows if r.get("time/train_seconds") is not None}
    steps, acc = series(rows, tag)
    pts = [(seconds[s], a) for s, a in zip(steps, acc) if s in seconds]
    return [p[0] for p in pts], [p[1] for p in pts]


def learning_curves_figure(runs: dict[str, Path], *, title: str = "") -> Figure:
    """Training loss against steps, and test accuracy (bits per character for a language model)
    against steps and against training seconds (time to accuracy), of several runs: one line with
    markers per run, the same colour in every panel. An axis is logarithmic only where its values
    span more than a decade."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc, ax_time) = plt.subplots(1, 3, figsize=(15, 4.2))
    values: dict[Axes, list[float]] = {ax_loss: [], ax_acc: [], ax_time: []}
    rows_of = {label: read_metrics(run_dir) for label, run_dir in runs.items()}
    measure = measure_of([r for rows in rows_of.values() for r in rows])
    for label, rows in rows_of.items():
        for ax, (x, y) in ((ax_loss, series(rows, "train/loss")), (ax_acc, series(rows, measure.tag)),
                           (ax_time, accuracy_by_seconds(rows, measure.tag))):
            if ax is not ax_loss:
                y = [measure.scale * a for a in y]
            ax.plot(x, y, marker="o" if len(x) <= 30 else None, markersize=5, linewidth=1.2, label=label)
            values[ax] += y
    name = measure.label.removesuffix(" %")
    ax_loss.set(xlabel="step", ylabel="training loss", title="training loss")
    ax_acc.set(xlabel="step", ylabel=measure.label, title=name)
    ax_time.set(xlabel="training seconds", ylabel=measure.label, title=f"time to {name.removeprefix('test ')}")
    for ax, ys in values.items():
        _plain_axes(ax, ys)
        # From the start of training, so a run's single evaluation stands at its step or time.
        ax.set_xlim(0, ax.get_xlim()[1] * 1.04)
        ax.margins(y=0.15)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _plain_axes(ax: Axes, ys: list[float]) -> None:
    """A log y axis only if ``ys`` span more than a decade; tick labels as plain numbers
    (``80``, ``0.5``), with no offset and no ``8x10^0``."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    positive = [y for y in ys if y > 0]
    if positive and len(positive) == len(ys) and max(positive) > 10 * min(positive):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.yaxis.set_major_formatter(_plain())
    ax.xaxis.set_major_formatter(_plain())


def _plain() -> ScalarFormatter:
    from matplotlib.ticker import ScalarFormatter

    fmt = ScalarFormatter(useOffset=False)
    fmt.set_scientific(False)
    return fmt


def plot_curves(path: Path, runs: dict[str, Path], *, title: str = "") -> None:
    """:func:`learning_curves_figure` of ``runs``, as a PNG."""
    fig = learning_curves_figure(runs, title=title)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_comparison(out: Path, results: dict[str, tuple[Path, dict[str, Any]]]) -> str:
    """Write ``comparison.md``, ``comparison.json`` and ``learning_curves.png`` into ``out``.

    Args:
        results: method -> (run directory, summary).

    Returns:
        The markdown table.
    """
    out.mkdir(parents=True, exist_ok=True)
    summaries = {m: s for m, (_, s) in results.items()}
    table = markdown_table(summaries)
    runs = "\n".join(f"- {m}: `{d}`" for m, (d, _) in results.items())
    (out / "comparison.md").write_text(table + "\nRuns:\n" + runs + "\n")
    (out / "comparison.json").write_text(json.dumps(summaries, indent=2) + "\n")
    plot_curves(out / "learning_curves.png", {m: d for m, (d, _) in results.items()})
    return table
