"""`dni submit` and the local multi-node cluster: the command built, its errors, and a real job."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from dni.cli import main
from dni.config import ConfigError
from dni.submit import submit_argv, submit_env

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")


def test_the_job_runs_dni_train_on_the_runtime_from_the_uploaded_working_dir() -> None:
    argv = submit_argv(DEBUG, ["train.epochs=2"], address="http://127.0.0.1:8265", working_dir=str(ROOT))
    job, entrypoint = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    assert job[1:5] == ["-m", "ray.scripts.scripts", "job", "submit"] and "--no-wait" not in job
    env = json.loads(job[job.index("--runtime-env-json") + 1])
    assert env["working_dir"] == str(ROOT) and {".venv", ".git", "runs"} <= set(env["excludes"])
    assert entrypoint == ["python3", "-m", "dni.cli", "train", "configs/debug.yaml", "backend=ray", "train.epochs=2",
                          "log.dir=~/dni-runs", "--no-progress"]
    kept = submit_argv(DEBUG, ["log.dir=/shared/runs"], address="x", working_dir=str(ROOT), wait=False)
    assert "--no-wait" in kept and kept.count("log.dir=/shared/runs") == 1 and "log.dir=~/dni-runs" not in kept


def test_a_bad_config_or_one_outside_the_working_dir_fails_before_anything_is_sent(tmp_path: Path,
                                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", DEBUG, "train.epoch=2"]) == 2
    assert "train.epoch" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="must lie inside the working directory"):
        submit_argv(DEBUG, [], address="x", working_dir=str(tmp_path))


def test_submit_where_no_cluster_listens_fails_in_one_line_saying_what_to_run(
        capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{s.getsockname()[1]}"
    started = time.monotonic()
    assert main(["submit", DEBUG, "--address", address]) == 1
    assert time.monotonic() - started < 5
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"dni: error: no Ray dashboard answers at {address}")
    hints = ("ray start --head", "bash launch/local_cluster.sh up", "ray dashboard launch/cluster.yaml")
    assert all(hint in line for hint in hints)


def test_token_authentication_is_on_by_default_and_a_missing_token_is_explained(tmp_path: Path) -> None:
    pytest.importorskip("aiohttp")
    with pytest.raises(ConfigError, match=r"no token was found .*ray get-auth-token.*RAY_AUTH_MODE=disabled"):
        submit_env({"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")})
    assert submit_env({"RAY_AUTH_TOKEN": "secret"})["RAY_AUTH_MODE"] == "token"
    assert submit_env({"RAY_AUTH_MODE": "disabled"})["RAY_AUTH_MODE"] == "disabled"


@pytest.fixture
def local_cluster():
    """Three raylets on this machine (a head without CPUs and two worker nodes), torn down after."""
    pytest.importorskip("ray")
    pytest.importorskip("aiohttp")  # the dashboard's job server needs ray[default]
    folder = tempfile.mkdtemp(prefix="dnic-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "DNI_CLUSTER_DIR": folder, "DNI_CLUSTER_PORT": "6391", "DNI_DASHBOARD_PORT": "8266",
           "DNI_AGENT_PORT": "52410"}
    script = ["bash", str(ROOT / "launch" / "local_cluster.sh")]
    try:
        subprocess.run([*script, "up", "2", "2"], env=env, check=True, timeout=150)
        yield "http://127.0.0.1:8266"
    finally:
        subprocess.run([*script, "down"], env=env, check=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def test_dni_submit_runs_a_job_on_a_local_multi_node_cluster(local_cluster: str, idx_folder: str, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    code = main(["submit", DEBUG, "--address", local_cluster, "--working-dir", str(ROOT), "data.name=idx",
                 f"data.path={idx_folder}", "data.val_size=64", "train.batch_size=64", "train.epochs=2",
                 "runtime.placement_strategy=SPREAD", f"log.dir={runs}"])
    assert code == 0
    (run_dir,) = runs.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["backend"] == "ray" and summary["steps"] == 18
    assert len(set(summary["nodes"])) == 2  # three stage workers spread over the two worker nodes
