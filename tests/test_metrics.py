"""The logging interface: derived tags, the HPARAMS table, read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dni.metrics import JsonlSink, MetricsLogger, TensorBoardSink, hparam_metrics, hparam_table, with_log10_losses


def test_small_synthesizer_losses_are_also_logged_as_log10() -> None:
    scalars = {"sg/loss/stage_0": 1.2e-4, "sg/loss/stage_1": 0.0, "train/loss": 2.0}
    out = with_log10_losses(scalars)
    assert math.isclose(out["sg/log10_loss/stage_0"], math.log10(1.2e-4))
    assert "sg/log10_loss/stage_1" not in out  # log10(0) is no number to plot
    assert with_log10_losses({"train/loss": 2.0}) == {"train/loss": 2.0}


def test_log10_losses_reach_every_sink(tmp_path: Path) -> None:
    logger = MetricsLogger([JsonlSink(tmp_path / "metrics.jsonl"), TensorBoardSink(tmp_path)])
    logger.log(1, {"sg/loss/stage_0": 1e-4})
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["sg/log10_loss/stage_0"] == -4.0
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.value for e in events.Scalars("sg/log10_loss/stage_0")] == [-4.0]


def test_hparam_table_leads_with_what_matters_in_order() -> None:
    config = {"backend": "local", "bench.out": "results/bench", "method": "dni", "model.kind": "fcn",
              "model.depth": 4, "model.boundaries": None, "seed": 0, "stages": [], "synthesizer.lr": 1e-4,
              "train.lr": 3e-5, "train.batch_size": 256, "train.optimizer": "adam", "log.progress": True}
    summary = {"model": "fcn-4", "stages": 5, "backend": "ray"}
    rows = hparam_table(config, summary)
    assert [(name, shown) for name, shown, _ in rows[:10]] == [
        ("01 method", "method"), ("02 model", "model"), ("03 model.depth", "model.depth"), ("04 stages", "stages"),
        ("05 train.lr", "train.lr"), ("06 synthesizer.lr", "synthesizer.lr"),
        ("07 train.batch_size", "train.batch_size"), ("08 train.optimizer", "train.optimizer"),
        ("09 seed", "seed"), ("10 backend", "backend"),
    ]
    values = {shown: v for _, shown, v in rows}
    assert values["model"] == "fcn-4" and values["stages"] == 5 and values["backend"] == "ray"
    assert values["model.boundaries"] == "none" and values["log.progress"] == "true"
    assert sorted(name for name, _, _ in rows) == [name for name, _, _ in rows[:10]] + sorted(
        ["bench.out", "model.kind", "model.boundaries", "log.progress"])  # TensorBoard's sort keeps this order


def test_hparam_metrics_are_those_the_summary_has() -> None:
    summary = {"test_accuracy": 0.9, "test_loss": 0.3, "val_accuracy": None, "train_loss": float("nan")}
    assert hparam_metrics(summary) == ["test/accuracy", "test/loss"]
