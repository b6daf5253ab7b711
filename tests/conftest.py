"""Shared fixtures: tiny configs and data, seeded, CPU by default and CUDA when present."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from dni.config import Config, config_from_dict
from dni.data import ArrayDataset, Splits

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every device test runs on the CPU, and on CUDA too when a GPU is present."""
    return torch.device(request.param)


def tiny_config(**sections: dict) -> Config:
    """A small FCN config; keyword arguments override sections or top-level keys."""
    values: dict = {
        "name": "tiny",
        "method": "cdni",
        "device": "cpu",
        "model": {"kind": "fcn", "depth": 2, "width": 16},
        "data": {"name": "idx", "path": "unused", "val_size": 0},
        "train": {"epochs": 2, "batch_size": 16, "lr": 1e-2, "schedule": "constant"},
        "synthesizer": {"hidden_width": 32, "lr": 1e-3},
        "log": {"every": 2, "grad_every": 3, "progress": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            values.setdefault(key, {}).update(value)
        else:
            values[key] = value
    return config_from_dict(values)


def random_splits(n_train: int = 96, n_test: int = 48, shape: tuple[int, ...] = (1, 4, 4), classes: int = 3, seed: int = 0) -> Splits:
    """A learnable synthetic dataset: the label is the argmax of three pixel means."""
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> ArrayDataset:
        x = torch.rand(n, *shape, generator=g)
        flat = x.flatten(1)
        y = torch.stack([flat[:, i::classes].mean(1) for i in range(classes)], 1).argmax(1)
        return ArrayDataset(x, y, classes)

    empty = ArrayDataset(torch.zeros(0, *shape), torch.zeros(0, dtype=torch.int64), classes)
    return Splits(train=make(n_train), val=empty, test=make(n_test))


@pytest.fixture(scope="session")
def idx_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small learnable dataset on disk in the standard idx format (what workers load)."""
    import numpy as np

    from dni.data import write_idx

    folder = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 640), ("t10k", 128)):
        images = rng.integers(0, 256, size=(n, 8, 8), dtype=np.uint8)
        means = images.reshape(n, 64).astype(np.float64)
        labels = np.stack([means[:, i::3].mean(1) for i in range(3)], 1).argmax(1).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return str(folder)


def runtime_config(idx_folder: str, **sections: dict) -> Config:
    """A tiny config for the distributed runtime on the idx fixture (10 steps per epoch)."""
    base = dict(
        backend="ray",
        data={"name": "idx", "path": idx_folder, "val_size": 64},
        model={"kind": "fcn", "depth": 2, "width": 16},
        train={"epochs": 2, "batch_size": 64, "lr": 1e-2, "schedule": "constant"},
        log={"every": 5, "grad_every": 0, "progress": False},
        runtime={"timeout_s": 60, "poll_s": 0.2},
    )
    for key, value in sections.items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    return tiny_config(**base)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for every Ray test of the session. Logical resources may exceed
    physical ones: it claims 4 GPUs, so one-stage-per-GPU placement is tested without a GPU."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=8, num_gpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Every row of a run's ``metrics.jsonl``, in file order."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """Every logged (step, train/loss), in file order: duplicates and gaps show."""
    return [(r["step"], r["train/loss"]) for r in metric_rows(run_dir) if "train/loss" in r]


def all_finite(state: dict) -> bool:
    """Whether every floating-point tensor of a state dict is finite."""
    return all(bool(torch.isfinite(t).all()) for t in state.values() if torch.is_tensor(t) and t.is_floating_point())


def train_locally(cfg: Config) -> tuple[Path, dict[str, Any]]:
    """Run ``cfg`` with the single-process trainer in a new run directory, restoring torch's thread
    count afterwards (configs may set ``threads``); returns (run directory, summary)."""
    from dni.run import create_run_dir
    from dni.trainer import Trainer

    run_dir = create_run_dir(cfg)
    threads = torch.get_num_threads()
    try:
        return run_dir, Trainer(cfg, run_dir).fit()
    finally:
        torch.set_num_threads(threads)


def crash_and_resume(cfg: Config, splits: Callable[[], Splits], *, at: int) -> tuple[Any, Any]:
    """Train ``cfg`` in a new run directory until a KeyboardInterrupt at step ``at`` (a killed
    process), then resume that directory from its newest checkpoint in a new trainer; returns
    (the interrupted trainer, the resumed one, not yet fitted). ``splits`` gives each its data."""
    from dni.run import create_run_dir
    from dni.trainer import Trainer

    def crash(step: int, total: int, latest: dict) -> None:
        if step == at:
            raise KeyboardInterrupt

    interrupted = Trainer(cfg, create_run_dir(cfg), splits=splits(), progress=crash)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    resumed = Trainer(cfg, interrupted.run_dir, splits=splits())
    resumed.resume()
    return interrupted, resumed


def processes_reproduce_trainer(cfg: Config, *, steps: int) -> list[dict[str, Any]]:
    """Train ``cfg`` (a runtime config) with the single-process trainer and as stage processes, and
    assert that both log the same ``steps`` losses (give ``threads=1``: the same sums in the same
    order); returns the processes' results, one per stage."""
    import copy

    from workers.process_launch import launch_processes

    local = copy.deepcopy(cfg)
    local.backend = "local"
    run_dir, _ = train_locally(local)
    want = losses(run_dir)
    results = launch_processes(cfg, timeout_s=120)
    got = [(s, m["train/loss"]) for s, m in results[-1]["metrics"] if "train/loss" in m]
    assert len(got) == len(want) == steps
    for (sg, vg), (sw, vw) in zip(got, want):
        assert sg == sw and vg == pytest.approx(vw, rel=1e-6)
    return results
