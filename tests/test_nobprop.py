"""No-Bprop (``method: nobprop``): frozen stages below a classifier that learns alone."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_config
from test_pipeline import batch, make
from dni.config import ConfigError


def test_nobprop_trains_only_the_last_stage_exactly_as_a_classifier_on_frozen_features(device: torch.device) -> None:
    p = make(tiny_config(method="nobprop"), device)
    lower = [copy.deepcopy(s.module) for s in p.stages[:-1]]
    top = copy.deepcopy(p.stages[-1].module)
    opt = torch.optim.Adam(top.parameters(), lr=1e-2)  # tiny_config: Adam, lr 1e-2, constant
    initial = [[q.detach().clone() for q in m.parameters()] for m in lower]
    for i in range(5):
        x, y = batch(device, seed=i)
        loss = p.train_step(x, y).loss
        with torch.no_grad():
            for m in lower:  # train mode: BatchNorm normalises by the batch and its statistics move
                x = m(x)
        ref = torch.nn.functional.cross_entropy(top(x), y)
        opt.zero_grad()
        ref.backward()
        opt.step()
        assert loss == pytest.approx(ref.item(), rel=1e-6)
    for s, init in zip(p.stages[:-1], initial):
        assert all(q.grad is None for q in s.module.parameters())  # no gradient was computed for it
        for q, q0 in zip(s.module.parameters(), init):
            torch.testing.assert_close(q, q0, rtol=0, atol=0)
    for q, r in zip(p.stages[-1].module.parameters(), top.parameters()):
        torch.testing.assert_close(q, r)
    for s, m in zip(p.stages[:-1], lower):  # the BatchNorm statistics moved as in the reference
        for b, r in zip(s.module.buffers(), m.buffers()):
            torch.testing.assert_close(b, r)


def test_nobprop_on_the_ray_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="method: nobprop is the paper's No-Bprop baseline.*set backend=local"):
        tiny_config(method="nobprop", backend="ray").validate()


