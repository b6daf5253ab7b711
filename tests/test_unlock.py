"""Complete unlock (dni.unlock): input models, the split step, the pipeline and the runtime."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import crash_and_resume, losses, processes_reproduce_trainer, random_splits, runtime_config, tiny_config
from dni import engine
from dni.config import ConfigError
from dni.optim import OptimizerSpec
from dni.stage import DecoupledStage, StageOptions
from dni.synthesizer import MLPSynthesizer
from dni.unlock import InputModel, InputSynthesizer


def unlock_config(**sections: dict):
    base: dict = {"synthesizer": {"unlock": True, "input_width": 32}, "log": {"grad_every": 0}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return tiny_config(**base)


def test_an_input_model_learns_the_activation_it_is_shown() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 1, 4, 4)
    target = torch.relu(x.flatten(1) @ torch.randn(16, 8))  # a stage-0-like function of the raw batch
    model = InputModel(InputSynthesizer(16, (8,), hidden_layers=1, hidden_width=64), lr=1e-2, optimizer=OptimizerSpec())
    assert model.predict(x).shape == (64, 8)
    first = model.fit(x, target)
    for _ in range(300):
        last = model.fit(x, target)
    assert last < first / 20


class Oracle(nn.Module):
    """An input synthesizer that returns a fixed activation: the real input, known in advance."""

    def __init__(self, h: torch.Tensor) -> None:
        super().__init__()
        self.h = h
        self.unused = nn.Linear(1, 1)  # an optimiser needs a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h + 0.0 * self.unused.weight.sum()  # exact, and differentiable for fit()


def bn_stage(unlock: InputModel | None) -> DecoupledStage:
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU())
    return DecoupledStage(1, module, MLPSynthesizer(6, hidden_layers=0, num_classes=3, conditioned=True),
                          is_last=False, options=StageOptions(lr=1e-2), seed=0, unlock=unlock)


def test_with_an_oracle_input_the_unlocked_step_is_the_update_unlocked_step() -> None:
    torch.manual_seed(0)
    batch, h_real, y = torch.randn(16, 1, 4, 4), torch.randn(16, 8), torch.randint(0, 3, (16,))
    with torch.no_grad():  # a synthesizer that predicts something, so the step moves the weights
        for p in (s := bn_stage(None)).synthesizer.parameters():  # type: ignore[union-attr]
            p.normal_()
    oracle = InputModel(Oracle(h_real), lr=1e-3, optimizer=OptimizerSpec())  # type: ignore[arg-type]
    unlocked, plain = bn_stage(oracle), bn_stage(None)
    unlocked.synthesizer.load_state_dict(s.synthesizer.state_dict())  # type: ignore[union-attr]
    plain.synthesizer.load_state_dict(s.synthesizer.state_dict())  # type: ignore[union-attr]
    stats = [b.clone() for b in unlocked.module.buffers()]

    a = engine.unlocked_step(unlocked, batch, y)  # nothing from the stage below is needed
    b = engine.train_step(plain, h_real, y)
    torch.testing.assert_close(a.target, b.target, rtol=0, atol=0)
    torch.testing.assert_close(a.synthetic, b.synthetic, rtol=0, atol=0)
    for p, q in zip(unlocked.module.parameters(), plain.module.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # The synthetic-input forward leaves BatchNorm's statistics alone; the real forward moves them.
    assert all(torch.equal(b0, b1) for b0, b1 in zip(stats, unlocked.module.buffers()))
    h, input_loss, loss = engine.real_forward(unlocked, batch, h_real, y)
    assert input_loss == 0.0 and loss != loss  # NaN: no loss below the last stage
    assert not torch.equal(stats[0], unlocked.module[1].running_mean)
    torch.testing.assert_close(h, unlocked.module(h_real).detach())


def test_a_stage_without_an_input_model_has_no_unlocked_step() -> None:
    with pytest.raises(ValueError, match="no input model"):
        engine.unlocked_step(bn_stage(None), torch.randn(4, 16), torch.zeros(4, dtype=torch.long))


def test_complete_unlock_trains_every_stage_on_synthetic_inputs_and_learns(tmp_path: Path) -> None:
    cfg = unlock_config(train={"epochs": 8}, synthesizer={"input_lr": 1e-2}, log={"dir": str(tmp_path)})
    from dni.run import create_run_dir
    from dni.trainer import Trainer

    trainer = Trainer(cfg, create_run_dir(cfg), splits=random_splits(n_train=192))
    summary = trainer.fit()
    stages = trainer.pipeline.stages
    assert stages[0].unlock is None and all(s.unlock is not None for s in stages[1:])
    # Stage 1's input model has learnt the real activation of the stage below, on unseen images.
    x = trainer.splits.test.images
    for stage in stages:
        stage.train(False)
    with torch.no_grad():
        real = stages[0].module(x)
        error = (stages[1].unlock.predict(x) - real).pow(2).mean()  # type: ignore[union-attr]
    assert error < 0.5 * real.var(0).mean()
    assert summary["test_accuracy"] > 0.6  # 3 classes: chance is 1/3


def test_resume_under_complete_unlock_continues_exactly(tmp_path: Path) -> None:
    cfg = unlock_config(log={"dir": str(tmp_path)}, train={"epochs": 3}, checkpoint={"every": 4})
    full, full_summary = train_locally_with(cfg)
    interrupted, resumed = crash_and_resume(cfg, random_splits, at=10)
    assert resumed.fit()["test_accuracy"] == full_summary["test_accuracy"]
    for a, b in zip(full.pipeline.stages[1:], resumed.pipeline.stages[1:]):
        for p, q in zip(a.unlock.synthesizer.parameters(), b.unlock.synthesizer.parameters()):  # type: ignore[union-attr]
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert losses(interrupted.run_dir) == losses(full.run_dir)


def train_locally_with(cfg):
    from dni.run import create_run_dir
    from dni.trainer import Trainer

    t = Trainer(cfg, create_run_dir(cfg), splits=random_splits())
    return t, t.fit()


@pytest.mark.parametrize("sections, match", [
    ({"method": "backprop"}, "needs method dni or cdni"),
    ({"sync": {"true_every": 5}}, "set sync.true_every=0 and log.grad_every=0"),
    ({"log": {"grad_every": 10}}, "set sync.true_every=0 and log.grad_every=0"),
    ({"synthesizer": {"unlock": True, "bp_lambda": 0.5}}, "use one of the two"),
    ({"backend": "ray", "stages": [{"replicas": 2}, {}, {}]}, "give every stage one replica"),
])
def test_settings_complete_unlock_cannot_honour_are_config_errors(sections: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        unlock_config(**sections)


def test_token_inputs_cannot_be_predicted_by_an_input_model() -> None:
    from dni.build import build_input_model
    from dni.data.spec import DataSpec

    data = DataSpec((8,), 5, torch.int64, (8,), torch.int64)
    with pytest.raises(ConfigError, match="floating-point inputs"):
        build_input_model(unlock_config(), 1, (8, 16), data, torch.device("cpu"))


def test_stage_processes_reproduce_the_reference_trainer_under_complete_unlock(idx_folder: str, tmp_path: Path) -> None:
    cfg = runtime_config(idx_folder, synthesizer={"unlock": True, "input_width": 32}, log={"every": 1, "dir": str(tmp_path)},
                         runtime={"max_in_flight": 1}, threads=1)  # one thread: the same sums in the same order
    results = processes_reproduce_trainer(cfg, steps=18)  # 2 epochs of 9 batches
    input_losses = [m for _, m in results[1]["metrics"] if "unlock/input_loss/stage_1" in m]
    assert input_losses, "the runtime reports its input models' losses"
