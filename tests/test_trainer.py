"""The reference trainer: determinism, checkpoints and exact resume, run-directory contents."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import all_finite, crash_and_resume, losses, metric_rows, random_splits, tiny_config
from dni.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, load_latest, save_checkpoint
from dni.config import Config, ConfigError
from dni.run import Interrupted, create_run_dir
from dni.trainer import Trainer


def run(cfg: Config, tmp_path: Path, *, resume: Path | None = None) -> tuple[Trainer, dict]:
    run_dir = resume or create_run_dir(cfg)
    t = Trainer(cfg, run_dir, splits=random_splits())
    if resume is not None:
        t.resume()
    return t, t.fit()


def params(t: Trainer) -> list[torch.Tensor]:
    return [q.detach().clone() for s in t.pipeline.stages for q in s.module.parameters()]


@pytest.mark.parametrize("method", ["backprop", "dni", "cdni"])
def test_same_seed_gives_identical_runs(method: str, tmp_path: Path) -> None:
    cfg = tiny_config(method=method, log={"dir": str(tmp_path)})
    a, sa = run(cfg, tmp_path)
    b, sb = run(cfg, tmp_path)
    assert sa["test_accuracy"] == sb["test_accuracy"]
    assert losses(a.run_dir) == losses(b.run_dir)
    for x, y in zip(params(a), params(b)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_resume_after_an_interruption_continues_exactly(tmp_path: Path) -> None:
    cfg = tiny_config(log={"dir": str(tmp_path)}, train={"epochs": 3}, synthesizer={"p_update": 0.7}, checkpoint={"every": 4})
    full, full_summary = run(cfg, tmp_path)
    # killed mid-epoch (6 steps per epoch), after the checkpoint of step 8
    interrupted, resumed = crash_and_resume(cfg, random_splits, at=10)
    assert resumed.step == 8
    summary = resumed.fit()
    assert summary["steps"] == full_summary["steps"] == 18
    assert summary["test_accuracy"] == full_summary["test_accuracy"]
    for x, y in zip(params(full), params(resumed)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # The metrics history continues with no gap and no duplicate.
    assert losses(interrupted.run_dir) == losses(full.run_dir)


def test_a_stop_request_checkpoints_the_current_step_and_resuming_continues_exactly(tmp_path: Path) -> None:
    cfg = tiny_config(log={"dir": str(tmp_path)}, train={"epochs": 3}, checkpoint={"every": 0})
    full, full_summary = run(cfg, tmp_path)

    def stop_at_step_7(step: int, total: int, latest: dict) -> None:
        if step == 7:  # as the signal handler does: a flag, acted on once the step is done
            interrupted.request_stop()

    interrupted = Trainer(cfg, create_run_dir(cfg), splits=random_splits(), progress=stop_at_step_7)
    with pytest.raises(Interrupted) as stop:
        interrupted.fit()
    assert (stop.value.step, stop.value.checkpoint, stop.value.saved) == (7, 7, True)
    assert [p.name for p in list_checkpoints(interrupted.run_dir / "checkpoints")] == ["step-00000007.pt"]
    resumed = Trainer(cfg, interrupted.run_dir, splits=random_splits())
    resumed.resume()
    summary = resumed.fit()
    assert summary["status"] == "completed" and summary["test_accuracy"] == full_summary["test_accuracy"]
    for x, y in zip(params(full), params(resumed)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert losses(interrupted.run_dir) == losses(full.run_dir)


def test_run_directory_holds_config_summary_metrics_events_and_checkpoint(tmp_path: Path) -> None:
    t, summary = run(tiny_config(log={"dir": str(tmp_path)}), tmp_path)
    names = {p.name for p in t.run_dir.iterdir()}
    assert {"config.yaml", "summary.json", "metrics.jsonl", "checkpoints"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    on_disk = json.loads((t.run_dir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("method", "model", "dataset", "seed", "epochs", "steps", "test_accuracy", "test_error",
                "wall_seconds", "samples_per_second"):
        assert key in on_disk
    assert on_disk["steps"] == 12 and on_disk["epochs"] == 2
    # The summary's accuracy is the final model's on the test split.
    test = t.splits.test
    assert on_disk["test_accuracy"] == t.pipeline.evaluate([(test.images, test.labels)])["accuracy"]
    assert on_disk["test_error"] == pytest.approx(1 - on_disk["test_accuracy"])
    assert set(on_disk["sg_cosine"]) == {"stage_0", "stage_1"}
    state = load_checkpoint(list_checkpoints(t.run_dir / "checkpoints")[-1])
    assert state["step"] == 12 and len(state["stages"]) == 3


def test_corrupted_checkpoint_gives_a_clear_error_and_the_previous_one_is_used(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder, 1, {"x": torch.ones(3)}, keep=5)
    newest = save_checkpoint(folder, 2, {"x": torch.zeros(3)}, keep=5)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a crash or a full disk
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*step-00000002.pt: corrupted or truncated, "
                                         "or not a checkpoint .*; trying step-00000001.pt instead"):
        state = load_latest(folder)
    assert state["step"] == 1
    torch.testing.assert_close(state["x"], torch.ones(3))


def test_an_unreadable_checkpoint_is_one_short_line_in_dnis_words(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    for step in (1, 2):
        path = save_checkpoint(folder, step, {"x": torch.ones(3)}, keep=5)
        path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning), pytest.raises(CheckpointError) as error:
        load_latest(folder)
    message = str(error.value)
    assert "\n" not in message and "weights_only" not in message and len(message) < 600, message
    assert message.count("step-00000002.pt: corrupted or truncated") == 1 and "step-00000001.pt" in message
    assert message.count("PytorchStreamReader") == 2 and "start afresh with `dni train CONFIG`" in message


def test_checkpoints_are_versioned_pruned_and_safe(tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    for step in range(5):
        save_checkpoint(folder, step, {"x": torch.tensor(step)}, keep=2)
    assert [p.name for p in list_checkpoints(folder)] == ["step-00000003.pt", "step-00000004.pt"]
    assert not list(folder.glob(".tmp-*"))
    bad = folder / "step-00000009.pt"
    torch.save({"format_version": 99, "step": 9}, bad)
    with pytest.raises(CheckpointError, match="checkpoint format 99 but this dni reads format 1"):
        load_latest(folder)
    evil = folder / "step-00000010.pt"
    torch.save({"format_version": 1, "obj": Path("x")}, evil)  # an arbitrary object: refused by weights_only
    with pytest.raises(CheckpointError, match="objects other than tensors") as refused:
        load_checkpoint(evil)
    assert "weights_only" not in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(CheckpointError, match="no checkpoints to resume from"):
        load_latest(tmp_path / "empty")


def nan_splits(at: int = 20):
    """The tiny data with one poisoned training image (NaN pixels)."""
    splits = random_splits()
    splits.train.images[at] = float("nan")
    return splits


def test_nonfinite_stop_policy_stops_with_a_checkpoint_and_says_where(tmp_path: Path) -> None:
    from dni.stage import NonFiniteError

    cfg = tiny_config(log={"dir": str(tmp_path)})
    t = Trainer(cfg, create_run_dir(cfg), splits=nan_splits())
    with pytest.raises(NonFiniteError, match=r"non-finite activation at stage 0, step \d+; stopped with a checkpoint"):
        t.fit()
    state = load_latest(t.run_dir / "checkpoints")
    assert all(all_finite(s["module"]) for s in state["stages"])


def test_nonfinite_skip_policy_skips_the_batch_and_keeps_the_model_finite(tmp_path: Path) -> None:
    cfg = tiny_config(log={"dir": str(tmp_path), "every": 1}, train={"nonfinite": "skip"})
    t = Trainer(cfg, create_run_dir(cfg), splits=nan_splits())
    summary = t.fit()
    assert summary["steps"] == 12
    test = t.splits.test
    assert summary["test_accuracy"] == t.pipeline.evaluate([(test.images, test.labels)])["accuracy"]
    assert all(torch.isfinite(q).all() for q in params(t))
    rows = metric_rows(t.run_dir)
    assert sum(1 for r in rows if r.get("nonfinite/stage_0")) == 2  # the poisoned batch, once per epoch


def test_nonfinite_reset_policy_restarts_a_spoilt_synthesizer(tmp_path: Path) -> None:
    cfg = tiny_config(log={"dir": str(tmp_path), "every": 1}, train={"nonfinite": "reset", "max_steps": 4})
    t = Trainer(cfg, create_run_dir(cfg), splits=random_splits())
    synth = t.pipeline.stages[1].synthesizer
    with torch.no_grad():
        synth.out.weight.fill_(float("nan"))  # a spoilt synthesizer
    t.fit()
    assert torch.isfinite(synth.out.weight).all()
    rows = metric_rows(t.run_dir)
    assert [r["step"] for r in rows if r.get("nonfinite/stage_1")] == [1]
    assert all(torch.isfinite(q).all() for q in params(t))


def test_the_learning_rate_schedules_and_their_warm_up() -> None:
    from dni.stage import lr_factor

    assert [lr_factor("constant", s, 10) for s in (0, 9)] == [1.0, 1.0]
    assert lr_factor("cosine", 0, 10) == 1.0 and lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert [lr_factor("step", s, 10) for s in (5, 6, 8)] == [1.0, 0.1, 0.01]
    # Warm-up: linear from 1/warmup at step 0 to the schedule's value at step warmup - 1, then the schedule.
    assert [lr_factor("constant", s, 10, warmup=4) for s in (0, 1, 3, 4)] == [0.25, 0.5, 1.0, 1.0]
    assert lr_factor("cosine", 1, 10, warmup=4) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.1)))
    with pytest.raises(ConfigError, match=r"train\.warmup: must be >= 0"):
        tiny_config(train={"warmup": -1})
