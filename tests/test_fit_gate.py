"""The synthesizer-fit measure (:mod:`dni.fit`) and ``synthesizer.gate: fit``, which scales steps by it."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from conftest import tiny_config
from test_pipeline import batch, make
from dni.config import ConfigError
from dni.fit import SynthesizerFit


def test_fit_is_zero_for_the_zero_predictor_one_for_a_perfect_one_and_the_explained_fraction_between() -> None:
    fit = SynthesizerFit()
    assert fit.explained == 0.0  # nothing measured yet: the stage waits
    fit.add(2.0, 2.0)
    assert fit.explained == 0.0
    worse = SynthesizerFit()
    worse.add(3.0, 2.0)  # worse than predicting zero: clipped to 0
    assert worse.explained == 0.0
    fit = SynthesizerFit(decay=0.5)
    fit.add(1.0, 4.0)  # explains 3/4
    fit.add(0.0, 4.0)  # explains all: averages (0.25, 3.0) before the bias correction, which cancels
    assert fit.explained == pytest.approx(1 - 0.25 / 3.0)
    again = SynthesizerFit(decay=0.5)
    again.load_state_dict(fit.state_dict())
    assert again.explained == fit.explained and again.seen == 2


def test_a_synthesizer_trained_on_its_targets_comes_to_explain_them(device: torch.device) -> None:
    p = make(tiny_config(method="cdni", synthesizer={"lr": 3e-3}), device)
    p.train_step(*batch(device, seed=0))
    first = [s.fit.explained for s in p.stages[:-1]]
    for i in range(1, 150):
        p.train_step(*batch(device, seed=i % 8))
    later = [s.fit.explained for s in p.stages[:-1]]
    assert first == [0.0, 0.0]  # zero-initialised output layers predict zero on the first batch
    assert min(later) > 0.3, later  # measured about 0.5-0.8 on these repeating batches


@pytest.mark.parametrize("explained", [0.0, 0.37, 1.0])
def test_gate_fit_scales_the_stage_step_by_the_explained_fraction(explained: float, device: torch.device) -> None:
    cfg = tiny_config(method="cdni", train={"optimizer": "sgd"}, synthesizer={"gate": "fit", "optimizer": "adam"})
    gated = make(cfg, device)
    for i in range(6):  # synthesizers that predict something
        gated.train_step(*batch(device, seed=i))
    plain = copy.deepcopy(gated)
    for s in plain.stages:
        s.options = dataclasses.replace(s.options, gate="none")
    s0 = gated.stages[0]
    s0.fit.loss, s0.fit.zero_loss = (1.0 - explained) * 2.0, 2.0
    assert s0.gate == pytest.approx(explained)
    before = [q.detach().clone() for q in s0.module.parameters()]
    x, y = batch(device, seed=99)
    gated.train_step(x, y)
    plain.train_step(x, y)
    moved = [q.detach() - b for q, b in zip(s0.module.parameters(), before)]
    full = [q.detach() - b for q, b in zip(plain.stages[0].module.parameters(), before)]
    assert any(f.abs().max() > 0 for f in full)  # the plain stage did move (its synthesizer is not zero)
    for m, f in zip(moved, full):  # plain SGD: the step is linear in the learning rate
        torch.testing.assert_close(m, explained * f, rtol=1e-5, atol=1e-7)


def test_gate_is_restored_from_a_checkpoint(device: torch.device) -> None:
    p = make(tiny_config(method="dni", synthesizer={"gate": "fit"}), device)
    for i in range(4):
        p.train_step(*batch(device, seed=i))
    q = make(tiny_config(method="dni", synthesizer={"gate": "fit"}), device)
    for a, b in zip(q.stages, p.stages):
        a.load_state_dict(b.state_dict())
    assert [s.fit.state_dict() for s in q.stages] == [s.fit.state_dict() for s in p.stages]
    assert q.stages[0].fit.seen == 4


@pytest.mark.parametrize("sections, message", [
    (dict(method="backprop", synthesizer={"gate": "fit"}), "synthesizer.gate: scales steps taken on synthetic gradients"),
    (dict(synthesizer={"gate": "fit", "bp_lambda": 0.5}), "synthesizer.gate: scales the steps of update-unlocked stages"),
    (dict(synthesizer={"gate": "sometimes"}), "synthesizer.gate"),
])
def test_gate_config_errors(sections: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(**sections).validate()
