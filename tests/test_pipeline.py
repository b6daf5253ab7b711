"""The decoupled pipeline against backprop: transparency, BP(lambda), schedules, random updates."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_config
from dni import engine
from dni.build import build_pipeline
from dni.config import Config
from dni.data.spec import DataSpec
from dni.engine import StageStep
from dni.pipeline import Pipeline
from dni.synthesizer import Synthesizer


class OracleSynthesizer(Synthesizer):
    """Returns the true gradient it was given, in per-example units: DNI with a perfect model."""

    def __init__(self) -> None:
        super().__init__()
        self.conditioned = False
        self.num_classes = 0
        self.true_grad: torch.Tensor | None = None
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # so its optimiser has a parameter

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        assert self.true_grad is not None
        return self.true_grad * h.shape[0] + 0 * self.anchor


def make(cfg: Config, device: torch.device, shape: tuple[int, ...] = (1, 4, 4)) -> Pipeline:
    return build_pipeline(cfg, DataSpec(shape, 3), total_steps=100, device=device)


def batch(device: torch.device, shape: tuple[int, ...] = (1, 4, 4), n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g).to(device), torch.randint(0, 3, (n,), generator=g).to(device)


def captured_grads(p: Pipeline) -> list[dict[str, torch.Tensor]]:
    """Parameter gradients of every stage, captured just before each optimiser step."""
    grads: list[dict[str, torch.Tensor]] = [{} for _ in p.stages]
    for i, stage in enumerate(p.stages):
        def hook(opt, args, kwargs, i=i, stage=stage):
            grads[i] = {n: q.grad.clone() for n, q in stage.module.named_parameters() if q.grad is not None}
        stage.optimizer.register_step_pre_hook(hook)
    return grads


def applied_by_stage0(method: str, in_flight: int) -> tuple[Pipeline, list[list[torch.Tensor]]]:
    """A two-stage pipeline (one 8-wide hidden layer, then the head) under ``method`` with
    ``runtime.max_in_flight`` = ``in_flight``, and the list that receives stage 0's parameter
    gradients at each of its optimiser steps."""
    p = make(tiny_config(method=method, model={"depth": 1, "width": 8}, runtime={"max_in_flight": in_flight}),
             torch.device("cpu"))
    applied: list[list[torch.Tensor]] = []
    stage0 = p.stages[0]
    stage0.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: applied.append([q.grad.clone() for q in stage0.module.parameters()]))
    return p, applied


CASES = {
    "fcn": (dict(model={"kind": "fcn", "depth": 3, "width": 16}), (1, 4, 4)),
    "cnn": (dict(model={"kind": "cnn", "depth": 2, "channels": 4}), (1, 8, 8)),
}


def assert_oracles_give_backprop(decoupled: Pipeline, reference: Pipeline, x: torch.Tensor, y: torch.Tensor) -> None:
    """With every synthesizer of ``decoupled`` replaced by an oracle of the true gradient, one unlocked
    step gives every stage the parameter gradients that backprop (``reference``) gives it."""
    _, true_grads = decoupled.true_gradients(x, y)
    for stage, g in zip(decoupled.stages, true_grads):
        oracle = OracleSynthesizer().to(x.device)
        oracle.true_grad = g
        stage.synthesizer = oracle
    got, want = captured_grads(decoupled), captured_grads(reference)
    decoupled.train_step(x, y)  # unlocked: every stage updates from its (oracle) synthetic gradient
    reference.train_step(x, y)
    assert len(got) == len(want) == len(decoupled.stages)
    for g_stage, w_stage in zip(got, want):
        assert g_stage.keys() == w_stage.keys() and g_stage
        for name in w_stage:
            torch.testing.assert_close(g_stage[name], w_stage[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", CASES)
def test_oracle_synthesizer_makes_decoupled_gradients_equal_backprop(case: str, device: torch.device) -> None:
    sections, shape = CASES[case]
    x, y = batch(device, shape)
    assert_oracles_give_backprop(make(tiny_config(method="dni", **sections), device, shape),
                                 make(tiny_config(method="backprop", **sections), device, shape), x, y)


def test_zero_initialised_synthesizers_leave_lower_stages_unchanged_at_first_step(device: torch.device) -> None:
    p = make(tiny_config(method="dni"), device)
    before = [copy.deepcopy(s.module.state_dict()) for s in p.stages]
    p.train_step(*batch(device))
    for stage, old in zip(p.stages[:-1], before):
        for name, q in stage.module.named_parameters():
            torch.testing.assert_close(q, old[name], rtol=0, atol=0)
    last = p.stages[-1].module
    assert any(not torch.equal(q, before[-1][n]) for n, q in last.named_parameters())


def params(p: Pipeline) -> list[torch.Tensor]:
    return [q.detach().clone() for s in p.stages for q in s.module.parameters()]


def run_steps(p: Pipeline, device: torch.device, steps: int, bp_lambda: float = 0.0) -> list[float]:
    p.bp_lambda = bp_lambda
    return [p.train_step(*batch(device, seed=i)).loss for i in range(steps)]


def locked_steps(p: Pipeline, device: torch.device, steps: int, bp_lambda: float) -> list[float]:
    """Every stage locked (it runs the chain above first), at any lambda, through the engine."""
    def run(i: int, x: torch.Tensor, y: torch.Tensor) -> list[StageStep]:
        above: list[StageStep] = []

        def from_above(h: torch.Tensor) -> torch.Tensor:
            above.extend(run(i + 1, h, y))
            return above[0].target

        stage = p.stages[i]
        step = engine.train_step(stage, x, y, from_above=None if stage.is_last else from_above, bp_lambda=bp_lambda)
        return [step, *above]

    return [run(0, *batch(device, seed=i))[-1].loss for i in range(steps)]


def test_bp_lambda_one_equals_backprop(device: torch.device) -> None:
    mixed = make(tiny_config(method="cdni", synthesizer={"bp_lambda": 1.0}), device)
    reference = make(tiny_config(method="backprop"), device)
    torch.testing.assert_close(run_steps(mixed, device, 5, bp_lambda=1.0), run_steps(reference, device, 5))
    for a, b in zip(params(mixed), params(reference)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("lam", [0.25, 0.5])
def test_bp_lambda_scales_the_true_gradient_by_lambda_per_interface_below(lam: float, device: torch.device) -> None:
    # At the first step every synthetic gradient is exactly 0 (zero-initialised synthesizers), so the
    # gradient reaching stage i is lambda^(K-1-i) x backprop's: each interface above mixes in lambda x.
    x, y = batch(device)
    mixed = make(tiny_config(method="cdni", synthesizer={"bp_lambda": lam}), device)
    reference = make(tiny_config(method="backprop"), device)
    got, want = captured_grads(mixed), captured_grads(reference)
    mixed.train_step(x, y)
    reference.train_step(x, y)
    k = len(mixed.stages)
    for i, (g_stage, w_stage) in enumerate(zip(got, want)):
        assert g_stage.keys() == w_stage.keys() and g_stage
        for name in w_stage:
            torch.testing.assert_close(g_stage[name], lam ** (k - 1 - i) * w_stage[name], rtol=1e-5, atol=1e-8)


def test_unlocked_and_locked_schedules_agree_at_lambda_zero(device: torch.device) -> None:
    unlocked = make(tiny_config(method="cdni"), device)
    locked = make(tiny_config(method="cdni"), device)
    torch.testing.assert_close(run_steps(unlocked, device, 6), locked_steps(locked, device, 6, bp_lambda=0.0))
    for a, b in zip(params(unlocked), params(locked)):
        torch.testing.assert_close(a, b)


def test_p_update_one_equals_ordinary_decoupled_training(device: torch.device) -> None:
    explicit = make(tiny_config(method="dni", synthesizer={"p_update": 1.0}), device)
    default = make(tiny_config(method="dni"), device)
    torch.testing.assert_close(run_steps(explicit, device, 4), run_steps(default, device, 4))
    for a, b in zip(params(explicit), params(default)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_p_update_skips_stage_updates_at_the_requested_rate(device: torch.device) -> None:
    p = make(tiny_config(method="cdni", synthesizer={"p_update": 0.25}), device)
    updates = []
    for i in range(200):
        updates.append(p.train_step(*batch(device, seed=i)).updated)
    rate = sum(sum(u) for u in updates) / (200 * len(p.stages))
    assert 0.18 < rate < 0.32
    before = params(p)
    for i in range(50):  # a step where no stage updates changes no parameter
        r = p.train_step(*batch(device, seed=1000 + i))
        if not any(r.updated):
            break
        before = params(p)
    else:
        pytest.fail("no step without any update was drawn in 50 tries")
    for a, b in zip(before, params(p)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_true_gradients_leave_the_model_unchanged(device: torch.device) -> None:
    p = make(tiny_config(method="cdni"), device)
    buffers = [b.clone() for s in p.stages for b in s.module.buffers()]
    hs, grads = p.true_gradients(*batch(device))
    assert len(hs) == len(grads) == len(p.stages) - 1
    for a, b in zip(buffers, [b for s in p.stages for b in s.module.buffers()]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(q.grad is None for s in p.stages for q in s.module.parameters())
