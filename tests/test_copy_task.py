"""The paper's copy tasks (``data.name: copy``), and what a synthesizer at the truncation boundary buys on them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_config, train_locally
from dni.config import ConfigError
from dni.data import load_splits
from dni.data.copy_task import SYMBOLS, episodes

ROOT = Path(__file__).resolve().parents[1]


def test_an_episode_reads_the_symbols_then_outputs_them_repeats_times() -> None:
    inputs, labels = episodes(2, length=3, repeats=2, generator=torch.Generator().manual_seed(0))
    stop, blank = SYMBOLS, SYMBOLS + 1
    first, second = inputs.view(2, 10), labels.view(2, 10)  # 3 symbols, stop, 6 outputs
    seq = first[0, :3]
    assert first[0, 3:].tolist() == [stop] + [blank] * 6 and bool((seq < SYMBOLS).all())
    assert second[0].tolist() == [-1] * 4 + seq.tolist() * 2


def copy_config(**sections: dict) -> dict:
    base: dict = dict(method="dni", threads=1, model={"kind": "lstm", "depth": 1, "width": 32, "bptt": 2},
                      data={"name": "copy", "length": 3, "episodes": 200, "val_size": 10},
                      train={"epochs": 1, "batch_size": 8, "lr": 3e-3, "schedule": "constant"},
                      synthesizer={"hidden_layers": 0, "discount": 0.5})
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base


def test_the_splits_are_streams_of_windows_from_their_own_seeds() -> None:
    cfg = tiny_config(**copy_config())
    assert cfg.data.context == 2  # an LSTM's windows default to its truncation window
    splits = load_splits(cfg.data, seed=0)
    assert splits.train.images.shape == (200 * 7 // 2, 2) and splits.train.num_classes == SYMBOLS + 2
    assert len(splits.test) == 1000 * 7 // 2
    assert not torch.equal(splits.val.images[:10], splits.train.images[:10])
    again = load_splits(cfg.data, seed=0)
    assert torch.equal(again.train.labels, splits.train.labels)


@pytest.mark.parametrize("data, message", [
    ({"length": None}, r"data\.length: the copy task needs its sequence length"),
    ({"length": 0}, r"data\.length: must be >= 1"),
    ({"repeats": 0}, r"data\.repeats: and data\.episodes must be >= 1"),
])
def test_bad_copy_settings_are_config_errors(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(**copy_config(data=data))


def test_copy_settings_and_the_discount_belong_to_their_own_models() -> None:
    with pytest.raises(ConfigError, match=r"data\.length: only for data\.name=copy"):
        tiny_config(data={"length": 3})
    with pytest.raises(ConfigError, match=r"data\.repeats: and data\.episodes are for data\.name=copy only"):
        tiny_config(data={"repeats": 2})
    with pytest.raises(ConfigError, match=r"synthesizer\.discount: discounts the future at a recurrent model"):
        tiny_config(synthesizer={"discount": 0.5})
    with pytest.raises(ConfigError, match=r"synthesizer\.discount: must be in \(0, 1\]"):
        tiny_config(**copy_config(synthesizer={"discount": 0.0}))


def test_a_synthesizer_at_the_boundary_learns_a_copy_that_plain_truncation_cannot(tmp_path: Path) -> None:
    """N=4 symbols through windows of T=4: each symbol must be carried 5 steps, beyond the window."""
    sections = copy_config(model={"kind": "lstm", "depth": 1, "width": 128, "bptt": 4},
                           data={"name": "copy", "length": 4, "episodes": 5000, "val_size": 10},
                           train={"epochs": 4, "batch_size": 32, "lr": 3e-3, "schedule": "constant"},
                           synthesizer={"hidden_layers": 0, "lr": 3e-4, "discount": 0.5},
                           log={"dir": str(tmp_path), "every": 50, "grad_every": 0, "progress": False})
    _, dni = train_locally(tiny_config(**sections))
    _, plain = train_locally(tiny_config(**{**sections, "method": "backprop"}))
    # Chance is log2(8) = 3 bits per symbol (measured: backprop 2.99, dni 1.25)
    assert plain["test_bits_per_char"] > 2.5 and dni["test_bits_per_char"] < 1.8, (plain, dni)
