"""Models and their partition into stages."""

from __future__ import annotations

import pytest
import torch

from dni.config import ModelConfig
from dni.models import activation_shapes, build_stage, build_stages, partition


def test_partition_table() -> None:
    assert partition(4, None) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    assert partition(4, [2]) == [range(0, 2), range(2, 4)]
    assert partition(5, [1, 4]) == [range(0, 1), range(1, 4), range(4, 5)]
    assert partition(1, None) == [range(0, 1)]
    for bad in ([0], [4], [2, 2], [3, 1]):
        with pytest.raises(ValueError, match="strictly increasing"):
            partition(4, bad)


def test_fcn_k_has_k_hidden_layers_and_a_classifier() -> None:
    cfg = ModelConfig(kind="fcn", depth=4, width=256)
    stages = build_stages(cfg, (1, 28, 28), 10, seed=0)
    assert len(stages) == 5
    assert activation_shapes(stages, (1, 28, 28)) == [(256,)] * 4 + [(10,)]
    n_params = sum(p.numel() for s in stages for p in s.parameters())
    assert n_params == 784 * 256 + 256 + 3 * (256 * 256 + 256) + 4 * 2 * 256 + 256 * 10 + 10


def test_cnn_stages_and_shapes() -> None:
    cfg = ModelConfig(kind="cnn", depth=3, channels=8)
    stages = build_stages(cfg, (1, 28, 28), 10, seed=0)
    assert activation_shapes(stages, (1, 28, 28)) == [(8, 14, 14), (8, 7, 7), (8, 7, 7), (10,)]


def test_boundaries_group_layers() -> None:
    cfg = ModelConfig(kind="fcn", depth=3, width=8, boundaries=[2])
    stages = build_stages(cfg, (4,), 2, seed=0)
    assert [len(s) for s in stages] == [2, 2]


def test_a_stage_built_alone_equals_the_same_stage_built_with_the_others() -> None:
    cfg = ModelConfig(kind="fcn", depth=3, width=8)
    all_stages = build_stages(cfg, (1, 4, 4), 3, seed=5)
    torch.manual_seed(123)  # the global RNG must not matter
    alone = build_stage(cfg, 2, (1, 4, 4), 3, seed=5)
    for a, b in zip(all_stages[2].state_dict().values(), alone.state_dict().values()):
        torch.testing.assert_close(a, b)
    other_seed = build_stage(cfg, 2, (1, 4, 4), 3, seed=6)
    assert not torch.equal(other_seed[0][0].weight, alone[0][0].weight)
