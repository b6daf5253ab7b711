"""Synthesizers: zero-initialised output, conditioning, shapes, options validated."""

from __future__ import annotations

import pytest
import torch

from dni.synthesizer import ConvSynthesizer, MLPSynthesizer, make_synthesizer


@pytest.mark.parametrize("hidden", [0, 1, 2])
def test_mlp_synthesizer_outputs_exactly_zero_at_init(hidden: int) -> None:
    s = MLPSynthesizer(32, hidden_layers=hidden, hidden_width=16, num_classes=10, conditioned=True)
    h = torch.randn(8, 32) * 100
    out = s(h, torch.arange(8) % 10)
    assert out.shape == h.shape
    assert torch.equal(out, torch.zeros_like(h))
    assert torch.count_nonzero(s.out.weight) == 0 and torch.count_nonzero(s.out.bias) == 0


@pytest.mark.parametrize("hidden", [0, 2])
def test_conv_synthesizer_outputs_exactly_zero_at_init(hidden: int) -> None:
    s = ConvSynthesizer(6, hidden_layers=hidden, hidden_channels=4, num_classes=3, conditioned=True)
    h = torch.randn(2, 6, 5, 5)
    assert torch.equal(s(h, torch.tensor([0, 2])), torch.zeros_like(h))


def test_conditioned_synthesizer_uses_the_label() -> None:
    torch.manual_seed(0)
    s = MLPSynthesizer(4, hidden_layers=0, num_classes=3, conditioned=True)
    torch.nn.init.normal_(s.out.weight)
    h = torch.randn(1, 4).expand(3, 4)
    out = s(h, torch.tensor([0, 1, 2]))
    assert not torch.allclose(out[0], out[1])  # same activation, different labels


def test_conditioned_synthesizer_without_context_is_an_error() -> None:
    s = MLPSynthesizer(4, hidden_layers=0, num_classes=3, conditioned=True)
    with pytest.raises(ValueError, match="pass the labels as context"):
        s(torch.randn(2, 4))


def test_synthesizer_options_are_validated() -> None:
    with pytest.raises(ValueError, match="hidden_layers must be 0, 1 or 2"):
        MLPSynthesizer(4, hidden_layers=3)
    with pytest.raises(ValueError, match="needs num_classes"):
        MLPSynthesizer(4, conditioned=True)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ConvSynthesizer(4, kernel_size=4)
    with pytest.raises(ValueError, match="expected \\(D,\\) or \\(C, H, W\\)"):
        make_synthesizer((2, 3), hidden_layers=0, hidden_width=4, batch_norm=False, num_classes=0, conditioned=False)


def test_make_synthesizer_picks_mlp_or_conv() -> None:
    common = dict(hidden_layers=1, hidden_width=8, batch_norm=True, num_classes=0, conditioned=False)
    assert isinstance(make_synthesizer((16,), **common), MLPSynthesizer)
    assert isinstance(make_synthesizer((4, 7, 7), **common), ConvSynthesizer)


def test_synthesizers_pass_gradcheck_in_float64() -> None:
    torch.manual_seed(0)
    for s, h, c in [
        (MLPSynthesizer(5, hidden_layers=2, hidden_width=6, num_classes=3, conditioned=True), torch.randn(4, 5), torch.tensor([0, 1, 2, 1])),
        (ConvSynthesizer(2, hidden_layers=1, hidden_channels=3, kernel_size=3), torch.randn(2, 2, 4, 4), None),
    ]:
        s = s.double()
        torch.nn.init.normal_(s.out.weight)  # non-zero, so the check is not trivial
        h = h.double().requires_grad_()
        assert torch.autograd.gradcheck(lambda x: s(x, c), (h,))
