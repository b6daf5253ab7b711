"""Every shipped cluster YAML passes Ray's own validation, so a typo fails CI."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

CLUSTERS = sorted((Path(__file__).resolve().parents[1] / "launch").glob("*.yaml"))


def test_the_shipped_cluster_files_are_the_ones_validated_below() -> None:
    # A new cluster YAML must be added here too, so that a missing or renamed one is noticed.
    assert [p.name for p in CLUSTERS] == ["cluster.yaml"]


@pytest.mark.parametrize("path", CLUSTERS, ids=[p.name for p in CLUSTERS])
def test_cluster_yaml_passes_ray_validation(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["head_start_ray_commands"][-1].count("--dashboard-host=127.0.0.1") == 1


def test_a_typo_in_a_cluster_yaml_is_caught() -> None:
    config = yaml.safe_load(CLUSTERS[0].read_text())
    config["max_worker"] = config.pop("max_workers")  # a plausible typo
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(config))
