"""The race's torch.distributed contestants (workers/torch_parallel.py): DDP and a GPipe pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import runtime_config, train_locally
from workers.torch_parallel import plain_config, train_ddp, train_pipelined


def test_ddp_on_two_workers_trains_what_single_process_backprop_trains(idx_folder: str, tmp_path: Path) -> None:
    """Without BatchNorm, the mean of the two halves' gradients is the whole batch's: DDP on 2
    workers follows the single-process trainer's backprop run step for step."""
    cfg = runtime_config(idx_folder, method="backprop", backend="local", threads=1, data={"val_size": 0},
                         model={"kind": "custom", "factory": "configs/models/resmlp.py:small"},
                         train={"eval_steps": 5}, log={"dir": str(tmp_path)})
    _, summary = train_locally(cfg)
    result = train_ddp(plain_config(cfg), workers=2, out=tmp_path / "ddp.json")
    steps = [row[0] for row in result["curve"]]
    assert steps == [5, 10, 15, 20] and result["steps"] == summary["steps"] == 20
    assert [s for _, s, _, _ in result["curve"]] == sorted(s for _, s, _, _ in result["curve"])  # training seconds
    assert result["curve"][-1][3] == pytest.approx(summary["test_loss"], rel=1e-4)
    assert result["final_accuracy"] == summary["test_accuracy"]


def test_a_global_batch_the_workers_cannot_share_is_refused(idx_folder: str, tmp_path: Path) -> None:
    cfg = runtime_config(idx_folder, method="backprop", backend="local", train={"batch_size": 63})
    with pytest.raises(ValueError, match="not divisible by the 2 DDP workers"):
        train_ddp(cfg, workers=2, out=tmp_path / "ddp.json")


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_a_gpipe_pipeline_of_the_stages_trains_what_single_process_backprop_trains(
        idx_folder: str, tmp_path: Path, micro_batches: int) -> None:
    """Without BatchNorm, the mean over micro-batches of their mean losses' gradients is the whole
    batch's: the pipeline (3 stages, 3 processes) follows single-process backprop step for step."""
    cfg = runtime_config(idx_folder, method="backprop", backend="local", threads=1, data={"val_size": 0},
                         model={"kind": "custom", "factory": "configs/models/resmlp.py:small"},
                         train={"eval_steps": 5}, log={"dir": str(tmp_path)})
    _, summary = train_locally(cfg)
    result = train_pipelined(plain_config(cfg), micro_batches=micro_batches, out=tmp_path / "pipe.json")
    assert [row[0] for row in result["curve"]] == [5, 10, 15, 20] and result["workers"] == 3
    assert result["curve"][-1][3] == pytest.approx(summary["test_loss"], rel=1e-4)
    assert result["micro_batches"] == micro_batches


def test_a_batch_the_micro_batches_cannot_share_is_refused(idx_folder: str, tmp_path: Path) -> None:
    cfg = runtime_config(idx_folder, method="backprop", backend="local", train={"batch_size": 62})
    with pytest.raises(ValueError, match="not divisible into 4 micro-batches"):
        train_pipelined(cfg, micro_batches=4, out=tmp_path / "pipe.json")
