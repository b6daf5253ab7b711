"""``synthesizer.normalize``: synthesizers that predict in units of their targets' running RMS."""

from __future__ import annotations

import torch

from conftest import tiny_config
from test_pipeline import batch, make


def test_normalised_synthesizers_take_their_unit_from_the_targets_and_explain_them(device: torch.device) -> None:
    # In O(1) units a synthesizer's weights have further to go than in the targets' own small
    # units, hence the higher lr for this tiny net (measured explained 0.42 and 0.66 on CPU).
    p = make(tiny_config(method="cdni", synthesizer={"normalize": True, "lr": 1e-2}), device)
    assert all(s.synthesizer is not None and float(s.synthesizer.target_rms) == 0.0 for s in p.stages[:-1])
    for i in range(150):
        p.train_step(*batch(device, seed=i % 8))
    units = [float(s.synthesizer.target_rms) for s in p.stages[:-1]]  # type: ignore[union-attr]
    assert all(u > 0.0 for u in units), units
    assert min(s.fit.explained for s in p.stages[:-1]) > 0.3


def test_a_plain_config_keeps_the_papers_unnormalised_synthesizers(device: torch.device) -> None:
    p = make(tiny_config(method="dni"), device)
    assert all(s.synthesizer is not None and s.synthesizer.target_rms is None for s in p.stages[:-1])


def test_the_unit_survives_a_checkpoint(device: torch.device) -> None:
    cfg = tiny_config(method="dni", synthesizer={"normalize": True})
    p = make(cfg, device)
    for i in range(3):
        p.train_step(*batch(device, seed=i))
    again = make(cfg, device)
    for saved, fresh in zip(p.stages, again.stages):
        fresh.load_state_dict(saved.state_dict())
    assert [float(s.synthesizer.target_rms) for s in again.stages[:-1]] == [  # type: ignore[union-attr]
        float(s.synthesizer.target_rms) for s in p.stages[:-1]]  # type: ignore[union-attr]
