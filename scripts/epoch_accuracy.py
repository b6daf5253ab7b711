"""Test accuracy after given epochs, per method, from ``dni compare`` folders: results/local/.

    .venv/bin/python scripts/epoch_accuracy.py OUT.md COMPARE_DIR [COMPARE_DIR ...] [--epochs 1,5]

Each COMPARE_DIR is a ``dni compare --out`` folder (one seed each: give several for repeats); its
``comparison.md`` names the run directories, whose ``metrics.jsonl`` holds ``test/accuracy`` at
every epoch's end. Writes a markdown table: per method and epoch the median over the folders, with
the per-folder values beside it, and the difference from the first method's median.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path


def runs_of(compare_dir: Path) -> dict[str, Path]:
    """Method label -> run directory, from a comparison.md's run list."""
    text = (compare_dir / "comparison.md").read_text()
    return {m: Path(d) for m, d in re.findall(r"^- (.+?): `(.+)`$", text, flags=re.M)}


def accuracy_after(run_dir: Path, epoch: int) -> float:
    """Test accuracy logged at the end of ``epoch`` (1-based)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    per_epoch = round(summary["steps"] / summary["epochs"])
    at = {r["step"]: r["test/accuracy"] for r in rows if "test/accuracy" in r}
    if epoch * per_epoch not in at:
        raise SystemExit(f"{run_dir}: no test accuracy at the end of epoch {epoch} (step {epoch * per_epoch})")
    return at[epoch * per_epoch]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--epochs", default="1,5")
    args = parser.parse_args(argv)
    epochs = [int(e) for e in args.epochs.split(",")]
    folders = [runs_of(Path(d)) for d in args.dirs]
    methods = [m for m in folders[0] if all(m in f for f in folders)]
    head = "| method | " + " | ".join(f"after epoch {e} (median; per seed)" for e in epochs) + " |"
    lines = [head, "|---|" + "---|" * len(epochs)]
    base: dict[int, float] = {}
    for m in methods:
        cells = []
        for e in epochs:
            values = [100 * accuracy_after(f[m], e) for f in folders]
            med = statistics.median(values)
            base.setdefault(e, med)
            delta = "" if m == methods[0] else f" ({med - base[e]:+.2f})"
            cells.append(f"{med:.2f}%{delta}; " + " / ".join(f"{v:.2f}" for v in values))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
