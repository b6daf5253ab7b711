"""Fault drills on the Ray runtime, measured against an uninterrupted run of the same config and seed.

    python -m workers.fault_drill configs/mnist_fcn4.yaml --out results/faults [section.key=value ...]

Five runs, one after another: uninterrupted; a stage worker's process killed (SIGKILL) halfway
(the coordinator replaces the pipeline from the last checkpoint); the driver killed halfway and
the run resumed with ``dni train --resume``; a NaN batch met by ``train.nonfinite=skip``; a
spoilt synthesizer met by ``train.nonfinite=reset``. Writes ``<out>/drill.json`` and
``<out>/drill.md``: final test accuracy of each against the uninterrupted run, and for the
worker kill the seconds from the kill to its detection and to training resuming.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ray
import yaml

from dni.config import Config
from dni.run import create_run_dir
from workers.coordinator import Coordinator
from workers.measure import machine, measured_config, measurement_parser
from workers.plan import make_plan


def _run(cfg: Config, *, progress: Callable[..., None] | None = None,
         before: Callable[[Coordinator], None] | None = None) -> tuple[Coordinator, dict[str, Any]]:
    coord = Coordinator(cfg, create_run_dir(cfg), progress=progress)
    if before is not None:
        coord.start()
        before(coord)
    return coord, coord.run()


def kill_a_worker(cfg: Config, rank: int, at_step: int, seed: int = 0) -> dict[str, Any]:
    """SIGKILL worker ``rank``'s process once training passes ``at_step``, from another thread and
    after a random delay under one ``runtime.poll_s``, so the kill lands at an arbitrary point of
    the coordinator's polling (the detection time is then representative, not lucky)."""
    reached = threading.Event()
    killed: dict[str, float] = {}

    def watch(step: int, total: int, latest: dict[str, float]) -> None:
        if step >= at_step:
            reached.set()

    def kill() -> None:
        reached.wait()
        pid = ray.get(coord.actors[rank].pid.remote(), timeout=30)
        time.sleep(random.Random(seed).uniform(0, cfg.runtime.poll_s))
        killed["time"], killed["step"] = time.monotonic(), coord.logger.latest_step if coord.logger else at_step
        os.kill(pid, signal.SIGKILL)

    coord = Coordinator(cfg, create_run_dir(cfg), progress=watch)
    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    summary = coord.run()
    (restart,) = coord.restarts
    return {
        "summary": summary, "killed_at_step": killed["step"], "restarted_from_step": restart["from_step"],
        "steps_replayed": killed["step"] - restart["from_step"],
        "seconds_to_detect": restart["detected"] - killed["time"],
        "seconds_to_resume": restart["resumed"] - killed["time"],
    }


def kill_the_driver(cfg: Config, at_step: int, folder: Path) -> dict[str, Any]:
    """Run ``dni train`` as a process, SIGKILL it once a checkpoint at or past ``at_step`` exists
    (with what Ray left of its session), then ``dni train --resume`` the run directory."""
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / "drill-driver.yaml"
    config_file.write_text(yaml.safe_dump({**cfg.to_dict(), "log": {**cfg.to_dict()["log"], "dir": str(folder)}}))
    before = {p for p in folder.iterdir() if p.is_dir()}
    driver = subprocess.Popen([sys.executable, "-m", "dni.cli", "train", str(config_file), "--no-progress"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run_dir = None
    while run_dir is None or not any(int(p.stem.split("-")[1]) >= at_step for p in (run_dir / "checkpoints").glob("step-*.pt")):
        if driver.poll() is not None:
            raise RuntimeError("the driver ended before it could be killed; lower --at")
        new = [p for p in folder.iterdir() if p.is_dir() and p not in before]
        run_dir = new[0] if new else None
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "dni.cli", "train", "--resume", str(run_dir), "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"summary": summary, "resumed_from_step": summary["resumed_from_step"],
            "resume_command_seconds": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    parser = measurement_parser("python -m workers.fault_drill", __doc__, "results/faults")
    parser.add_argument("--rank", type=int, default=1, help="the worker to kill and to poison (default: 1)")
    parser.add_argument("--at", type=float, default=0.5, help="when, as a fraction of the run (default: 0.5)")
    args = parser.parse_intermixed_args(argv)
    out = Path(args.out)
    base = measured_config(args)
    total = make_plan(base).schedule.total_steps
    at = int(total * args.at)
    results: dict[str, Any] = {"config": args.config, "overrides": args.overrides, "total_steps": total, "at_step": at,
                               "rank": args.rank,
                               "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    results["uninterrupted"] = {"summary": _run(base)[1]}
    results["worker_killed"] = kill_a_worker(base, args.rank, at)
    results["driver_killed"] = kill_the_driver(base, at, out / "runs")
    skip = measured_config(args, "train.nonfinite=skip")
    results["nan_batch_skipped"] = {"summary": _run(skip, before=lambda c: ray.get(
        c.actors[args.rank].inject_fault.remote(at, "input")))[1]}
    reset = measured_config(args, "train.nonfinite=reset")
    results["synthesizer_reset"] = {"summary": _run(reset, before=lambda c: ray.get(
        c.actors[args.rank].inject_fault.remote(at, "synthesizer")))[1]}
    ref = results["uninterrupted"]["summary"]["test_accuracy"]
    for name in ("worker_killed", "driver_killed", "nan_batch_skipped", "synthesizer_reset"):
        results[name]["accuracy_difference_points"] = 100 * (results[name]["summary"]["test_accuracy"] - ref)
    out.mkdir(parents=True, exist_ok=True)
    (out / "drill.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "drill.md").write_text(table(results, " ".join(["python -m workers.fault_drill", args.config, *args.overrides])))
    print((out / "drill.md").read_text())
    return 0


def table(r: dict[str, Any], command: str) -> str:
    """The drill as a Markdown table."""
    acc = lambda name: r[name]["summary"]["test_accuracy"]  # noqa: E731
    w = r["worker_killed"]
    lines = [
        f"# Fault drill: {r['config']} on the Ray runtime ({r['total_steps']} steps, faults at step {r['at_step']})",
        "", f"`{command}` on {r['machine']}, {r['date']}.", "",
        "| run | test accuracy | vs uninterrupted (points) | notes |", "|---|---|---|---|",
        f"| uninterrupted | {acc('uninterrupted'):.4f} | | |",
        f"| stage worker {r['rank']} killed (SIGKILL) | {acc('worker_killed'):.4f} | "
        f"{w['accuracy_difference_points']:+.2f} | killed at step {w['killed_at_step']}, detected after "
        f"{w['seconds_to_detect']:.2f} s, training again {w['seconds_to_resume']:.1f} s after the kill, from step "
        f"{w['restarted_from_step']} ({w['steps_replayed']} steps replayed) |",
        f"| driver killed, `dni train --resume` | {acc('driver_killed'):.4f} | "
        f"{r['driver_killed']['accuracy_difference_points']:+.2f} | resumed from step "
        f"{r['driver_killed']['resumed_from_step']}; the resume command took "
        f"{r['driver_killed']['resume_command_seconds']:.1f} s in all |",
        f"| NaN input batch at worker {r['rank']}, `train.nonfinite=skip` | {acc('nan_batch_skipped'):.4f} | "
        f"{r['nan_batch_skipped']['accuracy_difference_points']:+.2f} | one batch skipped by every stage |",
        f"| NaN synthesizer at worker {r['rank']}, `train.nonfinite=reset` | {acc('synthesizer_reset'):.4f} | "
        f"{r['synthesizer_reset']['accuracy_difference_points']:+.2f} | synthesizer re-initialised, batch skipped |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
