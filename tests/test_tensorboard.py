"""`dni tensorboard` as a real process: runs named by their folder, nothing left serving after SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from dni.cli import tensorboard_argv
from dni.metrics import MetricsLogger, TensorBoardSink


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (TensorBoard and its data server), from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def make_run(run_dir: Path) -> Path:
    logger = MetricsLogger([TensorBoardSink(run_dir)])
    for step in range(1, 4):
        logger.log(step, {"train/loss": 1.0 / step})
    logger.close()
    return run_dir


def test_tensorboard_shows_each_run_by_its_folder_name(tmp_path: Path) -> None:
    a, b, links = tmp_path / "exp-a", tmp_path / "other" / "exp-a", tmp_path / "links"
    b.mkdir(parents=True), a.mkdir(), links.mkdir()
    argv = tensorboard_argv([str(a), str(b)], port=7007, logdir=links)
    assert argv[1:3] == ["-m", "tensorboard.main"] and argv[argv.index("--logdir") + 1] == str(links)
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "7007"
    assert sorted(p.name for p in links.iterdir()) == ["exp-a", "exp-a-2"]
    assert (links / "exp-a").resolve() == a.resolve() and (links / "exp-a-2").resolve() == b.resolve()


def test_sigterm_to_dni_tensorboard_stops_tensorboard(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "mnist-fcn4-20260101-000000")
    port = free_port()
    dni = subprocess.Popen([sys.executable, "-m", "dni.cli", "tensorboard", str(run_dir), "--port", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    children: set[int] = set()
    try:
        runs, deadline = None, time.monotonic() + 90  # TensorBoard takes seconds to start on a busy machine
        while time.monotonic() < deadline and not runs:
            assert dni.poll() is None, dni.stderr.read().decode() if dni.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as r:
                    runs = json.loads(r.read())
            except OSError:
                pass
            time.sleep(0.5)
        assert runs == [run_dir.name]  # not "mnist-fcn4-.../."
        children = descendants(dni.pid)
        assert children, "TensorBoard runs as a child of dni"
        dni.send_signal(signal.SIGTERM)
        assert dni.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10  # the data server exits once TensorBoard's pipe to it closes
        while time.monotonic() < deadline and any(alive(p) for p in children):
            time.sleep(0.2)
        assert not [p for p in children if alive(p)]
        assert not answers(port)
    finally:
        if dni.poll() is None:
            dni.kill()
        for p in children | descendants(dni.pid):
            if alive(p):
                os.kill(p, signal.SIGKILL)
