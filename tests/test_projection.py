"""The K-device time projection (dni/projection.py): its arithmetic, and that it measures every rule."""

from __future__ import annotations

import math

import pytest

from conftest import tiny_config
from dni.data.spec import DataSpec
from dni.projection import Projection, equal_cut, gpipe_step_seconds, pipeline_step_seconds, stage_work, steps_to


def test_steps_to_is_the_first_evaluation_at_the_target() -> None:
    curve = [(20, 0.90), (40, 0.961), (60, 0.955), (80, 0.97)]
    assert steps_to(curve, 0.96) == 40 and steps_to(curve, 0.97) == 80 and steps_to(curve, 0.99) is None


def test_step_models() -> None:
    assert pipeline_step_seconds([0.2, 0.5, 0.3], 0.01) == pytest.approx(0.51)
    assert pipeline_step_seconds([0.4], 0.01) == 0.4  # one stage sends nothing
    # GPipe, 2 stages of 1 s, 4 micro-batches: 5 micro-batch slots of 0.25 s, 2 hops of a quarter batch
    assert gpipe_step_seconds([1.0, 1.0], 0.2, 4) == pytest.approx(1.25 + 0.1)
    assert gpipe_step_seconds([1.0], 0.2, 4) == pytest.approx(1.0)


def test_a_projection_that_never_reaches_the_target_takes_forever() -> None:
    assert Projection("x", 0.5, 30).seconds == pytest.approx(15.0)
    assert math.isinf(Projection("x", 0.5, None).seconds)


def test_equal_cut_rejects_more_stages_than_layers() -> None:
    assert equal_cut(4, 4) == [1, 2, 3]
    with pytest.raises(ValueError, match="5 stages need 2..4 layers"):
        equal_cut(4, 5)


@pytest.mark.parametrize("method", ["backprop", "cdni", "delayed", "corrected", "local"])
def test_stage_work_times_each_stage_of_each_rule(method: str) -> None:
    cfg = tiny_config(method=method, model={"depth": 2, "width": 16, "boundaries": [1, 2]})
    work = stage_work(cfg, DataSpec((1, 4, 4), 3), reps=3, warmup=1)
    assert len(work) == 3 and all(0 < w < 1 for w in work)
