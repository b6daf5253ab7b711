"""Corrected synthetic gradients (method: corrected): the step at once on g^, then the residual
target - g^ of the same batch, on both backends."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import (crash_and_resume, losses, metric_rows, processes_reproduce_trainer, random_splits, runtime_config,
                      tiny_config, train_locally)
from dni import engine, rules
from dni.config import ConfigError
from dni.run import create_run_dir
from dni.trainer import Trainer
from test_pipeline import applied_by_stage0, batch, make


def grads_of(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(module(x), list(module.parameters()), grad))


@pytest.mark.parametrize("delay", [0, 2])
def test_each_step_applies_its_synthetic_gradient_and_the_residual_of_the_batch_settled_before(delay: int) -> None:
    # Stage 0 of two, batch t: the gradient applied at step t is g^_t backpropagated through the stage
    # as it is at t, plus, for the batch s = t - 1 - delay settled after step t - 1, (dL/dh_s - g^_s)
    # backpropagated through a replay of batch s at those same weights.
    cpu = torch.device("cpu")
    p, applied = applied_by_stage0("corrected", delay + 1)
    stage0, head = p.stages
    xs = [batch(cpu, seed=i) for i in range(7)]
    target: dict[int, torch.Tensor] = {}
    synthetic: dict[int, torch.Tensor] = {}
    for t, (x, y) in enumerate(xs):
        now = copy.deepcopy(stage0.module)  # stage 0's weights during step t
        h = now(x).detach().requires_grad_()
        (target[t],) = torch.autograd.grad(head.loss_fn(copy.deepcopy(head.module)(h), y), [h])
        assert stage0.synthesizer is not None
        synthetic[t] = rules.synthetic_gradient(copy.deepcopy(stage0.synthesizer), h, y)
        r = p.train_step(x, y)
        assert r.updated[0] and len(applied) == t + 1
        want = grads_of(now, x, synthetic[t])
        s = t - 1 - delay
        if s >= 0:
            want = [a + b for a, b in zip(want, grads_of(now, xs[s][0], target[s] - synthetic[s]))]
        for got, w in zip(applied[-1], want):
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-7)
        assert (0 in r.synth_losses) == (t >= delay)  # the synthesizer trains when a batch settles
    assert any(g.abs().sum() > 0 for g in synthetic.values())  # the subtraction was exercised
    assert p.owed == delay
    p.flush()  # the last batches settle and their residuals are applied now
    assert p.owed == 0 and len(applied) == len(xs) + 1
    assert all(q.grad is None for q in stage0.module.parameters())


def test_with_a_linear_stage_the_two_contributions_of_a_batch_add_up_to_its_target() -> None:
    # For h = W x the parameter gradient of any dL/dh is independent of W, so under SGD without
    # momentum every batch moves W by exactly -lr * its target's gradient, once flushed: the
    # synthetic steps cancel whatever the synthesizer predicted.
    cpu = torch.device("cpu")
    cfg = tiny_config(method="corrected", model={"depth": 1, "width": 8}, runtime={"max_in_flight": 2},
                      train={"optimizer": "sgd"}, synthesizer={"lr": 0.1})  # g^ far from zero within 6 steps
    p = make(cfg, cpu)
    stage0, head = p.stages
    linear = next(m for m in stage0.module.modules() if isinstance(m, torch.nn.Linear))
    stage0.module = linear  # the stage is the linear layer alone
    stage0.optimizer = stage0.options.optimizer.build(list(linear.parameters()), stage0.options.lr)
    start = [q.detach().clone() for q in linear.parameters()]
    moved = [torch.zeros_like(q) for q in start]
    for t in range(6):
        x, y = batch(cpu, seed=t)
        h = linear(x.flatten(1)).detach().requires_grad_()
        (g,) = torch.autograd.grad(head.loss_fn(copy.deepcopy(head.module)(h), y), [h])
        for m, w in zip(moved, grads_of(linear, x.flatten(1), g)):
            m -= stage0.options.lr * w
        p.train_step(x.flatten(1), y)
    p.flush()
    for q, s, m in zip(linear.parameters(), start, moved):
        torch.testing.assert_close(q.detach(), s + m, rtol=1e-5, atol=1e-6)


def test_a_middle_stage_sends_the_early_target_plus_the_residuals_down() -> None:
    cpu = torch.device("cpu")
    p = make(tiny_config(method="corrected", model={"depth": 2, "width": 8}, runtime={"max_in_flight": 1}), cpu)
    middle = p.stages[1]
    x, y = batch(cpu, seed=3)
    h0 = p.stages[0].module(x).detach()
    step = engine.train_step(middle, h0, y)
    kept = engine.keep(middle, h0, y, step)
    assert kept.early_target is not None and kept.synthetic is not None
    grad = torch.randn_like(step.h)
    weights = copy.deepcopy(middle.module)
    settled = engine.settle(middle, kept, grad)
    replay_in = h0.clone().requires_grad_()
    (residual,) = torch.autograd.grad(weights(replay_in), [replay_in], grad - kept.synthetic)
    assert settled.target is not None and settled.synth_loss is not None
    torch.testing.assert_close(settled.target, kept.early_target + residual, rtol=1e-5, atol=1e-7)


def test_resume_under_corrected_gradients_continues_exactly(tmp_path: Path) -> None:
    cfg = tiny_config(method="corrected", log={"dir": str(tmp_path), "grad_every": 0}, train={"epochs": 3},
                      checkpoint={"every": 4}, runtime={"max_in_flight": 2})
    full = Trainer(cfg, create_run_dir(cfg), splits=random_splits())
    full_summary = full.fit()
    interrupted, resumed = crash_and_resume(cfg, random_splits, at=10)
    assert resumed.fit()["test_accuracy"] == full_summary["test_accuracy"]
    for a, b in zip(full.pipeline.stages, resumed.pipeline.stages):
        for p, q in zip(a.module.parameters(), b.module.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert losses(interrupted.run_dir) == losses(full.run_dir)


@pytest.mark.parametrize("sections, match", [
    ({"train": {"nonfinite": "skip"}}, "train.nonfinite: skip and reset are not available with method=corrected"),
    ({"sync": {"true_every": 4}}, "sync.true_every: method corrected already corrects every batch"),
    ({"synthesizer": {"gate": "fit"}}, "synthesizer.gate: .* needs method dni or cdni"),
    ({"synthesizer": {"bp_lambda": 0.5}}, "synthesizer.bp_lambda: .* needs method dni or cdni"),
])
def test_settings_the_corrected_rule_cannot_honour_are_config_errors(sections: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        tiny_config(method="corrected", **sections)


@pytest.mark.parametrize("in_flight", [1, 3])
def test_stage_processes_reproduce_the_local_corrected_run(idx_folder: str, tmp_path: Path, in_flight: int) -> None:
    cfg = runtime_config(idx_folder, method="corrected", model={"depth": 3},
                         log={"dir": str(tmp_path), "every": 1, "grad_every": 3}, runtime={"max_in_flight": in_flight},
                         checkpoint={"every": 7}, train={"epochs": 2}, threads=1)
    results = processes_reproduce_trainer(cfg, steps=18)
    stale = [v for _, m in results[0]["metrics"] for k, v in m.items() if k.startswith("stage/staleness_max/")]
    assert stale and max(stale) == in_flight - 1  # the delay the schedule gives
    # Measuring rounds (log.grad_every) see the same synthetic and true gradients on both backends.
    local = copy.deepcopy(cfg)
    local.backend = "local"
    run_dir, _ = train_locally(local)
    want = {r["step"]: r["sg/cosine/stage_0"] for r in metric_rows(run_dir) if "sg/cosine/stage_0" in r}
    got = {s: m["sg/cosine/stage_0"] for s, m in results[0]["metrics"] if "sg/cosine/stage_0" in m}
    assert len(want) == 6 and sorted(got) == sorted(want)
    for step, value in want.items():
        assert got[step] == pytest.approx(value, rel=1e-5, abs=1e-6)
