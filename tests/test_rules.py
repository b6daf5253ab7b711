"""The decoupling rules, each checked against autograd or a literal value."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dni import rules
from dni.synthesizer import MLPSynthesizer


def test_backward_from_returns_the_vector_jacobian_product_in_float64() -> None:
    torch.manual_seed(0)
    stage = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    g = torch.randn(6, 3, dtype=torch.float64)
    stage_input = x.clone().requires_grad_()
    target = rules.backward_from(stage(stage_input), g, stage_input)
    # The numerical Jacobian of the stage, (6*3) x (6*5), contracted with g.
    jac = torch.autograd.functional.jacobian(stage, x).reshape(18, 30)
    expected = (g.reshape(1, 18) @ jac).reshape(6, 5)
    torch.testing.assert_close(target, expected)
    assert torch.autograd.gradcheck(stage, (stage_input,))


def test_first_stage_backward_accumulates_parameter_gradients_only() -> None:
    stage = nn.Linear(3, 2)
    out = stage(torch.ones(4, 3))
    assert rules.backward_from(out, torch.ones(4, 2), None) is None
    torch.testing.assert_close(stage.weight.grad, torch.full((2, 3), 4.0))


def test_synthetic_gradient_is_prediction_over_batch_and_detached() -> None:
    s = MLPSynthesizer(3, hidden_layers=0)
    with torch.no_grad():
        s.out.bias.fill_(2.0)
    h = torch.randn(8, 3, requires_grad=True)
    g = rules.synthetic_gradient(s, h, None)
    torch.testing.assert_close(g, torch.full((8, 3), 2.0 / 8))
    assert not g.requires_grad


def test_synthesizer_loss_regresses_per_example_target() -> None:
    s = MLPSynthesizer(2, hidden_layers=0)
    h = torch.randn(4, 2)
    target = torch.full((4, 2), 0.25)  # dL/dh of a batch-mean loss: 1.0 per example
    loss = rules.synthesizer_loss(s, h, None, target, weight=2.0)
    torch.testing.assert_close(loss, torch.tensor(2.0))  # 2 * mean((0 - 1)^2)
    loss.backward()
    assert s.out.bias.grad is not None and torch.all(s.out.bias.grad < 0)


def test_bp_lambda_mix_endpoints_and_middle() -> None:
    t, s = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    assert rules.bp_lambda_mix(t, s, 1.0) is t
    assert rules.bp_lambda_mix(t, s, 0.0) is s
    torch.testing.assert_close(rules.bp_lambda_mix(t, s, 0.25), torch.tensor([2.5, -1.0]))
    with pytest.raises(ValueError, match="lambda must be in"):
        rules.bp_lambda_mix(t, s, 1.5)


def test_should_update_has_the_requested_rate_and_draws_once_per_call() -> None:
    g = torch.Generator().manual_seed(0)
    rate = sum(rules.should_update(g, 0.3) for _ in range(4000)) / 4000
    assert abs(rate - 0.3) < 0.03
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    rules.should_update(a, 1.0)
    rules.should_update(b, 0.1)
    assert torch.equal(a.get_state(), b.get_state())


def test_gradient_agreement_of_known_vectors() -> None:
    cos, rel = rules.gradient_agreement(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert cos == pytest.approx(2 ** -0.5)
    assert rel == pytest.approx(2 ** -0.5)


def test_a_stage_whose_output_ignores_its_input_sends_a_zero_target() -> None:
    x = torch.randn(3, 2).requires_grad_()
    w = torch.nn.Parameter(torch.ones(2))
    out = w.expand(3, 2) * 1.0  # does not depend on x
    target = rules.backward_from(out, torch.ones(3, 2), x)
    assert target is not None and torch.equal(target, torch.zeros(3, 2))
    assert torch.equal(w.grad, torch.full((2,), 3.0))
