"""The delayed true-gradient rule (method: delayed): features replay, on both backends."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import losses, runtime_config, tiny_config, train_locally
from dni.config import ConfigError
from test_pipeline import applied_by_stage0, batch, make, params, run_steps


def test_delayed_with_no_batch_in_flight_is_backprop_exactly() -> None:
    cpu = torch.device("cpu")
    delayed = make(tiny_config(method="delayed", runtime={"max_in_flight": 1}), cpu)
    reference = make(tiny_config(method="backprop"), cpu)
    assert run_steps(delayed, cpu, 6) == run_steps(reference, cpu, 6)
    for a, b in zip(params(delayed), params(reference)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for sa, sb in zip(delayed.stages, reference.stages):  # BatchNorm statistics moved once per batch
        for a, b in zip(sa.module.buffers(), sb.module.buffers()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_delayed_stage_applies_each_batch_gradient_d_steps_later_at_its_current_weights() -> None:
    # Two stages, delay 2: the gradient stage 0 applies at step t is batch t-2's dL/dh (from the head
    # as it was at t-2) backpropagated through stage 0 as it is at t, on batch t-2's input.
    cpu = torch.device("cpu")
    p, applied = applied_by_stage0("delayed", 3)
    stage0, head = p.stages
    xs = [batch(cpu, seed=i) for i in range(5)]
    dh: dict[int, torch.Tensor] = {}
    for t, (x, y) in enumerate(xs):
        now = copy.deepcopy(stage0.module)  # stage 0's weights during step t (its forward moves none)
        h = now(x).detach().requires_grad_()
        (dh[t],) = torch.autograd.grad(head.loss_fn(copy.deepcopy(head.module)(h), y), [h])
        r = p.train_step(x, y)
        assert r.updated[0] == (t >= 2) and len(applied) == max(0, t - 1)
        if t >= 2:
            x_old = xs[t - 2][0]
            want = torch.autograd.grad(now(x_old), list(now.parameters()), dh[t - 2])
            for got, w in zip(applied[-1], want):
                torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-7)
    assert p.owed == 2
    p.flush()
    assert p.owed == 0 and len(applied) == 5


def test_delayed_needs_the_stop_policy_and_no_bp_lambda() -> None:
    with pytest.raises(ConfigError, match="train.nonfinite: skip and reset are not available with method=delayed"):
        tiny_config(method="delayed", train={"nonfinite": "skip"})
    with pytest.raises(ConfigError, match="synthesizer.bp_lambda: .* needs method dni or cdni"):
        tiny_config(method="delayed", synthesizer={"bp_lambda": 0.5})


@pytest.mark.parametrize("in_flight", [1, 2, 3])
def test_stage_processes_reproduce_the_local_delayed_run(idx_folder: str, tmp_path: Path, in_flight: int) -> None:
    from workers.process_launch import launch_processes

    sections = dict(method="delayed", model={"depth": 3}, log={"dir": str(tmp_path), "every": 1, "grad_every": 0},
                    runtime={"max_in_flight": in_flight}, checkpoint={"every": 7}, train={"epochs": 2})
    results = launch_processes(runtime_config(idx_folder, **sections), timeout_s=120)
    run_dir, local = train_locally(runtime_config(idx_folder, backend="local", threads=1, **sections))
    got = [(s, m["train/loss"]) for s, m in results[-1]["metrics"] if "train/loss" in m]
    want = losses(run_dir)
    assert len(got) == len(want) == 18
    for (sg, vg), (sw, vw) in zip(got, want):
        assert sg == sw and vg == pytest.approx(vw, rel=1e-6, abs=1e-7)
    acc = [m["test/accuracy"] for _, m in results[-1]["metrics"] if "test/accuracy" in m]
    assert acc[-1] == pytest.approx(local["test_accuracy"])
    stale = [v for _, m in results[0]["metrics"] for k, v in m.items() if k.startswith("stage/staleness_max/")]
    assert stale and max(stale) == in_flight - 1  # the delay the schedule gives
