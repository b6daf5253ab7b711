"""The Ray runtime on one small local cluster shared by the session (``ray_cluster``, 4 logical GPUs:
one-stage-per-GPU placement is tested without a GPU; workers still compute on the CPU)."""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from conftest import losses, runtime_config, train_locally  # noqa: E402
from dni.checkpoint import load_latest  # noqa: E402
from dni.cli import main  # noqa: E402
from dni.run import create_run_dir  # noqa: E402
from workers.coordinator import (  # noqa: E402
    ClusterError, Coordinator, PlacementError, WorkerError, check_reachable, oversubscribed)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cluster(ray_cluster):
    return ray_cluster


def test_each_stage_gets_its_own_gpu_bundle(cluster, idx_folder: str, tmp_path: Path) -> None:
    cfg = runtime_config(idx_folder, backend="ray", log={"dir": str(tmp_path)}, runtime={"gpus_per_stage": 1})
    coord = Coordinator(cfg, create_run_dir(cfg))
    try:
        coord.start()
        placed = ray.get([a.resources.remote() for a in coord.actors])
    finally:
        coord.shutdown()
    gpu_ids = [tuple(p["gpu_ids"]) for p in placed]
    assert len(placed) == 3 and all(len(g) == 1 for g in gpu_ids) and len(set(gpu_ids)) == 3


def test_infeasible_placement_fails_fast_with_a_clear_message(cluster, idx_folder: str, tmp_path: Path) -> None:
    cfg = runtime_config(idx_folder, backend="ray", log={"dir": str(tmp_path)}, runtime={"gpus_per_stage": 2})
    started = time.monotonic()
    with pytest.raises(PlacementError, match=r"needs 6 GPU \(3 stage workers x 2\) but the cluster has 4"):
        Coordinator(cfg, create_run_dir(cfg)).start()
    assert time.monotonic() - started < 10
    spread = runtime_config(idx_folder, backend="ray", log={"dir": str(tmp_path)},
                            runtime={"placement_strategy": "STRICT_SPREAD", "timeout_s": 2})
    with pytest.raises(PlacementError, match="could not be placed within 2 s"):
        Coordinator(spread, create_run_dir(spread)).start()


RESMLP = {"kind": "custom", "factory": f"{Path(__file__).resolve().parents[1] / 'configs' / 'models' / 'resmlp.py'}:small"}


@pytest.mark.parametrize("extra", [{}, {"model": RESMLP}, {"synthesizer": {"gate": "fit"}}],
                         ids=["fcn", "custom-resmlp", "fcn-gate-fit"])
def test_lock_step_runtime_reproduces_the_reference_trainer(cluster, idx_folder: str, tmp_path: Path,
                                                            extra: dict) -> None:
    sections = dict(log={"dir": str(tmp_path), "every": 1}, runtime={"max_in_flight": 1}, **extra)
    ray_cfg = runtime_config(idx_folder, backend="ray", **sections)
    ray_dir = create_run_dir(ray_cfg)
    summary = Coordinator(ray_cfg, ray_dir).run()
    # As each worker: one thread, the same sums.
    local_dir, local = train_locally(runtime_config(idx_folder, backend="local", threads=1, **sections))
    got, want = dict(losses(ray_dir)), dict(losses(local_dir))
    assert len(got) == len(want) == 18  # (640 - 64 held out) // 64 = 9 steps per epoch
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7)
    assert summary["test_accuracy"] == pytest.approx(local["test_accuracy"])
    state = load_latest(ray_dir / "checkpoints")
    assert state["step"] == 18 and len(state["stages"]) == 3


def test_a_custom_model_from_yaml_on_ray_matches_the_local_backend(cluster, idx_folder: str, tmp_path: Path) -> None:
    from test_custom_model import train_custom_from_yaml

    on_ray = train_custom_from_yaml(idx_folder, tmp_path / "ray", "backend=ray", "train.epochs=3")
    local = train_custom_from_yaml(idx_folder, tmp_path / "local", "train.epochs=3")
    assert on_ray["backend"] == "ray" and on_ray["model"] == "custom:small" and on_ray["stages"] == 3
    # Backprop through the pipeline is lock-step: the same run, worker by worker.
    assert on_ray["test_accuracy"] == pytest.approx(local["test_accuracy"]) and local["test_accuracy"] > 0.5


def test_dni_train_with_backend_ray_end_to_end(cluster, idx_folder: str, tmp_path: Path) -> None:
    code = main(["train", str(Path(__file__).parents[1] / "configs" / "debug.yaml"), "backend=ray",
                 "data.name=idx", f"data.path={idx_folder}", "data.val_size=64", "train.batch_size=64",
                 "train.epochs=3", "sync.true_every=4", "log.every=5", f"log.dir={tmp_path}", "--no-progress"])
    assert code == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["backend"] == "ray" and summary["steps"] == 27
    assert set(summary["busy_fraction"]) == {"stage_0", "stage_1", "stage_2"}
    assert all(0 < v <= 1 for v in summary["busy_fraction"].values())
    assert set(summary["hop_latency_ms"]) == {"stage_0", "stage_1"} and summary["bytes_sent"] > 0
    assert summary["test_accuracy"] > 0.45  # chance is 1/3 on the fixture
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for i in (0, 1):
        assert {f"sg/cosine/stage_{i}", f"sg/rel_error/stage_{i}", f"sg/loss/stage_{i}",
                f"stage/staleness/stage_{i}", f"stage/busy_fraction/stage_{i}"} <= tags
    assert {"train/loss", "test/accuracy", "train/samples_per_second", "stage/busy_fraction/stage_2"} <= tags
    assert "sg/log10_loss/stage_0" in tags and not [t for t in tags if t.startswith("hparam/")]
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["10 backend"].string_value == "ray"


def test_a_numerical_fault_in_a_worker_stops_the_run_naming_stage_and_fault(cluster, idx_folder: str, tmp_path: Path) -> None:
    cfg = runtime_config(idx_folder, backend="ray", log={"dir": str(tmp_path)}, train={"lr": 1e30},
                         runtime={"poll_s": 0.1, "timeout_s": 30})
    with pytest.raises(WorkerError, match=r"stage worker \d \(stage \d, replica 0\) failed: non-finite .* at stage \d"):
        Coordinator(cfg, create_run_dir(cfg)).run()


def test_non_finite_errors_survive_pickling() -> None:
    import pickle

    from dni.engine import apply_nonfinite
    from dni.stage import NonFiniteError

    with pytest.raises(NonFiniteError) as raised:
        apply_nonfinite("stop", NonFiniteError(2, "loss"), None, step=7, stopped="a checkpoint at ck.pt")
    e = pickle.loads(pickle.dumps(raised.value))
    assert (e.stage, e.what) == (2, "loss") and "step 8" in str(e) and "ck.pt" in str(e)


def test_the_progress_display_follows_the_last_stage_step_by_step(cluster, idx_folder: str, tmp_path: Path) -> None:
    cfg = runtime_config(idx_folder, backend="ray", log={"dir": str(tmp_path)}, train={"epochs": 20},
                         runtime={"poll_s": 0.1})
    calls: list[tuple[int, int]] = []
    Coordinator(cfg, create_run_dir(cfg), progress=lambda step, total, latest: calls.append((step, total))).run()
    steps = [step for step, _ in calls]
    assert {total for _, total in calls} == {180}  # 9 steps per epoch
    assert steps[0] < 90 and steps[-1] == 180 and len(steps) >= 4  # from the start, not from the first metrics
    assert steps == sorted(set(steps))


def test_oversubscription_is_warned_with_the_numbers() -> None:
    assert oversubscribed(5, 1.0, 2) == ("5 stage workers x 1 CPU on a machine with 2 CPUs: they will share cores "
                                         "(expect each stage to run slower)")
    assert oversubscribed(2, 0.5, 2) is None and oversubscribed(2, 1.0, 2) is None


def test_an_unreachable_cluster_address_fails_in_seconds_saying_what_to_run() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ClusterError, match=rf"no Ray cluster answers at {address} .*ray start --head") as err:
        check_reachable(address)
    assert "\n" not in str(err.value)
    check_reachable("auto")  # left to Ray


def _dni_train_on_a_terminal(args: list[str], env: dict[str, str]) -> str:
    """Run ``dni train ARGS`` with stdout and stderr on a pseudo-terminal; returns all it wrote."""
    main_fd, sub_fd = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dni.cli", "train", *args], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=sub_fd, stderr=sub_fd)
    os.close(sub_fd)
    out, deadline = b"", time.monotonic() + 150
    try:
        while time.monotonic() < deadline:
            if not select.select([main_fd], [], [], 1.0)[0]:
                if proc.poll() is not None:
                    break  # exited, and nothing more to read
                continue
            try:
                chunk = os.read(main_fd, 4096)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(main_fd)
        proc.wait(timeout=120)
    assert proc.returncode == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def test_dni_train_on_ray_prints_only_what_dni_has_to_say(idx_folder: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a new local instance, not the tests' one
    out = _dni_train_on_a_terminal(
        [str(ROOT / "configs" / "debug.yaml"), "backend=ray", "data.name=idx", f"data.path={idx_folder}",
         "data.val_size=64", f"log.dir={tmp_path}", "--no-progress"], env)
    assert "\x1b" not in out, repr(out)  # no bar: no escape sequence at all, at exit neither
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines and all(line.startswith(("dni: ", "debug: ", "run directory: ")) for line in lines), out
    assert "authentication_token_setup" not in out and "Started a local Ray instance" not in out


def test_ray_log_level_info_brings_ray_start_up_lines_back() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code = ("import ray; from dni.config import RuntimeConfig; from workers.coordinator import ensure_ray; "
            "ensure_ray(RuntimeConfig(ray_log_level='info'), cpus_needed=1); ray.shutdown()")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Started a local Ray instance" in done.stderr
