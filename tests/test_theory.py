"""Convergence results of Czarnecki et al. 2017 ("Understanding Synthetic Gradients"), in float64.

Synthetic-gradient learning keeps the critical points of the loss: on linear
models with linear synthesizers it converges to the least-squares solution, and
for an MSE head a linear synthesizer conditioned on the target can represent the
exact gradient, 2 (h - y) per example, and learns it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dni import rules
from dni.pipeline import Pipeline
from dni.stage import DecoupledStage, StageOptions
from dni.synthesizer import MLPSynthesizer

STEPS = 1500


def regression_data(n: int = 64, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.tensor([[1.5], [-2.0], [0.5]], dtype=torch.float64)
    y = x @ w + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x, y


def linear_pipeline(widths: list[int], *, synthetic: bool, lr: float = 0.05, synth_lr: float = 0.05) -> Pipeline:
    """Bias-free linear stages (widths[0] -> ... -> widths[-1]) and an identity head with MSE loss."""
    torch.manual_seed(1)
    opts = StageOptions(lr=lr, synth_lr=synth_lr, schedule="cosine", total_steps=STEPS)
    stages = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        module = nn.Linear(a, b, bias=False).double()
        synth = MLPSynthesizer(b, hidden_layers=0, num_classes=1, conditioned=True).double() if synthetic else None
        stages.append(DecoupledStage(i, module, synth, is_last=False, options=opts, seed=0))
    stages.append(DecoupledStage(len(stages), nn.Identity(), None, is_last=True, options=opts, seed=0, loss_fn=F.mse_loss))
    return Pipeline(stages)


def train(p: Pipeline, x: torch.Tensor, y: torch.Tensor) -> float:
    for _ in range(STEPS):
        p.train_step(x, y)  # the target y is the cDNI context
    return F.mse_loss(p.predict(x), y).item()


def test_linear_regression_with_linear_synthesizer_converges_to_least_squares() -> None:
    x, y = regression_data()
    p = linear_pipeline([3, 1], synthetic=True)
    train(p, x, y)
    w_ls = torch.linalg.lstsq(x, y).solution
    torch.testing.assert_close(p.stages[0].module.weight.detach().T, w_ls, atol=2e-3, rtol=0)


def test_linear_cdni_synthesizer_learns_the_exact_mse_gradient() -> None:
    x, y = regression_data()
    # A near-frozen network keeps the residuals h - y large, so that the two inputs
    # of the synthesizer stay distinguishable while it learns.
    p = linear_pipeline([3, 1], synthetic=True, lr=1e-7)
    train(p, x, y)
    synth = p.stages[0].synthesizer
    # Input is [h, y]; the exact per-example gradient of mean((h - y)^2) is 2h - 2y.
    torch.testing.assert_close(synth.out.weight.detach(), torch.tensor([[2.0, -2.0]], dtype=torch.float64), atol=2e-2, rtol=0)
    assert abs(synth.out.bias.item()) < 2e-2
    _, (true_grad,) = p.true_gradients(x, y)
    synthetic = rules.synthetic_gradient(synth, p.stages[0].module(x), y)
    torch.testing.assert_close(synthetic, true_grad, atol=1e-2 / len(x), rtol=1e-2)
    cosine, _ = rules.gradient_agreement(synthetic, true_grad)
    assert cosine > 0.9999


def test_deep_linear_network_with_synthetic_gradients_reaches_backprop_loss() -> None:
    x, y = regression_data()
    widths = [3, 4, 4, 1]
    sg_loss = train(linear_pipeline(widths, synthetic=True), x, y)
    bp_loss = train(linear_pipeline(widths, synthetic=False), x, y)
    w_ls = torch.linalg.lstsq(x, y).solution
    optimum = F.mse_loss(x @ w_ls, y).item()
    assert bp_loss < optimum * 1.02
    assert sg_loss < optimum * 1.05, (sg_loss, bp_loss, optimum)
