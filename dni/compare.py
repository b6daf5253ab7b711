"""Side-by-side comparison of runs: a markdown table, a JSON file and learning curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dni.run import METRICS_FILE


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``."""
    path = run_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def series(rows: list[dict[str, Any]], tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one tag, skipping rows without it."""
    pts = [(r["step"], r[tag]) for r in rows if r.get(tag) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def markdown_table(summaries: dict[str, dict[str, Any]], baseline: str | None = None) -> str:
    """One row per method: test error, time per step and its ratio to the baseline (backprop if present)."""
    base = summaries.get(baseline or "backprop") or next(iter(summaries.values()))
    lines = [
        "| method | test error % | test accuracy | steps | s/step | cost vs baseline | final sg cosine (per stage) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, s in summaries.items():
        cos = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(s.get("sg_cosine", {}).items())) or "-"
        ratio = s["seconds_per_step"] / base["seconds_per_step"]
        lines.append(
            f"| {method} | {100 * s['test_error']:.2f} | {s['test_accuracy']:.4f} | {s['steps']} | "
            f"{s['seconds_per_step'] * 1000:.1f} ms | {ratio:.2f}x | {cos} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(path: Path, runs: dict[str, Path], *, title: str = "") -> None:
    """Learning curves (training loss and test accuracy against steps) of several runs, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for label, run_dir in runs.items():
        rows = read_metrics(run_dir)
        ax_loss.plot(*series(rows, "train/loss"), label=label, linewidth=1)
        steps, acc = series(rows, "test/accuracy")
        ax_acc.plot(steps, [100 * (1 - a) for a in acc], marker=".", label=label)
    ax_loss.set(xlabel="step", ylabel="training loss", yscale="log", title="training loss")
    ax_acc.set(xlabel="step", ylabel="test error %", yscale="log", title="test error")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
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
