"""Local losses (method: local, dni.local_head): the heads, the step, the pipeline and the runtime."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import crash_and_resume, losses, processes_reproduce_trainer, random_splits, runtime_config, tiny_config
from dni import engine
from dni.config import ConfigError
from dni.data.spec import DataSpec
from dni.local_head import AuxiliaryHead, LocalHead
from dni.losses import cross_entropy
from dni.optim import OptimizerSpec
from dni.stage import DecoupledStage, StageOptions
from workers.actions import Action, Op, Role, train_actions
from workers.topology import Topology


def local_config(**sections: dict):
    base: dict = {"method": "local", "log": {"grad_every": 0}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return tiny_config(**base)


@pytest.mark.parametrize("shape, per_position, out", [
    ((16,), False, (5, 3)),
    ((4, 6, 6), False, (5, 3)),  # a feature map is pooled to 2x2 before its head
    ((7, 16), True, (5, 7, 3)),  # a sequence keeps its positions
])
def test_a_head_predicts_the_classes_of_any_output(shape: tuple[int, ...], per_position: bool, out: tuple[int, ...]) -> None:
    head = AuxiliaryHead(shape, 3, hidden_layers=1, hidden_width=8, per_position=per_position)
    assert head(torch.randn(5, *shape)).shape == out
    if len(shape) == 3:
        assert head.net[0].normalized_shape == (4 * 2 * 2,)  # type: ignore[union-attr]


def head_stage(sends_target: bool = False) -> DecoupledStage:
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(8, 6), nn.ReLU())
    head = LocalHead(AuxiliaryHead((6,), 3), loss_fn=cross_entropy, lr=1e-2, optimizer=OptimizerSpec())
    return DecoupledStage(1, module, None, is_last=False, options=StageOptions(lr=1e-2), seed=0,
                          local_head=head, sends_target=sends_target)


def test_the_stage_steps_on_the_gradient_of_its_heads_loss_and_the_head_learns_from_it() -> None:
    stage = head_stage()
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    module, head = copy.deepcopy(stage.module), copy.deepcopy(stage.local_head.head)  # type: ignore[union-attr]
    # What the step must equal: backprop of the local loss through head and stage, Adam on both.
    opt_m, opt_h = torch.optim.Adam(module.parameters(), lr=1e-2), torch.optim.Adam(head.parameters(), lr=1e-2)
    loss = cross_entropy(head(module(x)), y)
    loss.backward()
    opt_m.step()
    opt_h.step()

    step = engine.train_step(stage, x, y)
    assert step.local_loss == pytest.approx(loss.item(), rel=1e-6)
    assert step.target is None and step.synthetic is None and step.updated  # nothing travels down
    for p, q in zip(stage.module.parameters(), module.parameters()):
        torch.testing.assert_close(p, q)
    for p, q in zip(stage.local_head.head.parameters(), head.parameters()):  # type: ignore[union-attr]
        torch.testing.assert_close(p, q)
    assert not engine.is_locked(stage, 0.0)


def test_a_stage_that_sends_its_target_still_computes_it() -> None:
    stage = head_stage(sends_target=True)
    step = engine.train_step(stage, torch.randn(4, 8), torch.zeros(4, dtype=torch.long))
    assert step.target is not None and step.target.shape == (4, 8)


def test_local_losses_train_each_stage_greedily_and_learn(tmp_path: Path) -> None:
    cfg = local_config(train={"epochs": 6}, log={"dir": str(tmp_path)})
    from dni.run import create_run_dir
    from dni.trainer import Trainer

    trainer = Trainer(cfg, create_run_dir(cfg), splits=random_splits(n_train=192))
    summary = trainer.fit()
    stages = trainer.pipeline.stages
    assert all(s.local_head is not None for s in stages[:-1]) and stages[-1].local_head is None
    assert all(s.synthesizer is None for s in stages)
    assert summary["test_accuracy"] > 0.6  # 3 classes: chance is 1/3
    from conftest import metric_rows
    head_losses = [r["local/loss/stage_0"] for r in metric_rows(trainer.run_dir) if "local/loss/stage_0" in r]
    assert head_losses and head_losses[-1] < head_losses[0]


def test_a_stage_below_learns_nothing_from_the_stages_above() -> None:
    """The greedy property: stage 0's update depends on its own head alone, so changing the stage
    above (its weights) leaves stage 0's parameters after a step unchanged."""
    from dni.build import build_pipeline
    from dni.data.spec import DataSpec

    cfg = local_config()
    data = DataSpec((1, 4, 4), 3)
    x, y = torch.rand(16, 1, 4, 4), torch.randint(0, 3, (16,))
    results = []
    for scale in (1.0, -3.0):
        pipeline = build_pipeline(cfg, data, total_steps=10, device=torch.device("cpu"))
        with torch.no_grad():
            for p in pipeline.stages[1].module.parameters():
                p.mul_(scale)
        pipeline.train_step(x, y)
        results.append([p.detach().clone() for p in pipeline.stages[0].module.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_under_local_losses_continues_exactly(tmp_path: Path) -> None:
    cfg = local_config(log={"dir": str(tmp_path)}, train={"epochs": 3}, checkpoint={"every": 4})
    from dni.run import create_run_dir
    from dni.trainer import Trainer

    full = Trainer(cfg, create_run_dir(cfg), splits=random_splits())
    full_summary = full.fit()
    interrupted, resumed = crash_and_resume(cfg, random_splits, at=10)
    assert resumed.fit()["test_accuracy"] == full_summary["test_accuracy"]
    for a, b in zip(full.pipeline.stages[:-1], resumed.pipeline.stages[:-1]):
        for p, q in zip(a.local_head.head.parameters(), b.local_head.head.parameters()):  # type: ignore[union-attr]
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert losses(interrupted.run_dir) == losses(full.run_dir)


def test_data_without_labels_has_nothing_for_a_head_to_predict() -> None:
    from dni.build import build_local_head

    data = DataSpec((8,), 4, torch.float32, (0,))
    with pytest.raises(ConfigError, match="this data has none; use method=dni"):
        build_local_head(local_config(), 0, (16,), data, torch.device("cpu"))


@pytest.mark.parametrize("sections, match", [
    ({"local": {"hidden_layers": -1}}, "local.hidden_layers"),
    ({"local": {"pool": 0}}, "local.pool"),
    ({"local": {"lr": 0.0}}, "local.lr"),
    ({"synthesizer": {"gate": "fit"}}, "needs method dni or cdni"),
])
def test_bad_local_settings_are_config_errors(sections: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        local_config(**sections)


def test_a_worker_under_local_losses_acknowledges_instead_of_sending_targets() -> None:
    from dni.schedule import Schedule

    topology = Topology((1, 1, 1))
    schedule = Schedule(total_steps=10, steps_per_epoch=5, true_every=0)
    middle = train_actions(topology, schedule, Role(1, 0, locked=False, rounds=False, local=True), 0)
    assert middle == [Action(Op.RECEIVE_INPUT, 0), Action(Op.COMPUTE), Action(Op.SEND_ACK, 0),
                      Action(Op.SEND_ACTIVATION, 2), Action(Op.AWAIT_TARGETS)]
    last = train_actions(topology, schedule, Role(2, 0, locked=False, rounds=False, local=True), 0)
    assert last == [Action(Op.RECEIVE_INPUT, 1), Action(Op.COMPUTE), Action(Op.SEND_ACK, 1)]


def test_stage_processes_reproduce_the_reference_trainer_under_local_losses(idx_folder: str, tmp_path: Path) -> None:
    cfg = runtime_config(idx_folder, method="local", log={"every": 1, "dir": str(tmp_path)},
                         runtime={"max_in_flight": 2}, threads=1)  # one thread: the same sums in the same order
    results = processes_reproduce_trainer(cfg, steps=18)  # 2 epochs of 9 batches
    assert any("local/loss/stage_0" in m for _, m in results[0]["metrics"]), "the runtime reports the heads' losses"
