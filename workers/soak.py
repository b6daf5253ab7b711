"""A soak run: the Ray runtime trains for a long time while the memory of every process is sampled.

    python -m workers.soak configs/mnist_fcn4.yaml --out results/soak train.epochs=280

Trains the config with ``backend: ray`` (a local Ray instance started by this process, so
every Ray process is a descendant of it) and samples the resident memory (RSS, from
/proc) of this driver, each stage worker and each Ray system process every ``--every``
seconds. Writes ``<out>/soak.json`` (every sample), ``<out>/soak.md`` (per process: RSS
after the warm-up, at the end, its growth and the bound) and ``<out>/soak.png``.
Linux only (/proc).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray

from dni.run import create_run_dir
from workers.coordinator import Coordinator
from workers.measure import machine, measured_config, measurement_parser

BOUND_MIB, BOUND_FRACTION = 32.0, 0.05  # growth allowed per process after the warm-up: the larger of the two


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def process_name(pid: int) -> str:
    """A readable name: the Ray process title, or the script a Python process runs."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::") or not argv[1:]:
        return first.split()[0] if first else "?"
    scripts = [a.decode(errors="replace") for a in argv[1:] if a.endswith(b".py")]
    return Path(scripts[0]).name if scripts else Path(first).name


class Sampler(threading.Thread):
    """Samples the RSS of every descendant of this process every ``every`` seconds."""

    def __init__(self, every: float, labels: dict[int, str]) -> None:
        super().__init__(daemon=True)
        self.every, self.labels = every, labels
        self.samples: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.every)

    def sample(self) -> None:
        t = time.monotonic() - self.t0
        for pid in descendants(os.getpid()):
            rss = rss_mib(pid)
            if rss is not None:
                name = self.labels.get(pid) or process_name(pid)
                self.samples.append({"t": round(t, 1), "pid": pid, "name": name, "rss_mib": round(rss, 1)})

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


def growth(samples: list[dict[str, Any]], warmup_s: float) -> list[dict[str, Any]]:
    """Per process that lived past the warm-up: RSS at its first sample after it, at the end, and the verdict."""
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        by_pid.setdefault(s["pid"], []).append(s)
    rows = []
    for pid, series in sorted(by_pid.items(), key=lambda kv: kv[1][0]["name"]):
        steady = [s for s in series if s["t"] >= warmup_s]
        if len(steady) < 2:
            continue  # short-lived (a Ray worker process started and gone): nothing to grow
        start, end = steady[0]["rss_mib"], steady[-1]["rss_mib"]
        peak = max(s["rss_mib"] for s in steady)
        bound = max(BOUND_MIB, BOUND_FRACTION * start)
        rows.append({"pid": pid, "name": series[0]["name"], "rss_after_warmup_mib": start, "rss_end_mib": end,
                     "peak_mib": peak, "growth_mib": end - start, "bound_mib": bound,
                     "seconds": steady[-1]["t"] - steady[0]["t"], "within_bound": peak - start <= bound})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = measurement_parser("python -m workers.soak", __doc__, "results/soak")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples (default: 10)")
    parser.add_argument("--warmup", type=float, default=120.0, help="seconds before growth counts (default: 120)")
    args = parser.parse_intermixed_args(argv)
    out = Path(args.out)
    cfg = measured_config(args)
    coord = Coordinator(cfg, create_run_dir(cfg))
    started = time.monotonic()
    coord.start()
    pids = ray.get([a.pid.remote() for a in coord.actors])
    labels = {os.getpid(): "driver (coordinator)"}
    labels.update({pid: f"stage worker {rank}" for rank, pid in enumerate(pids)})
    sampler = Sampler(args.every, labels)
    sampler.t0 = started
    sampler.start()
    try:
        summary = coord.run()
    finally:
        sampler.stop()
    rows = growth(sampler.samples, args.warmup)
    result = {
        "command": " ".join(["python -m workers.soak", args.config, *args.overrides]),
        "machine": machine(), "date": time.strftime("%Y-%m-%d"),
        "minutes": (time.monotonic() - started) / 60, "steps": summary["steps"],
        "test_accuracy": summary["test_accuracy"], "warmup_s": args.warmup,
        "bound": f"RSS may rise at most max({BOUND_MIB:g} MiB, {100 * BOUND_FRACTION:g}%) above its value after the warm-up",
        "processes": rows, "all_within_bound": all(r["within_bound"] for r in rows), "samples": sampler.samples,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "soak.md").write_text(table(result))
    plot(sampler.samples, out / "soak.png")
    print((out / "soak.md").read_text())
    return 0 if result["all_within_bound"] else 1


def table(r: dict[str, Any]) -> str:
    lines = [
        f"# Soak: {r['minutes']:.1f} minutes on the Ray runtime, memory of every process",
        "", f"`{r['command']}` on {r['machine']}, {r['date']}: {r['steps']} steps, final test accuracy "
        f"{r['test_accuracy']:.4f}. Bound: {r['bound']} ({r['warmup_s']:g} s); verdict: "
        f"{'every process within it' if r['all_within_bound'] else 'EXCEEDED'}.", "",
        "| process | RSS after warm-up (MiB) | peak (MiB) | at the end (MiB) | growth (MiB) | bound (MiB) | within |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in r["processes"]:
        lines.append(f"| {p['name']} (pid {p['pid']}) | {p['rss_after_warmup_mib']:.1f} | {p['peak_mib']:.1f} | "
                     f"{p['rss_end_mib']:.1f} | {p['growth_mib']:+.1f} | {p['bound_mib']:.1f} | "
                     f"{'yes' if p['within_bound'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(samples: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    series: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for s in samples:
        series.setdefault((s["pid"], s["name"]), []).append((s["t"] / 60, s["rss_mib"]))
    for (pid, name), points in sorted(series.items(), key=lambda kv: kv[0][1]):
        if len(points) > 2:
            ax.plot(*zip(*points), label=f"{name} ({pid})", linewidth=1)
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("Resident memory of every process during the soak")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
