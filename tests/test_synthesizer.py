"""Synthesizers: zero-initialised output, conditioning, shapes, options validated."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from test_pipeline import make
from dni.checkpoint import CheckpointError
from dni.synthesizer import ConvSynthesizer, MLPSynthesizer, TokenSynthesizer, make_synthesizer, reinitialise


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


def test_conv_synthesizer_with_context_map_fits_a_per_position_label_pattern() -> None:
    """The gradient a linear classifier on flattened maps sends back for label y, -W^T onehot(y),
    is a pattern of its own at each position: the context map fits it, constant planes cannot."""
    torch.manual_seed(0)
    patterns = torch.randn(3, 2, 10, 10)  # the target of each class: (C, H, W)

    def final_relative_loss(spatial: tuple[int, int] | None) -> float:
        s = ConvSynthesizer(2, hidden_layers=0, kernel_size=3, num_classes=3, conditioned=True, spatial=spatial)
        opt = torch.optim.Adam(s.parameters(), lr=0.05)
        for _ in range(300):
            y = torch.randint(0, 3, (16,))
            loss = (s(torch.randn(16, 2, 10, 10) * 0.1, y) - patterns[y]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss.detach() / patterns.pow(2).mean())

    assert final_relative_loss((10, 10)) < 0.01
    assert final_relative_loss(None) > 0.5  # only the 1-pixel border differs from the interior


def test_reinitialised_conv_synthesizer_predicts_zero_again() -> None:
    s = make_synthesizer((2, 4, 4), hidden_layers=0, hidden_width=4, batch_norm=False, num_classes=3, conditioned=True)
    assert isinstance(s, ConvSynthesizer) and s.context_map is not None
    for p in s.parameters():
        torch.nn.init.normal_(p)
    reinitialise(s)
    assert torch.equal(s(torch.randn(2, 2, 4, 4), torch.tensor([0, 1])), torch.zeros(2, 2, 4, 4))


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
    with pytest.raises(ValueError, match="bad sizes"):
        TokenSynthesizer(4, hidden_layers=3)


def test_make_synthesizer_picks_mlp_conv_or_token_by_shape() -> None:
    common = dict(hidden_layers=1, hidden_width=8, batch_norm=True, num_classes=0, conditioned=False)
    assert isinstance(make_synthesizer((16,), **common), MLPSynthesizer)
    assert isinstance(make_synthesizer((4, 7, 7), **common), ConvSynthesizer)
    assert isinstance(make_synthesizer((2, 3, 4, 5), **common), MLPSynthesizer)  # any other shape: flattened
    plain = dict(common, batch_norm=False)
    assert isinstance(make_synthesizer((6, 8), **plain), TokenSynthesizer)
    flat = make_synthesizer((4, 7, 7), kind="mlp", **common)  # sees all of h, not a neighbourhood
    assert isinstance(flat, MLPSynthesizer) and flat.features == 4 * 7 * 7
    assert flat(torch.randn(3, 4, 7, 7)).shape == (3, 4, 7, 7)
    with pytest.raises(ValueError, match="kind must be one of auto, mlp"):
        make_synthesizer((16,), kind="conv", **common)
    s = make_synthesizer((2, 3, 4, 5), **common)
    assert s(torch.randn(3, 2, 3, 4, 5)).shape == (3, 2, 3, 4, 5)


def test_context_of_any_shape_enters_one_hot_with_minus_one_as_zeros() -> None:
    # One label per token (B, T): a per-position synthesizer sees its own token's one-hot label.
    s = TokenSynthesizer(2, hidden_layers=0, num_classes=3, conditioned=True)
    with torch.no_grad():
        s.out.weight.zero_()
        s.out.weight[0, 2:] = torch.tensor([1.0, 10.0, 100.0])  # output 0 reads the one-hot label
    labels = torch.tensor([[0, 2, -1]])  # (B=1, T=3); -1: no label
    out = s(torch.zeros(1, 3, 2), labels)
    assert out[0, :, 0].tolist() == [1.0, 100.0, 0.0]
    # Labels (B, 2) for a flat activation: both one-hot, concatenated.
    m = MLPSynthesizer(1, hidden_layers=0, num_classes=2, conditioned=True, context_size=4)
    with torch.no_grad():
        m.out.weight.copy_(torch.tensor([[0.0, 1.0, 2.0, 4.0, 8.0]]))
    assert m(torch.zeros(2, 1), torch.tensor([[0, 1], [1, 1]])).flatten().tolist() == [1.0 + 8.0, 2.0 + 8.0]
    # Float targets enter as they are.
    f = MLPSynthesizer(1, hidden_layers=0, num_classes=2, conditioned=True)
    with torch.no_grad():
        f.out.weight.copy_(torch.tensor([[0.0, 1.0, -1.0]]))
    assert f(torch.zeros(1, 1), torch.tensor([[0.5, 2.0]])).item() == pytest.approx(-1.5)


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


def test_normalised_synthesizer_tracks_the_running_rms_of_its_targets() -> None:
    s = MLPSynthesizer(4, hidden_layers=0).normalize_targets()
    s.observe_target(torch.full((2, 4), 3.0))
    assert float(s.target_rms) == pytest.approx(3.0)  # the first target sets the unit
    s.observe_target(torch.full((2, 4), 1.0))
    assert float(s.target_rms) == pytest.approx((0.99 * 9 + 0.01 * 1) ** 0.5)
    plain = MLPSynthesizer(4, hidden_layers=0)
    plain.observe_target(torch.ones(2, 4))
    assert plain.target_rms is None and "target_rms" not in plain.state_dict()
    assert "target_rms" in s.state_dict()  # saved with the synthesizer, so a resumed run keeps its unit


def test_normalised_synthesizer_learns_targets_too_small_for_the_optimiser_steps() -> None:
    """Adam moves each weight by about lr a step: on targets of 1e-3 per element that noise
    swamps a plain synthesizer's prediction; in units of the targets' RMS it does not."""
    torch.manual_seed(0)
    mixing = torch.randn(32, 32) / 32**0.5

    def final_relative_loss(normalize: bool) -> float:
        torch.manual_seed(1)
        s = make_synthesizer((32,), hidden_layers=0, hidden_width=1, batch_norm=False, num_classes=0,
                             conditioned=False, normalize=normalize)
        opt = torch.optim.Adam(s.parameters(), lr=1e-2)
        losses = []
        for _ in range(400):
            h = torch.randn(64, 32)
            target = 1e-3 * h @ mixing
            s.observe_target(target)
            loss = (s(h) - target).pow(2).mean() / target.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return sum(losses[-50:]) / 50

    assert final_relative_loss(True) < 0.05
    assert final_relative_loss(False) > 1.0  # worse than predicting zero


def test_reinitialise_resets_the_unit_of_a_normalised_synthesizer() -> None:
    s = MLPSynthesizer(4, hidden_layers=1, hidden_width=3).normalize_targets()
    s.observe_target(torch.ones(2, 4))
    reinitialise(s)
    assert float(s.target_rms) == 0.0
    s.observe_target(torch.full((2, 4), 2.0))
    assert float(s.target_rms) == pytest.approx(2.0)


def test_a_stage_state_from_other_synthesizers_is_a_checkpoint_error_naming_the_key() -> None:
    cfg = tiny_config(method="cdni", model={"kind": "cnn", "depth": 2, "channels": 2}, synthesizer={"hidden_width": 2})
    cnn = make(cfg, torch.device("cpu"), shape=(1, 8, 8))
    state = cnn.stages[0].state_dict()
    state["synthesizer"] = {k: v for k, v in state["synthesizer"].items() if not k.startswith("context_map")}
    with pytest.raises(CheckpointError, match=r"stage 0: the checkpoint does not fit this stage .*context_map"):
        cnn.stages[0].load_state_dict(state)
