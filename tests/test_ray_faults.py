"""Failures on the Ray runtime: a killed stage worker, a killed driver, numerical faults.

The runtime is deterministic (a stage blocks only at fixed points of its schedule) and
checkpoints are consistent cuts, so a run restarted from a checkpoint must end exactly
where the uninterrupted run ends: these tests compare losses and accuracy for equality.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

ray = pytest.importorskip("ray")

from conftest import all_finite, losses, metric_rows, runtime_config  # noqa: E402
from dni.checkpoint import CheckpointError, list_checkpoints, load_latest  # noqa: E402
from dni.cli import main  # noqa: E402
from dni.config import Config  # noqa: E402
from dni.run import create_run_dir  # noqa: E402
from dni.trainer import Trainer  # noqa: E402
from workers.coordinator import Coordinator, WorkerError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 54  # 6 epochs of 9 steps; a consistent checkpoint every 9


def fault_config(idx_folder: str, log_dir: Path, **sections: Any) -> Config:
    base: dict[str, Any] = dict(
        backend="ray", log={"dir": str(log_dir), "every": 1}, train={"epochs": 6}, checkpoint={"every": 9, "keep": 3},
        sync={"true_every": 4}, runtime={"poll_s": 0.1, "timeout_s": 30},
    )
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return runtime_config(idx_folder, **base)


@pytest.fixture(scope="module")
def reference(ray_cluster, idx_folder: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The uninterrupted run every failure test must reproduce."""
    cfg = fault_config(idx_folder, tmp_path_factory.mktemp("reference"))
    run_dir = create_run_dir(cfg)
    summary = Coordinator(cfg, run_dir).run()
    assert [s for s, _ in losses(run_dir)] == list(range(1, STEPS + 1))
    return run_dir, summary


def kill_process_of(actor: Any) -> float:
    """SIGKILL the worker's process (as if it crashed); returns when."""
    pid = ray.get(actor.pid.remote(), timeout=10)
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def test_a_killed_stage_worker_is_replaced_and_the_run_ends_as_if_uninterrupted(
        reference, idx_folder: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = fault_config(idx_folder, tmp_path)
    run_dir = create_run_dir(cfg)
    killed: list[float] = []

    def kill_once(step: int, total: int, latest: dict) -> None:
        if step >= 20 and coord.last_checkpoint >= 9 and not killed:
            killed.append(kill_process_of(coord.actors[1]))

    coord = Coordinator(cfg, run_dir, progress=kill_once)
    summary = coord.run()
    (restart,) = coord.restarts
    assert "stage worker" in restart["failure"] and restart["from_step"] in (9, 18, 27)
    assert restart["resumed"] - killed[0] < 30  # noticed and replaced within seconds
    assert summary["restarts"][0]["from_step"] == restart["from_step"]
    assert "the pipeline restarted from step" in capsys.readouterr().err
    ref_dir, ref_summary = reference
    assert losses(run_dir) == losses(ref_dir)  # every step once, with the very same values
    assert summary["test_accuracy"] == ref_summary["test_accuracy"]
    assert [r["step"] for r in metric_rows(run_dir) if "run/restarts" in r] == [restart["from_step"]]


def test_failures_beyond_the_budget_stop_the_run_with_the_checkpoint_kept(ray_cluster, idx_folder: str,
                                                                           tmp_path: Path) -> None:
    cfg = fault_config(idx_folder, tmp_path, runtime={"max_restarts": 1})
    run_dir = create_run_dir(cfg)
    killed: set[Any] = set()

    def kill_every_pipeline(step: int, total: int, latest: dict) -> None:
        actor = coord.actors[1] if coord.actors else None
        if step >= 20 and actor is not None and actor not in killed:
            killed.add(actor)
            kill_process_of(actor)

    coord = Coordinator(cfg, run_dir, progress=kill_every_pipeline)
    started = time.monotonic()
    with pytest.raises(WorkerError, match=r"stage worker \d \(stage \d, replica 0\) failed.*last checkpoint is step "
                                          r"\d+ in .*1 of runtime.max_restarts=1 restarts used; resume with"):
        coord.run()
    assert time.monotonic() - started < 90
    assert len(coord.restarts) == 1 and load_latest(run_dir / "checkpoints")["step"] >= 9


def test_a_killed_driver_resumes_with_the_same_steps_and_one_continuous_history(
        reference, idx_folder: str, tmp_path: Path) -> None:
    cfg = fault_config(idx_folder, tmp_path)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    driver = subprocess.Popen([sys.executable, "-m", "dni.cli", "train", str(config_file), "--no-progress"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any(len(list_checkpoints(d / "checkpoints")) >= 2 for d in tmp_path.iterdir() if d.is_dir()):
            assert driver.poll() is None and time.monotonic() < deadline, driver.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        driver.kill()  # the driver only: SIGKILL, no chance to clean up
        driver.wait(timeout=10)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # then what Ray left behind of that session
        except ProcessLookupError:
            pass
    (run_dir,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    saved = list_checkpoints(run_dir / "checkpoints")
    assert not (run_dir / "summary.json").exists() and len(saved) >= 2
    saved[-1].write_bytes(saved[-1].read_bytes()[:100])  # and the newest checkpoint got truncated
    previous = int(saved[-2].stem.split("-")[1])

    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == previous and summary["steps"] == STEPS
    ref_dir, ref_summary = reference
    assert losses(run_dir) == losses(ref_dir)  # steps 1..54 once each, the same values
    assert summary["test_accuracy"] == ref_summary["test_accuracy"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))


def test_resume_refuses_a_checkpoint_of_another_backend(idx_folder: str, tmp_path: Path) -> None:
    local = fault_config(idx_folder, tmp_path, train={"epochs": 1}, backend="local")
    run_dir = create_run_dir(local)
    Trainer(local, run_dir).fit()
    with pytest.raises(CheckpointError, match="written by backend: local; resume it with backend: local"):
        Coordinator(fault_config(idx_folder, tmp_path), run_dir, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoints to resume from"):
        Coordinator(fault_config(idx_folder, tmp_path), tmp_path / "elsewhere", resume=True)


def nonfinite_steps(run_dir: Path, stage: int) -> list[int]:
    return [r["step"] for r in metric_rows(run_dir) if r.get(f"nonfinite/stage_{stage}")]


@pytest.mark.parametrize("method", ["cdni", "backprop"])
def test_skip_policy_drops_a_poisoned_batch_in_every_stage_and_runs_on(ray_cluster, idx_folder: str, tmp_path: Path,
                                                                      method: str) -> None:
    cfg = fault_config(idx_folder, tmp_path, method=method, model={"depth": 3}, train={"epochs": 2, "nonfinite": "skip"})
    run_dir = create_run_dir(cfg)
    coord = Coordinator(cfg, run_dir)
    coord.start()
    ray.get([coord.actors[2].inject_fault.remote(7, "input"),  # step 7 also carries a level-2 round
             coord.actors[0].inject_fault.remote(12, "input")])
    summary = coord.run()
    assert nonfinite_steps(run_dir, 2) == [8] and nonfinite_steps(run_dir, 0) == [13]
    trained = [s for s, _ in losses(run_dir)]
    assert trained == [s for s in range(1, 19) if s not in (8, 13)]  # the two batches skipped everywhere
    assert all(torch.isfinite(torch.tensor(v)) for _, v in losses(run_dir))
    assert summary["steps"] == 18 and "test_accuracy" in summary
    for replicas in load_latest(run_dir / "checkpoints")["stages"]:
        assert all_finite(replicas[0]["module"])


def test_reset_policy_restarts_a_spoilt_synthesizer_and_runs_on(ray_cluster, idx_folder: str, tmp_path: Path) -> None:
    cfg = fault_config(idx_folder, tmp_path, train={"epochs": 2, "nonfinite": "reset"})
    run_dir = create_run_dir(cfg)
    coord = Coordinator(cfg, run_dir)
    coord.start()
    ray.get(coord.actors[1].inject_fault.remote(5, "synthesizer"))
    coord.run()
    assert nonfinite_steps(run_dir, 1) == [6]
    assert [s for s, _ in losses(run_dir)] == [s for s in range(1, 19) if s != 6]
    synth = load_latest(run_dir / "checkpoints")["stages"][1][0]["synthesizer"]
    assert all_finite(synth)


def test_an_interrupted_driver_stops_at_a_common_boundary_with_a_checkpoint_and_resumes_exactly(
        ray_cluster, idx_folder: str, tmp_path: Path) -> None:
    # One target in flight and no level-2 rounds: the cut at the stop drains nothing, so the
    # resumed run must equal the uninterrupted one (with more in flight it equals a run with a
    # checkpoint at that step).
    def config(log_dir: Path) -> Config:
        return fault_config(idx_folder, log_dir, train={"epochs": 10}, checkpoint={"every": 0},
                            sync={"true_every": 0}, runtime={"max_in_flight": 1})

    cfg, ref_cfg = config(tmp_path / "runs"), config(tmp_path / "ref")
    ref_dir = create_run_dir(ref_cfg)
    ref_summary = Coordinator(ref_cfg, ref_dir).run()
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    driver = subprocess.Popen([sys.executable, "-m", "dni.cli", "train", str(config_file), "--no-progress"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any((d / "metrics.jsonl").is_file() and (d / "metrics.jsonl").read_text().count("\n") >= 10
                      for d in (tmp_path / "runs").glob("*")):
            assert driver.poll() is None and time.monotonic() < deadline, driver.stderr.read()[-2000:]
            time.sleep(0.02)
        driver.send_signal(signal.SIGINT)  # the driver only, as `kill -INT`
        _, err = driver.communicate(timeout=120)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # what Ray left behind of that session
        except ProcessLookupError:
            pass
    (run_dir,) = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]
    assert driver.returncode == 130, err[-2000:]
    assert err.rstrip().endswith(f"checkpoint written; resume with: dni train --resume {run_dir}"), err[-2000:]
    stopped = json.loads((run_dir / "summary.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["checkpoint"] == stopped["step"] < 90
    assert [int(p.stem.split("-")[1]) for p in list_checkpoints(run_dir / "checkpoints")] == [stopped["step"]]

    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] == stopped["step"]
    assert losses(run_dir) == losses(ref_dir)  # steps 1..90 once each, the same values
    assert summary["test_accuracy"] == ref_summary["test_accuracy"]


def test_on_ray_an_impossible_placement_leaves_no_run_directory_and_a_later_failure_a_failed_summary(
        ray_cluster, idx_folder: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def train(log_dir: Path, **sections: Any) -> int:
        config_file = tmp_path / f"{log_dir.name}.yaml"
        config_file.write_text(yaml.safe_dump(fault_config(idx_folder, log_dir, **sections).to_dict()))
        return main(["train", str(config_file), "--no-progress"])

    assert train(tmp_path / "unplaceable", runtime={"gpus_per_stage": 2}) == 1  # 3 workers x 2 GPUs; the cluster has 4
    assert "dni: error: the pipeline needs 6 GPU" in capsys.readouterr().err
    assert not (tmp_path / "unplaceable").exists()
    assert train(tmp_path / "diverging", train={"lr": 1e30, "nonfinite": "stop"}) == 1
    err = capsys.readouterr().err
    (run_dir,) = list((tmp_path / "diverging").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["error"] and "\n" not in summary["error"]
    assert f"dni: run directory {run_dir}" in err and f"dni: error: {summary['error']}" in err
