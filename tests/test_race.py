"""The race (workers/race.py): its arithmetic on known curves, and one real round on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import runtime_config
from dni.config import ConfigError
from workers.race import accuracy_at, markdown_lines, reached, summarize, verdict

SLOW = [(10, 10.0, 0.90), (20, 20.0, 0.96), (30, 30.0, 0.97)]
FAST = [(10, 4.0, 0.95), (20, 8.0, 0.97), (30, 12.0, 0.98)]
NEVER = [(10, 5.0, 0.50), (20, 10.0, 0.60), (30, 15.0, 0.70)]


def test_the_first_evaluation_at_the_target_counts() -> None:
    assert reached(SLOW, 0.97) == (30, 30.0) and reached(FAST, 0.97) == (20, 8.0) and reached(NEVER, 0.97) is None
    assert accuracy_at(SLOW, 8.0) is None and accuracy_at(SLOW, 25.0) == 0.96


def test_medians_over_rounds_and_the_verdict() -> None:
    slower_fast = [(s, 2 * t, a) for s, t, a in FAST]
    rounds = [{"backprop_1_thread": SLOW, "ddp": SLOW, "decoupled_local": FAST, "decoupled_cdni": NEVER},
              {"backprop_1_thread": SLOW, "ddp": FAST, "decoupled_local": slower_fast, "decoupled_cdni": NEVER},
              {"backprop_1_thread": SLOW, "ddp": SLOW, "decoupled_local": FAST, "decoupled_cdni": NEVER}]
    summary = summarize(rounds, target=0.97, batch_size=100)
    local = summary["decoupled_local"]
    assert local["seconds"] == {"median": 8.0, "min": 8.0, "max": 16.0}
    assert local["steps"]["median"] == 20 and local["reached"] == 3
    assert local["samples_per_second"]["median"] == pytest.approx(30 * 100 / 12.0)
    assert summary["backprop_1_thread"]["accuracy_at_first"]["median"] is None  # nothing of it by 8 s
    assert summary["decoupled_cdni"]["seconds"]["median"] is None and summary["decoupled_cdni"]["reached"] == 0
    v = verdict({**summary, "backprop_all_cores": summary["ddp"]}, ["decoupled_local", "decoupled_cdni"])
    assert v["race_best_method"] == "local"
    assert v["race_speedup_vs_backprop"] == pytest.approx(30.0 / 8.0)
    assert v["race_speedup_vs_ddp"] == pytest.approx(30.0 / 8.0)  # DDP's median: 30, 8, 30
    assert v["race_speedup_vs_pipelining"] is None  # no pipeline raced
    text = "\n".join(markdown_lines({"target_accuracy": 0.97, "repeats": 3, "contestants": summary, **v}))
    assert "| decoupled (local), Ray | 8.0 (8.0-16.0) |" in text and "not reached" in text and "3.75x" in text


def test_no_rule_at_the_target_gives_no_verdict() -> None:
    summary = summarize([{"backprop_1_thread": SLOW, "decoupled_cdni": NEVER}], target=0.97, batch_size=1)
    assert verdict(summary, ["decoupled_cdni"])["race_best_method"] is None


def test_the_race_runs_only_decoupled_rules() -> None:
    with pytest.raises(ConfigError, match="bench.methods: 'backprop' is not a decoupled rule"):
        runtime_config("unused", bench={"methods": ["backprop"]})
    with pytest.raises(ConfigError, match="bench.repeats"):
        runtime_config("unused", bench={"repeats": 0})


def test_one_round_of_every_contestant_on_a_tiny_model(idx_folder: str, tmp_path: Path, ray_cluster) -> None:
    from workers.race import race

    cfg = runtime_config(idx_folder, method="local", threads=1, train={"eval_steps": 5}, model={"boundaries": [1]},
                         bench={"repeats": 1, "target_accuracy": 0.05, "methods": ["local", "delayed"]})
    result = race(cfg, str(tmp_path))
    names = list(result["contestants"])
    assert names == ["backprop_1_thread", "backprop_all_cores", "ddp", "pipelining_gpipe_2", "pipelining_gpipe_4",
                     "decoupled_local", "decoupled_delayed"]
    for name in names:  # every contestant evaluated at the same steps, and reached a target below chance
        assert [s for s, _, _ in result["curves"][0][name]] == [5, 9, 10, 15, 18]  # 9 steps an epoch, and every 5
        assert result["contestants"][name]["steps"]["median"] == 5
    assert result["race_best_method"] in ("local", "delayed")
